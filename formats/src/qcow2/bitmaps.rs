//! The persistent dirty bitmaps extension, as QEMU keeps it. At open the
//! bitmaps are loaded into memory ([`DirtyBitmap`]s the graph attaches to
//! the node, which then record guest writes and serve NBD's
//! `qemu:dirty-bitmap`). On read-write open every bitmap is marked
//! `in_use` on disk, so that a crash leaves them inconsistent rather than
//! trusted and stale; when the node closes, its persistent bitmaps are
//! stored anew and the directory points at them with `in_use` clear. A
//! bitmap removed while open leaves the directory at once, as in QEMU.
//! `check` counts the bitmap directory, tables and data clusters so they
//! are not leaks.
//!
//! Store order (crash-safe): new data clusters and tables, the new
//! directory, refcounts and a flush; then the header extension and a
//! flush; only then are the old directory, tables and data freed. A crash
//! before the header write leaves leaks and the old, in-use directory.
//!
//! Runs on the loop thread during open (before any guest write) and under
//! `meta` in `check`. Write order: the directory is rewritten in place and
//! flushed before the node accepts writes.

use std::rc::Rc;

use block_core::{DirtyBitmap, IoBuf, Result, WriteFlags};

use super::header::{be16, be32, be64, put32, put64, AUTOCLEAR_BITMAPS};
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
/// Longest bitmap name (`BDRV_BITMAP_MAX_NAME_SIZE`).
const MAX_NAME: usize = 1023;

