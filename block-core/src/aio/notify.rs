//! The eventfd that wakes a sleeping loop thread.
//!
//! Other threads write it when they queue work for the loop or wake one of
//! its tasks; the loop waits on it (through io_uring or `poll`) whenever it
//! has nothing ready to run.
//!
//! Writing an eventfd is a system call and a wake-up on the loop's CPU, and
//! a busy loop needs neither: it finds the work on its next turn. So, as
//! QEMU's `aio_notify` does with `notify_me`, other threads write it only
//! while the loop announces that it may sleep. The loop sets that flag and
//! then checks its queues once more; a thread queues work and then reads
//! the flag. A full fence on each side makes sure that at least one of the
//! two sees the other: the work is found, or the eventfd is written.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};

/// An eventfd used as a level-triggered "something to do" flag.
pub(crate) struct Notifier {
    fd: OwnedFd,
    /// Set while the loop may sleep (between `prepare_sleep` and `end_sleep`).
    sleeping: AtomicBool,
}

impl Notifier {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with constant flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Notifier {
            fd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Wakes the loop if it may be sleeping. Call after queuing the work.
    pub(crate) fn notify(&self) {
        // Pairs with the fence in `prepare_sleep`.
        fence(Ordering::SeqCst);
        if !self.sleeping.load(Ordering::Relaxed) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A failure
        // (EAGAIN when the counter is saturated) still leaves it readable.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Announces that the loop may sleep. The caller must check for queued
    /// work afterwards and sleep only if there is none, then call
    /// `end_sleep` once it runs again.
    pub(crate) fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `notify`.
        fence(Ordering::SeqCst);
    }

    /// The loop is running again: other threads need not write the eventfd.
    pub(crate) fn end_sleep(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// Resets the counter after a wake-up.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking fd.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Blocks until the eventfd is readable or `timeout_ms` passes (-1: forever).
    pub(crate) fn wait(&self, timeout_ms: i32) {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd structure on the stack.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        self.drain();
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
