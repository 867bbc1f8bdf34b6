//! Criterion micro-benchmarks of the request path's hot pieces: IoBuf
//! split/unsplit, zero detection, and a 4 KiB read and write through the
//! whole request path (BlockBackend -> raw -> null-co) on one event loop.

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::rc::Rc;

use block_core::buf::is_zero;
use block_core::{
    AioMode, BlockBackend, EventBus, EventLoop, Graph, IoBuf, Options, Perm, WriteFlags,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn iobuf(c: &mut Criterion) {
    let mut g = c.benchmark_group("iobuf");
    g.bench_function("split_unsplit_64k_in_16", |b| {
        let mut buf = Some(IoBuf::zeroed(64 << 10));
        b.iter(|| {
            let mut rest = buf.take().expect("buffer");
            let mut parts = Vec::with_capacity(16);
            for _ in 0..15 {
                parts.push(rest.split_to(4096));
            }
            parts.push(rest);
            let mut it = parts.into_iter();
            let mut whole = it.next().expect("head");
            for p in it {
                whole.unsplit(p);
            }
            buf = Some(black_box(whole));
        })
    });
    g.bench_function("alloc_4k", |b| b.iter(|| black_box(IoBuf::zeroed(4096))));
    g.finish();
}

fn zero(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero");
    for size in [4096usize, 64 << 10] {
        let zeros = vec![0u8; size];
        let mut late = vec![0u8; size];
        late[size - 1] = 1;
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("zeros_{size}"), |b| {
            b.iter(|| is_zero(black_box(&zeros)))
        });
        g.bench_function(format!("nonzero_last_{size}"), |b| {
            b.iter(|| is_zero(black_box(&late)))
        });
    }
    g.finish();
}

fn request_path(c: &mut Criterion) {
    let el = EventLoop::new(AioMode::Auto).expect("event loop");
    let ctx = Rc::clone(el.context());
    let graph = Graph::new(Rc::clone(&ctx), formats::registry(), EventBus::new());
    let opts = Options::new()
        .with("driver", "raw")
        .with("file.driver", "null-co")
        .with("file.size", 1u64 << 30);
    let node = ctx.block_on(graph.open(opts)).expect("open null-co");
    let blk = BlockBackend::new(
        "bench",
        &node,
        Perm::CONSISTENT_READ.union(Perm::WRITE),
        Perm::ALL,
    )
    .expect("backend");
    let mut g = c.benchmark_group("request_path");
    g.throughput(Throughput::Elements(1));
    let mut buf = Some(IoBuf::zeroed(4096));
    let mut off = 0u64;
    g.bench_function("raw_null_read_4k", |b| {
        b.iter(|| {
            let b0 = buf.take().expect("buffer");
            let r = ctx.block_on(blk.pread(off, b0)).expect("read");
            off = (off + 4096) % (1 << 30);
            buf = Some(r);
        })
    });
    g.bench_function("raw_null_write_4k", |b| {
        b.iter(|| {
            let b0 = buf.take().expect("buffer");
            let r = ctx
                .block_on(blk.pwrite(off, b0, WriteFlags::default()))
                .expect("write");
            off = (off + 4096) % (1 << 30);
            buf = Some(r);
        })
    });
    g.bench_function("raw_null_read_4k_x32_concurrent", |b| {
        b.iter(|| {
            ctx.block_on(async {
                let mut hs = Vec::with_capacity(32);
                for i in 0..32u64 {
                    let blk = Rc::clone(&blk);
                    hs.push(ctx.spawn(async move {
                        blk.pread(i * 4096, IoBuf::zeroed(4096)).await.map(|_| ())
                    }));
                }
                for h in hs {
                    h.await.expect("read");
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, iobuf, zero, request_path);
criterion_main!(benches);
