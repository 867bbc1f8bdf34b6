//! `check`: recomputes every cluster's refcount from the metadata (header,
//! refcount table and blocks, active and snapshot L1 tables, their L2
//! tables and data clusters, the snapshot table) and compares it with the
//! stored refcounts, as `qemu-img check` does. With `repair`, leaked
//! clusters (stored refcount too high) and, when asked, refcount errors
//! (too low) are fixed by rewriting refcounts through the normal refcount
//! path (freed clusters are discarded, as QEMU's QCOW2_DISCARD_ALWAYS),
//! then everything is flushed.
//!
//! The walk over the L1 and L2 tables notes malformed entries as QEMU's
//! `check_refcounts_l1`/`_l2` do ([`Finding`]): reserved bits, unaligned
//! tables and clusters, bad extended-L2 bitmaps, references a cluster or
//! more past the end of the file. They are counted the way QEMU counts
//! them (an unaligned data cluster still references the cluster it falls
//! in), so that the refcount comparison that follows agrees with QEMU's.
//! The only one repaired, with `errors`, is an unaligned preallocated
//! zero cluster, which becomes a plain zero cluster.
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
//! L2 repairs go through the L2 cache; L1 entries are written at once.
//! Before an L2 table is rewritten, its cluster is checked against the
//! header, L1 tables, refcount table and blocks and the snapshot table:
//! an L1 entry pointing there is garbage, and QEMU marks the image corrupt
//! and stops the check rather than write, which this does too
//! ([`CheckReport::aborted`]).
//!
//! Runs on the loop thread under `meta`. Memory is bounded by the image
//! file's size in clusters (and refused beyond [`MAX_CHECK_CLUSTERS`]).

use std::rc::Rc;

use block_core::{Error, IoBuf, Result};

use super::header::{be16, be32, be64};
use super::l2::{L2Entry, BITMAP_ALL_ZEROES, L1E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use super::meta::Which;
use super::{DiscardKind, Qcow2};

/// L1 entry bits QEMU's check requires to be zero (bit 0 included, unlike
/// what the driver tolerates when reading).
const L1E_RESERVED_CHECK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero.
const L2E_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Extended L2 bitmap: the allocation half.
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// Refcount table entry bits that must be zero.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Refcount table entry bits holding the refcount block offset.
const REFT_OFFSET_MASK: u64 = !REFT_RESERVED_MASK;

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
    /// Malformed metadata met while counting references, in the order
    /// QEMU reports it (before the refcount comparison).
    pub findings: Vec<Finding>,
    /// Set when a repair was refused because the L2 table it would rewrite
    /// lies on other metadata: the image was marked corrupt and the check
    /// stopped there, so the counts are partial (QEMU's check fails with
    /// EIO at that point).
    pub aborted: Option<OverlapAbort>,
    /// OFLAG_COPIED flags that disagree with the refcount, in L1 order
    /// (each L2 table's entry before its data clusters).
    pub copied: Vec<CopiedMismatch>,
    /// The refcount structure was rebuilt from the counted references.
    pub rebuilt: Option<Rebuilt>,
    /// Only a rebuild could repair the refcounts, and repairing errors was
    /// not asked for: the check failed (QEMU's EIO) after the comparison.
    pub need_rebuild: bool,
    /// Clusters whose refcount could not be read (their refcount block is
    /// unaligned), in cluster order; each is a check error.
    pub unreadable: Vec<u64>,
    /// The corruption signalled when the first of them was read.
    pub signal: Option<CorruptionSignal>,
}

/// A corruption found while reading metadata (QEMU's
/// `qcow2_signal_corruption`): fatal, and marked in the header, when the
/// image is writable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptionSignal {
    /// What is wrong, in QEMU's words.
    pub msg: String,
    /// Whether the image was marked corrupt.
    pub fatal: bool,
}

/// What the second pass after a rebuild found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Malformed metadata met again while counting the references.
    pub findings: Vec<Finding>,
    /// Refcounts that still differ, mostly the old refcount table and
    /// blocks now leaked; `fixed` when the leak was repaired.
    pub repaired: Vec<RefcountMismatch>,
    /// A cluster in use still had refcount 0.
    pub still_broken: bool,
}

