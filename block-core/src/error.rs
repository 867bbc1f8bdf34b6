//! The engine's one error type.
//!
//! Every failure carries what a user needs to act on it (node name, offset,
//! path, the conflicting user) and keeps its cause as `source()`. The small,
//! stable [`ErrorKind`] is what front-ends map to their own error classes
//! (QMP's GenericError, DeviceNotFound, ...) in one place; nobody matches on
//! message text.

use std::io;

/// Convenience alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Coarse classification of an [`Error`], stable across releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A request or option is malformed or out of range.
    InvalidArgument,
    /// A named node, backend or object does not exist.
    NotFound,
    /// The name is already taken.
    AlreadyExists,
    /// A permission conflict in the graph or an image locked elsewhere.
    PermissionConflict,
    /// The operation needs write access that the node does not have.
    ReadOnly,
    /// The host returned an I/O error.
    Io,
    /// The image's metadata is inconsistent.
    Corrupt,
    /// The driver or engine does not implement this.
    Unsupported,
    /// The node is in use and the operation would break its users.
    Busy,
}

/// Errors of the block engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A host I/O call failed; `op` names what the engine was doing.
    #[error("{op} failed on '{node}': {source}")]
    Io {
        /// Node the request was issued on (may be empty before a node exists).
        node: String,
        /// Short description of the operation, e.g. "read at offset 4096".
        op: String,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// Opening a host file failed.
    #[error("Could not open '{path}': {source}")]
    Open {
        /// The path given by the user.
        path: String,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting image lock.
    #[error("Failed to get {}\"{perm}\" lock\nIs another process using the image [{path}]?", if *shared { "shared " } else { "" })]
    Locked {
        /// The image path.
        path: String,
        /// Whether the lock that failed is the "shared" byte (we want to
        /// stop others from using a permission that someone holds).
        shared: bool,
        /// The permission whose lock byte is taken ("write", "consistent read").
        perm: &'static str,
    },
    /// A graph change would give two users incompatible permissions.
    #[error("Conflicts with use by {user} as '{role}', which does not allow '{perm}' on {node}")]
    PermissionConflict {
        /// The node the permissions meet on.
        node: String,
        /// The existing user that refuses to share.
        user: String,
        /// Its role (e.g. "root", "file", "backing").
        role: String,
        /// The permission that is not shared.
        perm: &'static str,
    },
    /// A request reaches beyond the node's end.
    #[error("Request on '{node}' out of range: offset {offset} + length {len} > size {size}")]
    OutOfRange {
        /// Node name.
        node: String,
        /// Request start.
        offset: u64,
        /// Request length.
        len: u64,
        /// The node's size.
        size: u64,
    },
    /// A request is larger than the engine accepts in one piece.
    #[error("Request on '{node}' too large: {len} bytes (at most {max})")]
    TooLarge {
        /// Node name.
        node: String,
        /// Requested length.
        len: u64,
        /// Accepted maximum.
        max: u64,
    },
    /// Writing to a read-only node.
    #[error("Node '{node}' is read-only")]
    ReadOnly {
        /// Node name.
        node: String,
    },
    /// A user wants to write through a read-only node (the permission
    /// check, as when a parent is made writable over it); QEMU's message.
    #[error("Block node is read-only")]
    ReadOnlyNode {
        /// Node name.
        node: String,
    },
    /// An option or argument is invalid; `msg` is the user-facing reason.
    #[error("{msg}")]
    InvalidArgument {
        /// Reason, worded as QEMU words it where there is an equivalent.
        msg: String,
    },
    /// A named thing is missing.
    #[error("{what} '{name}' not found")]
    NotFound {
        /// Kind of thing ("Node", "Block backend", ...).
        what: &'static str,
        /// The name looked up.
        name: String,
    },
    /// A name is already used.
    #[error("{what} name '{name}' is already in use")]
    Duplicate {
        /// Kind of thing.
        what: &'static str,
        /// The duplicated name.
        name: String,
    },
    /// Image metadata is inconsistent.
    #[error("Image '{node}' is corrupt: {detail}")]
    Corrupt {
        /// Node name.
        node: String,
        /// What exactly is wrong, with offsets.
        detail: String,
    },
    /// Not implemented by this driver or engine.
    #[error("{what} is not supported by '{driver}'")]
    Unsupported {
        /// Driver or component name.
        driver: String,
        /// The operation.
        what: String,
    },
    /// The node is used by someone and cannot be changed now.
    #[error("Node '{node}' is busy: {reason}")]
    Busy {
        /// Node name.
        node: String,
        /// Who or what uses it.
        reason: String,
    },
    /// The event loop this request was sent to has stopped.
    #[error("the event loop has stopped")]
    LoopStopped,
}

impl Error {
    /// The stable classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::Open { .. } => ErrorKind::Io,
            Error::Locked { .. } | Error::PermissionConflict { .. } => {
                ErrorKind::PermissionConflict
            }
            Error::OutOfRange { .. } | Error::TooLarge { .. } | Error::InvalidArgument { .. } => {
                ErrorKind::InvalidArgument
            }
            Error::ReadOnly { .. } | Error::ReadOnlyNode { .. } => ErrorKind::ReadOnly,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Duplicate { .. } => ErrorKind::AlreadyExists,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Busy { .. } | Error::LoopStopped => ErrorKind::Busy,
        }
    }

    /// The host errno behind this error, if any (for NBD and guest error codes).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Open { source, .. } => source.raw_os_error(),
            Error::OutOfRange { .. } | Error::TooLarge { .. } | Error::InvalidArgument { .. } => {
                Some(libc::EINVAL)
            }
            Error::ReadOnly { .. } | Error::ReadOnlyNode { .. } => Some(libc::EPERM),
            Error::Unsupported { .. } => Some(libc::ENOTSUP),
            _ => Some(libc::EIO),
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument { msg: msg.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(node: &str, op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            node: node.to_owned(),
            op: op.into(),
            source,
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(driver: &str, what: impl Into<String>) -> Self {
        Error::Unsupported {
            driver: driver.to_owned(),
            what: what.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_errno() {
        let e = Error::io("n", "read", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.errno(), Some(libc::ENOSPC));
        assert!(e.to_string().contains("read failed on 'n'"));
        let e = Error::invalid("bad");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.errno(), Some(libc::EINVAL));
    }
}
