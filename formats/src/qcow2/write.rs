//! The write path: in-place writes, allocating writes with copy-on-write
//! from the backing file / shared / compressed clusters, zero clusters,
//! discard, and resize. Runs on the loop thread.
//!
//! Write order for an allocating write (under `meta`): allocate the host
//! cluster (refcount in the cache), write the guest data merged with the
//! copied head and tail in one request, record that the L2 cache depends on
//! the refcount cache, update the L2 entry in the cache, and only then drop
//! the reference to a replaced cluster (refcount cache now depends on the
//! L2 cache). Writes into clusters that are allocated with refcount one go
//! straight to the data file after translation, without holding `meta`.

use std::rc::Rc;

use block_core::{Error, IoBuf, Node, Prealloc, Result, WriteFlags};

use super::cache::CoGuard;
use super::header::put64;
use super::l2::{sc_mask, L2Entry, SubType, BITMAP_ALL_ZEROES, OFLAG_COPIED, OFLAG_ZERO};
use super::meta::Which;
use super::{DiscardKind, Qcow2};

impl Qcow2 {
    /// QEMU's "constant" overlap check: guest data must never be written
    /// over the header, the active L1 table, the refcount table or the
    /// snapshot table. A violation means corrupt metadata: the request
    /// fails, the image is marked corrupt and takes no more writes.
    async fn check_overlap(&self, host: u64, len: u64) -> Result<()> {
        if !Rc::ptr_eq(&self.data, &self.file) || len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size;
        let hit = {
            let h = self.hdr.borrow();
            let areas = [
                (0, cs, "qcow2_header"),
                (h.l1_table_offset, h.l1_size as u64 * 8, "active L1 table"),
                (
                    h.refcount_table_offset,
                    h.refcount_table_clusters as u64 * cs,
                    "refcount table",
                ),
                (
                    h.snapshots_offset,
                    if h.nb_snapshots > 0 { cs } else { 0 },
                    "snapshot table",
                ),
            ];
            areas
                .into_iter()
                .find(|&(start, alen, _)| alen > 0 && host < start + alen && start < host + len)
                .map(|(_, _, what)| what)
        };
        let Some(what) = hit else {
            return Ok(());
        };
        let msg = format!("Preventing invalid write on metadata (overlaps with {what})");
        self.signal_corruption(&msg, host, len).await;
        Err(self.corrupt(format!(
            "{msg}: data write at host offset {host:#x} ({len} bytes)"
        )))
    }

    /// QEMU's `qcow2_signal_corruption` for fatal cases: sets the corrupt
    /// bit in the header (version 3), refuses further writes and emits
    /// BLOCK_IMAGE_CORRUPTED once.
    pub(crate) async fn signal_corruption(&self, msg: &str, offset: u64, size: u64) {
        self.signal_corruption_at(msg, Some((offset, size))).await
    }

    /// [`Qcow2::signal_corruption`] with the affected range when known. On
    /// a read-only image the corruption is not fatal, as in QEMU: reported,
    /// but neither marked nor stopping reads.
    pub(crate) async fn signal_corruption_at(&self, msg: &str, range: Option<(u64, u64)>) {
        let fatal = !self.read_only.get();
        if fatal {
            self.broken.set(true);
        }
        if self.corruption_signalled.replace(true) {
            return;
        }
        let v3 = self.hdr.borrow().version >= 3;
        if v3 && fatal {
            let features = {
                let mut h = self.hdr.borrow_mut();
                h.incompatible_features |= super::header::INCOMPAT_CORRUPT;
                h.incompatible_features
            };
            // Best effort: the image is already unusable for writes.
            if self
                .file
                .pwrite(
                    72,
                    IoBuf::from_slice(&features.to_be_bytes()),
                    WriteFlags::default(),
                )
                .await
                .is_ok()
            {
                let _ = self.file.flush().await;
            }
        }
        self.file
            .events()
            .emit(block_core::BlockEvent::ImageCorrupted {
                device: String::new(),
                node_name: self.node_name.clone(),
                msg: msg.to_owned(),
                offset: range.map(|r| r.0),
                size: range.map(|r| r.1),
                fatal,
            });
    }

