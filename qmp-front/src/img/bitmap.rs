//! `strata-img bitmap`: qemu-img's `bitmap`, changes to a qcow2 image's
//! persistent dirty bitmaps. The actions run in command-line order on the
//! image opened outside the graph; the image stores its bitmaps when it
//! closes, so actions done before a failing one stay done, as in qemu-img.

use std::rc::Rc;

use block_core::dirty::{check_granularity, check_new_name, default_granularity, BitmapUse};
use block_core::DirtyBitmap;
use formats::qcow2::image::Image;

use super::common::{open_qcow2_with, Env};
use super::getopt::{getopt_long, LongOpt};
use super::num::parse_size;
use super::open::CacheMode;
use super::Failure;

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_ADD: u32 = 258;
const OPT_REMOVE: u32 = 259;
const OPT_CLEAR: u32 = 260;
const OPT_ENABLE: u32 = 261;
const OPT_DISABLE: u32 = 262;
const OPT_MERGE: u32 = 263;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::value("object", OPT_OBJECT),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::flag("add", OPT_ADD),
    LongOpt::flag("remove", OPT_REMOVE),
    LongOpt::flag("clear", OPT_CLEAR),
    LongOpt::flag("enable", OPT_ENABLE),
    LongOpt::flag("disable", OPT_DISABLE),
    LongOpt::value("merge", OPT_MERGE),
    LongOpt::value("granularity", 'g' as u32),
    LongOpt::value("source-file", 'b' as u32),
    LongOpt::value("source-format", 'F' as u32),
];

/// One action, in command-line order.
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn verb(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The `bitmap` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let m = getopt_long(args, "b:f:F:g:h", LONGS)?;
    let mut actions = Vec::new();
    let (mut fmt, mut src_file, mut src_fmt) = (None, None, None);
    let mut granularity = 0u64;
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match p.id {
            id if id == 'h' as u32 => {
                print!("{}", super::help::text("bitmap"));
                return Ok(());
            }
            id if id == 'f' as u32 => fmt = Some(arg),
            id if id == 'b' as u32 => src_file = Some(arg),
            id if id == 'F' as u32 => src_fmt = Some(arg),
            id if id == 'g' as u32 => {
                granularity = parse_size("granularity", &arg, 0, i64::MAX)
                    .map_err(|e| Failure::Error(e.to_string()))?
                    as u64
            }
            OPT_ADD => actions.push(Action::Add),
            OPT_REMOVE => actions.push(Action::Remove),
            OPT_CLEAR => actions.push(Action::Clear),
            OPT_ENABLE => actions.push(Action::Enable),
            OPT_DISABLE => actions.push(Action::Disable),
            OPT_MERGE => actions.push(Action::Merge(arg)),
            OPT_OBJECT | OPT_IMAGE_OPTS => {
                return Err(Failure::Error(
                    "--object and --image-opts are not supported by bitmap".into(),
                ))
            }
            _ => {}
        }
    }
    let err = |m: &str| Err(Failure::Error(m.into()));
    if actions.is_empty() {
        return err(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        );
    }
    if granularity != 0 && !actions.iter().any(|a| matches!(a, Action::Add)) {
        return err("granularity only supported with --add");
    }
    if src_fmt.is_some() && src_file.is_none() {
        return err("-F only supported with -b");
    }
    if src_file.is_some() && !actions.iter().any(|a| matches!(a, Action::Merge(_))) {
        return err("Merge bitmap source file only supported with --merge");
    }
    let [filename, bitmap] = m.operands.as_slice() else {
        return err("Expecting filename and bitmap name");
    };
    let env = Env::new()?;
    if !is_qcow2(filename, fmt.as_deref())? {
        // Only qcow2 stores bitmaps; there are none to change either.
        let a = &actions[0];
        let why = match a {
            Action::Add => {
                format!("Can't store persistent bitmaps to {filename}: Operation not supported")
            }
            Action::Merge(_)
            | Action::Remove
            | Action::Clear
            | Action::Enable
            | Action::Disable => {
                format!("Dirty bitmap '{bitmap}' not found")
            }
        };
        return Err(failed(a, bitmap, &why));
    }
    env.block_on(async {
        let img = open_qcow2_with(
            &env.graph,
            filename,
            true,
            false,
            false,
            CacheMode::Writeback,
        )
        .await?;
        let src = match &src_file {
            Some(f) if !is_qcow2(f, src_fmt.as_deref())? => None,
            Some(f) => Some(
                open_qcow2_with(&env.graph, f, false, false, false, CacheMode::Writeback).await?,
            ),
            None => None,
        };
        let mut r = Ok(());
        for a in &actions {
            let from = if src_file.is_some() {
                src.as_ref()
            } else {
                Some(&img)
            };
            if let Err(why) = act(&img, from, a, bitmap, granularity) {
                r = Err(failed(a, bitmap, &why));
                break;
            }
        }
        // Stored even after a failed action: what went before stays.
        let closed = img.close().await.map_err(|e| Failure::Error(e.to_string()));
        if let Some(s) = src {
            let _ = s.close().await;
        }
        r.and(closed)
    })
}

