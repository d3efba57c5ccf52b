"""The pod runner's liveness and startup probes, with the kubelet's semantics (no cluster; real processes, real
HTTP probes on loopback): a livenessProbe failing `failureThreshold` times in a row (one probe per
periodSeconds) gets the process stopped (SIGTERM, SIGKILL after the pod's grace period) and restarted, counted
in restartCount; a startupProbe, until it passes, holds the readiness and liveness probes back, and failing
`failureThreshold` times restarts the process too; probes that are not httpGet count as passing. And the
engine simulator's fatal state, with the probes the operator renders, gets the engine restarted, as a
kubelet would."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from baton.podrunner.runner import PodRunner
from baton.render import render_children
from baton.render.naming import Target
from example_models import example_model
from kubernetes.client import ApiClient, V1Pod
from test_podrunner_status import kwok_started, runner_for
from test_podrunner_sync import FakeCore, make_runner, scheduler_pod

IGNORES_SIGTERM = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); time.sleep(60)"]


class Paths(http.server.BaseHTTPRequestHandler):
    """A process's health endpoints, each path passing or failing as the test says."""

    failing: set[str] = set()

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(503 if self.path in Paths.failing else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def port():
    Paths.failing = set()
    server = http.server.HTTPServer(("127.0.0.1", 0), Paths)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def probed_pod(port: int, grace: int = 1, **probes: dict) -> V1Pod:
    """The scheduler pod with these probes (readinessProbe, livenessProbe, startupProbe) on a test server's port."""
    data = ApiClient().sanitize_for_serialization(kwok_started(scheduler_pod(), port=port))
    container = data["spec"]["containers"][0]
    container.pop("readinessProbe")
    container.update(probes)
    data["spec"]["terminationGracePeriodSeconds"] = grace
    return V1Pod.from_dict(data)


def http_probe(path: str, **fields: Any) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, **fields}


