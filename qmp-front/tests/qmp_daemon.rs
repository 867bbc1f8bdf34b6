//! End-to-end tests of the `stratad` binary over QMP on unix sockets:
//! protocol, block commands, jobs, bad input, several clients, signals.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;
use support::{tmpdir, Client, Daemon};

#[test]
fn protocol_basics() {
    let d = Daemon::start("proto", &[]);
    let mut c = Client::connect_raw(&d.sock);
    assert_eq!(c.greeting["QMP"]["version"]["qemu"]["major"], 10);
    assert_eq!(c.greeting["QMP"]["capabilities"], json!(["oob"]));
    let r = c.cmd("query-version", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    c.ok("qmp_capabilities", json!({}));
    let v = c.ok("query-version", json!({}));
    assert_eq!(v["qemu"]["minor"], 0);
    let r = c.cmd("no-such-command", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(
        r["error"]["desc"],
        "The command no-such-command has not been found"
    );
    c.send(b"{\"execute\":\"query-version\",\"id\":{\"a\":[1,2]}}");
    assert_eq!(c.reply()["id"], json!({"a": [1, 2]}));
    let cmds = c.ok("query-commands", json!({}));
    let names: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "blockdev-create",
        "query-jobs",
        "qom-list",
    ] {
        assert!(names.contains(&n), "{n} missing");
    }
    let schema = c.ok("query-qmp-schema", json!({}));
    assert!(schema
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "blockdev-add"));
    assert_eq!(c.ok("query-block", json!({})), json!([]));
}

#[test]
fn blockdev_lifecycle_and_errors() {
    let d = Daemon::start("blk", &["--blockdev", "null-co,node-name=n0"]);
    let img = d.dir.join("a.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut c = d.connect();
    c.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r0",
            "file": {"driver": "file", "filename": img.to_str().unwrap()}}),
    );
    assert_eq!(
        c.err(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r0",
                "file": {"driver": "file", "filename": img.to_str().unwrap()}})
        ),
        "Duplicate nodes with node-name='r0'"
    );
    assert_eq!(
        c.err(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r1", "file": "nope"})
        ),
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        c.err("blockdev-add", json!({"driver": "null-co"})),
        "'node-name' must be specified for the root node"
    );
    assert_eq!(
        c.err("blockdev-add", json!({"driver": "nope", "node-name": "x"})),
        "Parameter 'driver' does not accept value 'nope'"
    );
    assert_eq!(
        c.err(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "x", "bad": 1})
        ),
        "Parameter 'bad' is unexpected"
    );
    let nodes = c.ok("query-named-block-nodes", json!({}));
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0]["node-name"], "r0");
    assert_eq!(nodes[0]["image"]["virtual-size"], 1 << 20);
    assert_eq!(nodes[0]["image"]["format"], "raw");
    assert_eq!(nodes[1]["drv"], "file");
    assert_eq!(
        nodes[1]["image"]["format-specific"],
        json!({"type": "file", "data": {}})
    );
    assert_eq!(nodes[2]["node-name"], "n0");
    assert_eq!(
        nodes[2]["cache"],
        json!({"writeback": true, "direct": false, "no-flush": false})
    );
    let file_node = nodes[1]["node-name"].as_str().unwrap().to_owned();
    assert!(file_node.starts_with("#block"));
    assert_eq!(
        c.err("blockdev-del", json!({"node-name": file_node})),
        format!("Node {file_node} is not owned by the monitor")
    );
    assert_eq!(
        c.err("blockdev-del", json!({"node-name": "zz"})),
        "Failed to find node with node-name='zz'"
    );
    // A named child in use.
    c.ok("blockdev-add", json!({"driver": "file", "node-name": "f0", "filename": img.to_str().unwrap(), "locking": "off"}));
    c.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r2", "file": "f0"}),
    );
    assert_eq!(
        c.err("blockdev-del", json!({"node-name": "f0"})),
        "Block device f0 is in use"
    );
    let g = c.ok("x-debug-query-block-graph", json!({}));
    assert!(g["edges"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "file"));
    let st = c.ok("query-blockstats", json!({"query-nodes": true}));
    assert!(st
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["node-name"] == "r0" && s["parent"]["driver-specific"]["driver"] == "file"));
    assert_eq!(c.ok("query-blockstats", json!({})), json!([]));
    c.ok(
        "block-set-write-threshold",
        json!({"node-name": "r0", "write-threshold": 4096}),
    );
    assert_eq!(
        c.err(
            "block-set-write-threshold",
            json!({"node-name": "zz", "write-threshold": 1})
        ),
        "Device 'zz' not found"
    );
    let n = c.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(n[2]["write_threshold"], 4096);
    c.ok("block_resize", json!({"node-name": "r0", "size": 2 << 20}));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);
    assert_eq!(
        c.err("block_resize", json!({"node-name": "zz", "size": 1})),
        "Cannot find device='' nor node-name='zz'"
    );
    c.ok("blockdev-reopen", json!({"options": [{"driver": "raw", "node-name": "r2", "file": "f0", "detect-zeroes": "on"}]}));
    let n = c.ok("query-named-block-nodes", json!({"flat": true}));
    assert_eq!(n[0]["detect_zeroes"], "on");
    assert_eq!(
        c.err(
            "blockdev-reopen",
            json!({"options": [{"driver": "raw", "file": "f0"}]})
        ),
        "node-name not specified"
    );
    c.ok("blockdev-del", json!({"node-name": "r2"}));
    c.ok("blockdev-del", json!({"node-name": "f0"}));
    c.ok("x-blockdev-del", json!({"node-name": "r0"}));
    let nodes = c.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes.as_array().unwrap().len(), 1);
}

