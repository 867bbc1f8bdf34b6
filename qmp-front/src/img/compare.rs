//! `strata-img compare`: qemu-img's `compare`. Walks both images by block
//! status (through their backing chains); ranges zero in both are skipped,
//! ranges allocated in both are read and compared, a range allocated in
//! only one must read as zeros there. Mismatches are reported at 512-byte
//! granularity like `img_compare`. Exit statuses: 0 identical, 1 different,
//! 2 an image could not be opened or read.

use std::rc::Rc;

use block_core::{BlockBackend, IoBuf, Node};

use super::common::{release, Env};
use super::getopt::{getopt_long, LongOpt};
use super::map::{block_status, MapEntry};
use super::{Failure, PROG};

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::value("object", OPT_OBJECT),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::flag("force-share", 'U' as u32),
    LongOpt::value("a-format", 'f' as u32),
    LongOpt::value("b-format", 'F' as u32),
    LongOpt::value("cache", 'T' as u32),
    LongOpt::flag("progress", 'p' as u32),
    LongOpt::flag("quiet", 'q' as u32),
    LongOpt::flag("strict", 's' as u32),
];

/// Bytes compared per read (QEMU's `IO_BUF_SIZE`).
const IO_BUF: u64 = 2 << 20;
const SECTOR: usize = 512;

/// The `compare` subcommand for the command table.
pub fn run(args: &[String]) -> Result<(), Failure> {
    use std::io::Write;
    match run_status(args)? {
        0 => Ok(()),
        n => {
            let _ = std::io::stdout().flush();
            std::process::exit(n)
        }
    }
}

struct Ctx {
    quiet: bool,
}

impl Ctx {
    fn say(&self, s: &str) {
        if !self.quiet {
            println!("{s}");
        }
    }
}

/// Runs `compare`; returns the exit status.
pub fn run_status(args: &[String]) -> Result<i32, Failure> {
    let m = getopt_long(args, "hf:F:T:pqsU", LONGS)?;
    let (mut fmt1, mut fmt2) = (None, None);
    let mut strict = false;
    let mut quiet = false;
    let mut force_share = false;
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match p.id {
            id if id == 'h' as u32 => {
                print!("{}", super::help::text("compare"));
                return Ok(0);
            }
            id if id == 'f' as u32 => fmt1 = Some(arg),
            id if id == 'F' as u32 => fmt2 = Some(arg),
            id if id == 's' as u32 => strict = true,
            id if id == 'q' as u32 => quiet = true,
            id if id == 'U' as u32 => force_share = true,
            id if id == 'T' as u32 && super::open::CacheMode::parse(&arg).is_none() => {
                eprintln!("{PROG}: Invalid source cache option: {arg}");
                return Ok(2);
            }
            OPT_IMAGE_OPTS => {
                return Err(Failure::Error(
                    "--image-opts is not supported by compare".into(),
                ))
            }
            _ => {}
        }
    }
    let [f1, f2] = m.operands.as_slice() else {
        return Err(Failure::Usage("Expecting two image file names".into()));
    };
    let env = Env::new()?;
    let blk1 = match env.block_on(env.open(f1, fmt1.as_deref(), false, force_share)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{PROG}: {}", e.0);
            return Ok(2);
        }
    };
    let blk2 = match env.block_on(env.open(f2, fmt2.as_deref(), false, force_share)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{PROG}: {}", e.0);
            release(blk1);
            return Ok(2);
        }
    };
    let c = Ctx { quiet };
    let r = env.block_on(compare(&env, &c, (&blk1, f1), (&blk2, f2), strict));
    release(blk1);
    release(blk2);
    Ok(match r {
        Ok(n) => n,
        Err(msg) => {
            eprintln!("{PROG}: {msg}");
            4
        }
    })
}

/// Offset of the first 512-byte sector where `a` and `b` differ.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

fn first_nonzero(a: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .position(|x| x.iter().any(|&b| b != 0))
        .map(|i| i * SECTOR)
}

fn status_key(e: &MapEntry) -> (bool, bool, bool, bool) {
    (e.data, e.zero, e.present, e.offset.is_some())
}

async fn read(blk: &BlockBackend, name: &str, off: u64, len: u64) -> Result<IoBuf, String> {
    blk.pread(off, IoBuf::zeroed(len as usize))
        .await
        .map_err(|e| format!("Error while reading offset {off} of {name}: {e}"))
}

async fn check_empty(
    c: &Ctx,
    blk: &BlockBackend,
    name: &str,
    off: u64,
    len: u64,
) -> Result<bool, String> {
    let b = read(blk, name, off, len).await?;
    if let Some(i) = first_nonzero(&b) {
        c.say(&format!("Content mismatch at offset {}!", off + i as u64));
        return Ok(false);
    }
    Ok(true)
}

fn top(blk: &BlockBackend) -> Result<Rc<Node>, String> {
    blk.root().ok_or_else(|| "no medium".to_owned())
}

async fn compare(
    env: &Env,
    c: &Ctx,
    (b1, n1): (&BlockBackend, &str),
    (b2, n2): (&BlockBackend, &str),
    strict: bool,
) -> Result<i32, String> {
    let (s1, s2) = (b1.size(), b2.size());
    let (t1, t2) = (top(b1)?, top(b2)?);
    if strict && s1 != s2 {
        c.say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let total = s1.min(s2);
    let mut off = 0;
    while off < total {
        let e1 = block_status(&env.graph, &t1, off, s1 - off)
            .await
            .map_err(|e| format!("Block status problem at offset {off} of {n1}: {e}"))?;
        let e2 = block_status(&env.graph, &t2, off, s2 - off)
            .await
            .map_err(|e| format!("Block status problem at offset {off} of {n2}: {e}"))?;
        let mut chunk = e1.length.min(e2.length).min(total - off);
        if strict && status_key(&e1) != status_key(&e2) {
            c.say(&format!("Strict mode: Offset {off} block status mismatch!"));
            return Ok(1);
        }
        if e1.zero && e2.zero {
            // Both read as zeros.
        } else if e1.present == e2.present {
            if e1.present {
                chunk = chunk.min(IO_BUF);
                let a = read(b1, n1, off, chunk).await?;
                let b = read(b2, n2, off, chunk).await?;
                if let Some(i) = first_diff(&a, &b) {
                    c.say(&format!("Content mismatch at offset {}!", off + i as u64));
                    return Ok(1);
                }
            }
        } else {
            chunk = chunk.min(IO_BUF);
            let ok = if e1.present {
                check_empty(c, b1, n1, off, chunk).await?
            } else {
                check_empty(c, b2, n2, off, chunk).await?
            };
            if !ok {
                return Ok(1);
            }
        }
        off += chunk;
    }
    if s1 != s2 {
        let (over, tover, nover, sover) = if s1 > s2 {
            (b1, &t1, n1, s1)
        } else {
            (b2, &t2, n2, s2)
        };
        c.say("Warning: Image size mismatch!");
        let mut off = total;
        while off < sover {
            let e = block_status(&env.graph, tover, off, sover - off)
                .await
                .map_err(|e| format!("Block status problem at offset {off} of {nover}: {e}"))?;
            let mut chunk = e.length;
            if e.present {
                chunk = chunk.min(IO_BUF);
                if !check_empty(c, over, nover, off, chunk).await? {
                    return Ok(1);
                }
            }
            off += chunk;
        }
    }
    c.say("Images are identical.");
    Ok(0)
}
