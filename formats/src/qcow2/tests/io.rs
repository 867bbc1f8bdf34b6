//! Guest I/O against QEMU: reads of QEMU-written images, Strata writes
//! checked by QEMU, differential runs, backing chains, compression,
//! growth, concurrency, lost caches.

use super::*;
use std::cell::Cell;

use crate::qcow2::Qcow2;

#[test]
fn reads_images_written_by_qemu() {
    let configs: &[&str] = &[
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=65536",
        "cluster_size=65536,refcount_bits=64",
        "cluster_size=2M",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=16384,extended_l2=on,refcount_bits=8",
        "compat=0.10",
        "compat=0.10,cluster_size=1024",
        "cluster_size=4096,lazy_refcounts=on",
    ];
    let d = Dir::new("qemu-reads");
    for cfg in configs {
        let img = d.file("a.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", cfg, &img, "16M"]);
        let cs = if let Some(p) = cfg.split(',').find_map(|x| x.strip_prefix("cluster_size=")) {
            block_core::options::parse_size(p).unwrap()
        } else {
            65536
        };
        qemu_fill(&img, cs);
        let want = raw_of(&img, &d);
        on_engines(|g, mode| {
            run(g, async {
                let n = open(g, &img, true).await;
                let got = read_all(&n).await;
                assert!(got == want, "{cfg} {mode:?}: content differs");
                // Unaligned reads across cluster boundaries.
                let o = ((2 * cs).min(1 << 20) - 700) as usize;
                let b = n.pread(o as u64, IoBuf::zeroed(2000)).await.unwrap();
                assert_eq!(&b[..], &want[o..o + 2000], "{cfg}");
                close(g, n).await;
            });
        });
    }
}

/// A deterministic xorshift generator (no extra crates).
#[test]
fn strata_writes_pass_qemu_check_and_read_back() {
    let configs: &[(&str, u64)] = &[
        ("cluster_size=65536", 65536),
        ("cluster_size=512", 512),
        ("cluster_size=4096,refcount_bits=1", 4096),
        ("cluster_size=4096,refcount_bits=64", 4096),
        ("cluster_size=65536,extended_l2=on", 65536),
        ("compat=0.10,cluster_size=4096", 4096),
    ];
    let d = Dir::new("strata-writes");
    for (i, (cfg, cs)) in configs.iter().enumerate() {
        on_engines(|g, mode| {
            let img = d.file("w.qcow2");
            let size = 8u64 << 20;
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                cfg,
                &img,
                &size.to_string(),
            ]);
            let ops = random_ops(0x1234 + i as u64, size, *cs, 150, false);
            let mut model = vec![0u8; size as usize];
            run(g, async {
                let n = open(g, &img, false).await;
                for op in &ops {
                    apply(&n, op).await;
                    model_apply(&mut model, op);
                }
                let got = read_all(&n).await;
                assert!(
                    got == model,
                    "{cfg} {mode:?}: Strata reads back something else"
                );
                close(g, n).await;
            });
            check_clean(&img);
            let raw = d.file("model.raw");
            std::fs::write(&raw, &model).unwrap();
            let (ok, text) = tool(
                "qemu-img",
                &["compare", "-f", "raw", "-F", "qcow2", &raw, &img],
            );
            assert!(ok, "{cfg} {mode:?}: qemu-img compare: {text}");
            std::fs::remove_file(&img).unwrap();
        });
    }
}

