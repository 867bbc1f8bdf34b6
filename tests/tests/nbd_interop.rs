//! The NBD server against real clients: qemu-io, qemu-img (info, map,
//! convert, compare) and libnbd's nbdinfo/nbdcopy, over unix and TCP; many
//! clients at once; abusive clients that must not hurt the server.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicIsize, Ordering};

use block_core::AioMode;
use qmp_front::nbd::ExportConfig;
use strata_tests::{qemu_io, raw_opts, run_tool, NbdFixture, Scratch};

/// Counts the bytes live on the heap, so that a test can tell whether the
/// server (running in this process) keeps memory per closed connection.
/// nextest runs every test in a process of its own.
struct CountingAlloc;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is only bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on unchanged.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on unchanged.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { System.dealloc(p, l) };
        LIVE_BYTES.fetch_sub(l.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on unchanged.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE_BYTES.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn export(node: &str, name: &str, writable: bool) -> ExportConfig {
    ExportConfig {
        id: format!("exp-{name}"),
        node_name: node.to_owned(),
        name: Some(name.to_owned()),
        writable,
        allocation_depth: true,
        ..Default::default()
    }
}

fn raw_node(path: &str, node: &str) -> block_core::Options {
    raw_opts(path, false)
        .with("node-name", node)
        .with("discard", "unmap")
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
fn qemu_io_and_qemu_img_over_unix_and_tcp() {
    for mode in [AioMode::IoUring, AioMode::Threads] {
        let s = Scratch::new(&format!("nbd-io-{mode:?}"));
        let img = s.raw_image("disk.raw", 8 << 20);
        let sock = s.path("nbd.sock");
        let f = NbdFixture::start(
            mode,
            &sock,
            false,
            vec![(raw_node(&img, "disk0"), export("disk0", "disk", true))],
        );
        let uri = f.uri("disk");
        let (ok, out) = qemu_io(
            "raw",
            &uri,
            &[
                "write -P 0xa5 0 64k",
                "write -P 0x5a 1M 4k",
                "write -z 2M 1M",
                "discard 3M 1M",
                "read -P 0xa5 0 64k",
                "read -P 0x5a 1M 4k",
                "read -P 0 2M 1M",
                "flush",
            ],
        );
        assert!(ok, "{mode:?}: {out}");
        let info = run_tool("qemu-img", &["info", "--output=json", &uri]);
        assert!(info.status.success(), "{}", text(&info));
        assert!(
            text(&info).contains("\"virtual-size\": 8388608"),
            "{}",
            text(&info)
        );
        // The data reached the file.
        let local = run_tool(
            "qemu-io",
            &["-U", "-r", "-f", "raw", "-c", "read -P 0x5a 1M 4k", &img],
        );
        assert!(!text(&local).contains("failed"), "{}", text(&local));
        drop(f);

        // TCP.
        let f = NbdFixture::start(
            mode,
            &s.path("unused.sock"),
            true,
            vec![(raw_node(&img, "disk0"), export("disk0", "disk", false))],
        );
        let o = run_tool(
            "qemu-io",
            &[
                "-r",
                "-f",
                "raw",
                "-c",
                "read -P 0xa5 0 64k",
                &f.tcp_uri("disk"),
            ],
        );
        assert!(
            o.status.success() && !text(&o).contains("fail"),
            "{}",
            text(&o)
        );
        // A read-only export cannot be opened for writing.
        let (ok, out) = qemu_io("raw", &f.tcp_uri("disk"), &["write 0 4k"]);
        assert!(!ok && out.contains("Permission denied"), "{out}");
    }
}

#[test]
fn map_convert_and_compare_over_nbd() {
    let s = Scratch::new("nbd-map");
    let img = s.raw_image("sparse.raw", 16 << 20);
    let (ok, out) = qemu_io(
        "raw",
        &img,
        &["write -P 1 0 1M", "write -P 2 5M 64k", "write -P 3 15M 1M"],
    );
    assert!(ok, "{out}");
    let f = NbdFixture::start(
        AioMode::Auto,
        &s.path("n.sock"),
        false,
        vec![(raw_node(&img, "n0"), export("n0", "n0", false))],
    );
    let uri = f.uri("n0");
    let map_of = |args: &[&str]| -> Vec<(u64, u64, bool, bool)> {
        let o = run_tool("qemu-img", args);
        assert!(o.status.success(), "{}", text(&o));
        let v: Vec<serde_json_lite::Entry> =
            serde_json_lite::parse(&String::from_utf8_lossy(&o.stdout));
        v.into_iter()
            .map(|e| (e.start, e.length, e.data, e.zero))
            .collect()
    };
    let local = map_of(&["map", "--output=json", "-f", "raw", "-U", &img]);
    let remote = map_of(&["map", "--output=json", "-f", "raw", &uri]);
    assert_eq!(local, remote);
    assert!(remote.len() >= 5, "{remote:?}");
    let copy = s.path("copy.raw");
    let o = run_tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &copy],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run_tool(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "raw", &img, &copy],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run_tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, &copy],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn libnbd_tools() {
    let s = Scratch::new("nbd-libnbd");
    let img = s.raw_image("l.raw", 4 << 20);
    let (ok, out) = qemu_io("raw", &img, &["write -P 7 1M 1M"]);
    assert!(ok, "{out}");
    let f = NbdFixture::start(
        AioMode::Auto,
        &s.path("l.sock"),
        false,
        vec![(
            raw_node(&img, "l0"),
            ExportConfig {
                description: Some("test disk".into()),
                ..export("l0", "first", true)
            },
        )],
    );
    let nbdinfo = |args: &[&str]| {
        let o = Command::new("nbdinfo")
            .args(args)
            .output()
            .expect("nbdinfo (Debian libnbd-bin) is required");
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let list = nbdinfo(&["--list", &f.uri("")]);
    assert!(
        list.contains("export=\"first\"") || list.contains("export=first"),
        "{list}"
    );
    assert!(list.contains("test disk"), "{list}");
    let map = nbdinfo(&["--map", &f.uri("first")]);
    assert!(map.contains("data"), "{map}");
    assert!(map.contains("hole"), "{map}");
    let depth = nbdinfo(&["--map=qemu:allocation-depth", &f.uri("first")]);
    assert!(depth.contains("local"), "{depth}");
    let out = s.path("copy.raw");
    let o = Command::new("nbdcopy")
        .args([&f.uri("first"), &out])
        .output()
        .expect("nbdcopy");
    assert!(o.status.success(), "{}", text(&o));
    let o = run_tool(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "raw", &img, &out],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn many_clients_see_each_others_flushed_writes() {
    let s = Scratch::new("nbd-many");
    let img = s.raw_image("m.raw", 8 << 20);
    let f = NbdFixture::start(
        AioMode::Auto,
        &s.path("m.sock"),
        false,
        vec![(raw_node(&img, "m0"), export("m0", "m", true))],
    );
    let uri = f.uri("m");
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                qemu_io(
                    "raw",
                    &uri,
                    &[&format!("write -P {} {}k 64k", i + 1, i * 64), "flush"],
                )
            })
        })
        .collect();
    for w in writers {
        let (ok, out) = w.join().unwrap();
        assert!(ok, "{out}");
    }
    let cmds: Vec<String> = (0..8)
        .map(|i| format!("read -P {} {}k 64k", i + 1, i * 64))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    let (ok, out) = qemu_io("raw", &uri, &cmds);
    assert!(ok, "{out}");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn abusive_clients_do_not_hurt_the_server() {
    let s = Scratch::new("nbd-abuse");
    let img = s.raw_image("a.raw", 1 << 20);
    let sock = s.path("a.sock");
    let f = NbdFixture::start(
        AioMode::Auto,
        &sock,
        false,
        vec![(raw_node(&img, "a0"), export("a0", "a", true))],
    );
    let garbage: [&[u8]; 6] = [
        b"",
        b"\x00\x00\x00\x03",
        b"GET / HTTP/1.0\r\n\r\n",
        // Fixed newstyle, then a bogus option magic.
        b"\x00\x00\x00\x03IHAVEOPX\x00\x00\x00\x07\x00\x00\x00\x00",
        // A huge option length.
        b"\x00\x00\x00\x03IHAVEOPT\x00\x00\x00\x07\xff\xff\xff\xff",
        // Truncated option.
        b"\x00\x00\x00\x03IHAVEOPT\x00\x00\x00\x07\x00\x00\x01\x00abc",
    ];
    let abuse = |count: usize| {
        for i in 0..count {
            let mut c = UnixStream::connect(&sock).expect("connect");
            let g = garbage[i % garbage.len()];
            let _ = c.write_all(g);
            if i % 97 == 0 {
                // Some clients read the greeting first.
                let mut greet = [0u8; 18];
                let _ = c.read_exact(&mut greet);
            }
            drop(c);
        }
        // The server drops the last connections on its own loop.
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    // A warm-up first: lazily made buffers and tables are not leaks.
    abuse(600);
    let (fds_before, heap_before) = (open_fds(), LIVE_BYTES.load(Ordering::Relaxed));
    abuse(10_000);
    let (fds_after, heap_after) = (open_fds(), LIVE_BYTES.load(Ordering::Relaxed));
    assert!(
        fds_after <= fds_before + 4,
        "fds before {fds_before}, after {fds_after}"
    );
    // Less than 8 bytes per connection: no connection leaves anything.
    let grown = heap_after - heap_before;
    eprintln!("heap {heap_before} -> {heap_after}, fds {fds_before} -> {fds_after}");
    assert!(
        grown < 80_000,
        "heap grew by {grown} bytes over 10,000 connections ({heap_before} -> {heap_after})"
    );
    // A client that stops reading: send many requests, never read replies.
    {
        let mut c = UnixStream::connect(&sock).unwrap();
        let mut greet = [0u8; 18];
        c.read_exact(&mut greet).unwrap();
        c.write_all(b"\x00\x00\x00\x03").unwrap();
        c.write_all(b"IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x01a")
            .unwrap();
        let mut hdr = [0u8; 10];
        c.read_exact(&mut hdr).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&(1u32 << 20).to_be_bytes());
        for _ in 0..200 {
            if c.write_all(&req).is_err() {
                break;
            }
        }
        // Others are still served meanwhile.
        let (ok, out) = qemu_io("raw", &f.uri("a"), &["write -P 9 0 4k", "read -P 9 0 4k"]);
        assert!(ok, "{out}");
    }
    // Out-of-range and unknown requests get errors, the connection lives on.
    let (ok, out) = qemu_io("raw", &f.uri("a"), &["read 1M 4k"]);
    assert!(!ok, "{out}");
    let (ok, out) = qemu_io("raw", &f.uri("a"), &["read -P 9 0 4k"]);
    assert!(ok, "{out}");
    // Unknown export.
    let (ok, out) = qemu_io("raw", &f.uri("nope"), &["read 0 4k"]);
    assert!(!ok, "{out}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The server (same process) did not leak descriptors.
    let after = open_fds();
    assert!(
        after <= fds_before + 4,
        "fds before {fds_before}, after {after}"
    );
}

/// A tiny reader for `qemu-img map --output=json` (flat objects of numbers
/// and booleans), to avoid a JSON dependency in this crate.
mod serde_json_lite {
    #[derive(Debug)]
    pub struct Entry {
        pub start: u64,
        pub length: u64,
        pub data: bool,
        pub zero: bool,
    }

    fn field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
        let pat = format!("\"{key}\":");
        let i = obj.find(&pat)? + pat.len();
        let rest = obj[i..].trim_start();
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim())
    }

    pub fn parse(s: &str) -> Vec<Entry> {
        s.split('{')
            .skip(1)
            .map(|o| Entry {
                start: field(o, "start").and_then(|v| v.parse().ok()).unwrap_or(0),
                length: field(o, "length").and_then(|v| v.parse().ok()).unwrap_or(0),
                data: field(o, "data") == Some("true"),
                zero: field(o, "zero") == Some("true"),
            })
            .collect()
    }
}