    fn check_write(&self) -> Result<()> {
        if self.read_only.get() {
            return Err(Error::ReadOnly {
                node: self.node_name.clone(),
            });
        }
        self.check_writable_meta()
    }

    /// Whether a run starting at `off` can be written in place; returns
    /// the host offset and the length of the run.
    async fn inplace_run(&self, off: u64, len: u64) -> Result<Option<(u64, u64)>> {
        let (ty, host, n) = self.classify(off, len).await?;
        if ty != SubType::Normal {
            return Ok(None);
        }
        // COPIED is per cluster: check each cluster of the run.
        let mut pos = off;
        let end = off + n;
        let mut ok_end = off;
        while pos < end {
            let e = self.l2_entry(pos).await?;
            if !e.copied() {
                break;
            }
            let next = ((pos >> self.cluster_bits) + 1) << self.cluster_bits;
            ok_end = next.min(end);
            pos = next;
        }
        if ok_end == off {
            return Ok(None);
        }
        Ok(Some((host, ok_end - off)))
    }

    pub(crate) async fn write_impl(
        &self,
        node: &Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        self.check_write()?;
        let len = buf.len() as u64;
        let mut rest = buf;
        let mut out: Option<IoBuf> = None;
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let gc = off >> self.cluster_bits;
            let g = self.meta.lock().await;
            if self.allocating.busy(gc, gc) {
                let Some(host) = self.fresh.host_of(gc) else {
                    // Another request is allocating this cluster: its
                    // mapping is about to change, so look again once it is
                    // done.
                    drop(g);
                    self.allocating.wait_range_idle(gc, gc).await;
                    continue;
                };
                let n = (self.cluster_size - self.offset_in_cluster(off)).min(len - done);
                let part = take(&mut rest, n);
                match self.join_fresh(g, off, host, part, flags).await? {
                    Ok(part) => {
                        done += n;
                        append(&mut out, part);
                    }
                    Err(mut part) => {
                        // The allocation failed: write anew.
                        part.unsplit(rest);
                        rest = part;
                    }
                }
                continue;
            }
            let run = self.inplace_run(off, len - done).await?;
            let (part, n) = match run {
                Some((host, n)) => {
                    // Keep the clusters from being freed while the data
                    // write runs without `meta`.
                    self.check_overlap(host, n).await?;
                    let _pin = self.inflight.pin(
                        host >> self.cluster_bits,
                        (host + n - 1) >> self.cluster_bits,
                    );
                    drop(g);
                    let part = take(&mut rest, n);
                    let part = self.data.pwrite(host, part, flags).await?;
                    (part, n)
                }
                None => {
                    let fresh = self.fresh_run(off, len - done).await?;
                    if fresh >= 2 {
                        self.alloc_write_run(g, off, fresh, &mut rest, flags)
                            .await?
                    } else {
                        let n = (self.cluster_size - self.offset_in_cluster(off)).min(len - done);
                        let part = take(&mut rest, n);
                        (self.alloc_write(g, node, off, part, flags).await?, n)
                    }
                }
            };
            done += n;
            append(&mut out, part);
        }
        Ok(out.unwrap_or(rest))
    }

    /// Writes `part` at guest `off` into `host`, the cluster an allocating
    /// write in flight is giving to `off`'s guest cluster. Its other bytes
    /// read as zeros and the allocating write writes only its own, so this
    /// write need not wait for it to finish before writing; it completes
    /// once the cluster is linked, so a read after it finds the data. The
    /// buffer comes back as `Err` when the allocation failed instead.
    async fn join_fresh(
        &self,
        g: CoGuard<'_>,
        off: u64,
        host: u64,
        part: IoBuf,
        flags: WriteFlags,
    ) -> Result<std::result::Result<IoBuf, IoBuf>> {
        let gc = off >> self.cluster_bits;
        let at = host + self.offset_in_cluster(off);
        let pin = self
            .inflight
            .pin(host >> self.cluster_bits, host >> self.cluster_bits);
        drop(g);
        let part = self.data.pwrite(at, part, flags).await;
        drop(pin);
        let part = part?;
        self.allocating.wait_range_idle(gc, gc).await;
        let _g = self.meta.lock().await;
        let e = self.l2_entry(off).await?;
        if e.host() == host && e.copied() && !e.is_compressed() {
            Ok(Ok(part))
        } else {
            Ok(Err(part))
        }
    }

    /// Takes `meta` once no allocating write is in flight on guest
    /// clusters `[first, last]`, for operations that change their mapping.
    pub(crate) async fn lock_meta_quiet(&self, first: u64, last: u64) -> CoGuard<'_> {
        loop {
            let g = self.meta.lock().await;
            if !self.allocating.busy(first, last) {
                return g;
            }
            drop(g);
            self.allocating.wait_range_idle(first, last).await;
        }
    }

    /// Takes `meta` with no allocating write in flight anywhere (snapshots,
    /// resize, check).
    pub(crate) async fn lock_meta_idle(&self) -> CoGuard<'_> {
        self.lock_meta_quiet(0, u64::MAX).await
    }

    /// Gives fresh host clusters their room in the file with a zero-range
    /// fallocate, so the data write that follows does not extend the file
    /// (the kernel runs extending writes one at a time). Only an
    /// optimisation: the clusters read as zeros either way.
    async fn zero_fill_ahead(&self, host: u64, len: u64) {
        let zf = WriteFlags {
            no_fallback: true,
            ..WriteFlags::default()
        };
        let _ = self.data.pwrite_zeroes(host, len, zf).await;
    }

    /// Gives back a cluster allocated for a write whose data write failed
    /// (nothing references it yet).
    async fn abort_alloc(&self, host: u64) {
        let _g = self.meta.lock().await;
        // Writes that joined the allocation finish before the cluster is
        // given back.
        self.inflight.wait_idle(host >> self.cluster_bits).await;
        let _ = self
            .update_refcount(host >> self.cluster_bits, -1, DiscardKind::Other)
            .await;
    }

    /// Fills `buf` with the current content of guest range
    /// `[guest, guest+buf.len())` (within one cluster) as described by `e`.
    async fn read_old(&self, node: &Node, e: L2Entry, guest: u64, buf: &mut [u8]) -> Result<()> {
        let scs = 1u64 << self.sc_bits;
        let cs = self.cluster_size;
        if e.is_compressed() {
            let c = self.decompress_cluster(e).await?;
            let a = (guest & (cs - 1)) as usize;
            buf.copy_from_slice(&c[a..a + buf.len()]);
            return Ok(());
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = guest + pos as u64;
            let in_c = g & (cs - 1);
            let sc = (in_c >> self.sc_bits) as u32;
            let n = ((scs - (in_c & (scs - 1))) as usize).min(buf.len() - pos);
            let dst = &mut buf[pos..pos + n];
            match e.subtype(self.extended, sc) {
                SubType::Normal => {
                    let b = self.data.pread(e.host() + in_c, IoBuf::zeroed(n)).await?;
                    dst.copy_from_slice(&b);
                }
                SubType::ZeroAlloc | SubType::ZeroPlain => dst.fill(0),
                SubType::UnallocatedAlloc | SubType::UnallocatedPlain => match node.backing() {
                    Some(b) if g < b.size() => {
                        let avail = ((b.size() - g) as usize).min(n);
                        let r = b.pread(g, IoBuf::zeroed(avail)).await?;
                        dst[..avail].copy_from_slice(&r);
                        dst[avail..].fill(0);
                    }
                    _ => dst.fill(0),
                },
                SubType::Compressed | SubType::Invalid => {
                    return Err(self.corrupt(format!(
                        "invalid L2 entry {:#x} for guest offset {g:#x}",
                        e.entry
                    )))
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// How many whole clusters from `off` (cluster aligned) are entirely
    /// overwritten and have no host cluster yet, within one L2 table: they
    /// can be allocated together and need no copy-on-write.
    async fn fresh_run(&self, off: u64, len: u64) -> Result<u64> {
        let cs = self.cluster_size;
        if !off.is_multiple_of(cs) || len < 2 * cs || !Rc::ptr_eq(&self.data, &self.file) {
            return Ok(0);
        }
        let Some(table) = self.l2_table_for_read(off).await? else {
            return Ok(0);
        };
        let l1e = self.l1.borrow()[self.l1_index(off)];
        if l1e & OFLAG_COPIED == 0 {
            return Ok(0);
        }
        let t = table.borrow();
        let first = self.l2_index(off);
        let per = 1usize << self.l2_bits;
        let max = ((len / cs) as usize).min(per - first).min(1024);
        let gc = off >> self.cluster_bits;
        let mut k = 0;
        while k < max {
            let e = self.l2_entry_at(&t, first + k);
            if e.host() != 0
                || e.is_compressed()
                || self.allocating.busy(gc + k as u64, gc + k as u64)
            {
                break;
            }
            k += 1;
        }
        Ok(k as u64)
    }

    /// Allocates up to `k` contiguous clusters for fully overwritten, fresh
    /// clusters at `off` and writes them in one request. Takes the caller's
    /// `meta` guard and drops it for the data write. Returns the part of
    /// `rest` written and its length.
    async fn alloc_write_run(
        &self,
        g: CoGuard<'_>,
        off: u64,
        k: u64,
        rest: &mut IoBuf,
        flags: WriteFlags,
    ) -> Result<(IoBuf, u64)> {
        let cs = self.cluster_size;
        self.l2_table_for_write(off).await?;
        let first = self.alloc_cluster().await?;
        let mut n = 1;
        while n < k {
            let h = self.alloc_cluster().await?;
            if h != first + n * cs {
                // Not contiguous: give it back (nothing references it yet).
                self.update_refcount(h >> self.cluster_bits, -1, DiscardKind::Other)
                    .await?;
                break;
            }
            n += 1;
        }
        if let Err(e) = self.check_overlap(first, n * cs).await {
            drop(g);
            return Err(e);
        }
        let gc = off >> self.cluster_bits;
        self.grow_room(first + n * cs).await;
        let prezero = first >> self.cluster_bits >= self.zero_from.get()
            && self.allocating.busy(0, u64::MAX)
            && !self.in_room(first, n * cs);
        let _pin = self.allocating.pin(gc, gc + n - 1);
        drop(g);
        if prezero {
            self.zero_fill_ahead(first, n * cs).await;
        }
        let part = take(rest, n * cs);
        let part = match self.data.pwrite(first, part, flags).await {
            Ok(p) => p,
            Err(e) => {
                for i in 0..n {
                    self.abort_alloc(first + i * cs).await;
                }
                return Err(e);
            }
        };
        let _g = self.meta.lock().await;
        self.l2_needs_rc().await?;
        // The table may have left the cache during the data write.
        let (l2_off, table) = self.l2_table_for_write(off).await?;
        let idx = self.l2_index(off);
        {
            let mut t = table.borrow_mut();
            for i in 0..n as usize {
                let ne = L2Entry {
                    entry: (first + i as u64 * cs) | OFLAG_COPIED,
                    bitmap: if self.extended { 0xffff_ffff } else { 0 },
                };
                self.set_l2_entry_at(&mut t, idx + i, ne);
            }
        }
        self.l2_cache.insert(l2_off, table, true);
        Ok((part, n * cs))
    }

    /// An allocating write inside one cluster. Under the caller's `meta`
    /// guard it picks the host cluster and marks the guest cluster busy;
    /// the copy-on-write reads and the data write run without `meta`, so
    /// allocating writes to different clusters overlap; `meta` is taken
    /// again to link the cluster into the L2 table (QEMU's l2meta scheme).
    async fn alloc_write(
        &self,
        g: CoGuard<'_>,
        node: &Node,
        off: u64,
        part: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        let cs = self.cluster_size;
        let scs = 1u64 << self.sc_bits;
        let guest_c = off & !(cs - 1);
        let a = off - guest_c;
        let b = a + part.len() as u64;
        let (_, table) = self.l2_table_for_write(off).await?;
        let idx = self.l2_index(off);
        let old = self.l2_entry_at(&table.borrow(), idx);
        drop(table);
        let external = !Rc::ptr_eq(&self.data, &self.file);
        let old_host = old.host();
        let keep_host = old_host != 0 && (old.copied() || external);
        // The region written: whole cluster, or touched subclusters.
        let (mut ra, mut rb) = if self.extended {
            (a & !(scs - 1), (b + scs - 1) & !(scs - 1))
        } else {
            (0, cs)
        };
        let host = if keep_host {
            old_host
        } else if external {
            // External data files map guest offsets 1:1.
            guest_c
        } else {
            if self.extended && old_host != 0 {
                // Copying a shared cluster: take every subcluster along.
                ra = 0;
                rb = cs;
            }
            if self.extended && old.is_compressed() {
                ra = 0;
                rb = cs;
            }
            self.alloc_cluster().await?
        };
        let new_cluster = !keep_host && !external;
        if new_cluster {
            self.grow_room(host + cs).await;
        }
        // A fresh cluster past everything written since open already reads
        // as zeros: when the copy-on-write source is zeros too, only the
        // guest data needs writing (QEMU zeroes such clusters with an extra
        // fallocate instead).
        let cow_is_zero = old_host == 0
            && !old.is_compressed()
            && (old.entry & OFLAG_ZERO != 0
                || node.backing().is_none_or(|bk| bk.size() <= guest_c));
        let zero_fill = new_cluster && !self.extended && cow_is_zero;
        let mut prezero = false;
        if zero_fill && host >> self.cluster_bits >= self.zero_from.get() {
            ra = a;
            rb = b;
            // With other allocations in flight, give the file its new
            // cluster first with a zero-range fallocate: the data write then
            // no longer extends the file, which the kernel would run
            // synchronously, one at a time. Alone, the extra call is slower.
            // A partial write always gets it: the rest of the cluster is
            // likely written next, and those writes must not extend either.
            prezero = (b - a < cs || self.allocating.busy(0, u64::MAX)) && !self.in_room(host, cs);
        }
        if let Err(e) = self.check_overlap(host + ra, rb - ra).await {
            drop(g);
            return Err(e);
        }
        let gc = guest_c >> self.cluster_bits;
        let _pin = self.allocating.pin(gc, gc);
        // Writes to the rest of a fresh, zero-reading cluster may join this
        // one instead of waiting for it (not after a zero fill of the
        // whole cluster, which would wipe their data).
        let _fresh =
            (new_cluster && ra == a && rb == b && !prezero).then(|| self.fresh.add(gc, host));
        drop(g);

        let data = async {
            if prezero {
                self.zero_fill_ahead(host, cs).await;
            }
            if ra == a && rb == b {
                // Nothing to merge: write the caller's buffer as it is.
                return self.data.pwrite(host + ra, part, flags).await;
            }
            let mut region = IoBuf::zeroed((rb - ra) as usize);
            if a > ra {
                self.read_old(node, old, guest_c + ra, &mut region[..(a - ra) as usize])
                    .await?;
            }
            if rb > b {
                let s = (b - ra) as usize;
                self.read_old(node, old, guest_c + b, &mut region[s..])
                    .await?;
            }
            region[(a - ra) as usize..(b - ra) as usize].copy_from_slice(&part);
            self.data.pwrite(host + ra, region, flags).await?;
            Ok(part)
        };
        let part = match data.await {
            Ok(p) => p,
            Err(e) => {
                if new_cluster {
                    self.abort_alloc(host).await;
                }
                return Err(e);
            }
        };

        let _g = self.meta.lock().await;
        // Metadata: L2 entry after the data, refcount before the L2 entry.
        if new_cluster {
            self.l2_needs_rc().await?;
        }
        let (l2_off, table) = self.l2_table_for_write(off).await?;
        // Subcluster bits of other requests may have landed meanwhile.
        let cur = self.l2_entry_at(&table.borrow(), idx);
        let mut ne = L2Entry {
            entry: host | OFLAG_COPIED,
            bitmap: 0,
        };
        if self.extended {
            let first = (ra >> self.sc_bits) as u32;
            let n = ((rb - ra) >> self.sc_bits) as u32;
            let m = sc_mask(first, n);
            // A copied shared or compressed cluster was copied entirely.
            let mut bm = if (new_cluster && old_host != 0) || old.is_compressed() {
                m
            } else {
                cur.bitmap
            };
            bm |= m;
            bm &= !(m << 32);
            ne.bitmap = bm;
        }
        self.set_l2_entry_at(&mut table.borrow_mut(), idx, ne);
        self.l2_cache.insert(l2_off, table, true);
        if new_cluster && (old_host != 0 || old.is_compressed()) {
            self.free_l2_cluster(old, DiscardKind::Other).await?;
        }
        Ok(part)
    }

    /// Makes full clusters read as zeros; partial clusters are written as
    /// zero data.
    pub(crate) async fn write_zeroes_impl(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        self.check_write()?;
        let unmap_only = self.zeroes_need_unmap(node.backing().is_some())?;
        let cs = self.cluster_size;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let next = ((off / cs) + 1) * cs;
            let n = next.min(end) - off;
            let full = off.is_multiple_of(cs) && (n == cs || off + n == self.size.get());
            if !full {
                let scs = 1u64 << self.sc_bits;
                let whole_subclusters = self.extended
                    && off.is_multiple_of(scs)
                    && (n.is_multiple_of(scs) || off + n == self.size.get());
                if whole_subclusters {
                    let gc = off >> self.cluster_bits;
                    let _g = self.lock_meta_quiet(gc, gc).await;
                    if self.zero_subclusters(off, n).await? {
                        off += n;
                        continue;
                    }
                }
                self.write_impl(node, off, IoBuf::zeroed(n as usize), flags)
                    .await?;
            } else {
                let gc = off >> self.cluster_bits;
                let _g = self.lock_meta_quiet(gc, gc).await;
                self.zero_cluster(off, flags.may_unmap || unmap_only)
                    .await?;
            }
            off += n;
        }
        Ok(())
    }

    /// Whether whole clusters can read as zeros only by being unmapped:
    /// version 2 has no zero flag, and an unallocated cluster reads as
    /// zeros there only without a backing file (QEMU discards them the
    /// same way). Over a backing file it is unsupported, and the caller
    /// falls back to writing zeros.
    fn zeroes_need_unmap(&self, backed: bool) -> Result<bool> {
        let v2 = self.hdr.borrow().version < 3 && !self.extended;
        if v2 && backed {
            return Err(Error::unsupported(
                "qcow2",
                "zero clusters in compat=0.10 images",
            ));
        }
        Ok(v2)
    }

    /// Makes whole clusters read as zeros, unmapping them, for a caller
    /// outside the graph (`convert -c` onto a target that holds data, as
    /// qemu-img writes zeroes there). `offset` is cluster-aligned; `len`
    /// covers whole clusters or reaches the end of the image.
    pub(crate) async fn zero_whole_clusters(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write()?;
        let cs = self.cluster_size;
        self.zeroes_need_unmap(self.hdr.borrow().backing_file.is_some())?;
        if !offset.is_multiple_of(cs)
            || !(len.is_multiple_of(cs) || offset + len == self.size.get())
        {
            return Err(Error::invalid("zeroing must cover whole clusters"));
        }
        let mut off = offset;
        while off < offset + len {
            let gc = off >> self.cluster_bits;
            let _g = self.lock_meta_quiet(gc, gc).await;
            self.zero_cluster(off, true).await?;
            off += cs;
        }
        Ok(())
    }

    /// Marks whole subclusters of one cluster as zero in its extended L2
    /// entry (QEMU's `zero_l2_subclusters`); `false` for a compressed
    /// cluster, which has no subclusters: the caller writes zeros.
    async fn zero_subclusters(&self, off: u64, len: u64) -> Result<bool> {
        let (l2_off, table) = self.l2_table_for_write(off).await?;
        let idx = self.l2_index(off);
        let old = self.l2_entry_at(&table.borrow(), idx);
        if old.is_compressed() {
            return Ok(false);
        }
        let first = self.offset_in_cluster(off) >> self.sc_bits;
        let n = len.div_ceil(1 << self.sc_bits);
        let range = ((1u64 << n) - 1) << first;
        let ne = L2Entry {
            entry: old.entry,
            bitmap: (old.bitmap | (range << 32)) & !range,
        };
        if ne != old {
            self.set_l2_entry_at(&mut table.borrow_mut(), idx, ne);
            self.mark_dirty(Which::L2, l2_off);
        }
        Ok(true)
    }

    async fn zero_cluster(&self, off: u64, may_unmap: bool) -> Result<()> {
        let (l2_off, table) = self.l2_table_for_write(off).await?;
        let idx = self.l2_index(off);
        let old = self.l2_entry_at(&table.borrow(), idx);
        let external = !Rc::ptr_eq(&self.data, &self.file);
        let unmap = (may_unmap || !old.copied() || old.is_compressed()) && !external;
        let mut ne = if unmap {
            L2Entry {
                entry: 0,
                bitmap: 0,
            }
        } else {
            L2Entry {
                entry: old.entry,
                bitmap: 0,
            }
        };
        if self.extended {
            ne.bitmap = BITMAP_ALL_ZEROES;
        } else if self.hdr.borrow().version >= 3 {
            ne.entry |= OFLAG_ZERO;
        }
        // Version 2 has no zero flag: only an unmapped cluster (with no
        // backing file, the caller's check) reads as zeros there.
        if ne == old {
            return Ok(());
        }
        self.set_l2_entry_at(&mut table.borrow_mut(), idx, ne);
        self.mark_dirty(Which::L2, l2_off);
        if unmap && (old.host() != 0 || old.is_compressed()) {
            self.free_l2_cluster(old, DiscardKind::Request).await?;
        }
        Ok(())
    }

    /// Discards full clusters: they read as zeros afterwards (QEMU's
    /// `qcow2_co_pdiscard`), partial clusters are ignored.
    pub(crate) async fn discard_impl(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.check_write()?;
        let cs = self.cluster_size;
        let size = self.size.get();
        let start = offset.div_ceil(cs) * cs;
        let end = if offset + len >= size {
            offset + len
        } else {
            (offset + len) / cs * cs
        };
        let _g = self
            .lock_meta_quiet(
                start >> self.cluster_bits,
                end.saturating_sub(1) >> self.cluster_bits,
            )
            .await;
        let mut off = start;
        while off < end {
            let e = self.l2_entry(off).await?;
            let version = self.hdr.borrow().version;
            let backing = node.backing().is_some();
            let ne = if self.extended {
                L2Entry {
                    entry: 0,
                    bitmap: if backing || e.host() != 0 || e.is_compressed() {
                        BITMAP_ALL_ZEROES
                    } else {
                        0
                    },
                }
            } else if (backing || e.host() != 0 || e.is_compressed()) && version >= 3 {
                L2Entry {
                    entry: OFLAG_ZERO,
                    bitmap: 0,
                }
            } else {
                L2Entry {
                    entry: 0,
                    bitmap: 0,
                }
            };
            if ne != e && !(e.entry == 0 && e.bitmap == 0 && !backing) {
                let (l2_off, table) = self.l2_table_for_write(off).await?;
                let idx = self.l2_index(off);
                self.set_l2_entry_at(&mut table.borrow_mut(), idx, ne);
                self.mark_dirty(Which::L2, l2_off);
                if !Rc::ptr_eq(&self.data, &self.file) {
                    if e.host() != 0 {
                        let _ = self.data.pdiscard(e.host(), cs).await;
                    }
                } else if e.host() != 0 || e.is_compressed() {
                    self.free_l2_cluster(e, DiscardKind::Request).await?;
                }
            }
            off += cs;
        }
        Ok(())
    }

    /// Grows the image (shrinking is refused for now).
    pub(crate) async fn truncate_impl(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        self.check_write()?;
        let cs = self.cluster_size;
        if !size.is_multiple_of(512) {
            return Err(Error::invalid("Image size must be a multiple of 512 bytes"));
        }
        if prealloc != Prealloc::Off {
            return Err(Error::unsupported("qcow2", "preallocation on resize"));
        }
        let old = self.size.get();
        let _g = self.lock_meta_idle().await;
        if size < old {
            return self.shrink(size).await;
        }
        let need = self.hdr.borrow().l1_entries_for(size);
        if need > super::header::MAX_L1_BYTES / 8 {
            return Err(Error::invalid(
                "The image size is too large for file format 'qcow2'",
            ));
        }
        let cur = self.l1.borrow().len() as u64;
        if need > cur {
            // A new L1 table at the end of the image, then the header.
            self.flush_caches().await?;
            let new_n = need;
            let clusters = (new_n * 8).div_ceil(cs);
            let new_off = self.alloc_contiguous(clusters).await?;
            self.flush_caches().await?;
            // The table rounded to 512 bytes, not to the cluster: QEMU
            // writes no more, so the file ends where QEMU's would.
            let mut tb = vec![0u8; (new_n * 8).next_multiple_of(512) as usize];
            for (i, &e) in self.l1.borrow().iter().enumerate() {
                put64(&mut tb, i * 8, e);
            }
            self.file
                .pwrite(new_off, IoBuf::from_slice(&tb), WriteFlags::default())
                .await?;
            self.sync_now().await?;
            let mut h = [0u8; 12];
            h[..4].copy_from_slice(&(new_n as u32).to_be_bytes());
            h[4..].copy_from_slice(&new_off.to_be_bytes());
            self.file
                .pwrite(36, IoBuf::from_slice(&h), WriteFlags::default())
                .await?;
            self.sync_now().await?;
            let (old_off, old_n) = {
                let mut hd = self.hdr.borrow_mut();
                let o = (hd.l1_table_offset, hd.l1_size as u64);
                hd.l1_table_offset = new_off;
                hd.l1_size = new_n as u32;
                o
            };
            self.l1.borrow_mut().resize(new_n as usize, 0);
            if old_n > 0 {
                let oc = (old_n * 8).div_ceil(cs);
                for i in 0..oc {
                    self.update_refcount((old_off / cs) + i, -1, DiscardKind::Other)
                        .await?;
                }
            }
        }
        self.file
            .pwrite(
                24,
                IoBuf::from_slice(&size.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
        self.sync_now().await?;
        self.hdr.borrow_mut().size = size;
        self.size.set(size);
        Ok(())
    }
}

impl Qcow2 {
    /// Shrinks the image: clusters past the new end are freed (L2 entries
    /// first, then refcounts), L2 tables wholly past it too, then the header
    /// takes the new size, and the file ends after the last cluster still
    /// in use, as QEMU leaves it.
    async fn shrink(&self, size: u64) -> Result<()> {
        let cs = self.cluster_size;
        let start = size.div_ceil(cs) * cs;
        let old = self.size.get();
        let mut off = start;
        while off < old {
            let e = self.l2_entry(off).await?;
            if e.entry != 0 || e.bitmap != 0 {
                let (l2_off, table) = self.l2_table_for_write(off).await?;
                let idx = self.l2_index(off);
                self.set_l2_entry_at(
                    &mut table.borrow_mut(),
                    idx,
                    L2Entry {
                        entry: 0,
                        bitmap: 0,
                    },
                );
                self.mark_dirty(Which::L2, l2_off);
                if e.host() != 0 || e.is_compressed() {
                    // Discarded whatever pass-discard-other says, as QEMU does.
                    self.free_l2_cluster(e, DiscardKind::Always).await?;
                }
            }
            off += cs;
        }
        // L2 tables that only map clusters past the end.
        let span = cs << self.l2_bits;
        let first_l1 = size.div_ceil(span) as usize;
        let n = self.l1.borrow().len();
        for i in first_l1..n {
            let e = self.l1.borrow()[i];
            let l2 = e & super::l2::L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            // The table is all zeros now; it leaves the L1 table before its
            // refcount drops.
            self.flush_caches().await?;
            self.write_l1_entry(i, 0).await?;
            self.sync_now().await?;
            self.forget_table(Which::L2, l2);
            self.update_refcount(l2 >> self.cluster_bits, -1, DiscardKind::Always)
                .await?;
        }
        self.flush_caches().await?;
        self.file
            .pwrite(
                24,
                IoBuf::from_slice(&size.to_be_bytes()),
                WriteFlags::default(),
            )
            .await?;
        self.sync_now().await?;
        self.hdr.borrow_mut().size = size;
        self.size.set(size);
        self.cut_file_after_last_used().await
    }
}

/// Adds `part`, the next piece written, to the buffer handed back.
fn append(out: &mut Option<IoBuf>, part: IoBuf) {
    match out {
        Some(o) => o.unsplit(part),
        None => *out = Some(part),
    }
}

/// Cuts the first `n` bytes off `rest`.
fn take(rest: &mut IoBuf, n: u64) -> IoBuf {
    if n as usize == rest.len() {
        std::mem::replace(rest, IoBuf::zeroed(0))
    } else {
        rest.split_to(n as usize)
    }
}
