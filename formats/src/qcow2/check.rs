//! `check`: recomputes every cluster's refcount from the metadata (header,
//! refcount table and blocks, active and snapshot L1 tables, their L2
//! tables and data clusters, the snapshot table) and compares it with the
//! stored refcounts, as `qemu-img check` does. With `repair`, leaked
//! clusters (stored refcount too high) and, when asked, refcount errors
//! (too low) are fixed by rewriting refcounts through the normal refcount
//! path, then everything is flushed.
//!
//! Then, as QEMU's `check_oflag_copied` does, every active L1 entry and
//! every entry of an active L2 table with a host cluster must carry
//! OFLAG_COPIED exactly when the cluster's stored refcount is 1. This runs
//! after the refcount repair so that it judges repaired refcounts; a wrong
//! flag is repaired with `errors`, or with `leaks` when the refcounts
//! came out clean (the flag can then be trusted to follow them). The write
//! path relies on the flag to decide whether a cluster may be written in
//! place, so a flag set on a shared cluster would let a write leak into a
//! snapshot.
//!
//! Runs on the loop thread under `meta`. Memory is bounded by the image
//! file's size in clusters (and refused beyond [`MAX_CHECK_CLUSTERS`]).

use std::rc::Rc;

use block_core::{Error, IoBuf, Result};

use super::header::{be16, be32, be64};
use super::l2::{L2Entry, L1E_OFFSET_MASK, OFLAG_COPIED};
use super::meta::Which;
use super::{DiscardKind, Qcow2};

/// Largest number of host clusters `check` tracks (1 GiB of counters).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 27;

/// What `check` found and fixed: the fields of `qemu-img check
/// --output=json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that prevented a complete check.
    pub check_errors: u64,
    /// Refcounts lower than their use (or invalid metadata).
    pub corruptions: u64,
    /// Clusters with a refcount higher than their use.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in this layer.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One past the highest host offset in use.
    pub image_end_offset: u64,
    /// Every cluster whose stored refcount differs from its use, in
    /// cluster order (what `qemu-img check` reports line by line).
    pub mismatches: Vec<RefcountMismatch>,
    /// OFLAG_COPIED flags that disagree with the refcount, in L1 order
    /// (each L2 table's entry before its data clusters).
    pub copied: Vec<CopiedMismatch>,
}

/// Which table entry carries a wrong OFLAG_COPIED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopiedEntry {
    /// Active L1 entry `l1_index`, pointing to an L2 table.
    L2Table {
        /// Index in the active L1 table.
        l1_index: usize,
    },
    /// An entry of an active L2 table, pointing to a data cluster.
    Data,
}

/// An L1 or L2 entry whose OFLAG_COPIED does not say "refcount is 1".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopiedMismatch {
    /// What the entry points to.
    pub what: CopiedEntry,
    /// The entry as found (first 64 bits for extended L2 entries).
    pub entry: u64,
    /// The stored refcount of the cluster it points to.
    pub refcount: u64,
    /// Whether the flag was rewritten.
    pub fixed: bool,
}

/// A cluster whose stored refcount is not the number of its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountMismatch {
    /// Host cluster index.
    pub cluster: u64,
    /// Stored refcount.
    pub refcount: u64,
    /// References found in the metadata.
    pub reference: u64,
    /// Whether it was repaired.
    pub fixed: bool,
}

/// What `check` may repair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repair {
    /// Fix leaked clusters.
    pub leaks: bool,
    /// Fix refcounts that are too low.
    pub errors: bool,
}

struct Counts {
    cs: u64,
    refs: Vec<u64>,
    report: CheckReport,
}

impl Counts {
    fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r += 1,
                None => self.report.corruptions += 1,
            }
        }
    }
}

