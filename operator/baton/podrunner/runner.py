"""Run local processes for Baton pods that KWOK placed on fake nodes (test and demo infrastructure).

On the local cluster nothing executes containers. For every Running pod of a Baton tier or scheduler
this runner starts what the container would run, as a real process on this machine:
- a TensorRT-LLM container (`trtllm-serve ...`) becomes `baton engine-sim ...` with the same
  arguments, its model directory resolved locally;
- the scheduler container (`baton scheduler ...`) runs as is, its model tokenizer (if it counts with
  one) resolved locally as the engines' model directory is.
The process gets the container's environment (downward-API fields resolved from the pod), its
ConfigMap volumes materialised as files (paths in the arguments rewritten to them), and binds the
pod's own IP (a loopback address) and container port. The container's readinessProbe is run against
the process and its result written to the pod's Ready condition, so EndpointSlices, and therefore
the scheduler and the operator, see exactly the processes that can serve. As the kubelet does, a
Ready pod turns unready only after the probe's `failureThreshold` consecutive failures (a process that
exits does at once); probes run every runner pass (faster than `periodSeconds`, so tests stay quick)
with a timeout of at most `PROBE_TIMEOUT_S`, since one thread probes every pod. When the pod goes away
the process is stopped; when the process dies it is restarted with back-off, like a kubelet would.

Before running anything the runner claims its namespace (or every namespace), so that the local
cluster's readiness stand-in (`baton.devcluster.readiness`) leaves these pods alone: KWOK starts a
probed pod not Ready, and only this runner's probe of the pod's own process turns it Ready. A pod that
takes over the IP of one deleted a moment ago is never Ready while the old process still answers
there: each pass stops the processes of departed pods before it starts new ones.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from baton.model_tokenizer import TOKENIZER_FILE

log = logging.getLogger("baton.podrunner")

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
TIER_LABEL = "baton.dev/tier"
PROBE_TIMEOUT_S = 1.0
MANAGED_BY = "baton-operator"
# A runner claims the namespace it runs (annotation on it), or every namespace (annotation on
# CLAIM_HOLDER_NAMESPACE), before it runs anything: the devcluster's readiness stand-in then leaves
# the readiness of those pods to the runner's probes (see baton.devcluster.readiness).
CLAIM_ANNOTATION = "baton.dev/pod-runner"
ALL_NAMESPACES_CLAIM = "baton.dev/pod-runner-all-namespaces"
CLAIM_HOLDER_NAMESPACE = "kube-system"


def runs_locally(labels: dict[str, str]) -> bool:
    """The pods a runner runs as local processes: Baton's tiers and scheduler."""
    return labels.get("app.kubernetes.io/managed-by") == MANAGED_BY and TIER_LABEL in labels


def packaged_models_root() -> Path:
    return Path(str(resources.files("baton.podrunner") / "models"))


def trtllm_version_from_image(image: str) -> str | None:
    """`nvcr.io/nvidia/tensorrt-llm/release:1.2.0` -> `1.2.0` (the image decides the version)."""
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    return tag if re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+[a-z0-9.+-]*", tag) else None


@dataclass
class LocalProcess:
    key: str  # namespace/name
    uid: str
    argv: list[str]
    env: dict[str, str]
    probe_url: str | None
    log_path: Path
    probe_timeout_s: float = PROBE_TIMEOUT_S
    failure_threshold: int = 3  # consecutive failed probes that make a Ready pod unready
    probe_failures: int = 0
    proc: subprocess.Popen | None = None
    ready: bool | None = None
    restarts: int = 0
    next_start: float = 0.0
    last_failure: str = ""


