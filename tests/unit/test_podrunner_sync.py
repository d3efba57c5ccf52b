"""The pod runner's passes against a fake API (no cluster): ConfigMap and Secret volumes kept up to date as
the kubelet keeps them, one pod's failure contained to that pod, the environment resolved as Kubernetes resolves it,
status writes retried, process exits shown, probes that never go through a proxy."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from baton.podrunner import runner as podrunner
from baton.podrunner.runner import LocalProcess, PodRunner
from proxy_harness import environment_proxy
from kubernetes.client import ApiClient, V1ConfigMap, V1Pod
from kubernetes.client.rest import ApiException


class FakeCore:
    """The CoreV1Api calls the runner makes, in memory."""

    def __init__(self) -> None:
        self.pods: list[V1Pod] = []
        self.cms: dict[tuple[str, str], dict[str, str]] = {}
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.patches: list[tuple[str, str, dict]] = []
        self.fail_patch: list[Exception] = []
        self.annotations: dict[str, dict[str, str]] = {}

    def list_namespaced_pod(self, namespace, label_selector=None):
        return SimpleNamespace(items=[p for p in self.pods if p.metadata.namespace == namespace])

    def list_pod_for_all_namespaces(self, label_selector=None):
        return SimpleNamespace(items=list(self.pods))

    def read_namespaced_config_map(self, name, namespace):
        if (namespace, name) not in self.cms:
            raise ApiException(status=404, reason="Not Found")
        return V1ConfigMap.from_dict({"metadata": {"name": name, "namespace": namespace}, "data": self.cms[(namespace, name)]})

    def read_namespaced_secret(self, name, namespace):
        if (namespace, name) not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[(namespace, name)].items()}
        return SimpleNamespace(data=data)

    def patch_namespaced_pod_status(self, name, namespace, body, **request_options):
        """As the API server applies a strategic-merge patch of a pod's status: conditions merged by type,
        containerStatuses (an atomic list) replaced whole; refused (422) when the patch names another uid
        than the pod's (a listed pod; one that is not listed is only recorded)."""
        if self.fail_patch:
            raise self.fail_patch.pop(0)
        index = next((i for i, p in enumerate(self.pods) if p.metadata.name == name and p.metadata.namespace == namespace), None)
        uid = (body.get("metadata") or {}).get("uid")
        if index is not None and uid is not None and uid != self.pods[index].metadata.uid:
            refused = ApiException(status=422, reason="Unprocessable Entity")
            refused.body = json.dumps({"kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422, "message":
                                       f'Pod "{name}" is invalid: metadata.uid: Invalid value: "{uid}": field is immutable'})
            raise refused
        self.patches.append((namespace, name, body))
        if index is not None:
            pod = ApiClient().sanitize_for_serialization(self.pods[index])
            status = pod.setdefault("status", {})
            conditions = {c["type"]: c for c in status.get("conditions") or []}
            for condition in body["status"].get("conditions") or []:
                conditions[condition["type"]] = {**conditions.get(condition["type"], {}), **condition}
            status["conditions"] = list(conditions.values())
            if "containerStatuses" in body["status"]:
                status["containerStatuses"] = body["status"]["containerStatuses"]
            self.pods[index] = V1Pod.from_dict(pod)

    def patch_namespace(self, namespace, body, **request_options):
        annotations = self.annotations.setdefault(namespace, {})
        for key, value in body["metadata"]["annotations"].items():
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value

    def read_namespace(self, namespace, **request_options):
        return SimpleNamespace(metadata=SimpleNamespace(name=namespace, annotations=dict(self.annotations.get(namespace, {}))))

    def list_namespace(self, **request_options):
        return SimpleNamespace(items=[self.read_namespace(namespace) for namespace in self.annotations])

    def conditions(self, name: str) -> list[tuple[str, str, str]]:
        """(status, reason, message) of every Ready write to pod `name`, in order."""
        return [(c["status"], c["reason"], c["message"]) for _, n, body in self.patches if n == name
                for c in body["status"].get("conditions") or [] if c["type"] == "Ready"]

    def container_statuses(self, name: str) -> list[dict]:
        """The entry of the (one) container in every containerStatuses write to pod `name`, in order."""
        return [body["status"]["containerStatuses"][0] for _, n, body in self.patches
                if n == name and "containerStatuses" in body["status"]]


