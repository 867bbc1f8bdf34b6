//! Runs `strata-img check` and `qemu-img check` on the same damaged
//! images and compares what they print, their exit statuses and, when
//! repairing, the repaired bytes. Fails loudly when QEMU is missing.

mod img_tool;

use std::path::Path;

use img_tool::*;

/// Sets the 16-bit refcount of `cluster` in the first refcount block of a
/// 64 KiB-cluster image (the block qemu-img create puts in cluster 2).
fn poke_refcount(path: &Path, cluster: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_be_bytes(), 2 * 65536 + cluster * 2)
        .unwrap();
}

#[test]
fn check_matches_qemu_img() {
    let d = Scratch::new("check");
    let dir = d.q();
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "clean.qcow2", "1G"],
        &dir,
    );
    qemu_io(
        "clean.qcow2",
        "qcow2",
        &["write 0 192k", "write 5M 64k", "write -c 9M 64k"],
        &dir,
    );
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "empty.qcow2", "1M"],
        &dir,
    );
    must(
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "1M"],
        &dir,
    );
    // A leak: an unreferenced cluster at the end of the file with refcount 1.
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "leak.qcow2", "1M"],
        &dir,
    );
    qemu_io("leak.qcow2", "qcow2", &["write 0 64k"], &dir);
    let leak = dir.join("leak.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leak)
        .unwrap()
        .set_len(7 * 65536)
        .unwrap();
    poke_refcount(&leak, 6, 1);
    for f in [
        "clean.qcow2",
        "empty.qcow2",
        "r.raw",
        "leak.qcow2",
        "missing",
    ] {
        same_check(&["check", f], &dir);
        same_check(&["check", "--output=json", f], &dir);
        same_check(&["check", "-q", f], &dir);
    }
    same_check(&["check", "-r", "bogus", "clean.qcow2"], &dir);
    same_check(&["check"], &dir);
    for mode in ["leaks", "all"] {
        for out in ["human", "json"] {
            for tool in ["qemu-img", STRATA] {
                std::fs::copy(&leak, dir.join("fix.qcow2")).unwrap();
                let o = exec(
                    tool,
                    &["check", "-r", mode, "--output", out, "fix.qcow2"],
                    &dir,
                );
                let q = {
                    std::fs::copy(&leak, dir.join("fixq.qcow2")).unwrap();
                    qemu_img(&["check", "-r", mode, "--output", out, "fixq.qcow2"], &dir)
                };
                assert_eq!(o.code, q.code, "{tool} -r {mode}");
                assert_eq!(o.stderr, q.stderr, "{tool} -r {mode}");
                assert_eq!(
                    o.stdout.replace("fix.qcow2", "X"),
                    q.stdout.replace("fixq.qcow2", "X"),
                    "{tool} -r {mode} --output {out}"
                );
                // The repaired image is clean for qemu-img.
                assert_eq!(qemu_img(&["check", "fix.qcow2"], &dir).code, 0);
            }
        }
    }
}

/// Runs `check <args> img` with qemu-img on one copy of `src` and with
/// strata-img on another; both print, exit and (when repairing) leave the
/// image the same way. Returns the exit status.
fn check_copies_agree(src: &Path, args: &[&str], dir: &Path) -> i32 {
    let (cq, cs) = (dir.join("cq.qcow2"), dir.join("cs.qcow2"));
    std::fs::copy(src, &cq).unwrap();
    std::fs::copy(src, &cs).unwrap();
    let run = |tool: &str, img: &str| {
        let mut a = vec!["check"];
        a.extend_from_slice(args);
        a.push(img);
        let mut o = exec(tool, &a, dir);
        o.stdout = o.stdout.replace(img, "IMG");
        o
    };
    let q = run("qemu-img", "cq.qcow2");
    let s = run(STRATA, "cs.qcow2");
    assert_eq!(s, q, "check {args:?} of {}", src.display());
    if args.contains(&"-r") {
        assert_eq!(
            read(&cs),
            read(&cq),
            "check {args:?} of {} repaired differently",
            src.display()
        );
    }
    q.code
}

