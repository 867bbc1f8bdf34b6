//! QMP monitors: chardev listeners, one reader and one writer thread per
//! connection, and the event hub that broadcasts events to every
//! negotiated connection.
//!
//! Threads: connections never run on the loop thread. A connection's reader
//! parses input with its own [`Session`] and hands each request to the loop
//! through [`Dispatcher`] (a `LoopHandle::submit`), waiting for the reply
//! before reading the next one, as QMP orders commands per monitor. Replies
//! and events go through the connection's bounded queue to its writer, so a
//! client that stops reading blocks only its own threads; if its queue
//! overflows with events, it is disconnected rather than slowing anyone
//! else down.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::qmp::json_out::to_json;
use crate::qmp::protocol::Session;
use crate::qmp::protocol::{Incoming, Request, SessionConfig, Timestamp};

/// Lines a connection may have queued before it is dropped.
const QUEUE_LINES: usize = 4096;

enum Out {
    Line(Arc<str>),
    Close,
}

/// The writer side of one connection, as the hub sees it.
struct ConnOut {
    id: u64,
    pretty: bool,
    negotiated: AtomicBool,
    tx: SyncSender<Out>,
    closer: Box<dyn Fn() + Send + Sync>,
    done: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

/// Broadcasts events to every negotiated monitor connection.
#[derive(Default)]
pub struct Hub {
    conns: Mutex<Vec<Arc<ConnOut>>>,
    next: AtomicU64,
}

/// Formats a value as one QMP output line (QEMU's `\r\n` line ends).
pub fn line(v: &Value, pretty: bool) -> String {
    let mut s = to_json(v, pretty);
    s.push('\n');
    s.replace('\n', "\r\n")
}

impl Hub {
    /// A hub with no connection.
    pub fn new() -> Arc<Self> {
        Arc::new(Hub::default())
    }

    /// Sends event `name` with `data` to every negotiated connection.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let ts = Timestamp::now();
        let mut m = Map::new();
        m.insert(
            "timestamp".into(),
            serde_json::json!({"seconds": ts.seconds, "microseconds": ts.microseconds}),
        );
        m.insert("event".into(), name.into());
        if let Some(d) = data {
            m.insert("data".into(), d);
        }
        let v = Value::Object(m);
        let mut plain: Option<Arc<str>> = None;
        let mut pretty: Option<Arc<str>> = None;
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for c in conns {
            if !c.negotiated.load(Ordering::Acquire) {
                continue;
            }
            let slot = if c.pretty { &mut pretty } else { &mut plain };
            let l = slot
                .get_or_insert_with(|| Arc::from(line(&v, c.pretty)))
                .clone();
            match c.tx.try_send(Out::Line(l)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    // The client does not read: drop it, never block the loop.
                    (c.closer)();
                    self.remove(c.id);
                }
                Err(TrySendError::Disconnected(_)) => self.remove(c.id),
            }
        }
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| c.id != id);
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Flushes every connection's queued output (waiting at most `timeout`
    /// in total) and closes them; used at shutdown so `quit`'s reply and
    /// the last events reach their clients.
    pub fn close_all(&self, timeout: Duration) {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &conns {
            let _ = c.tx.try_send(Out::Close);
        }
        let deadline = Instant::now() + timeout;
        for c in &conns {
            let (m, cv) = &*c.done;
            let mut d = m.lock().unwrap_or_else(|e| e.into_inner());
            while !*d {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                d = cv
                    .wait_timeout(d, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            (c.closer)();
        }
    }
}

/// What the loop answers for one request.
pub struct Outcome {
    /// The reply line.
    pub line: String,
    /// Whether the session is now in command mode.
    pub negotiated: bool,
    /// Whether OOB was enabled.
    pub oob: bool,
    /// `quit` was executed: shut down once the reply is queued.
    pub quit: bool,
}

/// Executes requests on the loop thread (implemented by the daemon).
pub trait Dispatcher: Send + Sync {
    /// Runs `req` for a session in the given state; blocks until the reply.
    fn execute(
        &self,
        cfg: SessionConfig,
        negotiated: bool,
        oob: bool,
        req: Request,
    ) -> Option<Outcome>;
    /// Starts a clean shutdown (after `quit`).
    fn shutdown(&self);
}

/// Serves one monitor connection on the calling thread; returns when the
/// client disconnects.
pub fn serve(
    hub: &Arc<Hub>,
    disp: &Arc<dyn Dispatcher>,
    cfg: SessionConfig,
    mut rd: Box<dyn Read + Send>,
    wr: Box<dyn Write + Send>,
    closer: Box<dyn Fn() + Send + Sync>,
) {
    let (tx, rx) = sync_channel::<Out>(QUEUE_LINES);
    let done = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let d2 = Arc::clone(&done);
    let writer = std::thread::Builder::new()
        .name("qmp-out".into())
        .spawn(move || write_loop(rx, wr, d2));
    if writer.is_err() {
        return;
    }
    let conn = Arc::new(ConnOut {
        id: hub.next.fetch_add(1, Ordering::Relaxed),
        pretty: cfg.pretty,
        negotiated: AtomicBool::new(false),
        tx: tx.clone(),
        closer,
        done,
    });
    hub.conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::clone(&conn));
    let mut session = Session::new(cfg.clone());
    let send = |l: String| tx.send(Out::Line(Arc::from(l))).is_ok();
    if !send(session.greeting()) {
        hub.remove(conn.id);
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    'conn: loop {
        let (items, eof) = match rd.read(&mut buf) {
            Ok(0) | Err(_) => (session.finish(), true),
            Ok(n) => (session.feed(&buf[..n]), false),
        };
        for item in items {
            match item {
                Incoming::Reply(l) => {
                    if !send(l) {
                        break 'conn;
                    }
                }
                Incoming::Request(req) => {
                    let negotiated = session.mode() == crate::qmp::protocol::Mode::Command;
                    let Some(out) =
                        disp.execute(cfg.clone(), negotiated, session.oob_enabled(), req)
                    else {
                        break 'conn;
                    };
                    if out.negotiated && !negotiated {
                        session.enter_command_mode(out.oob);
                    }
                    let ok = send(out.line);
                    if out.negotiated {
                        conn.negotiated.store(true, Ordering::Release);
                    }
                    if out.quit {
                        disp.shutdown();
                    }
                    if !ok {
                        break 'conn;
                    }
                }
            }
        }
        if eof {
            break;
        }
    }
    hub.remove(conn.id);
    let _ = tx.send(Out::Close);
}

