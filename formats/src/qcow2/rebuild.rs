//! Rebuilding the refcount structure from counted references, for
//! `check` when the refcount table or blocks cannot be trusted.
//!
//! The input is `check`'s in-memory refcount array: one counter per host
//! cluster, which is all the refcount blocks of the image laid end to end.
//! New refcount blocks and a new refcount table are allocated in that
//! array (never through the on-disk refcounts, which are what is broken),
//! each block is written as its slice of the array, and the header is
//! switched to the new table last, so a crash before that leaves the old
//! structure in place. The old table and blocks are then leaked, and the
//! caller's second pass repairs the leaks.
//!
//! Placement follows QEMU's `rebuild_refcount_structure` exactly (each
//! block in the first free cluster at or after the range it describes,
//! the table in the first free run from the start), so that an image
//! repaired by either tool comes out byte for byte the same.

use block_core::{Error, IoBuf, Result, WriteFlags};

use super::check::{OverlapAbort, RefusedWrite};
use super::header::{put32, put64, MAX_REFTABLE_BYTES};
use super::meta::Which;
use super::refcount::rc_set;
use super::Qcow2;

/// Finds `n` free clusters in `refs` at or after `*first_free` (growing
/// `refs` past its end when no run is long enough), marks them used and
/// returns the first. `*first_free` moves to the first gap seen.
fn alloc_in_memory(refs: &mut Vec<u64>, n: u64, first_free: &mut u64) -> u64 {
    let mut c = *first_free;
    let mut run = 0;
    let mut first_gap = true;
    while c < refs.len() as u64 && run < n {
        if refs[c as usize] == 0 {
            run += 1;
            if first_gap {
                *first_free = c;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        c += 1;
    }
    if run < n {
        refs.resize((c + n - run) as usize, 0);
    }
    let start = c - run;
    for r in &mut refs[start as usize..(start + n) as usize] {
        *r = 1;
    }
    start
}

impl Qcow2 {
    /// Writes a new refcount structure describing `refs` and switches the
    /// header to it. `meta` lists the metadata no block or table may be
    /// written over: a write that would is refused, the image marked
    /// corrupt and the refused write returned, as QEMU's overlap check
    /// does.
    pub(crate) async fn rebuild_refcount_structure(
        &self,
        refs: &mut Vec<u64>,
        meta: &[(u64, u64, &'static str)],
    ) -> Result<Option<OverlapAbort>> {
        let order = self.hdr.borrow().refcount_order;
        self.write_refcount_structure(refs, meta, order).await
    }

    /// Writes a refcount structure of entries `1 << order` bits wide that
    /// describes `refs`, and switches the header (refcount order too) to
    /// it.
    async fn write_refcount_structure(
        &self,
        refs: &mut Vec<u64>,
        meta: &[(u64, u64, &'static str)],
        order: u32,
    ) -> Result<Option<OverlapAbort>> {
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        if self.broken.get() {
            // Marked corrupt while counting: QEMU's first block write fails.
            return Ok(Some(OverlapAbort {
                what: None,
                offset: 0,
                write: RefusedWrite::Refblock,
            }));
        }
        self.check_writable_meta()?;
        // Cached blocks describe the old structure; the new blocks may even
        // sit at the same offsets.
        self.drop_cached_tables(Which::Refcount);
        let mut table: Vec<u64> = Vec::new();
        let end = refs.len() as u64;
        let grown = match self
            .write_refblocks(refs, 0, end, &mut table, meta, order)
            .await?
        {
            Ok(g) => g,
            Err(a) => return Ok(Some(a)),
        };
        debug_assert!(grown, "the header cluster is always in use");
        let (table_off, table_clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(cs);
            let mut first_free = 0;
            let start = alloc_in_memory(refs, clusters, &mut first_free);
            // The table's own clusters change the blocks that cover them.
            let grown = match self
                .write_refblocks(refs, start, start + clusters, &mut table, meta, order)
                .await?
            {
                Ok(g) => g,
                Err(a) => return Ok(Some(a)),
            };
            if !grown {
                break (start << cb, clusters);
            }
        };
        let len = table_clusters * cs;
        if len > MAX_REFTABLE_BYTES {
            return Err(Error::invalid(
                "rebuilt refcount table would exceed its maximum size",
            ));
        }
        let mut tb = vec![0u8; len as usize];
        for (i, &e) in table.iter().enumerate() {
            put64(&mut tb, i * 8, e);
        }
        if let Some(a) = self
            .guard_rebuild_write(table_off, len, meta, RefusedWrite::Reftable)
            .await
        {
            return Ok(Some(a));
        }
        let io = async {
            self.file
                .pwrite(table_off, IoBuf::from_slice(&tb), WriteFlags::default())
                .await?;
            let mut h = [0u8; 12];
            put64(&mut h, 0, table_off);
            put32(&mut h, 8, table_clusters as u32);
            if order == self.hdr.borrow().refcount_order {
                self.file
                    .pwrite(48, IoBuf::from_slice(&h), WriteFlags::default())
                    .await?;
            } else {
                // The width changes with the table, in one write: header
                // bytes 48 to 100 (version 3), the rest as it stands.
                let mut w = self.hdr.borrow().serialize()?[48..100].to_vec();
                w[..12].copy_from_slice(&h);
                put32(&mut w, 48, order);
                self.file
                    .pwrite(48, IoBuf::from_slice(&w), WriteFlags::default())
                    .await?;
            }
            self.sync_now().await
        };
        if let Err(e) = io.await {
            self.broken.set(true);
            return Err(e);
        }
        {
            let mut h = self.hdr.borrow_mut();
            h.refcount_table_offset = table_off;
            h.refcount_table_clusters = table_clusters as u32;
            h.refcount_order = order;
        }
        table.resize((len / 8) as usize, 0);
        *self.reftable.borrow_mut() = table;
        // Everything up to the end of the array may have been written.
        let end = refs.len() as u64;
        if end > self.end_cluster.get() {
            self.end_cluster.set(end);
        }
        if end > self.zero_from.get() {
            self.zero_from.set(end);
        }
        self.free_hint.set(0);
        Ok(None)
    }

    /// Writes the refcount blocks for the clusters in use in
    /// `[first, end)`, allocating those `table` lacks; returns whether
    /// `table` had to grow (QEMU's `rebuild_refcounts_write_refblocks`),
    /// or the write the overlap check refused.
    async fn write_refblocks(
        &self,
        refs: &mut Vec<u64>,
        first: u64,
        mut end: u64,
        table: &mut Vec<u64>,
        meta: &[(u64, u64, &'static str)],
        order: u32,
    ) -> Result<std::result::Result<bool, OverlapAbort>> {
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        let rb_bits = self.cluster_bits + 3 - order;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        };
        let mut first_free = 0;
        let mut grown = false;
        let mut c = first;
        while c < end {
            if refs.get(c as usize).copied().unwrap_or(0) == 0 {
                c += 1;
                continue;
            }
            let idx = (c >> rb_bits) as usize;
            let start = (idx as u64) << rb_bits;
            let off = match table.get(idx).copied().filter(|&o| o != 0) {
                Some(o) => o,
                None => {
                    // Never inside a block already written.
                    first_free = first_free.max(start);
                    let b = alloc_in_memory(refs, 1, &mut first_free);
                    if b >= end {
                        // That block's own refcount must be written too.
                        end = b + 1;
                    }
                    if table.len() <= idx {
                        let entries = ((idx as u64 + 1) * 8).next_multiple_of(cs) / 8;
                        table.resize(entries as usize, 0);
                        grown = true;
                    }
                    table[idx] = b << cb;
                    b << cb
                }
            };
            if let Some(a) = self
                .guard_rebuild_write(off, cs, meta, RefusedWrite::Refblock)
                .await
            {
                return Ok(Err(a));
            }
            let mut block = vec![0u8; cs as usize];
            let n = 1u64 << rb_bits;
            for i in 0..n {
                let v = refs.get((start + i) as usize).copied().unwrap_or(0);
                if v != 0 {
                    rc_set(&mut block, order, i as usize, v.min(max));
                }
            }
            if let Err(e) = self
                .file
                .pwrite(off, IoBuf::from_slice(&block), WriteFlags::default())
                .await
            {
                self.broken.set(true);
                return Err(e);
            }
            c = start + n;
        }
        Ok(Ok(grown))
    }

    /// Changes the width of refcount entries to `bits` (QEMU's amend
    /// `refcount_bits`): every refcount is read, a new structure of the
    /// new width is written into free clusters and switched to in one
    /// header write, then the old table and blocks are freed. Refused,
    /// before any write, when a refcount does not fit the new width.
    ///
    /// `status` gets (done, all) on QEMU's scale, so that `amend -p` prints
    /// what qemu-img prints: QEMU walks the old refcount table three times
    /// (two allocation walks, one write walk), reporting each entry. Here
    /// the first walk's ticks follow the reading of the refcounts, the
    /// second's the placement of the new structure and the third's its
    /// writing.
    pub async fn change_refcount_width(&self, bits: u32, status: &dyn Fn(u64, u64)) -> Result<()> {
        let _g = self.lock_meta_idle().await;
        self.check_writable_meta()?;
        if self.read_only.get() {
            return Err(Error::ReadOnly {
                node: self.node_name.clone(),
            });
        }
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        let order = bits.trailing_zeros();
        if order == self.hdr.borrow().refcount_order {
            return Ok(());
        }
        if self.hdr.borrow().version < 3 {
            return Err(Error::invalid(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        // Settled L2 tables: no freed cluster is still referenced on disk.
        self.flush_caches().await?;
        let cs = self.cluster_size;
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let n = self.file.size().div_ceil(cs);
        let entries = self.reftable.borrow().len() as u64;
        let all = 3 * entries;
        let rb_bits = self.rb_bits();
        let mut ticked = 0;
        let mut tick_to = |to: u64| {
            while ticked < to.min(all) {
                status(ticked, all);
                ticked += 1;
            }
        };
        let mut refs = Vec::with_capacity(n as usize);
        for c in 0..n {
            tick_to((c >> rb_bits) + 1);
            let r = self.get_refcount(c).await?;
            if r > max {
                return Err(Error::invalid(format!(
                    "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has a refcount of {r}",
                    c * cs
                )));
            }
            refs.push(r);
        }
        tick_to(2 * entries);
        let (old_table, old_clusters) = {
            let h = self.hdr.borrow();
            (h.refcount_table_offset, h.refcount_table_clusters as u64)
        };
        let old_blocks: Vec<u64> = self
            .reftable
            .borrow()
            .iter()
            .copied()
            .filter(|&b| b != 0)
            .collect();
        // Every cluster in use has a refcount, so the new structure only
        // lands on free clusters: nothing for the overlap check to guard.
        if let Some(a) = self.write_refcount_structure(&mut refs, &[], order).await? {
            return Err(self.corrupt(format!(
                "refcount structure write refused at {:#x}",
                a.offset
            )));
        }
        tick_to(all);
        status(all, all);
        let cb = self.cluster_bits;
        for b in old_blocks {
            self.update_refcount(b >> cb, -1, super::DiscardKind::Other)
                .await?;
        }
        for i in 0..old_clusters {
            self.update_refcount((old_table >> cb) + i, -1, super::DiscardKind::Other)
                .await?;
        }
        self.flush_caches().await
    }

    /// The overlap check before a rebuild write: hitting metadata that the
    /// old structure or the tables still name marks the image corrupt.
    async fn guard_rebuild_write(
        &self,
        off: u64,
        len: u64,
        meta: &[(u64, u64, &'static str)],
        write: RefusedWrite,
    ) -> Option<OverlapAbort> {
        let what = super::check::metadata_hit(meta, off, len, self.cluster_size)?;
        let msg = format!("Preventing invalid write on metadata (overlaps with {what})");
        self.signal_corruption(&msg, off, len).await;
        Some(OverlapAbort {
            what: Some(what),
            offset: off,
            write,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::alloc_in_memory;

    #[test]
    fn in_memory_allocation_takes_the_first_free_run() {
        let mut refs = vec![1, 0, 1, 0, 0, 1];
        let mut ff = 0;
        assert_eq!(alloc_in_memory(&mut refs, 2, &mut ff), 3);
        assert_eq!(ff, 1, "the first gap, though too small");
        assert_eq!(refs, [1, 0, 1, 1, 1, 1]);
        let mut ff = 4;
        assert_eq!(alloc_in_memory(&mut refs, 2, &mut ff), 6);
        assert_eq!(refs.len(), 8, "grown past the end");
        let mut ff = 0;
        assert_eq!(alloc_in_memory(&mut refs, 1, &mut ff), 1);
    }
}
