"""The GitOps contract on the real local control plane, and what `kubectl` shows a user.

- The operator never writes the spec of a DisaggregatedModel (managedFields and the audit log).
- Children are server-side applied under the field manager `baton-operator`.
- Re-applying an unchanged manifest, or a GitOps re-sync, changes nothing on the children.
- Status follows kstatus, so Argo CD and Flux report health correctly.
- Replicas: the scale subresource reaches the decode StatefulSet, and Git keeps out of its way.
- `kubectl explain` of nested fields, `kubectl describe` telling what is wrong and what to do.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from typing import Any

import pytest
import yaml

from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from baton.operator import status as status_module
from cluster_plugin import load_example, wait_for
from spec_fields import set_spec_fields

pytestmark = pytest.mark.cluster

GITOPS = "gitops-controller"  # the field manager a GitOps tool applies with (Argo CD, Flux)
BATON_AGENTS = ("baton-operator/", "kopf/")


# ------------------------------------------------------------------------------------------ helpers


def kubectl(cluster, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(cluster.plane.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
                         input=input, capture_output=True, text=True)
    if check:
        assert out.returncode == 0, f"kubectl {' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out


def git_manifest(**spec_changes: Any) -> dict[str, Any]:
    """examples/small.yaml as it would sit in Git: no decode.replicas (the autoscaler's field)."""
    manifest = load_example("small.yaml")
    manifest["spec"]["decode"].pop("replicas", None)
    set_spec_fields(manifest["spec"], spec_changes)
    return manifest


def sync(cluster, namespace: str, manifest: dict[str, Any], server_side: bool = True, check: bool = True):
    """What a GitOps tool does on every sync: apply the manifest from Git."""
    args = ["apply", "-n", namespace, "-f", "-"]
    args += ["--server-side", f"--field-manager={GITOPS}"] if server_side else []
    return kubectl(cluster, *args, input=yaml.safe_dump(manifest), check=check)


def get_dm(cluster, namespace: str, name: str = "llama-8b") -> dict[str, Any]:
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def condition(obj: dict, ctype: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def wait_ready(cluster, namespace: str, name: str = "llama-8b", timeout: float = 90) -> dict:
    def ready():
        obj = get_dm(cluster, namespace, name)
        ok = (condition(obj, "Ready").get("status") == "True" and condition(obj, "Reconciling").get("status") == "False"
              and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"])
        return obj if ok else None

    return wait_for(ready, timeout, what=f"{name} Ready at its current generation")


def children(cluster, namespace: str) -> list[Any]:
    selector = "app.kubernetes.io/managed-by=baton-operator"
    return [
        *cluster.apps.list_namespaced_stateful_set(namespace, label_selector=selector).items,
        *cluster.apps.list_namespaced_deployment(namespace, label_selector=selector).items,
        *cluster.core.list_namespaced_service(namespace, label_selector=selector).items,
        *cluster.core.list_namespaced_config_map(namespace, label_selector=selector).items,
        *cluster.core.list_namespaced_service_account(namespace, label_selector=selector).items,
    ]


def versions(cluster, namespace: str) -> dict[str, str]:
    out = {f"{type(o).__name__}/{o.metadata.name}": o.metadata.resource_version for o in children(cluster, namespace)}
    for kind in ("roles", "rolebindings"):
        items = json.loads(kubectl(cluster, "get", kind, "-n", namespace, "-l", "app.kubernetes.io/managed-by=baton-operator",
                                   "-o", "json").stdout)["items"]
        out.update({f"{kind}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in items})
    return out


def audit_mark(cluster) -> int:
    return len(cluster.plane.audit_log.read_text().splitlines())


def baton_writes(cluster, namespace: str, since: int) -> list[tuple[str, str, str, str]]:
    """(verb, resource, subresource, name) of every write Baton's clients (its own and kopf's) made
    in `namespace` since line `since` of the API server's audit log (which records every write)."""
    out = []
    for line in cluster.plane.audit_log.read_text().splitlines()[since:]:
        entry = json.loads(line)
        ref = entry.get("objectRef", {})
        if (entry.get("userAgent", "").startswith(BATON_AGENTS) and ref.get("namespace") == namespace
                and entry.get("stage") == "ResponseComplete"):
            out.append((entry["verb"], ref.get("resource", ""), ref.get("subresource", ""), ref.get("name", "")))
    return out


def reconcile_passes() -> float:
    """Passes the in-process operator (the `operator` fixture) has finished, whatever their result."""
    from baton.operator import metrics

    return sum(s.value for m in metrics.REGISTRY.collect() if m.name == "baton_operator_reconciles"
               for s in m.samples if s.name.endswith("_total"))


def kstatus(obj: dict[str, Any]) -> tuple[str, str]:
    """What kstatus (sigs.k8s.io/cli-utils/pkg/kstatus, used by Flux and kpt) computes for a custom
    resource, mirroring its generic rules: deletion -> Terminating; an unobserved generation ->
    InProgress; the first of Reconciling=True (InProgress) or Stalled=True (Failed); else Current."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating", ""
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress", "LatestGenerationNotObserved"
    for c in status.get("conditions", []) or []:
        if c.get("type") == "Reconciling" and c.get("status") == "True":
            return "InProgress", c.get("reason", "")
        if c.get("type") == "Stalled" and c.get("status") == "True":
            return "Failed", c.get("reason", "")
    return "Current", ""


# ------------------------------------------------------------------------------------------ spec and children


def test_the_operator_never_writes_the_spec_and_applies_children_under_its_field_manager(cluster, namespace, operator):
    mark = audit_mark(cluster)
    sync(cluster, namespace, git_manifest())
    applied = get_dm(cluster, namespace)
    obj = wait_ready(cluster, namespace)

    # The spec is exactly what Git applied: same content, same generation.
    assert obj["spec"] == applied["spec"]
    assert obj["metadata"]["generation"] == applied["metadata"]["generation"] == 1
    # Who manages what on the model: Git owns the spec; Baton owns the status, and nothing else.
    managers = kubectl(cluster, "get", "dm", "llama-8b", "-n", namespace, "--show-managed-fields", "-o", "json").stdout
    for entry in json.loads(managers)["metadata"]["managedFields"]:
        if entry["manager"] == GITOPS:
            assert entry["operation"] == "Apply" and "f:spec" in entry["fieldsV1"]
        else:
            assert entry.get("subresource") == "status", entry
            assert set(entry["fieldsV1"]) == {"f:status"}, entry
    # The audit log agrees: Baton's only writes to the model went to its status subresource.
    writes = baton_writes(cluster, namespace, mark)
    model_writes = {(verb, sub) for verb, resource, sub, _ in writes if resource == PLURAL}
    assert model_writes == {("patch", "status")}, writes

    # Every child is server-side applied by Baton's field manager; Baton never used a plain update.
    kinds_seen = set()
    for kind in ("statefulsets", "deployments", "services", "configmaps", "serviceaccounts", "roles", "rolebindings"):
        items = json.loads(kubectl(cluster, "get", kind, "-n", namespace, "-l", "app.kubernetes.io/managed-by=baton-operator",
                                   "--show-managed-fields", "-o", "json").stdout)["items"]
        for item in items:
            baton = [e for e in item["metadata"]["managedFields"] if e["manager"] == "baton-operator"]
            assert [e["operation"] for e in baton] == ["Apply"], (kind, item["metadata"]["name"], baton)
            kinds_seen.add(kind)
    assert len(kinds_seen) == 7
    child_writes = {(verb, resource) for verb, resource, _, _ in writes if resource not in (PLURAL, "events")}
    assert {verb for verb, _ in child_writes} <= {"patch", "delete"}, child_writes  # apply is a PATCH


def test_a_gitops_resync_of_an_unchanged_manifest_changes_nothing(cluster, namespace, operator):
    sync(cluster, namespace, git_manifest())
    wait_ready(cluster, namespace)
    time.sleep(2)  # the last status write and its watch events settle
    model_rv = get_dm(cluster, namespace)["metadata"]["resourceVersion"]
    before = versions(cluster, namespace)
    mark = audit_mark(cluster)

    # Server-side (Flux, Argo CD with ServerSideApply=true) and client-side (Argo CD's default) re-syncs.
    assert "serverside-applied" in sync(cluster, namespace, git_manifest()).stdout
    assert get_dm(cluster, namespace)["metadata"]["resourceVersion"] == model_rv  # not even a no-op write
    sync(cluster, namespace, git_manifest(), server_side=False)

    # A GitOps tool also stamps its own metadata: that wakes the operator, which then writes nothing.
    passes = reconcile_passes()
    tracked = git_manifest()
    tracked["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": f"models:serving.baton.dev/DisaggregatedModel:{namespace}/llama-8b"}
    sync(cluster, namespace, tracked)
    wait_for(lambda: reconcile_passes() > passes, 30, what="a reconcile pass after the re-sync")
    time.sleep(1)
    obj = get_dm(cluster, namespace)
    assert obj["metadata"]["generation"] == 1
    assert versions(cluster, namespace) == before
    assert baton_writes(cluster, namespace, mark) == []
    assert kstatus(obj) == ("Current", "")


# ------------------------------------------------------------------------------------------ replicas


def test_kubectl_scale_reaches_the_decode_tier_and_a_resync_without_replicas_leaves_it_alone(cluster, namespace, operator):
    sync(cluster, namespace, git_manifest())
    wait_ready(cluster, namespace)
    kubectl(cluster, "scale", "-n", namespace, "dm/llama-8b", "--replicas=3")
    wait_for(lambda: cluster.apps.list_namespaced_stateful_set(namespace, label_selector="baton.dev/tier=decode").items[0].spec.replicas == 3,
             60, what="the decode StatefulSet at 3 replicas")
    obj = wait_ready(cluster, namespace)
    assert obj["status"]["decode"]["summary"] == "3/3"
    scale = json.loads(kubectl(cluster, "get", "--raw", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/llama-8b/scale").stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3

    # Git never claimed decode.replicas (the scale subresource's writes are not tracked per manager on
    # custom resources, so it simply has no owner but the value).
    fields = json.loads(kubectl(cluster, "get", "dm", "llama-8b", "-n", namespace, "--show-managed-fields", "-o", "json").stdout)
    owners = [e["manager"] for e in fields["metadata"]["managedFields"]
              if "f:replicas" in e["fieldsV1"].get("f:spec", {}).get("f:decode", {})]
    assert GITOPS not in owners, owners

    # A re-sync from Git, which has no decode.replicas, keeps the scaled value...
    sync(cluster, namespace, git_manifest())
    time.sleep(2)
    assert get_dm(cluster, namespace)["spec"]["decode"]["replicas"] == 3
    assert cluster.apps.list_namespaced_stateful_set(namespace, label_selector="baton.dev/tier=decode").items[0].spec.replicas == 3
    # ...while a manifest that does set it takes it back on every sync: the reason Git must leave it
    # out (or Argo CD ignore it) when an autoscaler drives the tier (docs/gitops.md).
    sync(cluster, namespace, git_manifest(decode__replicas=1))
    assert get_dm(cluster, namespace)["spec"]["decode"]["replicas"] == 1
    wait_for(lambda: cluster.apps.list_namespaced_stateful_set(namespace, label_selector="baton.dev/tier=decode").items[0].spec.replicas == 1,
             60, what="the decode StatefulSet back at Git's 1 replica")


def test_a_horizontal_pod_autoscaler_drives_the_decode_tier_of_a_gitops_managed_model(cluster, namespace, operator):
    """Git leaves decode.replicas out; a real HorizontalPodAutoscaler (kube-controller-manager's) owns it."""
    sync(cluster, namespace, git_manifest())
    wait_ready(cluster, namespace)
    # The scale subresource answers although Git never set a replica count, and names the tier's pods.
    out = kubectl(cluster, "get", "--raw", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/llama-8b/scale", check=False)
    assert out.returncode == 0, out.stderr
    scale = json.loads(out.stdout)
    assert scale["spec"]["replicas"] == 1 and scale["status"]["replicas"] == 1
    assert scale["status"]["selector"] == "baton.dev/model=llama-8b,baton.dev/tier=decode"
    assert cluster.core.list_namespaced_pod(namespace, label_selector=scale["status"]["selector"]).items

    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "llama-8b-decode"},
        "spec": {
            "scaleTargetRef": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DisaggregatedModel", "name": "llama-8b"},
            "minReplicas": 2, "maxReplicas": 4,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}],
        },
    }
    kubectl(cluster, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(hpa))
    # The autoscaler raises the tier to its floor through the scale subresource; Baton follows.
    wait_for(lambda: get_dm(cluster, namespace)["spec"]["decode"]["replicas"] == 2, 90, what="the HPA scaling the model to 2")
    obj = wait_ready(cluster, namespace)
    assert obj["status"]["decode"]["summary"] == "2/2"
    assert cluster.apps.list_namespaced_stateful_set(namespace, label_selector="baton.dev/tier=decode").items[0].spec.replicas == 2

    # With the floor met it goes on to metrics: it got past the selector (there is no metrics API here).
    def hpa_condition():
        body = json.loads(kubectl(cluster, "get", "hpa", "llama-8b-decode", "-n", namespace, "-o", "json").stdout)
        active = next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == "ScalingActive"), None)
        return active if active and active["reason"] != "SucceededGetScale" else None

    active = wait_for(hpa_condition, 60, what="the HPA's ScalingActive condition")
    assert active["reason"] not in ("InvalidSelector", "FailedGetScale"), active

    # A GitOps re-sync, which has no decode.replicas, leaves the autoscaler's value alone.
    sync(cluster, namespace, git_manifest())
    time.sleep(2)
    assert get_dm(cluster, namespace)["spec"]["decode"]["replicas"] == 2
    kubectl(cluster, "delete", "hpa", "llama-8b-decode", "-n", namespace)


# ------------------------------------------------------------------------------------------ kstatus


def test_status_follows_kstatus_so_gitops_tools_report_health(cluster, namespace, operator):
    sync(cluster, namespace, git_manifest())
    seen: list[tuple[str, str, str]] = []

    def converged():
        obj = get_dm(cluster, namespace)
        if obj.get("status"):
            seen.append((kstatus(obj)[0], condition(obj, "Ready").get("status", ""), condition(obj, "Stalled").get("status", "")))
        return obj if kstatus(obj)[0] == "Current" and obj.get("status") else None

    obj = wait_for(converged, 90, interval=0.1, what="kstatus Current")
    # Health is never reported early: Current only with Ready=True, and never Failed on the way.
    assert all(ready == "True" for state, ready, _ in seen if state == "Current"), seen
    assert all(state != "Failed" for state, _, _ in seen), seen
    assert condition(obj, "Ready")["status"] == "True"
    generation = obj["metadata"]["generation"]
    conditions = obj["status"]["conditions"]
    assert len({c["type"] for c in conditions}) == len(conditions)  # a map keyed by type
    for c in conditions:
        assert c["observedGeneration"] == generation and c["lastTransitionTime"].endswith("Z") and c["reason"]
    # A spec change the operator has not seen yet is InProgress, whatever the conditions still say.
    newer = copy.deepcopy(obj)
    newer["metadata"]["generation"] += 1
    assert kstatus(newer) == ("InProgress", "LatestGenerationNotObserved")

    # A spec Baton cannot serve: Failed, with the reason (GitOps tools stop waiting and show it).
    sync(cluster, namespace, git_manifest(engine__extraOptions={"kv_cache_config": {"dtype": "fp16"}}))
    failed = wait_for(lambda: (o := get_dm(cluster, namespace)) and kstatus(o)[0] == "Failed" and o, 60, what="kstatus Failed")
    assert kstatus(failed) == ("Failed", status_module.REASON_INVALID_SPEC)
    assert condition(failed, "Ready")["status"] == "False"
    assert failed["status"]["observedGeneration"] == failed["metadata"]["generation"]

    # Fixed in Git: Current again.
    sync(cluster, namespace, git_manifest())
    wait_ready(cluster, namespace)
    assert kstatus(get_dm(cluster, namespace)) == ("Current", "")


# ------------------------------------------------------------------------------------------ kubectl


def test_kubectl_explain_reaches_nested_fields(cluster):
    for path, expected in (
        ("dm.spec.decode.replicas", "autoscaler"),
        ("dm.spec.engine.kvCache.dtype", "KV cache element type"),
        ("dm.spec.prefill.pool.nodeSelector", "Node labels"),
        ("dm.spec.scheduler.admission.prefillTokensPerSecond", "Token bucket"),
        ("dm.spec.model.source.huggingFace.tokenSecret", "HF_TOKEN"),
        ("dm.status.conditions", "Ready, Reconciling, Stalled"),
        ("dm.status.conditions.reason", "CamelCase reason"),
        ("dm.status.decode.readyReplicas", "ready"),
    ):
        out = kubectl(cluster, "explain", path).stdout
        assert expected in out, (path, out)
    # The whole tree in one go, as a user would page through it.
    recursive = kubectl(cluster, "explain", "dm.spec", "--recursive").stdout
    for field in ("kvTransfer", "maxTokensInBuffer", "backpressure", "decodeP95LatencyThreshold", "podTemplate"):
        assert field in recursive


def test_kubectl_describe_says_what_is_wrong_and_what_to_do(cluster, namespace, operator):
    sync(cluster, namespace, git_manifest())
    wait_ready(cluster, namespace)
    sync(cluster, namespace, git_manifest(engine__extraOptions={"kv_cache_config": {"dtype": "fp16"}}))
    wait_for(lambda: condition(get_dm(cluster, namespace), "Stalled").get("status") == "True", 60, what="Stalled=True")

    def described() -> str | None:
        out = kubectl(cluster, "describe", "dm", "llama-8b", "-n", namespace).stdout
        return out if "Warning  InvalidSpec" in out else None

    out = wait_for(described, 30, what="the Warning event in kubectl describe")
    conditions_section = out[out.index("Conditions:"):out.index("Events:")]
    assert "Stalled" in conditions_section and "InvalidSpec" in conditions_section
    # The message names the problem and the fix.
    assert "engine.extraOptions cannot set kv_cache_config: use engine.kvCache" in out
    events = out[out.index("Events:"):]
    assert "baton-operator" in events and "Normal   Applied" in events and "Normal   Ready" in events