#[test]
fn differential_random_ops_against_qemu_io() {
    let d = Dir::new("diff");
    let base = d.file("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "4M"]);
    qemu_fill(&base, 65536);
    // (seed, creation options, cluster size, image size, compressed
    // writes too): cluster sizes from 512 B to 2 MiB, every kind of
    // refcount width, extended L2, version 2, a backing file, an external
    // data file.
    let cases: &[(u64, &str, u64, u64, bool)] = &[
        (7, "cluster_size=65536", 65536, 4 << 20, true),
        (17, "cluster_size=65536", 65536, 4 << 20, true),
        (8, "cluster_size=4096,refcount_bits=8", 4096, 4 << 20, true),
        (9, "cluster_size=32768,extended_l2=on", 32768, 4 << 20, true),
        (10, "cluster_size=512,refcount_bits=1", 512, 1 << 20, true),
        (11, "cluster_size=2097152", 2 << 20, 16 << 20, true),
        (
            12,
            "cluster_size=16384,refcount_bits=64",
            16384,
            4 << 20,
            true,
        ),
        (13, "compat=0.10,cluster_size=8192", 8192, 4 << 20, true),
        (
            14,
            "cluster_size=65536,lazy_refcounts=on",
            65536,
            4 << 20,
            true,
        ),
        (15, "BACKING,cluster_size=65536", 65536, 4 << 20, true),
        (
            16,
            "BACKING,cluster_size=16384,extended_l2=on",
            16384,
            4 << 20,
            false,
        ),
        (18, "DATA,cluster_size=65536", 65536, 4 << 20, false),
    ];
    for &(seed, cfg, cs, size, compress) in cases {
        let ops = random_ops_with(seed, size, cs, 120, true, compress);
        let a = d.file("qemu.qcow2");
        let b = d.file("strata.qcow2");
        let create = |p: &str| {
            let _ = std::fs::remove_file(p);
            let mut o = cfg.to_owned();
            if let Some(rest) = o.strip_prefix("BACKING,") {
                o = format!("backing_file={base},backing_fmt=qcow2,{rest}");
            }
            if let Some(rest) = o.strip_prefix("DATA,") {
                let data = format!("{p}.data");
                let _ = std::fs::remove_file(&data);
                o = format!("data_file={data},{rest}");
            }
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &o,
                p,
                &size.to_string(),
            ]);
        };
        create(&a);
        // qemu-io fails some compressed writes that follow other writes in
        // the same process (EIO) although they succeed in a process of
        // their own: each runs alone.
        let mut batch: Vec<String> = Vec::new();
        for op in &ops {
            let solo = matches!(op, Op::Compressed(..));
            if solo || batch.len() == 40 {
                if !batch.is_empty() {
                    qemu_io(&a, &batch);
                }
                batch.clear();
            }
            if solo {
                qemu_io(&a, &[qemu_cmd(op)]);
            } else {
                batch.push(qemu_cmd(op));
            }
        }
        if !batch.is_empty() {
            qemu_io(&a, &batch);
        }
        check_clean(&a);
        on_engines(|g, mode| {
            create(&b);
            run(g, async {
                let n = g.open(q2_opts(&b).with("discard", "unmap")).await.unwrap();
                for op in &ops {
                    apply(&n, op).await;
                }
                close(g, n).await;
            });
            check_clean(&b);
            let (ok, text) = tool("qemu-img", &["compare", &a, &b]);
            assert!(ok, "{cfg} seed {seed} {mode:?}: qemu-img compare: {text}");
        });
    }
}

#[test]
fn backing_chain_cow_and_relative_names() {
    let d = Dir::new("backing");
    let base = d.file("base.qcow2");
    let top = d.file("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &base,
        "2M",
    ]);
    qemu_io(&base, &["write -P 0xaa 0 2M".into()]);
    on_engines(|g, mode| {
        // Relative backing name, resolved against the overlay's directory.
        let _ = std::fs::remove_file(&top);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &top,
            "3M",
        ]);
        run(g, async {
            let n = open(g, &top, false).await;
            assert!(n.backing().is_some());
            // Partial-cluster writes: head and tail copied from the backing file.
            n.pwrite(70000, IoBuf::filled(100, 0x01), WriteFlags::default())
                .await
                .unwrap();
            n.pwrite_zeroes(196608, 65536, WriteFlags::default())
                .await
                .unwrap();
            let all = read_all(&n).await;
            assert!(all[..70000].iter().all(|&x| x == 0xaa), "{mode:?}");
            assert!(all[70000..70100].iter().all(|&x| x == 1));
            assert!(all[70100..196608].iter().all(|&x| x == 0xaa));
            assert!(all[196608..262144].iter().all(|&x| x == 0));
            assert!(all[262144..2 << 20].iter().all(|&x| x == 0xaa));
            assert!(all[2 << 20..].iter().all(|&x| x == 0));
            close(g, n).await;
        });
        check_clean(&top);
        qemu_io(
            &top,
            &[
                "read -P 0xaa 0 70000".into(),
                "read -P 0x01 70000 100".into(),
                "read -P 0xaa 70100 126508".into(),
                "read -P 0 196608 65536".into(),
                "read -P 0 2097152 1048576".into(),
            ],
        );
        // backing=null disables the backing file.
        run(g, async {
            let n = g
                .open(
                    q2_opts(&top)
                        .with("read-only", true)
                        .with("backing", block_core::OptValue::Null),
                )
                .await
                .unwrap();
            let b = n.pread(0, IoBuf::filled(4096, 9)).await.unwrap();
            assert!(b.iter().all(|&x| x == 0));
            close(g, n).await;
        });
    });
}

