//! The metadata table cache (L2 tables and refcount blocks) and the
//! driver's coroutine mutex.
//!
//! Both live on the node's loop thread and are touched only under the
//! driver's [`CoMutex`], so the cache itself does no I/O and needs no
//! locking: the driver looks a table up, loads it on a miss, picks a victim
//! when full and writes it back if dirty, in that order, with the write
//! ordering rules of `mod.rs` (refcount blocks before the L2 tables that
//! need them, L2 tables before refcount blocks that free clusters).
//!
//! Tables are shared as `Rc<RefCell<Vec<u8>>>` (raw big-endian bytes); no
//! borrow is ever held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// One cached table.
pub(crate) type Table = Rc<RefCell<Vec<u8>>>;

struct Slot {
    data: Table,
    dirty: bool,
    used: u64,
}

/// A bounded cache of cluster-sized metadata tables keyed by host offset.
pub(crate) struct TableCache {
    slots: RefCell<HashMap<u64, Slot>>,
    capacity: usize,
    tick: Cell<u64>,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            slots: RefCell::new(HashMap::new()),
            capacity: capacity.max(2),
            tick: Cell::new(0),
        }
    }

    fn bump(&self) -> u64 {
        let t = self.tick.get() + 1;
        self.tick.set(t);
        t
    }

    /// The table at `offset`, if cached.
    pub(crate) fn lookup(&self, offset: u64) -> Option<Table> {
        let t = self.bump();
        let mut s = self.slots.borrow_mut();
        let slot = s.get_mut(&offset)?;
        slot.used = t;
        Some(Rc::clone(&slot.data))
    }

    /// When the cache is full, the least recently used slot's
    /// (offset, data, dirty), to be written back (if dirty) and removed.
    pub(crate) fn victim(&self) -> Option<(u64, Table, bool)> {
        let s = self.slots.borrow();
        if s.len() < self.capacity {
            return None;
        }
        s.iter()
            .min_by_key(|(_, x)| x.used)
            .map(|(o, x)| (*o, Rc::clone(&x.data), x.dirty))
    }

    /// Inserts (or replaces) a table.
    pub(crate) fn insert(&self, offset: u64, data: Table, dirty: bool) {
        let t = self.bump();
        let mut s = self.slots.borrow_mut();
        let e = s.entry(offset).or_insert(Slot {
            data: Rc::clone(&data),
            dirty: false,
            used: t,
        });
        e.data = data;
        e.dirty |= dirty;
        e.used = t;
    }

    /// Drops a table (after it was written back, or when its cluster is freed).
    pub(crate) fn remove(&self, offset: u64) {
        self.slots.borrow_mut().remove(&offset);
    }

    /// Drops every table.
    pub(crate) fn clear(&self) {
        self.slots.borrow_mut().clear();
    }

    /// Marks a cached table dirty.
    pub(crate) fn mark_dirty(&self, offset: u64) {
        if let Some(x) = self.slots.borrow_mut().get_mut(&offset) {
            x.dirty = true;
        }
    }

    /// Marks a cached table clean (after writing it).
    pub(crate) fn mark_clean(&self, offset: u64) {
        if let Some(x) = self.slots.borrow_mut().get_mut(&offset) {
            x.dirty = false;
        }
    }

    /// Dirty tables, in offset order.
    pub(crate) fn dirty(&self) -> Vec<(u64, Table)> {
        let mut v: Vec<(u64, Table)> = self
            .slots
            .borrow()
            .iter()
            .filter(|(_, x)| x.dirty)
            .map(|(o, x)| (*o, Rc::clone(&x.data)))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }
}

/// A mutex for async code on one thread (QEMU's CoMutex): waiters are
/// woken in FIFO order.
#[derive(Default)]
pub(crate) struct CoMutex {
    locked: Cell<bool>,
    waiters: RefCell<std::collections::VecDeque<(u64, Waker)>>,
    next: Cell<u64>,
}

/// Releases the [`CoMutex`] on drop.
pub(crate) struct CoGuard<'a> {
    m: &'a CoMutex,
}

