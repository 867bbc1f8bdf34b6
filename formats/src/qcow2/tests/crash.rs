//! Crash safety under SIGKILL, many times over: a writer process (this test
//! binary run again, as the ignored `crash_writer` test) applies a seeded
//! random sequence of allocating and in-place writes, compressed writes,
//! write-zeroes, discards, internal snapshot creation and deletion and
//! growth to a qcow2 image, flushing every few operations and printing the
//! index of the last operation each completed flush covers. It is killed
//! at a random moment. Then `qemu-img check` must find no corruption
//! (leaks are allowed) and every range whose last change was covered by a
//! completed flush must read back through QEMU as the model says. With
//! lazy refcounts the image may be left dirty, with refcounts behind the
//! L2 tables: then the repair QEMU runs on a dirty image must leave it
//! clean first.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use block_core::{AioMode, EventBus, EventLoop, Graph, IoBuf, Prealloc, WriteFlags};

use super::{create_qcow2, q2_opts, qemu_img, tool, Dir, Rng};
use crate::qcow2::Qcow2;

const SIZE: u64 = 32 << 20;
const OPS: usize = 400;

#[derive(Debug, Clone)]
enum CrashOp {
    Write(u64, u64, u8),
    Compressed(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
    Snapshot(String),
    DeleteSnapshot(String),
    Grow(u64),
    Flush,
}

impl CrashOp {
    /// The guest range the operation changes, if any.
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            CrashOp::Write(o, l, _)
            | CrashOp::Compressed(o, l, _)
            | CrashOp::Zero(o, l)
            | CrashOp::Discard(o, l) => Some((o, l)),
            _ => None,
        }
    }
}

/// The operation sequence for `seed`: data goes to fresh clusters in
/// order, so each range has few writers; zeroing, discarding and rewriting
/// pick a recent range, after snapshots too (shared clusters).
fn crash_ops(seed: u64, cs: u64) -> Vec<CrashOp> {
    let mut r = Rng(seed | 1);
    let mut fresh = 0u64;
    let mut recent: Vec<(u64, u64)> = Vec::new();
    let mut snaps: Vec<String> = Vec::new();
    let mut size = SIZE;
    let mut ops = Vec::new();
    for i in 0..OPS {
        let pat = 1 + (i % 250) as u8;
        let pick = r.below(20);
        let op = match pick {
            0..=7 if fresh + 4 * cs <= SIZE => {
                let n = 1 + r.below(4);
                let off = fresh;
                fresh += n * cs;
                recent.push((off, n * cs));
                if r.below(3) == 0 {
                    // A partial write: the rest of the clusters stays zero.
                    let a = r.below(cs / 512) * 512;
                    CrashOp::Write(off + a, n * cs - a, pat)
                } else {
                    CrashOp::Write(off, n * cs, pat)
                }
            }
            8..=9 if fresh + cs <= SIZE => {
                let off = fresh;
                // Runs of up to three clusters, as `convert -c` writes them.
                let l = (1 + r.below(3)).min((SIZE - fresh) / cs) * cs;
                fresh += l;
                recent.push((off, l));
                CrashOp::Compressed(off, l, pat)
            }
            10 | 11 if !recent.is_empty() => {
                let (o, l) =
                    recent[recent.len() - 1 - r.below(recent.len().min(6) as u64) as usize];
                CrashOp::Write(o, l, pat)
            }
            12 if !recent.is_empty() => {
                let (o, l) =
                    recent[recent.len() - 1 - r.below(recent.len().min(6) as u64) as usize];
                CrashOp::Zero(o, l)
            }
            13 if !recent.is_empty() => {
                let (o, l) =
                    recent[recent.len() - 1 - r.below(recent.len().min(6) as u64) as usize];
                CrashOp::Discard(o, l)
            }
            14 if snaps.len() < 3 => {
                let name = format!("s{i}");
                snaps.push(name.clone());
                CrashOp::Snapshot(name)
            }
            15 if !snaps.is_empty() => {
                let k = r.below(snaps.len() as u64) as usize;
                CrashOp::DeleteSnapshot(snaps.remove(k))
            }
            16 if size < SIZE * 4 => {
                size += 17 * cs;
                CrashOp::Grow(size)
            }
            _ => CrashOp::Flush,
        };
        ops.push(op);
    }
    ops
}

/// A writer process's loop and graph.
fn writer_graph() -> (EventLoop, Graph) {
    let el = EventLoop::new(AioMode::IoUring).expect("event loop");
    let g = Graph::new(Rc::clone(el.context()), crate::registry(), EventBus::new());
    (el, g)
}

