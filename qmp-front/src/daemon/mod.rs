//! `stratad`: Strata's qemu-storage-daemon.
//!
//! Threads: the main thread runs the one event loop that owns the graph,
//! the jobs and every command handler ([`Daemon`] is `Rc`-shared there).
//! Monitor connections run on their own threads ([`monitor`]) and reach
//! the loop through a `LoopHandle`; a signal thread ([`sys`]) turns
//! SIGTERM/SIGINT/SIGHUP into the same clean shutdown as `quit`: every
//! node is flushed and closed (`Graph::close_all`), queued replies and
//! events are written, then the process exits.
//!
//! Start-up follows qemu-storage-daemon: options are applied in
//! command-line order, the first error is printed as
//! `PROG: --option ARG: message` and exits with status 1.
#![deny(unsafe_code)]

pub mod bitmaps;
pub mod cli;
pub mod commands;
pub mod errors;
pub mod exports;
pub mod monitor;
pub mod qapi;
#[allow(unsafe_code)]
pub mod sys;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use block_core::{AioContext, AioMode, BlockEvent, EventBus, EventLoop, Graph, LoopHandle};
use jobs::JobManager;
use serde_json::{json, Value};

use crate::qmp::dispatch::{Execution, Registry};
use crate::qmp::keyval;
use crate::qmp::protocol::{Request, Session, SessionConfig};

use cli::{Cli, Item};
use monitor::{Dispatcher, Endpoint, Hub, Outcome};

/// The socket the default configuration listens on (in the working directory).
pub const DEFAULT_SOCKET: &str = "stratad.qmp";

/// An `iothread` object.
pub struct IoThread {
    /// Its loop.
    pub handle: LoopHandle,
    /// Kernel thread id.
    pub thread_id: i64,
    /// Properties, in QEMU's `qom-list` order.
    pub props: RefCell<BTreeMap<&'static str, i64>>,
}

/// Everything the command handlers share; lives on the loop thread.
pub struct Daemon {
    /// The loop.
    pub ctx: Rc<AioContext>,
    /// The block graph.
    pub graph: Rc<Graph>,
    /// Jobs.
    pub jobs: Rc<JobManager>,
    /// Event broadcast to monitors.
    pub hub: Arc<Hub>,
    /// Node names in creation order (QEMU lists nodes by it).
    pub order: RefCell<Vec<String>>,
    /// Nodes added by `blockdev-add`/`--blockdev` as roots (deletable).
    pub owned: RefCell<HashSet<String>>,
    /// `iothread` objects by id, in creation order.
    pub iothreads: RefCell<Vec<(String, IoThread)>>,
    /// Chardev ids (for `qom-list /chardevs`).
    pub chardevs: RefCell<Vec<String>>,
    /// The checked options each root node was added with (reopen compares
    /// against them; QEMU's `json:` filenames are built from them).
    pub add_opts: RefCell<std::collections::HashMap<String, serde_json::Map<String, Value>>>,
    /// The NBD server, while started.
    pub nbd: RefCell<Option<Rc<crate::nbd::NbdServer>>>,
    /// Exports (id, node name) in creation order, until each is really
    /// gone (removed exports stay while clients linger).
    pub export_ids: RefCell<Vec<(String, String)>>,
    /// Set by `quit`.
    pub quit: Cell<bool>,
}

impl Daemon {
    /// Records nodes the graph gained (children before parents) and forgets
    /// nodes it lost.
    pub fn sync_order(&self) {
        let nodes = self.graph.nodes();
        let names: HashSet<String> = nodes.iter().map(|n| n.name().to_owned()).collect();
        let mut order = self.order.borrow_mut();
        order.retain(|n| names.contains(n));
        self.owned.borrow_mut().retain(|n| names.contains(n));
        self.add_opts.borrow_mut().retain(|n, _| names.contains(n));
        let known: HashSet<String> = order.iter().cloned().collect();
        let fresh: Vec<_> = nodes
            .into_iter()
            .filter(|n| !known.contains(n.name()))
            .collect();
        let fresh_names: HashSet<&str> = fresh.iter().map(|n| n.name()).collect();
        let is_child = |n: &block_core::Node| {
            fresh
                .iter()
                .any(|p| p.children().iter().any(|c| c.node.name() == n.name()))
        };
        // QEMU names a node's "file" child before the node itself and every
        // other child (data file, backing) after it, as it opens them in
        // that order; roots first, then anything left over.
        fn visit(
            n: &Rc<block_core::Node>,
            fresh: &HashSet<&str>,
            seen: &mut HashSet<String>,
            out: &mut Vec<Rc<block_core::Node>>,
        ) {
            if !fresh.contains(n.name()) || !seen.insert(n.name().to_owned()) {
                return;
            }
            let children = n.children();
            for c in children.iter().filter(|c| c.name == "file") {
                visit(&c.node, fresh, seen, out);
            }
            out.push(Rc::clone(n));
            for c in children.iter().filter(|c| c.name != "file") {
                visit(&c.node, fresh, seen, out);
            }
        }
        let mut seen = HashSet::new();
        let mut new = Vec::new();
        for n in fresh.iter().filter(|n| !is_child(n)) {
            visit(n, &fresh_names, &mut seen, &mut new);
        }
        for n in &fresh {
            visit(n, &fresh_names, &mut seen, &mut new);
        }
        order.extend(new.iter().map(|n| n.name().to_owned()));
    }