def scheduler_pod(name: str = "m-scheduler-abc", uid: str = "u1", ip: str = "127.64.0.5", *, config_map: str = "m-scheduler",
                  optional: bool | None = None, env: list[dict] | None = None, env_from: list[dict] | None = None,
                  args: list[str] | None = None, redis_secret: str | None = None) -> V1Pod:
    volume: dict[str, Any] = {"name": config_map}
    if optional is not None:
        volume["optional"] = optional
    container: dict[str, Any] = {
        "name": "scheduler", "image": "baton:1", "command": ["baton", "scheduler"],
        "args": args or ["--config", "/etc/baton/scheduler/config.yaml", "--host", "$(POD_IP)", "--port", "8000"],
        "env": env if env is not None else [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "failureThreshold": 2},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/baton/scheduler"}],
    }
    if env_from is not None:
        container["envFrom"] = env_from
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": volume}]
    if redis_secret is not None:  # as the operator renders spec.scheduler.degradation.redisUrlSecret
        container["volumeMounts"].append({"name": "redis-url", "mountPath": "/etc/baton/redis-url", "readOnly": True})
        volumes.append({"name": "redis-url",
                        "secret": {"secretName": redis_secret, "items": [{"key": "url", "path": "url"}]}})
    return V1Pod.from_dict({
        "metadata": {"name": name, "namespace": "ns", "uid": uid,
                     "labels": {"app.kubernetes.io/managed-by": "baton-operator", "baton.dev/tier": "scheduler"}},
        "spec": {"containers": [container], "volumes": volumes},
        "status": {"phase": "Running", "podIP": ip}})


def make_runner(tmp_path: Path, core: FakeCore, *, tend: bool = False, **kwargs: Any) -> PodRunner:
    runner = PodRunner(ApiClient(), tmp_path / "work", namespace="ns", **kwargs)
    runner.core = core
    if not tend:
        runner._tend = lambda local, pod: None  # no real process
    return runner


def config_path(runner: PodRunner, key: str) -> Path:
    argv = runner.processes[key].argv
    return Path(argv[argv.index("--config") + 1])


def test_a_config_map_update_replaces_the_file_atomically_and_is_localised_again(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "org" / "m").mkdir(parents=True)
    (models / "org" / "m" / "tokenizer.json").write_text("{}")
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\ntokenizer: {huggingFaceId: org/m}\nrouting: {x: 1}\n",
                                       "extra.txt": "gone soon"}
    core.pods = [scheduler_pod()]
    runner = make_runner(tmp_path, core, models_root=models)
    runner.sync()
    cfg = config_path(runner, "ns/m-scheduler-abc")
    first = yaml.safe_load(cfg.read_text())
    assert first["routing"] == {"x": 1} and first["tokenizer"] == {"path": str(models / "org" / "m")}
    assert (cfg.parent / "extra.txt").read_text() == "gone soon"
    inode = cfg.stat().st_ino

    runner.sync()  # nothing changed: nothing rewritten
    assert cfg.stat().st_ino == inode

    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\ntokenizer: {huggingFaceId: org/m}\nrouting: {x: 2}\n"}
    runner.sync()
    second = yaml.safe_load(cfg.read_text())
    assert second["routing"] == {"x": 2}, "the ConfigMap update never reached the process's file"
    assert second["tokenizer"] == {"path": str(models / "org" / "m")}, "the new content was not localised"
    assert cfg.stat().st_ino != inode, "not replaced by a rename (a reader could see a half-written file)"
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.yaml"], "removed key kept, or a temp file left"


