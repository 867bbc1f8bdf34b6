//! `strata-img create`: qemu-img's `create` for raw and qcow2.
//!
//! The steps and their messages follow `bdrv_img_create`: `-o` options are
//! parsed against the format's option list (type errors stop before
//! anything is printed), the size must come exactly once, a backing file
//! is opened to check it (and to take its size when none is given), then
//! the "Formatting ..." line lists every option that has a value or a
//! default in the format's print order, and only then does the driver
//! validate the values and write the image. Errors are prefixed with the
//! file name.

use formats::qcow2::create::{create_file, CreateOptions};
use formats::qcow2::header::CompressionType;

use super::common::{release, Env};
use super::getopt::{getopt_long, LongOpt};
use super::num::parse_size;
use super::open::{split_commas, strerror};
use super::Failure;

const OPT_OBJECT: u32 = 256;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::flag("quiet", 'q' as u32),
    LongOpt::value("object", OPT_OBJECT),
    LongOpt::value("format", 'f' as u32),
    LongOpt::value("backing", 'b' as u32),
    LongOpt::value("backing-format", 'F' as u32),
    LongOpt::flag("backing-unsafe", 'u' as u32),
    LongOpt::value("options", 'o' as u32),
];

/// The type of a creation option, deciding how its value is parsed and
/// printed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Num,
    Size,
}

/// A creation option: name, type, default as QEMU prints it.
type Desc = (&'static str, Kind, Option<&'static str>);

/// qcow2's options in the order qemu-img prints them.
const QCOW2_OPTS: &[Desc] = &[
    ("cluster_size", Kind::Size, Some("65536")),
    ("extended_l2", Kind::Bool, Some("off")),
    ("preallocation", Kind::Str, None),
    ("compression_type", Kind::Str, Some("zlib")),
    ("size", Kind::Size, None),
    ("compat", Kind::Str, None),
    ("backing_file", Kind::Str, None),
    ("backing_fmt", Kind::Str, None),
    ("data_file", Kind::Str, None),
    ("data_file_raw", Kind::Bool, None),
    ("lazy_refcounts", Kind::Bool, Some("off")),
    ("refcount_bits", Kind::Num, Some("16")),
];

const RAW_OPTS: &[Desc] = &[
    ("size", Kind::Size, None),
    ("preallocation", Kind::Str, None),
];

/// An option's value as given (and, for sizes, parsed).
#[derive(Clone)]
struct Val {
    text: String,
    size: u64,
}

struct OptSet {
    descs: &'static [Desc],
    vals: Vec<Option<Val>>,
}

impl OptSet {
    fn new(descs: &'static [Desc]) -> Self {
        OptSet {
            descs,
            vals: vec![None; descs.len()],
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.descs.iter().position(|d| d.0 == name)
    }

    fn get(&self, name: &str) -> Option<&Val> {
        self.index(name).and_then(|i| self.vals[i].as_ref())
    }

    /// Sets `name`; `false` when the format has no such option.
    fn set(&mut self, name: &str, value: &str) -> Result<bool, String> {
        let Some(i) = self.index(name) else {
            return Ok(false);
        };
        let kind = self.descs[i].1;
        let mut size = 0;
        match kind {
            Kind::Size => {
                size = parse_size("x", value, 0, i64::MAX).map_err(|_| {
                    format!(
                        "Parameter '{name}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                    )
                })? as u64;
            }
            Kind::Bool => {
                parse_bool(value)
                    .ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'"))?;
            }
            Kind::Num => {
                super::num::parse_int("x", value, 0, i64::MAX)
                    .map_err(|_| format!("Parameter '{name}' expects a number"))?;
            }
            Kind::Str => {}
        }
        self.vals[i] = Some(Val {
            text: value.to_owned(),
            size,
        });
        Ok(true)
    }

    fn num(&self, name: &str) -> Option<u64> {
        let v = self.get(name)?;
        match self.descs[self.index(name)?].1 {
            Kind::Size => Some(v.size),
            _ => super::num::parse_int("x", &v.text, 0, i64::MAX)
                .ok()
                .map(|n| n as u64),
        }
    }

    fn bool(&self, name: &str) -> bool {
        self.get(name)
            .and_then(|v| parse_bool(&v.text))
            .unwrap_or(false)
    }

    /// qemu_opts_print: every option with a value or a default.
    fn print(&self) -> String {
        let mut parts = Vec::new();
        for (d, v) in self.descs.iter().zip(&self.vals) {
            match (v, d.2) {
                (Some(v), _) if d.1 == Kind::Size => parts.push(format!("{}={}", d.0, v.size)),
                (Some(v), _) => parts.push(format!("{}={}", d.0, v.text)),
                (None, Some(def)) => parts.push(format!("{}={def}", d.0)),
                (None, None) => {}
            }
        }
        parts.join(" ")
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Splits `-o` text into `(key, value)` pairs (`,,` escapes a comma; a key
/// without `=` means `on`).
pub fn split_opts(s: &str) -> Vec<(String, String)> {
    split_commas(s)
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (i, "on".to_owned()),
        })
        .collect()
}

/// What `create` needs, from the command line or from `convert`.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    /// Image file name.
    pub filename: String,
    /// Format (raw by default).
    pub fmt: String,
    /// Accumulated `-o` text.
    pub options: Option<String>,
    /// `-b`.
    pub backing: Option<String>,
    /// `-F`.
    pub backing_fmt: Option<String>,
    /// The size operand, if given.
    pub size: Option<u64>,
    /// `-q`.
    pub quiet: bool,
    /// `-u`: do not open the backing file.
    pub backing_unsafe: bool,
}

/// The `create` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let m = getopt_long(args, "hqf:b:F:uo:", LONGS)?;
    let mut a = CreateArgs {
        fmt: "raw".into(),
        ..CreateArgs::default()
    };
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match char::from_u32(p.id).unwrap_or('\0') {
            'h' => {
                print!("{}", help());
                return Ok(());
            }
            'q' => a.quiet = true,
            'u' => a.backing_unsafe = true,
            'f' => a.fmt = arg,
            'b' => a.backing = Some(arg),
            'F' => a.backing_fmt = Some(arg),
            'o' => {
                a.options = Some(match a.options.take() {
                    Some(o) => format!("{o},{arg}"),
                    None => arg,
                })
            }
            _ => {}
        }
    }
    let mut ops = m.operands.iter();
    let Some(filename) = ops.next() else {
        return Err(Failure::Usage("Expecting image file name".into()));
    };
    a.filename = filename.clone();
    if let Some(s) = ops.next() {
        a.size = Some(parse_size("image size", s, 0, i64::MAX)? as u64);
    }
    if let Some(extra) = ops.next() {
        return Err(Failure::Usage(format!("Unexpected argument: {extra}")));
    }
    create(&a).map_err(|m| Failure::Error(format!("{}: {m}", a.filename)))
}

