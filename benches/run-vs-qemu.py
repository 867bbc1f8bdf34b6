#!/usr/bin/env python3
"""Runs `strata-img bench` and `qemu-img bench` side by side and reports ratios.

For every workload both tools get identical arguments; runs alternate
(qemu, strata, strata, qemu, qemu, strata, ...) for N rounds, and the table shows the
median requests/s of each tool, the median of the per-round ratios
(strata / qemu, > 1 means Strata is faster) and the peak RSS of each tool
(per child, from wait4's rusage).

Workloads: 4 KiB and 64 KiB, read and write, depth 1 and 32, `-t none` and
`-t writeback`, on a raw image (1 GiB by default) on a disk-backed file
system, with `-i io_uring`. Then raw O_DIRECT 4 KiB reads at depth 1 and 32
against fio's io_uring engine on the same file, same sequential pattern.

The request count of each workload is calibrated once (a short qemu-img run)
so that a run takes about --target seconds; both tools then use that count.

Usage: benches/run-vs-qemu.py [--rounds 5] [--image /var/tmp/strata-bench/bench.img]
                              [--strata target/release/strata-img] [--only SUBSTR]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

RUN_RE = re.compile(rb"Run completed in ([0-9.]+) seconds\.")


def fs_type(path):
    """File system type of the mount holding `path` (longest mount prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt, typ = parts[1], parts[2]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, typ
    return kind


def ensure_image(path, size):
    """Creates `path` filled with random data (so reads hit allocated blocks)."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"creating {path} ({size >> 20} MiB of random data)...", flush=True)
    chunk = 1 << 20
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        f.flush()
        os.fsync(f.fileno())


def run_measured(argv):
    """Runs argv and returns (seconds reported by bench, peak RSS in KiB).

    The peak RSS comes from /usr/bin/time (%M): its child is forked from a
    small C process, so the figure is the tool's own, not inherited from a
    forked Python interpreter before exec. Without /usr/bin/time it falls
    back to wait4's rusage (which over-reports by up to Python's own RSS)."""
    timer = "/usr/bin/time"
    if os.access(timer, os.X_OK):
        fd, tmp = tempfile.mkstemp(prefix="strata-rss-")
        os.close(fd)
        try:
            p = subprocess.run([timer, "-f", "%M", "-o", tmp] + argv,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            with open(tmp) as f:
                lines = [l for l in f.read().split("\n") if l.strip()]
        finally:
            os.unlink(tmp)
        code, out = p.returncode, p.stdout
        if lines and lines[0].startswith("Command terminated by signal"):
            code = -int(lines[0].split()[-1])
        rss = int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0
    else:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.dup2(w, 1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        os.close(w)
        out = b""
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            out += b
        os.close(r)
        _, status, ru = os.wait4(pid, 0)
        code, rss = os.waitstatus_to_exitcode(status), ru.ru_maxrss
    m = RUN_RE.search(out)
    if code != 0 or not m:
        raise RuntimeError(f"{' '.join(argv)} failed (status {code}): {out.decode(errors='replace')}")
    return float(m.group(1)), rss


CRASHES = {}


def run_retrying(argv, tries=8):
    """run_measured, retrying when the tool dies of a signal: qemu-img bench
    recurses in bench_cb when completions are synchronous (page-cache reads
    with io_uring) and sometimes overflows its stack on long runs."""
    for i in range(tries):
        try:
            return run_measured(argv)
        except RuntimeError as e:
            if "status -" not in str(e) or i == tries - 1:
                raise
            CRASHES[argv[0]] = CRASHES.get(argv[0], 0) + 1
    raise AssertionError("unreachable")


def drop_caches_of(path):
    """Evicts one file from the page cache (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except OSError:
        pass


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def calibrate(qemu, args, image, target):
    """A request count for which qemu-img takes about `target` seconds."""
    n = 2000
    while True:
        secs, _ = run_retrying([qemu, "bench", "-c", str(n)] + args + [image])
        if secs >= 0.05 or n >= 10_000_000:
            break
        n *= 8
    per = max(secs, 1e-4) / n
    return max(1000, min(5_000_000, int(target / per)))


FIO_BATCHED = ["--iodepth_batch_submit=32", "--iodepth_batch_complete_min=1",
               "--iodepth_batch_complete_max=32"]


def fio_iops(image, bs, depth, count, extra=()):
    argv = [
        "fio", "--name=strata-vs-fio", f"--filename={image}", "--direct=1",
        "--ioengine=io_uring", "--rw=read", f"--bs={bs}", f"--iodepth={depth}",
        f"--number_ios={count}", "--size=100%", "--output-format=json",
    ] + list(extra)
    out = subprocess.run(argv, check=True, capture_output=True).stdout
    job = json.loads(out)["jobs"][0]["read"]
    return job["iops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", default="/var/tmp/strata-bench/bench.img")
    ap.add_argument("--size", type=int, default=1 << 30)
    here = os.path.dirname(os.path.abspath(__file__))
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(here, "..", "target"))
    ap.add_argument("--strata", default=os.path.join(target_dir, "release", "strata-img"))
    ap.add_argument("--qemu-img", default=shutil.which("qemu-img") or "qemu-img")
    ap.add_argument("--target", type=float, default=1.0, help="seconds per run (calibrated)")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--qcow2", action="store_true",
                    help="run the qcow2 workloads instead (see qcow2_main)")
    a = ap.parse_args()

    if not os.path.exists(a.strata):
        sys.exit(f"{a.strata} not found: build with `cargo build --release -p qmp-front`")
    kind = fs_type(os.path.dirname(os.path.abspath(a.image)))
    if kind in ("tmpfs", "ramfs"):
        sys.exit(f"{a.image} is on {kind}; O_DIRECT numbers need a disk-backed file system")
    ensure_image(a.image, a.size)
    if a.qcow2:
        return qcow2_main(a)
    print(f"image {a.image} on {kind}, {a.rounds} rounds, strata={a.strata}, qemu-img={a.qemu_img}")

    workloads = []
    for cache in ("none", "writeback"):
        for rw in ("read", "write"):
            for bs in ("4k", "64k"):
                for depth in (1, 32):
                    name = f"{rw:5} {bs:>3} d{depth:<2} -t {cache}"
                    args = ["-f", "raw", "-i", "io_uring", "-t", cache, "-s", bs, "-d", str(depth)]
                    if rw == "write":
                        args.append("-w")
                    workloads.append((name, cache, args))
    workloads = [w for w in workloads if a.only in w[0]]

    rows = []
    for name, cache, args in workloads:
        if cache == "writeback":
            warm(a.image)
        count = calibrate(a.qemu_img, args, a.image, a.target)
        q_rps, s_rps, ratios, q_rss, s_rss = [], [], [], 0, 0
        for r in range(a.rounds):
            full = ["bench", "-c", str(count)] + args + [a.image]
            # Who goes first alternates, so that neither always inherits
            # the other's device and page-cache state.
            if r % 2 == 0:
                qt, qr = run_retrying([a.qemu_img] + full)
                st, sr = run_retrying([a.strata] + full)
            else:
                st, sr = run_retrying([a.strata] + full)
                qt, qr = run_retrying([a.qemu_img] + full)
            q_rps.append(count / qt)
            s_rps.append(count / st)
            ratios.append((count / st) / (count / qt))
            q_rss, s_rss = max(q_rss, qr), max(s_rss, sr)
        row = (name, count, statistics.median(q_rps), statistics.median(s_rps),
               statistics.median(ratios), q_rss, s_rss)
        rows.append(row)
        print(f"  {name}: count {count}, ratio {row[4]:.2f}", flush=True)

    print()
    print(f"{'workload':26} {'count':>8} {'qemu req/s':>11} {'strata req/s':>13} {'ratio':>6} "
          f"{'qemu RSS':>9} {'strata RSS':>10}")
    for name, count, q, s, r, qr, sr in rows:
        print(f"{name:26} {count:8} {q:11.0f} {s:13.0f} {r:6.2f} {qr/1024:7.1f}Mi {sr/1024:8.1f}Mi")

    for tool, n in CRASHES.items():
        print(f"note: {tool} died of a signal {n} time(s); those runs were repeated")

    if a.no_fio:
        return
    if shutil.which("fio") is None:
        print("\nfio not installed: skipping the fio comparison (apt-get install -y fio)")
        return
    print("\nraw O_DIRECT 4 KiB sequential reads, io_uring: strata-img bench vs fio")
    print("(fio default = one submission per I/O; fio batched = " + " ".join(FIO_BATCHED) + ")")
    print(f"{'depth':>5} {'count':>8} {'fio IOPS':>10} {'fio batched':>12} {'strata req/s':>13} "
          f"{'vs fio':>7} {'vs batched':>11}")
    for depth in (1, 32):
        args = ["-f", "raw", "-i", "io_uring", "-t", "none", "-s", "4k", "-d", str(depth)]
        count = calibrate(a.qemu_img, args, a.image, a.target)
        f_rps, fb_rps, s_rps, ratios, bratios = [], [], [], [], []
        for _ in range(a.rounds):
            f = fio_iops(a.image, "4k", depth, count)
            fb = fio_iops(a.image, "4k", depth, count, FIO_BATCHED)
            st, _ = run_retrying([a.strata, "bench", "-c", str(count)] + args + [a.image])
            f_rps.append(f)
            fb_rps.append(fb)
            s_rps.append(count / st)
            ratios.append((count / st) / f)
            bratios.append((count / st) / fb)
        print(f"{depth:5} {count:8} {statistics.median(f_rps):10.0f} {statistics.median(fb_rps):12.0f} "
              f"{statistics.median(s_rps):13.0f} {statistics.median(ratios):7.2f} "
              f"{statistics.median(bratios):11.2f}")


