//! `strata-img convert`: copies one image (raw or qcow2, its backing chain
//! flattened) into a new raw or qcow2 image, as `qemu-img convert` does.
//!
//! The target is created first with the source's size. Ranges the source
//! reports as zero are not written (a new image reads as zeros); data is
//! read in chunks of up to 2 MiB and written except for the blocks of
//! `-S` bytes (4 KiB by default) that are all zeros, so the output stays
//! sparse. `-S 0` writes everything. With `-c` (qcow2 only) every cluster
//! holding data is written compressed through the format layer.
//!
//! `-m` requests are in flight at once; their writes are issued in guest
//! order (so a qcow2 target allocates clusters as qemu-img's does) unless
//! `-W` allows any order. `-n` writes into an existing target, which may
//! hold data, so the source's zeros are written as zeros there. `-B` gives
//! the new target a backing file and copies only what the source's top
//! layer holds. `-p` prints qemu-img's progress lines.

use super::common::{open_qcow2_with, read_qcow2_header, release, Env};
use super::create::{create, CreateArgs};
use super::getopt::{getopt_long, LongOpt};
use super::map::block_status;
use super::num::parse_size;
use super::open::CacheMode;
use super::Failure;

use std::rc::Rc;

use block_core::{BlockBackend, IoBuf, WriteFlags};

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_TARGET_IMAGE_OPTS: u32 = 258;

const OPT_TARGET_IS_ZERO: u32 = 259;
const OPT_BITMAPS: u32 = 260;
const OPT_SKIP_BROKEN: u32 = 261;
const OPT_SALVAGE: u32 = 262;

/// qemu-img 10's long options for convert, in its table order.
const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::flag("quiet", 'q' as u32),
    LongOpt::flag("progress", 'p' as u32),
    LongOpt::value("source-format", 'f' as u32),
    LongOpt::flag("source-image-opts", OPT_IMAGE_OPTS),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::value("source-snapshot", 'l' as u32),
    LongOpt::value("source-cache", 'T' as u32),
    LongOpt::value("target-format", 'O' as u32),
    LongOpt::flag("target-image-opts", OPT_TARGET_IMAGE_OPTS),
    LongOpt::value("target-options", 'o' as u32),
    LongOpt::flag("compress", 'c' as u32),
    LongOpt::value("target-cache", 't' as u32),
    LongOpt::value("backing", 'B' as u32),
    LongOpt::value("backing-format", 'F' as u32),
    LongOpt::value("backing-format", 'F' as u32),
    LongOpt::flag("no-create", 'n' as u32),
    LongOpt::flag("target-is-zero", OPT_TARGET_IS_ZERO),
    LongOpt::value("sparse-size", 'S' as u32),
    LongOpt::flag("bitmaps", OPT_BITMAPS),
    LongOpt::flag("skip-broken-bitmaps", OPT_SKIP_BROKEN),
    LongOpt::flag("force-share", 'U' as u32),
    LongOpt::value("rate", 'r' as u32),
    LongOpt::value("parallel", 'm' as u32),
    LongOpt::flag("copy-range-offloading", 'C' as u32),
    LongOpt::flag("salvage", OPT_SALVAGE),
    LongOpt::flag("oob-writes", 'W' as u32),
    LongOpt::value("object", OPT_OBJECT),
];

/// Largest read (QEMU's `IO_BUF_SIZE`).
const CHUNK: u64 = 2 << 20;
/// Largest `-S` value.
const MAX_SPARSE: i64 = 16 << 20;

