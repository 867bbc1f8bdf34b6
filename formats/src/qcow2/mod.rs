//! The qcow2 format driver.
//!
//! One node's qcow2 layer: the header ([`header`]), L1/L2 entry formats
//! ([`l2`]), the metadata caches and their write-back rules (`cache.rs`,
//! `meta.rs`), refcounts and cluster allocation (`refcount.rs`), the write
//! path (`write.rs`), compressed clusters (`compress.rs`), persistent
//! bitmaps kept but not tracked (`bitmaps.rs`), internal snapshots
//! ([`snapshot`]), `check` with repair ([`check`]), image creation
//! ([`create`]) and whole-image operations outside the graph ([`image`]:
//! check, compressed writes, snapshots, as `qemu-img` uses them).
//!
//! ## Threading
//! Everything runs on the node's loop thread. Metadata (L1 table, the L2
//! and refcount block caches, the refcount table, the header) is touched
//! only while holding the driver's coroutine mutex `meta`, QEMU's
//! `s->lock`. Reads take it only to translate and release it before the
//! data I/O (which the engine issues itself from [`Mapping`]s). Writes into
//! clusters that are already allocated with refcount one release it before
//! the data write too (the host clusters stay pinned so that a concurrent
//! discard cannot free them underneath); allocating writes keep it until
//! the new L2 entry is in the cache, which also orders concurrent
//! allocating writes to one cluster (the second sees the first's
//! allocation). Decompression runs on the worker pool.
//!
//! ## On-disk write order (crash safety)
//! A crash may leak clusters, never corrupt the image:
//! - a refcount increment reaches the disk (and is flushed) before any L2
//!   table or L1 entry that uses the cluster (`l2_dep_rc`);
//! - an L2 entry that drops a reference reaches the disk (flushed) before
//!   the refcount decrement that may free the cluster (`rc_dep_l2`);
//! - a new L2 table is written and flushed before the L1 entry pointing to
//!   it; a new refcount block before the refcount table entry; a new
//!   refcount table before the header points to it;
//! - guest data is written before its L2 entry is updated in the cache.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use block_core::{
    BlockDriver, BlockLimits, BlockStatus, ChildRole, Error, IoBuf, IoFuture, Mapping, Node,
    NodeFlags, OpenArgs, Opened, Options, Prealloc, Result, WriteFlags,
};

mod bitmaps;
mod cache;
pub mod check;
mod compress;
pub mod create;
mod expand;
pub mod header;
pub mod image;
pub mod l2;
mod lazy;
mod meta;
mod rebuild;
mod refcount;
mod room;
pub mod snapshot;
mod write;

#[cfg(test)]
mod tests;

pub use bitmaps::BitmapInfo;
use cache::{CoMutex, TableCache};
use header::Header;
use l2::SubType;

/// Largest L2 cache QEMU uses by default.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Refcount cache size in clusters (QEMU's minimum, and its default).
const REFCOUNT_CACHE_CLUSTERS: u64 = 4;
/// Longest backing chain opened implicitly from image headers.
const MAX_BACKING_DEPTH: u64 = 64;
/// Internal option carrying the backing depth to implicitly opened images.
const DEPTH_OPT: &str = "x-strata-backing-depth";

/// Why a cluster is freed, for the `pass-discard-*` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiscardKind {
    /// A guest discard request.
    Request,
    /// Snapshot deletion.
    Snapshot,
    /// Anything else (COW, metadata moves).
    Other,
    /// Clusters freed by `check` repairs: always passed down, as QEMU's
    /// QCOW2_DISCARD_ALWAYS, so a repaired image holds no stale data.
    Always,
}

