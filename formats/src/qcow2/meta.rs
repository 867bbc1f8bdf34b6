//! Metadata access: loading, caching and writing back L2 tables and
//! refcount blocks, L1 entries, and the dependency rules between the two
//! caches. Runs on the node's loop thread with the driver's `meta` mutex
//! held by the caller.
//!
//! Write order: a cache with a dependency flushes the other cache (write +
//! flush of the file) before writing any of its own tables; see `mod.rs`.

use std::cell::RefCell;
use std::rc::Rc;

use block_core::{IoBuf, Result, WriteFlags};

use super::cache::{Table, TableCache};
use super::header::{be64, put64};
use super::l2::{L2Entry, L1E_OFFSET_MASK, OFLAG_COPIED};
use super::Qcow2;

/// A copy of a table's bytes.
fn copy_table(t: &Table) -> Vec<u8> {
    t.borrow().clone()
}

/// Which metadata cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    /// L2 tables.
    L2,
    /// Refcount blocks.
    Refcount,
}

impl Qcow2 {
    fn cache(&self, w: Which) -> &TableCache {
        match w {
            Which::L2 => &self.l2_cache,
            Which::Refcount => &self.rc_cache,
        }
    }

    pub(crate) fn check_writable_meta(&self) -> Result<()> {
        if self.broken.get() {
            return Err(self.corrupt("an earlier metadata write failed; refusing further writes"));
        }
        Ok(())
    }

    /// Writes a table back to the file.
    async fn write_table(&self, offset: u64, data: &Table) -> Result<()> {
        self.check_writable_meta()?;
        let buf = IoBuf::from_slice(&data.borrow());
        if let Err(e) = self.file.pwrite(offset, buf, WriteFlags::default()).await {
            self.broken.set(true);
            return Err(e);
        }
        Ok(())
    }

