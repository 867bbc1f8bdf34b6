#!/usr/bin/env python3
"""Time to first read after opening a qcow2 image: QEMU (`qemu-io -r -c
'read 0 4k'`) against Strata (`strata-img bench -c 1 -s 4k`, one 4 KiB
read at offset 0), each a fresh process, both read-only.

Images (made with QEMU's tools once, then reused):
  small   1 GiB, 64 KiB written at 0: the fixed cost of starting a process
  sparse  1 TiB, 64 KiB written at 0 and at the last cluster
  snap    1 GiB, 64 KiB written at 0, 10,000 internal snapshots, made in
          written directly (see make_snapshots), then checked with
          `qemu-img check`, `qemu-img snapshot -l` and `qemu-io`

Rounds alternate qemu, strata, qemu, ...; the page cache is warm for both.
Prints the median wall time of each and the median per-round ratio
(qemu / strata, > 1 means Strata is faster; the requirement is >= 1).

Usage: benches/open-vs-qemu.py [--rounds 11] [--snapshots 10000]
                               [--dir /var/tmp/strata-bench/open]
                               [--strata-img target/release/strata-img]
"""
import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time


def need(tool):
    path = shutil.which(tool)
    if not path:
        sys.exit(f"{tool} not found (QEMU 10's tools are the oracle for this benchmark)")
    return path


def run(argv, **kw):
    return subprocess.run(argv, check=True, timeout=600, **kw)


def make_sparse(path):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path + ".tmp", "1T"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k",
         "-c", f"write -P 0x22 {(1 << 40) - (64 << 10)} 64k", path + ".tmp"],
        stdout=subprocess.DEVNULL)
    os.rename(path + ".tmp", path)


