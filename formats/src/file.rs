//! The `file` protocol driver: a host file or block device.
//!
//! All data I/O goes through the loop's engine (io_uring or the thread
//! pool). With `cache.direct=off`, a read first tries `preadv2(RWF_NOWAIT)`
//! inline: data already in the page cache is copied without a queue round
//! trip, which is where most of the time of a cached 4 KiB read goes. When
//! that fails (EAGAIN: not cached) the read is queued as usual; after a run
//! of misses the fast path is skipped for a while, so uncached workloads do
//! not pay a failed syscall per request.
//!
//! Short reads at end of file read as zeros (a file's tail may be sparse);
//! writes past the end grow the file, which format drivers rely on.

use std::cell::Cell;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use block_core::aio::EngineFile;
use block_core::{
    AioContext, BlockDriver, BlockLimits, BlockStatus, Error, IoBuf, IoFuture, Node, OpenArgs,
    Opened, Perm, Prealloc, Result, WriteFlags,
};

use crate::lock;

/// Misses of the RWF_NOWAIT fast path before it is paused.
const NOWAIT_MISS_LIMIT: u32 = 8;
/// Requests for which the fast path stays paused after too many misses.
const NOWAIT_PAUSE: u32 = 256;

/// An opened host file.
pub struct FileDriver {
    path: String,
    file: EngineFile,
    ctx: Rc<AioContext>,
    size: Cell<u64>,
    direct: bool,
    no_flush: bool,
    locking: bool,
    /// Whether the descriptor is open for writing (a node opened read-only
    /// gets a writable one when first reopened read-write).
    writable: Cell<bool>,
    /// A second descriptor for the image locks (see [`lock_descriptor`]).
    lock_fd: Option<OwnedFd>,
    block_device: bool,
    align: u32,
    nowait_misses: Cell<u32>,
    nowait_pause: Cell<u32>,
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Opens `path` for the engine: read-only or read-write, O_DIRECT or not.
fn open_descriptor(path: &str, read_only: bool, direct: bool) -> std::io::Result<OwnedFd> {
    let cpath = CString::new(path).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "file name contains a NUL byte",
        )
    })?;
    let mut oflags = libc::O_CLOEXEC;
    oflags |= if read_only {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    if direct {
        oflags |= libc::O_DIRECT;
    }
    // SAFETY: `cpath` is a valid NUL-terminated string.
    let fd = unsafe { libc::open(cpath.as_ptr(), oflags) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` was just returned by open and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a second open file description of the file behind `fd` to hold
/// the image locks. OFD locks live as long as their open file description,
/// and the one the engine uses may be registered with an io_uring, whose
/// teardown after a process dies runs asynchronously in the kernel: locks
/// on it would outlive a killed process for a while, and QEMU could not
/// open the image right after. This description is only ever a plain
/// descriptor, closed the moment the process ends. `None` (lock on the
/// engine's descriptor) when it cannot be opened.
fn lock_descriptor(fd: RawFd, st: &libc::stat) -> Option<OwnedFd> {
    let proc_path = CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    // SAFETY: `proc_path` is a valid NUL-terminated string. Read access is
    // what the shared locks QEMU's scheme uses need.
    let lfd = unsafe { libc::open(proc_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if lfd < 0 {
        return None;
    }
    // SAFETY: `lfd` was just returned by open and is owned by no one else.
    let owned = unsafe { OwnedFd::from_raw_fd(lfd) };
    let lst = fstat(lfd).ok()?;
    // The same file, not whatever the name leads to now.
    (lst.st_dev == st.st_dev && lst.st_ino == st.st_ino).then_some(owned)
}

fn fstat(fd: RawFd) -> std::io::Result<libc::stat> {
    // SAFETY: zeroed is a valid bit pattern for `stat`; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(errno());
    }
    Ok(st)
}

fn device_size(fd: RawFd) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`, which is live.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size) } < 0 {
        return Err(errno());
    }
    Ok(size)
}

/// Finds the smallest alignment O_DIRECT accepts, as QEMU probes it: try
/// reads of growing size until one succeeds.
fn probe_alignment(fd: RawFd) -> u32 {
    let mut buf = IoBuf::zeroed(4096);
    for align in [512u32, 1024, 2048, 4096] {
        // SAFETY: reads at most `align` (<= 4096) bytes into the live buffer.
        let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), align as usize, 0) };
        if r >= 0 {
            return align;
        }
    }
    4096
}

