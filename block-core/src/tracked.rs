//! Tracked requests: the in-flight set of a node, and serialisation.
//!
//! Every request on a node registers its byte range here while it runs. A
//! serialising request (a read-modify-write of an unaligned write, or a
//! caller that asks for exclusive access to a range) waits until no
//! overlapping request is in flight, and every request waits for overlapping
//! serialising ones that started before it. This is what keeps the two
//! halves of a read-modify-write from interleaving with another write to
//! the same block.

use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

#[derive(Debug)]
struct Req {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

/// The tracked requests of one node.
#[derive(Default)]
pub(crate) struct Tracked {
    inner: RefCell<TrackedInner>,
}

#[derive(Default)]
struct TrackedInner {
    next_id: u64,
    reqs: Vec<Req>,
    waiters: Vec<Waker>,
}

/// Removes the request from the set when dropped, waking waiters.
pub(crate) struct TrackedGuard<'a> {
    tracked: &'a Tracked,
    id: u64,
}

impl Drop for TrackedGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.tracked.inner.borrow_mut();
        t.reqs.retain(|r| r.id != self.id);
        let w = std::mem::take(&mut t.waiters);
        drop(t);
        for w in w {
            w.wake();
        }
    }
}

impl Tracked {
    /// Registers `[start, end)` and waits until it may proceed.
    pub(crate) async fn begin(&self, start: u64, end: u64, serialising: bool) -> TrackedGuard<'_> {
        let id = {
            let mut t = self.inner.borrow_mut();
            let id = t.next_id;
            t.next_id += 1;
            t.reqs.push(Req {
                id,
                start,
                end,
                serialising,
            });
            id
        };
        let guard = TrackedGuard { tracked: self, id };
        poll_fn(|cx| {
            let mut t = self.inner.borrow_mut();
            let blocked = t.reqs.iter().any(|r| {
                r.id < id && r.start < end && start < r.end && (serialising || r.serialising)
            });
            if blocked {
                t.waiters.push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        guard
    }

    /// Number of requests in flight (for drain).
    pub(crate) fn in_flight(&self) -> usize {
        self.inner.borrow().reqs.len()
    }

    /// Waits until no request is in flight.
    pub(crate) async fn drain(&self) {
        poll_fn(|cx| {
            let mut t = self.inner.borrow_mut();
            if t.reqs.is_empty() {
                Poll::Ready(())
            } else {
                t.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
