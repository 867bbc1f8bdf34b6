//! BlockBackend: a user's handle on a root node.
//!
//! A guest device, an export, a job's source or target, or a tool like
//! `strata-img bench` holds a backend, not a node. The backend takes its
//! permissions on the root node as a user (so conflicting users are refused
//! at attach time), checks every request against the root's size, and keeps
//! the accounting (`query-blockstats`) and the I/O status. Error policy
//! (`rerror`/`werror`) is recorded here for the device model to act on.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::buf::IoBuf;
use crate::driver::{BlockStatus, Prealloc, WriteFlags};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::perm::Perm;
use crate::stats::{BlockAcct, IoKind};

/// QEMU's I/O status of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// No error so far.
    Ok,
    /// An I/O error occurred.
    Failed,
    /// The host ran out of space.
    NoSpace,
}

/// What to do on an I/O error (`rerror`/`werror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Report the error to the guest.
    Report,
    /// Ignore it.
    Ignore,
    /// Stop the VM (here: pause the device's requests).
    Stop,
    /// Stop on ENOSPC, report others.
    Enospc,
}

/// A handle on a root node with accounting.
pub struct BlockBackend {
    name: String,
    root: RefCell<Option<(Rc<Node>, u64)>>,
    perm: Cell<(Perm, Perm)>,
    acct: BlockAcct,
    iostatus: Cell<IoStatus>,
    /// Whether the device has a volatile write cache; without one every
    /// write is issued with FUA (QEMU's `cache=writethrough`).
    write_cache: Cell<bool>,
    /// Read error policy.
    pub rerror: Cell<ErrorAction>,
    /// Write error policy.
    pub werror: Cell<ErrorAction>,
}

impl BlockBackend {
    /// Creates a backend named `name` (may be empty) on `root`, taking `perm`
    /// and sharing `shared`. Fails on a permission conflict.
    pub fn new(name: &str, root: &Rc<Node>, perm: Perm, shared: Perm) -> Result<Rc<Self>> {
        let who = if name.is_empty() {
            "block device".to_owned()
        } else {
            format!("block device '{name}'")
        };
        let id = root.add_user(&who, "root", perm, shared)?;
        Ok(Rc::new(BlockBackend {
            name: name.to_owned(),
            root: RefCell::new(Some((Rc::clone(root), id))),
            perm: Cell::new((perm, shared)),
            acct: BlockAcct::default(),
            iostatus: Cell::new(IoStatus::Ok),
            write_cache: Cell::new(true),
            rerror: Cell::new(ErrorAction::Report),
            werror: Cell::new(ErrorAction::Enospc),
        }))
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root node, if one is attached (no medium otherwise).
    pub fn root(&self) -> Option<Rc<Node>> {
        self.root.borrow().as_ref().map(|(n, _)| Rc::clone(n))
    }

    fn root_or_err(&self) -> Result<Rc<Node>> {
        self.root().ok_or_else(|| Error::NotFound {
            what: "Medium of device",
            name: self.name.clone(),
        })
    }

    /// Detaches the root node, releasing its permissions.
    pub fn detach(&self) {
        if let Some((n, id)) = self.root.borrow_mut().take() {
            n.remove_user(id);
        }
    }

    /// The permissions held on the root and those shared with others.
    pub fn perm(&self) -> (Perm, Perm) {
        self.perm.get()
    }

    /// Changes the permissions held on the root.
    pub fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        if let Some((n, id)) = self.root.borrow().as_ref() {
            n.update_user(*id, perm, shared)?;
        }
        self.perm.set((perm, shared));
        Ok(())
    }

    /// Enables or disables the write cache (QEMU's
    /// `blk_set_enable_write_cache`). Disabled, every write completes only
    /// once stable (it is sent with FUA).
    pub fn set_enable_write_cache(&self, on: bool) {
        self.write_cache.set(on);
    }

    /// Whether the write cache is enabled (the default).
    pub fn enable_write_cache(&self) -> bool {
        self.write_cache.get()
    }

