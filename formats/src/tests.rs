//! Driver tests run on both engines: every test body runs once on io_uring
//! and once on the thread pool.

use std::rc::Rc;

use block_core::{
    AioMode, BlockBackend, ErrorKind, EventBus, EventLoop, Graph, IoBuf, Options, Perm, WriteFlags,
};

fn scratch(name: &str, size: u64) -> (tempdir::Dir, String) {
    let d = tempdir::Dir::new(name);
    let p = d.path.join("img").to_string_lossy().into_owned();
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    (d, p)
}

/// A tiny self-cleaning scratch directory (no extra crate needed).
mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(name: &str) -> Self {
            let base = std::env::var_os("STRATA_TEST_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            let path = base.join(format!(
                "strata-{}-{}-{:?}",
                name,
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub(crate) fn on_engines(f: impl Fn(&Rc<Graph>, AioMode)) {
    for mode in [AioMode::IoUring, AioMode::Threads] {
        let el = EventLoop::new(mode).expect("event loop");
        let g = Rc::new(Graph::new(
            Rc::clone(el.context()),
            crate::registry(),
            EventBus::new(),
        ));
        f(&g, mode);
        drop(g);
        drop(el);
    }
}

pub(crate) fn run<T>(g: &Rc<Graph>, fut: impl std::future::Future<Output = T>) -> T {
    Rc::clone(g.context()).block_on(fut)
}

fn raw_opts(path: &str, direct: bool) -> Options {
    Options::new()
        .with("driver", "raw")
        .with("file.driver", "file")
        .with("file.filename", path)
        .with("cache.direct", direct)
}

fn pattern(len: usize, seed: u8) -> IoBuf {
    let mut b = IoBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_add((i % 251) as u8);
    }
    b
}

#[test]
fn raw_roundtrip_aligned_and_unaligned() {
    on_engines(|g, mode| {
        for direct in [false, true] {
            let (_d, path) = scratch(&format!("rt-{mode:?}-{direct}"), 1 << 20);
            run(g, async {
                let node = g.open(raw_opts(&path, direct)).await.unwrap();
                let blk =
                    BlockBackend::new("", &node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
                        .unwrap();
                for (off, len) in [
                    (0u64, 4096usize),
                    (4096 * 3, 65536),
                    (1, 10),
                    (4095, 2),
                    (5000, 9000),
                ] {
                    let data = pattern(len, off as u8);
                    blk.pwrite(off, IoBuf::from_slice(&data), WriteFlags::default())
                        .await
                        .unwrap();
                    let back = blk.pread(off, IoBuf::zeroed(len)).await.unwrap();
                    assert_eq!(
                        &back[..],
                        &data[..],
                        "{mode:?} direct={direct} off={off} len={len}"
                    );
                }
                blk.flush().await.unwrap();
                drop(blk);
                g.delete(node.name()).await.unwrap();
            });
            // What we wrote is in the file.
            let f = std::fs::read(&path).unwrap();
            assert_eq!(&f[1..11], &pattern(10, 1)[..]);
        }
    });
}

#[test]
fn concurrent_unaligned_writes_to_one_block_are_serialised() {
    on_engines(|g, mode| {
        let (_d, path) = scratch(&format!("rmw-{mode:?}"), 1 << 16);
        run(g, async {
            let node = g.open(raw_opts(&path, true)).await.unwrap();
            let blk = BlockBackend::new("", &node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
                .unwrap();
            // 64 writers each own 64 bytes of the same 4 KiB block: without
            // serialisation their read-modify-writes would undo each other.
            let ctx = Rc::clone(g.context());
            let mut handles = Vec::new();
            for i in 0..64u64 {
                let blk = Rc::clone(&blk);
                handles.push(ctx.spawn(async move {
                    let data = IoBuf::filled(64, i as u8 + 1);
                    blk.pwrite(i * 64, data, WriteFlags::default())
                        .await
                        .unwrap();
                }));
            }
            for h in handles {
                h.await;
            }
            let back = blk.pread(0, IoBuf::zeroed(4096)).await.unwrap();
            for i in 0..64usize {
                assert!(
                    back[i * 64..(i + 1) * 64].iter().all(|&b| b == i as u8 + 1),
                    "{mode:?} slice {i}"
                );
            }
        });
    });
}

#[test]
fn out_of_range_and_empty_requests() {
    on_engines(|g, _| {
        let (_d, path) = scratch("oor", 8192);
        run(g, async {
            let node = g.open(raw_opts(&path, false)).await.unwrap();
            let blk = BlockBackend::new("", &node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
                .unwrap();
            let e = blk.pread(8000, IoBuf::zeroed(4096)).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            let e = blk
                .pwrite(u64::MAX - 10, IoBuf::zeroed(20), WriteFlags::default())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert_eq!(blk.pread(8192, IoBuf::zeroed(0)).await.unwrap().len(), 0);
            let e = node.pread(0, IoBuf::zeroed(0)).await;
            assert!(e.is_ok());
            assert_eq!(blk.acct().stats(block_core::stats::IoKind::Read).invalid, 1);
        });
    });
}

#[test]
fn open_errors_are_clear() {
    on_engines(|g, _| {
        run(g, async {
            let e = g
                .open(raw_opts("/nonexistent/strata/img", false))
                .await
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "Could not open '/nonexistent/strata/img': No such file or directory (os error 2)"
            );
            let e = g.open(raw_opts("/tmp", false)).await.unwrap_err();
            assert!(e.to_string().contains("Is a directory"), "{e}");
            let e = g
                .open(
                    Options::new()
                        .with("driver", "nosuch")
                        .with("filename", "x"),
                )
                .await
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "Parameter 'driver' does not accept value 'nosuch'"
            );
            let e = g
                .open(
                    Options::new()
                        .with("driver", "file")
                        .with("filename", "/tmp/x")
                        .with("bogus", "1"),
                )
                .await
                .unwrap_err();
            assert!(e.to_string().contains("'bogus'"), "{e}");
            let e = g
                .open(
                    Options::new()
                        .with("driver", "null-co")
                        .with("node-name", "1bad"),
                )
                .await
                .unwrap_err();
            assert!(e.to_string().contains("Invalid node-name"), "{e}");
        });
    });
}

#[test]
fn second_writer_is_refused_by_image_locks() {
    on_engines(|g, _| {
        let (_d, path) = scratch("lock", 1 << 16);
        run(g, async {
            // Two nodes on one file are two open file descriptions: the
            // same situation as two processes.
            let a = g.open(raw_opts(&path, false)).await.unwrap();
            let _wa = BlockBackend::new(
                "a",
                &a,
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            )
            .unwrap();
            let b = g.open(raw_opts(&path, false)).await.unwrap();
            let e = BlockBackend::new("b", &b, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
                .err()
                .expect("refused");
            assert_eq!(e.kind(), ErrorKind::PermissionConflict);
            assert!(
                e.to_string().starts_with("Failed to get \"write\" lock"),
                "{e}"
            );
            // Read-only sharing users are fine.
            let _rb = BlockBackend::new("b", &b, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        });
    });
}

#[test]
fn graph_permission_conflict_names_the_user() {
    on_engines(|g, _| {
        run(g, async {
            let n = g
                .open(
                    Options::new()
                        .with("driver", "null-co")
                        .with("node-name", "n0"),
                )
                .await
                .unwrap();
            let _a = BlockBackend::new(
                "disk0",
                &n,
                Perm::CONSISTENT_READ | Perm::WRITE,
                Perm::CONSISTENT_READ,
            )
            .unwrap();
            let e = BlockBackend::new("disk1", &n, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
                .err()
                .expect("conflict");
            assert_eq!(
                e.to_string(),
                "Conflicts with use by block device 'disk0' as 'root', which does not allow 'write' on n0"
            );
            let e = g.delete("n0").await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Busy);
        });
    });
}

#[test]
fn null_co_latency_and_read_zeroes() {
    on_engines(|g, _| {
        run(g, async {
            let n = g
                .open(
                    Options::new()
                        .with("driver", "null-co")
                        .with("read-zeroes", true)
                        .with("latency-ns", 2_000_000u64),
                )
                .await
                .unwrap();
            assert_eq!(n.size(), 1 << 30);
            let t = std::time::Instant::now();
            let b = n.pread(0, IoBuf::filled(512, 7)).await.unwrap();
            assert!(t.elapsed() >= std::time::Duration::from_millis(2));
            assert!(b.iter().all(|&x| x == 0));
        });
    });
}

#[test]
fn write_zeroes_discard_and_detect_zeroes() {
    on_engines(|g, mode| {
        let (_d, path) = scratch(&format!("wz-{mode:?}"), 1 << 20);
        run(g, async {
            let n = g
                .open(
                    raw_opts(&path, false)
                        .with("discard", "unmap")
                        .with("detect-zeroes", "unmap"),
                )
                .await
                .unwrap();
            let blk =
                BlockBackend::new("", &n, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL).unwrap();
            blk.pwrite(0, IoBuf::filled(1 << 20, 0xaa), WriteFlags::default())
                .await
                .unwrap();
            blk.pwrite_zeroes(100, 70000, WriteFlags::default())
                .await
                .unwrap();
            let b = blk.pread(0, IoBuf::zeroed(80000)).await.unwrap();
            assert!(b[..100].iter().all(|&x| x == 0xaa));
            assert!(b[100..70100].iter().all(|&x| x == 0));
            assert!(b[70100..].iter().all(|&x| x == 0xaa));
            // An all-zero write becomes a hole with detect-zeroes=unmap.
            blk.pwrite(1 << 19, IoBuf::zeroed(1 << 18), WriteFlags::default())
                .await
                .unwrap();
            let st = blk.block_status(1 << 19, 1 << 18).await.unwrap();
            assert!(st.zero && !st.data, "{st:?}");
            blk.pdiscard(0, 65536).await.unwrap();
            let st = blk.block_status(0, 65536).await.unwrap();
            assert!(!st.data, "{st:?}");
        });
    });
}

#[test]
fn loop_handle_from_another_thread() {
    let handle = EventLoop::spawn_thread("test-loop", AioMode::Auto).unwrap();
    let (_d, path) = scratch("xthread", 1 << 20);
    let p = path.clone();
    let r = std::thread::spawn(move || {
        handle
            .submit(move |ctx| async move {
                let g = Graph::new(ctx, crate::registry(), EventBus::new());
                let n = g.open(raw_opts(&p, false)).await?;
                n.pwrite(4096, IoBuf::filled(4096, 9), WriteFlags::default())
                    .await?;
                let b = n.pread(4096, IoBuf::zeroed(4096)).await?;
                n.flush().await?;
                Ok::<_, block_core::Error>(b[..].to_vec())
            })
            .wait()
            .and_then(|r| r)
            .inspect(|_| handle.stop())
    })
    .join()
    .unwrap()
    .unwrap();
    assert!(r.iter().all(|&x| x == 9));
}

/// Regression: a failed open must not leave its inline children behind,
/// and deleting a node takes its named inline children with it (QEMU).
#[test]
fn inline_children_belong_to_their_parent() {
    let (_d, p) = scratch("inline", 1 << 20);
    on_engines(|g, _| {
        // `offset` past the end makes raw fail after `file` was opened.
        let bad = raw_opts(&p, false)
            .with("file.node-name", "f0")
            .with("offset", 2u64 << 20);
        assert!(run(g, g.open(bad)).is_err());
        assert!(
            g.node("f0").is_none(),
            "half-opened child left in the graph"
        );
        assert!(g.nodes().is_empty());

        let good = raw_opts(&p, false)
            .with("node-name", "r0")
            .with("file.node-name", "f1");
        run(g, g.open(good)).unwrap();
        assert!(g.node("f1").is_some());
        run(g, g.delete("r0")).unwrap();
        assert!(g.node("f1").is_none(), "inline child outlived its parent");

        // A child added on its own stays when its parent goes.
        let f = Options::new()
            .with("driver", "file")
            .with("filename", p.as_str())
            .with("node-name", "f2");
        run(g, g.open(f)).unwrap();
        let r = Options::new()
            .with("driver", "raw")
            .with("node-name", "r1")
            .with("file", "f2");
        run(g, g.open(r)).unwrap();
        run(g, g.delete("r1")).unwrap();
        assert!(g.node("f2").is_some());
        run(g, g.delete("f2")).unwrap();
    });
}

/// Inline children take their parent's read-only and cache settings and
/// default to discard=unmap, but not its detect-zeroes (QEMU's
/// bdrv_inherited_options): zero detection happens once, at the top.
#[test]
fn inline_children_inherit_cache_but_not_detect_zeroes() {
    let (_d, p) = scratch("inherit", 1 << 20);
    on_engines(|g, _| {
        let opts = raw_opts(&p, true)
            .with("node-name", "r0")
            .with("file.node-name", "f0")
            .with("detect-zeroes", "on");
        run(g, g.open(opts)).unwrap();
        let (r, f) = (g.node("r0").unwrap(), g.node("f0").unwrap());
        assert_eq!(r.flags().detect_zeroes, block_core::DetectZeroes::On);
        assert_eq!(f.flags().detect_zeroes, block_core::DetectZeroes::Off);
        assert!(f.flags().cache_direct, "cache.direct is inherited");
        assert!(f.flags().discard_unmap, "children default to discard=unmap");
        run(g, g.delete("r0")).unwrap();
    });
}

/// Writes, write-zeroes (aligned and not) and discards mark a node's
/// recording bitmaps, also when the write fails; disabled bitmaps and
/// other nodes stay clean; a resize follows the node.
#[test]
fn dirty_bitmaps_record_every_kind_of_write() {
    use block_core::{DirtyBitmap, Prealloc};
    on_engines(|g, mode| {
        let (_d, path) = scratch(&format!("dirty-{mode:?}"), 1 << 20);
        run(g, async {
            let n = g
                .open(raw_opts(&path, false).with("discard", "unmap"))
                .await
                .unwrap();
            let file = n.storage_child().unwrap();
            let on = Rc::new(DirtyBitmap::new("on", 1 << 20, 65536, true));
            let off = Rc::new(DirtyBitmap::new("off", 1 << 20, 65536, false));
            let below = Rc::new(DirtyBitmap::new("below", 1 << 20, 65536, true));
            n.add_dirty_bitmap(Rc::clone(&on)).unwrap();
            n.add_dirty_bitmap(Rc::clone(&off)).unwrap();
            assert!(n
                .add_dirty_bitmap(Rc::new(DirtyBitmap::new("on", 1 << 20, 512, true)))
                .is_err());
            file.add_dirty_bitmap(Rc::clone(&below)).unwrap();
            let names: Vec<_> = n
                .dirty_bitmaps()
                .iter()
                .map(|b| b.name().to_owned())
                .collect();
            assert_eq!(names, ["off", "on"], "newest first");
            let blk = BlockBackend::new(
                "",
                &n,
                Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
                Perm::ALL,
            )
            .unwrap();
            blk.pwrite(100, IoBuf::filled(10, 1), WriteFlags::default())
                .await
                .unwrap();
            blk.pwrite_zeroes(3 * 65536 + 5, 65536, WriteFlags::default())
                .await
                .unwrap();
            blk.pdiscard(8 * 65536, 65536).await.unwrap();
            let dirty: Vec<u64> = (0..16u64).filter(|i| on.is_dirty(i * 65536)).collect();
            assert_eq!(dirty, [0, 3, 4, 8], "{mode:?}");
            assert_eq!(off.count(), 0);
            // The layer below sees the same (host) offsets through raw.
            assert_eq!(below.count(), 4 * 65536);
            // A write past the end fails, and marks nothing that exists.
            assert!(blk
                .pwrite(1 << 20, IoBuf::filled(512, 1), WriteFlags::default())
                .await
                .is_err());
            assert_eq!(on.count(), 4 * 65536);
            blk.truncate(2 << 20, false, Prealloc::Off).await.unwrap();
            assert_eq!(on.size(), 2 << 20);
            blk.pwrite(2 << 20 >> 1, IoBuf::filled(512, 1), WriteFlags::default())
                .await
                .unwrap();
            assert_eq!(on.count(), 5 * 65536);
            assert!(n.remove_dirty_bitmap("on").is_some());
            assert!(n.dirty_bitmap("on").is_none());
            blk.detach();
        });
    });
}
