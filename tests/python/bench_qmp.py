"""Side-by-side QMP measurements of stratad and qemu-storage-daemon:
round-trip medians (query-version; query-named-block-nodes with 100
nodes), start-up time to the greeting, and idle RSS with 100 nodes.

    python3 tests/python/bench_qmp.py [--calls 1000] [--format raw|qcow2]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import qsd_path, stratad_path  # noqa: E402
from qmpraw import Qmp  # noqa: E402


def make_images(d, n, fmt):
    paths = []
    for i in range(n):
        p = os.path.join(d, f"img{i}.{fmt}")
        if fmt == "qcow2":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p, "64M"], check=True)
        else:
            with open(p, "wb") as f:
                f.truncate(64 << 20)
        paths.append(p)
    return paths


def blockdev_args(paths, fmt):
    args = []
    for i, p in enumerate(paths):
        args += ["--blockdev", f"driver={fmt},node-name=d{i},file.driver=file,file.filename={p}"]
    return args


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def startup_ms(binary, paths, fmt, runs=5):
    """Median time from exec to the QMP greeting, nodes opened first."""
    times = []
    for _ in range(runs):
        d = tempfile.mkdtemp(prefix="bench-")
        sock = os.path.join(d, "qmp.sock")
        args = [binary] + blockdev_args(paths, fmt) + [
            "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            try:
                Qmp(sock, negotiate=False).close()
            except OSError:
                proc.kill()
                raise RuntimeError(f"{binary}: {proc.stderr.read(4096).decode(errors='replace')}")
            times.append(time.perf_counter() - t0)
        finally:
            # SIGTERM, not SIGKILL: a killed process's io_uring (with its
            # registered files, and so its image locks) is torn down by the
            # kernel a little after the process is gone, and the next
            # daemon would find the images still locked.
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                time.sleep(0.2)
    return statistics.median(times) * 1e3


def measure(binary, paths, fmt, calls):
    # Before the measured daemon starts: its image locks would stop others.
    st = startup_ms(binary, paths, fmt)
    d = tempfile.mkdtemp(prefix="bench-")
    sock = os.path.join(d, "qmp.sock")
    # Nodes first, so the greeting comes only once all of them are open.
    args = [binary] + blockdev_args(paths, fmt) + [
        "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            q = Qmp(sock, negotiate=False)
        except OSError:
            raise RuntimeError(f"{binary}: {proc.stderr.read(4096).decode(errors='replace')}")
        startup = time.perf_counter() - t0
        q.cmd("qmp_capabilities")
        n = len(q.cmd("query-named-block-nodes")["return"])
        out = {"startup_ms": st, "nodes": n}
        for name in ("query-version", "query-named-block-nodes"):
            lat = []
            for _ in range(calls):
                s = time.perf_counter()
                try:
                    q.cmd(name)
                except EOFError:
                    proc.kill()
                    raise RuntimeError(f"{binary} closed the connection: "
                                       f"{proc.stderr.read(4096).decode(errors='replace')}")
                lat.append(time.perf_counter() - s)
            out[name + "_us"] = statistics.median(lat) * 1e6
        time.sleep(0.5)
        out["rss_kib"] = rss_kib(proc.pid)
        q.close()
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--format", default="raw")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = make_images(d, a.nodes, a.format)
        res = {}
        for name, b in (("qemu-storage-daemon", qsd_path()), ("stratad", stratad_path())):
            res[name] = measure(b, paths, a.format, a.calls)
    keys = ["nodes", "startup_ms", "query-version_us", "query-named-block-nodes_us", "rss_kib"]
    print(f"{'':28}" + "".join(f"{k:>28}" for k in keys))
    for name, r in res.items():
        print(f"{name:28}" + "".join(f"{r[k]:>28.1f}" for k in keys))


if __name__ == "__main__":
    main()
