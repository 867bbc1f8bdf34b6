//! `strata-img info`: qemu-img's `info` for raw and qcow2 images, in its
//! human and JSON layouts. The image is opened without its backing file,
//! as qemu-img does; the JSON keys are ordered as QEMU's QDict prints them
//! (see [`super::qjson`]).

use formats::qcow2::header::{
    Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use formats::qcow2::snapshot::SnapshotInfo;
use formats::qcow2::BitmapInfo;

use super::common::{
    allocated_size, open_qcow2, parse_output, read_qcow2_header, size_to_str, snapshot_icount,
    snapshot_row, Env,
};
use super::getopt::{getopt_long, LongOpt};
use super::open::probe_format;
use super::qjson::QValue;
use super::Failure;

const OPT_OUTPUT: u32 = 256;
const OPT_OBJECT: u32 = 257;
const OPT_IMAGE_OPTS: u32 = 258;
const OPT_LIMITS: u32 = 259;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::flag("backing-chain", 'b' as u32),
    LongOpt::flag("force-share", 'U' as u32),
    LongOpt::value("output", OPT_OUTPUT),
    LongOpt::flag("limits", OPT_LIMITS),
    LongOpt::value("object", OPT_OBJECT),
];

/// What `info` reports about one node (QAPI `BlockNodeInfo`).
struct NodeInfo {
    filename: String,
    format: String,
    virtual_size: u64,
    actual_size: Option<u64>,
    cluster_size: Option<u64>,
    dirty: bool,
    backing: Option<(String, String, Option<String>)>,
    snapshots: Vec<SnapshotInfo>,
    /// `format-specific`: its type and data.
    specific: Option<(String, Vec<(String, QValue)>)>,
    children: Vec<(String, NodeInfo)>,
}

/// The `info` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let m = getopt_long(args, "f:hbU", LONGS)?;
    let mut fmt = None;
    let mut json = false;
    let mut force_share = false;
    let mut chain = false;
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match p.id {
            id if id == 'h' as u32 => {
                print!("{}", super::help::text("info"));
                return Ok(());
            }
            id if id == 'f' as u32 => fmt = Some(arg),
            id if id == 'U' as u32 => force_share = true,
            id if id == 'b' as u32 => chain = true,
            OPT_OUTPUT => json = parse_output(&arg)?,
            OPT_IMAGE_OPTS => {
                return Err(Failure::Error(
                    "--image-opts is not supported by info".into(),
                ))
            }
            _ => {}
        }
    }
    let [filename] = m.operands.as_slice() else {
        return Err(Failure::Usage("Expecting one image file name".into()));
    };
    let mut infos = vec![collect(filename, fmt.as_deref(), force_share)?];
    // With --backing-chain, every image down the chain, top first.
    while let Some((_, full, bfmt)) = infos
        .last()
        .and_then(|i| i.backing.clone())
        .filter(|_| chain)
    {
        if infos.len() > 64 {
            return Err(Failure::Error("Backing file chain is too deep".into()));
        }
        infos.push(collect(&full, bfmt.as_deref(), force_share)?);
    }
    if json {
        let v = if chain {
            QValue::List(infos.iter().map(to_json).collect())
        } else {
            to_json(&infos[0])
        };
        println!("{}", v.pretty());
    } else {
        let texts: Vec<String> = infos.iter().map(|i| human(i, 0, "")).collect();
        print!("{}", texts.join("\n"));
    }
    Ok(())
}

fn file_child(filename: &str) -> NodeInfo {
    // QEMU measures protocol nodes in whole sectors.
    let len = std::fs::metadata(filename)
        .map(|m| m.len().div_ceil(512) * 512)
        .unwrap_or(0);
    NodeInfo {
        filename: filename.to_owned(),
        format: "file".into(),
        virtual_size: len,
        actual_size: allocated_size(filename),
        cluster_size: None,
        dirty: false,
        backing: None,
        snapshots: Vec::new(),
        specific: Some(("file".into(), Vec::new())),
        children: Vec::new(),
    }
}

