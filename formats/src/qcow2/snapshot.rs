//! Internal snapshots: reading the snapshot table, creating, deleting and
//! reverting to snapshots (QEMU's `qcow2_snapshot_*`). Runs on the loop
//! thread under `meta`.
//!
//! Deleting removes the table entry first (header last-written as for
//! creation), then drops the refcounts of the snapshot's tree: a crash
//! leaks clusters. Reverting raises the refcounts of the snapshot's tree,
//! writes the active L1 table (flushed), then drops the old tree's
//! refcounts and recomputes COPIED flags.
//!
//! Write order for a new snapshot: caches flushed; the copy of the active
//! L1 table is written and flushed; refcounts of every L2 table and data
//! cluster reachable from it are raised, and COPIED flags cleared in the
//! active tables, and all of that flushed; the new snapshot table is written
//! and flushed; the header then points to it (one 12-byte write) and is
//! flushed; the old snapshot table is freed last. A crash leaks clusters at
//! worst.

use block_core::{Error, IoBuf, Result, WriteFlags};

use super::header::{be16, be32, be64, put32, put64};
use super::l2::{L1E_OFFSET_MASK, OFLAG_COPIED};
use super::meta::Which;
use super::{DiscardKind, Qcow2};

/// Longest snapshot table QEMU accepts.
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Offset of its L1 table.
    pub l1_table_offset: u64,
    /// Entries of its L1 table.
    pub l1_size: u32,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Extra data, verbatim.
    pub extra: Vec<u8>,
}

impl SnapshotInfo {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + 40, 0);
        let h = &mut out[start..];
        put64(h, 0, self.l1_table_offset);
        put32(h, 8, self.l1_size);
        h[12..14].copy_from_slice(&(self.id.len() as u16).to_be_bytes());
        h[14..16].copy_from_slice(&(self.name.len() as u16).to_be_bytes());
        put32(h, 16, self.date_sec);
        put32(h, 20, self.date_nsec);
        put64(h, 24, self.vm_clock_nsec);
        put32(h, 32, self.vm_state_size.min(u32::MAX as u64) as u32);
        put32(h, 36, self.extra.len() as u32);
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
}

