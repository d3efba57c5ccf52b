"""The Helm chart (charts/baton), its Dockerfile and its Argo CD health check, without a cluster.

Each test is one promise of the chart: what it renders for a set of values and, as important, what it
does not render. The RBAC test re-derives what the operator needs from its code (every Kubernetes call
it makes, every watch kopf opens for it) and compares that with what the chart grants, both ways.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "baton"
KUBE_VERSION = "1.37.2"


@cache
def helm() -> str:
    from baton.devcluster import binaries

    path = binaries.bin_dir() / "helm"
    if not os.access(path, os.X_OK):
        pytest.fail(f"helm is not built yet ({path}); `make binaries` builds it", pytrace=False)
    return str(path)


def render(*sets: str, release: str = "rel", namespace: str = "baton-system", values: dict | None = None) -> list[dict[str, Any]]:
    """`helm template` with --set flags; the rendered objects."""
    cmd = [helm(), "template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for s in sets:
        cmd += ["--set", s]
    if values is not None:
        cmd += ["--values", "-"]
    out = subprocess.run(cmd, input=yaml.safe_dump(values) if values is not None else None,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_error(*sets: str) -> str:
    cmd = [helm(), "template", "rel", str(CHART), "--kube-version", KUBE_VERSION]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode != 0, f"helm template {' '.join(sets)} should fail"
    return out.stderr


def one(docs: list[dict], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(docs: list[dict]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------------------ CRDs


def test_the_chart_ships_the_same_crd_file_as_the_repository():
    repo_crd = REPO / "crds" / "disaggregatedmodels.serving.baton.dev.yaml"
    chart_crd = CHART / "crds" / repo_crd.name
    assert chart_crd.read_text() == repo_crd.read_text(), (
        f"{chart_crd.relative_to(REPO)} is stale: copy it from {repo_crd.relative_to(REPO)} "
        f"(cp {repo_crd.relative_to(REPO)} {chart_crd.relative_to(REPO)}) after `make crds`"
    )


def test_the_peering_crds_define_the_kinds_the_chart_creates():
    crds = {d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())}
    assert set(crds) == {"ClusterKopfPeering", "KopfPeering"}
    assert crds["ClusterKopfPeering"]["spec"]["scope"] == "Cluster" and crds["KopfPeering"]["spec"]["scope"] == "Namespaced"
    for crd in crds.values():
        assert crd["spec"]["group"] == "kopf.dev"
        # No status subresource: kopf then writes keep-alives with a plain patch (the RBAC grants no /status).
        assert "subresources" not in crd["spec"]["versions"][0]


# ------------------------------------------------------------------------------------------ lint


@pytest.mark.parametrize("sets", [
    (),
    ("watch.namespaces={team-a,team-b}",),
    ("replicaCount=2", "metrics.serviceMonitor.enabled=true", "metrics.prometheusRule.enabled=true"),
    ("watch.namespaces={team-a}", "peering.enabled=true", "rbac.scanning=false", "metrics.enabled=false"),
], ids=["defaults", "namespaced", "ha-monitoring", "namespaced-peering-minimal"])
def test_helm_lint_strict(sets):
    cmd = [helm(), "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version,supported", [("1.32.9", False), ("1.33.0", True), (KUBE_VERSION, True)])
def test_the_chart_installs_on_kubernetes_1_33_or_newer_as_the_quickstart_says(version, supported):
    """Before 1.33 the API server runs the CRD's CEL rules on /status writes without ratcheting unchanged fields
    (kubernetes/kubernetes#129506): the operator could not write InvalidSpec on a model stored before a newer
    rule. Helm refuses the install there, and the quickstart names the same minimum."""
    out = subprocess.run([helm(), "template", "rel", str(CHART), "--kube-version", version], capture_output=True, text=True)
    assert (out.returncode == 0) == supported, out.stderr
    if not supported:
        assert "chart requires kubeVersion: >=1.33.0-0" in out.stderr
    assert "Kubernetes 1.33 or newer" in (REPO / "docs" / "quickstart.md").read_text()


def test_the_quickstart_creates_the_token_secret_the_examples_download_their_gated_models_with():
    """Meta's checkpoints are gated on the Hugging Face Hub: an example serving one names the Secret with the
    token, and the quickstart creates that Secret before it applies a model (the engine pods need it to start)."""
    quickstart = (REPO / "docs" / "quickstart.md").read_text()
    for path in sorted((REPO / "examples").glob("*.yaml")):
        if path.name.startswith("invalid-"):  # refused by the API server on purpose: never created
            continue
        hub = yaml.safe_load(path.read_text())["spec"]["model"]["source"].get("huggingFace")
        if hub and hub["id"].startswith("meta-llama/"):
            secret = hub.get("tokenSecret")
            assert secret, f"examples/{path.name} downloads gated {hub['id']} without a tokenSecret"
            create = f"kubectl create secret generic {secret['name']} -n models --from-literal={secret['key']}="
            assert create in quickstart, f"the quickstart never creates the Secret examples/{path.name} names"
            assert quickstart.index(create) < quickstart.index("kubectl apply -n models -f examples/")


# ------------------------------------------------------------------------------------------ defaults


def test_defaults_render_a_cluster_wide_operator_and_nothing_optional():
    docs = render()
    assert kinds(docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    c = container(docs)
    assert c["image"] == "ghcr.io/baton-serving/baton:0.1.0"
    assert c["args"][0] == "operator" and "--all-namespaces" in c["args"]
    assert not any(a.startswith(("--namespace", "--peering")) for a in c["args"])
    assert "--metrics-address=$(POD_IP):8080" in c["args"]
    assert "--liveness=http://$(POD_IP):8081/healthz" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Scheduler pods run the operator's own image unless a model says otherwise.
    assert env["BATON_IMAGE"]["value"] == c["image"]
    # One standalone operator never overlaps with its successor.
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_the_pod_is_hardened_and_bounded():
    docs = render()
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}  # the only writable path
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


def test_hardening_cannot_be_switched_off_through_values():
    assert "readOnlyRootFilesystem" in render_error("securityContext.readOnlyRootFilesystem=false")
    assert "allowPrivilegeEscalation" in render_error("securityContext.allowPrivilegeEscalation=true")
    assert "runAsNonRoot" in render_error("podSecurityContext.runAsNonRoot=false")
    assert "runAsUser" in render_error("podSecurityContext.runAsUser=0")
    # The container's own settings win over the pod's: they cannot undo it there either.
    assert "runAsNonRoot" in render_error("securityContext.runAsNonRoot=false", "securityContext.runAsUser=0")
    assert "runAsUser" in render_error("securityContext.runAsUser=0")
    assert "privileged" in render_error("securityContext.privileged=true")
    # another non-root UID is still yours to choose
    assert container(render("securityContext.runAsUser=20000"))["securityContext"]["runAsUser"] == 20000


@pytest.mark.parametrize("pod_ip", ["10.244.1.5", "fd00:10:244::5"], ids=["ipv4", "ipv6"])
def test_the_charts_listen_addresses_work_on_ipv4_and_ipv6(pod_ip):
    """The chart builds --liveness and --metrics-address from the unbracketed $(POD_IP); `baton operator`
    brackets an IPv6 host before kopf reads the URL (urlsplit's port fails on `http://fd00::5:8081/...`)
    and hands the metrics server host and port apart."""
    from baton.operator import main

    args = [a.replace("$(POD_IP)", pod_ip) for a in container(render())["args"]]
    parsed = main.parser().parse_args(args[1:])
    liveness = urllib.parse.urlsplit(main.liveness_endpoint(parsed.liveness))
    assert (liveness.hostname, liveness.port, liveness.path) == (pod_ip, 8081, "/healthz")  # as kopf reads it
    assert main.metrics_address(parsed.metrics_address).rpartition(":") == (pod_ip, ":", "8080")  # as handlers.py
    # already bracketed, or IPv4: unchanged
    assert main.liveness_endpoint("http://[fd00::5]:8081/healthz") == "http://[fd00::5]:8081/healthz"
    assert main.liveness_endpoint("http://127.0.0.1:8081/healthz") == "http://127.0.0.1:8081/healthz"
    assert main.metrics_address("[fd00::5]:8080") == "fd00::5:8080"
    # an address without a port fails at start-up with the flag's value, before kopf runs
    for bad in (["--liveness", "http://fd00::5/healthz"], ["--metrics-address", "127.0.0.1"]):
        with pytest.raises(SystemExit) as exit_:
            main.main(bad)
        assert exit_.value.code == 2


def test_image_pull_secrets_reach_the_operator_pod_and_every_models_scheduler(monkeypatch):
    from baton.render.scheduler import image_pull_secrets

    c = container(render())
    assert "imagePullSecrets" not in one(render(), "Deployment")["spec"]["template"]["spec"]
    assert "BATON_IMAGE_PULL_SECRETS" not in {e["name"] for e in c["env"]}
    secrets = [{"name": "regcred"}, {"name": "mirror"}]
    docs = render(values={"imagePullSecrets": secrets})
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["imagePullSecrets"] == secrets
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["BATON_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    # what the operator renders into each scheduler pod from that variable
    monkeypatch.setenv("BATON_IMAGE_PULL_SECRETS", env["BATON_IMAGE_PULL_SECRETS"])
    assert image_pull_secrets() == secrets


def test_the_upgrade_note_applies_the_charts_crds_taking_over_helms_fields():
    """Helm created the CRDs under its own field manager: a server-side apply of a changed schema must
    force the conflicts, and must apply the chart's crds/ (with kopf's peering CRDs) as the docs say."""
    command = "kubectl apply --server-side --force-conflicts -f charts/baton/crds/"
    assert command in (CHART / "templates" / "NOTES.txt").read_text()
    assert command in (REPO / "docs" / "operations.md").read_text()


def test_the_upgrade_command_takes_the_new_charts_defaults():
    """`helm upgrade --reuse-values` keeps the old release's values, the old chart's defaults included, so a value
    a newer chart adds renders empty; `--reset-then-reuse-values` keeps only what the user set."""
    command = "helm upgrade baton charts/baton -n baton-system --reset-then-reuse-values"
    assert command in (REPO / "docs" / "operations.md").read_text()
    assert "--reset-then-reuse-values" in subprocess.run([helm(), "upgrade", "--help"], capture_output=True,
                                                         text=True, check=True).stdout
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md"), CHART / "README.md", CHART / "templates" / "NOTES.txt"]:
        assert not re.search(r"helm upgrade [^\n`]*--reuse-values", doc.read_text()), doc.relative_to(REPO)


def test_the_metrics_service_reaches_the_metrics_port():
    docs = render()
    service = one(docs, "Service")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert "Service" not in kinds(render("metrics.enabled=false"))
    assert not any(a.startswith("--metrics-address") for a in container(render("metrics.enabled=false"))["args"])


def test_monitoring_objects_only_when_asked_and_they_match_the_service_and_the_metrics():
    from baton.operator import metrics

    assert not {"ServiceMonitor", "PrometheusRule"} & set(kinds(render()))
    docs = render("metrics.serviceMonitor.enabled=true", "metrics.prometheusRule.enabled=true",
                  "metrics.serviceMonitor.labels.release=kube-prometheus")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"BatonOperatorDown", "BatonReconcileErrors", "BatonModelStalled"}
    exported = {m.name for m in metrics.REGISTRY.collect()} | {"up"}
    for rule in rules:
        used = set(re.findall(r"\b(baton_[a-z_]+|up)\b", rule["expr"]))
        # prometheus_client names a counter family without its _total suffix.
        assert {u.removesuffix("_total") for u in used} <= exported, rule["expr"]
        assert f'job="{service["metadata"]["name"]}"' in rule["expr"]


def _alerts(*sets: str) -> dict[str, dict[str, Any]]:
    docs = render("metrics.prometheusRule.enabled=true", *sets)
    return {r["alert"]: r for r in one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}


def test_the_operator_down_alert_is_made_only_where_its_series_can_exist():
    # `up` with the metrics Service's job comes from the ServiceMonitor: without it (or without metrics at
    # all) absent() would fire for ever
    assert "BatonOperatorDown" in _alerts("metrics.serviceMonitor.enabled=true")
    assert set(_alerts()) == {"BatonReconcileErrors", "BatonModelStalled"}
    assert "BatonOperatorDown" not in _alerts("metrics.enabled=false", "metrics.serviceMonitor.enabled=true")


@pytest.mark.parametrize("interval,errors_for", [("30s", None), ("1m", None), ("1m30s", "15m"), ("2m", "15m")])
def test_the_reconcile_error_alert_fires_only_for_errors_that_persist(interval, errors_for):
    # A persistently failing model is retried at most every ERROR_BACKOFF_MAX_SECONDS (+10%): a window shorter
    # than that gap and a scrape on either side reads 0 between two retries and resets the alert's `for`. A
    # window as long as `for` keeps one failed pass in view until the alert fires: it pages for a blip. The
    # window follows the scrape interval the ServiceMonitor sets.
    from baton.operator.handlers import ERROR_BACKOFF_MAX_SECONDS

    docs = render("metrics.prometheusRule.enabled=true", "metrics.serviceMonitor.enabled=true",
                  f"metrics.serviceMonitor.interval={interval}",
                  *([f"metrics.prometheusRule.errorsFor={errors_for}"] if errors_for else []))
    rule = {r["alert"]: r for r in one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}["BatonReconcileErrors"]
    expr = rule["expr"]
    assert "increase(" in expr and expr.rstrip().endswith("> 0"), expr
    scrape = _seconds(one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["interval"])
    windows = [_seconds(w) for w in re.findall(r"\[(\w+)\]", expr)]
    assert windows, expr
    for window in windows:
        assert ERROR_BACKOFF_MAX_SECONDS * 1.1 + 2 * scrape < window < _seconds(rule["for"]), expr


def test_every_reconcile_result_series_exists_at_zero_from_the_operators_start():
    """increase() sees no increase in a series whose first sample is already 1: the first error after an
    operator start would never count towards BatonReconcileErrors unless its series was there before."""
    probe = ("from prometheus_client import generate_latest; from baton.operator import metrics; "
             "print(generate_latest(metrics.REGISTRY).decode())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    for result in ("ok", "stalled", "transient", "error"):
        assert f'baton_operator_reconciles_total{{result="{result}"}} 0.0' in out, out


def test_an_error_alert_window_as_long_as_errors_for_is_refused_at_install():
    """A 2m scrape interval needs a 10m window: errorsFor 10m would page for one failed pass."""
    message = render_error("metrics.prometheusRule.enabled=true", "metrics.serviceMonitor.interval=2m")
    assert "metrics.prometheusRule.errorsFor (10m) must be longer than the error alert's window, 10m" in message


def test_the_alerts_read_only_this_releases_series():
    """Two releases of the same name in two namespaces (per-team installs) share a job label: each alert
    also matches the release's namespace, so neither fires for the other's models."""
    for rule in _alerts("metrics.serviceMonitor.enabled=true").values():
        assert 'namespace="baton-system"' in rule["expr"], rule["expr"]


def test_the_stalled_alert_reads_a_gauge_that_holds_between_the_passes_of_a_stalled_model():
    """A stalled model is passed again only every operator.resyncSeconds (up to a day): a rate of stalled passes
    reads 0 between them and keeps resetting the alert's `for`."""
    rule = _alerts("metrics.serviceMonitor.enabled=true", "operator.resyncSeconds=3600")["BatonModelStalled"]
    assert "baton_operator_models_stalled" in rule["expr"] and "rate(" not in rule["expr"], rule["expr"]


def _seconds(duration: str) -> float:
    """A Prometheus duration such as 7m or 1h30m, in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_object_names_fit_in_63_characters():
    release = "a-long-release-name-that-is-as-long-as-helm-allows-it"  # 53 characters, Helm's limit
    assert len(release) == 53
    docs = render("replicaCount=2", "watch.namespaces={a}", release=release)
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63 and not d["metadata"]["name"].endswith("-"), d["metadata"]["name"]


# ------------------------------------------------------------------------------------------ scope


def _rules(doc: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in doc["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind", "impersonate", "*"}


def test_namespace_mode_writes_only_in_the_listed_namespaces():
    docs = render("watch.namespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "rel-baton", "namespace": "baton-system"}]
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["rel-baton-read"]
    assert {v for _, _, v in _rules(cluster_roles[0])} <= {"list", "watch"}
    args = container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_namespace_mode_without_scanning_reads_only_nodes_and_pods_cluster_wide():
    docs = render("watch.namespaces={team-a}", "rbac.scanning=false")
    assert _rules(one(docs, "ClusterRole")) == {("", "nodes", "list"), ("", "pods", "list")}


def test_rbac_can_be_left_to_the_installer():
    docs = render("rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops")
    assert kinds(docs) == ["Deployment", "Service"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_an_existing_service_account_must_be_named_never_the_namespaces_default():
    """serviceAccount.create=false without a name bound the operator's cluster-wide roles to the namespace's
    `default` ServiceAccount, which every pod there that names none runs as."""
    assert "serviceAccount.name" in render_error("serviceAccount.create=false")
    docs = render("serviceAccount.create=false", "serviceAccount.name=ops")
    assert {s["name"] for s in one(docs, "ClusterRoleBinding")["subjects"]} == {"ops"}


def test_namespaces_must_be_dns_labels_and_unknown_values_fail():
    assert "watch" in render_error("watch.namespaces={Team_A}")
    assert "additional properties" in render_error("watch.namespace=team-a")
    assert "replicaCount" in render_error("replicaCount=0")


# ------------------------------------------------------------------------------------------ peering


def test_more_than_one_replica_turns_peering_on_with_its_object_and_rbac():
    docs = render("replicaCount=2")
    args = container(docs)["args"]
    assert "--peering=rel-baton" in args
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "rel-baton"
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in _rules(one(docs, "ClusterRole"))
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "KopfPeering" not in kinds(docs)


def test_namespaced_peering_puts_a_peering_object_in_each_namespace():
    docs = render("watch.namespaces={team-a,team-b}", "peering.enabled=true", "peering.name=baton")
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [("team-a", "baton"), ("team-b", "baton")]
    for role in (d for d in docs if d["kind"] == "Role"):
        assert ("kopf.dev", "kopfpeerings", "patch") in _rules(role)
    assert "--peering=baton" in container(docs)["args"]
    assert "ClusterKopfPeering" not in kinds(docs)


def test_no_peering_rbac_without_peering():
    for docs in (render(), render("watch.namespaces={team-a}")):
        for role in (d for d in docs if d["kind"] in ("Role", "ClusterRole")):
            assert not any(g == "kopf.dev" for g, _, _ in _rules(role))


# ------------------------------------------------------------------------------------------ RBAC from the code


def _group(api_prefix: str) -> str:
    return "" if api_prefix == "/api/v1" else api_prefix.split("/")[2]


def _calls_to_kube() -> list[tuple[str, str | None, ast.AST]]:
    """(method, literal kind or None, enclosing function) for every `<x>.kube.<method>(...)` call."""
    out = []
    for path in sorted((REPO / "operator" / "baton" / "operator").glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                target = node.func.value
                is_kube = (isinstance(target, ast.Name) and target.id == "kube") or (
                    isinstance(target, ast.Attribute) and target.attr == "kube")
                if not is_kube:
                    continue
                first = node.args[0] if node.args else None
                kind = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
                out.append((node.func.attr, kind, func))
    return out


def required_permissions() -> tuple[set[tuple[str, str, str]], set[tuple[str, str, str]]]:
    """What the operator's code needs: (namespaced, cluster-wide) sets of (apiGroup, resource, verb)."""
    import kopf

    import baton.operator.handlers  # noqa: F401  (registers the watches)
    from baton.api.v1alpha1 import DisaggregatedModel
    from baton.operator.kube import RESOURCES
    from baton.render import render_children
    from baton.render.naming import Target

    def resource(kind: str) -> tuple[str, str]:
        prefix, plural = RESOURCES[kind]
        return _group(prefix), plural

    namespaced: set[tuple[str, str, str]] = set()
    cluster: set[tuple[str, str, str]] = set()
    # kopf's watches (list + watch) for the model, its children and their pods.
    for handler in kopf.get_default_registry()._watching.get_all_handlers():
        selector = handler.selector
        namespaced |= {(selector.group or "", selector.plural or selector.any_name, v) for v in ("list", "watch")}
    # The children it applies server-side (a PATCH that creates an object is also authorised as a
    # create), and the RBAC it hands the
    # scheduler, which it must hold itself to be allowed to create and bind it.
    example = yaml.safe_load((REPO / "examples" / "small.yaml").read_text())
    model = DisaggregatedModel.model_validate(example)
    children = render_children(Target(name="m", namespace="ns", uid="u", spec=model.spec))
    for child in children:
        namespaced |= {(*resource(child["kind"]), "patch"), (*resource(child["kind"]), "create")}
        if any(ref.get("blockOwnerDeletion") for ref in child["metadata"].get("ownerReferences") or []):
            # OwnerReferencesPermissionEnforcement (OpenShift): blockOwnerDeletion takes update on the
            # owner's finalizers
            namespaced.add(("serving.baton.dev", "disaggregatedmodels/finalizers", "update"))
        if child["kind"] == "Role":
            namespaced |= {(g, r, v) for rule in child["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # Every direct call.
    verbs = {"get": "get", "list": "list", "list_recent": "list", "delete": "delete", "list_cluster": "list"}
    for method, kind, func in _calls_to_kube():
        if method == "patch_status":
            namespaced.add(("serving.baton.dev", "disaggregatedmodels/status", "patch"))
        elif method == "create_event":
            namespaced.add(("", "events", "create"))
        elif method == "patch_event":
            namespaced.add(("", "events", "patch"))
        elif method == "apply":
            continue  # covered by the rendered children above
        elif method == "scale":
            assert kind, f"scale() in {func.name}() must name its kind"
            group, plural = resource(kind)
            namespaced.add((group, f"{plural}/scale", "patch"))
        elif method in verbs:
            # A kind passed in a variable: the kinds named in the same function (delete_generation's
            # loop), or else a read of Baton's own children (the reconciler's cache-miss reads).
            found = [kind] if kind else sorted({n.value for n in ast.walk(func) if isinstance(n, ast.Constant)
                                                and isinstance(n.value, str) and n.value in RESOURCES})
            if not found and method in ("get", "list", "list_recent"):
                found = sorted({c["kind"] for c in children})
            assert found, f"cannot tell which kinds {method}() in {func.name}() touches"
            for k in found:
                (cluster if method == "list_cluster" else namespaced).add((*resource(k), verbs[method]))
        elif method not in ("writes", "requests", "stopping_on"):
            raise AssertionError(f"unknown Kube method {method}(): map it to an RBAC verb in this test")
    # kopf itself: events for its warnings, and the finalizer it removes from models when no
    # handler needs one (models created by earlier Baton builds carry serving.baton.dev/finalizer).
    namespaced |= {("", "events", "create"), ("serving.baton.dev", "disaggregatedmodels", "patch")}
    cluster |= {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}  # kopf's scanning
    return namespaced, cluster


def test_cluster_wide_rbac_is_exactly_what_the_code_uses():
    namespaced, cluster = required_permissions()
    granted = _rules(one(render(), "ClusterRole"))
    needed = namespaced | cluster
    assert needed - granted == set(), "the operator needs permissions the chart does not grant"
    assert granted - needed == set(), "the chart grants permissions no code path uses"


def test_without_disruption_budgets_the_chart_grants_nothing_on_them():
    """operator.disruptionBudgets=false: the operator renders and watches no PodDisruptionBudget, so neither
    role grants any verb on them; the rest stays exactly what the code uses."""
    namespaced, cluster = required_permissions()
    pdb = {p for p in namespaced if p[1] == "poddisruptionbudgets"}
    assert pdb, "the default build uses disruption budgets"
    granted = _rules(one(render("operator.disruptionBudgets=false"), "ClusterRole"))
    assert granted == (namespaced | cluster) - pdb
    role = _rules(one(render("operator.disruptionBudgets=false", "watch.namespaces={team-a}", "rbac.scanning=false"), "Role"))
    assert role == namespaced - pdb


def test_namespaced_rbac_is_exactly_what_the_code_uses():
    namespaced, cluster = required_permissions()
    docs = render("watch.namespaces={team-a}", "rbac.scanning=false")
    role = _rules(one(docs, "Role"))
    assert role == namespaced
    cluster_needed = {p for p in cluster if p[1] != "customresourcedefinitions"}  # scanning is optional here
    assert _rules(one(docs, "ClusterRole")) == cluster_needed


# ------------------------------------------------------------------------------------------ values


def _leaves(node: Any, prefix: str = "") -> set[str]:
    free_form = ("resources.requests", "resources.limits", "podSecurityContext", "securityContext")
    if isinstance(node, dict) and node and not prefix.endswith(free_form):
        out = set()
        for k, v in node.items():
            out |= _leaves(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix}


def _schema_paths(schema: dict, prefix: str = "") -> set[str]:
    props = schema.get("properties")
    if schema.get("type") == "object" and props and schema.get("additionalProperties") is False:
        out = set()
        for k, v in props.items():
            out |= _schema_paths(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix}


def _values_read(template: str) -> str:
    """The template with each variable bound to a value (`$r := .Values.metrics.prometheusRule`) spelled out,
    so that `$r.downFor` reads as `.Values.metrics.prometheusRule.downFor`."""
    for var, path in re.findall(r"(\$\w+) := (\.Values\.[\w.]+)", template):
        template = template.replace(f"{var}.", f"{path}.")
    return template


def test_values_and_schema_describe_the_same_keys_and_every_value_is_used():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = _leaves(values)
    schema_paths = _schema_paths(schema) - {"global"}
    assert leaves == schema_paths
    templates = "\n".join(_values_read(p.read_text()) for p in (CHART / "templates").glob("*"))

    def read(path: str) -> bool:
        return re.search(rf"\.Values\.{re.escape(path)}(?![\w-])", templates) is not None

    # Each leaf must be read by its own path: a template that reads its parent does not count, except for the
    # leaves listed here, which a template passes on whole with their parent (`toYaml .Values.resources`).
    passed_whole = {"resources.requests": "resources", "resources.limits": "resources"}
    assert all(read(parent) for parent in passed_whole.values())
    unused = sorted(leaf for leaf in leaves if not read(leaf) and leaf not in passed_whole)
    assert unused == [], "values no template reads: wire them or drop them from values.yaml and the schema"


# ------------------------------------------------------------------------------------------ Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_package_and_runs_baton_as_a_non_root_user():
    steps = _dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert len([s for s in steps if s[0] == "FROM"]) == 1
    copied = [rest.split()[0] for op, rest in steps if op == "COPY"] + [
        src for op, rest in steps if op == "COPY" for src in rest.split()[1:-1]]
    # The build context it copies is what pyproject.toml needs to build the package.
    assert {"pyproject.toml", "README.md", "operator/"} <= set(copied)
    for src in copied:
        assert (REPO / src).exists(), src
    runs = " && ".join(rest for op, rest in steps if op == "RUN")
    assert re.search(r"pip install (--[a-z-]+ )*\"\.\[redis,tokenizer\]\"( |$)", runs), runs
    # ... with the extras the scheduler it runs needs for `degradation.store: redis` and `tokenizer: model`
    for extra in ("redis", "tokenizer"):
        assert re.search(rf"^{extra} = \[", (REPO / "pyproject.toml").read_text(), re.M), extra
    users = [rest for op, rest in steps if op == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-zero UID lets Kubernetes verify runAsNonRoot"
    assert f"--uid {uid}" in runs
    assert [rest for op, rest in steps if op == "ENTRYPOINT"] == ['["baton"]']
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    # The entry point the chart relies on exists: pyproject's console script `baton`, with `operator`.
    from baton.cli import SUBCOMMANDS

    assert "operator" in SUBCOMMANDS and container(render())["args"][0] == "operator"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'baton = "baton.cli:main"' in pyproject


# ------------------------------------------------------------------------------------------ Argo CD


def _lua_table(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {_lua_table(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(_lua_table(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run charts/baton/argocd/health.lua the way Argo CD does: `obj` global in, `hs` table out."""
    script = CHART / "argocd" / "health.lua"
    lua = shutil.which("lua5.4") or shutil.which("lua") or shutil.which("lua5.3")
    if lua:
        program = f"obj = {_lua_table(obj)}\nlocal hs = dofile({json.dumps(str(script))})\nio.write(hs.status, '\\t', hs.message or '')\n"
        out = subprocess.run([lua, "-"], input=program, capture_output=True, text=True, check=True)
        status, _, message = out.stdout.partition("\t")
        return status, message
    try:
        import lupa  # a Lua runtime from PyPI, when no interpreter is installed
    except ImportError:
        pytest.fail("no Lua interpreter: apt-get install lua5.4 (or pip install lupa, a test extra) to run the Argo CD health check", pytrace=False)
    runtime = lupa.LuaRuntime()
    runtime.execute(f"obj = {_lua_table(obj)}")
    hs = runtime.execute(script.read_text())
    return hs["status"], hs["message"] or ""


def _model(status: dict | None, generation: int = 2, paused: bool = False) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "serving.baton.dev/v1alpha1", "kind": "DisaggregatedModel",
                           "metadata": {"name": "m", "namespace": "ns", "generation": generation},
                           "spec": {"rollout": {"paused": paused}}}
    if status is not None:
        obj["status"] = status
    return obj


def _status(observed: Any, **kw: Any) -> dict[str, Any]:
    from baton.operator import status

    base = dict(generation=2, previous={}, desired_prefill=1, desired_decode=1, desired_scheduler=1, revision="r",
                fingerprints=("f", "f"), scheduler_endpoint="m-scheduler.ns.svc:8000", kv_bytes_per_token=1,
                decode_kv_capacity_tokens=1)
    base.update(kw)
    return status.compute(observed=observed, **base)


def _sts(ready: int, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": generation, "readyReplicas": ready, "updatedReplicas": ready, "replicas": ready}}


def test_argocd_health_check_reads_the_operator_conditions():
    from baton.operator import status

    ready = _status(status.Observed(prefill=_sts(1), decode=_sts(1), scheduler=_sts(1)))
    assert argocd_health(_model(ready)) == ("Healthy", ready["conditions"][0]["message"])

    progressing = _status(status.Observed(prefill=_sts(0), decode=_sts(1), scheduler=_sts(1)))
    health, message = argocd_health(_model(progressing))
    assert health == "Progressing" and message.startswith("Progressing: waiting for prefill 0/1")

    stalled = _status(status.Observed(problem=(status.REASON_INVALID_SPEC, "engine.extraOptions sets kv_cache_config")))
    assert argocd_health(_model(stalled)) == ("Degraded", "InvalidSpec: engine.extraOptions sets kv_cache_config")

    unschedulable = _status(status.Observed(prefill=_sts(0), decode=_sts(1), scheduler=_sts(1),
                                            unschedulable=["m-prefill-0: 0/8 nodes are available"]))
    health, message = argocd_health(_model(unschedulable))
    assert health == "Progressing" and message.startswith("PodsUnschedulable: ")
    assert argocd_health(_model(unschedulable, paused=True))[0] == "Suspended"

    # Not seen yet by the operator: Progressing, whatever an older status said.
    assert argocd_health(_model(None)) == ("Progressing", "Waiting for the Baton operator to report status")
    stale = dict(ready, observedGeneration=1)
    assert argocd_health(_model(stale)) == ("Progressing", "Waiting for the Baton operator to observe generation 2")


@pytest.mark.parametrize("enabled", [True, False])
def test_disruption_budgets_can_be_turned_off_for_clusters_whose_own_budgets_select_batons_pods(enabled):
    """operator.disruptionBudgets reaches the operator, which then renders no budget and watches none
    (Kubernetes refuses to evict a pod two budgets select)."""
    docs = render(f"operator.disruptionBudgets={str(enabled).lower()}")
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["BATON_DISRUPTION_BUDGETS"] == str(enabled).lower()
    probe = ("import baton.operator.kube as k; from baton.render import render_children; from baton.render.naming "
             "import Target; from baton.api.v1alpha1 import DisaggregatedModel; import yaml; "
             f"m = DisaggregatedModel.model_validate(yaml.safe_load(open({str(REPO / 'examples' / 'small.yaml')!r}))); "
             "kinds = {c['kind'] for c in render_children(Target(name='m', namespace='ns', uid='u', spec=m.spec))}; "
             "print('PodDisruptionBudget' in k.CHILD_KINDS, 'PodDisruptionBudget' in kinds)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "BATON_DISRUPTION_BUDGETS": env["BATON_DISRUPTION_BUDGETS"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(enabled), str(enabled)]


def test_the_metrics_and_health_ports_must_differ():
    """Two servers cannot bind one port: the chart says so at install, instead of a crash-looping operator."""
    health_port = yaml.safe_load((CHART / "values.yaml").read_text())["healthPort"]
    assert "metrics.port and healthPort are both" in render_error(f"metrics.port={health_port}")
    render(f"metrics.port={health_port}", "metrics.enabled=false")  # no metrics server, no clash
