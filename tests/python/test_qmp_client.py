"""Drives stratad with the real QMP client library (`qemu.qmp` from PyPI)."""
import asyncio
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import stratad_path  # noqa: E402
from qmpraw import Daemon  # noqa: E402

try:
    from qemu.qmp import EventListener, ExecuteError, QMPClient
except ImportError:  # pragma: no cover
    QMPClient = None


@unittest.skipUnless(QMPClient, "qemu.qmp not installed (pip install qemu.qmp)")
class QmpClientTest(unittest.TestCase):
    def test_session(self):
        asyncio.run(self.session())

    async def session(self):
        d = Daemon(stratad_path(), ["--blockdev", "null-co,node-name=n0"])
        try:
            qmp = QMPClient("strata-test")
            for _ in range(200):
                try:
                    await qmp.connect(d.sock)
                    break
                except Exception:
                    await asyncio.sleep(0.02)
            self.assertEqual(qmp.greeting.QMP.version["qemu"]["major"], 10)
            ver = await qmp.execute("query-version")
            self.assertIn("qemu", ver)
            nodes = await qmp.execute("query-named-block-nodes")
            self.assertEqual(nodes[0]["node-name"], "n0")
            with self.assertRaises(ExecuteError) as cm:
                await qmp.execute("blockdev-del", {"node-name": "zz"})
            self.assertIn("Failed to find node", str(cm.exception))
            with tempfile.TemporaryDirectory() as t:
                img = os.path.join(t, "x.raw")
                listener = EventListener()
                with qmp.listen(listener):
                    await qmp.execute("blockdev-create", {
                        "job-id": "j", "options": {"driver": "file", "filename": img,
                                                   "size": 1 << 20}})
                    seen = []
                    async for ev in listener:
                        if ev["event"] == "JOB_STATUS_CHANGE":
                            seen.append(ev["data"]["status"])
                            if ev["data"]["status"] == "concluded":
                                break
                self.assertEqual(seen, ["created", "running", "waiting", "pending", "concluded"])
                self.assertEqual(os.path.getsize(img), 1 << 20)
                await qmp.execute("job-dismiss", {"id": "j"})
            await qmp.execute("quit")
            try:
                await qmp.disconnect()
            except EOFError:
                # The daemon closes the socket right after quit's reply; the
                # client reports that EOF if it saw it first (QEMU alike).
                pass
            self.assertEqual(d.proc.wait(10), 0)
        finally:
            d.stop()


if __name__ == "__main__":
    unittest.main()