/// Malformed L1 or L2 entries (QEMU's `check_refcounts_l1` and
/// `check_refcounts_l2`), and references past the end of the file. Each
/// counts as one corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// An L1 entry with reserved bits set.
    L1Reserved {
        /// The entry.
        entry: u64,
    },
    /// An L1 entry pointing to an offset that is not cluster aligned.
    L2TableUnaligned {
        /// The L2 table offset.
        offset: u64,
    },
    /// A standard L2 entry with reserved bits set.
    L2Reserved {
        /// The entry.
        entry: u64,
    },
    /// A compressed L2 entry with OFLAG_COPIED.
    CompressedCopied {
        /// Host offset of the compressed data.
        coffset: u64,
    },
    /// A compressed L2 entry in an image with an external data file.
    CompressedWithDataFile {
        /// Index in its L2 table.
        index: usize,
        /// The entry.
        entry: u64,
    },
    /// A compressed extended L2 entry with a non-zero bitmap.
    CompressedWithBitmap {
        /// Index in its L2 table.
        index: usize,
        /// The entry.
        entry: u64,
    },
    /// An allocated extended L2 entry whose bitmap marks a subcluster
    /// both allocated and zero.
    BadAllocBitmap {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// An unallocated extended L2 entry whose bitmap marks subclusters
    /// allocated.
    UnallocatedWithBitmap,
    /// A preallocated zero cluster at an unaligned host offset; repaired
    /// by making it a plain zero cluster.
    PreallocUnaligned {
        /// The host offset.
        offset: u64,
        /// Whether the entry was rewritten.
        fixed: bool,
    },
    /// A data cluster at an unaligned host offset.
    DataUnaligned {
        /// The host offset.
        offset: u64,
    },
    /// A refcount table entry with reserved bits set.
    RefTableReserved {
        /// Index in the refcount table.
        index: usize,
    },
    /// A refcount table entry pointing to an unaligned offset.
    RefBlockUnaligned {
        /// Index in the refcount table.
        index: usize,
    },
    /// A refcount block past the end of the file; with `fixed`, the file
    /// was grown to hold it (a cluster of zeros).
    RefBlockOutside {
        /// Index in the refcount table.
        index: usize,
        /// Whether the file was grown.
        fixed: bool,
    },
    /// A refcount block whose cluster is also used by other metadata or
    /// data.
    RefBlockShared {
        /// Index in the refcount table.
        index: usize,
        /// References to its cluster.
        refcount: u64,
    },
    /// A reference to a range ending a cluster or more past the end of
    /// the file.
    BeyondEnd {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
}

/// A repair refused by the metadata overlap check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlapAbort {
    /// The metadata the write would have hit, in QEMU's words
    /// ("qcow2_header", "refcount block", ...); `None` when the image had
    /// already been marked corrupt, so the write failed without a check.
    pub what: Option<&'static str>,
    /// Where the refused write would have gone.
    pub offset: u64,
    /// The write that was refused.
    pub write: RefusedWrite,
}

/// Which repair write the overlap check refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedWrite {
    /// Zeroing an unaligned preallocated zero cluster (an L2 table).
    PreallocZero,
    /// An OFLAG_COPIED repair (an L2 table).
    CopiedFlag,
    /// A rebuilt refcount block.
    Refblock,
    /// A rebuilt refcount table.
    Reftable,
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
    /// Metadata ranges (offset, length, name) no L2 table repair may
    /// write over.
    meta: Vec<(u64, u64, &'static str)>,
    file_len: u64,
    refs: Vec<u64>,
    /// The refcount table or blocks cannot be trusted.
    rebuild: bool,
    report: CheckReport,
}

/// One comparison of stored refcounts with counted references.
#[derive(Default)]
struct Comparison {
    mismatches: Vec<RefcountMismatch>,
    /// One past the last cluster in use or with a refcount (QEMU reports
    /// at least one cluster even when no refcount could be read).
    end: u64,
    /// A cluster in use has refcount 0.
    rebuild: bool,
    /// Clusters whose refcount block is unaligned.
    unreadable: Vec<u64>,
    /// The corruption signalled on the first of them.
    signal: Option<CorruptionSignal>,
}

