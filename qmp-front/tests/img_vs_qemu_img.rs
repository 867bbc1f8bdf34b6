//! Runs `strata-img` and `qemu-img` subcommands (create, info, map,
//! compare, convert, snapshot, resize, amend; check has its own file) with
//! the same command lines and
//! compares stdout, stderr (program names masked) and exit statuses; and
//! cross-checks images: what one tool writes, the other reads back. Every
//! external command runs under `timeout`. Fails loudly when QEMU is missing.

mod img_tool;

use std::path::Path;

use img_tool::*;

#[test]
fn create_matches_qemu_img() {
    let d = Scratch::new("create");
    for dir in [d.q(), d.s()] {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "3M"],
            &dir,
        );
    }
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "img", "1G"],
        &["create", "img", "10M"],
        &["create", "img", "1000"],
        &["create", "-f", "qcow2", "img", "1000"],
        &["create", "-q", "-f", "qcow2", "img", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,lazy_refcounts=on,refcount_bits=8,compression_type=zstd",
            "img",
            "100M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "img",
            "100M",
        ],
        &["create", "-f", "qcow2", "-o", "compat=0.10", "img", "1M"],
        &["create", "-f", "qcow2", "-o", "compat=v3", "img", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=falloc",
            "img",
            "3M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full,cluster_size=4k",
            "img",
            "5M",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=falloc",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "lazy_refcounts=on",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "img",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "img",
            "2G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "img",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nonexistent",
            "-F",
            "qcow2",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nonexistent",
            "-F",
            "qcow2",
            "img",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nonexistent",
            "img",
            "1M",
        ],
        // Errors, before and after the "Formatting" line.
        &["create", "-f", "qcow2", "-b", "base.qcow2", "img"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nonexistent",
            "-F",
            "qcow2",
            "img",
        ],
        &["create", "-f", "qcow2", "img"],
        &["create", "-f", "qcow2", "img", "1x"],
        &["create", "-f", "qcow2", "img", "-1"],
        &["create", "-f", "foo", "img", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=on",
            "img",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "bogus=1", "img", "1M"],
        &["create", "-f", "qcow2", "-o", "size=1M", "img", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=x",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=x",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=lz",
            "img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=bad",
            "img",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "compat=2", "img", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "img",
            "1M",
        ],
        &["create", "-f", "raw", "-b", "base.qcow2", "img", "1M"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=bad",
            "img",
            "1M",
        ],
        &["create", "-f", "qcow2", "img", "1M", "extra"],
        &["create"],
        &["create", "--bogus"],
        &["create", "-f", "raw", "img", "1E"],
        &["create", "-f", "qcow2", "img", "9E"],
    ];
    for args in cases {
        for dir in [d.q(), d.s()] {
            let _ = std::fs::remove_file(dir.join("img"));
        }
        let q = qemu_img(args, &d.q());
        let s = strata(args, &d.s());
        assert_eq!(s, q, "strata-img {args:?} differs from qemu-img");
        let (qi, si) = (d.q().join("img"), d.s().join("img"));
        if q.code == 0 {
            assert_eq!(read(&si), read(&qi), "{args:?}: image bytes differ");
            // And qemu-img accepts it (with its backing file, if any).
            if !args.contains(&"-u") {
                let c = qemu_img(&["check", "img"], &d.s());
                assert!(c.code == 0 || c.code == 63, "{args:?}: {c:?}");
            }
        } else {
            assert_eq!(si.exists(), qi.exists(), "{args:?}: leftover file");
        }
    }
}

/// Images preallocated with `falloc` and `full` look the same to QEMU's
/// tools whichever program made them: info, map and check agree, and the
/// data area is really allocated in the file.
#[test]
fn create_preallocated_matches_qemu_img() {
    let d = Scratch::new("prealloc");
    for opts in [
        "preallocation=falloc",
        "preallocation=full",
        "preallocation=falloc,cluster_size=16k,extended_l2=on",
        "preallocation=full,compat=0.10",
    ] {
        let args = ["create", "-q", "-f", "qcow2", "-o", opts, "img", "6M"];
        for dir in [d.q(), d.s()] {
            let _ = std::fs::remove_file(dir.join("img"));
        }
        must("qemu-img", &args, &d.q());
        must(STRATA, &args, &d.s());
        assert_eq!(read(&d.s().join("img")), read(&d.q().join("img")), "{opts}");
        for cmd in [
            &["info", "--output=json", "img"][..],
            &["map", "--output=json", "img"],
            &["check", "img"],
        ] {
            // The file system may count extent-tree blocks in st_blocks
            // differently for the two files, so actual-size is left out.
            let strip = |o: Out| {
                o.stdout
                    .lines()
                    .filter(|l| !l.contains("\"actual-size\""))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let q = strip(must("qemu-img", cmd, &d.q()));
            let s = strip(must("qemu-img", cmd, &d.s()));
            assert_eq!(s, q, "{opts}: qemu-img {cmd:?} differs");
        }
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(d.s().join("img")).unwrap().blocks();
        assert!(blocks * 512 >= 6 << 20, "{opts}: data area not allocated");
        must(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "qcow2", "img", "../q/img"],
            &d.s(),
        );
    }
}

/// Images with an external data file: both tools print and write the same
/// (image and data file), QEMU writes through a Strata-made image into the
/// data file, and Strata reads what QEMU wrote through its own image.
#[test]
fn create_data_file_matches_qemu_img() {
    let d = Scratch::new("datafile");
    let cases: &[&str] = &[
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,preallocation=metadata,cluster_size=4k",
        "data_file=d.raw,preallocation=falloc,extended_l2=on",
        "data_file=d.raw,data_file_raw=on,preallocation=full",
        // Errors, and no file left behind.
        "data_file=d.raw,compat=0.10",
        "data_file_raw=on",
        "data_file=d.raw,data_file_raw=on,backing_file=b,backing_fmt=raw",
        "data_file=",
        "data_file=nodir/d.raw",
    ];
    for o in cases {
        for dir in [d.q(), d.s()] {
            for f in ["t.qcow2", "d.raw"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
        let args = ["create", "-f", "qcow2", "-o", o, "t.qcow2", "3M"];
        let q = qemu_img(&args, &d.q());
        let s = strata(&args, &d.s());
        assert_eq!(s, q, "strata-img {args:?} differs from qemu-img");
        for f in ["t.qcow2", "d.raw"] {
            let (qf, sf) = (d.q().join(f), d.s().join(f));
            assert_eq!(sf.exists(), qf.exists(), "{o}: {f} left behind or missing");
            if qf.exists() {
                assert_eq!(read(&sf), read(&qf), "{o}: {f} bytes differ");
            }
        }
        if q.code != 0 {
            continue;
        }
        let c = must("qemu-img", &["check", "t.qcow2"], &d.s());
        assert_eq!(c, must("qemu-img", &["check", "t.qcow2"], &d.q()), "{o}");
        // QEMU writes through the Strata-made image: the bytes land at the
        // same offsets of the data file.
        qemu_io(
            "t.qcow2",
            "qcow2",
            &["write -P 0x5a 64k 64k", "write -P 0xa5 2M 4k"],
            &d.s(),
        );
        let raw = read(&d.s().join("d.raw"));
        assert!(raw[65536..131072].iter().all(|&b| b == 0x5a), "{o}");
        assert!(
            raw[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0xa5),
            "{o}"
        );
        assert_eq!(read(&d.s().join("t.qcow2")).len() % 512, 0, "{o}");
        must("qemu-img", &["check", "t.qcow2"], &d.s());
        // Strata reads what QEMU wrote through QEMU's image.
        qemu_io(
            "t.qcow2",
            "qcow2",
            &["write -P 0x5a 64k 64k", "write -P 0xa5 2M 4k"],
            &d.q(),
        );
        let cmp = strata(
            &["compare", "-f", "qcow2", "-F", "raw", "t.qcow2", "d.raw"],
            &d.q(),
        );
        assert_eq!(cmp.code, 0, "{o}: {cmp:?}");
        let conv = strata(&["convert", "-O", "raw", "t.qcow2", "out.raw"], &d.q());
        assert_eq!(conv.code, 0, "{o}: {conv:?}");
        assert_eq!(
            read(&d.q().join("out.raw")),
            read(&d.q().join("d.raw")),
            "{o}"
        );
        let _ = std::fs::remove_file(d.q().join("out.raw"));
        let qi = must("qemu-img", &["info", "--output=json", "t.qcow2"], &d.q());
        let si = strata(&["info", "--output=json", "t.qcow2"], &d.q());
        assert_eq!(si, qi, "{o}: info differs");
    }
}

#[test]
fn info_matches_qemu_img() {
    let d = Scratch::new("info");
    let dir = d.q();
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
        &dir,
    );
    qemu_io(
        "a.qcow2",
        "qcow2",
        &["write -P 0xaa 0 128k", "write -z 1M 64k", "write 3M 4k"],
        &dir,
    );
    must("qemu-img", &["snapshot", "-c", "snap1", "a.qcow2"], &dir);
    must("qemu-img", &["snapshot", "-c", "second", "a.qcow2"], &dir);
    must(
        "qemu-img",
        &["create", "-q", "-f", "raw", "b.raw", "10M"],
        &dir,
    );
    qemu_io("b.raw", "raw", &["write -P 1 64k 64k"], &dir);
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "c.qcow2",
            "1M",
        ],
        &dir,
    );
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../a.qcow2",
            "-F",
            "qcow2",
            "sub/d.qcow2",
        ],
        &dir,
    );
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,lazy_refcounts=on,refcount_bits=8,compression_type=zstd,extended_l2=off",
            "e.qcow2",
            "100M",
        ],
        &dir,
    );
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "g.qcow2", "1M"],
        &dir,
    );
    must(
        "qemu-img",
        &["bitmap", "--add", "-g", "128k", "g.qcow2", "b1"],
        &dir,
    );
    must(
        "qemu-img",
        &["bitmap", "--add", "--disable", "g.qcow2", "b0"],
        &dir,
    );
    let abs = dir.join("b.raw").to_string_lossy().into_owned();
    for f in [
        "a.qcow2",
        "b.raw",
        "c.qcow2",
        "sub/d.qcow2",
        "e.qcow2",
        "g.qcow2",
        &abs,
        "missing",
    ] {
        same(&["info", f], &dir);
        same(&["info", "--output=json", f], &dir);
        same(&["info", "-U", "--output", "json", f], &dir);
    }
    same(&["info", "-b", "sub/d.qcow2"], &dir);
    same(
        &["info", "--backing-chain", "--output=json", "sub/d.qcow2"],
        &dir,
    );
    same(&["info", "-b", "--output=json", "b.raw"], &dir);
    same(&["info", "-f", "qcow2", "b.raw"], &dir);
    same(&["info", "-f", "raw", "a.qcow2"], &dir);
    same(&["info", "--output=xml", "b.raw"], &dir);
    same(&["info"], &dir);
    same(&["check", "-U", "-r", "leaks", "a.qcow2"], &dir);
    same(&["snapshot", "-U", "-c", "x", "a.qcow2"], &dir);
    same(&["compare", "-T", "bogus", "a.qcow2", "a.qcow2"], &dir);
    same(
        &["convert", "-T", "bogus", "-O", "raw", "a.qcow2", "out.raw"],
        &dir,
    );
    same(
        &["convert", "-t", "bogus", "-O", "raw", "a.qcow2", "out.raw"],
        &dir,
    );
    same(&["info", "a.qcow2", "b.raw"], &dir);
}

