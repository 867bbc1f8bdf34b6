//! Whole-image operations against QEMU: hostile headers, creation,
//! check and repair, dirty images, compressed writes, bitmaps, shrinking,
//! internal snapshots.

use super::*;

#[test]
fn hostile_headers_give_clear_errors() {
    let d = Dir::new("hostile");
    let good = d.file("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &good, "64M"]);
    type Case = (&'static str, Box<dyn Fn(&str)>, ErrorKind, &'static str);
    let cases: Vec<Case> = vec![
        (
            "truncated",
            Box::new(|p: &str| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(50)
                    .unwrap()
            }),
            ErrorKind::InvalidArgument,
            "not in qcow2 format",
        ),
        (
            "bad cluster_bits",
            Box::new(|p: &str| patch(p, 20, &40u32.to_be_bytes())),
            ErrorKind::InvalidArgument,
            "cluster size",
        ),
        (
            "huge l1_size",
            Box::new(|p: &str| patch(p, 36, &0x1000_0000u32.to_be_bytes())),
            ErrorKind::InvalidArgument,
            "L1 table too large",
        ),
        (
            "l1 beyond eof",
            Box::new(|p: &str| patch(p, 40, &(1u64 << 40).to_be_bytes())),
            ErrorKind::Corrupt,
            "beyond the end",
        ),
        (
            "huge reftable",
            Box::new(|p: &str| patch(p, 56, &0xffff_ffffu32.to_be_bytes())),
            ErrorKind::InvalidArgument,
            "Reference count table too large",
        ),
        (
            "unknown incompat",
            Box::new(|p: &str| patch(p, 72, &(1u64 << 40).to_be_bytes())),
            ErrorKind::Unsupported,
            "Unknown incompatible feature: 10000000000",
        ),
        (
            "encrypted",
            Box::new(|p: &str| patch(p, 32, &1u32.to_be_bytes())),
            ErrorKind::Unsupported,
            "encrypted",
        ),
        (
            "bad version",
            Box::new(|p: &str| patch(p, 4, &9u32.to_be_bytes())),
            ErrorKind::Unsupported,
            "version 9",
        ),
        (
            "too many snapshots",
            Box::new(|p: &str| patch(p, 60, &100000u32.to_be_bytes())),
            ErrorKind::InvalidArgument,
            "too many snapshots",
        ),
        (
            "refcount order",
            Box::new(|p: &str| patch(p, 96, &7u32.to_be_bytes())),
            ErrorKind::InvalidArgument,
            "refcount width",
        ),
        (
            "l1 too small",
            Box::new(|p: &str| patch(p, 24, &(1u64 << 40).to_be_bytes())),
            ErrorKind::Corrupt,
            "L1 table is too small",
        ),
        (
            "unaligned L2",
            Box::new(|p: &str| patch(p, 0x30000, &0x8000_0000_0001_2200u64.to_be_bytes())),
            ErrorKind::Corrupt,
            "unaligned",
        ),
    ];
    on_engines(|g, _| {
        for (what, f, kind, msg) in &cases {
            let p = d.file("bad.qcow2");
            std::fs::copy(&good, &p).unwrap();
            f(&p);
            run(g, async {
                let e = g
                    .open(q2_opts(&p).with("read-only", true))
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), *kind, "{what}: {e}");
                assert!(e.to_string().contains(msg), "{what}: {e}");
            });
        }
    });
    // A loop in the backing chain.
    let a = d.file("loop-a.qcow2");
    let b = d.file("loop-b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &a, "1M"]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &a, "-F", "qcow2", &b, "1M",
    ]);
    qemu_img(&["rebase", "-u", "-f", "qcow2", "-b", &b, "-F", "qcow2", &a]);
    on_engines(|g, _| {
        run(g, async {
            let e = g
                .open(q2_opts(&b).with("read-only", true))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("too deep"), "{e}");
        });
    });
}