fn write_loop(
    rx: Receiver<Out>,
    mut wr: Box<dyn Write + Send>,
    done: Arc<(Mutex<bool>, std::sync::Condvar)>,
) {
    while let Ok(o) = rx.recv() {
        match o {
            Out::Line(l) => {
                if wr.write_all(l.as_bytes()).is_err() || wr.flush().is_err() {
                    break;
                }
            }
            Out::Close => break,
        }
    }
    let (m, cv) = &*done;
    *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
    cv.notify_all();
}

/// Where a monitor listens or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(String),
    /// A TCP host and port.
    Tcp(String, String),
    /// The process's stdin/stdout.
    Stdio,
}

fn spawn_conn_unix(hub: Arc<Hub>, disp: Arc<dyn Dispatcher>, cfg: SessionConfig, s: UnixStream) {
    let _ = std::thread::Builder::new()
        .name("qmp-in".into())
        .spawn(move || {
            let (Ok(w), Ok(c)) = (s.try_clone(), s.try_clone()) else {
                return;
            };
            serve(
                &hub,
                &disp,
                cfg,
                Box::new(s),
                Box::new(w),
                Box::new(move || {
                    let _ = c.shutdown(Shutdown::Both);
                }),
            );
        });
}

fn spawn_conn_tcp(hub: Arc<Hub>, disp: Arc<dyn Dispatcher>, cfg: SessionConfig, s: TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = std::thread::Builder::new()
        .name("qmp-in".into())
        .spawn(move || {
            let (Ok(w), Ok(c)) = (s.try_clone(), s.try_clone()) else {
                return;
            };
            serve(
                &hub,
                &disp,
                cfg,
                Box::new(s),
                Box::new(w),
                Box::new(move || {
                    let _ = c.shutdown(Shutdown::Both);
                }),
            );
        });
}

/// A bound but not yet serving server socket.
pub enum Listener {
    /// Unix.
    Unix(UnixListener),
    /// TCP.
    Tcp(TcpListener),
}

/// Binds a server socket as QEMU's socket chardev does (an existing unix
/// socket path is replaced). Errors carry QEMU's wording.
pub fn bind(ep: &Endpoint) -> Result<Listener, String> {
    match ep {
        Endpoint::Unix(path) => {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map(Listener::Unix).map_err(|e| {
                format!(
                    "Failed to bind socket to {path}: {}",
                    jobs::create::os_text(&e)
                )
            })
        }
        Endpoint::Tcp(host, port) => {
            let p: u16 = port.parse().map_err(|_| {
                format!(
                    "address resolution failed for {host}:{port}: Servname not supported for ai_socktype"
                )
            })?;
            TcpListener::bind((host.as_str(), p))
                .map(Listener::Tcp)
                .map_err(|e| format!("Failed to bind socket: {}", jobs::create::os_text(&e)))
        }
        Endpoint::Stdio => Err("stdio is not a server socket".into()),
    }
}