    /// Nodes in creation order.
    pub fn nodes_in_order(&self) -> Vec<Rc<block_core::Node>> {
        self.order
            .borrow()
            .iter()
            .filter_map(|n| self.graph.node(n))
            .collect()
    }

    /// Flushes and closes everything (shutdown).
    pub async fn shutdown(&self) {
        for (_, t) in self.iothreads.borrow_mut().drain(..) {
            t.handle.stop();
        }
        exports::shutdown(self).await;
        if let Err(e) = self.graph.close_all().await {
            eprintln!("stratad: error while closing images: {e}");
        }
        self.ctx.stop();
    }
}

struct LoopState {
    daemon: Rc<Daemon>,
    registry: Registry<Daemon>,
}

thread_local! {
    static STATE: RefCell<Option<Rc<LoopState>>> = const { RefCell::new(None) };
}

struct LoopDispatcher {
    handle: LoopHandle,
}

impl Dispatcher for LoopDispatcher {
    fn execute(
        &self,
        cfg: SessionConfig,
        negotiated: bool,
        oob: bool,
        req: Request,
    ) -> Option<Outcome> {
        self.handle
            .submit(move |_ctx| async move {
                let st = STATE.with(|s| s.borrow().clone())?;
                let mut s = Session::new(cfg);
                if negotiated {
                    s.enter_command_mode(oob);
                }
                let line = match st.registry.execute(&mut s, &st.daemon, req) {
                    Execution::Ready(l) => l,
                    Execution::Pending(f) => f.await,
                };
                Some(Outcome {
                    line,
                    negotiated: s.mode() == crate::qmp::protocol::Mode::Command,
                    oob: s.oob_enabled(),
                    quit: st.daemon.quit.get(),
                })
            })
            .wait()
            .ok()
            .flatten()
    }

    fn shutdown(&self) {
        drop(self.handle.submit(|_ctx| async move {
            if let Some(st) = STATE.with(|s| s.borrow().clone()) {
                st.daemon.shutdown().await;
            }
        }));
    }
}

/// Program name for messages (basename of argv[0]).
pub fn progname() -> String {
    std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "stratad".into())
}

/// A start-up error: printed as `PROG: text`, exit status 1.
#[derive(Debug)]
pub struct StartError(pub String);

fn session_config(pretty: bool) -> SessionConfig {
    SessionConfig {
        version: (10, 0, 2),
        package: format!("strata {}", env!("CARGO_PKG_VERSION")),
        pretty,
        oob: true,
    }
}

/// A parsed `--chardev`.
#[derive(Debug, Clone)]
struct Chardev {
    arg: String,
    id: String,
    ep: Endpoint,
    server: bool,
    wait: bool,
}

