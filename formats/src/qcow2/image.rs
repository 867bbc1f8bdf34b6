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
                    let img = Image { graph, drv, users };
                    img.close().await?;
                    return Err(e);
                }
            }
        }
        Ok(Image { graph, drv, users })
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

    /// Writes one whole guest cluster compressed (at a cluster-aligned
    /// `offset`); data that does not compress is written as a normal cluster.
    pub async fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.drv.write_compressed(offset, data).await
    }

    /// Flushes metadata and releases the children.
    pub async fn close(self) -> Result<()> {
        let r = if self.drv.read_only {
            Ok(())
        } else {
            let _g = self.drv.meta.lock().await;
            self.drv.settle_for_close().await
        };
        let r = match r {
            Ok(()) if !self.drv.read_only => self.drv.file.flush().await,
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
    pub(crate) async fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size;
        if self.read_only {
            return Err(Error::ReadOnly {
                node: self.node_name.clone(),
            });
        }
        if !offset.is_multiple_of(cs)
            || (data.len() as u64 != cs && offset + data.len() as u64 != self.size.get())
        {
            return Err(Error::invalid(
                "compressed writes must cover exactly one whole cluster",
            ));
        }
        if offset >= self.size.get() {
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
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let kind = self.hdr.borrow().compression_type;
        let max = (cs - 1) as usize;
        let packed = self
            .file
            .context()
            .run_on_worker(move || (compress(kind, &full, max), full))
            .await;
        let (packed, full) = packed;
        let Some(packed) = packed else {
            // Incompressible: a plain allocating write (no backing COW needed,
            // the whole cluster is written).
            let gc = offset >> self.cluster_bits;
            let _g = self.lock_meta_quiet(gc, gc).await;
            let (l2_off, table) = self.l2_table_for_write(offset).await?;
            let idx = self.l2_index(offset);
            let old = self.l2_entry_at(&table.borrow(), idx);
            let host = self.alloc_cluster().await?;
            self.file
                .pwrite(host, IoBuf::from_slice(&full), WriteFlags::default())
                .await?;
            self.l2_needs_rc().await?;
            let ne = L2Entry {
                entry: host | super::l2::OFLAG_COPIED,
                bitmap: if self.extended { 0xffff_ffff } else { 0 },
            };
            self.set_l2_entry_at(&mut table.borrow_mut(), idx, ne);
            self.l2_cache.insert(l2_off, table, true);
            if old.host() != 0 || old.is_compressed() {
                self.free_l2_cluster(old, DiscardKind::Other).await?;
            }
            return Ok(());
        };
        let gc = offset >> self.cluster_bits;
        let _g = self.lock_meta_quiet(gc, gc).await;
        let (l2_off, table) = self.l2_table_for_write(offset).await?;
        let idx = self.l2_index(offset);
        let old = self.l2_entry_at(&table.borrow(), idx);
        let len = packed.len() as u64;
        let host = self.alloc_compressed_bytes(len).await?;
        self.file
            .pwrite(host, IoBuf::from_slice(&packed), WriteFlags::default())
            .await?;
        self.l2_needs_rc().await?;
        let shift = 62 - (self.cluster_bits - 8);
        // Additional 512-byte sectors touched after the first one.
        let more = ((host + len.max(1) - 1) >> 9) - (host >> 9);
        let ne = L2Entry {
            entry: OFLAG_COMPRESSED | (more << shift) | host,
            bitmap: 0,
        };
        self.set_l2_entry_at(&mut table.borrow_mut(), idx, ne);
        self.l2_cache.insert(l2_off, table, true);
        if old.host() != 0 || old.is_compressed() {
            self.free_l2_cluster(old, DiscardKind::Other).await?;
        }
        Ok(())
    }
}
