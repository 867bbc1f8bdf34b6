//! Strata's block engine.
//!
//! `block-core` knows no format and no QMP. It owns what every node shares:
//! the graph and its permission model ([`node`], [`perm`], [`graph`]), the
//! one request path ([`io`]: alignment, read-modify-write, tracked and
//! serialising requests, zero detection, write thresholds, [`dirty`]
//! bitmaps), BlockBackends with accounting ([`backend`], [`stats`]), the
//! event bus ([`events`]), and execution ([`aio`]): an event loop per
//! thread with a single-threaded executor and an I/O engine.
//!
//! ## Decisions
//! - **Executor.** Our own small executor over the `io-uring` crate rather
//!   than a thread-per-core runtime: the loop needs exactly one thing from a
//!   runtime (poll ready tasks, then sleep in `io_uring_enter`), and owning
//!   it keeps the owned-buffer rules and the drain-on-drop in one place.
//!   Futures are `!Send`; the data path takes no locks.
//! - **Owned buffers.** All data I/O moves an [`IoBuf`] into the operation
//!   and gets it back on completion, so a dropped request can never leave
//!   the kernel writing into freed memory. Splitting a buffer across host
//!   extents is O(1) ([`IoBuf::split_to`]/[`IoBuf::unsplit`]).
//! - **Driver interface.** Format drivers answer "where does this guest
//!   range live" ([`driver::Mapping`]: data at a child offset, zero,
//!   unallocated so the backing node answers, or driver-decoded) and the
//!   engine issues the data I/O itself; so qcow2 data goes straight from the
//!   request path to the file's io_uring submission (imago's split, QEMU's
//!   block_status + data path). Protocol drivers implement read/write.
//! - **Engines.** io_uring with registered files, batched submission per
//!   loop turn; the thread pool (QEMU's `aio=threads`) behind the same API,
//!   chosen when io_uring is refused. Cross-thread callers use
//!   [`aio::LoopHandle`] (queue + eventfd).
#![warn(missing_docs)]

pub mod aio;
pub mod backend;
pub mod buf;
pub mod dirty;
pub mod driver;
pub mod error;
pub mod events;
pub mod graph;
pub mod io;
pub mod node;
pub mod options;
pub mod perm;
pub mod stats;
mod tracked;

pub use aio::{AioContext, AioMode, EventLoop, LoopHandle};
pub use backend::BlockBackend;
pub use buf::IoBuf;
pub use dirty::DirtyBitmap;
pub use driver::{BlockDriver, BlockLimits, BlockStatus, IoFuture, Mapping, Prealloc, WriteFlags};
pub use error::{Error, ErrorKind, Result};
pub use events::{BlockEvent, EventBus};
pub use graph::{DriverRegistry, Graph, OpenArgs, Opened};
pub use node::{ChildRole, DetectZeroes, Node, NodeFlags};
pub use options::{OptValue, Options};
pub use perm::Perm;
