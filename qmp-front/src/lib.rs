//! Strata's front-end (work in progress).

pub mod qmp;
