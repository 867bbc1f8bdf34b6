//! The graph: every node of a loop, by name, and how nodes are opened.
//!
//! Opening goes through [`Graph::open`]: the common options every node has
//! (`node-name`, `read-only`, `discard`, `detect-zeroes`, `cache.*`, ...) are
//! taken here, the driver named by `driver` is looked up in the
//! [`DriverRegistry`] and opens itself from the remaining options, opening
//! children through [`Graph::open_child`] (an inline definition or a
//! reference to an existing node by name). Options left over are an error.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use crate::aio::AioContext;
use crate::driver::BlockDriver;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::node::{ChildRole, DetectZeroes, Node, NodeFlags, NodeInit};
use crate::options::{OptValue, Options};

/// What a driver's open function returns: the driver and its children.
pub struct Opened {
    /// The driver instance.
    pub driver: Box<dyn BlockDriver>,
    /// Child edges to attach: (edge name, role, node).
    pub children: Vec<(String, ChildRole, Rc<Node>)>,
}

/// Arguments of a driver's open function.
pub struct OpenArgs<'a> {
    /// The graph, for opening children.
    pub graph: &'a Graph,
    /// The driver's own options (common options already removed).
    pub opts: Options,
    /// Common flags of the node being opened.
    pub flags: NodeFlags,
    /// The name the node will get (for error messages).
    pub node_name: String,
}

/// A driver's open function.
pub type OpenFn = for<'a> fn(OpenArgs<'a>) -> Pin<Box<dyn Future<Output = Result<Opened>> + 'a>>;

/// The drivers a graph can open, by QEMU driver name.
#[derive(Default, Clone)]
pub struct DriverRegistry {
    drivers: BTreeMap<&'static str, OpenFn>,
}

impl DriverRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
    /// Registers `open` under `name`.
    pub fn register(&mut self, name: &'static str, open: OpenFn) {
        self.drivers.insert(name, open);
    }
    /// Driver names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.drivers.keys().copied().collect()
    }
    fn get(&self, name: &str) -> Option<OpenFn> {
        self.drivers.get(name).copied()
    }
}

/// All nodes of one loop, by name.
pub struct Graph {
    ctx: Rc<AioContext>,
    registry: DriverRegistry,
    nodes: RefCell<BTreeMap<String, Rc<Node>>>,
    auto_counter: Cell<u64>,
    events: EventBus,
    /// Nodes opened inline as part of a parent's options: they belong to
    /// the parent and go away with it, named or not, as in QEMU.
    inline: RefCell<BTreeSet<String>>,
}

/// QEMU's rule for user-given ids: a letter first, then letters, digits,
/// `-`, `.` and `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Longest node-name QEMU accepts.
pub const MAX_NODE_NAME: usize = 31;

impl Graph {
    /// An empty graph on `ctx` that opens drivers from `registry`.
    pub fn new(ctx: Rc<AioContext>, registry: DriverRegistry, events: EventBus) -> Self {
        Graph {
            ctx,
            registry,
            nodes: RefCell::new(BTreeMap::new()),
            auto_counter: Cell::new(0),
            events,
            inline: RefCell::new(BTreeSet::new()),
        }
    }

