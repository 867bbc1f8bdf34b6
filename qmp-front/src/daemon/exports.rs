//! The NBD server and block exports: `nbd-server-start`/`-stop`,
//! `block-export-add`/`-del`, `query-block-exports`, the legacy
//! `nbd-server-add`/`-remove`, and `--nbd-server`/`--export`.
//!
//! Checks run in the order of QEMU's `blk_exp_add` so that a request with
//! several faults gets the same error as from qemu-storage-daemon. The
//! server ([`crate::nbd`]) owns exports and clients; the daemon keeps the
//! ids in creation order because QEMU lists (and closes) exports newest
//! first. `BLOCK_EXPORT_DELETED` is sent once an export is really gone:
//! at once without clients, otherwise when its last client has left.
//! Everything runs on the loop thread.

use std::rc::{Rc, Weak};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::errors;
use super::qapi::*;
use super::Daemon;
use crate::nbd::{ExportConfig, NbdAddr, NbdServer, RemoveMode};
use crate::qmp::dispatch::Registry;
use crate::qmp::protocol::QmpError;
use crate::qmp::schema::{CommandMeta, Empty};

type R<T> = Result<T, QmpError>;

/// Registers the NBD and export commands.
pub fn register(r: &mut Registry<Daemon>) {
    r.command(
        "nbd-server-start",
        |d: Rc<Daemon>, a: NbdServerStartArgs| async move {
            let addr = legacy_addr(a.map.get("addr"));
            server_start(&d, &a.map, addr).map(|_| Empty {})
        },
    );
    r.command("nbd-server-stop", |d: Rc<Daemon>, _: Empty| async move {
        if d.nbd.borrow().is_none() {
            return Err(errors::nbd_not_running());
        }
        // QEMU waits for every export to be gone before it answers, so
        // all BLOCK_EXPORT_DELETED events precede the reply.
        shutdown(&d).await;
        Ok(Empty {})
    });
    r.command(
        "block-export-add",
        |d: Rc<Daemon>, a: BlockExportOptions| async move {
            export_add(&d, &a.map).map(|_| Empty {})
        },
    );
    r.command(
        "block-export-del",
        |d: Rc<Daemon>, a: BlockExportDelArgs| async move {
            export_del(&d, &a.id, a.mode).map(|_| Empty {})
        },
    );
    r.command(
        "query-block-exports",
        |d: Rc<Daemon>, _: Empty| async move { Ok(query(&d)) },
    );
    let deprecated = || CommandMeta {
        allow_oob: false,
        features: vec!["deprecated"],
    };
    r.command_with(
        "nbd-server-add",
        deprecated(),
        |d: Rc<Daemon>, a: NbdServerAddArgs| async move { legacy_add(&d, a).map(|_| Empty {}) },
    );
    r.command_with(
        "nbd-server-remove",
        deprecated(),
        |d: Rc<Daemon>, a: NbdServerRemoveArgs| async move {
            export_del(&d, &a.name, a.mode).map(|_| Empty {})
        },
    );
}

/// `SocketAddressLegacy` (members under `data`) to a listen address.
fn legacy_addr(v: Option<&Value>) -> R<NbdAddr> {
    let ty = v.and_then(|v| v.get("type")).and_then(Value::as_str);
    let data = v
        .and_then(|v| v.get("data"))
        .cloned()
        .unwrap_or(Value::Null);
    flat_addr(ty.unwrap_or_default(), &data)
}

/// A flat `SocketAddress` (`--nbd-server addr.type=...`) to a listen address.
fn flat_addr(ty: &str, data: &Value) -> R<NbdAddr> {
    let s = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or_default();
    match ty {
        "unix" => {
            if data.get("abstract") == Some(&Value::Bool(true)) {
                return Err(errors::nbd_unsupported_addr("abstract unix"));
            }
            Ok(NbdAddr::Unix(s("path").to_owned()))
        }
        "inet" => {
            let (host, port) = (s("host"), s("port"));
            let port = super::sys::resolve_listen_port(host, port)
                .map_err(|e| errors::nbd_resolve(host, port, &e))?;
            Ok(NbdAddr::Inet {
                host: host.to_owned(),
                port: port.to_string(),
            })
        }
        "fd" => Err(errors::nbd_fd_addr()),
        other => Err(errors::nbd_unsupported_addr(other)),
    }
}