/// One bitmap directory entry's location data.
struct Entry {
    /// Byte offset of the entry inside the directory.
    pos: usize,
    /// Bytes the entry takes, padding included.
    len: usize,
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
        self.entry_infos(&dir, &entries)
    }

    /// What the entries of a directory already read say of their bitmaps.
    fn entry_infos(&self, dir: &[u8], entries: &[Entry]) -> Result<Vec<BitmapInfo>> {
        entries
            .iter()
            .map(|e| {
                let extra = be32(dir, e.pos + 20) as usize;
                let len = be16(dir, e.pos + 18) as usize;
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
            let len = (24 + extra + name).div_ceil(8) * 8;
            entries.push(Entry {
                pos,
                len,
                table_offset: be64(&dir, pos),
                table_size: be32(&dir, pos + 8),
                flags: be32(&dir, pos + 12),
            });
            pos += len;
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
        let infos = self.entry_infos(&dir, &entries)?;
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
            if info.name.is_empty() || info.name.len() > MAX_NAME {
                return Err(bad("name length out of range"));
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
                .persistent(self.read_only.get(), in_use);
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
            let Some(bytes) = self.table_bytes(&e) else {
                return Err(self.corrupt(format!(
                    "invalid bitmap table at {:#x} ({} entries)",
                    e.table_offset, e.table_size
                )));
            };
            if bytes == 0 {
                continue;
            }
            v.push((e.table_offset, bytes));
            for d in self.bitmap_data_clusters(&e).await? {
                v.push((d, cs));
            }
        }
        Ok(v)
    }

    /// Whether a new persistent bitmap `name` could be stored here, with
    /// QEMU's messages. A read-only node takes one too, as in QEMU: it is
    /// stored once the node has been reopened read-write and closes.
    pub fn can_store_bitmap(&self, name: &str, existing: usize) -> std::result::Result<(), String> {
        if self.hdr.borrow().version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        if existing >= MAX_BITMAPS as usize {
            return Err("Maximum number of persistent bitmaps is already reached".into());
        }
        if name.len() > MAX_NAME {
            return Err(format!("Bitmap name too long: {name}"));
        }
        Ok(())
    }

    /// Stores `bitmaps` (a node's, newest first) in place of the image's
    /// directory: persistent ones with their bits, inconsistent ones as
    /// they were; bitmaps no longer on the node leave the directory.
    /// Called under `meta` when a read-write node closes.
    pub(crate) async fn store_bitmaps(&self, bitmaps: &[Rc<DirtyBitmap>]) -> Result<()> {
        if self.read_only.get() {
            return Ok(());
        }
        let old = if self.hdr.borrow().autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            self.read_bitmap_directory().await?
        } else {
            None
        };
        if old.is_none() && !bitmaps.iter().any(|b| b.is_persistent()) {
            return Ok(());
        }
        let old_names: Vec<String> = match &old {
            Some((_, dir, entries)) => self
                .entry_infos(dir, entries)?
                .into_iter()
                .map(|b| b.name)
                .collect(),
            None => Vec::new(),
        };
        // QEMU's order: the directory's bitmaps where they were, then new
        // ones newest first.
        let persistent = || bitmaps.iter().filter(|b| b.is_persistent());
        let mut keep: Vec<&Rc<DirtyBitmap>> = old_names
            .iter()
            .filter_map(|n| persistent().find(|b| b.name() == n))
            .collect();
        keep.extend(persistent().filter(|b| !old_names.iter().any(|n| n == b.name())));
        if keep.is_empty() && old.is_none() {
            return Ok(());
        }
        let old_entry = |name: &str| {
            let (_, _, entries) = old.as_ref()?;
            let i = old_names.iter().position(|n| n == name)?;
            entries.get(i)
        };
        let mut dir = Vec::new();
        let mut count = 0u32;
        // Old tables that stay in use (inconsistent bitmaps keep theirs).
        let mut kept_tables = Vec::new();
        for b in &keep {
            let (table_off, table_size, flags) = if b.is_inconsistent() {
                let Some(e) = old_entry(b.name()) else {
                    continue;
                };
                kept_tables.push(e.table_offset);
                (e.table_offset, e.table_size, e.flags | FLAG_IN_USE)
            } else {
                // The image may have been resized under a bitmap that
                // nobody attached to a node (qemu-img-like tools).
                if b.size() != self.size.get() {
                    b.resize(self.size.get());
                }
                let (off, n) = self.store_bitmap_data(b).await?;
                let flags = if b.is_recording() { FLAG_AUTO } else { 0 };
                (off, n, flags)
            };
            let name = b.name().as_bytes();
            let start = dir.len();
            dir.resize(start + (24 + name.len()).div_ceil(8) * 8, 0);
            put64(&mut dir, start, table_off);
            put32(&mut dir, start + 8, table_size);
            put32(&mut dir, start + 12, flags);
            dir[start + 16] = 1;
            dir[start + 17] = b.granularity().trailing_zeros() as u8;
            dir[start + 18..start + 20].copy_from_slice(&(name.len() as u16).to_be_bytes());
            dir[start + 24..start + 24 + name.len()].copy_from_slice(name);
            count += 1;
        }
        self.publish_directory(dir, count).await?;
        // The old directory and every table not kept are garbage now.
        if let Some((off, odir, entries)) = old {
            self.free_bytes(off, odir.len() as u64).await?;
            for e in entries {
                if !kept_tables.contains(&e.table_offset) {
                    self.free_bitmap(&e).await?;
                }
            }
        }
        Ok(())
    }

    /// Drops the stored bitmap `name` from the image at once, as QEMU's
    /// `block-dirty-bitmap-remove` does, so that neither a crash nor a
    /// failed store at close brings it back. The other entries are kept
    /// byte for byte (still in use); the removed bitmap's table and data
    /// are freed only once the header points at the new directory. A
    /// bitmap the image does not hold (never stored yet) is no error.
    pub async fn remove_stored_bitmap(&self, name: &str) -> Result<()> {
        if self.read_only.get() {
            return Ok(());
        }
        let _g = self.meta.lock().await;
        if self.hdr.borrow().autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        // After a failed metadata write the refcounts may be stale: no
        // new directory is placed by them.
        self.check_writable_meta()?;
        let Some((off, dir, entries)) = self.read_bitmap_directory().await? else {
            return Ok(());
        };
        let infos = self.entry_infos(&dir, &entries)?;
        let Some(gone) = infos.iter().position(|b| b.name == name) else {
            return Ok(());
        };
        let mut new_dir = Vec::with_capacity(dir.len());
        for (i, e) in entries.iter().enumerate() {
            if i != gone {
                let bytes = dir
                    .get(e.pos..e.pos + e.len)
                    .ok_or_else(|| self.corrupt("bitmap directory entry beyond the directory"))?;
                new_dir.extend_from_slice(bytes);
            }
        }
        self.publish_directory(new_dir, entries.len() as u32 - 1)
            .await?;
        self.free_bytes(off, dir.len() as u64).await?;
        self.free_bitmap(&entries[gone]).await
    }

    /// Writes a new bitmap directory of `count` entries (none: the
    /// extension goes) and points the header at it. Everything the new
    /// directory needs is flushed before the header names it, and the
    /// header is flushed before anything old may be freed.
    async fn publish_directory(&self, dir: Vec<u8>, count: u32) -> Result<()> {
        let ext = if dir.is_empty() {
            None
        } else {
            let off = self
                .alloc_contiguous((dir.len() as u64).div_ceil(self.cluster_size))
                .await?;
            let mut e = vec![0u8; 24];
            put32(&mut e, 0, count);
            put64(&mut e, 8, dir.len() as u64);
            put64(&mut e, 16, off);
            self.file
                .pwrite(off, IoBuf::from_slice(&dir), WriteFlags::default())
                .await?;
            Some(e)
        };
        self.flush_caches().await?;
        self.file.flush().await?;
        let header = {
            let mut h = self.hdr.borrow_mut();
            if ext.is_some() {
                h.autoclear_features |= AUTOCLEAR_BITMAPS;
            } else {
                h.autoclear_features &= !AUTOCLEAR_BITMAPS;
            }
            h.bitmaps_ext = ext;
            h.serialize()?
        };
        self.file
            .pwrite(0, IoBuf::from_slice(&header), WriteFlags::default())
            .await?;
        self.file.flush().await
    }

    /// Frees one old entry's data clusters and table. A table that
    /// cannot be one of ours (misaligned, absurd) is left alone: a leak
    /// is harmless, freeing somebody else's cluster is not.
    async fn free_bitmap(&self, e: &Entry) -> Result<()> {
        let Some(bytes) = self.table_bytes(e).filter(|_| e.table_size != 0) else {
            return Ok(());
        };
        for d in self.bitmap_data_clusters(e).await? {
            self.free_bytes(d, self.cluster_size).await?;
        }
        self.free_bytes(e.table_offset, bytes).await
    }

    /// The bytes of an entry's table, if it can be one the image holds
    /// (cluster-aligned, of a size QEMU accepts).
    fn table_bytes(&self, e: &Entry) -> Option<u64> {
        let bytes = u64::from(e.table_size) * 8;
        (bytes <= MAX_DIRECTORY_BYTES && e.table_offset.is_multiple_of(self.cluster_size))
            .then_some(bytes)
    }

    /// The data clusters a bitmap's table points to.
    async fn bitmap_data_clusters(&self, e: &Entry) -> Result<Vec<u64>> {
        let bytes = u64::from(e.table_size) * 8;
        let t = self
            .file
            .pread(e.table_offset, IoBuf::zeroed(bytes as usize))
            .await?;
        Ok(t.chunks_exact(8)
            .map(|c| be64(c, 0) & BME_OFFSET_MASK)
            .filter(|&d| d != 0)
            .collect())
    }

    /// Writes one bitmap's non-zero data clusters and its table; returns
    /// the table's offset and entry count.
    async fn store_bitmap_data(&self, b: &DirtyBitmap) -> Result<(u64, u32)> {
        let cs = self.cluster_size as usize;
        let bytes = b.to_bytes();
        let mut table = vec![0u8; bytes.len().div_ceil(cs) * 8];
        for (i, chunk) in bytes.chunks(cs).enumerate() {
            if block_core::buf::is_zero(chunk) {
                continue;
            }
            let off = self.alloc_cluster().await?;
            let mut buf = IoBuf::zeroed(cs);
            buf[..chunk.len()].copy_from_slice(chunk);
            self.file.pwrite(off, buf, WriteFlags::default()).await?;
            put64(&mut table, i * 8, off);
        }
        let n = (table.len() / 8) as u32;
        let off = self
            .alloc_contiguous((table.len() as u64).div_ceil(cs as u64))
            .await?;
        self.file
            .pwrite(off, IoBuf::from_slice(&table), WriteFlags::default())
            .await?;
        Ok((off, n))
    }

    /// Drops one reference from every cluster of `[off, off + len)`.
    async fn free_bytes(&self, off: u64, len: u64) -> Result<()> {
        let cb = self.cluster_bits;
        for c in (off >> cb)..=((off + len.max(1) - 1) >> cb) {
            self.update_refcount(c, -1, super::DiscardKind::Other)
                .await?;
        }
        Ok(())
    }
}