/// Opens the image with a persistent bitmap of the session, stored next
/// to the image's own when the node closes; prints `READY`.
async fn open_with_session_bitmap(
    g: &Graph,
    opts: block_core::Options,
    granularity: u64,
) -> Rc<block_core::Node> {
    let n = g.open(opts).await.unwrap();
    let b = block_core::DirtyBitmap::new("session", n.size(), granularity, true);
    n.add_dirty_bitmap(Rc::new(b.persistent(false, false)))
        .unwrap();
    println!("READY");
    n
}

/// The writer process: applies the operations, printing `ACK i` once a
/// flush after operation `i` completes.
fn write_until_killed(img: &str, seed: u64, cs: u64) {
    let (el, g) = writer_graph();
    Rc::clone(el.context()).block_on(async {
        let n = open_with_session_bitmap(&g, q2_opts(img).with("discard", "unmap"), 65536).await;
        for (i, op) in crash_ops(seed, cs).iter().enumerate() {
            let q = Qcow2::of(&n).unwrap();
            match op {
                CrashOp::Write(o, l, p) => {
                    n.pwrite(*o, IoBuf::filled(*l as usize, *p), WriteFlags::default())
                        .await
                        .unwrap();
                }
                CrashOp::Compressed(o, l, p) => q
                    .write_compressed(*o, IoBuf::filled(*l as usize, *p))
                    .await
                    .unwrap(),
                CrashOp::Zero(o, l) => n
                    .pwrite_zeroes(*o, *l, WriteFlags::default())
                    .await
                    .unwrap(),
                CrashOp::Discard(o, l) => n.pdiscard(*o, *l).await.unwrap(),
                CrashOp::Snapshot(s) => {
                    println!("BEGIN {i}");
                    q.create_snapshot(s).await.unwrap();
                    println!("END {i}");
                }
                CrashOp::DeleteSnapshot(s) => {
                    println!("BEGIN {i}");
                    q.delete_snapshot(s).await.unwrap();
                    println!("END {i}");
                }
                CrashOp::Grow(size) => n.truncate(*size, false, Prealloc::Off).await.unwrap(),
                CrashOp::Flush => {
                    n.flush().await.unwrap();
                    println!("ACK {i}");
                }
            }
        }
        n.flush().await.unwrap();
        println!("ACK {}", OPS - 1);
        println!("DONE");
        // Closing stores the bitmaps: the kill may land in there too.
        drop(n);
        g.close_all().await.unwrap();
        println!("CLOSED");
    });
}

/// Entry point of the writer process (run by `killed_writers_*`).
#[test]
#[ignore = "the writer process of the SIGKILL crash test"]
fn crash_writer() {
    let img = std::env::var("STRATA_CRASH_IMG").expect("STRATA_CRASH_IMG");
    let seed: u64 = std::env::var("STRATA_CRASH_SEED").unwrap().parse().unwrap();
    let cs: u64 = std::env::var("STRATA_CRASH_CS").unwrap().parse().unwrap();
    if std::env::var("STRATA_CRASH_MODE").as_deref() == Ok("close") {
        close_until_killed(&img);
    } else {
        write_until_killed(&img, seed, cs);
    }
}

/// The close writer: writes covered by a flush, then a close that stores
/// the persistent bitmaps (the image's own and one of the session).
fn close_until_killed(img: &str) {
    let (el, g) = writer_graph();
    Rc::clone(el.context()).block_on(async {
        let n = open_with_session_bitmap(&g, q2_opts(img), 4096).await;
        for i in 0..CLOSE_WRITES {
            n.pwrite(
                i * 393_216,
                IoBuf::filled(65536, 0x5c),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        }
        n.flush().await.unwrap();
        println!("ACK 0");
        drop(n);
        g.close_all().await.unwrap();
        println!("CLOSED");
    });
}

/// Writes of the close writer, 64 KiB every 384 KiB.
const CLOSE_WRITES: u64 = 40;

/// What a killed writer reported.
struct Killed {
    /// The last operation a completed flush covered.
    acked: Option<usize>,
    /// The writer closed the image (and stored its bitmaps).
    closed: bool,
    /// Killed while creating or deleting a snapshot.
    in_snapshot_op: bool,
}

/// Runs one writer and kills it after `delay`.
fn run_and_kill(img: &str, seed: u64, cs: u64, delay: Duration) -> Killed {
    run_mode_and_kill(img, seed, cs, delay, "ops")
}

/// [`run_and_kill`] for a writer `mode`: "ops" or "close".
fn run_mode_and_kill(img: &str, seed: u64, cs: u64, delay: Duration, mode: &str) -> Killed {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "qcow2::tests::crash::crash_writer",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STRATA_CRASH_IMG", img)
        .env("STRATA_CRASH_SEED", seed.to_string())
        .env("STRATA_CRASH_CS", cs.to_string())
        .env("STRATA_CRASH_MODE", mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    // Read the acknowledgements on a thread: the kill must not wait for
    // output, and the pipe must not fill.
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        let mut ready = false;
        let mut open_op = false;
        let mut closed = false;
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if l.starts_with("BEGIN ") {
                open_op = true;
            }
            if l.starts_with("END ") {
                open_op = false;
            }
            // libtest prints "test <name> ... " just before it.
            if l.ends_with("READY") {
                ready = true;
            }
            if let Some(i) = l.strip_prefix("ACK ") {
                acks.push(i.parse::<usize>().unwrap());
            }
            closed |= l.ends_with("CLOSED");
        }
        (ready, acks, open_op, closed)
    });
    let end = Instant::now() + delay;
    while Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let st = child.wait().unwrap();
    let (ready, acks, in_snapshot_op, closed) = reader.join().unwrap();
    // Killed, or ran to the end: anything else is a writer failure.
    assert!(
        st.code().is_none() || st.success(),
        "writer seed {seed} failed: {st:?}"
    );
    assert!(ready || acks.is_empty(), "acknowledged before opening");
    Killed {
        acked: acks.last().copied(),
        closed,
        in_snapshot_op,
    }
}