fn help() -> String {
    super::help::text("create")
}

/// Creates the image `a` describes (`bdrv_img_create`); the error is the
/// message without the file name prefix.
pub fn create(a: &CreateArgs) -> Result<(), String> {
    let descs = match a.fmt.as_str() {
        "qcow2" => QCOW2_OPTS,
        "raw" => RAW_OPTS,
        "file" | "null-co" => {
            return Err(format!(
                "Format driver '{}' does not support image creation",
                a.fmt
            ))
        }
        f => return Err(format!("Unknown file format '{f}'")),
    };
    let mut o = OptSet::new(descs);
    if let Some(text) = &a.options {
        for (k, v) in split_opts(text) {
            if !o.set(&k, &v)? {
                return Err(format!("Invalid parameter '{k}'"));
            }
        }
    }
    match (o.get("size").is_some(), a.size) {
        (true, Some(_)) => return Err("The image size must be specified only once".into()),
        (false, Some(s)) => {
            o.set("size", &s.to_string())?;
        }
        _ => {}
    }
    if let Some(b) = &a.backing {
        if o.index("backing_file").is_none() {
            return Err(format!(
                "Backing file not supported for file format '{}'",
                a.fmt
            ));
        }
        o.set("backing_file", b)?;
    }
    if let Some(f) = &a.backing_fmt {
        if o.index("backing_fmt").is_none() {
            return Err(format!(
                "Backing file format not supported for file format '{}'",
                a.fmt
            ));
        }
        o.set("backing_fmt", f)?;
    }
    let backing = o.get("backing_file").map(|v| v.text.clone());
    let backing_fmt = o.get("backing_fmt").map(|v| v.text.clone());
    let env = Env::new().map_err(|e| e.to_string())?;
    if let Some(b) = &backing {
        if *b == a.filename {
            return Err(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            );
        }
        if b.is_empty() {
            return Err("Expected backing file name, got empty string".into());
        }
    }
    match &backing {
        Some(_) if a.backing_unsafe && backing_fmt.is_none() => {
            return Err("Backing file specified without backing format".into());
        }
        Some(b) if !a.backing_unsafe => {
            let full = formats::qcow2::resolve_backing_path(&a.filename, b);
            let (fmt, size) = env.block_on(async {
                let blk = env
                    .open(&full, backing_fmt.as_deref(), false, true)
                    .await
                    .map_err(|e| {
                        format!(
                            "{}\nCould not open backing image.",
                            strip_could_not(&e.0, &full)
                        )
                    })?;
                let fmt = blk.root().map(|n| n.format_name()).unwrap_or("raw");
                let size = blk.size();
                release(blk);
                Ok::<_, String>((fmt, size))
            })?;
            if backing_fmt.is_none() {
                return Err(format!(
                    "Backing file specified without backing format\nDetected format of {fmt}."
                ));
            }
            if o.get("size").is_none() {
                o.set("size", &size.to_string())?;
            }
        }
        _ => {}
    }
    let Some(size) = o.num("size") else {
        return Err("Image creation needs a size parameter".into());
    };
    if !a.quiet {
        use std::io::Write;
        println!("Formatting '{}', fmt={} {}", a.filename, a.fmt, o.print());
        let _ = std::io::stdout().flush();
    }
    let prealloc = o
        .get("preallocation")
        .map(|v| v.text.as_str())
        .unwrap_or("off");
    if a.fmt == "raw" {
        let p = match prealloc {
            "off" => block_core::Prealloc::Off,
            "falloc" => block_core::Prealloc::Falloc,
            "full" => block_core::Prealloc::Full,
            other => return Err(format!("invalid parameter value: {other}")),
        };
        return create_raw(&env, &a.filename, size.div_ceil(512) * 512, p);
    }
    let mut c = CreateOptions {
        size: size.div_ceil(512) * 512,
        ..CreateOptions::default()
    };
    if let Some(v) = o.num("cluster_size") {
        c.cluster_size = v;
    }
    c.extended_l2 = o.bool("extended_l2");
    c.lazy_refcounts = o.bool("lazy_refcounts");
    if let Some(v) = o.num("refcount_bits") {
        c.refcount_bits = v.min(u32::MAX as u64) as u32;
    }
    if let Some(v) = o.get("compat") {
        c.compat_v2 = match v.text.as_str() {
            "0.10" | "v2" => true,
            "1.1" | "v3" => false,
            other => {
                return Err(format!(
                    "Parameter 'version' does not accept value '{other}'"
                ))
            }
        };
    }
    c.compression_type = match o.get("compression_type").map(|v| v.text.as_str()) {
        None | Some("zlib") => CompressionType::Deflate,
        Some("zstd") => CompressionType::Zstd,
        Some(other) => {
            return Err(format!(
                "Parameter 'compression-type' does not accept value '{other}'"
            ))
        }
    };
    c.preallocation = match prealloc {
        "off" => block_core::Prealloc::Off,
        "metadata" => block_core::Prealloc::Metadata,
        "falloc" => block_core::Prealloc::Falloc,
        "full" => block_core::Prealloc::Full,
        other => {
            return Err(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            ))
        }
    };
    c.backing_file = backing;
    c.backing_fmt = backing_fmt;
    c.data_file = o.get("data_file").map(|v| v.text.clone());
    c.data_file_raw = o.bool("data_file_raw");
    c.validate().map_err(|e| qemu_wording(&e.to_string()))?;
    if let Some(df) = &c.data_file {
        // qemu-img creates the data file as a raw protocol file first;
        // only falloc and full reach the protocol driver.
        let p = match c.preallocation {
            block_core::Prealloc::Falloc | block_core::Prealloc::Full => c.preallocation,
            _ => block_core::Prealloc::Off,
        };
        create_raw(&env, df, c.size, p)?;
    }
    env.block_on(create_file(&env.graph, &a.filename, &c))
        .map_err(|e| qemu_wording(&e.to_string()))
}

