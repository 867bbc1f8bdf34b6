//! I/O accounting of a BlockBackend (what `query-blockstats` reports).
//!
//! Counters are plain `Cell`s: a backend is used from its loop thread only.
//! Latencies are measured from request start to completion with a monotonic
//! clock, failed and invalid requests are counted apart, as QEMU does.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The kind of request being accounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read.
    Read,
    /// Write (including write_zeroes).
    Write,
    /// Flush.
    Flush,
    /// Discard.
    Unmap,
}

/// Counters for one kind of request.
#[derive(Debug, Default, Clone)]
pub struct KindStats {
    /// Bytes transferred.
    pub bytes: u64,
    /// Successful operations.
    pub ops: u64,
    /// Failed operations.
    pub failed: u64,
    /// Invalid (rejected before reaching the node) operations.
    pub invalid: u64,
    /// Sum of latencies of successful operations, ns.
    pub total_time_ns: u64,
    /// Operations merged with others (Strata does not merge: always 0).
    pub merged: u64,
}

/// Accounting of one backend.
#[derive(Debug)]
pub struct BlockAcct {
    kinds: [Cell<KindStatsCell>; 4],
    last_io: Cell<Option<Instant>>,
    /// Whether invalid requests are accounted (`account-invalid`).
    pub account_invalid: Cell<bool>,
    /// Whether failed requests are accounted (`account-failed`).
    pub account_failed: Cell<bool>,
}

#[derive(Debug, Default, Clone, Copy)]
struct KindStatsCell {
    bytes: u64,
    ops: u64,
    failed: u64,
    invalid: u64,
    total_time_ns: u64,
}

impl Default for BlockAcct {
    fn default() -> Self {
        BlockAcct {
            kinds: Default::default(),
            last_io: Cell::new(None),
            account_invalid: Cell::new(true),
            account_failed: Cell::new(true),
        }
    }
}

fn idx(k: IoKind) -> usize {
    match k {
        IoKind::Read => 0,
        IoKind::Write => 1,
        IoKind::Flush => 2,
        IoKind::Unmap => 3,
    }
}

/// An accounting cookie for one request in flight.
#[derive(Debug)]
pub struct AcctCookie {
    kind: IoKind,
    bytes: u64,
    start: Instant,
}

impl BlockAcct {
    /// Starts accounting a request.
    pub fn start(&self, kind: IoKind, bytes: u64) -> AcctCookie {
        AcctCookie {
            kind,
            bytes,
            start: Instant::now(),
        }
    }

    /// Accounts a completed request.
    pub fn done(&self, c: AcctCookie) {
        let now = Instant::now();
        let cell = &self.kinds[idx(c.kind)];
        let mut s = cell.get();
        s.bytes += c.bytes;
        s.ops += 1;
        s.total_time_ns += now.duration_since(c.start).as_nanos() as u64;
        cell.set(s);
        self.last_io.set(Some(now));
    }

    /// Accounts a failed request.
    pub fn failed(&self, c: AcctCookie) {
        let cell = &self.kinds[idx(c.kind)];
        let mut s = cell.get();
        s.failed += 1;
        if self.account_failed.get() {
            s.total_time_ns += c.start.elapsed().as_nanos() as u64;
        }
        cell.set(s);
        self.last_io.set(Some(Instant::now()));
    }

    /// Accounts a request rejected before it started.
    pub fn invalid(&self, kind: IoKind) {
        let cell = &self.kinds[idx(kind)];
        let mut s = cell.get();
        s.invalid += 1;
        cell.set(s);
        self.last_io.set(Some(Instant::now()));
    }

    /// A snapshot of one kind's counters.
    pub fn stats(&self, kind: IoKind) -> KindStats {
        let s = self.kinds[idx(kind)].get();
        KindStats {
            bytes: s.bytes,
            ops: s.ops,
            failed: s.failed,
            invalid: s.invalid,
            total_time_ns: s.total_time_ns,
            merged: 0,
        }
    }

    /// Time since the last request completed; `None` before the first.
    pub fn idle_time(&self) -> Option<Duration> {
        self.last_io.get().map(|t| t.elapsed())
    }
}