/// OFLAG_COPIED cleared where the refcount is 1, or set where it is 2
/// (clusters and L2 tables shared with an internal snapshot), on L1 and L2
/// entries: both tools report the same lines and counts, repair alike,
/// and the repaired images are clean.
#[test]
fn check_oflag_copied_matches_qemu_img() {
    let d = Scratch::new("oflag");
    let dir = d.q();
    // Guest 0: data, 64k: preallocated zero cluster, 5M: data; 600M sits in
    // a second L2 table.
    let plain = dir.join("plain.qcow2");
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "plain.qcow2", "1G"],
        &dir,
    );
    qemu_io(
        "plain.qcow2",
        "qcow2",
        &[
            "write 0 128k",
            "write -z 64k 64k",
            "write 5M 64k",
            "write 600M 64k",
        ],
        &dir,
    );
    assert_eq!(
        peek64(&plain, l2_entry_pos(&plain, 0, 1)) & 1,
        1,
        "zero alloc"
    );
    // The same with a snapshot, then the first L2 table copied by a write:
    // L2 table 0 has refcount 1 but points to shared clusters, L2 table 1
    // is shared itself.
    let snap = dir.join("snap.qcow2");
    std::fs::copy(&plain, &snap).unwrap();
    must("qemu-img", &["snapshot", "-c", "s1", "snap.qcow2"], &dir);
    qemu_io("snap.qcow2", "qcow2", &["write 2M 64k"], &dir);
    let data0 = peek64(&snap, l2_entry_pos(&snap, 0, 0));
    assert_eq!(data0 & COPIED, 0, "shared cluster: {data0:#x}");
    assert_eq!(peek64(&snap, l1_entry_pos(&snap, 1)) & COPIED, 0);
    assert_ne!(peek64(&snap, l1_entry_pos(&snap, 0)) & COPIED, 0);

    // (name, image, file offset of the entry whose flag is flipped)
    let l2 = |p: &Path, j| l2_entry_pos(p, 0, j);
    // Guest 600M: 88M into the second L2 table, 64k per entry.
    let at600m = |p: &Path| l2_entry_pos(p, 1, 88 * 16);
    let cases: Vec<(&str, &Path, u64)> = vec![
        ("plain-l2-data", &plain, l2(&plain, 0)),
        ("plain-l2-zero-alloc", &plain, l2(&plain, 1)),
        ("plain-l2-second-table", &plain, at600m(&plain)),
        ("plain-l1", &plain, l1_entry_pos(&plain, 0)),
        ("plain-l1-second", &plain, l1_entry_pos(&plain, 1)),
        ("snap-l2-shared-data", &snap, l2(&snap, 0)),
        ("snap-l2-own-data", &snap, l2(&snap, 32)),
        ("snap-l2-shared-table", &snap, at600m(&snap)),
        ("snap-l1-shared-table", &snap, l1_entry_pos(&snap, 1)),
        ("snap-l1-own-table", &snap, l1_entry_pos(&snap, 0)),
    ];
    for (name, src, pos) in cases {
        let img = dir.join(format!("{name}.qcow2"));
        std::fs::copy(src, &img).unwrap();
        let e = peek64(&img, pos);
        assert_ne!(
            e & 0x00ff_ffff_ffff_fe00,
            0,
            "{name}: entry {e:#x} unallocated"
        );
        poke64(&img, pos, e ^ COPIED);
        for out in ["--output=human", "--output=json"] {
            assert_eq!(check_copies_agree(&img, &[out], &dir), 2, "{name}");
            assert_eq!(
                check_copies_agree(&img, &["-r", "leaks", out], &dir),
                0,
                "{name}"
            );
        }
        assert_eq!(check_copies_agree(&img, &["-r", "all"], &dir), 0, "{name}");
        let c = must("qemu-img", &["compare", "cq.qcow2", "cs.qcow2"], &dir);
        assert!(c.stdout.contains("identical"), "{name}: {c:?}");
        for f in ["cq.qcow2", "cs.qcow2"] {
            assert_eq!(qemu_img(&["check", f], &dir).code, 0, "{name}: {f}");
        }
    }

    // Wrong flags beside wrong refcounts: `-r leaks` repairs the flags only
    // when the refcounts end up right, and flags are judged against the
    // refcounts as repaired.
    let leak_and_flag = dir.join("leak-flag.qcow2");
    std::fs::copy(&plain, &leak_and_flag).unwrap();
    let pos = l2(&leak_and_flag, 0);
    poke64(&leak_and_flag, pos, peek64(&leak_and_flag, pos) & !COPIED);
    let len = std::fs::metadata(&leak_and_flag).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leak_and_flag)
        .unwrap()
        .set_len(len + 65536)
        .unwrap();
    poke_refcount(&leak_and_flag, len / 65536, 1);
    // Cluster shared with the snapshot whose refcount dropped to 1, flag
    // clear: an error before repair, right after `-r all`.
    let low = dir.join("low-refcount.qcow2");
    std::fs::copy(&snap, &low).unwrap();
    poke_refcount(&low, (data0 & 0x00ff_ffff_ffff_fe00) / 65536, 1);
    // Same, and the flag set: right before repair, wrong after it.
    let low_set = dir.join("low-refcount-set.qcow2");
    std::fs::copy(&low, &low_set).unwrap();
    let pos = l2(&low_set, 0);
    poke64(&low_set, pos, data0 | COPIED);
    for img in [&leak_and_flag, &low, &low_set] {
        for args in [
            &[][..],
            &["--output=json"],
            &["-r", "leaks"],
            &["-r", "leaks", "--output=json"],
            &["-r", "all"],
            &["-r", "all", "--output=json"],
        ] {
            check_copies_agree(img, args, &dir);
        }
        let c = must("qemu-img", &["compare", "cq.qcow2", "cs.qcow2"], &dir);
        assert!(c.stdout.contains("identical"), "{}: {c:?}", img.display());
        for f in ["cq.qcow2", "cs.qcow2"] {
            assert_eq!(qemu_img(&["check", f], &dir).code, 0, "{}", img.display());
        }
    }
}