#[test]
fn compressed_clusters_read() {
    let d = Dir::new("compressed");
    let src = d.file("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &src, "4M"]);
    qemu_io(
        &src,
        &[
            "write -P 0x61 0 1M".into(),
            "write -P 0x62 1536k 700k".into(),
        ],
    );
    for ct in ["zlib", "zstd"] {
        let img = d.file(&format!("c-{ct}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            &src,
            &img,
        ]);
        let want = raw_of(&img, &d);
        on_engines(|g, mode| {
            run(g, async {
                let n = open(g, &img, true).await;
                let got = read_all(&n).await;
                assert!(got == want, "{ct} {mode:?}");
                close(g, n).await;
            });
            // Overwriting part of a compressed cluster copies the rest.
            let w = d.file("cw.qcow2");
            std::fs::copy(&img, &w).unwrap();
            run(g, async {
                let n = open(g, &w, false).await;
                n.pwrite(1000, IoBuf::filled(10, 0x7f), WriteFlags::default())
                    .await
                    .unwrap();
                close(g, n).await;
            });
            check_clean(&w);
            qemu_io(
                &w,
                &[
                    "read -P 0x61 0 1000".into(),
                    "read -P 0x7f 1000 10".into(),
                    "read -P 0x61 1010 1047566".into(),
                ],
            );
        });
    }
}

#[test]
fn refcount_table_grows_with_small_clusters() {
    let d = Dir::new("grow");
    on_engines(|g, mode| {
        let img = d.file("g.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            &img,
            "64M",
        ]);
        run(g, async {
            let n = open(g, &img, false).await;
            for i in 0..40u64 {
                n.pwrite(
                    i << 20,
                    IoBuf::filled(256 << 10, i as u8 + 1),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
            }
            close(g, n).await;
        });
        check_clean(&img);
        let cmds: Vec<String> = (0..40u64)
            .map(|i| format!("read -P {} {} {}", i + 1, i << 20, 256 << 10))
            .collect();
        qemu_io(&img, &cmds);
        let _ = mode;
    });
}

#[test]
fn resize_grows_l1() {
    let d = Dir::new("resize");
    on_engines(|g, _| {
        let img = d.file("r.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            &img,
            "1M",
        ]);
        run(g, async {
            let n = open(g, &img, false).await;
            n.truncate(64 << 20, false, block_core::Prealloc::Off)
                .await
                .unwrap();
            assert_eq!(n.size(), 64 << 20);
            n.pwrite(60 << 20, IoBuf::filled(4096, 5), WriteFlags::default())
                .await
                .unwrap();
            close(g, n).await;
        });
        check_clean(&img);
        qemu_io(&img, &["read -P 5 62914560 4096".into()]);
    });
}

