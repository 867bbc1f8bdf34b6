//! `strata-img`: qemu-img-style tool (work in progress).
fn main() {}
