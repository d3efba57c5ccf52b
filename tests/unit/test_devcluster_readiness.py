"""The local cluster's readiness stand-in decides which pods it may turn Ready: only running pods whose
readiness probe KWOK left pending, and never a pod a pod runner runs and probes itself."""

from __future__ import annotations

import copy
import time

from baton.devcluster.readiness import (
    PASSED_REASON,
    PROBE_PENDING,
    ReadinessStandIn,
    claimed,
    passed_probe_patch,
    probe_pending,
    split_claimed,
)
from baton.podrunner.runner import ALL_NAMESPACES_CLAIM, CLAIM_ANNOTATION

BATON_LABELS = {"app.kubernetes.io/managed-by": "baton-operator", "baton.dev/tier": "decode"}


def pod(ready: str = "False", reason: str | None = PROBE_PENDING, phase: str = "Running", ip: str = "127.64.0.9",
        labels: dict[str, str] | None = None, deleting: bool = False) -> dict:
    ready_condition = {"type": "Ready", "status": ready}
    if reason:
        ready_condition["reason"] = reason
    meta = {"name": "p-0", "namespace": "ns", "labels": labels or {"app": "x"}, "resourceVersion": "42"}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-27T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "phase": phase, "podIP": ip,
            "conditions": [{"type": "Initialized", "status": "True"}, {"type": "ContainersReady", "status": "False"},
                           ready_condition],
            "containerStatuses": [{"name": "engine", "image": "engine:test", "ready": False, "started": True}],
        },
    }


def test_only_a_running_pod_whose_probe_kwok_left_pending_is_a_candidate() -> None:
    assert probe_pending(pod())
    assert not probe_pending(pod(ready="True", reason=None))  # probe-less: KWOK made it Ready already
    assert not probe_pending(pod(reason="ProbeFailed"))  # a pod runner's verdict is never overturned
    assert not probe_pending(pod(reason="Starting"))
    assert not probe_pending(pod(phase="Pending"))
    assert not probe_pending(pod(ip=""))
    assert not probe_pending(pod(deleting=True))


def test_a_pod_runner_claim_covers_only_the_pods_it_runs() -> None:
    baton = pod(labels=BATON_LABELS)
    other = pod()
    claim = {CLAIM_ANNOTATION: "host/1/abc"}
    assert claimed(baton, claim, {})
    assert not claimed(other, claim, {}), "a runner runs only Baton's tiers and scheduler"
    assert not claimed(baton, {}, {})
    assert claimed(baton, {}, {ALL_NAMESPACES_CLAIM: "host/1/abc"})
    assert not claimed(baton, {}, {CLAIM_ANNOTATION: "host/1/abc"}), "a claim on kube-system is for kube-system only"


def test_the_patch_is_what_a_kubelet_writes_when_the_probe_passes() -> None:
    before = pod()
    original = copy.deepcopy(before)
    patch = passed_probe_patch(before, "2026-11-27T10:00:00Z")
    conditions = {c["type"]: c for c in patch["status"]["conditions"]}
    assert set(conditions) == {"Ready", "ContainersReady"}
    assert all(c["status"] == "True" and c["reason"] == PASSED_REASON for c in conditions.values())
    assert patch["status"]["containerStatuses"] == [
        {"name": "engine", "image": "engine:test", "ready": True, "started": True}]
    assert patch["metadata"] == {"resourceVersion": "42"}, "refused if the pod changed since it was seen"
    assert before == original, "the pod it was built from is left as it was"


def test_a_batch_is_sorted_out_with_one_view_of_every_namespaces_claims() -> None:
    def named(namespace, labels):
        p = pod(labels=labels)
        p["metadata"]["namespace"] = namespace
        return p

    batch = [named("run", BATON_LABELS), named("run", {"app": "x"}), named("free", BATON_LABELS), named("gone", BATON_LABELS)]
    claims = {"run": {CLAIM_ANNOTATION: "host/1/abc"}, "free": {}, "kube-system": {}}
    assert [(p["metadata"]["namespace"], p["metadata"]["labels"]) for p in split_claimed(batch, claims)[0]] == [
        ("run", {"app": "x"}), ("free", BATON_LABELS), ("gone", BATON_LABELS)]
    everywhere = {**claims, "kube-system": {ALL_NAMESPACES_CLAIM: "host/1/abc"}}
    assert [p["metadata"]["labels"] for p in split_claimed(batch, everywhere)[0]] == [{"app": "x"}]


def test_watch_lines_are_split_across_reads_and_the_resource_version_is_the_objects() -> None:
    from baton.devcluster.readiness import _RESOURCE_VERSION, watch_lines

    class Streamed:
        def stream(self, amt=None, decode_content=False):
            yield b'{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"7"},"status":{}}}\n{"ty'
            yield b'pe":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}\n'
            yield b'{"type":"MODIFIED"'

    lines = list(watch_lines(Streamed()))
    assert [line[:18] for line in lines] == [b'{"type":"ADDED","o', b'{"type":"BOOKMARK"', b'{"type":"MODIFIED"']
    assert [m.group(1) for m in map(_RESOURCE_VERSION.search, lines[:2])] == [b"7", b"9"]


def test_a_claim_whose_lease_ran_out_no_longer_keeps_the_stand_in_away() -> None:
    import time

    baton = {"metadata": {"labels": BATON_LABELS}}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    assert not claimed(baton, {CLAIM_ANNOTATION: f"host/1/abc;renewed={stamp};lease=30"}, {})
    assert not claimed(baton, {}, {ALL_NAMESPACES_CLAIM: f"host/1/abc;renewed={stamp};lease=30"})
    assert claimed(baton, {CLAIM_ANNOTATION: f"host/1/abc;renewed={fresh};lease=30"}, {})


def test_pods_a_live_claim_covers_are_looked_at_again_after_the_recheck_interval() -> None:
    stand_in = ReadinessStandIn(None, recheck_s=0.3)
    ours = pod(labels=BATON_LABELS)
    fresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mine, runners = split_claimed([ours, pod()], {"ns": {CLAIM_ANNOTATION: f"host/1/abc;renewed={fresh};lease=30"}})
    assert [p["metadata"]["labels"] for p in mine] == [{"app": "x"}] and runners == [ours]
    stand_in._defer(runners)
    start = time.monotonic()
    assert stand_in._take() == [ours]  # nothing else queued: the deferred pod comes back once its recheck is due
    assert time.monotonic() - start >= 0.25
    # a pod queued meanwhile is taken at once, the deferred ones only when due; a newer version of a
    # deferred pod replaces the one kept
    stand_in._defer([ours])
    other = copy.deepcopy(ours)
    other["metadata"]["name"] = "p-1"
    stand_in.offer(other)
    assert stand_in._take() == [other]
    newer = copy.deepcopy(ours)
    newer["metadata"]["resourceVersion"] = "43"
    time.sleep(0.35)
    stand_in.offer(newer)
    assert stand_in._take() == [newer]
    assert stand_in._deferred == {}