/// An open qcow2 image.
pub struct Qcow2 {
    node_name: String,
    file: Rc<Node>,
    /// Where guest data lives: `file`, or the external data file.
    data: Rc<Node>,
    /// Set at open and changed by `blockdev-reopen` (see [`Self::reopen_impl`]).
    read_only: Cell<bool>,
    /// The header as last written (size and table locations change).
    hdr: RefCell<Header>,
    cluster_bits: u32,
    cluster_size: u64,
    /// log2 of the L2 entries per table.
    l2_bits: u32,
    extended: bool,
    /// log2 of the subcluster size.
    sc_bits: u32,
    size: Cell<u64>,
    /// The active L1 table (host byte order).
    l1: RefCell<Vec<u64>>,
    /// The refcount table (host byte order).
    reftable: RefCell<Vec<u64>>,
    l2_cache: TableCache,
    rc_cache: TableCache,
    /// L2 tables must not be written before the refcount cache is flushed.
    l2_dep_rc: Cell<bool>,
    /// Refcount blocks must not be written before the L2 cache is flushed.
    rc_dep_l2: Cell<bool>,
    /// QEMU's `s->lock`.
    meta: CoMutex,
    /// First cluster index that may be free.
    free_hint: Cell<u64>,
    /// One past the highest cluster in use or in the file.
    end_cluster: Cell<u64>,
    /// Clusters picked for an allocation whose refcount is not set yet.
    reserved: RefCell<Vec<(u64, u64)>>,
    /// Clusters freed since the L2 cache was last written out: an L2 entry
    /// on disk may still point to them, so handing them out again (and
    /// writing new data into them) before that flush would let a crash
    /// leave the old entry reading someone else's data.
    unsettled: RefCell<std::collections::HashSet<u64>>,
    /// Freed clusters (host offsets) to discard on the file once the L2
    /// tables that dropped them are written: punched out earlier, a crash
    /// would leave an L2 entry on disk reading a hole (and a compressed
    /// cluster that cannot be decompressed).
    discard_on_settle: RefCell<Vec<u64>>,
    /// pass-discard-request, -snapshot (kept for snapshot deletion), -other.
    pass_discard: [bool; 3],
    no_flush: bool,
    /// Refcounts may lag behind L2 tables while the dirty bit is set
    /// (`lazy.rs`).
    lazy_refcounts: bool,
    /// Host clusters with in-place data writes in flight.
    inflight: cache::InFlight,
    /// Guest clusters with an allocating write in flight: its data is
    /// written without `meta`, and until its L2 entry is set nothing else
    /// may change the mapping of those clusters.
    allocating: cache::InFlight,
    /// Fresh clusters of allocating writes in flight that other writes to
    /// the same guest cluster may join.
    fresh: cache::FreshClusters,
    /// Host clusters from here on have never been written since the image
    /// was opened (they lie past the end of the file), so they read as
    /// zeros and a fresh allocation there needs no zero fill.
    zero_from: Cell<u64>,
    /// The file grown ahead of allocations.
    room: room::FileRoom,
    /// Persistent bitmaps loaded at open, until the graph takes them.
    loaded_bitmaps: RefCell<Vec<block_core::DirtyBitmap>>,
    /// Set after a metadata write failed: no more writes (QEMU marks the
    /// image corrupt or fails requests the same way).
    broken: Cell<bool>,
    /// BLOCK_IMAGE_CORRUPTED was sent: later corruption stays quiet, as
    /// in QEMU.
    corruption_signalled: Cell<bool>,
    /// Next free byte after the last compressed cluster written (0: start
    /// a new host cluster), so compressed clusters share host clusters.
    compressed_cursor: Cell<u64>,
}

fn take_discard_opt(opts: &mut Options, key: &str, default: bool) -> Result<bool> {
    Ok(opts.take_bool(key)?.unwrap_or(default))
}

/// Resolves a backing file name relative to the image's own file name, as
/// QEMU's `path_combine` does.
pub fn resolve_backing_path(image: &str, backing: &str) -> String {
    if backing.starts_with('/') || backing.is_empty() {
        return backing.to_owned();
    }
    match image.rfind('/') {
        Some(i) => format!("{}/{}", &image[..i], backing),
        None => backing.to_owned(),
    }
}