/// Checks the image after a kill: no corruption, and what the last
/// completed flush covered reads back.
fn verify(img: &str, d: &Dir, seed: u64, cs: u64, killed: Killed) {
    let acked = killed.acked;
    if is_dirty(img) {
        // Lazy refcounts: the refcounts may lag behind the L2 tables until
        // the repair that a read-write open runs on a dirty image; after
        // it, everything below must hold.
        let (_, text) = tool("qemu-img", &["check", "-r", "all", img]);
        assert!(
            text.contains("No errors were found") && !is_dirty(img),
            "seed {seed} cs {cs}: check -r all of a dirty image: {text}"
        );
    } else if killed.in_snapshot_op {
        // A snapshot changes the COPIED flags of every L2 and L1 entry
        // and the refcounts of their clusters: no write order keeps the
        // two in step (QEMU has the same window). A crash in between
        // leaves flags that `qemu-img check` counts as corruption, though
        // both states are safe to write to (an extra copy, or in-place
        // writes to a cluster whose other reference was never recorded)
        // and `check -r all` sets them right. Nothing else may be wrong.
        let (_, text) = tool("qemu-img", &["check", img]);
        for l in text.lines().filter(|l| l.starts_with("ERROR")) {
            assert!(
                l.starts_with("ERROR OFLAG_COPIED"),
                "seed {seed} cs {cs} killed in a snapshot operation: {text}"
            );
        }
        let (_, text) = tool("qemu-img", &["check", "-r", "all", img]);
        assert!(
            text.contains("No errors were found"),
            "seed {seed} cs {cs}: check -r all: {text}"
        );
    }
    let (ok, text) = tool("qemu-img", &["check", "--output=json", img]);
    let corrupt = super::json_field(&text, "corruptions");
    let errors = super::json_field(&text, "check-errors");
    // Exit 0 (clean) or 3 (leaks only).
    assert!(
        text.contains("\"check-errors\"")
            && corrupt == 0
            && errors == 0
            && (ok || text.contains("\"leaks\"")),
        "seed {seed} cs {cs} after ack {acked:?}: {text}"
    );
    let Some(acked) = acked else { return };
    let ops = crash_ops(seed, cs);
    let mut model = vec![0u8; SIZE as usize];
    // Ranges changed after the last acknowledged flush may hold either
    // state; they are left out.
    let mut unsure = vec![false; SIZE.div_ceil(cs) as usize];
    for (i, op) in ops.iter().enumerate() {
        let Some((o, l)) = op.range() else { continue };
        if i > acked {
            for c in o / cs..(o + l).div_ceil(cs) {
                unsure[c as usize] = true;
            }
            continue;
        }
        let r = o as usize..(o + l) as usize;
        match *op {
            CrashOp::Write(_, _, p) | CrashOp::Compressed(_, _, p) => model[r].fill(p),
            _ => model[r].fill(0),
        }
    }
    let raw = d.file("readback.raw");
    let (ok, text) = tool("qemu-img", &["convert", "-U", "-O", "raw", img, &raw]);
    if !ok {
        // Kept for a post-mortem: the scratch directory goes away.
        let keep = std::env::temp_dir().join("strata-crash-unreadable.qcow2");
        let _ = std::fs::copy(img, &keep);
        panic!(
            "seed {seed} cs {cs} after ack {acked}: {text} (image kept as {})",
            keep.display()
        );
    }
    let got = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    for (c, &skip) in unsure.iter().enumerate() {
        if skip {
            continue;
        }
        let r = c * cs as usize..(c + 1) * cs as usize;
        assert!(
            got[r.clone()] == model[r],
            "seed {seed} cs {cs}: cluster {c} lost data acknowledged by the flush after op {acked}"
        );
    }
}