#[test]
fn map_matches_qemu_img() {
    let d = Scratch::new("map");
    let dir = d.q();
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "m1.qcow2", "4M"],
        &dir,
    );
    qemu_io(
        "m1.qcow2",
        "qcow2",
        &[
            "write -P 0xaa 0 128k",
            "write -z 1M 64k",
            "write 3M 64k",
            "write -c 2M 64k",
        ],
        &dir,
    );
    must(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "m1.qcow2", "-F", "qcow2", "m2.qcow2", "8M",
        ],
        &dir,
    );
    qemu_io(
        "m2.qcow2",
        "qcow2",
        &["write -P 1 64k 64k", "write -z 3M 64k"],
        &dir,
    );
    must(
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "10M"],
        &dir,
    );
    qemu_io(
        "r.raw",
        "raw",
        &["write -P 1 64k 64k", "write -P 2 5M 1M"],
        &dir,
    );
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "4M",
        ],
        &dir,
    );
    qemu_io(
        "x.qcow2",
        "qcow2",
        &["write -P 3 0 64k", "write -z 64k 32k"],
        &dir,
    );
    for f in ["m1.qcow2", "m2.qcow2", "r.raw", "x.qcow2", "missing"] {
        same(&["map", f], &dir);
        same(&["map", "--output=json", f], &dir);
    }
    same(
        &[
            "map",
            "--output=json",
            "--start-offset",
            "1M",
            "--max-length",
            "2M",
            "m2.qcow2",
        ],
        &dir,
    );
    same(&["map", "-f", "raw", "--output=json", "m1.qcow2"], &dir);
    same(&["map"], &dir);
}

#[test]
fn compare_matches_qemu_img() {
    let d = Scratch::new("compare");
    let dir = d.q();
    for (name, size) in [("r1.raw", "1M"), ("r2.raw", "2M"), ("r3.raw", "2M")] {
        must("qemu-img", &["create", "-q", "-f", "raw", name, size], &dir);
    }
    qemu_io("r3.raw", "raw", &["write -P 3 1573865 1"], &dir);
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "q1.qcow2", "1M"],
        &dir,
    );
    qemu_io("q1.qcow2", "qcow2", &["write -P 3 1001 1"], &dir);
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "m1.qcow2", "4M"],
        &dir,
    );
    qemu_io(
        "m1.qcow2",
        "qcow2",
        &["write -P 0xaa 0 128k", "write -c 2M 64k"],
        &dir,
    );
    must(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "m1.qcow2", "-F", "qcow2", "m2.qcow2", "8M",
        ],
        &dir,
    );
    qemu_io("m2.qcow2", "qcow2", &["write -P 1 64k 64k"], &dir);
    must(
        "qemu-img",
        &["convert", "-O", "raw", "m2.qcow2", "m2.raw"],
        &dir,
    );
    let cases: &[&[&str]] = &[
        &["compare", "r1.raw", "r2.raw"],
        &["compare", "-s", "r1.raw", "r2.raw"],
        &["compare", "r1.raw", "r3.raw"],
        &["compare", "r3.raw", "r1.raw"],
        &["compare", "-q", "r3.raw", "r1.raw"],
        &["compare", "-f", "raw", "-F", "raw", "r2.raw", "r3.raw"],
        &["compare", "q1.qcow2", "r1.raw"],
        &["compare", "-f", "qcow2", "r1.raw", "q1.qcow2"],
        &["compare", "r1.raw", "missing"],
        &["compare", "r1.raw"],
        &["compare", "m1.qcow2", "m2.qcow2"],
        &["compare", "m2.qcow2", "m2.raw"],
        &["compare", "m2.raw", "m2.qcow2"],
        &["compare", "-s", "m2.qcow2", "m2.qcow2"],
    ];
    for args in cases {
        same(args, &dir);
    }
}

/// Images strata-img creates work with QEMU, and images QEMU writes read
/// back the same through strata-img.
#[test]
fn images_cross_check() {
    let d = Scratch::new("cross");
    let (q, s) = (d.q(), d.s());
    let opts = [
        "cluster_size=64k",
        "cluster_size=4k,refcount_bits=1",
        "compat=0.10",
        "extended_l2=on",
    ];
    for o in opts {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, "img.qcow2", "8M"],
            &q,
        );
        must(
            STRATA,
            &["create", "-q", "-f", "qcow2", "-o", o, "img.qcow2", "8M"],
            &s,
        );
        for dir in [&q, &s] {
            qemu_io(
                "img.qcow2",
                "qcow2",
                &[
                    "write -P 0x11 0 100k",
                    "write -z 1M 64k",
                    "write -c 2M 64k",
                    "write -P 7 7M 4k",
                ],
                dir,
            );
        }
        let qi = q.join("img.qcow2").to_string_lossy().into_owned();
        let si = s.join("img.qcow2").to_string_lossy().into_owned();
        assert_eq!(qemu_img(&["check", &si], &s).code, 0, "{o}");
        assert_eq!(qemu_img(&["compare", &si, &qi], &s).code, 0, "{o}");
        assert_eq!(strata(&["compare", &si, &qi], &s).code, 0, "{o}");
        assert_eq!(strata(&["check", &si], &s).code, 0, "{o}");
        // Partly written clusters with subclusters are mapped differently
        // (see the module documentation of map).
        if !o.contains("extended_l2") {
            let a = qemu_img(&["map", "--output=json", &si], &s);
            let b = strata(&["map", "--output=json", &si], &s);
            assert_eq!(a, b, "{o}");
        }
    }
}

