#!/usr/bin/env python3
"""Runs `strata-img convert -c -O qcow2` and `qemu-img convert -c -O qcow2`
on the same semi-compressible raw image, alternating, and prints the
median wall time of each and the median per-round ratio (qemu / strata,
> 1 means Strata is faster), per compression type and CPU count.

The source is a 1 GiB raw image (by default) in which every 64 KiB
cluster holds a different mix of random bytes and repeated text, so
deflate and zstd shrink it to roughly half and each cluster costs real
compression work; a few clusters are all zeros, as in real disks.

"CPUs 1" pins both tools to one CPU with `taskset` (one compression
worker's worth of CPU); "CPUs 2" lets both use two. Each output is checked
with `qemu-img compare` against the source and with `qemu-img check`.

Usage: benches/convert-vs-qemu.py [--rounds 3] [--size 1073741824]
                                  [--strata target/release/strata-img] [--only zstd]
"""
import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

CLUSTER = 64 * 1024
TEXT = (b"Strata block layer: qcow2 clusters, refcounts, L2 tables and "
        b"snapshots over io_uring. ") * 1024


def ensure_source(path, size):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"writing {path}...", flush=True)
    rng = random.Random(20261126)
    with open(path + ".tmp", "wb") as f:
        for i in range(size // CLUSTER):
            if i % 61 == 0:
                f.write(bytes(CLUSTER))
                continue
            # Between a quarter and three quarters random, the rest text.
            n = rng.randrange(CLUSTER // 4, CLUSTER * 3 // 4)
            start = rng.randrange(0, 1024)
            f.write(rng.randbytes(n) + TEXT[start:start + CLUSTER - n])
    os.rename(path + ".tmp", path)


def timed(argv):
    t = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def verify(src, out):
    c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, out],
                       capture_output=True, text=True)
    k = subprocess.run(["qemu-img", "check", out], capture_output=True, text=True)
    if c.returncode != 0 or k.returncode != 0:
        sys.exit(f"{out}: compare: {c.stdout.strip()} check: {k.stdout.strip()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--dir", default="/var/tmp/strata-bench")
    target = os.environ.get("CARGO_TARGET_DIR",
                            os.path.join(os.path.dirname(__file__), "..", "target"))
    ap.add_argument("--strata", default=os.path.join(target, "release", "strata-img"))
    ap.add_argument("--qemu-img", default=shutil.which("qemu-img") or "qemu-img")
    ap.add_argument("--only", default="", help="zlib or zstd")
    a = ap.parse_args()
    if not os.path.exists(a.strata):
        sys.exit(f"{a.strata} not found: cargo build --release --bin strata-img")
    src = os.path.join(a.dir, f"convert-src-{a.size}.raw")
    ensure_source(src, a.size)
    out = os.path.join(a.dir, "convert-out.qcow2")
    rows = []
    for ctype in ("zlib", "zstd"):
        if a.only not in ctype:
            continue
        for cpus in ("0", "0,1"):
            pin = ["taskset", "-c", cpus]
            args = ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                    f"compression_type={ctype}", src, out]
            qt, st, ratios = [], [], []
            for r in range(a.rounds):
                # Alternate which tool goes first: the page cache and the
                # disk's state favour neither.
                order = (("qemu", a.qemu_img), ("strata", a.strata))
                if r % 2:
                    order = order[::-1]
                got = {}
                for tool, binary in order:
                    if os.path.exists(out):
                        os.unlink(out)
                    got[tool] = timed(pin + [binary] + args)
                    verify(src, out)
                qt.append(got["qemu"])
                st.append(got["strata"])
                ratios.append(got["qemu"] / got["strata"])
            n = len(cpus.split(","))
            row = (ctype, n, statistics.median(qt), statistics.median(st),
                   statistics.median(ratios))
            rows.append(row)
            print(f"  {ctype} CPUs {n}: ratio {row[4]:.2f}", flush=True)
    if os.path.exists(out):
        os.unlink(out)
    print()
    print(f"{'compression':12} {'CPUs':>4} {'qemu-img s':>11} {'strata-img s':>13} {'ratio':>6}")
    for ctype, n, q, s, r in rows:
        print(f"{ctype:12} {n:4} {q:11.2f} {s:13.2f} {r:6.2f}")


if __name__ == "__main__":
    main()
