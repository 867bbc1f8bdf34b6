//! The one place where engine and job errors become QMP errors.
//!
//! QEMU answers almost everything with `GenericError`; `DeviceNotFound` is
//! used only by a few lookups (QOM paths, `device`-addressed commands).
//! Callers that know the QEMU wording for their situation build the
//! `QmpError` themselves through the helpers here, so texts live in one
//! file too. Pure functions, any thread.

use block_core::Error;

use crate::qmp::protocol::{QmpError, QmpErrorClass};

/// Maps an engine error to its QMP error. The class: QEMU reports every
/// block-layer failure (any `block_core::ErrorKind`: invalid argument, not
/// found, busy, permission conflict, I/O...) as `GenericError`; only
/// `device`/QOM lookups use `DeviceNotFound` (see [`device_not_found`]).
/// The text is the error's `Display`, worded as QEMU's where one exists,
/// with the few rewrites below.
pub fn block(e: &Error) -> QmpError {
    let class = QmpErrorClass::GenericError;
    let desc = match e {
        Error::Duplicate { what: "node", name } => {
            format!("Duplicate nodes with node-name='{name}'")
        }
        Error::NotFound { what: "Node", name } => {
            format!("Cannot find device='{name}' nor node-name='{name}'")
        }
        Error::Open { path, source } => {
            format!("Could not open '{path}': {}", jobs::create::os_text(source))
        }
        _ => e.to_string(),
    };
    QmpError::new(class, desc)
}

/// A job framework error.
pub fn job(e: &jobs::JobError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// An error of a request made through a BlockBackend (export, resize):
/// permission conflicts worded as QEMU's, where the requester is always
/// an unnamed block device using the node as its `root` child.
pub fn blk_perm(e: &Error) -> QmpError {
    let Error::PermissionConflict {
        node,
        user,
        role,
        perm,
    } = e
    else {
        return block(e);
    };
    let holder = if user.starts_with("block device") {
        "an unnamed block device".to_owned()
    } else {
        format!("node '{user}'")
    };
    QmpError::generic(format!(
        "Permission conflict on node '{node}': permissions '{perm}' are both required by \
         an unnamed block device (uses node '{node}' as 'root' child) and unshared by \
         {holder} (uses node '{node}' as '{role}' child)."
    ))
}

/// Reopening read-only a node that has writers (an export, a parent).
pub fn read_only_with_writers(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Read-only block node '{name}' cannot support read-write users"
    ))
}

/// QEMU's `Failed to find node with node-name='x'` (blockdev-del, reopen).
pub fn node_not_found(name: &str) -> QmpError {
    QmpError::generic(format!("Failed to find node with node-name='{name}'"))
}

/// QEMU's lookup by device or node name.
pub fn device_or_node_not_found(device: &str, node: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{device}' nor node-name='{node}'"
    ))
}

/// `block-job-*` on an id that is no block job (create jobs are not).
pub fn block_job_not_found(id: &str) -> QmpError {
    QmpError::new(
        QmpErrorClass::DeviceNotActive,
        format!("Block job '{id}' not found"),
    )
}

/// `Device 'x' not found`, GenericError (block-set-write-threshold).
pub fn device_not_found_generic(name: &str) -> QmpError {
    QmpError::generic(format!("Device '{name}' not found"))
}

/// `Device 'x' not found`, DeviceNotFound (QOM paths).
pub fn device_not_found(name: &str) -> QmpError {
    QmpError::new(
        QmpErrorClass::DeviceNotFound,
        format!("Device '{name}' not found"),
    )
}

/// `NBD server already running`.
pub fn nbd_running() -> QmpError {
    QmpError::generic("NBD server already running")
}

/// `NBD server not running`.
pub fn nbd_not_running() -> QmpError {
    QmpError::generic("NBD server not running")
}

/// `tls-creds` naming an object that does not exist (the daemon has no
/// TLS credential objects at all).
pub fn nbd_no_tls_creds(id: &str) -> QmpError {
    QmpError::generic(format!("No TLS credentials with id '{id}'"))
}

