//! `strata-img amend`: qemu-img's `amend` for qcow2. Header changes are
//! made here: `lazy_refcounts` on and off, and `compat` up (0.10 to 1.1)
//! and down (1.1 to 0.10, when the image uses nothing version 2 cannot
//! express). The format driver does the rest, in QEMU's order: the
//! snapshot table gains version 3's extra data before an upgrade; then
//! `refcount_bits` (a new refcount structure of the new width) and `size`;
//! then zero clusters, the snapshots' included, are expanded before a
//! downgrade. `data_file` renames the external data file and
//! `data_file_raw` can be turned off, header changes both. Encryption is
//! refused with a message saying so, and so is a downgrade of an image with
//! persistent bitmaps (QEMU's leaves the bitmaps' clusters leaked); unknown
//! and creation-only options fail as in qemu-img.
//!
//! The image is opened once through the format driver to check it (and to
//! give qemu-img's messages for missing files, wrong formats and locks),
//! closed, and then edited through its protocol node, holding the write
//! lock, or reopened through the driver for its part. The header goes
//! last on a downgrade, so an interruption leaves a valid version 3 image.

use std::rc::Rc;

use block_core::{IoBuf, Node, Options, Perm, WriteFlags};
use formats::qcow2::header::{
    CompressionType, Header, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY,
};
use formats::qcow2::image::Image;
use formats::qcow2::l2::{L1E_OFFSET_MASK, OFLAG_COMPRESSED};
use formats::qcow2::snapshot::SnapshotInfo;

use super::common::{release, Env};
use super::convert::Progress;
use super::create::split_opts;
use super::getopt::{getopt_long, LongOpt};
use super::Failure;

const OPT_OBJECT: u32 = 256;
const OPT_IMAGE_OPTS: u32 = 257;
const OPT_FORCE: u32 = 258;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::flag("quiet", 'q' as u32),
    LongOpt::flag("progress", 'p' as u32),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::value("cache", 't' as u32),
    LongOpt::flag("force", OPT_FORCE),
    LongOpt::value("object", OPT_OBJECT),
    LongOpt::value("options", 'o' as u32),
];

/// qcow2's amend options as `-o help` lists them.
const AMEND_HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// The type of an amend option's value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Num,
    Size,
}

/// qcow2's amend options, in the order QEMU acts on them.
const AMEND_OPTS: &[(&str, Kind)] = &[
    ("size", Kind::Size),
    ("compat", Kind::Str),
    ("backing_file", Kind::Str),
    ("backing_fmt", Kind::Str),
    ("data_file", Kind::Str),
    ("data_file_raw", Kind::Bool),
    ("encrypt.iter-time", Kind::Num),
    ("encrypt.keyslot", Kind::Num),
    ("encrypt.new-secret", Kind::Str),
    ("encrypt.old-secret", Kind::Str),
    ("encrypt.state", Kind::Str),
    ("lazy_refcounts", Kind::Bool),
    ("refcount_bits", Kind::Num),
];

/// Options qcow2 takes only at creation.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.hash-alg",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.key-secret",
];

/// The `amend` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let m = getopt_long(args, "ho:f:t:pq", LONGS)?;
    let mut options: Option<String> = None;
    let mut fmt = None;
    let (mut quiet, mut progress) = (false, false);
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match char::from_u32(p.id).unwrap_or('\0') {
            'h' => {
                print!("{}", super::help::text("amend"));
                return Ok(());
            }
            'q' => quiet = true,
            'p' => progress = true,
            'f' => fmt = Some(arg),
            't' if super::open::CacheMode::parse(&arg).is_none() => {
                return Err(Failure::Error(format!("Invalid cache option: {arg}")))
            }
            'o' => {
                options = Some(match options.take() {
                    Some(prev) => format!("{prev},{arg}"),
                    None => arg,
                })
            }
            _ => {}
        }
        if p.id == OPT_IMAGE_OPTS {
            return Err(Failure::Error(
                "--image-opts is not supported by amend".into(),
            ));
        }
    }
    let Some(options) = options else {
        return Err(Failure::Usage("Must specify options (-o)".into()));
    };
    let help = split_opts(&options)
        .iter()
        .any(|(k, _)| k == "help" || k == "?");
    if help && fmt.as_deref() == Some("qcow2") {
        print!("{AMEND_HELP}");
        return Ok(());
    }
    let [filename] = m.operands.as_slice() else {
        return Err(Failure::Error("Expecting one image file name".into()));
    };
    let progress = Progress::new(progress && !quiet);
    let r = amend(filename, fmt.as_deref(), &options, help, &progress);
    progress.end();
    r
}

