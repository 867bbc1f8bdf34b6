//! Non-blocking sockets driven by the loop: a syscall is tried first and,
//! when it would block, the task waits for readiness on the loop's engine.
//! Buffers are borrowed only for the duration of a synchronous syscall, so
//! no kernel operation ever outlives them.

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::rc::Rc;

use block_core::AioContext;

/// A connected stream socket (unix or TCP).
pub enum Stream {
    /// Unix domain.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }
    /// Closes both directions (wakes a task blocked reading).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// A stream socket bound to a loop.
pub struct Socket {
    stream: Stream,
    ctx: Rc<AioContext>,
}

impl Socket {
    /// Wraps a connected stream; makes it non-blocking.
    pub fn new(stream: Stream, ctx: Rc<AioContext>) -> io::Result<Self> {
        match &stream {
            Stream::Unix(s) => s.set_nonblocking(true)?,
            Stream::Tcp(s) => {
                s.set_nonblocking(true)?;
                // Replies are written whole; Nagle would only add latency.
                s.set_nodelay(true)?;
            }
        }
        // Large read replies (up to 32 MiB) otherwise go out in the
        // default ~200 KiB pieces, each costing a readiness round trip.
        let size: libc::c_int = 4 << 20;
        // SAFETY: sets an int socket option on our own connected socket
        // from a live c_int; failure only leaves the default size.
        unsafe {
            libc::setsockopt(
                stream.fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(Socket { stream, ctx })
    }

    /// Reads at least one byte (0 means end of stream).
    pub async fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read_some(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ctx.readable(self.stream.fd()).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// Writes all of `bufs`, in order.
    pub async fn write_all(&self, bufs: &[&[u8]]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0usize;
        while done < total {
            // Rebuild the slice list past what was written.
            let mut skip = done;
            let mut slices = Vec::with_capacity(bufs.len());
            for b in bufs {
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                slices.push(IoSlice::new(&b[skip..]));
                skip = 0;
            }
            match self.stream.write_vectored(&slices) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ctx.writable(self.stream.fd()).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Shuts the socket down.
    pub fn shutdown(&self) {
        self.stream.shutdown()
    }
}

/// A listening socket.
pub enum Listener {
    /// Unix domain, with its path and the socket file's (device, inode):
    /// the file is removed on drop unless another server has bound the
    /// path since (a restarted server whose old clients outlived it).
    Unix(UnixListener, String, (u64, u64)),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a unix socket at `path` (replacing a stale socket file).
    pub fn unix(path: &str) -> io::Result<Self> {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = UnixListener::bind(path)?;
        l.set_nonblocking(true)?;
        let id = file_id(path).unwrap_or_default();
        Ok(Listener::Unix(l, path.to_owned(), id))
    }

    /// Binds a TCP socket.
    pub fn tcp(host: &str, port: &str) -> io::Result<Self> {
        let l = TcpListener::bind(format!("{host}:{port}"))?;
        l.set_nonblocking(true)?;
        Ok(Listener::Tcp(l))
    }

    /// The bound TCP port (for `port=0` in tests), if TCP.
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, ..) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Accepts the next connection.
    pub async fn accept(&self, ctx: &AioContext) -> io::Result<Stream> {
        loop {
            let r = match self {
                Listener::Unix(l, ..) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ctx.readable(self.fd()).await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path, id) = self {
            if file_id(path) == Some(*id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn file_id(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}
