//! Pieces the image subcommands share: an event loop with a graph to open
//! images on, opening one image with qemu-img's defaults, and QEMU's
//! human-readable sizes.

use std::future::Future;
use std::rc::Rc;

use block_core::{AioMode, BlockBackend, EventBus, EventLoop, Graph};

use super::open::{open_image, Aio, CacheMode, ImageSpec, OpenError};
use super::Failure;

/// An event loop and a graph on it; closes every node when dropped.
pub struct Env {
    el: EventLoop,
    /// The graph images are opened on.
    pub graph: Graph,
}

impl Env {
    /// A thread-pool loop (qemu-img's default AIO engine) and an empty graph.
    pub fn new() -> Result<Env, Failure> {
        let el = EventLoop::new(AioMode::Threads).map_err(|e| Failure::Error(e.to_string()))?;
        let graph = Graph::new(
            Rc::clone(el.context()),
            formats::registry(),
            EventBus::new(),
        );
        Ok(Env { el, graph })
    }

    /// Runs `fut` on the loop until it completes.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.el.block_on(fut)
    }

    /// Opens `filename` as qemu-img's `img_open` does with the default cache
    /// mode and AIO engine.
    pub async fn open(
        &self,
        filename: &str,
        fmt: Option<&str>,
        writable: bool,
        force_share: bool,
    ) -> Result<Rc<BlockBackend>, OpenError> {
        self.open_with(
            filename,
            fmt,
            writable,
            force_share,
            false,
            CacheMode::Writeback,
        )
        .await
    }

    /// [`Env::open`]; with `unmap`, discards reach the file (QEMU's
    /// BDRV_O_UNMAP), and `cache` is the `-t` mode.
    pub async fn open_with(
        &self,
        filename: &str,
        fmt: Option<&str>,
        writable: bool,
        force_share: bool,
        unmap: bool,
        cache: CacheMode,
    ) -> Result<Rc<BlockBackend>, OpenError> {
        let spec = ImageSpec {
            filename: filename.to_owned(),
            fmt: fmt.map(str::to_owned),
            image_opts: false,
            writable,
            cache,
            aio: Aio::Threads,
            force_share,
            unmap,
        };
        open_image(&self.graph, &spec).await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.el.block_on(self.graph.close_all());
    }
}

/// Detaches a backend so that the graph can close its nodes.
pub fn release(blk: Rc<BlockBackend>) {
    blk.detach();
}

/// C's `%0.3g`.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = v.abs().log10().floor() as i32;
    let mant = format!("{:.2e}", v);
    // Rounding to three digits may carry into the next power of ten.
    let exp: i32 = mant
        .split('e')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(e);
    if !(-4..3).contains(&exp) {
        let (m, _) = mant.split_once('e').unwrap_or((&mant, ""));
        let m = strip_zeros(m);
        return format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let prec = (2 - exp).max(0) as usize;
    strip_zeros(&format!("{v:.prec$}")).to_owned()
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's `size_to_str`: "196 KiB", "1.5 GiB".
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(val / (1000/1024)) exponent minus one, over ten: switches to the
    // next unit once the number would reach 1000.
    let x = val as f64 / (1000.0 / 1024.0);
    let i = if x == 0.0 {
        0
    } else {
        let exp = x.log2().floor() as i32 + 1;
        ((exp - 1) / 10).clamp(0, 6) as usize
    };
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// Parses `--output`'s value as qemu-img does.
pub fn parse_output(arg: &str) -> Result<bool, Failure> {
    match arg {
        "json" => Ok(true),
        "human" => Ok(false),
        _ => Err(Failure::Usage(format!(
            "--output expects 'human' or 'json' not '{arg}'"
        ))),
    }
}

/// Opens the qcow2 image in `path` outside the graph (no backing file), as
/// the format-level subcommands (check, snapshot) work on it.
pub async fn open_qcow2<'g>(
    graph: &'g Graph,
    path: &str,
    writable: bool,
    force_share: bool,
) -> Result<formats::qcow2::image::Image<'g>, Failure> {
    open_qcow2_with(
        graph,
        path,
        writable,
        force_share,
        false,
        CacheMode::Writeback,
    )
    .await
}