#[test]
fn convert_matches_qemu_img() {
    let d = Scratch::new("convert");
    let dir = d.q();
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "m1.qcow2", "4M"],
        &dir,
    );
    qemu_io(
        "m1.qcow2",
        "qcow2",
        &[
            "write -P 0xaa 0 128k",
            "write -z 1M 64k",
            "write 3M 64k",
            "write -c 2M 64k",
        ],
        &dir,
    );
    must(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "m1.qcow2", "-F", "qcow2", "m2.qcow2", "8M",
        ],
        &dir,
    );
    qemu_io(
        "m2.qcow2",
        "qcow2",
        &["write -P 1 64k 64k", "write -z 3M 64k", "write -P 5 6M 10k"],
        &dir,
    );
    must(
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "10M"],
        &dir,
    );
    qemu_io(
        "r.raw",
        "raw",
        &["write -P 1 64k 64k", "write -P 2 5M 1M", "write -z 5M 4k"],
        &dir,
    );
    // Command-line and setup errors.
    let errors: &[&[&str]] = &[
        &["convert", "-c", "-O", "raw", "m2.qcow2", "out"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "m2.qcow2",
            "out",
        ],
        &["convert", "-O", "foo", "m2.qcow2", "out"],
        &["convert", "-O", "qcow2", "missing", "out"],
        &["convert", "-O", "qcow2", "m2.qcow2"],
        &["convert", "-O", "qcow2", "-o", "bogus=1", "m2.qcow2", "out"],
        &["convert", "-O", "qcow2", "-S", "3", "m2.qcow2", "out"],
    ];
    for args in errors {
        same(args, &dir);
        let _ = std::fs::remove_file(dir.join("out"));
    }
    let modes: &[&[&str]] = &[
        &["-O", "qcow2"],
        &["-O", "raw"],
        &["-c", "-O", "qcow2"],
        &["-O", "qcow2", "-S", "0"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,compression_type=zstd",
            "-c",
        ],
        &["-q", "-O", "qcow2", "-o", "compat=0.10"],
        &["-t", "none", "-T", "none", "-O", "qcow2"],
        &["-t", "none", "-c", "-O", "qcow2"],
        &["-t", "writethrough", "-T", "directsync", "-O", "raw"],
        &["-t", "writeback", "-c", "-O", "qcow2"],
    ];
    for mode in modes {
        for src in ["m1.qcow2", "m2.qcow2", "r.raw"] {
            let mut qa = vec!["convert"];
            qa.extend_from_slice(mode);
            let mut sa = qa.clone();
            qa.extend_from_slice(&[src, "outq"]);
            sa.extend_from_slice(&[src, "outs"]);
            let q = qemu_img(&qa, &dir);
            let s = strata(&sa, &dir);
            assert_eq!(s, q, "{sa:?}");
            assert_eq!(s.code, 0, "{sa:?}");
            assert_eq!(
                qemu_img(&["compare", "outq", "outs"], &dir).code,
                0,
                "{sa:?}"
            );
            assert_eq!(qemu_img(&["compare", src, "outs"], &dir).code, 0, "{sa:?}");
            assert_eq!(strata(&["compare", src, "outs"], &dir).code, 0, "{sa:?}");
            if mode.contains(&"qcow2") {
                assert_eq!(qemu_img(&["check", "outs"], &dir).code, 0, "{sa:?}");
            }
            // Same allocation as qemu-img's output (compressed layouts
            // differ: one host cluster per compressed cluster).
            if !mode.contains(&"-c") {
                assert_eq!(
                    strata(&["map", "--output=json", "outs"], &dir).stdout,
                    qemu_img(&["map", "--output=json", "outq"], &dir).stdout,
                    "{sa:?}"
                );
            }
        }
    }
}

/// Data written by qemu-io into images of every kind reads back through
/// strata-img convert unchanged.
/// convert's `-n`, `-W`, `-m`, `-B`/`-F` and `-p`: same output (progress
/// lines included), same exit status and the same target as qemu-img.
#[test]
fn convert_options_match_qemu_img() {
    let d = Scratch::new("convopts");
    for dir in [d.q(), d.s()] {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"],
            &dir,
        );
        qemu_io(
            "src.qcow2",
            "qcow2",
            &["write -P 1 0 1M", "write -P 2 3M 512k"],
            &dir,
        );
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
            &dir,
        );
        qemu_io("base.qcow2", "qcow2", &["write -P 1 0 2M"], &dir);
        must(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            &dir,
        );
        qemu_io(
            "top.qcow2",
            "qcow2",
            &["write -P 3 1M 64k", "write -z 1536k 64k"],
            &dir,
        );
        must(
            "qemu-img",
            &["create", "-q", "-f", "raw", "small.raw", "1M"],
            &dir,
        );
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "e.q", "4M"],
            &dir,
        );
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "ec.q", "4M"],
            &dir,
        );
        qemu_io("e.q", "qcow2", &["write -P 9 0 4M"], &dir);
    }
    // (arguments, target whose bytes must match; None: compare contents)
    let cases: &[(&[&str], Option<&str>)] = &[
        (
            &["convert", "-p", "-O", "raw", "src.qcow2", "o.raw"],
            Some("o.raw"),
        ),
        (
            &["convert", "-p", "-O", "qcow2", "top.qcow2", "o.q"],
            Some("o.q"),
        ),
        (
            &[
                "convert",
                "-p",
                "-m",
                "3",
                "-O",
                "qcow2",
                "top.qcow2",
                "m3.q",
            ],
            Some("m3.q"),
        ),
        (
            &[
                "convert",
                "-p",
                "-m",
                "1",
                "-S",
                "0",
                "-O",
                "qcow2",
                "src.qcow2",
                "s0.q",
            ],
            Some("s0.q"),
        ),
        (
            &[
                "convert",
                "-W",
                "-m",
                "0x10",
                "-O",
                "raw",
                "src.qcow2",
                "w.raw",
            ],
            Some("w.raw"),
        ),
        (
            &[
                "convert",
                "-p",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "b1.q",
            ],
            Some("b1.q"),
        ),
        (
            &[
                "convert",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "src.qcow2",
                "b2.q",
            ],
            Some("b2.q"),
        ),
        // -n: zeros of the source overwrite the target's data. How the qcow2
        // driver zeroes allocated clusters is its own business, so only the
        // contents are compared.
        (
            &["convert", "-p", "-n", "-O", "qcow2", "src.qcow2", "e.q"],
            None,
        ),
        (
            &[
                "convert",
                "-n",
                "-B",
                "base.qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "ec.q",
            ],
            Some("ec.q"),
        ),
        (
            &["convert", "-p", "-c", "-O", "qcow2", "src.qcow2", "c.q"],
            None,
        ),
        (
            &[
                "convert",
                "-c",
                "-W",
                "-m",
                "2",
                "-O",
                "qcow2",
                "top.qcow2",
                "c2.q",
            ],
            None,
        ),
        // Errors.
        (
            &[
                "convert",
                "-p",
                "-B",
                "base.qcow2",
                "-O",
                "qcow2",
                "src.qcow2",
                "x.q",
            ],
            None,
        ),
        (
            &[
                "convert",
                "-p",
                "-B",
                "base.qcow2",
                "-O",
                "raw",
                "src.qcow2",
                "x.q",
            ],
            None,
        ),
        (
            &[
                "convert",
                "-p",
                "-n",
                "-O",
                "raw",
                "src.qcow2",
                "nonexistent",
            ],
            None,
        ),
        (
            &["convert", "-p", "-n", "-O", "raw", "src.qcow2", "small.raw"],
            None,
        ),
        (
            &[
                "convert",
                "-p",
                "-n",
                "-o",
                "cluster_size=4k",
                "src.qcow2",
                "small.raw",
            ],
            None,
        ),
        (&["convert", "-m", "0", "src.qcow2", "x.raw"], None),
        (&["convert", "-m", "17", "src.qcow2", "x.raw"], None),
        (&["convert", "-m", "1k", "src.qcow2", "x.raw"], None),
        (&["convert", "-m", "", "src.qcow2", "x.raw"], None),
        (
            &["convert", "-p", "-O", "raw", "nonexistent", "x.raw"],
            None,
        ),
    ];
    for (args, same_bytes) in cases {
        let q = qemu_img(args, &d.q());
        let s = strata(args, &d.s());
        assert_eq!(s, q, "strata-img {args:?} differs from qemu-img");
        let target = args[args.len() - 1];
        if let Some(t) = same_bytes {
            let same = read(&d.s().join(t)) == read(&d.q().join(t));
            assert!(same, "{args:?}: {t} differs from qemu-img's");
        } else if q.code == 0 {
            must(
                "qemu-img",
                &["compare", target, &format!("../q/{target}")],
                &d.s(),
            );
        }
        if q.code == 0 && target.ends_with(".q") {
            must("qemu-img", &["check", target], &d.s());
        }
    }
}

