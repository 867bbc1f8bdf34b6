//! Strata's drivers.
//!
//! Protocol drivers ([`file`], [`null`]) talk to the host; format drivers
//! ([`raw`], and qcow2 as it lands) translate guest ranges onto a child.
//! Each driver module exposes an `open` function with block-core's
//! [`block_core::graph::OpenFn`] signature; [`registry`] lists them all so
//! front-ends never name drivers one by one.
#![warn(missing_docs)]

pub mod file;
pub mod lock;
pub mod null;
pub mod qcow2;
pub mod raw;

use block_core::DriverRegistry;

/// Every driver this crate provides, by QEMU driver name.
pub fn registry() -> DriverRegistry {
    let mut r = DriverRegistry::new();
    r.register("file", file::open);
    r.register("raw", raw::open);
    r.register("null-co", null::open);
    r.register("qcow2", qcow2::open);
    r
}

#[cfg(test)]
mod tests;
