//! A pool of worker threads for blocking and CPU-heavy work.
//!
//! Two users: the thread-pool I/O engine (QEMU's `aio=threads`), which runs
//! `pread`/`pwrite`/`fsync`/`fallocate` here, and CPU-heavy work such as
//! compression, which must never block the loop thread. Threads are started
//! on demand up to `max_threads` (64, like QEMU's pool) and exit after being
//! idle for a while. Results come back through a future whose waker may be
//! called from the worker thread.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

struct Shared {
    state: Mutex<PoolState>,
    cv: Condvar,
    max_threads: usize,
}

struct PoolState {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    shutdown: bool,
}

/// A handle on the pool; clones share the same threads.
#[derive(Clone)]
pub struct WorkerPool {
    shared: Arc<Shared>,
}

impl WorkerPool {
    /// A pool that runs at most `max_threads` jobs at once.
    pub fn new(max_threads: usize) -> Self {
        WorkerPool {
            shared: Arc::new(Shared {
                state: Mutex::new(PoolState {
                    jobs: VecDeque::new(),
                    threads: 0,
                    idle: 0,
                    shutdown: false,
                }),
                cv: Condvar::new(),
                max_threads: max_threads.max(1),
            }),
        }
    }

    /// Runs `f` on a worker; the future resolves to its result.
    pub fn run<T, F>(&self, f: F) -> PoolFuture<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(Completion {
            value: None,
            waker: None,
        }));
        let s = Arc::clone(&slot);
        self.submit(Box::new(move || {
            let v = f();
            let mut c = s.lock().unwrap_or_else(|e| e.into_inner());
            c.value = Some(v);
            if let Some(w) = c.waker.take() {
                drop(c);
                w.wake();
            }
        }));
        PoolFuture { slot }
    }

    fn submit(&self, job: Job) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.jobs.push_back(job);
        // Jobs may block for long (a poll on a quiet socket), so every queued
        // job needs a thread of its own: counting only "is anyone idle" lets
        // a second job wait behind a first that never ends.
        if st.jobs.len() > st.idle && st.threads < self.shared.max_threads {
            st.threads += 1;
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("strata-worker".into())
                .spawn(move || worker(shared));
            if spawned.is_err() {
                // Running with fewer threads is still correct: the queued
                // job is picked up by an existing worker.
                st.threads -= 1;
                if st.threads == 0 {
                    // No thread at all: run inline rather than hang.
                    let job = st.jobs.pop_back();
                    drop(st);
                    if let Some(job) = job {
                        job();
                    }
                    return;
                }
            }
        }
        drop(st);
        self.shared.cv.notify_one();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.shutdown = true;
    }
}

fn worker(shared: Arc<Shared>) {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            job();
            st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if st.shutdown || Arc::strong_count(&shared) == 1 {
            break;
        }
        st.idle += 1;
        let (guard, timeout) = shared
            .cv
            .wait_timeout(st, Duration::from_secs(10))
            .unwrap_or_else(|e| e.into_inner());
        st = guard;
        st.idle -= 1;
        if timeout.timed_out() && st.jobs.is_empty() {
            break;
        }
    }
    st.threads -= 1;
}

struct Completion<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// Result of a job run on the [`WorkerPool`].
pub struct PoolFuture<T> {
    slot: Arc<Mutex<Completion<T>>>,
}

impl<T> Future for PoolFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut c = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match c.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                c.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Regression: a job queued while the only worker was idle but about to
    /// take a blocking job must still get a thread of its own.
    #[test]
    fn a_blocking_job_never_starves_the_next() {
        let pool = WorkerPool::new(8);
        let (warm_tx, warm_rx) = mpsc::channel();
        pool.submit(Box::new(move || warm_tx.send(()).unwrap()));
        warm_rx.recv().unwrap();
        // Let the worker go idle.
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..20 {
            let (tx, rx) = mpsc::channel::<()>();
            let (done_tx, done_rx) = mpsc::channel();
            // The first job blocks until the second one runs.
            pool.submit(Box::new(move || {
                let _ = rx.recv_timeout(Duration::from_secs(5));
                done_tx.send(()).unwrap();
            }));
            pool.submit(Box::new(move || tx.send(()).unwrap()));
            let t0 = std::time::Instant::now();
            done_rx.recv().unwrap();
            assert!(t0.elapsed() < Duration::from_secs(4), "second job starved");
        }
    }
}