#[test]
fn concurrent_allocating_writes_to_one_cluster() {
    let d = Dir::new("conc");
    on_engines(|g, mode| {
        let img = d.file("c.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
        run(g, async {
            let n = open(g, &img, false).await;
            let ctx = Rc::clone(g.context());
            let mut hs = Vec::new();
            for i in 0..64u64 {
                let n = Rc::clone(&n);
                hs.push(ctx.spawn(async move {
                    // 16 writers per cluster, 4 clusters.
                    let off = (i % 4) * 65536 + (i / 4) * 4096;
                    n.pwrite(off, IoBuf::filled(4096, i as u8 + 1), WriteFlags::default())
                        .await
                        .unwrap();
                    // A write that joined another's allocation completes
                    // only once the cluster is linked: it reads back.
                    let b = n.pread(off, IoBuf::zeroed(4096)).await.unwrap();
                    assert!(b.iter().all(|&x| x == i as u8 + 1), "read after write {i}");
                }));
            }
            for h in hs {
                h.await;
            }
            let all = read_all(&n).await;
            for i in 0..64u64 {
                let off = ((i % 4) * 65536 + (i / 4) * 4096) as usize;
                assert!(
                    all[off..off + 4096].iter().all(|&x| x == i as u8 + 1),
                    "{mode:?} {i}"
                );
            }
            close(g, n).await;
        });
        check_clean(&img);
    });
}

#[test]
fn external_data_file_reads_and_writes() {
    let d = Dir::new("datafile");
    on_engines(|g, mode| {
        for raw in ["off", "on"] {
            let img = d.file("x.qcow2");
            let data = d.file("x.data");
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_file(&data);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={data},data_file_raw={raw}"),
                &img,
                "4M",
            ]);
            qemu_io(&img, &["write -P 5 64k 128k".into()]);
            run(g, async {
                let n = open(g, &img, false).await;
                let b = n.pread(64 << 10, IoBuf::zeroed(128 << 10)).await.unwrap();
                assert!(b.iter().all(|&x| x == 5), "{mode:?} raw={raw}");
                n.pwrite(1000, IoBuf::filled(5000, 6), WriteFlags::default())
                    .await
                    .unwrap();
                n.pwrite(3 << 20, IoBuf::filled(65536, 7), WriteFlags::default())
                    .await
                    .unwrap();
                close(g, n).await;
            });
            check_clean(&img);
            qemu_io(
                &img,
                &[
                    "read -P 0 0 1000".into(),
                    "read -P 6 1000 5000".into(),
                    "read -P 5 64k 128k".into(),
                    "read -P 7 3M 64k".into(),
                ],
            );
            if raw == "on" {
                // The data file is a raw image of the guest disk.
                let f = std::fs::read(&data).unwrap();
                assert!(f[3 << 20..(3 << 20) + 65536].iter().all(|&x| x == 7));
            }
        }
    });
}

#[test]
fn lost_caches_leave_only_leaks_and_flushed_data() {
    let d = Dir::new("crash");
    for (i, cfg) in [
        "cluster_size=4096",
        "cluster_size=512,refcount_bits=2",
        "cluster_size=65536,extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let img = d.file("c.qcow2");
        let _ = std::fs::remove_file(&img);
        let size = 8u64 << 20;
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            cfg,
            &img,
            &size.to_string(),
        ]);
        let cs = if cfg.contains("512,") {
            512
        } else if cfg.contains("4096") {
            4096
        } else {
            65536
        };
        let half = size / 2;
        let first = random_ops(0x77 + i as u64, half, cs, 60, false);
        let second: Vec<Op> = random_ops(0x99 + i as u64, half, cs, 60, false)
            .into_iter()
            .map(|op| match op {
                Op::Write(o, l, p) => Op::Write(o + half, l, p),
                Op::Zero(o, l) => Op::Zero(o + half, l),
                Op::Discard(o, l) => Op::Discard(o + half, l),
                Op::Compressed(o, l, p) => Op::Compressed(o + half, l, p),
            })
            .collect();
        let mut model = vec![0u8; size as usize];
        {
            let el = EventLoop::new(AioMode::Threads).unwrap();
            let g = Rc::new(Graph::new(
                Rc::clone(el.context()),
                crate::registry(),
                EventBus::new(),
            ));
            run(&g, async {
                let n = open(&g, &img, false).await;
                for op in &first {
                    apply(&n, op).await;
                    model_apply(&mut model, op);
                }
                n.flush().await.unwrap();
                for op in &second {
                    apply(&n, op).await;
                }
                // No flush, no close: the metadata caches are lost.
            });
            drop(g);
            drop(el);
        }
        let json = qemu_check_json(&img);
        assert_eq!(json_field(&json, "corruptions"), 0, "{cfg}: {json}");
        assert_eq!(json_field(&json, "check-errors"), 0, "{cfg}: {json}");
        let raw = raw_of(&img, &d);
        assert!(
            raw[..half as usize] == model[..half as usize],
            "{cfg}: flushed data lost"
        );
    }
}

