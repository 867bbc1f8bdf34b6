//! The io_uring reactor.
//!
//! Owned operations: each in-flight operation has a slot in `ops` that keeps
//! its buffer alive until the kernel posts the completion, whatever happens
//! to the future that started it. A future dropped early marks its slot
//! abandoned; the slot (and the buffer) is freed when the completion arrives.
//! Submissions are queued in the SQ as tasks poll and go to the kernel once
//! per loop turn (`submit_and_wait`), so a burst of requests costs one
//! syscall. A full SQ is flushed on the spot rather than failing.
//!
//! Reads and writes wait in a queue until the turn submits them. Requests
//! to adjacent ranges of one file then go to the kernel as one vectored
//! request (QEMU's virtio-blk merges a guest's adjacent requests the same
//! way). That matters most for buffered writes: the kernel cannot write to
//! the page cache without blocking on most file systems, so io_uring hands
//! each one to a worker that runs a file's buffered writes one after the
//! other; 32 adjacent 4 KiB writes cost one hand-off instead of 32. A merged
//! request that comes back short or failed is reissued member by member, so
//! each caller still gets its own result.
//!
//! Only the loop thread touches the ring (it sits in a `RefCell` of the
//! loop's `AioContext`).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};

use super::poll::PollWindow;
use crate::buf::IoBuf;

/// `user_data` of the eventfd poll that wakes the loop for remote work.
const NOTIFY_TOKEN: u64 = u64::MAX;

/// The longest a loop with nothing ready watches its completion queue
/// before sleeping, by default. The window adapts ([`PollWindow`]) so an
/// idle loop does not spin; the bound is set to cover a local disk's
/// ~100 µs and a client's turnaround at queue depth 1, which QEMU's 32 µs
/// iothread default misses, so each such request cost two wake-ups.
pub(crate) const DEFAULT_POLL_NS: u64 = 200_000;
/// Size of the sparse registered-file table.
const FIXED_FILES: u32 = 1024;
/// Most requests merged into one vectored request (the kernel's UIO_MAXIOV).
const MERGE_MAX_IOVS: usize = 1024;
/// Most bytes merged into one vectored request.
const MERGE_MAX_BYTES: usize = 2 << 20;

enum OpState {
    Waiting(Option<Waker>),
    Done(i32),
    Abandoned,
}

struct OpSlot {
    state: OpState,
    /// Keeps the kernel's target memory alive until completion.
    buf: Option<IoBuf>,
    /// A timeout's timespec, alive until completion.
    ts: Option<Box<types::Timespec>>,
    /// Set on the slot of a merged request: its members and their iovecs.
    merged: Option<Box<MergedRw>>,
}

/// The ring and its in-flight operations.
pub struct Uring {
    ring: RefCell<IoUring>,
    ops: RefCell<Vec<Option<OpSlot>>>,
    free: RefCell<Vec<usize>>,
    in_flight: Cell<usize>,
    notify_armed: Cell<bool>,
    notify_fd: RawFd,
    /// How long to watch the completion queue before sleeping.
    poll: Cell<PollWindow>,
    fixed: RefCell<FixedFiles>,
    /// Reads and writes waiting for the turn's submission.
    queued: RefCell<Vec<QueuedRw>>,
    /// Requests that went to the kernel inside a merged request.
    merged_members: Cell<u64>,
}

struct FixedFiles {
    enabled: bool,
    free: Vec<u32>,
}

/// A file as the reactor addresses it: a plain fd or a registered slot.
#[derive(Debug, Clone, Copy)]
pub struct UringFile {
    fd: RawFd,
    fixed: Option<u32>,
}

impl UringFile {
    fn target(&self) -> UringTarget {
        match self.fixed {
            Some(i) => UringTarget::Fixed(types::Fixed(i)),
            None => UringTarget::Fd(types::Fd(self.fd)),
        }
    }
}

enum UringTarget {
    Fd(types::Fd),
    Fixed(types::Fixed),
}

