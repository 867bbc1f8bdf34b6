"""Shared helpers: where the binaries are, and normalisation for diffs."""
import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stratad_path():
    """The stratad binary: $STRATAD, else the newest build in a target dir."""
    p = os.environ.get("STRATAD")
    if p:
        return p
    cands = []
    for tdir in [os.environ.get("CARGO_TARGET_DIR"), os.path.join(ROOT, "target")]:
        if not tdir:
            continue
        for prof in ("release", "debug"):
            f = os.path.join(tdir, prof, "stratad")
            if os.path.exists(f):
                cands.append((os.path.getmtime(f), f))
    if not cands:
        raise RuntimeError("stratad not built; set STRATAD or build it")
    return max(cands)[1]


def qsd_path():
    return shutil.which("qemu-storage-daemon")


AUTO = re.compile(r"#block\d+")


def normalise(v):
    """Strip what legitimately differs: timestamps, generated node names,
    error texts (class kept), paths of temporary dirs."""
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if k == "timestamp":
                continue
            if k == "error" and isinstance(x, dict):
                out[k] = {"class": x.get("class")}
                continue
            out[k] = normalise(x)
        return out
    if isinstance(v, list):
        return [normalise(x) for x in v]
    if isinstance(v, str):
        return AUTO.sub("#blockN", v)
    return v