    /// Without a write cache every write is sent with FUA.
    fn cache_flags(&self, flags: WriteFlags) -> WriteFlags {
        WriteFlags {
            fua: flags.fua || !self.write_cache.get(),
            ..flags
        }
    }

    /// The accounting.
    pub fn acct(&self) -> &BlockAcct {
        &self.acct
    }

    /// The I/O status.
    pub fn iostatus(&self) -> IoStatus {
        self.iostatus.get()
    }

    /// Resets the I/O status to Ok.
    pub fn reset_iostatus(&self) {
        self.iostatus.set(IoStatus::Ok)
    }

    /// Size of the root node (0 without medium).
    pub fn size(&self) -> u64 {
        self.root().map_or(0, |n| n.size())
    }

    fn check(&self, kind: IoKind, node: &Node, offset: u64, len: u64) -> Result<()> {
        let size = node.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            self.acct.invalid(kind);
            return Err(Error::OutOfRange {
                node: node.name().to_owned(),
                offset,
                len,
                size,
            });
        }
        let need = match kind {
            IoKind::Read | IoKind::Flush => Perm::NONE,
            IoKind::Write | IoKind::Unmap => Perm::WRITE,
        };
        if !self.perm.get().0.contains(need) {
            self.acct.invalid(kind);
            return Err(Error::ReadOnly {
                node: node.name().to_owned(),
            });
        }
        Ok(())
    }

    fn record<T>(&self, c: crate::stats::AcctCookie, r: Result<T>) -> Result<T> {
        match &r {
            Ok(_) => self.acct.done(c),
            Err(e) => {
                if e.errno() == Some(libc::ENOSPC) {
                    self.iostatus.set(IoStatus::NoSpace);
                } else if self.iostatus.get() == IoStatus::Ok {
                    self.iostatus.set(IoStatus::Failed);
                }
                self.acct.failed(c)
            }
        }
        r
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn pread(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let node = self.root_or_err()?;
        let len = buf.len() as u64;
        self.check(IoKind::Read, &node, offset, len)?;
        let c = self.acct.start(IoKind::Read, len);
        let r = node.pread(offset, buf).await;
        self.record(c, r)
    }

    /// Writes `buf` at `offset`.
    pub async fn pwrite(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let node = self.root_or_err()?;
        let len = buf.len() as u64;
        self.check(IoKind::Write, &node, offset, len)?;
        let flags = self.cache_flags(flags);
        let c = self.acct.start(IoKind::Write, len);
        let r = node.pwrite(offset, buf, flags).await;
        self.record(c, r)
    }

    /// Writes zeros.
    pub async fn pwrite_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let node = self.root_or_err()?;
        self.check(IoKind::Write, &node, offset, len)?;
        let flags = self.cache_flags(flags);
        let c = self.acct.start(IoKind::Write, len);
        let r = node.pwrite_zeroes(offset, len, flags).await;
        self.record(c, r)
    }

    /// Discards.
    pub async fn pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        let node = self.root_or_err()?;
        self.check(IoKind::Unmap, &node, offset, len)?;
        let c = self.acct.start(IoKind::Unmap, len);
        let r = node.pdiscard(offset, len).await;
        self.record(c, r)
    }

    /// Flushes.
    pub async fn flush(&self) -> Result<()> {
        let node = self.root_or_err()?;
        let c = self.acct.start(IoKind::Flush, 0);
        let r = node.flush().await;
        self.record(c, r)
    }

    /// Allocation status.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.root_or_err()?.block_status(offset, len).await
    }

    /// Block status of the root node with its backing chain
    /// ([`Node::block_status_above`]).
    pub async fn block_status_above(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.root_or_err()?.block_status_above(offset, len).await
    }

    /// Resizes (needs the RESIZE permission).
    pub async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        let node = self.root_or_err()?;
        if !self.perm.get().0.contains(Perm::RESIZE) {
            return Err(Error::invalid(format!(
                "Backend of '{}' does not hold the resize permission",
                node.name()
            )));
        }
        node.truncate(size, exact, prealloc).await
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        self.detach();
    }
}
