//! The NBD server: listeners, exports and the connections to them.
//!
//! Runs on one loop thread. The server owns its listening socket and an
//! accept task; each accepted client gets a task running [`conn::serve`].
//! Exports hold a BlockBackend on their node, so the graph refuses to
//! delete (or, for writable exports, resize) a node under an export, as
//! QEMU does. Removing an export in `hard` mode disconnects its clients; in
//! `safe` mode it is refused while clients are connected.
//!
//! [`conn::serve`]: super::conn::serve

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};

use block_core::{AioContext, BlockBackend, DirtyBitmap, Error, Graph, Node, Perm, Result};

use super::conn::{self, ConnHandle};
use super::socket::{Listener, Socket};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix socket path.
    Unix(String),
    /// A TCP host and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port (a number or service name; "0" picks a free port).
        port: String,
    },
}

/// How an export is set up (block-export-add type=nbd).
#[derive(Debug, Clone, Default)]
pub struct ExportConfig {
    /// Export id (QMP `id`).
    pub id: String,
    /// Node to export.
    pub node_name: String,
    /// Export name seen by clients; defaults to the node name.
    pub name: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// Whether every write is made stable before it is acknowledged.
    pub writethrough: bool,
    /// Dirty bitmaps exported as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<BitmapRef>,
    /// Whether `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
}

/// A dirty bitmap named by an export: by name alone, found on the exported
/// node or down its backing chain, or on a given node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitmapRef {
    /// The node holding the bitmap, when given.
    pub node: Option<String>,
    /// The bitmap's name.
    pub name: String,
}

/// One export.
pub struct NbdExport {
    /// Configuration.
    pub cfg: ExportConfig,
    /// The name clients use.
    pub name: String,
    pub(crate) node: Rc<Node>,
    pub(crate) blk: Rc<BlockBackend>,
    /// The exported bitmaps, held busy while the export lives; context
    /// ids follow their order.
    pub(crate) bitmaps: Vec<Rc<DirtyBitmap>>,
    pub(crate) conns: RefCell<Vec<Weak<ConnHandle>>>,
    removed: Cell<bool>,
}

impl NbdExport {
    /// Number of connected clients.
    pub fn connections(&self) -> usize {
        self.conns
            .borrow()
            .iter()
            .filter(|c| c.strong_count() > 0)
            .count()
    }
    /// The exported node.
    pub fn node(&self) -> &Rc<Node> {
        &self.node
    }
    pub(crate) fn is_removed(&self) -> bool {
        self.removed.get()
    }
}

/// How to remove an export with clients connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect them.
    Hard,
}

/// Called with an export's name once it is gone (its last client left).
pub type DeletedHook = Box<dyn Fn(&str)>;

/// The server.
pub struct NbdServer {
    pub(crate) ctx: Rc<AioContext>,
    listener: Rc<Listener>,
    exports: RefCell<BTreeMap<String, Rc<NbdExport>>>,
    pub(crate) max_connections: u32,
    pub(crate) connections: Cell<u32>,
    stopped: Cell<bool>,
    all_conns: RefCell<Vec<Weak<ConnHandle>>>,
    on_deleted: RefCell<Option<DeletedHook>>,
}