fn parse_chardev(arg: &str, have_stdio: bool) -> Result<Chardev, String> {
    let m = keyval::parse(arg, Some("backend")).map_err(|e| e.0)?;
    let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let backend = get("backend").unwrap_or_default();
    let id = get("id").ok_or("chardev: no id specified")?;
    let flag = |k: &str, def: bool| -> Result<bool, String> {
        match get(k).as_deref() {
            None => Ok(def),
            Some("on" | "yes" | "true" | "y") => Ok(true),
            Some("off" | "no" | "false" | "n") => Ok(false),
            Some(_) => Err(format!("Parameter '{k}' expects 'on' or 'off'")),
        }
    };
    let known = [
        "backend",
        "id",
        "path",
        "host",
        "port",
        "server",
        "wait",
        "nodelay",
        "telnet",
        "to",
        "ipv4",
        "ipv6",
        "reconnect",
        "reconnect-ms",
        "abstract",
        "tight",
        "mux",
        "signal",
        "logfile",
        "logappend",
    ];
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("Invalid parameter '{k}'"));
    }
    match backend.as_str() {
        "socket" => {
            let ep = match (get("path"), get("host"), get("port")) {
                (Some(p), _, _) => Endpoint::Unix(p),
                (None, host, Some(port)) => {
                    Endpoint::Tcp(host.unwrap_or_else(|| "0.0.0.0".into()), port)
                }
                (None, Some(_), None) => return Err("chardev: socket: no port given".into()),
                (None, None, None) => return Err("Unable to parse FD number ".into()),
            };
            let server = flag("server", false)?;
            let wait = flag("wait", server)?;
            Ok(Chardev {
                arg: arg.to_owned(),
                id,
                ep,
                server,
                wait,
            })
        }
        "stdio" => {
            if have_stdio {
                return Err("cannot use stdio by multiple character devices".into());
            }
            Ok(Chardev {
                arg: arg.to_owned(),
                id,
                ep: Endpoint::Stdio,
                server: false,
                wait: false,
            })
        }
        other => Err(format!("'{other}' is not a valid char driver name")),
    }
}

/// Runs the daemon; returns the process exit status.
pub fn main() -> i32 {
    let prog = progname();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = match cli::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{prog}: {e}");
            return 1;
        }
    };
    if cli.help {
        print!("{}", cli::help_text(&prog));
        return 0;
    }
    if cli.version {
        print!("{}", cli::version_text(&prog));
        return 0;
    }
    let pipe = if cli.daemonize {
        match sys::daemonize() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{prog}: cannot daemonize: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    match run(&cli, pipe) {
        Ok(()) => 0,
        Err(StartError(e)) => {
            eprintln!("{prog}: {e}");
            1
        }
    }
}