#[test]
fn convert_reads_qemu_io_data() {
    let d = Scratch::new("readback");
    let dir = d.q();
    for o in [
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "compression_type=zstd",
    ] {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, "src.qcow2", "6M"],
            &dir,
        );
        qemu_io(
            "src.qcow2",
            "qcow2",
            &[
                "write -P 0x5a 1000 70000",
                "write -c 4M 2M",
                "write -z 100k 8k",
                "write -P 9 5999k 1k",
            ],
            &dir,
        );
        let _ = std::fs::remove_file(dir.join("out.raw"));
        must(
            STRATA,
            &["convert", "-O", "raw", "src.qcow2", "out.raw"],
            &dir,
        );
        must(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0x5a 1000 70000",
                "-c",
                "read -P 9 5999k 1k",
                "out.raw",
            ],
            &dir,
        );
        assert_eq!(
            qemu_img(&["compare", "src.qcow2", "out.raw"], &dir).code,
            0,
            "{o}"
        );
        assert_eq!(
            strata(&["compare", "src.qcow2", "out.raw"], &dir).code,
            0,
            "{o}"
        );
    }
}

/// Masks the creation dates in snapshot lists (the two tools create their
/// snapshots at different times).
fn mask_dates(o: Out) -> Out {
    let stdout = o
        .stdout
        .lines()
        .map(|l| {
            // "ID TAG VM_SIZE YYYY-MM-DD HH:MM:SS VM_CLOCK ICOUNT"
            match l.find(" 20") {
                Some(i) if l.len() >= i + 20 && l.as_bytes()[i + 5] == b'-' => {
                    format!("{}DATE{}", &l[..i + 1], &l[i + 20..])
                }
                _ => l.to_owned(),
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    Out { stdout, ..o }
}

#[test]
fn snapshot_matches_qemu_img() {
    let d = Scratch::new("snapshot");
    // The same sequence of commands on two copies of one image, one copy
    // per tool.
    for dir in [d.q(), d.s()] {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "sn.qcow2", "1M"],
            &dir,
        );
        qemu_io("sn.qcow2", "qcow2", &["write -P 1 0 64k"], &dir);
        must(
            "qemu-img",
            &["create", "-q", "-f", "raw", "r.raw", "1M"],
            &dir,
        );
    }
    let steps: &[&[&str]] = &[
        &["snapshot", "sn.qcow2"],
        &["snapshot", "-c", "s1", "sn.qcow2"],
        &["snapshot", "-c", "s1", "sn.qcow2"],
        &["snapshot", "-l", "-c", "x", "sn.qcow2"],
        &["snapshot", "-d", "nope", "sn.qcow2"],
        &["snapshot", "-a", "nope", "sn.qcow2"],
        &["snapshot", "-c", "s2", "r.raw"],
        &["snapshot", "-l", "r.raw"],
        &["snapshot", "-d", "s2", "-f", "raw", "r.raw"],
        &["snapshot", "-a", "s2", "-f", "raw", "r.raw"],
        &["snapshot", "-d", "s1", "sn.qcow2"],
        &["snapshot", "-l", "sn.qcow2"],
        &["snapshot", "-c", "s3", "sn.qcow2"],
        &["snapshot", "-a", "2", "sn.qcow2"],
        &["snapshot", "-d", "2", "sn.qcow2"],
        &["snapshot", "-l", "sn.qcow2"],
        &["snapshot", "-l", "-U", "sn.qcow2"],
        &["snapshot"],
        &["snapshot", "-l", "missing"],
        &["info", "sn.qcow2"],
    ];
    for args in steps {
        let q = mask_dates(qemu_img(args, &d.q()));
        let s = mask_dates(strata(args, &d.s()));
        // The tools place snapshot tables differently: sizes on disk differ.
        if args[0] == "info" {
            assert_eq!(s.code, q.code);
            let cut = |o: &Out| {
                o.stdout.split("Format specific").next().map(|x| {
                    x.lines()
                        .filter(|l| !l.starts_with("disk size"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            };
            assert_eq!(cut(&s), cut(&q), "{args:?}");
        } else {
            assert_eq!(s, q, "strata-img {args:?} differs from qemu-img");
        }
    }
    assert_eq!(qemu_img(&["check", "sn.qcow2"], &d.s()).code, 0);
}

#[test]
fn snapshots_cross_tools() {
    let d = Scratch::new("snapcross");
    let dir = d.q();
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "x.qcow2", "4M"],
        &dir,
    );
    qemu_io("x.qcow2", "qcow2", &["write -P 1 0 1M"], &dir);
    must("qemu-img", &["snapshot", "-c", "by-qemu", "x.qcow2"], &dir);
    qemu_io("x.qcow2", "qcow2", &["write -P 2 0 1M"], &dir);
    must(STRATA, &["snapshot", "-c", "by-strata", "x.qcow2"], &dir);
    qemu_io("x.qcow2", "qcow2", &["write -P 3 0 64k"], &dir);
    // Both tools list both snapshots the same way.
    let q = mask_dates(must("qemu-img", &["snapshot", "-l", "x.qcow2"], &dir));
    let s = mask_dates(must(STRATA, &["snapshot", "-l", "x.qcow2"], &dir));
    assert_eq!(s, q);
    assert!(s.stdout.contains("by-qemu") && s.stdout.contains("by-strata"));
    let q = must("qemu-img", &["info", "--output=json", "x.qcow2"], &dir);
    let s = must(STRATA, &["info", "--output=json", "x.qcow2"], &dir);
    let snaps = |o: &Out| {
        o.stdout
            .split("\"snapshots\"")
            .nth(1)
            .and_then(|x| x.split(']').next())
            .map(str::to_owned)
    };
    assert_eq!(snaps(&s), snaps(&q));
    // Applying either one with the other tool restores its data.
    must(STRATA, &["snapshot", "-a", "by-qemu", "x.qcow2"], &dir);
    must(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 1 0 1M", "x.qcow2"],
        &dir,
    );
    must(
        "qemu-img",
        &["snapshot", "-a", "by-strata", "x.qcow2"],
        &dir,
    );
    must(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 2 0 1M", "x.qcow2"],
        &dir,
    );
    must(STRATA, &["snapshot", "-d", "by-qemu", "x.qcow2"], &dir);
    must(
        "qemu-img",
        &["snapshot", "-d", "by-strata", "x.qcow2"],
        &dir,
    );
    assert_eq!(
        must(STRATA, &["snapshot", "-l", "x.qcow2"], &dir).stdout,
        ""
    );
    assert_eq!(qemu_img(&["check", "x.qcow2"], &dir).code, 0);
    assert_eq!(strata(&["check", "x.qcow2"], &dir).code, 0);
}

#[test]
fn resize_matches_qemu_img() {
    let d = Scratch::new("resize");
    for dir in [d.q(), d.s()] {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "rz.qcow2", "4M"],
            &dir,
        );
        qemu_io(
            "rz.qcow2",
            "qcow2",
            &["write -P 1 0 1M", "write -P 2 3M 64k"],
            &dir,
        );
        must(
            "qemu-img",
            &["create", "-q", "-f", "raw", "rz.raw", "4M"],
            &dir,
        );
        qemu_io("rz.raw", "raw", &["write -P 3 0 8k"], &dir);
    }
    let steps: &[&[&str]] = &[
        &["resize", "rz.qcow2", "8M"],
        &["resize", "rz.qcow2", "+1M"],
        &["resize", "rz.qcow2", "-1M"],
        &["resize", "--shrink", "rz.qcow2", "-1M"],
        &["resize", "--shrink", "rz.qcow2", "3584k"],
        &["resize", "-q", "rz.qcow2", "6M"],
        &["resize", "rz.qcow2", "1000"],
        &["resize", "--shrink", "rz.qcow2", "1000"],
        &["resize", "rz.qcow2", "0x"],
        &["resize", "rz.qcow2", "-5G"],
        &["resize", "rz.qcow2"],
        &["resize"],
        &["resize", "missing", "1M"],
        &["resize", "rz.raw", "1M"],
        &["resize", "-f", "raw", "rz.raw", "1M"],
        &["resize", "--shrink", "-f", "raw", "rz.raw", "1M"],
        &["resize", "-f", "raw", "rz.raw", "+3000"],
        &["resize", "rz.raw", "1M", "2M"],
        &["resize", "-f", "qcow2", "rz.raw", "1M"],
        &["info", "--output=json", "-f", "raw", "rz.raw"],
        &["map", "--output=json", "rz.qcow2"],
        &["check", "rz.qcow2"],
        &["compare", "../q/rz.qcow2", "../s/rz.qcow2"],
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "../q/rz.raw",
            "../s/rz.raw",
        ],
    ];
    for args in steps {
        let q = qemu_img(args, &d.q());
        let s = strata(args, &d.s());
        let s = Out {
            stdout: s.stdout.replace("../q/", "X/").replace("../s/", "X/"),
            ..s
        };
        let q = Out {
            stdout: q.stdout.replace("../q/", "X/").replace("../s/", "X/"),
            ..q
        };
        assert_eq!(s, q, "strata-img {args:?} differs from qemu-img");
    }
    // Data below the new end survives, and qemu-io reads it back.
    must(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 1 0 1M",
            "-c",
            "read -P 2 3M 64k",
            "rz.qcow2",
        ],
        &d.s(),
    );
}

