//! Refcounts: reading and updating entries of any width (1..64 bits),
//! cluster allocation with a free-cluster hint, creating refcount blocks and
//! growing the refcount table. Runs on the loop thread under `meta`.
//!
//! Write order: a new refcount block is written and flushed before the
//! refcount table entry that points to it; a grown refcount table (with the
//! blocks covering itself) is written and flushed before the header points
//! to it, and the old table is freed only afterwards. Ordinary increments
//! and decrements go through the refcount cache (see `mod.rs` for how they
//! are ordered against L2 tables).

use block_core::{Error, IoBuf, Result, WriteFlags};

use super::header::{be16, be32, be64, put32, put64, MAX_REFTABLE_BYTES};
use super::meta::Which;
use super::{DiscardKind, Qcow2};

/// How many freed clusters may wait for an L2 flush (see `unsettled`)
/// before an allocation flushes the L2 cache to reuse them.
const MAX_UNSETTLED: usize = 4096;

/// Reads entry `i` of a refcount block with `order` (log2 of the width).
pub(crate) fn rc_get(b: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let byte = b[i / per];
            ((byte >> ((i % per) * bits)) as u64) & ((1u64 << bits) - 1)
        }
        3 => b[i] as u64,
        4 => be16(b, i * 2) as u64,
        5 => be32(b, i * 4) as u64,
        _ => be64(b, i * 8),
    }
}

/// Sets entry `i` of a refcount block (`v` must fit the width).
pub(crate) fn rc_set(b: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = (i % per) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            b[i / per] = (b[i / per] & !mask) | (((v as u8) << shift) & mask);
        }
        3 => b[i] = v as u8,
        4 => b[i * 2..i * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => put32(b, i * 4, v as u32),
        _ => put64(b, i * 8, v),
    }
}

impl Qcow2 {
    fn rc_order(&self) -> u32 {
        self.hdr.borrow().refcount_order
    }