/// Opens the `qcow2` driver.
pub fn open(args: OpenArgs<'_>) -> IoFuture<'_, Opened> {
    Box::pin(async move {
        let (drv, children) = open_impl(args).await?;
        Ok(Opened {
            driver: Box::new(drv),
            children,
        })
    })
}

/// Checks (and with `repair`, repairs) the image described by qcow2
/// driver options `opts` (`file`, ...), like `qemu-img check [-r]`. The
/// image is opened read-write only when something may be repaired.
pub async fn check_image(
    graph: &block_core::Graph,
    opts: Options,
    repair: check::Repair,
) -> Result<check::CheckReport> {
    let img = image::Image::open(graph, opts, repair.leaks || repair.errors).await?;
    let r = img.check(repair).await;
    let c = img.close().await;
    let r = r?;
    c?;
    Ok(r)
}

async fn open_impl(args: OpenArgs<'_>) -> Result<(Qcow2, Vec<(String, ChildRole, Rc<Node>)>)> {
    let OpenArgs {
        graph,
        mut opts,
        flags,
        node_name,
    } = args;
    let file = graph
        .open_child(&mut opts, "file", flags)
        .await?
        .ok_or_else(|| Error::invalid("A block device must be specified for \"file\""))?;
    let depth = opts.take_u64(DEPTH_OPT)?.unwrap_or(0);
    let pass_discard = [
        take_discard_opt(&mut opts, "pass-discard-request", flags.discard_unmap)?,
        take_discard_opt(&mut opts, "pass-discard-snapshot", true)?,
        take_discard_opt(&mut opts, "pass-discard-other", false)?,
    ];
    opts.take_bool("discard-no-unref")?;
    let lazy_opt = opts.take_bool("lazy-refcounts")?;
    let cache_size = opts.take_u64("cache-size")?;
    let l2_cache_size = opts.take_u64("l2-cache-size")?;
    let rc_cache_size = opts.take_u64("refcount-cache-size")?;
    opts.take_u64("l2-cache-entry-size")?;
    opts.take_u64("cache-clean-interval")?;
    if let Some(o) = opts.get("overlap-check") {
        if !matches!(o, block_core::OptValue::Map(_)) {
            opts.take_str("overlap-check")?;
        } else {
            opts.take("overlap-check");
        }
    }
    let backing_opt = opts.take("backing");
    let data_file_opt = opts.take("data-file");

    // Header.
    let fsize = file.size();
    let head = file.pread(0, IoBuf::zeroed(4096)).await?;
    let first = &head[..(fsize.min(4096) as usize)];
    if first.len() < Header::MIN_READ || header::be32(first, 0) != header::MAGIC {
        return Err(Error::invalid(format!(
            "Image '{node_name}' is not in qcow2 format"
        )));
    }
    let cb = header::be32(first, 20);
    let cluster_buf = if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cb)
        && (1u64 << cb) > 4096
    {
        let n = (1u64 << cb).min(fsize) as usize;
        file.pread(0, IoBuf::zeroed(n)).await?
    } else {
        head
    };
    let hlen = (fsize as usize).min(cluster_buf.len());
    let hdr = Header::parse(&node_name, &cluster_buf[..hlen], fsize)?;

    let read_only = flags.read_only;
    if !read_only && hdr.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
        return Err(Error::invalid(format!(
            "qcow2: Image '{node_name}' is corrupt; cannot be opened read/write"
        )));
    }
    if lazy_opt == Some(true) && hdr.version < 3 {
        return Err(Error::invalid(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
        ));
    }

    let lazy = hdr.version >= 3
        && lazy_opt.unwrap_or(hdr.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0);

    let cs = hdr.cluster_size();
    // L1 and refcount tables (sizes bounded by Header::parse).
    let l1_bytes = hdr.l1_size as u64 * 8;
    if hdr.l1_size > 0 && hdr.l1_table_offset + l1_bytes > fsize.max(1) {
        return Err(Error::Corrupt {
            node: node_name.clone(),
            detail: format!(
                "L1 table at offset {:#x} ({} entries) lies beyond the end of the file ({fsize} bytes)",
                hdr.l1_table_offset, hdr.l1_size
            ),
        });
    }
    let l1 = if hdr.l1_size > 0 {
        let b = file
            .pread(hdr.l1_table_offset, IoBuf::zeroed(l1_bytes as usize))
            .await?;
        b.chunks_exact(8).map(|c| header::be64(c, 0)).collect()
    } else {
        Vec::new()
    };
    for (i, &e) in l1.iter().enumerate() {
        let off = e & l2::L1E_OFFSET_MASK;
        if !off.is_multiple_of(cs) {
            return Err(Error::Corrupt {
                node: node_name.clone(),
                detail: format!("L2 table offset {off:#x} unaligned (L1 index: {i:#x})"),
            });
        }
    }
    let rt_bytes = hdr.refcount_table_clusters as u64 * cs;
    if hdr.refcount_table_offset + rt_bytes > fsize {
        return Err(Error::Corrupt {
            node: node_name.clone(),
            detail: format!(
                "refcount table at offset {:#x} ({} clusters) lies beyond the end of the file ({fsize} bytes)",
                hdr.refcount_table_offset, hdr.refcount_table_clusters
            ),
        });
    }
    let rt = file
        .pread(hdr.refcount_table_offset, IoBuf::zeroed(rt_bytes as usize))
        .await?;
    // Reserved bits are ignored, as QEMU does; `check` reports them, and
    // unaligned blocks are refused when used.
    let reftable: Vec<u64> = rt
        .chunks_exact(8)
        .map(|c| header::be64(c, 0) & !0x1ff)
        .collect();

    // Children: data file and backing file.
    let mut children = vec![("file".to_owned(), ChildRole::File, Rc::clone(&file))];
    let mut copts = Options::new();
    let data = if hdr.has_data_file() {
        match data_file_opt {
            Some(v) => copts.insert("data-file", v),
            None => {
                let name = hdr.data_file.clone().ok_or_else(|| {
                    Error::invalid(
                        "Missing data-file option and no external data file name in the image",
                    )
                })?;
                // QEMU opens the data file name as given (relative to the
                // working directory, unlike backing file names).
                copts.insert(
                    "data-file",
                    Options::new().with("driver", "file").with("filename", name),
                );
            }
        }
        let d = graph
            .open_child(&mut copts, "data-file", flags)
            .await?
            .ok_or_else(|| Error::invalid("Could not open the external data file"))?;
        children.push(("data-file".to_owned(), ChildRole::Data, Rc::clone(&d)));
        d
    } else {
        if data_file_opt.is_some_and(|v| !matches!(v, block_core::OptValue::Null)) {
            return Err(Error::invalid(
                "'data-file' can only be set for images with an external data file",
            ));
        }
        Rc::clone(&file)
    };
    let bflags = NodeFlags {
        read_only: true,
        ..flags
    };
    let backing = match backing_opt {
        Some(v) => {
            copts.insert("backing", v);
            graph.open_child(&mut copts, "backing", bflags).await?
        }
        None => match &hdr.backing_file {
            None => None,
            Some(name) => {
                if depth >= MAX_BACKING_DEPTH {
                    return Err(Error::invalid(format!(
                        "Backing file chain of '{node_name}' is too deep (a loop?)"
                    )));
                }
                if name.starts_with("json:") {
                    return Err(Error::unsupported("qcow2", "json: backing file names"));
                }
                let path = resolve_backing_path(&file.filename(), name);
                let fmt = match &hdr.backing_format {
                    Some(f) => f.clone(),
                    None => probe_format(graph, &path, bflags).await?,
                };
                let mut bo = Options::new().with("driver", fmt.as_str()).with(
                    "file",
                    Options::new().with("driver", "file").with("filename", path),
                );
                if fmt == "qcow2" {
                    bo.insert(DEPTH_OPT, depth + 1);
                }
                copts.insert("backing", bo);
                graph.open_child(&mut copts, "backing", bflags).await?
            }
        },
    };
    if let Some(b) = &backing {
        children.push(("backing".to_owned(), ChildRole::Backing, Rc::clone(b)));
    }
    opts.finish("qcow2")?;

    // Cache sizes (QEMU's read_cache_sizes defaults).
    let l2_tables_needed = (hdr.size.div_ceil(cs) * hdr.l2_entry_size()).div_ceil(cs);
    let l2_bytes = match (l2_cache_size, cache_size) {
        (Some(l), _) => l,
        (None, Some(c)) => c.saturating_sub(rc_cache_size.unwrap_or(REFCOUNT_CACHE_CLUSTERS * cs)),
        (None, None) => (l2_tables_needed * cs).min(DEFAULT_L2_CACHE_MAX),
    };
    let rc_bytes = rc_cache_size.unwrap_or(REFCOUNT_CACHE_CLUSTERS * cs);
    let l2_tables = (l2_bytes / cs).clamp(2, (DEFAULT_L2_CACHE_MAX * 32 / cs).max(2));
    let rc_tables = (rc_bytes / cs).clamp(REFCOUNT_CACHE_CLUSTERS, 1 << 16);

    let cluster_bits = hdr.cluster_bits;
    let l2_bits = cluster_bits - if hdr.extended_l2() { 4 } else { 3 };
    let extended = hdr.extended_l2();
    let sc_bits = if extended {
        cluster_bits - 5
    } else {
        cluster_bits
    };
    let size = hdr.size;
    let end_cluster = fsize.div_ceil(cs);
    let zero_from = if Rc::ptr_eq(&data, &file) {
        end_cluster
    } else {
        u64::MAX
    };
    let drv = Qcow2 {
        node_name: node_name.clone(),
        file: Rc::clone(&file),
        data,
        read_only: Cell::new(read_only),
        hdr: RefCell::new(hdr),
        cluster_bits,
        cluster_size: cs,
        l2_bits,
        extended,
        sc_bits,
        size: Cell::new(size),
        l1: RefCell::new(l1),
        reftable: RefCell::new(reftable),
        l2_cache: TableCache::new(l2_tables as usize),
        rc_cache: TableCache::new(rc_tables as usize),
        l2_dep_rc: Cell::new(false),
        rc_dep_l2: Cell::new(false),
        meta: CoMutex::default(),
        free_hint: Cell::new(0),
        end_cluster: Cell::new(end_cluster),
        reserved: RefCell::new(Vec::new()),
        unsettled: RefCell::new(std::collections::HashSet::new()),
        discard_on_settle: RefCell::new(Vec::new()),
        pass_discard,
        no_flush: flags.cache_no_flush,
        // Kept for a read-only node too: it may be reopened read-write.
        lazy_refcounts: lazy,
        broken: Cell::new(false),
        corruption_signalled: Cell::new(false),
        compressed_cursor: Cell::new(0),
        inflight: cache::InFlight::default(),
        allocating: cache::InFlight::default(),
        fresh: cache::FreshClusters::default(),
        zero_from: Cell::new(zero_from),
        room: room::FileRoom::default(),
        loaded_bitmaps: RefCell::new(Vec::new()),
    };
    // Loaded before they are marked in use: a bitmap in use already was
    // not saved cleanly.
    *drv.loaded_bitmaps.borrow_mut() = drv.load_bitmaps().await?;
    if !read_only {
        drv.begin_writing().await?;
    }
    Ok((drv, children))
}

