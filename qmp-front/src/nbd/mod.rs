//! The NBD server: Strata's nodes served to NBD clients (qemu-img, qemu-io,
//! nbdcopy, backup agents), per the NBD protocol document with QEMU's
//! metadata contexts.
//!
//! [`server`] owns listeners and exports, [`conn`] one client's session,
//! [`proto`] the wire format, [`socket`] non-blocking sockets on the loop.

pub mod conn;
pub mod proto;
pub mod server;
pub mod socket;

pub use server::{BitmapRef, ExportConfig, NbdAddr, NbdExport, NbdServer, RemoveMode};
