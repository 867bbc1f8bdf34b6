"""Differential tests: the same QMP conversation against
qemu-storage-daemon and stratad; answers must match modulo timestamps,
generated node names and error texts. Also compares the argument schemas
of every command both implement."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import normalise, qsd_path, stratad_path  # noqa: E402
from qmpraw import Daemon  # noqa: E402


def conversation(binary, workdir):
    """Runs one fixed conversation; returns the list of replies/events."""
    img = os.path.join(workdir, "img.raw")
    img2 = os.path.join(workdir, "img2.raw")
    for path in (img, img2):
        with open(path, "wb") as f:
            f.truncate(1 << 20)
    d = Daemon(binary, ["--blockdev", "null-co,node-name=n0,size=1048576"])
    out = []
    try:
        q = d.connect()
        steps = [
            ("query-version", {}),
            ("query-block", {}),
            ("blockdev-add", {"driver": "raw", "node-name": "r0",
                              "file": {"driver": "file", "filename": img}}),
            ("blockdev-add", {"driver": "raw", "node-name": "r0",
                              "file": {"driver": "file", "filename": img}}),
            ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "nope"}),
            ("blockdev-add", {"driver": "null-co"}),
            ("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                              "discard": "unmap", "detect-zeroes": "unmap",
                              "cache": {"no-flush": True},
                              "file": {"driver": "file", "filename": img,
                                       "node-name": "ro-file", "locking": "off"}}),
            ("blockdev-add", {"driver": "raw", "node-name": "dz", "detect-zeroes": "unmap",
                              "file": "ro-file"}),
            ("blockdev-add", {"driver": "null-co", "node-name": "fs", "force-share": True}),
            ("blockdev-add", {"driver": "null-co", "node-name": "0bad"}),
            ("blockdev-add", {"driver": "null-co", "node-name": "a" * 40}),
            ("blockdev-add", {"driver": "file", "node-name": "nf", "filename": img + ".nope"}),
            ("blockdev-add", {"driver": "raw", "node-name": "rr", "file": "ro-file",
                              "offset": 4096, "size": 8192}),
            ("query-named-block-nodes", {"flat": True}),
            ("blockdev-del", {"node-name": "ro-file"}),
            ("blockdev-del", {"node-name": "rr"}),
            ("blockdev-del", {"node-name": "ro"}),
            ("query-named-block-nodes", {}),
            ("query-named-block-nodes", {"flat": True}),
            ("query-blockstats", {}),
            ("query-blockstats", {"query-nodes": True}),
            ("x-debug-query-block-graph", {}),
            ("block-set-write-threshold", {"node-name": "r0", "write-threshold": 65536}),
            ("block-set-write-threshold", {"node-name": "zz", "write-threshold": 1}),
            ("block_resize", {"node-name": "zz", "size": 1}),
            ("block_resize", {"node-name": "r0", "size": 2 << 20}),
            ("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "n0",
                                              "size": 1048576, "detect-zeroes": "on"}]}),
            ("blockdev-reopen", {"options": [{"driver": "null-co"}]}),
            # An inline child given again as it was is the same child.
            ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0",
                                              "read-only": True,
                                              "file": {"driver": "file", "filename": img}}]}),
            ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0",
                                              "file": {"driver": "file", "filename": img}}]}),
            # A child given by reference keeps its own flag: the parent
            # becomes writable only once the child is.
            ("blockdev-add", {"driver": "file", "node-name": "rf", "read-only": True,
                              "filename": img2}),
            ("blockdev-add", {"driver": "raw", "node-name": "rq", "read-only": True,
                              "file": "rf"}),
            ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "rq", "file": "rf"}]}),
            ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "rf",
                                              "filename": img2}]}),
            ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "rq", "file": "rf"}]}),
            ("blockdev-del", {"node-name": "rq"}),
            ("blockdev-del", {"node-name": "rf"}),
            ("query-named-block-nodes", {"flat": True}),
            ("blockdev-del", {"node-name": "zz"}),
            ("blockdev-del", {"node-name": "r0"}),
            ("query-named-block-nodes", {}),
            ("query-jobs", {}),
            ("job-dismiss", {"id": "zz"}),
            ("blockdev-create", {"job-id": "c1", "options": {
                "driver": "file", "filename": os.path.join(workdir, "c1.raw"), "size": 65536}}),
        ]
        for name, args in steps:
            out.append([name, q.cmd(name, **{k.replace("-", "_"): v for k, v in args.items()})])
        for st in ("created", "running", "waiting", "pending", "concluded"):
            out.append(["event", q.wait_event("JOB_STATUS_CHANGE")])
        out.append(["query-jobs", q.cmd("query-jobs")])
        for verb in ("job-cancel", "job-finalize", "job-pause", "job-resume", "job-complete",
                     "block-job-dismiss", "block-job-finalize"):
            out.append([verb, q.cmd(verb, id="c1")])
        for verb in ("block-job-cancel", "block-job-pause", "block-job-complete"):
            out.append([verb, q.cmd(verb, device="c1")])
        out.append(["query-block-jobs", q.cmd("query-block-jobs")])
        out.append(["create-meta", q.cmd("blockdev-create", job_id="c2", options={
            "driver": "file", "filename": os.path.join(workdir, "c2.raw"), "size": 65536,
            "preallocation": "metadata"})])
        for st in ("created", "running", "aborting", "concluded"):
            out.append(["event", q.wait_event("JOB_STATUS_CHANGE")])
        out.append(["query-jobs", q.cmd("query-jobs")])
        out.append(["job-dismiss", q.cmd("job-dismiss", id="c2")])
        out.append(["event", q.wait_event("JOB_STATUS_CHANGE")])
        out.append(["job-dismiss", q.cmd("job-dismiss", id="c1")])
        out.append(["event", q.wait_event("JOB_STATUS_CHANGE")])
        out.append(["bad-json", (q.send_raw("{\"execute\": }\n"), q.reply())[1]])
        out.append(["not-object", (q.send_raw("[1]"), q.reply())[1]])
        out.append(["query-version", q.cmd("query-version")])
        q.close()
    finally:
        d.stop()
    return out


def qemu_io(args):
    """Runs qemu-io; True when it ran and no command failed."""
    try:
        r = subprocess.run(["qemu-io", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    out = r.stdout + r.stderr
    return r.returncode == 0 and "failed" not in out and "verification" not in out


def nbd_conversation(binary, workdir):
    """The NBD server and exports; error texts are kept (they match)."""
    img = os.path.join(workdir, "img.raw")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(workdir, "nbd.sock")
    unix = {"type": "unix", "data": {"path": sock}}
    uri = f"nbd+unix:///exp?socket={sock}"
    d = Daemon(binary)
    out = []
    try:
        q = d.connect()

        def step(_cmd, **args):
            out.append([_cmd, q.cmd_obj({"execute": _cmd, "arguments": args})])

        def event():
            e = q.wait_event("BLOCK_EXPORT_DELETED")
            e.pop("timestamp")
            out.append(["event", e])

        step("nbd-server-stop")
        step("nbd-server-add", device="r0")
        step("nbd-server-remove", name="x")
        step("block-export-add", type="nbd", id="e0", **{"node-name": "r0"})
        step("blockdev-add", driver="raw", **{"node-name": "r0"},
             file={"driver": "file", "filename": img})
        step("blockdev-add", driver="raw", **{"node-name": "ro", "read-only": True},
             file={"driver": "file", "filename": img, "locking": "off"})
        step("block-export-add", type="nbd", id="e0", **{"node-name": "r0"})
        step("nbd-server-start", addr=unix, **{"tls-creds": "x"})
        step("nbd-server-start", addr={"type": "unix", "data": {"path": "/nonexistent/x"}})
        step("nbd-server-start", addr={"type": "fd", "data": {"str": "x"}})
        step("nbd-server-start", addr={"type": "unix", "path": sock})
        step("nbd-server-start", addr=unix, **{"max-connections": 4})
        step("nbd-server-start", addr=unix)
        for extra in ({"node-name": "zz"}, {"node-name": "ro", "writable": True},
                      {"node-name": "r0", "bitmaps": ["b"]},
                      {"node-name": "r0", "iothread": "none"},
                      {"node-name": "r0", "id": "0bad"},
                      {"node-name": "r0", "type": "bogus"}):
            step("block-export-add", **{"type": "nbd", "id": "e0", **extra})
        step("block-export-add", type="nbd", id="e0", name="exp", description="d",
             writable=True, writethrough=True, **{"node-name": "r0", "allocation-depth": True})
        step("block-export-add", type="nbd", id="e0", **{"node-name": "r0"})
        step("block-export-add", type="nbd", id="e1", name="exp", **{"node-name": "r0"})
        step("block-export-add", type="nbd", id="e1", name="n1",
             **{"node-name": "r0", "fixed-iothread": True})
        step("query-block-exports")
        step("blockdev-del", **{"node-name": "r0"})
        step("block_resize", size=2 << 20, **{"node-name": "r0"})
        out.append(["write", qemu_io(["-f", "raw", "-c", "write -P 0xa5 0 64k", uri])])
        out.append(["read", qemu_io(["-f", "raw", "-r", "-c", "read -P 0xa5 0 64k", uri])])
        step("block-export-del", id="e0")
        event()
        step("block-export-del", id="e0", mode="hard")
        step("query-block-exports")
        step("nbd-server-add", device="r0")
        step("nbd-server-add", device="r0")
        step("nbd-server-add", device="ro", name="legro", writable=True)
        step("query-block-exports")
        out.append(["ro-write", qemu_io(["-f", "raw", "-c", "write 0 512",
                                         f"nbd+unix:///legro?socket={sock}"])])
        step("nbd-server-remove", name="r0")
        event()
        step("nbd-server-remove", name="r0")
        step("block-export-add", type="nbd", id="e4", name="n4", **{"node-name": "r0"})
        step("nbd-server-remove", name="n4")
        step("nbd-server-remove", name="e4", mode="hard")
        event()
        step("nbd-server-stop")
        event()
        event()
        step("query-block-exports")
        step("nbd-server-stop")
        q.close()
    finally:
        d.stop()
    return out


class Recorder:
    """Collects a conversation: QMP replies, bitmap listings and client
    output (socket paths and qemu-io's timing lines taken out)."""

    def __init__(self, sock):
        self.sock = sock
        self.q = None
        self.out = []

    def step(self, _cmd, **args):
        self.out.append([_cmd, self.q.cmd_obj({"execute": _cmd, "arguments": args})])

    def bitmaps(self):
        r = self.q.cmd("query-named-block-nodes", flat=True)["return"]
        self.out.append(["bitmaps", sorted([n["node-name"], n.get("dirty-bitmaps")] for n in r
                                           if not n["node-name"].startswith("#"))])

    def client(self, args):
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
        text = "".join(line for line in r.stdout.replace(self.sock, "<sock>").splitlines(True)
                       if " ops; " not in line)
        self.out.append([args[0], r.returncode, text])


def bitmap_conversation(binary, workdir):
    """Dirty bitmaps: the commands, their checks, what writes over NBD
    mark, and the qemu:dirty-bitmap context as qemu-img and nbdinfo read
    it. Error texts are kept (they match)."""
    img = os.path.join(workdir, "img.raw")
    with open(img, "wb") as f:
        f.truncate(2 << 20)
    qimg = os.path.join(workdir, "img.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    qimg, "1M"], check=True)
    sock = os.path.join(workdir, "nbd.sock")
    d = Daemon(binary)
    rec = Recorder(sock)
    out, step, bitmaps, client = rec.out, rec.step, rec.bitmaps, rec.client
    try:
        rec.q = q = d.connect()

        def io(*cmds, export="e0"):
            args = ["qemu-io", "-f", "raw"]
            for c in cmds:
                args += ["-c", c]
            client(args + [f"nbd+unix:///{export}?socket={sock}"])

        step("blockdev-add", driver="raw", **{"node-name": "r0"},
             file={"driver": "file", "filename": img, "node-name": "f0"})
        step("blockdev-add", driver="qcow2", **{"node-name": "q0"},
             file={"driver": "file", "filename": qimg})
        for extra in ({"node": "r0", "name": ""}, {"node": "zz", "name": "b"},
                      {"node": "r0", "name": "b", "granularity": 1000},
                      {"node": "r0", "name": "b", "granularity": 256},
                      {"node": "f0", "name": "b", "persistent": True},
                      {"node": "r0", "name": "x" * 1024}):
            step("block-dirty-bitmap-add", **extra)
        step("block-dirty-bitmap-add", node="r0", name="b0")
        step("block-dirty-bitmap-add", node="r0", name="b0")
        step("block-dirty-bitmap-add", node="r0", name="fine", granularity=512, disabled=True)
        step("block-dirty-bitmap-add", node="f0", name="host", granularity=1 << 20)
        step("block-dirty-bitmap-add", node="q0", name="qb")
        for cmd in ("remove", "clear", "enable", "disable"):
            step(f"block-dirty-bitmap-{cmd}", node="r0", name="zz")
            step(f"block-dirty-bitmap-{cmd}", node="zz", name="b0")
        bitmaps()
        step("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        step("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, bitmaps=["nope"])
        step("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, bitmaps=["b0"])
        step("block-export-add", type="nbd", id="e0", name="e0", **{"node-name": "r0"},
             writable=True, bitmaps=["b0", {"node": "f0", "name": "host"}, "fine"])
        step("block-export-add", type="nbd", id="e1", **{"node-name": "r0"}, name="e1",
             writable=True, bitmaps=["b0"])
        step("block-export-add", type="nbd", id="e1", **{"node-name": "r0"}, name="e1",
             writable=True, bitmaps=[{"node": "r0", "name": "zz"}])
        for cmd in ("remove", "clear", "enable", "disable"):
            step(f"block-dirty-bitmap-{cmd}", node="r0", name="b0")
        step("block-dirty-bitmap-merge", node="r0", target="b0", bitmaps=["fine"])
        io("write -P 7 65536 4096", "write -z 1M 100k", "discard 1572864 512",
           "write 2097151 1")
        bitmaps()
        ctx = "qemu:dirty-bitmap:"
        for name in ("b0", "host", "fine"):
            client(["qemu-img", "map", "--output=json", "--image-opts",
                    f"driver=nbd,export=e0,server.type=unix,server.path={sock},"
                    f"x-dirty-bitmap={ctx}{name}"])
            if shutil.which("nbdinfo"):
                client(["nbdinfo", f"--map={ctx}{name}", f"nbd+unix:///e0?socket={sock}"])
        if shutil.which("nbdinfo"):
            client(["nbdinfo", "--list", f"nbd+unix:///?socket={sock}"])
            # A bare namespace lists its contexts but selects none.
            for ns in ("qemu:", ctx, "base:"):
                client(["nbdinfo", f"--map={ns}", f"nbd+unix:///e0?socket={sock}"])
        step("block-export-del", id="e0")
        q.wait_event("BLOCK_EXPORT_DELETED")
        step("block-dirty-bitmap-disable", node="r0", name="b0")
        step("block-dirty-bitmap-merge", node="r0", target="fine",
             bitmaps=["b0", {"node": "f0", "name": "host"}])
        step("block-dirty-bitmap-merge", node="r0", target="fine",
             bitmaps=["b0", {"node": "q0", "name": "qb"}])
        step("block-dirty-bitmap-merge", node="r0", target="fine", bitmaps=["b0", "zz"])
        step("block-dirty-bitmap-merge", node="r0", target="zz", bitmaps=["b0"])
        bitmaps()
        step("block-export-add", type="nbd", id="e2", **{"node-name": "r0"},
             bitmaps=["b0", "fine"])
        client(["nbdinfo", f"--map={ctx}fine", f"nbd+unix:///r0?socket={sock}"]
               if shutil.which("nbdinfo") else ["true"])
        step("block-export-del", id="e2")
        q.wait_event("BLOCK_EXPORT_DELETED")
        step("block-dirty-bitmap-clear", node="r0", name="fine")
        step("block-dirty-bitmap-enable", node="r0", name="b0")
        step("block_resize", **{"node-name": "r0"}, size=3 << 20)
        bitmaps()
        step("block-dirty-bitmap-remove", node="r0", name="b0")
        step("block-dirty-bitmap-remove", node="r0", name="b0")
        bitmaps()
        step("nbd-server-stop")
        q.close()
    finally:
        d.stop()
    return out


def mark_first_bitmap_in_use(path):
    """Sets the in-use flag of the first bitmap directory entry, as an
    image left by a crashed writer has it."""
    import struct
    with open(path, "r+b") as f:
        h = f.read(4096)
        pos = struct.unpack(">I", h[100:104])[0]
        while True:
            ty, ln = struct.unpack(">II", h[pos:pos + 8])
            if ty == 0x23852875:
                dir_off = struct.unpack(">Q", h[pos + 24:pos + 32])[0]
                break
            if ty == 0:
                raise ValueError("no bitmaps extension")
            pos += 8 + (ln + 7) // 8 * 8
        f.seek(dir_off + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(dir_off + 12)
        f.write(struct.pack(">I", flags | 1))


def persistent_bitmap_conversation(binary, workdir):
    """Bitmaps stored in a qcow2 image by qemu-img: loaded at open, listed,
    guarded when read-only or inconsistent, exported over NBD and fed by
    writes on a read-write node."""
    good = os.path.join(workdir, "good.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", good, "4M"], check=True)
    for args in (["b0"], ["-g", "512", "fine"], ["off"]):
        subprocess.run(["qemu-img", "bitmap", "--add", good, *args], check=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", good, "off"], check=True)
    subprocess.run(["qemu-io", "-c", "write 64k 4k", "-c", "write 1M 100k", good],
                   check=True, capture_output=True)
    rw = os.path.join(workdir, "rw.qcow2")
    bad = os.path.join(workdir, "bad.qcow2")
    shutil.copy(good, rw)
    shutil.copy(good, bad)
    mark_first_bitmap_in_use(bad)
    sock = os.path.join(workdir, "nbd.sock")
    d = Daemon(binary)
    rec = Recorder(sock)
    out, step, bitmaps, client = rec.out, rec.step, rec.bitmaps, rec.client
    try:
        rec.q = q = d.connect()

        def node(name, path, ro):
            step("blockdev-add", driver="qcow2", **{"node-name": name, "read-only": ro},
                 file={"driver": "file", "filename": path})

        node("ro", good, True)
        node("rw", rw, False)
        node("bad", bad, True)
        bitmaps()
        for cmd in ("clear", "enable", "disable", "remove"):
            step(f"block-dirty-bitmap-{cmd}", node="bad", name="b0")
        step("block-dirty-bitmap-clear", node="ro", name="b0")
        step("block-dirty-bitmap-merge", node="ro", target="b0", bitmaps=["fine"])
        step("block-dirty-bitmap-merge", node="rw", target="off", bitmaps=["fine"])
        step("block-dirty-bitmap-merge", node="rw", target="off",
             bitmaps=[{"node": "bad", "name": "b0"}])
        step("block-dirty-bitmap-disable", node="ro", name="off")
        step("block-dirty-bitmap-enable", node="ro", name="off")
        step("block-dirty-bitmap-add", node="rw", name="mem", granularity=4096)
        step("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        step("block-export-add", type="nbd", id="e0", **{"node-name": "bad"}, bitmaps=["b0"])
        step("block-export-add", type="nbd", id="e0", **{"node-name": "rw"}, bitmaps=["b0"])
        step("block-export-add", type="nbd", id="e0", **{"node-name": "ro"},
             bitmaps=["b0", "fine", "off", {"node": "bad", "name": "fine"}])
        step("block-export-add", type="nbd", id="e1", **{"node-name": "rw"}, writable=True,
             bitmaps=["b0", "mem", "off"])
        client(["qemu-io", "-f", "raw", "-c", "write 2M 8k", "-c", "write -z 3M 64k",
                f"nbd+unix:///rw?socket={sock}"])
        bitmaps()
        ctx = "qemu:dirty-bitmap:"
        for export, names in (("ro", ("b0", "fine", "off")), ("rw", ("b0", "mem", "off"))):
            for name in names:
                client(["qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=nbd,export={export},server.type=unix,server.path={sock},"
                        f"x-dirty-bitmap={ctx}{name}"])
        step("nbd-server-stop")
        q.close()
    finally:
        d.stop()
    return out


def stored_bitmaps(img):
    """The bitmaps an image holds and its check report, as qemu-img sees
    them (the check's exit status under "status")."""
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img],
                                     capture_output=True, text=True, check=True).stdout)
    check = subprocess.run(["qemu-img", "check", "--output=json", img],
                           capture_output=True, text=True)
    report = dict(json.loads(check.stdout), status=check.returncode)
    return info["format-specific"]["data"].get("bitmaps"), report


def stored_bitmap_conversation(binary, workdir):
    """A read-write session that adds, changes and removes persistent
    bitmaps, then what the image holds afterwards as qemu-img and a fresh
    qemu-storage-daemon (the same reader for both) see it."""
    img = os.path.join(workdir, "st.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"], check=True)
    for args in (["b0"], ["-g", "512", "fine"], ["off"]):
        subprocess.run(["qemu-img", "bitmap", "--add", img, *args], check=True)
    subprocess.run(["qemu-io", "-c", "write 64k 4k", img], check=True, capture_output=True)
    sock = os.path.join(workdir, "nbd.sock")
    rec = Recorder(sock)
    out, step, bitmaps, client = rec.out, rec.step, rec.bitmaps, rec.client


    d = Daemon(binary)
    try:
        rec.q = q = d.connect()

        step("blockdev-add", driver="qcow2", **{"node-name": "rw"},
             file={"driver": "file", "filename": img})
        step("block-dirty-bitmap-add", node="rw", name="new", granularity=4096, persistent=True)
        step("block-dirty-bitmap-add", node="rw", name="mem")
        step("block-dirty-bitmap-remove", node="rw", name="off")
        step("block-dirty-bitmap-disable", node="rw", name="fine")
        step("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        step("block-export-add", type="nbd", id="e0", **{"node-name": "rw"}, writable=True)
        client(["qemu-io", "-f", "raw", "-c", "write 1M 100k", "-c", "write -z 2M 64k",
                f"nbd+unix:///rw?socket={sock}"])
        step("block-export-del", id="e0")
        q.wait_event("BLOCK_EXPORT_DELETED")
        step("block-dirty-bitmap-add", node="rw", name="merged", persistent=True, disabled=True)
        step("block-dirty-bitmap-merge", node="rw", target="merged", bitmaps=["b0", "fine"])
        step("blockdev-del", **{"node-name": "rw"})
        q.close()
    finally:
        d.stop()
    stored, check = stored_bitmaps(img)
    out.append(["stored", stored])
    out.append(["check", check["status"], check.get("leaks", 0), check.get("corruptions", 0)])
    # The bits, as qemu-storage-daemon loads them.
    reader = Daemon(qsd_path(), ["--blockdev",
                                 f"driver=qcow2,node-name=r,read-only=on,file.driver=file,"
                                 f"file.filename={img}"])
    try:
        rec.q = q = reader.connect()
        r = q.cmd("query-named-block-nodes", flat=True)["return"]
        out.append(["loaded", [n.get("dirty-bitmaps") for n in r if n["node-name"] == "r"]])
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        q.cmd("block-export-add", type="nbd", id="e", **{"node-name": "r"},
              bitmaps=["b0", "fine", "new", "merged"])
        for name in ("b0", "fine", "new", "merged"):
            client(["qemu-img", "map", "--output=json", "--image-opts",
                    f"driver=nbd,export=r,server.type=unix,server.path={sock},"
                    f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"])
        q.close()
    finally:
        reader.stop()
    return out


def killed_bitmap_conversation(binary, workdir):
    """Persistent bitmaps removed and added in a read-write session that
    is then killed: what the image holds afterwards, as qemu-img sees it.
    A removed bitmap is gone at once; the rest stay, in use."""
    img = os.path.join(workdir, "k.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"], check=True)
    for name in ("b0", "gone", "c"):
        subprocess.run(["qemu-img", "bitmap", "--add", img, name], check=True)
    subprocess.run(["qemu-io", "-c", "write 64k 4k", img], check=True, capture_output=True)
    rec = Recorder(os.path.join(workdir, "nbd.sock"))
    out, step = rec.out, rec.step
    d = Daemon(binary)
    try:
        rec.q = q = d.connect()
        step("blockdev-add", driver="qcow2", **{"node-name": "rw"},
             file={"driver": "file", "filename": img})
        step("block-dirty-bitmap-remove", node="rw", name="gone")
        step("block-dirty-bitmap-add", node="rw", name="new", persistent=True)
        step("block-dirty-bitmap-remove", node="rw", name="new")
        step("block-dirty-bitmap-add", node="rw", name="late", persistent=True)
        rec.bitmaps()
        q.close()
    finally:
        d.kill()
    stored, check = stored_bitmaps(img)
    out.append(["stored", stored])
    # Leaks after a kill are allowed and may differ; corruption is not.
    out.append(["check", check.get("corruptions", 0), check.get("check-errors", 0)])
    return out


def reopened_bitmap_conversation(binary, workdir):
    """A read-write qcow2 node with persistent bitmaps and lazy refcounts,
    written over NBD, reopened read-only (bitmaps stored, readonly, the
    image clean while still open) and read-write again."""
    img = os.path.join(workdir, "ro.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", img, "b0"], check=True)
    sock = os.path.join(workdir, "nbd.sock")
    rec = Recorder(sock)
    out, step = rec.out, rec.step

    def image(writable=False):
        # A writable Strata node keeps room made ahead at the end of the
        # file, so the length is compared only when nothing writes, and in
        # clusters: QEMU's file may end inside its last cluster.
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", img],
                                         capture_output=True, text=True, check=True).stdout)
        out.append(["image", info.get("dirty-flag"),
                    None if writable else -(-os.path.getsize(img) // 65536),
                    info["format-specific"]["data"].get("bitmaps")])

    d = Daemon(binary)
    try:
        rec.q = q = d.connect()
        file = {"driver": "file", "filename": img}
        node = {"driver": "qcow2", "node-name": "n", "lazy-refcounts": True, "file": file}
        step("blockdev-add", **node)
        step("block-dirty-bitmap-add", node="n", name="p", persistent=True)
        step("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        step("block-export-add", type="nbd", id="e0", **{"node-name": "n"}, writable=True)
        rec.client(["qemu-io", "-f", "raw", "-c", "write 1M 64k",
                    f"nbd+unix:///n?socket={sock}"])
        step("block-export-del", id="e0")
        q.wait_event("BLOCK_EXPORT_DELETED")
        image(writable=True)
        step("blockdev-reopen", options=[dict(node, **{"read-only": True})])
        image()
        rec.bitmaps()
        step("block-dirty-bitmap-clear", node="n", name="b0")
        step("block-dirty-bitmap-add", node="n", name="q", persistent=True)
        step("blockdev-reopen", options=[node])
        image(writable=True)
        step("block-dirty-bitmap-clear", node="n", name="b0")
        step("blockdev-del", **{"node-name": "n"})
        q.close()
    finally:
        d.stop()
    image()
    stored, check = stored_bitmaps(img)
    out.append(["check", check["status"], check.get("leaks", 0), check.get("corruptions", 0)])
    # Opened read-only (the file too), then made writable: the file gets
    # a writable descriptor, on io_uring and on threads.
    for aio in ("io_uring", "threads"):
        d = Daemon(binary)
        try:
            rec.q = q = d.connect()
            file = {"driver": "file", "filename": img, "aio": aio}
            node = {"driver": "qcow2", "node-name": "n", "lazy-refcounts": True, "file": file}
            step("blockdev-add", **dict(node, **{"read-only": True}))
            step("block-dirty-bitmap-clear", node="n", name="p")
            step("blockdev-reopen", options=[node])
            image(writable=True)
            step("block-dirty-bitmap-clear", node="n", name="p")
            step("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            step("block-export-add", type="nbd", id="e0", **{"node-name": "n"}, writable=True,
                 bitmaps=["p"])
            rec.client(["qemu-io", "-f", "raw", "-c", "write -P 7 2M 64k",
                        "-c", "read -P 7 2M 64k", f"nbd+unix:///n?socket={sock}"])
            rec.client(["qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=nbd,export=n,server.type=unix,server.path={sock},"
                        f"x-dirty-bitmap=qemu:dirty-bitmap:p"])
            # Lazy refcounts, asked for at the read-only open, now apply.
            image(writable=True)
            step("block-export-del", id="e0")
            q.wait_event("BLOCK_EXPORT_DELETED")
            step("blockdev-del", **{"node-name": "n"})
            q.close()
        finally:
            d.stop()
        image()
        rec.client(["qemu-io", "-c", "read -P 7 2M 64k", img])
    return out


def strip_versions(convo):
    # package strings and the version triple's micro may differ by build.
    for step in convo:
        if step[0] == "query-version" and "return" in step[1]:
            step[1]["return"] = "<version>"
    return convo


@unittest.skipUnless(qsd_path(), "qemu-storage-daemon not installed")
class Differential(unittest.TestCase):
    def test_same_conversation(self):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            want = normalise(strip_versions(conversation(qsd_path(), a)))
            got = normalise(strip_versions(conversation(stratad_path(), b)))
        want = json.loads(json.dumps(want).replace(a, "<dir>"))
        got = json.loads(json.dumps(got).replace(b, "<dir>"))
        self.assertEqual(len(want), len(got))
        for w, g in zip(want, got):
            self.assertEqual(w, g, f"step {w[0]}")

    def assert_same_texts(self, convo):
        """Runs `convo` against both daemons; every step must match, error
        texts included."""
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            want = json.loads(json.dumps(convo(qsd_path(), a)).replace(a, "<dir>"))
            got = json.loads(json.dumps(convo(stratad_path(), b)).replace(b, "<dir>"))
        self.assertEqual(len(want), len(got))
        for w, g in zip(want, got):
            self.assertEqual(w, g, f"step {w[0]}")

    @unittest.skipUnless(shutil.which("qemu-io"), "qemu-io not installed")
    def test_same_nbd_conversation(self):
        self.assert_same_texts(nbd_conversation)

    @unittest.skipUnless(shutil.which("qemu-io"), "qemu-io not installed")
    def test_same_bitmap_conversation(self):
        self.assert_same_texts(bitmap_conversation)

    @unittest.skipUnless(shutil.which("qemu-io"), "qemu-io not installed")
    def test_same_persistent_bitmap_conversation(self):
        self.assert_same_texts(persistent_bitmap_conversation)

    @unittest.skipUnless(shutil.which("qemu-io"), "qemu-io not installed")
    def test_same_stored_bitmaps(self):
        self.assert_same_texts(stored_bitmap_conversation)

    @unittest.skipUnless(shutil.which("qemu-io"), "qemu-io not installed")
    def test_same_bitmaps_after_a_kill(self):
        self.assert_same_texts(killed_bitmap_conversation)

    @unittest.skipUnless(shutil.which("qemu-io"), "qemu-io not installed")
    def test_same_bitmaps_across_reopens(self):
        self.assert_same_texts(reopened_bitmap_conversation)

    def test_schema_arguments(self):
        """Member names and optionality of every common command's arguments
        (and of the flat-union variants we implement) match QEMU's."""
        schemas = {}
        for name, binary in (("qsd", qsd_path()), ("strata", stratad_path())):
            d = Daemon(binary)
            try:
                schemas[name] = d.connect().cmd("query-qmp-schema")["return"]
            finally:
                d.stop()

        def index(s):
            return {e["name"]: e for e in s}

        q, s = index(schemas["qsd"]), index(schemas["strata"])

        def members(ix, tname, depth=0, seen=()):
            e = ix.get(tname)
            if e is None or e["meta-type"] != "object" or depth > 3 or tname in seen:
                return None
            out = {m["name"]: ("default" in m) for m in e["members"]}
            variants = {}
            for v in e.get("variants", []):
                variants[v["case"]] = members(ix, v["type"], depth + 1, seen + (tname,))
            return (out, variants)

        common = [n for n, e in s.items() if e["meta-type"] == "command" and n in q]
        self.assertGreaterEqual(len(common), 24)
        for cmd in common:
            qa = members(q, q[cmd]["arg-type"])
            sa = members(s, s[cmd]["arg-type"])
            self.assertEqual(qa[0], sa[0], f"{cmd} arguments")
            for case, sv in sa[1].items():
                self.assertIn(case, qa[1], f"{cmd} variant {case}")
                self.assertEqual(qa[1][case][0], sv[0], f"{cmd} variant {case}")
            # Nested argument structs (e.g. blockdev-create's options).
            for mname in qa[0]:
                qm = next(m for m in q[q[cmd]["arg-type"]]["members"] if m["name"] == mname)
                sm = next(m for m in s[s[cmd]["arg-type"]]["members"] if m["name"] == mname)
                qn, sn = members(q, qm["type"]), members(s, sm["type"])
                if qn and sn:
                    self.assertEqual(qn[0], sn[0], f"{cmd}.{mname}")
                    for case, sv in sn[1].items():
                        self.assertEqual(qn[1][case][0], sv[0], f"{cmd}.{mname} variant {case}")


if __name__ == "__main__":
    unittest.main()
