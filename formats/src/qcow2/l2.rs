//! L1/L2 entry formats and cluster/subcluster classification.
//!
//! Pure functions; no I/O. QEMU's table in `qcow2.h` maps an L2 entry (and,
//! with extended L2 entries, its allocation bitmap) to a subcluster type;
//! the same table is kept here, including the INVALID type that callers
//! report as corruption.

/// L1 entry: offset bits of the L2 table.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry: refcount is exactly one (may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry: reads as zeros (standard entries only).
pub const OFLAG_ZERO: u64 = 1;
/// L2 entry: offset bits of a standard cluster.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry reserved bits.
pub const L1E_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Extended L2 bitmap: all subclusters read as zero.
pub const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;

/// Type of one (sub)cluster, as QEMU classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubType {
    /// Not allocated here, no host cluster: read from the backing file.
    UnallocatedPlain,
    /// Not allocated here, but the cluster has a host offset (extended L2).
    UnallocatedAlloc,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster kept (preallocated).
    ZeroAlloc,
    /// Data at the host offset.
    Normal,
    /// Compressed cluster.
    Compressed,
    /// An impossible combination of bits: the image is corrupt.
    Invalid,
}

impl SubType {
    /// Whether reads come from the backing file.
    pub fn is_unallocated(self) -> bool {
        matches!(self, SubType::UnallocatedPlain | SubType::UnallocatedAlloc)
    }
    /// Whether reads are zeros.
    pub fn is_zero(self) -> bool {
        matches!(self, SubType::ZeroPlain | SubType::ZeroAlloc)
    }
}

/// A decoded L2 entry (with its bitmap, 0 for standard entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    /// The first 64 bits.
    pub entry: u64,
    /// The extended bitmap (0 without extended L2 entries).
    pub bitmap: u64,
}

impl L2Entry {
    /// Whether the entry is a compressed cluster.
    pub fn is_compressed(&self) -> bool {
        self.entry & OFLAG_COMPRESSED != 0
    }

    /// Host offset of a standard (not compressed) entry, 0 if none.
    pub fn host(&self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.entry & L2E_OFFSET_MASK
        }
    }

    /// Whether the cluster may be written in place (refcount one).
    pub fn copied(&self) -> bool {
        self.entry & OFLAG_COPIED != 0
    }

    /// Type of subcluster `sc` (always 0 without extended L2 entries).
    pub fn subtype(&self, extended: bool, sc: u32) -> SubType {
        if self.is_compressed() {
            if extended && self.bitmap != 0 {
                return SubType::Invalid;
            }
            return SubType::Compressed;
        }
        let host = self.host();
        if !extended {
            if self.entry & OFLAG_ZERO != 0 {
                return if host != 0 {
                    SubType::ZeroAlloc
                } else {
                    SubType::ZeroPlain
                };
            }
            return if host != 0 {
                SubType::Normal
            } else {
                SubType::UnallocatedPlain
            };
        }
        let alloc = self.bitmap & (1 << sc) != 0;
        let zero = self.bitmap & (1 << (sc + 32)) != 0;
        match (host != 0, alloc, zero) {
            (_, true, true) => SubType::Invalid,
            (false, true, false) => SubType::Invalid,
            (false, false, true) => SubType::ZeroPlain,
            (false, false, false) => SubType::UnallocatedPlain,
            (true, false, true) => SubType::ZeroAlloc,
            (true, true, false) => SubType::Normal,
            (true, false, false) => SubType::UnallocatedAlloc,
        }
    }

    /// Compressed cluster location: (host offset, bytes to read).
    pub fn compressed_extent(&self, cluster_bits: u32) -> (u64, u64) {
        let shift = 62 - (cluster_bits - 8);
        let mask = (1u64 << (cluster_bits - 8)) - 1;
        let off = self.entry & ((1u64 << shift) - 1);
        let sectors = ((self.entry >> shift) & mask) + 1;
        (off, sectors * 512 - (off & 511))
    }
}

/// Bitmap mask of subclusters `[first, first+n)`, in the allocation half.
pub fn sc_mask(first: u32, n: u32) -> u64 {
    if n == 0 {
        return 0;
    }
    let m = if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
    ((m as u64) << first) & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify() {
        let e = L2Entry {
            entry: 0x8000_0000_0005_0000,
            bitmap: 0,
        };
        assert_eq!(e.subtype(false, 0), SubType::Normal);
        assert!(e.copied());
        let z = L2Entry {
            entry: 1,
            bitmap: 0,
        };
        assert_eq!(z.subtype(false, 0), SubType::ZeroPlain);
        let x = L2Entry {
            entry: 0x5_0000,
            bitmap: 0b10 | (1 << 32),
        };
        assert_eq!(x.subtype(true, 0), SubType::ZeroAlloc);
        assert_eq!(x.subtype(true, 1), SubType::Normal);
        assert_eq!(x.subtype(true, 2), SubType::UnallocatedAlloc);
        let bad = L2Entry {
            entry: 0,
            bitmap: 1,
        };
        assert_eq!(bad.subtype(true, 0), SubType::Invalid);
        assert_eq!(sc_mask(0, 32), 0xffff_ffff);
        assert_eq!(sc_mask(3, 2), 0b11000);
    }

    #[test]
    fn compressed_extent() {
        // 64 KiB clusters: shift 54, offset 0x12345, 2 extra sectors.
        let e = L2Entry {
            entry: OFLAG_COMPRESSED | (2u64 << 54) | 0x12345,
            bitmap: 0,
        };
        assert_eq!(e.compressed_extent(16), (0x12345, 3 * 512 - 0x145));
    }
}
