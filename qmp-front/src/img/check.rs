//! `strata-img check`: qemu-img's `check` on qcow2 images (raw images
//! cannot be checked: exit status 63, as in QEMU). Report wording, the
//! repair summary with its second pass, and the exit statuses (0 clean,
//! 1 check failed, 2 corruptions, 3 leaks) follow `img_check`. Stderr
//! carries QEMU's lines in QEMU's order: malformed entries found by the
//! walk, refcount mismatches (again as "Repairing" when repairing), then
//! OFLAG_COPIED findings; the double-check pass prints its own.

use formats::qcow2::check::{
    CheckReport, CopiedEntry, CorruptionSignal, Finding, OverlapAbort, RefusedWrite, Repair,
};

use super::common::{open_qcow2_with, parse_output, Env};
use super::getopt::{getopt_long, LongOpt};
use super::open::probe_format;
use super::qjson::QValue;
use super::{Failure, PROG};

const OPT_OUTPUT: u32 = 256;
const OPT_OBJECT: u32 = 257;
const OPT_IMAGE_OPTS: u32 = 258;

const LONGS: &[LongOpt] = &[
    LongOpt::flag("help", 'h' as u32),
    LongOpt::value("format", 'f' as u32),
    LongOpt::flag("image-opts", OPT_IMAGE_OPTS),
    LongOpt::value("cache", 'T' as u32),
    LongOpt::value("repair", 'r' as u32),
    LongOpt::flag("force-share", 'U' as u32),
    LongOpt::value("output", OPT_OUTPUT),
    LongOpt::flag("quiet", 'q' as u32),
    LongOpt::value("object", OPT_OBJECT),
];

/// Exit status for a format without checks.
const EXIT_UNSUPPORTED: i32 = 63;