/// Probes the format of a backing file without a format name: qcow2 if it
/// starts with the magic, raw otherwise (QEMU refuses to probe raw for
/// writing; backing files are read-only).
async fn probe_format(graph: &block_core::Graph, path: &str, flags: NodeFlags) -> Result<String> {
    let mut o = Options::new().with(
        "probe",
        Options::new()
            .with("driver", "file")
            .with("filename", path)
            .with("read-only", true),
    );
    let f = graph
        .open_child(&mut o, "probe", flags)
        .await?
        .ok_or_else(|| Error::invalid("cannot probe backing file"))?;
    let b = f.pread(0, IoBuf::zeroed(512)).await;
    let name = f.name().to_owned();
    graph.delete(&name).await?;
    let b = b?;
    Ok(if header::be32(&b, 0) == header::MAGIC {
        "qcow2".to_owned()
    } else {
        "raw".to_owned()
    })
}

impl Qcow2 {
    /// The qcow2 driver of `node`, if it is a qcow2 node.
    pub fn of(node: &Node) -> Option<&Qcow2> {
        node.driver().as_any()?.downcast_ref::<Qcow2>()
    }

    /// The persistent bitmaps loaded at open, once.
    pub(crate) fn take_loaded(&self) -> Vec<block_core::DirtyBitmap> {
        std::mem::take(&mut *self.loaded_bitmaps.borrow_mut())
    }

