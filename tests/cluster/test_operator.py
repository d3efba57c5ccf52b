"""The operator against the real local cluster: apply, scale, move, drift, delete, admission, no-op."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from kubernetes.client.rest import ApiException

from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from baton.devcluster.pools import POOL_LABEL
from baton.operator.cache import ChildCache
from baton.operator.kube import Kube
from baton.operator.reconciler import Reconciler
from cluster_plugin import REPO, free_port, load_example, wait_for

pytestmark = pytest.mark.cluster


def create(cluster, namespace, manifest):
    return cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)


def get_dm(cluster, namespace, name):
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def patch_dm(cluster, namespace, name, spec_patch):
    return cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec_patch})


def condition(obj, ctype):
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def wait_ready(cluster, namespace, name, timeout=90):
    def ready():
        obj = get_dm(cluster, namespace, name)
        status = obj.get("status") or {}
        ok = condition(obj, "Ready").get("status") == "True" and status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if ok else None

    return wait_for(ready, timeout, what=f"{name} Ready at its current generation")


def pools_of_pods(cluster, namespace, tier):
    pool_of = {n.metadata.name: n.metadata.labels.get(POOL_LABEL) for n in cluster.core.list_node().items}
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"baton.dev/tier={tier}").items
    return [pool_of.get(p.spec.node_name) for p in pods if p.metadata.deletion_timestamp is None]


def sts_name(cluster, namespace, tier, model="llama-8b"):
    """The serving generation's StatefulSet of a tier (names carry the generation key)."""
    obj = get_dm(cluster, namespace, model)
    gen = obj["status"]["rollout"]["servingGeneration"]
    return f"{model}-{tier}-{gen}"


def engine_cm_name(cluster, namespace, tier, model="llama-8b"):
    gen = get_dm(cluster, namespace, model)["status"]["rollout"]["servingGeneration"]
    return f"{model}-{tier}-engine-{gen}"


def small(name="llama-8b"):
    manifest = load_example("small.yaml")
    manifest["metadata"]["name"] = name
    return manifest


def audit_writes(cluster, namespace, since_line):
    """Baton's write requests (its own client or kopf's) that the API server audited in `namespace`
    after line `since_line` of its audit log. Kubernetes' controllers write too; they don't count."""
    lines = cluster.plane.audit_log.read_text().splitlines()
    writes = []
    for line in lines[since_line:]:
        entry = json.loads(line)
        baton = entry.get("userAgent", "").startswith(("baton-operator/", "kopf/"))
        if baton and entry.get("objectRef", {}).get("namespace") == namespace and entry.get("stage") == "ResponseComplete":
            writes.append(f"{entry['verb']} {entry['objectRef'].get('resource')}/{entry['objectRef'].get('name', '')}")
    return writes, len(lines)


def test_apply_creates_pinned_tiers_and_scheduler_and_reports_ready(cluster, namespace, operator):
    create(cluster, namespace, small())
    obj = wait_ready(cluster, namespace, "llama-8b")
    status = obj["status"]
    assert status["prefill"]["summary"] == "1/1" and status["decode"]["summary"] == "1/1"
    assert status["kvBytesPerToken"] == 131072  # Llama-3-8B, bf16
    assert status["decodeKvCapacityTokens"] == 24 * 2**30 // 131072
    assert status["schedulerEndpoint"] == f"llama-8b-scheduler.{namespace}.svc:8000"
    assert status["revision"] and status["prefill"]["kvFingerprint"] == status["decode"]["kvFingerprint"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False", "KVFormatCompatible": "True"}

    prefill = cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, "prefill"), namespace)
    container = prefill.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert prefill.metadata.owner_references[0].kind == "DisaggregatedModel"
    engine_cfg = yaml.safe_load(cluster.core.read_namespaced_config_map(engine_cm_name(cluster, namespace, "prefill"), namespace).data["config.yaml"])
    assert engine_cfg["disable_overlap_scheduler"] is True
    assert engine_cfg["cache_transceiver_config"]["backend"] == "UCX"
    assert cluster.core.read_namespaced_service("llama-8b-prefill", namespace).spec.cluster_ip == "None"
    assert cluster.apps.read_namespaced_deployment("llama-8b-scheduler", namespace).status.ready_replicas == 1
    assert pools_of_pods(cluster, namespace, "prefill") == ["prefill-h100"]
    assert pools_of_pods(cluster, namespace, "decode") == ["decode-l40s"]
    assert pools_of_pods(cluster, namespace, "scheduler") == ["system"]
    reasons = {e.reason for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=llama-8b").items}
    assert {"Applied", "Ready"} <= reasons


def test_scaling_a_tier_reaches_the_statefulset_and_status(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    patch_dm(cluster, namespace, "llama-8b", {"decode": {"replicas": 3}})
    obj = wait_ready(cluster, namespace, "llama-8b")
    assert obj["status"]["decode"]["summary"] == "3/3"
    assert cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, "decode"), namespace).spec.replicas == 3
    assert pools_of_pods(cluster, namespace, "decode") == ["decode-l40s"] * 3
    # Replica changes are not a new revision.
    assert obj["status"]["revision"] == get_dm(cluster, namespace, "llama-8b")["status"]["revision"]