def qcow2_main(a):
    """qcow2 workloads, each against QEMU and against Strata on raw.

    Allocated: a 1 GiB qcow2 (64 KiB clusters) converted from the random raw
    image, 4 KiB reads and writes with -S 1 MiB (every request in another
    L2 slice), depth 1 and 32, -t none. Allocating: a fresh empty qcow2
    made anew before every run, 4 KiB and 64 KiB writes, sequential and
    spread, depth 1 and 32, each compared with qemu-img and with Strata
    writing the same pattern into a fresh sparse raw file."""
    d = os.path.dirname(os.path.abspath(a.image))
    full = os.path.join(d, "bench-full.qcow2")
    if not os.path.exists(full) or os.path.getsize(full) < a.size:
        # Written in full with a non-zero pattern: the write workloads leave
        # zeros in the raw image, and converting zeros would give a sparse
        # qcow2 whose reads never reach the disk.
        print(f"writing {full}...", flush=True)
        subprocess.run([a.qemu_img, "create", "-q", "-f", "qcow2", full, str(a.size)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {a.size}", full],
                       check=True, stdout=subprocess.DEVNULL)
    fresh = os.path.join(d, "bench-fresh.qcow2")
    sparse = os.path.join(d, "bench-sparse.raw")

    def new_qcow2():
        subprocess.run([a.qemu_img, "create", "-q", "-f", "qcow2", fresh, str(a.size)], check=True)

    def new_raw():
        with open(sparse, "wb") as f:
            f.truncate(a.size)

    rows = []

    def measure(name, args, count, image, raw_image=None, prep=None, raw_prep=None):
        if a.only not in name:
            return
        q_rps, s_rps, r_rps, ratios, rratios = [], [], [], [], []
        for _ in range(a.rounds):
            full_args = ["bench", "-c", str(count)] + args
            if prep:
                prep()
            qt, _ = run_retrying([a.qemu_img] + full_args + ["-f", "qcow2", image])
            if prep:
                prep()
            st, _ = run_retrying([a.strata] + full_args + ["-f", "qcow2", image])
            q_rps.append(count / qt)
            s_rps.append(count / st)
            ratios.append(qt / st)
            if raw_image:
                if raw_prep:
                    raw_prep()
                rt, _ = run_retrying([a.strata] + full_args + ["-f", "raw", raw_image])
                r_rps.append(count / rt)
                rratios.append(rt / st)
        row = (name, count, statistics.median(q_rps), statistics.median(s_rps),
               statistics.median(ratios), statistics.median(r_rps) if r_rps else 0,
               statistics.median(rratios) if rratios else 0)
        rows.append(row)
        print(f"  {name}: vs qemu {row[4]:.2f}, vs strata raw {row[6]:.2f}", flush=True)

    clusters = a.size // 65536
    for rw in ("read", "write"):
        for depth in (1, 32):
            args = ["-i", "io_uring", "-t", "none", "-s", "4k", "-S", "1M", "-d", str(depth)]
            if rw == "write":
                args.append("-w")
            measure(f"allocated {rw} 4k S1M d{depth}", args, 20000 if depth == 1 else 100000,
                    full, a.image)
    for bs, step, label, count in (("64k", "64k", "seq", clusters), ("4k", "4k", "seq", clusters * 4),
                                   ("4k", "64k", "spread", clusters), ("64k", "128k", "spread", clusters // 2)):
        for depth in (1, 32):
            args = ["-w", "-i", "io_uring", "-t", "none", "-s", bs, "-S", step, "-d", str(depth)]
            measure(f"fresh {bs} {label} d{depth}", args, count, fresh, sparse, new_qcow2, new_raw)

    print()
    print(f"{'workload':28} {'count':>7} {'qemu req/s':>11} {'strata req/s':>13} {'vs qemu':>8} "
          f"{'raw req/s':>10} {'vs raw':>7}")
    for name, count, q, s, r, raw, rr in rows:
        print(f"{name:28} {count:7} {q:11.0f} {s:13.0f} {r:8.2f} {raw:10.0f} {rr:7.2f}")


if __name__ == "__main__":
    main()