/// amend: the header-only changes give qemu-img's bytes; errors give its
/// messages; what this build refuses leaves the image untouched and valid.
#[test]
fn amend_matches_qemu_img() {
    let d = Scratch::new("amend");
    let setup = |dir: &Path| {
        for f in std::fs::read_dir(dir).expect("scratch dir") {
            let _ = std::fs::remove_file(f.expect("entry").path());
        }
        let create = |o: &str, name: &str| {
            let mut a = vec!["create", "-q", "-f", "qcow2"];
            if !o.is_empty() {
                a.extend(["-o", o]);
            }
            a.extend([name, "1M"]);
            must("qemu-img", &a, dir);
        };
        create("", "v3.q");
        create("compat=0.10", "v2.q");
        create("lazy_refcounts=on", "lz.q");
        create("compression_type=zstd", "zs.q");
        create("compression_type=zstd", "zc.q");
        qemu_io("zc.q", "qcow2", &["write -c 0 64k"], dir);
        create("extended_l2=on", "x2.q");
        create("refcount_bits=8", "r8.q");
        create("", "z.q");
        qemu_io(
            "z.q",
            "qcow2",
            &["write -P 1 0 128k", "write -z 0 64k", "write -z 512k 64k"],
            dir,
        );
        create("data_file=d.raw", "df.q");
        create("data_file=dr.raw,data_file_raw=on", "dr.q");
        must(
            "qemu-img",
            &["create", "-q", "-f", "raw", "d2.raw", "1M"],
            dir,
        );
        must(
            "qemu-img",
            &["create", "-q", "-f", "raw", "r.raw", "1M"],
            dir,
        );
        // Internal snapshots across an upgrade and a downgrade, with zero
        // clusters (plain and preallocated) in snapshot and active tables.
        create("compat=0.10", "sn2.q");
        qemu_io("sn2.q", "qcow2", &["write -P 1 0 128k"], dir);
        must("qemu-img", &["snapshot", "-c", "s1", "sn2.q"], dir);
        qemu_io("sn2.q", "qcow2", &["write -P 2 0 64k"], dir);
        create("", "sn3.q");
        qemu_io(
            "sn3.q",
            "qcow2",
            &["write -P 1 0 128k", "write -z 512k 64k"],
            dir,
        );
        must("qemu-img", &["snapshot", "-c", "s1", "sn3.q"], dir);
        qemu_io(
            "sn3.q",
            "qcow2",
            &["write -P 2 0 64k", "write -z 0 64k", "write -z 640k 64k"],
            dir,
        );
    };
    setup(&d.q());
    setup(&d.s());
    // Snapshots carry their creation time: both tools get the same bytes.
    for img in ["sn2.q", "sn3.q"] {
        std::fs::copy(d.q().join(img), d.s().join(img)).unwrap();
    }
    let cases: &[&[&str]] = &[
        &["amend", "-p", "-o", "compat=1.1", "sn2.q"],
        &["amend", "-p", "-o", "compat=0.10", "sn3.q"],
        &["amend", "-p", "-o", "lazy_refcounts=on", "v3.q"],
        &["amend", "-o", "lazy_refcounts=off", "lz.q"],
        &["amend", "-p", "-o", "compat=0.10", "lz.q"],
        &["amend", "-p", "-o", "compat=v3", "v2.q"],
        &["amend", "-o", "compat=1.1,lazy_refcounts=on", "v2.q"],
        &["amend", "-o", "compat=0.10,lazy_refcounts=on", "v2.q"],
        &["amend", "-o", "compat=0.10", "zs.q"],
        &["amend", "-o", "compat=0.10", "zc.q"],
        &["amend", "-o", "compat=0.10", "x2.q"],
        &["amend", "-o", "compat=0.10", "r8.q"],
        &["amend", "-o", "compat=0.10", "z.q"],
        &["amend", "-o", "compat=0.10", "df.q"],
        &["amend", "-o", "lazy_refcounts=on", "v2.q"],
        &["amend", "-o", "size=1M,refcount_bits=16", "v3.q"],
        &["amend", "-p", "-o", "bogus=1", "v3.q"],
        &["amend", "-p", "-o", "refcount_bits=3", "v3.q"],
        &["amend", "-p", "-o", "compat=0.10", "df.q"],
        &["amend", "-o", "cluster_size=4k", "v3.q"],
        &["amend", "-o", "lazy_refcounts=x", "v3.q"],
        &["amend", "-o", "compat=0.9", "v3.q"],
        &["amend", "-o", "", "v3.q"],
        &["amend", "-o", "backing_file=x", "v3.q"],
        &["amend", "-o", "data_file=x", "v3.q"],
        &["amend", "-o", "data_file_raw=off", "v3.q"],
        &["amend", "-o", "data_file_raw=on", "v3.q"],
        &["amend", "-o", "data_file_raw=on", "dr.q"],
        &["amend", "-o", "data_file_raw=off", "dr.q"],
        &["amend", "-o", "data_file_raw=on", "dr.q"],
        &["amend", "-p", "-o", "data_file=d2.raw", "df.q"],
        &["amend", "-f", "raw", "-o", "x=1", "r.raw"],
        &["amend", "-o", "lazy_refcounts=on", "nonexistent"],
        &["amend", "v3.q"],
        &["amend", "-o", "lazy_refcounts=on"],
        &["amend", "-o", "help", "v3.q"],
        &["amend", "-f", "qcow2", "-o", "help"],
    ];
    for args in cases {
        let q = qemu_img(args, &d.q());
        let s = strata(args, &d.s());
        assert_eq!(s, q, "strata-img {args:?} differs from qemu-img");
        let img = args[args.len() - 1];
        if d.q().join(img).exists() {
            let same = read(&d.s().join(img)) == read(&d.q().join(img));
            assert!(same, "{args:?}: {img} differs from qemu-img's");
            if img.ends_with(".q") {
                must("qemu-img", &["check", img], &d.s());
            }
        }
    }
}

