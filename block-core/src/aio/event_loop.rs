//! The event loop (QEMU's AioContext): one thread, one executor, one engine.
//!
//! Everything a loop owns (its nodes, their metadata caches, the ring) is
//! touched only from its thread, so none of it needs a lock. Other threads
//! reach the loop through a [`LoopHandle`]: they queue a closure and kick the
//! loop's eventfd; the closure runs on the loop as a task and its result
//! travels back through a [`RemoteFuture`] that can be awaited from any
//! executor or waited on synchronously.

use std::cell::Cell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use super::engine::{AioMode, Engine, EngineFile};
use super::executor::{Executor, JoinHandle};
use super::notify::Notifier;
use super::pool::{PoolFuture, WorkerPool};
use super::uring::Uring;
use crate::buf::IoBuf;
use crate::error::{Error, Result};

/// Submission queue depth of each loop's ring.
const RING_ENTRIES: u32 = 256;

type RemoteJob = Box<dyn FnOnce(&Rc<AioContext>) + Send>;

struct Remote {
    jobs: Mutex<Vec<RemoteJob>>,
    notifier: Arc<Notifier>,
    stopped: AtomicBool,
}

/// What runs on a loop thread: the executor, the I/O engine, and the worker
/// pool for blocking or CPU-heavy work. Shared as `Rc` on that thread.
pub struct AioContext {
    exec: Executor,
    engine: Engine,
    pool: WorkerPool,
    remote: Arc<Remote>,
    notifier: Arc<Notifier>,
    stop: Cell<bool>,
    /// What `set_poll_ns` asked for (the thread pool keeps it unused).
    poll_ns: Cell<u64>,
}