    /// A copy of the header as last written: feature bits set while the
    /// image is open (corrupt, dirty) show here, unlike in the file's
    /// header as first read.
    pub fn header(&self) -> Header {
        self.hdr.borrow().clone()
    }

    pub(crate) fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            node: self.node_name.clone(),
            detail: detail.into(),
        }
    }

    fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }

    /// Classifies `[offset, offset+len)` (within one L2 table) and returns the
    /// first subcluster's type, its host offset for `offset` (data clusters)
    /// and how many bytes share that type (and contiguous host data).
    async fn classify(&self, offset: u64, len: u64) -> Result<(SubType, u64, u64)> {
        let cs = self.cluster_size;
        let l2_span = cs << self.l2_bits;
        let max = len.min(l2_span - offset % l2_span);
        let Some(table) = self.l2_table_for_read(offset).await? else {
            return Ok((SubType::UnallocatedPlain, 0, max));
        };
        let scs = 1u64 << self.sc_bits;
        let t = table.borrow();
        let mut pos = offset;
        let mut first: Option<(SubType, u64)> = None;
        let mut expect_host = 0u64;
        while pos < offset + max {
            let idx = ((pos >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize;
            let e = self.l2_entry_at(&t, idx);
            let sc = ((pos & (cs - 1)) >> self.sc_bits) as u32;
            let ty = e.subtype(self.extended, sc);
            if ty == SubType::Invalid {
                return Err(self.corrupt(format!(
                    "invalid L2 entry {:#x} (bitmap {:#x}) for guest offset {pos:#x}",
                    e.entry, e.bitmap
                )));
            }
            let host = match ty {
                SubType::Normal | SubType::ZeroAlloc | SubType::UnallocatedAlloc => {
                    let h = e.host();
                    if h & (cs - 1) != 0 {
                        return Err(self.corrupt(format!(
                            "Cluster allocation offset {h:#x} unaligned (guest offset {pos:#x})"
                        )));
                    }
                    h + (pos & (cs - 1))
                }
                _ => 0,
            };
            match first {
                None => {
                    first = Some((ty, host));
                    expect_host = host;
                }
                Some((fty, _)) => {
                    let same = match (fty, ty) {
                        (SubType::Normal, SubType::Normal) => host == expect_host,
                        (SubType::Compressed, _) => false,
                        (a, b) if a.is_zero() && b.is_zero() => true,
                        (a, b) if a.is_unallocated() && b.is_unallocated() => true,
                        _ => false,
                    };
                    if !same {
                        break;
                    }
                }
            }
            let step = scs - (pos & (scs - 1));
            pos += step;
            expect_host += step;
            if ty == SubType::Compressed {
                // One compressed cluster at a time.
                pos = (pos + cs - 1) & !(cs - 1);
                pos = pos.min(((offset >> self.cluster_bits) + 1) << self.cluster_bits);
                break;
            }
        }
        let (ty, host) = first.unwrap_or((SubType::UnallocatedPlain, 0));
        Ok((ty, host, (pos - offset).min(max)))
    }

    /// What a writer does first (at a read-write open, or when reopened
    /// read-write): clears the autoclear bits it does not know (their
    /// data is not kept up to date), marks the image's bitmaps in use, and
    /// repairs an image left dirty by lazy refcounts.
    async fn begin_writing(&self) -> Result<()> {
        let unknown = {
            let h = self.hdr.borrow();
            h.version >= 3 && h.autoclear_features & !header::AUTOCLEAR_KNOWN != 0
        };
        if unknown {
            let v = {
                let mut h = self.hdr.borrow_mut();
                h.autoclear_features &= header::AUTOCLEAR_KNOWN;
                h.autoclear_features
            };
            // Only the autoclear field changes: one 8-byte write at offset 88.
            self.write_header_u64(88, v).await?;
        }
        self.mark_bitmaps_in_use().await?;
        if self.hdr.borrow().incompatible_features & header::INCOMPAT_DIRTY != 0 {
            // Not closed cleanly with lazy refcounts: rebuild the refcounts
            // from the metadata, then clear the dirty bit (QEMU does the same).
            let r = self
                .check(check::Repair {
                    leaks: true,
                    errors: true,
                })
                .await?;
            if r.corruptions > r.corruptions_fixed || r.aborted.is_some() {
                return Err(self.corrupt("could not repair the dirty image"));
            }
            self.mark_image_clean().await?;
        }
        Ok(())
    }

    /// Follows `blockdev-reopen` changing the node's read-only flag, as
    /// QEMU's qcow2 does. Before the node becomes read-only: the
    /// persistent bitmaps are stored (no longer in use), the metadata
    /// written, the file cut back to what is used and the image marked
    /// clean, and the bitmaps turn readonly.
    /// After it becomes writable again: the image is checked for the
    /// corrupt bit, the bitmaps are marked in use and may change again.
    pub(crate) async fn reopen_impl(&self, node: &Node, read_only: bool) -> Result<()> {
        if read_only == self.read_only.get() {
            return Ok(());
        }
        if read_only {
            let _g = self.lock_meta_idle().await;
            // As at close: the room made ahead goes too, since nothing
            // allocates while read-only.
            self.store_bitmaps_and_settle(&node.dirty_bitmaps()).await?;
            self.read_only.set(true);
        } else {
            if self.hdr.borrow().incompatible_features & header::INCOMPAT_CORRUPT != 0 {
                return Err(Error::invalid(format!(
                    "qcow2: Image '{}' is corrupt; cannot be opened read/write",
                    self.node_name
                )));
            }
            // No guest writes yet: the node turns writable after this. The
            // repair of a dirty image takes `meta` itself.
            self.read_only.set(false);
            self.begin_writing().await?;
        }
        for b in node.dirty_bitmaps().iter().filter(|b| b.is_persistent()) {
            b.set_readonly(read_only);
        }
        Ok(())
    }
}

impl BlockDriver for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn size(&self) -> u64 {
        self.size.get()
    }

    fn limits(&self) -> BlockLimits {
        BlockLimits {
            opt_transfer: self.cluster_size as u32,
            ..BlockLimits::default()
        }
    }

    fn has_mapping(&self) -> bool {
        true
    }

    fn map<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> IoFuture<'a, (Mapping, u64)> {
        Box::pin(async move {
            let _g = self.meta.lock().await;
            let (ty, host, mut n) = self.classify(offset, len).await?;
            if ty == SubType::Compressed {
                // The driver reads a run of compressed clusters together
                // (`read_compressed_range`): hand it the whole run.
                while n < len {
                    let (next, _, m) = self.classify(offset + n, len - n).await?;
                    if next != SubType::Compressed || m == 0 {
                        break;
                    }
                    n += m;
                }
            }
            let m = match ty {
                SubType::Normal => Mapping::Data {
                    child: Rc::clone(&self.data),
                    offset: host,
                },
                SubType::ZeroAlloc | SubType::ZeroPlain => Mapping::Zero,
                SubType::UnallocatedPlain | SubType::UnallocatedAlloc => Mapping::Unallocated,
                SubType::Compressed => Mapping::Driver,
                SubType::Invalid => return Err(self.corrupt("invalid L2 entry")),
            };
            Ok((m, n))
        })
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, buf: IoBuf) -> IoFuture<'a, IoBuf> {
        Box::pin(self.read_compressed_range(offset, buf))
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(self.write_impl(node, offset, buf, flags))
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.write_zeroes_impl(node, offset, len, flags))
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(self.discard_impl(node, offset, len))
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if !self.read_only.get() {
                let _g = self.meta.lock().await;
                self.flush_caches().await?;
            }
            if !self.no_flush {
                if !Rc::ptr_eq(&self.data, &self.file) {
                    self.data.flush().await?;
                }
                self.file.flush().await?;
            }
            Ok(())
        })
    }

    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        Box::pin(async move {
            let _g = self.meta.lock().await;
            let (ty, host, n) = self.classify(offset, len).await?;
            let n = n.max(1);
            Ok(match ty {
                SubType::Normal => BlockStatus {
                    len: n,
                    data: true,
                    zero: false,
                    allocated: true,
                    offset: Some(host),
                    file_node: Some(self.data.name().to_owned()),
                },
                SubType::ZeroAlloc | SubType::ZeroPlain => BlockStatus {
                    len: n,
                    data: false,
                    zero: true,
                    allocated: true,
                    offset: None,
                    file_node: None,
                },
                SubType::Compressed => BlockStatus {
                    len: n,
                    data: true,
                    zero: false,
                    allocated: true,
                    offset: None,
                    file_node: None,
                },
                _ => BlockStatus {
                    len: n,
                    data: false,
                    zero: false,
                    allocated: false,
                    offset: None,
                    file_node: None,
                },
            })
        })
    }

    fn truncate<'a>(
        &'a self,
        _node: &'a Node,
        size: u64,
        _exact: bool,
        prealloc: Prealloc,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.truncate_impl(size, prealloc))
    }

    fn close<'a>(&'a self, node: &'a Node) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.read_only.get() {
                return Ok(());
            }
            let _g = self.meta.lock().await;
            self.store_bitmaps_and_settle(&node.dirty_bitmaps()).await
        })
    }

    fn take_loaded_bitmaps(&self) -> Vec<block_core::DirtyBitmap> {
        self.take_loaded()
    }

    fn reopen<'a>(&'a self, node: &'a Node, read_only: bool) -> IoFuture<'a, ()> {
        Box::pin(self.reopen_impl(node, read_only))
    }

    fn remove_persistent_bitmap<'a>(&'a self, name: &'a str) -> IoFuture<'a, ()> {
        Box::pin(self.remove_stored_bitmap(name))
    }

    fn filename(&self) -> Option<String> {
        Some(self.file.filename())
    }
}
