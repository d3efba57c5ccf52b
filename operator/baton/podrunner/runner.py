"""Run local processes for Baton pods that KWOK placed on fake nodes (test and demo infrastructure).

On the local cluster nothing executes containers. For every Running pod of a Baton tier or scheduler
this runner starts what the container would run, as a real process on this machine:
- a TensorRT-LLM container (`trtllm-serve ...`) becomes `baton engine-sim ...` with the same
  arguments, its model directory resolved locally;
- a Triton container (`tritonserver ...`, `spec.engine.runtime: triton`) becomes the engine simulator
  behind a real Triton server (`baton engine-sim MODEL_DIR --sim-frontend triton`): the checkpoint is the
  hostPath behind `--model-repository`, the engine options the tier's engine ConfigMap (mounted at
  ENGINE_CONFIG_DIR for both runtimes), and Triton's HTTP, gRPC and metrics ports the container's
  `--http-port`, `--grpc-port` and `--metrics-port` (the scheduler reaches Triton's gRPC at the tier
  port plus one, the `--grpc-port` the operator renders). PyTriton needs a venv made from Debian's
  python3.11: `triton-venv.sh` makes it once per machine (`TritonVenv`, run in the background on the
  first Triton pod; until it is done such pods wait, with reason `Starting`, and if it fails they are
  `CannotRunLocally` with its error and it is tried again), and the process runs with its python and
  PYTHONPATH at this checkout's `operator/`;
- the scheduler container (`baton scheduler ...`) runs as is, its model tokenizer (if it counts with
  one) resolved locally as the engines' model directory is, and the redis URL file its config names
  pointed at the materialised copy of the mounted Secret.
The process gets the container's environment, resolved as the kubelet resolves it (`$(VAR)`
expansion with `$$` escapes, downward-API fields, ConfigMap keys, `envFrom` ConfigMaps; Secrets when
they exist, since nothing local needs credentials that are missing; not the runner's proxies nor an
in-cluster API server address), its ConfigMap and Secret volumes materialised as files (paths in the
arguments rewritten to them; a `subPath` mount as the one file it names, written once, as the kubelet
does), and binds the pod's own IP (a loopback address) and container port. A pod at any other IP is a
real node's: the runner leaves it alone. As the kubelet updates a ConfigMap or Secret volume, every pass
re-reads the pod's ConfigMaps and Secrets and replaces the files whose content changed (atomically: a
temporary file renamed over the old one), so a process that reloads its configuration (or a rotated
credential) sees the update. A pod the runner cannot run (a missing ConfigMap or Secret that a volume
needs, an environment source it cannot resolve, no local model) is marked unready with reason
`CannotRunLocally` and the reason in its message; the other pods carry on.

The container's probes are run against the process (never through a proxy), with the kubelet's
semantics. The readinessProbe's result is written to the pod's Ready condition, so EndpointSlices, and
therefore the scheduler and the operator, see exactly the processes that can serve: a Ready pod turns
unready only after the probe's `failureThreshold` consecutive failures; it runs every runner pass (faster
than `periodSeconds`, so tests stay quick). A startupProbe, if there is one, must pass before the other two
run (it too runs every pass, but a failure counts once per `periodSeconds`); a livenessProbe runs every
`periodSeconds` from `initialDelaySeconds` after the start. Either failing `failureThreshold` times in a row
gets the process restarted as the kubelet restarts such a container: SIGTERM to its session, SIGKILL after
the grace period (on a later pass: the other pods are tended meanwhile), then the restart below. Every probe
has a timeout of at most `PROBE_TIMEOUT_S`, since one thread probes every pod; only httpGet probes are run,
any other kind (exec, tcpSocket, grpc) counts as passing. A process that exits turns its pod unready at
once with reason `ProcessExited`, its exit code and its log file in the message (and in the runner's log),
and is restarted with back-off (1 s doubling to `BACKOFF_MAX_S`, the kubelet's is 10 s to 5 min; it
starts over once a process ran `BACKOFF_RESET_S` without exiting), like a kubelet would (whatever is left
of its session is killed first: it would hold the pod's ports). The container's status is written with
the conditions, as the kubelet's status manager writes it: `ready`, `started`, `restartCount`,
`state.running.startedAt` of the current process; after an exit `lastState.terminated` (exit code, 128 +
the signal for a killed process, reason `Error` or `Completed`) and, until the restart, `state.waiting`
with reason `CrashLoopBackOff`; for a pod that cannot run, `state.waiting` with reason
`CreateContainerConfigError` (a missing ConfigMap, Secret or key its environment needs), `ContainerCreating`
(a volume's, as the kubelet cannot mount it) or `CannotRunLocally` (a limit of this runner). Every status
patch carries the pod's uid (as the kubelet's do), so a write meant for a pod that was just replaced by one of
the same name is refused instead of landing on the new pod; a condition whose status does not change keeps
its lastTransitionTime. A status write that fails is retried on the next pass. When the pod goes away its
process is stopped (SIGTERM, then SIGKILL after the pod's `terminationGracePeriodSeconds`, or the deleted
pod's own grace period) in the background, each process on its own, so the other pods are still probed and
restarted meanwhile; a new pod of the same name keeps the old process's log as `process.previous.log`.

Before running anything the runner claims its namespace (or every namespace), so that the local
cluster's readiness stand-in (`baton.devcluster.readiness`) leaves these pods alone: KWOK starts a
probed pod not Ready, and only this runner's probe of the pod's own process turns it Ready. The claim
is a lease (`claim_live`): the runner renews it while it runs, so the claim of a runner that died
without withdrawing it expires. A runner does not start while another runner's live claim covers pods it
would run, and stops (its processes with it) once it could not renew its own for a whole lease: the
cluster is gone, and the next one would hand the same pod IPs out again. A pod that takes over the IP
of one deleted a moment ago is never Ready while the old process still answers there: a pod is not
started while a departed pod's process at its IP is still stopping (it is unready meanwhile, with reason
`PreviousPodStopping`).

Every process runs in a session of its own, which is what gets stopped (Triton and its Python-backend
stubs are children of the simulator), and has a pid file under `<workdir>/.pids`; a runner that starts
stops whatever an earlier runner that died (SIGKILL) left running. SIGTERM, SIGINT and SIGHUP stop the
runner (`baton pod-runner`) cleanly, a second one included: its processes stopped (each within its grace
period, but at most `stop_grace_s`), their pods written unready (reason `PodRunnerStopped`, the container
terminated), its claim withdrawn.
"""

from __future__ import annotations

import base64
import calendar
import copy
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from baton.atomicfile import write_atomic
from baton.checkout import repo_root
from baton.direct_http import NO_PROXY_OPENER, no_proxy_opener
from baton.localproc import proc_start_time, signal_session
from baton.model_tokenizer import TOKENIZER_FILE
from baton.render.engine_config import CONFIG_FILE as ENGINE_CONFIG_FILE
from baton.render.engine_config import ENGINE_CONFIG_DIR

log = logging.getLogger("baton.podrunner")

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
TIER_LABEL = "baton.dev/tier"
PROBE_TIMEOUT_S = 1.0
# The most the runner's own shutdown (and its reaping of a dead runner's leftovers) waits between SIGTERM and
# SIGKILL; a pod's process otherwise gets its pod's terminationGracePeriodSeconds (the kubelet's default 30 s).
STOP_GRACE_S = 10.0
DEFAULT_GRACE_S = 30.0
MIN_GRACE_S = 2.0  # as the kubelet: a container always gets this much time to stop
# Restart back-off of an exited process: 1 s doubling to BACKOFF_MAX_S (the kubelet's is 10 s to 300 s; shorter
# here so tests stay quick), reset once a process has run BACKOFF_RESET_S without exiting (as the kubelet does).
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 600.0
API_TIMEOUT_S = 10.0  # for each status and claim write: a hung API server must not hold the runner up
STOP_WRITES_S = 10.0  # what a stopping runner spends at most on writing its pods unready
MANAGED_BY = "baton-operator"
# A runner claims the namespace it runs (annotation on it), or every namespace (annotation on
# CLAIM_HOLDER_NAMESPACE), before it runs anything: the devcluster's readiness stand-in then leaves
# the readiness of those pods to the runner's probes (see baton.devcluster.readiness). The value is
# `<identity>;renewed=<RFC 3339 UTC>;lease=<seconds>`: see `claim_live`.
CLAIM_ANNOTATION = "baton.dev/pod-runner"
ALL_NAMESPACES_CLAIM = "baton.dev/pod-runner-all-namespaces"
CLAIM_HOLDER_NAMESPACE = "kube-system"
CLAIM_LEASE_S = 30
PROCESS_LOG = "process.log"  # in the pod's directory, <workdir>/<namespace>/<pod>
PREVIOUS_LOG = "process.previous.log"  # the log of the process run for the last pod of that name
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# Triton tier pods (`spec.engine.runtime: triton`). Their stand-in runs from the PyTriton venv (made from
# Debian's python3.11 by triton-venv.sh) with this checkout's code first on its path.
OPERATOR_DIR = Path(__file__).resolve().parents[2]
TRITON_INSTALL_TIMEOUT_S = 1200.0
TRITON_INSTALL_RETRY_S = 60.0
# tritonserver's own defaults, for a port its command line leaves out (the operator always sets all three)
TRITON_DEFAULT_PORTS = {"http-port": 8000, "grpc-port": 8001, "metrics-port": 8002}
TRITON_TRANSLATED_OPTIONS = frozenset({"model-repository", *TRITON_DEFAULT_PORTS, "allow-metrics", "log-verbose",
                                       "model-control-mode", "load-model"})