def test_a_node_drain_evicts_one_pod_of_a_tier_at_a_time(cluster, namespace, operator):
    """Each tier and the scheduler have a PodDisruptionBudget over their pods of every generation: an
    eviction (what kubectl drain and node upgrades do) takes one decode replica, and the next is refused
    429 until that one is back, so a drain never takes a tier dark at once."""
    from kubernetes import client

    manifest = small()
    manifest["spec"]["decode"]["replicas"] = 3
    manifest["spec"]["decode"]["maxReplicas"] = 3
    create(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "llama-8b")

    def budget(component):
        return cluster.policy.read_namespaced_pod_disruption_budget(f"llama-8b-{component}", namespace)

    wait_for(lambda: budget("decode").status.expected_pods == 3 and budget("decode").status.disruptions_allowed == 1,
             60, what="the decode budget covering the three decode pods")
    assert budget("prefill").status.expected_pods == 1 and budget("scheduler").status.expected_pods == 1
    assert budget("decode").metadata.owner_references[0].kind == "DisaggregatedModel"
    pods = sorted(p.metadata.name for p in cluster.core.list_namespaced_pod(
        namespace, label_selector="baton.dev/model=llama-8b,baton.dev/tier=decode").items)
    # An evicted replica is "back" once its replacement is Ready. Here the cluster's readiness stand-in would
    # pass the replacement's probe within a second, racing the second eviction; a pod runner's claim on the
    # namespace (without a lease: it holds) keeps the stand-in off Baton's pods, so the replacement stays
    # unready, as an engine still loading its weights would, and the pods Ready now stay Ready.
    from baton.podrunner.runner import CLAIM_ANNOTATION

    cluster.core.patch_namespace(namespace, {"metadata": {"annotations": {CLAIM_ANNOTATION: "test/hold-replacements"}}})

    def evict(pod):
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
        cluster.core.create_namespaced_pod_eviction(pod, namespace, body)

    evict(pods[0])
    with pytest.raises(ApiException) as refused:
        evict(pods[1])
    assert refused.value.status == 429 and "disruption budget" in refused.value.body
    # the one-replica prefill tier is not held hostage: its only pod may still go
    (prefill_pod,) = cluster.core.list_namespaced_pod(
        namespace, label_selector="baton.dev/model=llama-8b,baton.dev/tier=prefill").items
    evict(prefill_pod.metadata.name)


def test_moving_a_tier_to_another_pool_moves_its_pods(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    patch_dm(cluster, namespace, "llama-8b", {"prefill": {"pool": {"nodeSelector": {POOL_LABEL: "decode-l40s"}}}})
    wait_ready(cluster, namespace, "llama-8b")
    wait_for(lambda: pools_of_pods(cluster, namespace, "prefill") == ["decode-l40s"], 60, what="prefill pod on decode-l40s")


def test_a_field_removed_from_the_spec_is_removed_from_the_children(cluster, namespace, operator):
    """Taking a setting out of the spec takes it out of what runs: a scheduler CPU limit and an extra
    pool label dropped from the spec leave the Deployment (the live object still carried them, so a
    comparison of 'every wanted field is there' alone would never re-apply it)."""
    manifest = small()
    manifest["spec"]["scheduler"]["resources"] = {"limits": {"cpu": "2"}}
    manifest["spec"]["scheduler"]["pool"]["nodeSelector"]["baton.dev/zone"] = "any"
    create(cluster, namespace, manifest)
    wait_for(lambda: cluster.apps.read_namespaced_deployment("llama-8b-scheduler", namespace), 60, what="scheduler")
    pod = lambda: cluster.apps.read_namespaced_deployment("llama-8b-scheduler", namespace).spec.template.spec  # noqa: E731
    container = lambda: next(c for c in pod().containers if c.name == "scheduler")  # noqa: E731
    assert (container().resources.limits or {}).get("cpu") == "2"
    assert pod().node_selector.get("baton.dev/zone") == "any"
    # a merge patch: null removes the field from the spec
    patch_dm(cluster, namespace, "llama-8b", {"scheduler": {"resources": {"limits": {"cpu": None}},
                                                            "pool": {"nodeSelector": {"baton.dev/zone": None}}}})
    wait_for(lambda: "cpu" not in (container().resources.limits or {}) and "baton.dev/zone" not in pod().node_selector,
             60, what="the dropped limit and pool label gone from the scheduler Deployment")
    obj = wait_ready(cluster, namespace, "llama-8b")
    assert pools_of_pods(cluster, namespace, "scheduler") == ["system"] and obj["status"]["observedGeneration"] == 2


def test_drift_is_repaired(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    cluster.apps.patch_namespaced_stateful_set(sts_name(cluster, namespace, "decode"), namespace, {"spec": {"replicas": 5}})
    cluster.core.delete_namespaced_service("llama-8b-scheduler", namespace)
    cluster.core.patch_namespaced_config_map(engine_cm_name(cluster, namespace, "decode"), namespace, {"data": {"config.yaml": "tampered: true\n"}})
    wait_for(lambda: cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, "decode"), namespace).spec.replicas == 1, 60,
             what="decode replicas restored")
    wait_for(lambda: cluster.core.read_namespaced_service("llama-8b-scheduler", namespace), 60, what="Service recreated")
    wait_for(lambda: "tampered" not in cluster.core.read_namespaced_config_map(engine_cm_name(cluster, namespace, "decode"), namespace).data["config.yaml"],
             60, what="engine config restored")