macro_rules! with_target {
    ($file:expr, |$t:ident| $body:expr) => {
        match $file.target() {
            UringTarget::Fd($t) => $body,
            UringTarget::Fixed($t) => $body,
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RwKind {
    Read,
    Write,
}

/// A read or write waiting for the turn's submission. Its slot already
/// holds the buffer; `ptr` points into it.
#[derive(Clone, Copy)]
struct QueuedRw {
    kind: RwKind,
    file: UringFile,
    offset: u64,
    ptr: *mut u8,
    len: usize,
    rw_flags: i32,
    idx: usize,
    /// Reissued after a merged request failed: goes alone.
    alone: bool,
}

impl QueuedRw {
    /// What requests must share to be merged.
    fn target(&self) -> (RwKind, RawFd, Option<u32>, i32) {
        (self.kind, self.file.fd, self.file.fixed, self.rw_flags)
    }

    /// Sort key: requests that may merge, in file order.
    fn key(&self) -> ((RwKind, RawFd, Option<u32>, i32), u64) {
        (self.target(), self.offset)
    }

    /// Whether `next` continues this run of requests exactly.
    fn continued_by(&self, end: u64, next: &QueuedRw) -> bool {
        !next.alone && next.len > 0 && next.target() == self.target() && next.offset == end
    }

    fn entry(&self) -> squeue::Entry {
        match self.kind {
            RwKind::Read => with_target!(self.file, |t| opcode::Read::new(
                t,
                self.ptr,
                self.len as u32
            )
            .offset(self.offset)
            .rw_flags(self.rw_flags)
            .build()),
            RwKind::Write => with_target!(self.file, |t| opcode::Write::new(
                t,
                self.ptr,
                self.len as u32
            )
            .offset(self.offset)
            .rw_flags(self.rw_flags)
            .build()),
        }
    }
}

/// The members of one merged request, in file order.
struct MergedRw {
    members: Vec<QueuedRw>,
    /// The kernel reads these until the completion: owned by the slot.
    _iovs: Vec<libc::iovec>,
}

impl MergedRw {
    fn total(&self) -> usize {
        self.members.iter().map(|m| m.len).sum()
    }
}

impl Uring {
    /// Sets up a ring with `entries` SQ entries, or fails when the kernel
    /// refuses io_uring (seccomp, sysctl, old kernel): the caller then falls
    /// back to the thread pool.
    pub(crate) fn new(entries: u32, notify_fd: RawFd) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries)?;
        // Probe the opcodes the data path needs, so a kernel that lacks one
        // selects the thread pool at start instead of failing requests later.
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
            opcode::PollAdd::CODE,
            opcode::Timeout::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {code} not supported"),
                ));
            }
        }
        let enabled = ring.submitter().register_files_sparse(FIXED_FILES).is_ok();
        Ok(Uring {
            ring: RefCell::new(ring),
            ops: RefCell::new(Vec::with_capacity(entries as usize)),
            free: RefCell::new(Vec::new()),
            in_flight: Cell::new(0),
            notify_armed: Cell::new(false),
            notify_fd,
            poll: Cell::new(PollWindow::new(DEFAULT_POLL_NS)),
            fixed: RefCell::new(FixedFiles {
                enabled,
                free: (0..FIXED_FILES).rev().collect(),
            }),
            queued: RefCell::new(Vec::new()),
            merged_members: Cell::new(0),
        })
    }

    /// Registers `fd` in the fixed-file table when there is room, which
    /// saves the kernel a file-table lookup per request.
    pub(crate) fn register(&self, fd: RawFd) -> UringFile {
        let mut f = self.fixed.borrow_mut();
        if f.enabled {
            if let Some(slot) = f.free.pop() {
                let ok = self
                    .ring
                    .borrow()
                    .submitter()
                    .register_files_update(slot, &[fd])
                    .is_ok();
                if ok {
                    return UringFile {
                        fd,
                        fixed: Some(slot),
                    };
                }
                f.free.push(slot);
            }
        }
        UringFile { fd, fixed: None }
    }

    /// Points a registered slot at what its descriptor number holds now
    /// (after the description behind it was replaced).
    pub(crate) fn refresh(&self, file: &UringFile) -> std::io::Result<()> {
        if let Some(slot) = file.fixed {
            self.ring
                .borrow()
                .submitter()
                .register_files_update(slot, &[file.fd])?;
        }
        Ok(())
    }

    /// Releases a registered slot; call before closing the fd.
    pub(crate) fn unregister(&self, file: UringFile) {
        if let Some(slot) = file.fixed {
            let _ = self
                .ring
                .borrow()
                .submitter()
                .register_files_update(slot, &[-1]);
            self.fixed.borrow_mut().free.push(slot);
        }
    }

    fn new_slot(&self, buf: Option<IoBuf>, merged: Option<Box<MergedRw>>) -> usize {
        let mut ops = self.ops.borrow_mut();
        let slot = OpSlot {
            state: OpState::Waiting(None),
            buf,
            ts: None,
            merged,
        };
        match self.free.borrow_mut().pop() {
            Some(i) => {
                ops[i] = Some(slot);
                i
            }
            None => {
                ops.push(Some(slot));
                ops.len() - 1
            }
        }
    }

    fn push(self: &Rc<Self>, entry: squeue::Entry, buf: Option<IoBuf>) -> UringOp {
        let idx = self.new_slot(buf, None);
        let entry = entry.user_data(idx as u64);
        self.push_entry(&entry);
        self.in_flight.set(self.in_flight.get() + 1);
        self.op(idx)
    }

    fn op(self: &Rc<Self>, idx: usize) -> UringOp {
        UringOp {
            ring: Rc::clone(self),
            idx,
            finished: false,
        }
    }

    /// Queues a read or write for the turn's submission.
    fn queue_rw(
        self: &Rc<Self>,
        kind: RwKind,
        file: UringFile,
        offset: u64,
        mut buf: IoBuf,
        rw_flags: i32,
    ) -> UringOp {
        // The heap memory behind an IoBuf does not move with the handle.
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        let idx = self.new_slot(Some(buf), None);
        self.queued.borrow_mut().push(QueuedRw {
            kind,
            file,
            offset,
            ptr,
            len,
            rw_flags,
            idx,
            alone: false,
        });
        self.in_flight.set(self.in_flight.get() + 1);
        self.op(idx)
    }

    /// Moves the queued reads and writes into the SQ, merging runs of
    /// adjacent requests to one file into vectored requests.
    fn submit_queued(&self) {
        let mut queued = std::mem::take(&mut *self.queued.borrow_mut());
        if queued.is_empty() {
            return;
        }
        if queued.len() > 1 {
            queued.sort_by_key(QueuedRw::key);
        }
        let mut i = 0;
        while i < queued.len() {
            let first = queued[i];
            let mut end = first.offset + first.len as u64;
            let mut bytes = first.len;
            let mut j = i + 1;
            if !first.alone && first.len > 0 {
                while j < queued.len()
                    && j - i < MERGE_MAX_IOVS
                    && bytes + queued[j].len <= MERGE_MAX_BYTES
                    && first.continued_by(end, &queued[j])
                {
                    end += queued[j].len as u64;
                    bytes += queued[j].len;
                    j += 1;
                }
            }
            if j - i == 1 {
                self.push_entry(&first.entry().user_data(first.idx as u64));
            } else {
                self.push_merged(queued[i..j].to_vec());
            }
            i = j;
        }
        // Keep the allocation for the next turn.
        queued.clear();
        let mut q = self.queued.borrow_mut();
        if q.is_empty() {
            *q = queued;
        }
    }

    fn push_merged(&self, members: Vec<QueuedRw>) {
        let iovs: Vec<libc::iovec> = members
            .iter()
            .map(|m| libc::iovec {
                iov_base: m.ptr.cast(),
                iov_len: m.len,
            })
            .collect();
        let first = members[0];
        let (ptr, n) = (iovs.as_ptr(), iovs.len() as u32);
        self.merged_members
            .set(self.merged_members.get() + members.len() as u64);
        // The iovec array moves into the slot with its Vec: its heap
        // memory, which the kernel reads, stays where it is.
        let idx = self.new_slot(
            None,
            Some(Box::new(MergedRw {
                members,
                _iovs: iovs,
            })),
        );
        let e = match first.kind {
            RwKind::Read => with_target!(first.file, |t| opcode::Readv::new(t, ptr, n)
                .offset(first.offset)
                .rw_flags(first.rw_flags)
                .build()),
            RwKind::Write => with_target!(first.file, |t| opcode::Writev::new(t, ptr, n)
                .offset(first.offset)
                .rw_flags(first.rw_flags)
                .build()),
        };
        self.push_entry(&e.user_data(idx as u64));
    }

    /// How many requests have gone to the kernel inside merged requests.
    pub(crate) fn merged_requests(&self) -> u64 {
        self.merged_members.get()
    }

    fn push_entry(&self, entry: &squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: every buffer an entry points to is owned by its OpSlot
            // (or is the reactor's own eventfd counter), and the slot lives
            // until the completion for that entry has been reaped.
            let pushed = unsafe { ring.submission().push(entry) };
            if pushed.is_ok() {
                return;
            }
            // SQ full: hand what is queued to the kernel to make room.
            if let Err(e) = ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    // The next loop turn retries; spinning here is still
                    // correct because the kernel drains the SQ on submit.
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Starts a read of `buf.len()` bytes at `offset` into `buf`.
    pub(crate) fn read(
        self: &Rc<Self>,
        file: UringFile,
        offset: u64,
        buf: IoBuf,
        rw_flags: i32,
    ) -> UringOp {
        self.queue_rw(RwKind::Read, file, offset, buf, rw_flags)
    }

    /// Starts a write of `buf` at `offset`.
    pub(crate) fn write(
        self: &Rc<Self>,
        file: UringFile,
        offset: u64,
        buf: IoBuf,
        rw_flags: i32,
    ) -> UringOp {
        self.queue_rw(RwKind::Write, file, offset, buf, rw_flags)
    }

    /// Starts an fsync (fdatasync when `datasync`).
    pub(crate) fn fsync(self: &Rc<Self>, file: UringFile, datasync: bool) -> UringOp {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let e = with_target!(file, |t| opcode::Fsync::new(t).flags(flags).build());
        self.push(e, None)
    }

    /// Starts an fallocate(mode, offset, len).
    pub(crate) fn fallocate(
        self: &Rc<Self>,
        file: UringFile,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> UringOp {
        let e = with_target!(file, |t| opcode::Fallocate::new(t, len)
            .offset(offset)
            .mode(mode)
            .build());
        self.push(e, None)
    }

    /// Waits (one-shot) until `fd` has one of `events` (POLLIN, POLLOUT).
    pub(crate) fn poll(self: &Rc<Self>, fd: RawFd, events: i16) -> UringOp {
        let e = opcode::PollAdd::new(types::Fd(fd), events as u16 as u32).build();
        self.push(e, None)
    }

    /// Completes after `dur` (a timer; the result is -ETIME).
    pub(crate) fn sleep(self: &Rc<Self>, dur: std::time::Duration) -> UringOp {
        let ts = Box::new(types::Timespec::from(dur));
        let e = opcode::Timeout::new(&*ts as *const types::Timespec).build();
        let op = self.push(e, None);
        // The kernel reads the timespec at submission (the next loop turn):
        // the op's slot owns it until the completion is reaped.
        self.ops.borrow_mut()[op.idx]
            .as_mut()
            .expect("fresh slot")
            .ts = Some(ts);
        op
    }

    /// Number of operations the kernel still owns.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Submits queued entries and, when `wait` is set, blocks until at least
    /// one completion or a remote wake-up arrives; then reaps completions.
    pub(crate) fn turn(&self, wait: bool) {
        if wait && !self.notify_armed.get() {
            let e = opcode::PollAdd::new(types::Fd(self.notify_fd), libc::POLLIN as u32)
                .build()
                .user_data(NOTIFY_TOKEN);
            self.push_entry(&e);
            self.notify_armed.set(true);
        }
        self.submit_queued();
        let mut want = usize::from(wait);
        let mut poll = self.poll.get();
        // The clock is read only when polling is allowed at all.
        let start = (wait && poll.max_ns() > 0).then(std::time::Instant::now);
        if start.is_some() && self.spin_for_completion(poll.current()) {
            want = 0;
        }
        {
            let ring = self.ring.borrow();
            match ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion queue overflow: reap below, then retry.
                }
                Err(_) => {}
            }
        }
        if let (Some(start), 1) = (start, want) {
            poll.after_sleep(start.elapsed());
            self.poll.set(poll);
        }
        self.reap();
    }

    /// Sets the longest the loop watches for completions before sleeping.
    pub(crate) fn set_poll_ns(&self, ns: u64) {
        let mut poll = self.poll.get();
        poll.set_max_ns(ns);
        self.poll.set(poll);
    }

    /// Submits what is queued, then watches the completion queue for up
    /// to `window` before the caller sleeps in the kernel; returns whether
    /// a completion arrived. A request that comes back (or a client
    /// message that arrives) within that time is served without a sleep
    /// and a scheduler wake-up. QEMU's event loops poll the same way.
    fn spin_for_completion(&self, window: std::time::Duration) -> bool {
        if window.is_zero() {
            return false;
        }
        let mut ring = self.ring.borrow_mut();
        if ring.submit().is_err() {
            return false;
        }
        let end = std::time::Instant::now() + window;
        loop {
            if !ring.completion().is_empty() {
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut ops = self.ops.borrow_mut();
        let mut reissue = Vec::new();
        for cqe in ring.completion() {
            let token = cqe.user_data();
            if token == NOTIFY_TOKEN {
                self.notify_armed.set(false);
                // Reset the eventfd: left readable, every later poll would
                // complete at once and the idle loop would spin.
                let mut v: u64 = 0;
                // SAFETY: reads 8 bytes into a live u64 from our own
                // non-blocking eventfd; EAGAIN (already reset) is fine.
                unsafe {
                    libc::read(
                        self.notify_fd,
                        (&mut v as *mut u64).cast(),
                        std::mem::size_of::<u64>(),
                    )
                };
                continue;
            }
            let idx = token as usize;
            let Some(Some(slot)) = ops.get_mut(idx) else {
                continue;
            };
            if let Some(merged) = slot.merged.take() {
                ops[idx] = None;
                self.free.borrow_mut().push(idx);
                let res = cqe.result();
                if res >= 0 && res as usize == merged.total() {
                    for m in &merged.members {
                        self.complete(&mut ops, m.idx, m.len as i32);
                    }
                } else {
                    // Short or failed: each member goes again on its own
                    // and gets its own result (rewriting what a short write
                    // already wrote is harmless, overlapping requests are
                    // never in flight together).
                    reissue.extend(
                        merged
                            .members
                            .iter()
                            .map(|m| QueuedRw { alone: true, ..*m }),
                    );
                }
                continue;
            }
            self.complete(&mut ops, idx, cqe.result());
        }
        drop(ring);
        drop(ops);
        if !reissue.is_empty() {
            self.queued.borrow_mut().extend(reissue);
        }
    }

    /// Posts `res` to the operation in slot `idx` (which must exist).
    fn complete(&self, ops: &mut [Option<OpSlot>], idx: usize, res: i32) {
        let Some(slot) = ops[idx].as_mut() else {
            return;
        };
        self.in_flight.set(self.in_flight.get() - 1);
        match std::mem::replace(&mut slot.state, OpState::Done(res)) {
            OpState::Waiting(Some(w)) => w.wake(),
            OpState::Waiting(None) => {}
            OpState::Abandoned => {
                ops[idx] = None;
                self.free.borrow_mut().push(idx);
            }
            OpState::Done(_) => {}
        }
    }
}

/// The future of one submitted operation: resolves to the kernel's result
/// (bytes transferred or `-errno`) and the buffer, returned to the caller.
pub(crate) struct UringOp {
    ring: Rc<Uring>,
    idx: usize,
    finished: bool,
}

impl Future for UringOp {
    type Output = (i32, Option<IoBuf>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let idx = self.idx;
        let mut ops = self.ring.ops.borrow_mut();
        let Some(slot) = ops[idx].as_mut() else {
            unreachable!("op slot freed while its future lives");
        };
        match &mut slot.state {
            OpState::Done(res) => {
                let res = *res;
                let buf = slot.buf.take();
                ops[idx] = None;
                drop(ops);
                self.ring.free.borrow_mut().push(idx);
                self.finished = true;
                Poll::Ready((res, buf))
            }
            OpState::Waiting(w) => {
                match w {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            OpState::Abandoned => unreachable!("polled an abandoned op"),
        }
    }
}

impl Drop for UringOp {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut ops = self.ring.ops.borrow_mut();
        if let Some(slot) = ops[self.idx].as_mut() {
            if matches!(slot.state, OpState::Done(_)) {
                ops[self.idx] = None;
                drop(ops);
                self.ring.free.borrow_mut().push(self.idx);
            } else {
                // The kernel still owns the buffer: keep it until reaped.
                slot.state = OpState::Abandoned;
            }
        }
    }
}

/// Converts a CQE result into an `io::Result`.
pub(crate) fn cqe_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}