/// The first metadata range in `meta` that the write `[off, off + len)`
/// would touch, compared in whole clusters as QEMU's overlap check does;
/// u128 because hostile snapshot entries may put a table near the top of
/// the range.
pub(crate) fn metadata_hit(
    meta: &[(u64, u64, &'static str)],
    off: u64,
    len: u64,
    cs: u64,
) -> Option<&'static str> {
    let (o, l, cs) = (off as u128, len as u128, cs as u128);
    meta.iter()
        .find(|&&(mo, ml, _)| {
            let (mo, ml) = (mo as u128, ml as u128);
            ml > 0 && o < (mo + ml).next_multiple_of(cs) && mo / cs * cs < o + l
        })
        .map(|&(_, _, what)| what)
}

impl Counts {
    fn find(&mut self, f: Finding) {
        self.report.corruptions += 1;
        self.report.findings.push(f);
    }

    fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        // Like QEMU: the last cluster may end past EOF (the file is not
        // always padded), but not by a whole cluster.
        if u128::from(off) + u128::from(len) >= u128::from(self.file_len) + u128::from(self.cs) {
            self.find(Finding::BeyondEnd { offset: off, len });
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        if last as usize >= self.refs.len() {
            // At most one cluster past the file, checked above.
            self.refs.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            self.refs[c as usize] += 1;
        }
    }
}

impl Qcow2 {
    /// Checks the image; repairs what `repair` allows.
    ///
    /// As QEMU's `qcow2_check_refcounts`: the references are counted, then
    /// compared with the stored refcounts without repairing anything. A
    /// refcount structure that cannot be trusted (a refcount table entry
    /// that is malformed or shared, or a cluster in use with refcount 0,
    /// whose refcount block may be missing) is rebuilt from the counted
    /// references when errors may be repaired; otherwise the mismatches
    /// are repaired one by one.
    pub async fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _g = self.lock_meta_idle().await;
        self.flush_caches_if_writable().await?;
        let fix_errors = repair.errors && !self.read_only.get();
        let fix = (repair.leaks || repair.errors) && !self.read_only.get();
        let mut cnt = self.calculate_refcounts(repair).await?;
        if cnt.report.aborted.is_some() {
            return Ok(cnt.report);
        }
        let cmp = self.compare_refcounts(&cnt.refs).await?;
        let rebuild = cnt.rebuild || cmp.rebuild;
        let mut report = std::mem::take(&mut cnt.report);
        let leaks = cmp.mismatches.iter().filter(|m| m.refcount > m.reference);
        let leaks = leaks.count() as u64;
        report.leaks += leaks;
        report.corruptions += cmp.mismatches.len() as u64 - leaks;
        report.image_end_offset = cmp.end.max(1) << self.cluster_bits;
        report.mismatches = cmp.mismatches;
        report.check_errors += cmp.unreadable.len() as u64;
        report.unreadable = cmp.unreadable;
        report.signal = cmp.signal;
        if rebuild && fix_errors {
            self.rebuild_and_recount(&mut cnt, &mut report, repair)
                .await?;
            if report.aborted.is_some() {
                return Ok(report);
            }
        } else if fix {
            if rebuild {
                // QEMU fails the check here (EIO), before OFLAG_COPIED.
                report.need_rebuild = true;
                report.check_errors += 1;
                return Ok(report);
            }
            for m in report.mismatches.iter_mut() {
                let leak = m.refcount > m.reference;
                if (leak && repair.leaks) || (!leak && repair.errors) {
                    let delta = m.reference as i64 - m.refcount as i64;
                    self.update_refcount(m.cluster, delta, DiscardKind::Always)
                        .await?;
                    m.fixed = true;
                    if leak {
                        report.leaks_fixed += 1;
                    } else {
                        report.corruptions_fixed += 1;
                    }
                }
            }
        }
        let r = &report;
        let refcounts_clean =
            r.check_errors == 0 && r.corruptions == r.corruptions_fixed && r.leaks == r.leaks_fixed;
        let fix_copied =
            !self.read_only.get() && (repair.errors || (repair.leaks && refcounts_clean));
        let meta = std::mem::take(&mut cnt.meta);
        self.check_copied(fix_copied, &mut report, &meta).await?;
        if (repair.leaks || repair.errors) && report.aborted.is_none() {
            self.flush_caches_if_writable().await?;
        }
        Ok(report)
    }

    /// After a rebuild, QEMU's second pass: counts the references again
    /// (repairing nothing), then repairs the leaks the rebuild left (the
    /// old refcount table and blocks), and turns what the rebuild fixed
    /// into the `*_fixed` counters.
    async fn rebuild_and_recount(
        &self,
        cnt: &mut Counts,
        report: &mut CheckReport,
        repair: Repair,
    ) -> Result<()> {
        let (old_corruptions, old_leaks) = (
            report.corruptions - report.corruptions_fixed,
            report.leaks - report.leaks_fixed,
        );
        let refused = self
            .rebuild_refcount_structure(&mut cnt.refs, &cnt.meta)
            .await?;
        if let Some(a) = refused {
            // The image is marked corrupt; QEMU's check fails here.
            report.rebuilt = Some(Rebuilt::default());
            report.aborted = Some(a);
            return Ok(());
        }
        let again = self.calculate_refcounts(Repair::default()).await?;
        let cmp = self.compare_refcounts(&again.refs).await?;
        let mut repaired = cmp.mismatches;
        let mut fresh_leaks = 0;
        for m in repaired.iter_mut() {
            if m.refcount > m.reference && m.refcount != 0 && repair.leaks {
                let delta = m.reference as i64 - m.refcount as i64;
                self.update_refcount(m.cluster, delta, DiscardKind::Always)
                    .await?;
                m.fixed = true;
            } else if m.refcount > m.reference {
                fresh_leaks += 1;
            }
        }
        let new_corruptions = again.report.corruptions;
        report.check_errors += again.report.check_errors;
        report.corruptions_fixed += old_corruptions.saturating_sub(new_corruptions);
        report.leaks_fixed += old_leaks;
        report.corruptions = report.corruptions_fixed + new_corruptions;
        report.leaks = report.leaks_fixed + fresh_leaks;
        report.image_end_offset = cmp.end.max(1) << self.cluster_bits;
        report.rebuilt = Some(Rebuilt {
            findings: again.report.findings,
            repaired,
            still_broken: cmp.rebuild,
        });
        cnt.meta = again.meta;
        Ok(())
    }

    /// Counts every cluster's references (QEMU's `calculate_refcounts`),
    /// noting malformed metadata on the way.
    async fn calculate_refcounts(&self, repair: Repair) -> Result<Counts> {
        let cs = self.cluster_size;
        let fsize = self.file.size();
        // Like QEMU, compare refcounts of the clusters inside the file.
        let nclusters = fsize.div_ceil(cs).max(self.end_cluster.get());
        if nclusters > MAX_CHECK_CLUSTERS {
            return Err(Error::unsupported("qcow2", "checking images this large"));
        }
        let mut cnt = Counts {
            cs,
            file_len: fsize,
            meta: Vec::new(),
            refs: vec![0; nclusters as usize],
            rebuild: false,
            report: CheckReport::default(),
        };
        let hdr = self.hdr.borrow().clone();
        cnt.report.total_clusters = hdr.size.div_ceil(cs);
        // The snapshot table first: repairs must know every L1 table.
        let mut snaps = Vec::new();
        let mut snap_table_bad = false;
        let mut snap_table_end = hdr.snapshots_offset;
        for _ in 0..hdr.nb_snapshots {
            let off = snap_table_end;
            let h = self.file.pread(off, IoBuf::zeroed(40)).await?;
            let l1_off = be64(&h, 0);
            let l1_size = be32(&h, 8) as u64;
            let id_len = be16(&h, 12) as u64;
            let name_len = be16(&h, 14) as u64;
            let extra = be32(&h, 36) as u64;
            if l1_size * 8 > super::header::MAX_L1_BYTES || !l1_off.is_multiple_of(cs) {
                snap_table_bad = true;
                break;
            }
            snaps.push((l1_off, l1_size * 8));
            snap_table_end += (40 + extra + id_len + name_len).div_ceil(8) * 8;
        }
        let l1 = self.l1.borrow().clone();
        let rt_bytes = hdr.refcount_table_clusters as u64 * cs;
        // The table as stored, reserved bits included.
        let rt = self
            .file
            .pread(hdr.refcount_table_offset, IoBuf::zeroed(rt_bytes as usize))
            .await?;
        let reftable: Vec<u64> = rt.chunks_exact(8).map(|c| be64(c, 0)).collect();
        cnt.meta = vec![
            (0, cs, "qcow2_header"),
            (hdr.l1_table_offset, l1.len() as u64 * 8, "active L1 table"),
            (hdr.refcount_table_offset, rt_bytes, "refcount table"),
            (
                hdr.snapshots_offset,
                snap_table_end - hdr.snapshots_offset,
                "snapshot table",
            ),
        ];
        cnt.meta.extend(
            reftable
                .iter()
                .map(|&e| e & REFT_OFFSET_MASK)
                .filter(|&b| b != 0)
                .map(|b| (b, cs, "refcount block")),
        );
        cnt.meta
            .extend(snaps.iter().map(|&(o, n)| (o, n, "inactive L1 table")));
        cnt.add(0, cs);
        // Active L1 and everything below it.
        cnt.add(hdr.l1_table_offset, l1.len() as u64 * 8);
        self.check_l1(&l1, &mut cnt, true, repair).await?;
        if cnt.report.aborted.is_some() {
            return Ok(cnt);
        }
        // Snapshots.
        for &(l1_off, len) in &snaps {
            cnt.add(l1_off, len);
            let b = self.file.pread(l1_off, IoBuf::zeroed(len as usize)).await?;
            let sl1: Vec<u64> = b.chunks_exact(8).map(|c| be64(c, 0)).collect();
            self.check_l1(&sl1, &mut cnt, false, repair).await?;
            if cnt.report.aborted.is_some() {
                return Ok(cnt);
            }
        }
        if snap_table_bad {
            cnt.report.corruptions += 1;
            cnt.report.check_errors += 1;
        }
        cnt.add(hdr.snapshots_offset, snap_table_end - hdr.snapshots_offset);
        cnt.add(hdr.refcount_table_offset, rt_bytes);
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
        self.check_refblocks(&reftable, &mut cnt, repair.errors)
            .await?;
        Ok(cnt)
    }

    /// QEMU's `check_refblocks`: each refcount table entry must be free of
    /// reserved bits, cluster aligned, inside the file (with `fix`, the
    /// file grows to hold it) and used by nothing else. The first two and
    /// the last call for a rebuild.
    async fn check_refblocks(&self, reftable: &[u64], cnt: &mut Counts, fix: bool) -> Result<()> {
        let cs = self.cluster_size;
        let fix = fix && !self.read_only.get();
        for (index, &e) in reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            let c = off / cs;
            if e & REFT_RESERVED_MASK != 0 {
                cnt.find(Finding::RefTableReserved { index });
                cnt.rebuild = true;
                continue;
            }
            if !off.is_multiple_of(cs) {
                cnt.find(Finding::RefBlockUnaligned { index });
                cnt.rebuild = true;
                continue;
            }
            if c >= cnt.refs.len() as u64 {
                cnt.find(Finding::RefBlockOutside { index, fixed: fix });
                if fix {
                    if c >= MAX_CHECK_CLUSTERS {
                        return Err(Error::unsupported("qcow2", "checking images this large"));
                    }
                    self.file
                        .truncate(off + cs, false, block_core::Prealloc::Off)
                        .await?;
                    cnt.file_len = self.file.size();
                    cnt.refs.resize(cnt.file_len.div_ceil(cs) as usize, 0);
                    cnt.report.corruptions_fixed += 1;
                    cnt.add(off, cs);
                }
                continue;
            }
            if off != 0 {
                cnt.add(off, cs);
                let refcount = cnt.refs[c as usize];
                if refcount != 1 {
                    cnt.find(Finding::RefBlockShared { index, refcount });
                    cnt.rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Stored refcounts against counted references, cluster by cluster
    /// (QEMU's `compare_refcounts` with nothing to repair).
    async fn compare_refcounts(&self, refs: &[u64]) -> Result<Comparison> {
        let mut cmp = Comparison::default();
        let rb_bits = self.rb_bits();
        for c in 0..refs.len() as u64 {
            let want = refs[c as usize];
            if let Some(msg) = self.unaligned_refblock((c >> rb_bits) as usize) {
                // QEMU's get_refcount fails (EIO) for each of its clusters,
                // signalling the corruption the first time.
                if cmp.signal.is_none() {
                    self.signal_corruption_at(&msg, None).await;
                    cmp.signal = Some(CorruptionSignal {
                        msg,
                        fatal: !self.read_only.get(),
                    });
                }
                cmp.unreadable.push(c);
                continue;
            }
            let have = self.get_refcount(c).await?;
            if have > 0 || want > 0 {
                cmp.end = c + 1;
            }
            if have == want {
                continue;
            }
            if have == 0 {
                // Maybe no refcount block covers it: only a rebuild can
                // set it safely.
                cmp.rebuild = true;
            }
            cmp.mismatches.push(RefcountMismatch {
                cluster: c,
                refcount: have,
                reference: want,
                fixed: false,
            });
        }
        Ok(cmp)
    }

    async fn flush_caches_if_writable(&self) -> Result<()> {
        if self.read_only.get() {
            return Ok(());
        }
        self.flush_caches().await
    }

    /// Counts the references of one L1 table and everything below it,
    /// noting malformed entries as QEMU does; `active` also gathers the
    /// allocation statistics.
    async fn check_l1(
        &self,
        l1: &[u64],
        cnt: &mut Counts,
        active: bool,
        repair: Repair,
    ) -> Result<()> {
        let cs = self.cluster_size;
        for &e in l1 {
            // QEMU skips only all-zero entries: flags alone make it count
            // and walk "cluster 0".
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_CHECK != 0 {
                cnt.find(Finding::L1Reserved { entry: e });
            }
            let l2_off = e & L1E_OFFSET_MASK;
            cnt.add(l2_off, cs);
            let aligned = l2_off.is_multiple_of(cs);
            if !aligned {
                cnt.find(Finding::L2TableUnaligned { offset: l2_off });
            }
            let t = self.l2_table_bytes(l2_off).await?;
            let fix = repair.errors && !self.read_only.get() && aligned;
            self.check_l2(&t, l2_off, cnt, active, fix).await?;
            if cnt.report.aborted.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The entries of one L2 table (read at `l2_off`). With `fix`,
    /// unaligned preallocated zero clusters become plain zero clusters,
    /// as QEMU's `fix_l2_entry_by_zero` does.
    async fn check_l2(
        &self,
        t: &[u8],
        l2_off: u64,
        cnt: &mut Counts,
        active: bool,
        fix: bool,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        let external = !Rc::ptr_eq(&self.data, &self.file);
        // Fragmentation is counted within each L2 table, as QEMU does.
        let mut last_host = 0u64;
        for i in 0..(1usize << self.l2_bits) {
            let le = self.l2_entry_at(t, i);
            if !le.is_compressed() && le.entry & L2E_STD_RESERVED != 0 {
                cnt.find(Finding::L2Reserved { entry: le.entry });
            }
            if le.is_compressed() {
                let (off, len) = le.compressed_extent(cb);
                if le.copied() {
                    cnt.find(Finding::CompressedCopied { coffset: off });
                }
                if external {
                    cnt.find(Finding::CompressedWithDataFile {
                        index: i,
                        entry: le.entry,
                    });
                    continue;
                }
                if le.bitmap != 0 {
                    cnt.find(Finding::CompressedWithBitmap {
                        index: i,
                        entry: le.entry,
                    });
                    continue;
                }
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
                if self.extended && le.bitmap & BITMAP_ALL_ALLOC != 0 {
                    cnt.find(Finding::UnallocatedWithBitmap);
                }
                continue;
            }
            if (le.bitmap >> 32) & le.bitmap != 0 {
                cnt.find(Finding::BadAllocBitmap { offset: h });
            }
            if !h.is_multiple_of(cs) {
                let has_data = if self.extended {
                    le.bitmap & BITMAP_ALL_ALLOC != 0
                } else {
                    le.entry & OFLAG_ZERO == 0
                };
                if has_data {
                    cnt.find(Finding::DataUnaligned { offset: h });
                } else {
                    cnt.find(Finding::PreallocUnaligned {
                        offset: h,
                        fixed: fix,
                    });
                    if fix {
                        if let Some(what) = self.guard_l2_repair(l2_off, &cnt.meta).await? {
                            cnt.report.check_errors += 1;
                            cnt.report.aborted = Some(OverlapAbort {
                                what: Some(what),
                                offset: l2_off,
                                write: RefusedWrite::PreallocZero,
                            });
                            return Ok(());
                        }
                        self.zero_l2_entry(l2_off, i, le).await?;
                        cnt.report.corruptions_fixed += 1;
                        // The cluster is no longer used.
                        continue;
                    }
                }
            }
            if !external {
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
        Ok(())
    }

    /// Makes entry `i` of the L2 table at `l2_off` a plain zero cluster:
    /// allocated subclusters read as zeros, the host cluster is dropped.
    async fn zero_l2_entry(&self, l2_off: u64, i: usize, le: L2Entry) -> Result<()> {
        let new = if self.extended {
            L2Entry {
                entry: 0,
                bitmap: ((le.bitmap & BITMAP_ALL_ALLOC) << 32 | le.bitmap) & BITMAP_ALL_ZEROES,
            }
        } else {
            L2Entry {
                entry: OFLAG_ZERO,
                bitmap: 0,
            }
        };
        let t = self.load_table(Which::L2, l2_off).await?;
        self.set_l2_entry_at(&mut t.borrow_mut(), i, new);
        self.mark_dirty(Which::L2, l2_off);
        Ok(())
    }

    /// QEMU's overlap check before a repair rewrites (part of) the L2
    /// table at `l2_off`: a "table" lying on other metadata means the L1
    /// entry is garbage, so the image is marked corrupt (after earlier
    /// repairs reach the disk, as QEMU writes each at once) and the
    /// metadata hit is returned; the caller stops the check.
    async fn guard_l2_repair(
        &self,
        l2_off: u64,
        meta: &[(u64, u64, &'static str)],
    ) -> Result<Option<&'static str>> {
        let cs = self.cluster_size;
        let Some(what) = metadata_hit(meta, l2_off, cs, cs) else {
            return Ok(None);
        };
        self.flush_caches().await?;
        let msg = format!("Preventing invalid write on metadata (overlaps with {what})");
        self.signal_corruption(&msg, l2_off, cs).await;
        Ok(Some(what))
    }

    /// Compares OFLAG_COPIED of the active L1 entries and of the entries of
    /// the active L2 tables with the stored refcounts; rewrites wrong flags
    /// when `fix`.
    async fn check_copied(
        &self,
        fix: bool,
        report: &mut CheckReport,
        meta: &[(u64, u64, &'static str)],
    ) -> Result<()> {
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
            let t = self.l2_table_bytes(l2_off).await?;
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
                if let Some(what) = self.guard_l2_repair(l2_off, meta).await? {
                    report.check_errors += 1;
                    report.aborted = Some(OverlapAbort {
                        what: Some(what),
                        offset: l2_off,
                        write: RefusedWrite::CopiedFlag,
                    });
                    return Ok(());
                }
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

    /// An L2 table's bytes: the cached copy (which may be newer than the
    /// disk) or the disk's.
    async fn l2_table_bytes(&self, l2_off: u64) -> Result<Vec<u8>> {
        Ok(match self.l2_cache_peek(l2_off) {
            Some(t) => t.borrow().clone(),
            None => self
                .file
                .pread(l2_off, IoBuf::zeroed(self.cluster_size as usize))
                .await?
                .to_vec(),
        })
    }

    fn l2_cache_peek(&self, off: u64) -> Option<super::cache::Table> {
        self.l2_cache.lookup(off)
    }
}
