//! End-to-end tests of stratad's NBD exports: the daemon is driven over
//! QMP (and its command line) and the exports are used with QEMU's own
//! NBD client (`qemu-io`, `qemu-img`). Expected error texts and event
//! shapes were taken from qemu-storage-daemon 10.0 running the same
//! conversations. Skipped when the QEMU tools are not installed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;
use support::{tmpdir, Client, Daemon};

/// Upper bound for any one external tool run (seconds, for `timeout`).
const TOOL_TIMEOUT: &str = "30";

fn have_tools() -> bool {
    let ok = ["qemu-io", "qemu-img"].iter().all(|t| {
        Command::new("timeout")
            .args(["10", t, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    // A missing oracle is a loud failure, never a skip: the test command
    // installs QEMU's tools.
    assert!(
        ok,
        "qemu-io and qemu-img are required (scripts/test-all installs qemu-utils)"
    );
    ok
}

fn raw_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn add_raw(c: &mut Client, node: &str, img: &Path, read_only: bool) {
    c.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": node, "read-only": read_only,
               "file": {"driver": "file", "filename": img}}),
    );
}

fn start_unix(c: &mut Client, d: &Daemon) {
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": d.nbd_sock()}}}),
    );
}

/// Runs a QEMU tool under `timeout`; returns (success, stdout + stderr).
fn tool(prog: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg(TOOL_TIMEOUT)
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-io -f raw URI -c cmd...`, asserting that every command worked
/// (qemu-io exits 0 even when a command fails, so the output is checked).
fn qemu_io(uri: &str, read_only: bool, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let (ok, out) = tool("qemu-io", &args);
    assert!(ok, "qemu-io {cmds:?} on {uri}: {out}");
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?} on {uri}: {out}"
    );
    out
}

/// A qemu-io session kept open (a connected NBD client).
struct IoClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl IoClient {
    fn open(uri: &str, read_only: bool) -> IoClient {
        let mut cmd = Command::new("timeout");
        cmd.args([TOOL_TIMEOUT, "qemu-io", "-f", "raw"]);
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .arg(uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut c = IoClient {
            child,
            stdin,
            stdout,
        };
        // Connected once the first request is answered.
        let l = c.run("read 0 512");
        assert!(l.contains("read 512/512 bytes"), "{l}");
        c
    }

    /// Sends one read or write and returns its first output line (a
    /// success prints a second line, with timings, which is skipped).
    fn run(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        if !l.contains("failed") {
            let mut stats = String::new();
            self.stdout.read_line(&mut stats).unwrap();
        }
        l
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

impl Drop for IoClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn deleted(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e: &Value| e["data"] == json!({ "id": id })
}

/// Writes through a writable export, checks the data through the export
/// and against a reference image, lists and deletes the export.
#[test]
fn writable_export_round_trip() {
    if !have_tools() {
        return;
    }
    let d = Daemon::start("rw", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let reference = raw_image(&d.dir, "ref.raw", 1 << 20);
    let mut c = d.connect();
    add_raw(&mut c, "r0", &img, false);
    start_unix(&mut c, &d);
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "writable": true,
               "name": "exp", "description": "test disk"}),
    );
    let writes = [
        "write -P 0xa5 0 64k",
        "write -P 0x5a 512k 4k",
        "write -z 8k 4k",
    ];
    qemu_io(&d.uri("exp"), false, &writes);
    qemu_io(
        &reference.display().to_string(),
        false,
        &[
            "write -P 0xa5 0 64k",
            "write -P 0x5a 512k 4k",
            "write -z 8k 4k",
        ],
    );
    qemu_io(
        &d.uri("exp"),
        true,
        &[
            "read -P 0xa5 0 8k",
            "read -P 0 8k 4k",
            "read -P 0xa5 12k 52k",
            "read -P 0x5a 512k 4k",
            "read -P 0 516k 508k",
        ],
    );
    let (same, out) = tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &d.uri("exp"),
            &reference.display().to_string(),
        ],
    );
    assert!(same, "{out}");
    assert_eq!(
        c.ok("query-block-exports", json!({})),
        json!([{"id": "e0", "type": "nbd", "node-name": "r0", "shutting-down": false}])
    );
    // The export's BlockBackend is a vertex of the graph, with QEMU's ids
    // (backends are met first) and the permissions of a writable export.
    let g = c.ok("x-debug-query-block-graph", json!({}));
    assert_eq!(
        g["nodes"][2],
        json!({"id": 1, "type": "block-backend", "name": ""})
    );
    assert_eq!(g["nodes"][0]["name"], "r0");
    assert_eq!(
        g["edges"][1],
        json!({"parent": 1, "child": 2, "name": "root", "perm": ["write", "consistent-read"],
               "shared-perm": ["write-unchanged", "write", "consistent-read"]})
    );
    c.ok("block-export-del", json!({"id": "e0"}));
    let ev = c.wait_event("BLOCK_EXPORT_DELETED", |_| true);
    assert_eq!(ev["data"], json!({"id": "e0"}));
    let ts = &ev["timestamp"];
    assert!(ts["seconds"].as_i64().unwrap() > 0 && ts["microseconds"].is_i64());
    assert_eq!(ev.as_object().unwrap().len(), 3, "{ev}");
    assert_eq!(c.ok("query-block-exports", json!({})), json!([]));
    // The export is gone for clients too.
    let (ok, out) = tool(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read 0 512", &d.uri("exp")],
    );
    assert!(!ok || out.contains("can't open"), "{out}");
    // And the node is free again: it can be deleted.
    c.ok("blockdev-del", json!({"node-name": "r0"}));
}

/// A read-only export refuses writes; exports list newest first.
#[test]
fn read_only_export_and_listing_order() {
    if !have_tools() {
        return;
    }
    let d = Daemon::start("ro", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let mut c = d.connect();
    add_raw(&mut c, "r0", &img, false);
    start_unix(&mut c, &d);
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "a", "node-name": "r0", "name": "ra"}),
    );
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "b", "node-name": "r0", "name": "rb",
               "writethrough": true, "allocation-depth": true}),
    );
    let list = c.ok("query-block-exports", json!({}));
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["b", "a"]);
    let (ok, out) = tool("qemu-io", &["-f", "raw", "-c", "write 0 512", &d.uri("ra")]);
    assert!(!ok || out.contains("can't open"), "{out}");
    qemu_io(&d.uri("ra"), true, &["read -P 0 0 64k"]);
    let (ok, out) = tool(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &d.uri("rb")],
    );
    assert!(ok, "{out}");
    c.ok("nbd-server-stop", json!({}));
    // Newest first, as qemu-storage-daemon closes them, before the reply.
    assert_eq!(c.events.len(), 2, "{:?}", c.events);
    let a = c.wait_event("BLOCK_EXPORT_DELETED", |_| true);
    let b = c.wait_event("BLOCK_EXPORT_DELETED", |_| true);
    assert_eq!(
        (a["data"].clone(), b["data"].clone()),
        (json!({"id": "b"}), json!({"id": "a"}))
    );
    assert_eq!(c.ok("query-block-exports", json!({})), json!([]));
    assert_eq!(
        c.generic_err("nbd-server-stop", json!({})),
        "NBD server not running"
    );
    // As with qemu-storage-daemon, the socket file goes with the server.
    let end = Instant::now() + Duration::from_secs(5);
    while Path::new(&d.nbd_sock()).exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!Path::new(&d.nbd_sock()).exists());
}

/// Safe removal is refused while a client is connected; hard removal
/// disconnects it, and the event follows.
#[test]
fn removal_modes_with_a_connected_client() {
    if !have_tools() {
        return;
    }
    let d = Daemon::start("modes", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let mut c = d.connect();
    add_raw(&mut c, "r0", &img, false);
    start_unix(&mut c, &d);
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "writable": true, "name": "exp"}),
    );
    let mut client = IoClient::open(&d.uri("exp"), false);
    assert!(client.run("write -P 0x11 0 4k").contains("wrote 4096/4096"));
    assert_eq!(
        c.generic_err("block-export-del", json!({"id": "e0"})),
        "export 'e0' still in use"
    );
    assert_eq!(
        c.generic_err("block-export-del", json!({"id": "e0", "mode": "safe"})),
        "export 'e0' still in use"
    );
    assert_eq!(
        c.generic_err("nbd-server-remove", json!({"name": "e0"})),
        "export 'e0' still in use"
    );
    // The node is held by the export (and its client).
    assert_eq!(
        c.generic_err("blockdev-del", json!({"node-name": "r0"})),
        "Node r0 is in use"
    );
    assert!(c
        .events_within("BLOCK_EXPORT_DELETED", Duration::from_millis(200))
        .is_empty());
    c.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    let ev = c.wait_event("BLOCK_EXPORT_DELETED", |_| true);
    assert!(deleted("e0")(&ev), "{ev}");
    assert_eq!(c.ok("query-block-exports", json!({})), json!([]));
    assert_eq!(
        c.generic_err("block-export-del", json!({"id": "e0", "mode": "hard"})),
        "Export 'e0' is not found"
    );
    let l = client.run("read 0 512");
    assert!(l.contains("failed"), "{l}");
    client.quit();
    qemu_io(&img.display().to_string(), true, &["read -P 0x11 0 4k"]);
}

/// Stopping the server disconnects clients; the export is announced once
/// the client is gone.
#[test]
fn server_stop_with_a_client() {
    if !have_tools() {
        return;
    }
    let d = Daemon::start("stop", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let mut c = d.connect();
    add_raw(&mut c, "r0", &img, false);
    start_unix(&mut c, &d);
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "exp"}),
    );
    let mut client = IoClient::open(&d.uri("exp"), true);
    c.ok("nbd-server-stop", json!({}));
    // The reply waits for the client to be gone, so the event precedes it.
    assert_eq!(c.events.len(), 1, "{:?}", c.events);
    assert!(deleted("e0")(&c.events[0]), "{:?}", c.events);
    c.events.clear();
    assert_eq!(c.ok("query-block-exports", json!({})), json!([]));
    // The server can be started again on the same path, even before the
    // old client has gone (its leaving must not remove the new socket).
    start_unix(&mut c, &d);
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "exp"}),
    );
    assert!(client.run("read 0 512").contains("failed"));
    client.quit();
    std::thread::sleep(Duration::from_millis(100));
    qemu_io(&d.uri("exp"), true, &["read -P 0 0 4k"]);
}

/// The deprecated nbd-server-add/-remove pair: the name doubles as the
/// export id; read-only nodes are quietly exported read-only.
#[test]
fn legacy_add_and_remove() {
    if !have_tools() {
        return;
    }
    let d = Daemon::start("legacy", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let img2 = raw_image(&d.dir, "img2.raw", 1 << 20);
    let mut c = d.connect();
    assert_eq!(
        c.generic_err("nbd-server-add", json!({"device": "r0"})),
        "Cannot find device='r0' nor node-name='r0'"
    );
    add_raw(&mut c, "r0", &img, false);
    add_raw(&mut c, "ro", &img2, true);
    assert_eq!(
        c.generic_err("nbd-server-add", json!({"device": "r0"})),
        "NBD server not running"
    );
    start_unix(&mut c, &d);
    c.ok("nbd-server-add", json!({"device": "r0", "writable": true}));
    c.ok(
        "nbd-server-add",
        json!({"device": "ro", "name": "legro", "writable": true, "description": "d"}),
    );
    assert_eq!(
        c.ok("query-block-exports", json!({})),
        json!([
            {"id": "legro", "type": "nbd", "node-name": "ro", "shutting-down": false},
            {"id": "r0", "type": "nbd", "node-name": "r0", "shutting-down": false}
        ])
    );
    assert_eq!(
        c.generic_err("nbd-server-add", json!({"device": "r0"})),
        "Block export id 'r0' is already in use"
    );
    assert_eq!(
        c.generic_err(
            "nbd-server-add",
            json!({"device": "r0", "name": "x", "bitmap": "b0"})
        ),
        "Bitmap 'b0' is not found"
    );
    qemu_io(&d.uri("r0"), false, &["write -P 0x77 4k 4k"]);
    qemu_io(&d.uri("r0"), true, &["read -P 0x77 4k 4k"]);
    let (ok, out) = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 512", &d.uri("legro")],
    );
    assert!(!ok || out.contains("can't open"), "{out}");
    c.ok("nbd-server-remove", json!({"name": "r0"}));
    assert!(deleted("r0")(
        &c.wait_event("BLOCK_EXPORT_DELETED", |_| true)
    ));
    assert_eq!(
        c.generic_err("nbd-server-remove", json!({"name": "r0"})),
        "Export 'r0' is not found"
    );
    c.ok(
        "nbd-server-remove",
        json!({"name": "legro", "mode": "hard"}),
    );
    assert!(deleted("legro")(
        &c.wait_event("BLOCK_EXPORT_DELETED", |_| true)
    ));
    // nbd-server-remove finds block-export-add's exports by id.
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e4", "node-name": "r0", "name": "n4"}),
    );
    assert_eq!(
        c.generic_err("nbd-server-remove", json!({"name": "n4"})),
        "Export 'n4' is not found"
    );
    c.ok("nbd-server-remove", json!({"name": "e4"}));
    assert!(deleted("e4")(
        &c.wait_event("BLOCK_EXPORT_DELETED", |_| true)
    ));
}

/// Error texts, each as qemu-storage-daemon 10.0 answers the same request.
#[test]
fn error_texts_match_qemu_storage_daemon() {
    let d = Daemon::start("errors", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let mut c = d.connect();
    let nbd = d.nbd_sock();
    let unix = json!({"type": "unix", "data": {"path": nbd}});
    let cases_before: Vec<(&str, Value, &str)> = vec![
        ("nbd-server-stop", json!({}), "NBD server not running"),
        (
            "nbd-server-remove",
            json!({"name": "x"}),
            "Export 'x' is not found",
        ),
        (
            "block-export-del",
            json!({"id": "x"}),
            "Export 'x' is not found",
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "r0"}),
            "Cannot find device='' nor node-name='r0'",
        ),
        (
            "nbd-server-start",
            json!({"addr": unix, "tls-creds": "x"}),
            "No TLS credentials with id 'x'",
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/nonexistent/x.sock"}}}),
            "Failed to bind socket to /nonexistent/x.sock: No such file or directory",
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "fd", "data": {"str": "nope"}}}),
            "only QEMU supports file descriptor passing",
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "path": nbd}}),
            "Parameter 'addr.data' is missing",
        ),
    ];
    for (cmd, args, want) in cases_before {
        assert_eq!(c.generic_err(cmd, args.clone()), want, "{cmd} {args}");
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let inet = |host: &str, port: &str| json!({"addr": {"type": "inet", "data": {"host": host, "port": port}}});
    for (args, want) in [
        (
            inet("127.0.0.1", &port),
            "Failed to find an available port: Address already in use".to_owned(),
        ),
        (
            inet("127.0.0.1", "notaport"),
            "address resolution failed for 127.0.0.1:notaport: Servname not supported for \
             ai_socktype"
                .to_owned(),
        ),
    ] {
        assert_eq!(
            c.generic_err("nbd-server-start", args.clone()),
            want,
            "{args}"
        );
    }
    drop(busy);
    // The resolver's reason depends on the host's DNS set-up.
    let e = c.generic_err("nbd-server-start", inet("nohost.invalid", "10809"));
    assert!(
        e.starts_with("address resolution failed for nohost.invalid:10809: "),
        "{e}"
    );
    add_raw(&mut c, "r0", &img, false);
    add_raw(&mut c, "ro", &img, true);
    assert_eq!(
        c.generic_err(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "r0"})
        ),
        "NBD server not running"
    );
    c.ok(
        "nbd-server-start",
        json!({"addr": unix, "max-connections": 2}),
    );
    let long = "x".repeat(5000);
    let cases: Vec<(&str, Value, String)> = vec![
        (
            "nbd-server-start",
            json!({"addr": unix}),
            "NBD server already running".into(),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "zz"}),
            "Cannot find device='' nor node-name='zz'".into(),
        ),
        (
            "block-export-add",
            json!({"type": "bogus", "id": "e0", "node-name": "r0"}),
            "Parameter 'type' does not accept value 'bogus'".into(),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "ro", "writable": true}),
            "Cannot export read-only node as writable".into(),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "r0", "bitmaps": ["nob"]}),
            "Bitmap 'nob' is not found".into(),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "r0", "iothread": "nothere"}),
            "iothread \"nothere\" not found".into(),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "0bad", "node-name": "r0"}),
            "Invalid block export id".into(),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "r0", "name": long}),
            format!("export name '{long}' too long"),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "r0", "description": long}),
            format!("description '{long}' too long"),
        ),
    ];
    for (cmd, args, want) in cases {
        assert_eq!(c.generic_err(cmd, args.clone()), want, "{cmd}");
    }
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "fixed-iothread": true}),
    );
    c.ok("object-add", json!({"qom-type": "iothread", "id": "io0"}));
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "r0", "name": "exp", "iothread": "io0"}),
    );
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "other"}),
            "Block export id 'e0' is already in use",
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e9", "node-name": "r0", "name": "exp"}),
            "NBD server already has export named 'exp'",
        ),
        (
            "nbd-server-add",
            json!({"device": "r0", "name": "exp"}),
            "NBD server already has export named 'exp'",
        ),
        (
            "blockdev-del",
            json!({"node-name": "r0"}),
            "Node r0 is in use",
        ),
        (
            "block_resize",
            json!({"node-name": "r0", "size": 2 << 20}),
            "Permission conflict on node 'r0': permissions 'resize' are both required by an \
             unnamed block device (uses node 'r0' as 'root' child) and unshared by an unnamed \
             block device (uses node 'r0' as 'root' child).",
        ),
        (
            "block-export-del",
            json!({"id": "e0", "mode": "bogus"}),
            "Parameter 'mode' does not accept value 'bogus'",
        ),
    ];
    for (cmd, args, want) in cases {
        assert_eq!(c.generic_err(cmd, args.clone()), want, "{cmd} {args}");
    }
    // Types QEMU knows but stratad cannot serve get a clear refusal.
    for (ty, extra) in [
        ("fuse", json!({"mountpoint": img})),
        (
            "vhost-user-blk",
            json!({"addr": {"type": "unix", "path": "/x"}}),
        ),
        ("vduse-blk", json!({"name": "v"})),
    ] {
        let mut args = json!({"type": ty, "id": "u", "node-name": "r0"});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let e = c.generic_err("block-export-add", args);
        assert!(e.contains(ty) && e.contains("not supported"), "{e}");
    }
    let e = c.generic_err(
        "nbd-server-start",
        json!({"addr": {"type": "vsock", "data": {"cid": "1", "port": "1"}}}),
    );
    assert!(e.contains("NBD server already running"), "{e}");
    c.ok("nbd-server-stop", json!({}));
    let e = c.generic_err("nbd-server-start", json!({"addr": unix, "tls-authz": "z"}));
    assert!(
        e.contains("tls-authz") && e.contains("not supported"),
        "{e}"
    );
    let e = c.generic_err(
        "nbd-server-start",
        json!({"addr": {"type": "vsock", "data": {"cid": "1", "port": "1"}}}),
    );
    assert!(e.contains("vsock") && e.contains("not supported"), "{e}");
    // Nothing was left half-started by the refusals.
    assert_eq!(
        c.generic_err("nbd-server-stop", json!({})),
        "NBD server not running"
    );
}

/// With max-connections reached, a further client waits (it is not
/// refused) until a slot frees, as with QEMU.
#[test]
fn max_connections_makes_clients_wait() {
    if !have_tools() {
        return;
    }
    let d = Daemon::start("maxconn", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let mut c = d.connect();
    add_raw(&mut c, "r0", &img, false);
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": d.nbd_sock()}},
               "max-connections": 1}),
    );
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "name": "exp"}),
    );
    let first = IoClient::open(&d.uri("exp"), true);
    let mut second = Command::new("timeout")
        .args([
            TOOL_TIMEOUT,
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0 0 4k",
            &d.uri("exp"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        second.try_wait().unwrap().is_none(),
        "second client must wait"
    );
    first.quit();
    let out = second.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("read 4096/4096"),
        "{text}"
    );
}

/// A TCP listener works like the unix one.
#[test]
fn inet_server() {
    if !have_tools() {
        return;
    }
    let d = Daemon::start("inet", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let mut c = d.connect();
    add_raw(&mut c, "r0", &img, false);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port}}}),
    );
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "writable": true}),
    );
    // The export name defaults to the node name.
    let uri = format!("nbd://127.0.0.1:{port}/r0");
    qemu_io(&uri, false, &["write -P 0x42 0 8k"]);
    qemu_io(&uri, true, &["read -P 0x42 0 8k"]);
}

/// `--nbd-server` and `--export` set up the same as the QMP commands;
/// shutting down announces the export.
#[test]
fn command_line_server_and_export() {
    if !have_tools() {
        return;
    }
    let dir = tmpdir("cli");
    let img = raw_image(&dir, "img.raw", 1 << 20);
    let nbd = dir.join("nbd.sock");
    let mut d = Daemon::start_in(
        dir.clone(),
        &[
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", img.display()),
            "--nbd-server",
            &format!(
                "addr.type=unix,addr.path={},max-connections=4",
                nbd.display()
            ),
            "--export",
            "type=nbd,id=e0,node-name=f0,name=disk,writable=on",
        ],
    );
    let mut c = d.connect();
    qemu_io(&d.uri("disk"), false, &["write -P 0x3c 64k 64k"]);
    qemu_io(
        &d.uri("disk"),
        true,
        &["read -P 0x3c 64k 64k", "read -P 0 0 64k"],
    );
    assert_eq!(
        c.ok("query-block-exports", json!({})),
        json!([{"id": "e0", "type": "nbd", "node-name": "f0", "shutting-down": false}])
    );
    assert_eq!(
        c.generic_err(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": nbd}}})
        ),
        "NBD server already running"
    );
    c.ok("quit", json!({}));
    // As from qemu-storage-daemon, the event comes before quit's reply.
    assert_eq!(c.events.len(), 1, "{:?}", c.events);
    assert!(deleted("e0")(&c.events[0]), "{:?}", c.events);
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
}

/// Start-up errors of `--nbd-server`/`--export`, as qemu-storage-daemon
/// prints them (program name aside).
#[test]
fn command_line_errors() {
    let dir = tmpdir("clierr");
    let img = raw_image(&dir, "img.raw", 1 << 20);
    let file = format!("driver=file,node-name=f0,filename={}", img.display());
    let ro = format!("{file},read-only=on");
    let sock = "addr.type=unix,addr.path=n.sock";
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--blockdev", &file, "--export", "type=nbd,id=e0,node-name=f0"],
            "--export type=nbd,id=e0,node-name=f0: NBD server not running".into(),
        ),
        (
            vec!["--nbd-server", sock, "--export", "type=nbd,id=e0,node-name=zz"],
            "--export type=nbd,id=e0,node-name=zz: Cannot find device='' nor node-name='zz'"
                .into(),
        ),
        (
            vec!["--nbd-server", sock, "--nbd-server", "addr.type=unix,addr.path=m.sock"],
            "--nbd-server addr.type=unix,addr.path=m.sock: NBD server already running".into(),
        ),
        (
            vec!["--nbd-server", "addr.type=unix,addr.path=n.sock,tls-creds=x"],
            "--nbd-server addr.type=unix,addr.path=n.sock,tls-creds=x: No TLS credentials with id 'x'"
                .into(),
        ),
        (
            vec!["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"],
            "--nbd-server addr.type=inet,addr.host=127.0.0.1: Parameter 'addr.port' is missing"
                .into(),
        ),
        (
            vec!["--nbd-server", "addr.path=x"],
            "--nbd-server addr.path=x: Parameter 'addr.type' is missing".into(),
        ),
        (
            vec!["--blockdev", &ro, "--nbd-server", sock, "--export", "nbd,id=e0,node-name=f0,writable=on"],
            "--export nbd,id=e0,node-name=f0,writable=on: Cannot export read-only node as writable"
                .into(),
        ),
        (
            vec!["--blockdev", &file, "--nbd-server", sock, "--export", "type=nbd,id=e0,node-name=f0,bitmaps.0=b"],
            "--export type=nbd,id=e0,node-name=f0,bitmaps.0=b: Bitmap 'b' is not found".into(),
        ),
    ];
    for (args, want) in cases {
        let out = Command::new("timeout")
            .arg("20")
            .arg(env!("CARGO_BIN_EXE_stratad"))
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("stratad: {want}\n"),
            "{args:?}"
        );
        let _ = std::fs::remove_file(dir.join("n.sock"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A writable export keeps its node (and an inline child with its own
/// export) from being reopened read-only, with QEMU's message, and a
/// refused reopen leaves every node as it was.
#[test]
fn reopen_read_only_refused_under_writable_export() {
    let d = Daemon::start("reopen", &[]);
    let img = raw_image(&d.dir, "img.raw", 1 << 20);
    let mut c = d.connect();
    c.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r0",
               "file": {"driver": "file", "filename": img, "node-name": "f0"}}),
    );
    start_unix(&mut c, &d);
    let ro = json!({"options": [{"driver": "raw", "node-name": "r0", "read-only": true,
                                 "file": "f0"}]});
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "r0", "writable": true}),
    );
    assert_eq!(
        c.generic_err("blockdev-reopen", ro.clone()),
        "Read-only block node 'r0' cannot support read-write users"
    );
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "f0", "writable": true}),
    );
    c.ok("block-export-del", json!({"id": "e0"}));
    assert_eq!(
        c.generic_err("blockdev-reopen", ro),
        "Read-only block node 'f0' cannot support read-write users"
    );
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e3", "node-name": "r0", "writable": true}),
    );
    let ids: Vec<Value> = c
        .ok("query-block-exports", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, [json!("e3"), json!("e1")]);
}

/// Connections that get the NBD greeting, of `tries` opened at once.
fn greeted(sock: &str, tries: usize) -> usize {
    use std::io::Read;
    let mut held = Vec::new();
    let mut n = 0;
    for _ in 0..tries {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut magic = [0u8; 8];
        if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
            n += 1;
        }
        held.push(s);
    }
    n
}

/// Without max-connections the server admits 100 clients at a time, as
/// qemu-storage-daemon does since 9.1; 0 lifts the limit.
#[test]
fn default_connection_limit_is_100() {
    let d = Daemon::start("limit", &["--blockdev", "null-co,node-name=n0"]);
    let mut c = d.connect();
    start_unix(&mut c, &d);
    c.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
    );
    assert_eq!(greeted(&d.nbd_sock(), 101), 100);
    c.ok("nbd-server-stop", json!({}));
    c.wait_event("BLOCK_EXPORT_DELETED", |_| true);
    c.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": d.nbd_sock()}},
               "max-connections": 0}),
    );
    assert_eq!(greeted(&d.nbd_sock(), 105), 105);
}

/// `nbdinfo`'s flag lines for one export.
fn nbd_flags(uri: &str) -> Vec<String> {
    let (ok, out) = tool("nbdinfo", &[uri]);
    assert!(ok, "{out}");
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("can_") || l.starts_with("is_read_only"))
        .map(str::to_owned)
        .collect()
}

/// Transmission flags as qemu-storage-daemon advertises them: no
/// write-type commands on read-only exports, no multi-conn with
/// max-connections=1.
#[test]
fn export_flags_follow_qemu() {
    assert!(
        tool("nbdinfo", &["--version"]).0,
        "nbdinfo is required (scripts/test-all installs libnbd-bin)"
    );
    let dir = tmpdir("flags");
    let nbd = dir.join("nbd.sock").display().to_string();
    let d = Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "null-co,node-name=n0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={nbd},max-connections=1"),
            "--export",
            "nbd,id=e0,node-name=n0,name=ro",
            "--export",
            "nbd,id=e1,node-name=n0,name=rw,writable=on",
        ],
    );
    let _c = d.connect();
    let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        nbd_flags(&d.uri("ro")),
        f(&[
            "is_read_only: true",
            "can_cache: true",
            "can_df: true",
            "can_fast_zero: false",
            "can_flush: true",
            "can_fua: true",
            "can_multi_conn: false",
            "can_trim: false",
            "can_zero: false",
        ])
    );
    assert_eq!(
        nbd_flags(&d.uri("rw")),
        f(&[
            "is_read_only: false",
            "can_cache: true",
            "can_df: true",
            "can_fast_zero: true",
            "can_flush: true",
            "can_fua: true",
            "can_multi_conn: false",
            "can_trim: true",
            "can_zero: true",
        ])
    );
}
