//! `strata-img`: the qemu-img-compatible tool.
//!
//! The binary hands its arguments to [`main`], which picks the subcommand
//! from [`COMMANDS`] and runs it. Each subcommand lives in its own module
//! with a `run(args) -> Result<(), Failure>` entry point; to add one, write
//! the module and add a line to the table. Shared pieces: [`getopt`]
//! (qemu-img's command-line parsing and its error texts), [`num`] (numeric
//! arguments), [`open`] (opening an image as `img_open` does), [`common`]
//! (an event loop with a graph, qcow2 helpers, QEMU's size and snapshot
//! formatting), [`qjson`] (JSON in QEMU's key order), [`help`] (the help
//! texts).
//!
//! Output follows qemu-img byte for byte where scripts read it; errors go to
//! stderr as `strata-img: MESSAGE`, and command-line mistakes add the
//! "Try ... --help" line, with exit status 1. `check` and `compare` have
//! more exit statuses (leaks, corruptions, differences) and leave through
//! `process::exit` after cleaning up.
#![forbid(unsafe_code)]

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod common;
pub mod compare;
pub mod convert;
pub mod create;
pub mod getopt;
pub mod help;
pub mod info;
pub mod map;
pub mod num;
pub mod open;
pub mod qjson;
pub mod resize;
pub mod snapshot;

/// Program name used in messages.
pub const PROG: &str = "strata-img";

/// A subcommand entry point: gets the arguments after the subcommand name.
pub type CommandFn = fn(&[String]) -> Result<(), Failure>;

/// Every subcommand: name, entry point, one-line description.
pub const COMMANDS: &[(&str, CommandFn, &str)] = &[
    (
        "amend",
        amend::run,
        "Update format-specific options of the image",
    ),
    ("bench", bench::run, "Run simple image benchmark"),
    (
        "bitmap",
        bitmap::run,
        "Perform modifications of the persistent bitmap in the image",
    ),
    ("create", create::run, "Create and format new image file"),
    ("info", info::run, "Display information about image"),
    ("check", check::run, "Check basic image integrity"),
    ("map", map::run, "Dump image metadata"),
    (
        "compare",
        compare::run,
        "Check if two images have the same contents",
    ),
    (
        "convert",
        convert::run,
        "Convert one or more images to a different format",
    ),
    (
        "snapshot",
        snapshot::run,
        "List, apply, create or delete snapshots in image",
    ),
    ("resize", resize::run, "Resize a disk image"),
];

/// How a subcommand failed; decides the message layout.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A getopt error: `PROG CMD: MESSAGE` + the try-help line.
    #[error("{0}")]
    Getopt(#[from] getopt::GetoptError),
    /// A usage mistake found after option parsing: `PROG: MESSAGE` + the
    /// try-help line.
    #[error("{0}")]
    Usage(String),
    /// Any other error: `PROG: MESSAGE`.
    #[error("{0}")]
    Error(String),
}

impl From<num::NumError> for Failure {
    fn from(e: num::NumError) -> Self {
        Failure::Error(e.to_string())
    }
}

impl From<open::OpenError> for Failure {
    fn from(e: open::OpenError) -> Self {
        Failure::Error(e.0)
    }
}

impl Failure {
    /// The text qemu-img prints on stderr for this failure of `cmd`.
    pub fn render(&self, cmd: &str) -> String {
        let tryhelp = format!("Try '{PROG} {cmd} --help' for more info");
        match self {
            Failure::Getopt(e) => format!("{PROG} {cmd}: {e}\n{tryhelp}\n"),
            Failure::Usage(m) => format!("{PROG}: {m}\n{tryhelp}\n"),
            Failure::Error(m) => format!("{PROG}: {m}\n"),
        }
    }
}

fn usage() -> String {
    let mut s = format!(
        "Usage: {PROG} [standard options] COMMAND [--help | command options]\n\nCommands:\n"
    );
    for (name, _, what) in COMMANDS {
        s.push_str(&format!("  {name} - {what}\n"));
    }
    s
}

/// Runs the tool on `args` (without the program name); returns the exit
/// status.
pub fn main(args: &[String]) -> i32 {
    use std::io::Write;
    let Some(cmd) = args.first() else {
        eprint!("{PROG}: Not enough arguments\nTry '{PROG} --help' for more information\n");
        return 1;
    };
    if cmd == "-h" || cmd == "--help" {
        print!("{}", usage());
        return 0;
    }
    let Some((name, run, _)) = COMMANDS.iter().find(|(n, _, _)| n == cmd) else {
        eprint!("{PROG}: Command not found: {cmd}\nTry '{PROG} --help' for more information\n");
        return 1;
    };
    let r = run(&args[1..]);
    let _ = std::io::stdout().flush();
    match r {
        Ok(()) => 0,
        Err(f) => {
            eprint!("{}", f.render(name));
            1
        }
    }
}