/// [`open_qcow2`]; with `unmap`, the file node passes discards down, as
/// QEMU's protocol children always do (BDRV_O_UNMAP): `check` repairs
/// punch out the clusters they free, whatever the qcow2 node's own
/// discard settings. `cache` is the `-t` mode of the file (write-through
/// modes act as write-back here: the image flushes when it closes).
pub async fn open_qcow2_with<'g>(
    graph: &'g Graph,
    path: &str,
    writable: bool,
    force_share: bool,
    unmap: bool,
    cache: CacheMode,
) -> Result<formats::qcow2::image::Image<'g>, Failure> {
    if force_share && writable {
        return Err(Failure::Error(format!(
            "Could not open '{path}': force-share=on can only be used with read-only images"
        )));
    }
    let mut file = block_core::Options::new()
        .with("driver", "file")
        .with("filename", path);
    if force_share {
        file.insert("force-share", true);
    }
    if unmap {
        file.insert("discard", "unmap");
    }
    file.insert("cache.direct", cache.direct());
    file.insert("cache.no-flush", cache.no_flush());
    let opts = block_core::Options::new()
        .with("file", file)
        .with("backing", block_core::OptValue::Null);
    formats::qcow2::image::Image::open(graph, opts, writable)
        .await
        .map_err(|e| {
            Failure::Error(format!(
                "Could not open '{path}': {}",
                super::open::describe(&e)
            ))
        })
}

/// The header of the qcow2 image in `path`, read from the file.
pub fn read_qcow2_header(path: &str) -> Result<formats::qcow2::header::Header, Failure> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| {
        Failure::Error(format!(
            "Could not open '{path}': {}",
            super::open::strerror(&e)
        ))
    })?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    f.by_ref()
        .take(2 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| {
            Failure::Error(format!(
                "Could not read '{path}': {}",
                super::open::strerror(&e)
            ))
        })?;
    formats::qcow2::header::Header::parse("", &buf, len)
        .map_err(|e| Failure::Error(format!("Could not open '{path}': {e}")))
}

/// Bytes allocated on disk for `path` (`st_blocks * 512`).
pub fn allocated_size(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// `YYYY-MM-DD HH:MM:SS` for a Unix time, in UTC.
pub fn format_date(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since the epoch (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The guest instruction count stored in a snapshot's extra data, if any.
pub fn snapshot_icount(s: &formats::qcow2::snapshot::SnapshotInfo) -> Option<u64> {
    s.extra
        .get(16..24)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
}

/// One row (or with `None` the header) of QEMU's snapshot table
/// (`bdrv_snapshot_dump`).
pub fn snapshot_row(s: Option<&formats::qcow2::snapshot::SnapshotInfo>) -> String {
    let Some(s) = s else {
        return format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
    };
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    // No icount (recorded as -1, or extra data too short to hold one)
    // shows as "--", as QEMU prints it.
    let icount = match snapshot_icount(s) {
        Some(v) if v != u64::MAX => v.to_string(),
        _ => "--".to_owned(),
    };
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        format_date(s.date_sec as i64),
        clock,
        icount
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(1_000_000), "977 KiB");
    }

    #[test]
    fn snapshot_row_icount_like_qemu() {
        let mut sn = formats::qcow2::snapshot::SnapshotInfo {
            id: "1".into(),
            name: "snap0".into(),
            l1_table_offset: 0x60000,
            l1_size: 2,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra: [
                0u64.to_be_bytes(),
                (1u64 << 30).to_be_bytes(),
                0u64.to_be_bytes(),
            ]
            .concat(),
        };
        let icount = |sn: &formats::qcow2::snapshot::SnapshotInfo| {
            snapshot_row(Some(sn))
                .split_whitespace()
                .last()
                .unwrap()
                .to_owned()
        };
        // qemu-img snapshot -c records 0; a daemon without icount -1;
        // older images have no icount field at all.
        assert_eq!(icount(&sn), "0");
        sn.extra[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(icount(&sn), "--");
        sn.extra.truncate(16);
        assert_eq!(icount(&sn), "--");
    }
}
