//! Image creation (QEMU's `qcow2_co_create`), laid out byte for byte as
//! `qemu-img create -f qcow2` lays it out: the header cluster, the refcount
//! table in cluster 1, one refcount block in cluster 2, the L1 table from
//! cluster 3 (written with its exact length, so the file ends with it).
//! `preallocation=falloc`/`full` follow `qcow2_co_truncate` instead (see
//! `Layout::data_area`); an external data file keeps the data out of
//! the image, whose L2 tables then map guest offsets 1:1 into it.
//!
//! Runs on the loop thread of the file node it writes into. Write order:
//! the file is truncated to empty, the refcount structures and the L1 table
//! are written, flushed, and the header goes last, so an interrupted
//! creation never leaves a valid-looking header over missing tables.

use std::rc::Rc;

use block_core::{Error, Graph, IoBuf, Node, Options, Prealloc, Result, WriteFlags};

use super::header::{
    self, put64, CompressionType, Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2,
};
use super::l2::OFLAG_COPIED;
use super::refcount::rc_set;

/// `qemu-img create -f qcow2` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size (power of two, 512 B .. 2 MiB); QEMU's default is 64 KiB.
    pub cluster_size: u64,
    /// Refcount width (power of two, 1..64); 16 by default.
    pub refcount_bits: u32,
    /// Lazy refcounts (compat 1.1 only).
    pub lazy_refcounts: bool,
    /// Compression type for compressed clusters.
    pub compression_type: CompressionType,
    /// Extended L2 entries (subclusters; cluster size >= 16 KiB).
    pub extended_l2: bool,
    /// Backing file name stored in the header.
    pub backing_file: Option<String>,
    /// Backing file format stored in the header.
    pub backing_fmt: Option<String>,
    /// External data file name stored in the header; guest data then lives
    /// at the same offsets in that file.
    pub data_file: Option<String>,
    /// Whether the external data file is a valid raw image (implies
    /// `metadata` preallocation when none is asked for, as in QEMU).
    pub data_file_raw: bool,
    /// `compat=0.10` (version 2) instead of `1.1` (version 3).
    pub compat_v2: bool,
    /// Preallocation mode: `metadata` allocates every L2 table and data
    /// cluster (QEMU's order: each L2 table followed by its data clusters);
    /// `falloc` and `full` also allocate the data area in the file, laid
    /// out as `qcow2_co_truncate` does.
    pub preallocation: Prealloc,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            compression_type: CompressionType::Deflate,
            extended_l2: false,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
            compat_v2: false,
            preallocation: Prealloc::Off,
        }
    }
}

impl CreateOptions {
    /// The preallocation mode in effect: a raw external data file must be
    /// fully mapped, so `off` becomes `metadata` there.
    fn effective_prealloc(&self) -> Prealloc {
        if self.data_file_raw && self.preallocation == Prealloc::Off {
            Prealloc::Metadata
        } else {
            self.preallocation
        }
    }

    /// Checks the options as QEMU does, before anything is written.
    pub fn validate(&self) -> Result<()> {
        self.header().map(drop)
    }

