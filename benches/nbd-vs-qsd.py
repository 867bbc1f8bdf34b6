#!/usr/bin/env python3
"""Serves one qcow2 image over NBD from `stratad` and from
`qemu-storage-daemon` in turn, drives both with the same client (fio's nbd
engine, over a unix socket) and prints the median IOPS of each, the median
per-round ratio (strata / qsd, > 1 means Strata is faster) and the mean
latency at depth 1.

Workloads: 4 KiB random reads and writes at depth 1 and 32, 1 MiB
sequential reads at depth 4. The image is a fully written 1 GiB qcow2
(64 KiB clusters) on a disk-backed file system, opened with
cache.direct=on by both daemons (--cache writeback: cache.direct=off,
both daemons' default, so reads come from the page cache once warm);
rounds alternate qsd, strata, qsd, ...

For the read workloads each round also reads the image file itself with
fio (io_uring, O_DIRECT, same pattern): the "disk" column is what the
device gives at the client's queue depth, the ceiling for both daemons
when neither reads ahead. With --image on a tmpfs the device drops out and
the ratio measures the servers' own CPU cost.

Usage: benches/nbd-vs-qsd.py [--rounds 5] [--runtime 5] [--cache direct|writeback]
                             [--stratad target/release/stratad]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

WORKLOADS = [
    ("randread 4k d1", ["--rw=randread", "--bs=4k", "--iodepth=1"]),
    ("randread 4k d32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("randwrite 4k d1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("randwrite 4k d32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("read 1M d4", ["--rw=read", "--bs=1M", "--iodepth=4"]),
]


def ensure_image(path, size):
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"writing {path}...", flush=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", path],
                   check=True, stdout=subprocess.DEVNULL)


def start(binary, image, sock, cache):
    if os.path.exists(sock):
        os.unlink(sock)
    direct = "on" if cache == "direct" else "off"
    argv = [binary,
            "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct={direct},aio=io_uring",
            "--blockdev", f"driver=qcow2,node-name=q0,file=f0,cache.direct={direct}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=q0,name=disk,writable=on"]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{binary} exited: {p.stderr.read().decode()}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            return p
        except OSError:
            time.sleep(0.02)
    p.kill()
    raise RuntimeError(f"{binary} did not listen on {sock}")


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def fio(sock, args, runtime):
    argv = ["fio", "--name=nbd", "--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={sock}",
            "--time_based", f"--runtime={runtime}", "--output-format=json",
            "--randrepeat=1", "--norandommap"] + args
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         timeout=runtime * 4 + 60).stdout
    # fio's nbd engine prints a line of its own before the JSON.
    out = out[out.index(b"{"):]
    job = json.loads(out)["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    return side["iops"], side["clat_ns"]["mean"] / 1000.0


def fio_disk(image, args, runtime):
    """The same workload straight on the image file: the device's ceiling."""
    argv = ["fio", "--name=disk", "--ioengine=io_uring", "--direct=1", "--readonly",
            f"--filename={image}", "--time_based", f"--runtime={runtime}",
            "--output-format=json", "--randrepeat=1", "--norandommap"] + args
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         timeout=runtime * 4 + 60).stdout
    return json.loads(out)["jobs"][0]["read"]["iops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--image", default="/var/tmp/strata-bench/nbd-bench.qcow2")
    ap.add_argument("--size", type=int, default=1 << 30)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(__file__), "..", "target"))
    ap.add_argument("--stratad", default=os.path.join(target, "release", "stratad"))
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon") or "qemu-storage-daemon")
    ap.add_argument("--only", default="")
    ap.add_argument("--cache", choices=("direct", "writeback"), default="direct")
    a = ap.parse_args()
    if not os.path.exists(a.stratad):
        sys.exit(f"{a.stratad} not found: cargo build --release --bin stratad")
    ensure_image(a.image, a.size)
    if a.cache == "writeback":
        # Warm the page cache so both daemons start from the same state.
        with open(a.image, "rb") as f:
            while f.read(1 << 24):
                pass
    sock = os.path.join(os.path.dirname(a.image), "nbd-bench.sock")
    rows = []
    for name, args in WORKLOADS:
        if a.only not in name:
            continue
        q_iops, s_iops, ratios, q_lat, s_lat, d_iops = [], [], [], [], [], []
        reads = "--rw=randread" in args or "--rw=read" in args
        for _ in range(a.rounds):
            if reads:
                d_iops.append(fio_disk(a.image, args, a.runtime))
            res = {}
            for tool, binary in (("qsd", a.qsd), ("strata", a.stratad)):
                p = start(binary, a.image, sock, a.cache)
                try:
                    res[tool] = fio(sock, args, a.runtime)
                finally:
                    stop(p)
            q_iops.append(res["qsd"][0])
            s_iops.append(res["strata"][0])
            q_lat.append(res["qsd"][1])
            s_lat.append(res["strata"][1])
            ratios.append(res["strata"][0] / res["qsd"][0])
        row = (name, statistics.median(q_iops), statistics.median(s_iops), statistics.median(ratios),
               statistics.median(q_lat), statistics.median(s_lat),
               statistics.median(d_iops) if d_iops else None)
        rows.append(row)
        print(f"  {name}: ratio {row[3]:.2f}", flush=True)
    print()
    print(f"{'workload':18} {'qsd IOPS':>10} {'strata IOPS':>12} {'ratio':>6} {'qsd lat us':>11} "
          f"{'strata lat us':>14} {'disk IOPS':>10}")
    for name, q, s, r, ql, sl, d in rows:
        disk = f"{d:10.0f}" if d is not None else f"{'-':>10}"
        print(f"{name:18} {q:10.0f} {s:12.0f} {r:6.2f} {ql:11.1f} {sl:14.1f} {disk}")


if __name__ == "__main__":
    main()