impl CoMutex {
    /// Waits for the mutex.
    pub(crate) async fn lock(&self) -> CoGuard<'_> {
        let id = self.next.get();
        self.next.set(id + 1);
        // Removes our queue entry if the waiting future is dropped.
        struct Unqueue<'a>(&'a CoMutex, u64, bool);
        impl Drop for Unqueue<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0.waiters.borrow_mut().retain(|x| x.0 != self.1);
                    self.0.wake_next();
                }
            }
        }
        let mut uq = Unqueue(self, id, false);
        poll_fn(|cx| {
            let front = self.waiters.borrow().front().map(|x| x.0);
            if !self.locked.get() && front.is_none_or(|f| f == id) {
                self.waiters.borrow_mut().retain(|x| x.0 != id);
                self.locked.set(true);
                return Poll::Ready(());
            }
            let mut w = self.waiters.borrow_mut();
            match w.iter_mut().find(|x| x.0 == id) {
                Some(x) => x.1 = cx.waker().clone(),
                None => w.push_back((id, cx.waker().clone())),
            }
            Poll::Pending
        })
        .await;
        uq.2 = true;
        CoGuard { m: self }
    }

    fn wake_next(&self) {
        if self.locked.get() {
            return;
        }
        let w = self.waiters.borrow().front().map(|x| x.1.clone());
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl Drop for CoGuard<'_> {
    fn drop(&mut self) {
        self.m.locked.set(false);
        self.m.wake_next();
    }
}

/// Host clusters that in-place data writes are using right now, so that a
/// discard or zeroing that frees a cluster waits for them (the write would
/// otherwise land in a cluster that was freed and perhaps reused).
#[derive(Default)]
pub(crate) struct InFlight {
    ranges: RefCell<Vec<(u64, u64, u64)>>,
    waiters: RefCell<Vec<Waker>>,
    next: Cell<u64>,
}

/// Unpins its range when dropped.
pub(crate) struct Pin<'a> {
    set: &'a InFlight,
    id: u64,
}

impl InFlight {
    /// Marks host clusters `[first, last]` as written to.
    pub(crate) fn pin(&self, first: u64, last: u64) -> Pin<'_> {
        let id = self.next.get();
        self.next.set(id + 1);
        self.ranges.borrow_mut().push((id, first, last));
        Pin { set: self, id }
    }

    /// Waits until no in-place write uses host cluster `c`.
    pub(crate) async fn wait_idle(&self, c: u64) {
        self.wait_range_idle(c, c).await
    }

    /// Whether some pin overlaps clusters `[first, last]`.
    pub(crate) fn busy(&self, first: u64, last: u64) -> bool {
        self.ranges
            .borrow()
            .iter()
            .any(|&(_, a, b)| first <= b && a <= last)
    }

    /// Waits until no pin overlaps clusters `[first, last]`.
    pub(crate) async fn wait_range_idle(&self, first: u64, last: u64) {
        poll_fn(|cx| {
            if self.busy(first, last) {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.set.ranges.borrow_mut().retain(|x| x.0 != self.id);
        let w = std::mem::take(&mut *self.set.waiters.borrow_mut());
        for w in w {
            w.wake();
        }
    }
}

/// Fresh host clusters that allocating writes in flight are giving to guest
/// clusters while the rest of the cluster reads as zeros: other writes to
/// such a guest cluster write into it at once instead of queueing behind
/// the allocation.
#[derive(Default)]
pub(crate) struct FreshClusters {
    /// (guest cluster, host offset) pairs; as many as allocating writes in
    /// flight, so a scan is cheap.
    map: RefCell<Vec<(u64, u64)>>,
}

/// Removes its entry when dropped.
pub(crate) struct FreshEntry<'a> {
    set: &'a FreshClusters,
    guest: u64,
}

impl FreshClusters {
    /// Records that guest cluster `guest` is being given host offset `host`.
    pub(crate) fn add(&self, guest: u64, host: u64) -> FreshEntry<'_> {
        self.map.borrow_mut().push((guest, host));
        FreshEntry { set: self, guest }
    }

    /// The host offset guest cluster `guest` is being given, if any.
    pub(crate) fn host_of(&self, guest: u64) -> Option<u64> {
        self.map.borrow().iter().find(|e| e.0 == guest).map(|e| e.1)
    }
}

impl Drop for FreshEntry<'_> {
    fn drop(&mut self) {
        self.set.map.borrow_mut().retain(|e| e.0 != self.guest);
    }
}