def test_deleting_the_model_removes_everything(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "llama-8b")

    def all_gone():
        selector = "baton.dev/model=llama-8b"
        left = (cluster.apps.list_namespaced_stateful_set(namespace, label_selector=selector).items
                + cluster.apps.list_namespaced_deployment(namespace, label_selector=selector).items
                + cluster.core.list_namespaced_service(namespace, label_selector=selector).items
                + cluster.core.list_namespaced_config_map(namespace, label_selector=selector).items
                + cluster.core.list_namespaced_pod(namespace, label_selector=selector).items)
        return not left

    wait_for(all_gone, 90, what="every child removed")
    with pytest.raises(ApiException) as err:
        get_dm(cluster, namespace, "llama-8b")
    assert err.value.status == 404


def test_a_no_op_resync_makes_zero_writes(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    time.sleep(2)  # let the last status write and its watch events settle
    _, mark = audit_writes(cluster, namespace, 0)
    kube = Kube(cluster.api_client)
    reconciler = Reconciler(kube)
    for _ in range(3):
        outcome = reconciler.reconcile(namespace, "llama-8b")
        assert outcome.writes == 0 and not outcome.failed
    assert kube.writes() == 0 and kube.requests["GET"] > 0
    time.sleep(2)
    writes, _ = audit_writes(cluster, namespace, mark)
    assert writes == [], writes  # neither these passes nor the running operator wrote anything


def test_a_pass_on_a_partly_filled_cache_sees_the_whole_model(cluster, namespace, operator):
    """Right after an operator starts, kopf has delivered some of a model's children and not others (its
    initial listing arrives object by object, in pages). A pass then must not take the missing ones as
    gone: no tier re-created, no rollback, status unchanged."""
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    time.sleep(2)  # let the last status write and its watch events settle
    before = get_dm(cluster, namespace, "llama-8b")["status"]
    _, mark = audit_writes(cluster, namespace, 0)
    kube = Kube(cluster.api_client)
    cache = ChildCache()
    cache.put(kube.get("StatefulSet", namespace, sts_name(cluster, namespace, "prefill")))  # decode not yet
    outcome = Reconciler(kube, cache).reconcile(namespace, "llama-8b")
    assert outcome.writes == 0 and not outcome.failed
    listed = sorted(o["metadata"]["name"] for o in cache.list_kind("StatefulSet", namespace, "llama-8b"))
    assert listed == sorted(sts_name(cluster, namespace, tier) for tier in ("prefill", "decode"))
    after = get_dm(cluster, namespace, "llama-8b")["status"]
    assert after["rollout"] == before["rollout"] and condition({"status": after}, "Ready")["status"] == "True"
    time.sleep(2)
    writes, _ = audit_writes(cluster, namespace, mark)
    assert writes == [], writes


def test_a_child_deleted_while_the_watch_was_away_is_applied_again_after_the_next_listing(cluster, namespace):
    """A deletion the operator's watch missed (kopf lists again after a gap; a list carries no deletions)
    leaves the child in the child cache, and passes take it as present. The periodic listing of a model's
    children drops it, and the pass that follows applies it again. Here the cache is fed by nothing but
    the passes' own writes, so any deletion is one the watch missed."""
    create(cluster, namespace, small())
    kube = Kube(cluster.api_client)
    reconciler = Reconciler(kube, ChildCache())
    for _ in range(2):  # the first creates the children, the second is a pass of a model already served
        assert not reconciler.reconcile(namespace, "llama-8b").failed
    services = cluster.core.list_namespaced_service(namespace, label_selector="baton.dev/model=llama-8b").items
    victim = services[0].metadata
    cluster.core.delete_namespaced_service(victim.name, namespace)

    def service():
        try:
            return cluster.core.read_namespaced_service(victim.name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    wait_for(lambda: service() is None, 30, what=f"Service {victim.name} deleted")
    reconciler.reconcile(namespace, "llama-8b")
    assert service() is None  # the cache still holds it: the pass saw nothing missing
    reconciler.child_list_seconds = 0  # the model's next listing is due now
    reconciler._children_due[(namespace, "llama-8b")] = 0  # noqa: SLF001
    lists = kube.requests["LIST"]
    assert not reconciler.reconcile(namespace, "llama-8b").failed
    again = service()
    assert again is not None and again.metadata.uid != victim.uid
    assert kube.requests["LIST"] - lists >= 7  # one per kind of child


def test_an_unpinned_hugging_face_revision_draws_a_warning_once_per_spec_change(cluster, namespace, operator):
    """Engine pods download the weights when they start: a branch can give pods started at different times
    different weights. Said once per spec change (not every pass), and not once the revision is a commit."""
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")

    def warnings():
        return [e for e in cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=llama-8b").items
                if e.reason == "ModelRevisionNotPinned"]

    def observed():
        obj = get_dm(cluster, namespace, "llama-8b")
        return obj if (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"] else None

    (warning,) = wait_for(warnings, 30, what="the ModelRevisionNotPinned event")
    assert warning.type == "Warning" and "meta-llama/Llama-3.1-8B-Instruct" in warning.message
    assert "40-character commit hash" in warning.message
    patch_dm(cluster, namespace, "llama-8b", {"scheduler": {"maxQueueDepth": 77}})  # a spec change: said again
    wait_for(lambda: [w for w in warnings() if (w.count or 1) == 2], 30, what="the warning counted a second time")
    patch_dm(cluster, namespace, "llama-8b", {"model": {"source": {"huggingFace": {
        "revision": "0123456789abcdef0123456789abcdef01234567"}}}})
    wait_for(observed, 30, what="the pinned spec observed")
    time.sleep(2)  # a few more passes
    assert [w.count or 1 for w in warnings()] == [2], "warned of a pinned revision, or more than once per change"


def test_a_spec_baton_cannot_serve_is_reported_and_leaves_serving_children_alone(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    before = cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, "prefill"), namespace).metadata.resource_version
    patch_dm(cluster, namespace, "llama-8b", {"engine": {"extraOptions": {"kv_cache_config": {"dtype": "fp16"}}}})

    def stalled():
        obj = get_dm(cluster, namespace, "llama-8b")
        return obj if condition(obj, "Stalled").get("status") == "True" else None

    obj = wait_for(stalled, 60, what="Stalled=True")
    assert condition(obj, "Stalled")["reason"] == "InvalidSpec"
    assert "kv_cache_config" in condition(obj, "Stalled")["message"]
    assert condition(obj, "Ready")["status"] == "False"
    events = cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=llama-8b").items
    assert any(e.type == "Warning" and e.reason == "InvalidSpec" for e in events)
    assert cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, "prefill"), namespace).metadata.resource_version == before