/// Malformed L1 and L2 entries (reserved bits, unaligned tables and
/// clusters, COPIED on compressed clusters, bad extended-L2 bitmaps,
/// clusters past the end of the file): both tools print the same
/// findings, count and repair them alike.
#[test]
fn check_malformed_entries_match_qemu_img() {
    let d = Scratch::new("malformed");
    let dir = d.q();
    let std_img = dir.join("std.qcow2");
    let ext_img = dir.join("ext.qcow2");
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "std.qcow2", "1G"],
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
            "ext.qcow2",
            "1G",
        ],
        &dir,
    );
    // Entry 0: data, 1: preallocated zeros, 4: compressed.
    for img in ["std.qcow2", "ext.qcow2"] {
        qemu_io(
            img,
            "qcow2",
            &["write 0 128k", "write -z 64k 64k", "write -c 256k 64k"],
            &dir,
        );
    }
    // A snapshot, then a write that moves the active L2 table: the old
    // one belongs to the snapshot alone.
    let snap_img = dir.join("snap.qcow2");
    std::fs::copy(&std_img, &snap_img).unwrap();
    must("qemu-img", &["snapshot", "-c", "s1", "snap.qcow2"], &dir);
    qemu_io("snap.qcow2", "qcow2", &["write 2M 64k"], &dir);
    // First snapshot table entry: its L1 table offset.
    let snap_l1 = peek64(&snap_img, peek64(&snap_img, 64));
    let snap_l2 = peek64(&snap_img, snap_l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(
        snap_l2,
        peek64(&snap_img, l1_entry_pos(&snap_img, 0)) & 0x00ff_ffff_ffff_fe00
    );
    let l1 = l1_entry_pos(&std_img, 0);
    let e = |p: &Path, j: u64| l2_entry_pos(p, 0, j);
    // Extended entries are 16 bytes: the entry, then its bitmap.
    let x = |j: u64| l2_entry_pos(&ext_img, 0, 2 * j);
    let xb = |j: u64| l2_entry_pos(&ext_img, 0, 2 * j + 1);
    let old = |p: &Path, off: u64| peek64(p, off);
    let comp = old(&std_img, e(&std_img, 4));
    assert_ne!(comp & (1 << 62), 0, "compressed: {comp:#x}");
    type Patch = Vec<(u64, u64)>;
    let cases: Vec<(&str, &Path, Patch)> = vec![
        ("l1-reserved", &std_img, vec![(l1, old(&std_img, l1) | 2)]),
        (
            "l1-reserved-bit0",
            &std_img,
            vec![(l1, old(&std_img, l1) | 1)],
        ),
        (
            "l2-reserved",
            &std_img,
            vec![(e(&std_img, 0), old(&std_img, e(&std_img, 0)) | 1 << 56 | 2)],
        ),
        (
            "data-unaligned",
            &std_img,
            vec![(e(&std_img, 0), old(&std_img, e(&std_img, 0)) + 0x200)],
        ),
        (
            "prealloc-unaligned",
            &std_img,
            vec![(e(&std_img, 1), old(&std_img, e(&std_img, 1)) + 0x200)],
        ),
        (
            "past-eof",
            &std_img,
            vec![(e(&std_img, 0), COPIED | 1 << 32)],
        ),
        (
            "compressed-copied",
            &std_img,
            vec![(e(&std_img, 4), comp | COPIED)],
        ),
        (
            "ext-alloc-and-zero",
            &ext_img,
            vec![(xb(0), 0x0000_0001_ffff_ffff)],
        ),
        ("ext-unallocated-bitmap", &ext_img, vec![(xb(2), 1)]),
        (
            "snapshot-l1-reserved",
            &snap_img,
            vec![(snap_l1, old(&snap_img, snap_l1) | 2)],
        ),
        (
            "snapshot-prealloc-unaligned",
            &snap_img,
            vec![(snap_l2 + 8, old(&snap_img, snap_l2 + 8) + 0x200)],
        ),
        ("ext-compressed-bitmap", &ext_img, vec![(xb(4), 1)]),
        (
            "ext-data-unaligned",
            &ext_img,
            vec![(x(0), old(&ext_img, x(0)) + 0x200)],
        ),
        (
            "ext-prealloc-unaligned",
            &ext_img,
            vec![(x(1), old(&ext_img, x(1)) + 0x200)],
        ),
    ];
    for (name, src, patches) in cases {
        let img = dir.join(format!("{name}.qcow2"));
        std::fs::copy(src, &img).unwrap();
        for (off, v) in patches {
            poke64(&img, off, v);
        }
        for args in [
            &[][..],
            &["--output=json"],
            &["-r", "leaks"],
            &["-r", "leaks", "--output=json"],
        ] {
            assert_eq!(check_copies_agree(&img, args, &dir), 2, "{name} {args:?}");
        }
        if check_copies_agree(&img, &["-r", "all"], &dir) == 0 {
            let c = must("qemu-img", &["compare", "cq.qcow2", "cs.qcow2"], &dir);
            assert!(c.stdout.contains("identical"), "{name}: {c:?}");
            for f in ["cq.qcow2", "cs.qcow2"] {
                assert_eq!(qemu_img(&["check", f], &dir).code, 0, "{name}: {f}");
            }
        }
    }

    // An L1 entry holding only COPIED makes both tools walk the header
    // as an L2 table. Repairing it would write over the header: both
    // refuse, mark the image corrupt and fail the check with the same
    // lines and the same bytes left on disk.
    let hdr = dir.join("header-as-l2.qcow2");
    std::fs::copy(&std_img, &hdr).unwrap();
    poke64(&hdr, l1_entry_pos(&hdr, 1), COPIED);
    for args in [&[][..], &["--output=json"], &["-r", "leaks"]] {
        assert_eq!(check_copies_agree(&hdr, args, &dir), 2, "{args:?}");
    }
    for args in [&["-r", "all"][..], &["-r", "all", "--output=json"]] {
        assert_eq!(check_copies_agree(&hdr, args, &dir), 1, "{args:?}");
    }
    // Incompatible feature bit 1: corrupt.
    assert_ne!(peek64(&dir.join("cs.qcow2"), 72) & 2, 0);
    assert_eq!(peek64(&hdr, 72) & 2, 0);
}

