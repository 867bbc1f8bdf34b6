//! Shared harness of the strata-img tests against qemu-img: scratch
//! directories, running either tool under `timeout` with program names
//! masked, and peeking and poking image bytes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata-img");

pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let base = std::env::var_os("STRATA_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let p = base.join(format!("strata-imgcli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("q")).expect("scratch dir");
        std::fs::create_dir_all(p.join("s")).expect("scratch dir");
        Scratch(p)
    }

    /// The directory qemu-img works in.
    pub fn q(&self) -> PathBuf {
        self.0.join("q")
    }

    /// The directory strata-img works in.
    pub fn s(&self) -> PathBuf {
        self.0.join("s")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a command printed, program names masked.
#[derive(Debug, PartialEq, Eq)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn exec(prog: &str, args: &[&str], dir: &Path) -> Out {
    let out = Command::new("timeout")
        .args(["-k", "5", "120", prog])
        .args(args)
        .current_dir(dir)
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e} (is QEMU installed?)"));
    let mask = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace("qemu-img", "PROG")
            .replace(STRATA, "PROG")
            .replace("strata-img", "PROG")
    };
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: mask(&out.stdout),
        stderr: mask(&out.stderr),
    }
}

pub fn qemu_img(args: &[&str], dir: &Path) -> Out {
    exec("qemu-img", args, dir)
}

pub fn strata(args: &[&str], dir: &Path) -> Out {
    exec(STRATA, args, dir)
}

/// Runs a helper command that must succeed.
pub fn must(prog: &str, args: &[&str], dir: &Path) -> Out {
    let o = exec(prog, args, dir);
    assert_eq!(o.code, 0, "{prog} {args:?} failed: {o:?}");
    o
}

pub fn qemu_io(img: &str, fmt: &str, cmds: &[&str], dir: &Path) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    must("qemu-io", &args, dir);
}

/// Runs `args` through both tools in the same directory and expects the
/// same output and status.
pub fn same(args: &[&str], dir: &Path) -> Out {
    let q = qemu_img(args, dir);
    let s = strata(args, dir);
    assert_eq!(s, q, "strata-img {args:?} differs from qemu-img");
    s
}

/// [`same`] for check.
pub fn same_check(args: &[&str], dir: &Path) -> Out {
    same(args, dir)
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Reads the big-endian u64 at `off` of a file.
pub fn peek64(path: &Path, off: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap_or_else(|e| panic!("read {} at {off:#x}: {e}", path.display()));
    u64::from_be_bytes(b)
}

/// Writes the big-endian u64 `v` at `off` of a file.
pub fn poke64(path: &Path, off: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&v.to_be_bytes(), off)
        .unwrap_or_else(|e| panic!("write {} at {off:#x}: {e}", path.display()));
}

pub const COPIED: u64 = 1 << 63;

/// File offset of active L1 entry `i` (header field l1_table_offset).
pub fn l1_entry_pos(path: &Path, i: u64) -> u64 {
    peek64(path, 40) + i * 8
}

/// File offset of entry `j` of the L2 table active L1 entry `i` points to.
pub fn l2_entry_pos(path: &Path, i: u64, j: u64) -> u64 {
    (peek64(path, l1_entry_pos(path, i)) & 0x00ff_ffff_ffff_fe00) + j * 8
}