BASE = small("bad")


def _mutate(path, value, manifest=None):
    manifest = copy.deepcopy(BASE if manifest is None else manifest)
    node = manifest
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return manifest


_DELETE = object()

INVALID = [
    ("spec.decode.allowSpot", True, "decode.allowSpot must be false"),
    ("spec.prefill.tensorParallelSize", 2, "spec.prefill.gpusPerReplica: Invalid value: prefill.tensorParallelSize x "
     "pipelineParallelSize must equal prefill.gpusPerReplica (all three default to 1)"),
    ("spec.prefill.minReplicas", 3, "spec.prefill.maxReplicas: Invalid value: prefill.minReplicas must be at most "
     "prefill.maxReplicas (maxReplicas defaults to 1)"),
    ("spec.decode.replicas", 9, "spec.decode.maxReplicas: Invalid value: decode.replicas must be at most "
     "decode.maxReplicas"),
    ("spec.scheduler.localPrefillBelowTokens", 20000, "localPrefillBelowTokens must be less than or equal to alwaysPrefillAtOrAboveTokens"),
    ("spec.engine.kvCache.dtype", "auto", 'Unsupported value: "auto"'),
    ("spec.engine.kvCache.tokensPerBlock", 48, "Unsupported value: 48"),
    ("spec.engine.kvTransfer.backend", "DEFAULT", 'Unsupported value: "DEFAULT"'),
    ("spec.engine.kvTransfer.maxTokensInBuffer", 1000, "must be a multiple of the KV tokens per block"),
    ("spec.engine.kvTransfer", {"backend": "NIXL", "maxTokensInBuffer": 8192},  # maxPromptTokens 16384
     "maxTokensInBuffer is below prefill.maxPromptTokens with the NIXL backend"),
    ("spec.model.source", {"pvc": {"claimName": "w"}, "huggingFace": {"id": "x/y"}}, "exactly one of pvc, hostPath or huggingFace"),
    ("spec.engine.trtllmVersion", "latest", "spec.engine.trtllmVersion"),
    ("spec.scheduler.algorithm", "fastest", 'Unsupported value: "fastest"'),
    ("spec.scheduler.maxQueueDepth", 0, "should be greater than or equal to 1"),
    ("spec.scheduler.backpressure.decodeP95LatencyThreshold", "fast", "decodeP95LatencyThreshold"),
    ("spec.engine.image", _DELETE, "spec.engine.image: Required value"),
    ("spec.decode.kvCacheSize", "lots", "spec.decode.kvCacheSize"),
    ("spec.scheduler.degradation", {"store": "redis"}, "redisUrl or redisUrlSecret is required when store is redis"),
    ("spec.scheduler.degradation", {"store": "redis", "redisUrl": "redis://r:6379", "redisUrlSecret": {"name": "s"}},
     "set redisUrl or redisUrlSecret, not both"),
    ("spec.scheduler.degradation.redisUrl", "r:6379", "spec.scheduler.degradation.redisUrl"),
]


