"""Start, inspect and stop the local control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the KWOK controller, each a real process listening on 127.0.0.1 only, plus the
readiness stand-in (`readiness.py`), which passes the readiness probe of pods no local process runs.

State lives in one directory per cluster (default `~/.local/state/baton/devcluster/<name>`): PKI, the
etcd data, one log per component, the kubeconfig and `state.json` (ports, and each component's pid with
its process's start time). The processes run in their own sessions, so they outlive the `baton
devcluster up` that started them; `down` stops them and removes the directory. A recorded pid counts as
the component's only while its process has the recorded start time: after a reboot (or once a component
exited) the pid may be another process's, which is never signalled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from baton.direct_http import NO_PROXY_OPENER, no_proxy_opener
from baton.localproc import proc_start_time, signal_session

LOOPBACK = "127.0.0.1"
# Fake pod IPs come from this range: inside 127.0.0.0/8, so every pod address is a loopback address.
POD_CIDR = "127.64.0.1/16"  # the first cluster's; each cluster under one home gets a /16 of its own (`_pod_cidr`)
POD_CIDR_SECOND_OCTETS = range(64, 127)  # 127.64.0.0/16 .. 127.126.0.0/16
# Kubernetes refuses loopback Service ranges; this one is allocated from and never reached.
SERVICE_CIDR = "10.96.0.0/16"
# Start order; stopped in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "readiness")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}]
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
"""


class ControlPlaneError(RuntimeError):
    """The control plane could not be brought to the requested state; the message says why."""


def default_home() -> Path:
    if os.environ.get("BATON_DEVCLUSTER_HOME"):
        return Path(os.environ["BATON_DEVCLUSTER_HOME"])
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "baton" / "devcluster"


