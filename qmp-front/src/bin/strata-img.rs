//! `strata-img`: qemu-img-style tool; see `qmp_front::img`.
fn main() {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    std::process::exit(qmp_front::img::main(&args));
}
