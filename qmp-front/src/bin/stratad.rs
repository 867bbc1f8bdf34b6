//! `stratad`: Strata's drop-in replacement for qemu-storage-daemon.
//! See `qmp_front::daemon` for the design.
fn main() {
    std::process::exit(qmp_front::daemon::main());
}
