"""baton.localproc with real child processes on 127.0.0.1: the port from the log, readiness over HTTP, the
failures a harness must report, and a stop that ends the whole session."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from baton.localproc import ListeningProcess
from process_harness import alive
from proxy_harness import environment_proxy

# Serves /ready (200 once a file exists) and starts a grandchild that would outlive a plain kill.
SERVER = r"""
import http.server, os, subprocess, sys
marker = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(marker + ".child", "w").write(str(child.pid))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/ready" and os.path.exists(marker)
        self.send_response(200 if ok else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
print("event=listening url=http://127.0.0.1:%d" % srv.server_port, flush=True)
srv.serve_forever()
"""


def test_port_from_the_log_readiness_and_a_stop_that_ends_the_session(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    proc = ListeningProcess("srv", [sys.executable, "-c", SERVER, str(marker)], tmp_path / "srv.log")
    try:
        proc.wait_listening(time.monotonic() + 20)
        assert proc.port and proc.address == f"127.0.0.1:{proc.port}"
        with pytest.raises(TimeoutError, match="/ready never answered 200"):
            proc.wait_http_ok("/ready", time.monotonic() + 0.3)  # not ready yet: 503
        marker.write_text("")
        proc.wait_ready("/ready", time.monotonic() + 20)
        child = int((tmp_path / "ready.child").read_text())
        assert alive(child)
    finally:
        proc.stop(timeout=5)
    assert proc.proc.returncode is not None
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the grandchild outlived stop()"


def test_a_process_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    proc = ListeningProcess("broken", [sys.executable, "-c", "import sys; print('bad config: no model'); sys.exit(3)"],
                        tmp_path / "broken.log")
    try:
        with pytest.raises(RuntimeError, match=r"(?s)broken exited with 3:.*bad config: no model"):
            proc.wait_ready("/health", time.monotonic() + 20)
    finally:
        proc.stop()


def test_a_process_that_never_listens_times_out(tmp_path: Path) -> None:
    proc = ListeningProcess("mute", [sys.executable, "-c", "import time; print('starting'); time.sleep(60)"],
                        tmp_path / "mute.log")
    try:
        with pytest.raises(TimeoutError, match=r"(?s)mute did not report its port in time:.*starting"):
            proc.wait_listening(time.monotonic() + 1.0)
    finally:
        proc.stop(timeout=2)
    assert proc.proc.returncode is not None


def test_readiness_checks_never_go_through_a_proxy(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "ready"
    marker.write_text("")
    proc = ListeningProcess("srv", [sys.executable, "-c", SERVER, str(marker)], tmp_path / "srv.log")
    try:
        with environment_proxy(monkeypatch) as hits:
            proc.wait_ready("/ready", time.monotonic() + 5)
            assert hits == []
    finally:
        proc.stop(timeout=5)