#[test]
fn create_matches_qemu_img_byte_for_byte() {
    use crate::qcow2::create::{create_file, CreateOptions};
    use crate::qcow2::header::CompressionType;
    let d = Dir::new("create");
    let cases: Vec<(&str, &str, CreateOptions)> = vec![
        (
            "64M",
            "",
            CreateOptions {
                size: 64 << 20,
                ..Default::default()
            },
        ),
        (
            "1M",
            "cluster_size=512",
            CreateOptions {
                size: 1 << 20,
                cluster_size: 512,
                ..Default::default()
            },
        ),
        (
            "10G",
            "cluster_size=2M,refcount_bits=1",
            CreateOptions {
                size: 10 << 30,
                cluster_size: 2 << 20,
                refcount_bits: 1,
                ..Default::default()
            },
        ),
        (
            "100G",
            "cluster_size=4096,refcount_bits=64",
            CreateOptions {
                size: 100 << 30,
                cluster_size: 4096,
                refcount_bits: 64,
                ..Default::default()
            },
        ),
        (
            "1G",
            "compat=0.10",
            CreateOptions {
                size: 1 << 30,
                compat_v2: true,
                ..Default::default()
            },
        ),
        (
            "1G",
            "lazy_refcounts=on,extended_l2=on,compression_type=zstd",
            CreateOptions {
                size: 1 << 30,
                lazy_refcounts: true,
                extended_l2: true,
                compression_type: CompressionType::Zstd,
                ..Default::default()
            },
        ),
        (
            "1M",
            "preallocation=metadata",
            CreateOptions {
                size: 1 << 20,
                preallocation: block_core::Prealloc::Metadata,
                ..Default::default()
            },
        ),
        (
            "3M",
            "preallocation=metadata,extended_l2=on",
            CreateOptions {
                size: 3 << 20,
                preallocation: block_core::Prealloc::Metadata,
                extended_l2: true,
                ..Default::default()
            },
        ),
        (
            "64M",
            "preallocation=metadata,cluster_size=16384",
            CreateOptions {
                size: 64 << 20,
                cluster_size: 16384,
                preallocation: block_core::Prealloc::Metadata,
                ..Default::default()
            },
        ),
        (
            "0",
            "",
            CreateOptions {
                size: 0,
                ..Default::default()
            },
        ),
        (
            "10M",
            "preallocation=falloc",
            CreateOptions {
                size: 10 << 20,
                preallocation: block_core::Prealloc::Falloc,
                ..Default::default()
            },
        ),
        (
            "3M",
            "preallocation=full,extended_l2=on,lazy_refcounts=on",
            CreateOptions {
                size: 3 << 20,
                preallocation: block_core::Prealloc::Full,
                extended_l2: true,
                lazy_refcounts: true,
                ..Default::default()
            },
        ),
        // Several L2 tables and several refcount blocks.
        (
            "10M",
            "preallocation=falloc,cluster_size=4096",
            CreateOptions {
                size: 10 << 20,
                cluster_size: 4096,
                preallocation: block_core::Prealloc::Falloc,
                ..Default::default()
            },
        ),
        (
            "1000K",
            "preallocation=full,cluster_size=512,refcount_bits=8",
            CreateOptions {
                size: 1000 << 10,
                cluster_size: 512,
                refcount_bits: 8,
                preallocation: block_core::Prealloc::Full,
                ..Default::default()
            },
        ),
        (
            "5M",
            "preallocation=falloc,compat=0.10",
            CreateOptions {
                size: 5 << 20,
                compat_v2: true,
                preallocation: block_core::Prealloc::Falloc,
                ..Default::default()
            },
        ),
        (
            "0",
            "preallocation=falloc",
            CreateOptions {
                size: 0,
                preallocation: block_core::Prealloc::Falloc,
                ..Default::default()
            },
        ),
    ];
    let backing = d.file("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &backing, "1G"]);
    let mut cases = cases;
    cases.push((
        "1G",
        "BACKING",
        CreateOptions {
            size: 1 << 30,
            backing_file: Some(backing.clone()),
            backing_fmt: Some("qcow2".into()),
            ..Default::default()
        },
    ));
    on_engines(|g, mode| {
        for (size, o, opts) in &cases {
            let q = d.file("q.qcow2");
            let s = d.file("s.qcow2");
            let _ = std::fs::remove_file(&q);
            if *o == "BACKING" {
                qemu_img(&[
                    "create", "-q", "-f", "qcow2", "-b", &backing, "-F", "qcow2", &q, size,
                ]);
            } else if o.is_empty() {
                qemu_img(&["create", "-q", "-f", "qcow2", &q, size]);
            } else {
                qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, &q, size]);
            }
            run(g, async { create_file(g, &s, opts).await.unwrap() });
            let a = std::fs::read(&q).unwrap();
            let b = std::fs::read(&s).unwrap();
            assert_eq!(a.len(), b.len(), "{o} {mode:?}: file sizes differ");
            if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
                panic!("{o} {mode:?}: first difference at byte {i:#x}");
            }
            check_clean(&s);
        }
        // Invalid options are refused.
        let s = d.file("bad.qcow2");
        run(g, async {
            let e = create_file(
                g,
                &s,
                &CreateOptions {
                    size: 1 << 20,
                    cluster_size: 1000,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            let e = create_file(
                g,
                &s,
                &CreateOptions {
                    size: 1 << 20,
                    compat_v2: true,
                    refcount_bits: 8,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains("compatibility level 1.1"), "{e}");
        });
    });
}

#[test]
fn check_reports_like_qemu_and_repairs_leaks() {
    use crate::qcow2::check::Repair;
    let d = Dir::new("check");
    let img = d.file("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &img,
        "16M",
    ]);
    qemu_io(
        &img,
        &[
            "write -P 1 0 64k".into(),
            "write -P 2 1M 12k".into(),
            "write -P 3 8M 4k".into(),
        ],
    );
    // Leak three clusters: grow the file by three clusters and give them
    // refcounts in the refcount block (cluster 2, 16-bit entries).
    let fsize = std::fs::metadata(&img).unwrap().len();
    let c = fsize.div_ceil(4096);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((c + 3) * 4096)
        .unwrap();
    for i in 0..3 {
        patch(&img, 2 * 4096 + (c + i) * 2, &1u16.to_be_bytes());
    }
    let json = qemu_check_json(&img);
    on_engines(|g, mode| {
        run(g, async {
            let r = crate::qcow2::check_image(g, q2_opts(&img), Repair::default())
                .await
                .unwrap();
            assert_eq!(
                r.leaks,
                json_field(&json, "leaks"),
                "{mode:?} {r:?} vs {json}"
            );
            assert_eq!(r.leaks, 3);
            assert_eq!(r.corruptions, 0);
            assert_eq!(
                r.allocated_clusters,
                json_field(&json, "allocated-clusters"),
                "{r:?} {json}"
            );
            assert_eq!(r.total_clusters, json_field(&json, "total-clusters"));
            assert_eq!(
                r.fragmented_clusters,
                json_field(&json, "fragmented-clusters"),
                "{r:?} {json}"
            );
        });
    });
    let el = EventLoop::new(AioMode::Threads).unwrap();
    let g = Rc::new(Graph::new(
        Rc::clone(el.context()),
        crate::registry(),
        EventBus::new(),
    ));
    run(&g, async {
        let r = crate::qcow2::check_image(
            &g,
            q2_opts(&img),
            Repair {
                leaks: true,
                errors: true,
            },
        )
        .await
        .unwrap();
        assert_eq!(r.leaks_fixed, 3, "{r:?}");
    });
    check_clean(&img);
}

#[test]
fn check_finds_and_repairs_wrong_copied_flags() {
    use crate::qcow2::check::{CopiedEntry, CopiedMismatch, Repair};
    let d = Dir::new("copied");
    let img = d.file("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1G"]);
    qemu_io(&img, &["write -P 1 0 64k".into()]);
    qemu_img(&["snapshot", "-c", "s1", &img]);
    // After the snapshot the L2 table (at 0x40000) and the data cluster
    // (at 0x50000) have refcount 2: neither entry may carry the flag.
    let l1 = 0x30000;
    let l2 = 0x40000;
    patch(&img, l1, &(0x40000 | (1u64 << 63)).to_be_bytes());
    patch(&img, l2, &(0x50000 | (1u64 << 63)).to_be_bytes());
    let json = qemu_check_json(&img);
    assert_eq!(json_field(&json, "corruptions"), 2, "{json}");
    let want = vec![
        CopiedMismatch {
            what: CopiedEntry::L2Table { l1_index: 0 },
            entry: 0x8000_0000_0004_0000,
            refcount: 2,
            fixed: false,
        },
        CopiedMismatch {
            what: CopiedEntry::Data,
            entry: 0x8000_0000_0005_0000,
            refcount: 2,
            fixed: false,
        },
    ];
    on_engines(|g, mode| {
        run(g, async {
            let r = crate::qcow2::check_image(g, q2_opts(&img), Repair::default())
                .await
                .unwrap();
            assert_eq!(r.copied, want, "{mode:?}");
            assert_eq!((r.corruptions, r.corruptions_fixed), (2, 0), "{mode:?}");
            assert!(r.mismatches.is_empty(), "{mode:?} {r:?}");
        });
    });
    let el = EventLoop::new(AioMode::Threads).unwrap();
    let g = Rc::new(Graph::new(
        Rc::clone(el.context()),
        crate::registry(),
        EventBus::new(),
    ));
    run(&g, async {
        let r = crate::qcow2::check_image(
            &g,
            q2_opts(&img),
            Repair {
                leaks: false,
                errors: true,
            },
        )
        .await
        .unwrap();
        assert_eq!(r.corruptions_fixed, 2, "{r:?}");
        assert!(r.copied.iter().all(|c| c.fixed), "{r:?}");
        let again = crate::qcow2::check_image(&g, q2_opts(&img), Repair::default())
            .await
            .unwrap();
        assert_eq!(again.corruptions, 0, "{again:?}");
        assert!(again.copied.is_empty(), "{again:?}");
    });
    check_clean(&img);
    qemu_io(&img, &["read -P 1 0 64k".into()]);
}

