//! The persistent dirty bitmaps extension. At open the bitmaps are loaded
//! into memory ([`DirtyBitmap`]s the graph attaches to the node, which
//! then record guest writes and serve NBD's `qemu:dirty-bitmap`), as QEMU
//! loads them. Strata keeps the extension (its data and autoclear bit 0)
//! but does not store bitmaps back yet. So that a bitmap is never trusted
//! after Strata changed guest data, every bitmap is marked `in_use` on
//! read-write open, as QEMU marks bitmaps it has loaded for writing; a
//! later open (by QEMU or Strata) treats them as inconsistent. `check`
//! counts the bitmap directory, tables and data clusters so they are not
//! leaks.
//!
//! Runs on the loop thread during open (before any guest write) and under
//! `meta` in `check`. Write order: the directory is rewritten in place and
//! flushed before the node accepts writes.

use block_core::{DirtyBitmap, IoBuf, Result, WriteFlags};

use super::header::{be16, be32, be64, put32};
use super::Qcow2;

/// Largest bitmap directory QEMU accepts.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Most bitmaps QEMU accepts in one image.
const MAX_BITMAPS: u32 = 65535;
/// Bitmap flag: in use (not saved consistently).
const FLAG_IN_USE: u32 = 1;
/// Bitmap table entry: data offset bits.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry: an absent cluster reads as all ones.
const BME_ALL_ONES: u64 = 1;
/// Bitmap table entry bits that must be zero.
const BME_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Granularity bounds QEMU accepts, as bit counts.
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Largest bitmap QEMU loads, in bytes of bits (`BME_MAX_PHYS_SIZE`).
const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// Flags QEMU knows; others refuse the load.
const KNOWN_FLAGS: u32 = 0b111;

/// One bitmap directory entry's location data.
struct Entry {
    /// Byte offset of the entry inside the directory.
    pos: usize,
    table_offset: u64,
    table_size: u32,
    flags: u32,
}

/// Bitmap flag: enabled, tracking guest writes.
const FLAG_AUTO: u32 = 2;

/// One persistent bitmap as its directory entry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Not saved consistently (or opened read-write right now).
    pub in_use: bool,
    /// Enabled: follows guest writes.
    pub auto: bool,
}