    async fn sync_file(&self) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.file.flush().await
    }

    fn dep_flag(&self, w: Which) -> &std::cell::Cell<bool> {
        match w {
            Which::L2 => &self.l2_dep_rc,
            Which::Refcount => &self.rc_dep_l2,
        }
    }

    /// Writes every dirty table of one cache and flushes the file, first
    /// flushing the other cache if this one depends on it. Afterwards the
    /// other cache no longer depends on this one.
    pub(crate) async fn flush_cache(&self, w: Which) -> Result<()> {
        let other = match w {
            Which::L2 => Which::Refcount,
            Which::Refcount => Which::L2,
        };
        if self.dep_flag(w).get() {
            // Never both set (see l2_needs_rc / rc_needs_l2), so this
            // recursion is one level deep.
            debug_assert!(!self.dep_flag(other).get());
            Box::pin(self.flush_cache(other)).await?;
            self.dep_flag(w).set(false);
        }
        let dirty = self.cache(w).dirty();
        if dirty.is_empty() && !self.dep_flag(other).get() {
            self.settle(w).await;
            return Ok(());
        }
        for (off, t) in dirty {
            self.write_table(off, &t).await?;
            self.cache(w).mark_clean(off);
        }
        self.sync_file().await?;
        self.dep_flag(other).set(false);
        self.settle(w).await;
        Ok(())
    }

    /// With every L2 table on disk, no entry there points to a cluster
    /// freed before: those are discarded on the file, if asked, and may
    /// be allocated again (in that order, so a punch never hits new data).
    async fn settle(&self, w: Which) {
        if !matches!(w, Which::L2) {
            return;
        }
        let mut hosts = std::mem::take(&mut *self.discard_on_settle.borrow_mut());
        hosts.sort_unstable();
        let cs = self.cluster_size;
        let mut i = 0;
        while i < hosts.len() {
            let mut end = hosts[i] + cs;
            let mut j = i + 1;
            while j < hosts.len() && hosts[j] <= end {
                end = end.max(hosts[j] + cs);
                j += 1;
            }
            // A hint: failures do not matter.
            let _ = self.file.pdiscard(hosts[i], end - hosts[i]).await;
            i = j;
        }
        self.unsettled.borrow_mut().clear();
    }

    /// Flushes both caches (refcounts first unless a dependency says
    /// otherwise).
    pub(crate) async fn flush_caches(&self) -> Result<()> {
        if self.rc_dep_l2.get() {
            self.flush_cache(Which::L2).await?;
            self.flush_cache(Which::Refcount).await
        } else {
            self.flush_cache(Which::Refcount).await?;
            self.flush_cache(Which::L2).await
        }
    }

    /// Records that L2 tables must wait for refcount blocks (call before
    /// changing an L2 table to use a newly allocated cluster).
    pub(crate) async fn l2_needs_rc(&self) -> Result<()> {
        if self.lazy_refcounts {
            // Refcounts may lag once the image is marked dirty.
            return self.mark_image_dirty().await;
        }
        if self.rc_dep_l2.get() {
            self.flush_cache(Which::L2).await?;
        }
        self.l2_dep_rc.set(true);
        Ok(())
    }

    /// Records that refcount blocks must wait for L2 tables (call before a
    /// refcount decrement whose L2 change is already in the cache).
    pub(crate) async fn rc_needs_l2(&self) -> Result<()> {
        if self.l2_dep_rc.get() {
            self.flush_cache(Which::Refcount).await?;
        }
        self.rc_dep_l2.set(true);
        Ok(())
    }

    /// Makes room in a cache for one more table.
    async fn make_room(&self, w: Which) -> Result<()> {
        while let Some((off, t, dirty)) = self.cache(w).victim() {
            if dirty {
                if self.dep_flag(w).get() {
                    let other = match w {
                        Which::L2 => Which::Refcount,
                        Which::Refcount => Which::L2,
                    };
                    self.flush_cache(other).await?;
                    self.dep_flag(w).set(false);
                }
                self.write_table(off, &t).await?;
            }
            self.cache(w).remove(off);
        }
        Ok(())
    }

    /// Loads a table through its cache.
    pub(crate) async fn load_table(&self, w: Which, offset: u64) -> Result<Table> {
        if let Some(t) = self.cache(w).lookup(offset) {
            return Ok(t);
        }
        self.make_room(w).await?;
        let b = self
            .file
            .pread(offset, IoBuf::zeroed(self.cluster_size as usize))
            .await?;
        let t: Table = Rc::new(RefCell::new(b.to_vec()));
        self.cache(w).insert(offset, Rc::clone(&t), false);
        Ok(t)
    }

    /// Inserts a freshly created table (already on disk unless `dirty`).
    pub(crate) async fn insert_table(
        &self,
        w: Which,
        offset: u64,
        data: Vec<u8>,
        dirty: bool,
    ) -> Result<Table> {
        self.make_room(w).await?;
        let t: Table = Rc::new(RefCell::new(data));
        self.cache(w).insert(offset, Rc::clone(&t), dirty);
        Ok(t)
    }

    /// Marks a cached table dirty.
    pub(crate) fn mark_dirty(&self, w: Which, offset: u64) {
        self.cache(w).mark_dirty(offset)
    }

    /// Drops a table from a cache without writing it (its cluster is freed).
    pub(crate) fn forget_table(&self, w: Which, offset: u64) {
        self.cache(w).remove(offset)
    }

    /// Drops every table of a cache without writing any back (the
    /// structure they belong to is being replaced).
    pub(crate) fn drop_cached_tables(&self, w: Which) {
        self.cache(w).clear()
    }

    /// The L2 entry at `idx` of a table's bytes.
    pub(crate) fn l2_entry_at(&self, t: &[u8], idx: usize) -> L2Entry {
        if self.extended {
            L2Entry {
                entry: be64(t, idx * 16),
                bitmap: be64(t, idx * 16 + 8),
            }
        } else {
            L2Entry {
                entry: be64(t, idx * 8),
                bitmap: 0,
            }
        }
    }

    /// Stores an L2 entry into a table's bytes.
    pub(crate) fn set_l2_entry_at(&self, t: &mut [u8], idx: usize, e: L2Entry) {
        if self.extended {
            put64(t, idx * 16, e.entry);
            put64(t, idx * 16 + 8, e.bitmap);
        } else {
            put64(t, idx * 8, e.entry);
        }
    }

    /// L1 index of a guest offset.
    pub(crate) fn l1_index(&self, guest: u64) -> usize {
        (guest >> (self.cluster_bits + self.l2_bits)) as usize
    }

    /// L2 index of a guest offset.
    pub(crate) fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize
    }

    /// The L2 table covering `guest`, or `None` if unallocated.
    pub(crate) async fn l2_table_for_read(&self, guest: u64) -> Result<Option<Table>> {
        let i = self.l1_index(guest);
        let e = self.l1.borrow().get(i).copied().unwrap_or(0);
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.cluster_size - 1) != 0 {
            return Err(self.corrupt(format!(
                "L2 table offset {off:#x} unaligned (L1 index: {i:#x})"
            )));
        }
        if self.is_metadata_clash(off) {
            return Err(self.corrupt(format!(
                "L2 table offset {off:#x} (L1 index {i:#x}) overlaps the image header"
            )));
        }
        self.load_table(Which::L2, off).await.map(Some)
    }

    fn is_metadata_clash(&self, off: u64) -> bool {
        off < self.cluster_size
    }

    /// The L2 entry for `guest`.
    pub(crate) async fn l2_entry(&self, guest: u64) -> Result<L2Entry> {
        match self.l2_table_for_read(guest).await? {
            None => Ok(L2Entry {
                entry: 0,
                bitmap: 0,
            }),
            Some(t) => Ok(self.l2_entry_at(&t.borrow(), self.l2_index(guest))),
        }
    }

    /// Writes L1 entry `i` to disk (and the in-memory table).
    pub(crate) async fn write_l1_entry(&self, i: usize, v: u64) -> Result<()> {
        self.check_writable_meta()?;
        self.l1.borrow_mut()[i] = v;
        let off = self.hdr.borrow().l1_table_offset + i as u64 * 8;
        if let Err(e) = self
            .file
            .pwrite(
                off,
                IoBuf::from_slice(&v.to_be_bytes()),
                WriteFlags::default(),
            )
            .await
        {
            self.broken.set(true);
            return Err(e);
        }
        Ok(())
    }

    /// The L2 table covering `guest`, allocated (or copied, when shared
    /// with a snapshot) so that it can be changed in place. Returns its
    /// offset and contents.
    pub(crate) async fn l2_table_for_write(&self, guest: u64) -> Result<(u64, Table)> {
        let i = self.l1_index(guest);
        let e =
            *self.l1.borrow().get(i).ok_or_else(|| {
                self.corrupt(format!("guest offset {guest:#x} beyond the L1 table"))
            })?;
        let old = e & L1E_OFFSET_MASK;
        if old != 0 && e & OFLAG_COPIED != 0 {
            let t = self
                .l2_table_for_read(guest)
                .await?
                .ok_or_else(|| self.corrupt("L2 table vanished"))?;
            return Ok((old, t));
        }
        // Allocate a new table (a copy of the shared one, or zeros).
        let data = if old != 0 {
            let t = self
                .l2_table_for_read(guest)
                .await?
                .ok_or_else(|| self.corrupt("L2 table vanished"))?;
            copy_table(&t)
        } else {
            vec![0u8; self.cluster_size as usize]
        };
        let new = self.alloc_cluster().await?;
        // Refcount first, then the table, then the L1 entry.
        self.flush_cache(Which::Refcount).await?;
        let t: Table = Rc::new(RefCell::new(data));
        self.write_table(new, &t).await?;
        self.sync_file().await?;
        self.write_l1_entry(i, new | OFLAG_COPIED).await?;
        let data = t.borrow().clone();
        let t = self.insert_table(Which::L2, new, data, false).await?;
        if old != 0 {
            self.forget_table(Which::L2, old);
            self.sync_file().await?;
            self.update_refcount(old >> self.cluster_bits, -1, super::DiscardKind::Other)
                .await?;
        }
        Ok((new, t))
    }
}
