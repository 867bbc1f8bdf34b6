//! The `null-co` driver: a device of a given size that stores nothing.
//!
//! Reads return zeros with `read-zeroes=on`, and otherwise leave the buffer
//! as it is (QEMU does the same: the point is to measure the block layer
//! without a device). `latency-ns` delays every request on the loop's timer.

use std::rc::Rc;
use std::time::Duration;

use block_core::{
    AioContext, BlockDriver, BlockStatus, IoBuf, IoFuture, Node, OpenArgs, Opened, WriteFlags,
};

/// The null device.
pub struct NullDriver {
    size: u64,
    read_zeroes: bool,
    latency: Option<Duration>,
    ctx: Rc<AioContext>,
}

/// Default size: QEMU's 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Opens `null-co`.
pub fn open(args: OpenArgs<'_>) -> IoFuture<'_, Opened> {
    Box::pin(async move {
        let OpenArgs {
            graph, mut opts, ..
        } = args;
        let size = opts.take_u64("size")?.unwrap_or(DEFAULT_SIZE);
        let read_zeroes = opts.take_bool("read-zeroes")?.unwrap_or(false);
        let latency = opts
            .take_u64("latency-ns")?
            .filter(|&n| n > 0)
            .map(Duration::from_nanos);
        opts.finish("null-co")?;
        Ok(Opened {
            driver: Box::new(NullDriver {
                size,
                read_zeroes,
                latency,
                ctx: Rc::clone(graph.context()),
            }),
            children: Vec::new(),
        })
    })
}

impl NullDriver {
    async fn delay(&self) {
        if let Some(d) = self.latency {
            self.ctx.sleep(d).await;
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        "null-co"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn filename(&self) -> Option<String> {
        Some("null-co://".to_owned())
    }

    fn read<'a>(&'a self, _node: &'a Node, _offset: u64, mut buf: IoBuf) -> IoFuture<'a, IoBuf> {
        Box::pin(async move {
            self.delay().await;
            if self.read_zeroes {
                buf.fill(0);
            }
            Ok(buf)
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        buf: IoBuf,
        _flags: WriteFlags,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(async move {
            self.delay().await;
            Ok(buf)
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _len: u64,
        _flags: WriteFlags,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        let _ = offset;
        let zero = self.read_zeroes;
        Box::pin(async move {
            Ok(BlockStatus {
                len,
                data: !zero,
                zero,
                allocated: true,
                offset: None,
                file_node: None,
            })
        })
    }
}
