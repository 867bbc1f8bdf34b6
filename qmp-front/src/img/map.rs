//! `strata-img map`: qemu-img's `map`. Each extent comes from the block
//! status of the top image, falling through to the backing chain for
//! unallocated ranges (`depth` counts the layers passed); a range that no
//! layer allocates reads as zeros. Adjacent extents with equal flags (and
//! contiguous host offsets in the same file) merge, and the human layout
//! lists only data extents, as `img_map` does.
//!
//! Known difference: with extended L2 entries, the unallocated subclusters
//! of an allocated cluster may be reported with or without a host offset
//! where QEMU decides otherwise.

use std::rc::Rc;

use block_core::{Graph, Node};

use super::common::{parse_output, release, Env};
use super::getopt::{getopt_long, LongOpt};
use super::num::parse_size;
use super::Failure;

const OPT_OUTPUT: u32 = 256;
const OPT_OBJECT: u32 = 257;
const OPT_IMAGE_OPTS: u32 = 258;
const OPT_START_OFFSET: u32 = 259;
const OPT_MAX_LENGTH: u32 = 260;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::value("start-offset", OPT_START_OFFSET),
    LongOpt::value("max-length", OPT_MAX_LENGTH),
    LongOpt::value("output", OPT_OUTPUT),
    LongOpt::flag("force-share", 'U' as u32),
    LongOpt::value("object", OPT_OBJECT),
];

/// One extent (`MapEntry`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Reads as data from some layer.
    pub data: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Compressed qcow2 clusters.
    pub compressed: bool,
    /// Host offset, when known.
    pub offset: Option<u64>,
    /// Backing layers passed.
    pub depth: u64,
    /// Allocated in some layer.
    pub present: bool,
    /// File holding `offset`.
    pub filename: Option<String>,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// The status of `[offset, offset + bytes)` through the chain below `top`.
pub async fn block_status(
    graph: &Graph,
    top: &Rc<Node>,
    offset: u64,
    bytes: u64,
) -> block_core::Result<MapEntry> {
    let mut node = Rc::clone(top);
    let mut depth = 0;
    let mut bytes = bytes;
    loop {
        let st = node.block_status(offset, bytes).await?;
        bytes = st.len;
        let mut e = MapEntry {
            start: offset,
            length: bytes,
            data: st.data,
            zero: st.zero,
            depth,
            present: st.allocated,
            ..MapEntry::default()
        };
        if st.data || st.zero {
            e.compressed = st.data && st.offset.is_none() && node.format_name() == "qcow2";
            if let (Some(off), Some(f)) = (st.offset, &st.file_node) {
                e.offset = Some(off);
                e.filename = graph.node(f).map(|n| n.filename());
            }
            return Ok(e);
        }
        match node.backing() {
            Some(b) if offset < b.size() => {
                bytes = bytes.min(b.size() - offset);
                node = b;
                depth += 1;
            }
            _ => {
                // Nothing below: the range reads as zeros.
                e.zero = true;
                return Ok(e);
            }
        }
    }
}

/// The `map` subcommand.
pub fn run(args: &[String]) -> Result<(), Failure> {
    let m = getopt_long(args, "hf:U", LONGS)?;
    let mut fmt = None;
    let mut json = false;
    let mut force_share = false;
    let mut start = 0u64;
    let mut max_length = None;
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match p.id {
            id if id == 'h' as u32 => {
                print!("{}", super::help::text("map"));
                return Ok(());
            }
            id if id == 'f' as u32 => fmt = Some(arg),
            id if id == 'U' as u32 => force_share = true,
            OPT_OUTPUT => json = parse_output(&arg)?,
            OPT_START_OFFSET => start = parse_size("start offset", &arg, 0, i64::MAX)? as u64,
            OPT_MAX_LENGTH => {
                max_length = Some(parse_size("max length", &arg, 0, i64::MAX)? as u64)
            }
            OPT_IMAGE_OPTS => {
                return Err(Failure::Error(
                    "--image-opts is not supported by map".into(),
                ))
            }
            _ => {}
        }
    }
    let [filename] = m.operands.as_slice() else {
        return Err(Failure::Usage("Expecting one image file name".into()));
    };
    let env = Env::new()?;
    let blk = env.block_on(env.open(filename, fmt.as_deref(), false, force_share))?;
    let r = env.block_on(async {
        let top = blk
            .root()
            .ok_or_else(|| Failure::Error("no medium".into()))?;
        // QEMU sizes raw images in whole sectors; the part past the end of
        // the file reads as zeros.
        let real = blk.size();
        let is_raw = top.format_name() == "raw";
        let mut length = if is_raw {
            real.div_ceil(512) * 512
        } else {
            real
        };
        if let Some(m) = max_length {
            length = length.min(start.saturating_add(m));
        }
        let mut out = String::new();
        if json {
            out.push('[');
        } else {
            out.push_str(&format!(
                "{:<16}{:<16}{:<16}{}\n",
                "Offset", "Length", "Mapped to", "File"
            ));
        }
        let mut curr = MapEntry {
            start,
            ..MapEntry::default()
        };
        while curr.start + curr.length < length {
            let offset = curr.start + curr.length;
            let mut next = if offset >= real {
                MapEntry {
                    start: offset,
                    length: length - offset,
                    zero: true,
                    present: true,
                    offset: Some(offset),
                    filename: top
                        .storage_child()
                        .map(|c| c.filename())
                        .or_else(|| Some(filename.clone())),
                    ..MapEntry::default()
                }
            } else {
                block_status(&env.graph, &top, offset, length - offset)
                    .await
                    .map_err(|e| Failure::Error(format!("Could not read file metadata: {e}")))?
            };
            if curr.mergeable(&next) {
                curr.length += next.length;
                continue;
            }
            if curr.length > 0 {
                dump(&mut out, json, &curr, Some(&mut next))?;
            }
            curr = next;
        }
        dump(&mut out, json, &curr, None)?;
        if json {
            out.push_str("]\n");
        }
        Ok::<_, Failure>(out)
    });
    release(blk);
    let out = r?;
    print!("{out}");
    Ok(())
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

fn dump(
    out: &mut String,
    json: bool,
    e: &MapEntry,
    next: Option<&mut MapEntry>,
) -> Result<(), Failure> {
    if !json {
        if e.data && e.offset.is_none() {
            print!("{out}");
            out.clear();
            return Err(Failure::Error(
                "File contains external, encrypted or compressed clusters.".into(),
            ));
        }
        if e.data && !e.zero {
            out.push_str(&format!(
                "{:<16}{:<16}{:<16}{}\n",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                e.filename.as_deref().unwrap_or("")
            ));
        }
        // The human layout does not tell zero from unallocated: merge them.
        if let Some(n) = next {
            if !n.data || n.zero {
                n.data = false;
                n.zero = true;
            }
        }
        return Ok(());
    }
    out.push_str(&format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    ));
    if let Some(o) = e.offset {
        out.push_str(&format!(", \"offset\": {o}"));
    }
    out.push('}');
    if next.is_some() {
        out.push_str(",\n");
    }
    Ok(())
}
