//! The driver interface.
//!
//! A driver answers questions about its own layer and does the I/O only its
//! layer can do; the engine (`io.rs`) owns everything common: range checks,
//! alignment (read-modify-write, bounce buffers), request tracking and
//! serialisation, zero detection, accounting and write thresholds.
//!
//! ## Why a mapping interface
//! Format drivers (qcow2) mostly translate: a guest range lives at some host
//! offset of a child, reads as zeros, is not allocated in this layer (so the
//! backing node answers), or needs decoding (compressed). A driver that
//! reports [`Mapping`]s lets the engine issue the data I/O to the child
//! itself, so that qcow2 data reads go straight from the request path to the
//! file's io_uring submission without passing through format code, and the
//! same generic loop serves every format and the backing chain (the split
//! imago makes with `get_mapping`, and QEMU with `block_status` + data I/O).
//! Protocol drivers (file, null-co) and filters that rewrite data do their
//! own I/O through [`BlockDriver::read`] / [`BlockDriver::write`].
//!
//! ## What the engine guarantees to drivers
//! - `offset` and lengths are multiples of [`BlockLimits::request_alignment`]
//!   (except a final partial block at the node's end), and no request is
//!   longer than [`BlockLimits::max_transfer`].
//! - Buffers are aligned to [`BlockLimits::min_mem_alignment`].
//! - Requests lie within the node's size (except writes on growable nodes).
//! - Calls happen on the node's loop thread; several may be in flight at
//!   once, but never two overlapping when either is serialising.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use crate::buf::IoBuf;
use crate::error::Result;
use crate::node::{ChildRole, Node};
use crate::perm::Perm;

/// A boxed, non-`Send` future returned by driver methods.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

/// Alignment and size limits a driver imposes on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// Offsets and lengths must be multiples of this (1 for byte-granular).
    pub request_alignment: u32,
    /// Longest single request the driver accepts.
    pub max_transfer: u64,
    /// Buffer memory alignment the driver needs (O_DIRECT).
    pub min_mem_alignment: usize,
    /// Preferred transfer size (e.g. the cluster size), 0 when none.
    pub opt_transfer: u32,
}

impl Default for BlockLimits {
    fn default() -> Self {
        BlockLimits {
            request_alignment: 1,
            max_transfer: MAX_REQUEST_BYTES,
            min_mem_alignment: 1,
            opt_transfer: 0,
        }
    }
}

/// Largest request the engine accepts in one call (QEMU's
/// BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to 4 KiB... kept identical
/// so that the same requests are refused).
pub const MAX_REQUEST_BYTES: u64 = (i32::MAX as u64) & !4095;

/// Where a guest range of a node lives.
#[derive(Clone)]
pub enum Mapping {
    /// The data is in `child` at `offset`.
    Data {
        /// The node holding the data (usually the `file` or `data` child).
        child: Rc<Node>,
        /// Offset in that node.
        offset: u64,
    },
    /// Reads as zeros in this layer.
    Zero,
    /// Not allocated in this layer: the backing node answers (zeros if none).
    Unallocated,
    /// The driver must produce the data itself (compressed clusters,
    /// protocol drivers): the engine calls [`BlockDriver::read`].
    Driver,
}

/// Flags on writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: data is stable when the write completes.
    pub fua: bool,
    /// For write_zeroes: the range may be deallocated instead of written.
    pub may_unmap: bool,
    /// For write_zeroes: fail fast with ENOTSUP rather than write zeros slowly.
    pub no_fallback: bool,
}

/// Allocation status of a range, QEMU's `block_status` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the query offset that share this status (> 0).
    pub len: u64,
    /// The range holds data (is not a hole).
    pub data: bool,
    /// The range reads as zeros.
    pub zero: bool,
    /// Allocated in this layer (not deferring to backing).
    pub allocated: bool,
    /// Host offset in `file_node` when the data has a known location.
    pub offset: Option<u64>,
    /// Node that holds the data at `offset`.
    pub file_node: Option<String>,
}

/// Preallocation modes for truncate/create, as QEMU names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Prealloc {
    /// No preallocation.
    #[default]
    Off,
    /// Only metadata (format drivers).
    Metadata,
    /// posix_fallocate.
    Falloc,
    /// Write zeros.
    Full,
}

impl Prealloc {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }
}

/// A block driver instance (the state of one node's layer).
///
/// Methods take `node`, the node this driver belongs to, so drivers reach
/// their children through the graph's edges ([`Node::child`]) rather than a
/// second copy of them.
pub trait BlockDriver {
    /// QEMU's driver name ("file", "raw", "qcow2", "null-co").
    fn format_name(&self) -> &'static str;

    /// Current size in bytes as seen by parents.
    fn size(&self) -> u64;

    /// The driver as `Any`, so format-specific operations (internal
    /// snapshots, check) can reach a node's driver by downcasting.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Request limits.
    fn limits(&self) -> BlockLimits {
        BlockLimits::default()
    }

    /// Whether the engine should ask [`BlockDriver::map`] before reading.
    fn has_mapping(&self) -> bool {
        false
    }