/// What the options ask for, checked against the image.
#[derive(Default)]
struct Wanted {
    version: Option<u32>,
    lazy: Option<bool>,
    /// A new refcount width in bits.
    refcount_bits: Option<u32>,
    /// A new virtual size.
    size: Option<u64>,
    /// A new external data file name ("" removes it, as in QEMU).
    data_file: Option<String>,
    /// The data file's raw flag, on or off.
    data_file_raw: Option<bool>,
}

impl Wanted {
    /// Whether the format driver must do part of the work (the rest only
    /// edits the header).
    fn needs_driver(&self, h: &Header) -> bool {
        let downgrade = self.version.is_some_and(|v| v < h.version);
        let upgrade_snapshots = self.version.is_some_and(|v| v > h.version) && h.nb_snapshots > 0;
        self.refcount_bits.is_some() || self.size.is_some() || downgrade || upgrade_snapshots
    }
}

fn amend(
    filename: &str,
    fmt: Option<&str>,
    options: &str,
    help: bool,
    progress: &Progress,
) -> Result<(), Failure> {
    let env = Env::new()?;
    let blk = env.block_on(env.open(filename, fmt, true, false))?;
    let drv = blk.root().map(|n| n.format_name()).unwrap_or("raw");
    release(blk);
    env.block_on(env.graph.close_all())
        .map_err(|e| Failure::Error(e.to_string()))?;
    if drv != "qcow2" {
        return Err(Failure::Error(format!(
            "Format driver '{drv}' does not support option amendment"
        )));
    }
    if help {
        print!("{AMEND_HELP}");
        return Ok(());
    }
    let vals = parse_syntax(options)?;
    // As in qemu-img, what the driver refuses still gets both progress
    // lines.
    progress.print(0.0, 100);
    let r = amend_image(&env, filename, &vals, progress);
    progress.print(100.0, 0);
    r
}

/// The driver's part of amend: judges the options against the image and
/// makes the changes.
fn amend_image(
    env: &Env,
    filename: &str,
    vals: &[Option<String>],
    progress: &Progress,
) -> Result<(), Failure> {
    let (node, user) = open_protocol(env, filename)?;
    let r = env.block_on(async {
        let h = read_header(&node, filename).await?;
        let want = judge(vals, &h)?;
        if want.version.is_some_and(|v| v < h.version) {
            check_downgrade(&node, &h, &want).await?;
        }
        if !want.needs_driver(&h) {
            apply(&node, h, &want, progress).await?;
            return Ok::<_, Failure>(None);
        }
        Ok(Some((want, h.version, h.nb_snapshots)))
    });
    close_protocol(env, node, user)?;
    let Some((want, old_version, nb_snapshots)) = r? else {
        return Ok(());
    };
    let io = |e: block_core::Error| Failure::Error(e.to_string());
    let upgrade = want.version.filter(|&v| v > old_version);
    let downgrade = want.version.is_some_and(|v| v < old_version);
    // QEMU's order: upgrade (snapshot table first), refcount width, size,
    // then lazy refcounts and a downgrade.
    if upgrade.is_some() && nb_snapshots > 0 {
        env.block_on(async {
            let img = open_driver(env, filename).await?;
            let r = img.complete_snapshot_extra_data().await.map_err(io);
            close_driver(img, r).await
        })?;
    }
    if upgrade.is_some() {
        let up = Wanted {
            version: upgrade,
            ..Wanted::default()
        };
        with_protocol(env, filename, |node, h| async move {
            apply(&node, h, &up, progress).await
        })?;
    }
    env.block_on(async {
        let img = open_driver(env, filename).await?;
        let r = driver_changes(&img, &want, downgrade, progress).await;
        close_driver(img, r).await
    })?;
    let rest = Wanted {
        version: want.version.filter(|_| downgrade),
        lazy: want.lazy,
        data_file: want.data_file.clone(),
        data_file_raw: want.data_file_raw,
        ..Wanted::default()
    };
    with_protocol(env, filename, |node, h| async move {
        apply(&node, h, &rest, progress).await
    })
}