struct Opts {
    src_fmt: Option<String>,
    out_fmt: String,
    options: Option<String>,
    compress: bool,
    quiet: bool,
    min_sparse: u64,
    force_share: bool,
    /// `-n`: write into an existing target.
    no_create: bool,
    /// `-W`: writes may complete in any order.
    oob_writes: bool,
    /// `-m`: requests in flight.
    parallel: usize,
    /// `-B`: the target's backing file; only the source's top layer is copied.
    backing: Option<String>,
    /// `-F`: the backing file's format.
    backing_fmt: Option<String>,
    /// `-p`.
    progress: bool,
    /// `-t`: the target's cache mode; qemu-img's default, `unsafe`, leaves
    /// the copy in the page cache without a flush.
    cache: CacheMode,
    /// `-T`: the source's cache mode.
    src_cache: CacheMode,
    /// `--bitmaps`: copy the source's persistent bitmaps.
    bitmaps: bool,
    /// `--skip-broken-bitmaps`: leave inconsistent ones out.
    skip_broken: bool,
    src: String,
    dst: String,
}

/// qemu-img's `MAX_COROUTINES`.
const MAX_PARALLEL: i64 = 16;

/// `qemu_strtol(s, NULL, 0, ..)`: C's base-0 integer syntax (leading blanks,
/// a sign, `0x` hex, `0` octal), and nothing after the number.
fn parse_c_long(s: &str) -> Option<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::from_str_radix(digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

/// The `convert` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let Some(o) = parse(args)? else {
        return Ok(());
    };
    let progress = Progress::new(o.progress && !o.quiet);
    // qemu-img shows 0% before it opens anything and ends the line even
    // when the conversion fails.
    progress.print(0.0, 100);
    let r = convert(&o, &progress);
    if r.is_ok() {
        progress.print(100.0, 0);
    }
    progress.end();
    r
}

/// The command line; `None` once `-h` printed the help.
fn parse(args: &[String]) -> Result<Option<Opts>, Failure> {
    let m = getopt_long(args, "hf:O:B:F:Cco:l:S:pt:T:qnm:WUr:", LONGS)?;
    let mut o = Opts {
        src_fmt: None,
        out_fmt: "raw".into(),
        options: None,
        compress: false,
        quiet: false,
        min_sparse: 8 * 512,
        force_share: false,
        no_create: false,
        oob_writes: false,
        parallel: 8,
        backing: None,
        backing_fmt: None,
        progress: false,
        cache: CacheMode::Unsafe,
        src_cache: CacheMode::Writeback,
        bitmaps: false,
        skip_broken: false,
        src: String::new(),
        dst: String::new(),
    };
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match char::from_u32(p.id).unwrap_or('\0') {
            'h' => {
                print!("{}", super::help::text("convert"));
                return Ok(None);
            }
            'f' => o.src_fmt = Some(arg),
            'O' => o.out_fmt = arg,
            'c' => o.compress = true,
            'q' => o.quiet = true,
            'U' => o.force_share = true,
            'n' => o.no_create = true,
            'W' => o.oob_writes = true,
            'p' => o.progress = true,
            'B' => o.backing = Some(arg),
            'F' => o.backing_fmt = Some(arg),
            'm' => {
                let n = parse_c_long(&arg).ok_or_else(|| {
                    Failure::Error(format!("Invalid number of coroutines specified: '{arg}'."))
                })?;
                if !(1..=MAX_PARALLEL).contains(&n) {
                    return Err(Failure::Error(format!(
                        "Invalid number of coroutines specified. Must be between 1 and {MAX_PARALLEL}."
                    )));
                }
                o.parallel = n as usize;
            }
            'T' => {
                o.src_cache = CacheMode::parse(&arg)
                    .ok_or_else(|| Failure::Error(format!("Invalid source cache option: {arg}")))?
            }
            't' => {
                o.cache = CacheMode::parse(&arg)
                    .ok_or_else(|| Failure::Error(format!("Invalid cache option: {arg}")))?
            }
            'o' => {
                o.options = Some(match o.options.take() {
                    Some(prev) => format!("{prev},{arg}"),
                    None => arg,
                })
            }
            'S' => {
                let v = parse_size("x", &arg, 0, MAX_SPARSE)
                    .ok()
                    .filter(|v| v % 512 == 0);
                o.min_sparse = v.ok_or_else(|| {
                    Failure::Error(format!(
                        "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse detection (fully allocates output)."
                    ))
                })? as u64;
            }
            'l' | 'C' | 'r' => {
                return Err(Failure::Error(format!(
                    "option -{} is not supported by this build",
                    char::from_u32(p.id).unwrap_or('?')
                )))
            }
            _ => {}
        }
        match p.id {
            OPT_IMAGE_OPTS | OPT_TARGET_IMAGE_OPTS => {
                return Err(Failure::Error(
                    "--image-opts is not supported by convert".into(),
                ))
            }
            OPT_BITMAPS => o.bitmaps = true,
            OPT_SKIP_BROKEN => o.skip_broken = true,
            OPT_SALVAGE | OPT_TARGET_IS_ZERO => {
                return Err(Failure::Error(
                    "this option of convert is not supported by this build".into(),
                ))
            }
            _ => {}
        }
    }
    if o.skip_broken && !o.bitmaps {
        return Err(Failure::Error(
            "Use of --skip-broken-bitmaps requires --bitmaps".into(),
        ));
    }
    match m.operands.as_slice() {
        [] | [_] => return Err(Failure::Error("Must specify image file name".into())),
        [s, d] => {
            o.src = s.clone();
            o.dst = d.clone();
        }
        _ => {
            return Err(Failure::Error(
                "Only one source image is supported by this build".into(),
            ))
        }
    }
    if o.no_create && o.options.is_some() {
        return Err(Failure::Error(
            "-o has no effect when skipping image creation".into(),
        ));
    }
    Ok(Some(o))
}

