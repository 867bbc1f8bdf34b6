//! Dirty bitmaps: which parts of a node were written since a point in time,
//! as QEMU's `BdrvDirtyBitmap` records them for incremental backup and for
//! NBD's `qemu:dirty-bitmap:NAME` context.
//!
//! A bitmap keeps one bit per granule of the node's guest range. The
//! request path marks every write, write-zeroes and discard on the node
//! before it reaches the driver, so that a reader of the bitmap never
//! misses a write that is still in flight; a failed write stays marked,
//! which only costs a backup one granule more.
//!
//! Bitmaps live in memory on the node's loop thread (no locks). A format
//! that stores bitmaps (qcow2's bitmap directory) hands the ones it loaded
//! at open to its node; they are `persistent`, `readonly` when the image
//! was opened read-only, and `inconsistent` when the image says they were
//! not saved cleanly, which makes them unusable, as in QEMU.

use std::cell::{Cell, RefCell};

/// Largest granularity QEMU accepts (`2^31`).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// Longest bitmap name QEMU accepts (`BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME_LEN: usize = 1023;

/// What an operation does with a bitmap, for [`DirtyBitmap::check`]
/// (QEMU's `bdrv_dirty_bitmap_check` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapUse {
    /// Merge from: only its bits are read, busy or not.
    Source,
    /// Enable, disable, export: a read-only bitmap may serve.
    Read,
    /// Clear, merge into.
    Modify,
    /// Remove: an inconsistent bitmap may go.
    Remove,
}

/// A named dirty bitmap of one node.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    size: Cell<u64>,
    /// One bit per granule, least significant bit first.
    words: RefCell<Vec<u64>>,
    recording: Cell<bool>,
    busy: Cell<bool>,
    persistent: bool,
    readonly: Cell<bool>,
    inconsistent: bool,
}

impl DirtyBitmap {
    /// An all-clean bitmap over `size` bytes. `granularity` must be a power
    /// of two of at least 512 (callers check, with QEMU's message).
    pub fn new(name: &str, size: u64, granularity: u64, recording: bool) -> Self {
        debug_assert!(granularity.is_power_of_two() && granularity >= 512);
        DirtyBitmap {
            name: name.to_owned(),
            granularity,
            size: Cell::new(size),
            words: RefCell::new(vec![0; Self::words_for(size, granularity)]),
            recording: Cell::new(recording),
            busy: Cell::new(false),
            persistent: false,
            readonly: Cell::new(false),
            inconsistent: false,
        }
    }

    /// Marks a bitmap that belongs to an image (loaded from it, or to be
    /// stored in it): `readonly` when the image is read-only,
    /// `inconsistent` when the image says it was not saved cleanly.
    pub fn persistent(mut self, readonly: bool, inconsistent: bool) -> Self {
        self.persistent = true;
        self.readonly = Cell::new(readonly);
        self.inconsistent = inconsistent;
        self
    }

    /// Whether the bitmap came from (and belongs to) an image.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Whether the bitmap may not be changed (loaded from a read-only
    /// image).
    pub fn is_readonly(&self) -> bool {
        self.readonly.get()
    }

    /// Follows the image turning read-only or writable again
    /// (`blockdev-reopen`).
    pub fn set_readonly(&self, on: bool) {
        self.readonly.set(on)
    }

