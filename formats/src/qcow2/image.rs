//! Whole-image operations outside the graph, as `qemu-img` performs them:
//! an [`Image`] opens a qcow2 driver over its children without making it a
//! graph node, for `check` (with repair) and compressed cluster writes
//! (`convert -c`). Runs on the loop thread that owns the children.
//!
//! Compressed writes follow the allocating write order: the cluster that
//! receives the compressed bytes is allocated (refcount in the cache), the
//! bytes are written, the L2 cache is made to depend on the refcount cache,
//! the L2 entry is updated, and the replaced cluster is released last.

use std::rc::Rc;

use block_core::{
    Error, Graph, IoBuf, Node, NodeFlags, OpenArgs, Options, Perm, Result, WriteFlags,
};

use super::check::{CheckReport, Repair};
use super::compress::compress;
use super::l2::{L2Entry, OFLAG_COMPRESSED};
use super::{open_impl, DiscardKind, Qcow2};

/// A qcow2 image opened outside the graph.
pub struct Image<'g> {
    graph: &'g Graph,
    drv: Qcow2,
    users: Vec<(Rc<Node>, u64)>,
    /// The image's persistent bitmaps, newest first (as a node lists
    /// them); stored back when a writable image closes.
    bitmaps: std::cell::RefCell<Vec<Rc<block_core::DirtyBitmap>>>,
}

impl<'g> Image<'g> {
    /// Opens the image described by qcow2 driver options (`file`, ...).
    pub async fn open(graph: &'g Graph, mut opts: Options, writable: bool) -> Result<Image<'g>> {
        if let Some(d) = opts.take_str("driver")? {
            if d != "qcow2" {
                return Err(Error::invalid(format!("'{d}' is not a qcow2 image driver")));
            }
        }
        let flags = NodeFlags {
            read_only: !writable,
            ..NodeFlags::default()
        };
        let (drv, children) = open_impl(OpenArgs {
            graph,
            opts,
            flags,
            node_name: "image".to_owned(),
        })
        .await?;
        let mut users = Vec::new();
        for (name, role, n) in &children {
            let (p, s) = block_core::driver::default_child_perm(
                *role,
                Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ,
                writable,
            );
            match n.add_user("image", name, p, s) {
                Ok(id) => users.push((Rc::clone(n), id)),
                Err(e) => {
                    let img = Image::new(graph, drv, users);
                    img.close().await?;
                    return Err(e);
                }
            }
        }
        Ok(Image::new(graph, drv, users))
    }

    fn new(graph: &'g Graph, drv: Qcow2, users: Vec<(Rc<Node>, u64)>) -> Self {
        let bitmaps = drv.take_loaded().into_iter().rev().map(Rc::new).collect();
        Image {
            graph,
            drv,
            users,
            bitmaps: std::cell::RefCell::new(bitmaps),
        }
    }

    /// The persistent bitmaps, newest first.
    pub fn bitmaps(&self) -> Vec<Rc<block_core::DirtyBitmap>> {
        self.bitmaps.borrow().clone()
    }

    /// Adds a persistent bitmap (stored when the image closes).
    pub fn add_bitmap(&self, b: block_core::DirtyBitmap) -> Result<()> {
        let taken = self.bitmaps.borrow().iter().any(|x| x.name() == b.name());
        block_core::dirty::check_new_name(b.name(), taken)?;
        self.bitmaps.borrow_mut().insert(0, Rc::new(b));
        Ok(())
    }

    /// Removes a bitmap; it leaves the image when the image closes.
    pub fn remove_bitmap(&self, name: &str) {
        self.bitmaps.borrow_mut().retain(|b| b.name() != name);
    }

    /// The driver.
    pub fn driver(&self) -> &Qcow2 {
        &self.drv
    }

    /// Changes the virtual size (shrinking discards what lies past it).
    pub async fn resize(&self, size: u64) -> Result<()> {
        self.drv
            .truncate_impl(size, block_core::Prealloc::Off)
            .await
    }

    /// Changes the width of refcount entries; `status` gets (done, all)
    /// as the work goes on.
    pub async fn change_refcount_width(&self, bits: u32, status: &dyn Fn(u64, u64)) -> Result<()> {
        self.drv.change_refcount_width(bits, status).await
    }

    /// Prepares a downgrade to version 2: every zero cluster, in the
    /// snapshots too, becomes unallocated or a cluster of zeros. `status`
    /// gets (L1 entries done, L1 entries in all) as the work goes on.
    pub async fn expand_zero_clusters(&self, status: &dyn Fn(u64, u64)) -> Result<()> {
        self.drv.expand_zero_clusters(status).await
    }

    /// Prepares an upgrade to version 3: snapshot table entries get the
    /// extra data version 3 requires.
    pub async fn complete_snapshot_extra_data(&self) -> Result<()> {
        self.drv.complete_snapshot_extra_data().await
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.drv.size.get()
    }

    /// The internal snapshots.
    pub async fn snapshots(&self) -> Result<Vec<super::snapshot::SnapshotInfo>> {
        self.drv.snapshots().await
    }

    /// Makes whole clusters read as zeros, unmapping them (a write-zeroes
    /// that may unmap).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.drv.zero_whole_clusters(offset, len).await
    }

