//! The I/O engine a loop uses for host files: io_uring or the thread pool.
//!
//! Both engines offer the same owned-buffer operations, so drivers are
//! written once. The choice follows QEMU's `aio=io_uring|threads`: asked for
//! explicitly, or `Auto`, which probes io_uring at start and falls back to
//! threads when the kernel refuses it (seccomp, sysctl, missing opcodes).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use super::pool::WorkerPool;
use super::uring::{cqe_result, Uring, UringFile};
use crate::buf::IoBuf;

/// Which engine a loop uses for file I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioMode {
    /// io_uring if the kernel allows it, else the thread pool.
    Auto,
    /// io_uring only; fails to start when unavailable.
    IoUring,
    /// Blocking syscalls on the worker pool.
    Threads,
}

impl AioMode {
    /// Parses QEMU's `aio=` values (`native` maps to io_uring: same effect,
    /// asynchronous kernel I/O without threads).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "io_uring" | "native" => Some(AioMode::IoUring),
            "threads" => Some(AioMode::Threads),
            "auto" => Some(AioMode::Auto),
            _ => None,
        }
    }
}

pub(crate) enum Engine {
    Uring(Rc<Uring>),
    Threads(WorkerPool),
}

/// A host file opened by a driver, registered with the loop's engine.
///
/// The descriptor is shared with in-flight thread-pool jobs (`Arc`) so it
/// stays open until the last of them finishes.
pub struct EngineFile {
    fd: Arc<OwnedFd>,
    uring: Option<(Rc<Uring>, UringFile)>,
}