/// QEMU 10 words the compatibility hint differently from the driver.
fn qemu_wording(msg: &str) -> String {
    msg.replace("(use compat=1.1 or greater)", "(use version=v3 or greater)")
}

/// `open_image` reports "Could not open 'X': REASON"; bdrv_img_create
/// reports the reason alone for a backing file.
fn strip_could_not(msg: &str, name: &str) -> String {
    msg.strip_prefix(&format!("Could not open '{name}': "))
        .unwrap_or(msg)
        .to_owned()
}

fn create_raw(env: &Env, path: &str, size: u64, p: block_core::Prealloc) -> Result<(), String> {
    use std::io::Write;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("Could not create '{path}': {}", strerror(&e)))?;
    drop(f);
    env.block_on(async {
        let node = env
            .graph
            .open(
                block_core::Options::new()
                    .with("driver", "file")
                    .with("filename", path),
            )
            .await
            .map_err(|e| e.to_string())?;
        let user = node
            .add_user(
                "create",
                "root",
                block_core::Perm::WRITE | block_core::Perm::RESIZE,
                block_core::Perm::ALL,
            )
            .map_err(|e| e.to_string())?;
        let r = node.truncate(size, false, p).await.map_err(|e| {
            let m = e.to_string();
            // bdrv_img_create words EFBIG this way.
            if m.contains("File too large") {
                "The image size is too large for file format 'raw'".to_owned()
            } else {
                m
            }
        });
        node.remove_user(user);
        r
    })?;
    if p == block_core::Prealloc::Off && size > 0 {
        // QEMU writes the first block so that alignment probing works on it;
        // map and disk size show it, so do the same.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| format!("Could not open '{path}': {}", strerror(&e)))?;
        f.write_all(&vec![0u8; size.min(4096) as usize])
            .map_err(|e| format!("Could not write '{path}': {}", strerror(&e)))?;
    }
    Ok(())
}
