//! `strata-img snapshot`: lists, creates, deletes and applies qcow2
//! internal snapshots like `qemu-img snapshot`. Deleting looks the snapshot
//! up by name only, applying by id or name, as qemu-img does; the list
//! layout is QEMU's `bdrv_snapshot_dump` (dates in UTC).

use super::common::{open_qcow2, release, snapshot_row, Env};
use super::getopt::{getopt_long, LongOpt};
use super::open::probe_format;
use super::Failure;

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::flag("quiet", 'q' as u32),
    LongOpt::value("object", OPT_OBJECT),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::flag("force-share", 'U' as u32),
    LongOpt::flag("list", 'l' as u32),
    LongOpt::value("apply", 'a' as u32),
    LongOpt::value("create", 'c' as u32),
    LongOpt::value("delete", 'd' as u32),
];

#[derive(Clone, PartialEq, Eq)]
enum Action {
    List,
    Create(String),
    Delete(String),
    Apply(String),
}

/// The `snapshot` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let m = getopt_long(args, "hqf:lc:a:d:U", LONGS)?;
    let mut action: Option<Action> = None;
    let mut fmt = None;
    let mut force_share = false;
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        let new = match char::from_u32(p.id).unwrap_or('\0') {
            'h' => {
                print!("{}", super::help::text("snapshot"));
                return Ok(());
            }
            'f' => {
                fmt = Some(arg);
                None
            }
            'U' => {
                force_share = true;
                None
            }
            'l' => Some(Action::List),
            'c' => Some(Action::Create(arg)),
            'd' => Some(Action::Delete(arg)),
            'a' => Some(Action::Apply(arg)),
            _ => None,
        };
        if p.id == OPT_IMAGE_OPTS {
            return Err(Failure::Error(
                "--image-opts is not supported by snapshot".into(),
            ));
        }
        if let Some(a) = new {
            if action.is_some() {
                return Err(Failure::Usage("Cannot mix '-l', '-a', '-c', '-d'".into()));
            }
            action = Some(a);
        }
    }
    let [filename] = m.operands.as_slice() else {
        return Err(Failure::Usage("Expecting one image file name".into()));
    };
    let action = action.unwrap_or(Action::List);
    let writable = action != Action::List;
    let env = Env::new()?;
    let given_fmt = fmt.clone();
    let fmt = match fmt {
        Some(f) => f,
        None => probe_format(filename).unwrap_or("raw").to_owned(),
    };
    if fmt != "qcow2" {
        // Opened as qemu-img opens it (errors, warnings), then refused.
        let blk = env.block_on(env.open(filename, given_fmt.as_deref(), writable, force_share));
        release(blk?);
        return match &action {
            Action::List => Ok(()),
            Action::Create(n) => Err(Failure::Error(format!(
                "Could not create snapshot '{n}': Operation not supported"
            ))),
            Action::Delete(n) => Err(Failure::Error(format!(
                "Could not delete snapshot '{n}': snapshot not found"
            ))),
            Action::Apply(n) => Err(Failure::Error(format!(
                "Could not apply snapshot '{n}': Block driver does not support snapshots"
            ))),
        };
    }
    env.block_on(async {
        let img = open_qcow2(&env.graph, filename, writable, force_share).await?;
        let d = img.driver();
        let r = match &action {
            Action::List => match d.snapshots().await {
                Ok(list) if !list.is_empty() => {
                    let mut s = format!("Snapshot list:\n{}\n", snapshot_row(None));
                    for sn in &list {
                        s.push_str(&snapshot_row(Some(sn)));
                        s.push('\n');
                    }
                    print!("{s}");
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(Failure::Error(e.to_string())),
            },
            Action::Create(name) => d
                .create_snapshot_qemu_img(name)
                .await
                .map(|_| ())
                .map_err(|e| Failure::Error(format!("Could not create snapshot '{name}': {e}"))),
            Action::Delete(name) => {
                let found = d
                    .snapshots()
                    .await
                    .ok()
                    .and_then(|l| l.into_iter().find(|s| s.name == *name));
                match found {
                    None => Err(Failure::Error(format!(
                        "Could not delete snapshot '{name}': snapshot not found"
                    ))),
                    Some(s) => d.delete_snapshot(&s.id).await.map_err(|e| {
                        Failure::Error(format!("Could not delete snapshot '{name}': {e}"))
                    }),
                }
            }
            Action::Apply(name) => {
                let known = d
                    .snapshots()
                    .await
                    .map(|l| l.iter().any(|s| s.id == *name || s.name == *name))
                    .unwrap_or(false);
                if !known {
                    Err(Failure::Error(format!(
                        "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
                    )))
                } else {
                    d.revert_to_snapshot(name).await.map_err(|e| {
                        Failure::Error(format!("Could not apply snapshot '{name}': {e}"))
                    })
                }
            }
        };
        let c = img.close().await;
        r?;
        c.map_err(|e| Failure::Error(e.to_string()))
    })
}