fn collect(filename: &str, fmt: Option<&str>, force_share: bool) -> Result<NodeInfo, Failure> {
    let env = Env::new()?;
    let fmt = match fmt {
        Some(f) => f.to_owned(),
        None => probe_format(filename).unwrap_or("raw").to_owned(),
    };
    if fmt != "qcow2" {
        let size = env.block_on(async {
            let blk = env.open(filename, Some(&fmt), false, force_share).await?;
            // QEMU sizes raw images in whole sectors.
            let s = blk.size().div_ceil(512) * 512;
            super::common::release(blk);
            Ok::<_, Failure>(s)
        })?;
        let child = file_child(filename);
        return Ok(NodeInfo {
            filename: filename.to_owned(),
            format: fmt,
            virtual_size: size,
            actual_size: child.actual_size,
            cluster_size: None,
            dirty: false,
            backing: None,
            snapshots: Vec::new(),
            specific: None,
            children: vec![("file".into(), child)],
        });
    }
    let (size, snapshots, bitmaps) = env.block_on(async {
        let img = open_qcow2(&env.graph, filename, false, force_share).await?;
        let size = block_core::BlockDriver::size(img.driver());
        let snaps = img.driver().snapshots().await;
        let bitmaps = img.driver().bitmaps().await;
        let _ = img.close().await;
        let snaps = snaps.map_err(|e| Failure::Error(e.to_string()))?;
        let bitmaps = bitmaps.map_err(|e| Failure::Error(e.to_string()))?;
        Ok::<_, Failure>((size, snaps, bitmaps))
    })?;
    let h = read_qcow2_header(filename)?;
    let child = file_child(filename);
    let backing = h.backing_file.clone().map(|b| {
        let full = formats::qcow2::resolve_backing_path(filename, &b);
        (b, full, h.backing_format.clone())
    });
    Ok(NodeInfo {
        filename: filename.to_owned(),
        format: "qcow2".into(),
        virtual_size: size,
        actual_size: child.actual_size,
        cluster_size: Some(h.cluster_size()),
        dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
        backing,
        snapshots,
        specific: Some(("qcow2".into(), qcow2_specific(&h, &bitmaps))),
        children: vec![("file".into(), child)],
    })
}

/// `ImageInfoSpecificQCow2` for an image with header `h` and persistent
/// `bitmaps`, in QAPI field order. Shared with the daemon's
/// `query-named-block-nodes`, so that both report an image the same way.
pub fn qcow2_specific(h: &Header, bitmaps: &[BitmapInfo]) -> Vec<(String, QValue)> {
    let mut v = Vec::new();
    v.push((
        "compat".into(),
        QValue::str(if h.version >= 3 { "1.1" } else { "0.10" }),
    ));
    if h.version >= 3 {
        if let Some(d) = &h.data_file {
            v.push(("data-file".into(), QValue::str(d.clone())));
        }
        // QEMU reports the raw flag whenever an external data file is in
        // use, even one given only by option with no name in the header.
        if h.has_data_file() {
            v.push((
                "data-file-raw".into(),
                QValue::Bool(
                    h.autoclear_features & formats::qcow2::header::AUTOCLEAR_DATA_FILE_RAW != 0,
                ),
            ));
        }
        v.push((
            "extended-l2".into(),
            QValue::Bool(h.incompatible_features & INCOMPAT_EXTL2 != 0),
        ));
        v.push((
            "lazy-refcounts".into(),
            QValue::Bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
        ));
        v.push((
            "corrupt".into(),
            QValue::Bool(h.incompatible_features & INCOMPAT_CORRUPT != 0),
        ));
    }
    v.push((
        "refcount-bits".into(),
        QValue::Int(h.refcount_bits() as i64),
    ));
    if h.version >= 3 && !bitmaps.is_empty() {
        v.push((
            "bitmaps".into(),
            QValue::List(bitmaps.iter().map(bitmap_json).collect()),
        ));
    }
    v.push((
        "compression-type".into(),
        QValue::str(match h.compression_type {
            formats::qcow2::header::CompressionType::Deflate => "zlib",
            formats::qcow2::header::CompressionType::Zstd => "zstd",
        }),
    ));
    v
}

/// QAPI `Qcow2BitmapInfo` of one persistent bitmap.
fn bitmap_json(b: &BitmapInfo) -> QValue {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push(QValue::str("in-use"));
    }
    if b.auto {
        flags.push(QValue::str("auto"));
    }
    QValue::Dict(vec![
        ("name".into(), QValue::str(b.name.clone())),
        ("granularity".into(), QValue::Int(b.granularity as i64)),
        ("flags".into(), QValue::List(flags)),
    ])
}

/// QAPI `SnapshotInfo` of one internal snapshot (shared with the daemon).
pub fn snapshot_json(s: &SnapshotInfo) -> QValue {
    let mut v = vec![
        ("id".into(), QValue::str(s.id.clone())),
        ("name".into(), QValue::str(s.name.clone())),
        ("vm-state-size".into(), QValue::Int(s.vm_state_size as i64)),
        ("date-sec".into(), QValue::Int(s.date_sec as i64)),
        ("date-nsec".into(), QValue::Int(s.date_nsec as i64)),
        (
            "vm-clock-sec".into(),
            QValue::Int((s.vm_clock_nsec / 1_000_000_000) as i64),
        ),
        (
            "vm-clock-nsec".into(),
            QValue::Int((s.vm_clock_nsec % 1_000_000_000) as i64),
        ),
    ];
    if let Some(ic) = snapshot_icount(s).filter(|&v| v != u64::MAX) {
        v.push(("icount".into(), QValue::Int(ic as i64)));
    }
    QValue::Dict(v)
}