/// qemu-img's simple progress meter (`qemu-progress.c`): prints
/// `    (NN.NN/100%)\r` on stdout, tty or not, when the value moved by more
/// than one point, and a newline at the end.
pub(super) struct Progress {
    enabled: bool,
    current: std::cell::Cell<f32>,
    last: std::cell::Cell<f32>,
}

impl Progress {
    pub(super) fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            current: std::cell::Cell::new(0.0),
            last: std::cell::Cell::new(0.0),
        }
    }

    /// `qemu_progress_print(delta, max)`: with `max == 0`, `delta` is the
    /// new value.
    pub(super) fn print(&self, delta: f32, max: i32) {
        if !self.enabled {
            return;
        }
        let mut cur = if max == 0 {
            delta
        } else {
            self.current.get() + delta / 100.0 * max as f32
        };
        if cur > 100.0 {
            cur = 100.0;
        }
        self.current.set(cur);
        let last = self.last.get();
        if cur > last + 1.0 || cur < last - 1.0 || cur == 0.0 || cur == 100.0 {
            self.last.set(cur);
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "    ({:.2}/100%)\r", cur as f64);
            let _ = out.flush();
        }
    }

    pub(super) fn end(&self) {
        if self.enabled {
            println!();
        }
    }
}

fn convert(o: &Opts, progress: &Progress) -> Result<(), Failure> {
    let env = Env::new()?;
    let src = env.block_on(env.open_with(
        &o.src,
        o.src_fmt.as_deref(),
        false,
        o.force_share,
        false,
        o.src_cache,
    ))?;
    let r = convert_from(&env, o, &src, progress);
    release(src);
    r
}

/// What a chunk of the source needs in the target (qemu-img's
/// `BLK_DATA`, `BLK_ZERO`, `BLK_BACKING_FILE`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Data,
    Zero,
    Backing,
}

/// One step of the copy.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    off: u64,
    len: u64,
    kind: Kind,
}

/// Hands out write turns in chunk order, so that a qcow2 target allocates
/// its clusters in guest order however the reads complete.
#[derive(Default)]
struct Turns {
    next: std::cell::Cell<usize>,
    waiting: std::cell::RefCell<Vec<std::task::Waker>>,
}