impl Qcow2 {
    /// Reads the snapshot table.
    pub(crate) async fn read_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let (n, off) = {
            let h = self.hdr.borrow();
            (h.nb_snapshots, h.snapshots_offset)
        };
        let mut v = Vec::new();
        let mut pos = off;
        for i in 0..n {
            if pos - off > MAX_SNAPSHOT_TABLE {
                return Err(self.corrupt("snapshot table too large"));
            }
            let h = self.file.pread(pos, IoBuf::zeroed(40)).await?;
            let id_len = be16(&h, 12) as u64;
            let name_len = be16(&h, 14) as u64;
            let extra = be32(&h, 36) as u64;
            if extra > 1024 {
                return Err(self.corrupt(format!("snapshot {i}: extra data too large ({extra})")));
            }
            let rest = self
                .file
                .pread(
                    pos + 40,
                    IoBuf::zeroed((extra + id_len + name_len) as usize),
                )
                .await?;
            let l1_size = be32(&h, 8);
            if l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
                return Err(self.corrupt(format!("snapshot {i}: L1 table too large")));
            }
            let mut vm_state_size = be32(&h, 32) as u64;
            if extra >= 8 {
                vm_state_size = vm_state_size.max(be64(&rest, 0));
            }
            v.push(SnapshotInfo {
                id: String::from_utf8_lossy(&rest[extra as usize..(extra + id_len) as usize])
                    .into_owned(),
                name: String::from_utf8_lossy(&rest[(extra + id_len) as usize..]).into_owned(),
                l1_table_offset: be64(&h, 0),
                l1_size,
                date_sec: be32(&h, 16),
                date_nsec: be32(&h, 20),
                vm_clock_nsec: be64(&h, 24),
                vm_state_size,
                extra: rest[..extra as usize].to_vec(),
            });
            pos += (40 + extra + id_len + name_len).div_ceil(8) * 8;
        }
        Ok(v)
    }

    /// Lists the internal snapshots.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let _g = self.meta.lock().await;
        self.read_snapshots().await
    }

    /// Creates an internal snapshot of the current disk state (no VM state).
    pub async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        self.create_snapshot_as(name, false).await
    }

    /// Creates an internal snapshot as `qemu-img snapshot -c` does: the
    /// name may be empty or repeat an existing one, the id is one past the
    /// highest numeric id, the time has microsecond precision and the guest
    /// instruction count is stored as 0.
    pub async fn create_snapshot_qemu_img(&self, name: &str) -> Result<SnapshotInfo> {
        self.create_snapshot_as(name, true).await
    }

    async fn create_snapshot_as(&self, name: &str, qemu_img: bool) -> Result<SnapshotInfo> {
        if self.read_only.get() {
            return Err(Error::ReadOnly {
                node: self.node_name.clone(),
            });
        }
        if (name.is_empty() && !qemu_img) || name.len() > 1023 {
            return Err(Error::invalid("invalid snapshot name"));
        }
        let _g = self.lock_meta_idle().await;
        let mut snaps = self.read_snapshots().await?;
        if !qemu_img && snaps.iter().any(|s| s.name == name) {
            return Err(Error::invalid(format!(
                "Snapshot with name '{name}' already exists"
            )));
        }
        if snaps.len() as u32 >= super::header::MAX_SNAPSHOTS {
            return Err(Error::invalid("too many snapshots"));
        }
        let id = if qemu_img {
            let max = snaps
                .iter()
                .filter_map(|s| s.id.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            (max + 1).to_string()
        } else {
            (1..)
                .map(|i: u64| i.to_string())
                .find(|c| !snaps.iter().any(|s| &s.id == c))
                .unwrap_or_default()
        };
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        self.flush_caches().await?;
        // The L1 copy.
        let l1: Vec<u64> = self.l1.borrow().clone();
        let l1_bytes = l1.len() as u64 * 8;
        let l1_off = if l1.is_empty() {
            0
        } else {
            self.alloc_contiguous(l1_bytes.div_ceil(cs)).await?
        };
        // Raise refcounts, clear COPIED in the active tables.
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.update_refcount(l2 >> cb, 1, DiscardKind::Other)
                .await?;
            let t = self.load_table(Which::L2, l2).await?;
            let entries = 1usize << self.l2_bits;
            for j in 0..entries {
                let le = self.l2_entry_at(&t.borrow(), j);
                if le.is_compressed() {
                    let (off, len) = le.compressed_extent(cb);
                    for c in (off >> cb)..=((off + len.max(1) - 1) >> cb) {
                        self.update_refcount(c, 1, DiscardKind::Other).await?;
                    }
                } else if le.host() != 0 {
                    if std::rc::Rc::ptr_eq(&self.data, &self.file) {
                        self.update_refcount(le.host() >> cb, 1, DiscardKind::Other)
                            .await?;
                    }
                    if le.copied() {
                        let mut ne = le;
                        ne.entry &= !OFLAG_COPIED;
                        self.set_l2_entry_at(&mut t.borrow_mut(), j, ne);
                        self.l2_cache.insert(l2, std::rc::Rc::clone(&t), true);
                    }
                }
            }
            self.l1.borrow_mut()[i] = e & !OFLAG_COPIED;
        }
        let mut tb = vec![0u8; (l1_bytes.div_ceil(cs) * cs) as usize];
        for (i, &e) in self.l1.borrow().iter().enumerate() {
            put64(&mut tb, i * 8, e);
        }
        let snap_l1: Vec<u8> = tb[..l1_bytes as usize].to_vec();
        if l1_off != 0 {
            self.file
                .pwrite(l1_off, IoBuf::from_slice(&snap_l1), WriteFlags::default())
                .await?;
        }
        self.flush_caches().await?;
        // Active L1 without COPIED flags.
        let active_off = self.hdr.borrow().l1_table_offset;
        if !snap_l1.is_empty() {
            self.file
                .pwrite(
                    active_off,
                    IoBuf::from_slice(&snap_l1),
                    WriteFlags::default(),
                )
                .await?;
        }
        self.sync_now().await?;
        // The new snapshot table.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut extra = vec![0u8; 24];
        put64(&mut extra, 8, self.size.get());
        put64(&mut extra, 16, if qemu_img { 0 } else { u64::MAX });
        let nsec = now.subsec_nanos();
        let info = SnapshotInfo {
            id,
            name: name.to_owned(),
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            date_sec: now.as_secs() as u32,
            date_nsec: if qemu_img { nsec / 1000 * 1000 } else { nsec },
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra,
        };
        snaps.push(info.clone());
        let mut table = Vec::new();
        for s in &snaps {
            s.encode(&mut table);
        }
        let t_off = self
            .alloc_contiguous((table.len() as u64).div_ceil(cs))
            .await?;
        self.flush_caches().await?;
        self.file
            .pwrite(t_off, IoBuf::from_slice(&table), WriteFlags::default())
            .await?;
        self.sync_now().await?;
        let (old_n, old_off, old_len) = {
            let h = self.hdr.borrow();
            let old: u64 = snaps[..snaps.len() - 1]
                .iter()
                .map(|s| {
                    let mut b = Vec::new();
                    s.encode(&mut b);
                    b.len() as u64
                })
                .sum();
            (h.nb_snapshots, h.snapshots_offset, old)
        };
        let mut hb = [0u8; 12];
        put32(&mut hb, 0, snaps.len() as u32);
        put64(&mut hb, 4, t_off);
        self.file
            .pwrite(60, IoBuf::from_slice(&hb), WriteFlags::default())
            .await?;
        self.sync_now().await?;
        {
            let mut h = self.hdr.borrow_mut();
            h.nb_snapshots = snaps.len() as u32;
            h.snapshots_offset = t_off;
        }
        if old_n > 0 && old_len > 0 {
            for c in (old_off >> cb)..=((old_off + old_len - 1) >> cb) {
                self.update_refcount(c, -1, DiscardKind::Other).await?;
            }
        }
        self.flush_caches().await?;
        Ok(info)
    }

    /// Adds `delta` to the refcount of every L2 table and data cluster
    /// reachable from `l1`.
    async fn tree_refcount(&self, l1: &[u64], delta: i64, why: DiscardKind) -> Result<()> {
        let cb = self.cluster_bits;
        for &e in l1 {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let t = self.load_table(Which::L2, l2).await?;
            let bytes = t.borrow().clone();
            for j in 0..(1usize << self.l2_bits) {
                let le = self.l2_entry_at(&bytes, j);
                if le.is_compressed() {
                    let (off, len) = le.compressed_extent(cb);
                    for c in (off >> cb)..=((off + len.max(1) - 1) >> cb) {
                        self.update_refcount(c, delta, why).await?;
                    }
                } else if le.host() != 0 && std::rc::Rc::ptr_eq(&self.data, &self.file) {
                    self.update_refcount(le.host() >> cb, delta, why).await?;
                }
            }
            self.update_refcount(l2 >> cb, delta, why).await?;
        }
        Ok(())
    }

    /// Sets COPIED on active L1/L2 entries exactly where the refcount is 1.
    async fn fix_copied_flags(&self) -> Result<()> {
        let cb = self.cluster_bits;
        let n = self.l1.borrow().len();
        for i in 0..n {
            let e = self.l1.borrow()[i];
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let t = self.load_table(Which::L2, l2).await?;
            let mut changed = false;
            for j in 0..(1usize << self.l2_bits) {
                let le = self.l2_entry_at(&t.borrow(), j);
                if le.is_compressed() || le.host() == 0 {
                    continue;
                }
                let one = !std::rc::Rc::ptr_eq(&self.data, &self.file)
                    || self.get_refcount(le.host() >> cb).await? == 1;
                let mut ne = le;
                if one {
                    ne.entry |= OFLAG_COPIED;
                } else {
                    ne.entry &= !OFLAG_COPIED;
                }
                if ne != le {
                    self.set_l2_entry_at(&mut t.borrow_mut(), j, ne);
                    changed = true;
                }
            }
            if changed {
                self.l2_cache.insert(l2, t, true);
            }
            let ne = if self.get_refcount(l2 >> cb).await? == 1 {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            if ne != e {
                self.flush_caches().await?;
                self.write_l1_entry(i, ne).await?;
            }
        }
        self.flush_caches().await
    }

    /// Gives every snapshot the extra data version 3 requires (the 64-bit
    /// VM state size and the disk size), before an upgrade, as QEMU's
    /// `qcow2_upgrade` does: version 2 made both optional. Entries are
    /// written as QEMU writes them (with the instruction count, unknown when
    /// absent); nothing is written when every snapshot already has both.
    pub(crate) async fn complete_snapshot_extra_data(&self) -> Result<()> {
        let _g = self.meta.lock().await;
        let mut snaps = self.read_snapshots().await?;
        if snaps.iter().all(|s| s.extra.len() >= 16) {
            return Ok(());
        }
        let size = self.size.get();
        for s in &mut snaps {
            let mut extra = vec![0u8; 24];
            put64(&mut extra, 0, s.vm_state_size);
            let disk = if s.extra.len() >= 16 {
                be64(&s.extra, 8)
            } else {
                size
            };
            put64(&mut extra, 8, disk);
            let icount = if s.extra.len() >= 24 {
                be64(&s.extra, 16)
            } else {
                u64::MAX
            };
            put64(&mut extra, 16, icount);
            if let Some(unknown) = s.extra.get(24..) {
                extra.extend_from_slice(unknown);
            }
            s.extra = extra;
        }
        self.write_snapshot_table(&snaps).await?;
        self.flush_caches().await
    }

    /// Writes a new snapshot table and points the header to it.
    async fn write_snapshot_table(&self, snaps: &[SnapshotInfo]) -> Result<()> {
        let cs = self.cluster_size;
        let cb = self.cluster_bits;
        let (old_n, old_off) = {
            let h = self.hdr.borrow();
            (h.nb_snapshots, h.snapshots_offset)
        };
        let old_len: u64 = if old_n > 0 {
            let mut b = Vec::new();
            for s in self.read_snapshots().await? {
                s.encode(&mut b);
            }
            b.len() as u64
        } else {
            0
        };
        let mut table = Vec::new();
        for s in snaps {
            s.encode(&mut table);
        }
        let t_off = if table.is_empty() {
            0
        } else {
            let o = self
                .alloc_contiguous((table.len() as u64).div_ceil(cs))
                .await?;
            self.flush_caches().await?;
            self.file
                .pwrite(o, IoBuf::from_slice(&table), WriteFlags::default())
                .await?;
            self.sync_now().await?;
            o
        };
        let mut hb = [0u8; 12];
        put32(&mut hb, 0, snaps.len() as u32);
        put64(&mut hb, 4, t_off);
        self.file
            .pwrite(60, IoBuf::from_slice(&hb), WriteFlags::default())
            .await?;
        self.sync_now().await?;
        {
            let mut h = self.hdr.borrow_mut();
            h.nb_snapshots = snaps.len() as u32;
            h.snapshots_offset = t_off;
        }
        if old_len > 0 {
            for c in (old_off >> cb)..=((old_off + old_len - 1) >> cb) {
                self.update_refcount(c, -1, DiscardKind::Other).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn read_l1(&self, s: &SnapshotInfo) -> Result<Vec<u64>> {
        if !s.l1_table_offset.is_multiple_of(self.cluster_size) {
            return Err(self.corrupt(format!(
                "snapshot '{}' L1 table offset {:#x} unaligned",
                s.name, s.l1_table_offset
            )));
        }
        let b = self
            .file
            .pread(s.l1_table_offset, IoBuf::zeroed(s.l1_size as usize * 8))
            .await?;
        Ok(b.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    fn find_snapshot(snaps: &[SnapshotInfo], name_or_id: &str) -> Result<usize> {
        snaps
            .iter()
            .position(|s| s.id == name_or_id)
            .or_else(|| snaps.iter().position(|s| s.name == name_or_id))
            .ok_or_else(|| Error::NotFound {
                what: "Snapshot",
                name: name_or_id.to_owned(),
            })
    }

    /// Deletes the snapshot with this id or name.
    pub async fn delete_snapshot(&self, name_or_id: &str) -> Result<()> {
        if self.read_only.get() {
            return Err(Error::ReadOnly {
                node: self.node_name.clone(),
            });
        }
        let _g = self.lock_meta_idle().await;
        let mut snaps = self.read_snapshots().await?;
        let i = Self::find_snapshot(&snaps, name_or_id)?;
        let s = snaps.remove(i);
        let l1 = self.read_l1(&s).await?;
        self.flush_caches().await?;
        self.write_snapshot_table(&snaps).await?;
        self.tree_refcount(&l1, -1, DiscardKind::Snapshot).await?;
        let cs = self.cluster_size;
        let bytes = s.l1_size as u64 * 8;
        if bytes > 0 {
            let first = s.l1_table_offset / cs;
            for c in first..first + bytes.div_ceil(cs) {
                self.update_refcount(c, -1, DiscardKind::Snapshot).await?;
            }
        }
        self.fix_copied_flags().await
    }

    /// Makes the active disk state that of the snapshot with this id or name.
    pub async fn revert_to_snapshot(&self, name_or_id: &str) -> Result<()> {
        if self.read_only.get() {
            return Err(Error::ReadOnly {
                node: self.node_name.clone(),
            });
        }
        let _g = self.lock_meta_idle().await;
        let snaps = self.read_snapshots().await?;
        let i = Self::find_snapshot(&snaps, name_or_id)?;
        let s = &snaps[i];
        let mut sl1 = self.read_l1(s).await?;
        let cur = self.l1.borrow().len();
        if sl1.len() > cur {
            return Err(Error::unsupported(
                "qcow2",
                "reverting to a snapshot with a larger L1 table",
            ));
        }
        sl1.resize(cur, 0);
        self.flush_caches().await?;
        self.tree_refcount(&sl1, 1, DiscardKind::Other).await?;
        self.flush_caches().await?;
        let old: Vec<u64> = self.l1.borrow().clone();
        for (i, &e) in sl1.iter().enumerate() {
            self.write_l1_entry(i, e & !OFLAG_COPIED).await?;
        }
        self.sync_now().await?;
        self.tree_refcount(&old, -1, DiscardKind::Other).await?;
        self.fix_copied_flags().await
    }
}