# Also rules the unit tests check through their reading of CEL (tests/unit/test_api_validation_gaps.py): here
# on the API server itself, which is what admits or refuses an object. Each: {dotted path: value}, message.
INVALID_COMBINATIONS = [({path: value}, message) for path, value, message in INVALID] + [
    ({"spec.scheduler.heartbeatInterval": "0s"}, "scheduler.heartbeatInterval must be greater than 0s"),
    ({"spec.scheduler.degradation": {"holdTtl": "0ms"}}, "scheduler.degradation.holdTtl must be greater than 0s"),
    ({"spec.decode.kvCacheSize": "24m"}, "decode.kvCacheSize is a number of bytes: m is milli"),
    ({"spec.decode.podTemplate": {"labels": {"bad key!": "x"}}},
     "decode.podTemplate.labels: a key is not a Kubernetes label key"),
    ({"spec.prefill.podTemplate": {"volumes": [{"name": "dshm", "emptyDir": {}}]}},
     "prefill.podTemplate.volumes: a volume is named like one of Baton's own ("),
    ({"spec.decode.podTemplate": {"volumeMounts": [{"name": "x", "mountPath": "/dev/shm"}]}},
     "decode.podTemplate.volumeMounts: a mount is at one of Baton's own mount paths ("),
    ({"spec.rollout": {"progressDeadline": "5s", "minReadySeconds": 5}},
     "rollout.progressDeadline must be longer than rollout.minReadySeconds"),
    ({"spec.engine.runtime": "triton", "spec.model.source": {"pvc": {"claimName": "w"}}, "spec.decode.port": 65534},
     "with engine.runtime triton a tier's port must be at most 65533"),
    ({"spec.engine.runtime": "triton"}, "engine.runtime triton needs model.source.pvc or hostPath"),
    ({"spec.model.architecture.numLayers": 1, "spec.decode.pipelineParallelSize": 2, "spec.decode.gpusPerReplica": 2},
     "decode.pipelineParallelSize is above model.architecture.numLayers"),
]


@pytest.mark.parametrize("changes,message", INVALID_COMBINATIONS,
                         ids=["+".join(k.removeprefix("spec.") for k in c) for c, _ in INVALID_COMBINATIONS])
def test_invalid_objects_are_rejected_at_admission_with_a_clear_message(cluster, namespace, changes, message):
    manifest = BASE
    for path, value in changes.items():
        manifest = _mutate(path, value, manifest)
    with pytest.raises(ApiException) as err:
        create(cluster, namespace, manifest)
    assert err.value.status == 422
    assert message in json.loads(err.value.body)["message"]