#[test]
fn check_notes_malformed_entries_and_zeroes_unaligned_preallocation() {
    use crate::qcow2::check::{Finding, Repair};
    let d = Dir::new("malformed");
    let img = d.file("m.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1G"]);
    // L1 at 0x30000, L2 table at 0x40000: entry 0 data at 0x50000, entry 1
    // preallocated zeros at 0x60000.
    qemu_io(&img, &["write 0 128k".into(), "write -z 64k 64k".into()]);
    patch(
        &img,
        0x40000,
        &(0x8000_0000_0005_0000u64 | 1 << 56).to_be_bytes(),
    );
    patch(&img, 0x40008, &0x8000_0000_0006_0201u64.to_be_bytes());
    let json = qemu_check_json(&img);
    let el = EventLoop::new(AioMode::Threads).unwrap();
    let g = Rc::new(Graph::new(
        Rc::clone(el.context()),
        crate::registry(),
        EventBus::new(),
    ));
    run(&g, async {
        let r = crate::qcow2::check_image(&g, q2_opts(&img), Repair::default())
            .await
            .unwrap();
        assert_eq!(
            r.findings,
            vec![
                Finding::L2Reserved {
                    entry: 0x8100_0000_0005_0000
                },
                Finding::PreallocUnaligned {
                    offset: 0x60200,
                    fixed: false
                },
            ]
        );
        // As in QEMU, the unaligned cluster still references what it
        // covers: cluster 6 and the first bytes of cluster 7 (past EOF).
        assert_eq!(
            r.mismatches
                .iter()
                .map(|m| (m.cluster, m.refcount, m.reference))
                .collect::<Vec<_>>(),
            vec![(7, 0, 1)],
            "{r:?}"
        );
        assert_eq!(r.corruptions, json_field(&json, "corruptions"), "{json}");
        let r = crate::qcow2::check_image(
            &g,
            q2_opts(&img),
            Repair {
                leaks: true,
                errors: true,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            r.findings[1],
            Finding::PreallocUnaligned {
                offset: 0x60200,
                fixed: true
            }
        );
        // Cluster 6 was left without a reference and is freed.
        assert_eq!((r.leaks_fixed, r.corruptions_fixed), (1, 1), "{r:?}");
    });
    let mut b = [0u8; 8];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, 0x40008)
        .unwrap();
    assert_eq!(u64::from_be_bytes(b), 1, "a plain zero cluster");
    qemu_io(&img, &["read -P 0 64k 64k".into()]);
}

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_open() {
    let d = Dir::new("dirty");
    on_engines(|g, mode| {
        let img = d.file("l.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            &img,
            "8M",
        ]);
        // qemu-io's abort leaves the dirty bit set and refcounts stale.
        let _ = Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 9 0 128k",
                "-c",
                "write -P 8 4M 64k",
                "-c",
                "abort",
                &img,
            ])
            .output()
            .expect("qemu-io is required");
        let (ok, text) = tool("qemu-img", &["check", &img]);
        assert!(
            !ok || text.contains("ERROR") || text.contains("leaked") || text.contains("dirty"),
            "{mode:?}: expected a dirty image: {text}"
        );
        run(g, async {
            let n = open(g, &img, false).await;
            let b = n.pread(0, IoBuf::zeroed(128 << 10)).await.unwrap();
            assert!(b.iter().all(|&x| x == 9));
            n.pwrite(6 << 20, IoBuf::filled(8192, 7), WriteFlags::default())
                .await
                .unwrap();
            close(g, n).await;
        });
        check_clean(&img);
        qemu_io(
            &img,
            &[
                "read -P 9 0 128k".into(),
                "read -P 8 4M 64k".into(),
                "read -P 7 6M 8k".into(),
            ],
        );
    });
}

#[test]
fn compressed_writes_read_back_in_qemu() {
    use crate::qcow2::image::Image;
    let d = Dir::new("cwrite");
    for ct in ["zlib", "zstd"] {
        on_engines(|g, mode| {
            let img = d.file("cw.qcow2");
            let _ = std::fs::remove_file(&img);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compression_type={ct}"),
                &img,
                "4M",
            ]);
            qemu_io(&img, &["write -P 0x33 0 192k".into()]);
            run(g, async {
                let im = Image::open(g, q2_opts(&img), true).await.unwrap();
                for i in 0..4u64 {
                    im.write_compressed(i * 65536, IoBuf::filled(65536, 0x40 + i as u8))
                        .await
                        .unwrap();
                }
                // Incompressible data is stored plainly.
                let mut r = Rng(99);
                let noise: Vec<u8> = (0..65536).map(|_| r.next() as u8).collect();
                im.write_compressed(10 * 65536, IoBuf::from_slice(&noise))
                    .await
                    .unwrap();
                im.close().await.unwrap();
                let n = open(g, &img, true).await;
                let b = n.pread(10 * 65536, IoBuf::zeroed(65536)).await.unwrap();
                assert!(b[..] == noise[..], "{ct} {mode:?}");
                close(g, n).await;
            });
            check_clean(&img);
            let json = qemu_check_json(&img);
            assert_eq!(json_field(&json, "compressed-clusters"), 4, "{json}");
            qemu_io(
                &img,
                &[
                    "read -P 0x40 0 64k".into(),
                    "read -P 0x41 64k 64k".into(),
                    "read -P 0x42 128k 64k".into(),
                    "read -P 0x43 192k 64k".into(),
                ],
            );
        });
    }
}

