//! Cross-crate and interop tests. The tests live in `tests/tests/*.rs`; this
//! library holds what they share: locating QEMU's tools (a missing tool is a
//! loud failure, never a skip), scratch images on a disk-backed file system,
//! and running futures on a fresh graph for each I/O engine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::rc::Rc;

use block_core::{AioMode, EventBus, EventLoop, Graph, Options};

/// Path of a QEMU tool; panics with an install hint when it is missing.
pub fn qemu_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is required by the interop tests: install Debian's qemu-utils / qemu-system-common (the test command does)");
}

/// Seconds a QEMU tool may run in a test before it is killed: a hang in
/// the server under test must fail the test, never stall CI.
pub const TOOL_TIMEOUT_SECS: &str = "120";

/// Runs a QEMU tool under `timeout` and returns its output.
pub fn run_tool(name: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", TOOL_TIMEOUT_SECS])
        .arg(qemu_tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// Runs `qemu-io` with one command per `-c` on a raw or qcow2 image and
/// returns (success, combined output). qemu-io exits 0 even when a pattern
/// check fails, so callers check the text too.
pub fn qemu_io(fmt: &str, path: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path);
    let out = run_tool("qemu-io", &args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed:");
    (ok, text)
}

/// A scratch directory on a disk-backed file system, removed on drop.
pub struct Scratch {
    /// The directory.
    pub dir: PathBuf,
}

impl Scratch {
    /// Creates `<base>/strata-test-<name>-<pid>`; base is `$STRATA_TEST_DIR`
    /// or /var/tmp (not tmpfs, so O_DIRECT and hole punching behave like
    /// on real images).
    pub fn new(name: &str) -> Self {
        let base = std::env::var_os("STRATA_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let dir = base.join(format!("strata-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch { dir }
    }

    /// A path inside the scratch dir.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// Creates a sparse raw image of `size` bytes.
    pub fn raw_image(&self, file: &str, size: u64) -> String {
        let p = self.path(file);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .expect("create raw image");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Options for a raw node over a file.
pub fn raw_opts(path: &str, direct: bool) -> Options {
    Options::new()
        .with("driver", "raw")
        .with("file.driver", "file")
        .with("file.filename", path)
        .with("cache.direct", direct)
}

/// Runs `f` once per I/O engine with a fresh loop and graph.
pub fn on_engines<F, Fut>(mut f: F)
where
    F: FnMut(Rc<Graph>, AioMode) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for mode in [AioMode::IoUring, AioMode::Threads] {
        let el = EventLoop::new(mode).expect("event loop");
        let g = Rc::new(Graph::new(
            Rc::clone(el.context()),
            formats::registry(),
            EventBus::new(),
        ));
        el.block_on(f(Rc::clone(&g), mode));
        el.block_on(async { g.close_all().await.expect("close all") });
    }
}

/// An NBD server on its own loop thread, serving nodes opened from
/// options; stopped (and every node closed) on drop.
pub struct NbdFixture {
    /// The unix socket path.
    pub socket: String,
    /// The TCP port, when started with TCP.
    pub port: Option<u16>,
    handle: block_core::LoopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NbdFixture {
    /// Starts a server on `socket` (unix) or, with `tcp`, also on
    /// 127.0.0.1 (any free port), exporting each `(node options, export)`.
    pub fn start(
        mode: AioMode,
        socket: &str,
        tcp: bool,
        exports: Vec<(Options, qmp_front::nbd::ExportConfig)>,
    ) -> Self {
        use qmp_front::nbd::{NbdAddr, NbdServer};
        let (tx, rx) = std::sync::mpsc::channel();
        let sock = socket.to_owned();
        let thread = std::thread::spawn(move || {
            let el = EventLoop::new(mode).expect("event loop");
            let g = Rc::new(Graph::new(
                Rc::clone(el.context()),
                formats::registry(),
                EventBus::new(),
            ));
            let ctx = Rc::clone(el.context());
            let started = el.block_on(async {
                for (opts, _) in &exports {
                    g.open(opts.clone()).await?;
                }
                let addr = if tcp {
                    NbdAddr::Inet {
                        host: "127.0.0.1".into(),
                        port: "0".into(),
                    }
                } else {
                    NbdAddr::Unix(sock.clone())
                };
                let server = NbdServer::start(&ctx, &addr, 0)?;
                for (_, cfg) in exports {
                    server.add_export(&g, cfg)?;
                }
                Ok::<_, block_core::Error>(server)
            });
            let server = match started {
                Ok(s) => s,
                Err(e) => {
                    tx.send(Err(e.to_string())).unwrap();
                    return;
                }
            };
            tx.send(Ok((ctx.handle(), server.local_port()))).unwrap();
            el.run();
            server.stop();
            el.block_on(async { g.close_all().await.expect("close nodes") });
        });
        let (handle, port) = rx.recv().expect("server thread").expect("server start");
        NbdFixture {
            socket: socket.to_owned(),
            port,
            handle,
            thread: Some(thread),
        }
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket)
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn tcp_uri(&self, export: &str) -> String {
        format!(
            "nbd://127.0.0.1:{}/{export}",
            self.port.expect("tcp fixture")
        )
    }
}

impl Drop for NbdFixture {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
