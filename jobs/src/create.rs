//! Image creation (`blockdev-create`): one creator per driver, looked up by
//! QEMU driver name in [`creator`]. Creators take the driver's create
//! options as a `block_core::Options` tree (already type-checked by the
//! front-end's schema) and return the job body.
//!
//! Crash safety: `file` creates the image under a temporary name in the
//! same directory, sizes and preallocates it, syncs it and only then renames
//! it over the target, so a daemon killed mid-create leaves at worst a stray
//! `.<name>.strata-create-*` file and never a half-written image under the
//! requested name.
//!
//! Runs on the graph's loop thread; blocking file system calls go to the
//! loop's worker pool.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use block_core::{Graph, Node, OptValue, Options, Perm, Prealloc};
use formats::qcow2::create::CreateOptions as Qcow2Create;
use formats::qcow2::header::CompressionType;

use crate::JobBody;

/// Builds a creation job body from the driver's options.
pub type CreateFn = fn(Rc<Graph>, Options) -> Result<JobBody, String>;

/// The creator for `driver`, if this build can create that format.
///
/// This is the single place where drivers plug in image creation.
pub fn creator(driver: &str) -> Option<CreateFn> {
    match driver {
        "file" => Some(create_file),
        "qcow2" => Some(create_qcow2),
        _ => None,
    }
}

/// Options of the `file` creator (`BlockdevCreateOptionsFile`).
struct FileCreate {
    filename: PathBuf,
    size: u64,
    prealloc: Prealloc,
    /// The mode as given, when the file driver cannot do it (the job then
    /// fails, as in QEMU).
    unsupported: Option<String>,
    nocow: bool,
}

fn parse_file(mut o: Options) -> Result<FileCreate, String> {
    let e = |e: block_core::Error| e.to_string();
    let filename = o
        .take_str("filename")
        .map_err(e)?
        .ok_or("Parameter 'filename' is missing")?;
    let size = o
        .take_u64("size")
        .map_err(e)?
        .ok_or("Parameter 'size' is missing")?;
    let mut unsupported = None;
    let prealloc = match o.take_str("preallocation").map_err(e)? {
        None => Prealloc::Off,
        Some(p) => match Prealloc::parse(&p) {
            Some(Prealloc::Metadata) | None => {
                unsupported = Some(p);
                Prealloc::Off
            }
            Some(p) => p,
        },
    };
    let nocow = o.take_bool("nocow").map_err(e)?.unwrap_or(false);
    o.take_u64("extent-size-hint").map_err(e)?;
    o.finish("file").map_err(e)?;
    Ok(FileCreate {
        filename: PathBuf::from(filename),
        size,
        prealloc,
        unsupported,
        nocow,
    })
}

/// Removes the temporary file unless the creation committed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn temp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    target.with_file_name(format!(
        ".{name}.strata-create-{}-{nanos}",
        std::process::id()
    ))
}