/// Merges neighbouring map entries that read alike (data, zero), so maps
/// with different extent boundaries (a backing chain locally, one export
/// remotely) compare by meaning.
fn merged(v: Vec<serde_json_lite::Entry>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v {
        match out.last_mut() {
            Some(l) if l.2 == e.data && l.3 == e.zero && l.0 + l.1 == e.start => l.1 += e.length,
            _ => out.push((e.start, e.length, e.data, e.zero)),
        }
    }
    out
}

#[test]
fn qcow2_with_backing_chain_over_nbd() {
    let s = Scratch::new("nbd-qcow2");
    let base = s.path("base.qcow2");
    let top = s.path("top.qcow2");
    let o = run_tool("qemu-img", &["create", "-q", "-f", "qcow2", &base, "8M"]);
    assert!(o.status.success(), "{}", text(&o));
    let (ok, out) = qemu_io("qcow2", &base, &["write -P 1 0 1M", "write -P 4 6M 64k"]);
    assert!(ok, "{out}");
    let local_map = |img: &str| {
        let o = run_tool(
            "qemu-img",
            &["map", "--output=json", "-U", "-f", "qcow2", img],
        );
        assert!(o.status.success(), "{}", text(&o));
        merged(serde_json_lite::parse(&String::from_utf8_lossy(&o.stdout)))
    };
    for mode in [AioMode::IoUring, AioMode::Threads] {
        let _ = std::fs::remove_file(&top);
        let o = run_tool(
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
                &top,
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        let (ok, out) = qemu_io("qcow2", &top, &["write -P 2 512k 256k", "write -z 6M 64k"]);
        assert!(ok, "{out}");
        let want = local_map(&top);
        let node = block_core::Options::new()
            .with("driver", "qcow2")
            .with("node-name", "q0")
            .with("discard", "unmap")
            .with("file.driver", "file")
            .with("file.filename", top.as_str());
        let f = NbdFixture::start(
            mode,
            &s.path("q.sock"),
            false,
            vec![(node, export("q0", "q0", true))],
        );
        let uri = f.uri("q0");
        let (ok, out) = qemu_io(
            "raw",
            &uri,
            &[
                "read -P 1 0 512k",
                "read -P 2 512k 256k",
                "read -P 1 768k 256k",
                "read -P 0 1M 5M",
                "read -P 0 6M 64k",
            ],
        );
        assert!(ok, "{mode:?}: {out}");
        // The map over NBD is the chain's map.
        let o = run_tool("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
        assert!(o.status.success(), "{}", text(&o));
        let got = merged(serde_json_lite::parse(&String::from_utf8_lossy(&o.stdout)));
        assert_eq!(got, want, "{mode:?}");
        let o = run_tool(
            "qemu-img",
            &["compare", "-U", "-f", "raw", "-F", "qcow2", &uri, &top],
        );
        assert!(o.status.success(), "{mode:?}: {}", text(&o));
        // Allocation depth per layer, as qemu-nbd -A reports it.
        let o = std::process::Command::new("timeout")
            .args([
                "-k",
                "5",
                "60",
                "nbdinfo",
                "--map=qemu:allocation-depth",
                &uri,
            ])
            .output()
            .expect("nbdinfo (libnbd-bin) is required; the test command installs it");
        let depth: Vec<Vec<String>> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.split_whitespace().take(3).map(str::to_owned).collect())
            .collect();
        let expect: Vec<Vec<String>> = [
            ["0", "524288", "2"],
            ["524288", "262144", "1"],
            ["786432", "262144", "2"],
            ["1048576", "5242880", "0"],
            ["6291456", "65536", "1"],
            ["6356992", "2031616", "0"],
        ]
        .iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect();
        assert_eq!(depth, expect, "{mode:?}: {}", text(&o));
        // Writes through the export land in the overlay only.
        let (ok, out) = qemu_io("raw", &uri, &["write -P 3 4M 64k", "flush"]);
        assert!(ok, "{mode:?}: {out}");
        drop(f);
        let o = run_tool("qemu-img", &["check", &top]);
        assert!(o.status.success(), "{mode:?}: {}", text(&o));
        let (ok, out) = qemu_io("qcow2", &top, &["read -P 3 4M 64k", "read -P 2 512k 256k"]);
        assert!(ok, "{mode:?}: {out}");
        let (ok, out) = qemu_io("qcow2", &base, &["read -P 0 4M 64k"]);
        assert!(ok, "{mode:?}: base changed: {out}");
    }
}
