"""The pod status the runner writes, as a kubelet's status manager writes it (no cluster: a fake API that applies
status patches as the API server does): the container's status (ready, started, restartCount, the running
process's start, the last termination and CrashLoopBackOff while a restart waits; CreateContainerConfigError for
a missing environment source) beside the Ready condition, every patch bound to the pod's uid, and a condition's
lastTransitionTime moved only when its status changes."""

from __future__ import annotations

import datetime
import http.server
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from baton.operator.status import failing_containers
from baton.podrunner.runner import LocalProcess, PodRunner
from kubernetes.client import ApiClient, V1Pod
from kubernetes.client.rest import ApiException
from test_podrunner_readiness import Health
from test_podrunner_sync import FakeCore, make_runner, scheduler_pod

KWOK_STARTED = "2020-01-02T03:04:05Z"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def kwok_started(pod: V1Pod, port: int | None = None) -> V1Pod:
    """`pod` as KWOK's baton-pod-ready stage leaves a probed pod: Running, not Ready (ReadinessProbePending), its
    container running but not ready (and the readinessProbe's port moved to `port`, a test server's)."""
    data = ApiClient().sanitize_for_serialization(pod)
    if port is not None:
        data["spec"]["containers"][0]["ports"][0]["containerPort"] = port
        data["status"]["podIP"] = "127.0.0.1"
    data["status"]["conditions"] = [
        {"type": kind, "status": "False", "reason": "ReadinessProbePending", "lastTransitionTime": KWOK_STARTED}
        for kind in ("ContainersReady", "Ready")]
    data["status"]["containerStatuses"] = [{
        "name": "scheduler", "image": "baton:1", "imageID": "kwok://baton@sha256:0123", "ready": False, "started": True,
        "restartCount": 0, "state": {"running": {"startedAt": KWOK_STARTED}}}]
    return V1Pod.from_dict(data)


@pytest.fixture
def health_port():
    Health.healthy = True
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def sleeper_translation(runner: PodRunner) -> None:
    """The pod's real translation (probes, grace period, container), but a plain sleep as its process."""
    translate = runner.translate

    def sleeping(pod: Any) -> LocalProcess:
        local = translate(pod)
        local.argv = list(SLEEPER)
        return local

    runner.translate = sleeping


