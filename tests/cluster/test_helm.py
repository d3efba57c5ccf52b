"""The Helm chart on the real local control plane: lint, server-side validation, install, RBAC proven
sufficient and no broader than needed, upgrade, uninstall, in both scopes, and two peered replicas.

The chart's operator pod is scheduled and turns Ready through KWOK, but nothing runs in it. The
operator that does the work runs here instead, with exactly the chart's ServiceAccount: a kubeconfig
built from a TokenRequest for it (`kubectl create token`) and the cluster's CA and address. So every
request it makes is authorised by the chart's RBAC, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from cluster_plugin import REPO, free_port, load_example, wait_for

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "baton"
KUBE_VERSION = "1.37.2"
SYSTEM_POOL = "nodeSelector.baton\\.dev/pool=system"


# ------------------------------------------------------------------------------------------ helpers


def run(cluster, tool: str, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """kubectl or helm from the cluster's bin dir, always against the admin kubeconfig."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    out = subprocess.run([str(cluster.plane.bin_dir / tool), *args], input=input, capture_output=True, text=True, env=env)
    if check:
        assert out.returncode == 0, f"{tool} {' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out


def helm_template(cluster, release: str, namespace: str, *sets: str, include_crds: bool = False) -> str:
    args = ["template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    args += ["--include-crds"] if include_crds else []
    for s in sets:
        args += ["--set", s]
    return run(cluster, "helm", *args).stdout


def make_namespace(cluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace({"metadata": {"name": name, "labels": {"baton.dev/test": "true"}}})
    return name


def delete_namespace(cluster, name: str) -> None:
    with contextlib.suppress(ApiException):
        cluster.core.delete_namespace(name)


def install_peering_crds(cluster) -> None:
    """What `helm install` does with the chart's crds/ before anything else (they are inert)."""
    run(cluster, "kubectl", "apply", "--server-side", "-f", str(CHART / "crds" / "kopf-peering.yaml"))
    run(cluster, "kubectl", "wait", "--for=condition=Established", "--timeout=30s",
        "crd/clusterkopfpeerings.kopf.dev", "crd/kopfpeerings.kopf.dev")


def install_monitoring_crds(cluster) -> None:
    """The Prometheus Operator's own ServiceMonitor and PrometheusRule CRDs (pinned in build-binaries.sh)."""
    from baton.devcluster.binaries import monitoring_crds_dir

    for crd in sorted(monitoring_crds_dir().glob("*.yaml")):
        run(cluster, "kubectl", "apply", "--server-side", "-f", str(crd))
    run(cluster, "kubectl", "wait", "--for=condition=Established", "--timeout=30s",
        "crd/servicemonitors.monitoring.coreos.com", "crd/prometheusrules.monitoring.coreos.com")


def service_account_kubeconfig(cluster, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a bound token) and nothing else."""
    token = run(cluster, "kubectl", "create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": server}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": name, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


TROUBLE = ("Traceback", "Forbidden", "forbidden", " 403", "Not enough permissions")


def troubles(output: str, namespace: str) -> list[str]:
    """Permission errors and tracebacks in the operator's log, about `namespace` or about no model at
    all. A cluster-wide operator also meets models other tests left behind in namespaces being
    deleted, where the API server refuses new objects and Events to everyone: those do not count."""
    lines = output.splitlines()
    found = []
    for i, line in enumerate(lines):
        if not any(t in line for t in TROUBLE):
            continue
        context = " ".join(lines[max(0, i - 1): i + 1])
        # "<namespace>/<model>" as the operator's log lines name a model (test namespaces start "t-").
        namespaces = set(re.findall(r"\b(t-[-a-z0-9]+)/[a-z0-9]", context))
        if namespaces and namespace not in namespaces:
            continue
        found.append(line)
    return found


@contextlib.contextmanager
def operator_as(kubeconfig: Path, namespace: str, *scope: str) -> Iterator[Any]:
    """Baton's operator in-process (like the `operator` fixture), authenticated by `kubeconfig`."""
    from kopf.testing import KopfRunner

    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    os.environ["BATON_WATCH_SERVER_TIMEOUT"] = "10"
    try:
        with KopfRunner(["run", "--standalone", *scope, "-m", "baton.operator.handlers"], timeout=90) as runner:
            yield runner
    finally:
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved
    assert runner.exception is None, runner.output
    assert troubles(runner.output, namespace) == [], runner.output


def create_model(cluster, namespace: str, name: str = "llama-8b") -> dict:
    manifest = load_example("small.yaml")
    manifest["metadata"]["name"] = name
    return cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)


def get_model(cluster, namespace: str, name: str = "llama-8b") -> dict:
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_ready(cluster, namespace: str, name: str = "llama-8b", timeout: float = 90) -> dict:
    def ready():
        obj = get_model(cluster, namespace, name)
        status = obj.get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        ok = conditions.get("Ready") == "True" and conditions.get("Reconciling") == "False"
        return obj if ok and status.get("observedGeneration") == obj["metadata"]["generation"] else None

    return wait_for(ready, timeout, what=f"{namespace}/{name} Ready at its current generation")


def can_i(cluster, sa: str, verb: str, resource: str, *extra: str) -> bool:
    """What `kubectl auth can-i VERB RESOURCE --as=SA [-n NS | --all-namespaces] [--subresource=S]`
    answers, asked as one SubjectAccessReview for the ServiceAccount and its groups (a request
    instead of a process per question)."""
    from kubernetes import client

    plural, _, group = resource.partition(".")
    attributes: dict[str, Any] = {"verb": verb, "resource": plural, "group": group}
    args = list(extra)
    while args:
        flag = args.pop(0)
        if flag == "-n":
            attributes["namespace"] = args.pop(0)
        elif flag.startswith("--subresource="):
            attributes["subresource"] = flag.split("=", 1)[1]
        elif flag != "--all-namespaces":
            raise ValueError(flag)
    namespace = sa.split(":")[2]
    review = client.AuthorizationV1Api(cluster.api_client).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": sa, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                 "resourceAttributes": attributes},
    })
    return bool(review.status.allowed)


