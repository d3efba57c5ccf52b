"""Scaling while the spec is refused (Stalled: InvalidSpec, KVFormatMismatch, ApplyFailed): an autoscaler or
`kubectl scale dm` writing spec.<tier>.replicas through the scale subresource still reaches the serving
generation's StatefulSets (their scale subresource), and nothing else of the refused spec is applied.
Against the in-memory Kubernetes of test_operator_rollout."""

from __future__ import annotations

import json
import logging

from kubernetes.client.rest import ApiException

from baton.operator.rollout_pass import ANNOTATION_ROLLBACK
from test_operator_rollout import Model, engines, mid_pairwise_swap  # noqa: F401 - engines: autouse fixture


def kv_mismatch(s):
    """A bad commit the static gate refuses: decode's KV dtype differs from prefill's (KVFormatMismatch)."""
    s["decode"].setdefault("engineOverrides", {}).update(kvCacheDtype="fp16")


def invalid(s):
    """A spec that parses but Baton refuses (InvalidSpec): an env entry Baton sets itself."""
    s["engine"]["env"] = [{"name": "POD_IP", "value": "1.2.3.4"}]


def unparseable(s):
    """A spec the models refuse (an older CRD let it through): tensorParallelSize must be a power of two."""
    s["prefill"]["tensorParallelSize"] = 3


def scale(m, tier, n):
    """kubectl scale dm / an HPA (decode), or a replicas edit (prefill)."""
    m.edit(lambda s: s[tier].__setitem__("replicas", n))


def record_applies(m):
    applied = []
    apply = m.kube.apply
    m.kube.apply = lambda obj, dry_run=False: (applied.append((obj["kind"], obj["metadata"]["name"], dry_run)),
                                               apply(obj, dry_run))[1]
    return applied


def children_but_replicas(m):
    """Every child as stored, with what a scale changes (replicas, generation, resourceVersion) left out."""
    out = {}
    for key, obj in m.kube.objs.items():
        if key[0] in ("DisaggregatedModel", "Pod"):
            continue
        obj = json.loads(json.dumps(obj))
        obj["metadata"].pop("resourceVersion", None)
        obj["metadata"].pop("generation", None)
        obj.get("spec", {}).pop("replicas", None)
        out[key] = obj
    return out


def test_a_kv_mismatch_stalled_model_still_scales_its_serving_decode_tier():
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.edit(kv_mismatch)
    m.pass_()
    stalled = dict(m.cond("Stalled"))
    assert stalled["status"] == "True" and stalled["reason"] == "KVFormatMismatch"
    before = children_but_replicas(m)
    applied = record_applies(m)
    scale(m, "decode", 3)  # the HPA, during the traffic spike
    m.pass_()
    assert m.replicas(g0) == {"prefill": 1, "decode": 3} and m.generations() == [g0]
    assert applied == [] and children_but_replicas(m) == before  # nothing of the refused spec applied
    after = m.cond("Stalled")
    assert (after["status"], after["reason"], after["message"]) == ("True", "KVFormatMismatch", stalled["message"])
    assert m.cond("KVFormatCompatible")["status"] == "False" and m.cond("Ready")["status"] == "False"
    assert ("Normal", "Applied") in [(e[0], e[1]) for e in m.kube.events if "decode from 1 to 3" in e[2]]
    # What the autoscaler reads back (statusReplicasPath .status.decode.replicas), and how many are ready.
    decode = m.obj["status"]["decode"]
    assert (decode["replicas"], decode["readyReplicas"], decode["summary"]) == (3, 1, "1/3")
    assert m.obj["status"]["prefill"]["replicas"] == 1 and decode["selector"] and decode["kvFingerprint"]
    m.kube.settle(keep_pods=True)
    m.pass_()
    decode = m.obj["status"]["decode"]
    assert (decode["replicas"], decode["readyReplicas"], decode["summary"]) == (3, 3, "3/3")
    assert m.cond("Stalled")["reason"] == "KVFormatMismatch"
    scale(m, "decode", 2)  # and back down
    m.pass_()
    assert m.replicas(g0)["decode"] == 2 and m.obj["status"]["decode"]["replicas"] == 2
    assert applied == []


