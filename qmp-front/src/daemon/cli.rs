//! qemu-storage-daemon's command line: the options, their order, and the
//! error texts of its getopt_long pass. Parsing only; nothing is started
//! here (see [`super::startup`]). Pure functions, main thread.

/// One option that configures something, kept in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `--blockdev`
    Blockdev(String),
    /// `--chardev`
    Chardev(String),
    /// `--export`
    Export(String),
    /// `--monitor`
    Monitor(String),
    /// `--nbd-server`
    NbdServer(String),
    /// `--object`
    Object(String),
}

impl Item {
    /// The option's argument as the user wrote it, for error prefixes.
    pub fn arg(&self) -> &str {
        match self {
            Item::Blockdev(a)
            | Item::Chardev(a)
            | Item::Export(a)
            | Item::Monitor(a)
            | Item::NbdServer(a)
            | Item::Object(a) => a,
        }
    }

    /// The option's name.
    pub fn option(&self) -> &'static str {
        match self {
            Item::Blockdev(_) => "--blockdev",
            Item::Chardev(_) => "--chardev",
            Item::Export(_) => "--export",
            Item::Monitor(_) => "--monitor",
            Item::NbdServer(_) => "--nbd-server",
            Item::Object(_) => "--object",
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cli {
    /// `-h`
    pub help: bool,
    /// `-V`
    pub version: bool,
    /// `--daemonize`
    pub daemonize: bool,
    /// `--pidfile`
    pub pidfile: Option<String>,
    /// `-T` patterns (accepted; Strata has no tracepoints yet).
    pub traces: Vec<String>,
    /// Everything else, in order.
    pub items: Vec<Item>,
    /// No argument at all: run the embedded default configuration.
    pub default_config: bool,
}

/// A command-line error; the text follows "PROGNAME: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

const LONG: &[(&str, bool)] = &[
    ("blockdev", true),
    ("chardev", true),
    ("daemonize", false),
    ("export", true),
    ("help", false),
    ("monitor", true),
    ("nbd-server", true),
    ("object", true),
    ("pidfile", true),
    ("trace", true),
    ("version", false),
];

fn apply(cli: &mut Cli, name: &str, arg: Option<String>) {
    let a = arg.unwrap_or_default();
    match name {
        "blockdev" => cli.items.push(Item::Blockdev(a)),
        "chardev" => cli.items.push(Item::Chardev(a)),
        "export" => cli.items.push(Item::Export(a)),
        "monitor" => cli.items.push(Item::Monitor(a)),
        "nbd-server" => cli.items.push(Item::NbdServer(a)),
        "object" => cli.items.push(Item::Object(a)),
        "pidfile" => cli.pidfile = Some(a),
        "trace" => cli.traces.push(a),
        "daemonize" => cli.daemonize = true,
        "help" => cli.help = true,
        "version" => cli.version = true,
        _ => {}
    }
}

/// Parses `args` (without the program name) as getopt_long does for
/// qemu-storage-daemon: `--name arg`, `--name=arg`, unique prefixes of long
/// names, `-h`, `-V`, `-T arg`/`-Targ`.
pub fn parse(args: &[String]) -> Result<Cli, CliError> {
    let mut cli = Cli {
        default_config: args.is_empty(),
        ..Cli::default()
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if let Some(long) = a.strip_prefix("--") {
            if long.is_empty() {
                // "--" ends options; the rest are arguments.
                if let Some(extra) = args.get(i) {
                    return Err(CliError(format!("{extra}: Unexpected argument")));
                }
                break;
            }
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            let exact = LONG.iter().find(|(n, _)| *n == name);
            let cands: Vec<_> = LONG.iter().filter(|(n, _)| n.starts_with(name)).collect();
            let (lname, has_arg) = match (exact, cands.as_slice()) {
                (Some(e), _) => *e,
                (None, [one]) => **one,
                (None, []) => return Err(CliError(format!("unrecognized option '{a}'"))),
                (None, many) => {
                    let list: Vec<String> = many.iter().map(|(n, _)| format!("'--{n}'")).collect();
                    return Err(CliError(format!(
                        "option '{}' is ambiguous; possibilities: {}",
                        a.split('=').next().unwrap_or(a),
                        list.join(" ")
                    )));
                }
            };
            let arg = if has_arg {
                match inline {
                    Some(v) => Some(v),
                    None => match args.get(i) {
                        Some(v) => {
                            i += 1;
                            Some(v.clone())
                        }
                        None => {
                            return Err(CliError(format!(
                                "option '--{lname}' requires an argument"
                            )))
                        }
                    },
                }
            } else {
                if inline.is_some() {
                    return Err(CliError(format!(
                        "option '--{lname}' doesn't allow an argument"
                    )));
                }
                None
            };
            apply(&mut cli, lname, arg);
        } else if a.len() > 1 && a.starts_with('-') {
            for (pos, c) in a[1..].char_indices() {
                match c {
                    'h' => cli.help = true,
                    'V' => cli.version = true,
                    'T' => {
                        let rest = &a[1 + pos + 1..];
                        let v = if !rest.is_empty() {
                            rest.to_owned()
                        } else if let Some(v) = args.get(i) {
                            i += 1;
                            v.clone()
                        } else {
                            return Err(CliError("option requires an argument -- 'T'".into()));
                        };
                        cli.traces.push(v);
                        break;
                    }
                    other => return Err(CliError(format!("invalid option -- '{other}'"))),
                }
            }
        } else {
            return Err(CliError(format!("{a}: Unexpected argument")));
        }
    }
    Ok(cli)
}

/// `-h` output (qemu-storage-daemon's, with the program name substituted).
pub fn help_text(prog: &str) -> String {
    format!(
        "Usage: {prog} [options]
QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         See the qemu(1) man page for documentation of the
                         objects that can be added.

  --pidfile <path>       write process ID to a file after startup

Started without any option, {prog} runs a default configuration: a QMP
monitor on ./stratad.qmp and a null-co demo node.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
"
    )
}

/// `-V` output: QEMU's version line (the QMP version Strata speaks) and
/// Strata's own.
pub fn version_text(prog: &str) -> String {
    format!(
        "{prog} version 10.0.2 (strata {})\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<Cli, String> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(|e| e.0)
    }

    /// Texts taken from qemu-storage-daemon 10.0.
    #[test]
    fn getopt_errors() {
        assert_eq!(p(&["--foo"]).unwrap_err(), "unrecognized option '--foo'");
        assert_eq!(
            p(&["--blockdev"]).unwrap_err(),
            "option '--blockdev' requires an argument"
        );
        assert_eq!(p(&["-x"]).unwrap_err(), "invalid option -- 'x'");
        assert_eq!(p(&["extra"]).unwrap_err(), "extra: Unexpected argument");
    }

    #[test]
    fn forms() {
        let c = p(&[
            "--block=null-co",
            "--chardev",
            "stdio,id=s",
            "-T",
            "x*",
            "-V",
        ])
        .unwrap();
        assert_eq!(
            c.items,
            vec![
                Item::Blockdev("null-co".into()),
                Item::Chardev("stdio,id=s".into())
            ]
        );
        assert!(c.version);
        assert_eq!(c.traces, ["x*"]);
        assert!(p(&[]).unwrap().default_config);
    }
}