fn write_zeros(f: &mut File, size: u64) -> std::io::Result<()> {
    let buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The blocking part of `file` creation (runs on a worker thread).
fn create_file_sync(c: &FileCreate) -> Result<(), String> {
    if let Some(p) = &c.unsupported {
        return Err(format!("Unsupported preallocation mode: {p}"));
    }
    let shown = c.filename.display().to_string();
    let fail = |e: std::io::Error| format!("Could not create '{shown}': {}", os_text(&e));
    if let Some(parent) = c.filename.parent() {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            return Err(fail(std::io::Error::from_raw_os_error(libc_enoent())));
        }
    }
    let tmp = temp_name(&c.filename);
    let mut guard = TempGuard(Some(tmp.clone()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(fail)?;
    let _ = c.nocow; // chattr +C is a hint; ignored where unsupported, as in QEMU.
    match c.prealloc {
        Prealloc::Full => write_zeros(&mut f, c.size).map_err(fail)?,
        Prealloc::Falloc => {
            // This crate forbids unsafe code, so no posix_fallocate: the
            // image gets its exact size sparse (a documented deviation).
            f.set_len(c.size).map_err(fail)?;
        }
        _ => f.set_len(c.size).map_err(fail)?,
    }
    f.sync_all().map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, &c.filename).map_err(fail)?;
    guard.0 = None;
    if let Some(dir) = c.filename.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn libc_enoent() -> i32 {
    2
}

/// The host error text without Rust's " (os error N)" suffix, as QEMU
/// prints `strerror()`.
pub fn os_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn create_file(graph: Rc<Graph>, opts: Options) -> Result<JobBody, String> {
    let c = parse_file(opts)?;
    let ctx = Rc::clone(graph.context());
    Ok(Box::pin(async move {
        ctx.run_on_worker(move || create_file_sync(&c)).await
    }))
}

/// Where the qcow2 creator writes: an existing node (by name) or one it
/// opens from inline options and closes again.
enum FileRef {
    Node(String),
    Inline(Options),
}

/// What `parse_qcow2` found: the image file, the external data file (if
/// any) and the creation options.
type Qcow2Args = (FileRef, Option<FileRef>, Qcow2Create);

fn parse_qcow2(mut o: Options) -> Result<Qcow2Args, String> {
    let e = |e: block_core::Error| e.to_string();
    let file = match o.take("file") {
        Some(OptValue::Str(n)) => FileRef::Node(n),
        Some(OptValue::Map(m)) => FileRef::Inline(m),
        _ => return Err("Parameter 'file' is missing".into()),
    };
    let mut c = Qcow2Create {
        size: o
            .take_u64("size")
            .map_err(e)?
            .ok_or("Parameter 'size' is missing")?,
        ..Qcow2Create::default()
    };
    let data = match o.take("data-file") {
        Some(OptValue::Str(n)) => Some(FileRef::Node(n)),
        Some(OptValue::Map(m)) => Some(FileRef::Inline(m)),
        None | Some(OptValue::Null) => None,
        Some(_) => {
            return Err("Invalid parameter type for 'data-file', expected: BlockdevRef".into())
        }
    };
    c.data_file_raw = o.take_bool("data-file-raw").map_err(e)?.unwrap_or(false);
    c.extended_l2 = o.take_bool("extended-l2").map_err(e)?.unwrap_or(false);
    c.compat_v2 = match o.take_str("version").map_err(e)?.as_deref() {
        None | Some("v3") => false,
        Some("v2") => true,
        Some(v) => return Err(format!("Invalid parameter value for 'version': '{v}'")),
    };
    c.backing_file = o.take_str("backing-file").map_err(e)?;
    c.backing_fmt = o.take_str("backing-fmt").map_err(e)?;
    if c.backing_fmt.is_some() && c.backing_file.is_none() {
        return Err("Backing format cannot be used without backing file".into());
    }
    if o.take("encrypt").is_some() {
        return Err("Encrypted qcow2 images are not supported by this build".into());
    }
    if let Some(cs) = o.take_u64("cluster-size").map_err(e)? {
        c.cluster_size = cs;
    }
    if let Some(p) = o.take_str("preallocation").map_err(e)? {
        c.preallocation = Prealloc::parse(&p)
            .ok_or_else(|| format!("Invalid parameter value for 'preallocation': '{p}'"))?;
    }
    c.lazy_refcounts = o.take_bool("lazy-refcounts").map_err(e)?.unwrap_or(false);
    if let Some(rb) = o.take_u64("refcount-bits").map_err(e)? {
        c.refcount_bits = u32::try_from(rb).unwrap_or(u32::MAX);
    }
    c.compression_type = match o.take_str("compression-type").map_err(e)?.as_deref() {
        None | Some("zlib") => CompressionType::Deflate,
        Some("zstd") => CompressionType::Zstd,
        Some(v) => {
            return Err(format!(
                "Invalid parameter value for 'compression-type': '{v}'"
            ))
        }
    };
    o.finish("qcow2").map_err(e)?;
    Ok((file, data, c))
}

/// Looks up or opens `r`; `true` when it was opened here (and is to be
/// closed again).
async fn resolve(graph: &Graph, r: FileRef) -> Result<(Rc<Node>, bool), String> {
    match r {
        FileRef::Node(n) => Ok((graph.lookup(&n).map_err(|e| e.to_string())?, false)),
        FileRef::Inline(m) => Ok((graph.open(m).await.map_err(|e| e.to_string())?, true)),
    }
}

/// Closes a node [`resolve`] opened.
async fn release(graph: &Graph, node: Rc<Node>, inline: bool) -> Result<(), String> {
    if inline {
        let name = node.name().to_owned();
        drop(node);
        graph.delete(&name).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn create_qcow2(graph: Rc<Graph>, opts: Options) -> Result<JobBody, String> {
    let (file, data, mut c) = parse_qcow2(opts)?;
    Ok(Box::pin(async move {
        let data = match data {
            Some(r) => {
                let (n, inline) = resolve(&graph, r).await?;
                // The header names the data file as QEMU does: by the
                // node's file name.
                c.data_file = Some(n.filename());
                Some((n, inline))
            }
            None => None,
        };
        let r = match resolve(&graph, file).await {
            Ok((node, inline)) => {
                let r = create_on(&node, data.as_ref().map(|d| &d.0), &c).await;
                r.and(release(&graph, node, inline).await)
            }
            Err(e) => Err(e),
        };
        match data {
            Some((n, inline)) => r.and(release(&graph, n, inline).await),
            None => r,
        }
    }))
}

/// Runs the qcow2 creator on `node` (and `data`) with write permissions.
async fn create_on(
    node: &Rc<Node>,
    data: Option<&Rc<Node>>,
    c: &Qcow2Create,
) -> Result<(), String> {
    let perm = Perm::WRITE | Perm::RESIZE | Perm::CONSISTENT_READ;
    let id = node
        .add_user("qcow2-create", "root", perm, Perm::ALL)
        .map_err(|e| e.to_string())?;
    let did = match data.map(|d| d.add_user("qcow2-create", "data-file", perm, Perm::ALL)) {
        Some(Err(e)) => {
            node.remove_user(id);
            return Err(e.to_string());
        }
        Some(Ok(d)) => Some(d),
        None => None,
    };
    let r = formats::qcow2::create::create_with_data(node, data, c).await;
    node.remove_user(id);
    if let (Some(d), Some(did)) = (data, did) {
        d.remove_user(did);
    }
    r.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_create_is_atomic_and_sized() {
        let dir = std::env::temp_dir().join(format!("strata-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("a.raw");
        let c = FileCreate {
            filename: target.clone(),
            size: 1 << 20,
            prealloc: Prealloc::Full,
            unsupported: None,
            nocow: false,
        };
        create_file_sync(&c).unwrap();
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 1 << 20);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        let bad = FileCreate {
            filename: dir.join("nope/b.raw"),
            ..c
        };
        assert_eq!(
            create_file_sync(&bad).unwrap_err(),
            format!(
                "Could not create '{}': No such file or directory",
                dir.join("nope/b.raw").display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
