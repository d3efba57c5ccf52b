"""The pod runner's readiness, as the kubelet's: a Ready pod turns unready only after `failureThreshold`
failed probes in a row (a probe that fails once under load does not pull a replica out of service and
roll a rollout back), and at once when its process exits. Real process, real HTTP probe on 127.0.0.1;
only the write of the pod's Ready condition is recorded instead of sent."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

from baton.podrunner.runner import LocalProcess, PodRunner
from kubernetes.client import ApiClient


class Health(http.server.BaseHTTPRequestHandler):
    healthy = True

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if Health.healthy else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


class RecordingRunner(PodRunner):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.marks: list[tuple[bool, str, str]] = []
        self.container_writes: list[dict] = []

    def _set_ready(self, namespace, name, ready, reason, message, **status):
        self.marks.append((ready, reason, message))

    def _patch_status(self, namespace, name, uid, *, conditions=None, statuses=None):
        self.container_writes.append(statuses[0])
        return True


def test_a_ready_pod_turns_unready_after_failure_threshold_probes_in_a_row(tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runner = RecordingRunner(ApiClient(), tmp_path / "runner")
        local = LocalProcess(key="ns/p-0", uid="u", argv=[], env={}, log_path=tmp_path / "p.log",
                             probe_url=f"http://127.0.0.1:{server.server_port}/health", failure_threshold=3)
        local.proc = proc
        pod = SimpleNamespace(metadata=SimpleNamespace(namespace="ns", name="p-0"))

        def probe(healthy: bool) -> None:
            Health.healthy = healthy
            runner._tend(local, pod)

        probe(True)
        assert runner.marks == [(True, "ProbeSucceeded", "readiness probe succeeded")]
        for _ in range(2):
            probe(False)
        probe(True)  # two failures, then a success: still Ready, the count starts again
        probe(False)
        probe(False)
        assert [m[0] for m in runner.marks] == [True]
        probe(False)  # the third in a row
        assert runner.marks[-1][:2] == (False, "ProbeFailed") and "3 time(s) in a row" in runner.marks[-1][2]
        probe(True)
        assert runner.marks[-1][:2] == (True, "ProbeSucceeded") and len(runner.marks) == 3

        proc.kill()
        proc.wait(timeout=10)
        runner._tend(local, pod)  # the process exited: unready at once
        assert runner.marks[-1][:2] == (False, "ProcessExited") and local.restarts == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        server.shutdown()
        server.server_close()


def test_a_pod_that_was_never_ready_stays_unready_on_its_first_failure(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runner = RecordingRunner(ApiClient(), tmp_path / "runner")
        local = LocalProcess(key="ns/p-0", uid="u", argv=[], env={}, log_path=tmp_path / "p.log",
                             probe_url="http://127.0.0.1:9/health", failure_threshold=3)  # nothing listens
        local.proc = proc
        runner._tend(local, SimpleNamespace(metadata=SimpleNamespace(namespace="ns", name="p-0")))
        assert runner.marks == [(False, "ProbeFailed",
                                 "readiness probe http://127.0.0.1:9/health failed 1 time(s) in a row")]
    finally:
        proc.kill()
        proc.wait(timeout=10)