impl EngineFile {
    /// The raw descriptor (for ioctls, locks and synchronous fast paths).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Puts `new` (the same file opened anew, read-write say) behind this
    /// descriptor's number: later requests, thread-pool jobs in flight and
    /// the io_uring's registered slot all move to it, while requests the
    /// kernel already took finish on the old description.
    pub fn replace_description(&self, new: OwnedFd) -> io::Result<()> {
        // SAFETY: both descriptors are open and owned; dup3 swaps the open
        // file description behind our number atomically, and the number
        // stays owned by `self.fd`.
        let r = unsafe { libc::dup3(new.as_raw_fd(), self.fd.as_raw_fd(), libc::O_CLOEXEC) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some((ring, f)) = &self.uring {
            ring.refresh(f)?;
        }
        Ok(())
    }
}

impl Drop for EngineFile {
    fn drop(&mut self) {
        if let Some((ring, f)) = self.uring.take() {
            ring.unregister(f);
        }
    }
}

fn pread_full(fd: RawFd, buf: &mut [u8], offset: u64, flags: i32) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec points at `buf`, which is live and exclusively
    // borrowed for the duration of the call.
    let r = unsafe { libc::preadv2(fd, &iov, 1, offset as libc::off_t, flags) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn pwrite_full(fd: RawFd, buf: &[u8], offset: u64, flags: i32) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the iovec points at `buf`, live for the call; the kernel only
    // reads from it.
    let r = unsafe { libc::pwritev2(fd, &iov, 1, offset as libc::off_t, flags) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn errno_result(r: libc::c_int) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(0)
    }
}

impl Engine {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Engine::Uring(_) => "io_uring",
            Engine::Threads(_) => "threads",
        }
    }

    pub(crate) fn open_file(&self, fd: OwnedFd) -> EngineFile {
        let uring = match self {
            Engine::Uring(r) => Some((Rc::clone(r), r.register(fd.as_raw_fd()))),
            Engine::Threads(_) => None,
        };
        EngineFile {
            fd: Arc::new(fd),
            uring,
        }
    }

    /// One read of up to `buf.len()` bytes (a short result is possible).
    pub(crate) async fn read(
        &self,
        f: &EngineFile,
        offset: u64,
        buf: IoBuf,
        flags: i32,
    ) -> (io::Result<usize>, IoBuf) {
        match (&f.uring, self) {
            (Some((ring, uf)), _) => {
                let (res, buf) = ring.read(*uf, offset, buf, flags).await;
                (cqe_result(res), buf.expect("read returns its buffer"))
            }
            (None, Engine::Threads(pool)) => {
                let fd = Arc::clone(&f.fd);
                let mut buf = buf;
                pool.run(move || {
                    let r = pread_full(fd.as_raw_fd(), &mut buf, offset, flags);
                    (r, buf)
                })
                .await
            }
            (None, Engine::Uring(_)) => (Err(io::Error::from_raw_os_error(libc::EBADF)), buf),
        }
    }

    /// One write of up to `buf.len()` bytes (a short result is possible).
    pub(crate) async fn write(
        &self,
        f: &EngineFile,
        offset: u64,
        buf: IoBuf,
        flags: i32,
    ) -> (io::Result<usize>, IoBuf) {
        match (&f.uring, self) {
            (Some((ring, uf)), _) => {
                let (res, buf) = ring.write(*uf, offset, buf, flags).await;
                (cqe_result(res), buf.expect("write returns its buffer"))
            }
            (None, Engine::Threads(pool)) => {
                let fd = Arc::clone(&f.fd);
                pool.run(move || {
                    let r = pwrite_full(fd.as_raw_fd(), &buf, offset, flags);
                    (r, buf)
                })
                .await
            }
            (None, Engine::Uring(_)) => (Err(io::Error::from_raw_os_error(libc::EBADF)), buf),
        }
    }

    /// fsync or fdatasync.
    pub(crate) async fn fsync(&self, f: &EngineFile, datasync: bool) -> io::Result<()> {
        match (&f.uring, self) {
            (Some((ring, uf)), _) => cqe_result(ring.fsync(*uf, datasync).await.0).map(|_| ()),
            _ => {
                let fd = Arc::clone(&f.fd);
                self.blocking(move || {
                    // SAFETY: plain syscall on a descriptor kept open by `fd`.
                    errno_result(unsafe {
                        if datasync {
                            libc::fdatasync(fd.as_raw_fd())
                        } else {
                            libc::fsync(fd.as_raw_fd())
                        }
                    })
                })
                .await
                .map(|_| ())
            }
        }
    }

    /// fallocate(mode, offset, len).
    pub(crate) async fn fallocate(
        &self,
        f: &EngineFile,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        match (&f.uring, self) {
            (Some((ring, uf)), _) => {
                cqe_result(ring.fallocate(*uf, mode, offset, len).await.0).map(|_| ())
            }
            _ => {
                let fd = Arc::clone(&f.fd);
                self.blocking(move || {
                    // SAFETY: plain syscall on a descriptor kept open by `fd`.
                    errno_result(unsafe {
                        libc::fallocate(
                            fd.as_raw_fd(),
                            mode,
                            offset as libc::off_t,
                            len as libc::off_t,
                        )
                    })
                })
                .await
                .map(|_| ())
            }
        }
    }

    /// Runs a blocking call off the loop thread (on the io_uring engine too,
    /// for syscalls io_uring has no opcode for).
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        match self {
            Engine::Threads(pool) => pool.run(f).await,
            Engine::Uring(_) => {
                // Rare calls (truncate, lseek for block status): run inline;
                // they do not wait on the device.
                f()
            }
        }
    }

    /// Completes after `dur`.
    pub(crate) async fn sleep(&self, dur: std::time::Duration) {
        match self {
            Engine::Uring(ring) => {
                ring.sleep(dur).await;
            }
            Engine::Threads(pool) => pool.run(move || std::thread::sleep(dur)).await,
        }
    }

    /// Waits until `fd` has one of `events` (POLLIN, POLLOUT); POLLERR and
    /// POLLHUP also end the wait, so the caller's next syscall sees them.
    pub(crate) async fn poll_fd(&self, fd: RawFd, events: i16) -> io::Result<()> {
        match self {
            Engine::Uring(ring) => cqe_result(ring.poll(fd, events).await.0).map(|_| ()),
            Engine::Threads(pool) => {
                pool.run(move || {
                    let mut pfd = libc::pollfd {
                        fd,
                        events,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd on the stack.
                    errno_result(unsafe { libc::poll(&mut pfd, 1, -1) })
                })
                .await
                .map(|_| ())
            }
        }
    }
}
