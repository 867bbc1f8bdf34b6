//! The daemon's QMP commands: block nodes, queries, jobs, objects.
//!
//! Every handler runs on the loop thread with the [`Daemon`]; argument
//! types come from [`super::qapi`], errors go through [`super::errors`].
//! Error texts were checked one by one against qemu-storage-daemon 10.0.

use std::rc::Rc;

use block_core::{ChildRole, DetectZeroes, Node, Perm, Prealloc};
use serde_json::{json, Map, Value};

use super::errors;
use super::qapi::*;
use super::{Daemon, IoThread};
use crate::qmp::dispatch::Registry;
use crate::qmp::protocol::QmpError;
use crate::qmp::schema::Empty;

type R<T> = Result<T, QmpError>;

/// The daemon's command registry (built-ins + everything below).
pub fn registry() -> Registry<Daemon> {
    let mut r = Registry::<Daemon>::new();
    r.event::<JobStatusChange>("JOB_STATUS_CHANGE");
    r.event::<WriteThresholdEvent>("BLOCK_WRITE_THRESHOLD");
    r.event::<ExportDeletedEvent>("BLOCK_EXPORT_DELETED");
    super::exports::register(&mut r);
    super::bitmaps::register(&mut r);
    r.command("quit", |d: Rc<Daemon>, _: Empty| async move {
        // qemu-storage-daemon's BLOCK_EXPORT_DELETED events precede its
        // reply to quit.
        super::exports::shutdown(&d).await;
        d.quit.set(true);
        Ok(Empty {})
    });
    r.command(
        "blockdev-add",
        |d: Rc<Daemon>, a: BlockdevOptions| async move {
            blockdev_add(&d, a.map).await.map(|_| Empty {})
        },
    );
    r.command("blockdev-del", |d: Rc<Daemon>, a: NodeNameArg| async move {
        blockdev_del(&d, &a.node_name).await.map(|_| Empty {})
    });
    r.command(
        "x-blockdev-del",
        |d: Rc<Daemon>, a: NodeNameArg| async move {
            blockdev_del(&d, &a.node_name).await.map(|_| Empty {})
        },
    );
    r.command(
        "blockdev-reopen",
        |d: Rc<Daemon>, a: BlockdevReopenArgs| async move {
            reopen(&d, a.options).await.map(|_| Empty {})
        },
    );
    r.command(
        "query-named-block-nodes",
        |d: Rc<Daemon>, a: QueryNodesArgs| async move {
            let flat = a.flat.unwrap_or(false);
            let mut v: Vec<BlockDeviceInfo> = Vec::new();
            for n in d.nodes_in_order() {
                v.push(device_info(&d, &n, flat).await);
            }
            v.reverse();
            Ok(v)
        },
    );
    r.command("query-block", |_d: Rc<Daemon>, _: Empty| async move {
        Ok(Vec::<BlockInfo>::new())
    });
    r.command(
        "query-blockstats",
        |d: Rc<Daemon>, a: QueryBlockstatsArgs| async move {
            if !a.query_nodes.unwrap_or(false) {
                return Ok(Vec::new());
            }
            Ok(d.nodes_in_order()
                .iter()
                .map(|n| node_stats(n))
                .collect::<Vec<_>>())
        },
    );
    r.command(
        "x-debug-query-block-graph",
        |d: Rc<Daemon>, _: Empty| async move { Ok(block_graph(&d)) },
    );
    r.command(
        "block_resize",
        |d: Rc<Daemon>, a: BlockResizeArgs| async move {
            let dev = a.device.clone().unwrap_or_default();
            let nn = a.node_name.clone().unwrap_or_default();
            // The daemon has no named BlockBackends (devices), so only the
            // node name can match, as in qemu-storage-daemon.
            let node = a
                .node_name
                .as_deref()
                .and_then(|n| d.graph.node(n))
                .ok_or_else(|| errors::device_or_node_not_found(&dev, &nn))?;
            if a.size < 0 {
                return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
            }
            let be = block_core::BlockBackend::new("", &node, Perm::RESIZE, Perm::ALL)
                .map_err(|e| errors::blk_perm(&e))?;
            let r = be.truncate(a.size as u64, false, Prealloc::Off).await;
            be.detach();
            r.map_err(|e| errors::block(&e))?;
            Ok(Empty {})
        },
    );
    r.command(
        "block-set-write-threshold",
        |d: Rc<Daemon>, a: WriteThresholdArgs| async move {
            let n = d
                .graph
                .node(&a.node_name)
                .ok_or_else(|| errors::device_not_found_generic(&a.node_name))?;
            n.set_write_threshold(a.write_threshold);
            Ok(Empty {})
        },
    );
    r.command("blockdev-create", |d: Rc<Daemon>, a: BlockdevCreateArgs| async move {
        blockdev_create(&d, a).map(|_| Empty {})
    });
    r.command("query-jobs", |d: Rc<Daemon>, _: Empty| async move {
        Ok(d.jobs.query().into_iter().map(job_info).collect::<Vec<_>>())
    });
    r.command("job-dismiss", |d: Rc<Daemon>, a: JobIdArg| async move {
        d.jobs.dismiss(&a.id).map_err(|e| errors::job(&e))?;
        Ok(Empty {})
    });
    r.command("job-finalize", |d: Rc<Daemon>, a: JobIdArg| async move {
        d.jobs.finalize(&a.id).map_err(|e| errors::job(&e))?;
        Ok(Empty {})
    });
    r.command("job-cancel", |d: Rc<Daemon>, a: JobIdArg| async move {
        d.jobs.cancel(&a.id).map_err(|e| errors::job(&e))?;
        Ok(Empty {})
    });
    r.command("job-pause", |d: Rc<Daemon>, a: JobIdArg| async move {
        d.jobs
            .unsupported_verb(&a.id, jobs::JobVerb::Pause)
            .map_err(QmpError::generic)?;
        Ok(Empty {})
    });
    r.command("job-resume", |d: Rc<Daemon>, a: JobIdArg| async move {
        d.jobs.resume(&a.id).map_err(QmpError::generic)?;
        Ok(Empty {})
    });
    r.command("job-complete", |d: Rc<Daemon>, a: JobIdArg| async move {
        d.jobs
            .unsupported_verb(&a.id, jobs::JobVerb::Complete)
            .map_err(QmpError::generic)?;
        Ok(Empty {})
    });
    // Block jobs (backup, mirror, ...) are not implemented yet; creation
    // jobs are no block jobs, so QEMU's answer is "not found" for all.
    r.command("query-block-jobs", |_d: Rc<Daemon>, _: Empty| async move {
        Ok(Vec::<BlockJobInfo>::new())
    });
    r.command(
        "block-job-cancel",
        |_d: Rc<Daemon>, a: BlockJobCancelArgs| async move {
            Err::<Empty, _>(errors::block_job_not_found(&a.device))
        },
    );
    r.command(
        "block-job-dismiss",
        |_d: Rc<Daemon>, a: BlockJobIdArg| async move {
            Err::<Empty, _>(errors::block_job_not_found(&a.id))
        },
    );
    r.command(
        "block-job-finalize",
        |_d: Rc<Daemon>, a: BlockJobIdArg| async move {
            Err::<Empty, _>(errors::block_job_not_found(&a.id))
        },
    );
    r.command(
        "block-job-set-speed",
        |_d: Rc<Daemon>, a: BlockJobSpeedArgs| async move {
            Err::<Empty, _>(errors::block_job_not_found(&a.device))
        },
    );
    for name in ["block-job-pause", "block-job-resume", "block-job-complete"] {
        r.command(name, |_d: Rc<Daemon>, a: BlockJobDeviceArg| async move {
            Err::<Empty, _>(errors::block_job_not_found(&a.device))
        });
    }
    r.command("object-add", |d: Rc<Daemon>, a: ObjectOptions| async move {
        object_add(&d, a.map).map(|_| Empty {})
    });
    r.command("object-del", |d: Rc<Daemon>, a: ObjectDelArgs| async move {
        let mut t = d.iothreads.borrow_mut();
        let i = t
            .iter()
            .position(|(id, _)| *id == a.id)
            .ok_or_else(|| QmpError::generic(format!("object '{}' not found", a.id)))?;
        let (_, th) = t.remove(i);
        th.handle.stop();
        Ok(Empty {})
    });
    r.command("query-iothreads", |d: Rc<Daemon>, _: Empty| async move {
        Ok(d.iothreads
            .borrow()
            .iter()
            .map(|(id, t)| {
                let p = t.props.borrow();
                IothreadInfo {
                    id: id.clone(),
                    thread_id: t.thread_id,
                    poll_max_ns: p["poll-max-ns"],
                    poll_grow: p["poll-grow"],
                    poll_shrink: p["poll-shrink"],
                    aio_max_batch: p["aio-max-batch"],
                }
            })
            .collect::<Vec<_>>())
    });
    r.command("qom-list", |d: Rc<Daemon>, a: QomListArgs| async move {
        qom_list(&d, &a.path)
    });
    r.command("qom-get", |d: Rc<Daemon>, a: QomGetArgs| async move {
        qom_get(&d, &a.path, &a.property)
    });
    r.command("qom-set", |d: Rc<Daemon>, a: QomSetArgs| async move {
        qom_set(&d, &a.path, &a.property, a.value).map(|_| Empty {})
    });
    r
}