/// Rough throughput numbers (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn rough_throughput() {
    let d = Dir::new("perf");
    on_engines(|g, mode| {
        let img = d.file("p.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "1G"]);
        run(g, async {
            let n = open(g, &img, false).await;
            let t = std::time::Instant::now();
            let mut buf = IoBuf::filled(1 << 20, 1);
            for i in 0..256u64 {
                buf = n.pwrite(i << 20, buf, WriteFlags::default()).await.unwrap();
            }
            n.flush().await.unwrap();
            let alloc = t.elapsed();
            let t = std::time::Instant::now();
            for i in 0..256u64 {
                buf = n.pwrite(i << 20, buf, WriteFlags::default()).await.unwrap();
            }
            n.flush().await.unwrap();
            let inplace = t.elapsed();
            let t = std::time::Instant::now();
            for i in 0..256u64 {
                buf = n.pread(i << 20, buf).await.unwrap();
            }
            let read = t.elapsed();
            let ctx = Rc::clone(g.context());
            let t = std::time::Instant::now();
            let mut hs = Vec::new();
            for w in 0..16u64 {
                let n = Rc::clone(&n);
                hs.push(ctx.spawn(async move {
                    let mut r = Rng(w + 1);
                    for _ in 0..256 {
                        let off = (256 << 20) + (r.below(1 << 16) << 12);
                        n.pwrite(off, IoBuf::filled(4096, 2), WriteFlags::default())
                            .await
                            .unwrap();
                    }
                }));
            }
            for h in hs {
                h.await;
            }
            n.flush().await.unwrap();
            let rand = t.elapsed();
            eprintln!(
                "{mode:?}: 256 MiB allocating {:.0} MiB/s, in place {:.0} MiB/s, read {:.0} MiB/s; 4096 random 4k allocating writes (QD16) {:.0} IOPS",
                256.0 / alloc.as_secs_f64(),
                256.0 / inplace.as_secs_f64(),
                256.0 / read.as_secs_f64(),
                4096.0 / rand.as_secs_f64()
            );
            close(g, n).await;
        });
        check_clean(&img);
    });
}

/// Regression for the zero-fill shortcut: a host cluster freed and handed
/// out again keeps its old bytes, so a partial write there must still fill
/// the rest of the cluster with zeros.
#[test]
fn reused_host_cluster_is_zero_filled() {
    let d = Dir::new("reuse");
    on_engines(|g, mode| {
        let img = d.file("r.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
        run(g, async {
            // Freed clusters are not punched out of the file, so they keep
            // their bytes.
            let opts = q2_opts(&img)
                .with("discard", "unmap")
                .with("pass-discard-request", false);
            let n = g.open(opts).await.unwrap();
            n.pwrite(0, IoBuf::filled(65536, 0xaa), WriteFlags::default())
                .await
                .unwrap();
            n.flush().await.unwrap();
            n.pdiscard(0, 65536).await.unwrap();
            // Allocates again, on the cluster just freed.
            n.pwrite(1 << 20, IoBuf::filled(4096, 0xbb), WriteFlags::default())
                .await
                .unwrap();
            let r = n.pread(1 << 20, IoBuf::zeroed(65536)).await.unwrap();
            assert!(r[..4096].iter().all(|&b| b == 0xbb), "{mode:?}");
            assert!(
                r[4096..].iter().all(|&b| b == 0),
                "{mode:?}: old data leaked"
            );
            close(g, n).await;
        });
        check_clean(&img);
        let out = qemu_io(
            &img,
            &["read -P 0xbb 1M 4k".into(), "read -P 0 1052672 60k".into()],
        );
        assert!(!out.contains("fail"), "{out}");
    });
}

/// Allocating writes run their data I/O concurrently; snapshots, discards
/// and zero writes issued meanwhile wait for them, and the image stays
/// consistent, including copy-on-write from a backing file.
#[test]
fn allocating_writes_overlap_snapshots_and_discards() {
    let d = Dir::new("overlap");
    on_engines(|g, mode| {
        let base = d.file("base.qcow2");
        let img = d.file("top.qcow2");
        let _ = std::fs::remove_file(&base);
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "16M"]);
        qemu_io(&base, &["write -P 0x11 0 8M".into()]);
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &img,
        ]);
        run(g, async {
            let n = open(g, &img, false).await;
            let ctx = Rc::clone(g.context());
            let mut hs = Vec::new();
            for i in 0..96u64 {
                let n = Rc::clone(&n);
                // Three writers on each of 32 clusters, spread over both
                // halves (with and without backing data).
                let off = (i % 32) * 512 * 1024 + (i / 32) * 8192;
                hs.push(ctx.spawn(async move {
                    n.pwrite(
                        off,
                        IoBuf::filled(4096, (i % 200) as u8 + 1),
                        WriteFlags::default(),
                    )
                    .await
                    .unwrap();
                }));
            }
            let q = Qcow2::of(&n).expect("qcow2 node");
            q.create_snapshot("mid").await.unwrap();
            n.pdiscard(15 << 20, 1 << 20).await.unwrap();
            for h in hs {
                h.await;
            }
            let all = read_all(&n).await;
            for i in 0..96u64 {
                let off = ((i % 32) * 512 * 1024 + (i / 32) * 8192) as usize;
                let want = (i % 200) as u8 + 1;
                assert!(
                    all[off..off + 4096].iter().all(|&x| x == want),
                    "{mode:?} {i}"
                );
                // The rest of the cluster came from the backing file.
                let after = off + 4096;
                let expect_after = if after < 8 << 20 { 0x11 } else { 0 };
                if (i / 32) < 2 {
                    assert_eq!(all[after], expect_after, "{mode:?} {i} cow");
                }
            }
            close(g, n).await;
        });
        check_clean(&img);
        let out = qemu_img(&["snapshot", "-l", &img]);
        assert!(out.contains("mid"), "{out}");
    });
}

