//! What the daemon end-to-end tests share: scratch directories, a daemon
//! (stratad, or qemu-storage-daemon as the oracle) with one QMP monitor on
//! a unix socket, and a QMP client with deadlines on every read.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest wait for one QMP reply.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(20);
/// Longest a daemon run under `timeout` may live (seconds).
pub const PROCESS_LIMIT: &str = "120";

/// A fresh scratch directory for one test.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "stratad-test-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A daemon with one QMP monitor at `sock`.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// Started under `timeout` (an oracle daemon): stopped with SIGTERM,
    /// which `timeout` passes on, and its directory belongs to the caller.
    oracle: bool,
}

impl Daemon {
    /// Starts stratad in a fresh directory, with `extra` arguments.
    pub fn start(tag: &str, extra: &[&str]) -> Daemon {
        Self::start_in(tmpdir(tag), extra)
    }

    /// Starts stratad in `dir` (removed when the daemon is dropped).
    pub fn start_in(dir: PathBuf, extra: &[&str]) -> Daemon {
        let sock = dir.join("qmp.sock");
        let mut args = vec![
            "--chardev".to_string(),
            format!("socket,id=m0,path={},server=on,wait=off", sock.display()),
            "--monitor".into(),
            "chardev=m0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_stratad"))
            .args(&args)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Daemon {
            child,
            dir,
            sock,
            oracle: false,
        }
    }

    /// Starts `program` (stratad or qemu-storage-daemon) under `timeout`
    /// in `dir`, which it leaves in place, with its monitor at
    /// `dir/<tag>.sock`.
    pub fn start_program(program: &str, dir: &Path, tag: &str) -> Daemon {
        let sock = dir.join(format!("{tag}.sock"));
        let child = Command::new("timeout")
            .arg(PROCESS_LIMIT)
            .arg(program)
            .arg("--chardev")
            .arg(format!(
                "socket,id=m0,path={},server=on,wait=off",
                sock.display()
            ))
            .args(["--monitor", "chardev=m0"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Daemon {
            child,
            dir: dir.to_owned(),
            sock,
            oracle: true,
        }
    }

    /// A negotiated QMP client.
    pub fn connect(&self) -> Client {
        Client::connect(&self.sock)
    }

    /// The NBD socket the tests put in the daemon's directory.
    pub fn nbd_sock(&self) -> String {
        self.dir.join("nbd.sock").display().to_string()
    }

    /// The URI of export `export` on [`Daemon::nbd_sock`].
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock())
    }

    /// The exit code once the daemon exits within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Sends signal `sig` (a name such as `TERM`).
    pub fn signal(&self, sig: &str) {
        Command::new("timeout")
            .args([
                "10",
                "kill",
                &format!("-{sig}"),
                &self.child.id().to_string(),
            ])
            .status()
            .unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.oracle {
            // SIGKILL would stop `timeout`, not the daemon under it.
            self.signal("TERM");
            if self.wait(Duration::from_secs(10)).is_some() {
                return;
            }
            // A daemon stuck where it does not see SIGTERM must not outlive
            // the test (holding its files and inherited descriptors).
            let _ = Command::new("timeout")
                .args(["10", "pkill", "-KILL", "-P", &self.child.id().to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.oracle {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A QMP client; events that arrive while waiting for a reply are kept.
pub struct Client {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    pub events: Vec<Value>,
    pub greeting: Value,
}

impl Client {
    /// Connects (retrying while the daemon starts) and negotiates.
    pub fn connect(path: &Path) -> Client {
        let mut c = Self::connect_raw(path);
        c.send(
            json!({"execute": "qmp_capabilities"})
                .to_string()
                .as_bytes(),
        );
        let mut r = c.reply();
        // qemu-storage-daemon sometimes greets twice when the client
        // connects the moment its socket appears (about 2 in 100 starts).
        if r.get("QMP").is_some() {
            r = c.reply();
        }
        assert_eq!(r, json!({"return": {}}));
        c
    }

    /// Connects and reads the greeting, without negotiating.
    pub fn connect_raw(path: &Path) -> Client {
        let end = Instant::now() + REPLY_DEADLINE;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => panic!("connect {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(REPLY_DEADLINE)).unwrap();
        s.set_write_timeout(Some(REPLY_DEADLINE)).unwrap();
        let wr = s.try_clone().unwrap();
        let mut c = Client {
            rd: BufReader::new(s),
            wr,
            events: Vec::new(),
            greeting: Value::Null,
        };
        c.greeting = c.read();
        assert!(c.greeting.get("QMP").is_some(), "{}", c.greeting);
        c
    }

    /// Reads one JSON value (several lines in pretty mode).
    pub fn read(&mut self) -> Value {
        let end = Instant::now() + REPLY_DEADLINE;
        let mut text = String::new();
        loop {
            assert!(Instant::now() < end, "no complete reply in time");
            let mut l = String::new();
            assert!(self.rd.read_line(&mut l).unwrap() > 0, "connection closed");
            assert!(l.ends_with("\r\n"), "QMP lines end in CRLF: {l:?}");
            text.push_str(&l);
            if let Ok(v) = serde_json::from_str(&text) {
                return v;
            }
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, raw: &[u8]) {
        self.wr.write_all(raw).unwrap();
    }

    /// The next reply; events before it are kept.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Runs a command; returns the whole reply.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let req = json!({"execute": name, "arguments": args});
        self.send(req.to_string().as_bytes());
        self.reply()
    }

    /// Runs a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args.clone());
        assert!(r.get("return").is_some(), "{name} {args}: {r}");
        r["return"].clone()
    }

    /// Runs a command that must fail; returns the error's description.
    pub fn err(&mut self, name: &str, args: Value) -> String {
        let r = self.cmd(name, args.clone());
        r["error"]["desc"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} {args} should fail: {r}"))
            .to_owned()
    }

    /// Like [`Client::err`], and the error's class must be GenericError.
    pub fn generic_err(&mut self, name: &str, args: Value) -> String {
        let r = self.cmd(name, args.clone());
        assert_eq!(r["error"]["class"], "GenericError", "{name} {args}: {r}");
        r["error"]["desc"].as_str().unwrap().to_owned()
    }

    /// The next event called `name` for which `pred` holds.
    pub fn wait_event(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && pred(e))
            {
                return self.events.remove(i);
            }
            let v = self.read();
            self.events.push(v);
        }
    }

    /// Events called `name` that arrive within `dur`.
    pub fn events_within(&mut self, name: &str, dur: Duration) -> Vec<Value> {
        let s = self.rd.get_ref().try_clone().unwrap();
        s.set_read_timeout(Some(dur)).unwrap();
        let mut l = String::new();
        while let Ok(n) = self.rd.read_line(&mut l) {
            if n == 0 {
                break;
            }
            self.events.push(serde_json::from_str(&l).unwrap());
            l.clear();
        }
        s.set_read_timeout(Some(REPLY_DEADLINE)).unwrap();
        let (hit, rest) = std::mem::take(&mut self.events)
            .into_iter()
            .partition(|e| e["event"] == name);
        self.events = rest;
        hit
    }
}