impl Qcow2 {
    /// The persistent bitmaps in directory order. Without the bitmaps
    /// autoclear bit the directory is stale and QEMU ignores it, so the
    /// list is empty then.
    pub async fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        if self.hdr.borrow().autoclear_features & super::header::AUTOCLEAR_BITMAPS == 0 {
            return Ok(Vec::new());
        }
        let Some((_, dir, entries)) = self.read_bitmap_directory().await? else {
            return Ok(Vec::new());
        };
        entries
            .iter()
            .map(|e| {
                let extra = be32(&dir, e.pos + 20) as usize;
                let len = be16(&dir, e.pos + 18) as usize;
                let start = e.pos + 24 + extra;
                let name = dir
                    .get(start..start + len)
                    .ok_or_else(|| self.corrupt("bitmap name beyond the directory"))?;
                Ok(BitmapInfo {
                    name: String::from_utf8_lossy(name).into_owned(),
                    granularity: 1u64 << dir[e.pos + 17].min(63),
                    in_use: e.flags & FLAG_IN_USE != 0,
                    auto: e.flags & FLAG_AUTO != 0,
                })
            })
            .collect()
    }

    /// The bitmap directory (offset, bytes), if the extension is present
    /// and valid.
    fn bitmap_directory(&self) -> Result<Option<(u64, u64, u32)>> {
        let hdr = self.hdr.borrow();
        let Some(ext) = &hdr.bitmaps_ext else {
            return Ok(None);
        };
        if ext.len() < 24 {
            return Err(self.corrupt("bitmaps extension too short"));
        }
        let n = be32(ext, 0);
        let size = be64(ext, 8);
        let off = be64(ext, 16);
        if n == 0
            || n > MAX_BITMAPS
            || size > MAX_DIRECTORY_BYTES
            || !off.is_multiple_of(self.cluster_size)
        {
            return Err(self.corrupt(format!(
                "invalid bitmaps extension ({n} bitmaps, directory {size} bytes at {off:#x})"
            )));
        }
        Ok(Some((off, size, n)))
    }

    async fn read_bitmap_directory(&self) -> Result<Option<(u64, Vec<u8>, Vec<Entry>)>> {
        let Some((off, size, n)) = self.bitmap_directory()? else {
            return Ok(None);
        };
        let dir = self
            .file
            .pread(off, IoBuf::zeroed(size as usize))
            .await?
            .to_vec();
        let mut entries = Vec::new();
        let mut pos = 0usize;
        for _ in 0..n {
            if pos + 24 > dir.len() {
                return Err(self.corrupt("bitmap directory entry beyond the directory"));
            }
            let name = be16(&dir, pos + 18) as usize;
            let extra = be32(&dir, pos + 20) as usize;
            entries.push(Entry {
                pos,
                table_offset: be64(&dir, pos),
                table_size: be32(&dir, pos + 8),
                flags: be32(&dir, pos + 12),
            });
            pos += (24 + extra + name).div_ceil(8) * 8;
        }
        Ok(Some((off, dir, entries)))
    }

    /// Loads every bitmap of the directory (none without the autoclear
    /// bit), checking its entry as QEMU does. A bitmap already marked in
    /// use was not saved cleanly: it comes back inconsistent, empty and
    /// not recording. Called at open, before [`Self::mark_bitmaps_in_use`].
    pub(crate) async fn load_bitmaps(&self) -> Result<Vec<DirtyBitmap>> {
        if self.hdr.borrow().autoclear_features & super::header::AUTOCLEAR_BITMAPS == 0 {
            return Ok(Vec::new());
        }
        let Some((_, dir, entries)) = self.read_bitmap_directory().await? else {
            return Ok(Vec::new());
        };
        let cs = self.cluster_size;
        let size = self.size.get();
        let infos = self.bitmaps().await?;
        let mut out: Vec<DirtyBitmap> = Vec::with_capacity(entries.len());
        for (e, info) in entries.iter().zip(infos) {
            let bad = |why: &str| self.corrupt(format!("bitmap '{}': {why}", info.name));
            let gbits = dir[e.pos + 17];
            if dir[e.pos + 16] != 1 {
                return Err(bad("not a dirty tracking bitmap"));
            }
            if !GRANULARITY_BITS.contains(&gbits) {
                return Err(bad("granularity out of range"));
            }
            if e.flags & !KNOWN_FLAGS != 0 {
                return Err(bad("unknown flags"));
            }
            if out.iter().any(|b| b.name() == info.name) {
                return Err(bad("name used twice"));
            }
            let g = 1u64 << gbits;
            let bytes = size.div_ceil(g).div_ceil(8);
            if bytes > MAX_BITMAP_BYTES {
                return Err(bad("too large"));
            }
            if u64::from(e.table_size) != bytes.div_ceil(cs) {
                return Err(bad("table size does not match the image size"));
            }
            let in_use = e.flags & FLAG_IN_USE != 0;
            let bm = DirtyBitmap::new(&info.name, size, g, info.auto && !in_use)
                .loaded(self.read_only, in_use);
            if !in_use {
                self.load_bitmap_data(&bm, e, &bad).await?;
            }
            out.push(bm);
        }
        Ok(out)
    }

    async fn load_bitmap_data(
        &self,
        bm: &DirtyBitmap,
        e: &Entry,
        bad: &dyn Fn(&str) -> block_core::Error,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let bytes = u64::from(e.table_size) * 8;
        if bytes == 0 {
            return Ok(());
        }
        if !e.table_offset.is_multiple_of(cs) {
            return Err(bad("unaligned bitmap table"));
        }
        let table = self
            .file
            .pread(e.table_offset, IoBuf::zeroed(bytes as usize))
            .await?;
        // Granules per data cluster: a multiple of 64 (clusters are at
        // least 512 bytes).
        let per_cluster = cs * 8;
        for (i, c) in table.chunks_exact(8).enumerate() {
            let v = be64(c, 0);
            let off = v & BME_OFFSET_MASK;
            if v & BME_RESERVED != 0 || (off != 0 && v & BME_ALL_ONES != 0) {
                return Err(bad("invalid bitmap table entry"));
            }
            let first = i as u64 * per_cluster;
            if off == 0 {
                if v & BME_ALL_ONES != 0 {
                    bm.set_dirty(first * bm.granularity(), per_cluster * bm.granularity());
                }
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(bad("unaligned bitmap data cluster"));
            }
            let data = self.file.pread(off, IoBuf::zeroed(cs as usize)).await?;
            bm.load_bits(first, &data);
        }
        Ok(())
    }

    /// Marks every bitmap in use (read-write open).
    pub(crate) async fn mark_bitmaps_in_use(&self) -> Result<()> {
        if self.hdr.borrow().autoclear_features & super::header::AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some((off, mut dir, entries)) = self.read_bitmap_directory().await? else {
            return Ok(());
        };
        if entries.iter().all(|e| e.flags & FLAG_IN_USE != 0) {
            return Ok(());
        }
        for e in &entries {
            put32(&mut dir, e.pos + 12, e.flags | FLAG_IN_USE);
        }
        self.file
            .pwrite(off, IoBuf::from_slice(&dir), WriteFlags::default())
            .await?;
        self.file.flush().await
    }

    /// Host extents used by the bitmaps: directory, tables, data clusters.
    pub(crate) async fn bitmap_extents(&self) -> Result<Vec<(u64, u64)>> {
        let Some((off, dir, entries)) = self.read_bitmap_directory().await? else {
            return Ok(Vec::new());
        };
        let cs = self.cluster_size;
        let mut v = vec![(off, dir.len() as u64)];
        for e in entries {
            let bytes = e.table_size as u64 * 8;
            if bytes > MAX_DIRECTORY_BYTES || !e.table_offset.is_multiple_of(cs) {
                return Err(self.corrupt(format!(
                    "invalid bitmap table at {:#x} ({} entries)",
                    e.table_offset, e.table_size
                )));
            }
            if bytes == 0 {
                continue;
            }
            v.push((e.table_offset, bytes));
            let t = self
                .file
                .pread(e.table_offset, IoBuf::zeroed(bytes as usize))
                .await?;
            for c in t.chunks_exact(8) {
                let d = be64(c, 0) & BME_OFFSET_MASK;
                if d != 0 {
                    v.push((d, cs));
                }
            }
        }
        Ok(v)
    }
}