TRITON_MODELS = ("context", "generation")  # what the engine simulator's Triton front end can serve
# tritonserver options that change nothing a local stand-in could show: accepted and ignored. (The
# addresses: every port binds the pod's IP, which is what 0.0.0.0 means in a pod. Readiness is strict
# either way: the simulator's models load with the server.)
TRITON_IGNORED_OPTIONS = frozenset({
    "http-address", "grpc-address", "metrics-address", "strict-readiness", "exit-timeout-secs", "exit-on-error",
    "log-info", "log-warning", "log-error", "log-format", "allow-gpu-metrics", "allow-cpu-metrics",
    "metrics-interval-ms", "http-thread-count", "id", "disable-auto-complete-config", "backend-config",
    "model-load-thread-count", "pinned-memory-pool-byte-size", "cuda-memory-pool-byte-size",
})


def inherited_environment() -> dict[str, str]:
    """What a local process inherits from the runner's environment: everything but the proxies (every
    address it talks to is a loopback one) and the in-cluster API server's address (KUBERNETES_SERVICE_*,
    KUBERNETES_PORT*, set when the runner itself runs in a pod), which would make the scheduler take the
    in-cluster configuration, a ClusterIP nothing here routes, over the KUBECONFIG it is given."""
    return {k: v for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith(("KUBERNETES_SERVICE_", "KUBERNETES_PORT"))}


def runs_locally(labels: dict[str, str]) -> bool:
    """The pods a runner runs as local processes: Baton's tiers and scheduler."""
    return labels.get("app.kubernetes.io/managed-by") == MANAGED_BY and TIER_LABEL in labels


def claim_value(identity: str, now: float | None = None, lease_s: int = CLAIM_LEASE_S) -> str:
    """The claim annotation's value: who holds it, when it was last renewed, for how long it holds."""
    renewed = time.strftime(_TIME_FORMAT, time.gmtime(time.time() if now is None else now))
    return f"{identity};renewed={renewed};lease={lease_s}"


def claim_identity(value: str | None) -> str | None:
    return None if value is None else value.split(";", 1)[0]


def claim_holder_pid(value: str | None) -> int | None:
    """The pid of the runner a claim annotation's value names (its identity is `<host>/<pid>/<object>`)."""
    parts = (claim_identity(value) or "").split("/")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _holder_gone(value: str | None) -> bool:
    """Whether a claim names a runner of this host that no longer runs (SIGKILLed: its claim is within its
    lease, but nothing renews it). A runner elsewhere, or a pid that runs (whoever's), counts as there."""
    pid = claim_holder_pid(value)  # None unless the identity is <host>/<pid>/<object>
    host = (claim_identity(value) or "").split("/", 1)[0]
    return pid is not None and host == socket.gethostname() and proc_start_time(pid) is None


def claim_live(value: str | None, now: float | None = None) -> bool:
    """Whether a claim annotation's value still holds: present and renewed within its lease. A value
    without a lease (written by hand, or by an older runner) never expires."""
    if value is None:
        return False
    fields = dict(part.split("=", 1) for part in value.split(";")[1:] if "=" in part)
    try:
        renewed = calendar.timegm(time.strptime(fields["renewed"], _TIME_FORMAT))
        lease = float(fields["lease"])
    except (KeyError, ValueError):
        return True
    return (time.time() if now is None else now) <= renewed + lease


def packaged_models_root() -> Path:
    return Path(str(resources.files("baton.podrunner") / "models"))


def packaged_triton_venv_script() -> Path:
    return Path(str(resources.files("baton.engine_sim") / "triton-venv.sh"))


def tritonserver_options(args: list[str]) -> list[tuple[str, str]]:
    """A tritonserver command line as (option, value) pairs, in order: `--name=value` or `--name value`
    (every tritonserver option takes a value; booleans are spelt true/false)."""
    options: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise CannotRunLocally(f"tritonserver argument {arg!r} is not an option")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise CannotRunLocally(f"tritonserver option --{name} has no value")
            i += 1
            value = args[i]
        options.append((name, value))
        i += 1
    return options


def _false(value: str) -> bool:
    return value.strip().lower() in ("false", "0", "no", "off")


def trtllm_version_from_image(image: str) -> str | None:
    """`nvcr.io/nvidia/tensorrt-llm/release:1.2.0` -> `1.2.0` (the image decides the version)."""
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    return tag if re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+[a-z0-9.+-]*", tag) else None


def on_mount(path: str, mounts: Mapping[str, Path]) -> str | None:
    """`path` in the container as the local path behind it, when it is a mount (mountPath -> local
    directory) or inside one; None otherwise."""
    for mount_path, local in mounts.items():
        if path == mount_path or path.startswith(mount_path + "/"):
            return str(local) + path[len(mount_path):]
    return None


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (k8s.io/kubernetes third_party/forked/golang/expansion): `$(VAR)`
    becomes VAR's value when VAR is defined and stays as written otherwise, `$$` is a literal `$` (so
    `$$(VAR)` is a literal `$(VAR)`), any other `$` is kept."""
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch != "$" or i + 1 == n:
            out.append(ch)
            i += 1
            continue
        nxt = value[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = value.find(")", i + 2)
            if close < 0:  # an incomplete reference stays as written
                out.append("$(")
                i += 2
            else:
                name = value[i + 2:close]
                out.append(env[name] if name in env else f"$({name})")
                i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def _last_line(path: Path, limit: int = 300) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 4096))
            lines = [line for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:limit] if lines else ""


def _pod_ready(pod: Any) -> bool | None:
    """The status of the pod's Ready condition as listed (None: it has none, or the pod was not listed)."""
    for condition in getattr(getattr(pod, "status", None), "conditions", None) or []:
        kind = condition.get("type") if isinstance(condition, dict) else getattr(condition, "type", None)
        if kind == "Ready":
            status = condition.get("status") if isinstance(condition, dict) else getattr(condition, "status", None)
            return status == "True"
    return None


def _with_entry(statuses: list[dict[str, Any]], entry: dict[str, Any], image: str) -> list[dict[str, Any]]:
    """The pod's whole containerStatuses list (an atomic list: a patch replaces it whole) with the runner's
    fields of one container's entry (matched by name) replaced, and the others' (e.g. KWOK's image, imageID)
    kept."""
    out: list[dict[str, Any]] = []
    found = False
    for status in statuses:
        if status.get("name") == entry["name"] and not found:
            out.append({**status, **entry})
            found = True
        else:
            out.append(status)
    if not found:
        out.append({"image": image, "imageID": "", **entry})
    return out


# an HTTPS probe, as the kubelet's, does not check the server's certificate
_INSECURE_OPENER = no_proxy_opener(ssl._create_unverified_context())  # noqa: S323


class ClaimHeld(RuntimeError):
    """Another runner's live claim covers pods this runner would run (the message says whose, and what to do)."""


class CannotRunLocally(RuntimeError):
    """A pod the runner cannot run as a local process (the message says why). `waiting_reason` is what its
    container status shows (state.waiting.reason): for a limit of the runner, this class's name."""

    waiting_reason = "CannotRunLocally"


class ContainerConfigError(CannotRunLocally):
    """A ConfigMap, Secret or key the container's environment needs is missing: the kubelet does not create
    such a container, and reports CreateContainerConfigError."""

    waiting_reason = "CreateContainerConfigError"


class MountError(CannotRunLocally):
    """A ConfigMap or Secret (or key) a volume needs is missing: the kubelet cannot mount the volume, and the
    container waits in ContainerCreating (with FailedMount events)."""

    waiting_reason = "ContainerCreating"


class NotYetRunnable(Exception):
    """A pod the runner will run once something it needs is ready (the message says what it waits for)."""