/// `tls-authz`: QEMU would check clients against an authorization
/// object; silently serving everyone instead would be a security hole.
pub fn nbd_tls_authz() -> QmpError {
    QmpError::generic("NBD server TLS authorization (tls-authz) is not supported by stratad")
}

/// `addr.type=fd`, worded as qemu-storage-daemon (no fd passing).
pub fn nbd_fd_addr() -> QmpError {
    QmpError::generic("only QEMU supports file descriptor passing")
}

/// Listen address kinds the NBD server cannot bind (vsock, abstract unix).
pub fn nbd_unsupported_addr(kind: &str) -> QmpError {
    QmpError::generic(format!(
        "NBD server addresses of type '{kind}' are not supported by stratad"
    ))
}

/// The NBD server's bind failure, worded as QEMU's socket layer.
pub fn nbd_bind(addr: &crate::nbd::NbdAddr, e: &Error) -> QmpError {
    let Error::Io { source, .. } = e else {
        return block(e);
    };
    let os = jobs::create::os_text(source);
    match addr {
        crate::nbd::NbdAddr::Unix(p) => {
            QmpError::generic(format!("Failed to bind socket to {p}: {os}"))
        }
        crate::nbd::NbdAddr::Inet { .. } if source.raw_os_error() == Some(libc::EADDRINUSE) => {
            QmpError::generic(format!("Failed to find an available port: {os}"))
        }
        crate::nbd::NbdAddr::Inet { .. } => {
            QmpError::generic(format!("Failed to bind socket: {os}"))
        }
    }
}

/// An inet listen address that does not resolve (`gai` is the resolver's
/// text).
pub fn nbd_resolve(host: &str, port: &str, gai: &str) -> QmpError {
    QmpError::generic(format!(
        "address resolution failed for {host}:{port}: {gai}"
    ))
}

/// `Invalid block export id`.
pub fn export_bad_id() -> QmpError {
    QmpError::generic("Invalid block export id")
}

/// An export id that is taken.
pub fn export_id_in_use(id: &str) -> QmpError {
    QmpError::generic(format!("Block export id '{id}' is already in use"))
}

/// Export types QEMU knows but this daemon cannot serve.
pub fn export_type_unsupported(ty: &str) -> QmpError {
    QmpError::generic(format!(
        "Export type '{ty}' is not supported by stratad (only 'nbd' is)"
    ))
}

/// A writable export of a read-only node.
pub fn export_read_only() -> QmpError {
    QmpError::generic("Cannot export read-only node as writable")
}

/// An `iothread` id that names no iothread object.
pub fn iothread_not_found(id: &str) -> QmpError {
    QmpError::generic(format!("iothread \"{id}\" not found"))
}

/// `block-export-del`/`nbd-server-remove` of an unknown id.
pub fn export_not_found(id: &str) -> QmpError {
    QmpError::generic(format!("Export '{id}' is not found"))
}

/// Removal of an export that is already being removed.
pub fn export_shutting_down(id: &str) -> QmpError {
    QmpError::generic(format!("Export '{id}' is already shutting down"))
}

/// Safe removal of an export with clients (QEMU's hint to use
/// `mode=hard` goes to the human monitor only, not into QMP).
pub fn export_in_use(id: &str) -> QmpError {
    QmpError::generic(format!("export '{id}' still in use"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_match_qemu() {
        let e = Error::Duplicate {
            what: "node",
            name: "a".into(),
        };
        assert_eq!(block(&e).desc, "Duplicate nodes with node-name='a'");
        let e = Error::NotFound {
            what: "Node",
            name: "zz".into(),
        };
        assert_eq!(block(&e).desc, "Cannot find device='zz' nor node-name='zz'");
        let e = Error::Open {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            block(&e).desc,
            "Could not open '/x': No such file or directory"
        );
        assert_eq!(
            device_not_found("/objects/zz").class,
            QmpErrorClass::DeviceNotFound
        );
    }
}