/// The changes the format driver makes, in QEMU's order.
async fn driver_changes(
    img: &Image<'_>,
    want: &Wanted,
    downgrade: bool,
    progress: &Progress,
) -> Result<(), Failure> {
    let io = |e: block_core::Error| Failure::Error(e.to_string());
    if let Some(bits) = want.refcount_bits {
        let status =
            |done: u64, all: u64| progress.print(done as f32 * 100.0 / all.max(1) as f32, 0);
        img.change_refcount_width(bits, &status).await.map_err(io)?;
    }
    if let Some(size) = want.size {
        img.resize(size).await.map_err(io)?;
    }
    if downgrade {
        // Version 2 snapshots carry neither a disk size nor a 64-bit VM
        // state size.
        let size = img.size();
        let snaps = img.snapshots().await.map_err(io)?;
        let blocks = |s: &SnapshotInfo| {
            let disk = match s.extra.get(8..16) {
                Some(b) => u64::from_be_bytes(b.try_into().unwrap_or_default()),
                None => size,
            };
            s.vm_state_size > u32::MAX as u64 || disk != size
        };
        if snaps.iter().any(blocks) {
            return Err(Failure::Error(
                "Internal snapshots prevent downgrade of image".into(),
            ));
        }
        let status =
            |done: u64, total: u64| progress.print(done as f32 * 100.0 / total.max(1) as f32, 0);
        img.expand_zero_clusters(&status).await.map_err(io)?;
    }
    Ok(())
}

async fn open_driver<'g>(env: &'g Env, filename: &str) -> Result<Image<'g>, Failure> {
    super::common::open_qcow2_with(
        &env.graph,
        filename,
        true,
        false,
        false,
        super::open::CacheMode::Writeback,
    )
    .await
}

/// Closes the image; the first error wins.
async fn close_driver(img: Image<'_>, r: Result<(), Failure>) -> Result<(), Failure> {
    let c = img.close().await.map_err(|e| Failure::Error(e.to_string()));
    r.and(c)
}

/// Runs `f` on the image file itself, holding the write lock, with the
/// header as it is now.
fn with_protocol<F, Fut>(env: &Env, filename: &str, f: F) -> Result<(), Failure>
where
    F: FnOnce(Rc<Node>, Header) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let (node, user) = open_protocol(env, filename)?;
    let r = env.block_on(async {
        let h = read_header(&node, filename).await?;
        f(Rc::clone(&node), h).await
    });
    close_protocol(env, node, user)?;
    r
}

/// Opens the image file itself, holding the write lock.
fn open_protocol(env: &Env, filename: &str) -> Result<(Rc<Node>, u64), Failure> {
    let node = env
        .block_on(
            env.graph.open(
                Options::new()
                    .with("driver", "file")
                    .with("filename", filename),
            ),
        )
        .map_err(|e| Failure::Error(format!("Could not open '{filename}': {e}")))?;
    let user = node
        .add_user(
            "amend",
            "root",
            Perm::WRITE | Perm::CONSISTENT_READ,
            Perm::CONSISTENT_READ,
        )
        .map_err(|e| Failure::Error(format!("Could not open '{filename}': {e}")))?;
    Ok((node, user))
}

/// Releases and closes what [`open_protocol`] opened.
fn close_protocol(env: &Env, node: Rc<Node>, user: u64) -> Result<(), Failure> {
    node.remove_user(user);
    drop(node);
    env.block_on(env.graph.close_all())
        .map_err(|e| Failure::Error(e.to_string()))
}