/// Accepts connections forever on a thread; each gets its own threads.
/// Several clients may be connected at once (QEMU serves one at a time per
/// socket chardev; a second client there just waits).
pub fn serve_listener(l: Listener, hub: Arc<Hub>, disp: Arc<dyn Dispatcher>, cfg: SessionConfig) {
    let _ = std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || match l {
            Listener::Unix(l) => {
                for s in l.incoming().flatten() {
                    spawn_conn_unix(Arc::clone(&hub), Arc::clone(&disp), cfg.clone(), s);
                }
            }
            Listener::Tcp(l) => {
                for s in l.incoming().flatten() {
                    spawn_conn_tcp(Arc::clone(&hub), Arc::clone(&disp), cfg.clone(), s);
                }
            }
        });
}

/// Connects out (a client-mode socket chardev) and serves the connection.
pub fn connect(
    ep: &Endpoint,
    hub: Arc<Hub>,
    disp: Arc<dyn Dispatcher>,
    cfg: SessionConfig,
) -> Result<(), String> {
    match ep {
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| {
                format!(
                    "Failed to connect to '{path}': {}",
                    jobs::create::os_text(&e)
                )
            })?;
            spawn_conn_unix(hub, disp, cfg, s);
        }
        Endpoint::Tcp(host, port) => {
            let s = TcpStream::connect(format!("{host}:{port}")).map_err(|e| {
                format!(
                    "Failed to connect to '{host}:{port}': {}",
                    jobs::create::os_text(&e)
                )
            })?;
            spawn_conn_tcp(hub, disp, cfg, s);
        }
        Endpoint::Stdio => serve_stdio(hub, disp, cfg),
    }
    Ok(())
}

/// Serves a monitor on stdin/stdout.
pub fn serve_stdio(hub: Arc<Hub>, disp: Arc<dyn Dispatcher>, cfg: SessionConfig) {
    let _ = std::thread::Builder::new()
        .name("qmp-stdio".into())
        .spawn(move || {
            serve(
                &hub,
                &disp,
                cfg,
                Box::new(std::io::stdin()),
                Box::new(std::io::stdout()),
                Box::new(|| {}),
            );
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// Answers every request with `{}` and leaves negotiation on the first.
    struct Echo;
    impl Dispatcher for Echo {
        fn execute(
            &self,
            cfg: SessionConfig,
            _negotiated: bool,
            _oob: bool,
            req: Request,
        ) -> Option<Outcome> {
            let s = Session::new(cfg);
            Some(Outcome {
                line: s.success(serde_json::json!({}), req.id.as_ref()),
                negotiated: true,
                oob: false,
                quit: false,
            })
        }
        fn shutdown(&self) {}
    }

    #[test]
    fn events_after_negotiation_only_and_block_events_mapped() {
        let hub = Hub::new();
        let disp: Arc<dyn Dispatcher> = Arc::new(Echo);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (h, d) = (Arc::clone(&hub), Arc::clone(&disp));
        std::thread::spawn(move || {
            let w = theirs.try_clone().unwrap();
            serve(
                &h,
                &d,
                SessionConfig::default(),
                Box::new(theirs),
                Box::new(w),
                Box::new(|| {}),
            )
        });
        ours.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut rd = BufReader::new(ours.try_clone().unwrap());
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"QMP\""));
        // Not negotiated yet: nothing is sent.
        hub.emit("X", None);
        (&ours)
            .write_all(b"{\"execute\":\"qmp_capabilities\"}")
            .unwrap();
        line.clear();
        rd.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"return\": {}}\r\n");
        // The reply can overtake the session's subscription to events, so
        // the event is sent again until it arrives (never a blocking read
        // without a deadline: a lost event must fail, not hang).
        ours.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        line.clear();
        for _ in 0..100 {
            super::super::forward_event(
                &hub,
                block_core::BlockEvent::WriteThreshold {
                    node_name: "n".into(),
                    amount_exceeded: 4096,
                    write_threshold: 65536,
                },
            );
            if rd.read_line(&mut line).is_ok() && line.ends_with('\n') {
                break;
            }
        }
        assert!(line.ends_with('\n'), "no event: {line:?}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "BLOCK_WRITE_THRESHOLD");
        assert_eq!(
            v["data"],
            serde_json::json!({"node-name": "n", "amount-exceeded": 4096, "write-threshold": 65536})
        );
        assert!(v["timestamp"]["seconds"].as_i64().unwrap() > 0);
        assert_eq!(hub.connections(), 1);
    }
}