class TritonVenv:
    """The python of the PyTriton venv that runs Triton pods' stand-ins. `triton-venv.sh` makes the venv
    once per machine (1-2 minutes) and then only prints its python; it runs on the first Triton pod, in a
    thread, so the runner goes on tending the other pods meanwhile. A failed install is reported (its
    output in `log_path`) and tried again `retry_s` later."""

    def __init__(self, script: Path, repo: Path | None, log_path: Path, python: str | None = None,
                 retry_s: float = TRITON_INSTALL_RETRY_S, timeout_s: float = TRITON_INSTALL_TIMEOUT_S) -> None:
        self.script, self.repo, self.log_path = script, repo, log_path
        self.retry_s, self.timeout_s = retry_s, timeout_s
        self.installs = 0  # runs of the script so far
        self._python = python
        self._error: str | None = None
        self._failed_at = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._stopped = False

    @property
    def command(self) -> list[str]:
        return ["bash", str(self.script), *([str(self.repo)] if self.repo else [])]

    @property
    def installed(self) -> str | None:
        """The venv's python once known, without starting anything."""
        with self._lock:
            return self._python

    def python(self) -> str:
        """The venv's python; NotYetRunnable while the script runs (started now if it is not running);
        CannotRunLocally, with what to do, when it failed."""
        with self._lock:
            if self._python:
                return self._python
            if self._error is not None and time.monotonic() < self._failed_at + self.retry_s:
                raise CannotRunLocally(self._error)
            if self._stopped:
                raise NotYetRunnable("the runner is stopping")
            if self._thread is None or not self._thread.is_alive():
                self.installs += 1
                self._thread = threading.Thread(target=self._install, name="pod-runner-triton-venv", daemon=True)
                self._thread.start()
        raise NotYetRunnable(f"waiting for the PyTriton venv ({' '.join(self.command)}: the first install on a machine "
                             f"takes 1-2 minutes; output in {self.log_path})")

    def _install(self) -> None:
        log.info("Triton pod: getting the PyTriton venv: %s (output in %s)", " ".join(self.command), self.log_path)
        python, error = None, None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_path, "ab") as out:
                proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=out, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
                with self._lock:
                    self._proc = proc
                try:
                    stdout, _ = proc.communicate(timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    self._kill(proc)
                    proc.communicate()
                    stdout = None
        except OSError as exc:
            error = f"could not run it: {exc}"
        else:
            lines = [line.strip() for line in (stdout or b"").decode(errors="replace").splitlines() if line.strip()]
            if stdout is None:
                error = f"it did not finish within {self.timeout_s:g}s"
            elif proc.returncode != 0:
                error = f"it failed (exit code {proc.returncode}): {self._error_line()}"
            elif not lines or not os.access(lines[-1], os.X_OK):
                error = f"it printed {lines[-1] if lines else 'nothing'!r}, not an executable python"
            else:
                python = lines[-1]
        with self._lock:
            self._proc = None
            if python:
                self._python, self._error = python, None
                log.info("Triton pods run with %s", python)
                return
            self._failed_at = time.monotonic()
            self._error = (
                f"the engine simulator's Triton front end needs PyTriton in a venv made from Debian's python3.11, "
                f"and `{' '.join(self.command)}` could not provide it: {error} (its output: {self.log_path}). Fix "
                f"that and the runner tries again within {self.retry_s:g}s, or give `baton pod-runner "
                f"--triton-python` the python of a PyTriton venv")
            if not self._stopped:
                log.error("cannot run Triton pods: %s", self._error)

    def _error_line(self) -> str:
        """The script's error (`[triton-venv] error: ...`), else its last line."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - 16384))
                lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no output"
        errors = [line for line in lines if line.startswith("[triton-venv] error:")]
        return (errors or lines or ["no output"])[-1].removeprefix("[triton-venv] error: ")[:1000]

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        signal_session(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop an install in progress (the script is idempotent: the next one starts over)."""
        with self._lock:
            self._stopped = True
            proc = self._proc
        if proc is not None:
            signal_session(proc.pid, signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout=15)


@dataclass
class ObjectVolume:
    """A ConfigMap or Secret volume of a pod's container, as materialised under `target`."""

    kind: str  # "ConfigMap" or "Secret"
    name: str
    optional: bool
    items: list[tuple[str, str]] | None  # (key, relative path), or None: every key as a file of its name
    target: Path
    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> content the object gave

    @property
    def mode(self) -> int:
        """Its files' mode: a Secret's readable by this user alone."""
        return 0o600 if self.kind == "Secret" else 0o644


@dataclass
class ProbeSpec:
    """A liveness or startup probe of the container, as the runner runs it (the readinessProbe's are
    LocalProcess fields of their own)."""

    url: str | None  # an httpGet probe's URL; None: another kind (exec, tcpSocket, grpc), which counts as passing
    timeout_s: float = PROBE_TIMEOUT_S
    period_s: float = 10.0
    initial_delay_s: float = 0.0
    failure_threshold: int = 3
    grace_s: float | None = None  # the probe's own terminationGracePeriodSeconds, for a restart it causes

    def __str__(self) -> str:
        return self.url or "(not an httpGet probe: counted as passing)"


def _time(at: float | None = None) -> str:
    """RFC 3339 UTC, as in a pod's status."""
    return time.strftime(_TIME_FORMAT, time.gmtime(time.time() if at is None else at))


@dataclass
class LocalProcess:
    key: str  # namespace/name
    uid: str
    argv: list[str]
    env: dict[str, str]
    probe_url: str | None  # the readinessProbe's URL (None: no httpGet readinessProbe, Ready while it runs)
    log_path: Path
    probe_timeout_s: float = PROBE_TIMEOUT_S
    failure_threshold: int = 3  # consecutive failed probes that make a Ready pod unready
    probe_failures: int = 0
    readiness_delay_s: float = 0.0  # the readinessProbe's initialDelaySeconds
    liveness: ProbeSpec | None = None
    startup: ProbeSpec | None = None
    grace_s: float = DEFAULT_GRACE_S  # the pod's terminationGracePeriodSeconds: SIGTERM to SIGKILL
    container: str = ""  # the container's name and image (for its containerStatuses entry)
    image: str = ""
    proc: subprocess.Popen | None = None
    ready: bool | None = None  # as last written to the pod (None: nothing written yet)
    restarts: int = 0  # the container's restartCount
    crashes: int = 0  # exits since a process last ran BACKOFF_RESET_S: the restart back-off's exponent
    next_start: float = 0.0
    last_failure: str = ""
    pod_ip: str = ""
    volumes: list[ObjectVolume] = field(default_factory=list)  # ConfigMap and Secret volumes
    # files whose content the runner transforms before writing (the scheduler's tokenizer section)
    localise: dict[Path, Callable[[bytes], bytes]] = field(default_factory=dict)
    pidfile: Path | None = None
    exit_report: str | None = None  # a ProcessExited condition not written yet
    refresh_error: str = ""
    # the container's status as the kubelet reports it (containerStatuses[]): started (its startupProbe
    # passed), state, the last termination; and this process's start (monotonic, for the probes' delays)
    started: bool = False
    started_at: str = ""
    started_mono: float = 0.0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_terminated: dict[str, Any] | None = None
    startup_failures: int = 0
    next_startup_count: float = 0.0  # a failed startup probe counts once per periodSeconds
    liveness_failures: int = 0
    next_liveness: float = 0.0
    # SIGTERMed for a restart (its liveness or startup probe failed): SIGKILL at this time; and why
    kill_at: float | None = None
    kill_cause: str = ""
    base_statuses: list[dict[str, Any]] = field(default_factory=list)  # the pod's containerStatuses as listed
    written_status: dict[str, Any] | None = None  # this container's entry as last written


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
    unrunnable: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (uid, message written)
    # The most the runner's own shutdown waits for its processes between SIGTERM and SIGKILL (each process gets
    # its pod's terminationGracePeriodSeconds when its pod goes or it is restarted, but this bound when the
    # runner stops).
    stop_grace_s: float = STOP_GRACE_S
    claim_lease_s: int = CLAIM_LEASE_S
    # The PyTriton venv's python for Triton pods; None: triton-venv.sh finds or makes it on the first one.
    triton_python: str | None = None
    triton_venv_script: Path = field(default_factory=packaged_triton_venv_script)
    triton_install_retry_s: float = TRITON_INSTALL_RETRY_S

    def __post_init__(self) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(self.api_client)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stopping_lock = threading.Lock()
        self._stopping: list[LocalProcess] = []  # departed pods' processes still being stopped
        self._stoppers: list[threading.Thread] = []
        self._shutdown_by: float | None = None  # once the runner stops: when every process must be gone (monotonic)
        self._claimed = False
        self._claim_renewed = 0.0
        self.claim_lost: str | None = None  # why the runner stopped on its own: its claim lapsed (renew_claim)
        self._identity = f"{socket.gethostname()}/{os.getpid()}/{id(self):x}"
        self._errors: dict[str, str] = {}
        self._elsewhere: set[str] = set()  # uids of the pods at a non-loopback IP seen (and logged) so far
        self._reaped = False
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pid_dir = self.workdir / ".pids"
        self.triton_venv = TritonVenv(self.triton_venv_script, repo_root(), self.workdir / "triton-venv.log",
                                      python=self.triton_python, retry_s=self.triton_install_retry_s)

    # ------------------------------------------------------------------ translation

    def _resolve_env(self, pod: Any, container: Any) -> dict[str, str]:
        """The container's environment as the kubelet builds it: `envFrom` first, then `env` in order,
        each `value` expanded with the variables before it. CannotRunLocally for a source this runner
        cannot resolve."""
        namespace = pod.metadata.namespace
        env: dict[str, str] = {}
        for source in container.env_from or []:
            prefix = source.prefix or ""
            if source.config_map_ref:
                data = self._object_data("ConfigMap", namespace, source.config_map_ref.name, source.config_map_ref.optional,
                                         missing=ContainerConfigError)
                env.update({prefix + k: v for k, v in (data or {}).items()})
            elif source.secret_ref:
                data = self._secret_data(pod, source.secret_ref.name)
                env.update({prefix + k: v for k, v in (data or {}).items()})
        for item in container.env or []:
            source = item.value_from
            if source is None:
                env[item.name] = expand(item.value or "", env)
            elif source.field_ref:
                env[item.name] = self._field_value(pod, source.field_ref.field_path, item.name)
            elif source.config_map_key_ref:
                ref = source.config_map_key_ref
                data = self._object_data("ConfigMap", namespace, ref.name, ref.optional, missing=ContainerConfigError)
                if data is None:
                    continue
                if ref.key not in data:
                    if ref.optional:
                        continue
                    raise ContainerConfigError(f"env {item.name}: ConfigMap {namespace}/{ref.name} has no key {ref.key!r}")
                env[item.name] = data[ref.key]
            elif source.secret_key_ref:
                ref = source.secret_key_ref
                data = self._secret_data(pod, ref.name)
                if data is not None and ref.key in data:
                    env[item.name] = data[ref.key]
                # else: a missing Secret (e.g. an HF_TOKEN the local cluster never has) is left unset:
                # nothing local needs credentials; the kubelet would refuse to start the container
            else:
                raise CannotRunLocally(f"env {item.name}: its valueFrom source is not supported by the pod runner")
        return env

    @staticmethod
    def _field_value(pod: Any, path: str, name: str) -> str:
        meta, spec, status = pod.metadata, pod.spec, pod.status
        simple = {
            "metadata.name": (meta, "name"),
            "metadata.namespace": (meta, "namespace"),
            "metadata.uid": (meta, "uid"),
            "spec.nodeName": (spec, "node_name"),
            "spec.serviceAccountName": (spec, "service_account_name"),
            "status.podIP": (status, "pod_ip"),
            "status.hostIP": (status, "host_ip"),
        }
        if path in simple:
            obj, attr = simple[path]
            return getattr(obj, attr, None) or ""
        if path == "status.podIPs":
            ips = [getattr(p, "ip", None) for p in getattr(status, "pod_ips", None) or []]
            return ",".join(ip for ip in ips if ip) or (status.pod_ip or "")
        found = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if found:
            return (getattr(meta, found.group(1)) or {}).get(found.group(2), "")
        raise CannotRunLocally(f"env {name}: fieldRef {path!r} is not supported by the pod runner")

    def _object_data(self, kind: str, namespace: str, name: str, optional: bool | None,
                     missing: type[CannotRunLocally] = MountError) -> dict[str, bytes | str] | None:
        """A ConfigMap's data (binaryData decoded) or a Secret's (decoded), `kind` saying which; None for a
        missing optional one, `missing` (a CannotRunLocally: MountError for a volume's object,
        ContainerConfigError for an environment source's) for a missing required one (the kubelet does not
        start a container whose volume or variable source is missing). Other API errors propagate (a hiccup:
        the pod is retried next pass)."""
        from kubernetes.client.rest import ApiException

        try:
            if kind == "Secret":
                secret = self.core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
            cm = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise missing(f"{kind} {namespace}/{name} not found") from None
            raise
        data: dict[str, bytes | str] = dict(cm.data or {})
        for key, value in (cm.binary_data or {}).items():
            data[key] = base64.b64decode(value)
        return data

    def _secret_data(self, pod: Any, name: str) -> dict[str, str] | None:
        from kubernetes.client.rest import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, pod.metadata.namespace)
        except ApiException as exc:
            log.warning("%s/%s: Secret %s not readable (%s): its variables are left unset",
                        pod.metadata.namespace, pod.metadata.name, name, exc.status)
            return None
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.data or {}).items()}

    def _object_volumes(self, pod: Any, container: Any, root: Path) -> tuple[list[ObjectVolume], dict[str, Path]]:
        """The container's ConfigMap and Secret mounts (local directories under `root`, kept up to date);
        and mountPath -> local directory, or file for a `subPath` mount (written here once: as the kubelet
        does, such a mount is never updated)."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        result: list[ObjectVolume] = []
        mounts: dict[str, Path] = {}
        for mount in container.volume_mounts or []:
            volume = volumes.get(mount.name)
            if volume and volume.config_map:
                kind, name, source = "ConfigMap", volume.config_map.name, volume.config_map
            elif volume and volume.secret:
                kind, name, source = "Secret", volume.secret.secret_name, volume.secret
            else:
                continue
            items = [(i.key, i.path) for i in source.items] if source.items else None
            target = root / mount.mount_path.strip("/")
            volume = ObjectVolume(kind, name, bool(source.optional), items, target)
            if mount.sub_path:
                self._write_sub_path(pod.metadata.namespace, volume, mount.sub_path, mount.mount_path)
            else:
                target.mkdir(parents=True, exist_ok=True)
                result.append(volume)
            mounts[mount.mount_path.rstrip("/")] = target
        return result, mounts

    def _write_sub_path(self, namespace: str, volume: ObjectVolume, sub_path: str, mount_path: str) -> None:
        """A `subPath` mount of a ConfigMap or Secret volume: the one file of the volume it names, written at
        the volume's target (nothing for a missing optional object)."""
        files = self._project(namespace, volume)
        sub_path = sub_path.strip("/")
        if sub_path in files:
            volume.target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(volume.target, files[sub_path], mode=volume.mode)
        elif not volume.optional:  # the kubelet cannot prepare the subPath: CreateContainerConfigError
            raise ContainerConfigError(f"{volume.kind} {namespace}/{volume.name} has no file {sub_path!r} for the subPath "
                                       f"of its mount at {mount_path} (its files: {', '.join(sorted(files)) or 'none'})")

    def _project(self, namespace: str, volume: ObjectVolume) -> dict[str, bytes]:
        """The files a ConfigMap or Secret volume holds now: relative path -> content."""
        data = self._object_data(volume.kind, namespace, volume.name, volume.optional)
        if data is None:
            return {}
        encoded = {k: v.encode() if isinstance(v, str) else v for k, v in data.items()}
        if volume.items is None:
            return encoded
        files: dict[str, bytes] = {}
        for key, path in volume.items:
            if key in encoded:
                files[path] = encoded[key]
            elif not volume.optional:
                raise MountError(f"{volume.kind} {namespace}/{volume.name} has no key {key!r}")
        return files

    def _refresh_volumes(self, local: LocalProcess, namespace: str) -> bool:
        """Bring the materialised ConfigMap and Secret files up to date (as the kubelet updates such a
        volume): changed files replaced atomically, re-localised; removed keys removed; Secret files
        readable by this user alone. Each volume on its own, as the kubelet does: one that cannot be read (or
        whose new content cannot be localised) keeps all its files as they were and the others are still
        updated, then its error is raised. Whether anything changed."""
        changed = False
        failures: list[Exception] = []
        for volume in local.volumes:
            try:
                files = self._project(namespace, volume)
                # every changed file of the volume first, then written: a volume is updated as a whole
                updates = {}
                for rel, content in files.items():
                    if volume.files.get(rel) != content:
                        transform = local.localise.get(volume.target / rel)
                        updates[rel] = transform(content) if transform else content
                for rel, content in updates.items():
                    write_atomic(volume.target / rel, content, mode=volume.mode)
                    volume.files[rel] = files[rel]
                    changed = True
            except Exception as exc:  # noqa: BLE001 - raised once the other volumes are up to date
                failures.append(exc)
                continue
            for rel in set(volume.files) - set(files):
                (volume.target / rel).unlink(missing_ok=True)
                del volume.files[rel]
                changed = True
        if failures:
            raise failures[0]
        return changed

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

    def _localised_config(self, pod: Any, container: Any, text: str, mounts: dict[str, Path]) -> str:
        """The scheduler's config with the container paths it names pointed at their local stand-ins: the
        redis URL file (`degradation.redisUrlFile`, in the mounted Secret) at its materialised copy under
        `mounts` (mountPath -> local directory), and the `tokenizer` section (`spec.scheduler.tokenizer:
        model`) at a local copy of the model's tokenizer: the checkpoint's hostPath directory, or for a
        Hugging Face model that id's directory under the models root, since the local cluster has no way
        out to the Hub (nothing here may connect beyond loopback)."""
        config = yaml.safe_load(text) or {}
        if not isinstance(config, dict):
            return text
        localised = False
        degradation = config.get("degradation")
        url_file = degradation.get("redisUrlFile") if isinstance(degradation, dict) else None
        if isinstance(url_file, str) and url_file:
            local_file = on_mount(url_file, mounts)
            if local_file is None:
                raise RuntimeError(f"the scheduler's degradation.redisUrlFile {url_file} is on no Secret or "
                                   f"ConfigMap mount of its pod")
            degradation["redisUrlFile"] = local_file
            localised = True
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
            return yaml.safe_dump(config, sort_keys=False) if localised else text
        config["tokenizer"] = {"path": str(local)}
        return yaml.safe_dump(config, sort_keys=False)

    def _localise_config_file(self, pod: Any, container: Any, config_file: Path, mounts: dict[str, Path]) -> None:
        """`_localised_config` applied to a file, in place."""
        if config_file.is_file():
            text = config_file.read_text()
            localised = self._localised_config(pod, container, text, mounts)
            if localised != text:
                write_atomic(config_file, localised.encode())

    @staticmethod
    def _clear_pod_dir(root: Path) -> None:
        """An empty directory for a pod's files, but for the log of the last process run for a pod of that
        name (a replaced pod's, whose process may still be stopping and writing to it), kept as
        PREVIOUS_LOG (as `kubectl logs --previous` shows the last container's)."""
        kept = root.parent / f".{root.name}.{PREVIOUS_LOG}"  # no pod name starts with a dot
        for log_file in (root / PROCESS_LOG, root / PREVIOUS_LOG):
            try:
                os.replace(log_file, kept)  # the same file: a process still writing to it goes on doing so
                break
            except FileNotFoundError:
                continue
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if kept.exists():
            os.replace(kept, root / PREVIOUS_LOG)

    def translate(self, pod: Any) -> LocalProcess:
        """The local process standing in for `pod`'s main container."""
        container = pod.spec.containers[0]
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        root = self.workdir / pod.metadata.namespace / pod.metadata.name
        self._clear_pod_dir(root)
        env = self._resolve_env(pod, container)
        volumes, mounts = self._object_volumes(pod, container, root)

        def localise(arg: str) -> str:
            arg = expand(arg, env)
            return on_mount(arg, mounts) or arg

        command = [localise(a) for a in (container.command or [])]
        args = [localise(a) for a in (container.args or [])]
        transforms: dict[Path, Callable[[bytes], bytes]] = {}
        if command[:1] == ["trtllm-serve"]:
            if not args:
                raise CannotRunLocally("the trtllm-serve container has no arguments: it names no model")
            model_dir = self._model_dir(pod, container, args[0])
            argv = [sys.executable, "-m", "baton.cli", "engine-sim", str(model_dir), *args[1:], *self.sim_args]
            version = trtllm_version_from_image(container.image or "")
            if version and "--sim-trtllm-version" not in self.sim_args:
                argv += ["--sim-trtllm-version", version]
            # The id trtllm-serve serves: an existing model directory's name (the pod's /models mount is
            # "models"), else the argument itself (a Hugging Face id).
            pod_model = expand((container.args or [""])[0], env)
            argv += ["--sim-model-name", PurePosixPath(pod_model).name if pod_model.startswith("/") else pod_model]
            # Fault injection for tests: extra simulator flags from the pod's own environment.
            argv += env.get("BATON_SIM_ARGS", "").split()
        elif command[:2] == ["baton", "scheduler"]:
            argv = [sys.executable, "-m", "baton.cli", "scheduler", *args]
            if "--config" in args[:-1]:
                config_file = Path(args[args.index("--config") + 1])
                if any(config_file.is_relative_to(v.target) for v in volumes):  # re-localised on every update
                    transforms[config_file] = lambda content: self._localised_config(pod, container, content.decode(),
                                                                                     mounts).encode()
                else:
                    self._localise_config_file(pod, container, config_file, mounts)
            # The API server refuses loopback addresses in EndpointSlices, so on this cluster the
            # scheduler reads readiness from the pods its Services select instead.
            env["BATON_DISCOVERY_SOURCE"] = "pods"
        elif command[:1] == ["tritonserver"]:
            argv = self._triton_argv(pod, container, [*command[1:], *args], mounts, env)
            # this checkout's code first, whichever clone the shared venv's editable install points at
            env["PYTHONPATH"] = os.pathsep.join([str(OPERATOR_DIR), *filter(None, [env.get("PYTHONPATH")])])
        else:
            raise RuntimeError(f"container command {command!r} has no local stand-in")
        readiness = self._probe_spec(pod, container, container.readiness_probe)
        proc_env = inherited_environment()
        proc_env.update(env)
        proc_env["NO_PROXY"] = proc_env["no_proxy"] = "127.0.0.1,localhost"
        if self.kubeconfig:
            proc_env["KUBECONFIG"] = self.kubeconfig  # what a pod gets from its ServiceAccount
        grace = pod.spec.termination_grace_period_seconds
        local = LocalProcess(key=key, uid=pod.metadata.uid, argv=argv, env=proc_env,
                             probe_url=readiness.url if readiness else None, log_path=root / PROCESS_LOG,
                             probe_timeout_s=readiness.timeout_s if readiness else PROBE_TIMEOUT_S,
                             failure_threshold=readiness.failure_threshold if readiness else 3,
                             readiness_delay_s=readiness.initial_delay_s if readiness else 0.0,
                             liveness=self._probe_spec(pod, container, container.liveness_probe),
                             startup=self._probe_spec(pod, container, container.startup_probe),
                             grace_s=max(MIN_GRACE_S, float(DEFAULT_GRACE_S if grace is None else grace)),
                             container=container.name or "", image=container.image or "",
                             pod_ip=pod.status.pod_ip or "", volumes=volumes, localise=transforms)
        # The container's restart history as the pod shows it: a runner that takes over from another one goes on
        # counting where that one left off (and a container that one left terminated is restarted now)
        local.base_statuses = self._listed_statuses(pod)
        mine = next((s for s in local.base_statuses if s.get("name") == local.container), {})
        local.restarts = int(mine.get("restartCount") or 0)
        local.last_terminated = copy.deepcopy((mine.get("lastState") or {}).get("terminated")) or None
        if (mine.get("state") or {}).get("terminated"):
            local.last_terminated = copy.deepcopy(mine["state"]["terminated"])
            local.restarts += 1
        self._refresh_volumes(local, pod.metadata.namespace)
        return local

    @staticmethod
    def _probe_spec(pod: Any, container: Any, probe: Any) -> ProbeSpec | None:
        """A probe of the container as the runner runs it (None: the container has no such probe): an httpGet
        probe against the process at the pod's IP (or the probe's host), its timeout at most PROBE_TIMEOUT_S
        (one thread probes every pod); any other kind is counted as passing. Defaults are the kubelet's."""
        if probe is None:
            return None
        url = None
        if probe.http_get:
            port = probe.http_get.port
            if isinstance(port, str) and not port.isdigit():
                named = [p.container_port for p in container.ports or [] if p.name == port]
                if not named:
                    raise CannotRunLocally(f"a probe of container {container.name} names port {port!r}, which the "
                                           f"container does not declare")
                port = named[0]
            scheme = (probe.http_get.scheme or "HTTP").lower()
            host = probe.http_get.host or pod.status.pod_ip
            path = probe.http_get.path or "/"
            url = f"{scheme}://{host}:{port}{path if path.startswith('/') else '/' + path}"
        grace = getattr(probe, "termination_grace_period_seconds", None)
        return ProbeSpec(url=url, timeout_s=min(PROBE_TIMEOUT_S, probe.timeout_seconds or 1),
                         period_s=float(probe.period_seconds or 10), initial_delay_s=float(probe.initial_delay_seconds or 0),
                         failure_threshold=max(1, probe.failure_threshold or 3),
                         grace_s=None if grace is None else max(MIN_GRACE_S, float(grace)))

    def _triton_argv(self, pod: Any, container: Any, args: list[str], mounts: dict[str, Path],
                     env: Mapping[str, str]) -> list[str]:
        """`tritonserver ...` (a Triton tier pod) as the engine simulator behind a real Triton server (its
        `--sim-frontend triton`), run by the PyTriton venv's python: the checkpoint is the hostPath behind
        `--model-repository`, the engine options the tier's engine ConfigMap (mounted for trtllm-serve's
        `--extra_llm_api_options` too), and Triton's HTTP, gRPC and metrics ports the container's, on the
        pod's IP. The scheduler reaches a Triton replica on gRPC at the tier port + 1, the `--grpc-port`
        the operator renders."""
        options = tritonserver_options(args)
        unknown = sorted({name for name, _ in options} - TRITON_TRANSLATED_OPTIONS - TRITON_IGNORED_OPTIONS)
        if unknown:
            raise CannotRunLocally("tritonserver option(s) " + ", ".join(f"--{name}" for name in unknown)
                                   + " have no stand-in in the engine simulator's Triton front end")
        values = dict(options)
        repositories = [value for name, value in options if name == "model-repository"]
        if len(repositories) != 1:
            raise CannotRunLocally(f"tritonserver needs one --model-repository here, got {len(repositories)}")
        repository = repositories[0]
        model_dir = self._mounted_path(pod, container, repository)
        if model_dir is None:
            raise CannotRunLocally(
                f"Triton's model repository {repository} is on no hostPath mount of the pod (a Hugging Face model "
                f"source mounts nothing there): on the local cluster give a runtime: triton model a hostPath "
                f"source, a directory holding the checkpoint's config.json")
        if not (model_dir / "config.json").is_file():
            raise CannotRunLocally(f"no config.json in {model_dir}, the hostPath behind Triton's model repository "
                                   f"{repository}: the engine simulator reads the model's architecture from it")
        engine_dir = mounts.get(ENGINE_CONFIG_DIR)
        if engine_dir is None:
            raise CannotRunLocally(f"the pod mounts no engine configuration (a ConfigMap at {ENGINE_CONFIG_DIR}), "
                                   f"where the engine simulator reads its LLM-API options")
        ports: dict[str, str] = {}
        for name, default in TRITON_DEFAULT_PORTS.items():
            value = values.get(name, str(default))
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise CannotRunLocally(f"tritonserver --{name}={value} is not a port number")
            ports[name] = value
        argv = ["-m", "baton.cli", "engine-sim", str(model_dir), "--sim-frontend", "triton",
                "--host", pod.status.pod_ip, "--port", ports["http-port"], "--sim-triton-grpc-port", ports["grpc-port"]]
        if not _false(values.get("allow-metrics", "true")):
            argv += ["--sim-triton-metrics-port", ports["metrics-port"]]
        if "log-verbose" in values:
            argv += ["--sim-triton-log-verbose", values["log-verbose"]]
        argv += self._triton_models(options)
        argv += ["--extra_llm_api_options", str(engine_dir / ENGINE_CONFIG_FILE), *self.sim_args]
        version = trtllm_version_from_image(container.image or "")
        if version and "--sim-trtllm-version" not in self.sim_args:
            argv += ["--sim-trtllm-version", version]
        argv += ["--sim-model-name", repository]
        argv += env.get("BATON_SIM_ARGS", "").split()  # fault injection for tests, as for trtllm-serve
        return [self.triton_venv.python(), *argv]  # last: a pod that cannot run anyway installs nothing

    @staticmethod
    def _triton_models(options: list[tuple[str, str]]) -> list[str]:
        """The simulator option for the models tritonserver loads: with --model-control-mode=explicit only the
        --load-model ones (`*`: all), else every model of the repository."""
        mode = dict(options).get("model-control-mode", "none")
        if mode not in ("none", "explicit"):
            raise CannotRunLocally(f"tritonserver --model-control-mode={mode} has no stand-in (none or explicit)")
        loads = [value for name, value in options if name == "load-model"]
        if mode != "explicit":
            if loads:
                raise CannotRunLocally("tritonserver --load-model needs --model-control-mode=explicit")
            return []
        models = list(TRITON_MODELS) if "*" in loads else list(dict.fromkeys(loads))
        unknown = sorted(set(models) - set(TRITON_MODELS))
        if unknown or not models:
            raise CannotRunLocally(f"tritonserver --load-model {', '.join(unknown) or '(none)'}: the engine "
                                   f"simulator's Triton front end serves {' and '.join(TRITON_MODELS)}")
        return ["--sim-triton-models", ",".join(models)]

    # ------------------------------------------------------------------ lifecycle

    def _wanted(self, pod: Any) -> bool:
        return (
            runs_locally(pod.metadata.labels or {})
            and pod.metadata.deletion_timestamp is None
            and pod.status.phase == "Running"
            and bool(pod.status.pod_ip)
        )

    def sync(self) -> None:
        """One pass: stop the processes of departed pods (in the background), start processes for new
        pods, refresh the ConfigMap files of the others and probe them. What goes wrong with one pod is
        that pod's: it is logged (and, if the pod cannot run, written to it) and the pass goes on."""
        if self.namespace:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=TIER_LABEL).items
        else:
            pods = self.core.list_pod_for_all_namespaces(label_selector=TIER_LABEL).items
        self._elsewhere &= {p.metadata.uid for p in pods}
        listed = {p.metadata.uid: p for p in pods}
        wanted = {f"{p.metadata.namespace}/{p.metadata.name}": p for p in pods if self._wanted(p) and self._on_loopback(p)}
        with self._lock:
            self.unrunnable = {k: v for k, v in self.unrunnable.items() if k in wanted and wanted[k].metadata.uid == v[0]}
            self._errors = {k: v for k, v in self._errors.items() if k in wanted}
            departed = []
            for key in list(self.processes):
                local = self.processes[key]
                pod = wanted.get(key)
                if pod is None or pod.metadata.uid != local.uid:
                    departed.append(self.processes.pop(key))
                    # a pod deleted with a grace period of its own (kubectl delete --grace-period) gets that one
                    deleting = listed.get(local.uid)
                    grace = getattr(deleting.metadata, "deletion_grace_period_seconds", None) if deleting else None
                    if grace is not None:
                        local.grace_s = max(MIN_GRACE_S, float(grace))
            self._stop_in_background(departed)
            for key, pod in wanted.items():
                try:
                    self._sync_pod(key, pod)
                except Exception as exc:  # noqa: BLE001 - one pod's failure must not stall the others
                    message = f"{type(exc).__name__}: {exc}"
                    if self._errors.get(key) != message:
                        log.exception("pod runner: %s failed this pass", key)
                        self._errors[key] = message
                else:
                    self._errors.pop(key, None)

    def _on_loopback(self, pod: Any) -> bool:
        """Whether the pod's IP is a loopback address, as every pod of the local cluster's fake nodes has.
        Any other pod is a real node's: this runner never runs it nor writes its status (and says so once)."""
        if ipaddress.ip_address(pod.status.pod_ip) in LOOPBACK:
            return True
        if pod.metadata.uid not in self._elsewhere:
            self._elsewhere.add(pod.metadata.uid)
            log.warning("%s/%s left alone: its IP %s is not a loopback address, so a real node runs it, not this "
                        "runner", pod.metadata.namespace, pod.metadata.name, pod.status.pod_ip)
        return False

    def _stopping_ips(self) -> dict[str, str]:
        """IP -> the departed pod whose process at that IP is still stopping."""
        with self._stopping_lock:
            return {local.pod_ip: local.key for local in self._stopping if local.pod_ip}

    def _sync_pod(self, key: str, pod: Any) -> None:
        local = self.processes.get(key)
        if local is None:
            stopping = self._stopping_ips().get(pod.status.pod_ip)
            if stopping is not None:
                self._cannot_run(key, pod, f"waiting for the process of departed pod {stopping}, which had this pod's "
                                           f"IP {pod.status.pod_ip}, to stop", reason="PreviousPodStopping",
                                 waiting="ContainerCreating")
                return
            from kubernetes.client.rest import ApiException
            from urllib3.exceptions import HTTPError as TransportError

            try:
                local = self.translate(pod)
            except NotYetRunnable as exc:  # e.g. the PyTriton venv being installed: tried again next pass
                self._cannot_run(key, pod, str(exc), reason="Starting", waiting="ContainerCreating")
                return
            except (ApiException, TransportError) as exc:  # tried again next pass
                what = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
                self._cannot_run(key, pod, f"API error reading what the pod refers to: {what}")
                return
            except CannotRunLocally as exc:
                self._cannot_run(key, pod, str(exc) or type(exc).__name__, waiting=exc.waiting_reason)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. a scheduler ConfigMap that is not YAML: this pod's problem
                message = str(exc) if isinstance(exc, RuntimeError) and str(exc) else f"{type(exc).__name__}: {exc}"
                self._cannot_run(key, pod, message)
                return
            self.processes[key] = local
            self.unrunnable.pop(key, None)
            self._set_ready(pod.metadata.namespace, pod.metadata.name, False, "Starting", "local process starting",
                            uid=local.uid, was=_pod_ready(pod))
        else:
            try:
                self._refresh_volumes(local, pod.metadata.namespace)
                local.refresh_error = ""
            except Exception as exc:  # noqa: BLE001 - the process keeps its files, as with the kubelet
                message = str(exc)
                if message != local.refresh_error:
                    log.error("%s: could not update its ConfigMap and Secret files: %s", key, message)
                    local.refresh_error = message
        self._tend(local, pod)

    def _cannot_run(self, key: str, pod: Any, message: str, reason: str = "CannotRunLocally",
                    waiting: str = "CannotRunLocally") -> None:
        """Write (once per message) that `pod` cannot run here (or, with another reason, not yet): its Ready
        condition, and its container waiting with reason `waiting` (CreateContainerConfigError for a missing
        environment source, as the kubelet reports it); retried next pass if the write fails."""
        if self.unrunnable.get(key) == (pod.metadata.uid, message):
            return
        if reason == "CannotRunLocally":
            log.error("cannot run %s locally: %s", key, message)
        else:
            log.info("%s: %s", key, message)
        container = pod.spec.containers[0]
        base = self._listed_statuses(pod)
        mine = next((s for s in base if s.get("name") == container.name), {})
        entry = {"name": container.name, "ready": False, "restartCount": int(mine.get("restartCount") or 0),
                 "started": False, "state": {"waiting": {"reason": waiting, "message": message}},
                 "lastState": mine.get("lastState") or {}}
        statuses = _with_entry(base, entry, container.image or "")
        if self._set_ready(pod.metadata.namespace, pod.metadata.name, False, reason, message, uid=pod.metadata.uid,
                           statuses=statuses, was=_pod_ready(pod)) is not False:
            self.unrunnable[key] = (pod.metadata.uid, message)

    def _tend(self, local: LocalProcess, pod: Any) -> None:
        """Run the process as the kubelet runs a container: start it (again, with back-off, once it exited);
        its startupProbe until it passes, then its livenessProbe (restarting it after `failureThreshold`
        failures in a row of either) and its readinessProbe, whose result is the pod's readiness; and the
        container's status written with it."""
        now = time.monotonic()
        listed = self._listed_statuses(pod)
        if listed:
            local.base_statuses = listed
        if local.proc is not None and local.proc.poll() is not None:
            self._exited(local, pod, now)
        if local.exit_report is not None:
            # always written, whatever was written before: a crash must show even on a pod never Ready
            if self._mark(local, pod, False, "ProcessExited", local.exit_report, force=True):
                local.exit_report = None
        if local.proc is None:
            if now >= local.next_start:
                self._start(local)
            self._write_container(local, pod)
            return
        if local.kill_at is not None:  # being stopped for a restart: SIGKILL once its grace is over
            if now >= local.kill_at:
                log.warning("%s did not stop within its grace period after SIGTERM: SIGKILL", local.key)
                self._signal(local, signal.SIGKILL)
                local.kill_at = now + 10.0
            return
        if not local.started and not self._startup_passed(local, pod, now):
            self._write_container(local, pod)
            return
        if local.liveness is not None and not self._alive(local, pod, now):
            return
        if now >= local.started_mono + local.readiness_delay_s:
            healthy = self._probe(local.probe_url, local.probe_timeout_s) if local.probe_url else True
            if healthy:
                local.probe_failures = 0
                self._mark(local, pod, True, "ProbeSucceeded", "readiness probe succeeded")
            else:
                local.probe_failures += 1
                if local.ready is not True or local.probe_failures >= local.failure_threshold:
                    self._mark(local, pod, False, "ProbeFailed",
                               f"readiness probe {local.probe_url} failed {local.probe_failures} time(s) in a row")
        self._write_container(local, pod)

    def _startup_passed(self, local: LocalProcess, pod: Any, now: float) -> bool:
        """Run the startupProbe (every pass, so that a pass is seen at once; a failure counts once per
        periodSeconds). Whether it has passed now; after `failureThreshold` counted failures in a row the
        process is stopped and restarted, as for a failed livenessProbe."""
        spec = local.startup
        if spec is None:
            local.started = True
            return True
        if now < local.started_mono + spec.initial_delay_s:
            return False
        if spec.url is None or self._probe(spec.url, spec.timeout_s):
            local.started = True
            local.startup_failures = 0
            return True
        if now >= local.next_startup_count:
            local.startup_failures += 1
            local.next_startup_count = now + spec.period_s
            if local.startup_failures >= spec.failure_threshold:
                self._restart(local, pod, "StartupProbeFailed",
                              f"startup probe {spec} failed {local.startup_failures} time(s) in a row", spec.grace_s)
                return False
        self._mark(local, pod, False, "Starting", f"startup probe {spec} has not passed yet")
        return False

    def _alive(self, local: LocalProcess, pod: Any, now: float) -> bool:
        """Run the livenessProbe when due (every periodSeconds, from initialDelaySeconds after the start).
        False once it failed `failureThreshold` times in a row: the process is being restarted."""
        spec = local.liveness
        assert spec is not None
        if now < local.next_liveness:
            return True
        local.next_liveness = now + spec.period_s
        if spec.url is None or self._probe(spec.url, spec.timeout_s):
            local.liveness_failures = 0
            return True
        local.liveness_failures += 1
        log.info("%s: liveness probe %s failed (%d of %d in a row)", local.key, spec, local.liveness_failures,
                 spec.failure_threshold)
        if local.liveness_failures < spec.failure_threshold:
            return True
        self._restart(local, pod, "LivenessProbeFailed",
                      f"liveness probe {spec} failed {local.liveness_failures} time(s) in a row", spec.grace_s)
        return False

    def _restart(self, local: LocalProcess, pod: Any, reason: str, why: str, grace_s: float | None = None) -> None:
        """Stop the process because a probe says so, as the kubelet kills such a container: SIGTERM to its
        session now, SIGKILL after the probe's grace period, else the pod's (on a later pass: the others are
        tended meanwhile). Its exit then restarts it (with back-off), counted in restartCount."""
        grace = local.grace_s if grace_s is None else grace_s
        log.warning("%s: %s: restarting it (SIGTERM, SIGKILL after %gs)", local.key, why, grace)
        local.kill_cause = why
        local.kill_at = time.monotonic() + grace
        self._signal(local, signal.SIGTERM)
        self._mark(local, pod, False, reason, f"{why}: the process is being restarted", force=True)

    def _back_off(self, local: LocalProcess, now: float, failure: str) -> None:
        """A restart planned with back-off after `failure` (the container waits in CrashLoopBackOff), counted
        in restartCount and reported on the pod."""
        local.restarts += 1
        local.crashes += 1
        delay = min(BACKOFF_MAX_S, 0.5 * 2 ** min(local.crashes, 6))
        local.next_start = now + delay
        namespace, name = local.key.split("/", 1)
        local.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
            f"back-off {delay:g}s restarting failed container={self._container_name(local)} "
            f"pod={name}_{namespace}({local.uid})")}}
        local.last_failure = failure
        tail = _last_line(local.log_path)
        local.exit_report = (f"{failure} (restart {local.restarts} in {delay:g}s); "
                             f"log: {local.log_path}" + (f"; last line: {tail}" if tail else ""))
        log.warning("%s: %s", local.key, local.exit_report)

    def _exited(self, local: LocalProcess, pod: Any, now: float) -> None:
        """The process exited: its termination recorded (the container's lastState), a restart planned with
        back-off (the container waits in CrashLoopBackOff), what is left of its session killed."""
        assert local.proc is not None
        code = local.proc.returncode
        how = f"code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"code {code}"
        exit_code = code if code >= 0 else 128 - code  # a signal as a container runtime reports it: 137 for SIGKILL
        finished = _time()
        local.last_terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                 "startedAt": local.started_at or finished, "finishedAt": finished}
        if now - local.started_mono >= BACKOFF_RESET_S:  # it ran long enough: the back-off starts over
            local.crashes = 0
        self._back_off(local, now, (f"{local.kill_cause}, so it was stopped: " if local.kill_cause else "")
                       + f"process exited with {how}")
        # what is left of its session (Triton's server, a child of the simulator) would keep the pod's
        # ports, and every restart would fail to bind them
        self._signal(local, signal.SIGKILL)
        local.proc = None
        local.started = False
        local.kill_at, local.kill_cause = None, ""
        self._remove_pidfile(local)

    def _start(self, local: LocalProcess) -> None:
        log.info("starting %s: %s (log %s)", local.key, " ".join(local.argv[2:]), local.log_path)
        now = time.monotonic()
        local.probe_failures = local.startup_failures = local.liveness_failures = 0
        local.next_startup_count = 0.0
        local.next_liveness = now + (local.liveness.initial_delay_s if local.liveness else 0.0)
        local.next_start = now + 0.5  # a start that fails is retried, not on every pass
        try:
            with open(local.log_path, "ab") as out:
                local.proc = subprocess.Popen(local.argv, env=local.env, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            # As a container runtime that cannot start the container (StartError, exit code 128): counted
            # as a restart and backed off, the reason on the pod, not retried on every pass unseen.
            at = _time()
            local.last_terminated = {"exitCode": 128, "reason": "StartError", "message": str(exc),
                                     "startedAt": at, "finishedAt": at}
            self._back_off(local, now, f"the process could not be started: {exc}")
            return
        local.started_mono, local.started_at = now, _time()
        local.started = local.startup is None
        local.state = {"running": {"startedAt": local.started_at}}
        self._write_pidfile(local)

    # ------------------------------------------------------------------ status

    def _listed_statuses(self, pod: Any) -> list[dict[str, Any]]:
        """The pod's containerStatuses as listed (as the API shows them, e.g. `imageID`)."""
        statuses = getattr(getattr(pod, "status", None), "container_statuses", None) or []
        return [dict(s) if isinstance(s, dict) else self.api_client.sanitize_for_serialization(s) for s in statuses]

    @staticmethod
    def _container_name(local: LocalProcess) -> str:
        return local.container or next((s.get("name", "") for s in local.base_statuses), "")

    def _container_entry(self, local: LocalProcess, ready: bool) -> dict[str, Any]:
        """The container's status fields the runner owns, as the kubelet would report them."""
        running = local.proc is not None
        return {"name": self._container_name(local), "ready": bool(ready and running), "restartCount": local.restarts,
                "started": bool(running and local.started), "state": copy.deepcopy(local.state),
                "lastState": {"terminated": dict(local.last_terminated)} if local.last_terminated else {}}

    def _write_container(self, local: LocalProcess, pod: Any) -> None:
        """Write the container's status if it changed since it was last written (retried next pass if the
        write fails)."""
        entry = self._container_entry(local, bool(local.ready))
        if entry == local.written_status:
            return
        namespace, name = local.key.split("/", 1)
        if self._patch_status(namespace, name, local.uid, statuses=_with_entry(local.base_statuses, entry, local.image)):
            local.written_status = entry

    def _mark(self, local: LocalProcess, pod: Any, ready: bool, reason: str, message: str, force: bool = False) -> bool:
        """Write the pod's readiness if it changed (or `force`), with the container's status; remember it only
        once written, so a write that fails is made again on the next pass. Whether the pod now shows it."""
        if local.ready == ready and not force:
            return True
        entry = self._container_entry(local, ready)
        was = local.ready if local.ready is not None else _pod_ready(pod)
        namespace, name = local.key.split("/", 1)
        if self._set_ready(namespace, name, ready, reason, message, uid=local.uid,
                           statuses=_with_entry(local.base_statuses, entry, local.image), was=was) is False:
            return False
        local.ready = ready
        local.written_status = entry
        return True

    @staticmethod
    def _probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """An httpGet probe as the kubelet's: passed on a status from 200 to 399, never through a proxy (and,
        as the kubelet, without checking an HTTPS server's certificate)."""
        opener = _INSECURE_OPENER if url.startswith("https:") else NO_PROXY_OPENER
        try:
            with opener.open(url, timeout=timeout_s) as resp:
                return 200 <= resp.status < 400
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
            return False

    def _set_ready(self, namespace: str, name: str, ready: bool, reason: str, message: str, *, uid: str | None = None,
                   statuses: list[dict[str, Any]] | None = None, was: bool | None = None) -> bool:
        """Patch the pod's Ready and ContainersReady conditions (and its containerStatuses, when given), as
        the pod of `uid`; False when the write failed (a pod that is gone counts as written: there is nothing
        left to tell). `was`: the pod's readiness before (None: not known); a condition whose status stays
        keeps its lastTransitionTime."""
        status = "True" if ready else "False"
        conditions = []
        for kind in ("Ready", "ContainersReady"):
            condition = {"type": kind, "status": status, "reason": reason, "message": message}
            if was is None or was != ready:
                condition["lastTransitionTime"] = _time()
            conditions.append(condition)
        return self._patch_status(namespace, name, uid, conditions=conditions, statuses=statuses)

    def _patch_status(self, namespace: str, name: str, uid: str | None, *, conditions: list[dict[str, Any]] | None = None,
                      statuses: list[dict[str, Any]] | None = None) -> bool:
        """One strategic-merge patch of the pod's status (conditions merge by type; containerStatuses, an
        atomic list, is replaced whole), carrying the pod's uid as the kubelet's status manager does: a write
        meant for a pod that was replaced by one of the same name is refused (409 or 422), as is one for a
        pod that is gone (404), and both count as written. False when the write failed (retried next pass)."""
        from kubernetes.client.rest import ApiException

        body: dict[str, Any] = {"status": {}}
        if uid:
            body["metadata"] = {"uid": uid}
        if conditions is not None:
            body["status"]["conditions"] = conditions
        if statuses is not None:
            body["status"]["containerStatuses"] = statuses
        try:
            self.core.patch_namespaced_pod_status(name, namespace, body, _request_timeout=API_TIMEOUT_S)
        except ApiException as exc:
            if exc.status in (404, 409, 422):
                if exc.status == 422 and "uid" not in str(exc.body or "").lower():
                    log.warning("the status of %s/%s was refused (not retried): %s", namespace, name, exc.body or exc.reason)
                else:
                    log.debug("status of %s/%s not written: the pod is gone (%s)", namespace, name, exc.status)
                return True
            log.warning("could not update the status of %s/%s (retried next pass): %s %s", namespace, name, exc.status, exc.reason)
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. the API server unreachable for a moment
            log.warning("could not update the status of %s/%s (retried next pass): %s", namespace, name, exc)
            return False
        return True

    # ------------------------------------------------------------------ stopping

    def _stop_in_background(self, departed: list[LocalProcess]) -> None:
        """SIGTERM to the departed pods' processes now; wait for each (its pod's grace period, then SIGKILL)
        in a thread of its own, so this pass goes on probing and restarting the other pods, and a new pod at
        a departed one's IP starts as soon as that one's process is gone."""
        for local in departed:
            if local.proc is None:
                continue
            log.info("stopping %s (SIGTERM, SIGKILL after %gs)", local.key, local.grace_s)
            self._signal(local, signal.SIGTERM)
            with self._stopping_lock:
                self._stopping.append(local)
            thread = threading.Thread(target=self._finish_stop, args=(local,), name=f"pod-runner-stop {local.key}",
                                      daemon=True)
            self._stoppers = [t for t in self._stoppers if t.is_alive()] + [thread]
            thread.start()

    def _finish_stop(self, local: LocalProcess) -> None:
        """Wait for a SIGTERMed process up to its grace period (cut short when the runner stops: its own
        shutdown is bounded by `stop_grace_s`), SIGKILL whatever is left of its session, release its IP."""
        try:
            deadline = time.monotonic() + local.grace_s
            while True:
                limit = deadline if self._shutdown_by is None else min(deadline, self._shutdown_by)
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    log.warning("%s did not stop within %gs of SIGTERM: SIGKILL", local.key, local.grace_s)
                    break
                try:
                    local.proc.wait(timeout=min(remaining, 0.25))
                    break
                except subprocess.TimeoutExpired:
                    continue
            self._kill_session(local)
        finally:
            with self._stopping_lock:
                if local in self._stopping:
                    self._stopping.remove(local)

    @staticmethod
    def _signal(local: LocalProcess, sig: int) -> None:
        if local.proc is not None:
            signal_session(local.proc.pid, sig)

    @classmethod
    def _kill_session(cls, local: LocalProcess) -> None:
        """SIGKILL to whatever is left of the process's session; its pid file removed once it is gone."""
        cls._signal(local, signal.SIGKILL)
        try:
            local.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL", local.key, local.proc.pid)
            return
        cls._remove_pidfile(local)

    @classmethod
    def _stop_all(cls, locals_: list[LocalProcess], grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to every process's session, then for each up to its pod's grace period but at most `grace_s`
        (all from now) to exit, then SIGKILL to whatever is left of each session."""
        running = [local for local in locals_ if local.proc is not None]
        for local in running:
            if local.proc.poll() is None:
                log.info("stopping %s", local.key)
            cls._signal(local, signal.SIGTERM)
        start = time.monotonic()
        for local in running:
            grace = min(local.grace_s, grace_s)
            try:
                local.proc.wait(timeout=max(0.0, start + grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %gs of SIGTERM: SIGKILL", local.key, grace)
        for local in running:
            cls._kill_session(local)

    @classmethod
    def _stop_process(cls, local: LocalProcess, grace_s: float = STOP_GRACE_S) -> None:
        cls._stop_all([local], grace_s)

    # ------------------------------------------------------------------ leftovers of an earlier runner

    def _write_pidfile(self, local: LocalProcess) -> None:
        assert local.proc is not None
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        local.pidfile = self.pid_dir / f"{local.proc.pid}.json"
        record = {"pid": local.proc.pid, "start": proc_start_time(local.proc.pid), "key": local.key,
                  "runner_pid": os.getpid(), "runner_start": proc_start_time(os.getpid())}
        write_atomic(local.pidfile, json.dumps(record).encode())

    @staticmethod
    def _remove_pidfile(local: LocalProcess) -> None:
        if local.pidfile is not None:
            local.pidfile.unlink(missing_ok=True)
            local.pidfile = None

    def reap_orphans(self, grace_s: float | None = None) -> list[int]:
        """Stop the processes an earlier runner with this workdir started and left running when it died
        (their pid files say whose they are; a runner still alive keeps its own). The pids stopped."""
        self._reaped = True
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        victims: list[tuple[int, str, Path, str]] = []
        for pidfile in sorted(self.pid_dir.glob("*.json")) if self.pid_dir.is_dir() else []:
            try:
                record = json.loads(pidfile.read_text())
                pid, start, owner, owner_start = record["pid"], record["start"], record["runner_pid"], record["runner_start"]
            except (OSError, ValueError, KeyError, TypeError):
                pidfile.unlink(missing_ok=True)
                continue
            if owner == os.getpid() or (owner_start is not None and proc_start_time(owner) == owner_start):
                continue  # its runner is alive (or is this process): it is that runner's to stop
            if start is None or proc_start_time(pid) != start:
                pidfile.unlink(missing_ok=True)  # long gone (or the pid is another process's now)
                continue
            victims.append((pid, start, pidfile, record.get("key", "?")))
        for pid, _, _, key in victims:
            log.warning("stopping %s (pid %d), left running by a runner that died", key, pid)
            signal_session(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(proc_start_time(pid) == start for pid, start, _, _ in victims) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid, start, pidfile, _ in victims:
            signal_session(pid, signal.SIGKILL)
            pidfile.unlink(missing_ok=True)
        return [pid for pid, _, _, _ in victims]

    # ------------------------------------------------------------------ claim

    @property
    def _claim(self) -> tuple[str, str]:
        """(namespace, annotation) this runner's claim is written to."""
        if self.namespace:
            return self.namespace, CLAIM_ANNOTATION
        return CLAIM_HOLDER_NAMESPACE, ALL_NAMESPACES_CLAIM

    def claim(self) -> None:
        """Tell the readiness stand-in that this runner probes its pods; done before it runs any. The claim
        holds for `claim_lease_s` unless renewed (`renew_claim`). ClaimHeld, before anything is written,
        when another runner's live claim covers some of the pods: two runners would run each twice."""
        namespace, key = self._claim
        if not self._claimed:
            self._refuse_rival_claims()
        now = time.time()
        value = claim_value(self._identity, now, self.claim_lease_s)
        self.core.patch_namespace(namespace, {"metadata": {"annotations": {key: value}}}, _request_timeout=API_TIMEOUT_S)
        self._claimed = True
        self._claim_renewed = now

    def _refuse_rival_claims(self) -> None:
        """ClaimHeld if another runner's live claim covers pods this one would run: a claim of every
        namespace, or of this runner's namespace (of any namespace, for a runner of them all)."""
        holder = self._namespace_annotations(CLAIM_HOLDER_NAMESPACE)
        claims = {(CLAIM_HOLDER_NAMESPACE, ALL_NAMESPACES_CLAIM): holder.get(ALL_NAMESPACES_CLAIM)}
        if self.namespace:
            claims[(self.namespace, CLAIM_ANNOTATION)] = self._namespace_annotations(self.namespace).get(CLAIM_ANNOTATION)
        else:
            for ns in self.core.list_namespace(_request_timeout=API_TIMEOUT_S).items:
                claims[(ns.metadata.name, CLAIM_ANNOTATION)] = (ns.metadata.annotations or {}).get(CLAIM_ANNOTATION)
        rivals = {where: value for where, value in claims.items()
                  if claim_live(value) and claim_identity(value) != self._identity and not _holder_gone(value)}
        if not rivals:
            return
        held = "; ".join(
            f"{'every namespace' if key == ALL_NAMESPACES_CLAIM else f'namespace {namespace}'} is claimed by pod "
            f"runner {claim_identity(value)} (annotation {key}={value} on namespace {namespace}; to remove it: "
            f"kubectl annotate namespace {namespace} {key}-)" for (namespace, key), value in rivals.items())
        raise ClaimHeld(
            f"another pod runner already runs these pods: {held}. Stop that runner first (SIGTERM or Ctrl-C "
            f"withdraws its claim; the claim of one that was killed lapses once its lease, in the value, has run "
            f"out), or remove the annotation if no runner holds it any more")

    def _namespace_annotations(self, namespace: str) -> dict[str, str]:
        """A namespace's annotations (none for a namespace that does not exist)."""
        from kubernetes.client.rest import ApiException

        try:
            return self.core.read_namespace(namespace, _request_timeout=API_TIMEOUT_S).metadata.annotations or {}
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise

    def renew_claim(self, force: bool = False) -> None:
        """Renew the claim's lease once a third of it has passed. A failure is logged and retried; once the
        claim has lapsed (no renewal for a whole lease: the cluster is gone, e.g. `baton devcluster down`,
        or its API server unreachable), the pods are no longer this runner's: it stops (`claim_lost` says
        why), and with it their processes, which would otherwise hold the pod IPs that the next cluster
        hands out again."""
        if not self._claimed or (not force and time.time() - self._claim_renewed < self.claim_lease_s / 3):
            return
        try:
            self.claim()
        except Exception as exc:  # noqa: BLE001 - retried on the next pass
            unrenewed_s = time.time() - self._claim_renewed
            if unrenewed_s < self.claim_lease_s:
                log.warning("could not renew the pod-runner claim (retried): %s", exc)
                return
            self.claim_lost = (
                f"the pod runner could not renew its claim for {unrenewed_s:.0f}s, its whole lease (is the cluster "
                f"gone, e.g. `baton devcluster down`, or its API server unreachable?), so the claim has lapsed and "
                f"the pods are no longer its own: it stopped their processes and exited (last error: {exc})")
            log.error("%s", self.claim_lost)
            self.stop()

    def release(self) -> None:
        """Withdraw the claim (only if it is still this runner's; a lost one has lapsed already)."""
        if not self._claimed or self.claim_lost:
            self._claimed = False
            return
        from kubernetes.client.rest import ApiException

        namespace, key = self._claim
        try:
            if claim_identity(self._namespace_annotations(namespace).get(key)) == self._identity:
                self.core.patch_namespace(namespace, {"metadata": {"annotations": {key: None}}},
                                          _request_timeout=API_TIMEOUT_S)
        except ApiException as exc:
            if exc.status != 404:  # a deleted namespace has no claim left to withdraw
                log.warning("could not withdraw the pod-runner claim on %s: %s", namespace, exc.reason)
        except Exception as exc:  # noqa: BLE001 - e.g. the API server unreachable: the claim lapses with its lease
            log.warning("could not withdraw the pod-runner claim on %s (it lapses with its lease): %s", namespace, exc)
        self._claimed = False

    # ------------------------------------------------------------------ loop

    def _keep_claim(self) -> None:
        while not self._stop.wait(min(1.0, self.claim_lease_s / 6)):
            self.renew_claim()

    def run(self, interval: float = 0.5) -> None:
        if not self._claimed:
            self.claim()  # first: a runner that may not start (ClaimHeld) stops nothing
        if not self._reaped:
            self.reap_orphans()
        keeper = threading.Thread(target=self._keep_claim, name="pod-runner-claim", daemon=True)
        keeper.start()
        try:
            while not self._stop.is_set():
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - an API hiccup must not stop the runner
                    log.exception("pod runner pass failed")
                self._stop.wait(interval)
        finally:
            self._stop.set()
            # the departed pods' processes still stopping get no longer than the runner's own
            self._shutdown_by = time.monotonic() + self.stop_grace_s
            with self._lock:
                stopped = list(self.processes.values())
                self._stop_all(stopped, self.stop_grace_s)
                self.processes.clear()
            for thread in self._stoppers:
                thread.join(timeout=max(0.0, self._shutdown_by - time.monotonic()) + 15)
            keeper.join(timeout=15)  # no renewal may land after the release
            self.triton_venv.stop()
            if not self.claim_lost:  # else the API server is out of reach: the writes would only wait
                self._mark_stopped(stopped)
            self.release()

    def _mark_stopped(self, stopped: list[LocalProcess]) -> None:
        """Ready=False, reason `PodRunnerStopped`, on the pods whose processes the runner stopped as it
        stopped, their container terminated: nothing serves behind them any more. Best effort, within
        STOP_WRITES_S: a write that fails is not retried (a runner that starts next probes them again)."""
        deadline = time.monotonic() + STOP_WRITES_S
        for i, local in enumerate(stopped):
            if time.monotonic() > deadline:
                log.warning("%d pod(s) still show their readiness from before the runner stopped (no time left "
                            "to write them unready): %s", len(stopped) - i, ", ".join(left.key for left in stopped[i:]))
                return
            namespace, name = local.key.split("/", 1)
            entry = {**self._container_entry(local, False), "started": False}
            code = local.proc.returncode if local.proc is not None else None
            if code is not None:
                exit_code = code if code >= 0 else 128 - code
                entry["state"] = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                                 "startedAt": local.started_at or _time(), "finishedAt": _time()}}
            self._set_ready(namespace, name, False, "PodRunnerStopped",
                            "the pod runner stopped, and with it this pod's local process", uid=local.uid,
                            statuses=_with_entry(local.base_statuses, entry, local.image), was=local.ready)

    def start(self) -> threading.Thread:
        self.claim()  # before start() returns: pods created from now on are this runner's to probe
        if not self._reaped:
            self.reap_orphans()
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
