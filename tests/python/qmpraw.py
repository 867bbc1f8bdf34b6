"""Minimal raw QMP client over a unix socket (no dependencies).

Used by the differential tests and for exploring qemu-storage-daemon's
answers. One object per connection; `cmd` sends a request and returns the
reply, collecting events that arrive meanwhile in `events`.
"""
import json
import os
import socket
import subprocess
import tempfile
import time


class Qmp:
    def __init__(self, path, negotiate=True, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.time() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.time() > deadline:
                    raise
                time.sleep(0.0005)
        self.buf = b""
        self.events = []
        self.greeting = self.read()
        if negotiate:
            r = self.cmd("qmp_capabilities")
            # qemu-storage-daemon sometimes greets twice when the client
            # connects the moment its socket appears.
            if "QMP" in r:
                r = self.reply()
            assert r == {"return": {}}, r

    def read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send_raw(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def reply(self):
        while True:
            m = self.read()
            if "event" in m:
                self.events.append(m)
            else:
                return m

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        self.send_raw(json.dumps(req))
        return self.reply()

    def cmd_obj(self, req):
        self.send_raw(json.dumps(req))
        return self.reply()

    def wait_event(self, name, timeout=10.0):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            if time.time() > deadline:
                raise TimeoutError(name)
            self.events.append(self.read())

    def close(self):
        self.sock.close()


class Daemon:
    """Starts a daemon (qemu-storage-daemon or stratad) with a QMP monitor."""

    def __init__(self, binary, extra=(), cwd=None):
        self.dir = tempfile.mkdtemp(prefix="qmpd-")
        self.sock = os.path.join(self.dir, "qmp.sock")
        extra = list(extra)
        # Both daemons write the PID file only once every option is set up.
        # qemu-storage-daemon's monitor socket accepts before its monitor is
        # attached, and a client that connects in that window may get no
        # answer or a reset; waiting for the PID file closes the window.
        if "--pidfile" in extra:
            self.pidfile = extra[extra.index("--pidfile") + 1]
        else:
            self.pidfile = os.path.join(self.dir, "pid")
            extra += ["--pidfile", self.pidfile]
        args = [binary, "--chardev", f"socket,id=m0,path={self.sock},server=on,wait=off",
                "--monitor", "chardev=m0", *extra]
        self.cwd = cwd or self.dir
        self.proc = subprocess.Popen(args, cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_ready(self, timeout=10.0):
        """Waits until the daemon has written its PID file (or has exited)."""
        deadline = time.time() + timeout
        pidfile = os.path.join(self.cwd, self.pidfile)
        while not os.path.exists(pidfile) and self.proc.poll() is None:
            if time.time() > deadline:
                raise TimeoutError("daemon did not become ready")
            time.sleep(0.0005)

    def connect(self, **kw):
        self.wait_ready()
        return Qmp(self.sock, **kw)

    def kill(self):
        """SIGKILL: the daemon gets no chance to tidy its images."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