async fn read_header(node: &Rc<Node>, filename: &str) -> Result<Header, Failure> {
    let len = node.size().min(2 << 20);
    let buf = node
        .pread(0, IoBuf::zeroed(len as usize))
        .await
        .map_err(|e| Failure::Error(format!("Could not read '{filename}': {e}")))?;
    Header::parse(filename, &buf, node.size())
        .map_err(|e| Failure::Error(format!("Could not open '{filename}': {e}")))
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Parses `-o` text as `qemu_opts_do_parse` on qcow2's amend list.
fn parse_syntax(text: &str) -> Result<Vec<Option<String>>, Failure> {
    let err = |m: String| Failure::Error(m);
    if text.is_empty() {
        return Err(err(format!("Invalid option list: {text}")));
    }
    let mut vals: Vec<Option<String>> = vec![None; AMEND_OPTS.len()];
    for (k, v) in split_opts(text) {
        let Some(i) = AMEND_OPTS.iter().position(|(n, _)| *n == k) else {
            return Err(err(if CREATE_ONLY.contains(&k.as_str()) {
                format!("Invalid parameter '{k}'\nThis option is only supported for image creation")
            } else {
                format!("Invalid parameter '{k}'")
            }));
        };
        match AMEND_OPTS[i].1 {
            Kind::Bool if parse_bool(&v).is_none() => {
                return Err(err(format!("Parameter '{k}' expects 'on' or 'off'")))
            }
            Kind::Num if super::num::parse_int("x", &v, 0, i64::MAX).is_err() => {
                return Err(err(format!("Parameter '{k}' expects a number")))
            }
            Kind::Size if super::num::parse_size("x", &v, 0, i64::MAX).is_err() => {
                return Err(err(format!(
                    "Parameter '{k}' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively."
                )))
            }
            _ => {}
        }
        vals[i] = Some(v);
    }
    Ok(vals)
}

/// Judges each option against the image as `qcow2_amend_options` does.
fn judge(vals: &[Option<String>], h: &Header) -> Result<Wanted, Failure> {
    let err = |m: String| Failure::Error(m);
    let unsupported = |what: &str| err(format!("{what} is not supported by this build"));
    let mut w = Wanted::default();
    for ((name, _), v) in AMEND_OPTS.iter().zip(vals) {
        let Some(v) = v else { continue };
        match *name {
            "size" => {
                // 0 leaves the size alone, as in QEMU.
                let n = super::num::parse_size("x", v, 0, i64::MAX).unwrap_or(0) as u64;
                if !n.is_multiple_of(512) {
                    return Err(err("The new size must be a multiple of 512".into()));
                }
                if n != 0 && n != h.size {
                    w.size = Some(n);
                }
            }
            "compat" => {
                w.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(err(format!("Unknown compatibility level {v}"))),
                });
            }
            "backing_file" | "backing_fmt" => {
                return Err(err(
                    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
                ))
            }
            "data_file" if !h.has_data_file() => {
                return Err(err(
                    "data-file can only be set for images that use an external data file".into(),
                ))
            }
            "data_file" => w.data_file = Some(v.clone()),
            "data_file_raw" => {
                let on = parse_bool(v) == Some(true);
                if on && h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW == 0 {
                    return Err(err("data-file-raw cannot be set on existing images".into()));
                }
                w.data_file_raw = Some(on);
            }
            n if n.starts_with("encrypt.") => {
                return Err(if h.crypt_method == 0 {
                    err("Can't amend encryption options - encryption not present".into())
                } else {
                    unsupported("Amending encryption")
                })
            }
            "lazy_refcounts" => w.lazy = parse_bool(v),
            "refcount_bits" => {
                let n = super::num::parse_int("x", v, 0, i64::MAX).unwrap_or(0) as u64;
                if !n.is_power_of_two() || n > 64 {
                    return Err(err(
                        "Refcount width must be a power of two and may not exceed 64 bits".into(),
                    ));
                }
                if n != h.refcount_bits() as u64 {
                    w.refcount_bits = Some(n as u32);
                }
            }
            _ => {}
        }
    }
    let version = w.version.unwrap_or(h.version);
    // Only a change is checked: asking for what the image has is a no-op.
    let lazy_now = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
    if w.refcount_bits.is_some_and(|b| b != 16) && version < 3 {
        return Err(err(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                .into(),
        ));
    }
    if w.lazy == Some(true) && !lazy_now && version < 3 {
        return Err(err(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
                .into(),
        ));
    }
    Ok(w)
}

