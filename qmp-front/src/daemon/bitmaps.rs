//! Dirty bitmap commands: `block-dirty-bitmap-add`, `-remove`, `-clear`,
//! `-enable`, `-disable` and `-merge`, with qemu-storage-daemon 10's
//! checks and messages.
//!
//! Bitmaps live in memory on their node ([`block_core::dirty`]); the
//! request path records writes into them. A qcow2 node loads its image's
//! persistent bitmaps at open, drops a removed one from the image at
//! once, and stores the others (added, changed) when it closes.

use std::rc::Rc;

use block_core::dirty::{check_granularity, check_new_name, default_granularity, BitmapUse};
use block_core::{DirtyBitmap, Node};

use super::errors;
use super::qapi::{BitmapAddArgs, BitmapMergeArgs, BitmapOrStr, DirtyInfo, ExportBitmap};
use super::Daemon;
use crate::qmp::dispatch::Registry;
use crate::qmp::protocol::QmpError;
use crate::qmp::schema::Empty;

type R<T> = Result<T, QmpError>;

/// Registers the bitmap commands.
pub fn register(r: &mut Registry<Daemon>) {
    r.command(
        "block-dirty-bitmap-add",
        |d: Rc<Daemon>, a: BitmapAddArgs| async move { add(&d, &a).map(|_| Empty {}) },
    );
    r.command(
        "block-dirty-bitmap-remove",
        |d: Rc<Daemon>, a: ExportBitmap| async move {
            let (n, b) = lookup(&d, &a.node, &a.name)?;
            check(&b, BitmapUse::Remove)?;
            n.delete_dirty_bitmap(b.name()).await.map_err(|e| {
                QmpError::generic(format!("Failed to update bitmap extension: {e}"))
            })?;
            Ok(Empty {})
        },
    );
    r.command(
        "block-dirty-bitmap-clear",
        |d: Rc<Daemon>, a: ExportBitmap| async move {
            let (_, b) = lookup(&d, &a.node, &a.name)?;
            check(&b, BitmapUse::Modify)?;
            b.clear();
            Ok(Empty {})
        },
    );
    for (cmd, on) in [
        ("block-dirty-bitmap-enable", true),
        ("block-dirty-bitmap-disable", false),
    ] {
        r.command(cmd, move |d: Rc<Daemon>, a: ExportBitmap| async move {
            let (_, b) = lookup(&d, &a.node, &a.name)?;
            check(&b, BitmapUse::Read)?;
            b.set_recording(on);
            Ok(Empty {})
        });
    }
    r.command(
        "block-dirty-bitmap-merge",
        |d: Rc<Daemon>, a: BitmapMergeArgs| async move { merge(&d, &a).map(|_| Empty {}) },
    );
}

fn add(d: &Daemon, a: &BitmapAddArgs) -> R<()> {
    if a.name.is_empty() {
        return Err(QmpError::generic("Bitmap name cannot be empty"));
    }
    let n = node(d, &a.node)?;
    let default =
        default_granularity(formats::qcow2::Qcow2::of(&n).map(|q| q.header().cluster_size()));
    let granularity =
        check_granularity(a.granularity.map(u64::from), default).map_err(|e| generic(&e))?;
    let persistent = a.persistent == Some(true);
    if persistent {
        let Some(q) = formats::qcow2::Qcow2::of(&n) else {
            return Err(QmpError::generic(format!(
                "Can't store persistent bitmaps to {}: Operation not supported",
                n.name()
            )));
        };
        let stored = n
            .dirty_bitmaps()
            .iter()
            .filter(|b| b.is_persistent())
            .count();
        q.can_store_bitmap(&a.name, stored).map_err(|why| {
            QmpError::generic(format!(
                "Can't make bitmap '{}' persistent in '{}': {why}",
                a.name,
                n.name()
            ))
        })?;
    }
    check_new_name(&a.name, n.dirty_bitmap(&a.name).is_some()).map_err(|e| generic(&e))?;
    let recording = a.disabled != Some(true);
    let mut b = DirtyBitmap::new(&a.name, n.size(), granularity, recording);
    if persistent {
        b = b.persistent(false, false);
    }
    n.add_dirty_bitmap(Rc::new(b))
        .map_err(|e| errors::block(&e))
}

/// Merges all sources into the target, or nothing when one is missing or
/// of another size.
fn merge(d: &Daemon, a: &BitmapMergeArgs) -> R<()> {
    let (_, target) = lookup(d, &a.node, &a.target)?;
    check(&target, BitmapUse::Modify)?;
    let mut sources = Vec::with_capacity(a.bitmaps.len());
    for s in &a.bitmaps {
        let (_, b) = match s {
            BitmapOrStr::Name(name) => lookup(d, &a.node, name)?,
            BitmapOrStr::Full(f) => lookup(d, &f.node, &f.name)?,
        };
        target.check_merge_source(&b).map_err(|e| generic(&e))?;
        sources.push(b);
    }
    for s in sources {
        target.merge_from(&s);
    }
    Ok(())
}

fn node(d: &Daemon, name: &str) -> R<Rc<Node>> {
    d.graph
        .node(name)
        .ok_or_else(|| errors::device_or_node_not_found(name, name))
}

/// QEMU's `block_dirty_bitmap_lookup`.
fn lookup(d: &Daemon, node_name: &str, name: &str) -> R<(Rc<Node>, Rc<DirtyBitmap>)> {
    let n = d
        .graph
        .node(node_name)
        .ok_or_else(|| QmpError::generic(format!("Node '{node_name}' not found")))?;
    let b = n
        .dirty_bitmap(name)
        .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{name}' not found")))?;
    Ok((n, b))
}

fn check(b: &DirtyBitmap, what: BitmapUse) -> R<()> {
    b.check(what).map_err(|e| generic(&e))
}

/// Bitmap refusals are GenericErrors carrying QEMU's text.
fn generic(e: &block_core::Error) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The `dirty-bitmaps` member of a node's `BlockDeviceInfo` (absent when
/// it has none).
pub fn dirty_info(n: &Node) -> Option<Vec<DirtyInfo>> {
    let v: Vec<DirtyInfo> = n
        .dirty_bitmaps()
        .iter()
        .map(|b| DirtyInfo {
            name: Some(b.name().to_owned()),
            count: b.count() as i64,
            granularity: b.granularity() as u32,
            recording: b.is_recording(),
            busy: b.is_busy(),
            persistent: b.is_persistent(),
            inconsistent: b.is_inconsistent().then_some(true),
        })
        .collect();
    (!v.is_empty()).then_some(v)
}