/// `size` and `refcount_bits` through amend, alone and with other
/// options, on images with data, compressed clusters and a snapshot, and
/// a version 2 image: the same output and status as qemu-img, the same
/// data (the snapshot's too), clean images and the same `info`. Shrinking
/// gives qemu-img's bytes; a new refcount structure may sit elsewhere.
#[test]
fn amend_resizes_and_changes_refcount_width_like_qemu_img() {
    let d = Scratch::new("amend-rewrite");
    let dir = d.q();
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.q", "64M"],
        &dir,
    );
    qemu_io(
        "a.q",
        "qcow2",
        &[
            "write -P 1 0 1M",
            "write -P 2 60M 1M",
            "write -c -P 3 10M 64k",
        ],
        &dir,
    );
    std::fs::copy(dir.join("a.q"), dir.join("sn.q")).unwrap();
    must("qemu-img", &["snapshot", "-c", "s1", "sn.q"], &dir);
    qemu_io("sn.q", "qcow2", &["write -P 4 0 64k"], &dir);
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.q",
            "64M",
        ],
        &dir,
    );
    qemu_io("v2.q", "qcow2", &["write -P 1 0 1M"], &dir);
    let info = |img: &str| {
        let o = must("qemu-img", &["info", "--output=json", img], &dir);
        o.stdout
            .lines()
            .filter(|l| !l.contains("filename") && !l.contains("actual-size"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for src in ["a.q", "sn.q", "v2.q"] {
        for opts in [
            "size=128M",
            "size=32M",
            "size=61M",
            "size=100000",
            "size=0",
            "refcount_bits=1",
            "refcount_bits=64",
            "refcount_bits=8",
            "refcount_bits=3",
            "refcount_bits=2,size=128M",
            "compat=1.1,refcount_bits=8",
            "lazy_refcounts=on,size=1G",
        ] {
            let what = format!("{src} -o {opts}");
            std::fs::copy(dir.join(src), dir.join("cq.q")).unwrap();
            std::fs::copy(dir.join(src), dir.join("cs.q")).unwrap();
            let mut q = qemu_img(&["amend", "-o", opts, "cq.q"], &dir);
            let s = strata(&["amend", "-o", opts, "cs.q"], &dir);
            q.stderr = q.stderr.replace("cq.q", "cs.q");
            assert_eq!(s, q, "{what}");
            must("qemu-img", &["check", "cs.q"], &dir);
            let c = must("qemu-img", &["compare", "cq.q", "cs.q"], &dir);
            assert!(c.stdout.contains("identical"), "{what}: {c:?}");
            assert_eq!(info("cs.q"), info("cq.q"), "{what}");
            if opts.starts_with("size") {
                assert!(
                    read(&dir.join("cs.q")) == read(&dir.join("cq.q")),
                    "{what}: bytes"
                );
            }
            if opts.starts_with("refcount_bits") && !opts.contains(',') {
                // The progress lines follow QEMU's walks over the table.
                std::fs::copy(dir.join(src), dir.join("cq.q")).unwrap();
                std::fs::copy(dir.join(src), dir.join("cs.q")).unwrap();
                let q = qemu_img(&["amend", "-p", "-o", opts, "cq.q"], &dir);
                let s = strata(&["amend", "-p", "-o", opts, "cs.q"], &dir);
                assert_eq!(s.stdout, q.stdout, "{what} -p");
            }
            if src == "sn.q" && q.code == 0 {
                for (img, raw) in [("cq.q", "q.raw"), ("cs.q", "s.raw")] {
                    must(
                        "qemu-img",
                        &["convert", "-l", "snapshot.name=s1", "-O", "raw", img, raw],
                        &dir,
                    );
                }
                assert!(
                    read(&dir.join("s.raw")) == read(&dir.join("q.raw")),
                    "{what}: snapshot"
                );
            }
        }
    }
}

#[test]
fn help_matches_qemu_img() {
    let d = Scratch::new("help");
    for cmd in [
        "create", "info", "check", "map", "compare", "convert", "snapshot", "resize", "amend",
    ] {
        same(&[cmd, "--help"], &d.q());
        same(&[cmd, "-h"], &d.q());
        same(&[cmd, "--bogus-option"], &d.q());
        same(&[cmd, "-Y"], &d.q());
    }
    for args in [
        &["resize", "-1M"][..],
        &["resize", "x.img", "-q"],
        &["resize", "x.img", "--shrink", "-1M"],
        &["resize", "x.img", "-f"],
        &["resize", "x.img", "-h"],
    ] {
        same(args, &d.q());
    }
}

/// Strips the extra data from every snapshot table entry in place, as
/// version 2 images written by old QEMU releases have them.
fn strip_snapshot_extra_data(path: &Path) {
    let mut f = read(path);
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let be16 = |b: &[u8], o: usize| u16::from_be_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let n = be32(&f, 60);
    let off = u64::from_be_bytes(f[64..72].try_into().unwrap()) as usize;
    let (mut pos, mut end, mut out) = (off, off, Vec::new());
    for _ in 0..n {
        let (ids, names, extra) = (be16(&f, pos + 12), be16(&f, pos + 14), be32(&f, pos + 36));
        let mut e = f[pos..pos + 40].to_vec();
        e[36..40].fill(0);
        e.extend_from_slice(&f[pos + 40 + extra..pos + 40 + extra + ids + names]);
        e.resize(e.len().div_ceil(8) * 8, 0);
        out.extend(e);
        end = pos + 40 + extra + ids + names;
        pos += (40 + extra + ids + names).div_ceil(8) * 8;
    }
    out.resize(end - off, 0);
    f[off..end].copy_from_slice(&out);
    std::fs::write(path, f).unwrap();
}

/// Cases where Strata's bytes differ from qemu-img's on purpose, checked by
/// what the image holds: an upgrade whose snapshots lack version 3's extra
/// data (the table is rewritten, in other free clusters), and a downgrade
/// where a snapshot maps as data a cluster the active layer has as a
/// preallocated zero cluster. qemu-img zeroes that cluster and the
/// snapshot loses its data; Strata lets the active entry go instead.
#[test]
fn amend_snapshots_keep_their_data() {
    let d = Scratch::new("amend-snap");
    let dir = d.s();
    let run = |img: &str, opts: &str| {
        let o = strata(&["amend", "-o", opts, img], &dir);
        assert_eq!(
            (o.code, o.stderr.as_str()),
            (0, ""),
            "amend {opts} {img}: {o:?}"
        );
        let c = must("qemu-img", &["check", img], &dir);
        assert!(c.stdout.contains("No errors"), "{img}: {c:?}");
    };
    let snapshot_reads = |img: &str, snap: &str, cmds: &[&str]| {
        let raw = format!("{img}.{snap}.raw");
        must(
            "qemu-img",
            &[
                "convert",
                "-l",
                &format!("snapshot.name={snap}"),
                "-O",
                "raw",
                img,
                &raw,
            ],
            &dir,
        );
        qemu_io(&raw, "raw", cmds, &dir);
    };

    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "nx.q",
            "1M",
        ],
        &dir,
    );
    qemu_io("nx.q", "qcow2", &["write -P 1 0 128k"], &dir);
    must("qemu-img", &["snapshot", "-c", "s1", "nx.q"], &dir);
    qemu_io("nx.q", "qcow2", &["write -P 2 0 64k"], &dir);
    must("qemu-img", &["snapshot", "-c", "s2", "nx.q"], &dir);
    strip_snapshot_extra_data(&dir.join("nx.q"));
    let before = must("qemu-img", &["snapshot", "-l", "nx.q"], &dir).stdout;
    run("nx.q", "compat=1.1");
    assert_eq!(
        must("qemu-img", &["snapshot", "-l", "nx.q"], &dir).stdout,
        before
    );
    let info = must("qemu-img", &["info", "--output=json", "nx.q"], &dir).stdout;
    assert!(info.contains("\"compat\": \"1.1\""), "{info}");
    snapshot_reads("nx.q", "s1", &["read -P 1 0 128k"]);
    snapshot_reads("nx.q", "s2", &["read -P 2 0 64k", "read -P 1 64k 64k"]);
    // Version 3 needs 16 bytes of extra data per entry; QEMU writes 24.
    let table = peek64(&dir.join("nx.q"), 64);
    let extra = must(
        "od",
        &[
            "-An",
            "-tu4",
            "--endian=big",
            "-j",
            &(table + 36).to_string(),
            "-N4",
            "nx.q",
        ],
        &dir,
    );
    assert_eq!(extra.stdout.trim(), "24");

    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "sb.q", "1M"],
        &dir,
    );
    qemu_io("sb.q", "qcow2", &["write -P 1 0 128k"], &dir);
    must("qemu-img", &["snapshot", "-c", "s1", "sb.q"], &dir);
    qemu_io("sb.q", "qcow2", &["write -z 0 64k"], &dir);
    run("sb.q", "compat=0.10");
    snapshot_reads("sb.q", "s1", &["read -P 1 0 128k"]);
    qemu_io(
        "sb.q",
        "qcow2",
        &["read -P 0 0 64k", "read -P 1 64k 64k"],
        &dir,
    );

    // Over a backing file, unallocated zero clusters get zeroed clusters.
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.q", "1M"],
        &dir,
    );
    qemu_io("base.q", "qcow2", &["write -P 7 0 1M"], &dir);
    must(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.q", "-F", "qcow2", "ov.q",
        ],
        &dir,
    );
    qemu_io(
        "ov.q",
        "qcow2",
        &["write -z 0 64k", "write -P 3 64k 64k"],
        &dir,
    );
    must("qemu-img", &["snapshot", "-c", "s1", "ov.q"], &dir);
    qemu_io("ov.q", "qcow2", &["write -z 128k 64k"], &dir);
    run("ov.q", "compat=0.10");
    qemu_io(
        "ov.q",
        "qcow2",
        &[
            "read -P 0 0 64k",
            "read -P 3 64k 64k",
            "read -P 0 128k 64k",
            "read -P 7 192k 64k",
        ],
        &dir,
    );
    snapshot_reads(
        "ov.q",
        "s1",
        &["read -P 0 0 64k", "read -P 3 64k 64k", "read -P 7 128k 64k"],
    );
}