def test_the_documented_invalid_example_is_rejected(cluster, namespace):
    with pytest.raises(ApiException) as err:
        create(cluster, namespace, load_example("invalid-spot-decode.yaml"))
    body = json.loads(err.value.body)["message"]
    assert "decode.allowSpot must be false" in body
    assert "decode.tensorParallelSize x pipelineParallelSize must equal decode.gpusPerReplica" in body


def test_converted_design_brief_config_is_accepted_by_the_api_server(cluster, namespace):
    out = subprocess.run(
        [sys.executable, "-m", "baton.cli", "convert", str(REPO / "tests/data/disaggregated_config.yaml"),
         "--scheduler-command", "disaggregated-scheduler --prefill-batch-size 32 --decode-batch-size 1 "
         "--kv-cache-transfer-compression fp8 --max-concurrent-prefills 64 --placement-policy shortest-prefill-first"],
        capture_output=True, text=True, check=True)
    obj = yaml.safe_load(out.stdout)
    created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj, dry_run="All")
    spec = created["spec"]
    assert spec["prefill"]["gpusPerReplica"] == 8 and not spec["decode"].get("kvCacheSize")  # defaulted to ""
    assert "decode.kvCacheSize: 128G" in out.stderr  # left out: it needs model.architecture, which the brief lacks
    assert spec["scheduler"]["prefillBatchSize"] == 32 and spec["engine"]["kvTransfer"]["compression"] == "fp8"
    assert spec["scheduler"]["maxQueueDepth"] == 256 and spec["decode"]["maxReplicas"] == 16
    assert "warning: model.source" in out.stderr


def test_kubectl_shows_short_name_category_columns_and_explain(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    kubectl = [str(cluster.plane.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", "-n", namespace]
    table = subprocess.run([*kubectl, "get", "dm"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "PREFILL", "DECODE", "REVISION", "AGE"]
    row = table[1].split()
    assert row[:4] == ["llama-8b", "True", "1/1", "1/1"]
    by_category = subprocess.run([*kubectl, "get", "baton", "-o", "name"], capture_output=True, text=True, check=True).stdout
    assert "disaggregatedmodel.serving.baton.dev/llama-8b" in by_category
    explain = subprocess.run([*kubectl, "explain", "dm.spec.scheduler.localPrefillBelowTokens"], capture_output=True, text=True, check=True).stdout
    assert "prefilled on a decode replica" in explain


def test_a_child_the_api_server_refuses_stalls_the_model_and_changes_nothing(cluster, namespace, operator):
    create(cluster, namespace, small())
    wait_ready(cluster, namespace, "llama-8b")
    versions = {
        "cm": cluster.core.read_namespaced_config_map(engine_cm_name(cluster, namespace, "decode"), namespace).metadata.resource_version,
        "sts": cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, "decode"), namespace).metadata.resource_version,
    }
    # An env entry the API server refuses, together with a change that would alter the engine config.
    patch_dm(cluster, namespace, "llama-8b", {"decode": {"maxGeneratedTokens": 1024,
                                                         "podTemplate": {"env": [{"name": "BROKEN", "valueFrom": {}}]}}})

    def stalled():
        obj = get_dm(cluster, namespace, "llama-8b")
        return obj if condition(obj, "Stalled").get("status") == "True" else None

    obj = wait_for(stalled, 60, what="Stalled=True")
    assert condition(obj, "Stalled")["reason"] == "ApplyFailed"
    assert "StatefulSet/llama-8b-decode" in condition(obj, "Stalled")["message"]
    assert "valueFrom" in condition(obj, "Stalled")["message"]
    assert cluster.core.read_namespaced_config_map(engine_cm_name(cluster, namespace, "decode"), namespace).metadata.resource_version == versions["cm"]
    assert cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, "decode"), namespace).metadata.resource_version == versions["sts"]
    # Fixing the spec recovers without any other action.
    patch_dm(cluster, namespace, "llama-8b", {"decode": {"podTemplate": {"env": []}}})
    wait_ready(cluster, namespace, "llama-8b")


def test_a_model_deleted_while_the_operator_is_down_goes_away_with_its_children(cluster, namespace):
    from kopf.testing import KopfRunner

    with KopfRunner(["run", "--standalone", "--namespace", namespace, "-m", "baton.operator.handlers"], timeout=60):
        create(cluster, namespace, small())
        obj = wait_ready(cluster, namespace, "llama-8b")
    assert not obj["metadata"].get("finalizers"), "Baton needs no finalizer: deletion never waits for the operator"
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "llama-8b")
    wait_for(lambda: not cluster.apps.list_namespaced_stateful_set(namespace, label_selector="baton.dev/model=llama-8b").items,
             60, what="children collected without the operator")