def runner_for(tmp_path: Path, pod: V1Pod, argv: list[str] | None = None) -> tuple[PodRunner, FakeCore]:
    """A runner tending `pod` (a scheduler pod, its ConfigMap there) as a sleeper process, or as `argv`."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.pods = [pod]
    runner = make_runner(tmp_path, core, tend=True)
    sleeper_translation(runner)
    if argv is not None:
        translate = runner.translate

        def with_argv(pod):
            local = translate(pod)
            local.argv = list(argv)
            return local

        runner.translate = with_argv
    return runner, core


def ts(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def pod_dict(core: FakeCore, name: str) -> dict:
    return ApiClient().sanitize_for_serialization(next(p for p in core.pods if p.metadata.name == name))


def _until(predicate, runner: PodRunner, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        runner.sync()
        time.sleep(0.05)


def test_the_container_status_follows_the_process_as_the_kubelets_does(tmp_path: Path, health_port: int) -> None:
    runner, core = runner_for(tmp_path, kwok_started(scheduler_pod(), port=health_port))
    try:
        runner.sync()  # translated, started
        first = core.container_statuses("m-scheduler-abc")[-1]
        started_at = first["state"]["running"]["startedAt"]
        assert started_at != KWOK_STARTED
        assert first == {"name": "scheduler", "image": "baton:1", "imageID": "kwok://baton@sha256:0123", "ready": False,
                         "started": True, "restartCount": 0, "state": {"running": {"startedAt": started_at}},
                         "lastState": {}}, "KWOK's fields not kept, or the runner's not written"
        runner.sync()  # the readinessProbe passes: Ready, and the container ready, in one patch
        _, _, body = core.patches[-1]
        assert [c["status"] for c in body["status"]["conditions"]] == ["True", "True"]
        assert body["status"]["containerStatuses"][0]["ready"] is True
        assert body["metadata"] == {"uid": "u1"}

        runner.kill("ns", "m-scheduler-abc")
        runner.processes["ns/m-scheduler-abc"].proc.wait(timeout=10)
        runner.sync()
        _, _, body = core.patches[-1]
        assert body["status"]["conditions"][0]["reason"] == "ProcessExited"
        crashed = body["status"]["containerStatuses"][0]
        terminated = crashed["lastState"]["terminated"]
        assert crashed["ready"] is False and crashed["started"] is False and crashed["restartCount"] == 1
        assert terminated["exitCode"] == 137 and terminated["reason"] == "Error"  # SIGKILL, as a runtime reports it
        assert terminated["startedAt"] == started_at and terminated["finishedAt"] >= started_at
        assert crashed["state"] == {"waiting": {"reason": "CrashLoopBackOff", "message":
                                                "back-off 1s restarting failed container=scheduler pod=m-scheduler-abc_ns(u1)"}}
        # what the operator reads: the container cannot start; it restarted (a rollout's lost replica)
        assert failing_containers(pod_dict(core, "m-scheduler-abc")) == [
            "m-scheduler-abc: scheduler CrashLoopBackOff: back-off 1s restarting failed container=scheduler "
            "pod=m-scheduler-abc_ns(u1)"]

        _until(lambda: "running" in core.container_statuses("m-scheduler-abc")[-1]["state"], runner)
        again = core.container_statuses("m-scheduler-abc")[-1]
        assert again["restartCount"] == 1 and again["lastState"] == {"terminated": terminated}
        assert again["state"]["running"]["startedAt"] > started_at
        if not again["ready"]:  # running again, not ready yet: still said, not gone between two back-offs
            assert failing_containers(pod_dict(core, "m-scheduler-abc")) == [
                "m-scheduler-abc: scheduler restarted 1 time(s), last exit code 137 (Error)"]
        _until(lambda: core.container_statuses("m-scheduler-abc")[-1]["ready"], runner)
        assert failing_containers(pod_dict(core, "m-scheduler-abc")) == []  # ready again: nothing to say
        writes = len(core.patches)
        runner.sync()
        runner.sync()
        assert len(core.patches) == writes, "an unchanged status written again"
    finally:
        for local in runner.processes.values():
            runner._stop_process(local, grace_s=1.0)


def test_a_pod_that_cannot_run_shows_why_in_its_container_status(tmp_path: Path) -> None:
    """A missing ConfigMap key an environment variable needs: CreateContainerConfigError, as the kubelet
    reports it (and the operator shows it); a missing volume ConfigMap: ContainerCreating (the kubelet cannot
    mount the volume); a limit of the runner: waiting with reason CannotRunLocally."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.cms[("ns", "settings")] = {"A": "1"}
    core.pods = [
        kwok_started(scheduler_pod("env", "u-env", "127.64.0.6", env=[
            {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "missing"}}}])),
        kwok_started(scheduler_pod("volume", "u-vol", "127.64.0.7", config_map="absent")),
        kwok_started(scheduler_pod("limit", "u-lim", "127.64.0.8", env=[
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}])),
    ]
    runner = make_runner(tmp_path, core)
    runner.sync()
    waiting = {name: core.container_statuses(name)[-1]["state"]["waiting"] for name in ("env", "volume", "limit")}
    assert waiting["env"] == {"reason": "CreateContainerConfigError",
                              "message": "env K: ConfigMap ns/settings has no key 'missing'"}
    assert waiting["volume"] == {"reason": "ContainerCreating", "message": "ConfigMap ns/absent not found"}
    assert waiting["limit"]["reason"] == "CannotRunLocally" and "env CPU" in waiting["limit"]["message"]
    for name in ("env", "volume", "limit"):
        status = core.container_statuses(name)[-1]
        assert (status["ready"], status["started"], status["imageID"]) == (False, False, "kwok://baton@sha256:0123")
        assert core.conditions(name)[-1][:2] == ("False", "CannotRunLocally")
    assert failing_containers(pod_dict(core, "env")) == [
        "env: scheduler CreateContainerConfigError: env K: ConfigMap ns/settings has no key 'missing'"]
    assert failing_containers(pod_dict(core, "volume")) == []