impl NbdServer {
    /// Binds `addr` and starts accepting clients (0 = unlimited connections).
    pub fn start(ctx: &Rc<AioContext>, addr: &NbdAddr, max_connections: u32) -> Result<Rc<Self>> {
        let listener = match addr {
            NbdAddr::Unix(p) => Listener::unix(p),
            NbdAddr::Inet { host, port } => Listener::tcp(host, port),
        }
        .map_err(|e| Error::io("", format!("Failed to bind socket {}", describe(addr)), e))?;
        let server = Rc::new(NbdServer {
            ctx: Rc::clone(ctx),
            listener: Rc::new(listener),
            exports: RefCell::new(BTreeMap::new()),
            max_connections,
            connections: Cell::new(0),
            stopped: Cell::new(false),
            all_conns: RefCell::new(Vec::new()),
            on_deleted: RefCell::new(None),
        });
        let weak = Rc::downgrade(&server);
        let listener = Rc::clone(&server.listener);
        let lctx = Rc::clone(ctx);
        ctx.spawn_detached(async move {
            loop {
                // At the limit, stop accepting: further clients wait in the
                // listen backlog until a slot frees, as with QEMU.
                loop {
                    let Some(server) = weak.upgrade() else { return };
                    if server.stopped.get() {
                        return;
                    }
                    if server.max_connections == 0
                        || server.connections.get() < server.max_connections
                    {
                        break;
                    }
                    drop(server);
                    lctx.sleep(std::time::Duration::from_millis(20)).await;
                }
                let stream = match listener.accept(&lctx).await {
                    Ok(s) => s,
                    Err(_) => {
                        // EMFILE and friends: back off instead of spinning.
                        let Some(server) = weak.upgrade() else { return };
                        if server.stopped.get() {
                            return;
                        }
                        lctx.sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(server) = weak.upgrade() else { return };
                if server.stopped.get() {
                    return;
                }
                let Ok(sock) = Socket::new(stream, Rc::clone(&lctx)) else {
                    continue;
                };
                server.connections.set(server.connections.get() + 1);
                let handle = Rc::new(ConnHandle::new(Rc::new(sock)));
                server
                    .all_conns
                    .borrow_mut()
                    .retain(|c| c.strong_count() > 0);
                server.all_conns.borrow_mut().push(Rc::downgrade(&handle));
                let s2 = Rc::clone(&server);
                lctx.spawn_detached(async move {
                    conn::serve(Rc::clone(&s2), handle).await;
                    s2.connections.set(s2.connections.get() - 1);
                    s2.reap_removed();
                });
            }
        });
        Ok(server)
    }

    /// The TCP port bound (useful with port 0).
    pub fn local_port(&self) -> Option<u16> {
        self.listener.local_port()
    }

    /// Called with an export's id when it is finally gone (after its last
    /// client left): the front-end emits BLOCK_EXPORT_DELETED.
    pub fn set_on_deleted(&self, f: DeletedHook) {
        *self.on_deleted.borrow_mut() = Some(f);
    }

    /// Adds an export of a node of `graph`.
    pub fn add_export(&self, graph: &Graph, cfg: ExportConfig) -> Result<Rc<NbdExport>> {
        let node = graph.lookup(&cfg.node_name)?;
        let name = cfg.name.clone().unwrap_or_else(|| cfg.node_name.clone());
        if name.len() > super::proto::MAX_STRING {
            return Err(Error::invalid(format!("export name '{name}' too long")));
        }
        if cfg
            .description
            .as_ref()
            .is_some_and(|d| d.len() > super::proto::MAX_STRING)
        {
            return Err(Error::invalid(format!(
                "description '{}' too long",
                cfg.description.as_deref().unwrap_or_default()
            )));
        }
        if self.exports.borrow().contains_key(&name) {
            return Err(Error::invalid(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        if self.exports.borrow().values().any(|e| e.cfg.id == cfg.id) {
            return Err(Error::invalid(format!(
                "Block export id '{}' is already in use",
                cfg.id
            )));
        }
        if cfg.writable && node.is_read_only() {
            return Err(Error::invalid("Cannot export read-only node as writable"));
        }
        let bitmaps = cfg
            .bitmaps
            .iter()
            .map(|b| find_bitmap(graph, &node, b, cfg.writable))
            .collect::<Result<Vec<_>>>()?;
        let perm = if cfg.writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        };
        // Others may read and write alongside (a guest, a job), but nobody
        // may resize the node under a client that was told its size.
        let shared = Perm::ALL.without(Perm::RESIZE);
        let blk = BlockBackend::new(&cfg.id, &node, perm, shared)?;
        let exp = Rc::new(NbdExport {
            name: name.clone(),
            cfg,
            node,
            blk,
            bitmaps,
            conns: RefCell::new(Vec::new()),
            removed: Cell::new(false),
        });
        for b in &exp.bitmaps {
            b.set_busy(true);
        }
        self.exports.borrow_mut().insert(name, Rc::clone(&exp));
        Ok(exp)
    }

    /// An export by client-visible name (removed exports are invisible).
    pub(crate) fn export_named(&self, name: &str) -> Option<Rc<NbdExport>> {
        self.exports
            .borrow()
            .get(name)
            .filter(|e| !e.is_removed())
            .cloned()
    }

    /// All live exports.
    pub fn exports(&self) -> Vec<Rc<NbdExport>> {
        self.exports
            .borrow()
            .values()
            .filter(|e| !e.is_removed())
            .cloned()
            .collect()
    }

    /// Removes the export with id `id`.
    pub fn remove_export(&self, id: &str, mode: RemoveMode) -> Result<()> {
        let exp = self
            .exports
            .borrow()
            .values()
            .find(|e| e.cfg.id == id && !e.is_removed())
            .cloned()
            .ok_or_else(|| Error::invalid(format!("Export '{id}' is not found")))?;
        if mode == RemoveMode::Safe && exp.connections() > 0 {
            return Err(Error::invalid(format!(
                "export '{id}' still in use\nUse mode='hard' to force client disconnect"
            )));
        }
        exp.removed.set(true);
        for c in exp.conns.borrow().iter().filter_map(|c| c.upgrade()) {
            c.close();
        }
        self.reap_removed();
        Ok(())
    }

    /// Drops removed exports whose clients are gone, announcing each.
    fn reap_removed(&self) {
        let gone: Vec<Rc<NbdExport>> = self
            .exports
            .borrow()
            .values()
            .filter(|e| e.is_removed() && e.connections() == 0)
            .cloned()
            .collect();
        for e in gone {
            self.exports.borrow_mut().remove(&e.name);
            e.blk.detach();
            for b in &e.bitmaps {
                b.set_busy(false);
            }
            if let Some(f) = self.on_deleted.borrow().as_ref() {
                f(&e.cfg.id);
            }
        }
    }

    /// Stops listening, disconnects every client and removes all exports.
    pub fn stop(&self) {
        self.stopped.set(true);
        self.listener.shutdown();
        for c in self.all_conns.borrow().iter().filter_map(|c| c.upgrade()) {
            c.close();
        }
        for e in self.exports() {
            e.removed.set(true);
        }
        self.reap_removed();
    }
}

impl Listener {
    /// Wakes the accept task so the server can stop (the task then drops
    /// the listener, closing it and removing its socket file).
    fn shutdown(&self) {
        // Shutting a listening socket down does not reliably wake a task
        // waiting for it to become readable; a connection always does.
        // Connecting to our own backlog completes without an accept.
        let fd = match self {
            Listener::Unix(l, path, _) => {
                let _ = std::os::unix::net::UnixStream::connect(path);
                std::os::fd::AsRawFd::as_raw_fd(l)
            }
            Listener::Tcp(l) => {
                if let Ok(mut a) = l.local_addr() {
                    if a.ip().is_unspecified() {
                        let lo: std::net::IpAddr = if a.is_ipv4() {
                            std::net::Ipv4Addr::LOCALHOST.into()
                        } else {
                            std::net::Ipv6Addr::LOCALHOST.into()
                        };
                        a.set_ip(lo);
                    }
                    let _ = std::net::TcpStream::connect_timeout(
                        &a,
                        std::time::Duration::from_millis(200),
                    );
                }
                std::os::fd::AsRawFd::as_raw_fd(l)
            }
        };
        // SAFETY: plain syscall on a listening socket we own.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Resolves an export's bitmap as QEMU's `nbd_export_create` does.
fn find_bitmap(
    graph: &Graph,
    node: &Rc<Node>,
    b: &BitmapRef,
    writable: bool,
) -> Result<Rc<DirtyBitmap>> {
    let bm = match &b.node {
        Some(n) => {
            let holder = graph
                .node(n)
                .ok_or_else(|| Error::invalid(format!("Node '{n}' not found")))?;
            holder
                .dirty_bitmap(&b.name)
                .ok_or_else(|| Error::invalid(format!("Dirty bitmap '{}' not found", b.name)))?
        }
        None => {
            let mut layer = Some(Rc::clone(node));
            let mut found = None;
            while let Some(l) = layer {
                if let Some(bm) = l.dirty_bitmap(&b.name) {
                    found = Some((bm, l));
                    break;
                }
                layer = l.backing();
            }
            let (bm, holder) =
                found.ok_or_else(|| Error::invalid(format!("Bitmap '{}' is not found", b.name)))?;
            // Writes that the export cannot see would still change it.
            if !writable && !holder.is_read_only() && bm.is_recording() {
                return Err(Error::invalid(format!(
                    "Enabled bitmap '{}' incompatible with readonly export",
                    b.name
                )));
            }
            bm
        }
    };
    bm.check(block_core::dirty::BitmapUse::Read)?;
    Ok(bm)
}

fn describe(a: &NbdAddr) -> String {
    match a {
        NbdAddr::Unix(p) => p.clone(),
        NbdAddr::Inet { host, port } => format!("{host}:{port}"),
    }
}