    /// Whether this is a filter whose one child holds the same content.
    fn is_filter(&self) -> bool {
        false
    }

    /// Where `[offset, offset+len)` lives; returns the mapping and how many
    /// bytes from `offset` it covers (> 0 when `len > 0`).
    fn map<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> IoFuture<'a, (Mapping, u64)> {
        Box::pin(async move { Ok((Mapping::Driver, len)) })
    }

    /// Reads `buf.len()` bytes at `offset` produced by this layer.
    fn read<'a>(&'a self, node: &'a Node, offset: u64, buf: IoBuf) -> IoFuture<'a, IoBuf>;

    /// Writes `buf` at `offset`; returns the buffer for reuse.
    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> IoFuture<'a, IoBuf>;

    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> IoFuture<'a, ()>;

    /// Discards (deallocates) a range; a hint, may do nothing.
    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Makes completed writes stable (this layer and below).
    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, ()>;

    /// Allocation status of this layer at `offset`.
    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        let _ = offset;
        Box::pin(async move {
            Ok(BlockStatus {
                len,
                data: true,
                zero: false,
                allocated: true,
                offset: None,
                file_node: None,
            })
        })
    }

    /// Changes the size.
    fn truncate<'a>(
        &'a self,
        _node: &'a Node,
        _size: u64,
        _exact: bool,
        _prealloc: Prealloc,
    ) -> IoFuture<'a, ()> {
        let name = self.format_name();
        Box::pin(async move { Err(crate::Error::unsupported(name, "resize")) })
    }

    /// The permissions this node needs on a child in `role`, given what its
    /// own parents need (`perm`) and allow (`shared`). The default is QEMU's
    /// for filters: pass through, and the storage/COW variants below.
    fn child_perm(
        &self,
        role: ChildRole,
        perm: Perm,
        shared: Perm,
        writable: bool,
    ) -> (Perm, Perm) {
        default_child_perm(role, perm, shared, writable)
    }

    /// Checks that the node may run with these cumulative permissions (the
    /// file driver tests image locks here). Must not change state.
    fn check_perm(&self, _perm: Perm, _shared: Perm) -> Result<()> {
        Ok(())
    }

    /// Applies cumulative permissions after a successful check.
    fn set_perm(&self, _perm: Perm, _shared: Perm) {}

    /// Host file name shown in queries, if any.
    fn filename(&self) -> Option<String> {
        None
    }

    /// Releases resources before the node goes away (flushes format caches).
    fn close<'a>(&'a self, _node: &'a Node) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Follows `blockdev-reopen` changing the node's read-only flag: called
    /// before the node becomes read-only, while its children still take
    /// writes (a format writes back what it keeps), and after it became
    /// writable. An error leaves the flag as it was.
    fn reopen<'a>(&'a self, _node: &'a Node, _read_only: bool) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Drops the persistent bitmap `name` from the image now (qcow2
    /// rewrites its bitmap directory). Formats without persistent bitmaps
    /// hold none, and a bitmap not stored yet is no error.
    fn remove_persistent_bitmap<'a>(&'a self, _name: &'a str) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Dirty bitmaps the format loaded at open (qcow2's persistent
    /// bitmaps); the graph attaches them to the new node, once.
    fn take_loaded_bitmaps(&self) -> Vec<crate::dirty::DirtyBitmap> {
        Vec::new()
    }
}

/// QEMU's default child permissions (`bdrv_default_perms`).
pub fn default_child_perm(
    role: ChildRole,
    perm: Perm,
    shared: Perm,
    writable: bool,
) -> (Perm, Perm) {
    match role {
        ChildRole::Filtered | ChildRole::Primary => (perm, shared),
        ChildRole::Data => {
            // Guest data only: the parent's own needs pass through, but the
            // driver may have to grow the file for any write and no one
            // else may resize it under the driver.
            let mut p = perm;
            if p.contains(Perm::WRITE_UNCHANGED) {
                p = p | Perm::WRITE;
            }
            if p.contains(Perm::WRITE) {
                p = p | Perm::RESIZE;
            }
            (p, shared.without(Perm::RESIZE))
        }
        ChildRole::File => {
            let mut p = perm;
            let mut s = shared;
            if writable {
                p = p | Perm::WRITE | Perm::RESIZE;
            }
            p = p | Perm::CONSISTENT_READ;
            s = s.without(Perm::WRITE | Perm::RESIZE);
            if p.contains(Perm::WRITE_UNCHANGED) {
                p = p | Perm::WRITE;
            }
            (p, s)
        }
        ChildRole::Backing => {
            // Backing files are only read. If the parent tolerates changing
            // data, so does its backing file; otherwise nobody may write.
            let p = perm.intersect(Perm::CONSISTENT_READ);
            let s = if shared.contains(Perm::WRITE) {
                Perm::WRITE | Perm::RESIZE
            } else {
                Perm::NONE
            };
            (
                p,
                s | Perm::CONSISTENT_READ | Perm::GRAPH_MOD | Perm::WRITE_UNCHANGED,
            )
        }
    }
}