class FailingWatchOperator:
    """`baton operator` as a process of its own, whose ConfigMaps watch stream fails for good on `fail()`
    (see operator_with_failing_watch.py): what happens to the process is what the tests check."""

    def __init__(self, cluster, namespace, tmp_path, **overrides):
        self.url = f"http://127.0.0.1:{free_port()}/healthz"
        self.marker = tmp_path / "fail-configmaps-watch"
        self.log = tmp_path / "operator.log"
        env = {key: value for key, value in os.environ.items()
               if key != "BATON_EXIT_TIMEOUT_SECONDS"}  # the operator's default, not the in-process operators' 0
        env.update({"KUBECONFIG": str(cluster.kubeconfig), "FAIL_CONFIGMAPS_WATCH_WHEN": str(self.marker),
                    "BATON_WATCH_SERVER_TIMEOUT": "2",  # each watch request ends (and is made again) every 2 s
                    "NO_PROXY": "127.0.0.1,localhost", **overrides})
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/cluster/operator_with_failing_watch.py"),
                                          "operator", "--namespace", namespace, "--liveness", self.url],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def health(self):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def fail(self):
        self.marker.touch()  # the stream fails the next time its watch request is made

    def output(self):
        return self.log.read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def failing_watch_operator(cluster, namespace, tmp_path):
    started = []

    def start(**env):
        started.append(FailingWatchOperator(cluster, namespace, tmp_path, **env))
        return started[-1]

    yield start
    for operator in started:
        operator.close()


def test_a_watch_stream_that_ends_for_good_stops_the_operator_so_that_it_is_restarted(cluster, namespace, failing_watch_operator):
    """kopf never restarts a watch stream that failed (here the ConfigMaps' stream gets an error event other
    than 410 Gone, as from an API server in trouble). Were the operator to go on, it would be blind to those
    objects with its liveness probe green; instead the process exits with the stream's error (and the
    kubelet starts the container again with every stream afresh)."""
    operator = failing_watch_operator()
    assert wait_for(operator.health, 30, what="the liveness endpoint") == 200
    create(cluster, namespace, small())
    wait_for(lambda: cluster.core.list_namespaced_config_map(namespace, label_selector="baton.dev/model=llama-8b").items,
             30, what="the model's ConfigMaps")
    operator.fail()
    # Within the exit timeout (30 s) even when kopf's own stop hangs; a clean stop takes a few seconds.
    wait_for(lambda: operator.proc.poll() is not None, 60, what="the operator process to exit")
    assert operator.proc.returncode != 0
    assert operator.health() is None
    output = operator.output()
    assert "WatchingError" in output and "InternalError" in output, output[-3000:]


def test_an_operator_whose_stop_hangs_is_gone_within_its_exit_timeout(cluster, namespace, failing_watch_operator):
    """A stop that never finishes (kopf's can, after a watch stream failed) must not leave a dead operator
    behind a failing probe for minutes: the process is killed BATON_EXIT_TIMEOUT_SECONDS after stopping
    began, and the kubelet starts it again."""
    operator = failing_watch_operator(HANG_ON_CLEANUP="1", BATON_EXIT_TIMEOUT_SECONDS="5")
    assert wait_for(operator.health, 30, what="the liveness endpoint") == 200
    operator.fail()
    wait_for(lambda: "cleanup: hanging" in operator.output(), 30, what="the operator to begin stopping")
    began = time.monotonic()
    wait_for(lambda: operator.proc.poll() is not None, 30, what="the operator process to be killed")
    assert operator.proc.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 15, "killed, but long after its exit timeout"


def test_a_repeated_event_counts_on_the_first_instead_of_piling_up(cluster, namespace):
    """A condition that persists (a drift another controller keeps re-introducing, re-applied every pass)
    must not post an Event per pass: repeats within ten minutes count on the Event already posted, as
    Kubernetes' own recorder does, and one that expired from the API server is posted anew."""
    from baton.operator import events

    create(cluster, namespace, small())
    body = get_dm(cluster, namespace, "llama-8b")
    kube = Kube(cluster.api_client)

    def baton_events():
        items = cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=llama-8b").items
        return [e for e in items if e.source and e.source.component == events.REPORTING_COMPONENT]

    for _ in range(3):
        events.record(kube, body, "Normal", "Applied", "in place: Deployment/llama-8b-scheduler (spec.replicas)")
    events.record(kube, body, "Normal", "Applied", "in place: Service/llama-8b-decode (spec.ports)")
    posted = sorted(((e.message, e.count) for e in baton_events()))
    assert posted == [("in place: Deployment/llama-8b-scheduler (spec.replicas)", 3),
                      ("in place: Service/llama-8b-decode (spec.ports)", 1)]
    first = next(e for e in baton_events() if e.count == 3)
    assert first.last_timestamp >= first.first_timestamp
    cluster.core.delete_namespaced_event(first.metadata.name, namespace)  # as if it had expired
    events.record(kube, body, "Normal", "Applied", "in place: Deployment/llama-8b-scheduler (spec.replicas)")
    again = [e for e in baton_events() if "scheduler" in e.message]
    assert [(e.count, e.metadata.name != first.metadata.name) for e in again] == [(1, True)]


