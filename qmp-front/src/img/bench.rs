//! `strata-img bench`: qemu-img's `bench` — a fixed number of reads or
//! writes of one size, `depth` at a time, at offsets advancing by `step`
//! and wrapping at the end of the image.
//!
//! Options, defaults, messages and output lines are qemu-img's (10.x).
//! The request engine follows `bench_cb`: a completion accounts the request
//! (`n`, `in_flight`), decides on a flush every `--flush-interval`
//! requests (draining first unless `--no-drain`), and then issues as many
//! new requests as `depth` allows, each at the next offset (`offset += step;
//! offset %= image_size`, so a request that would cross the end fails with
//! EIO exactly as in QEMU). Requests run on `min(depth, count)` worker tasks
//! that each own one buffer for the whole run (no allocation per request);
//! the worker whose request completed picks up the next request itself, so
//! a completion issues the next request without a task switch.
//!
//! Invariants: `in_flight <= depth`, `in_flight <= n`, and every offset
//! queued in `pending` is counted in `in_flight`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use block_core::aio::JoinHandle;
use block_core::{AioContext, BlockBackend, Error, EventBus, EventLoop, Graph, IoBuf, WriteFlags};

use super::getopt::{getopt_long, LongOpt};
use super::num::{parse_int, parse_size};
use super::open::{open_image, strerror, Aio, CacheMode, ImageSpec};
use super::{Failure, PROG};

const OPT_FLUSH_INTERVAL: u32 = 256;
const OPT_PATTERN: u32 = 257;
const OPT_NO_DRAIN: u32 = 258;
const OPT_IMAGE_OPTS: u32 = 259;

const SHORTS: &str = "hc:d:f:ni:o:qs:S:t:wU";

/// qemu-img bench's long options, in its table order (which decides the
/// order candidates are listed in an "ambiguous" message).
const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::value("cache", 't' as u32),
    LongOpt::value("count", 'c' as u32),
    LongOpt::value("depth", 'd' as u32),
    LongOpt::value("offset", 'o' as u32),
    LongOpt::value("buffer-size", 's' as u32),
    LongOpt::value("step-size", 'S' as u32),
    LongOpt::value("aio", 'i' as u32),
    LongOpt::flag("native", 'n' as u32),
    LongOpt::flag("write", 'w' as u32),
    LongOpt::value("pattern", OPT_PATTERN),
    LongOpt::value("flush-interval", OPT_FLUSH_INTERVAL),
    LongOpt::flag("no-drain", OPT_NO_DRAIN),
    LongOpt::flag("force-share", 'U' as u32),
];

const INT_MAX: i64 = i32::MAX as i64;

/// The `--help` text (qemu-img's, with this tool's name).
pub fn help_text() -> String {
    format!(
        "Usage:\nRun simple image benchmark.  Usage:\n\n  {PROG} bench \
[-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]
        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n]
        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -c, --count COUNT
     number of I/O requests to perform
  -s, --buffer-size BUFFER_SIZE
     size of each I/O request
  -d, --depth DEPTH
     number of requests to perform in parallel
  -o, --offset OFFSET
     start first request at this OFFSET
  -S, --step-size STEP_SIZE
     each next request offset increment
  -i, --aio AIO
     async-io backend (threads, native, io_uring)
  -n, --native
     use native AIO backend if possible
  -w, --write
     perform write test (default is read)
  --pattern PATTERN
     write this pattern byte instead of zero
  --flush-interval FLUSH_INTERVAL
     issue flush after this number of requests
  --no-drain
     do not wait when flushing pending requests
  -U, --force-share
     open images in shared mode for concurrent access

"
    )
}