fn failed(a: &Action, bitmap: &str, why: &str) -> Failure {
    Failure::Error(format!(
        "Operation {} on bitmap {bitmap} failed: {why}",
        a.verb()
    ))
}

/// Whether `path` is to be treated as qcow2: `-f` says so, or its magic.
fn is_qcow2(path: &str, fmt: Option<&str>) -> Result<bool, Failure> {
    let probed = super::open::probe_format(path).map_err(|e| {
        let why = super::open::strerror(&e);
        Failure::Error(format!(
            "Could not open '{path}': Could not open '{path}': {why}"
        ))
    })?;
    Ok(fmt.unwrap_or(probed) == "qcow2")
}

/// One action on `img` (`from` holds merge sources; `None` when the
/// source file has no bitmaps), with QEMU's messages.
fn act(
    img: &Image<'_>,
    from: Option<&Image<'_>>,
    a: &Action,
    name: &str,
    granularity: u64,
) -> Result<(), String> {
    let find = |i: &Image<'_>, n: &str| -> Result<Rc<DirtyBitmap>, String> {
        i.bitmaps()
            .into_iter()
            .find(|b| b.name() == n)
            .ok_or_else(|| format!("Dirty bitmap '{n}' not found"))
    };
    let check = |b: &DirtyBitmap, u: BitmapUse| b.check(u).map_err(|e| e.to_string());
    match a {
        Action::Add => {
            if name.is_empty() {
                return Err("Bitmap name cannot be empty".into());
            }
            let q = img.driver();
            let default = default_granularity(Some(q.header().cluster_size()));
            let asked = (granularity != 0).then_some(granularity);
            let g = check_granularity(asked, default).map_err(|e| e.to_string())?;
            let taken = img.bitmaps().iter().any(|b| b.name() == name);
            check_new_name(name, taken).map_err(|e| e.to_string())?;
            q.can_store_bitmap(name, img.bitmaps().len())
                .map_err(|why| format!("Can't make bitmap '{name}' persistent: {why}"))?;
            let b = DirtyBitmap::new(name, img.size(), g, true).persistent(false, false);
            img.add_bitmap(b).map_err(|e| e.to_string())
        }
        Action::Remove => {
            let b = find(img, name)?;
            check(&b, BitmapUse::Remove)?;
            img.remove_bitmap(name);
            Ok(())
        }
        Action::Clear => {
            let b = find(img, name)?;
            check(&b, BitmapUse::Modify)?;
            b.clear();
            Ok(())
        }
        Action::Enable | Action::Disable => {
            let b = find(img, name)?;
            check(&b, BitmapUse::Read)?;
            b.set_recording(matches!(a, Action::Enable));
            Ok(())
        }
        Action::Merge(src) => {
            let target = find(img, name)?;
            check(&target, BitmapUse::Modify)?;
            let s = match from {
                Some(i) => find(i, src)?,
                None => return Err(format!("Dirty bitmap '{src}' not found")),
            };
            target.check_merge_source(&s).map_err(|e| e.to_string())?;
            target.merge_from(&s);
            Ok(())
        }
    }
}