/// The `check` subcommand; returns the exit status.
pub fn run_status(args: &[String]) -> Result<i32, Failure> {
    let m = getopt_long(args, "hf:r:T:qU", LONGS)?;
    let mut fmt = None;
    let mut json = false;
    let mut quiet = false;
    let mut force_share = false;
    let mut repair = Repair::default();
    for p in &m.opts {
        let arg = p.arg.clone().unwrap_or_default();
        match p.id {
            id if id == 'h' as u32 => {
                print!("{}", super::help::text("check"));
                return Ok(0);
            }
            id if id == 'f' as u32 => fmt = Some(arg),
            id if id == 'q' as u32 => quiet = true,
            id if id == 'U' as u32 => force_share = true,
            id if id == 'r' as u32 => {
                repair = match arg.as_str() {
                    "leaks" => Repair {
                        leaks: true,
                        errors: false,
                    },
                    "all" => Repair {
                        leaks: true,
                        errors: true,
                    },
                    _ => {
                        return Err(Failure::Usage(format!(
                            "--repair (-r) expects 'leaks' or 'all' not '{arg}'"
                        )))
                    }
                }
            }
            id if id == 'T' as u32 && super::open::CacheMode::parse(&arg).is_none() => {
                return Err(Failure::Error(format!(
                    "Invalid source cache option: {arg}"
                )));
            }
            OPT_OUTPUT => json = parse_output(&arg)?,
            OPT_IMAGE_OPTS => {
                return Err(Failure::Error(
                    "--image-opts is not supported by check".into(),
                ))
            }
            _ => {}
        }
    }
    let [filename] = m.operands.as_slice() else {
        return Err(Failure::Usage("Expecting one image file name".into()));
    };
    let fix = repair.leaks || repair.errors;
    let env = Env::new()?;
    let fmt = match fmt {
        Some(f) => f,
        None => probe_format(filename).unwrap_or("raw").to_owned(),
    };
    if fmt != "qcow2" {
        env.block_on(async {
            let blk = env.open(filename, Some(&fmt), fix, force_share).await?;
            super::common::release(blk);
            Ok::<_, Failure>(())
        })?;
        eprintln!("{PROG}: This image format does not support checks");
        return Ok(EXIT_UNSUPPORTED);
    }
    let img = env.block_on(open_qcow2_with(
        &env.graph,
        filename,
        fix,
        force_share,
        fix,
        super::open::CacheMode::Writeback,
    ))?;
    let result = env.block_on(async {
        let first = img.check(repair).await;
        if let Ok(r) = &first {
            report_mismatches(r, fix);
            if let Some(a) = &r.aborted {
                eprint!("{}", overlap_lines(a));
            }
        }
        let r = match first {
            Ok(r) if r.aborted.is_none() && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) => {
                if !json {
                    qprint(
                        quiet,
                        &format!(
                            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                            r.leaks_fixed, r.corruptions_fixed
                        ),
                    );
                }
                let again = img.check(Repair::default()).await;
                if let Ok(again) = &again {
                    report_mismatches(again, false);
                }
                again.map(|again| CheckReport {
                    leaks_fixed: r.leaks_fixed,
                    corruptions_fixed: r.corruptions_fixed,
                    ..again
                })
            }
            other => other,
        };
        let c = img.close().await;
        match (r, c) {
            // The image refuses writes now; closing may fail for that.
            (Ok(r), _) if r.aborted.is_some() => Ok(r),
            (Ok(r), Ok(())) => Ok(r),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{PROG}: Check failed: {e}");
            return Ok(1);
        }
    };
    if report.aborted.is_some() || report.need_rebuild {
        // QEMU's check returns EIO there, before any summary.
        eprintln!("{PROG}: Check failed: Input/output error");
        return Ok(1);
    }
    if json {
        qprint(quiet, &format!("{}\n", to_json(&report, filename).pretty()));
    } else {
        qprint(quiet, &human(&report));
    }
    if report.check_errors > 0 {
        eprintln!("{PROG}: Check failed");
        return Ok(1);
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// The `check` subcommand for the command table (statuses other than 0
/// and 1 leave through `process::exit`).
pub fn run(args: &[String]) -> Result<(), Failure> {
    use std::io::Write;
    match run_status(args)? {
        0 => Ok(()),
        n => {
            let _ = std::io::stdout().flush();
            std::process::exit(n)
        }
    }
}

/// The per-cluster lines qemu-img prints on stderr: a first pass that
/// repairs nothing, then, when repairing and something was found, the
/// repairing pass; then the OFLAG_COPIED findings, judged against the
/// repaired refcounts.
fn report_mismatches(r: &CheckReport, fix: bool) {
    let line = |m: &formats::qcow2::check::RefcountMismatch, repairing: bool| {
        let what = if repairing && m.fixed {
            "Repairing"
        } else if m.refcount < m.reference {
            "ERROR"
        } else {
            "Leaked"
        };
        format!(
            "{what} cluster {} refcount={} reference={}\n",
            m.cluster, m.refcount, m.reference
        )
    };
    let mut s: String = r.findings.iter().map(finding).collect();
    // The first comparison, in cluster order: mismatches, and clusters
    // whose refcount could not be read (after the corruption they hit).
    let mut first: Vec<(u64, String)> = r
        .mismatches
        .iter()
        .map(|m| (m.cluster, line(m, false)))
        .collect();
    first.extend(r.unreadable.iter().enumerate().map(|(i, &c)| {
        let mut l = String::new();
        if i == 0 {
            if let Some(sig) = &r.signal {
                l.push_str(&signal_line(sig));
            }
        }
        l.push_str(&format!(
            "Can't get refcount for cluster {c}: Input/output error\n"
        ));
        (c, l)
    }));
    first.sort_by_key(|x| x.0);
    s.extend(first.into_iter().map(|x| x.1));
    if let Some(b) = &r.rebuilt {
        s.push_str("Rebuilding refcount structure\n");
        s.extend(b.findings.iter().map(finding));
        s.extend(b.repaired.iter().map(|m| line(m, true)));
        if b.still_broken {
            s.push_str("ERROR rebuilt refcount structure is still broken\n");
        }
    } else if r.need_rebuild {
        s.push_str("ERROR need to rebuild refcount structures\n");
    } else if fix && !r.mismatches.is_empty() {
        s.extend(r.mismatches.iter().map(|m| line(m, true)));
    }
    for c in &r.copied {
        let what = if c.fixed { "Repairing" } else { "ERROR" };
        s.push_str(&match c.what {
            CopiedEntry::L2Table { l1_index } => format!(
                "{what} OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={:x} refcount={}\n",
                c.entry, c.refcount
            ),
            CopiedEntry::Data => format!(
                "{what} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}\n",
                c.entry, c.refcount
            ),
        });
    }
    eprint!("{s}");
}

/// QEMU's line for a corruption it signals.
fn signal_line(sig: &CorruptionSignal) -> String {
    if sig.fatal {
        format!(
            "qcow2: Marking image as corrupt: {}; further corruption events will be suppressed\n",
            sig.msg
        )
    } else {
        format!(
            "qcow2: Image is corrupt: {}; further non-fatal corruption events will be suppressed\n",
            sig.msg
        )
    }
}

/// What QEMU prints when its overlap check refuses a repair write (or the
/// write fails because the image was already marked corrupt).
fn overlap_lines(a: &OverlapAbort) -> String {
    let mut s = String::new();
    if let Some(what) = a.what {
        s.push_str(&signal_line(&CorruptionSignal {
            msg: format!("Preventing invalid write on metadata (overlaps with {what})"),
            fatal: true,
        }));
    }
    s.push_str(&match a.write {
        RefusedWrite::CopiedFlag => {
            "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error\n"
                .to_owned()
        }
        RefusedWrite::PreallocZero => "ERROR: Overlap check failed\n".to_owned(),
        RefusedWrite::Refblock => format!("{PROG}: ERROR writing refblock: Input/output error\n"),
        RefusedWrite::Reftable => format!("{PROG}: ERROR writing reftable: Input/output error\n"),
    });
    s
}

/// QEMU's line for malformed metadata found while counting references.
fn finding(f: &Finding) -> String {
    match *f {
        Finding::L1Reserved { entry } => {
            format!("ERROR found L1 entry with reserved bits set: {entry:x}\n")
        }
        Finding::L2TableUnaligned { offset } => format!(
            "ERROR l2_offset={offset:x}: Table is not cluster aligned; L1 entry corrupted\n"
        ),
        Finding::L2Reserved { entry } => {
            format!("ERROR found l2 entry with reserved bits set: {entry:x}\n")
        }
        Finding::CompressedCopied { coffset } => format!(
            "ERROR: coffset={coffset:#x}: copied flag must never be set for compressed clusters\n"
        ),
        Finding::CompressedWithDataFile { index, entry } => {
            format!("ERROR compressed cluster {index} with data file, entry={entry:#x}\n")
        }
        Finding::CompressedWithBitmap { index, entry } => format!(
            "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry={entry:#x}\n"
        ),
        Finding::BadAllocBitmap { offset } => format!(
            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap\n"
        ),
        Finding::UnallocatedWithBitmap => {
            "ERROR: Unallocated cluster has non-zero subcluster allocation map\n".to_owned()
        }
        Finding::PreallocUnaligned { offset, fixed } => format!(
            "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.\n",
            if fixed { "Repairing" } else { "ERROR" }
        ),
        Finding::DataUnaligned { offset } => format!(
            "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.\n"
        ),
        Finding::RefTableReserved { index } => {
            format!("ERROR refcount table entry {index} has reserved bits set\n")
        }
        Finding::RefBlockUnaligned { index } => format!(
            "ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted\n"
        ),
        Finding::RefBlockOutside { index, fixed } => format!(
            "{} refcount block {index} is outside image\n",
            if fixed { "Repairing" } else { "ERROR" }
        ),
        Finding::RefBlockShared { index, refcount } => {
            format!("ERROR refcount block {index} refcount={refcount}\n")
        }
        Finding::BeyondEnd { offset, len } => format!(
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {len:#x}\n"
        ),
    }
}

fn qprint(quiet: bool, s: &str) {
    if !quiet {
        print!("{s}");
    }
}

fn human(c: &CheckReport) -> String {
    let mut s = String::new();
    if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if c.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                c.corruptions
            ));
        }
        if c.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                c.leaks
            ));
        }
        if c.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                c.check_errors
            ));
        }
    }
    if c.total_clusters != 0 && c.allocated_clusters != 0 {
        let a = c.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            c.allocated_clusters,
            c.total_clusters,
            a * 100.0 / c.total_clusters as f64,
            c.fragmented_clusters as f64 * 100.0 / a,
            c.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if c.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", c.image_end_offset));
    }
    s
}

/// QAPI `ImageCheck`; optional counters appear only when non-zero.
fn to_json(c: &CheckReport, filename: &str) -> QValue {
    let mut v = vec![
        ("filename".to_owned(), QValue::str(filename)),
        ("format".to_owned(), QValue::str("qcow2")),
        (
            "check-errors".to_owned(),
            QValue::Int(c.check_errors as i64),
        ),
    ];
    for (k, n) in [
        ("image-end-offset", c.image_end_offset),
        ("corruptions", c.corruptions),
        ("leaks", c.leaks),
        ("corruptions-fixed", c.corruptions_fixed),
        ("leaks-fixed", c.leaks_fixed),
        ("total-clusters", c.total_clusters),
        ("allocated-clusters", c.allocated_clusters),
        ("fragmented-clusters", c.fragmented_clusters),
        ("compressed-clusters", c.compressed_clusters),
    ] {
        if n != 0 {
            v.push((k.to_owned(), QValue::Int(n as i64)));
        }
    }
    QValue::Dict(v)
}