fn run(cli: &Cli, pipe: Option<sys::DaemonPipe>) -> Result<(), StartError> {
    // Signals are blocked before any thread exists, so that only the
    // signal thread ever receives them.
    let loop_handle: Arc<std::sync::OnceLock<LoopHandle>> = Arc::default();
    {
        let h = Arc::clone(&loop_handle);
        sys::handle_stop_signals(move |_sig| match h.get() {
            Some(h) => drop(h.submit(|_ctx| async move {
                if let Some(st) = STATE.with(|s| s.borrow().clone()) {
                    st.daemon.shutdown().await;
                }
            })),
            // Still starting up: nothing to flush yet.
            None => std::process::exit(0),
        })
        .map_err(|e| StartError(format!("cannot set up signal handling: {e}")))?;
    }
    let el = EventLoop::new(AioMode::Auto).map_err(|e| StartError(e.to_string()))?;
    let ctx = Rc::clone(el.context());
    let hub = Hub::new();
    let handle = ctx.handle();
    let _ = loop_handle.set(handle.clone());
    let bus = EventBus::new();
    let rx = bus.subscribe();
    {
        let hub = Arc::clone(&hub);
        let _ = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                while let Ok(ev) = rx.recv() {
                    forward_event(&hub, ev);
                }
            });
    }
    let graph = Rc::new(Graph::new(Rc::clone(&ctx), formats::registry(), bus));
    let jhub = Arc::clone(&hub);
    let jobs = JobManager::new(
        Rc::clone(&ctx),
        Rc::new(move |id: &str, st: jobs::JobStatus| {
            jhub.emit(
                "JOB_STATUS_CHANGE",
                Some(json!({"id": id, "status": st.name()})),
            );
        }),
    );
    let daemon = Rc::new(Daemon {
        ctx: Rc::clone(&ctx),
        graph,
        jobs,
        hub: Arc::clone(&hub),
        order: RefCell::new(Vec::new()),
        owned: RefCell::new(HashSet::new()),
        iothreads: RefCell::new(Vec::new()),
        chardevs: RefCell::new(Vec::new()),
        add_opts: RefCell::new(std::collections::HashMap::new()),
        nbd: RefCell::new(None),
        export_ids: RefCell::new(Vec::new()),
        quit: Cell::new(false),
    });
    let registry = commands::registry();
    STATE.with(|s| {
        *s.borrow_mut() = Some(Rc::new(LoopState {
            daemon: Rc::clone(&daemon),
            registry,
        }))
    });
    let disp: Arc<dyn Dispatcher> = Arc::new(LoopDispatcher { handle });

    let mut items = cli.items.clone();
    let mut banner = None;
    if cli.default_config {
        let path = std::env::current_dir()
            .map(|d| d.join(DEFAULT_SOCKET))
            .unwrap_or_else(|_| DEFAULT_SOCKET.into());
        let p = path.display().to_string();
        items = vec![
            Item::Chardev(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                p.replace(',', ",,")
            )),
            Item::Monitor("chardev=qmp0".into()),
            Item::Blockdev("driver=null-co,node-name=demo0,size=67108864".into()),
        ];
        banner = Some(p);
    }
    let mut chardevs: BTreeMap<String, Chardev> = BTreeMap::new();
    let mut have_stdio = false;
    for item in &items {
        let fail = |m: String| StartError(format!("{} {}: {m}", item.option(), item.arg()));
        match item {
            Item::Blockdev(a) => {
                let opts: qapi::BlockdevOptions =
                    keyval::parse_option(a, Some("driver")).map_err(|e| fail(e.0))?;
                el.block_on(commands::blockdev_add(&daemon, opts.map))
                    .map_err(|e| fail(e.desc))?;
            }
            Item::Object(a) if a == "help" => {
                println!("List of user creatable objects:\n  iothread");
                std::process::exit(0);
            }
            Item::Object(a) if a.ends_with(",help") || a.ends_with(",help=on") => {
                let ty = a.split(',').next().unwrap_or_default();
                if ty != "iothread" && ty != "qom-type=iothread" {
                    return Err(fail(format!("invalid object type: {ty}")));
                }
                println!("iothread options:");
                for p in [
                    "aio-max-batch",
                    "poll-grow",
                    "poll-max-ns",
                    "poll-shrink",
                    "thread-pool-max",
                    "thread-pool-min",
                ] {
                    println!("  {p}=<int>");
                }
                std::process::exit(0);
            }
            Item::Object(a) => {
                let opts: qapi::ObjectOptions =
                    keyval::parse_option(a, Some("qom-type")).map_err(|e| fail(e.0))?;
                commands::object_add(&daemon, opts.map).map_err(|e| fail(e.desc))?;
            }
            Item::Chardev(a) => {
                let c = parse_chardev(a, have_stdio).map_err(fail)?;
                if chardevs.contains_key(&c.id) {
                    return Err(fail(format!(
                        "attempt to add duplicate property '{}' to object (type 'container')",
                        c.id
                    )));
                }
                have_stdio |= c.ep == Endpoint::Stdio;
                daemon.chardevs.borrow_mut().push(c.id.clone());
                chardevs.insert(c.id.clone(), c);
            }
            Item::Monitor(a) => {
                let m = keyval::parse(a, Some("chardev")).map_err(|e| fail(e.0))?;
                let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
                let id = get("chardev").unwrap_or_default();
                let pretty = match get("pretty").as_deref() {
                    None | Some("off" | "no" | "false") => false,
                    Some("on" | "yes" | "true") => true,
                    Some(_) => return Err(fail("Parameter 'pretty' expects 'on' or 'off'".into())),
                };
                if let Some(mode) = get("mode") {
                    if mode != "control" {
                        return Err(fail(format!(
                            "Parameter 'mode' does not accept value '{mode}'"
                        )));
                    }
                }
                if let Some(k) = m
                    .keys()
                    .find(|k| !["chardev", "pretty", "mode", "id"].contains(&k.as_str()))
                {
                    return Err(fail(format!("Parameter '{k}' is unexpected")));
                }
                let c = chardevs
                    .get(&id)
                    .ok_or_else(|| fail(format!("chardev \"{id}\" not found")))?;
                let cfg = session_config(pretty);
                if c.server {
                    let l = monitor::bind(&c.ep).map_err(fail)?;
                    if c.wait {
                        eprintln!(
                            "{}: --chardev {}: info: QEMU waiting for connection on: {}",
                            progname(),
                            c.arg,
                            match &c.ep {
                                Endpoint::Unix(p) => format!("disconnected:unix:{p},server=on"),
                                Endpoint::Tcp(h, p) =>
                                    format!("disconnected:tcp:{h}:{p},server=on"),
                                Endpoint::Stdio => String::new(),
                            }
                        );
                        accept_first(l, &hub, &disp, cfg).map_err(fail)?;
                    } else {
                        monitor::serve_listener(l, Arc::clone(&hub), Arc::clone(&disp), cfg);
                    }
                } else {
                    monitor::connect(&c.ep, Arc::clone(&hub), Arc::clone(&disp), cfg)
                        .map_err(fail)?;
                }
            }
            Item::NbdServer(_) | Item::Export(_) => {
                exports::cli(&daemon, item).map_err(fail)?;
            }
        }
    }
    if let Some(p) = &cli.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| {
            StartError(format!(
                "cannot create PID file: Cannot open pid file: {}",
                jobs::create::os_text(&e)
            ))
        })?;
    }
    if let Some(p) = &banner {
        println!("QMP socket: {p}");
        println!("Connect with:  socat - UNIX-CONNECT:{DEFAULT_SOCKET}   (then type {{\"execute\":\"qmp_capabilities\"}})");
        println!("          or:  qmp-shell {DEFAULT_SOCKET}");
        println!(
            "Demo node 'demo0' (null-co, 64 MiB). Stop with Ctrl-C or {{\"execute\":\"quit\"}}."
        );
    }
    if let Some(pipe) = pipe {
        sys::daemon_ready(pipe).map_err(|e| StartError(e.to_string()))?;
    }
    el.run();
    hub.close_all(Duration::from_secs(2));
    if let Some(p) = &cli.pidfile {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &banner {
        let _ = std::fs::remove_file(p);
    }
    STATE.with(|s| s.borrow_mut().take());
    Ok(())
}