def test_a_secret_volume_is_materialised_kept_up_to_date_and_named_by_the_localised_config(tmp_path: Path) -> None:
    """The redis URL Secret: its file exists where the scheduler's config (localised) says, and a rotated
    Secret replaces it as the kubelet would, so the running scheduler can pick the new URL up."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {
        "config.yaml": "model: m\ndegradation: {store: redis, redisUrlFile: /etc/baton/redis-url/url}\n"}
    core.secrets[("ns", "hold-store")] = {"url": "redis://:pw1@127.0.0.1:6379/0", "other": "not mounted"}
    core.pods = [scheduler_pod(redis_secret="hold-store")]
    runner = make_runner(tmp_path, core)
    runner.sync()
    config = yaml.safe_load(config_path(runner, "ns/m-scheduler-abc").read_text())
    url_file = Path(config["degradation"]["redisUrlFile"])
    assert url_file.is_relative_to(runner.workdir) and url_file.read_text() == "redis://:pw1@127.0.0.1:6379/0"
    assert sorted(p.name for p in url_file.parent.iterdir()) == ["url"], "only the key the volume names"
    inode = url_file.stat().st_ino

    core.secrets[("ns", "hold-store")] = {"url": "redis://:pw2@127.0.0.1:6380/0"}  # rotated
    runner.sync()
    assert url_file.read_text() == "redis://:pw2@127.0.0.1:6380/0", "the rotation never reached the file"
    assert url_file.stat().st_ino != inode, "not replaced by a rename"

    assert url_file.stat().st_mode & 0o077 == 0, "a Secret's copy readable by other users"

    core.secrets[("ns", "hold-store")] = {"dsn": "redis://elsewhere:6379/0"}  # the key is gone: the file stays
    runner.sync()
    assert url_file.read_text() == "redis://:pw2@127.0.0.1:6380/0"
    assert "ns/m-scheduler-abc" in runner.processes

    # one volume that cannot be read does not hold the others back
    del core.cms[("ns", "m-scheduler")]
    core.secrets[("ns", "hold-store")] = {"url": "redis://:pw3@127.0.0.1:6381/0"}
    runner.sync()
    assert url_file.read_text() == "redis://:pw3@127.0.0.1:6381/0"
    assert runner.processes["ns/m-scheduler-abc"].refresh_error == "ConfigMap ns/m-scheduler not found"
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}

    core.pods.append(scheduler_pod("m-scheduler-new", "u2", "127.64.0.9", redis_secret="no-such-secret"))
    runner.sync()
    assert "ns/m-scheduler-new" not in runner.processes
    assert core.conditions("m-scheduler-new") == [("False", "CannotRunLocally", "Secret ns/no-such-secret not found")]


def test_one_pods_missing_config_map_is_that_pods_problem_only(tmp_path: Path) -> None:
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.pods = [scheduler_pod("a-bad", "ua", "127.64.0.6", config_map="missing-cm"),
                 scheduler_pod("b-optional", "ub", "127.64.0.7", config_map="absent-optional", optional=True),
                 scheduler_pod("c-good", "uc", "127.64.0.8")]
    runner = make_runner(tmp_path, core)
    runner.sync()
    runner.sync()
    assert sorted(runner.processes) == ["ns/b-optional", "ns/c-good"]
    assert core.conditions("a-bad") == [("False", "CannotRunLocally", "ConfigMap ns/missing-cm not found")], \
        "written once, with the reason"

    core.cms[("ns", "missing-cm")] = {"config.yaml": "model: m\n"}  # it appears: the pod runs
    runner.sync()
    assert "ns/a-bad" in runner.processes and core.conditions("a-bad")[-1][1] == "Starting"


def test_the_environment_and_arguments_are_expanded_as_kubernetes_does(tmp_path: Path) -> None:
    assert podrunner.expand("$$(A)|$$|$(A)|$(B)|$(|$x|$", {"A": "1"}) == "$(A)|$|1|$(B)|$(|$x|$"
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.cms[("ns", "settings")] = {"LEVEL": "debug", "MODE": "fast"}
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "LITERAL", "value": "$$(POD_IP)"},
           {"name": "DOLLARS", "value": "pa$$word"},
           {"name": "URL", "value": "http://$(POD_IP):$(PORT)"},
           {"name": "EMPTY"},
           {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LEVEL"}}},
           {"name": "NOPE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "nope", "optional": True}}}]
    args = ["--config", "/etc/baton/scheduler/config.yaml", "--host", "$(POD_IP)", "--x", "$$(POD_IP)", "--y", "$(S_MODE)"]
    pod = scheduler_pod(env=env, env_from=[{"prefix": "S_", "configMapRef": {"name": "settings"}}], args=args)
    local = make_runner(tmp_path, core).translate(pod)
    got = {k: local.env.get(k, "<unset>") for k in ("POD_IP", "NAME", "NS", "LITERAL", "DOLLARS", "URL", "EMPTY",
                                                     "LEVEL", "NOPE", "S_MODE")}
    assert got == {"POD_IP": "127.64.0.5", "NAME": "m-scheduler-abc", "NS": "ns", "LITERAL": "$(POD_IP)",
                   "DOLLARS": "pa$word", "URL": "http://127.64.0.5:$(PORT)", "EMPTY": "", "LEVEL": "debug",
                   "NOPE": "<unset>", "S_MODE": "fast"}
    assert local.argv[-6:] == ["--host", "127.64.0.5", "--x", "$(POD_IP)", "--y", "fast"]


def test_an_environment_source_the_runner_cannot_resolve_is_written_to_the_pod(tmp_path: Path) -> None:
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.pods = [
        scheduler_pod("a", "ua", "127.64.0.6", env=[{"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]),
        scheduler_pod("b", "ub", "127.64.0.7", env=[{"name": "K", "valueFrom": {"configMapKeyRef": {"name": "none", "key": "k"}}}]),
        scheduler_pod("c", "uc", "127.64.0.8", env=[{"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "spec.unknown"}}}]),
    ]
    runner = make_runner(tmp_path, core)
    runner.sync()
    assert runner.processes == {}
    assert [core.conditions(n)[0][1] for n in "abc"] == ["CannotRunLocally"] * 3
    assert "env CPU" in core.conditions("a")[0][2] and "ConfigMap ns/none not found" in core.conditions("b")[0][2]
    assert "spec.unknown" in core.conditions("c")[0][2]


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_ready_write_that_fails_is_made_again_on_the_next_pass(tmp_path: Path, health_server) -> None:
    core = FakeCore()
    runner = make_runner(tmp_path, core, tend=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        local = LocalProcess(key="ns/p", uid="u", argv=[], env={}, log_path=tmp_path / "p.log",
                             probe_url=f"http://127.0.0.1:{health_server.server_port}/")
        local.proc = proc
        pod = SimpleNamespace(metadata=SimpleNamespace(namespace="ns", name="p"))
        core.fail_patch = [ApiException(status=500, reason="etcdserver: request timed out")]
        runner._tend(local, pod)
        assert local.ready is None and core.conditions("p") == []
        runner._tend(local, pod)
        runner._tend(local, pod)
        assert core.conditions("p") == [("True", "ProbeSucceeded", "readiness probe succeeded")]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_process_exit_shows_in_the_pod_and_the_log_even_before_it_was_ever_ready(tmp_path: Path, caplog) -> None:
    core = FakeCore()
    runner = make_runner(tmp_path, core, tend=True)
    code = "import sys, time; print('bad config: no model', flush=True); time.sleep(0.3); sys.exit(2)"
    local = LocalProcess(key="ns/p", uid="u", argv=[sys.executable, "-c", code], env={}, log_path=tmp_path / "p.log",
                         probe_url="http://127.0.0.1:9/health")  # nothing listens: the probe fails
    pod = SimpleNamespace(metadata=SimpleNamespace(namespace="ns", name="p"))
    caplog.set_level(logging.INFO, logger="baton.podrunner")
    try:
        runner._tend(local, pod)  # starts it
        assert local.proc is not None and local.pidfile is not None and local.pidfile.exists()
        runner._tend(local, pod)  # first probe fails while it still runs
        assert core.conditions("p")[-1][1] == "ProbeFailed"
        local.proc.wait(timeout=20)
        runner._tend(local, pod)
        status, reason, message = core.conditions("p")[-1]
        assert (status, reason) == ("False", "ProcessExited")
        assert "code 2" in message and str(local.log_path) in message and "bad config: no model" in message
        assert any("exited with code 2" in r.getMessage() for r in caplog.records)
        assert local.pidfile is None and not list(runner.pid_dir.glob("*.json"))
    finally:
        runner._stop_process(local, grace_s=2)


def test_probes_never_go_through_a_proxy(monkeypatch, health_server) -> None:
    with environment_proxy(monkeypatch) as hits:
        assert PodRunner._probe(f"http://127.0.0.1:{health_server.server_port}/health", 2.0)
        assert hits == []


def test_a_pod_at_a_non_loopback_ip_is_left_alone(tmp_path: Path, caplog) -> None:
    """A pod a real node runs (its IP is not a loopback address): never run here, its status never written."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.pods = [scheduler_pod("real", "ur", "10.0.3.7"), scheduler_pod("local", "ul", "127.64.0.8")]
    runner = make_runner(tmp_path, core)
    caplog.set_level(logging.WARNING, logger="baton.podrunner")
    runner.sync()
    runner.sync()
    assert sorted(runner.processes) == ["ns/local"]
    assert core.conditions("real") == [], "the status of a pod this runner does not run was written"
    assert [r.getMessage() for r in caplog.records if "ns/real" in r.getMessage()] == [
        "ns/real left alone: its IP 10.0.3.7 is not a loopback address, so a real node runs it, not this runner"]


