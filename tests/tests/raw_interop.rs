//! Raw images: data written by Strata reads back in qemu-io and the reverse,
//! on both engines and with and without O_DIRECT; image locks shared with
//! QEMU; bad input gets clear errors.

use std::io::Write;
use std::process::{Command, Stdio};
use std::rc::Rc;

use block_core::{BlockBackend, ErrorKind, IoBuf, Perm, WriteFlags};
use strata_tests::{on_engines, qemu_io, qemu_tool, raw_opts, Scratch};

const RW: Perm = Perm::CONSISTENT_READ.union(Perm::WRITE);
/// What qemu-io shares by default (no -U): reads and unchanged writes.
const QEMU_SHARED: Perm = Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED);

#[test]
fn strata_writes_qemu_io_reads() {
    on_engines(|g, mode| async move {
        for direct in [false, true] {
            let s = Scratch::new(&format!("s2q-{mode:?}-{direct}"));
            let img = s.raw_image("a.raw", 4 << 20);
            {
                let n = g.open(raw_opts(&img, direct)).await.unwrap();
                let blk = BlockBackend::new("", &n, RW, QEMU_SHARED).unwrap();
                blk.pwrite(0, IoBuf::filled(65536, 0xab), WriteFlags::default())
                    .await
                    .unwrap();
                // Unaligned under O_DIRECT: goes through read-modify-write.
                blk.pwrite(70000, IoBuf::filled(1000, 0xcd), WriteFlags::default())
                    .await
                    .unwrap();
                blk.pwrite_zeroes(1 << 20, 1 << 20, WriteFlags::default())
                    .await
                    .unwrap();
                blk.flush().await.unwrap();
                drop(blk);
                g.delete(n.name()).await.unwrap();
            }
            let (ok, out) = qemu_io(
                "raw",
                &img,
                &[
                    "read -P 0xab 0 64k",
                    "read -P 0xcd 70000 1000",
                    "read -P 0 71000 1000",
                    "read -P 0 1M 1M",
                ],
            );
            assert!(ok, "{mode:?} direct={direct}: {out}");
        }
    });
}