/// Starts the server; `opts` holds the members common to the QMP and
/// command-line forms (`tls-creds`, `max-connections`, ...). An address
/// that cannot be served is reported where QEMU's bind would fail, after
/// the other checks.
fn server_start(d: &Rc<Daemon>, opts: &Map<String, Value>, addr: R<NbdAddr>) -> R<()> {
    if d.nbd.borrow().is_some() {
        return Err(errors::nbd_running());
    }
    if let Some(c) = opts.get("tls-creds").and_then(Value::as_str) {
        // The daemon has no tls-creds objects, so every id is unknown.
        return Err(errors::nbd_no_tls_creds(c));
    }
    if opts.contains_key("tls-authz") {
        return Err(errors::nbd_tls_authz());
    }
    let addr = addr?;
    // QEMU's default since its CVE-2024-7409 fix; 0 means unlimited.
    let max = opts
        .get("max-connections")
        .and_then(Value::as_u64)
        .unwrap_or(100) as u32;
    let server = NbdServer::start(&d.ctx, &addr, max).map_err(|e| errors::nbd_bind(&addr, &e))?;
    let weak: Weak<Daemon> = Rc::downgrade(d);
    server.set_on_deleted(Box::new(move |id: &str| {
        let Some(d) = weak.upgrade() else { return };
        d.export_ids.borrow_mut().retain(|(x, _)| x != id);
        // Sent at once: qemu-storage-daemon's event for an export without
        // clients reaches the monitor before the reply to the removal.
        d.hub
            .emit("BLOCK_EXPORT_DELETED", Some(json!({ "id": id })));
    }));
    *d.nbd.borrow_mut() = Some(server);
    Ok(())
}

/// Removes every export newest first (QEMU's order for the events), then
/// stops listening and disconnects all clients.
fn close_all(d: &Daemon, server: &NbdServer) {
    let ids: Vec<String> = d
        .export_ids
        .borrow()
        .iter()
        .rev()
        .map(|(i, _)| i.clone())
        .collect();
    for id in ids {
        // Already-removed exports are only waiting for their clients.
        let _ = server.remove_export(&id, RemoveMode::Hard);
    }
    server.stop();
}

/// Stops the server (if started) and gives departing clients a moment, so
/// that every `BLOCK_EXPORT_DELETED` is sent and no export still holds
/// its node afterwards (`nbd-server-stop`, `quit`, shutdown).
pub async fn shutdown(d: &Daemon) {
    let Some(server) = d.nbd.borrow_mut().take() else {
        return;
    };
    close_all(d, &server);
    for _ in 0..200 {
        if d.export_ids.borrow().is_empty() {
            break;
        }
        d.ctx.sleep(Duration::from_millis(10)).await;
    }
}

fn str_of<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

fn flag(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).and_then(Value::as_bool).unwrap_or(false)
}

/// `block-export-add` (and `--export`), checks in `blk_exp_add`'s order.
fn export_add(d: &Daemon, o: &Map<String, Value>) -> R<()> {
    let id = str_of(o, "id").unwrap_or_default();
    let node_name = str_of(o, "node-name").unwrap_or_default();
    if !block_core::graph::id_wellformed(id) {
        return Err(errors::export_bad_id());
    }
    if d.export_ids.borrow().iter().any(|(x, _)| x == id) {
        return Err(errors::export_id_in_use(id));
    }
    let ty = str_of(o, "type").unwrap_or_default();
    if ty != "nbd" {
        return Err(errors::export_type_unsupported(ty));
    }
    let node = d
        .graph
        .node(node_name)
        .ok_or_else(|| errors::device_or_node_not_found("", node_name))?;
    let writable = flag(o, "writable");
    if writable && node.is_read_only() {
        return Err(errors::export_read_only());
    }
    if let Some(t) = str_of(o, "iothread") {
        // The export is served from the main loop either way; a client
        // cannot tell which thread answers it.
        if !d.iothreads.borrow().iter().any(|(i, _)| i == t) {
            return Err(errors::iothread_not_found(t));
        }
    }
    let server = d.nbd.borrow().clone().ok_or_else(errors::nbd_not_running)?;
    let bitmaps = o
        .get("bitmaps")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|b| match b {
                    Value::String(s) => crate::nbd::BitmapRef {
                        node: None,
                        name: s.clone(),
                    },
                    other => crate::nbd::BitmapRef {
                        node: other.get("node").and_then(Value::as_str).map(str::to_owned),
                        name: other
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    },
                })
                .collect()
        })
        .unwrap_or_default();
    let cfg = ExportConfig {
        id: id.to_owned(),
        node_name: node_name.to_owned(),
        name: str_of(o, "name").map(str::to_owned),
        description: str_of(o, "description").map(str::to_owned),
        writable,
        writethrough: flag(o, "writethrough"),
        bitmaps,
        allocation_depth: flag(o, "allocation-depth"),
    };
    // allow-inactive changes nothing: nodes here are always active.
    server
        .add_export(&d.graph, cfg)
        .map_err(|e| errors::blk_perm(&e))?;
    d.export_ids
        .borrow_mut()
        .push((id.to_owned(), node_name.to_owned()));
    Ok(())
}

