//! Nodes and the edges between them.
//!
//! A [`Node`] is one driver instance with a node-name. Its children are
//! edges with a role (`file`, `backing`, `data`, a filter's child); its
//! parents are [`NodeUser`]s, either a parent node's edge or a
//! BlockBackend, each stating the permissions it takes and shares. Nodes
//! live on one loop thread and are shared as `Rc`; the mutable bits are
//! `Cell`/`RefCell`, touched only from that thread.
//!
//! Permission changes run in two phases so that a refusal changes nothing:
//! [`Node::check_user`] walks the subtree asking every node (and the file
//! driver's image locks) whether the new cumulative permissions are
//! acceptable, then [`Node::apply`] commits them top-down.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::aio::AioContext;
use crate::dirty::DirtyBitmap;
use crate::driver::{BlockDriver, BlockLimits};
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::perm::Perm;
use crate::tracked::Tracked;

/// What a child edge is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildRole {
    /// The file a format driver stores its image (metadata and data) in.
    File,
    /// An external data file.
    Data,
    /// The backing node of a COW format.
    Backing,
    /// The one child of a filter, holding the same content.
    Filtered,
    /// The single child of `raw` (metadata-free storage); same rules as a
    /// filter.
    Primary,
}

impl ChildRole {
    /// The role's name as QEMU shows it in `x-debug-query-block-graph`.
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File | ChildRole::Primary => "file",
            ChildRole::Data => "data-file",
            ChildRole::Backing => "backing",
            ChildRole::Filtered => "file",
        }
    }
}

/// A child edge of a node.
#[derive(Clone)]
pub struct Child {
    /// The edge's name ("file", "backing", ...).
    pub name: String,
    /// Its role.
    pub role: ChildRole,
    /// The child node.
    pub node: Rc<Node>,
    /// The id of this edge in the child's user list.
    pub user_id: u64,
}

/// A user of a node: a parent node's edge or a BlockBackend.
#[derive(Debug, Clone)]
pub struct NodeUser {
    /// Unique id (per node).
    pub id: u64,
    /// Who: a node name or a backend/device name, as used in messages.
    pub who: String,
    /// The role, as shown in permission errors ("root", "file", "backing").
    pub role: String,
    /// Permissions taken.
    pub perm: Perm,
    /// Permissions shared with every other user.
    pub shared: Perm,
}