    /// The loop this graph lives on.
    pub fn context(&self) -> &Rc<AioContext> {
        &self.ctx
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The driver registry.
    pub fn registry(&self) -> &DriverRegistry {
        &self.registry
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<Rc<Node>> {
        self.nodes.borrow().get(name).cloned()
    }

    /// A node by name, or QEMU's error.
    pub fn lookup(&self, name: &str) -> Result<Rc<Node>> {
        self.node(name).ok_or_else(|| Error::NotFound {
            what: "Node",
            name: name.to_owned(),
        })
    }

    /// All nodes, sorted by name.
    pub fn nodes(&self) -> Vec<Rc<Node>> {
        self.nodes.borrow().values().cloned().collect()
    }

    fn generate_name(&self) -> String {
        let n = self.auto_counter.get();
        self.auto_counter.set(n + 1);
        // QEMU appends two random digits so that names are not guessable.
        let rnd = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            / 1000)
            % 100;
        format!("#block{n}{rnd:02}")
    }

    fn take_flags(opts: &mut Options, inherit: Option<NodeFlags>) -> Result<NodeFlags> {
        let mut f = inherit.unwrap_or_default();
        if let Some(ro) = opts.take_bool("read-only")? {
            f.read_only = ro;
        }
        // auto-read-only: accepted; Strata opens read-write or fails.
        opts.take_bool("auto-read-only")?;
        opts.take_bool("force-share")?;
        if let Some(d) = opts.take_str("discard")? {
            f.discard_unmap = match d.as_str() {
                "unmap" | "on" => true,
                "ignore" | "off" => false,
                _ => {
                    return Err(Error::invalid(format!(
                        "Parameter 'discard' does not accept value '{d}'"
                    )))
                }
            };
        }
        if let Some(d) = opts.take_str("detect-zeroes")? {
            f.detect_zeroes = DetectZeroes::parse(&d).ok_or_else(|| {
                Error::invalid(format!(
                    "Parameter 'detect-zeroes' does not accept value '{d}'"
                ))
            })?;
        }
        if f.detect_zeroes == DetectZeroes::Unmap && !f.discard_unmap {
            return Err(Error::invalid(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        if let Some(mut cache) = opts.take_map("cache")? {
            if let Some(d) = cache.take_bool("direct")? {
                f.cache_direct = d;
            }
            if let Some(n) = cache.take_bool("no-flush")? {
                f.cache_no_flush = n;
            }
            if let Some(k) = cache.iter().next().map(|(k, _)| k.clone()) {
                return Err(Error::invalid(format!("Invalid parameter 'cache.{k}'")));
            }
        }
        Ok(f)
    }

    /// Opens a node from `opts` and registers it under its name.
    /// A failed open leaves the graph as it was: children it had already
    /// opened inline are closed again.
    pub async fn open(&self, opts: Options) -> Result<Rc<Node>> {
        let before: BTreeSet<String> = self.nodes.borrow().keys().cloned().collect();
        let r = self.open_inner(opts, None).await;
        if r.is_err() {
            self.drop_orphans(&before).await;
        }
        r
    }

    /// Closes nodes that are not in `before` and that nobody uses, until
    /// none is left (closing a node may orphan its own children).
    async fn drop_orphans(&self, before: &BTreeSet<String>) {
        loop {
            let orphans: Vec<Rc<Node>> = self
                .nodes
                .borrow()
                .iter()
                .filter(|(k, n)| !before.contains(*k) && !n.has_users())
                .map(|(_, n)| Rc::clone(n))
                .collect();
            if orphans.is_empty() {
                return;
            }
            for n in orphans {
                // The open already failed with the error that matters; a
                // close error of a half-built child adds nothing.
                let _ = n.driver().close(&n).await;
                self.nodes.borrow_mut().remove(n.name());
                self.inline.borrow_mut().remove(n.name());
                n.detach_all();
            }
        }
    }

    async fn open_inner(&self, mut opts: Options, inherit: Option<NodeFlags>) -> Result<Rc<Node>> {
        let driver = opts
            .take_str("driver")?
            .ok_or_else(|| Error::invalid("Parameter 'driver' is missing"))?;
        let open = self.registry.get(&driver).ok_or_else(|| {
            Error::invalid(format!(
                "Parameter 'driver' does not accept value '{driver}'"
            ))
        })?;
        let (name, auto) = match opts.take_str("node-name")? {
            Some(n) => {
                if n.len() > MAX_NODE_NAME {
                    return Err(Error::invalid("Node name too long"));
                }
                if !id_wellformed(&n) {
                    return Err(Error::invalid("Invalid node-name: '".to_owned() + &n + "'"));
                }
                if self.nodes.borrow().contains_key(&n) {
                    return Err(Error::Duplicate {
                        what: "node",
                        name: n,
                    });
                }
                (n, false)
            }
            None => (self.generate_name(), true),
        };
        let flags = Self::take_flags(&mut opts, inherit)?;
        let opened = open(OpenArgs {
            graph: self,
            opts,
            flags,
            node_name: name.clone(),
        })
        .await?;
        if self.nodes.borrow().contains_key(&name) {
            // A child opened meanwhile took the name.
            return Err(Error::Duplicate { what: "node", name });
        }
        let node = Node::new(
            NodeInit {
                name: name.clone(),
                auto_named: auto,
                flags,
                ctx: Rc::clone(&self.ctx),
                events: self.events.clone(),
            },
            opened.driver,
            opened.children,
        )?;
        // Listed newest first, as QEMU's prepending load leaves them.
        for b in node.driver().take_loaded_bitmaps() {
            node.add_dirty_bitmap(Rc::new(b))?;
        }
        self.nodes.borrow_mut().insert(name, Rc::clone(&node));
        Ok(node)
    }

    /// Opens (inline options) or looks up (a node-name string) the child
    /// given in `opts[key]`. Children inherit the parent's common flags
    /// unless they set their own, except `discard`, which defaults to
    /// `unmap`, and `detect-zeroes`, which defaults to `off` (as in QEMU);
    /// `None` when the key is absent.
    pub async fn open_child(
        &self,
        opts: &mut Options,
        key: &str,
        parent_flags: NodeFlags,
    ) -> Result<Option<Rc<Node>>> {
        match opts.take(key) {
            None | Some(OptValue::Null) => Ok(None),
            Some(OptValue::Str(name)) => self.lookup(&name).map(Some),
            Some(OptValue::Map(child)) => {
                // As QEMU: a child discards when its parent passes a
                // discard down (the parent's driver applies the policy),
                // and zero detection is the parent's alone.
                let flags = NodeFlags {
                    discard_unmap: true,
                    detect_zeroes: DetectZeroes::Off,
                    ..parent_flags
                };
                let node = Box::pin(self.open_inner(child, Some(flags))).await?;
                self.inline.borrow_mut().insert(node.name().to_owned());
                Ok(Some(node))
            }
            Some(_) => Err(Error::invalid(format!(
                "Invalid parameter type for '{key}', expected: BlockdevRef"
            ))),
        }
    }

    /// Removes a node that nobody uses. Children it opened inline (named or
    /// not) go with it when no one else uses them, as in QEMU.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let node = self.lookup(name)?;
        if node.has_users() {
            let u = &node.users()[0];
            return Err(Error::Busy {
                node: name.to_owned(),
                reason: format!("node is used as {} by {}", u.role, u.who),
            });
        }
        node.drain().await;
        node.driver().close(&node).await?;
        self.nodes.borrow_mut().remove(name);
        self.inline.borrow_mut().remove(name);
        let children = node.children();
        node.detach_all();
        for c in children {
            let owned = c.node.is_auto_named() || self.inline.borrow().contains(c.node.name());
            if owned && !c.node.has_users() {
                Box::pin(self.delete(c.node.name())).await?;
            }
        }
        Ok(())
    }

    /// Flushes and closes every node (shutdown).
    pub async fn close_all(&self) -> Result<()> {
        let mut first_err = None;
        loop {
            let roots: Vec<Rc<Node>> = self
                .nodes()
                .into_iter()
                .filter(|n| !n.has_users())
                .collect();
            if roots.is_empty() {
                break;
            }
            for n in roots {
                if let Err(e) = n.flush().await {
                    first_err.get_or_insert(e);
                }
                if let Err(e) = self.delete(n.name()).await {
                    first_err.get_or_insert(e);
                    self.nodes.borrow_mut().remove(n.name());
                    n.detach_all();
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wellformed_ids() {
        assert!(id_wellformed("disk0"));
        assert!(id_wellformed("a-b.c_d"));
        assert!(!id_wellformed("0disk"));
        assert!(!id_wellformed("#block1"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("a b"));
    }
}
