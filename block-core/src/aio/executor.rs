//! A single-threaded executor for the loop thread (QEMU's coroutines).
//!
//! Tasks are `!Send` futures owned by the executor until they finish; the
//! request path relies on that: a task's buffers live until the task ends,
//! and the loop never frees a task while it still has I/O in flight (see
//! `EventLoop`'s drain on drop). Wakers are thread-safe because completions
//! may come from the thread-pool engine's workers: a wake from another thread
//! pushes the task onto the ready queue and kicks the loop's eventfd; a wake
//! on the loop thread itself only pushes.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use super::notify::Notifier;

type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

/// Task ids woken since the loop last ran them, plus the means to wake a
/// sleeping loop from another thread.
pub(crate) struct ReadyQueue {
    ids: Mutex<VecDeque<usize>>,
    notifier: Arc<Notifier>,
    loop_thread: std::thread::ThreadId,
}

impl ReadyQueue {
    fn push(&self, id: usize) {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(id);
        if std::thread::current().id() != self.loop_thread {
            self.notifier.notify();
        }
    }

    fn take(&self, into: &mut VecDeque<usize>) {
        let mut q = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *q, into);
    }

    fn is_empty(&self) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

struct TaskWaker {
    id: usize,
    queue: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.queue.push(self.id);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.queue.push(self.id);
    }
}

struct Slot {
    task: Option<LocalTask>,
    waker: Waker,
}

/// The executor: a slab of tasks and the queue of those ready to run.
pub struct Executor {
    slots: RefCell<Vec<Option<Slot>>>,
    free: RefCell<Vec<usize>>,
    queue: Arc<ReadyQueue>,
    /// Scratch buffer swapped with the shared queue each turn.
    batch: RefCell<VecDeque<usize>>,
    live: Cell<usize>,
}

impl Executor {
    pub(crate) fn new(notifier: Arc<Notifier>) -> Self {
        Executor {
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            queue: Arc::new(ReadyQueue {
                ids: Mutex::new(VecDeque::new()),
                notifier,
                loop_thread: std::thread::current().id(),
            }),
            batch: RefCell::new(VecDeque::new()),
            live: Cell::new(0),
        }
    }

    /// Spawns a task; it first runs on the next loop turn.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + 'static,
    {
        let state = Rc::new(RefCell::new(JoinState::<F::Output> {
            value: None,
            waiter: None,
        }));
        let st = Rc::clone(&state);
        self.spawn_detached(async move {
            let v = fut.await;
            let mut s = st.borrow_mut();
            s.value = Some(v);
            if let Some(w) = s.waiter.take() {
                w.wake();
            }
        });
        JoinHandle { state }
    }

    /// Spawns a task whose result nobody waits for.
    pub fn spawn_detached(&self, fut: impl Future<Output = ()> + 'static) {
        let mut slots = self.slots.borrow_mut();
        let id = self.free.borrow_mut().pop().unwrap_or_else(|| {
            slots.push(None);
            slots.len() - 1
        });
        let waker = Waker::from(Arc::new(TaskWaker {
            id,
            queue: Arc::clone(&self.queue),
        }));
        slots[id] = Some(Slot {
            task: Some(Box::pin(fut)),
            waker,
        });
        self.live.set(self.live.get() + 1);
        drop(slots);
        self.queue.push(id);
    }

    /// Polls every task that was woken; returns how many were polled.
    pub(crate) fn run_ready(&self) -> usize {
        let mut batch = self.batch.borrow_mut();
        self.queue.take(&mut batch);
        let mut n = 0;
        while let Some(id) = batch.pop_front() {
            // Take the task out of its slot while polling so that the task
            // may spawn others (which borrows the slab) without conflict.
            let (mut task, waker) = {
                let mut slots = self.slots.borrow_mut();
                match slots.get_mut(id).and_then(|s| s.as_mut()) {
                    Some(slot) => match slot.task.take() {
                        Some(t) => (t, slot.waker.clone()),
                        None => continue, // already being polled: spurious
                    },
                    None => continue, // finished; stale wake
                }
            };
            n += 1;
            let mut cx = Context::from_waker(&waker);
            let done = task.as_mut().poll(&mut cx).is_ready();
            let mut slots = self.slots.borrow_mut();
            if done {
                slots[id] = None;
                self.free.borrow_mut().push(id);
                self.live.set(self.live.get() - 1);
                drop(slots);
                drop(task);
            } else if let Some(slot) = slots[id].as_mut() {
                slot.task = Some(task);
            }
        }
        n
    }

    /// Whether some task has been woken and waits to run.
    pub(crate) fn has_ready(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Number of tasks not yet finished.
    pub fn live_tasks(&self) -> usize {
        self.live.get()
    }

    /// Drops every unfinished task (used once all their I/O has drained).
    pub(crate) fn clear(&self) {
        let tasks: Vec<_> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(|s| s.take())
            .collect();
        drop(tasks);
        self.live.set(0);
    }
}

struct JoinState<T> {
    value: Option<T>,
    waiter: Option<Waker>,
}

/// Awaits the result of a spawned task.
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
}

impl<T> JoinHandle<T> {
    /// The result, if the task has finished.
    pub fn try_take(&self) -> Option<T> {
        self.state.borrow_mut().value.take()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.state.borrow_mut();
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waiter = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Yields once to the loop so that other ready tasks run (and, with io_uring,
/// so queued submissions go out) before this one continues.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