/// `convert -n` onto existing qcow2 images holding other data: zero areas
/// of the source (holes, zeroed blocks inside data, zero clusters) become
/// write-zeroes that unmap, the freed clusters are discarded, and version
/// 2 targets get their clusters deallocated; with `-c`, all-zero clusters
/// are zeroed rather than compressed. Byte-compared with qemu-img.
#[test]
fn convert_onto_existing_qcow2_matches_qemu_img() {
    let d = Scratch::new("convert-n");
    let dir = d.s();
    must(
        "qemu-img",
        &["create", "-q", "-f", "raw", "src.raw", "4M"],
        &dir,
    );
    qemu_io(
        "src.raw",
        "raw",
        &[
            "write -P 1 0 1M",
            "write -P 2 2M 64k",
            "write -z 3M 64k",
            "write -P 0 320k 8k",
        ],
        &dir,
    );
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.q", "4M"],
        &dir,
    );
    qemu_io(
        "src.q",
        "qcow2",
        &["write -P 1 0 1M", "write -z 2M 64k"],
        &dir,
    );
    for (src, fmt) in [("src.raw", "raw"), ("src.q", "qcow2")] {
        for create in [
            "",
            "compat=0.10",
            "cluster_size=4k",
            "extended_l2=on",
            "refcount_bits=1",
        ] {
            for (prefill, sparse, compress) in [
                ("", "4k", false),
                ("write -P 9 0 4M", "4k", false),
                ("write -P 9 0 4M", "64k", false),
                ("write -P 9 0 4M", "0", false),
                ("write -P 9 512k 64k", "4k", false),
                ("", "4k", true),
                ("", "0", true),
                ("write -P 9 0 4M", "4k", true),
                ("write -P 9 0 4M", "0", true),
            ] {
                let what = format!(
                    "{src} onto -o '{create}' after '{prefill}' -S {sparse} compressed {compress}"
                );
                for t in ["tq.q", "ts.q"] {
                    let mut a = vec!["create", "-q", "-f", "qcow2"];
                    if !create.is_empty() {
                        a.extend(["-o", create]);
                    }
                    a.extend([t, "4M"]);
                    must("qemu-img", &a, &dir);
                    if !prefill.is_empty() {
                        qemu_io(t, "qcow2", &[prefill], &dir);
                    }
                }
                let args = |t: &'static str| {
                    let mut a = vec!["convert", "-n", "-f", fmt, "-O", "qcow2", "-S", sparse];
                    if compress {
                        a.push("-c");
                    }
                    a.extend([src, t]);
                    a
                };
                let s = strata(&args("ts.q"), &dir);
                if compress && !prefill.is_empty() {
                    // qemu-img fails here (EIO: its compressed writes cannot
                    // replace allocated clusters); Strata's can.
                    assert_eq!(s.code, 0, "{what}: {s:?}");
                    must(
                        "qemu-img",
                        &["compare", "-f", fmt, "-F", "qcow2", src, "ts.q"],
                        &dir,
                    );
                    must("qemu-img", &["check", "ts.q"], &dir);
                    continue;
                }
                let q = qemu_img(&args("tq.q"), &dir);
                assert_eq!(s, q, "{what}");
                if compress {
                    // Two deflate implementations: the same clusters, the
                    // same data, not the same compressed bytes.
                    let map = |t: &str| must("qemu-img", &["map", "--output=json", t], &dir).stdout;
                    assert_eq!(map("ts.q"), map("tq.q"), "{what}: map");
                    must("qemu-img", &["compare", "tq.q", "ts.q"], &dir);
                    must("qemu-img", &["check", "ts.q"], &dir);
                } else {
                    assert!(
                        read(&dir.join("ts.q")) == read(&dir.join("tq.q")),
                        "{what}: bytes"
                    );
                }
            }
        }
    }
}

/// Snapshot tables, L1 copies and a grown L1 go where qemu-img puts them:
/// the first run of free clusters, so holes left by a deleted snapshot are
/// reused. The same steps by either tool give the same layout.
#[test]
fn snapshot_tables_reuse_holes_like_qemu_img() {
    let d = Scratch::new("snaplayout");
    let layout = |tool: &str, dir: &Path| {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "s.qcow2", "64M"],
            dir,
        );
        qemu_io(
            "s.qcow2",
            "qcow2",
            &["write -P 1 0 3M", "write -P 2 40M 64k"],
            dir,
        );
        must(tool, &["snapshot", "-c", "s1", "s.qcow2"], dir);
        qemu_io("s.qcow2", "qcow2", &["write -P 3 0 1M"], dir);
        must(tool, &["snapshot", "-c", "s2", "s.qcow2"], dir);
        must(tool, &["snapshot", "-d", "s1", "s.qcow2"], dir);
        must(tool, &["snapshot", "-c", "s3", "s.qcow2"], dir);
        qemu_io("s.qcow2", "qcow2", &["write -P 4 8M 1M"], dir);
        must(tool, &["snapshot", "-c", "s4", "s.qcow2"], dir);
        // Growing past what the L1 table covers moves it.
        must(tool, &["resize", "s.qcow2", "2T"], dir);
        let p = dir.join("s.qcow2");
        let check = must("qemu-img", &["check", "s.qcow2"], dir).stdout;
        (
            peek64(&p, 40),
            peek64(&p, 64),
            std::fs::metadata(&p).unwrap().len(),
            check,
        )
    };
    let q = layout("qemu-img", &d.q());
    let s = layout(STRATA, &d.s());
    assert_eq!(s, q, "(L1 offset, snapshot table offset, file size, check)");
}

/// qemu-img's image commands load an image's persistent bitmaps and store
/// them back at close; strata-img's leave them the same way: not in use,
/// resized with the image, and the image clean.
#[test]
fn image_commands_keep_bitmaps_consistent() {
    let d = Scratch::new("keepbm");
    let steps: &[&[&str]] = &[
        &["snapshot", "-c", "s1", "b.qcow2"],
        &["snapshot", "-d", "s1", "b.qcow2"],
        &["check", "-r", "all", "b.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "b.qcow2"],
        &["amend", "-o", "size=12M", "b.qcow2"],
        &["resize", "b.qcow2", "+4M"],
    ];
    let run = |tool: &str, dir: &Path| {
        must(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "b.qcow2", "8M"],
            dir,
        );
        must("qemu-img", &["bitmap", "--add", "b.qcow2", "b0"], dir);
        must(
            "qemu-img",
            &["bitmap", "--add", "-g", "4096", "b.qcow2", "b1"],
            dir,
        );
        qemu_io("b.qcow2", "qcow2", &["write -P 1 1M 64k"], dir);
        let mut seen = Vec::new();
        for s in steps {
            let o = must(tool, s, dir);
            let info = must("qemu-img", &["info", "--output=json", "b.qcow2"], dir).stdout;
            let info: serde_json::Value = serde_json::from_str(&info).unwrap();
            let bitmaps = info["format-specific"]["data"]["bitmaps"].clone();
            let check = must("qemu-img", &["check", "b.qcow2"], dir).stdout;
            seen.push((s.join(" "), o.code, bitmaps, check.contains("No errors")));
        }
        seen
    };
    let q = run("qemu-img", &d.q());
    let s = run(STRATA, &d.s());
    assert_eq!(s, q);
}