/// `nbd-server-add`: QEMU 10 turns it into `block-export-add` with the
/// export name as id, and quietly exports read-only nodes read-only.
fn legacy_add(d: &Daemon, a: NbdServerAddArgs) -> R<()> {
    let node = d
        .graph
        .node(&a.device)
        .ok_or_else(|| errors::device_or_node_not_found(&a.device, &a.device))?;
    let name = a.name.unwrap_or_else(|| a.device.clone());
    let mut o = Map::new();
    o.insert("type".into(), "nbd".into());
    o.insert("id".into(), name.clone().into());
    o.insert("node-name".into(), node.name().into());
    o.insert("name".into(), name.into());
    if let Some(desc) = a.description {
        o.insert("description".into(), desc.into());
    }
    let writable = a.writable.unwrap_or(false) && !node.is_read_only();
    o.insert("writable".into(), writable.into());
    if let Some(b) = a.bitmap {
        o.insert("bitmaps".into(), json!([b]));
    }
    export_add(d, &o)
}

/// `block-export-del` and `nbd-server-remove` (which QEMU 10 forwards to
/// it: the name is looked up as an export id).
fn export_del(d: &Daemon, id: &str, mode: Option<BlockExportRemoveMode>) -> R<()> {
    let server = d.nbd.borrow().clone();
    let exp = server
        .as_ref()
        .and_then(|s| s.exports().into_iter().find(|e| e.cfg.id == id));
    let Some(exp) = exp else {
        // Removed but still waiting for its clients to leave.
        if d.export_ids.borrow().iter().any(|(x, _)| x == id) {
            return Err(errors::export_shutting_down(id));
        }
        return Err(errors::export_not_found(id));
    };
    let mode = match mode {
        Some(BlockExportRemoveMode::Hard) => RemoveMode::Hard,
        _ => RemoveMode::Safe,
    };
    if mode == RemoveMode::Safe && exp.connections() > 0 {
        return Err(errors::export_in_use(id));
    }
    if let Some(s) = server {
        s.remove_export(id, mode).map_err(|e| errors::block(&e))?;
    }
    Ok(())
}

/// `query-block-exports`, newest first as in QEMU; removed exports whose
/// clients have not left yet are listed as shutting down.
fn query(d: &Daemon) -> Vec<BlockExportInfo> {
    let live: Vec<String> = d
        .nbd
        .borrow()
        .as_ref()
        .map(|s| s.exports().iter().map(|e| e.cfg.id.clone()).collect())
        .unwrap_or_default();
    d.export_ids
        .borrow()
        .iter()
        .rev()
        .map(|(id, node)| BlockExportInfo {
            id: id.clone(),
            ty: BlockExportType::Nbd,
            node_name: node.clone(),
            shutting_down: !live.contains(id),
        })
        .collect()
}

/// `--nbd-server` and `--export`, parsed with QEMU's option types.
pub fn cli(d: &Rc<Daemon>, item: &super::cli::Item) -> Result<(), String> {
    use super::cli::Item;
    use crate::qmp::keyval::parse_option;
    match item {
        Item::Export(a) => {
            let o: BlockExportOptions = parse_option(a, Some("type")).map_err(|e| e.0)?;
            export_add(d, &o.map).map_err(|e| e.desc)
        }
        Item::NbdServer(a) => {
            let o: NbdServerOptions = parse_option(a, None).map_err(|e| e.0)?;
            let addr = o.map.get("addr").cloned().unwrap_or(Value::Null);
            let ty = addr.get("type").and_then(Value::as_str).unwrap_or_default();
            server_start(d, &o.map, flat_addr(ty, &addr)).map_err(|e| e.desc)
        }
        _ => Ok(()),
    }
}
