//! qcow2 interop tests against QEMU (qemu-img, qemu-io), run on both
//! engines. They fail loudly when the QEMU tools are missing. Shared
//! helpers live here; `io.rs` covers guest I/O, `image.rs` whole-image
//! operations (open errors, create, check, snapshots, bitmaps).

mod crash;
mod gate;
mod image;
mod io;

use std::process::Command;
use std::rc::Rc;

use block_core::{
    AioMode, ErrorKind, EventBus, EventLoop, Graph, IoBuf, Node, Options, WriteFlags,
};

struct Dir(std::path::PathBuf);
impl Dir {
    fn new(name: &str) -> Self {
        let base = std::env::var_os("STRATA_TEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!(
            "strata-q2-{}-{}-{:?}",
            name,
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn file(&self, n: &str) -> String {
        self.0.join(n).to_string_lossy().into_owned()
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tool(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("{name} is required for the qcow2 tests and could not be run: {e}")
    });
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn qemu_img(args: &[&str]) -> String {
    let (ok, text) = tool("qemu-img", args);
    assert!(ok, "qemu-img {args:?} failed: {text}");
    text
}

fn qemu_io(img: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    let (ok, text) = tool("qemu-io", &args);
    assert!(
        ok && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// Creates a qcow2 image with qemu-img (`opts` for `-o`).
fn create_qcow2(img: &str, opts: &str, size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        img,
        &size.to_string(),
    ]);
}

fn check_clean(img: &str) {
    let (ok, text) = tool("qemu-img", &["check", img]);
    assert!(
        ok && text.contains("No errors were found"),
        "qemu-img check {img}: {text}"
    );
    assert!(!text.contains("leaked"), "qemu-img check {img}: {text}");
}

// Every test body runs on both engines, like the other driver tests.
use crate::tests::{on_engines, run};

fn q2_opts(path: &str) -> Options {
    Options::new()
        .with("driver", "qcow2")
        .with("file.driver", "file")
        .with("file.filename", path)
}

async fn open(g: &Graph, path: &str, ro: bool) -> Rc<Node> {
    g.open(q2_opts(path).with("read-only", ro)).await.unwrap()
}

async fn close(g: &Graph, n: Rc<Node>) {
    n.flush().await.unwrap();
    let name = n.name().to_owned();
    drop(n);
    g.close_all().await.unwrap();
    let _ = name;
}

async fn read_all(n: &Node) -> Vec<u8> {
    let size = n.size();
    let mut v = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let len = (size - off).min(1 << 20);
        let b = n.pread(off, IoBuf::zeroed(len as usize)).await.unwrap();
        v.extend_from_slice(&b);
        off += len;
    }
    v
}

/// A raw copy of an image made by QEMU: the oracle for reads.
fn raw_of(img: &str, dir: &Dir) -> Vec<u8> {
    let raw = dir.file("oracle.raw");
    qemu_img(&["convert", "-O", "raw", img, &raw]);
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    v
}

fn qemu_fill(img: &str, cs: u64) {
    let cmds: Vec<String> = vec![
        "write -P 0x11 0 4096".into(),
        format!("write -P 0x22 {} {}", cs - 512, 1024),
        format!("write -P 0x33 {} {}", 3 * cs + 512, 3 * cs),
        "write -P 0x44 1048576 65536".into(),
        format!("write -z {} {}", 3 * cs, cs),
        format!("discard {} {}", 5 * cs, cs),
        "write -P 0x55 3145728 1000".into(),
    ];
    qemu_io(img, &cmds);
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
    /// One whole cluster written compressed.
    Compressed(u64, u64, u8),
}

fn random_ops(seed: u64, size: u64, cs: u64, n: usize, discard: bool) -> Vec<Op> {
    random_ops_with(seed, size, cs, n, discard, false)
}

fn random_ops_with(
    seed: u64,
    size: u64,
    cs: u64,
    n: usize,
    discard: bool,
    compress: bool,
) -> Vec<Op> {
    let mut r = Rng(seed);
    // QEMU refuses compressed writes over clusters with data (EIO): they
    // go only where nothing was written before.
    let mut touched = std::collections::HashSet::new();
    (0..n)
        .map(|_| {
            let aligned = r.below(3) == 0;
            let (off, len) = if aligned {
                let c = r.below(size / cs - 2);
                (c * cs, (1 + r.below(3)) * cs)
            } else {
                let off = r.below(size - 3 * cs) & !511;
                (off, (1 + r.below(3 * cs / 512)) * 512)
            };
            match r.below(if compress {
                8
            } else if discard {
                6
            } else {
                5
            }) {
                0 => Op::Zero(off, len),
                5 if discard => Op::Discard(off, len),
                6 | 7 if !touched.contains(&(off / cs)) => {
                    touched.insert(off / cs);
                    Op::Compressed(off / cs * cs, cs, 1 + r.below(250) as u8)
                }
                _ => {
                    touched.extend(off / cs..(off + len).div_ceil(cs));
                    Op::Write(off, len, 1 + r.below(250) as u8)
                }
            }
        })
        .collect()
}

fn qemu_cmd(op: &Op) -> String {
    match op {
        Op::Write(o, l, p) => format!("write -P {p} {o} {l}"),
        Op::Zero(o, l) => format!("write -z {o} {l}"),
        Op::Discard(o, l) => format!("discard {o} {l}"),
        Op::Compressed(o, l, p) => format!("write -c -P {p} {o} {l}"),
    }
}

async fn apply(n: &Node, op: &Op) {
    match *op {
        Op::Write(o, l, p) => {
            n.pwrite(o, IoBuf::filled(l as usize, p), WriteFlags::default())
                .await
                .unwrap();
        }
        Op::Zero(o, l) => n.pwrite_zeroes(o, l, WriteFlags::default()).await.unwrap(),
        Op::Discard(o, l) => n.pdiscard(o, l).await.unwrap(),
        Op::Compressed(o, l, p) => crate::qcow2::Qcow2::of(n)
            .unwrap()
            .write_compressed(o, IoBuf::filled(l as usize, p))
            .await
            .unwrap(),
    }
}

fn model_apply(m: &mut [u8], op: &Op) {
    match *op {
        Op::Write(o, l, p) | Op::Compressed(o, l, p) => m[o as usize..(o + l) as usize].fill(p),
        Op::Zero(o, l) => m[o as usize..(o + l) as usize].fill(0),
        Op::Discard(..) => {}
    }
}

fn patch(path: &str, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn qemu_check_json(img: &str) -> String {
    let (_, text) = tool("qemu-img", &["check", "--output=json", img]);
    text
}

fn json_field(json: &str, key: &str) -> u64 {
    let k = format!("\"{key}\": ");
    json.find(&k)
        .map(|i| {
            json[i + k.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .unwrap()
        })
        .unwrap_or(0)
}
