//! Execution: the loop thread, its executor, and the two I/O engines.
mod engine;
mod event_loop;
mod executor;
mod notify;
mod poll;
mod pool;
mod uring;

pub use engine::{AioMode, EngineFile};
pub use event_loop::{AioContext, EventLoop, LoopHandle, RemoteFuture};
pub use executor::{yield_now, Executor, JoinHandle};
pub use poll::PollWindow;
pub use pool::{PoolFuture, WorkerPool};
