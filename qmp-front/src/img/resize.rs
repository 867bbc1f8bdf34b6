//! `strata-img resize`: qemu-img's `resize` for raw and qcow2. The size is
//! the last argument and is taken off before option parsing (so that
//! `-1M` is not read as an option), may be relative (`+`/`-`), and a
//! smaller size needs `--shrink`, as in `img_resize`.

use block_core::{Perm, Prealloc};

use super::common::{release, Env};
use super::getopt::{getopt_long, LongOpt};
use super::num::parse_size;
use super::{Failure, PROG};

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_PREALLOCATION: u32 = 258;
const OPT_SHRINK: u32 = 259;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::flag("quiet", 'q' as u32),
    LongOpt::value("object", OPT_OBJECT),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::value("preallocation", OPT_PREALLOCATION),
    LongOpt::flag("shrink", OPT_SHRINK),
];

/// The `resize` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    // A negative size right after an operand is taken off before option
    // parsing, so that getopt does not read it as an option.
    let n = args.len();
    let negative_last = n >= 2
        && args[n - 1].starts_with('-')
        && args[n - 1][1..].starts_with(|c: char| c.is_ascii_digit())
        && !args[n - 2].starts_with('-');
    let (rest, taken) = if negative_last {
        (&args[..n - 1], Some(args[n - 1].clone()))
    } else {
        (args, None)
    };
    let m = getopt_long(rest, "f:hq", LONGS)?;
    let mut fmt = None;
    let mut quiet = false;
    let mut shrink = false;
    let mut prealloc = Prealloc::Off;
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match p.id {
            id if id == 'h' as u32 => {
                print!("{}", help());
                return Ok(());
            }
            id if id == 'f' as u32 => fmt = Some(arg),
            id if id == 'q' as u32 => quiet = true,
            OPT_SHRINK => shrink = true,
            OPT_PREALLOCATION => {
                prealloc = match arg.as_str() {
                    "off" => Prealloc::Off,
                    "metadata" => Prealloc::Metadata,
                    "falloc" => Prealloc::Falloc,
                    "full" => Prealloc::Full,
                    _ => {
                        return Err(Failure::Error(format!(
                            "Invalid preallocation mode '{arg}'"
                        )))
                    }
                }
            }
            OPT_IMAGE_OPTS => {
                return Err(Failure::Error(
                    "--image-opts is not supported by resize".into(),
                ))
            }
            _ => {}
        }
    }
    let mut operands = m.operands.clone();
    operands.extend(taken);
    let (filename, size_arg) = match operands.as_slice() {
        [f, s] => (f.clone(), s.clone()),
        [] | [_] => return Err(Failure::Usage("Expecting image file name and size".into())),
        _ => return Err(Failure::Usage("Extra argument(s) in command line".into())),
    };
    let (relative, num) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i128, &size_arg[1..]),
        Some(b'-') => (-1i128, &size_arg[1..]),
        _ => (0, size_arg.as_str()),
    };
    let n = parse_size("size", num, 0, i64::MAX).map_err(|_| {
        Failure::Error(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
                .into(),
        )
    })? as i128;
    let env = Env::new()?;
    let blk = env.block_on(env.open(&filename, fmt.as_deref(), true, false))?;
    let r = (|| {
        let current = blk.size() as i128;
        let total = if relative != 0 {
            current + n * relative
        } else {
            n
        };
        if total <= 0 {
            return Err(Failure::Error("New image size must be positive".into()));
        }
        if total <= current && prealloc != Prealloc::Off {
            return Err(Failure::Error(
                "Preallocation can only be used for growing images".into(),
            ));
        }
        if total < current && !shrink {
            eprintln!("{PROG}: Use the --shrink option to perform a shrink operation.");
            return Err(Failure::Error(
                "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."
                    .into(),
            ));
        }
        blk.set_perm(
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
        .map_err(|e| Failure::Error(e.to_string()))?;
        env.block_on(blk.truncate(total as u64, true, prealloc))
            .map_err(|e| Failure::Error(qemu_wording(&e.to_string())))?;
        if !quiet {
            println!("Image resized.");
        }
        Ok(())
    })();
    release(blk);
    r
}

/// The qcow2 driver's messages in QEMU's words.
fn qemu_wording(msg: &str) -> String {
    if msg == "Image size must be a multiple of 512 bytes" {
        "The new size must be a multiple of 512".into()
    } else {
        msg.to_owned()
    }
}

fn help() -> String {
    super::help::text("resize")
}