def make_small(path):
    run(["qemu-img", "create", "-q", "-f", "qcow2", path + ".tmp", "1G"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", path + ".tmp"],
        stdout=subprocess.DEVNULL)
    os.rename(path + ".tmp", path)


CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS


def snapshot_image(count, size=1 << 30):
    """The bytes (as (offset, data) pieces of a sparse file) of a qcow2 v3
    image of `size` bytes with 64 KiB written at guest offset 0 and `count`
    internal snapshots of that state, laid out as docs/interop/qcow2.rst
    describes. Every snapshot has its own L1 table; they all share the one
    L2 table and data cluster, whose refcounts are therefore 1 + count
    (QEMU counts a reference per snapshot tree), and the active tables
    carry no COPIED flag."""
    l2_entries = CLUSTER // 8
    l1_size = -(-size // (l2_entries * CLUSTER))
    # Cluster map: header, refcount table, refcount block, active L1, L2,
    # data, one L1 per snapshot, then the snapshot table.
    reftable, refblock, l1, l2, data = 1, 2, 3, 4, 5
    snap_l1 = 6
    entries = []
    for i in range(count):
        sid, name = str(i + 1).encode(), f"snap{i}".encode()
        extra = struct.pack(">QQq", 0, size, -1)
        e = struct.pack(">QIHHIIQII", (snap_l1 + i) * CLUSTER, l1_size, len(sid), len(name),
                        1_700_000_000 + i, 0, 0, 0, len(extra)) + extra + sid + name
        entries.append(e + b"\0" * (-len(e) % 8))
    table = b"".join(entries)
    table_at = snap_l1 + count
    end = table_at + -(-len(table) // CLUSTER)
    # One refcount block of 16-bit entries covers 32768 clusters.
    if end > CLUSTER // 2:
        raise ValueError("too many snapshots for one refcount block")
    refs = [1] * end
    refs[l2] = refs[data] = 1 + count
    pieces = []
    hdr = struct.pack(">IIQIIQIIQQIIQQQQII", 0x514649FB, 3, 0, 0, CLUSTER_BITS, size, 0,
                      l1_size, l1 * CLUSTER, reftable * CLUSTER, 1, count,
                      table_at * CLUSTER if count else 0, 0, 0, 0, 4, 104)
    pieces.append((0, hdr + struct.pack(">II", 0, 0)))
    pieces.append((reftable * CLUSTER, struct.pack(">Q", refblock * CLUSTER)))
    pieces.append((refblock * CLUSTER, struct.pack(f">{end}H", *refs)))
    l1_entries = struct.pack(">Q", l2 * CLUSTER) + b"\0" * 8 * (l1_size - 1)
    pieces.append((l1 * CLUSTER, l1_entries))
    pieces.append((l2 * CLUSTER, struct.pack(">Q", data * CLUSTER)))
    pieces.append((data * CLUSTER, b"\x11" * CLUSTER))
    for i in range(count):
        pieces.append(((snap_l1 + i) * CLUSTER, l1_entries))
    pieces.append((table_at * CLUSTER, table))
    return pieces, end * CLUSTER


def make_snapshots(path, count):
    # One qemu process per snapshot takes ages, and even one daemon taking
    # snapshots over QMP slows down quadratically (about 90 s for the first
    # 1,000), so the image is written directly and QEMU checks it.
    pieces, length = snapshot_image(count)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for off, b in pieces:
            f.seek(off)
            f.write(b)
        f.truncate(length)
    listed = run(["qemu-img", "snapshot", "-l", tmp], stdout=subprocess.PIPE).stdout
    n = len(listed.splitlines()) - 2 if count else 0
    if n != count:
        sys.exit(f"qemu-img snapshot -l lists {n} snapshots, expected {count}")
    run(["qemu-img", "check", "-q", tmp])
    run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x11 0 64k", "-c", "read -P 0 64k 64k", tmp],
        stdout=subprocess.DEVNULL)
    os.rename(tmp, path)


def timed(argv):
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed: {r.stderr.decode()}")
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--snapshots", type=int, default=10000)
    ap.add_argument("--dir", default="/var/tmp/strata-bench/open")
    target = os.environ.get("CARGO_TARGET_DIR",
                            os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target"))
    ap.add_argument("--strata-img", default=os.path.join(target, "release", "strata-img"))
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        need(tool)
    if not os.path.exists(a.strata_img):
        sys.exit(f"{a.strata_img} not found: cargo build --release --bin strata-img")
    os.makedirs(a.dir, exist_ok=True)

    images = [
        ("small 1G", os.path.join(a.dir, "small.qcow2"), make_small),
        ("sparse 1T", os.path.join(a.dir, "sparse-1t.qcow2"), make_sparse),
        (f"{a.snapshots} snapshots", os.path.join(a.dir, f"snap-{a.snapshots}.qcow2"),
         lambda p: make_snapshots(p, a.snapshots)),
    ]
    rows = []
    for name, path, make in images:
        if a.only not in name:
            continue
        if not os.path.exists(path):
            print(f"creating {path}...", flush=True)
            make(path)
        qemu = ["qemu-io", "-f", "qcow2", "-r", "-c", "read 0 4k", path]
        strata = [a.strata_img, "bench", "-f", "qcow2", "-c", "1", "-s", "4k", path]
        # One untimed run each: page cache and binaries warm.
        timed(qemu)
        timed(strata)
        q, s, ratios = [], [], []
        for _ in range(a.rounds):
            tq = timed(qemu)
            ts = timed(strata)
            q.append(tq)
            s.append(ts)
            ratios.append(tq / ts)
        row = (name, statistics.median(q) * 1e3, statistics.median(s) * 1e3,
               statistics.median(ratios))
        rows.append(row)
        print(f"  {name}: ratio {row[3]:.2f}", flush=True)
    print()
    print(f"{'image':18} {'qemu-io ms':>11} {'strata ms':>10} {'ratio':>6}")
    for name, q, s, r in rows:
        print(f"{name:18} {q:11.1f} {s:10.1f} {r:6.2f}")


if __name__ == "__main__":
    main()
