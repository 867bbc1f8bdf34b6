//! Crash safety: `strata-img bench` writing into qcow2 images is killed
//! with SIGKILL at several points; QEMU's `qemu-img check` must then find
//! no corruption (leaked clusters are allowed: they are harmless and
//! `qemu-img check -r leaks` reclaims them), and the image must still read.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let base = std::env::var_os("STRATA_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let d = base.join(format!("strata-crash-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qemu_img(args: &[&str]) -> (i32, String) {
    let o = Command::new("timeout")
        .args(["-k", "5", "120", "qemu-img"])
        .args(args)
        .output()
        .expect("qemu-img is required (the test command installs it)");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code().unwrap_or(-1), text)
}

/// Starts a writer, kills it after `ms`, and checks the image.
fn kill_and_check(img: &str, bench: &[&str], ms: u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .arg("bench")
        .args(bench)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let st = child.wait().unwrap();
    assert!(finished || st.code().is_none(), "writer failed: {st:?}");
    let (code, out) = qemu_img(&["check", "--output=json", img]);
    // 0: clean, 3: leaks only. 2 would be corruption, 1 a check error.
    assert!(
        code == 0 || code == 3,
        "after a kill at {ms} ms ({bench:?}): exit {code}\n{out}"
    );
    assert!(out.contains("\"check-errors\": 0"), "{out}");
    assert!(!out.contains("\"corruptions\": "), "{out}");
    let (code, out) = qemu_img(&["check", "-r", "leaks", img]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", img, img]);
    assert_eq!(code, 0, "image no longer reads: {out}");
}

#[test]
fn killed_writers_leave_consistent_qcow2_images() {
    let s = Scratch::new("kill");
    let cases: &[(&str, &[&str])] = &[
        // Allocating 4 KiB writes spread over fresh clusters, deep queue.
        (
            "cluster_size=65536",
            &[
                "-w", "-f", "qcow2", "-c", "2000000", "-s", "4k", "-S", "64k", "-d", "32", "-t",
                "none",
            ],
        ),
        // Small clusters: L2 tables and refcount blocks allocated often,
        // refcount table growth.
        (
            "cluster_size=4096",
            &[
                "-w",
                "-f",
                "qcow2",
                "-c",
                "2000000",
                "-s",
                "4k",
                "-S",
                "12k",
                "-d",
                "16",
                "-i",
                "threads",
                "-t",
                "writeback",
            ],
        ),
        // Whole-cluster and multi-cluster writes with flushes in between.
        (
            "cluster_size=65536,refcount_bits=64",
            &[
                "-w",
                "-f",
                "qcow2",
                "-c",
                "2000000",
                "-s",
                "192k",
                "-d",
                "8",
                "-t",
                "none",
                "--flush-interval=7",
            ],
        ),
    ];
    for (i, (opts, bench)) in cases.iter().enumerate() {
        for ms in [30u64, 120, 400] {
            let img = s.0.join(format!("c{i}-{ms}.qcow2"));
            let img = img.to_str().unwrap();
            let (code, out) = qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, img, "256M"]);
            assert_eq!(code, 0, "{out}");
            kill_and_check(img, bench, ms);
            // And a second crash on the image the first one left.
            kill_and_check(img, bench, ms / 2 + 10);
        }
    }
}