/// Allocating writes grow the file ahead in large steps; closing cuts it
/// back to the last cluster in use, so the image ends where QEMU's check
/// says it does and reads back through QEMU.
#[test]
fn room_made_ahead_is_given_back_on_close() {
    let d = Dir::new("room");
    on_engines(|g, mode| {
        let img = d.file("r.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "64M"]);
        let probe = d.file("probe");
        let zero_range = {
            let f = std::fs::File::create(&probe).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on a file we own.
            unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, 0, 4096) == 0 }
        };
        let mut model = vec![0u8; 64 << 20];
        run(g, async {
            let n = open(g, &img, false).await;
            for (i, off) in [0u64, 3 << 20, 9 << 20, 40 << 20].into_iter().enumerate() {
                let data = vec![0x40 + i as u8; 4096];
                n.pwrite(
                    off + 512 * 8,
                    IoBuf::from_slice(&data),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                model[(off + 4096) as usize..(off + 8192) as usize].copy_from_slice(&data);
            }
            let open_len = std::fs::metadata(&img).unwrap().len();
            if zero_range {
                assert!(
                    open_len >= 8 << 20,
                    "{mode:?}: no room made ahead ({open_len} bytes)"
                );
            }
            close(g, n).await;
        });
        check_clean(&img);
        let end = json_field(&qemu_check_json(&img), "image-end-offset");
        let len = std::fs::metadata(&img).unwrap().len();
        assert_eq!(len, end, "{mode:?}: file not cut back to the last cluster");
        assert_eq!(raw_of(&img, &d), model, "{mode:?}");
    });
}

