//! Expanding zero clusters for a downgrade to version 2 (QEMU's
//! `qcow2_expand_zero_clusters`).
//!
//! Version 2 has no zero flag, so every zero cluster in every L2 table,
//! the snapshots' included, must become something version 2 reads as
//! zeros: nothing at all when no backing file shows through, else a host
//! cluster full of zeros. A preallocated zero cluster keeps its host
//! cluster, which is zeroed, as QEMU does.
//!
//! One deliberate difference: QEMU zeroes a preallocated zero cluster even
//! when another L2 table still maps the same host cluster as data (a
//! snapshot taken before the zero write), and that snapshot then reads
//! zeros. Here such a cluster is not touched: the zero entry lets go of its
//! reference and reads as unallocated (or gets a cluster of its own over a
//! backing file).
//!
//! Crash order: zeros reach the disk (flushed) before an L2 table that
//! maps them as data; allocations' refcounts before the L2 tables using
//! them; references are dropped only after the L2 tables are written.

use std::collections::HashSet;

use block_core::{Result, WriteFlags};

use super::l2::{L1E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::meta::Which;
use super::{DiscardKind, Qcow2};

impl Qcow2 {
    /// Turns every zero cluster of the image (active and snapshot L2
    /// tables) into what a version 2 reader takes for zeros. `status` gets
    /// (L1 entries done, L1 entries in all), after each entry, as QEMU
    /// reports it.
    pub(crate) async fn expand_zero_clusters(&self, status: &dyn Fn(u64, u64)) -> Result<()> {
        let _g = self.meta.lock().await;
        self.check_writable_meta()?;
        let mut l1s = vec![self.l1.borrow().clone()];
        for s in self.read_snapshots().await? {
            l1s.push(self.read_l1(&s).await?);
        }
        let backed = self.hdr.borrow().backing_file.is_some();
        let total: u64 = l1s.iter().map(|l| l.len() as u64).sum();
        let mut done = 0;
        let mut seen = HashSet::new();
        for (n, l1) in l1s.iter().enumerate() {
            for (i, &e) in l1.iter().enumerate() {
                done += 1;
                let l2 = e & L1E_OFFSET_MASK;
                if l2 == 0 || !seen.insert(l2) {
                    status(done, total);
                    continue;
                }
                if !l2.is_multiple_of(self.cluster_size) {
                    return Err(self.corrupt(format!(
                        "L2 table offset {l2:#x} unaligned (L1 index: {i:#x}{})",
                        if n == 0 { "" } else { ", snapshot" }
                    )));
                }
                self.expand_zero_clusters_in_l2(l2, backed).await?;
                status(done, total);
            }
        }
        self.flush_caches().await
    }

    async fn expand_zero_clusters_in_l2(&self, l2: u64, backed: bool) -> Result<()> {
        let cb = self.cluster_bits;
        let cs = self.cluster_size;
        let t = self.load_table(Which::L2, l2).await?;
        // A table shared by k L1 tables holds k references to each of its
        // clusters.
        let refs = self.get_refcount(l2 >> cb).await?.max(1);
        let copied = if refs == 1 { OFLAG_COPIED } else { 0 };
        let mut zeroed = false;
        let mut allocated = false;
        let mut released = Vec::new();
        let mut changes = Vec::new();
        let entries: Vec<_> = {
            let t = t.borrow();
            (0..1usize << self.l2_bits)
                .map(|j| self.l2_entry_at(&t, j))
                .collect()
        };
        for (j, le) in entries.into_iter().enumerate() {
            if le.is_compressed() || le.entry & OFLAG_ZERO == 0 {
                continue;
            }
            let host = le.host();
            if host != 0 && !host.is_multiple_of(cs) {
                return Err(self.corrupt(format!(
                    "Cluster allocation offset {host:#x} unaligned (L2 offset: {l2:#x}, L2 index: {j:#x})"
                )));
            }
            let mine = host != 0 && self.get_refcount(host >> cb).await? <= refs;
            let mut ne = le;
            if mine {
                self.data
                    .pwrite_zeroes(host, cs, WriteFlags::default())
                    .await?;
                zeroed = true;
                ne.entry = host | copied;
            } else {
                if host != 0 {
                    released.push(host);
                }
                if backed {
                    let fresh = self.alloc_cluster().await?;
                    if refs > 1 {
                        self.update_refcount(fresh >> cb, refs as i64 - 1, DiscardKind::Other)
                            .await?;
                    }
                    self.data
                        .pwrite_zeroes(fresh, cs, WriteFlags::default())
                        .await?;
                    zeroed = true;
                    allocated = true;
                    ne.entry = fresh | copied;
                } else {
                    ne.entry = 0;
                }
            }
            changes.push((j, ne));
        }
        if changes.is_empty() {
            return Ok(());
        }
        if zeroed {
            self.sync_now().await?;
        }
        if allocated {
            self.l2_needs_rc().await?;
        }
        let t = self.load_table(Which::L2, l2).await?;
        for (j, ne) in changes {
            self.set_l2_entry_at(&mut t.borrow_mut(), j, ne);
        }
        self.mark_dirty(Which::L2, l2);
        if !released.is_empty() {
            self.rc_needs_l2().await?;
            for host in released {
                self.update_refcount(host >> cb, -(refs as i64), DiscardKind::Other)
                    .await?;
            }
        }
        Ok(())
    }
}
