//! `strata-img convert`: copies one image (raw or qcow2, its backing chain
//! flattened) into a new raw or qcow2 image, as `qemu-img convert` does.
//!
//! The target is created first with the source's size. Ranges the source
//! reports as zero are not written (a new image reads as zeros); data is
//! read in chunks of up to 2 MiB and written except for the blocks of
//! `-S` bytes (4 KiB by default) that are all zeros, so the output stays
//! sparse. `-S 0` writes everything. With `-c` (qcow2 only) every cluster
//! holding data is written compressed through the format layer.

use super::common::{open_qcow2, read_qcow2_header, release, Env};
use super::create::{create, CreateArgs};
use super::getopt::{getopt_long, HasArg, LongOpt};
use super::map::block_status;
use super::num::parse_size;
use super::Failure;

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
    LongOpt {
        name: "help",
        has_arg: HasArg::No,
        id: 'h' as u32,
    },
    LongOpt {
        name: "quiet",
        has_arg: HasArg::No,
        id: 'q' as u32,
    },
    LongOpt {
        name: "progress",
        has_arg: HasArg::No,
        id: 'p' as u32,
    },
    LongOpt {
        name: "source-format",
        has_arg: HasArg::Required,
        id: 'f' as u32,
    },
    LongOpt {
        name: "source-image-opts",
        has_arg: HasArg::No,
        id: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "image-opts",
        has_arg: HasArg::No,
        id: OPT_IMAGE_OPTS,
    },
    LongOpt {
        name: "source-snapshot",
        has_arg: HasArg::Required,
        id: 'l' as u32,
    },
    LongOpt {
        name: "source-cache",
        has_arg: HasArg::Required,
        id: 'T' as u32,
    },
    LongOpt {
        name: "target-format",
        has_arg: HasArg::Required,
        id: 'O' as u32,
    },
    LongOpt {
        name: "target-image-opts",
        has_arg: HasArg::No,
        id: OPT_TARGET_IMAGE_OPTS,
    },
    LongOpt {
        name: "target-options",
        has_arg: HasArg::Required,
        id: 'o' as u32,
    },
    LongOpt {
        name: "compress",
        has_arg: HasArg::No,
        id: 'c' as u32,
    },
    LongOpt {
        name: "target-cache",
        has_arg: HasArg::Required,
        id: 't' as u32,
    },
    LongOpt {
        name: "backing",
        has_arg: HasArg::Required,
        id: 'B' as u32,
    },
    LongOpt {
        name: "backing-format",
        has_arg: HasArg::Required,
        id: 'F' as u32,
    },
    LongOpt {
        name: "no-create",
        has_arg: HasArg::No,
        id: 'n' as u32,
    },
    LongOpt {
        name: "target-is-zero",
        has_arg: HasArg::No,
        id: OPT_TARGET_IS_ZERO,
    },
    LongOpt {
        name: "sparse-size",
        has_arg: HasArg::Required,
        id: 'S' as u32,
    },
    LongOpt {
        name: "bitmaps",
        has_arg: HasArg::No,
        id: OPT_BITMAPS,
    },
    LongOpt {
        name: "skip-broken-bitmaps",
        has_arg: HasArg::No,
        id: OPT_SKIP_BROKEN,
    },
    LongOpt {
        name: "force-share",
        has_arg: HasArg::No,
        id: 'U' as u32,
    },
    LongOpt {
        name: "rate",
        has_arg: HasArg::Required,
        id: 'r' as u32,
    },
    LongOpt {
        name: "parallel",
        has_arg: HasArg::Required,
        id: 'm' as u32,
    },
    LongOpt {
        name: "copy-range-offloading",
        has_arg: HasArg::No,
        id: 'C' as u32,
    },
    LongOpt {
        name: "salvage",
        has_arg: HasArg::No,
        id: OPT_SALVAGE,
    },
    LongOpt {
        name: "oob-writes",
        has_arg: HasArg::No,
        id: 'W' as u32,
    },
    LongOpt {
        name: "object",
        has_arg: HasArg::Required,
        id: OPT_OBJECT,
    },
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
    src: String,
    dst: String,
}

