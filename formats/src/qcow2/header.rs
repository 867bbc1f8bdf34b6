//! The qcow2 header and its extensions: parsing, validation, serialising.
//!
//! Pure functions over bytes; no I/O and no thread affinity. Everything read
//! from an image is untrusted: every field is range-checked here (with the
//! limits QEMU uses, so the same images are refused) before any other module
//! sizes an allocation from it.
//!
//! Layout (big-endian): the fixed 72-byte v2 header, the v3 fields up to
//! `header_length`, then extensions (type u32, length u32, data padded to 8
//! bytes) up to the end-of-extensions marker, all inside the first cluster.

use block_core::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster_bits QEMU accepts (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Longest backing format / data file name we accept.
const MAX_EXT_STRING: u32 = 1023;
/// Largest virtual disk QEMU accepts (2^63 - 1 rounded: QCOW_MAX_SIZE... we
/// use the L1 bound plus i64).
pub const MAX_IMAGE_SIZE: u64 = i64::MAX as u64;

/// Incompatible feature: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible features Strata implements.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Autoclear features Strata keeps on read-write open.
pub const AUTOCLEAR_KNOWN: u64 = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

/// Extension: end of extensions.
pub const EXT_END: u32 = 0;
/// Extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// zlib/deflate (raw deflate, 4 KiB window).
    Deflate,
    /// Zstandard.
    Zstd,
}

/// One header extension kept verbatim (unknown or not interpreted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Extension type.
    pub kind: u32,
    /// Its data, unpadded.
    pub data: Vec<u8>,
}

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method (must be 0 here).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the fixed header (72 for v2).
    pub header_length: u32,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format extension.
    pub backing_format: Option<String>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Feature name table: (type 0/1/2, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Bitmaps extension data, kept verbatim.
    pub bitmaps_ext: Option<Vec<u8>>,
    /// Other extensions, kept verbatim in their order.
    pub unknown_exts: Vec<RawExtension>,
}

pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
pub(crate) fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes())
}
pub(crate) fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes())
}

fn corrupt(node: &str, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        node: node.to_owned(),
        detail: detail.into(),
    }
}

/// QEMU's names of the incompatible features it knows, for messages when a
/// feature table is absent.
fn builtin_incompat_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        0 => "dirty bit",
        1 => "corrupt bit",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => return None,
    })
}

