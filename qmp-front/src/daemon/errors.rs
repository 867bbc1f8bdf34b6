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