#[test]
fn blockdev_create_job() {
    let d = Daemon::start("create", &[]);
    let img = d.dir.join("new.raw");
    let mut c = d.connect();
    c.ok(
        "blockdev-create",
        json!({"job-id": "j1", "options": {"driver": "file", "filename": img.to_str().unwrap(), "size": 1 << 20}}),
    );
    for st in ["created", "running", "waiting", "pending", "concluded"] {
        c.wait_event("JOB_STATUS_CHANGE", |e| {
            e["data"]["status"] == st && e["data"]["id"] == "j1"
        });
    }
    let jobs = c.ok("query-jobs", json!({}));
    assert_eq!(
        jobs,
        json!([{"id": "j1", "type": "create", "status": "concluded", "current-progress": 1, "total-progress": 1}])
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    assert_eq!(
        c.err(
            "blockdev-create",
            json!({"job-id": "j1", "options": {"driver": "file", "filename": "/tmp/x", "size": 1}})
        ),
        "Job ID 'j1' already in use"
    );
    c.ok("job-dismiss", json!({"id": "j1"}));
    c.wait_event("JOB_STATUS_CHANGE", |e| e["data"]["status"] == "null");
    assert_eq!(c.err("job-dismiss", json!({"id": "j1"})), "Job not found");
    assert_eq!(
        c.err(
            "blockdev-create",
            json!({"job-id": "j3", "options": {"driver": "raw"}})
        ),
        "Driver does not support blockdev-create"
    );
    let bad = d.dir.join("nodir/x.raw");
    c.ok(
        "blockdev-create",
        json!({"job-id": "j2", "options": {"driver": "file", "filename": bad.to_str().unwrap(), "size": 1 << 20}}),
    );
    c.wait_event("JOB_STATUS_CHANGE", |e| e["data"]["status"] == "aborting");
    c.wait_event("JOB_STATUS_CHANGE", |e| {
        e["data"]["id"] == "j2" && e["data"]["status"] == "concluded"
    });
    let jobs = c.ok("query-jobs", json!({}));
    assert_eq!(
        jobs[0]["error"],
        format!(
            "Could not create '{}': No such file or directory",
            bad.display()
        )
    );
    // The image opens.
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": img.to_str().unwrap()}),
    );
}

