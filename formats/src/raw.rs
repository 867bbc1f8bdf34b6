//! The `raw` format driver: a window (`offset`, `size`) onto its child.
//!
//! Raw has no metadata, so it passes requests through to its `file` child
//! shifted by `offset`, and takes the child permissions of a filter (QEMU
//! treats raw's child as both data and metadata-free storage).

use std::rc::Rc;

use block_core::{
    BlockDriver, BlockLimits, BlockStatus, ChildRole, Error, IoBuf, IoFuture, Node, OpenArgs,
    Opened, Perm, Prealloc, WriteFlags,
};

/// A raw window onto the `file` child.
pub struct RawDriver {
    offset: u64,
    /// Explicit size, or `None` to follow the child's size.
    size: Option<u64>,
    child: Rc<Node>,
}

/// Opens the `raw` driver.
pub fn open(args: OpenArgs<'_>) -> IoFuture<'_, Opened> {
    Box::pin(async move {
        let OpenArgs {
            graph,
            mut opts,
            flags,
            ..
        } = args;
        let offset = opts.take_u64("offset")?.unwrap_or(0);
        let size = opts.take_u64("size")?;
        let child = graph
            .open_child(&mut opts, "file", flags)
            .await?
            .ok_or_else(|| Error::invalid("A block device must be specified for \"file\""))?;
        opts.finish("raw")?;
        let csize = child.size();
        if offset > csize {
            return Err(Error::invalid(
                "The sum of offset (".to_owned()
                    + &offset.to_string()
                    + ") and size (0) has to be smaller or equal to the  actual size of the containing file ("
                    + &csize.to_string()
                    + ")",
            ));
        }
        if let Some(s) = size {
            if offset.checked_add(s).is_none_or(|e| e > csize) {
                return Err(Error::invalid(format!(
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({csize})"
                )));
            }
        }
        Ok(Opened {
            driver: Box::new(RawDriver {
                offset,
                size,
                child: Rc::clone(&child),
            }),
            children: vec![("file".to_owned(), ChildRole::Primary, child)],
        })
    })
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.child.size().saturating_sub(self.offset))
    }

    fn limits(&self) -> BlockLimits {
        self.child.limits()
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, buf: IoBuf) -> IoFuture<'a, IoBuf> {
        Box::pin(self.child.pread(self.offset + offset, buf))
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(self.child.pwrite(self.offset + offset, buf, flags))
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> IoFuture<'a, ()> {
        Box::pin(self.child.pwrite_zeroes(self.offset + offset, len, flags))
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(self.child.pdiscard(self.offset + offset, len))
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
        Box::pin(async move {
            let mut st = self.child.block_status(self.offset + offset, len).await?;
            st.allocated = true;
            Ok(st)
        })
    }

    fn truncate<'a>(
        &'a self,
        _node: &'a Node,
        size: u64,
        exact: bool,
        prealloc: Prealloc,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.size.is_some() || self.offset != 0 {
                return Err(Error::invalid(
                    "Cannot resize raw nodes with an explicit 'offset' or 'size'",
                ));
            }
            self.child.truncate(size, exact, prealloc).await
        })
    }

    fn child_perm(
        &self,
        _role: ChildRole,
        perm: Perm,
        shared: Perm,
        _writable: bool,
    ) -> (Perm, Perm) {
        // A filter's rules: pass the parents' needs through unchanged.
        (perm, shared)
    }
}