def sync_until(runner: PodRunner, predicate, timeout: float) -> float:
    """Pass after pass (every 0.1 s) until `predicate`; the seconds it took."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        runner.sync()
        time.sleep(0.1)
    return time.monotonic() - t0


def ready_now(core: FakeCore, name: str) -> tuple[str, str] | None:
    """(status, reason) of the last Ready write to the pod, if any."""
    written = core.conditions(name)
    return written[-1][:2] if written else None


def stop_all(runner: PodRunner) -> None:
    for local in runner.processes.values():
        runner._stop_process(local, grace_s=1.0)


def test_a_failing_liveness_probe_gets_the_process_killed_and_restarted(tmp_path: Path, port: int) -> None:
    pod = probed_pod(port, grace=1, readinessProbe=http_probe("/readyz"),
                     livenessProbe=http_probe("/healthz", periodSeconds=1, failureThreshold=3))
    runner, core = runner_for(tmp_path, pod, argv=IGNORES_SIGTERM)
    key = "ns/m-scheduler-abc"
    try:
        sync_until(runner, lambda: ready_now(core, "m-scheduler-abc") == ("True", "ProbeSucceeded"), 10)
        first = runner.processes[key].proc
        Paths.failing = {"/healthz"}  # the process hangs: alive, but its liveness endpoint fails
        took = sync_until(runner, lambda: runner.processes[key].restarts == 1, 15)
        # three failures one period apart (2 s), then SIGTERM, which it ignores: SIGKILL after its 1 s of grace
        assert took > 2.5, f"restarted after {took:.1f}s: the probe's period was not honoured"
        assert first.returncode == -9
        reasons = [reason for _, reason, _ in core.conditions("m-scheduler-abc")]
        assert reasons[-2:] == ["LivenessProbeFailed", "ProcessExited"]
        message = core.conditions("m-scheduler-abc")[-1][2]
        assert "liveness probe http://127.0.0.1:" in message and "failed 3 time(s) in a row" in message
        status = core.container_statuses("m-scheduler-abc")[-1]
        assert status["restartCount"] == 1 and status["lastState"]["terminated"]["exitCode"] == 137
        assert status["lastState"]["terminated"]["reason"] == "Error"
        Paths.failing = set()
        sync_until(runner, lambda: runner.processes[key].proc is not None and runner.processes[key].proc is not first
                   and ready_now(core, "m-scheduler-abc") == ("True", "ProbeSucceeded"), 10)
        assert runner.processes[key].restarts == 1
    finally:
        stop_all(runner)


def test_a_startup_probe_holds_readiness_and_liveness_back_until_it_passes(tmp_path: Path, port: int) -> None:
    pod = probed_pod(port, readinessProbe=http_probe("/readyz"),
                     livenessProbe=http_probe("/healthz", periodSeconds=1, failureThreshold=1),
                     startupProbe=http_probe("/started", periodSeconds=1, failureThreshold=100))
    runner, core = runner_for(tmp_path, pod)
    key = "ns/m-scheduler-abc"
    try:
        Paths.failing = {"/started", "/healthz"}  # still loading: its liveness endpoint fails too
        runner.sync()
        for _ in range(15):
            runner.sync()
            time.sleep(0.1)
        local = runner.processes[key]
        assert local.restarts == 0, "liveness ran before the startup probe passed"
        assert "True" not in [status for status, _, _ in core.conditions("m-scheduler-abc")], "Ready before started"
        assert core.container_statuses("m-scheduler-abc")[-1]["started"] is False
        assert core.conditions("m-scheduler-abc")[-1][1:] == (
            "Starting", f"startup probe http://127.0.0.1:{port}/started has not passed yet")
        Paths.failing = set()
        sync_until(runner, lambda: ready_now(core, "m-scheduler-abc") == ("True", "ProbeSucceeded"), 5)
        status = core.container_statuses("m-scheduler-abc")[-1]
        assert status["started"] is True and status["ready"] is True
        Paths.failing = {"/healthz"}  # now liveness applies
        sync_until(runner, lambda: local.restarts == 1, 10)
    finally:
        stop_all(runner)


def test_a_startup_probe_that_keeps_failing_restarts_the_process(tmp_path: Path, port: int) -> None:
    pod = probed_pod(port, readinessProbe=http_probe("/readyz"),
                     startupProbe=http_probe("/started", periodSeconds=1, failureThreshold=2))
    runner, core = runner_for(tmp_path, pod)
    Paths.failing = {"/started"}
    try:
        took = sync_until(runner, lambda: "ns/m-scheduler-abc" in runner.processes
                          and runner.processes["ns/m-scheduler-abc"].restarts == 1, 10)
        assert took > 0.9, "failures counted faster than one per periodSeconds"
        reasons = [reason for _, reason, _ in core.conditions("m-scheduler-abc")]
        assert "StartupProbeFailed" in reasons and reasons[-1] == "ProcessExited"
        assert "True" not in [status for status, _, _ in core.conditions("m-scheduler-abc")]
        # a plain sleep stops on SIGTERM: as a container runtime reports it, 128 + 15
        assert core.container_statuses("m-scheduler-abc")[-1]["lastState"]["terminated"]["exitCode"] == 143
    finally:
        stop_all(runner)


def test_probes_other_than_http_get_count_as_passing(tmp_path: Path, port: int) -> None:
    pod = probed_pod(port, readinessProbe={"tcpSocket": {"port": "http"}},
                     livenessProbe={"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 1},
                     startupProbe={"grpc": {"port": 9}, "failureThreshold": 1})
    runner, core = runner_for(tmp_path, pod)
    try:
        sync_until(runner, lambda: core.conditions("m-scheduler-abc")[-1:] == [
            ("True", "ProbeSucceeded", "readiness probe succeeded")], 5)
        for _ in range(15):
            runner.sync()
            time.sleep(0.1)
        assert runner.processes["ns/m-scheduler-abc"].restarts == 0
    finally:
        stop_all(runner)


def engine_pod(tmp_path: Path, ip: str) -> tuple[V1Pod, list[dict]]:
    """A decode pod as the operator renders it for examples/small.yaml (trtllm-serve), its probes' periods
    shortened to a second so that the test is quick, KWOK-started at `ip`."""
    m = example_model("small.yaml")
    objects = render_children(Target(name=m.metadata["name"], namespace="ns", uid="uid-1", spec=m.spec))
    sts = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["labels"]["app.kubernetes.io/component"] == "decode")
    template = yaml.safe_load(yaml.safe_dump(sts["spec"]["template"]))
    container = template["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"  # as rendered
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["periodSeconds"] = 1
    container["livenessProbe"]["failureThreshold"] = 2
    template["spec"]["terminationGracePeriodSeconds"] = 5
    pod = V1Pod.from_dict({
        "metadata": {**template["metadata"], "name": f"{sts['metadata']['name']}-0", "namespace": "ns", "uid": "uid-decode"},
        "spec": template["spec"],
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "False", "reason": "ReadinessProbePending"}],
                   "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                          "ready": False, "restartCount": 0, "started": True,
                                          "state": {"running": {"startedAt": "2020-01-01T00:00:00Z"}}}]}})
    return pod, objects


def test_an_engine_in_the_fatal_state_is_restarted_by_its_rendered_liveness_probe(tmp_path: Path) -> None:
    """The simulator's fatal state (`POST /_sim/fatal`, `--sim-fail-after`) answers /health 503 while the process
    runs on: the livenessProbe the operator renders restarts it, as a kubelet restarts such an engine."""
    ip = "127.64.211.7"
    pod, objects = engine_pod(tmp_path, ip)
    core = FakeCore()
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            core.cms[("ns", obj["metadata"]["name"])] = obj["data"]
    core.pods = [pod]
    runner = make_runner(tmp_path, core, tend=True, sim_args=["--sim-speed", "0"])
    key = f"ns/{pod.metadata.name}"
    port = pod.spec.containers[0].ports[0].container_port
    try:
        sync_until(runner, lambda: ready_now(core, pod.metadata.name) == ("True", "ProbeSucceeded"), 60)
        first = runner.processes[key].proc
        request = urllib.request.Request(f"http://{ip}:{port}/_sim/fatal", method="POST", data=json.dumps({}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as resp:
            assert resp.status < 300
        sync_until(runner, lambda: runner.processes[key].restarts == 1, 30)
        reasons = [reason for _, reason, _ in core.conditions(pod.metadata.name)]
        assert reasons[-3:] == ["ProbeFailed", "LivenessProbeFailed", "ProcessExited"], reasons
        assert first.poll() is not None
        sync_until(runner, lambda: ready_now(core, pod.metadata.name) == ("True", "ProbeSucceeded"), 60)
        assert core.container_statuses(pod.metadata.name)[-1]["restartCount"] == 1
    finally:
        stop_all(runner)
