//! Block jobs for Strata: the job framework with QEMU's state machine and the
//! jobs built on it (backup, mirror, stream, commit, guest-memory dump).
//!
//! Jobs run as tasks on a node's loop thread and drive I/O through
//! `block_core`'s request path like any other user of a node. This crate is
//! filled in by the job issues; today it only fixes its place in the
//! dependency order `qmp-front -> jobs -> formats -> block-core`.
#![forbid(unsafe_code)]