def test_a_process_does_not_inherit_the_in_cluster_api_server_address(tmp_path: Path, monkeypatch) -> None:
    """Run inside a pod, the runner has KUBERNETES_SERVICE_*/KUBERNETES_PORT*: a scheduler inheriting them
    would take the in-cluster configuration (a ClusterIP nothing here routes) over its KUBECONFIG."""
    for name, value in {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
                        "KUBERNETES_SERVICE_PORT_HTTPS": "443", "KUBERNETES_PORT": "tcp://10.96.0.1:443",
                        "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.1", "BATON_TEST_INHERITED": "yes"}.items():
        monkeypatch.setenv(name, value)
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "KUBERNETES_PORT", "value": "set-by-the-pod"}]
    local = make_runner(tmp_path, core, kubeconfig="/k/config").translate(scheduler_pod(env=env))
    assert sorted(k for k in local.env if k.startswith("KUBERNETES")) == ["KUBERNETES_PORT"]
    assert local.env["KUBERNETES_PORT"] == "set-by-the-pod", "the pod's own variable is the pod's"
    assert local.env["BATON_TEST_INHERITED"] == "yes" and local.env["KUBECONFIG"] == "/k/config"


def test_a_sub_path_mount_is_the_one_file_it_names_and_is_not_updated(tmp_path: Path) -> None:
    """As the kubelet mounts it: the file of that key at the mount path (not a directory of every key), and
    never updated afterwards."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n", "other.txt": "not mounted"}
    pod = scheduler_pod()
    mount = pod.spec.containers[0].volume_mounts[0]
    mount.mount_path, mount.sub_path = "/etc/baton/scheduler/config.yaml", "config.yaml"
    core.pods = [pod]
    runner = make_runner(tmp_path, core)
    runner.sync()
    cfg = config_path(runner, "ns/m-scheduler-abc")
    assert cfg.is_file() and cfg.read_text() == "model: m\n"
    assert [p.name for p in (runner.workdir / "ns").rglob("other.txt")] == [], "a key the mount does not name"

    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: changed\n"}
    runner.sync()
    assert cfg.read_text() == "model: m\n", "a subPath mount was updated (the kubelet never updates one)"

    missing = scheduler_pod("m-scheduler-new", "u2", "127.64.0.9")
    mount = missing.spec.containers[0].volume_mounts[0]
    mount.mount_path, mount.sub_path = "/etc/baton/scheduler/config.yaml", "nope.yaml"
    core.pods.append(missing)
    runner.sync()
    assert "ns/m-scheduler-new" not in runner.processes
    assert core.conditions("m-scheduler-new") == [(
        "False", "CannotRunLocally", "ConfigMap ns/m-scheduler has no file 'nope.yaml' for the subPath of its "
        "mount at /etc/baton/scheduler/config.yaml (its files: config.yaml)")]


def test_a_replaced_pods_process_log_is_kept_while_its_process_may_still_write_to_it(tmp_path: Path) -> None:
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.pods = [scheduler_pod("m-scheduler-0", "u1", "127.64.0.5")]
    runner = make_runner(tmp_path, core)
    runner.sync()
    log_path = runner.processes["ns/m-scheduler-0"].log_path
    with open(log_path, "ab") as old_process:  # the old pod's process, still writing as it stops
        old_process.write(b"old: serving\n")
        old_process.flush()
        core.pods = [scheduler_pod("m-scheduler-0", "u2", "127.64.0.6")]  # replaced: same name, new pod
        runner.sync()
        assert runner.processes["ns/m-scheduler-0"].uid == "u2"
        old_process.write(b"old: stopped\n")
    assert (log_path.parent / "process.previous.log").read_bytes() == b"old: serving\nold: stopped\n"
    assert not log_path.exists(), "the new pod's process starts a log of its own"


def test_a_volume_whose_new_content_cannot_be_localised_holds_no_other_volume_back(tmp_path: Path) -> None:
    """The scheduler's ConfigMap changes to a tokenizer the runner cannot localise: that volume keeps its files
    (as a kubelet keeps a volume it cannot update), and the rotated Secret still reaches its file."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\ndegradation: {store: redis, redisUrlFile: /etc/baton/redis-url/url}\n"}
    core.secrets[("ns", "hold-store")] = {"url": "redis://:pw1@127.0.0.1:6379/0"}
    core.pods = [scheduler_pod(redis_secret="hold-store")]
    runner = make_runner(tmp_path, core, models_root=tmp_path / "models")
    runner.sync()
    cfg = config_path(runner, "ns/m-scheduler-abc")
    before = cfg.read_text()
    url_file = Path(yaml.safe_load(before)["degradation"]["redisUrlFile"])

    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\ntokenizer: {huggingFaceId: org/absent}\n"
                                                      "degradation: {store: redis, redisUrlFile: /etc/baton/redis-url/url}\n"}
    core.secrets[("ns", "hold-store")] = {"url": "redis://:pw2@127.0.0.1:6380/0"}
    runner.sync()
    assert url_file.read_text() == "redis://:pw2@127.0.0.1:6380/0", "the Secret's update was held back"
    assert cfg.read_text() == before, "a file the runner could not localise was replaced"
    assert "Hugging Face Hub" in runner.processes["ns/m-scheduler-abc"].refresh_error