impl AioContext {
    /// Spawns a task on this loop.
    pub fn spawn<F: Future + 'static>(&self, fut: F) -> JoinHandle<F::Output> {
        self.exec.spawn(fut)
    }

    /// Spawns a task whose result nobody awaits.
    pub fn spawn_detached(&self, fut: impl Future<Output = ()> + 'static) {
        self.exec.spawn_detached(fut)
    }

    /// Sets the longest the loop watches for completions (nanoseconds)
    /// before it sleeps in the kernel; 0 never polls. Polling trades some
    /// CPU for latency: a completion or a client message that arrives
    /// within that time is handled without a sleep and a wake-up. The
    /// window adapts below this bound ([`PollWindow`](super::PollWindow)),
    /// so an idle loop does not spin. The thread-pool engine does not poll.
    pub fn set_poll_ns(&self, ns: u64) {
        self.poll_ns.set(ns);
        if let Engine::Uring(r) = &self.engine {
            r.set_poll_ns(ns);
        }
    }

    /// The polling time set last (QEMU's `poll-max-ns`).
    pub fn poll_ns(&self) -> u64 {
        self.poll_ns.get()
    }

    /// How many reads and writes have gone to the kernel merged with
    /// adjacent ones into a vectored request (io_uring only; the thread
    /// pool issues each on its own).
    pub fn merged_requests(&self) -> u64 {
        match &self.engine {
            Engine::Uring(r) => r.merged_requests(),
            Engine::Threads(_) => 0,
        }
    }

    /// The engine's name: "io_uring" or "threads".
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Registers an opened host file with the engine.
    pub fn open_file(&self, fd: std::os::fd::OwnedFd) -> EngineFile {
        self.engine.open_file(fd)
    }

    /// Reads up to `buf.len()` bytes; may return short.
    pub async fn read(
        &self,
        f: &EngineFile,
        offset: u64,
        buf: IoBuf,
        rw_flags: i32,
    ) -> (std::io::Result<usize>, IoBuf) {
        self.engine.read(f, offset, buf, rw_flags).await
    }

    /// Writes up to `buf.len()` bytes; may return short.
    pub async fn write(
        &self,
        f: &EngineFile,
        offset: u64,
        buf: IoBuf,
        rw_flags: i32,
    ) -> (std::io::Result<usize>, IoBuf) {
        self.engine.write(f, offset, buf, rw_flags).await
    }

    /// fsync, or fdatasync when `datasync`.
    pub async fn fsync(&self, f: &EngineFile, datasync: bool) -> std::io::Result<()> {
        self.engine.fsync(f, datasync).await
    }

    /// fallocate(2).
    pub async fn fallocate(
        &self,
        f: &EngineFile,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        self.engine.fallocate(f, mode, offset, len).await
    }

    /// Runs a blocking syscall that has no asynchronous form.
    pub async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.engine.blocking(f).await
    }

    /// Waits until `fd` is readable (sockets, pipes).
    pub async fn readable(&self, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        self.engine.poll_fd(fd, libc::POLLIN).await
    }

    /// Waits until `fd` is writable (sockets, pipes).
    pub async fn writable(&self, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        self.engine.poll_fd(fd, libc::POLLOUT).await
    }

    /// Completes after `dur` without blocking the loop.
    pub async fn sleep(&self, dur: std::time::Duration) {
        self.engine.sleep(dur).await
    }

    /// Runs CPU-heavy work (compression, hashing) on the worker pool.
    pub fn run_on_worker<T, F>(&self, f: F) -> PoolFuture<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.pool.run(f)
    }

    /// The worker pool itself, for components that keep a handle.
    pub fn worker_pool(&self) -> &WorkerPool {
        &self.pool
    }

    /// A handle other threads use to send work here.
    pub fn handle(&self) -> LoopHandle {
        LoopHandle {
            remote: Arc::clone(&self.remote),
        }
    }

    /// Asks [`EventLoop::run`] to return after the current turn.
    pub fn stop(&self) {
        self.stop.set(true);
    }

    fn take_remote(self: &Rc<Self>) {
        let jobs = std::mem::take(&mut *self.remote.jobs.lock().unwrap_or_else(|e| e.into_inner()));
        for job in jobs {
            job(self);
        }
    }

    /// One loop turn: run remote jobs and ready tasks, then submit I/O and,
    /// if nothing is ready, sleep until a completion or a wake-up.
    fn turn(self: &Rc<Self>, may_block: bool) {
        self.take_remote();
        self.exec.run_ready();
        self.engine_turn(may_block && !self.stop.get(), || {
            self.exec.has_ready() || self.has_remote()
        });
    }

    /// Submits and reaps I/O; with `may_sleep`, sleeps until a completion
    /// or a wake-up unless `pending` reports work. `pending` is asked again
    /// after other threads are told the loop may sleep: work they queued
    /// before that did not write the eventfd.
    fn engine_turn(&self, may_sleep: bool, pending: impl Fn() -> bool) {
        let sleep = may_sleep && !pending() && {
            self.notifier.prepare_sleep();
            !pending()
        };
        match &self.engine {
            Engine::Uring(ring) => ring.turn(sleep),
            Engine::Threads(_) => {
                if sleep {
                    self.notifier.wait(-1);
                }
            }
        }
        self.notifier.end_sleep();
    }

    /// Runs the loop until `fut` completes and returns its output. Other
    /// tasks make progress meanwhile. For synchronous callers on the loop
    /// thread (tools, tests); never call it from inside a task, where it
    /// would re-enter the executor.
    pub fn block_on<F: Future>(self: &Rc<Self>, fut: F) -> F::Output {
        let woken = Arc::new(AtomicBool::new(true));
        let waker = Waker::from(Arc::new(FlagWaker {
            flag: Arc::clone(&woken),
            notifier: Arc::clone(&self.notifier),
        }));
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        loop {
            if woken.swap(false, Ordering::AcqRel) {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return v;
                }
            }
            self.take_remote();
            self.exec.run_ready();
            // A woken future still gets its I/O submitted, without a sleep.
            self.engine_turn(true, || {
                self.exec.has_ready() || self.has_remote() || woken.load(Ordering::Acquire)
            });
        }
    }

    fn has_remote(&self) -> bool {
        !self
            .remote
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// An event loop owned by the current thread.
pub struct EventLoop {
    ctx: Rc<AioContext>,
}

impl EventLoop {
    /// Creates a loop on the current thread with the given engine.
    pub fn new(mode: AioMode) -> Result<Self> {
        Self::with_pool(mode, WorkerPool::new(64))
    }

    /// Creates a loop that shares an existing worker pool.
    pub fn with_pool(mode: AioMode, pool: WorkerPool) -> Result<Self> {
        let notifier =
            Arc::new(Notifier::new().map_err(|e| Error::io("", "creating the loop's eventfd", e))?);
        let engine = match mode {
            AioMode::Threads => Engine::Threads(pool.clone()),
            AioMode::IoUring | AioMode::Auto => match Uring::new(RING_ENTRIES, notifier.raw_fd()) {
                Ok(r) => Engine::Uring(Rc::new(r)),
                Err(e) if mode == AioMode::IoUring => {
                    return Err(Error::io("", "setting up io_uring", e));
                }
                Err(_) => Engine::Threads(pool.clone()),
            },
        };
        let remote = Arc::new(Remote {
            jobs: Mutex::new(Vec::new()),
            notifier: Arc::clone(&notifier),
            stopped: AtomicBool::new(false),
        });
        Ok(EventLoop {
            ctx: Rc::new(AioContext {
                exec: Executor::new(Arc::clone(&notifier)),
                engine,
                pool,
                remote,
                notifier,
                stop: Cell::new(false),
                poll_ns: Cell::new(super::uring::DEFAULT_POLL_NS),
            }),
        })
    }

    /// The loop's context, to give to drivers and tasks.
    pub fn context(&self) -> &Rc<AioContext> {
        &self.ctx
    }

    /// Runs the loop until `fut` completes and returns its output. Other
    /// tasks make progress meanwhile.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.ctx.block_on(fut)
    }

    /// Runs the loop until [`AioContext::stop`] is called.
    pub fn run(&self) {
        self.ctx.stop.set(false);
        while !self.ctx.stop.get() {
            self.ctx.turn(true);
        }
    }

    /// Starts a loop on a new thread and returns a handle to it. The loop
    /// runs until [`LoopHandle::stop`].
    pub fn spawn_thread(name: &str, mode: AioMode) -> Result<LoopHandle> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || match EventLoop::new(mode) {
                Ok(el) => {
                    let _ = tx.send(Ok(el.ctx.handle()));
                    el.run();
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| Error::io("", "starting a loop thread", e))?;
        rx.recv().map_err(|_| Error::LoopStopped)?
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.ctx.remote.stopped.store(true, Ordering::Release);
        // Buffers of in-flight io_uring operations belong to the kernel until
        // completion: drain before the tasks that own them go away.
        if let Engine::Uring(ring) = &self.ctx.engine {
            while ring.in_flight() > 0 {
                ring.turn(true);
            }
        }
        self.ctx.exec.clear();
        // Fail remote jobs that will never run (their senders see LoopStopped).
        self.ctx
            .remote
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

struct FlagWaker {
    flag: Arc<AtomicBool>,
    notifier: Arc<Notifier>,
}

impl std::task::Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            self.notifier.notify();
        }
    }
}

