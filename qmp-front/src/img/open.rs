//! Opening an image the way qemu-img's `img_open` does: from a file name and
//! an optional format (probing when absent), or from a complete option
//! string (`--image-opts`); with a cache mode (`-t`) and an AIO engine
//! (`-i`/`-n`) applied as QEMU applies them.
//!
//! Probing recognises qcow2 by its magic and falls back to raw, as QEMU
//! does for files that match no format; a probed raw image opened for
//! writing gets QEMU's warning on stderr.

use std::rc::Rc;

use block_core::{AioMode, BlockBackend, Error, Graph, Options, Perm};

/// QEMU's cache modes (`bdrv_parse_cache_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT, write cache on (`none`, `off`).
    None,
    /// O_DIRECT, write-through (`directsync`).
    DirectSync,
    /// Page cache, write cache on (`writeback`, qemu-img's default).
    Writeback,
    /// Page cache, flushes ignored (`unsafe`).
    Unsafe,
    /// Page cache, write-through (`writethrough`).
    Writethrough,
}

impl CacheMode {
    /// Parses a `-t` value; `None` for an unknown mode.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::DirectSync,
            "writeback" => CacheMode::Writeback,
            "unsafe" => CacheMode::Unsafe,
            "writethrough" => CacheMode::Writethrough,
            _ => return None,
        })
    }

    /// `cache.direct`.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// `cache.no-flush`.
    pub fn no_flush(self) -> bool {
        self == CacheMode::Unsafe
    }

    /// Whether the backend runs with its write cache disabled (every write
    /// is stable when it completes).
    pub fn writethrough(self) -> bool {
        matches!(self, CacheMode::DirectSync | CacheMode::Writethrough)
    }
}

/// QEMU's `aio=` choice (`bdrv_parse_aio`; `-n` is `native`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    /// Thread pool (QEMU's default).
    Threads,
    /// Linux AIO in QEMU; io_uring in Strata. Requires O_DIRECT as in QEMU.
    Native,
    /// io_uring.
    IoUring,
}

impl Aio {
    /// Parses an `-i` value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "threads" => Aio::Threads,
            "native" => Aio::Native,
            "io_uring" => Aio::IoUring,
            _ => return None,
        })
    }

    /// QEMU's option value.
    pub fn name(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::Native => "native",
            Aio::IoUring => "io_uring",
        }
    }

    /// The engine of the loop that runs the image.
    pub fn mode(self) -> AioMode {
        match self {
            Aio::Threads => AioMode::Threads,
            Aio::Native | Aio::IoUring => AioMode::IoUring,
        }
    }
}

/// How to open one image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The file name, or with `image_opts` the option string.
    pub filename: String,
    /// `-f`.
    pub fmt: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// Open read-write.
    pub writable: bool,
    /// `-t`.
    pub cache: CacheMode,
    /// `-i`/`-n`.
    pub aio: Aio,
    /// `-U`.
    pub force_share: bool,
    /// QEMU's BDRV_O_UNMAP: discards and unmapping zero writes reach the
    /// file (qemu-img convert's target when it detects sparse areas).
    pub unmap: bool,
}

/// The qcow2 magic at offset 0.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Guesses the format of `path` from its first bytes: `qcow2` or `raw`.
pub fn probe_format(path: &str) -> std::io::Result<&'static str> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    // Zero-padded like QEMU's probe buffer.
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    // QEMU's qcow2_probe: the magic and a version of at least 2.
    let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    Ok(if got >= 4 && &head[..4] == QCOW2_MAGIC && version >= 2 {
        "qcow2"
    } else {
        "raw"
    })
}

/// The text of an OS error without Rust's " (os error N)" suffix, i.e.
/// what C's `strerror` prints.
pub fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let s = std::io::Error::from_raw_os_error(code).to_string();
            match s.rfind(" (os error ") {
                Some(i) => s[..i].to_owned(),
                None => s,
            }
        }
        None => e.to_string(),
    }
}

/// Splits QEMU's comma-separated option text into items (`,,` escapes a
/// comma); empty items are kept.
pub fn split_commas(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

/// Splits QEMU's `key=value,key=value` syntax (`,,` escapes a comma).
pub fn parse_keyval(s: &str) -> Result<Options, String> {
    let mut opts = Options::new();
    let items = split_commas(s);
    for item in items {
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => opts.insert(k, v),
            _ => return Err(format!("Invalid parameter '{item}'")),
        }
    }
    Ok(opts)
}