fn accept_first(
    l: monitor::Listener,
    hub: &Arc<Hub>,
    disp: &Arc<dyn Dispatcher>,
    cfg: SessionConfig,
) -> Result<(), String> {
    // Wait for one client before going on, as `wait=on` does; then keep
    // accepting in the background.
    match l {
        monitor::Listener::Unix(l) => {
            let (s, _) = l.accept().map_err(|e| e.to_string())?;
            let h = Arc::clone(hub);
            let d = Arc::clone(disp);
            let c2 = cfg.clone();
            let _ = std::thread::Builder::new()
                .name("qmp-in".into())
                .spawn(move || {
                    let (Ok(w), Ok(c)) = (s.try_clone(), s.try_clone()) else {
                        return;
                    };
                    monitor::serve(
                        &h,
                        &d,
                        c2,
                        Box::new(s),
                        Box::new(w),
                        Box::new(move || {
                            let _ = c.shutdown(std::net::Shutdown::Both);
                        }),
                    );
                });
            monitor::serve_listener(
                monitor::Listener::Unix(l),
                Arc::clone(hub),
                Arc::clone(disp),
                cfg,
            );
        }
        monitor::Listener::Tcp(l) => {
            monitor::serve_listener(
                monitor::Listener::Tcp(l),
                Arc::clone(hub),
                Arc::clone(disp),
                cfg,
            );
        }
    }
    Ok(())
}

fn forward_event(hub: &Hub, ev: BlockEvent) {
    match ev {
        BlockEvent::WriteThreshold {
            node_name,
            amount_exceeded,
            write_threshold,
        } => hub.emit(
            "BLOCK_WRITE_THRESHOLD",
            Some(
                json!({"node-name": node_name, "amount-exceeded": amount_exceeded,
                "write-threshold": write_threshold}),
            ),
        ),
        BlockEvent::ImageCorrupted {
            device,
            node_name,
            msg,
            offset,
            size,
            fatal,
        } => {
            let mut d =
                json!({"device": device, "node-name": node_name, "msg": msg, "fatal": fatal});
            if let Some(o) = offset {
                d["offset"] = o.into();
            }
            if let Some(s) = size {
                d["size"] = s.into();
            }
            hub.emit("BLOCK_IMAGE_CORRUPTED", Some(d));
        }
        BlockEvent::IoError {
            device,
            node_name,
            operation,
            action,
            nospace,
            reason,
        } => hub.emit(
            "BLOCK_IO_ERROR",
            Some(
                json!({"device": device, "node-name": node_name, "operation": operation,
                "action": action, "nospace": nospace, "reason": reason}),
            ),
        ),
        _ => {}
    }
}