/// A `Send` handle to a loop, for other threads (a VMM's vCPU threads, QMP
/// monitor threads).
#[derive(Clone)]
pub struct LoopHandle {
    remote: Arc<Remote>,
}

impl LoopHandle {
    /// Runs `f` on the loop thread and returns a future of its result.
    /// `f` receives the loop's context and returns a (non-`Send`) future.
    pub fn submit<T, F, Fut>(&self, f: F) -> RemoteFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(Rc<AioContext>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let slot = Arc::new(RemoteSlot {
            state: Mutex::new(RemoteState {
                value: None,
                waker: None,
                dropped: false,
            }),
            cv: Condvar::new(),
        });
        let done = Completer(Some(Arc::clone(&slot)));
        let job: RemoteJob = Box::new(move |ctx: &Rc<AioContext>| {
            let fut = f(Rc::clone(ctx));
            ctx.spawn_detached(async move {
                let v = fut.await;
                done.finish(v);
            });
        });
        if self.remote.stopped.load(Ordering::Acquire) {
            slot.complete(Err(Error::LoopStopped));
        } else {
            self.remote
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(job);
            self.remote.notifier.notify();
        }
        RemoteFuture { slot }
    }

    /// Stops the loop after its current turn.
    pub fn stop(&self) {
        drop(self.submit(|ctx| async move { ctx.stop() }));
    }
}

struct RemoteState<T> {
    value: Option<Result<T>>,
    waker: Option<Waker>,
    dropped: bool,
}

struct RemoteSlot<T> {
    state: Mutex<RemoteState<T>>,
    cv: Condvar,
}