/// `bitmap`: every action, in command-line order, with qemu-img's checks
/// and messages; the image ends with the same bitmaps, flags and bits.
#[test]
fn bitmap_matches_qemu_img() {
    let d = Scratch::new("bitmapcmd");
    for dir in [d.q(), d.s()] {
        for (f, o) in [("t.qcow2", "compat=1.1"), ("t2.qcow2", "compat=1.1")] {
            must(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", o, f, "4M"],
                &dir,
            );
        }
        must(
            "qemu-img",
            &["create", "-q", "-f", "raw", "r.raw", "4M"],
            &dir,
        );
    }
    let steps: &[&[&str]] = &[
        &["--add", "t.qcow2", "b0"],
        &["--add", "t.qcow2", "b0"],
        &["--add", "-g", "512", "t.qcow2", "fine"],
        &["--add", "-g", "1000", "t.qcow2", "x"],
        &["--add", "-g", "abc", "t.qcow2", "x"],
        &["--remove", "t.qcow2", "zz"],
        &["--clear", "t.qcow2", "zz"],
        &["--enable", "t.qcow2", "zz"],
        &["--disable", "t.qcow2", "fine"],
        &["--merge", "b0", "t.qcow2", "fine"],
        &["--merge", "zz", "t.qcow2", "fine"],
        &["--merge", "b0", "-b", "t2.qcow2", "t.qcow2", "fine"],
        &["--add", "t2.qcow2", "s"],
        &[
            "--merge", "s", "-b", "t2.qcow2", "-F", "qcow2", "t.qcow2", "fine",
        ],
        &["--add", "--disable", "t.qcow2", "both"],
        &["t.qcow2", "b0"],
        &["--add", "t.qcow2"],
        &["--add", "nope.qcow2", "x"],
        &["--remove", "t.qcow2", "b0"],
        &["--add", "-g", "4k", "t.qcow2", "k"],
        &["--add", "-g", "0", "t.qcow2", "z"],
        &["--clear", "-g", "4k", "t.qcow2", "z"],
        &["-F", "qcow2", "--add", "t.qcow2", "y"],
        &["-b", "t2.qcow2", "--add", "t.qcow2", "y"],
        &["--add", "--add", "t.qcow2", "dd"],
        &["--add", "--remove", "--add", "t.qcow2", "again"],
        &["--enable", "-f", "raw", "r.raw", "x"],
    ];
    for s in steps {
        let mut a = vec!["bitmap"];
        a.extend_from_slice(s);
        assert_eq!(strata(&a, &d.s()), qemu_img(&a, &d.q()), "{a:?}");
        // Writes between steps land in the bitmaps that record.
        for dir in [d.q(), d.s()] {
            qemu_io("t.qcow2", "qcow2", &["write 1M 4k"], &dir);
        }
    }
    let stored = |dir: &Path| {
        let info = must("qemu-img", &["info", "--output=json", "t.qcow2"], dir).stdout;
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        let check = must("qemu-img", &["check", "t.qcow2"], dir).stdout;
        (info["format-specific"]["data"]["bitmaps"].clone(), check)
    };
    assert_eq!(stored(&d.s()), stored(&d.q()));
}

/// `convert --bitmaps` copies the source's persistent bitmaps (names,
/// granularity, recording state and bits) as qemu-img does, plain and
/// compressed; the option checks and refusals match.
#[test]
fn convert_copies_bitmaps_like_qemu_img() {
    let d = Scratch::new("convbm");
    let dir = d.q();
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"],
        &dir,
    );
    must("qemu-img", &["bitmap", "--add", "src.qcow2", "b0"], &dir);
    must(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "src.qcow2", "fine"],
        &dir,
    );
    qemu_io(
        "src.qcow2",
        "qcow2",
        &["write 64k 4k", "write 1M 100k"],
        &dir,
    );
    must(
        "qemu-img",
        &["bitmap", "--disable", "src.qcow2", "fine"],
        &dir,
    );
    must(
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "4M"],
        &dir,
    );
    // Dirty bits as qemu-nbd exports them and qemu-img maps them.
    let bits = |img: &str, name: &str| {
        let sock = dir.join(format!("{img}.{name}.sock"));
        let sock = sock.to_str().unwrap();
        must(
            "qemu-nbd",
            &["--fork", "-r", "-B", name, "-k", sock, img],
            &dir,
        );
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
        );
        must(
            "qemu-img",
            &["map", "--output=json", "--image-opts", &opts],
            &dir,
        )
        .stdout
    };
    for (i, mode) in [&["-O", "qcow2"][..], &["-c", "-O", "qcow2"]]
        .iter()
        .enumerate()
    {
        let (q, s) = (format!("q{i}.qcow2"), format!("s{i}.qcow2"));
        for (tool, out) in [("qemu-img", &q), (STRATA, &s)] {
            let mut a = vec!["convert", "--bitmaps"];
            a.extend_from_slice(mode);
            a.extend(["src.qcow2", out.as_str()]);
            must(tool, &a, &dir);
        }
        let info = |f: &str| {
            let j = must("qemu-img", &["info", "--output=json", f], &dir).stdout;
            let j: serde_json::Value = serde_json::from_str(&j).unwrap();
            j["format-specific"]["data"]["bitmaps"].clone()
        };
        assert_eq!(info(&s), info(&q), "{mode:?}");
        for b in ["b0", "fine"] {
            assert_eq!(bits(&s, b), bits(&q, b), "{mode:?} {b}");
        }
        same(&["check", &s], &dir);
    }
    let errors: &[&[&str]] = &[
        &["convert", "--bitmaps", "-O", "raw", "src.qcow2", "e.raw"],
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "e.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-f",
            "raw",
            "r.raw",
            "e.qcow2",
        ],
    ];
    for a in errors {
        same(a, &dir);
    }
    // Bitmaps left in use by a writer that was killed: refused, or skipped
    // with a warning while the consistent one is copied.
    std::fs::copy(dir.join("src.qcow2"), dir.join("bad.qcow2")).unwrap();
    let killed = exec(
        "qemu-io",
        &["-c", "write 0 4k", "-c", "sigraise 9", "bad.qcow2"],
        &dir,
    );
    assert_ne!(killed.code, 0, "{killed:?}");
    must("qemu-img", &["bitmap", "--add", "bad.qcow2", "late"], &dir);
    for skip in [false, true] {
        let mut got = Vec::new();
        for (tool, t) in [("qemu-img", "bq.qcow2"), (STRATA, "bs.qcow2")] {
            let _ = std::fs::remove_file(dir.join(t));
            let mut a = vec!["convert", "--bitmaps", "-O", "qcow2"];
            if skip {
                a.push("--skip-broken-bitmaps");
            }
            a.extend(["bad.qcow2", t]);
            let out = exec(tool, &a, &dir);
            let stored = dir.join(t).exists().then(|| {
                let j = must("qemu-img", &["info", "--output=json", t], &dir).stdout;
                let j: serde_json::Value = serde_json::from_str(&j).unwrap();
                j["format-specific"]["data"]["bitmaps"].clone()
            });
            got.push((out, stored));
        }
        assert_eq!(got[1], got[0], "skip {skip}");
        assert_eq!(got[0].0.code, if skip { 0 } else { 1 }, "{:?}", got[0]);
    }
    // A target that already holds a bitmap of that name: refused after the
    // copy, plain and compressed, and the copied data is still complete.
    for c in [false, true] {
        let mut outs = Vec::new();
        for (tool, t) in [("qemu-img", "tq.qcow2"), (STRATA, "ts.qcow2")] {
            must("qemu-img", &["create", "-q", "-f", "qcow2", t, "4M"], &dir);
            must("qemu-img", &["bitmap", "--add", t, "b0"], &dir);
            let mut a = vec!["convert", "-n", "--bitmaps", "-O", "qcow2"];
            if c {
                a.push("-c");
            }
            a.extend(["src.qcow2", t]);
            outs.push(exec(tool, &a, &dir));
            let cmp = qemu_img(&["compare", "src.qcow2", t], &dir);
            assert_eq!(cmp.code, 0, "{tool} -c {c}: {cmp:?}");
        }
        assert_eq!(outs[1], outs[0], "-c {c}");
    }
}