#[test]
fn bad_input_keeps_connection_usable() {
    let d = Daemon::start("bad", &[]);
    let mut c = d.connect();
    c.send(b"{\"execute\": }\n");
    let r = c.reply();
    assert_eq!(r["error"]["class"], "GenericError");
    c.ok("query-version", json!({}));
    // Deep nesting: QEMU reports the limit, then one error per stray
    // closing bracket; the connection stays usable.
    let deep = "[".repeat(2000) + &"]".repeat(2000);
    c.send(deep.as_bytes());
    let r = c.reply();
    assert_eq!(r["error"]["desc"], "JSON nesting depth limit exceeded");
    c.send(b"{\"execute\":\"query-version\",\"id\":\"after\"}");
    let mut n = 0;
    loop {
        let r = c.reply();
        n += 1;
        if r["id"] == "after" {
            assert!(r.get("return").is_some());
            break;
        }
    }
    assert_eq!(n, 1027, "as many replies as qemu-storage-daemon sends");
    // A huge string argument.
    let huge = "x".repeat(8 << 20);
    let r = c.cmd("blockdev-del", json!({"node-name": huge}));
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("Failed to find node"));
    c.ok("query-version", json!({}));
    // Non-object, wrong member types, unknown members.
    c.send(b"[1,2]");
    assert_eq!(
        c.reply()["error"]["desc"],
        "QMP input must be a JSON object"
    );
    c.send(b"{\"execute\":\"query-version\",\"foo\":1}");
    assert_eq!(
        c.reply()["error"]["desc"],
        "QMP input member 'foo' is unexpected"
    );
    assert_eq!(
        c.err("blockdev-del", json!({"node-name": 1})),
        "Invalid parameter type for 'node-name', expected: string"
    );
    assert_eq!(
        c.err("blockdev-del", json!({})),
        "Parameter 'node-name' is missing"
    );
    c.ok("query-version", json!({}));
}