def test_an_invalid_spec_still_scales_both_serving_tiers():
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.edit(invalid)
    m.pass_()
    stalled = dict(m.cond("Stalled"))
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec"
    applied = record_applies(m)
    m.edit(lambda s: (s["prefill"].__setitem__("replicas", 2), s["decode"].__setitem__("replicas", 4)))
    m.pass_()
    assert m.replicas(g0) == {"prefill": 2, "decode": 4} and applied == []
    after = m.cond("Stalled")
    assert (after["status"], after["reason"], after["message"]) == ("True", "InvalidSpec", stalled["message"])
    assert m.obj["status"]["prefill"]["replicas"] == 2 and m.obj["status"]["decode"]["replicas"] == 4
    # The decode StatefulSet's pod template is the accepted spec's: no POD_IP override reached it.
    env = m.kube.objs[("StatefulSet", "ns", f"m-decode-{g0}")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "POD_IP", "value": "1.2.3.4"} not in env


def test_a_pass_with_the_counts_already_in_place_writes_nothing():
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.edit(kv_mismatch)
    m.pass_()
    scale(m, "decode", 3)
    assert m.r.reconcile("ns", "m").writes > 0
    assert m.replicas(g0)["decode"] == 3
    writes, events = m.kube.writes(), len(m.kube.events)
    outcome = m.r.reconcile("ns", "m")
    assert outcome.writes == 0 and m.kube.writes() == writes and len(m.kube.events) == events
    assert outcome.failed and m.cond("Stalled")["reason"] == "KVFormatMismatch"
    m.kube.settle(keep_pods=True)  # the replicas become Ready: status says so, once
    m.pass_()
    assert m.obj["status"]["decode"]["summary"] == "3/3"
    writes = m.kube.writes()
    assert m.r.reconcile("ns", "m").writes == 0 and m.kube.writes() == writes


def test_a_spec_that_does_not_parse_scales_nothing():
    m = Model()
    g0 = m.ro["servingGeneration"]
    before = children_but_replicas(m)
    m.edit(lambda s: (unparseable(s), s["decode"].__setitem__("replicas", 3)))
    requests = dict(m.kube.requests)
    m.pass_(2)
    assert m.cond("Stalled")["reason"] == "InvalidSpec" and "tensorParallelSize" in m.cond("Stalled")["message"]
    assert m.replicas(g0) == {"prefill": 1, "decode": 1} and children_but_replicas(m) == before
    assert m.obj["status"]["decode"]["replicas"] == 1
    assert m.kube.requests["PATCH"] == requests["PATCH"] + 1  # the status write, nothing else
    # The same replica count, once the spec parses (but is still refused), reaches the StatefulSet.
    m.edit(lambda s: (s["prefill"].__setitem__("tensorParallelSize", 1), kv_mismatch(s)))
    m.pass_()
    assert m.cond("Stalled")["reason"] == "KVFormatMismatch" and m.replicas(g0) == {"prefill": 1, "decode": 3}


def test_a_refused_apply_still_scales_the_serving_generation():
    """ApplyFailed: the API server refuses a rendered child (here the scheduler Deployment); the tiers'
    scale subresource is not that object, and the replica count still gets there."""
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.kube.fail_apply = lambda o: 422 if o["kind"] == "Deployment" else None
    m.edit(lambda s: s["scheduler"].__setitem__("replicas", 2))
    m.pass_()
    assert m.cond("Stalled")["reason"] == "ApplyFailed"
    scale(m, "decode", 3)
    m.pass_()
    assert m.cond("Stalled")["reason"] == "ApplyFailed" and m.replicas(g0) == {"prefill": 1, "decode": 3}
    assert m.kube.objs[("Deployment", "ns", "m-scheduler")]["spec"]["replicas"] == 1