@dataclass
class PodRunner:
    """Watches Baton pods and keeps one local process per Running pod."""

    api_client: Any
    workdir: Path
    namespace: str | None = None
    models_root: Path = field(default_factory=packaged_models_root)
    sim_args: list[str] = field(default_factory=list)
    kubeconfig: str | None = None
    processes: dict[str, LocalProcess] = field(default_factory=dict)
    unrunnable: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(self.api_client)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._claimed = False
        self._identity = f"{socket.gethostname()}/{os.getpid()}/{id(self):x}"
        self.workdir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ translation

    def _resolve_env(self, pod: Any, container: Any) -> dict[str, str]:
        env: dict[str, str] = {}
        field_values = {
            "status.podIP": pod.status.pod_ip or "",
            "status.hostIP": pod.status.host_ip or "",
            "metadata.name": pod.metadata.name,
            "metadata.namespace": pod.metadata.namespace,
            "spec.nodeName": pod.spec.node_name or "",
        }
        for item in container.env or []:
            if item.value is not None:
                env[item.name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), item.value)
            elif item.value_from and item.value_from.field_ref:
                env[item.name] = field_values.get(item.value_from.field_ref.field_path, "")
            elif item.value_from and item.value_from.secret_key_ref:
                continue  # secrets (e.g. HF_TOKEN) are not needed by local stand-ins
        return env

    def _materialise_config_maps(self, pod: Any, container: Any, root: Path) -> dict[str, Path]:
        """Write the container's ConfigMap mounts under `root`; return mountPath -> local directory."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts: dict[str, Path] = {}
        for mount in container.volume_mounts or []:
            volume = volumes.get(mount.name)
            if not volume or not volume.config_map:
                continue
            cm = self.core.read_namespaced_config_map(volume.config_map.name, pod.metadata.namespace)
            target = root / mount.mount_path.strip("/")
            target.mkdir(parents=True, exist_ok=True)
            for name, content in (cm.data or {}).items():
                (target / name).write_text(content)
            mounts[mount.mount_path.rstrip("/")] = target
        return mounts

    def _mounted_path(self, pod: Any, container: Any, path: str) -> Path | None:
        """The local directory behind `path` in the container, when a hostPath mount holds it (None when
        no mount does); RuntimeError for a PVC, which the local cluster has nothing to back."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        for mount in container.volume_mounts or []:
            if path == mount.mount_path or path.startswith(mount.mount_path.rstrip("/") + "/"):
                volume = volumes.get(mount.name)
                if volume and volume.host_path:
                    return Path(volume.host_path.path) / path[len(mount.mount_path):].lstrip("/")
                if volume and volume.persistent_volume_claim:
                    raise RuntimeError("PVC model sources are not supported on the local cluster; use hostPath or huggingFace")
        return None

    def _model_dir(self, pod: Any, container: Any, model_arg: str) -> Path:
        mounted = self._mounted_path(pod, container, model_arg)
        if mounted is not None:
            return mounted
        candidate = self.models_root / model_arg
        if (candidate / "config.json").exists():
            return candidate
        raise RuntimeError(f"no local config.json for model {model_arg!r} under {self.models_root}")

    def _localise_tokenizer(self, pod: Any, container: Any, config_file: Path) -> None:
        """Point the scheduler's `tokenizer` section (`spec.scheduler.tokenizer: model`) at a local copy
        of the model's tokenizer, in the runner's own copy of the config file: the checkpoint's hostPath
        directory, or for a Hugging Face model that id's directory under the models root, since the local
        cluster has no way out to the Hub (nothing here may connect beyond loopback)."""
        if not config_file.is_file():
            return
        config = yaml.safe_load(config_file.read_text()) or {}
        section = config.get("tokenizer") or {}
        if section.get("path"):
            local = self._mounted_path(pod, container, section["path"])
            if local is None:
                raise RuntimeError(f"the scheduler's tokenizer path {section['path']} is on no hostPath mount of its pod")
        elif section.get("huggingFaceId"):
            local = self.models_root / section["huggingFaceId"]
            if not (local / TOKENIZER_FILE).is_file():
                raise RuntimeError(
                    f"the scheduler would fetch the tokenizer of {section['huggingFaceId']} from the Hugging Face Hub, "
                    f"which the local cluster cannot reach: put its tokenizer.json (and tokenizer_config.json) "
                    f"in {local} (under the runner's --models-root), use a hostPath model source, "
                    f"or set spec.scheduler.tokenizer: estimate")
        else:
            return
        config["tokenizer"] = {"path": str(local)}
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def translate(self, pod: Any) -> LocalProcess:
        """The local process standing in for `pod`'s main container."""
        container = pod.spec.containers[0]
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        root = self.workdir / pod.metadata.namespace / pod.metadata.name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        env = self._resolve_env(pod, container)
        mounts = self._materialise_config_maps(pod, container, root)

        def expand(arg: str) -> str:
            arg = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
            for mount_path, local in mounts.items():
                if arg == mount_path or arg.startswith(mount_path + "/"):
                    return str(local) + arg[len(mount_path):]
            return arg

        command = [expand(a) for a in (container.command or [])]
        args = [expand(a) for a in (container.args or [])]
        if command[:1] == ["trtllm-serve"]:
            model_dir = self._model_dir(pod, container, args[0])
            argv = [sys.executable, "-m", "baton.cli", "engine-sim", str(model_dir), *args[1:], *self.sim_args]
            version = trtllm_version_from_image(container.image or "")
            if version and "--sim-trtllm-version" not in self.sim_args:
                argv += ["--sim-trtllm-version", version]
            argv += ["--sim-model-name", args[0]]
            # Fault injection for tests: extra simulator flags from the pod's own environment.
            argv += env.get("BATON_SIM_ARGS", "").split()
        elif command[:2] == ["baton", "scheduler"]:
            if "--config" in args[:-1]:
                self._localise_tokenizer(pod, container, Path(args[args.index("--config") + 1]))
            argv = [sys.executable, "-m", "baton.cli", "scheduler", *args]
            # The API server refuses loopback addresses in EndpointSlices, so on this cluster the
            # scheduler reads readiness from the pods its Services select instead.
            env["BATON_DISCOVERY_SOURCE"] = "pods"
        else:
            raise RuntimeError(f"container command {command!r} has no local stand-in")
        probe = container.readiness_probe
        probe_url = None
        failure_threshold, probe_timeout_s = 3, PROBE_TIMEOUT_S  # the kubelet's defaults: 3, 1 s
        if probe:
            failure_threshold = max(1, probe.failure_threshold or 3)
            probe_timeout_s = min(PROBE_TIMEOUT_S, probe.timeout_seconds or 1)
        if probe and probe.http_get:
            port = probe.http_get.port
            if isinstance(port, str) and not port.isdigit():
                port = next(p.container_port for p in container.ports or [] if p.name == port)
            probe_url = f"http://{pod.status.pod_ip}:{port}{probe.http_get.path or '/'}"
        proc_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc_env.update(env)
        proc_env["NO_PROXY"] = proc_env["no_proxy"] = "127.0.0.1,localhost"
        if self.kubeconfig:
            proc_env["KUBECONFIG"] = self.kubeconfig  # what a pod gets from its ServiceAccount
        return LocalProcess(key=key, uid=pod.metadata.uid, argv=argv, env=proc_env, probe_url=probe_url,
                            log_path=root / "process.log", probe_timeout_s=probe_timeout_s,
                            failure_threshold=failure_threshold)

    # ------------------------------------------------------------------ lifecycle

    def _wanted(self, pod: Any) -> bool:
        return (
            runs_locally(pod.metadata.labels or {})
            and pod.metadata.deletion_timestamp is None
            and pod.status.phase == "Running"
            and bool(pod.status.pod_ip)
        )

    def sync(self) -> None:
        """One pass: start processes for new pods, stop those whose pods are gone, probe the rest."""
        if self.namespace:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=TIER_LABEL).items
        else:
            pods = self.core.list_pod_for_all_namespaces(label_selector=TIER_LABEL).items
        wanted = {f"{p.metadata.namespace}/{p.metadata.name}": p for p in pods if self._wanted(p)}
        with self._lock:
            self.unrunnable &= set(wanted)
            for key in list(self.processes):
                local = self.processes[key]
                pod = wanted.get(key)
                if pod is None or pod.metadata.uid != local.uid:
                    self._stop_process(local)
                    del self.processes[key]
            for key, pod in wanted.items():
                if key not in self.processes:
                    if not ipaddress.ip_address(pod.status.pod_ip) in LOOPBACK:
                        log.error("refusing to run %s: pod IP %s is not a loopback address", key, pod.status.pod_ip)
                        continue
                    try:
                        self.processes[key] = self.translate(pod)
                    except (RuntimeError, StopIteration) as exc:
                        if key not in self.unrunnable:
                            log.error("cannot run %s locally: %s", key, exc)
                            self._set_ready(pod.metadata.namespace, pod.metadata.name, False, "CannotRunLocally", str(exc))
                            self.unrunnable.add(key)
                        continue
                    self._set_ready(pod.metadata.namespace, pod.metadata.name, False, "Starting", "local process starting")
                self._tend(self.processes[key], pod)

    def _tend(self, local: LocalProcess, pod: Any) -> None:
        now = time.monotonic()
        if local.proc is None or local.proc.poll() is not None:
            if local.proc is not None:
                local.last_failure = f"process exited with code {local.proc.returncode}"
                local.restarts += 1
                local.next_start = now + min(30.0, 0.5 * 2 ** min(local.restarts, 6))
                local.proc = None
                self._mark(local, pod, False, "ProcessExited", local.last_failure)
            if now >= local.next_start:
                log.info("starting %s: %s", local.key, " ".join(local.argv[2:]))
                with open(local.log_path, "ab") as out:
                    local.probe_failures = 0
                    local.proc = subprocess.Popen(local.argv, env=local.env, stdout=out, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True)
            return
        healthy = self._probe(local.probe_url, local.probe_timeout_s) if local.probe_url else True
        if healthy:
            local.probe_failures = 0
            self._mark(local, pod, True, "ProbeSucceeded", "readiness probe succeeded")
            return
        local.probe_failures += 1
        if local.ready is not True or local.probe_failures >= local.failure_threshold:
            self._mark(local, pod, False, "ProbeFailed",
                       f"readiness probe {local.probe_url} failed {local.probe_failures} time(s) in a row")

    def _mark(self, local: LocalProcess, pod: Any, ready: bool, reason: str, message: str) -> None:
        if local.ready == ready:
            return
        local.ready = ready
        self._set_ready(pod.metadata.namespace, pod.metadata.name, ready, reason, message)

    @staticmethod
    def _probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                return 200 <= resp.status < 400
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _set_ready(self, namespace: str, name: str, ready: bool, reason: str, message: str) -> None:
        from kubernetes.client.rest import ApiException

        status = "True" if ready else "False"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = [
            {"type": "Ready", "status": status, "reason": reason, "message": message, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": status, "reason": reason, "message": message, "lastTransitionTime": now},
        ]
        try:
            self.core.patch_namespaced_pod_status(name, namespace, {"status": {"conditions": conditions}})
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not update readiness of %s/%s: %s", namespace, name, exc.reason)

    @staticmethod
    def _stop_process(local: LocalProcess) -> None:
        if local.proc is None or local.proc.poll() is not None:
            return
        log.info("stopping %s", local.key)
        try:
            os.killpg(local.proc.pid, signal.SIGTERM)
            local.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(local.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ claim

    @property
    def _claim(self) -> tuple[str, str]:
        """(namespace, annotation) this runner's claim is written to."""
        if self.namespace:
            return self.namespace, CLAIM_ANNOTATION
        return CLAIM_HOLDER_NAMESPACE, ALL_NAMESPACES_CLAIM

    def claim(self) -> None:
        """Tell the readiness stand-in that this runner probes its pods; done before it runs any."""
        namespace, key = self._claim
        self.core.patch_namespace(namespace, {"metadata": {"annotations": {key: self._identity}}})
        self._claimed = True

    def release(self) -> None:
        """Withdraw the claim (only if it is still this runner's)."""
        if not self._claimed:
            return
        from kubernetes.client.rest import ApiException

        namespace, key = self._claim
        try:
            current = (self.core.read_namespace(namespace).metadata.annotations or {}).get(key)
            if current == self._identity:
                self.core.patch_namespace(namespace, {"metadata": {"annotations": {key: None}}})
        except ApiException as exc:
            if exc.status != 404:  # a deleted namespace has no claim left to withdraw
                log.warning("could not withdraw the pod-runner claim on %s: %s", namespace, exc.reason)
        self._claimed = False

    # ------------------------------------------------------------------ loop

    def run(self, interval: float = 0.5) -> None:
        if not self._claimed:
            self.claim()
        try:
            while not self._stop.is_set():
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - an API hiccup must not stop the runner
                    log.exception("pod runner pass failed")
                self._stop.wait(interval)
        finally:
            with self._lock:
                for local in self.processes.values():
                    self._stop_process(local)
                self.processes.clear()
            self.release()

    def start(self) -> threading.Thread:
        self.claim()  # before start() returns: pods created from now on are this runner's to probe
        thread = threading.Thread(target=self.run, name="pod-runner", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def kill(self, namespace: str, name: str) -> None:
        """Kill a pod's process abruptly (a crashed engine), for failure tests."""
        with self._lock:
            local = self.processes.get(f"{namespace}/{name}")
            if local and local.proc and local.proc.poll() is None:
                os.killpg(local.proc.pid, signal.SIGKILL)