/// The `convert` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let m = getopt_long(args, "hf:O:B:Cco:l:S:pt:T:qnm:WUr:", LONGS)?;
    let mut o = Opts {
        src_fmt: None,
        out_fmt: "raw".into(),
        options: None,
        compress: false,
        quiet: false,
        min_sparse: 8 * 512,
        force_share: false,
        src: String::new(),
        dst: String::new(),
    };
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match char::from_u32(p.id).unwrap_or('\0') {
            'h' => {
                print!("{}", super::help::text("convert"));
                return Ok(());
            }
            'f' => o.src_fmt = Some(arg),
            'O' => o.out_fmt = arg,
            'c' => o.compress = true,
            'q' => o.quiet = true,
            'U' => o.force_share = true,
            'T' if super::open::CacheMode::parse(&arg).is_none() => {
                return Err(Failure::Error(format!(
                    "Invalid source cache option: {arg}"
                )))
            }
            't' if super::open::CacheMode::parse(&arg).is_none() => {
                return Err(Failure::Error(format!("Invalid cache option: {arg}")))
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
            'B' | 'l' | 'n' | 'C' | 'r' | 'm' => {
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
            OPT_BITMAPS | OPT_SKIP_BROKEN | OPT_SALVAGE | OPT_TARGET_IS_ZERO => {
                return Err(Failure::Error(
                    "this option of convert is not supported by this build".into(),
                ))
            }
            _ => {}
        }
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
    convert(&o)
}

fn convert(o: &Opts) -> Result<(), Failure> {
    let env = Env::new()?;
    let src = env.block_on(env.open(&o.src, o.src_fmt.as_deref(), false, o.force_share))?;
    let r = convert_from(&env, o, &src);
    release(src);
    r
}

fn convert_from(env: &Env, o: &Opts, src: &BlockBackend) -> Result<(), Failure> {
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
    let a = CreateArgs {
        filename: o.dst.clone(),
        fmt: o.out_fmt.clone(),
        options: o.options.clone(),
        size: Some(size),
        quiet: true,
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
    let top = src
        .root()
        .ok_or_else(|| Failure::Error("no medium".into()))?;
    let fail = |e: block_core::Error| Failure::Error(format!("error while writing at byte 0: {e}"));
    if o.compress {
        let cs = read_qcow2_header(&o.dst)?.cluster_size();
        return env.block_on(async {
            let img = open_qcow2(&env.graph, &o.dst, true, false).await?;
            // Several clusters in flight (qemu-img's -m, 8 by default), so
            // compression keeps every worker thread busy while the loop
            // reads and writes.
            let next = std::cell::Cell::new(0u64);
            let worker = || async {
                loop {
                    let off = next.get();
                    if off >= size {
                        return Ok::<_, block_core::Error>(());
                    }
                    let len = cs.min(size - off);
                    next.set(off + len);
                    let e = block_status(&env.graph, &top, off, len).await?;
                    if e.zero && e.length >= len {
                        continue;
                    }
                    let b = src.pread(off, IoBuf::zeroed(len as usize)).await?;
                    if b.iter().any(|&x| x != 0) {
                        img.write_compressed(off, &b).await?;
                    }
                }
            };
            let r = join_all((0..COMPRESS_IN_FLIGHT).map(|_| worker()).collect())
                .await
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
                .map(|_| ());
            let c = img.close().await;
            r.and(c).map_err(fail)
        });
    }
    let dst = env.block_on(env.open(&o.dst, Some(&o.out_fmt), true, false))?;
    let r = env.block_on(async {
        let mut off = 0;
        while off < size {
            let e = block_status(&env.graph, &top, off, (size - off).min(CHUNK)).await?;
            let len = e.length;
            if e.zero && o.min_sparse != 0 {
                off += len;
                continue;
            }
            let b = src.pread(off, IoBuf::zeroed(len as usize)).await?;
            write_sparse(&dst, off, &b, o.min_sparse).await?;
            off += len;
        }
        dst.flush().await
    });
    release(dst);
    r.map_err(fail)
}

/// Writes `data` at `off`, leaving out the `min_sparse`-sized blocks
/// (aligned to the image) that are all zeros; `min_sparse == 0` writes all.
async fn write_sparse(
    dst: &BlockBackend,
    off: u64,
    data: &[u8],
    min_sparse: u64,
) -> block_core::Result<()> {
    if min_sparse == 0 {
        dst.pwrite(off, IoBuf::from_slice(data), WriteFlags::default())
            .await?;
        return Ok(());
    }
    let end = off + data.len() as u64;
    let mut pos = off;
    let mut run_start: Option<u64> = None;
    while pos < end {
        let next = ((pos / min_sparse) + 1) * min_sparse;
        let next = next.min(end);
        let blk = &data[(pos - off) as usize..(next - off) as usize];
        let zero = blk.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                let d = &data[(s - off) as usize..(pos - off) as usize];
                dst.pwrite(s, IoBuf::from_slice(d), WriteFlags::default())
                    .await?;
                run_start = None;
            }
            _ => {}
        }
        pos = next;
    }
    if let Some(s) = run_start {
        let d = &data[(s - off) as usize..];
        dst.pwrite(s, IoBuf::from_slice(d), WriteFlags::default())
            .await?;
    }
    Ok(())
}

/// Clusters compressed at once by `convert -c` (qemu-img's default `-m`).
const COMPRESS_IN_FLIGHT: usize = 8;

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