/// A parsed `bench` command line.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOpts {
    /// `-c`: number of requests (default 75000).
    pub count: u32,
    /// `-d`: requests in flight (default 64).
    pub depth: u32,
    /// `-f`.
    pub fmt: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-t` (default writeback).
    pub cache: CacheMode,
    /// `-i`/`-n` (default threads).
    pub aio: Aio,
    /// `-o`: first offset.
    pub offset: u64,
    /// `-s`: request size (default 4096).
    pub bufsize: u32,
    /// `-S`: offset increment; 0 means `bufsize`.
    pub step: u32,
    /// `-w`.
    pub write: bool,
    /// `-q` (accepted; bench prints its lines anyway, as qemu-img does).
    pub quiet: bool,
    /// `--pattern`: byte written.
    pub pattern: u8,
    /// `--flush-interval` (0: never).
    pub flush_interval: u32,
    /// Drain before each flush (cleared by `--no-drain`).
    pub drain_on_flush: bool,
    /// `-U`.
    pub force_share: bool,
    /// The image.
    pub filename: String,
}

impl Default for BenchOpts {
    fn default() -> Self {
        BenchOpts {
            count: 75000,
            depth: 64,
            fmt: None,
            image_opts: false,
            cache: CacheMode::Writeback,
            aio: Aio::Threads,
            offset: 0,
            bufsize: 4096,
            step: 0,
            write: false,
            quiet: false,
            pattern: 0,
            flush_interval: 0,
            drain_on_flush: true,
            force_share: false,
            filename: String::new(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Print the help and exit successfully.
    Help,
    /// Run the benchmark.
    Run(BenchOpts),
}

/// Parses `bench`'s arguments, checking them in qemu-img's order.
pub fn parse_args(args: &[String]) -> Result<Action, Failure> {
    let m = getopt_long(args, SHORTS, LONGS)?;
    let mut o = BenchOpts::default();
    for p in &m.opts {
        let arg = p.arg.as_deref().unwrap_or("");
        match p.id {
            id if id == 'h' as u32 => return Ok(Action::Help),
            id if id == 'c' as u32 => o.count = parse_int("request count", arg, 1, INT_MAX)? as u32,
            id if id == 'd' as u32 => o.depth = parse_int("queue depth", arg, 1, INT_MAX)? as u32,
            id if id == 'f' as u32 => o.fmt = Some(arg.to_owned()),
            id if id == 'n' as u32 => o.aio = Aio::Native,
            id if id == 'i' as u32 => {
                o.aio = Aio::parse(arg)
                    .ok_or_else(|| Failure::Error(format!("Invalid aio option: {arg}")))?
            }
            id if id == 'o' as u32 => o.offset = parse_size("offset", arg, 0, i64::MAX)? as u64,
            id if id == 'q' as u32 => o.quiet = true,
            id if id == 's' as u32 => {
                o.bufsize = parse_size("buffer size", arg, 1, INT_MAX)? as u32
            }
            id if id == 'S' as u32 => o.step = parse_size("step size", arg, 0, INT_MAX)? as u32,
            id if id == 't' as u32 => {
                o.cache = CacheMode::parse(arg)
                    .ok_or_else(|| Failure::Error("Invalid cache mode".into()))?
            }
            id if id == 'w' as u32 => o.write = true,
            id if id == 'U' as u32 => o.force_share = true,
            OPT_PATTERN => o.pattern = parse_int("pattern byte", arg, 0, 0xff)? as u8,
            OPT_FLUSH_INTERVAL => {
                o.flush_interval = parse_int("flush interval", arg, 0, INT_MAX)? as u32
            }
            OPT_NO_DRAIN => o.drain_on_flush = false,
            OPT_IMAGE_OPTS => o.image_opts = true,
            _ => {}
        }
    }
    let [filename] = m.operands.as_slice() else {
        return Err(Failure::Usage("Expecting one image file name".into()));
    };
    o.filename = filename.clone();
    if !o.write && o.flush_interval != 0 {
        return Err(Failure::Error(
            "--flush-interval is only available in write tests".into(),
        ));
    }
    if o.flush_interval != 0 && o.flush_interval < o.depth {
        return Err(Failure::Error(
            "Flush interval can't be smaller than depth".into(),
        ));
    }
    Ok(Action::Run(o))
}

/// The offset of the request after one at `offset` (QEMU's
/// `offset += step; offset %= image_size`).
pub fn next_offset(offset: u64, step: u64, image_size: u64) -> u64 {
    if image_size == 0 {
        return 0;
    }
    // Both operands are below 2^63, so the sum cannot overflow.
    (offset + step) % image_size
}

/// The first line qemu-img prints.
pub fn header(o: &BenchOpts) -> String {
    let step = if o.step != 0 { o.step } else { o.bufsize };
    format!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        o.count,
        if o.write { "write" } else { "read" },
        o.bufsize,
        o.depth,
        o.offset,
        step
    )
}

/// The `bench` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let o = match parse_args(args)? {
        Action::Help => {
            print!("{}", help_text());
            return Ok(());
        }
        Action::Run(o) => o,
    };
    let el = EventLoop::new(o.aio.mode()).map_err(|e| Failure::Error(e.to_string()))?;
    let ctx = Rc::clone(el.context());
    let graph = Graph::new(Rc::clone(&ctx), formats::registry(), EventBus::new());
    let spec = ImageSpec {
        filename: o.filename.clone(),
        fmt: o.fmt.clone(),
        image_opts: o.image_opts,
        writable: o.write,
        cache: o.cache,
        aio: o.aio,
        force_share: o.force_share,
        unmap: false,
    };
    let blk = ctx.block_on(open_image(&graph, &spec))?;
    let result = run_bench(&el, &blk, &o);
    blk.detach();
    drop(blk);
    let _ = ctx.block_on(graph.close_all());
    result
}

fn run_bench(el: &EventLoop, blk: &Rc<BlockBackend>, o: &BenchOpts) -> Result<(), Failure> {
    let ctx = Rc::clone(el.context());
    let step = if o.step != 0 { o.step } else { o.bufsize };
    let bench = Rc::new(Bench {
        blk: Rc::clone(blk),
        image_size: blk.size(),
        write: o.write,
        step: step as u64,
        nrreq: o.depth as i64,
        flush_interval: o.flush_interval as i64,
        drain_on_flush: o.drain_on_flush,
        n: Cell::new(o.count as i64),
        in_flight: Cell::new(0),
        offset: Cell::new(o.offset),
        pending: RefCell::new(VecDeque::new()),
        idle: RefCell::new(Vec::new()),
        done: RefCell::new(None),
        failed: RefCell::new(None),
        ctx: Rc::clone(&ctx),
        flushes: RefCell::new(Vec::new()),
    });
    println!("{}", header(o));
    if o.flush_interval != 0 {
        println!("Sending flush every {} requests", o.flush_interval);
    }
    let workers = o.depth.min(o.count) as usize;
    let t1 = Instant::now();
    // The first bench_cb(): nothing completed yet, issue the first batch.
    bench.issue();
    let mut handles = Vec::with_capacity(workers);
    // One allocation cut into a window per request, as qemu-img bench does:
    // neighbouring windows often share physically contiguous pages, so the
    // block layer can merge sequential requests into fewer device requests.
    let mut all = IoBuf::filled(o.bufsize as usize * workers, o.pattern);
    for _ in 0..workers {
        let b = Rc::clone(&bench);
        let buf = all.split_to(o.bufsize as usize);
        handles.push(ctx.spawn(async move { b.worker(buf).await }));
    }
    el.block_on(std::future::poll_fn(|cx| {
        if bench.n.get() <= 0 || bench.failed.borrow().is_some() {
            Poll::Ready(())
        } else {
            *bench.done.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }));
    let elapsed = t1.elapsed();
    if let Some(msg) = bench.failed.borrow_mut().take() {
        return Err(Failure::Error(msg));
    }
    println!("Run completed in {:3.3} seconds.", elapsed.as_secs_f64());
    // Let a trailing flush finish (QEMU drains when it drops the backend).
    bench.wake_idle_all();
    el.block_on(async {
        for h in handles {
            h.await;
        }
        let flushes = std::mem::take(&mut *bench.flushes.borrow_mut());
        for h in flushes {
            h.await;
        }
    });
    if let Some(msg) = bench.failed.borrow_mut().take() {
        return Err(Failure::Error(msg));
    }
    Ok(())
}

/// qemu-img's `BenchData`, shared by the worker tasks of one loop.
struct Bench {
    blk: Rc<BlockBackend>,
    image_size: u64,
    write: bool,
    step: u64,
    nrreq: i64,
    flush_interval: i64,
    drain_on_flush: bool,
    /// Requests not yet completed.
    n: Cell<i64>,
    /// Requests issued and not yet completed.
    in_flight: Cell<i64>,
    /// Offset of the next request to issue.
    offset: Cell<u64>,
    /// Issued requests no worker has started yet.
    pending: RefCell<VecDeque<u64>>,
    /// Workers waiting for a pending request.
    idle: RefCell<Vec<Waker>>,
    /// The main task, waiting for `n == 0`.
    done: RefCell<Option<Waker>>,
    /// The first failure's message; ends the run.
    failed: RefCell<Option<String>>,
    /// The loop the workers run on.
    ctx: Rc<AioContext>,
    /// Flushes issued without draining, awaited before the backend goes.
    flushes: RefCell<Vec<JoinHandle<()>>>,
}

fn errno_text(e: &Error) -> String {
    let code = match e {
        // QEMU's request check answers EIO for requests past the end.
        Error::OutOfRange { .. } => Some(libc::EIO),
        other => other.errno(),
    };
    match code {
        Some(c) => strerror(&std::io::Error::from_raw_os_error(c)),
        None => e.to_string(),
    }
}

impl Bench {
    /// The issue loop at the end of `bench_cb`.
    fn issue(&self) {
        let mut issued = 0;
        {
            let mut pending = self.pending.borrow_mut();
            while self.n.get() > self.in_flight.get() && self.in_flight.get() < self.nrreq {
                let off = self.offset.get();
                pending.push_back(off);
                self.in_flight.set(self.in_flight.get() + 1);
                self.offset
                    .set(next_offset(off, self.step, self.image_size));
                issued += 1;
            }
        }
        // The completing worker takes one itself; wake others for the rest.
        if issued > 1 {
            let mut idle = self.idle.borrow_mut();
            for _ in 1..issued {
                match idle.pop() {
                    Some(w) => w.wake(),
                    None => break,
                }
            }
        }
    }

    fn wake_idle_all(&self) {
        for w in self.idle.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn fail(&self, msg: String) {
        let mut f = self.failed.borrow_mut();
        if f.is_none() {
            *f = Some(msg);
        }
        drop(f);
        if let Some(w) = self.done.borrow_mut().take() {
            w.wake();
        }
        self.wake_idle_all();
    }

    fn finished(&self) -> bool {
        self.n.get() <= 0 || self.failed.borrow().is_some()
    }

    /// Waits for a pending request; `None` once the run is over.
    async fn next_request(&self) -> Option<u64> {
        std::future::poll_fn(|cx| {
            if self.failed.borrow().is_some() {
                return Poll::Ready(None);
            }
            if let Some(off) = self.pending.borrow_mut().pop_front() {
                return Poll::Ready(Some(off));
            }
            if self.n.get() <= 0 {
                return Poll::Ready(None);
            }
            self.idle.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    async fn worker(self: Rc<Self>, mut buf: IoBuf) {
        while let Some(off) = self.next_request().await {
            let r = if self.write {
                self.blk.pwrite(off, buf, WriteFlags::default()).await
            } else {
                self.blk.pread(off, buf).await
            };
            buf = match r {
                Ok(b) => b,
                Err(e) => {
                    self.fail(format!("Failed request: {}", errno_text(&e)));
                    return;
                }
            };
            if self.failed.borrow().is_some() {
                return;
            }
            self.completed().await;
        }
    }

    /// `bench_cb` for a completed read or write.
    async fn completed(self: &Rc<Self>) {
        let remaining = self.n.get() - self.in_flight.get();
        self.n.set(self.n.get() - 1);
        self.in_flight.set(self.in_flight.get() - 1);
        if self.n.get() == 0 {
            if let Some(w) = self.done.borrow_mut().take() {
                w.wake();
            }
            self.wake_idle_all();
        }
        if self.flush_interval != 0 && remaining % self.flush_interval == 0 {
            if self.in_flight.get() == 0 || !self.drain_on_flush {
                if self.drain_on_flush {
                    // Drained: flush, and its completion (bench_cb with
                    // in_flush set) issues the next requests.
                    if let Err(e) = self.blk.flush().await {
                        self.fail(format!("Failed request: {}", errno_text(&e)));
                        return;
                    }
                } else {
                    // bench_undrained_flush_cb: runs beside the requests.
                    let me = Rc::clone(self);
                    let h = self.ctx.spawn(async move {
                        if let Err(e) = me.blk.flush().await {
                            me.fail(format!("Failed flush request: {}", errno_text(&e)));
                        }
                    });
                    self.flushes.borrow_mut().push(h);
                }
            }
            if self.drain_on_flush && self.in_flight.get() > 0 {
                // Wait for the others to complete; the last one flushes.
                return;
            }
        }
        if !self.finished() {
            self.issue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Action, Failure> {
        let v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        parse_args(&v)
    }

    fn opts(a: &[&str]) -> BenchOpts {
        match parse(a) {
            Ok(Action::Run(o)) => o,
            other => panic!("{a:?}: {other:?}"),
        }
    }

    fn err(a: &[&str]) -> String {
        match parse(a) {
            Err(f) => f.render("bench"),
            other => panic!("{a:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let o = opts(&["img"]);
        assert_eq!(o.count, 75000);
        assert_eq!(o.depth, 64);
        assert_eq!(o.bufsize, 4096);
        assert_eq!(o.cache, CacheMode::Writeback);
        assert_eq!(o.aio, Aio::Threads);
        assert_eq!(
            header(&o),
            "Sending 75000 read requests, 4096 bytes each, 64 in parallel \
             (starting at offset 0, step size 4096)"
        );
    }

    #[test]
    fn all_options() {
        let o = opts(&[
            "-c",
            "010",
            "-d0x10",
            "-f",
            "raw",
            "-o",
            "1.5k",
            "-s",
            "64k",
            "-S",
            "1M",
            "-t",
            "none",
            "-i",
            "io_uring",
            "-wU",
            "--pattern",
            "0xff",
            "--flush-interval=32",
            "--no-drain",
            "-q",
            "img",
        ]);
        assert_eq!(o.count, 8);
        assert_eq!(o.depth, 16);
        assert_eq!(o.fmt.as_deref(), Some("raw"));
        assert_eq!(o.offset, 1536);
        assert_eq!(o.bufsize, 65536);
        assert_eq!(o.step, 1 << 20);
        assert_eq!(o.cache, CacheMode::None);
        assert_eq!(o.aio, Aio::IoUring);
        assert!(o.write && o.force_share && o.quiet && !o.drain_on_flush);
        assert_eq!(o.pattern, 0xff);
        assert_eq!(o.flush_interval, 32);
        // -n after -i, and -i threads after -n, like bdrv_parse_aio.
        assert_eq!(opts(&["-i", "threads", "-n", "x"]).aio, Aio::Native);
        assert_eq!(opts(&["-n", "-i", "threads", "x"]).aio, Aio::Threads);
        assert_eq!(opts(&["x", "--form", "raw"]).fmt.as_deref(), Some("raw"));
        assert!(parse(&["-c", "x", "--help"]).is_err());
        assert_eq!(parse(&["--help", "-c", "x"]).unwrap(), Action::Help);
    }

    #[test]
    fn errors_match_qemu_img() {
        assert_eq!(
            err(&["-x", "img"]),
            "strata-img bench: invalid option -- 'x'\nTry 'strata-img bench --help' for more info\n"
        );
        assert_eq!(
            err(&[]),
            "strata-img: Expecting one image file name\nTry 'strata-img bench --help' for more info\n"
        );
        assert_eq!(
            err(&["a", "b"]),
            "strata-img: Expecting one image file name\nTry 'strata-img bench --help' for more info\n"
        );
        assert_eq!(
            err(&["-c", "0", "img"]),
            "strata-img: Invalid request count specified. Must be between 1 and 2147483647.\n"
        );
        assert_eq!(
            err(&["-s", "1.5", "img"]),
            "strata-img: Invalid buffer size specified: '1.5'.\n"
        );
        assert_eq!(
            err(&["-S", "-1", "img"]),
            "strata-img: Invalid step size specified. Must be between 0 and 2147483647.\n"
        );
        assert_eq!(
            err(&["-o", "8E", "img"]),
            "strata-img: Invalid offset specified. Must be between 0 and 9223372036854775807.\n"
        );
        assert_eq!(err(&["-t", "x", "img"]), "strata-img: Invalid cache mode\n");
        assert_eq!(
            err(&["-i", "x", "img"]),
            "strata-img: Invalid aio option: x\n"
        );
        assert_eq!(
            err(&["--pattern", "256", "img"]),
            "strata-img: Invalid pattern byte specified. Must be between 0 and 255.\n"
        );
        assert_eq!(
            err(&["--flush-interval", "10", "img"]),
            "strata-img: --flush-interval is only available in write tests\n"
        );
        assert_eq!(
            err(&["-w", "--flush-interval", "10", "img"]),
            "strata-img: Flush interval can't be smaller than depth\n"
        );
        assert!(err(&["--f", "raw", "img"]).starts_with(
            "strata-img bench: option '--f' is ambiguous; possibilities: '--format' \
             '--flush-interval' '--force-share'\n"
        ));
    }

    #[test]
    fn offsets_wrap_at_image_end() {
        let size = 1 << 20;
        assert_eq!(next_offset(0, 4096, size), 4096);
        assert_eq!(next_offset(size - 4096, 4096, size), 0);
        // A step that does not divide the size wraps to a non-zero offset.
        assert_eq!(next_offset(size - 1000, 3000, size), 2000);
        assert_eq!(
            next_offset(7 << 60, 1 << 30, i64::MAX as u64),
            (7 << 60) + (1 << 30)
        );
        assert_eq!(next_offset(5, 1, 0), 0);
    }

    #[test]
    fn run_on_null_co_counts_and_flushes() {
        // A small run through the whole engine: every request completes, the
        // offsets wrap, and flushes drain as in bench_cb.
        for drain in [true, false] {
            let el = EventLoop::new(block_core::AioMode::Auto).unwrap();
            let ctx = Rc::clone(el.context());
            let graph = Graph::new(Rc::clone(&ctx), formats::registry(), EventBus::new());
            let spec = ImageSpec {
                filename: "driver=null-co,size=65536".into(),
                fmt: None,
                image_opts: true,
                writable: true,
                cache: CacheMode::Writeback,
                aio: Aio::Threads,
                force_share: false,
                unmap: false,
            };
            let blk = ctx.block_on(open_image(&graph, &spec)).unwrap();
            let o = BenchOpts {
                count: 100,
                depth: 4,
                write: true,
                flush_interval: 8,
                drain_on_flush: drain,
                ..BenchOpts::default()
            };
            run_bench(&el, &blk, &o).unwrap();
            assert_eq!(blk.acct().stats(block_core::stats::IoKind::Write).ops, 100);
            let flushes = blk.acct().stats(block_core::stats::IoKind::Flush).ops;
            assert!(flushes >= 12, "{flushes} flushes");
        }
    }
}
