//! `stratad`: the daemon (work in progress).
fn main() {}