def test_scaling_while_stalled_reaches_the_generation_that_serves_during_a_rollout():
    # Blocked on capacity: the old generation serves, the new one was never created.
    m = Model(gpus=1)
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    m.pass_()
    assert m.ro["phase"] == "BlockedOnCapacity"
    m.edit(kv_mismatch)
    scale(m, "decode", 2)
    m.pass_()
    assert m.cond("Stalled")["reason"] == "KVFormatMismatch" and m.generations() == [g0]
    assert m.replicas(g0) == {"prefill": 1, "decode": 2}

    # Rolled back: the last known-good generation serves.
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    m.pass_()
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_(2)
    assert m.ro["phase"] == "RolledBack" and m.generations() == [g0]
    m.edit(invalid)
    scale(m, "decode", 3)
    m.pass_()
    assert m.cond("Stalled")["reason"] == "InvalidSpec" and m.replicas(g0) == {"prefill": 1, "decode": 3}

    # Draining: the generation switched to serves; the one draining (kept for a rollback) is left alone.
    m = Model()
    g0 = m.ro["servingGeneration"]
    g1 = m.switch("1.2.1")
    m.edit(invalid)
    scale(m, "decode", 2)
    m.pass_()
    assert m.cond("Stalled")["reason"] == "InvalidSpec" and m.ro["phase"] == "Draining"
    assert m.replicas(g1) == {"prefill": 1, "decode": 2} and m.replicas(g0) == {"prefill": 1, "decode": 1}
    m.kube.settle(keep_pods=True)
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == g1  # a scale-up is not a lost replica


def test_a_rollback_while_stalled_scales_the_generation_traffic_went_back_to():
    m = Model()
    g0 = m.ro["servingGeneration"]
    g1 = m.switch("1.2.1")
    m.edit(invalid)
    scale(m, "decode", 2)
    m.kube.settle(ready=False, gen=g1)  # the new generation fails in the same pass
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0
    assert m.replicas(g1)["decode"] == 1  # the failed generation is not grown
    # The pass that moves traffic back does only that (as with an accepted spec); the next one scales.
    assert m.replicas(g0) == {"prefill": 1, "decode": 1}
    m.pass_()
    assert m.cond("Stalled")["reason"] == "InvalidSpec" and m.replicas(g0) == {"prefill": 1, "decode": 2}


def test_a_pairwise_swap_under_way_keeps_sizing_the_generations_while_stalled():
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    sizes = (m.replicas(g0), m.replicas(g1))
    m.edit(kv_mismatch)
    scale(m, "decode", 4)
    m.pass_(2)
    assert m.cond("Stalled")["reason"] == "KVFormatMismatch"
    assert (m.replicas(g0), m.replicas(g1)) == sizes

    # Once the swap's final switch is done (its record stays for the rollback window), the generation
    # switched to is the spec's to size again.
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    for _ in range(10):
        m.pass_()
        m.kube.settle()
        if m.ro["servingGeneration"] == g1:
            break
    assert m.ro["phase"] == "Draining" and m.ro["swap"]["decodeReplicas"] == 3, m.ro
    m.edit(kv_mismatch)
    scale(m, "decode", 4)
    m.pass_()
    assert m.cond("Stalled")["reason"] == "KVFormatMismatch" and m.replicas(g1) == {"prefill": 3, "decode": 4}


def test_a_count_above_max_replicas_stops_at_max_replicas():
    """An object an older CRD let through with replicas above maxReplicas (the CRD now refuses it)."""
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.edit(lambda s: (invalid(s), s["decode"].__setitem__("replicas", 9)))
    m.pass_()
    assert m.cond("Stalled")["reason"] == "InvalidSpec" and m.replicas(g0)["decode"] == 4


def test_a_scale_the_api_server_refuses_while_stalled(caplog):
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.edit(kv_mismatch)
    m.pass_()
    scale(m, "decode", 3)
    real = m.kube.scale
    answer = {"status": 503}

    def refused(*args):
        raise ApiException(status=answer["status"], reason="injected")

    m.kube.scale = refused
    status_before = json.dumps(m.obj["status"], sort_keys=True)
    outcome = m.r.reconcile("ns", "m")  # not now: retried with backoff, nothing reported
    assert outcome.transient and json.dumps(m.obj["status"], sort_keys=True) == status_before
    answer["status"] = 403  # never: logged, and the model is still reported Stalled, truthfully
    with caplog.at_level(logging.WARNING, logger="baton.operator"):
        outcome = m.r.reconcile("ns", "m")
    assert outcome.failed and not outcome.transient and m.cond("Stalled")["reason"] == "KVFormatMismatch"
    assert any("scaling StatefulSet" in r.getMessage() for r in caplog.records)
    assert m.replicas(g0)["decode"] == 1 and m.obj["status"]["decode"]["replicas"] == 1
    m.kube.scale = real
    m.pass_()
    assert m.replicas(g0)["decode"] == 3 and m.obj["status"]["decode"]["replicas"] == 3