    /// Refcount entries per refcount block (log2).
    pub(crate) fn rb_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.rc_order()
    }

    fn rc_max(&self) -> u64 {
        let bits = 1u32 << self.rc_order();
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// QEMU's complaint about refcount block `r` when its offset is not
    /// cluster aligned (the open accepts such a table, as QEMU's does;
    /// only using the block is an error).
    pub(crate) fn unaligned_refblock(&self, r: usize) -> Option<String> {
        let off = self.reftable.borrow().get(r).copied().unwrap_or(0);
        if off & (self.cluster_size - 1) == 0 {
            return None;
        }
        // C's %#x: no prefix for zero.
        let index = if r == 0 {
            "0".to_owned()
        } else {
            format!("{r:#x}")
        };
        Some(format!(
            "Refblock offset {off:#x} unaligned (reftable index: {index})"
        ))
    }

    /// The offset of refcount block `r` (0: none), or the corruption
    /// error (signalled) when it is unaligned.
    async fn refblock_offset(&self, r: usize) -> Result<u64> {
        if let Some(msg) = self.unaligned_refblock(r) {
            self.signal_corruption_at(&msg, None).await;
            return Err(self.corrupt(msg));
        }
        Ok(self.reftable.borrow().get(r).copied().unwrap_or(0))
    }

    /// Refcount of cluster `c` (0 beyond the table or without a block).
    pub(crate) async fn get_refcount(&self, c: u64) -> Result<u64> {
        let r = (c >> self.rb_bits()) as usize;
        let off = self.refblock_offset(r).await?;
        if off == 0 {
            return Ok(0);
        }
        let t = self.load_table(Which::Refcount, off).await?;
        let i = (c & ((1 << self.rb_bits()) - 1)) as usize;
        let v = rc_get(&t.borrow(), self.rc_order(), i);
        Ok(v)
    }

    fn is_reserved(&self, c: u64) -> bool {
        self.reserved.borrow().iter().any(|&(s, e)| c >= s && c < e)
    }

    fn reserve(&self, s: u64, e: u64) {
        self.reserved.borrow_mut().push((s, e));
        if e > self.end_cluster.get() {
            self.end_cluster.set(e);
        }
    }

    fn unreserve(&self, s: u64) {
        self.reserved.borrow_mut().retain(|x| x.0 != s);
    }

    /// Whether cluster `c` may be handed out: refcount zero, not reserved
    /// by an allocation in progress, not freed by a discard whose L2 update
    /// is still only in the cache.
    async fn is_free(&self, c: u64) -> Result<bool> {
        Ok(!self.is_reserved(c)
            && !self.unsettled.borrow().contains(&c)
            && self.get_refcount(c).await? == 0)
    }

    /// First free, unreserved cluster at or after `from`.
    async fn find_free(&self, from: u64) -> Result<u64> {
        let mut c = from.max(1);
        loop {
            if self.is_free(c).await? {
                return Ok(c);
            }
            c += 1;
            if c > (i64::MAX as u64) >> self.cluster_bits {
                return Err(Error::invalid("image is full"));
            }
        }
    }

    /// Allocates one cluster (refcount one); returns its host offset.
    pub(crate) async fn alloc_cluster(&self) -> Result<u64> {
        self.check_writable_meta()?;
        if self.unsettled.borrow().len() >= MAX_UNSETTLED {
            // Many discards without a flush: write the L2 tables out so
            // their clusters can be used again instead of growing the file.
            self.flush_cache(Which::L2).await?;
        }
        let c = self.find_free(self.free_hint.get()).await?;
        self.reserve(c, c + 1);
        let r = self.update_refcount(c, 1, DiscardKind::Other).await;
        self.unreserve(c);
        r?;
        self.free_hint.set(c + 1);
        Ok(c << self.cluster_bits)
    }

    /// Allocates `len` (< one cluster) bytes for a compressed cluster,
    /// packed after the previous one as QEMU's `qcow2_alloc_bytes` does:
    /// every host cluster a compressed cluster touches holds one reference
    /// for it, and data may run on into the next cluster when that one is
    /// allocated right behind.
    pub(crate) async fn alloc_compressed_bytes(&self, len: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        let mut off = self.compressed_cursor.get();
        if off != 0 && self.get_refcount(off >> cb).await? >= self.rc_max() {
            off = 0;
        }
        let free_in = if off == 0 { 0 } else { cs - (off & (cs - 1)) };
        let start = if off != 0 && free_in >= len {
            self.update_refcount(off >> cb, 1, DiscardKind::Other)
                .await?;
            off
        } else {
            let fresh = self.alloc_cluster().await?;
            if off != 0 && fresh == (off & !(cs - 1)) + cs {
                self.update_refcount(off >> cb, 1, DiscardKind::Other)
                    .await?;
                off
            } else {
                fresh
            }
        };
        let end = start + len;
        self.compressed_cursor
            .set(if end & (cs - 1) == 0 { 0 } else { end });
        Ok(start)
    }

    /// Allocates `n` contiguous clusters: the first run of free clusters
    /// from the free-cluster hint, as QEMU's `qcow2_alloc_clusters` places
    /// tables (so a snapshot table or a grown L1 reuses a hole as QEMU's
    /// would), and like it moves the hint past the run.
    pub(crate) async fn alloc_contiguous(&self, n: u64) -> Result<u64> {
        self.check_writable_meta()?;
        let mut s = self.find_free(self.free_hint.get()).await?;
        let mut k = 1;
        while k < n {
            if self.is_free(s + k).await? {
                k += 1;
            } else {
                s = self.find_free(s + k + 1).await?;
                k = 1;
            }
        }
        self.reserve(s, s + n);
        let mut res = Ok(0);
        for c in s..s + n {
            res = self.update_refcount(c, 1, DiscardKind::Other).await;
            if res.is_err() {
                break;
            }
        }
        self.unreserve(s);
        res?;
        self.free_hint.set(s + n);
        Ok(s << self.cluster_bits)
    }

    /// Adds `delta` to the refcount of cluster `c`, creating refcount
    /// blocks (and growing the table) as needed. A count that drops to zero
    /// frees the cluster (and discards it on the file when configured).
    pub(crate) async fn update_refcount(
        &self,
        c: u64,
        delta: i64,
        why: DiscardKind,
    ) -> Result<u64> {
        self.check_writable_meta()?;
        let r = (c >> self.rb_bits()) as usize;
        let mut off = self.refblock_offset(r).await?;
        if off == 0 {
            if delta < 0 {
                return Err(self.corrupt(format!(
                    "refcount of cluster {c:#x} would drop below zero (no refcount block)"
                )));
            }
            Box::pin(self.create_refblock(r as u64)).await?;
            off = self.reftable.borrow().get(r).copied().unwrap_or(0);
            if off == 0 {
                return Err(self.corrupt("refcount block creation failed"));
            }
        }
        let t = self.load_table(Which::Refcount, off).await?;
        let i = (c & ((1 << self.rb_bits()) - 1)) as usize;
        let order = self.rc_order();
        let old = rc_get(&t.borrow(), order, i);
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= self.rc_max())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "refcount of cluster {c:#x} would overflow (refcount_bits={})",
                        1 << order
                    ))
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                self.corrupt(format!(
                    "refcount of cluster {c:#x} (host offset {:#x}) would drop below zero",
                    c << self.cluster_bits
                ))
            })?
        };
        rc_set(&mut t.borrow_mut(), order, i, new);
        self.mark_dirty(Which::Refcount, off);
        if new == 0 {
            if c < self.free_hint.get() {
                self.free_hint.set(c);
            }
            self.unsettled.borrow_mut().insert(c);
            let cur = self.compressed_cursor.get();
            if cur != 0 && cur >> self.cluster_bits == c {
                // Never append compressed data to a cluster given back.
                self.compressed_cursor.set(0);
            }
            if c >= self.zero_from.get() {
                // A freed cluster keeps its old bytes: only clusters never
                // handed out since open still read as zeros.
                self.zero_from.set(self.end_cluster.get().max(c + 1));
            }
            let host = c << self.cluster_bits;
            self.forget_table(Which::L2, host);
            let pass = match why {
                DiscardKind::Request => self.pass_discard[0],
                DiscardKind::Snapshot => self.pass_discard[1],
                DiscardKind::Other => self.pass_discard[2],
                DiscardKind::Always => true,
            };
            if pass && self.file.flags().discard_unmap {
                self.discard_on_settle.borrow_mut().push(host);
            }
        }
        Ok(new)
    }

    /// Creates the refcount block for range `r` (which has none, so every
    /// cluster in it is free).
    async fn create_refblock(&self, r: u64) -> Result<()> {
        let rb_bits = self.rb_bits();
        if r as usize >= self.reftable.borrow().len() {
            self.grow_reftable(r + 1).await?;
            if self.reftable.borrow().get(r as usize).copied().unwrap_or(0) != 0 {
                // The grown table's own blocks covered this range.
                return Ok(());
            }
        }
        let first = r << rb_bits;
        let last = (r + 1) << rb_bits;
        let cand = (first.max(1)..last).find(|&c| !self.is_reserved(c));
        let mut block = vec![0u8; self.cluster_size as usize];
        let n = match cand {
            Some(n) => {
                // Self-describing: the block holds its own refcount.
                rc_set(&mut block, self.rc_order(), (n - first) as usize, 1);
                self.reserve(n, n + 1);
                self.unreserve(n);
                n
            }
            None => {
                let n = self.find_free(last).await?;
                self.reserve(n, n + 1);
                let res = self.update_refcount(n, 1, DiscardKind::Other).await;
                self.unreserve(n);
                res?;
                n
            }
        };
        let off = n << self.cluster_bits;
        self.check_writable_meta()?;
        let write = async {
            self.file
                .pwrite(off, IoBuf::from_slice(&block), WriteFlags::default())
                .await?;
            self.sync_now().await?;
            let rt = self.hdr.borrow().refcount_table_offset;
            self.file
                .pwrite(
                    rt + r * 8,
                    IoBuf::from_slice(&off.to_be_bytes()),
                    WriteFlags::default(),
                )
                .await?;
            self.sync_now().await
        };
        if let Err(e) = write.await {
            self.broken.set(true);
            return Err(e);
        }
        self.reftable.borrow_mut()[r as usize] = off;
        self.insert_table(Which::Refcount, off, block, false)
            .await?;
        Ok(())
    }

    pub(crate) async fn sync_now(&self) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.file.flush().await
    }

    /// Grows the refcount table to at least `min_entries`, placing the new
    /// table and the refcount blocks that describe it at the end of the
    /// image (QEMU's refcount area).
    async fn grow_reftable(&self, min_entries: u64) -> Result<()> {
        let cb = self.cluster_bits;
        let cs = self.cluster_size;
        let rb_bits = self.rb_bits();
        let cur: Vec<u64> = self.reftable.borrow().clone();
        let cur_n = cur.len() as u64;
        let s = self.end_cluster.get().max(self.data_end().div_ceil(cs));
        let want = min_entries.max(cur_n + cur_n / 2).max(cur_n + 1);
        let (mut t, mut b) = (0u64, 0u64);
        let mut entries;
        loop {
            let end = s + t + b;
            entries = want.max(((end.max(s + 1) - 1) >> rb_bits) + 1);
            let nt = (entries * 8).div_ceil(cs);
            let area_end = s + nt + b;
            let nb = ((s >> rb_bits)..=((area_end - 1) >> rb_bits))
                .filter(|&r| r >= cur_n || cur[r as usize] == 0)
                .count() as u64;
            if nt == t && nb == b {
                break;
            }
            t = nt;
            b = nb;
        }
        if t * cs > MAX_REFTABLE_BYTES {
            return Err(Error::invalid(
                "refcount table would exceed its maximum size",
            ));
        }
        let entries = t * cs / 8;
        let area_end = s + t + b;
        let mut table = cur.clone();
        table.resize(entries as usize, 0);
        // New refcount blocks, in range order, right after the table.
        let order = self.rc_order();
        let mut next_block = s + t;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for r in (s >> rb_bits)..=((area_end - 1) >> rb_bits) {
            if table[r as usize] != 0 {
                continue;
            }
            let mut blk = vec![0u8; cs as usize];
            for c in s.max(r << rb_bits)..area_end.min((r + 1) << rb_bits) {
                rc_set(&mut blk, order, (c - (r << rb_bits)) as usize, 1);
            }
            table[r as usize] = next_block << cb;
            new_blocks.push((next_block << cb, blk));
            next_block += 1;
        }
        self.reserve(s, area_end);
        // Area clusters in ranges that already have blocks.
        let mut res = Ok(0);
        for c in s..area_end {
            let r = (c >> rb_bits) as usize;
            if r < cur.len() && cur[r] != 0 {
                res = self.update_refcount(c, 1, DiscardKind::Other).await;
                if res.is_err() {
                    break;
                }
            }
        }
        self.unreserve(s);
        res?;
        let io = async {
            self.flush_cache(Which::Refcount).await?;
            for (off, blk) in &new_blocks {
                self.file
                    .pwrite(*off, IoBuf::from_slice(blk), WriteFlags::default())
                    .await?;
            }
            let mut tb = vec![0u8; (t * cs) as usize];
            for (i, &e) in table.iter().enumerate() {
                put64(&mut tb, i * 8, e);
            }
            self.file
                .pwrite(s << cb, IoBuf::from_slice(&tb), WriteFlags::default())
                .await?;
            self.sync_now().await?;
            let mut h = [0u8; 12];
            put64(&mut h, 0, s << cb);
            put32(&mut h, 8, t as u32);
            self.file
                .pwrite(48, IoBuf::from_slice(&h), WriteFlags::default())
                .await?;
            self.sync_now().await
        };
        if let Err(e) = io.await {
            self.broken.set(true);
            return Err(e);
        }
        let (old_off, old_clusters) = {
            let mut h = self.hdr.borrow_mut();
            let o = (h.refcount_table_offset, h.refcount_table_clusters);
            h.refcount_table_offset = s << cb;
            h.refcount_table_clusters = t as u32;
            o
        };
        *self.reftable.borrow_mut() = table;
        for (off, blk) in new_blocks {
            self.insert_table(Which::Refcount, off, blk, false).await?;
        }
        for i in 0..old_clusters as u64 {
            self.update_refcount((old_off >> cb) + i, -1, DiscardKind::Other)
                .await?;
        }
        Ok(())
    }

    /// Frees a cluster referenced by an L2 entry that was just replaced
    /// (the L2 change must already be in the cache).
    pub(crate) async fn free_l2_cluster(
        &self,
        e: super::l2::L2Entry,
        why: DiscardKind,
    ) -> Result<()> {
        if !std::rc::Rc::ptr_eq(&self.data, &self.file) {
            // External data file: data clusters carry no refcounts.
            return Ok(());
        }
        if e.host() != 0 {
            // In-place writes into this cluster finish before it is freed.
            self.inflight.wait_idle(e.host() >> self.cluster_bits).await;
        }
        let cb = self.cluster_bits;
        if e.is_compressed() {
            let (off, len) = e.compressed_extent(cb);
            let first = off >> cb;
            let last = (off + len.max(1) - 1) >> cb;
            self.rc_needs_l2().await?;
            for c in first..=last {
                self.update_refcount(c, -1, why).await?;
            }
            return Ok(());
        }
        let h = e.host();
        if h != 0 {
            self.rc_needs_l2().await?;
            self.update_refcount(h >> cb, -1, why).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_roundtrip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut b = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for i in 0..n {
                rc_set(&mut b, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rc_get(&b, order, i),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        // Sub-byte widths fill from the least significant bit.
        let mut b = vec![0u8; 1];
        rc_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        rc_set(&mut b, 0, 7, 1);
        assert_eq!(b[0], 0x81);
    }
}