#[test]
fn qemu_io_writes_strata_reads() {
    on_engines(|g, mode| async move {
        let s = Scratch::new(&format!("q2s-{mode:?}"));
        let img = s.raw_image("b.raw", 4 << 20);
        let (ok, out) = qemu_io(
            "raw",
            &img,
            &[
                "write -P 0x5a 4096 8192",
                "write -P 0x77 1000000 333",
                "write -z 2M 64k",
            ],
        );
        assert!(ok, "{out}");
        for direct in [false, true] {
            let n = g.open(raw_opts(&img, direct)).await.unwrap();
            let blk = BlockBackend::new("", &n, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
            let b = blk.pread(4096, IoBuf::zeroed(8192)).await.unwrap();
            assert!(b.iter().all(|&x| x == 0x5a), "{mode:?}");
            let b = blk.pread(999_999, IoBuf::zeroed(335)).await.unwrap();
            assert_eq!(b[0], 0);
            assert!(b[1..334].iter().all(|&x| x == 0x77));
            assert_eq!(b[334], 0);
            drop(blk);
            g.delete(n.name()).await.unwrap();
        }
    });
}

/// A qemu-io process holding an image open read-write until dropped.
struct QemuIoHolder(std::process::Child);

impl QemuIoHolder {
    fn start(img: &str) -> Self {
        let mut c = Command::new(qemu_tool("qemu-io"))
            .args(["-f", "raw", img])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-io");
        // A round trip proves the image is open (and locked) before we test.
        let stdin = c.stdin.as_mut().unwrap();
        writeln!(stdin, "write -P 0x11 0 512").unwrap();
        stdin.flush().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let out = Command::new(qemu_tool("qemu-io"))
                .args(["-U", "-r", "-f", "raw", "-c", "read -P 0x11 0 512", img])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("read 512/512") && !text.contains("failed") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        QemuIoHolder(c)
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn image_locks_are_shared_with_qemu() {
    on_engines(|g, mode| async move {
        let s = Scratch::new(&format!("lock-{mode:?}"));
        let img = s.raw_image("c.raw", 1 << 20);
        {
            let holder = QemuIoHolder::start(&img);
            let n = g.open(raw_opts(&img, false)).await.unwrap();
            let e = BlockBackend::new("", &n, RW, QEMU_SHARED)
                .err()
                .expect("write refused while qemu-io holds the image");
            assert_eq!(e.kind(), ErrorKind::PermissionConflict);
            // qemu-io holds "write" on a raw image but shares it, so what
            // fails is our refusal to share it, worded as QEMU words it.
            assert_eq!(
                e.to_string(),
                format!("Failed to get shared \"write\" lock\nIs another process using the image [{img}]?")
            );
            // A user that shares writes may join (as a second qemu-io would).
            let w2 = BlockBackend::new("", &n, RW, Perm::ALL).unwrap();
            drop(w2);
            // Read-only users that share writes may still open it (qemu-io -U -r).
            let r = BlockBackend::new("", &n, Perm::NONE, Perm::ALL).unwrap();
            drop(r);
            drop(holder);
            // Once qemu-io is gone the same request succeeds.
            let w = BlockBackend::new("", &n, RW, QEMU_SHARED).unwrap();
            // And now qemu-io is refused by Strata's locks.
            let (ok, out) = qemu_io("raw", &img, &["read 0 512"]);
            assert!(!ok, "{out}");
            assert!(out.contains("Failed to get \"write\" lock"), "{out}");
            drop(w);
            g.delete(n.name()).await.unwrap();
        }
        let (ok, out) = qemu_io("raw", &img, &["read 0 512"]);
        assert!(ok, "locks released after close: {out}");
    });
}

#[test]
fn bad_input_gets_clear_errors() {
    on_engines(|g, _mode| async move {
        let s = Scratch::new("bad");
        // Missing file.
        let e = g
            .open(raw_opts(&s.path("missing.raw"), false))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("No such file or directory"), "{e}");
        // A directory.
        let e = g
            .open(raw_opts(&s.dir.to_string_lossy(), false))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Is a directory"), "{e}");
        // No permission: an immutable file cannot be opened for writing,
        // even by root.
        let imm = s.raw_image("imm.raw", 4096);
        let chattr = |flag: &str| {
            Command::new("chattr")
                .args([flag, &imm])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if chattr("+i") {
            let e = g.open(raw_opts(&imm, false)).await.unwrap_err();
            assert!(e.to_string().contains("Operation not permitted"), "{e}");
            assert!(chattr("-i"));
        } else {
            // File systems without immutable flags: a read-only node
            // refusing write permission covers the same path.
            let n = g
                .open(raw_opts(&imm, false).with("read-only", true))
                .await
                .unwrap();
            assert!(BlockBackend::new("", &n, RW, Perm::ALL).is_err());
        }
        let img = s.raw_image("d.raw", 1 << 20);
        let n = g.open(raw_opts(&img, true)).await.unwrap();
        let blk = BlockBackend::new("", &n, RW, Perm::ALL).unwrap();
        // Past the end.
        let e = blk
            .pread((1 << 20) - 100, IoBuf::zeroed(200))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        // Zero length.
        assert_eq!(
            blk.pwrite(0, IoBuf::zeroed(0), WriteFlags::default())
                .await
                .unwrap()
                .len(),
            0
        );
        // Huge.
        let e = n
            .pwrite_zeroes(0, u64::MAX / 2, WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        // Misaligned memory under O_DIRECT goes through a bounce buffer.
        let mut big = IoBuf::filled(4096 + 7, 0x3c);
        let _head = big.split_to(7);
        assert!(!big.is_aligned(512));
        blk.pwrite(8192, big, WriteFlags::default()).await.unwrap();
        let mut rbuf = IoBuf::zeroed(4096 + 3);
        let _h = rbuf.split_to(3);
        let back = blk.pread(8192, rbuf).await.unwrap();
        assert!(back.iter().all(|&x| x == 0x3c));
        drop(blk);
        g.delete(n.name()).await.unwrap();
        let (ok, out) = qemu_io("raw", &img, &["read -P 0x3c 8k 4k"]);
        assert!(ok, "{out}");
    });
}

#[test]
fn engines_agree_under_concurrency() {
    // The same mixed concurrent workload on both engines yields identical
    // images.
    let s = Scratch::new("agree");
    let mut images = Vec::new();
    on_engines(|g, mode| {
        let img = s.raw_image(&format!("{mode:?}.raw"), 2 << 20);
        images.push(img.clone());
        async move {
            let n = g.open(raw_opts(&img, true)).await.unwrap();
            let blk = BlockBackend::new("", &n, RW, Perm::ALL).unwrap();
            let ctx = Rc::clone(g.context());
            let mut hs = Vec::new();
            for i in 0..200u64 {
                let blk = Rc::clone(&blk);
                hs.push(ctx.spawn(async move {
                    let off = (i * 7919) % ((2 << 20) - 5000);
                    let len = 1 + (i * 31) as usize % 4000;
                    blk.pwrite(off, IoBuf::filled(len, i as u8), WriteFlags::default())
                        .await
                        .unwrap();
                }));
                if i % 50 == 49 {
                    for h in hs.drain(..) {
                        h.await;
                    }
                }
            }
            for h in hs {
                h.await;
            }
            blk.flush().await.unwrap();
            drop(blk);
            g.delete(n.name()).await.unwrap();
        }
    });
    let a = std::fs::read(&images[0]).unwrap();
    let b = std::fs::read(&images[1]).unwrap();
    assert!(a == b, "io_uring and thread-pool images differ");
}