    /// Whether the image marked the bitmap as not saved cleanly: its bits
    /// cannot be trusted.
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// The bits in the stored layout (see [`Self::load_bits`]): one bit per
    /// granule, `ceil(granules / 8)` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let granules = self.size.get().div_ceil(self.granularity);
        let mut out: Vec<u8> = self
            .words
            .borrow()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        out.truncate(granules.div_ceil(8) as usize);
        out
    }

    /// Sets the granules from `first_granule` (a multiple of 64) on from
    /// `data`, a stored bitmap's bytes: bit `i` of byte `j` is granule
    /// `8 * j + i`, the layout of QEMU's qcow2 bitmap clusters. Bits past
    /// the end of the bitmap are ignored.
    pub fn load_bits(&self, first_granule: u64, data: &[u8]) {
        debug_assert!(first_granule.is_multiple_of(64));
        let granules = self.size.get().div_ceil(self.granularity);
        let mut w = self.words.borrow_mut();
        let first = (first_granule / 64) as usize;
        for (k, chunk) in data.chunks(8).enumerate() {
            let Some(word) = w.get_mut(first + k) else {
                break;
            };
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *word |= u64::from_le_bytes(b);
        }
        // The tail word keeps only granules that exist.
        if !granules.is_multiple_of(64) {
            if let Some(last) = w.last_mut() {
                *last &= (1u64 << (granules % 64)) - 1;
            }
        }
    }

    fn words_for(size: u64, granularity: u64) -> usize {
        size.div_ceil(granularity).div_ceil(64) as usize
    }

    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The size of the node the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size.get()
    }

    /// Whether writes to the node are recorded (an enabled bitmap).
    pub fn is_recording(&self) -> bool {
        self.recording.get()
    }

    /// Enables or disables recording.
    pub fn set_recording(&self, on: bool) {
        self.recording.set(on)
    }

    /// Whether an operation (an NBD export, a job) holds the bitmap, so
    /// that it may be neither changed nor removed.
    pub fn is_busy(&self) -> bool {
        self.busy.get()
    }

    /// Marks the bitmap held or released by an operation.
    pub fn set_busy(&self, busy: bool) {
        self.busy.set(busy)
    }

    /// Whether the bitmap may be used as `what`, with QEMU's messages: not
    /// while busy, not changed while read-only, not used while
    /// inconsistent.
    pub fn check(&self, what: BitmapUse) -> crate::Result<()> {
        let name = &self.name;
        if what != BitmapUse::Source && self.busy.get() {
            return Err(crate::Error::invalid(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if matches!(what, BitmapUse::Modify | BitmapUse::Remove) && self.readonly.get() {
            return Err(crate::Error::invalid(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            )));
        }
        if what != BitmapUse::Remove && self.inconsistent {
            return Err(crate::Error::invalid(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        Ok(())
    }

    /// Whether `src` may be merged into this bitmap: consistent and of the
    /// same size (the target's own checks are [`Self::check`]'s).
    pub fn check_merge_source(&self, src: &DirtyBitmap) -> crate::Result<()> {
        src.check(BitmapUse::Source)?;
        if src.size() != self.size() {
            return Err(crate::Error::invalid(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                self.size(),
                src.size()
            )));
        }
        Ok(())
    }

    /// Dirty bytes: dirty granules times the granularity (QEMU's `count`).
    pub fn count(&self) -> u64 {
        let bits: u64 = self
            .words
            .borrow()
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        bits * self.granularity
    }

    /// Records a write to `[offset, offset + len)` if the bitmap is
    /// recording.
    pub fn record_write(&self, offset: u64, len: u64) {
        if self.recording.get() {
            self.set_dirty(offset, len);
        }
    }

    /// Marks every granule that `[offset, offset + len)` touches as dirty,
    /// whether or not the bitmap records writes (merges, tests).
    pub fn set_dirty(&self, offset: u64, len: u64) {
        let end = (offset.saturating_add(len)).min(self.size.get());
        if len == 0 || offset >= end {
            return;
        }
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        let mut w = self.words.borrow_mut();
        let mut bit = first;
        while bit <= last {
            let (i, b) = ((bit / 64) as usize, bit % 64);
            let n = (64 - b).min(last - bit + 1);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            w[i] |= mask;
            bit += n;
        }
    }

    /// Makes the whole bitmap clean.
    pub fn clear(&self) {
        self.words.borrow_mut().fill(0);
    }

    fn bit(&self, granule: u64) -> bool {
        self.words.borrow()[(granule / 64) as usize] >> (granule % 64) & 1 != 0
    }

    /// Whether the granule holding `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        offset < self.size.get() && self.bit(offset / self.granularity)
    }

    /// The run of one state from `offset`: `(dirty, length)`, the length at
    /// most `max` and at least one byte (`offset` must lie inside the
    /// bitmap).
    pub fn extent(&self, offset: u64, max: u64) -> (bool, u64) {
        let size = self.size.get();
        let end = offset.saturating_add(max.max(1)).min(size);
        if offset >= end {
            return (false, max.max(1));
        }
        let g = self.granularity;
        let dirty = self.bit(offset / g);
        let words = self.words.borrow();
        let last = (end - 1) / g;
        let mut granule = offset / g + 1;
        while granule <= last {
            let (i, b) = ((granule / 64) as usize, granule % 64);
            // The bits from `b` on that differ from the run's state.
            let word = if dirty { !words[i] } else { words[i] };
            let differ = word >> b;
            if differ != 0 {
                granule += u64::from(differ.trailing_zeros());
                break;
            }
            granule += 64 - b;
        }
        let stop = (granule.min(last + 1) * g).min(end);
        (dirty, stop - offset)
    }

    /// Adds every dirty granule of `other` (same node size, any
    /// granularity) to this bitmap.
    pub fn merge_from(&self, other: &DirtyBitmap) {
        let size = other.size.get().min(self.size.get());
        let mut off = 0;
        while off < size {
            let (dirty, len) = other.extent(off, size - off);
            if dirty {
                self.set_dirty(off, len);
            }
            off += len;
        }
    }

    /// Follows a resize of the node: granules past a shrunk end are
    /// dropped, a grown tail starts clean.
    pub fn resize(&self, size: u64) {
        let old_bits = self.size.get().div_ceil(self.granularity);
        let bits = size.div_ceil(self.granularity);
        let mut w = self.words.borrow_mut();
        w.resize(Self::words_for(size, self.granularity), 0);
        if bits < old_bits && !bits.is_multiple_of(64) {
            // Bits past the new end in the last word would come back dirty
            // after a later grow.
            let i = (bits / 64) as usize;
            w[i] &= (1u64 << (bits % 64)) - 1;
        }
        self.size.set(size);
    }
}

/// QEMU's check of the granularity asked for a new bitmap; `None` takes
/// `default`.
pub fn check_granularity(asked: Option<u64>, default: u64) -> crate::Result<u64> {
    match asked {
        None => Ok(default),
        Some(g) if g < 512 || !g.is_power_of_two() || g > MAX_GRANULARITY => Err(
            crate::Error::invalid("Granularity must be power of 2 and at least 512"),
        ),
        Some(g) => Ok(g),
    }
}

/// QEMU's checks of a new bitmap's name, `taken` when its node (or image)
/// already has a bitmap of that name.
pub fn check_new_name(name: &str, taken: bool) -> crate::Result<()> {
    if taken {
        return Err(crate::Error::invalid(format!(
            "Bitmap already exists: {name}"
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(crate::Error::invalid(format!(
            "Bitmap name too long: {name}"
        )));
    }
    Ok(())
}

/// QEMU's default granularity for a new bitmap: the node's cluster size
/// clamped to 4 KiB..64 KiB, or 64 KiB when it has none.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(b: &DirtyBitmap) -> Vec<(bool, u64)> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < b.size() {
            let e = b.extent(off, b.size() - off);
            out.push(e);
            off += e.1;
        }
        out
    }

    #[test]
    fn writes_mark_whole_granules() {
        let b = DirtyBitmap::new("b", 1 << 20, 65536, true);
        b.record_write(65536 + 1, 4096);
        b.record_write(1_048_575, 1);
        assert_eq!(b.count(), 2 * 65536);
        assert_eq!(
            runs(&b),
            vec![
                (false, 65536),
                (true, 65536),
                (false, 851_968),
                (true, 65536)
            ]
        );
        assert!(b.is_dirty(65536) && !b.is_dirty(0) && !b.is_dirty(1 << 20));
        b.clear();
        assert_eq!(runs(&b), vec![(false, 1 << 20)]);
    }

    #[test]
    fn disabled_bitmaps_ignore_writes() {
        let b = DirtyBitmap::new("b", 1 << 20, 4096, false);
        b.record_write(0, 4096);
        assert_eq!(b.count(), 0);
        b.set_recording(true);
        b.record_write(0, 4096);
        assert_eq!(b.count(), 4096);
    }

    /// Runs cross word boundaries and stop at `max` and at the end of a
    /// size that is not a whole number of granules.
    #[test]
    fn extents_cross_words_and_stop_at_limits() {
        let size = 200 * 512 + 100;
        let b = DirtyBitmap::new("b", size, 512, true);
        b.set_dirty(60 * 512, 10 * 512);
        b.set_dirty(130 * 512, 1);
        b.set_dirty(size - 1, 1);
        assert_eq!(
            runs(&b),
            vec![
                (false, 60 * 512),
                (true, 10 * 512),
                (false, 60 * 512),
                (true, 512),
                (false, 69 * 512),
                (true, 100),
            ]
        );
        assert_eq!(b.extent(61 * 512 + 7, 100), (true, 100));
        assert_eq!(b.extent(0, 1), (false, 1));
        assert_eq!(b.count(), 12 * 512);
        // A write past the end is cut at the end, not a panic.
        b.set_dirty(size + 10, 1 << 40);
        b.set_dirty(u64::MAX - 1, 10);
        assert_eq!(b.count(), 12 * 512);
    }

    #[test]
    fn whole_words_fill_at_once() {
        let b = DirtyBitmap::new("b", 64 * 4 * 512, 512, true);
        b.set_dirty(0, 64 * 4 * 512);
        assert_eq!(runs(&b), vec![(true, 64 * 4 * 512)]);
        b.clear();
        b.set_dirty(63 * 512, 66 * 512);
        assert_eq!(
            runs(&b),
            vec![(false, 63 * 512), (true, 66 * 512), (false, 127 * 512)]
        );
    }

    #[test]
    fn merge_ors_across_granularities() {
        let a = DirtyBitmap::new("a", 1 << 20, 4096, true);
        let b = DirtyBitmap::new("b", 1 << 20, 65536, true);
        a.set_dirty(8192, 1);
        b.set_dirty(1 << 19, 1);
        b.merge_from(&a);
        assert_eq!(
            runs(&b),
            vec![
                (true, 65536),
                (false, (1 << 19) - 65536),
                (true, 65536),
                (false, (1 << 19) - 65536)
            ]
        );
        a.merge_from(&b);
        assert_eq!(a.count(), 2 * 65536);
    }

    #[test]
    fn resize_drops_and_adds_clean_granules() {
        let b = DirtyBitmap::new("b", 100 * 512, 512, true);
        b.set_dirty(0, 100 * 512);
        b.resize(70 * 512);
        assert_eq!(b.count(), 70 * 512);
        b.resize(300 * 512);
        assert_eq!(runs(&b), vec![(true, 70 * 512), (false, 230 * 512)]);
        b.record_write(299 * 512, 512);
        assert_eq!(b.count(), 71 * 512);
    }

    /// Stored bytes map bit `i` of byte `j` to granule `8j + i`, from any
    /// 64-granule boundary; bits past the end are dropped.
    #[test]
    fn stored_bits_load_in_qemu_order() {
        let b = DirtyBitmap::new("b", 200 * 512, 512, true).persistent(true, false);
        assert!(b.is_persistent() && b.is_readonly() && !b.is_inconsistent());
        let mut data = vec![0u8; 8];
        data[0] = 0b0000_0010; // granule 65
        data[1] = 0b1000_0000; // granule 79
        b.load_bits(64, &data);
        b.load_bits(192, &[0xff]); // granules 192..200, 200 past the end
        let dirty: Vec<u64> = (0..201).filter(|g| b.is_dirty(g * 512)).collect();
        assert_eq!(dirty, [65, 79, 192, 193, 194, 195, 196, 197, 198, 199]);
        assert_eq!(b.count(), 10 * 512);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 25);
        let c = DirtyBitmap::new("c", 200 * 512, 512, true);
        c.load_bits(0, &bytes);
        assert_eq!(c.to_bytes(), bytes, "stored bytes round-trip");
    }

    #[test]
    fn default_granularity_follows_qemu() {
        assert_eq!(default_granularity(None), 65536);
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(Some(16384)), 16384);
        assert_eq!(default_granularity(Some(2 << 20)), 65536);
    }
}