impl Qcow2 {
    /// Checks the image; repairs what `repair` allows.
    pub async fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _g = self.lock_meta_idle().await;
        self.flush_caches_if_writable().await?;
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        let fsize = self.file.size();
        // Like QEMU, compare refcounts of the clusters inside the file.
        let nclusters = fsize.div_ceil(cs).max(self.end_cluster.get());
        if nclusters > MAX_CHECK_CLUSTERS {
            return Err(Error::unsupported("qcow2", "checking images this large"));
        }
        let mut cnt = Counts {
            cs,
            refs: vec![0; nclusters as usize],
            report: CheckReport::default(),
        };
        let hdr = self.hdr.borrow().clone();
        cnt.report.total_clusters = hdr.size.div_ceil(cs);
        cnt.add(0, cs);
        // Active L1 and everything below it.
        let l1 = self.l1.borrow().clone();
        cnt.add(hdr.l1_table_offset, l1.len() as u64 * 8);
        self.check_l1(&l1, &mut cnt, true).await?;
        // Snapshots.
        if hdr.nb_snapshots > 0 {
            let mut off = hdr.snapshots_offset;
            let start = off;
            for _ in 0..hdr.nb_snapshots {
                let h = self.file.pread(off, IoBuf::zeroed(40)).await?;
                let l1_off = be64(&h, 0);
                let l1_size = be32(&h, 8) as u64;
                let id_len = be16(&h, 12) as u64;
                let name_len = be16(&h, 14) as u64;
                let extra = be32(&h, 36) as u64;
                if l1_size * 8 > super::header::MAX_L1_BYTES || !l1_off.is_multiple_of(cs) {
                    cnt.report.corruptions += 1;
                    cnt.report.check_errors += 1;
                    break;
                }
                cnt.add(l1_off, l1_size * 8);
                let b = self
                    .file
                    .pread(l1_off, IoBuf::zeroed((l1_size * 8) as usize))
                    .await?;
                let sl1: Vec<u64> = b.chunks_exact(8).map(|c| be64(c, 0)).collect();
                self.check_l1(&sl1, &mut cnt, false).await?;
                off += (40 + extra + id_len + name_len).div_ceil(8) * 8;
            }
            cnt.add(start, off - start);
        }
        // Refcount table and blocks.
        let rt_off = hdr.refcount_table_offset;
        cnt.add(rt_off, hdr.refcount_table_clusters as u64 * cs);
        let reftable = self.reftable.borrow().clone();
        for &b in reftable.iter().filter(|&&b| b != 0) {
            cnt.add(b, cs);
        }
        match self.bitmap_extents().await {
            Ok(v) => {
                for (off, len) in v {
                    cnt.add(off, len);
                }
            }
            Err(_) => {
                cnt.report.corruptions += 1;
                cnt.report.check_errors += 1;
            }
        }
        // Compare.
        let mut end = 0;
        for c in 0..nclusters {
            let want = cnt.refs[c as usize];
            let have = self.get_refcount(c).await?;
            if have > 0 || want > 0 {
                end = c + 1;
            }
            if have == want {
                continue;
            }
            let fix = if have > want {
                cnt.report.leaks += 1;
                repair.leaks && !self.read_only
            } else {
                cnt.report.corruptions += 1;
                repair.errors && !self.read_only
            };
            cnt.report.mismatches.push(RefcountMismatch {
                cluster: c,
                refcount: have,
                reference: want,
                fixed: fix,
            });
            if fix {
                let delta = want as i64 - have as i64;
                self.update_refcount(c, delta, DiscardKind::Other).await?;
                if have > want {
                    cnt.report.leaks_fixed += 1;
                } else {
                    cnt.report.corruptions_fixed += 1;
                }
            }
        }
        // Refcounts past the file (the table may cover more).
        cnt.report.image_end_offset = end << cb;
        let r = &cnt.report;
        let refcounts_clean =
            r.check_errors == 0 && r.corruptions == r.corruptions_fixed && r.leaks == r.leaks_fixed;
        let fix_copied = !self.read_only && (repair.errors || (repair.leaks && refcounts_clean));
        self.check_copied(fix_copied, &mut cnt.report).await?;
        if repair.leaks || repair.errors {
            self.flush_caches_if_writable().await?;
        }
        Ok(cnt.report)
    }

    async fn flush_caches_if_writable(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush_caches().await
    }

    async fn check_l1(&self, l1: &[u64], cnt: &mut Counts, active: bool) -> Result<()> {
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        for &e in l1 {
            // Fragmentation is counted within each L2 table, as QEMU does.
            let mut last_host = 0u64;
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if !l2_off.is_multiple_of(cs) {
                cnt.report.corruptions += 1;
                continue;
            }
            cnt.add(l2_off, cs);
            let t = match self.l2_cache_peek(l2_off) {
                Some(t) => t,
                None => {
                    let b = self.file.pread(l2_off, IoBuf::zeroed(cs as usize)).await?;
                    Rc::new(std::cell::RefCell::new(b.to_vec()))
                }
            };
            let t = t.borrow().clone();
            for i in 0..(1usize << self.l2_bits) {
                let le = self.l2_entry_at(&t, i);
                if le.is_compressed() {
                    let (off, len) = le.compressed_extent(cb);
                    cnt.add(off, len);
                    if active {
                        cnt.report.allocated_clusters += 1;
                        cnt.report.compressed_clusters += 1;
                        // QEMU counts compressed clusters as fragmented:
                        // reading neighbours re-reads shared sectors.
                        cnt.report.fragmented_clusters += 1;
                    }
                    continue;
                }
                let h = le.host();
                if h == 0 {
                    continue;
                }
                if !h.is_multiple_of(cs) {
                    cnt.report.corruptions += 1;
                    continue;
                }
                if Rc::ptr_eq(&self.data, &self.file) {
                    cnt.add(h, cs);
                }
                if active {
                    cnt.report.allocated_clusters += 1;
                    if last_host != 0 && h != last_host + cs {
                        cnt.report.fragmented_clusters += 1;
                    }
                    last_host = h;
                }
            }
        }
        Ok(())
    }

    /// Compares OFLAG_COPIED of the active L1 entries and of the entries of
    /// the active L2 tables with the stored refcounts; rewrites wrong flags
    /// when `fix`.
    async fn check_copied(&self, fix: bool, report: &mut CheckReport) -> Result<()> {
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        // Clusters of an external data file have no refcounts; QEMU takes
        // them as 1.
        let external = !Rc::ptr_eq(&self.data, &self.file);
        let l1 = self.l1.borrow().clone();
        for (i, &e) in l1.iter().enumerate() {
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            // Like QEMU: a refcount that cannot be read was already
            // reported by the refcount comparison.
            let Ok(rc) = self.get_refcount(l2_off >> cb).await else {
                continue;
            };
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                if fix {
                    let v = if rc == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e & !OFLAG_COPIED
                    };
                    self.write_l1_entry(i, v).await?;
                    report.corruptions_fixed += 1;
                }
                report.corruptions += 1;
                report.copied.push(CopiedMismatch {
                    what: CopiedEntry::L2Table { l1_index: i },
                    entry: e,
                    refcount: rc,
                    fixed: fix,
                });
            }
            // An unaligned table was reported by the walk; it is checked
            // where it points, but only repaired through the L2 cache,
            // which holds aligned tables only.
            let aligned = l2_off.is_multiple_of(cs);
            let t = match self.l2_cache_peek(l2_off) {
                Some(t) => t.borrow().clone(),
                None => self
                    .file
                    .pread(l2_off, IoBuf::zeroed(cs as usize))
                    .await?
                    .to_vec(),
            };
            let mut fixes: Vec<(usize, L2Entry)> = Vec::new();
            for j in 0..(1usize << self.l2_bits) {
                let le = self.l2_entry_at(&t, j);
                let h = le.host();
                if le.is_compressed() || h == 0 {
                    continue;
                }
                let rc = if external {
                    1
                } else {
                    match self.get_refcount(h >> cb).await {
                        Ok(rc) => rc,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) == le.copied() {
                    continue;
                }
                let fixed = fix && aligned;
                report.corruptions += 1;
                report.copied.push(CopiedMismatch {
                    what: CopiedEntry::Data,
                    entry: le.entry,
                    refcount: rc,
                    fixed,
                });
                if fixed {
                    let entry = if rc == 1 {
                        le.entry | OFLAG_COPIED
                    } else {
                        le.entry & !OFLAG_COPIED
                    };
                    fixes.push((j, L2Entry { entry, ..le }));
                }
            }
            if !fixes.is_empty() {
                let t = self.load_table(Which::L2, l2_off).await?;
                {
                    let mut b = t.borrow_mut();
                    for &(j, le) in &fixes {
                        self.set_l2_entry_at(&mut b, j, le);
                    }
                }
                self.mark_dirty(Which::L2, l2_off);
                report.corruptions_fixed += fixes.len() as u64;
            }
        }
        Ok(())
    }

    fn l2_cache_peek(&self, off: u64) -> Option<super::cache::Table> {
        self.l2_cache.lookup(off)
    }
}
