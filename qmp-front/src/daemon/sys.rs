//! The daemon's few direct syscalls: signal handling, daemonizing and
//! the pid file. The only module of `qmp-front` with `unsafe` code; each
//! block says why it is sound. Called from the main thread at start-up
//! (before any other thread exists, where noted) and from the signal
//! thread it starts.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

/// The signals that stop the daemon cleanly.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully
    // before sigaddset reads it, and both only write to the local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks SIGTERM/SIGINT/SIGHUP in the calling thread and every thread it
/// starts afterwards, then starts a thread that waits for them and calls
/// `on_signal` once per signal. Call before starting other threads.
pub fn handle_stop_signals(on_signal: impl Fn(i32) + Send + 'static) -> io::Result<()> {
    let set = stop_set();
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is
    // allowed. pthread_sigmask only changes this thread's mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer
            // for the duration of the call.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                on_signal(sig);
            }
        })?;
    Ok(())
}

/// The parent's side of `--daemonize`: where the child reports start-up.
pub struct DaemonPipe(OwnedFd);

/// Forks; the parent waits until the child calls [`daemon_ready`] (exit 0)
/// or exits (its status is passed on) and never returns. The child starts
/// a new session and gets the pipe. Must be called while the process has
/// one thread.
pub fn daemonize() -> io::Result<DaemonPipe> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just returned by pipe2 and are owned by no one else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees the process is single-threaded, so the
    // child may keep running arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        drop(wr);
        let mut f = std::fs::File::from(rd);
        let mut b = [0u8; 1];
        match f.read(&mut b) {
            Ok(1) => std::process::exit(i32::from(b[0])),
            _ => {
                let mut status = 0;
                // SAFETY: `status` is a valid out pointer; pid is our child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    1
                };
                std::process::exit(if code == 0 { 1 } else { code });
            }
        }
    }
    drop(rd);
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    Ok(DaemonPipe(wr))
}

/// Child side: start-up succeeded. Detaches stdio (to /dev/null), moves to
/// `/` as QEMU does, and lets the parent exit with status 0.
pub fn daemon_ready(pipe: DaemonPipe) -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `null` is open.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
    std::env::set_current_dir("/")?;
    let mut f = std::fs::File::from(pipe.0);
    f.write_all(&[0])?;
    Ok(())
}

/// This process's kernel thread id (for `query-iothreads`' thread-id).
pub fn gettid() -> i64 {
    // SAFETY: gettid has no preconditions.
    i64::from(unsafe { libc::gettid() })
}

/// Resolves a listen address as QEMU's socket layer does (`getaddrinfo`
/// with `AI_PASSIVE`, so service names such as `nbd` work) and returns
/// the numeric port. The error is `gai_strerror`'s text, which QEMU quotes.
pub fn resolve_listen_port(host: &str, port: &str) -> Result<u16, String> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| "Invalid argument".to_owned());
    let (chost, cport) = (c(host)?, c(port)?);
    // SAFETY: addrinfo is plain data; all-zero is a valid "no hints" value
    // before the fields below are set.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = libc::AI_PASSIVE;
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    let host_ptr = if host.is_empty() {
        std::ptr::null()
    } else {
        chost.as_ptr()
    };
    // SAFETY: the strings are NUL-terminated and outlive the call; `res`
    // receives a list that is freed below and only read before that.
    let rc = unsafe { libc::getaddrinfo(host_ptr, cport.as_ptr(), &hints, &mut res) };
    if rc != 0 {
        // SAFETY: gai_strerror returns a static NUL-terminated string.
        let msg = unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(rc)) };
        return Err(msg.to_string_lossy().into_owned());
    }
    // SAFETY: on success `res` is a valid list with at least one entry,
    // whose ai_addr points at a sockaddr of its family.
    let port = unsafe {
        let ai = &*res;
        let p = match ai.ai_family {
            libc::AF_INET => (*(ai.ai_addr as *const libc::sockaddr_in)).sin_port,
            libc::AF_INET6 => (*(ai.ai_addr as *const libc::sockaddr_in6)).sin6_port,
            _ => 0,
        };
        libc::freeaddrinfo(res);
        u16::from_be(p)
    };
    Ok(port)
}