/// `blockdev-add` (and `--blockdev`): opens the node tree through the
/// driver registry.
pub async fn blockdev_add(d: &Daemon, mut map: Map<String, Value>) -> R<()> {
    let Some(name) = map
        .get("node-name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    };
    check_force_share(&map)?;
    check_drivers(d, &map)?;
    strip_active(&mut map)?;
    // Remembered as given: a reopen compares inline children with it.
    let given = map.clone();
    no_inherited_detect_zeroes(&mut map, true);
    let opts = to_options(&map);
    let res = d.graph.open(opts).await;
    d.sync_order();
    let node = res.map_err(|e| errors::block(&e))?;
    d.owned.borrow_mut().insert(name);
    remember_opts(d, &node, given);
    Ok(())
}

/// Drivers the schema knows but this build cannot open yet (qcow2 until
/// its driver is registered) get a clear error instead of a parse error.
fn check_drivers(d: &Daemon, map: &Map<String, Value>) -> R<()> {
    if let Some(drv) = map.get("driver").and_then(Value::as_str) {
        if !d.graph.registry().names().contains(&drv) {
            return Err(QmpError::generic(format!(
                "Driver '{drv}' is not available in this build of stratad yet"
            )));
        }
    }
    for v in map.values() {
        if let Value::Object(child) = v {
            if child.contains_key("driver") {
                check_drivers(d, child)?;
            }
        }
    }
    Ok(())
}

/// `active` (QEMU 10's inactive nodes for migration): Strata nodes are
/// always active, so `true` is accepted and `false` refused.
fn strip_active(map: &mut Map<String, Value>) -> R<()> {
    if let Some(a) = map.remove("active") {
        if a == Value::Bool(false) {
            return Err(QmpError::generic(
                "Inactive nodes (active=off) are not supported by stratad",
            ));
        }
    }
    for v in map.values_mut() {
        if let Value::Object(child) = v {
            if child.contains_key("driver") {
                strip_active(child)?;
            }
        }
    }
    Ok(())
}

/// QEMU refuses `force-share` on writable nodes (at every level).
fn check_force_share(map: &Map<String, Value>) -> R<()> {
    if map.get("force-share") == Some(&Value::Bool(true))
        && map.get("read-only") != Some(&Value::Bool(true))
    {
        return Err(QmpError::generic(
            "force-share=on can only be used with read-only images",
        ));
    }
    for v in map.values() {
        if let Value::Object(child) = v {
            if child.contains_key("driver") {
                check_force_share(child)?;
            }
        }
    }
    Ok(())
}

/// Children inherit read-only, cache.* and discard from their parent but
/// not detect-zeroes (QEMU's `bdrv_inherited_options`); the engine
/// inherits every common flag, so inline children get an explicit `off`.
fn no_inherited_detect_zeroes(map: &mut Map<String, Value>, root: bool) {
    if !root && !map.contains_key("detect-zeroes") {
        map.insert("detect-zeroes".into(), Value::String("off".into()));
    }
    for v in map.values_mut() {
        if let Value::Object(child) = v {
            if child.contains_key("driver") {
                no_inherited_detect_zeroes(child, false);
            }
        }
    }
}

/// Records each node's options (inline children get their sub-tree).
fn remember_opts(d: &Daemon, node: &Node, map: Map<String, Value>) {
    for c in node.children() {
        if let Some(Value::Object(sub)) = map.get(&c.name) {
            if sub.contains_key("driver") {
                remember_opts(d, &c.node, sub.clone());
            }
        }
    }
    d.add_opts.borrow_mut().insert(node.name().to_owned(), map);
}

fn is_parent_edge(d: &Daemon, node: &Node, who: &str) -> bool {
    d.graph
        .node(who)
        .is_some_and(|p| p.children().iter().any(|c| c.node.name() == node.name()))
}

async fn blockdev_del(d: &Daemon, name: &str) -> R<()> {
    let node = d
        .graph
        .node(name)
        .ok_or_else(|| errors::node_not_found(name))?;
    let users = node.users();
    if users.iter().any(|u| !is_parent_edge(d, &node, &u.who)) {
        return Err(QmpError::generic(format!("Node {name} is in use")));
    }
    if !d.owned.borrow().contains(name) {
        return Err(QmpError::generic(format!(
            "Node {name} is not owned by the monitor"
        )));
    }
    if !users.is_empty() {
        return Err(QmpError::generic(format!("Block device {name} is in use")));
    }
    let r = d.graph.delete(name).await;
    // QEMU drops every child nobody references any more, named or not,
    // unless the monitor added it itself.
    while r.is_ok() {
        let orphan =
            d.graph.nodes().into_iter().find(|n| {
                !n.has_users() && !d.owned.borrow().contains(n.name()) && n.name() != name
            });
        let Some(o) = orphan else { break };
        if d.graph.delete(o.name()).await.is_err() {
            break;
        }
    }
    d.sync_order();
    r.map_err(|e| errors::block(&e))
}

async fn reopen(d: &Daemon, list: Vec<BlockdevOptions>) -> R<()> {
    // Check everything first so that a refusal changes nothing.
    let mut plan = Vec::new();
    for o in &list {
        let m = &o.map;
        let name = m
            .get("node-name")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("node-name not specified"))?;
        let node = d
            .graph
            .node(name)
            .ok_or_else(|| errors::node_not_found(name))?;
        let drv = m.get("driver").and_then(Value::as_str).unwrap_or_default();
        if drv != node.format_name() {
            return Err(QmpError::generic("Cannot change the option 'driver'"));
        }
        let mut f = node.flags();
        f.read_only = m.get("read-only").and_then(Value::as_bool).unwrap_or(false);
        f.detect_zeroes = match m.get("detect-zeroes").and_then(Value::as_str) {
            Some(z) => DetectZeroes::parse(z).unwrap_or(DetectZeroes::Off),
            None => DetectZeroes::Off,
        };
        f.discard_unmap = m.get("discard").and_then(Value::as_str) == Some("unmap");
        let cache = m.get("cache").and_then(Value::as_object);
        let direct = cache
            .and_then(|c| c.get("direct"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if direct != node.flags().cache_direct {
            return Err(QmpError::generic("Cannot change the option 'cache.direct'"));
        }
        f.cache_no_flush = cache
            .and_then(|c| c.get("no-flush"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if f.detect_zeroes == DetectZeroes::Unmap && !f.discard_unmap {
            return Err(QmpError::generic(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        let before = d.add_opts.borrow().get(name).cloned().unwrap_or_default();
        let keys: std::collections::BTreeSet<&String> = m
            .keys()
            .chain(before.keys())
            .filter(|k| !COMMON_OPTS.contains(&k.as_str()))
            .collect();
        for k in keys {
            // Children must stay the same node; driver options can't change.
            let same_child = m
                .get(k)
                .and_then(Value::as_str)
                .and_then(|s| node.child_named(k).map(|c| c.name() == s))
                .unwrap_or(false);
            if !same_child && m.get(k) != before.get(k) {
                return Err(QmpError::generic(format!("Cannot change the option '{k}'")));
            }
        }
        if f.read_only && !node.is_read_only() {
            let (perm, _) = node.cumulative_perm();
            if perm.contains(Perm::WRITE) {
                return Err(errors::read_only_with_writers(name));
            }
            // The inheriting child must not keep a writer of its own (an
            // export, say); the node's own edge drops write with it.
            if let Some(c) = inheriting_child(d, &node).filter(|c| !c.is_read_only()) {
                let writes = c
                    .users()
                    .iter()
                    .any(|u| u.who != node.name() && u.perm.contains(Perm::WRITE));
                if writes {
                    return Err(errors::read_only_with_writers(c.name()));
                }
            }
        }
        plan.push((node, f));
    }
    for (node, f) in plan {
        let old = node.flags();
        // The format writes back what it keeps while its file still takes
        // writes (qcow2 stores its bitmaps), and starts writing only once
        // the file takes them again.
        if f.read_only && !old.read_only {
            node.driver()
                .reopen(&node, true)
                .await
                .map_err(|e| errors::block(&e))?;
        }
        node.set_flags(f);
        let child = inheriting_child(d, &node);
        let child_old = child.as_ref().map(|c| c.flags());
        if let Some(c) = &child {
            let mut cf = c.flags();
            cf.read_only = f.read_only;
            c.set_flags(cf);
        }
        let undo = || {
            node.set_flags(old);
            if let (Some(c), Some(cf)) = (&child, child_old) {
                c.set_flags(cf);
            }
        };
        if old.read_only != f.read_only {
            if let Err(e) = refresh_child_perms(&node) {
                undo();
                return Err(errors::block(&e));
            }
        }
        if old.read_only && !f.read_only {
            // Bottom up: a file opened read-only gets a writable
            // descriptor before the format above it starts writing.
            let mut opened = Ok(());
            if let Some(c) = child
                .as_ref()
                .filter(|_| child_old.is_some_and(|cf| cf.read_only))
            {
                opened = c.driver().reopen(c, false).await;
            }
            if let Err(e) = opened {
                undo();
                let _ = refresh_child_perms(&node);
                return Err(errors::block(&e));
            }
            if let Err(e) = node.driver().reopen(&node, false).await {
                undo();
                let _ = refresh_child_perms(&node);
                return Err(errors::block(&e));
            }
        }
    }
    Ok(())
}

/// The storage child that inherits `node`'s read-only flag on reopen: one
/// the node opened inline, as in QEMU.
fn inheriting_child(d: &Daemon, node: &Node) -> Option<Rc<Node>> {
    let inline = |c: &Node| {
        d.add_opts.borrow().get(node.name()).is_some_and(|m| {
            m.values()
                .any(|v| v.get("node-name").and_then(Value::as_str) == Some(c.name()))
        }) || c.is_auto_named()
    };
    node.storage_child().filter(|c| inline(c))
}

/// Recomputes the permissions `node` takes on its children after its
/// read-only flag changed (so that e.g. the image's write lock is dropped
/// when a node becomes read-only).
fn refresh_child_perms(node: &Node) -> block_core::Result<()> {
    let (perm, shared) = node.cumulative_perm();
    for c in node.children() {
        let (p, s) = node
            .driver()
            .child_perm(c.role, perm, shared, !node.is_read_only());
        c.node.update_user(c.user_id, p, s)?;
        refresh_child_perms(&c.node)?;
    }
    Ok(())
}

fn actual_size(n: &Node) -> i64 {
    match n.format_name() {
        "file" => {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(n.filename())
                .map(|m| (m.blocks() * 512) as i64)
                .unwrap_or(0)
        }
        "null-co" => 0,
        _ => n
            .children()
            .iter()
            .filter(|c| {
                matches!(
                    c.role,
                    ChildRole::File | ChildRole::Primary | ChildRole::Data | ChildRole::Filtered
                )
            })
            .map(|c| actual_size(&c.node))
            .sum(),
    }
}

/// `ImageInfo` of `n` alone (no `backing-image`), as QEMU's
/// `bdrv_query_block_node_info` fills it.
async fn node_image_info(d: &Daemon, n: &Node) -> ImageInfo {
    let drv = n.format_name();
    let has_info = drv != "null-co";
    let mut info = ImageInfo {
        filename: display_filename(d, n),
        format: drv.to_owned(),
        dirty_flag: has_info.then_some(false),
        actual_size: Some(actual_size(n)),
        // QEMU keeps lengths in whole sectors (`bdrv_getlength`).
        virtual_size: n.size().div_ceil(512) as i64 * 512,
        cluster_size: None,
        encrypted: None,
        compressed: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: None,
        format_specific: (drv == "file").then(|| ImageInfoSpecific {
            ty: "file".into(),
            data: json!({}),
        }),
        backing_image: None,
    };
    if let Some(q) = formats::qcow2::Qcow2::of(n) {
        qcow2_image_info(q, &n.filename(), &mut info).await;
    }
    info
}

/// What a qcow2 driver adds to its node's `ImageInfo`. The backing names
/// come from the image header, not from the backing node: QEMU reports the
/// name as written in the image even when another node was attached.
/// Relative backing names are resolved against `file`, the image's host
/// file name (never its `json:` name).
async fn qcow2_image_info(q: &formats::qcow2::Qcow2, file: &str, info: &mut ImageInfo) {
    use formats::qcow2::header::INCOMPAT_DIRTY;
    let h = q.header();
    info.cluster_size = Some(h.cluster_size() as i64);
    info.dirty_flag = Some(h.incompatible_features & INCOMPAT_DIRTY != 0);
    if let Some(b) = h.backing_file.clone().filter(|b| !b.is_empty()) {
        info.full_backing_filename = Some(formats::qcow2::resolve_backing_path(file, &b));
        info.backing_filename = Some(b);
        info.backing_filename_format = h.backing_format.clone().filter(|f| !f.is_empty());
    }
    // Unreadable bitmaps leave the list out rather than fail the query.
    let bitmaps = q.bitmaps().await.unwrap_or_default();
    let data = crate::img::qjson::QValue::Dict(crate::img::info::qcow2_specific(&h, &bitmaps));
    info.format_specific = Some(ImageInfoSpecific {
        ty: "qcow2".into(),
        data: data.to_value(),
    });
    // An unreadable snapshot table leaves the list out, as in QEMU.
    if let Ok(list) = q.snapshots().await {
        let list: Vec<SnapshotInfoQ> = list
            .iter()
            .filter_map(|s| {
                serde_json::from_value(crate::img::info::snapshot_json(s).to_value()).ok()
            })
            .collect();
        info.snapshots = (!list.is_empty()).then_some(list);
    }
}

/// `ImageInfo` of `n`; with `nested`, its backing chain hangs below it as
/// `backing-image`.
async fn image_info(d: &Daemon, n: &Node, nested: bool) -> ImageInfo {
    let mut chain = Vec::new();
    let mut b = if nested { n.backing() } else { None };
    while let Some(x) = b {
        b = x.backing();
        chain.push(x);
    }
    let mut below: Option<ImageInfo> = None;
    for x in chain.iter().rev() {
        let mut i = node_image_info(d, x).await;
        i.backing_image = below.take().map(Box::new);
        below = Some(i);
    }
    let mut top = node_image_info(d, n).await;
    top.backing_image = below.map(Box::new);
    top
}

/// Options that are not driver-specific (QEMU leaves them out of `json:`
/// filenames and lets reopen change them).
const COMMON_OPTS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "detect-zeroes",
    "discard",
    "cache",
    "auto-read-only",
    "force-share",
    "active",
];

/// Driver options of `n` as given by the user (children and common
/// options left out).
fn driver_opts(d: &Daemon, n: &Node) -> Map<String, Value> {
    let children: Vec<String> = n.children().iter().map(|c| c.name.clone()).collect();
    d.add_opts
        .borrow()
        .get(n.name())
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !COMMON_OPTS.contains(&k.as_str()) && !children.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a plain file name cannot describe `n` (QEMU then shows `json:`).
fn needs_json(d: &Daemon, n: &Node) -> bool {
    match n.format_name() {
        "file" => false,
        "null-co" => !driver_opts(d, n).is_empty(),
        // None of qcow2's own options is one QEMU keeps in file names (its
        // only "strong" option is an encryption secret).
        "qcow2" => backing_overridden(d, n) || n.storage_child().is_some_and(|c| needs_json(d, &c)),
        _ => !driver_opts(d, n).is_empty() || n.storage_child().is_some_and(|c| needs_json(d, &c)),
    }
}

/// QEMU's `bdrv_backing_overridden`: the backing node differs from what
/// the image header names. A backing node given by option is compared
/// with the header's name as written, so a relative name always counts as
/// overridden; no backing node at all counts if the header names one.
fn backing_overridden(d: &Daemon, n: &Node) -> bool {
    let Some(q) = formats::qcow2::Qcow2::of(n) else {
        return false;
    };
    let header = q.header().backing_file.unwrap_or_default();
    let Some(b) = n.backing() else {
        return !header.is_empty();
    };
    let given = d
        .add_opts
        .borrow()
        .get(n.name())
        .is_some_and(|m| m.contains_key("backing"));
    given && display_filename(d, &b) != header
}

/// The options QEMU puts in a `json:` file name.
fn json_dict(d: &Daemon, n: &Node) -> Value {
    let mut m = Map::new();
    m.insert("driver".into(), n.format_name().into());
    if n.format_name() == "file" {
        m.insert("filename".into(), n.filename().into());
        return Value::Object(m);
    }
    let overridden = backing_overridden(d, n);
    if n.format_name() == "qcow2" {
        if overridden && n.backing().is_none() {
            m.insert("backing".into(), Value::Null);
        }
    } else {
        m.extend(driver_opts(d, n));
    }
    // A backing file the header names is implied by the image.
    let implied_backing = !overridden;
    for c in n.children() {
        if c.role == ChildRole::Backing && implied_backing {
            continue;
        }
        m.insert(c.name.clone(), json_dict(d, &c.node));
    }
    Value::Object(m)
}

/// QEMU's `bdrv_refresh_filename`: the host file name, or `json:{...}`
/// when options the name cannot express were given.
fn display_filename(d: &Daemon, n: &Node) -> String {
    if needs_json(d, n) {
        return format!(
            "json:{}",
            crate::qmp::json_out::to_json(&json_dict(d, n), false)
        );
    }
    n.filename()
}

async fn device_info(d: &Daemon, n: &Node, flat: bool) -> BlockDeviceInfo {
    let f = n.flags();
    // QEMU counts the chain only while it gathers it, so flat answers say 0.
    let mut depth = 0;
    let mut b = if flat { None } else { n.backing() };
    while let Some(x) = b {
        depth += 1;
        b = x.backing();
    }
    let image = image_info(d, n, !flat).await;
    BlockDeviceInfo {
        file: image.filename.clone(),
        node_name: Some(n.name().to_owned()),
        ro: f.read_only,
        drv: n.format_name().to_owned(),
        backing_file: n.backing().map(|b| display_filename(d, &b)),
        backing_file_depth: depth,
        active: true,
        encrypted: false,
        detect_zeroes: match f.detect_zeroes {
            DetectZeroes::Off => DetectZeroesOpt::Off,
            DetectZeroes::On => DetectZeroesOpt::On,
            DetectZeroes::Unmap => DetectZeroesOpt::Unmap,
        },
        bps: 0,
        bps_rd: 0,
        bps_wr: 0,
        iops: 0,
        iops_rd: 0,
        iops_wr: 0,
        image,
        cache: CacheInfo {
            writeback: true,
            direct: f.cache_direct,
            no_flush: f.cache_no_flush,
        },
        write_threshold: n.write_threshold() as i64,
        dirty_bitmaps: super::bitmaps::dirty_info(n),
    }
}

fn zero_stats(wr_highest_offset: u64) -> DeviceStats {
    DeviceStats {
        rd_bytes: 0,
        wr_bytes: 0,
        zone_append_bytes: 0,
        unmap_bytes: 0,
        rd_operations: 0,
        wr_operations: 0,
        zone_append_operations: 0,
        flush_operations: 0,
        unmap_operations: 0,
        rd_total_time_ns: 0,
        wr_total_time_ns: 0,
        zone_append_total_time_ns: 0,
        flush_total_time_ns: 0,
        unmap_total_time_ns: 0,
        wr_highest_offset: wr_highest_offset as i64,
        rd_merged: 0,
        wr_merged: 0,
        zone_append_merged: 0,
        unmap_merged: 0,
        idle_time_ns: None,
        failed_rd_operations: 0,
        failed_wr_operations: 0,
        failed_zone_append_operations: 0,
        failed_flush_operations: 0,
        failed_unmap_operations: 0,
        invalid_rd_operations: 0,
        invalid_wr_operations: 0,
        invalid_zone_append_operations: 0,
        invalid_flush_operations: 0,
        invalid_unmap_operations: 0,
        account_invalid: false,
        account_failed: false,
        timed_stats: Vec::new(),
    }
}

fn node_stats(n: &Node) -> BlockStats {
    BlockStats {
        device: None,
        qdev: None,
        node_name: Some(n.name().to_owned()),
        stats: zero_stats(n.wr_highest_offset()),
        driver_specific: (n.format_name() == "file").then(|| {
            json!({"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0, "discard-bytes-ok": 0})
        }),
        parent: n
            .child(ChildRole::File)
            .or_else(|| n.child(ChildRole::Primary))
            .map(|c| Box::new(node_stats(&c))),
        backing: n.backing().map(|b| Box::new(node_stats(&b))),
    }
}

fn perm_list(p: Perm) -> Vec<BlockPermission> {
    let mut v = Vec::new();
    for (bit, q) in [
        (Perm::RESIZE, BlockPermission::Resize),
        (Perm::WRITE_UNCHANGED, BlockPermission::WriteUnchanged),
        (Perm::WRITE, BlockPermission::Write),
        (Perm::CONSISTENT_READ, BlockPermission::ConsistentRead),
    ] {
        if p.contains(bit) {
            v.push(q);
        }
    }
    v
}

/// QEMU's `x-debug-query-block-graph`: BlockBackends (the exports' here)
/// first, then nodes in creation order; ids are handed out as each
/// vertex is first met, and both lists come out newest first.
fn block_graph(d: &Daemon) -> BlockGraph {
    let mut ids: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut id_of = |key: String| {
        let next = ids.len() as u64 + 1;
        *ids.entry(key).or_insert(next)
    };
    let mut gnodes = Vec::new();
    let mut edges = Vec::new();
    let exports = d
        .nbd
        .borrow()
        .as_ref()
        .map(|s| s.exports())
        .unwrap_or_default();
    let ordered = d
        .export_ids
        .borrow()
        .iter()
        .filter_map(|(id, _)| exports.iter().find(|e| &e.cfg.id == id).cloned())
        .collect::<Vec<_>>();
    for e in &ordered {
        let id = id_of(format!("blk:{}", e.cfg.id));
        gnodes.push(GraphNode {
            id,
            ty: GraphNodeType::BlockBackend,
            name: String::new(),
        });
        let (perm, shared) = e.blk.perm();
        edges.push(GraphEdge {
            parent: id,
            child: id_of(e.node().name().to_owned()),
            name: "root".into(),
            perm: perm_list(perm),
            shared_perm: perm_list(shared),
        });
    }
    for n in d.nodes_in_order() {
        let id = id_of(n.name().to_owned());
        gnodes.push(GraphNode {
            id,
            ty: GraphNodeType::BlockDriver,
            name: n.name().to_owned(),
        });
        // QEMU keeps a node's children newest first.
        for c in n.children().iter().rev() {
            let u = c.node.users().into_iter().find(|u| u.id == c.user_id);
            let (perm, shared) = u
                .map(|u| (u.perm, u.shared))
                .unwrap_or((Perm::NONE, Perm::ALL));
            edges.push(GraphEdge {
                parent: id,
                child: id_of(c.node.name().to_owned()),
                name: c.name.clone(),
                perm: perm_list(perm),
                shared_perm: perm_list(shared),
            });
        }
    }
    gnodes.reverse();
    edges.reverse();
    BlockGraph {
        nodes: gnodes,
        edges,
    }
}

fn job_info(j: jobs::JobInfo) -> JobInfoQ {
    JobInfoQ {
        id: j.id,
        ty: match j.ty {
            jobs::JobType::Commit => JobTypeQ::Commit,
            jobs::JobType::Stream => JobTypeQ::Stream,
            jobs::JobType::Mirror => JobTypeQ::Mirror,
            jobs::JobType::Backup => JobTypeQ::Backup,
            jobs::JobType::Create => JobTypeQ::Create,
            jobs::JobType::Amend => JobTypeQ::Amend,
        },
        status: serde_json::from_value(json!(j.status.name())).unwrap_or(JobStatusQ::Undefined),
        current_progress: j.current_progress as i64,
        total_progress: j.total_progress as i64,
        error: j.error,
    }
}

fn blockdev_create(d: &Daemon, a: BlockdevCreateArgs) -> R<()> {
    let mut map = a.options.map;
    let driver = map
        .remove("driver")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let create = jobs::create::creator(&driver)
        .ok_or_else(|| QmpError::generic("Driver does not support blockdev-create"))?;
    d.jobs
        .check_new_id(&a.job_id)
        .map_err(|e| errors::job(&e))?;
    let body = create(Rc::clone(&d.graph), to_options(&map)).map_err(QmpError::generic)?;
    d.jobs
        .start(
            jobs::JobOptions {
                id: a.job_id,
                ty: jobs::JobType::Create,
                auto_finalize: true,
                auto_dismiss: false,
            },
            body,
        )
        .map_err(|e| errors::job(&e))?;
    Ok(())
}

const IOTHREAD_PROPS: [(&str, i64); 6] = [
    ("thread-pool-min", 0),
    ("aio-max-batch", 0),
    ("thread-pool-max", 64),
    ("poll-max-ns", 32768),
    ("poll-grow", 0),
    ("poll-shrink", 0),
];

/// `object-add` (and `--object`): only `iothread` today.
pub fn object_add(d: &Daemon, map: Map<String, Value>) -> R<()> {
    let id = map
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !block_core::graph::id_wellformed(&id) {
        return Err(QmpError::generic("Parameter 'id' expects an identifier"));
    }
    if d.iothreads.borrow().iter().any(|(i, _)| *i == id) {
        return Err(QmpError::generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    let mut props: std::collections::BTreeMap<&'static str, i64> =
        IOTHREAD_PROPS.iter().copied().collect();
    for (k, v) in &map {
        if let Some((name, _)) = IOTHREAD_PROPS.iter().find(|(n, _)| n == k) {
            props.insert(*name, v.as_i64().unwrap_or(0));
        }
    }
    let handle =
        block_core::EventLoop::spawn_thread(&format!("IO {id}"), block_core::AioMode::Auto)
            .map_err(|e| errors::block(&e))?;
    // The loop polls as long as poll-max-ns says before it sleeps.
    let poll_ns = props["poll-max-ns"].max(0) as u64;
    let thread_id = handle
        .submit(move |ctx| async move {
            ctx.set_poll_ns(poll_ns);
            super::sys::gettid()
        })
        .wait()
        .unwrap_or(0);
    d.iothreads.borrow_mut().push((
        id,
        IoThread {
            handle,
            thread_id,
            props: std::cell::RefCell::new(props),
        },
    ));
    Ok(())
}

fn prop(name: &str, ty: &str) -> PropertyInfo {
    PropertyInfo {
        name: name.into(),
        ty: ty.into(),
        description: None,
        default_value: None,
    }
}

fn qom_list(d: &Daemon, path: &str) -> R<Vec<PropertyInfo>> {
    let p = path.trim_end_matches('/');
    match p {
        "" => Ok(vec![
            prop("type", "string"),
            prop("backend", "child<container>"),
            prop("objects", "child<container>"),
            prop("chardevs", "child<container>"),
        ]),
        "/objects" => {
            let mut v = vec![prop("type", "string")];
            v.extend(
                d.iothreads
                    .borrow()
                    .iter()
                    .map(|(id, _)| prop(id, "child<iothread>")),
            );
            Ok(v)
        }
        "/chardevs" => {
            let mut v = vec![prop("type", "string")];
            v.extend(
                d.chardevs
                    .borrow()
                    .iter()
                    .map(|id| prop(id, "child<chardev-socket>")),
            );
            Ok(v)
        }
        "/backend" => Ok(vec![prop("type", "string")]),
        _ => {
            let id = p.strip_prefix("/objects/").unwrap_or("");
            if d.iothreads.borrow().iter().any(|(i, _)| i == id) {
                let mut v = vec![prop("type", "string")];
                v.extend(IOTHREAD_PROPS.iter().map(|(n, _)| prop(n, "int")));
                Ok(v)
            } else {
                Err(errors::device_not_found(path))
            }
        }
    }
}

fn qom_get(d: &Daemon, path: &str, property: &str) -> R<Value> {
    let id = path
        .trim_end_matches('/')
        .strip_prefix("/objects/")
        .unwrap_or("");
    let t = d.iothreads.borrow();
    let Some((_, th)) = t.iter().find(|(i, _)| i == id) else {
        return match path.trim_end_matches('/') {
            "" | "/objects" | "/chardevs" | "/backend" if property == "type" => {
                Ok(json!("container"))
            }
            "" | "/objects" | "/chardevs" | "/backend" => Err(QmpError::generic(format!(
                "Property 'container.{property}' not found"
            ))),
            _ => Err(errors::device_not_found(path)),
        };
    };
    if property == "type" {
        return Ok(json!("iothread"));
    }
    if property == "poll-max-ns" {
        // What the loop itself uses.
        let ns = th.handle.submit(|ctx| async move { ctx.poll_ns() }).wait();
        return ns.map(|ns| json!(ns)).map_err(|e| errors::block(&e));
    }
    let v = th.props.borrow().get(property).copied();
    v.map(|v| json!(v))
        .ok_or_else(|| QmpError::generic(format!("Property 'iothread.{property}' not found")))
}

fn qom_set(d: &Daemon, path: &str, property: &str, value: Value) -> R<()> {
    let id = path
        .trim_end_matches('/')
        .strip_prefix("/objects/")
        .unwrap_or("");
    let t = d.iothreads.borrow();
    let (_, th) = t
        .iter()
        .find(|(i, _)| i == id)
        .ok_or_else(|| errors::device_not_found(path))?;
    let mut props = th.props.borrow_mut();
    let slot = props
        .get_mut(property)
        .ok_or_else(|| QmpError::generic(format!("Property 'iothread.{property}' not found")))?;
    *slot = value.as_i64().ok_or_else(|| {
        QmpError::generic(format!(
            "Invalid parameter type for '{property}', expected: integer"
        ))
    })?;
    if property == "poll-max-ns" {
        let ns = (*slot).max(0) as u64;
        th.handle
            .submit(move |ctx| async move { ctx.set_poll_ns(ns) })
            .wait()
            .map_err(|e| errors::block(&e))?;
    }
    Ok(())
}