def test_a_pod_whose_translation_fails_in_any_way_is_told_so(tmp_path: Path) -> None:
    """Not only a RuntimeError: a scheduler ConfigMap that is not YAML, a trtllm-serve container without
    arguments; each pod is unready with reason CannotRunLocally and why, the others run."""
    core = FakeCore()
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    core.cms[("ns", "broken")] = {"config.yaml": "model: [m\n"}
    engine = ApiClient().sanitize_for_serialization(scheduler_pod("engine", "ue", "127.64.0.8"))
    engine["spec"]["containers"][0].update(command=["trtllm-serve"], args=[])
    core.pods = [scheduler_pod("yaml", "uy", "127.64.0.6", config_map="broken"), V1Pod.from_dict(engine),
                 scheduler_pod("good", "ug", "127.64.0.7")]
    runner = make_runner(tmp_path, core)
    runner.sync()
    assert sorted(runner.processes) == ["ns/good"]
    status, reason, message = core.conditions("yaml")[-1]
    assert (status, reason) == ("False", "CannotRunLocally") and "while parsing a flow sequence" in message, message
    assert core.conditions("engine")[-1] == ("False", "CannotRunLocally",
                                             "the trtllm-serve container has no arguments: it names no model")


def test_a_probe_answered_with_garbage_is_a_failed_probe(tmp_path: Path) -> None:
    """http.client's own errors (a status line that is not HTTP) fail the probe; they must not escape it."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        assert PodRunner._probe(f"http://127.0.0.1:{listener.getsockname()[1]}/health", 2.0) is False
    finally:
        listener.close()