def children_versions(cluster, namespace: str) -> dict[str, str]:
    selector = "app.kubernetes.io/managed-by=baton-operator"
    out = {}
    for kind, items in (
        ("sts", cluster.apps.list_namespaced_stateful_set(namespace, label_selector=selector).items),
        ("deploy", cluster.apps.list_namespaced_deployment(namespace, label_selector=selector).items),
        ("svc", cluster.core.list_namespaced_service(namespace, label_selector=selector).items),
        ("cm", cluster.core.list_namespaced_config_map(namespace, label_selector=selector).items),
        ("sa", cluster.core.list_namespaced_service_account(namespace, label_selector=selector).items),
    ):
        out.update({f"{kind}/{o.metadata.name}": o.metadata.resource_version for o in items})
    return out


def deployment_of(cluster, namespace: str, release: str) -> Any:
    items = cluster.apps.list_namespaced_deployment(namespace, label_selector=f"app.kubernetes.io/instance={release}").items
    assert len(items) == 1, [d.metadata.name for d in items]
    return items[0]


# ------------------------------------------------------------------------------------------ tests


def test_lint_and_template_are_accepted_by_the_api_server(cluster, namespace):
    run(cluster, "helm", "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION)
    install_peering_crds(cluster)
    install_monitoring_crds(cluster)
    variants = {
        "cluster-wide": (),
        "cluster-wide, 2 replicas, monitoring": ("replicaCount=2", "metrics.serviceMonitor.enabled=true",
                                                 "metrics.prometheusRule.enabled=true"),
        "namespaced, peering": (f"watch.namespaces={{{namespace}}}", "peering.enabled=true"),
    }
    for label, sets in variants.items():
        release = f"dry-{uuid.uuid4().hex[:6]}"
        docs = [d for d in yaml.safe_load_all(helm_template(cluster, release, namespace, *sets, include_crds=True)) if d]
        # Every document, the ServiceMonitor and PrometheusRule included, goes through the real API server.
        checked = docs
        kinds = {d["kind"] for d in docs}
        assert ("monitoring" in label) == ({"ServiceMonitor", "PrometheusRule"} <= kinds), (label, kinds)
        out = run(cluster, "kubectl", "apply", "--server-side", "--force-conflicts", "--dry-run=server",
                  "--field-manager=helm-dry-run", "-f", "-", input=yaml.safe_dump_all(checked), check=False)
        assert out.returncode == 0, f"{label}: {out.stderr}"
        applied = [line for line in out.stdout.splitlines() if line.strip()]
        assert len(applied) == len(checked), f"{label}: {out.stdout}"
        assert all("(server dry run)" in line for line in applied), out.stdout


def test_cluster_wide_install_is_sufficient_least_privilege_and_upgrades_and_uninstalls_cleanly(cluster, namespace, tmp_path):
    release_ns = make_namespace(cluster, "t-helm")
    release = f"baton-{uuid.uuid4().hex[:6]}"
    sa = f"system:serviceaccount:{release_ns}:{release}"
    try:
        out = run(cluster, "helm", "install", release, str(CHART), "-n", release_ns, "--set", SYSTEM_POOL,
                  "--wait", "--timeout", "90s")
        assert "serves DisaggregatedModels in every namespace" in out.stdout  # NOTES
        assert "kubectl apply --server-side --force-conflicts -f charts/baton/crds/" in out.stdout

        # Everything is there, and the operator pod is Ready (through KWOK; nothing runs in it).
        deployment = deployment_of(cluster, release_ns, release)
        assert deployment.status.ready_replicas == 1
        pod = cluster.core.list_namespaced_pod(release_ns, label_selector=f"app.kubernetes.io/instance={release}").items[0]
        assert pod.spec.security_context.run_as_non_root and pod.spec.containers[0].security_context.read_only_root_filesystem
        cluster.core.read_namespaced_service_account(release, release_ns)
        cluster.core.read_namespaced_service(f"{release}-metrics", release_ns)
        rbac = run(cluster, "kubectl", "get", f"clusterrole/{release}", f"clusterrolebinding/{release}", "-o", "name").stdout
        assert f"clusterrole.rbac.authorization.k8s.io/{release}" in rbac

        # What the ServiceAccount may and may not do.
        allowed = [
            ("list", "disaggregatedmodels.serving.baton.dev", "--all-namespaces"),
            ("patch", "disaggregatedmodels.serving.baton.dev", "--subresource=status", "-n", namespace),
            ("patch", "statefulsets.apps", "-n", namespace),
            ("delete", "statefulsets.apps", "-n", namespace),
            ("patch", "roles.rbac.authorization.k8s.io", "-n", namespace),
            ("create", "events", "-n", namespace),
            ("list", "nodes"),
        ]
        denied = [
            ("get", "secrets", "-n", namespace),
            ("list", "secrets", "--all-namespaces"),
            ("delete", "namespaces"),
            ("create", "pods", "-n", namespace),
            ("delete", "pods", "-n", namespace),
            ("create", "pods", "--subresource=exec", "-n", namespace),
            ("create", "disaggregatedmodels.serving.baton.dev", "-n", namespace),
            ("update", "disaggregatedmodels.serving.baton.dev", "-n", namespace),
            ("delete", "disaggregatedmodels.serving.baton.dev", "-n", namespace),
            ("patch", "disaggregatedmodels.serving.baton.dev", "--subresource=scale", "-n", namespace),
            ("delete", "deployments.apps", "-n", namespace),
            ("delete", "services", "-n", namespace),
            ("update", "statefulsets.apps", "-n", namespace),  # server-side apply only: PATCH, never PUT
            ("patch", "nodes"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
            ("escalate", "roles.rbac.authorization.k8s.io", "-n", namespace),
            ("bind", "roles.rbac.authorization.k8s.io", "-n", namespace),
            ("create", "customresourcedefinitions.apiextensions.k8s.io"),
            ("impersonate", "users"),
        ]
        assert [a for a in allowed if not can_i(cluster, sa, *a)] == []
        assert [d for d in denied if can_i(cluster, sa, *d)] == []
        # The same question through kubectl, as an administrator would ask it.
        out = run(cluster, "kubectl", "auth", "can-i", "get", "secrets", "-n", namespace, f"--as={sa}", check=False)
        assert out.stdout.strip() == "no"
        assert run(cluster, "kubectl", "auth", "can-i", "patch", "statefulsets.apps", "-n", namespace, f"--as={sa}").stdout.strip() == "yes"

        # The operator, with exactly those permissions, serves a model end to end.
        kubeconfig = service_account_kubeconfig(cluster, release_ns, release, tmp_path / "sa.kubeconfig")
        create_model(cluster, namespace)
        with operator_as(kubeconfig, namespace, "--all-namespaces"):
            obj = wait_ready(cluster, namespace)
            assert obj["status"]["decode"]["summary"] == "1/1"
        before = children_versions(cluster, namespace)
        assert before

        # helm upgrade: a changed value rolls the operator; the same values change nothing.
        run(cluster, "helm", "upgrade", release, str(CHART), "-n", release_ns, "--reset-then-reuse-values",
            "--set", "operator.verbose=true", "--wait", "--timeout", "90s")
        upgraded = deployment_of(cluster, release_ns, release)
        assert "--verbose" in upgraded.spec.template.spec.containers[0].args
        assert upgraded.metadata.generation == deployment.metadata.generation + 1
        run(cluster, "helm", "upgrade", release, str(CHART), "-n", release_ns, "--reset-then-reuse-values", "--wait", "--timeout", "90s")
        assert deployment_of(cluster, release_ns, release).metadata.generation == upgraded.metadata.generation
        assert children_versions(cluster, namespace) == before  # the serving model never noticed

        # helm uninstall: the operator and its RBAC go; the CRD, the model and its children stay.
        run(cluster, "helm", "uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s")
        assert not cluster.apps.list_namespaced_deployment(release_ns, label_selector=f"app.kubernetes.io/instance={release}").items
        assert run(cluster, "kubectl", "get", f"clusterrole/{release}", check=False).returncode != 0
        assert run(cluster, "kubectl", "get", f"clusterrolebinding/{release}", check=False).returncode != 0
        with pytest.raises(ApiException):
            cluster.core.read_namespaced_service_account(release, release_ns)
        cluster.extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        assert get_model(cluster, namespace)["metadata"]["name"] == "llama-8b"
        assert children_versions(cluster, namespace) == before
    finally:
        run(cluster, "helm", "uninstall", release, "-n", release_ns, check=False)
        delete_namespace(cluster, release_ns)


def test_namespace_scoped_install_serves_only_its_namespaces(cluster, namespace, tmp_path):
    release_ns = make_namespace(cluster, "t-helm")
    other_ns = make_namespace(cluster, "t-other")
    release = f"baton-{uuid.uuid4().hex[:6]}"
    sa = f"system:serviceaccount:{release_ns}:{release}"
    try:
        out = run(cluster, "helm", "install", release, str(CHART), "-n", release_ns, "--set", SYSTEM_POOL,
                  "--set", f"watch.namespaces={{{namespace}}}", "--wait", "--timeout", "90s")
        assert f"serves DisaggregatedModels in: {namespace}" in out.stdout
        assert run(cluster, "kubectl", "get", "role", release, "-n", namespace, "-o", "name").stdout.strip()
        assert run(cluster, "kubectl", "get", "role", release, "-n", other_ns, check=False).returncode != 0
        assert run(cluster, "kubectl", "get", "clusterrolebinding", release, check=False).returncode != 0

        allowed = [
            ("patch", "statefulsets.apps", "-n", namespace),
            ("list", "disaggregatedmodels.serving.baton.dev", "-n", namespace),
            ("list", "nodes"),  # read-only capacity view
            ("list", "pods", "--all-namespaces"),
        ]
        denied = [
            ("list", "disaggregatedmodels.serving.baton.dev", "--all-namespaces"),
            ("get", "disaggregatedmodels.serving.baton.dev", "-n", other_ns),
            ("patch", "statefulsets.apps", "-n", other_ns),
            ("patch", "statefulsets.apps", "--all-namespaces"),
            ("patch", "configmaps", "-n", release_ns),
            ("create", "events", "-n", other_ns),
            ("get", "pods", "-n", other_ns),  # listing for capacity, not reading single pods
            ("get", "secrets", "-n", namespace),
            ("delete", "namespaces"),
            ("patch", "nodes"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
        ]
        assert [a for a in allowed if not can_i(cluster, sa, *a)] == []
        assert [d for d in denied if can_i(cluster, sa, *d)] == []
        # Nothing bound to the ServiceAccount cluster-wide can write.
        bindings = json.loads(run(cluster, "kubectl", "get", "clusterrolebindings", "-o", "json").stdout)["items"]
        for binding in bindings:
            if any(s.get("name") == release and s.get("namespace") == release_ns for s in binding.get("subjects") or []):
                rules = json.loads(run(cluster, "kubectl", "get", "clusterrole", binding["roleRef"]["name"], "-o", "json").stdout)["rules"]
                assert {v for r in rules for v in r["verbs"]} <= {"list", "watch"}, rules

        kubeconfig = service_account_kubeconfig(cluster, release_ns, release, tmp_path / "sa.kubeconfig")
        create_model(cluster, namespace)
        with operator_as(kubeconfig, namespace, "--namespace", namespace):
            wait_ready(cluster, namespace)

        run(cluster, "helm", "uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s")
        assert run(cluster, "kubectl", "get", "role", release, "-n", namespace, check=False).returncode != 0
        assert get_model(cluster, namespace)["metadata"]["name"] == "llama-8b"
    finally:
        run(cluster, "helm", "uninstall", release, "-n", release_ns, check=False)
        delete_namespace(cluster, release_ns)
        delete_namespace(cluster, other_ns)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _reconciles(port: int) -> float:
    total = 0.0
    for line in _scrape(port).splitlines():
        if line.startswith("baton_operator_reconciles_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Replica:
    """One operator process on this machine, with its own metrics port and log."""

    def __init__(self, identity: str, command: list[str], env: dict[str, str], log: Path, metrics_port: int):
        self.identity, self.log, self.metrics_port = identity, log, metrics_port
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(command, env={**os.environ, "POD_ID": identity, "BATON_WATCH_SERVER_TIMEOUT": "10",
                                                   "NO_PROXY": "127.0.0.1,localhost", **env},
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def active(self) -> bool:
        """Serving: kopf starts a peered operator paused and logs when it resumes or pauses again."""
        lines = [line for line in self.output().splitlines() if "Pausing operations" in line or "Resuming operations" in line]
        return bool(lines) and "Resuming operations" in lines[-1]

    def reconciles(self) -> float:
        return _reconciles(self.metrics_port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def test_two_peered_replicas_run_the_charts_command_line_one_active_at_a_time(cluster, namespace, tmp_path):
    """replicaCount=2: the chart's own container arguments, run twice as local processes with the
    chart's ServiceAccount. One replica reconciles while the other stands by; when the active one
    stops, the other takes over."""
    release_ns = make_namespace(cluster, "t-helm")
    release = f"baton-{uuid.uuid4().hex[:6]}"
    replicas: list[Replica] = []
    try:
        run(cluster, "helm", "install", release, str(CHART), "-n", release_ns, "--set", SYSTEM_POOL,
            "--set", f"watch.namespaces={{{namespace}}}", "--set", "replicaCount=2", "--wait", "--timeout", "90s")
        assert deployment_of(cluster, release_ns, release).status.ready_replicas == 2
        peering = run(cluster, "kubectl", "get", "kopfpeerings.kopf.dev", release, "-n", namespace, "-o", "name").stdout
        assert peering.strip() == f"kopfpeering.kopf.dev/{release}"
        container = deployment_of(cluster, release_ns, release).spec.template.spec.containers[0]
        assert f"--peering={release}" in container.args
        kubeconfig = service_account_kubeconfig(cluster, release_ns, release, tmp_path / "sa.kubeconfig")

        for identity in ("replica-a", "replica-b"):
            metrics, health = free_port(), free_port()
            args = [a.replace("$(POD_IP)", "127.0.0.1").replace(":8080", f":{metrics}").replace(":8081/", f":{health}/")
                    for a in container.args]
            # The image's entrypoint is `baton`; the chart passes the rest.
            replicas.append(Replica(identity, [sys.executable, "-m", "baton.cli", *args], {"KUBECONFIG": str(kubeconfig)},
                                    tmp_path / f"{identity}.log", metrics))
        def peers() -> dict[str, Any]:
            body = run(cluster, "kubectl", "get", "kopfpeerings.kopf.dev", release, "-n", namespace, "-o", "json").stdout
            return json.loads(body).get("status") or {}

        # Both replicas keep their keep-alives in the peering object; the higher priority serves.
        seen = wait_for(lambda: (p := peers()) and {"replica-a", "replica-b"} <= set(p) and p, 30, what="both replicas peering")
        first = max(seen, key=lambda identity: seen[identity]["priority"])
        active = next(r for r in replicas if r.identity == first)
        standby = next(r for r in replicas if r is not active)
        wait_for(lambda: active.active() and not standby.active(), 30, what=f"{active.identity} serving, {standby.identity} standing by")

        create_model(cluster, namespace)
        wait_ready(cluster, namespace)
        assert active.reconciles() > 0 and standby.reconciles() == 0

        # The active replica stops (a rolling update, a node drain): the other one takes over.
        active.stop()
        wait_for(standby.active, 30, what="the standby replica resuming")
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "llama-8b",
                                                      {"spec": {"decode": {"replicas": 2}}})
        obj = wait_ready(cluster, namespace, timeout=60)
        assert obj["status"]["decode"]["summary"] == "2/2"
        assert standby.reconciles() > 0
        assert troubles(standby.output(), namespace) == [], standby.output()
    finally:
        for replica in replicas:
            replica.stop()
        run(cluster, "helm", "uninstall", release, "-n", release_ns, check=False)
        delete_namespace(cluster, release_ns)


def test_a_replica_that_hands_over_to_a_higher_priority_peer_stops_reconciling(cluster, namespace, tmp_path):
    install_peering_crds(cluster)
    run(cluster, "kubectl", "apply", "-n", namespace, "-f", "-",
        input=yaml.safe_dump({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "baton"}}))
    replicas: list[Replica] = []
    try:
        def start(identity: str, priority: int) -> Replica:
            port = free_port()
            command = [sys.executable, "-m", "kopf", "run", "--peering=baton", f"--priority={priority}",
                       f"--namespace={namespace}", "-m", "baton.operator.handlers"]
            env = {"KUBECONFIG": str(cluster.kubeconfig), "BATON_METRICS_ADDRESS": f"127.0.0.1:{port}",
                   "BATON_RESYNC_SECONDS": "1"}
            replica = Replica(identity, command, env, tmp_path / f"{identity}.log", port)
            replicas.append(replica)
            return replica

        old = start("old", 100)
        wait_for(old.active, 30, what="the first replica active")
        create_model(cluster, namespace)
        wait_for(lambda: old.reconciles() > 0, 30, what="the first replica reconciling the model")
        new = start("new", 200)  # e.g. the new pod of a rolling update
        wait_for(lambda: "Pausing operations in favour of" in old.output(), 30, what="the old replica pausing for the new one")
        before = old.reconciles()
        time.sleep(4)  # several resync periods
        assert old.reconciles() == before, "a paused replica went on reconciling"
        assert new.reconciles() > 0
    finally:
        for replica in replicas:
            replica.stop()