/// While a read-write node is open its image's bitmaps are marked in use
/// (a crash leaves them inconsistent, not stale); the close stores them
/// with the session's writes and clears the flag.
#[test]
fn persistent_bitmaps_are_in_use_while_open_and_stored_at_close() {
    use crate::qcow2::check::Repair;
    let d = Dir::new("bitmaps");
    on_engines(|g, mode| {
        let img = d.file("bm.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "16M"]);
        qemu_img(&["bitmap", "--add", &img, "b0"]);
        qemu_img(&["bitmap", "--add", "-g", "128k", &img, "b1"]);
        qemu_io(&img, &["write -P 3 0 1M".into()]);
        run(g, async {
            let r = crate::qcow2::check_image(g, q2_opts(&img), Repair::default())
                .await
                .unwrap();
            assert_eq!((r.leaks, r.corruptions), (0, 0), "{mode:?} {r:?}");
            let n = open(g, &img, false).await;
            n.pwrite(4 << 20, IoBuf::filled(4096, 4), WriteFlags::default())
                .await
                .unwrap();
            let info = qemu_img(&["info", "-U", &img]);
            assert_eq!(info.matches("in-use").count(), 2, "{info}");
            close(g, n).await;
        });
        check_clean(&img);
        let info = qemu_img(&["info", &img]);
        assert_eq!(info.matches("in-use").count(), 0, "{info}");
        run(g, async {
            let n = open(g, &img, true).await;
            let b0 = n.dirty_bitmap("b0").unwrap();
            assert!(b0.is_dirty(4 << 20) && b0.is_dirty(0), "{mode:?}");
            close(g, n).await;
        });
        qemu_io(&img, &["read -P 3 0 1M".into(), "read -P 4 4M 4k".into()]);
    });
}

#[test]
fn resize_shrinks_and_frees_clusters() {
    let d = Dir::new("shrink");
    on_engines(|g, mode| {
        let img = d.file("s.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &img,
            "32M",
        ]);
        qemu_io(
            &img,
            &[
                "write -P 1 0 1M".into(),
                "write -P 2 20M 2M".into(),
                "write -z 30M 1M".into(),
            ],
        );
        run(g, async {
            let n = open(g, &img, false).await;
            n.truncate(10 << 20, true, block_core::Prealloc::Off)
                .await
                .unwrap();
            assert_eq!(n.size(), 10 << 20);
            close(g, n).await;
        });
        check_clean(&img);
        let json = qemu_check_json(&img);
        assert_eq!(
            json_field(&json, "allocated-clusters"),
            256,
            "{mode:?} {json}"
        );
        qemu_io(&img, &["read -P 1 0 1M".into()]);
        let info = qemu_img(&["info", &img]);
        assert!(info.contains("virtual size: 10 MiB"), "{info}");
    });
}

#[test]
fn writes_to_images_with_internal_snapshots_copy_shared_clusters() {
    let d = Dir::new("snap");
    on_engines(|g, mode| {
        for cfg in ["cluster_size=65536", "cluster_size=65536,extended_l2=on"] {
            let img = d.file("s.qcow2");
            let _ = std::fs::remove_file(&img);
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", cfg, &img, "8M"]);
            qemu_io(
                &img,
                &["write -P 1 0 2M".into(), "write -P 2 4M 64k".into()],
            );
            qemu_img(&["snapshot", "-c", "s1", &img]);
            run(g, async {
                let n = open(g, &img, false).await;
                // Partial-cluster writes, a zeroing and a discard, all in
                // clusters (and an L2 table) shared with the snapshot.
                n.pwrite(1000, IoBuf::filled(3000, 7), WriteFlags::default())
                    .await
                    .unwrap();
                n.pwrite(
                    65536 * 3 + 5,
                    IoBuf::filled(70000, 8),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                n.pwrite_zeroes(1 << 20, 65536, WriteFlags::default())
                    .await
                    .unwrap();
                close(g, n).await;
            });
            check_clean(&img);
            qemu_io(
                &img,
                &[
                    "read -P 1 0 1000".into(),
                    "read -P 7 1000 3000".into(),
                    "read -P 1 4000 192613".into(),
                    "read -P 8 196613 70000".into(),
                    "read -P 0 1M 64k".into(),
                    "read -P 2 4M 64k".into(),
                ],
            );
            // The snapshot still holds the old data.
            qemu_img(&["snapshot", "-a", "s1", &img]);
            qemu_io(&img, &["read -P 1 0 2M".into(), "read -P 2 4M 64k".into()]);
            check_clean(&img);
            let _ = mode;
        }
    });
}

#[test]
fn internal_snapshot_create_is_understood_by_qemu() {
    use crate::qcow2::image::Image;
    let d = Dir::new("snapcreate");
    on_engines(|g, mode| {
        let img = d.file("s.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &img,
            "8M",
        ]);
        qemu_io(&img, &["write -P 1 0 1M".into()]);
        qemu_img(&["snapshot", "-c", "first", &img]);
        qemu_io(&img, &["write -P 2 0 64k".into()]);
        run(g, async {
            let im = Image::open(g, q2_opts(&img), true).await.unwrap();
            let s = im.driver().create_snapshot("second").await.unwrap();
            assert_eq!(s.id, "2");
            let list = im.driver().snapshots().await.unwrap();
            assert_eq!(list.len(), 2);
            assert_eq!(list[0].name, "first");
            im.close().await.unwrap();
            let n = open(g, &img, false).await;
            n.pwrite(0, IoBuf::filled(8192, 3), WriteFlags::default())
                .await
                .unwrap();
            close(g, n).await;
        });
        check_clean(&img);
        let l = qemu_img(&["snapshot", "-l", &img]);
        assert!(l.contains("first") && l.contains("second"), "{mode:?} {l}");
        qemu_io(&img, &["read -P 3 0 8k".into(), "read -P 2 8k 56k".into()]);
        qemu_img(&["snapshot", "-a", "second", &img]);
        qemu_io(
            &img,
            &["read -P 2 0 64k".into(), "read -P 1 64k 960k".into()],
        );
        qemu_img(&["snapshot", "-a", "first", &img]);
        qemu_io(&img, &["read -P 1 0 1M".into()]);
        check_clean(&img);
    });
}

#[test]
fn internal_snapshot_revert_and_delete() {
    use crate::qcow2::image::Image;
    let d = Dir::new("snaprd");
    on_engines(|g, mode| {
        let img = d.file("s.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &img,
            "8M",
        ]);
        qemu_io(&img, &["write -P 1 0 1M".into()]);
        qemu_img(&["snapshot", "-c", "a", &img]);
        qemu_io(
            &img,
            &["write -P 2 0 64k".into(), "write -P 9 2M 64k".into()],
        );
        qemu_img(&["snapshot", "-c", "b", &img]);
        qemu_io(&img, &["write -P 3 0 4k".into()]);
        run(g, async {
            let im = Image::open(g, q2_opts(&img), true).await.unwrap();
            im.driver().revert_to_snapshot("a").await.unwrap();
            im.driver().delete_snapshot("b").await.unwrap();
            assert_eq!(im.driver().snapshots().await.unwrap().len(), 1);
            im.close().await.unwrap();
        });
        check_clean(&img);
        let l = qemu_img(&["snapshot", "-l", &img]);
        assert!(l.contains(" a ") || l.contains("a  "), "{mode:?} {l}");
        assert!(!l.contains(" b "), "{l}");
        qemu_io(&img, &["read -P 1 0 1M".into(), "read -P 0 2M 64k".into()]);
        run(g, async {
            let im = Image::open(g, q2_opts(&img), true).await.unwrap();
            im.driver().delete_snapshot("a").await.unwrap();
            im.close().await.unwrap();
        });
        check_clean(&img);
        let json = qemu_check_json(&img);
        assert_eq!(json_field(&json, "allocated-clusters"), 256, "{json}");
        qemu_io(&img, &["read -P 1 0 1M".into()]);
    });
}