/// Per-node settings from `blockdev-add` common options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFlags {
    /// Opened read-only.
    pub read_only: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `discard=unmap` (else discards are ignored).
    pub discard_unmap: bool,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`.
    pub cache_no_flush: bool,
}

impl Default for NodeFlags {
    fn default() -> Self {
        NodeFlags {
            read_only: false,
            detect_zeroes: DetectZeroes::Off,
            discard_unmap: false,
            cache_direct: false,
            cache_no_flush: false,
        }
    }
}

/// QEMU's `detect-zeroes` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Write zeros as data.
    Off,
    /// Turn all-zero writes into write_zeroes.
    On,
    /// Like `On`, and allow unmapping when `discard=unmap`.
    Unmap,
}

impl DetectZeroes {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => DetectZeroes::Off,
            "on" => DetectZeroes::On,
            "unmap" => DetectZeroes::Unmap,
            _ => return None,
        })
    }
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// One node of the graph.
pub struct Node {
    name: String,
    auto_named: bool,
    pub(crate) driver: Box<dyn BlockDriver>,
    pub(crate) flags: Cell<NodeFlags>,
    pub(crate) limits: BlockLimits,
    children: RefCell<Vec<Child>>,
    users: RefCell<Vec<NodeUser>>,
    next_user_id: Cell<u64>,
    /// Cumulative permissions currently applied.
    cur_perm: Cell<(Perm, Perm)>,
    pub(crate) tracked: Tracked,
    /// Byte offset past which a write raises BLOCK_WRITE_THRESHOLD (0: off).
    pub(crate) write_threshold: Cell<u64>,
    /// Highest offset written (for `query-blockstats`' wr_highest_offset).
    pub(crate) wr_highest_offset: Cell<u64>,
    /// Dirty bitmaps, newest first (the order QEMU lists them in).
    pub(crate) dirty_bitmaps: RefCell<Vec<Rc<DirtyBitmap>>>,
    pub(crate) ctx: Rc<AioContext>,
    pub(crate) events: EventBus,
}

/// What a driver's open function receives besides its options.
pub struct NodeInit {
    /// Node name (validated or generated by the graph).
    pub name: String,
    /// Whether the name was generated.
    pub auto_named: bool,
    /// Common flags.
    pub flags: NodeFlags,
    /// The loop that will own the node.
    pub ctx: Rc<AioContext>,
    /// Where events go.
    pub events: EventBus,
}

impl Node {
    /// Creates a node around an opened driver, with the children it opened.
    /// Attaches this node as a user of each child, checking permissions.
    pub fn new(
        init: NodeInit,
        driver: Box<dyn BlockDriver>,
        children: Vec<(String, ChildRole, Rc<Node>)>,
    ) -> Result<Rc<Node>> {
        let limits = driver.limits();
        let node = Rc::new(Node {
            name: init.name,
            auto_named: init.auto_named,
            driver,
            flags: Cell::new(init.flags),
            limits,
            children: RefCell::new(Vec::new()),
            users: RefCell::new(Vec::new()),
            next_user_id: Cell::new(1),
            cur_perm: Cell::new((Perm::NONE, Perm::ALL)),
            tracked: Tracked::default(),
            write_threshold: Cell::new(0),
            wr_highest_offset: Cell::new(0),
            dirty_bitmaps: RefCell::new(Vec::new()),
            ctx: init.ctx,
            events: init.events,
        });
        for (name, role, child) in children {
            node.attach_child(&name, role, child)?;
        }
        Ok(node)
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the node-name was generated (`#block...`).
    pub fn is_auto_named(&self) -> bool {
        self.auto_named
    }

    /// The driver.
    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    /// Downcasting is done by drivers through their own handles; this gives
    /// the driver name.
    pub fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// Request limits.
    pub fn limits(&self) -> BlockLimits {
        self.limits
    }

    /// Common flags.
    pub fn flags(&self) -> NodeFlags {
        self.flags.get()
    }

    /// Replaces the common flags (reopen).
    pub fn set_flags(&self, f: NodeFlags) {
        self.flags.set(f)
    }

    /// Whether the node was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.flags.get().read_only
    }

    /// The loop that owns this node.
    pub fn context(&self) -> &Rc<AioContext> {
        &self.ctx
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The child edge with `role`, if any.
    pub fn child(&self, role: ChildRole) -> Option<Rc<Node>> {
        self.children
            .borrow()
            .iter()
            .find(|c| c.role == role)
            .map(|c| Rc::clone(&c.node))
    }

    /// The child named `name`.
    pub fn child_named(&self, name: &str) -> Option<Rc<Node>> {
        self.children
            .borrow()
            .iter()
            .find(|c| c.name == name)
            .map(|c| Rc::clone(&c.node))
    }

    /// All child edges.
    pub fn children(&self) -> Vec<Child> {
        self.children.borrow().clone()
    }

    /// All current users.
    pub fn users(&self) -> Vec<NodeUser> {
        self.users.borrow().clone()
    }

    /// The data-holding child of a filter or the storage child of a format
    /// (for queries walking down to the file).
    pub fn storage_child(&self) -> Option<Rc<Node>> {
        self.child(ChildRole::File)
            .or_else(|| self.child(ChildRole::Primary))
            .or_else(|| self.child(ChildRole::Filtered))
    }

    /// The backing node, if any.
    pub fn backing(&self) -> Option<Rc<Node>> {
        self.child(ChildRole::Backing)
    }

    /// Cumulative (perm, shared) of all users.
    pub fn cumulative_perm(&self) -> (Perm, Perm) {
        self.cur_perm.get()
    }

    /// Host file name of the node or, for formats and filters, of the file
    /// below it.
    pub fn filename(&self) -> String {
        if let Some(f) = self.driver.filename() {
            return f;
        }
        self.storage_child()
            .map(|c| c.filename())
            .unwrap_or_default()
    }

    fn cumulative(users: &[NodeUser]) -> (Perm, Perm) {
        users.iter().fold((Perm::NONE, Perm::ALL), |(p, s), u| {
            (p | u.perm, s & u.shared)
        })
    }

    /// Checks that `user` (new, or replacing the user with the same id) can
    /// coexist with the other users, and that the subtree accepts the
    /// resulting permissions. Changes nothing.
    pub fn check_user(&self, user: &NodeUser) -> Result<()> {
        let users = self.users.borrow();
        for other in users.iter().filter(|u| u.id != user.id) {
            // What the new user takes must be shared by each other user...
            if let Some(p) = user.perm.without(other.shared).first() {
                return Err(Error::PermissionConflict {
                    node: self.name.clone(),
                    user: other.who.clone(),
                    role: other.role.clone(),
                    perm: p.name(),
                });
            }
            // ...and what others take must be shared by the new user.
            if let Some(p) = other.perm.without(user.shared).first() {
                return Err(Error::PermissionConflict {
                    node: self.name.clone(),
                    user: user.who.clone(),
                    role: user.role.clone(),
                    perm: p.name(),
                });
            }
        }
        let mut all: Vec<NodeUser> = users.iter().filter(|u| u.id != user.id).cloned().collect();
        all.push(user.clone());
        drop(users);
        let (perm, shared) = Self::cumulative(&all);
        self.check_subtree(perm, shared)
    }

    fn child_user(&self, c: &Child, perm: Perm, shared: Perm) -> NodeUser {
        let (p, s) = self
            .driver
            .child_perm(c.role, perm, shared, !self.is_read_only());
        NodeUser {
            id: c.user_id,
            who: self.name.clone(),
            role: c.name.clone(),
            perm: p,
            shared: s,
        }
    }

    fn check_subtree(&self, perm: Perm, shared: Perm) -> Result<()> {
        if perm.contains(Perm::WRITE) && self.is_read_only() {
            return Err(Error::ReadOnlyNode {
                node: self.name.clone(),
            });
        }
        for c in self.children.borrow().iter() {
            c.node.check_user(&self.child_user(c, perm, shared))?;
        }
        self.driver.check_perm(perm, shared)
    }

    fn apply_subtree(&self) {
        let (perm, shared) = Self::cumulative(&self.users.borrow());
        self.cur_perm.set((perm, shared));
        for c in self.children.borrow().iter() {
            let u = self.child_user(c, perm, shared);
            c.node.replace_user(u);
        }
        self.driver.set_perm(perm, shared);
    }

    fn replace_user(&self, user: NodeUser) {
        {
            let mut users = self.users.borrow_mut();
            match users.iter_mut().find(|u| u.id == user.id) {
                Some(u) => *u = user,
                None => users.push(user),
            }
        }
        self.apply_subtree();
    }

    /// Adds a user after checking permissions; returns its id.
    pub fn add_user(&self, who: &str, role: &str, perm: Perm, shared: Perm) -> Result<u64> {
        let id = self.next_user_id.get();
        let user = NodeUser {
            id,
            who: who.to_owned(),
            role: role.to_owned(),
            perm,
            shared,
        };
        self.check_user(&user)?;
        self.next_user_id.set(id + 1);
        self.replace_user(user);
        Ok(id)
    }

    /// Changes the permissions of an existing user.
    pub fn update_user(&self, id: u64, perm: Perm, shared: Perm) -> Result<()> {
        let mut user = self
            .users
            .borrow()
            .iter()
            .find(|u| u.id == id)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("no user {id} on node '{}'", self.name)))?;
        user.perm = perm;
        user.shared = shared;
        self.check_user(&user)?;
        self.replace_user(user);
        Ok(())
    }

    /// Removes a user and relaxes permissions below.
    pub fn remove_user(&self, id: u64) {
        self.users.borrow_mut().retain(|u| u.id != id);
        self.apply_subtree();
    }

    /// Adds a child edge (checking permissions on the child).
    pub fn attach_child(&self, name: &str, role: ChildRole, child: Rc<Node>) -> Result<()> {
        let (perm, shared) = Self::cumulative(&self.users.borrow());
        let id = child.next_user_id.get();
        let edge = Child {
            name: name.to_owned(),
            role,
            node: Rc::clone(&child),
            user_id: id,
        };
        let user = self.child_user(&edge, perm, shared);
        child.check_user(&user)?;
        child.next_user_id.set(id + 1);
        child.replace_user(user);
        self.children.borrow_mut().push(edge);
        Ok(())
    }

    /// Removes the child edge named `name`, if present.
    pub fn detach_child(&self, name: &str) -> Option<Rc<Node>> {
        let edge = {
            let mut ch = self.children.borrow_mut();
            let i = ch.iter().position(|c| c.name == name)?;
            ch.remove(i)
        };
        edge.node.remove_user(edge.user_id);
        Some(edge.node)
    }

    /// Detaches every child (used when the node is deleted).
    pub fn detach_all(&self) {
        let names: Vec<String> = self
            .children
            .borrow()
            .iter()
            .map(|c| c.name.clone())
            .collect();
        for n in names {
            self.detach_child(&n);
        }
    }

    /// Whether some user other than the graph's own bookkeeping uses it.
    pub fn has_users(&self) -> bool {
        !self.users.borrow().is_empty()
    }

    /// Attaches a dirty bitmap; fails if the node already has one of that
    /// name or the name is too long (QEMU's checks and texts).
    pub fn add_dirty_bitmap(&self, bitmap: Rc<DirtyBitmap>) -> Result<()> {
        let taken = self.dirty_bitmap(bitmap.name()).is_some();
        crate::dirty::check_new_name(bitmap.name(), taken)?;
        self.dirty_bitmaps.borrow_mut().insert(0, bitmap);
        Ok(())
    }

    /// The dirty bitmap called `name`.
    pub fn dirty_bitmap(&self, name: &str) -> Option<Rc<DirtyBitmap>> {
        self.dirty_bitmaps
            .borrow()
            .iter()
            .find(|b| b.name() == name)
            .cloned()
    }

    /// Removes the dirty bitmap called `name`, and a persistent one from
    /// the image first, as QEMU's `block-dirty-bitmap-remove` does: a
    /// crash afterwards cannot bring it back, and when the image cannot
    /// be updated the bitmap stays on the node.
    pub async fn delete_dirty_bitmap(&self, name: &str) -> Result<Option<Rc<DirtyBitmap>>> {
        let Some(b) = self.dirty_bitmap(name) else {
            return Ok(None);
        };
        if b.is_persistent() {
            self.driver.remove_persistent_bitmap(name).await?;
        }
        Ok(self.remove_dirty_bitmap(name))
    }

    /// Detaches the dirty bitmap called `name` and returns it (the image
    /// drops a persistent one when the node closes).
    pub fn remove_dirty_bitmap(&self, name: &str) -> Option<Rc<DirtyBitmap>> {
        let mut v = self.dirty_bitmaps.borrow_mut();
        let i = v.iter().position(|b| b.name() == name)?;
        Some(v.remove(i))
    }

    /// The node's dirty bitmaps, newest first.
    pub fn dirty_bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        self.dirty_bitmaps.borrow().clone()
    }

    /// Sets the write threshold (0 disables it).
    pub fn set_write_threshold(&self, offset: u64) {
        self.write_threshold.set(offset)
    }

    /// The write threshold (0: disabled).
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.get()
    }

    /// Highest offset written so far.
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest_offset.get()
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.format_name())
            .finish()
    }
}