/// Opens the `file` driver from its options.
pub fn open(args: OpenArgs<'_>) -> IoFuture<'_, Opened> {
    Box::pin(async move {
        let OpenArgs {
            graph,
            mut opts,
            flags,
            ..
        } = args;
        let path = opts
            .take_str("filename")?
            .ok_or_else(|| Error::invalid("Parameter 'filename' is missing"))?;
        if let Some(aio) = opts.take_str("aio")? {
            if block_core::AioMode::parse(&aio).is_none() {
                return Err(Error::invalid(format!(
                    "Parameter 'aio' does not accept value '{aio}'"
                )));
            }
            // As QEMU's file-posix: native AIO needs O_DIRECT.
            if aio == "native" && !flags.cache_direct {
                return Err(Error::invalid(
                    "aio=native was specified, but it requires cache.direct=on, which was not specified.",
                ));
            }
        }
        let locking = match opts.take_str("locking")?.as_deref() {
            None | Some("auto") | Some("on") => true,
            Some("off") => false,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "Parameter 'locking' does not accept value '{v}'"
                )))
            }
        };
        opts.take_u64("aio-max-batch")?;
        opts.take_bool("drop-cache")?;
        opts.take_bool("x-check-cache-dropped")?;
        opts.finish("file")?;
        let ctx = Rc::clone(graph.context());
        let driver = FileDriver::open(
            &ctx,
            &path,
            flags.read_only,
            flags.cache_direct,
            flags.cache_no_flush,
            locking,
        )?;
        Ok(Opened {
            driver: Box::new(driver),
            children: Vec::new(),
        })
    })
}

impl FileDriver {
    /// Opens `path` on the loop `ctx`.
    pub fn open(
        ctx: &Rc<AioContext>,
        path: &str,
        read_only: bool,
        direct: bool,
        no_flush: bool,
        locking: bool,
    ) -> Result<Self> {
        if path.contains('\0') {
            return Err(Error::invalid("file name contains a NUL byte"));
        }
        let open_err = |e: std::io::Error| Error::Open {
            path: path.to_owned(),
            source: e,
        };
        let owned = open_descriptor(path, read_only, direct).map_err(open_err)?;
        let fd = owned.as_raw_fd();
        let st = fstat(fd).map_err(open_err)?;
        let kind = st.st_mode & libc::S_IFMT;
        let block_device = kind == libc::S_IFBLK;
        if kind != libc::S_IFREG && !block_device {
            // QEMU's file-posix message.
            return Err(Error::invalid(format!(
                "'file' driver requires '{path}' to be a regular file"
            )));
        }
        let size = if block_device {
            device_size(fd).map_err(open_err)?
        } else {
            st.st_size as u64
        };
        let align = if direct { probe_alignment(fd) } else { 1 };
        let lock_fd = if locking {
            lock_descriptor(fd, &st)
        } else {
            None
        };
        Ok(FileDriver {
            path: path.to_owned(),
            file: ctx.open_file(owned),
            ctx: Rc::clone(ctx),
            size: Cell::new(size),
            direct,
            no_flush,
            locking,
            writable: Cell::new(!read_only),
            lock_fd,
            block_device,
            align,
            nowait_misses: Cell::new(0),
            nowait_pause: Cell::new(0),
        })
    }

    fn fd(&self) -> RawFd {
        self.file.raw_fd()
    }

    /// The descriptor that carries the image locks.
    fn lock_fd(&self) -> RawFd {
        self.lock_fd
            .as_ref()
            .map_or_else(|| self.fd(), |f| f.as_raw_fd())
    }