/// Why an image could not be opened: the message qemu-img prints after its
/// program-name prefix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// The message qemu-img prints for an open error (without the "Could not
/// open" prefix).
pub fn describe(e: &Error) -> String {
    match e {
        Error::Open { path, source } => {
            format!("Could not open '{path}': {}", strerror(source))
        }
        // QEMU reports a malformed image on open without naming the node.
        Error::Corrupt { detail, .. } => detail.clone(),
        other => {
            let s = other.to_string();
            // The qcow2 driver names the node; QEMU's message does not.
            match (
                s.strip_prefix("Image '"),
                s.ends_with("' is not in qcow2 format"),
            ) {
                (Some(_), true) => "Image is not in qcow2 format".to_owned(),
                _ => s,
            }
        }
    }
}

/// Opens `spec` on `graph` and returns a backend holding the permissions
/// qemu-img takes (`-U` shares everything, otherwise only reads).
pub async fn open_image(graph: &Graph, spec: &ImageSpec) -> Result<Rc<BlockBackend>, OpenError> {
    let could_not = |msg: String| OpenError(format!("Could not open '{}': {msg}", spec.filename));
    let mut warn_probed_raw = false;
    let mut opts = if spec.image_opts {
        if spec.fmt.is_some() {
            return Err(OpenError(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        parse_keyval(&spec.filename).map_err(OpenError)?
    } else {
        let fmt = match &spec.fmt {
            Some(f) => f.clone(),
            None => {
                // QEMU opens the protocol before probing, so an unreadable
                // file is reported by the file driver below: guess raw here.
                let f = probe_format(&spec.filename).unwrap_or("raw");
                warn_probed_raw = f == "raw" && spec.writable;
                f.to_owned()
            }
        };
        if !graph.registry().names().contains(&fmt.as_str()) {
            return Err(could_not(if spec.fmt.is_none() {
                format!("Image format '{fmt}' is not supported by this build of Strata")
            } else {
                format!("Unknown driver '{fmt}'")
            }));
        }
        if fmt == "file" {
            Options::new()
                .with("driver", "file")
                .with("filename", spec.filename.as_str())
        } else {
            Options::new()
                .with("driver", fmt.as_str())
                .with("file.driver", "file")
                .with("file.filename", spec.filename.as_str())
        }
    };
    if spec.force_share {
        if spec.writable {
            return Err(could_not(
                "force-share=on can only be used with read-only images".into(),
            ));
        }
        opts.insert("force-share", true);
    }
    if !opts.contains("read-only") {
        opts.insert("read-only", !spec.writable);
    }
    if spec.unmap && !opts.contains("discard") {
        opts.insert("discard", "unmap");
    }
    if !opts.contains("cache") {
        opts.insert("cache.direct", spec.cache.direct());
        opts.insert("cache.no-flush", spec.cache.no_flush());
    }
    // The protocol node checks aio=native against O_DIRECT, as QEMU does.
    let protocol_is_root =
        matches!(opts.get("driver"), Some(block_core::OptValue::Str(d)) if d == "file");
    if protocol_is_root {
        if !opts.contains("aio") {
            opts.insert("aio", spec.aio.name());
        }
    } else if matches!(opts.get("file"), Some(block_core::OptValue::Map(_))) {
        if let Some(block_core::OptValue::Map(f)) = opts.get("file") {
            if !f.contains("aio")
                && matches!(f.get("driver"), Some(block_core::OptValue::Str(d)) if d == "file")
            {
                opts.insert("file.aio", spec.aio.name());
            }
        }
    }
    let node = graph
        .open(opts)
        .await
        .map_err(|e| could_not(describe(&e)))?;
    if warn_probed_raw {
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
             Specify the 'raw' format explicitly to remove the restrictions.",
            spec.filename
        );
    }
    let perm = if spec.writable {
        Perm::CONSISTENT_READ.union(Perm::WRITE)
    } else {
        Perm::CONSISTENT_READ
    };
    let shared = if spec.force_share {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED)
    };
    let blk = BlockBackend::new("", &node, perm, shared).map_err(|e| could_not(describe(&e)))?;
    blk.set_enable_write_cache(!spec.cache.writethrough());
    Ok(blk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_modes() {
        assert!(CacheMode::parse("none").unwrap().direct());
        assert!(CacheMode::parse("off").unwrap().direct());
        assert!(CacheMode::parse("directsync").unwrap().writethrough());
        assert!(CacheMode::parse("unsafe").unwrap().no_flush());
        assert!(!CacheMode::parse("writeback").unwrap().direct());
        assert!(CacheMode::parse("writethrough").unwrap().writethrough());
        assert!(CacheMode::parse("bogus").is_none());
    }

    #[test]
    fn keyval_escapes() {
        let o = parse_keyval("driver=raw,file.filename=a,,b").unwrap();
        let Some(block_core::OptValue::Map(f)) = o.get("file") else {
            panic!("nested")
        };
        assert_eq!(
            f.get("filename"),
            Some(&block_core::OptValue::Str("a,b".into()))
        );
        assert!(parse_keyval("novalue").is_err());
    }

    #[test]
    fn strerror_strips_suffix() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(strerror(&e), "No such file or directory");
    }
}