impl Header {
    /// Bytes of the first cluster needed to parse the fixed header.
    pub const MIN_READ: usize = 72;

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Whether an external data file holds guest data.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Parses and validates the header from `buf`, which holds the start of
    /// the image: at least the first cluster, or the whole file if shorter.
    /// `file_size` is the image file's size (for offset checks).
    pub fn parse(node: &str, buf: &[u8], file_size: u64) -> Result<Header> {
        if buf.len() < Self::MIN_READ {
            return Err(Error::invalid(format!(
                "Image '{node}' is not in qcow2 format (file too short)"
            )));
        }
        if be32(buf, 0) != MAGIC {
            return Err(Error::invalid(format!(
                "Image '{node}' is not in qcow2 format"
            )));
        }
        let version = be32(buf, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(
                "qcow2",
                format!("QCOW version {version}"),
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps_ext: None,
            unknown_exts: Vec::new(),
        };
        if version >= 3 {
            if buf.len() < 104 {
                return Err(corrupt(node, "qcow2 v3 header truncated"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(Error::invalid(format!(
                    "Image '{node}': qcow2 header too short ({})",
                    h.header_length
                )));
            }
        }
        if h.header_length as u64 > cs || h.header_length as usize > buf.len() {
            return Err(Error::invalid(format!(
                "Image '{node}': qcow2 header exceeds cluster size"
            )));
        }
        if h.header_length > 104 {
            let ct = buf[104];
            h.compression_type = match ct {
                0 => CompressionType::Deflate,
                1 => CompressionType::Zstd,
                _ => {
                    return Err(Error::unsupported(
                        "qcow2",
                        format!("compression type {ct}"),
                    ))
                }
            };
        }
        let has_ct_bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if (h.compression_type != CompressionType::Deflate) != has_ct_bit {
            return Err(corrupt(
                node,
                "compression type and the compression type feature bit disagree",
            ));
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid(format!(
                "Image '{node}': refcount width must be at most 64 bits (order {})",
                h.refcount_order
            )));
        }
        if h.backing_file_size > MAX_BACKING_NAME {
            return Err(Error::invalid(format!(
                "Image '{node}': backing file name too long"
            )));
        }

        // Extensions, before the feature check so that its names are known.
        let ext_end = if h.backing_file_offset != 0 {
            (h.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len()
        };
        h.parse_extensions(node, &buf[..ext_end])?;

        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    h.feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && *bit as u32 == b)
                        .map(|(_, _, n)| n.clone())
                        .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", 1u64 << b))
                })
                .collect();
            return Err(Error::unsupported(
                "qcow2",
                format!("Unsupported qcow2 feature(s): {}", names.join(", ")),
            ));
        }
        if h.crypt_method != 0 {
            return Err(Error::unsupported(
                "qcow2",
                format!("encrypted images (method {})", h.crypt_method),
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::invalid(format!(
                "Image '{node}': extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
            )));
        }
        if h.has_data_file() && h.version < 3 {
            return Err(corrupt(node, "external data file in a v2 image"));
        }

        // Backing file name.
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset;
            let len = h.backing_file_size as u64;
            if off
                .checked_add(len)
                .is_none_or(|e| e > cs || e as usize > buf.len())
            {
                return Err(Error::invalid(format!(
                    "Image '{node}': backing file name lies outside the header cluster"
                )));
            }
            let name = &buf[off as usize..(off + len) as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }

        // Tables.
        let check_table = |what: &str, off: u64, entries: u64, esz: u64, max: u64| -> Result<()> {
            let bytes = entries.saturating_mul(esz);
            if bytes > max {
                return Err(Error::invalid(format!(
                    "Image '{node}': {what} too large ({bytes} bytes)"
                )));
            }
            if !off.is_multiple_of(cs) {
                return Err(corrupt(
                    node,
                    format!("{what} offset {off:#x} not cluster aligned"),
                ));
            }
            if entries > 0 && off.checked_add(bytes).is_none_or(|e| e > i64::MAX as u64) {
                return Err(corrupt(node, format!("{what} offset {off:#x} invalid")));
            }
            let _ = file_size;
            Ok(())
        };
        check_table(
            "Reference count table",
            h.refcount_table_offset,
            h.refcount_table_clusters as u64,
            cs,
            MAX_REFTABLE_BYTES,
        )?;
        if h.refcount_table_clusters == 0 || h.refcount_table_offset == 0 {
            return Err(corrupt(
                node,
                "Image does not contain a reference count table",
            ));
        }
        check_table(
            "Active L1 table",
            h.l1_table_offset,
            h.l1_size as u64,
            8,
            MAX_L1_BYTES,
        )?;
        if h.size > MAX_IMAGE_SIZE {
            return Err(Error::invalid(format!(
                "Image '{node}': virtual size {} too large",
                h.size
            )));
        }
        let need_l1 = h.l1_entries_for(h.size);
        if (h.l1_size as u64) < need_l1 {
            return Err(corrupt(node, "L1 table is too small"));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::invalid(format!(
                "Image '{node}': too many snapshots ({})",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots > 0 {
            check_table("Snapshot table", h.snapshots_offset, 1, 1, 1)?;
        }
        Ok(h)
    }

    /// L2 entry size in bytes (8, or 16 with extended L2 entries).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l1 = self.l2_entries() * self.cluster_size();
        size.div_ceil(per_l1)
    }

    fn parse_extensions(&mut self, node: &str, buf: &[u8]) -> Result<()> {
        let mut off = self.header_length as usize;
        loop {
            if off + 8 > buf.len() {
                // v2 images may end without an end marker inside the cluster.
                return Ok(());
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if kind == EXT_END {
                return Ok(());
            }
            if len > buf.len() - off {
                return Err(Error::invalid(format!(
                    "Image '{node}': header extension {kind:#x} too large"
                )));
            }
            let data = &buf[off..off + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    if len as u32 > MAX_EXT_STRING {
                        return Err(Error::invalid(format!(
                            "Image '{node}': backing format name too long"
                        )));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_DATA_FILE => {
                    if len as u32 > MAX_EXT_STRING {
                        return Err(Error::invalid(format!(
                            "Image '{node}': data file name too long"
                        )));
                    }
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&c| c == 0).unwrap_or(46);
                        self.feature_names.push((
                            e[0],
                            e[1],
                            String::from_utf8_lossy(&e[2..2 + name_end]).into_owned(),
                        ));
                    }
                }
                EXT_BITMAPS => self.bitmaps_ext = Some(data.to_vec()),
                EXT_CRYPTO => {
                    return Err(Error::unsupported("qcow2", "encrypted images (LUKS)"));
                }
                _ => self.unknown_exts.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off += len.div_ceil(8) * 8;
        }
    }

    /// Human-readable name of an incompatible feature bit.
    pub fn incompat_name(&self, bit: u32) -> String {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == 0 && *b as u32 == bit)
            .map(|(_, _, n)| n.clone())
            .or_else(|| builtin_incompat_name(bit).map(str::to_owned))
            .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", 1u64 << bit))
    }

    /// Serialises the header and its extensions into a buffer of one cluster
    /// (QEMU's `qcow2_update_header` layout: fixed header, backing format,
    /// data file, feature table, bitmaps, unknown extensions, end marker,
    /// then the backing file name).
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 16, 0);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut off = 72;
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, 112);
            b[104] = match self.compression_type {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            };
            off = 112;
        }
        let push = |b: &mut Vec<u8>, off: &mut usize, kind: u32, data: &[u8]| -> Result<()> {
            let padded = data.len().div_ceil(8) * 8;
            if *off + 8 + padded > cs {
                return Err(Error::invalid(
                    "qcow2 header extensions exceed the cluster size",
                ));
            }
            put32(b, *off, kind);
            put32(b, *off + 4, data.len() as u32);
            b[*off + 8..*off + 8 + data.len()].copy_from_slice(data);
            *off += 8 + padded;
            Ok(())
        };
        if let Some(f) = &self.backing_format {
            push(&mut b, &mut off, EXT_BACKING_FORMAT, f.as_bytes())?;
        }
        if let Some(f) = &self.data_file {
            push(&mut b, &mut off, EXT_DATA_FILE, f.as_bytes())?;
        }
        // QEMU leaves the feature table out of images with small clusters.
        if self.version >= 3 && cs > 4096 {
            push(&mut b, &mut off, EXT_FEATURE_TABLE, &feature_table())?;
        }
        if let Some(d) = &self.bitmaps_ext {
            push(&mut b, &mut off, EXT_BITMAPS, d)?;
        }
        for e in &self.unknown_exts {
            push(&mut b, &mut off, e.kind, &e.data)?;
        }
        // End marker (already zero) occupies 8 bytes.
        off += 8;
        if let Some(name) = &self.backing_file {
            let n = name.as_bytes();
            if off + n.len() > cs {
                return Err(Error::invalid(
                    "backing file name does not fit in the header",
                ));
            }
            b[off..off + n.len()].copy_from_slice(n);
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, n.len() as u32);
        }
        Ok(b)
    }
}

/// QEMU's feature name table, byte for byte.
pub fn feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = vec![0u8; entries.len() * 48];
    for (i, (t, bit, name)) in entries.iter().enumerate() {
        let e = &mut v[i * 48..(i + 1) * 48];
        e[0] = *t;
        e[1] = *bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
    }
    v
}