/// A qemu-img-made image (`opts`, `size`, written by `writes`) with some
/// of its refcount table entries replaced.
fn damaged_reftable(
    dir: &Path,
    name: &str,
    opts: &str,
    size: &str,
    writes: &[&str],
    damage: impl Fn(&Path, u64),
) -> std::path::PathBuf {
    let img = dir.join(name);
    must(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, name, size],
        dir,
    );
    if !writes.is_empty() {
        qemu_io(name, "qcow2", writes, dir);
    }
    // Header: refcount_table_offset at 48.
    damage(&img, peek64(&img, 48));
    img
}

/// Refcount structures that cannot be trusted: a refcount table entry
/// cleared (clusters in use with refcount 0), pointing past the end of
/// the file, at an L2 table, unaligned, or with reserved bits; the whole table
/// cleared for several cluster sizes and refcount widths, with
/// compressed clusters, extended L2 entries and snapshots. Both tools
/// print the same, `-r leaks` refuses, and `-r all` rebuilds the
/// structure to the same bytes (QEMU's placement), leaving a clean image
/// with the same data. Before the rebuild existed, `-r all` on the image
/// whose refcount block was an L2 table wrote refcounts into that table.
#[test]
fn check_rebuilds_refcount_structure_like_qemu_img() {
    let d = Scratch::new("rebuild");
    let dir = d.q();
    let first = |v: u64| move |p: &Path, rt: u64| poke64(p, rt, v);
    let two = &["write -P 0x11 0 128k", "write -P 0x22 8M 64k"][..];
    let clear_all = |p: &Path, rt: u64| {
        // One cluster of table is enough for these images.
        let cs = 1u64 << (peek64(p, 16) & 0xffff_ffff);
        let n = (peek64(p, 56) >> 32) * cs / 8;
        for i in 0..n {
            poke64(p, rt + i * 8, 0);
        }
    };
    let mut cases: Vec<(&str, std::path::PathBuf, bool)> = vec![
        (
            "cleared",
            damaged_reftable(
                &dir,
                "cleared.qcow2",
                "cluster_size=65536",
                "64M",
                two,
                first(0),
            ),
            true,
        ),
        (
            "outside",
            damaged_reftable(
                &dir,
                "outside.qcow2",
                "cluster_size=65536",
                "64M",
                two,
                first(0x1000_0000),
            ),
            true,
        ),
        (
            "reserved",
            damaged_reftable(
                &dir,
                "reserved.qcow2",
                "cluster_size=65536",
                "64M",
                two,
                |p, rt| poke64(p, rt, peek64(p, rt) | 1),
            ),
            // QEMU's overlap check refuses the rebuilt block over the old
            // one, and marks the image corrupt.
            false,
        ),
        (
            "unaligned",
            // Every refcount read fails (EIO) and marks the image corrupt,
            // so QEMU's rebuild cannot write: the same failure, the same
            // corrupt bit.
            damaged_reftable(
                &dir,
                "unaligned.qcow2",
                "cluster_size=65536",
                "64M",
                two,
                |p, rt| poke64(p, rt, peek64(p, rt) + 0x1000),
            ),
            false,
        ),
        (
            "512-all",
            // Several refcount blocks, and a rebuilt table of two clusters.
            damaged_reftable(
                &dir,
                "c512.qcow2",
                "cluster_size=512",
                "64M",
                &["write -P 1 0 9M", "write -P 2 20M 1M"],
                clear_all,
            ),
            true,
        ),
        (
            "512-second",
            damaged_reftable(
                &dir,
                "c512e1.qcow2",
                "cluster_size=512",
                "64M",
                &["write -P 1 0 3M"],
                |p, rt| poke64(p, rt + 8, 0),
            ),
            true,
        ),
        (
            "refcount-bits-1",
            damaged_reftable(
                &dir,
                "rb1.qcow2",
                "refcount_bits=1",
                "64M",
                &["write 0 3M"],
                clear_all,
            ),
            true,
        ),
        (
            "refcount-bits-64",
            damaged_reftable(
                &dir,
                "rb64.qcow2",
                "refcount_bits=64,cluster_size=4096",
                "64M",
                &["write 0 6M"],
                clear_all,
            ),
            true,
        ),
        (
            "compressed",
            damaged_reftable(
                &dir,
                "comp.qcow2",
                "cluster_size=65536",
                "64M",
                &[
                    "write -c -P 1 0 64k",
                    "write -c -P 2 64k 64k",
                    "write -P 3 1M 64k",
                ],
                clear_all,
            ),
            true,
        ),
        (
            "extended-l2",
            damaged_reftable(
                &dir,
                "ext.qcow2",
                "extended_l2=on",
                "64M",
                &["write -P 1 0 5k", "write -P 2 1M 64k"],
                clear_all,
            ),
            true,
        ),
    ];
    // An L2 table as the refcount block.
    let shared = damaged_reftable(
        &dir,
        "shared.qcow2",
        "cluster_size=65536",
        "64M",
        two,
        |_, _| {},
    );
    poke64(
        &shared,
        peek64(&shared, 48),
        peek64(&shared, l1_entry_pos(&shared, 0)) & 0x00ff_ffff_ffff_fe00,
    );
    cases.push(("shared", shared, true));
    // Snapshots: refcounts of 2 and 3 to rebuild.
    let snap = damaged_reftable(
        &dir,
        "snap.qcow2",
        "cluster_size=65536",
        "64M",
        &["write -P 1 0 1M"],
        |_, _| {},
    );
    must("qemu-img", &["snapshot", "-c", "s1", "snap.qcow2"], &dir);
    qemu_io("snap.qcow2", "qcow2", &["write -P 2 512k 1M"], &dir);
    must("qemu-img", &["snapshot", "-c", "s2", "snap.qcow2"], &dir);
    poke64(&snap, peek64(&snap, 48), 0);
    cases.push(("snapshots", snap, true));

    for (name, img, repairable) in &cases {
        for args in [&[][..], &["--output=json"], &["-r", "leaks"]] {
            let code = check_copies_agree(img, args, &dir);
            assert_ne!(code, 0, "{name} {args:?}");
        }
        for args in [&["-r", "all"][..], &["-r", "all", "--output=json"]] {
            let code = check_copies_agree(img, args, &dir);
            assert_eq!(code == 0, *repairable, "{name} {args:?}: status {code}");
        }
        if *repairable {
            for f in ["cq.qcow2", "cs.qcow2"] {
                assert_eq!(qemu_img(&["check", f], &dir).code, 0, "{name}: {f}");
            }
            let c = must("qemu-img", &["compare", "cq.qcow2", "cs.qcow2"], &dir);
            assert!(c.stdout.contains("identical"), "{name}: {c:?}");
            // Same data as before the damage: the refcounts were all that
            // changed.
            let c = must(
                "qemu-img",
                &["compare", "-U", "cs.qcow2", img.to_str().unwrap()],
                &dir,
            );
            assert!(c.stdout.contains("identical"), "{name}: {c:?}");
        }
    }
}