def test_a_status_write_never_lands_on_a_replacement_pod_of_the_same_name(tmp_path: Path, health_port: int, caplog) -> None:
    """Every patch names the pod's uid, as the kubelet's do: a write meant for a pod that was just replaced by
    one of the same name (a StatefulSet's) is refused by the API server, and taken as the pod being gone."""
    core = FakeCore()
    old = kwok_started(scheduler_pod("m-decode-0", "old-uid"), port=health_port)
    core.pods = [kwok_started(scheduler_pod("m-decode-0", "new-uid"), port=health_port)]  # the replacement
    runner = make_runner(tmp_path, core, tend=True)
    local = LocalProcess(key="ns/m-decode-0", uid="old-uid", argv=list(SLEEPER), env={}, log_path=tmp_path / "p.log",
                         probe_url=f"http://127.0.0.1:{health_port}/readyz")
    caplog.set_level(logging.WARNING, logger="baton.podrunner")
    try:
        runner._tend(local, old)  # started: its container status written (refused)
        runner._tend(local, old)  # the old pod's process answers its probe: Ready (refused)
        assert local.ready is True, "a refused write (the pod is gone) is retried forever"
        assert core.patches == [], "a write meant for the replaced pod reached the replacement"
        new = pod_dict(core, "m-decode-0")
        assert [c["status"] for c in new["status"]["conditions"]] == ["False", "False"], "the replacement shows Ready"
        assert ts(new["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]) == ts(KWOK_STARTED)
        for status in (404, 409):
            core.fail_patch = [ApiException(status=status, reason="gone")]
            assert runner._set_ready("ns", "m-decode-0", False, "X", "y", uid="old-uid") is True
        assert caplog.records == [], "a pod that is gone is not worth a warning"
    finally:
        runner._stop_process(local, grace_s=1.0)


def test_a_condition_keeps_its_last_transition_time_while_its_status_stays(tmp_path: Path, health_port: int) -> None:
    runner, core = runner_for(tmp_path, kwok_started(scheduler_pod(), port=health_port))

    def ready() -> dict:
        return next(c for c in pod_dict(core, "m-scheduler-abc")["status"]["conditions"] if c["type"] == "Ready")

    try:
        Health.healthy = False
        runner.sync()  # Starting: still not Ready, as KWOK started it
        assert ready()["reason"] == "Starting" and ts(ready()["lastTransitionTime"]) == ts(KWOK_STARTED)
        runner.sync()  # ProbeFailed: still not Ready
        assert ready()["reason"] == "ProbeFailed" and ts(ready()["lastTransitionTime"]) == ts(KWOK_STARTED)
        Health.healthy = True
        runner.sync()
        assert ready()["status"] == "True" and ts(ready()["lastTransitionTime"]) > ts(KWOK_STARTED)
    finally:
        for local in runner.processes.values():
            runner._stop_process(local, grace_s=1.0)


def test_a_pod_waiting_for_a_departed_pods_process_at_its_ip_says_so(tmp_path: Path) -> None:
    """A new pod that got the IP of a pod deleted a moment ago is not started while that pod's process still
    stops (it would still answer there): it shows why it waits."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.pods = [kwok_started(scheduler_pod("m-decode-1", "new", "127.64.0.40"))]
    runner = make_runner(tmp_path, core)
    runner._stopping.append(LocalProcess(key="ns/m-decode-0", uid="old", argv=[], env={}, probe_url=None,
                                         log_path=tmp_path / "old.log", pod_ip="127.64.0.40"))
    runner.sync()
    runner.sync()
    assert "ns/m-decode-1" not in runner.processes
    assert core.conditions("m-decode-1") == [("False", "PreviousPodStopping", "waiting for the process of departed "
                                              "pod ns/m-decode-0, which had this pod's IP 127.64.0.40, to stop")]
    assert core.container_statuses("m-decode-1")[-1]["state"]["waiting"]["reason"] == "ContainerCreating"
    runner._stopping.clear()
    runner.sync()
    assert "ns/m-decode-1" in runner.processes