impl<T> RemoteSlot<T> {
    fn complete(&self, v: Result<T>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.dropped {
            return;
        }
        s.value = Some(v);
        let w = s.waker.take();
        drop(s);
        self.cv.notify_all();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// Completes a remote job's slot; if the job is dropped unrun (the loop
/// stopped), the waiter gets [`Error::LoopStopped`] instead of hanging.
struct Completer<T>(Option<Arc<RemoteSlot<T>>>);

impl<T> Completer<T> {
    fn finish(mut self, v: T) {
        if let Some(s) = self.0.take() {
            s.complete(Ok(v));
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.complete(Err(Error::LoopStopped));
        }
    }
}

/// The result of work sent to a loop with [`LoopHandle::submit`].
pub struct RemoteFuture<T> {
    slot: Arc<RemoteSlot<T>>,
}

impl<T> RemoteFuture<T> {
    /// Blocks the calling thread until the result is there. Must not be
    /// called on the loop thread itself (it would wait for itself).
    pub fn wait(self) -> Result<T> {
        let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = s.value.take() {
                return v;
            }
            s = self.slot.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl<T> Future for RemoteFuture<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut s = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for RemoteFuture<T> {
    fn drop(&mut self) {
        self.slot
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dropped = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_cpu() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: fills a live timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn temp_file(name: &str, len: u64) -> (std::path::PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!("strata-{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(len).unwrap();
        (path, f)
    }

    /// Other threads write the eventfd only while the loop may sleep; and,
    /// as a smoke test of the hand-over (the race window is too narrow to
    /// hit on purpose), remote jobs and worker-pool results handed to a
    /// loop that keeps going to sleep all arrive.
    #[test]
    fn remote_work_reaches_a_sleeping_loop_without_lost_wakeups() {
        let n = Notifier::new().unwrap();
        n.notify();
        let mut pfd = libc::pollfd {
            fd: n.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        let ready = |p: &mut libc::pollfd| unsafe { libc::poll(p, 1, 0) } == 1;
        assert!(!ready(&mut pfd), "a running loop is not written to");
        n.prepare_sleep();
        n.notify();
        assert!(ready(&mut pfd), "a loop that may sleep is woken");
        n.drain();
        n.end_sleep();

        for mode in [AioMode::Threads, AioMode::IoUring] {
            let h = EventLoop::spawn_thread("wake-test", mode).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let worker = std::thread::spawn(move || {
                let mut sum = 0u64;
                for i in 0..5000u64 {
                    // Each round trip lets the loop go back to sleep, and
                    // half of them also hand work to the pool and back.
                    sum += h
                        .submit(move |ctx| async move {
                            if i % 2 == 0 {
                                ctx.run_on_worker(move || i).await
                            } else {
                                i
                            }
                        })
                        .wait()
                        .unwrap();
                }
                h.stop();
                let _ = tx.send(sum);
            });
            let sum = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a wake-up was lost: the loop never answered");
            assert_eq!(sum, 5000 * 4999 / 2, "{mode:?}");
            worker.join().unwrap();
        }
    }

    /// Adjacent reads and writes started in one turn go out as vectored
    /// requests, and every caller gets its own length and data back.
    #[test]
    fn adjacent_requests_in_one_turn_are_merged() {
        const N: usize = 64;
        const BS: usize = 4096;
        let (path, f) = temp_file("merge", (N * BS) as u64);
        let el = EventLoop::new(AioMode::IoUring).unwrap();
        let ctx = Rc::clone(el.context());
        let file = Rc::new(ctx.open_file(f.into()));
        let writes: Vec<_> = (0..N)
            .map(|i| {
                let (ctx, file) = (Rc::clone(&ctx), Rc::clone(&file));
                ctx.clone().spawn(async move {
                    let buf = IoBuf::filled(BS, i as u8 + 1);
                    ctx.write(&file, (i * BS) as u64, buf, 0).await.0
                })
            })
            .collect();
        for (i, h) in writes.into_iter().enumerate() {
            assert_eq!(el.block_on(h).unwrap(), BS, "write {i}");
        }
        let after_writes = ctx.merged_requests();
        assert!(
            after_writes >= N as u64 / 2,
            "merged {after_writes} of {N} writes"
        );
        let data = std::fs::read(&path).unwrap();
        for i in 0..N {
            assert!(
                data[i * BS..(i + 1) * BS].iter().all(|&b| b == i as u8 + 1),
                "block {i}"
            );
        }

        let reads: Vec<_> = (0..N)
            .map(|i| {
                let (ctx, file) = (Rc::clone(&ctx), Rc::clone(&file));
                ctx.clone().spawn(async move {
                    let (r, buf) = ctx.read(&file, (i * BS) as u64, IoBuf::zeroed(BS), 0).await;
                    (r.unwrap(), buf)
                })
            })
            .collect();
        for (i, h) in reads.into_iter().enumerate() {
            let (n, buf) = el.block_on(h);
            assert_eq!(n, BS, "read {i}");
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "read {i} data");
        }
        assert!(ctx.merged_requests() >= after_writes + N as u64 / 2);
        std::fs::remove_file(path).unwrap();
    }

    /// A merged request that comes back short (here: reads across the end
    /// of the file) is reissued request by request, so each sees its own
    /// short result rather than the merged one.
    #[test]
    fn short_merged_request_gives_each_member_its_own_result() {
        let (path, f) = temp_file("merge-short", 6144);
        let el = EventLoop::new(AioMode::IoUring).unwrap();
        let ctx = Rc::clone(el.context());
        let file = Rc::new(ctx.open_file(f.into()));
        let reads: Vec<_> = (0..4u64)
            .map(|i| {
                let (ctx, file) = (Rc::clone(&ctx), Rc::clone(&file));
                ctx.clone().spawn(async move {
                    ctx.read(&file, i * 4096, IoBuf::zeroed(4096), 0)
                        .await
                        .0
                        .unwrap()
                })
            })
            .collect();
        let got: Vec<usize> = reads.into_iter().map(|h| el.block_on(h)).collect();
        assert_eq!(got, [4096, 2048, 0, 0]);
        assert!(ctx.merged_requests() >= 2);

        // A failed merged write fails each member with the same error.
        let ro = std::fs::File::open(&path).unwrap();
        let ro = Rc::new(ctx.open_file(ro.into()));
        let writes: Vec<_> = (0..4u64)
            .map(|i| {
                let (ctx, file) = (Rc::clone(&ctx), Rc::clone(&ro));
                ctx.clone().spawn(async move {
                    ctx.write(&file, i * 4096, IoBuf::zeroed(4096), 0).await.0
                })
            })
            .collect();
        for h in writes {
            let e = el.block_on(h).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        }
        std::fs::remove_file(path).unwrap();
    }

    /// Regression: after a wake-up from another thread the io_uring loop
    /// left its eventfd readable and spun at full CPU while idle.
    #[test]
    fn idle_loop_sleeps_after_a_remote_wake() {
        for mode in [AioMode::IoUring, AioMode::Threads] {
            let el = EventLoop::new(mode).unwrap();
            let h = el.context().handle();
            let t = std::thread::spawn(move || h.submit(|_ctx| async { 7 }));
            let remote = t.join().unwrap();
            assert_eq!(el.block_on(remote).unwrap(), 7);
            let before = thread_cpu();
            el.block_on(el.context().sleep(std::time::Duration::from_millis(300)));
            let used = thread_cpu() - before;
            assert!(
                used < std::time::Duration::from_millis(100),
                "{mode:?}: idle loop used {used:?} of CPU in 300 ms"
            );
        }
    }
    /// A file opened read-only takes writes once a read-write description
    /// is put behind its descriptor, on io_uring (registered slot) and on
    /// the thread pool; writes before that fail with EBADF.
    #[test]
    fn replaced_description_takes_writes() {
        for mode in [AioMode::IoUring, AioMode::Threads] {
            let (path, rw) = temp_file(&format!("reopen-{mode:?}"), 8192);
            drop(rw);
            let ro = std::fs::File::open(&path).unwrap();
            let el = EventLoop::new(mode).unwrap();
            let ctx = Rc::clone(el.context());
            let file = ctx.open_file(ro.into());
            let (r, _) = el.block_on(ctx.write(&file, 0, IoBuf::filled(4096, 7), 0));
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF), "{mode:?}");
            let rw = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            file.replace_description(rw.into()).unwrap();
            let (r, _) = el.block_on(ctx.write(&file, 4096, IoBuf::filled(4096, 7), 0));
            assert_eq!(r.unwrap(), 4096, "{mode:?}");
            let (r, buf) = el.block_on(ctx.read(&file, 4096, IoBuf::zeroed(4096), 0));
            assert_eq!(r.unwrap(), 4096);
            assert!(buf.iter().all(|&b| b == 7), "{mode:?}");
            drop(file);
            let data = std::fs::read(&path).unwrap();
            assert!(data[..4096].iter().all(|&b| b == 0) && data[4096..].iter().all(|&b| b == 7));
            std::fs::remove_file(path).unwrap();
        }
    }
}