    /// Checks the image; repairs what `repair` allows.
    pub async fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.drv.check(repair).await
    }

    /// Writes whole guest clusters compressed (from a cluster-aligned
    /// `offset`; only the image's last cluster may be cut short); a cluster
    /// that does not compress is written as a normal cluster.
    pub async fn write_compressed(&self, offset: u64, data: IoBuf) -> Result<()> {
        self.drv.write_compressed(offset, data).await
    }

    /// Flushes metadata and releases the children.
    pub async fn close(self) -> Result<()> {
        let r = if self.drv.read_only.get() {
            Ok(())
        } else {
            let _g = self.drv.meta.lock().await;
            // The image's bitmaps were marked in use at open: store them
            // back, as qemu-img does when it closes an image.
            self.drv.store_bitmaps_and_settle(&self.bitmaps()).await
        };
        let r = match r {
            Ok(()) if !self.drv.read_only.get() => self.drv.file.flush().await,
            r => r,
        };
        for (n, id) in self.users {
            n.remove_user(id);
            if n.is_auto_named() && !n.has_users() {
                self.graph.delete(n.name()).await?;
            }
        }
        r
    }
}

impl Qcow2 {
    /// Writes the whole guest clusters in `data` (from a cluster-aligned
    /// `offset`; only the image's last cluster may be cut short) compressed,
    /// each cluster that does not compress as a normal cluster.
    ///
    /// The run is compressed in one worker job and its bytes, which the
    /// allocator packs back to back, go out in as few writes as their
    /// placement allows: a thread hand-off per cluster costs about as much
    /// as compressing it.
    pub(crate) async fn write_compressed(&self, offset: u64, data: IoBuf) -> Result<()> {
        let cs = self.cluster_size;
        if self.read_only.get() {
            return Err(Error::ReadOnly {
                node: self.node_name.clone(),
            });
        }
        let end = offset + data.len() as u64;
        if !offset.is_multiple_of(cs)
            || data.is_empty()
            || (!end.is_multiple_of(cs) && end != self.size.get())
        {
            return Err(Error::invalid(
                "compressed writes must cover whole clusters",
            ));
        }
        if end > self.size.get() {
            return Err(Error::invalid(
                "compressed write beyond the end of the image",
            ));
        }
        if !Rc::ptr_eq(&self.data, &self.file) {
            return Err(Error::unsupported(
                "qcow2",
                "compressed writes with an external data file",
            ));
        }
        let kind = self.hdr.borrow().compression_type;
        let cs = cs as usize;
        // Packed clusters lie back to back in `out`, in guest order; a
        // cluster that does not compress is copied in whole.
        let (mut out, packed) = self
            .file
            .context()
            .run_on_worker(move || {
                let mut out = IoBuf::for_read(data.len().next_multiple_of(cs));
                let mut packed = Vec::with_capacity(out.len() / cs);
                let mut at = 0;
                let mut last = Vec::new();
                for c in data.chunks(cs) {
                    let c = if c.len() < cs {
                        // The image's last cluster, cut short.
                        last.extend_from_slice(c);
                        last.resize(cs, 0);
                        &last[..]
                    } else {
                        c
                    };
                    let n = compress(kind, c, &mut out[at..at + cs - 1]);
                    if n.is_none() {
                        out[at..at + cs].copy_from_slice(c);
                    }
                    at += n.unwrap_or(cs);
                    packed.push(n);
                }
                out.truncate(at);
                (out, packed)
            })
            .await;
        let size_of = |p: &Option<usize>| p.unwrap_or(cs) as u64;
        let first = offset >> self.cluster_bits;
        let last = first + packed.len() as u64 - 1;
        let _g = self.lock_meta_quiet(first, last).await;
        // Place every cluster first, so that the bytes can be written
        // together; the L2 entries follow once they are on the file.
        let mut placed = Vec::with_capacity(packed.len());
        for p in &packed {
            let host = match p {
                Some(n) => self.alloc_compressed_bytes(*n as u64).await?,
                None => self.alloc_cluster().await?,
            };
            placed.push(host);
        }
        let mut i = 0;
        while i < placed.len() {
            // The longest stretch whose bytes follow each other on the file.
            let mut j = i + 1;
            while j < placed.len() && placed[j] == placed[j - 1] + size_of(&packed[j - 1]) {
                j += 1;
            }
            let len = placed[j - 1] + size_of(&packed[j - 1]) - placed[i];
            let buf = out.split_to(len as usize);
            self.file
                .pwrite(placed[i], buf, WriteFlags::default())
                .await?;
            i = j;
        }
        self.l2_needs_rc().await?;
        let shift = 62 - (self.cluster_bits - 8);
        for (i, &host) in placed.iter().enumerate() {
            let guest = offset + (i * cs) as u64;
            let (l2_off, table) = self.l2_table_for_write(guest).await?;
            let idx = self.l2_index(guest);
            let old = self.l2_entry_at(&table.borrow(), idx);
            let ne = match packed[i] {
                Some(n) => {
                    let len = n as u64;
                    // Additional 512-byte sectors touched after the first one.
                    let more = ((host + len.max(1) - 1) >> 9) - (host >> 9);
                    L2Entry {
                        entry: OFLAG_COMPRESSED | (more << shift) | host,
                        bitmap: 0,
                    }
                }
                // Incompressible: a plain allocated cluster, written whole
                // (no copy-on-write from a backing file needed).
                None => L2Entry {
                    entry: host | super::l2::OFLAG_COPIED,
                    bitmap: if self.extended { 0xffff_ffff } else { 0 },
                },
            };
            self.set_l2_entry_at(&mut table.borrow_mut(), idx, ne);
            self.l2_cache.insert(l2_off, table, true);
            if old.host() != 0 || old.is_compressed() {
                self.free_l2_cluster(old, DiscardKind::Other).await?;
            }
        }
        Ok(())
    }
}