/// Makes the changes, in QEMU's order: upgrade, lazy refcounts, downgrade.
async fn apply(
    node: &Rc<Node>,
    mut h: Header,
    w: &Wanted,
    progress: &Progress,
) -> Result<(), Failure> {
    let err = |m: String| Failure::Error(m);
    let io = |e: block_core::Error| Failure::Error(e.to_string());
    let old_version = h.version;
    let version = w.version.unwrap_or(old_version);
    let dirty = h.incompatible_features & INCOMPAT_DIRTY != 0;
    if version > old_version {
        progress.print(0.0, 0);
        progress.print(50.0, 0);
        h.version = 3;
        h.header_length = 112;
        h.refcount_order = 4;
        h.compression_type = CompressionType::Deflate;
        progress.print(100.0, 0);
    }
    if let Some(lazy) = w.lazy {
        let on = h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
        if lazy != on {
            if !lazy && dirty {
                return Err(err(
                    "Cannot disable lazy refcounts on an image with the dirty bit set: repairing its refcounts is not supported by this build (use 'check -r all' first)"
                        .into(),
                ));
            }
            h.compatible_features ^= COMPAT_LAZY_REFCOUNTS;
        }
    }
    if let Some(f) = &w.data_file {
        h.data_file = (!f.is_empty()).then(|| f.clone());
    }
    match w.data_file_raw {
        Some(true) => h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW,
        Some(false) => h.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW,
        None => {}
    }
    if version < old_version {
        // Zero clusters were expanded by the format driver.
        h.compression_type = CompressionType::Deflate;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.version = 2;
        h.header_length = 72;
    }
    let bytes = h.serialize().map_err(io)?;
    node.pwrite(0, IoBuf::from_slice(&bytes), WriteFlags::default())
        .await
        .map_err(io)?;
    node.flush().await.map_err(io)?;
    Ok(())
}

/// Refuses a downgrade to version 2 of what version 2 cannot express,
/// before anything is written.
async fn check_downgrade(node: &Rc<Node>, h: &Header, want: &Wanted) -> Result<(), Failure> {
    let err = |m: &str| Err(Failure::Error(m.into()));
    // A width change comes first, as in QEMU.
    if want.refcount_bits.unwrap_or(h.refcount_bits()) != 16 {
        return err("compat=0.10 requires refcount_bits=16");
    }
    if h.has_data_file() {
        return err("Cannot downgrade an image with a data file");
    }
    if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        return err("Cannot downgrade an image with the dirty bit set: repairing its refcounts is not supported by this build (use 'check -r all' first)");
    }
    let left = h.incompatible_features & !INCOMPAT_COMPRESSION;
    if left != 0 {
        return Err(Failure::Error(format!(
            "Cannot downgrade an image with incompatible features 0x{left:x} set"
        )));
    }
    if h.bitmaps_ext.is_some() {
        return err("Downgrading an image with persistent bitmaps is not supported by this build");
    }
    if h.compression_type != CompressionType::Deflate
        && has_compressed_clusters(node, h)
            .await
            .map_err(|e| Failure::Error(e.to_string()))?
    {
        return err(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        );
    }
    Ok(())
}

/// Whether the active L2 tables map a compressed cluster.
async fn has_compressed_clusters(node: &Rc<Node>, h: &Header) -> block_core::Result<bool> {
    if h.l1_size == 0 {
        return Ok(false);
    }
    let cs = h.cluster_size();
    let l1 = node
        .pread(h.l1_table_offset, IoBuf::zeroed(h.l1_size as usize * 8))
        .await?;
    for e in l1.chunks_exact(8) {
        let l2 = u64::from_be_bytes(e.try_into().unwrap_or_default()) & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let t = node.pread(l2, IoBuf::zeroed(cs as usize)).await?;
        let compressed = t
            .chunks_exact(8)
            .any(|e| u64::from_be_bytes(e.try_into().unwrap_or_default()) & OFLAG_COMPRESSED != 0);
        if compressed {
            return Ok(true);
        }
    }
    Ok(false)
}