impl Turns {
    async fn wait(&self, turn: usize) {
        std::future::poll_fn(|cx| {
            if self.next.get() == turn {
                std::task::Poll::Ready(())
            } else {
                self.waiting.borrow_mut().push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }

    fn pass(&self) {
        self.next.set(self.next.get() + 1);
        for w in self.waiting.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

fn convert_from(
    env: &Env,
    o: &Opts,
    src: &BlockBackend,
    progress: &Progress,
) -> Result<(), Failure> {
    if !matches!(o.out_fmt.as_str(), "raw" | "qcow2") {
        return Err(Failure::Error(format!(
            "Unknown file format '{}'",
            o.out_fmt
        )));
    }
    if o.compress && o.out_fmt != "qcow2" {
        return Err(Failure::Error(
            "Compression not supported for this file format".into(),
        ));
    }
    let size = src.size();
    // As qemu-img: the source's bitmaps are checked before the target is
    // created, the target's support after.
    let bitmaps = match (o.bitmaps, src.root()) {
        (true, Some(top)) => source_bitmaps(&top, o.skip_broken)?,
        _ => Vec::new(),
    };
    if !o.no_create {
        if o.backing.is_some() && o.out_fmt == "raw" {
            return Err(Failure::Error(
                "Backing file not supported for file format 'raw'".into(),
            ));
        }
        if o.backing.is_some() && o.backing_fmt.is_none() {
            return Err(Failure::Error(
                "Use of backing file requires explicit backing format".into(),
            ));
        }
        let a = CreateArgs {
            filename: o.dst.clone(),
            fmt: o.out_fmt.clone(),
            options: o.options.clone(),
            size: Some(size),
            quiet: true,
            backing: o.backing.clone(),
            backing_fmt: o.backing_fmt.clone(),
            ..CreateArgs::default()
        };
        create(&a).map_err(|m| {
            if m.starts_with("Invalid parameter") || m.starts_with("Parameter '") {
                Failure::Error(m)
            } else {
                Failure::Error(format!(
                    "{}: error while converting {}: {m}",
                    o.dst, o.out_fmt
                ))
            }
        })?;
    }
    let top = src
        .root()
        .ok_or_else(|| Failure::Error("no medium".into()))?;
    let fail = |e: block_core::Error| Failure::Error(format!("error while writing at byte 0: {e}"));
    // The compressing writer opens the image itself (one writer at a
    // time), so it is only looked at through its header here.
    let dst = if o.compress {
        None
    } else {
        // qemu-img opens the target with BDRV_O_UNMAP when it looks for
        // sparse areas: clusters that zero writes free are discarded.
        let unmap = o.min_sparse != 0;
        Some(env.block_on(env.open_with(&o.dst, Some(&o.out_fmt), true, false, unmap, o.cache))?)
    };
    if o.bitmaps && o.out_fmt != "qcow2" {
        if let Some(d) = dst {
            release(d);
        }
        return Err(Failure::Error(format!(
            "Format driver '{}' does not support bitmaps",
            o.out_fmt
        )));
    }
    let dst_size = match &dst {
        Some(d) => d.size(),
        None => read_qcow2_header(&o.dst)?.size,
    };
    if dst_size < size {
        if let Some(d) = dst {
            release(d);
        }
        return Err(Failure::Error(
            "output file is smaller than input file".into(),
        ));
    }
    let target_backing = o.backing.is_some();
    // Where the target's backing file ends, zeros need not be written.
    let backing_end = dst
        .as_ref()
        .and_then(|d| d.root())
        .and_then(|n| n.backing())
        .map(|b| b.size())
        .unwrap_or(0);
    // A new target without a backing file reads as zeros already.
    let zero_init = !o.no_create && !target_backing;
    let cs = if o.compress {
        read_qcow2_header(&o.dst)?.cluster_size()
    } else {
        CHUNK
    };
    let plan = env.block_on(plan(env, o, &top, size, cs, target_backing, backing_end));
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            if let Some(d) = dst {
                release(d);
            }
            return Err(fail(e));
        }
    };
    let total: u64 = plan
        .iter()
        .filter(|c| c.kind == Kind::Data)
        .map(|c| c.len)
        .sum();
    let done = std::cell::Cell::new(0u64);
    let step_done = |c: &Chunk| {
        if c.kind == Kind::Data {
            done.set(done.get() + c.len);
            progress.print((100.0 * done.get() as f64 / total as f64) as f32, 0);
        }
    };
    if o.compress {
        // Compression happens inside the cluster write, so these writes
        // are never ordered: ordering them would serialise compression.
        return env.block_on(async {
            let img = open_qcow2_with(&env.graph, &o.dst, true, false, false, o.cache).await?;
            let next = std::cell::Cell::new(0usize);
            let worker = || async {
                loop {
                    let i = next.get();
                    let Some(c) = plan.get(i) else {
                        return Ok::<_, block_core::Error>(());
                    };
                    if c.kind != Kind::Data {
                        next.set(i + 1);
                        if c.kind == Kind::Zero && !zero_init {
                            // A target holding data gets a write-zeroes, as
                            // from qemu-img.
                            img.write_zeroes(c.off, c.len).await?;
                        }
                        continue;
                    }
                    // A run of data clusters is read, compressed and
                    // written as one: per cluster, the thread hand-offs
                    // would cost as much as the compression.
                    let run = plan[i..]
                        .iter()
                        .take_while(|d| d.kind == Kind::Data && d.off - c.off < CHUNK)
                        .count();
                    next.set(i + run);
                    let last = &plan[i + run - 1];
                    let len = (last.off + last.len - c.off) as usize;
                    let b = src.pread(c.off, IoBuf::for_read(len)).await?;
                    write_compressed_run(&img, c.off, b, cs as usize, o.min_sparse, zero_init)
                        .await?;
                    for d in &plan[i..i + run] {
                        step_done(d);
                    }
                }
            };
            let r = join_all((0..o.parallel).map(|_| worker()).collect())
                .await
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
                .map(|_| ());
            let r = r.map_err(fail).and_then(|()| {
                bitmaps.iter().try_for_each(|b| {
                    img.add_bitmap(copy_of(b, img.size()))
                        .map_err(|e| bitmap_failure(b.name(), &e))
                })
            });
            // Closed whatever happened: the copy's metadata must reach the
            // file.
            let c = img.close().await.map_err(fail);
            r.and(c)
        });
    }
    let Some(dst) = dst else {
        return Err(Failure::Error("no target".into()));
    };
    let r = env.block_on(async {
        let next = std::cell::Cell::new(0usize);
        let turns = Turns::default();
        // After a failure no new chunk is started (claimed ones finish, so
        // that every write turn is passed on).
        let failed = std::cell::Cell::new(false);
        let worker = || async {
            loop {
                let i = next.get();
                let Some(c) = plan.get(i).filter(|_| !failed.get()) else {
                    return Ok::<_, Failure>(());
                };
                next.set(i + 1);
                let data = match c.kind {
                    Kind::Data => Some(src.pread(c.off, IoBuf::zeroed(c.len as usize)).await),
                    _ => None,
                };
                if !o.oob_writes {
                    turns.wait(i).await;
                }
                let at = |what: &str, e: block_core::Error| {
                    Failure::Error(format!("error while {what} at byte {}: {e}", c.off))
                };
                let r = match (c.kind, data) {
                    (Kind::Data, Some(Ok(b))) => {
                        write_sparse(&dst, c.off, &b, o.min_sparse, zero_init)
                            .await
                            .map_err(|e| at("writing", e))
                    }
                    (_, Some(Err(e))) => Err(at("reading", e)),
                    (Kind::Zero, _) if !zero_init => {
                        let f = WriteFlags {
                            may_unmap: true,
                            ..WriteFlags::default()
                        };
                        dst.pwrite_zeroes(c.off, c.len, f)
                            .await
                            .map_err(|e| at("writing", e))
                    }
                    _ => Ok(()),
                };
                match &r {
                    Ok(()) => step_done(c),
                    Err(_) => failed.set(true),
                }
                if !o.oob_writes {
                    turns.pass();
                }
                r?;
            }
        };
        let r = join_all((0..o.parallel).map(|_| worker()).collect())
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ());
        if r.is_ok() {
            // Stored in the image when the node closes.
            if let Some(n) = dst.root() {
                for b in &bitmaps {
                    n.add_dirty_bitmap(Rc::new(copy_of(b, n.size())))
                        .map_err(|e| bitmap_failure(b.name(), &e))?;
                }
            }
        }
        match r {
            Ok(()) => dst.flush().await.map_err(fail),
            Err(e) => Err(e),
        }
    });
    release(dst);
    r
}

/// The source's persistent bitmaps to copy (`--bitmaps`), newest first;
/// inconsistent ones refuse the copy unless `skip_broken`.
fn source_bitmaps(
    top: &Rc<block_core::Node>,
    skip_broken: bool,
) -> Result<Vec<Rc<block_core::DirtyBitmap>>, Failure> {
    if top.format_name() != "qcow2" {
        return Err(Failure::Error("Source lacks bitmap support".into()));
    }
    let mut out = Vec::new();
    for b in top
        .dirty_bitmaps()
        .into_iter()
        .filter(|b| b.is_persistent())
    {
        if b.is_inconsistent() {
            if skip_broken {
                eprintln!(
                    "{}: warning: Skipping inconsistent bitmap '{}'",
                    super::PROG,
                    b.name()
                );
                continue;
            }
            return Err(Failure::Error(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use '{} bitmap --remove' to delete it",
                b.name(),
                super::PROG
            )));
        }
        out.push(b);
    }
    Ok(out)
}

/// qemu-img's message for a bitmap that cannot be created in the target.
fn bitmap_failure(name: &str, e: &block_core::Error) -> Failure {
    Failure::Error(format!("Failed to create bitmap {name}: {e}"))
}

/// A persistent copy of `b` for a target of `size` bytes: same name,
/// granularity, recording state and bits.
fn copy_of(b: &block_core::DirtyBitmap, size: u64) -> block_core::DirtyBitmap {
    let c = block_core::DirtyBitmap::new(b.name(), size, b.granularity(), b.is_recording())
        .persistent(false, false);
    c.merge_from(b);
    c
}

/// Splits the source into chunks as `convert_iteration_sectors` does: at
/// most `step` bytes each, of one status. With a backing file for the
/// target only the source's top layer counts: what it leaves unallocated
/// comes from the backing file.
async fn plan(
    env: &Env,
    o: &Opts,
    top: &std::rc::Rc<block_core::Node>,
    size: u64,
    step: u64,
    target_backing: bool,
    backing_end: u64,
) -> block_core::Result<Vec<Chunk>> {
    let mut out = Vec::new();
    let mut off = 0;
    // For compressed output, where chunks are single clusters, one status
    // query serves all the clusters of its extent, as qemu-img's
    // `sector_next_status` does: a query per cluster costs more than the
    // copy of a sparse raw source.
    let mut known: Option<(u64, Kind)> = None;
    while off < size {
        let want = (size - off).min(step);
        let (len, mut kind) = if let Some((end, k)) = known.filter(|&(end, _)| end > off) {
            ((end - off).min(want), k)
        } else if target_backing {
            let st = top.block_status(off, want).await?;
            let below = top.backing().is_some_and(|b| off < b.size());
            let kind = if st.zero || (!st.data && !st.allocated && !below) {
                if off >= backing_end && backing_end > 0 {
                    Kind::Backing
                } else {
                    Kind::Zero
                }
            } else if st.data {
                Kind::Data
            } else {
                Kind::Backing
            };
            (st.len.min(want), kind)
        } else if o.compress {
            let e = block_status(&env.graph, top, off, size - off).await?;
            let kind = if e.zero { Kind::Zero } else { Kind::Data };
            known = Some((off + e.length, kind));
            (e.length.min(want), kind)
        } else {
            let e = block_status(&env.graph, top, off, want).await?;
            let kind = if e.zero { Kind::Zero } else { Kind::Data };
            (e.length.min(want), kind)
        };
        // Compressed writes cover whole clusters: a cluster that is only
        // partly zero (or partly in the backing file) is copied.
        if o.compress && len < want {
            kind = Kind::Data;
        }
        let len = if o.compress { want } else { len };
        if kind == Kind::Zero && o.min_sparse == 0 {
            kind = Kind::Data;
        }
        out.push(Chunk { off, len, kind });
        off += len;
    }
    Ok(out)
}

/// Writes the clusters of `data` (at cluster-aligned `off`) compressed,
/// except all-zero clusters when looking for sparse areas (`min_sparse`
/// not 0): those are left out on a target that reads as zeros
/// (`zero_init`), else zeroed, as qemu-img does.
async fn write_compressed_run(
    img: &formats::qcow2::image::Image<'_>,
    off: u64,
    mut data: IoBuf,
    cs: usize,
    min_sparse: u64,
    zero_init: bool,
) -> block_core::Result<()> {
    let zero = |d: &[u8], k: usize| {
        min_sparse != 0 && block_core::buf::is_zero(&d[k..(k + cs).min(d.len())])
    };
    let mut at = off;
    while !data.is_empty() {
        let z = zero(&data, 0);
        let mut e = cs;
        while e < data.len() && zero(&data, e) == z {
            e += cs;
        }
        let run = data.split_to(e.min(data.len()));
        let n = run.len() as u64;
        if !z {
            img.write_compressed(at, run).await?;
        } else if !zero_init {
            img.write_zeroes(at, n).await?;
        }
        at += n;
    }
    Ok(())
}

/// Writes `data` at `off`, except the `min_sparse`-sized blocks (aligned
/// to the image) that are all zeros: those are left out on a target that
/// reads as zeros (`zero_init`), else zeroed with a write-zeroes that may
/// unmap, as qemu-img does. `min_sparse == 0` writes all.
async fn write_sparse(
    dst: &BlockBackend,
    off: u64,
    data: &[u8],
    min_sparse: u64,
    zero_init: bool,
) -> block_core::Result<()> {
    if min_sparse == 0 {
        dst.pwrite(off, IoBuf::from_slice(data), WriteFlags::default())
            .await?;
        return Ok(());
    }
    let end = off + data.len() as u64;
    // Runs of blocks of one kind: (zero, start, end).
    let mut runs: Vec<(bool, u64, u64)> = Vec::new();
    let mut pos = off;
    while pos < end {
        let next = (((pos / min_sparse) + 1) * min_sparse).min(end);
        let zero = data[(pos - off) as usize..(next - off) as usize]
            .iter()
            .all(|&b| b == 0);
        match runs.last_mut() {
            Some(r) if r.0 == zero => r.2 = next,
            _ => runs.push((zero, pos, next)),
        }
        pos = next;
    }
    for (zero, s, e) in runs {
        if !zero {
            let d = &data[(s - off) as usize..(e - off) as usize];
            dst.pwrite(s, IoBuf::from_slice(d), WriteFlags::default())
                .await?;
        } else if !zero_init {
            let f = WriteFlags {
                may_unmap: true,
                ..WriteFlags::default()
            };
            dst.pwrite_zeroes(s, e - s, f).await?;
        }
    }
    Ok(())
}

/// Runs borrowed futures concurrently on the current task and returns
/// their results in order.
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Opts {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        parse(&args).ok().flatten().expect("valid command line")
    }

    /// qemu-img writes the copy with `cache=unsafe` unless told otherwise:
    /// no flush at the end, which for a large target costs as much as the
    /// copy itself. The source is read write-back.
    #[test]
    fn target_cache_defaults_to_unsafe_as_in_qemu_img() {
        let o = opts(&["a", "b"]);
        assert_eq!(
            (o.cache, o.src_cache),
            (CacheMode::Unsafe, CacheMode::Writeback)
        );
        let o = opts(&["-t", "none", "-T", "directsync", "a", "b"]);
        assert_eq!(
            (o.cache, o.src_cache),
            (CacheMode::None, CacheMode::DirectSync)
        );
        let o = opts(&["-t", "writeback", "a", "b"]);
        assert!(!o.cache.no_flush());
        let bad: Vec<String> = ["-t", "bogus", "a", "b"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert!(parse(&bad).is_err());
    }
}