    /// Tries to serve a read from the page cache without blocking.
    /// Returns how many bytes were read (0 when nothing was cached).
    fn try_nowait_read(&self, offset: u64, buf: &mut IoBuf) -> usize {
        if self.direct {
            return 0;
        }
        let pause = self.nowait_pause.get();
        if pause > 0 {
            self.nowait_pause.set(pause - 1);
            return 0;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec covers the live, exclusively borrowed buffer.
        let r =
            unsafe { libc::preadv2(self.fd(), &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
        if r > 0 {
            self.nowait_misses.set(0);
            return r as usize;
        }
        let m = self.nowait_misses.get() + 1;
        if m >= NOWAIT_MISS_LIMIT {
            self.nowait_misses.set(0);
            self.nowait_pause.set(NOWAIT_PAUSE);
        } else {
            self.nowait_misses.set(m);
        }
        0
    }

    async fn read_at(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len();
        let mut done = self.try_nowait_read(offset, &mut buf);
        if done == len {
            return Ok(buf);
        }
        // Continue after what the fast path (if anything) read.
        let mut head = if done > 0 {
            Some(buf.split_to(done))
        } else {
            None
        };
        let mut rest = buf;
        while done < len {
            let (r, b) = self
                .ctx
                .read(&self.file, offset + done as u64, rest, 0)
                .await;
            rest = b;
            let n = match r {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    return Err(Error::io(
                        &self.path,
                        format!("read at offset {}", offset + done as u64),
                        e,
                    ))
                }
            };
            if n == 0 {
                // End of file: the rest reads as zeros.
                rest.fill(0);
                done = len;
            } else {
                done += n;
                let got = rest.split_to(n);
                match &mut head {
                    Some(h) => h.unsplit(got),
                    None => head = Some(got),
                }
            }
        }
        Ok(match head {
            Some(mut h) => {
                if !rest.is_empty() {
                    h.unsplit(rest);
                }
                h
            }
            None => rest,
        })
    }

    async fn write_at(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len();
        let rw = if flags.fua { libc::RWF_DSYNC } else { 0 };
        let mut done = 0usize;
        let mut out: Option<IoBuf> = None;
        let mut rest = buf;
        while done < len {
            let (r, b) = self
                .ctx
                .write(&self.file, offset + done as u64, rest, rw)
                .await;
            rest = b;
            match r {
                Ok(0) => {
                    return Err(Error::io(
                        &self.path,
                        format!("write at offset {}", offset + done as u64),
                        std::io::Error::from_raw_os_error(libc::ENOSPC),
                    ))
                }
                Ok(n) => {
                    done += n;
                    if done < len {
                        let w = rest.split_to(n);
                        match &mut out {
                            Some(o) => o.unsplit(w),
                            None => out = Some(w),
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    return Err(Error::io(
                        &self.path,
                        format!("write at offset {}", offset + done as u64),
                        e,
                    ))
                }
            }
        }
        let end = offset + len as u64;
        if end > self.size.get() && !self.block_device {
            self.size.set(end);
        }
        Ok(match out {
            Some(mut o) => {
                o.unsplit(rest);
                o
            }
            None => rest,
        })
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        loop {
            match self.ctx.fallocate(&self.file, mode, offset, len).await {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r,
            }
        }
    }

    fn lseek(&self, offset: u64, whence: i32) -> std::io::Result<u64> {
        // SAFETY: plain syscall on our own descriptor.
        let r = unsafe { libc::lseek(self.fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(r as u64)
        }
    }
}

fn not_supported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.size.get()
    }

    fn limits(&self) -> BlockLimits {
        BlockLimits {
            request_alignment: self.align,
            min_mem_alignment: if self.direct { self.align as usize } else { 1 },
            // io_uring lengths are 32-bit.
            max_transfer: 1 << 30,
            opt_transfer: 0,
        }
    }

    fn filename(&self) -> Option<String> {
        Some(self.path.clone())
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, buf: IoBuf) -> IoFuture<'a, IoBuf> {
        Box::pin(self.read_at(offset, buf))
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> IoFuture<'a, IoBuf> {
        Box::pin(self.write_at(offset, buf, flags))
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let end = offset + len;
            let size = self.size.get();
            if flags.may_unmap && node.flags().discard_unmap && !self.block_device && end <= size {
                // Punching a hole reads back as zeros on every Linux file
                // system that supports it.
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                if self.fallocate(mode, offset, len).await.is_ok() {
                    return Ok(());
                }
            }
            match self
                .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                .await
            {
                Ok(()) => {
                    if end > size && !self.block_device {
                        self.size.set(end);
                    }
                    Ok(())
                }
                Err(e) if not_supported(&e) => Err(Error::unsupported("file", "write_zeroes")),
                Err(e) => Err(Error::io(
                    &self.path,
                    format!("write zeroes at offset {offset}"),
                    e,
                )),
            }
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.block_device {
                return Ok(());
            }
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len).await {
                Ok(()) => Ok(()),
                // A discard is a hint: file systems without hole punching
                // simply keep the data.
                Err(e) if not_supported(&e) => Ok(()),
                Err(e) => Err(Error::io(
                    &self.path,
                    format!("discard at offset {offset}"),
                    e,
                )),
            }
        })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.no_flush {
                return Ok(());
            }
            self.ctx
                .fsync(&self.file, true)
                .await
                .map_err(|e| Error::io(&self.path, "flush", e))
        })
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> IoFuture<'a, BlockStatus> {
        Box::pin(async move {
            let data_at = |len: u64, data: bool| BlockStatus {
                len,
                data,
                zero: !data,
                allocated: true,
                offset: Some(offset),
                file_node: Some(node.name().to_owned()),
            };
            if self.block_device {
                return Ok(data_at(len, true));
            }
            // SEEK_DATA from offset: if it lands on offset we are in data and
            // SEEK_HOLE tells where it ends; otherwise a hole runs until it.
            match self.lseek(offset, libc::SEEK_DATA) {
                Ok(d) if d == offset => {
                    let h = self.lseek(offset, libc::SEEK_HOLE).unwrap_or(offset + len);
                    Ok(data_at((h - offset).clamp(1, len), true))
                }
                Ok(d) if d > offset => Ok(data_at((d - offset).min(len), false)),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(data_at(len, false)),
                _ => Ok(data_at(len, true)),
            }
        })
    }

    fn truncate<'a>(
        &'a self,
        _node: &'a Node,
        size: u64,
        _exact: bool,
        prealloc: Prealloc,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.block_device {
                if size > self.size.get() {
                    return Err(Error::invalid(format!(
                        "Cannot grow device files ({} > {})",
                        size,
                        self.size.get()
                    )));
                }
                return Ok(());
            }
            let old = self.size.get();
            let fd = self.fd();
            // SAFETY: plain syscall on our own descriptor.
            if unsafe { libc::ftruncate(fd, size as libc::off_t) } < 0 {
                return Err(Error::io(&self.path, "resize", errno()));
            }
            self.size.set(size);
            if size > old {
                match prealloc {
                    Prealloc::Off | Prealloc::Metadata => {}
                    Prealloc::Falloc => self
                        .fallocate(0, old, size - old)
                        .await
                        .map_err(|e| Error::io(&self.path, "preallocation", e))?,
                    Prealloc::Full => {
                        let mut off = old;
                        while off < size {
                            let n = (size - off).min(1 << 20);
                            self.write_at(off, IoBuf::zeroed(n as usize), WriteFlags::default())
                                .await?;
                            off += n;
                        }
                    }
                }
            }
            Ok(())
        })
    }

    fn reopen<'a>(&'a self, _node: &'a Node, read_only: bool) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if read_only || self.writable.get() {
                return Ok(());
            }
            let open_err = |e: std::io::Error| Error::Open {
                path: self.path.clone(),
                source: e,
            };
            let new = open_descriptor(&self.path, false, self.direct).map_err(open_err)?;
            let (was, now) = (fstat(self.fd()), fstat(new.as_raw_fd()));
            let (was, now) = (was.map_err(open_err)?, now.map_err(open_err)?);
            if (was.st_dev, was.st_ino) != (now.st_dev, now.st_ino) {
                return Err(Error::invalid(format!(
                    "Could not reopen '{}': the file was replaced since it was opened",
                    self.path
                )));
            }
            self.file.replace_description(new).map_err(open_err)?;
            self.writable.set(true);
            Ok(())
        })
    }

    fn check_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        if self.locking {
            lock::check(self.lock_fd(), &self.path, perm, shared)?;
        }
        Ok(())
    }

    fn set_perm(&self, perm: Perm, shared: Perm) {
        if self.locking {
            lock::apply(self.lock_fd(), perm, shared);
        }
    }
}
