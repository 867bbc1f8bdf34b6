//! Runs the built `strata-img bench` and `qemu-img bench` with the same
//! small argument sets and compares what they print: stdout line by line
//! with the timing number masked, stderr with the program name masked, and
//! the exit status. Fails loudly when qemu-img is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let base = std::env::var_os("STRATA_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!("strata-benchcli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (status, stdout, stderr) with timings and program names masked.
fn run(tool: &str, args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(tool)
        .arg("bench")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e} (is QEMU installed?)"));
    let mask = |b: &[u8]| {
        let s = String::from_utf8_lossy(b)
            .replace("qemu-img", "PROG")
            .replace("strata-img", "PROG");
        s.lines()
            .map(|l| match (l.find(" in "), l.strip_suffix(" seconds.")) {
                (Some(i), Some(_)) if l.starts_with("Run completed") => {
                    format!("{} in T seconds.", &l[..i])
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    (
        out.status.code().unwrap_or(-1),
        mask(&out.stdout),
        mask(&out.stderr),
    )
}

#[test]
fn output_matches_qemu_img() {
    let dir = Scratch::new("cmp");
    std::fs::File::create(dir.0.join("small.img"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let strata = env!("CARGO_BIN_EXE_strata-img");
    let cases: &[&[&str]] = &[
        &["-c", "10", "-d", "2", "small.img"],
        &[
            "-c",
            "100",
            "-d",
            "3",
            "-S",
            "1000",
            "-o",
            "1040000",
            "-f",
            "raw",
            "small.img",
        ],
        &["-c", "2", "-o", "2M", "-f", "raw", "small.img"],
        &[
            "-c",
            "16",
            "-s",
            "64k",
            "-t",
            "none",
            "-f",
            "raw",
            "small.img",
        ],
        &[
            "-w",
            "-c",
            "200",
            "-d",
            "4",
            "--flush-interval",
            "100",
            "-f",
            "raw",
            "small.img",
        ],
        &[
            "-w",
            "-c",
            "200",
            "-d",
            "4",
            "--flush-interval",
            "100",
            "--no-drain",
            "small.img",
        ],
        &[
            "-w",
            "-c",
            "5",
            "--pattern",
            "0xff",
            "-t",
            "writethrough",
            "small.img",
        ],
        &["-n", "-c", "1", "small.img"],
        &["-n", "-t", "none", "-c", "1", "-f", "raw", "small.img"],
        &["-w", "-U", "-c", "1", "small.img"],
        &["-c", "abc", "small.img"],
        &["-s", "3G", "small.img"],
        &["-x", "small.img"],
        &["--f", "raw", "small.img"],
        &["small.img", "other.img"],
        &["-c", "1", "missing.img"],
        &["--image-opts", "-f", "raw", "small.img"],
        &["--help"],
    ];
    for args in cases {
        let q = run("qemu-img", args, &dir.0);
        let s = run(strata, args, &dir.0);
        assert_eq!(q, s, "bench {args:?}");
    }
}