/// A cluster freed by a discard is not handed out again before the L2
/// change that dropped it is on disk: otherwise new data lands in it while
/// the L2 entry on disk still points there, and a crash in that window
/// leaves the discarded guest cluster reading another one's data (or, for
/// a compressed cluster, failing to decompress).
#[test]
fn freed_clusters_wait_for_the_l2_flush_before_reuse() {
    let d = Dir::new("reuse");
    on_engines(|g, mode| {
        let img = d.file("r.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
        run(g, async {
            let n = g
                .open(q2_opts(&img).with("discard", "unmap"))
                .await
                .unwrap();
            let q = crate::qcow2::Qcow2::of(&n).unwrap();
            n.pwrite(0, IoBuf::filled(65536, 0xaa), WriteFlags::default())
                .await
                .unwrap();
            n.flush().await.unwrap();
            let h = q.l2_entry(0).await.unwrap().host();
            assert_ne!(h, 0);
            n.pdiscard(0, 65536).await.unwrap();
            {
                let _g = q.meta.lock().await;
                let c = q.alloc_cluster().await.unwrap();
                assert_ne!(c, h, "{mode:?}: freed cluster reused before the L2 flush");
            }
            n.flush().await.unwrap();
            {
                let _g = q.meta.lock().await;
                q.free_hint.set(0);
                let c = q.alloc_cluster().await.unwrap();
                assert_eq!(c, h, "{mode:?}: freed cluster not reused after the flush");
            }
            close(g, n).await;
        });
    });
}

/// Freed clusters waiting for an L2 flush are bounded: past a limit an
/// allocation writes the L2 tables out and reuses them, so discards and
/// writes without flushes do not grow the file without end.
#[test]
fn many_unsettled_clusters_are_reused_after_an_automatic_flush() {
    let d = Dir::new("unsettled");
    on_engines(|g, mode| {
        let img = d.file("u.qcow2");
        let _ = std::fs::remove_file(&img);
        create_qcow2(&img, "cluster_size=512", 4 << 20);
        run(g, async {
            // Caches large enough that no eviction writes tables out.
            let opts = q2_opts(&img)
                .with("discard", "unmap")
                .with("l2-cache-size", "1M")
                .with("refcount-cache-size", "1M");
            let n = g.open(opts).await.unwrap();
            let q = crate::qcow2::Qcow2::of(&n).unwrap();
            n.pwrite(0, IoBuf::filled(3 << 20, 0x5a), WriteFlags::default())
                .await
                .unwrap();
            n.flush().await.unwrap();
            let end = q.end_cluster.get();
            n.pdiscard(0, 3 << 20).await.unwrap();
            // Rewriting as much, still without a flush, reuses the
            // discarded clusters instead of appending as many new ones.
            n.pwrite(0, IoBuf::filled(3 << 20, 0x6b), WriteFlags::default())
                .await
                .unwrap();
            let grown = q.end_cluster.get() - end;
            assert!(
                grown < 64,
                "{mode:?}: the image grew by {grown} clusters instead of reusing freed ones"
            );
            let b = n.pread(0, IoBuf::zeroed(3 << 20)).await.unwrap();
            assert!(b.iter().all(|&x| x == 0x6b));
            close(g, n).await;
        });
        check_clean(&img);
    });
}

/// Regression: a cluster freed by a discard was punched out of the file at
/// once, while the L2 table still pointing to it was only in the cache. A
/// crash in between left an L2 entry on disk for a compressed cluster whose
/// data was gone, and the image could no longer be read. The file as it
/// stands before the next flush is what a crash leaves behind.
#[test]
fn freed_clusters_are_punched_only_after_the_l2_flush() {
    let d = Dir::new("punch-order");
    on_engines(|g, mode| {
        let img = d.file("p.qcow2");
        let snap = d.file("crashed.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
        run(g, async {
            let n = g
                .open(q2_opts(&img).with("discard", "unmap"))
                .await
                .unwrap();
            let q = Qcow2::of(&n).unwrap();
            q.write_compressed(0, IoBuf::filled(65536, 0x5a))
                .await
                .unwrap();
            n.pwrite(65536, IoBuf::filled(65536, 0x6b), WriteFlags::default())
                .await
                .unwrap();
            n.flush().await.unwrap();
            n.pdiscard(0, 2 * 65536).await.unwrap();
            std::fs::copy(&img, &snap).unwrap();
            close(g, n).await;
        });
        // Either state may be on disk; both must read.
        let (ok, text) = tool(
            "qemu-img",
            &["convert", "-U", "-O", "raw", &snap, &d.file("out.raw")],
        );
        assert!(
            ok,
            "{mode:?}: image left by a crash after the discard: {text}"
        );
        let got = std::fs::read(d.file("out.raw")).unwrap();
        let old = got[..65536].iter().all(|&b| b == 0x5a)
            && got[65536..131072].iter().all(|&b| b == 0x6b);
        let new = got[..131072].iter().all(|&b| b == 0);
        assert!(
            old || new,
            "{mode:?}: discarded clusters read neither old data nor zeros"
        );
        check_clean(&img);
    });
}

/// Options for a qcow2 image on a gate on its file.
fn gated_qcow2(img: &str, gate: &Rc<super::gate::Gate>) -> Options {
    super::gate::install(gate);
    Options::new()
        .with("driver", "qcow2")
        .with("file.driver", "x-gate")
        .with("file.file.driver", "file")
        .with("file.file.filename", img)
}

/// A graph whose registry also has the `x-gate` test driver.
fn gated_graph() -> (EventLoop, Rc<Graph>) {
    let el = EventLoop::new(AioMode::IoUring).unwrap();
    let mut reg = crate::registry();
    reg.register("x-gate", super::gate::open);
    let g = Rc::new(Graph::new(Rc::clone(el.context()), reg, EventBus::new()));
    (el, g)
}

/// A write that joins a fresh cluster whose allocating write is still in
/// flight must not complete before that cluster is linked into the L2
/// table: completed, its data must read back. The allocating write's data
/// is held at the gate while the joining write runs.
#[test]
fn joined_write_completes_only_after_the_cluster_is_linked() {
    let d = Dir::new("join-link");
    let img = d.file("j.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
    let (_el, g) = gated_graph();
    let gate = Rc::new(super::gate::Gate::default());
    run(&g, async {
        let n = g.open(gated_qcow2(&img, &gate)).await.unwrap();
        // The room ahead is made by a first allocation.
        n.pwrite(4 << 20, IoBuf::filled(65536, 9), WriteFlags::default())
            .await
            .unwrap();
        gate.hold(32768);
        let ctx = Rc::clone(g.context());
        let b_done = Rc::new(Cell::new(false));
        let a = {
            let n = Rc::clone(&n);
            ctx.spawn(async move {
                n.pwrite(0, IoBuf::filled(32768, 1), WriteFlags::default())
                    .await
                    .unwrap();
            })
        };
        let b = {
            let (n, done) = (Rc::clone(&n), Rc::clone(&b_done));
            ctx.spawn(async move {
                n.pwrite(32768, IoBuf::filled(32768, 2), WriteFlags::default())
                    .await
                    .unwrap();
                done.set(true);
            })
        };
        ctx.sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(
            gate.held(),
            1,
            "the allocating write's data did not reach the gate"
        );
        assert!(
            !b_done.get(),
            "the joined write completed before its cluster was linked"
        );
        gate.open(super::gate::Release::Pass);
        a.await;
        b.await;
        let got = n.pread(0, IoBuf::zeroed(65536)).await.unwrap();
        assert!(got[..32768].iter().all(|&x| x == 1) && got[32768..].iter().all(|&x| x == 2));
        close(&g, n).await;
    });
    check_clean(&img);
    qemu_io(
        &img,
        &["read -P 1 0 32k".into(), "read -P 2 32k 32k".into()],
    );
}

/// The allocating write fails: a write that joined its fresh cluster is
/// retried on a cluster of its own and succeeds, and the failed write's
/// half reads as zeros.
#[test]
fn joined_write_survives_a_failed_allocation() {
    let d = Dir::new("join-fail");
    let img = d.file("f.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
    let (_el, g) = gated_graph();
    let gate = Rc::new(super::gate::Gate::default());
    run(&g, async {
        let n = g.open(gated_qcow2(&img, &gate)).await.unwrap();
        n.pwrite(4 << 20, IoBuf::filled(65536, 9), WriteFlags::default())
            .await
            .unwrap();
        gate.hold(32768);
        let ctx = Rc::clone(g.context());
        let a = {
            let n = Rc::clone(&n);
            ctx.spawn(async move {
                n.pwrite(0, IoBuf::filled(32768, 1), WriteFlags::default())
                    .await
            })
        };
        let b = {
            let n = Rc::clone(&n);
            ctx.spawn(async move {
                n.pwrite(32768, IoBuf::filled(32768, 2), WriteFlags::default())
                    .await
            })
        };
        ctx.sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(gate.held(), 1);
        gate.hold(usize::MAX);
        gate.open(super::gate::Release::Fail);
        assert!(a.await.is_err(), "the held write should have failed");
        b.await.expect("the joined write is retried and succeeds");
        let got = n.pread(0, IoBuf::zeroed(65536)).await.unwrap();
        assert!(
            got[..32768].iter().all(|&x| x == 0),
            "the failed write's half"
        );
        assert!(
            got[32768..].iter().all(|&x| x == 2),
            "the joined write's half"
        );
        close(&g, n).await;
    });
    let (_, text) = tool("qemu-img", &["check", &img]);
    assert!(!text.contains("ERROR"), "{text}");
    qemu_io(
        &img,
        &["read -P 0 0 32k".into(), "read -P 2 32k 32k".into()],
    );
}