def test_a_child_another_writer_keeps_changing_back_draws_one_drift_warning(cluster, namespace):
    """Another writer (a mutating policy, another controller) changes a field Baton sets after every pass:
    each pass puts it back, the repeats count on one Applied Event, and after three passes in a row a
    DriftNotConverging warning names the object, once."""
    create(cluster, namespace, small())
    kube = Kube(cluster.api_client)
    reconciler = Reconciler(kube, ChildCache())
    for _ in range(2):
        assert not reconciler.reconcile(namespace, "llama-8b").failed
    for _ in range(4):
        cluster.core.patch_namespaced_service("llama-8b-decode", namespace,
                                              {"metadata": {"labels": {"app.kubernetes.io/part-of": "mirror"}}})
        reconciler.cache.put(kube.get("Service", namespace, "llama-8b-decode"))  # what the watch would bring
        reconciler.reconcile(namespace, "llama-8b")
        labels = cluster.core.read_namespaced_service("llama-8b-decode", namespace).metadata.labels
        assert labels["app.kubernetes.io/part-of"] == "baton"  # put back by the pass
    items = cluster.core.list_namespaced_event(namespace, field_selector="involvedObject.name=llama-8b").items
    drift = [e for e in items if e.reason == "DriftNotConverging"]
    assert len(drift) == 1 and drift[0].count == 1 and drift[0].type == "Warning"
    assert "Service/llama-8b-decode" in drift[0].message and "managedFields" in drift[0].message
    applied = [e for e in items if e.reason == "Applied" and "updated Service/llama-8b-decode" in e.message]
    assert [e.count for e in applied] == [4]


def test_tiers_whose_pods_a_quota_forbids_say_so_in_ready(cluster, namespace, operator):
    """A StatefulSet that cannot create its pods (here a quota allows no GPUs) has no condition saying so,
    only FailedCreate Events: the model's Ready message names the StatefulSet and the API server's reason."""
    cluster.core.create_namespaced_resource_quota(namespace, {
        "metadata": {"name": "no-gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    create(cluster, namespace, small())

    def told():
        message = condition(get_dm(cluster, namespace, "llama-8b"), "Ready").get("message", "")
        return message if message.count("cannot create its pods") == 2 else None

    message = wait_for(told, 90, what="Ready naming both tiers' StatefulSets")
    assert condition(get_dm(cluster, namespace, "llama-8b"), "Ready")["status"] == "False"
    for tier in ("prefill", "decode"):
        assert f"StatefulSet llama-8b-{tier}-" in message
    assert "exceeded quota: no-gpus" in message


def test_tiers_that_could_not_hand_off_kv_are_refused_with_each_field_named(cluster, namespace, operator):
    create(cluster, namespace, small())
    serving = wait_ready(cluster, namespace, "llama-8b")
    assert condition(serving, "KVFormatCompatible")["status"] == "True"
    before = {t: cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, t), namespace).metadata.resource_version
              for t in ("prefill", "decode")}
    # Refused at admission by the CRD's rules, each field named with both tiers' values (the operator's KV
    # gate, with the same messages, is the second line).
    with pytest.raises(ApiException) as refused:
        patch_dm(cluster, namespace, "llama-8b", {"decode": {"engineOverrides": {"kvCacheDtype": "fp8", "trtllmVersion": "1.3.0"}}})
    assert refused.value.status == 422
    message = refused.value.body or ""
    assert "kvCacheDtype: prefill=bf16, decode=fp8" in message
    assert "trtllmVersion: prefill=1.2.0, decode=1.3.0" in message
    # What serves is untouched, and still reported as serving and compatible.
    time.sleep(2)
    for tier, version in before.items():
        assert cluster.apps.read_namespaced_stateful_set(sts_name(cluster, namespace, tier), namespace).metadata.resource_version == version
    obj = get_dm(cluster, namespace, "llama-8b")
    assert condition(obj, "KVFormatCompatible")["status"] == "True"
    assert obj["status"]["decode"]["summary"] == "1/1"
