//! A pass-through test driver (`x-gate`) that holds chosen writes until
//! the test opens the gate, then lets them through or fails them: the
//! fault injection QEMU's blkdebug gives its tests, for the orderings that
//! only show when one data write is slow or fails.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use block_core::{
    BlockDriver, BlockLimits, BlockStatus, ChildRole, Error, IoBuf, IoFuture, Node, OpenArgs,
    Opened, Perm, Prealloc, WriteFlags,
};

/// What a held write does once the gate opens.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Release {
    Pass,
    Fail,
}

/// The test's handle on the gate.
#[derive(Default)]
pub(super) struct Gate {
    /// Writes of exactly this many bytes at a 64 KiB-aligned offset are
    /// held (a partial guest write to a fresh cluster, not metadata).
    hold_len: Cell<Option<usize>>,
    release: Cell<Option<Release>>,
    /// Writes held so far.
    held: Cell<u32>,
}

impl Gate {
    pub(super) fn hold(&self, len: usize) {
        self.hold_len.set(Some(len));
        self.release.set(None);
    }

    pub(super) fn open(&self, r: Release) {
        self.release.set(Some(r));
    }

    pub(super) fn held(&self) -> u32 {
        self.held.get()
    }
}

thread_local! {
    /// The gate the next `x-gate` node opened on this thread uses.
    static NEXT: RefCell<Option<Rc<Gate>>> = const { RefCell::new(None) };
}

/// Makes the next `x-gate` node use `gate`.
pub(super) fn install(gate: &Rc<Gate>) {
    NEXT.with(|n| *n.borrow_mut() = Some(Rc::clone(gate)));
}

struct GateDriver {
    gate: Rc<Gate>,
    child: Rc<Node>,
}

pub(super) fn open(args: OpenArgs<'_>) -> IoFuture<'_, Opened> {
    Box::pin(async move {
        let OpenArgs {
            graph,
            mut opts,
            flags,
            ..
        } = args;
        let child = graph
            .open_child(&mut opts, "file", flags)
            .await?
            .ok_or_else(|| Error::invalid("x-gate needs a file child"))?;
        opts.finish("x-gate")?;
        let gate = NEXT
            .with(|n| n.borrow_mut().take())
            .ok_or_else(|| Error::invalid("no gate installed"))?;
        Ok(Opened {
            driver: Box::new(GateDriver {
                gate,
                child: Rc::clone(&child),
            }),
            children: vec![("file".to_owned(), ChildRole::Primary, child)],
        })
    })
}

impl BlockDriver for GateDriver {
    fn format_name(&self) -> &'static str {
        "x-gate"
    }

    fn size(&self) -> u64 {
        self.child.size()
    }

    fn limits(&self) -> BlockLimits {
        self.child.limits()
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, buf: IoBuf) -> IoFuture<'a, IoBuf> {
        Box::pin(self.child.pread(offset, buf))
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(async move {
            if self.gate.hold_len.get() == Some(buf.len()) && offset.is_multiple_of(65536) {
                self.gate.held.set(self.gate.held.get() + 1);
                loop {
                    match self.gate.release.get() {
                        None => {
                            self.child
                                .context()
                                .sleep(std::time::Duration::from_millis(1))
                                .await
                        }
                        Some(Release::Pass) => break,
                        Some(Release::Fail) => {
                            return Err(Error::io(
                                "x-gate",
                                format!("write at offset {offset}"),
                                std::io::Error::from_raw_os_error(libc::EIO),
                            ))
                        }
                    }
                }
            }
            self.child.pwrite(offset, buf, flags).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.child.pwrite_zeroes(offset, len, flags))
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(self.child.pdiscard(offset, len))
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> IoFuture<'a, ()> {
        Box::pin(self.child.flush())
    }

    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        Box::pin(self.child.block_status(offset, len))
    }

    fn truncate<'a>(
        &'a self,
        _node: &'a Node,
        size: u64,
        exact: bool,
        prealloc: Prealloc,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.child.truncate(size, exact, prealloc))
    }

    fn child_perm(
        &self,
        _role: ChildRole,
        perm: Perm,
        shared: Perm,
        _writable: bool,
    ) -> (Perm, Perm) {
        (perm, shared)
    }
}
