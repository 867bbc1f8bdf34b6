//! qcow2 interop tests against QEMU (qemu-img, qemu-io), run on both
//! engines. They fail loudly when the QEMU tools are missing.

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

fn check_clean(img: &str) {
    let (ok, text) = tool("qemu-img", &["check", img]);
    assert!(
        ok && text.contains("No errors were found"),
        "qemu-img check {img}: {text}"
    );
    assert!(!text.contains("leaked"), "qemu-img check {img}: {text}");
}

fn on_engines(f: impl Fn(&Rc<Graph>, AioMode)) {
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

fn run<T>(g: &Rc<Graph>, fut: impl std::future::Future<Output = T>) -> T {
    Rc::clone(g.context()).block_on(fut)
}

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
}

fn random_ops(seed: u64, size: u64, cs: u64, n: usize, discard: bool) -> Vec<Op> {
    let mut r = Rng(seed);
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
            match r.below(if discard { 6 } else { 5 }) {
                0 => Op::Zero(off, len),
                5 => Op::Discard(off, len),
                _ => Op::Write(off, len, 1 + r.below(250) as u8),
            }
        })
        .collect()
}

fn qemu_cmd(op: &Op) -> String {
    match op {
        Op::Write(o, l, p) => format!("write -P {p} {o} {l}"),
        Op::Zero(o, l) => format!("write -z {o} {l}"),
        Op::Discard(o, l) => format!("discard {o} {l}"),
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
    }
}

fn model_apply(m: &mut [u8], op: &Op) {
    match *op {
        Op::Write(o, l, p) => m[o as usize..(o + l) as usize].fill(p),
        Op::Zero(o, l) => m[o as usize..(o + l) as usize].fill(0),
        Op::Discard(..) => {}
    }
}

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
    for (seed, cfg, cs) in [
        (7u64, "cluster_size=65536", 65536u64),
        (8, "cluster_size=4096,refcount_bits=8", 4096),
        (9, "cluster_size=32768,extended_l2=on", 32768),
    ] {
        let size = 4u64 << 20;
        let ops = random_ops(seed, size, cs, 120, true);
        let a = d.file("qemu.qcow2");
        let b = d.file("strata.qcow2");
        for p in [&a, &b] {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                cfg,
                p,
                &size.to_string(),
            ]);
        }
        let cmds: Vec<String> = ops.iter().map(qemu_cmd).collect();
        for chunk in cmds.chunks(40) {
            qemu_io(&a, chunk);
        }
        on_engines(|g, _| {
            std::fs::remove_file(&b).unwrap();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                cfg,
                &b,
                &size.to_string(),
            ]);
            run(g, async {
                let n = g.open(q2_opts(&b).with("discard", "unmap")).await.unwrap();
                for op in &ops {
                    apply(&n, op).await;
                }
                close(g, n).await;
            });
            check_clean(&b);
            check_clean(&a);
            let (ok, text) = tool("qemu-img", &["compare", &a, &b]);
            assert!(ok, "{cfg}: qemu-img compare: {text}");
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

fn patch(path: &str, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

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
    use super::create::{create_file, CreateOptions};
    use super::header::CompressionType;
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

#[test]
fn check_reports_like_qemu_and_repairs_leaks() {
    use super::check::Repair;
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
            let r = super::check_image(g, q2_opts(&img), Repair::default())
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
        let r = super::check_image(
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
    use super::image::Image;
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
                    im.write_compressed(i * 65536, &vec![0x40 + i as u8; 65536])
                        .await
                        .unwrap();
                }
                // Incompressible data is stored plainly.
                let mut r = Rng(99);
                let noise: Vec<u8> = (0..65536).map(|_| r.next() as u8).collect();
                im.write_compressed(10 * 65536, &noise).await.unwrap();
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

#[test]
fn persistent_bitmaps_are_kept_and_marked_in_use_on_write() {
    use super::check::Repair;
    let d = Dir::new("bitmaps");
    on_engines(|g, mode| {
        let img = d.file("bm.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", &img, "16M"]);
        qemu_img(&["bitmap", "--add", &img, "b0"]);
        qemu_img(&["bitmap", "--add", "-g", "128k", &img, "b1"]);
        qemu_io(&img, &["write -P 3 0 1M".into()]);
        run(g, async {
            let r = super::check_image(g, q2_opts(&img), Repair::default())
                .await
                .unwrap();
            assert_eq!((r.leaks, r.corruptions), (0, 0), "{mode:?} {r:?}");
            let n = open(g, &img, false).await;
            n.pwrite(4 << 20, IoBuf::filled(4096, 4), WriteFlags::default())
                .await
                .unwrap();
            close(g, n).await;
        });
        check_clean(&img);
        let info = qemu_img(&["info", &img]);
        assert_eq!(info.matches("in-use").count(), 2, "{info}");
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
fn internal_snapshot_create_is_understood_by_qemu() {
    use super::image::Image;
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
    use super::image::Image;
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