#[test]
fn corrupted_metadata_never_panics() {
    let d = Dir::new("fuzz");
    let good = d.file("good.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &good,
        "4M",
    ]);
    qemu_io(
        &good,
        &["write -P 1 0 256k".into(), "write -P 2 2M 64k".into()],
    );
    let ext = d.file("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16384,extended_l2=on",
        &ext,
        "4M",
    ]);
    qemu_io(
        &ext,
        &["write -P 1 0 100k".into(), "write -z 1M 64k".into()],
    );
    // Bitmaps: the header extension, the directory and the tables are
    // loaded at open and rewritten at close of a read-write node.
    let bm = d.file("bm.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &bm,
        "4M",
    ]);
    qemu_img(&["bitmap", "--add", &bm, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", &bm, "fine"]);
    qemu_io(&bm, &["write -P 1 64k 8k".into()]);
    let bm_dir = first_bitmap_entry(&bm);
    let el = EventLoop::new(AioMode::Threads).unwrap();
    let g = Rc::new(Graph::new(
        Rc::clone(el.context()),
        crate::registry(),
        EventBus::new(),
    ));
    let mut r = Rng(0xfeed);
    for i in 0..450 {
        let src = [&good, &ext, &bm][i % 3];
        let p = d.file("f.qcow2");
        std::fs::copy(src, &p).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        // Corrupt a few bytes of metadata (the first clusters hold the
        // header, refcount table and block, L1 and L2 tables; the bitmap
        // image's directory and tables sit after its data).
        for _ in 0..1 + r.below(4) {
            let off = if src == &bm && r.below(2) == 0 {
                bm_dir + r.below(len - bm_dir).min(3 * 4096)
            } else {
                r.below(len.min(6 * 16384))
            };
            let v = r.next() as u8;
            patch(&p, off, &[v]);
        }
        run(&g, async {
            if let Ok(n) = g.open(q2_opts(&p)).await {
                let _ = n.pread(0, IoBuf::zeroed(1 << 20)).await;
                let _ = n
                    .pwrite(4096 * 3, IoBuf::filled(10000, 9), WriteFlags::default())
                    .await;
                let _ = n
                    .pwrite_zeroes(1 << 20, 1 << 16, WriteFlags::default())
                    .await;
                let _ = n.flush().await;
                if i % 6 == 2 {
                    let _ = n.delete_dirty_bitmap("fine").await;
                }
                drop(n);
            }
            let _ = g.close_all().await;
        });
    }
}

#[test]
fn data_writes_never_land_on_metadata() {
    let d = Dir::new("overlap");
    on_engines(|g, mode| {
        let img = d.file("o.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "4M"]);
        qemu_io(&img, &["write -P 1 0 64k".into()]);
        // L1 at cluster 3, the first L2 table at cluster 4: point guest
        // cluster 0 at the refcount table (cluster 1), COPIED set.
        patch(&img, 4 * 65536, &(0x8000_0000_0001_0000u64).to_be_bytes());
        let before = std::fs::read(&img).unwrap()[65536..131072].to_vec();
        let events = g.events().subscribe();
        run(g, async {
            let n = open(g, &img, false).await;
            let e = n
                .pwrite(0, IoBuf::filled(4096, 7), WriteFlags::default())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{mode:?} {e}");
            assert!(e.to_string().contains("refcount table"), "{e}");
            let e = n
                .pwrite(1 << 20, IoBuf::filled(4096, 7), WriteFlags::default())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            drop(n);
            let _ = g.close_all().await;
        });
        let after = std::fs::read(&img).unwrap()[65536..131072].to_vec();
        assert!(before == after, "the refcount table was overwritten");
        // One event, QEMU's wording, and the corrupt bit for QEMU to see.
        let evs: Vec<_> = events
            .try_iter()
            .filter(|e| matches!(e, block_core::BlockEvent::ImageCorrupted { .. }))
            .collect();
        assert_eq!(evs.len(), 1, "{mode:?} {evs:?}");
        let block_core::BlockEvent::ImageCorrupted {
            msg, offset, fatal, ..
        } = &evs[0]
        else {
            unreachable!()
        };
        assert_eq!(
            msg,
            "Preventing invalid write on metadata (overlaps with refcount table)"
        );
        assert_eq!(*offset, Some(65536));
        assert!(*fatal);
        let info = qemu_img(&["info", "--output=json", "-U", &img]);
        assert!(info.contains("\"corrupt\": true"), "{info}");
    });
}

/// Compressed clusters share host clusters as QEMU packs them (the image
/// is about as small as qemu-img's), spanning into the next cluster when it
/// is contiguous; overwriting and discarding them keeps refcounts exact.
#[test]
fn compressed_clusters_are_packed() {
    use crate::qcow2::image::Image;
    let d = Dir::new("cpack");
    on_engines(|g, mode| {
        let img = d.file("p.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
        // Semi-compressible clusters: about 40 KiB compressed each.
        let mut r = Rng(7);
        let clusters: Vec<Vec<u8>> = (0..48)
            .map(|_| {
                (0..65536)
                    .map(|i| {
                        if i % 3 == 0 {
                            r.next() as u8
                        } else {
                            b'a' + (i % 7) as u8
                        }
                    })
                    .collect()
            })
            .collect();
        run(g, async {
            let im = Image::open(g, q2_opts(&img), true).await.unwrap();
            for (i, c) in clusters.iter().enumerate() {
                im.write_compressed(i as u64 * 65536, IoBuf::from_slice(c))
                    .await
                    .unwrap();
            }
            im.close().await.unwrap();
        });
        check_clean(&img);
        let len = std::fs::metadata(&img).unwrap().len();
        // One host cluster each would take more than 48 clusters.
        assert!(
            len < 48 * 65536 * 3 / 4,
            "{mode:?}: not packed, {len} bytes"
        );
        let raw = raw_of(&img, &d);
        for (i, c) in clusters.iter().enumerate() {
            assert!(
                raw[i * 65536..(i + 1) * 65536] == c[..],
                "{mode:?} cluster {i}"
            );
        }
        // Overwrite every other compressed cluster, discard some more:
        // shared host clusters lose one reference each time.
        run(g, async {
            let n = g
                .open(q2_opts(&img).with("discard", "unmap"))
                .await
                .unwrap();
            for i in (0..48u64).step_by(2) {
                n.pwrite(
                    i * 65536 + 100,
                    IoBuf::filled(4096, 9),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
            }
            n.pdiscard(65536, 8 * 65536).await.unwrap();
            close(g, n).await;
        });
        check_clean(&img);
        let raw = raw_of(&img, &d);
        for i in (0..48usize).step_by(2).filter(|i| !(1..9).contains(i)) {
            assert!(raw[i * 65536 + 100..i * 65536 + 4196]
                .iter()
                .all(|&b| b == 9));
            assert!(
                raw[i * 65536 + 4196..(i + 1) * 65536] == clusters[i][4196..],
                "{i}"
            );
        }
        assert!(raw[65536..9 * 65536].iter().all(|&b| b == 0));
        assert!(raw[11 * 65536..12 * 65536] == clusters[11][..]);
    });
}

/// A refcount table entry cleared, then `check` with `errors` on the open
/// image: the structure is rebuilt, and writes that follow in the same
/// session allocate around everything in use (the driver forgot the old
/// refcount blocks it had cached and uses the new table).
#[test]
fn rebuilt_refcounts_serve_later_allocations() {
    use crate::qcow2::check::Repair;
    let d = Dir::new("rebuild");
    let img = d.file("r.qcow2");
    create_qcow2(&img, "cluster_size=4096", 32 << 20);
    qemu_io(
        &img,
        &["write -P 1 0 256k".into(), "write -P 2 8M 64k".into()],
    );
    // Refcount table at the offset in the header; clear entry 0.
    let rt = u64::from_be_bytes(std::fs::read(&img).unwrap()[48..56].try_into().unwrap());
    patch(&img, rt, &0u64.to_be_bytes());
    on_engines(|g, mode| {
        let copy = d.file(&format!("r-{mode:?}.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        run(g, async {
            let n = open(g, &copy, false).await;
            let q = crate::qcow2::Qcow2::of(&n).expect("qcow2 node");
            let r = q
                .check(Repair {
                    leaks: true,
                    errors: true,
                })
                .await
                .unwrap();
            assert!(r.rebuilt.is_some(), "{mode:?}: {r:?}");
            assert_eq!(r.corruptions, r.corruptions_fixed, "{mode:?}: {r:?}");
            // Fresh clusters, and a write into an existing one.
            for i in 0..64u64 {
                n.pwrite(
                    (1 << 20) + i * 65536,
                    IoBuf::filled(4096, 3),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
            }
            n.pwrite(4096, IoBuf::filled(4096, 4), WriteFlags::default())
                .await
                .unwrap();
            close(g, n).await;
        });
        check_clean(&copy);
        let out = qemu_io(
            &copy,
            &[
                "read -P 1 0 4k".into(),
                "read -P 4 4k 4k".into(),
                "read -P 1 8k 248k".into(),
                "read -P 2 8M 64k".into(),
                "read -P 3 1M 4k".into(),
                "read -P 3 5056k 4k".into(),
                "read -P 0 5060k 60k".into(),
            ],
        );
        assert!(
            !out.contains("Pattern verification failed"),
            "{mode:?}: {out}"
        );
    });
}

/// An unaligned refcount block offset does not stop the open (QEMU opens
/// such images too): data reads work, and the first write that needs the
/// refcounts fails, marking the image corrupt.
#[test]
fn unaligned_refcount_block_fails_only_when_used() {
    let d = Dir::new("unaligned-rb");
    let img = d.file("u.qcow2");
    create_qcow2(&img, "cluster_size=65536", 32 << 20);
    qemu_io(&img, &["write -P 5 0 64k".into()]);
    let rt = u64::from_be_bytes(std::fs::read(&img).unwrap()[48..56].try_into().unwrap());
    let e = u64::from_be_bytes(
        std::fs::read(&img).unwrap()[rt as usize..rt as usize + 8]
            .try_into()
            .unwrap(),
    );
    patch(&img, rt, &(e + 0x1000).to_be_bytes());
    on_engines(|g, mode| {
        let copy = d.file(&format!("u-{mode:?}.qcow2"));
        std::fs::copy(&img, &copy).unwrap();
        run(g, async {
            let n = open(g, &copy, false).await;
            let b = n.pread(0, IoBuf::zeroed(65536)).await.unwrap();
            assert!(b.iter().all(|&x| x == 5), "{mode:?}");
            let err = n
                .pwrite(1 << 20, IoBuf::filled(65536, 1), WriteFlags::default())
                .await
                .expect_err("a write needing refcounts");
            assert!(err.to_string().contains("unaligned"), "{mode:?}: {err}");
            drop(n);
            g.close_all().await.unwrap();
        });
        let info = qemu_img(&["info", "--output=json", "-U", &copy]);
        assert!(info.contains("\"corrupt\": true"), "{mode:?}: {info}");
    });
}

/// Lazy refcounts (from the header or the `lazy-refcounts` option): the
/// first allocating write marks the image dirty on disk, and a clean close
/// clears the bit; without them the bit is never set.
#[test]
fn lazy_refcounts_mark_the_image_dirty_until_close() {
    let d = Dir::new("lazy");
    let dirty_on_disk = |img: &str| std::fs::read(img).unwrap()[79] & 1 != 0;
    for (create, opt, lazy) in [
        ("lazy_refcounts=on", None, true),
        ("lazy_refcounts=on", Some(false), false),
        ("lazy_refcounts=off", Some(true), true),
        ("lazy_refcounts=off", None, false),
    ] {
        let img = d.file("l.qcow2");
        let _ = std::fs::remove_file(&img);
        create_qcow2(&img, create, 16 << 20);
        let el = EventLoop::new(AioMode::Threads).unwrap();
        let g = Rc::new(Graph::new(
            Rc::clone(el.context()),
            crate::registry(),
            EventBus::new(),
        ));
        run(&g, async {
            let mut o = q2_opts(&img);
            if let Some(v) = opt {
                o = o.with("lazy-refcounts", v);
            }
            let n = g.open(o).await.unwrap();
            assert!(!dirty_on_disk(&img), "{create} {opt:?}: dirty at open");
            n.pwrite(1 << 20, IoBuf::filled(65536, 9), WriteFlags::default())
                .await
                .unwrap();
            n.flush().await.unwrap();
            assert_eq!(dirty_on_disk(&img), lazy, "{create} {opt:?}");
            drop(n);
            g.close_all().await.unwrap();
        });
        assert!(!dirty_on_disk(&img), "{create} {opt:?}: dirty after close");
        check_clean(&img);
        let out = qemu_io(&img, &["read -P 9 1M 64k".into()]);
        assert!(!out.contains("verification failed"), "{out}");
    }
}

/// Requests over runs of compressed clusters are read together; clusters
/// packed by qemu-img, one rewritten plainly and one recompressed
/// elsewhere in the file must all read back whatever the request's
/// boundaries.
#[test]
fn reads_across_packed_compressed_clusters() {
    let d = Dir::new("cread");
    for ct in ["zlib", "zstd"] {
        on_engines(|g, mode| {
            let src = d.file("src.raw");
            let img = d.file("cr.qcow2");
            let _ = std::fs::remove_file(&img);
            let mut want = Vec::with_capacity(40 << 16);
            let mut r = Rng(7);
            for c in 0..40u64 {
                // Half noise, half a pattern: compressible, but not to nothing.
                for i in 0..65536u64 {
                    let x = if i < 32768 { r.next() } else { c * 7 + i / 512 };
                    want.push(x as u8);
                }
            }
            std::fs::write(&src, &want).unwrap();
            qemu_img(&[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct}"),
                &src,
                &img,
            ]);
            qemu_io(
                &img,
                &[
                    "write -P 0x55 320k 64k".into(),
                    "discard 576k 64k".into(),
                    "write -c -P 0x66 576k 64k".into(),
                ],
            );
            want[320 << 10..384 << 10].fill(0x55);
            want[576 << 10..640 << 10].fill(0x66);
            run(g, async {
                let n = open(g, &img, false).await;
                let all = n.pread(0, IoBuf::zeroed(want.len())).await.unwrap();
                assert!(all[..] == want[..], "{ct} {mode:?}: whole image");
                for (off, len) in [(1000u64, 300_000usize), (65535, 2), (500_000, 1 << 20)] {
                    let b = n.pread(off, IoBuf::zeroed(len)).await.unwrap();
                    let o = off as usize;
                    assert!(b[..] == want[o..o + len], "{ct} {mode:?}: {off}+{len}");
                }
                close(g, n).await;
            });
        });
    }
}

/// One compressed write over a run of clusters: compressible and
/// incompressible clusters mixed (packed bytes and plain clusters
/// interleave on the file), runs that cross L2 tables, a last cluster cut
/// short by the image end, and old clusters that are replaced.
#[test]
fn compressed_runs_mix_packed_and_plain_clusters() {
    use crate::qcow2::image::Image;
    let d = Dir::new("crun");
    for (cs, ct) in [(512u64, "zlib"), (4096, "zstd"), (65536, "zlib")] {
        on_engines(|g, mode| {
            let img = d.file("r.qcow2");
            let _ = std::fs::remove_file(&img);
            // 150 clusters and half of one more (sizes are whole sectors).
            let size = 150 * cs + (cs / 2).max(512);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs},compression_type={ct}"),
                &img,
                &size.to_string(),
            ]);
            qemu_io(&img, &[format!("write -P 0x11 0 {}", 20 * cs)]);
            let mut r = Rng(cs);
            let data: Vec<u8> = (0..size)
                .map(|i| {
                    let c = i / cs;
                    if c % 5 == 3 {
                        r.next() as u8
                    } else {
                        b'a' + (c % 23) as u8 + (i % 3) as u8
                    }
                })
                .collect();
            run(g, async {
                let im = Image::open(g, q2_opts(&img), true).await.unwrap();
                let e = im
                    .write_compressed(cs / 2, IoBuf::from_slice(&data[..cs as usize]))
                    .await;
                assert!(e.is_err(), "{mode:?}: unaligned run accepted");
                let e = im
                    .write_compressed(0, IoBuf::from_slice(&data[..cs as usize + 1]))
                    .await;
                assert!(e.is_err(), "{mode:?}: partial cluster accepted");
                // In three calls: the last one ends at the cut-short cluster.
                let (a, b) = ((40 * cs) as usize, (100 * cs) as usize);
                im.write_compressed(0, IoBuf::from_slice(&data[..a]))
                    .await
                    .unwrap();
                im.write_compressed(a as u64, IoBuf::from_slice(&data[a..b]))
                    .await
                    .unwrap();
                im.write_compressed(b as u64, IoBuf::from_slice(&data[b..]))
                    .await
                    .unwrap();
                im.close().await.unwrap();
            });
            check_clean(&img);
            let json = qemu_check_json(&img);
            // Every cluster but the random ones (every fifth) compresses.
            let clusters = size.div_ceil(cs);
            let random = (0..clusters).filter(|c| c % 5 == 3).count() as u64;
            assert_eq!(
                json_field(&json, "compressed-clusters"),
                clusters - random,
                "{cs} {mode:?} {json}"
            );
            let raw = raw_of(&img, &d);
            assert!(raw == data, "{cs} {ct} {mode:?}: data differs");
        });
    }
}

/// Offset of the first bitmap directory entry of a qcow2 v3 image.
fn first_bitmap_entry(img: &str) -> u64 {
    let h = std::fs::read(img).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
    let mut pos = be32(100) as usize;
    loop {
        let (ty, len) = (be32(pos), be32(pos + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            return u64::from_be_bytes(h[pos + 24..pos + 32].try_into().unwrap());
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
}

fn poke(img: &str, off: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Bitmaps that qemu-img stored load at open with their bits, flags and
/// QEMU's listing order; an all-ones table entry sets its whole range;
/// damaged entries refuse the open with an error naming the bitmap.
#[test]
fn persistent_bitmaps_load_at_open() {
    let d = Dir::new("bmload");
    on_engines(|g, mode| {
        let img = d.file("l.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "4M"]);
        qemu_img(&["bitmap", "--add", &img, "b0"]);
        qemu_img(&["bitmap", "--add", "-g", "512", &img, "fine"]);
        qemu_io(&img, &["write 64k 4k".into(), "write 1M 100k".into()]);
        qemu_img(&["bitmap", "--disable", &img, "fine"]);
        let dirty = |b: &block_core::DirtyBitmap| -> Vec<u64> {
            (0..b.size() / b.granularity())
                .filter(|i| b.is_dirty(i * b.granularity()))
                .map(|i| i * b.granularity())
                .collect()
        };
        run(g, async {
            let n = open(g, &img, true).await;
            let bms = n.dirty_bitmaps();
            let names: Vec<_> = bms.iter().map(|b| b.name().to_owned()).collect();
            assert_eq!(names, ["fine", "b0"], "{mode:?}");
            let (fine, b0) = (&bms[0], &bms[1]);
            assert!(b0.is_persistent() && b0.is_readonly() && !b0.is_inconsistent());
            assert!(b0.is_recording() && !fine.is_recording());
            assert_eq!(dirty(b0), [65536, 1 << 20, (1 << 20) + 65536]);
            assert_eq!(fine.count(), 4096 + 102400);
            close(g, n).await;
        });
        let entry = first_bitmap_entry(&img);
        let table = {
            let h = std::fs::read(&img).unwrap();
            u64::from_be_bytes(h[entry as usize..entry as usize + 8].try_into().unwrap())
        };
        // b0's only table entry: absent cluster, all ones.
        poke(&img, table, &1u64.to_be_bytes());
        run(g, async {
            let n = open(g, &img, true).await;
            let b0 = n.dirty_bitmap("b0").unwrap();
            assert_eq!(b0.count(), 4 << 20, "{mode:?}");
            close(g, n).await;
        });
        // Reserved bits in the entry, then a granularity QEMU refuses.
        for (at, bytes) in [
            (table, 0x0100_0000_0000_0000u64.to_be_bytes().to_vec()),
            (entry + 17, vec![8u8]),
        ] {
            let saved = std::fs::read(&img).unwrap();
            poke(&img, at, &bytes);
            run(g, async {
                let e = g.open(q2_opts(&img).with("read-only", true)).await.err();
                let e = e.expect("damaged bitmap accepted").to_string();
                assert!(e.contains("bitmap 'b0'"), "{mode:?}: {e}");
            });
            std::fs::write(&img, saved).unwrap();
        }
    });
}

/// Bitmaps stored at close come back with the same bits, across cluster
/// sizes (tables and data spanning several small clusters); storing again
/// frees the old tables (no leaks); a removed bitmap leaves the directory.
#[test]
fn persistent_bitmaps_store_at_close() {
    let d = Dir::new("bmstore");
    for cs in [512u64, 4096, 65536] {
        on_engines(|g, mode| {
            let img = d.file("s.qcow2");
            let _ = std::fs::remove_file(&img);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                &img,
                "8M",
            ]);
            qemu_img(&["bitmap", "--add", "-g", "512", &img, "own"]);
            qemu_img(&["bitmap", "--add", &img, "gone"]);
            let writes = [(0u64, 512u64), (3 << 20, 70_000), ((8 << 20) - 512, 512)];
            run(g, async {
                let n = open(g, &img, false).await;
                let mine = block_core::DirtyBitmap::new("mine", n.size(), 4096, false);
                n.add_dirty_bitmap(Rc::new(mine.persistent(false, false)))
                    .unwrap();
                for (o, l) in writes {
                    n.pwrite(o, IoBuf::filled(l as usize, 1), WriteFlags::default())
                        .await
                        .unwrap();
                }
                n.dirty_bitmap("mine").unwrap().set_dirty(1 << 20, 1);
                n.remove_dirty_bitmap("gone").unwrap();
                close(g, n).await;
            });
            check_clean(&img);
            let info = qemu_img(&["info", &img]);
            assert!(!info.contains("in-use") && !info.contains("gone"), "{info}");
            // Reopened read-write (stored again) and then read-only.
            for ro in [false, true] {
                run(g, async {
                    let n = open(g, &img, ro).await;
                    let own = n.dirty_bitmap("own").unwrap();
                    let want: u64 = writes.iter().map(|&(_, l)| l.div_ceil(512) * 512).sum();
                    assert_eq!(own.count(), want, "{cs} {mode:?}");
                    assert!(own.is_dirty(3 << 20) && !own.is_dirty(4 << 20));
                    let mine = n.dirty_bitmap("mine").unwrap();
                    assert!(!mine.is_recording(), "disabled stays disabled");
                    assert_eq!(mine.count(), 4096, "{cs} {mode:?}");
                    assert!(mine.is_dirty(1 << 20));
                    close(g, n).await;
                });
                check_clean(&img);
            }
        });
    }
}

/// A removed persistent bitmap leaves the image at once, as with QEMU:
/// the image read while the node is still open (a crash now) no longer
/// lists it and holds no corruption; the others stay, in use; a bitmap
/// added this session and never stored, and one in memory only, are
/// removed without touching the image.
#[test]
fn removed_persistent_bitmap_leaves_the_image_at_once() {
    let d = Dir::new("bmremove");
    on_engines(|g, mode| {
        let img = d.file("r.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
        for b in ["a", "gone", "c"] {
            qemu_img(&["bitmap", "--add", &img, b]);
        }
        qemu_io(&img, &["write 1M 64k".to_string()]);
        let stored = || {
            let info = qemu_img(&["info", "-U", &img]);
            info.lines()
                .filter_map(|l| l.trim().strip_prefix("name: "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        run(g, async {
            let n = open(g, &img, false).await;
            let fresh = block_core::DirtyBitmap::new("fresh", n.size(), 65536, true);
            n.add_dirty_bitmap(Rc::new(fresh.persistent(false, false)))
                .unwrap();
            let mem = block_core::DirtyBitmap::new("mem", n.size(), 65536, true);
            n.add_dirty_bitmap(Rc::new(mem)).unwrap();
            let gone = n.delete_dirty_bitmap("gone").await.unwrap();
            assert!(gone.is_some() && n.dirty_bitmap("gone").is_none());
            assert_eq!(stored(), ["a", "c"], "{mode:?}");
            let (_, text) = tool("qemu-img", &["check", "-U", &img]);
            assert!(
                !text.contains("ERROR") && !text.contains("corrupt"),
                "{text}"
            );
            for name in ["fresh", "mem"] {
                assert!(n.delete_dirty_bitmap(name).await.unwrap().is_some());
            }
            assert!(n.delete_dirty_bitmap("none").await.unwrap().is_none());
            assert_eq!(stored(), ["a", "c"], "{mode:?}");
            close(g, n).await;
        });
        check_clean(&img);
        assert_eq!(stored(), ["a", "c"], "{mode:?}");
        let info = qemu_img(&["info", &img]);
        assert!(!info.contains("in-use"), "{info}");
        // The last one out takes the extension with it.
        run(g, async {
            let n = open(g, &img, false).await;
            for name in ["a", "c"] {
                n.delete_dirty_bitmap(name).await.unwrap().unwrap();
            }
            assert!(stored().is_empty());
            close(g, n).await;
        });
        check_clean(&img);
    });
}

/// Autoclear bits the driver does not know are cleared by a writer, as
/// QEMU clears them (their data is no longer kept up to date); known ones
/// (bitmaps) stay, and a reader changes nothing.
#[test]
fn unknown_autoclear_bits_are_cleared_by_writers_like_qemu() {
    let d = Dir::new("autoclear");
    let autoclear = |img: &str| {
        let h = std::fs::read(img).unwrap();
        u64::from_be_bytes(h[88..96].try_into().unwrap())
    };
    on_engines(|g, mode| {
        let (ours, theirs) = (d.file("a.qcow2"), d.file("q.qcow2"));
        let _ = std::fs::remove_file(&ours);
        qemu_img(&["create", "-q", "-f", "qcow2", &ours, "4M"]);
        qemu_img(&["bitmap", "--add", &ours, "b0"]);
        let v = autoclear(&ours) | 1 << 5 | 1 << 63;
        poke(&ours, 88, &v.to_be_bytes());
        std::fs::copy(&ours, &theirs).unwrap();
        run(g, async {
            let n = open(g, &ours, true).await;
            close(g, n).await;
        });
        assert_eq!(autoclear(&ours), v, "{mode:?}: a reader keeps them");
        run(g, async {
            let n = open(g, &ours, false).await;
            close(g, n).await;
        });
        qemu_io(&theirs, &["read 0 4k".to_string()]);
        assert_eq!(autoclear(&ours), 1, "{mode:?}: the bitmaps bit stays");
        assert_eq!(autoclear(&ours), autoclear(&theirs), "{mode:?}");
        check_clean(&ours);
    });
}
