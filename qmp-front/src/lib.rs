//! Strata's front-end (work in progress).

pub mod nbd;
pub mod qmp;