fn to_json(i: &NodeInfo) -> QValue {
    let mut v = vec![
        ("filename".into(), QValue::str(i.filename.clone())),
        ("format".into(), QValue::str(i.format.clone())),
        ("dirty-flag".into(), QValue::Bool(i.dirty)),
    ];
    if let Some(a) = i.actual_size {
        v.push(("actual-size".into(), QValue::Int(a as i64)));
    }
    v.push(("virtual-size".into(), QValue::Int(i.virtual_size as i64)));
    if let Some(c) = i.cluster_size {
        v.push(("cluster-size".into(), QValue::Int(c as i64)));
    }
    if let Some((b, full, f)) = &i.backing {
        v.push(("backing-filename".into(), QValue::str(b.clone())));
        v.push(("full-backing-filename".into(), QValue::str(full.clone())));
        if let Some(f) = f {
            v.push(("backing-filename-format".into(), QValue::str(f.clone())));
        }
    }
    if !i.snapshots.is_empty() {
        v.push((
            "snapshots".into(),
            QValue::List(i.snapshots.iter().map(snapshot_json).collect()),
        ));
    }
    if let Some((ty, data)) = &i.specific {
        v.push((
            "format-specific".into(),
            QValue::Dict(vec![
                ("type".into(), QValue::str(ty.clone())),
                ("data".into(), QValue::Dict(data.clone())),
            ]),
        ));
    }
    v.push((
        "children".into(),
        QValue::List(
            i.children
                .iter()
                .map(|(name, c)| {
                    QValue::Dict(vec![
                        ("name".into(), QValue::str(name.clone())),
                        ("info".into(), to_json(c)),
                    ])
                })
                .collect(),
        ),
    ));
    QValue::Dict(v)
}

/// QEMU's `dump_qobject` for the format-specific data: dict keys in QDict
/// order with dashes shown as spaces, list items as `[i]`, composite
/// values on the lines below their key, four spaces per level.
fn dump_specific(data: &[(String, QValue)], ind: &str) -> String {
    fn value(v: &QValue, level: usize, ind: &str, out: &mut String) {
        match v {
            QValue::Str(s) => out.push_str(&format!("{s}\n")),
            QValue::Int(n) => out.push_str(&format!("{n}\n")),
            QValue::Bool(b) => out.push_str(&format!("{b}\n")),
            QValue::Dict(d) => {
                for i in super::qjson::dict_order(d) {
                    let (k, v) = &d[i];
                    item(&k.replace('-', " "), v, level, ind, out);
                }
            }
            QValue::List(l) => {
                for (i, v) in l.iter().enumerate() {
                    item(&format!("[{i}]"), v, level, ind, out);
                }
            }
        }
    }
    fn item(label: &str, v: &QValue, level: usize, ind: &str, out: &mut String) {
        let composite = matches!(v, QValue::Dict(_) | QValue::List(_));
        let pad = " ".repeat(level * 4);
        out.push_str(&format!(
            "{ind}{pad}{label}:{}",
            if composite { '\n' } else { ' ' }
        ));
        value(v, level + 1, ind, out);
    }
    let mut out = String::new();
    value(&QValue::Dict(data.to_vec()), 1, ind, &mut out);
    out
}

fn human(i: &NodeInfo, level: usize, path: &str) -> String {
    let ind = " ".repeat(level * 4);
    let protocol = level > 0;
    let mut s = String::new();
    s.push_str(&format!(
        "{ind}{}: {}\n",
        if protocol { "filename" } else { "image" },
        i.filename
    ));
    s.push_str(&format!(
        "{ind}{}: {}\n",
        if protocol {
            "protocol type"
        } else {
            "file format"
        },
        i.format
    ));
    s.push_str(&format!(
        "{ind}{}: {} ({} bytes)\n",
        if protocol {
            "file length"
        } else {
            "virtual size"
        },
        size_to_str(i.virtual_size),
        i.virtual_size
    ));
    s.push_str(&format!(
        "{ind}disk size: {}\n",
        i.actual_size
            .map(size_to_str)
            .unwrap_or_else(|| "unavailable".into())
    ));
    if let Some(c) = i.cluster_size {
        s.push_str(&format!("{ind}cluster_size: {c}\n"));
    }
    if i.dirty {
        s.push_str(&format!("{ind}cleanly shut down: no\n"));
    }
    if let Some((b, full, f)) = &i.backing {
        s.push_str(&format!("{ind}backing file: {b}"));
        if b != full {
            s.push_str(&format!(" (actual path: {full})"));
        }
        s.push('\n');
        if let Some(f) = f {
            s.push_str(&format!("{ind}backing file format: {f}\n"));
        }
    }
    if !i.snapshots.is_empty() {
        s.push_str(&format!(
            "{ind}Snapshot list:\n{ind}{}\n",
            snapshot_row(None)
        ));
        for sn in &i.snapshots {
            s.push_str(&format!("{ind}{}\n", snapshot_row(Some(sn))));
        }
    }
    if let Some((_, data)) = &i.specific {
        if !data.is_empty() {
            s.push_str(&format!("{ind}Format specific information:\n"));
            s.push_str(&dump_specific(data, &ind));
        }
    }
    for (name, c) in &i.children {
        s.push_str(&format!("{ind}Child node '{path}/{name}':\n"));
        s.push_str(&human(c, level + 1, &format!("{path}/{name}")));
    }
    s
}