    /// Checks the options as QEMU does and builds the header.
    fn header(&self) -> Result<Header> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if !self.size.is_multiple_of(512) {
            return Err(Error::invalid("Image size must be a multiple of 512 bytes"));
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.compat_v2 {
            if rb != 16 {
                return Err(Error::invalid(
                    "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            if self.lazy_refcounts {
                return Err(Error::invalid(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if self.extended_l2 {
                return Err(Error::invalid(
                    "Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if self.compression_type != CompressionType::Deflate {
                return Err(Error::invalid(
                    "Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if self.data_file.is_some() && self.compat_v2 {
            return Err(Error::invalid(
                "External data files are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::invalid("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::invalid(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(Error::invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        let mut incompat = 0;
        if self.extended_l2 {
            incompat |= INCOMPAT_EXTL2;
        }
        if self.compression_type != CompressionType::Deflate {
            incompat |= INCOMPAT_COMPRESSION;
        }
        if self.data_file.is_some() {
            incompat |= INCOMPAT_DATA_FILE;
        }
        let h = Header {
            version: if self.compat_v2 { 2 } else { 3 },
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: cs.trailing_zeros(),
            size: self.size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompat,
            compatible_features: if self.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: if self.data_file_raw {
                AUTOCLEAR_DATA_FILE_RAW
            } else {
                0
            },
            refcount_order: rb.trailing_zeros(),
            header_length: if self.compat_v2 { 72 } else { 112 },
            compression_type: self.compression_type,
            backing_file: self.backing_file.clone(),
            backing_format: self.backing_fmt.clone(),
            data_file: self.data_file.clone(),
            feature_names: Vec::new(),
            bitmaps_ext: None,
            unknown_exts: Vec::new(),
        };
        let l1 = h.l1_entries_for(self.size);
        if l1 * 8 > header::MAX_L1_BYTES {
            return Err(Error::invalid(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ));
        }
        Ok(Header {
            l1_size: l1 as u32,
            l1_table_offset: if l1 > 0 { 3 * cs } else { 0 },
            ..h
        })
    }
}

/// Number of refcount blocks QEMU's `qcow2_refcount_metadata_size` finds
/// for `clusters` clusters plus the refcount structures covering them.
fn refblocks_for(clusters: u64, cs: u64, rb_entries: u64) -> u64 {
    let per_table_cluster = cs / 8;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(rb_entries);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return blocks;
        }
    }
}

/// Where everything of a new image goes, in clusters, and what each
/// metadata cluster holds.
struct Layout {
    /// Refcount table: first cluster and contents (whole clusters).
    reftable: (u64, Vec<u8>),
    /// Refcount blocks by cluster.
    refblocks: Vec<(u64, Vec<u8>)>,
    /// L2 tables by cluster.
    l2_tables: Vec<(u64, Vec<u8>)>,
    /// L1 table contents (exact length, at cluster 3).
    l1: Vec<u8>,
    /// L2 tables from this cluster on are written after the file is grown.
    split: u64,
    /// The file is grown to this cluster count with the preallocation mode.
    grow_to: Option<u64>,
}

impl Layout {
    /// `off` and `metadata`: the refcount table in cluster 1, its one
    /// block in cluster 2, the L1 table, then (`metadata`) each L2 table
    /// followed by its data clusters, as `preallocate_co` allocates them.
    fn compact(opts: &CreateOptions, h: &Header) -> Result<Layout> {
        let cs = opts.cluster_size;
        let l1_bytes = h.l1_size as u64 * 8;
        let meta_end = 3 + l1_bytes.div_ceil(cs);
        let mut l1 = vec![0u8; l1_bytes as usize];
        let mut l2_tables: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut used = meta_end;
        let rb_entries = cs * 8 / opts.refcount_bits as u64;
        let external = opts.data_file.is_some();
        if opts.effective_prealloc() != Prealloc::Off {
            let esz = h.l2_entry_size();
            let per_l2 = cs / esz;
            let mut left = opts.size.div_ceil(cs);
            for i in 0..h.l1_size as u64 {
                // Data in an external file takes no cluster here.
                let data = if external { 0 } else { per_l2.min(left) };
                if left == 0 || used + 1 + data > rb_entries {
                    break;
                }
                let l2 = used;
                used += 1;
                put64(&mut l1, (i * 8) as usize, (l2 * cs) | OFLAG_COPIED);
                let mut t = vec![0u8; cs as usize];
                for j in 0..per_l2.min(left) {
                    // An external data file maps guest offsets 1:1.
                    let host = if external {
                        (i * per_l2 + j) * cs
                    } else {
                        used += 1;
                        (used - 1) * cs
                    };
                    put64(&mut t, (j * esz) as usize, host | OFLAG_COPIED);
                }
                left -= per_l2.min(left);
                l2_tables.push((l2, t));
            }
            if left > 0 {
                return Err(Error::unsupported(
                    "qcow2",
                    "preallocating an image whose metadata needs more than one refcount block",
                ));
            }
        }
        if used > rb_entries {
            return Err(Error::unsupported(
                "qcow2",
                "creating an image whose L1 table needs more than one refcount block",
            ));
        }
        let mut rt = vec![0u8; cs as usize];
        put64(&mut rt, 0, 2 * cs);
        let mut rb = vec![0u8; cs as usize];
        for c in 0..used {
            rc_set(&mut rb, h.refcount_order, c as usize, 1);
        }
        Ok(Layout {
            reftable: (1, rt),
            refblocks: vec![(2, rb)],
            l2_tables,
            l1,
            split: u64::MAX,
            grow_to: (used > meta_end).then_some(used),
        })
    }

    /// `falloc` and `full`, as `qcow2_co_truncate` grows the empty image:
    /// `qcow2_refcount_area` puts new refcount blocks and a new refcount
    /// table after the L1 table (freeing the old table in cluster 1), the
    /// data clusters follow in one run, and the L2 tables are allocated
    /// last from the lowest free cluster: the first takes cluster 1, the
    /// rest go after the data.
    fn data_area(opts: &CreateOptions, h: &Header) -> Result<Layout> {
        let cs = opts.cluster_size;
        let l1_bytes = h.l1_size as u64 * 8;
        let meta_end = 3 + l1_bytes.div_ceil(cs);
        let rb_entries = cs * 8 / opts.refcount_bits as u64;
        if meta_end > rb_entries {
            return Err(Error::unsupported(
                "qcow2",
                "creating an image whose L1 table needs more than one refcount block",
            ));
        }
        let esz = h.l2_entry_size();
        let per_l2 = cs / esz;
        let n = opts.size.div_ceil(cs);
        let l2_needed = n.div_ceil(per_l2);
        // QEMU's overestimate: one L2 table more for an unaligned head/tail.
        let blocks = refblocks_for(meta_end + n + l2_needed + 1, cs, rb_entries);
        let table_clusters = blocks.div_ceil(cs / 8);
        let table_at = meta_end + blocks - 1;
        let data_start = table_at + table_clusters;
        let data_end = data_start + n;
        let mut l1 = vec![0u8; l1_bytes as usize];
        let mut l2_tables = Vec::new();
        for i in 0..l2_needed {
            let at = if i == 0 { 1 } else { data_end + i - 1 };
            put64(&mut l1, (i * 8) as usize, (at * cs) | OFLAG_COPIED);
            let mut t = vec![0u8; cs as usize];
            let first = i * per_l2;
            for j in 0..per_l2.min(n - first) {
                put64(
                    &mut t,
                    (j * esz) as usize,
                    ((data_start + first + j) * cs) | OFLAG_COPIED,
                );
            }
            l2_tables.push((at, t));
        }
        let last = if l2_needed > 1 {
            data_end + l2_needed - 1
        } else {
            data_end
        };
        let mut rt = vec![0u8; (table_clusters * cs) as usize];
        let mut refblocks = Vec::new();
        for b in 0..blocks {
            let at = if b == 0 { 2 } else { meta_end + b - 1 };
            put64(&mut rt, (b * 8) as usize, at * cs);
            let mut rb = vec![0u8; cs as usize];
            let first = b * rb_entries;
            for c in first..last.min(first + rb_entries) {
                // The old refcount table was freed; only an L2 table
                // reuses its cluster.
                if c != 1 || l2_needed > 0 {
                    rc_set(&mut rb, h.refcount_order, (c - first) as usize, 1);
                }
            }
            refblocks.push((at, rb));
        }
        Ok(Layout {
            reftable: (table_at, rt),
            refblocks,
            l2_tables,
            l1,
            split: data_start,
            grow_to: (n > 0).then_some(data_end),
        })
    }
}

/// Writes a new, empty qcow2 image into `file` (which is truncated first).
/// An image with an external data file needs [`create_with_data`].
pub async fn create(file: &Rc<Node>, opts: &CreateOptions) -> Result<()> {
    create_with_data(file, None, opts).await
}

/// [`create`] with the node of the external data file named in `opts`,
/// which is grown to the virtual size (with the preallocation mode, as
/// QEMU forwards it) when it is smaller.
pub async fn create_with_data(
    file: &Rc<Node>,
    data: Option<&Rc<Node>>,
    opts: &CreateOptions,
) -> Result<()> {
    if opts.data_file.is_some() != data.is_some() {
        return Err(Error::invalid(
            "An external data file name needs a data file node, and only then",
        ));
    }
    let mut h = opts.header()?;
    let cs = opts.cluster_size;
    let lay = match (opts.effective_prealloc(), &opts.data_file) {
        (Prealloc::Falloc | Prealloc::Full, None) => Layout::data_area(opts, &h)?,
        _ => Layout::compact(opts, &h)?,
    };
    h.refcount_table_offset = lay.reftable.0 * cs;
    h.refcount_table_clusters = (lay.reftable.1.len() as u64 / cs) as u32;
    let hdr_bytes = h.serialize()?;
    let put = |at: u64, data: &[u8]| {
        let buf = IoBuf::from_slice(data);
        async move { file.pwrite(at * cs, buf, WriteFlags::default()).await }
    };
    file.truncate(0, false, Prealloc::Off).await?;
    // QEMU's first refcount table stays in cluster 1 until something
    // reuses the cluster, so it is written even where it is replaced.
    let mut first_rt = vec![0u8; cs as usize];
    put64(&mut first_rt, 0, 2 * cs);
    put(1, &first_rt).await?;
    for (at, b) in &lay.refblocks {
        put(*at, b).await?;
    }
    put(lay.reftable.0, &lay.reftable.1).await?;
    if !lay.l1.is_empty() {
        put(3, &lay.l1).await?;
    }
    let (before, after): (Vec<_>, Vec<_>) =
        lay.l2_tables.iter().partition(|(at, _)| *at < lay.split);
    for (at, t) in before {
        put(*at, t).await?;
    }
    if let Some(end) = lay.grow_to {
        file.truncate(end * cs, false, opts.preallocation).await?;
    }
    for (at, t) in after {
        put(*at, t).await?;
    }
    if let Some(d) = data {
        if d.size() < opts.size {
            let mode = match opts.preallocation {
                Prealloc::Falloc | Prealloc::Full => opts.preallocation,
                Prealloc::Off | Prealloc::Metadata => Prealloc::Off,
            };
            d.truncate(opts.size, false, mode).await?;
        }
        d.flush().await?;
    }
    file.flush().await?;
    file.pwrite(0, IoBuf::from_slice(&hdr_bytes), WriteFlags::default())
        .await?;
    file.flush().await
}

/// Creates the host file `path` and a qcow2 image in it.
pub async fn create_file(graph: &Graph, path: &str, opts: &CreateOptions) -> Result<()> {
    opts.header()?;
    let data = match &opts.data_file {
        Some(d) => {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(d)
                .map_err(|e| Error::Open {
                    path: d.clone(),
                    source: e,
                })?;
            let n = graph
                .open(
                    Options::new()
                        .with("driver", "file")
                        .with("filename", d.as_str()),
                )
                .await?;
            let perm = block_core::Perm::WRITE | block_core::Perm::RESIZE;
            match n.add_user("qcow2-create", "data-file", perm, block_core::Perm::ALL) {
                Ok(id) => Some((n, id)),
                Err(e) => {
                    let name = n.name().to_owned();
                    graph.delete(&name).await?;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let r = create_file_in(graph, path, opts, data.as_ref().map(|(n, _)| n)).await;
    if let Some((n, id)) = data {
        n.remove_user(id);
        let name = n.name().to_owned();
        graph.delete(&name).await?;
    }
    r
}

/// [`create_file`] once the data file node (if any) is open.
async fn create_file_in(
    graph: &Graph,
    path: &str,
    opts: &CreateOptions,
    data: Option<&Rc<Node>>,
) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::Open {
            path: path.to_owned(),
            source: e,
        })?;
    let node = graph
        .open(Options::new().with("driver", "file").with("filename", path))
        .await?;
    let user = node.add_user(
        "qcow2-create",
        "root",
        block_core::Perm::WRITE | block_core::Perm::RESIZE | block_core::Perm::CONSISTENT_READ,
        block_core::Perm::ALL,
    );
    let r = match user {
        Ok(id) => {
            let r = create_with_data(&node, data, opts).await;
            node.remove_user(id);
            r
        }
        Err(e) => Err(e),
    };
    let name = node.name().to_owned();
    graph.delete(&name).await?;
    r
}