#[test]
fn stuck_client_does_not_block_others_and_disconnect_loses_nothing() {
    let d = Daemon::start("multi", &[]);
    let img = d.dir.join("c.raw");
    // A client that sends half a request and never reads.
    let mut stuck = Client::connect(&d.sock);
    stuck.send(b"{\"execute\": \"query-ver");
    // A client that fires a command and disconnects at once.
    {
        let mut gone = Client::connect(&d.sock);
        gone.send(
            json!({"execute": "blockdev-create", "arguments": {"job-id": "jx",
                "options": {"driver": "file", "filename": img.to_str().unwrap(), "size": 65536}}})
            .to_string()
            .as_bytes(),
        );
    }
    let mut c = d.connect();
    let start = Instant::now();
    loop {
        let jobs = c.ok("query-jobs", json!({}));
        if jobs
            .as_array()
            .unwrap()
            .first()
            .map(|j| j["status"] == "concluded")
            == Some(true)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "job never concluded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 65536);
    // Many concurrent clients.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let p = d.sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&p);
                for _ in 0..50 {
                    c.ok("query-named-block-nodes", json!({}));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    stuck.send(b"sion\"}");
    assert!(stuck.reply().get("return").is_some());
}

#[test]
fn sigterm_and_quit_shut_down_cleanly() {
    let img_dir = tmpdir("sig");
    let img = img_dir.join("s.raw");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let pid = img_dir.join("pid");
    let mut d = Daemon::start(
        "sig",
        &[
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={}", img.display()),
            "--pidfile",
            pid.to_str().unwrap(),
        ],
    );
    let mut c = d.connect();
    c.ok("query-version", json!({}));
    assert!(pid.exists());
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
    assert!(!pid.exists(), "pid file removed at exit");
    // The image lock is released: QEMU can open it for writing.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", img.to_str().unwrap()])
        .output();
    if let Ok(out) = out {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut d = Daemon::start("quit", &[]);
    let mut c = d.connect();
    assert_eq!(c.cmd("quit", json!({})), json!({"return": {}}));
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
    let _ = std::fs::remove_dir_all(&img_dir);
}

#[test]
fn objects_and_qom() {
    let d = Daemon::start("obj", &["--object", "iothread,id=io0,poll-max-ns=5000"]);
    let mut c = d.connect();
    // qom-get reads poll-max-ns back from the iothread's event loop.
    assert_eq!(
        c.ok(
            "qom-get",
            json!({"path": "/objects/io0", "property": "poll-max-ns"})
        ),
        5000
    );
    c.ok(
        "object-add",
        json!({"qom-type": "iothread", "id": "io1", "poll-max-ns": 100}),
    );
    assert_eq!(
        c.err("object-add", json!({"qom-type": "iothread", "id": "io1"})),
        "attempt to add duplicate property 'io1' to object (type 'container')"
    );
    assert_eq!(
        c.err("object-add", json!({"qom-type": "iothread", "id": "0bad"})),
        "Parameter 'id' expects an identifier"
    );
    let l = c.ok("qom-list", json!({"path": "/objects"}));
    assert_eq!(l[1], json!({"name": "io0", "type": "child<iothread>"}));
    assert_eq!(
        c.ok(
            "qom-get",
            json!({"path": "/objects/io1", "property": "poll-max-ns"})
        ),
        100
    );
    c.ok(
        "qom-set",
        json!({"path": "/objects/io1", "property": "poll-max-ns", "value": 7}),
    );
    assert_eq!(
        c.ok(
            "qom-get",
            json!({"path": "/objects/io1", "property": "poll-max-ns"})
        ),
        7
    );
    let r = c.cmd("qom-get", json!({"path": "/objects/zz", "property": "x"}));
    assert_eq!(r["error"]["class"], "DeviceNotFound");
    let t = c.ok("query-iothreads", json!({}));
    assert_eq!(t.as_array().unwrap().len(), 2);
    assert!(t[0]["thread-id"].as_i64().unwrap() > 0);
    c.ok("object-del", json!({"id": "io1"}));
    assert_eq!(
        c.err("object-del", json!({"id": "io1"})),
        "object 'io1' not found"
    );
}

fn run_stratad(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stratad"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Texts taken from qemu-storage-daemon 10.0 (program name aside).
#[test]
fn command_line_errors() {
    let dir = tmpdir("cli");
    let cases: &[(&[&str], &str)] = &[
        (&["--foo"], "stratad: unrecognized option '--foo'\n"),
        (&["--blockdev"], "stratad: option '--blockdev' requires an argument\n"),
        (&["--blockdev", "driver=nope"], "stratad: --blockdev driver=nope: Parameter 'driver' does not accept value 'nope'\n"),
        (&["--blockdev", "null-co,node-name=a", "--blockdev", "null-co,node-name=a"], "stratad: --blockdev null-co,node-name=a: Duplicate nodes with node-name='a'\n"),
        (&["--chardev", "foo,id=x"], "stratad: --chardev foo,id=x: 'foo' is not a valid char driver name\n"),
        (&["--monitor", "chardev=zz"], "stratad: --monitor chardev=zz: chardev \"zz\" not found\n"),
        (&["--object", "iothread"], "stratad: --object iothread: Parameter 'id' is missing\n"),
        (&["--object", "foo,id=x"], "stratad: --object foo,id=x: Parameter 'qom-type' does not accept value 'foo'\n"),
        (&["-x"], "stratad: invalid option -- 'x'\n"),
        (&["extra"], "stratad: extra: Unexpected argument\n"),
        (&["--blockdev", "null-co,node-name=a,bad=1"], "stratad: --blockdev null-co,node-name=a,bad=1: Parameter 'bad' is unexpected\n"),
        (&["--blockdev", "raw,file=zz"], "stratad: --blockdev raw,file=zz: 'node-name' must be specified for the root node\n"),
        (&["--chardev", "socket,path=/tmp/zz.sock,server=on,wait=off"], "stratad: --chardev socket,path=/tmp/zz.sock,server=on,wait=off: chardev: no id specified\n"),
        (&["--chardev", "stdio,id=s", "--chardev", "stdio,id=t"], "stratad: --chardev stdio,id=t: cannot use stdio by multiple character devices\n"),
    ];
    for (args, want) in cases {
        let (code, _out, err) = run_stratad(args, &dir);
        assert_eq!(code, 1, "{args:?}");
        assert_eq!(&err, want, "{args:?}");
    }
    let (code, out, _) = run_stratad(&["-V"], &dir);
    assert_eq!(code, 0);
    assert!(out.starts_with("stratad version 10.0.2"));
    let (code, out, _) = run_stratad(&["-h"], &dir);
    assert_eq!(code, 0);
    assert!(out.starts_with("Usage: stratad [options]"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn default_configuration() {
    let dir = tmpdir("default");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stratad"))
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(
        first.trim_end(),
        format!("QMP socket: {}", dir.join("stratad.qmp").display())
    );
    let mut c = Client::connect(&dir.join("stratad.qmp"));
    let n = c.ok("query-named-block-nodes", json!({}));
    assert_eq!(n[0]["node-name"], "demo0");
    assert_eq!(n[0]["drv"], "null-co");
    c.ok("quit", json!({}));
    assert!(child.wait().unwrap().success());
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    assert!(!dir.join("stratad.qmp").exists(), "socket removed at exit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon killed while creating an image leaves no half-written image
/// under the requested name: either nothing or the complete image.
#[test]
fn killed_during_create_leaves_no_partial_image() {
    let mut d = Daemon::start("crash", &[]);
    let img = d.dir.join("big.raw");
    let size: u64 = 1 << 30;
    let mut c = d.connect();
    c.ok(
        "blockdev-create",
        json!({"job-id": "j", "options": {"driver": "file", "filename": img.to_str().unwrap(),
            "size": size, "preallocation": "full"}}),
    );
    std::thread::sleep(Duration::from_millis(40));
    d.signal("KILL");
    d.wait(Duration::from_secs(10));
    match std::fs::metadata(&img) {
        Err(_) => {}
        Ok(m) => assert_eq!(m.len(), size, "a visible image is complete"),
    }
}

#[test]
fn nbd_options_are_checked() {
    let dir = tmpdir("nbdopt");
    let (code, _, err) = run_stratad(&["--nbd-server", "addr.type=unix"], &dir);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "stratad: --nbd-server addr.type=unix: Parameter 'addr.path' is missing\n"
    );
    let (_, _, err) = run_stratad(
        &[
            "--blockdev",
            "null-co,node-name=n",
            "--export",
            "nbd,id=e,node-name=n,bogus=1",
        ],
        &dir,
    );
    assert_eq!(
        err,
        "stratad: --export nbd,id=e,node-name=n,bogus=1: Parameter 'bogus' is unexpected\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Events reach every negotiated connection on every monitor, and none
/// reach a client still negotiating.
#[test]
fn events_broadcast_to_all_negotiated_monitors() {
    let d = Daemon::start(
        "events",
        &[
            "--chardev",
            "socket,id=m1,path=second.sock,server=on,wait=off",
            "--monitor",
            "chardev=m1,pretty=on",
        ],
    );
    let img = d.dir.join("e.raw");
    let mut a = d.connect();
    let mut b = Client::connect(&d.dir.join("second.sock"));
    let mut quiet = Client::connect_raw(&d.sock);
    a.ok(
        "blockdev-create",
        json!({"job-id": "je", "options": {"driver": "file", "filename": img.to_str().unwrap(), "size": 4096}}),
    );
    for c in [&mut a, &mut b] {
        let e = c.wait_event("JOB_STATUS_CHANGE", |e| e["data"]["status"] == "concluded");
        assert!(e["timestamp"]["seconds"].as_i64().unwrap() > 0);
        assert!(e["timestamp"]["microseconds"].as_i64().is_some());
    }
    // The negotiating client's first line after negotiation is the reply.
    assert_eq!(
        quiet.cmd("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
}

/// blockdev-create with driver qcow2 writes the same bytes as QEMU's
/// `qemu-img create`, and the image passes `qemu-img check`.
#[test]
fn blockdev_create_qcow2_matches_qemu() {
    let d = Daemon::start("create-qcow2", &[]);
    let img = d.dir.join("new.qcow2");
    let imgs = img.to_str().unwrap();
    let mut c = d.connect();
    let run_job = |c: &mut Client, id: &str, opts: Value| {
        c.ok("blockdev-create", json!({"job-id": id, "options": opts}));
        let ev = c.wait_event("JOB_STATUS_CHANGE", |e| {
            e["data"]["id"] == id && e["data"]["status"] == "concluded"
        });
        drop(ev);
        let jobs = c.ok("query-jobs", json!({}));
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap()
            .clone();
        c.ok("job-dismiss", json!({"id": id}));
        job
    };
    let j = run_job(
        &mut c,
        "f",
        json!({"driver": "file", "filename": imgs, "size": 0}),
    );
    assert!(j.get("error").is_none(), "{j}");
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "proto", "filename": imgs}),
    );
    let j = run_job(
        &mut c,
        "q",
        json!({"driver": "qcow2", "file": "proto", "size": 64 << 20, "cluster-size": 4096,
               "lazy-refcounts": true}),
    );
    assert!(j.get("error").is_none(), "{j}");
    // Bad options fail the job with QEMU's words.
    let j = run_job(
        &mut c,
        "bad",
        json!({"driver": "qcow2", "file": "proto", "size": 1 << 20, "cluster-size": 3000}),
    );
    assert_eq!(
        j["error"],
        "Cluster size must be a power of two between 512 and 2048k"
    );
    let j = run_job(
        &mut c,
        "q2",
        json!({"driver": "qcow2", "file": "proto", "size": 64 << 20, "cluster-size": 4096,
               "lazy-refcounts": true}),
    );
    assert!(j.get("error").is_none(), "{j}");
    c.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "disk", "file": "proto"}),
    );
    let nodes = c.ok("query-named-block-nodes", json!({"flat": true}));
    let disk = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk")
        .unwrap();
    assert_eq!(disk["drv"], "qcow2");
    assert_eq!(disk["image"]["virtual-size"], 64 << 20);
    c.ok("blockdev-del", json!({"node-name": "disk"}));
    c.ok("blockdev-del", json!({"node-name": "proto"}));

    let reference = d.dir.join("ref.qcow2");
    let o = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,lazy_refcounts=on",
        ])
        .arg(&reference)
        .arg("64M")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&img).unwrap(),
        std::fs::read(&reference).unwrap(),
        "image differs from qemu-img create's"
    );
    let o = Command::new("qemu-img")
        .args(["check", imgs])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// blockdev-create with driver qcow2: `preallocation` falloc/full and an
/// external `data-file` (by node name or inline, with `data-file-raw`)
/// give the bytes `qemu-img create` gives for the same options.
#[test]
fn blockdev_create_qcow2_prealloc_and_data_file() {
    let d = Daemon::start("create-qcow2-df", &[]);
    let mut c = d.connect();
    let path = |n: &str| d.dir.join(n).to_str().unwrap().to_owned();
    let run_job = |c: &mut Client, id: &str, opts: Value| {
        c.ok("blockdev-create", json!({"job-id": id, "options": opts}));
        c.wait_event("JOB_STATUS_CHANGE", |e| {
            e["data"]["id"] == id && e["data"]["status"] == "concluded"
        });
        let jobs = c.ok("query-jobs", json!({}));
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap()
            .clone();
        c.ok("job-dismiss", json!({"id": id}));
        assert!(job.get("error").is_none(), "{id}: {job}");
    };
    for f in ["full.qcow2", "df.qcow2", "df.raw", "inl.qcow2", "inl.raw"] {
        run_job(
            &mut c,
            &format!("f-{f}"),
            json!({"driver": "file", "filename": path(f), "size": 0}),
        );
    }
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "p1", "filename": path("full.qcow2")}),
    );
    run_job(
        &mut c,
        "full",
        json!({"driver": "qcow2", "file": "p1", "size": 5 << 20, "preallocation": "full",
               "cluster-size": 16384}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "p2", "filename": path("df.qcow2")}),
    );
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "d2", "filename": path("df.raw")}),
    );
    run_job(
        &mut c,
        "df",
        json!({"driver": "qcow2", "file": "p2", "size": 3 << 20, "data-file": "d2",
               "data-file-raw": true}),
    );
    run_job(
        &mut c,
        "inl",
        json!({"driver": "qcow2", "size": 3 << 20, "preallocation": "falloc",
               "file": {"driver": "file", "filename": path("inl.qcow2")},
               "data-file": {"driver": "file", "filename": path("inl.raw")}}),
    );
    for n in ["p1", "p2", "d2"] {
        c.ok("blockdev-del", json!({"node-name": n}));
    }
    let qemu_img = |args: &[&str]| {
        let o = Command::new("timeout")
            .args(["-k", "5", "60", "qemu-img"])
            .args(args)
            .output()
            .expect("cannot run qemu-img (is QEMU installed?)");
        assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
    };
    let cases = [
        (
            "full.qcow2",
            None,
            "preallocation=full,cluster_size=16k",
            "5M",
        ),
        ("df.qcow2", Some("df.raw"), "data_file_raw=on", "3M"),
        ("inl.qcow2", Some("inl.raw"), "preallocation=falloc", "3M"),
    ];
    for (img, data, opts, size) in cases {
        let r = path(&format!("ref-{img}"));
        let mut o = opts.to_owned();
        if let Some(df) = data {
            // The header names the data file by its node's file name.
            o = format!("{o},data_file={}", path(df));
            std::fs::rename(path(df), path(&format!("{df}.strata"))).unwrap();
        }
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, &r, size]);
        assert_eq!(
            std::fs::read(path(img)).unwrap(),
            std::fs::read(&r).unwrap(),
            "{img}: differs from qemu-img create's"
        );
        if let Some(df) = data {
            assert_eq!(
                std::fs::metadata(path(&format!("{df}.strata")))
                    .unwrap()
                    .len(),
                std::fs::metadata(path(df)).unwrap().len(),
                "{df}: data file size"
            );
            std::fs::rename(path(&format!("{df}.strata")), path(df)).unwrap();
        }
        qemu_img(&["check", &path(img)]);
    }
}