def _healthz_ok(url: str) -> bool:
    """A component's /healthz answers "ok" (its serving certificate is self-signed: not verified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with no_proxy_opener(context).open(url, timeout=2) as resp:
        return resp.read().decode().strip() == "ok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ControlPlane:
    """One local cluster, identified by name, with its state under `home/name`."""

    bin_dir: Path
    name: str = "baton"
    home: Path = field(default_factory=default_home)

    @property
    def dir(self) -> Path:
        return self.home / self.name

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def audit_log(self) -> Path:
        return self.dir / "logs" / "audit.log"

    def log(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    # ---------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _pod_cidr(self) -> str:
        """A pod CIDR no other cluster under this home uses: KWOK hands out pod IPs from the start of its CIDR,
        so two clusters on one CIDR give their first pods the same addresses, and the pod runners' processes
        collide on them ("address already in use")."""
        taken = set()
        for other in self.home.glob("*/state.json"):
            if other.parent.name == self.name:
                continue
            try:
                taken.add(json.loads(other.read_text()).get("podCidr", POD_CIDR))  # older states: the fixed one
            except (OSError, ValueError):
                continue
        for octet in POD_CIDR_SECOND_OCTETS:
            cidr = f"127.{octet}.0.1/16"
            if cidr not in taken:
                return cidr
        raise RuntimeError(f"every pod CIDR of 127.64-126.0.0/16 is taken by clusters under {self.home}: take some "
                           "down (baton devcluster --name NAME down)")

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    def component_pids(self) -> dict[str, int]:
        return dict(self.state().get("pids", {}))

    def _live_pids(self, state: dict[str, Any] | None = None) -> dict[str, int]:
        """The pid of each component whose process still runs: the one `up` started, with the start time
        recorded then. A state written by an older `up` has no start times: its pids count while a process
        runs under them (as that `up` judged them), so its cluster is still stopped, not abandoned."""
        state = self.state() if state is None else state
        starts = state.get("pidStarts")
        return {component: pid for component, pid in state.get("pids", {}).items()
                if (proc_start_time(pid) is not None if starts is None else
                    starts.get(component) is not None and proc_start_time(pid) == starts[component])}

    def running_components(self) -> dict[str, bool]:
        live = self._live_pids()
        return {c: c in live for c in COMPONENTS}

    def is_healthy(self) -> bool:
        if not all(self.running_components().values()):
            return False
        try:
            return self._get("/readyz") == "ok"
        except (OSError, ControlPlaneError):
            return False

    # ---------------------------------------------------------------- API access

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))

    def _get(self, path: str, timeout: float = 5.0) -> str:
        state = self.state()
        if "apiserverPort" not in state:
            raise ControlPlaneError("control plane not started")
        req = urllib.request.Request(
            f"https://{LOOPBACK}:{state['apiserverPort']}{path}",
            headers={"Authorization": f"Bearer {state['adminToken']}"},
        )
        with no_proxy_opener(self._ssl_context()).open(req, timeout=timeout) as resp:
            return resp.read().decode()

    def version(self) -> dict[str, Any]:
        return json.loads(self._get("/version"))

    # ---------------------------------------------------------------- lifecycle

    def up(self, timeout: float = 120.0) -> Path:
        """Start the control plane unless it is already running and healthy; return the kubeconfig path."""
        if self.is_healthy():
            return self.kubeconfig
        if self.dir.exists():
            self.down()  # half-started or crashed earlier: start clean, nothing to salvage
        (self.dir / "logs").mkdir(parents=True)
        state: dict[str, Any] = {
            "name": self.name,
            "binDir": str(self.bin_dir),
            "adminToken": secrets.token_hex(24),
            "etcdPort": _free_port(),
            "etcdPeerPort": _free_port(),
            "apiserverPort": _free_port(),
            "controllerManagerPort": _free_port(),
            "schedulerPort": _free_port(),
            "kwokPort": _free_port(),
            "podCidr": self._pod_cidr(),
            "pids": {},
            "pidStarts": {},
        }
        self._save_state(state)
        self._make_pki()
        (self.dir / "tokens.csv").write_text(f'{state["adminToken"]},admin,admin,"system:masters"\n')
        self._write_kubeconfig(state)
        self._write_kwok_config()
        (self.dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
        deadline = time.monotonic() + timeout
        try:
            for component in COMPONENTS:
                pid = self._spawn(component, self._command(component, state))
                state["pids"][component], state["pidStarts"][component] = pid, proc_start_time(pid)
                self._save_state(state)
                if component == "etcd":
                    self._wait(lambda: self._etcd_healthy(state), "etcd", deadline)
                elif component == "kube-apiserver":
                    self._wait(lambda: self._get("/readyz") == "ok", "kube-apiserver", deadline)
            # The others serve health endpoints too: one that died (a port taken between picking it and
            # binding it) fails the start here, with its log, not later as nodes that never turn Ready.
            for component, url in (
                ("kube-controller-manager", f"https://{LOOPBACK}:{state['controllerManagerPort']}/healthz"),
                ("kube-scheduler", f"https://{LOOPBACK}:{state['schedulerPort']}/healthz"),
                ("kwok", f"http://{LOOPBACK}:{state['kwokPort']}/healthz"),
            ):
                self._wait(lambda url=url: _healthz_ok(url), component, deadline)
            self._wait(lambda: "readiness" in self._live_pids(self.state()), "readiness", deadline)
        except BaseException:
            self.down(keep_logs=True)
            raise
        return self.kubeconfig

    def down(self, keep_logs: bool = False) -> None:
        """Stop every component still running (TERM, then KILL after 10 s) and remove the cluster's state."""
        state = self.state()
        live = self._live_pids(state)
        for component in reversed(COMPONENTS):
            if component in live:
                signal_session(live[component], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self._live_pids(state) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._live_pids(state).values():
            signal_session(pid, signal.SIGKILL)
        if keep_logs:
            logs = self.dir / "logs"
            for child in self.dir.iterdir() if self.dir.exists() else []:
                if child != logs:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    def _wait(self, check, what: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            state = self.state()
            if what in state.get("pids", {}) and what not in self._live_pids(state):
                raise ControlPlaneError(f"{what} exited during start-up; last log lines:\n{_tail(self.log(what))}")
            try:
                if check():
                    return
            except (OSError, ValueError, ControlPlaneError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise ControlPlaneError(f"{what} did not become ready in time; last log lines:\n{_tail(self.log(what))}")

    def _etcd_healthy(self, state: dict[str, Any]) -> bool:
        with NO_PROXY_OPENER.open(f"http://{LOOPBACK}:{state['etcdPort']}/health", timeout=2) as resp:
            return json.loads(resp.read()).get("health") == "true"

    def _spawn(self, component: str, argv: list[str]) -> int:
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(var, None)
        with open(self.log(component), "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=self.dir,
            )
        return proc.pid

    def _command(self, component: str, s: dict[str, Any]) -> list[str]:
        b, d, pki = self.bin_dir, self.dir, self.dir / "pki"
        kubeconfig = str(self.kubeconfig)
        if component == "etcd":
            client, peer = f"http://{LOOPBACK}:{s['etcdPort']}", f"http://{LOOPBACK}:{s['etcdPeerPort']}"
            return [
                str(b / "etcd"), "--name=baton", f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=baton={peer}", "--initial-cluster-state=new",
                "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn",
            ]
        if component == "kube-apiserver":
            return [
                str(b / "kube-apiserver"),
                f"--etcd-servers=http://{LOOPBACK}:{s['etcdPort']}",
                f"--bind-address={LOOPBACK}", f"--advertise-address={LOOPBACK}",
                f"--secure-port={s['apiserverPort']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                # As OpenShift runs it: setting an ownerReference's blockOwnerDeletion takes `update` on the
                # owner's finalizers, so the chart's RBAC is tested against the strictest common setup.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--allow-privileged=true", "--endpoint-reconciler-type=none", "--profiling=false",
                # Room for thousands of ClusterIP Services (the default /24 holds 254). These
                # addresses are only allocated, never connected to: nothing here routes them.
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Every write (not lease renewals) lands in logs/audit.log: tests count the operator's writes.
                f"--audit-policy-file={d / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json", "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
            ]
        common = [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}", "--leader-elect=false", f"--bind-address={LOOPBACK}",
        ]
        if component == "kube-controller-manager":
            return [
                str(b / "kube-controller-manager"), *common, f"--secure-port={s['controllerManagerPort']}",
                "--controllers=*", f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}", "--use-service-account-credentials=true",
                "--profiling=false",
            ]
        if component == "kube-scheduler":
            return [str(b / "kube-scheduler"), *common, f"--secure-port={s['schedulerPort']}", "--profiling=false"]
        if component == "kwok":
            return [
                str(b / "kwok"), f"--kubeconfig={kubeconfig}", f"--config={d / 'kwok.yaml'}",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={s.get('podCidr', POD_CIDR)}", f"--node-ip={LOOPBACK}",
                f"--server-address={LOOPBACK}:{s['kwokPort']}", "--node-lease-duration-seconds=40",
            ]
        if component == "readiness":
            return [sys.executable, "-m", "baton.cli", "devcluster", "readiness", f"--kubeconfig={kubeconfig}"]
        raise ValueError(component)

    def _make_pki(self) -> None:
        pki = self.dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=pki)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                "-days", "3650", "-subj", "/CN=baton-devcluster-ca")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
                "-subj", "/CN=kube-apiserver")
        (pki / "san.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        )
        openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext")
        openssl("genrsa", "-out", "sa.key", "2048")
        openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _write_kubeconfig(self, s: dict[str, Any]) -> None:
        import base64

        ca = base64.b64encode((self.dir / "pki" / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": self.name, "cluster": {
                "server": f"https://{LOOPBACK}:{s['apiserverPort']}", "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": {"token": s["adminToken"]}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": "admin"}}],
            "current-context": self.name,
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _write_kwok_config(self) -> None:
        # Only Stage documents: a KwokConfiguration document here would replace KWOK's defaults
        # wholesale (its options are not defaulted when loaded from a file); --cidr and --node-ip
        # on the command line set what Baton needs.
        stages = (resources.files("baton.devcluster") / "kwok-stages.yaml").read_text()
        (self.dir / "kwok.yaml").write_text(stages)