/// Whether the header's dirty bit (lazy refcounts in use) is set.
fn is_dirty(img: &str) -> bool {
    let h = std::fs::read(img).unwrap();
    h[79] & 1 != 0
}

#[test]
fn killed_writers_leave_consistent_images_and_flushed_data() {
    let d = Dir::new("crash-kill");
    let mut rng = Rng(0x5eed_c0de);
    let mut runs = 0;
    let mut dirty = 0;
    let mut stored = 0;
    for (cfg, cs) in [
        ("cluster_size=65536", 65536u64),
        ("cluster_size=4096,refcount_bits=4", 4096),
        ("cluster_size=65536,extended_l2=on", 65536),
        ("cluster_size=65536,lazy_refcounts=on", 65536),
    ] {
        let lazy = cfg.contains("lazy");
        for k in 0..if lazy { 40 } else { 60u64 } {
            let img = d.file("k.qcow2");
            let _ = std::fs::remove_file(&img);
            create_qcow2(&img, cfg, SIZE);
            // The image's own persistent bitmap is loaded, marked in use
            // and stored back at close.
            qemu_img(&["bitmap", "--add", &img, "own"]);
            let seed = cs * 1000 + k;
            let delay = Duration::from_millis(2 + rng.below(120));
            let killed = run_and_kill(&img, seed, cs, delay);
            assert!(
                lazy || !is_dirty(&img),
                "seed {seed}: dirty without lazy refcounts"
            );
            dirty += usize::from(is_dirty(&img));
            let closed = killed.closed;
            verify(&img, &d, seed, cs, killed);
            let info = qemu_img(&["info", "--output=json", "-U", &img]);
            assert!(info.contains("\"own\""), "seed {seed}: bitmap lost: {info}");
            if closed {
                assert!(
                    info.contains("\"session\"") && !info.contains("in-use"),
                    "seed {seed}: bitmaps not stored at close: {info}"
                );
                stored += 1;
            }
            runs += 1;
        }
    }
    assert_eq!(runs, 220);
    eprintln!("{stored} of {runs} writers closed the image before the kill");
    // The kills land while lazily written metadata is outstanding.
    assert!(dirty > 10, "only {dirty} of 40 lazy images were left dirty");
}

/// Kills the writer at random points around the close that stores the
/// persistent bitmaps: the image stays free of corruption, its bitmaps
/// are never lost (in use after a kill, stored and clean after a close),
/// and flushed data reads back.
#[test]
fn killed_while_storing_bitmaps() {
    let d = Dir::new("crash-close");
    let img = d.file("c.qcow2");
    let fresh = || {
        let _ = std::fs::remove_file(&img);
        create_qcow2(&img, "cluster_size=65536", SIZE);
        qemu_img(&["bitmap", "--add", &img, "own"]);
    };
    // How long a writer takes to the end, unkilled.
    fresh();
    let t = Instant::now();
    let k = run_mode_and_kill(&img, 0, 65536, Duration::from_secs(60), "close");
    let full = t.elapsed();
    assert!(k.closed, "the close writer did not finish");
    let mut rng = Rng(0x00c1_05ed);
    let mut closed = 0;
    for run in 0..60 {
        fresh();
        // Most kills land late: in the writes, the flush and the close.
        let delay = full.mul_f64(0.5 + rng.below(600) as f64 / 1000.0);
        let k = run_mode_and_kill(&img, 0, 65536, delay, "close");
        let (_, text) = tool("qemu-img", &["check", &img]);
        assert!(
            !text.contains("ERROR") && !text.contains("corrupt"),
            "run {run}: {text}"
        );
        let info = qemu_img(&["info", "--output=json", "-U", &img]);
        assert!(info.contains("\"own\""), "run {run}: bitmap lost: {info}");
        if k.closed {
            closed += 1;
            assert!(
                info.contains("\"session\"") && !info.contains("in-use"),
                "run {run}: not stored: {info}"
            );
        }
        if k.acked.is_some() {
            let cmds: Vec<String> = (0..CLOSE_WRITES)
                .map(|i| format!("read -P 0x5c {} 64k", i * 393_216))
                .collect();
            let mut args = vec!["-U", "-r", "-f", "qcow2"];
            for c in &cmds {
                args.extend(["-c", c.as_str()]);
            }
            args.push(&img);
            let (ok, text) = tool("qemu-io", &args);
            assert!(ok && !text.contains("fail"), "run {run}: {text}");
        }
    }
    eprintln!("{closed} of 60 writers closed the image before the kill");
}
