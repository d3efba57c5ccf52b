"""The generation state machine (rollout_pass) and the reconciler around it, against an in-memory
Kubernetes: rollouts, rollbacks, the control annotations and API errors."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from baton.operator import rollout, rollout_pass
from baton.operator.kube import PassStopped
from baton.operator.reconciler import Reconciler, TransientApiError, transient
from baton.operator.rollout_pass import ANNOTATION_RETRY, ANNOTATION_ROLLBACK, handled_value, lost_ready_pods

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "small.yaml"
IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:"


class FakeKube:
    """Just enough of the API server: server-side apply, scale, status merge patches, deletes; pods
    appear when `settle` says the StatefulSets rolled out."""

    def __init__(self, nodes):
        self.objs: dict[tuple[str, str, str], dict] = {}
        self.rv = 1
        self.requests: Counter[str] = Counter()
        self.events: list[tuple[str, str, str]] = []
        self.posted: dict[str, tuple[str, str, str]] = {}  # Event name -> what it says
        self.nodes = nodes
        self.fail_apply = None  # obj -> HTTP status to fail with (or None)
        self.log: list[tuple[str, str]] = []  # ("status", servingGeneration) / ("delete", name), in order
        self.stop = None  # as Kube.stopping_on: writes raise PassStopped once it is set

    @contextlib.contextmanager
    def stopping_on(self, stop):
        self.stop = stop
        try:
            yield
        finally:
            self.stop = None

    def _write(self):
        if self.stop is not None and self.stop.is_set():
            raise PassStopped("the pass's model loop stopped")

    def writes(self):
        return sum(n for v, n in self.requests.items() if v not in ("GET", "LIST", "DRYRUN"))

    def _bump(self, obj):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def get(self, kind, ns, name):
        o = self.objs.get((kind, ns, name))
        return copy.deepcopy(o) if o else None

    def list(self, kind, ns, sel="", field_selector=""):
        k, v = sel.split("=") if sel else (None, None)
        return [copy.deepcopy(o) for (kd, n, _), o in self.objs.items() if kd == kind and n == ns
                and (k is None or (o["metadata"].get("labels") or {}).get(k) == v)]

    def list_cluster(self, kind, field_selector=""):
        if kind == "Node":
            return copy.deepcopy(self.nodes)
        return [copy.deepcopy(o) for (kd, _, _), o in self.objs.items() if kd == kind]

    def apply(self, obj, dry_run=False):
        self._write()
        code = self.fail_apply(obj) if self.fail_apply else None
        if code:
            exc = ApiException(status=code, reason="injected")
            exc.body = json.dumps({"message": f"injected {code}"})
            raise exc
        if dry_run:
            self.requests["DRYRUN"] += 1
            return copy.deepcopy(obj)
        self.requests["PATCH"] += 1
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        cur = self.objs.get(key)
        new = copy.deepcopy(obj)
        if cur is None:
            new["metadata"].update(generation=1, uid="uid-" + obj["metadata"]["name"])
            if obj["kind"] in ("StatefulSet", "Deployment"):
                new["status"] = {"observedGeneration": 0}
        else:
            changed = json.dumps(cur.get("spec"), sort_keys=True) != json.dumps(new.get("spec"), sort_keys=True)
            new["metadata"].update(generation=cur["metadata"].get("generation", 1) + changed, uid=cur["metadata"]["uid"])
            if "status" in cur:
                new["status"] = cur["status"]
        self._bump(new)
        self.objs[key] = new
        return copy.deepcopy(new)

    def scale(self, kind, ns, name, replicas):
        self._write()
        self.requests["PATCH"] += 1
        o = self.objs[(kind, ns, name)]
        o["spec"]["replicas"] = replicas
        o["metadata"]["generation"] += 1
        self._bump(o)
        return copy.deepcopy(o)

    def patch_status(self, ns, name, status, resource_version=""):
        self._write()
        self.requests["PATCH"] += 1
        o = self.objs[("DisaggregatedModel", ns, name)]
        if resource_version and o["metadata"].get("resourceVersion") != resource_version:
            exc = ApiException(status=409, reason="Conflict")
            exc.body = json.dumps({"message": "the object has been modified; please apply your changes to the "
                                              "latest version and try again"})
            raise exc

        def merge(a, b):
            for k, v in b.items():
                if isinstance(v, dict) and isinstance(a.get(k), dict):
                    merge(a[k], v)
                elif v is None:
                    a.pop(k, None)
                else:
                    a[k] = copy.deepcopy(v)

        merge(o.setdefault("status", {}), status)
        self.log.append(("status", (status.get("rollout") or {}).get("servingGeneration", "")))
        self._bump(o)

    def delete(self, kind, ns, name):
        self._write()
        self.requests["DELETE"] += 1
        self.log.append(("delete", name))
        self.objs.pop((kind, ns, name), None)
        if kind == "StatefulSet":
            for k in [k for k, p in self.objs.items() if k[0] == "Pod" and p["metadata"]["labels"].get("sts") == name]:
                self.objs.pop(k)

    def create_event(self, ev):
        self._write()
        self.events.append((ev["type"], ev["reason"], ev["message"]))
        self.posted[ev["metadata"]["name"]] = self.events[-1]

    def patch_event(self, ns, name, patch):
        """A repeat counted on an Event posted before: listed again here, as each time it happened."""
        if name not in self.posted:  # posted through another FakeKube (an earlier test): gone, as if expired
            raise ApiException(status=404, reason="Not Found")
        self.events.append(self.posted[name])

    def settle(self, ready=True, gen=None, keep_pods=False):
        """Workloads observed and (if ready) available; their pods exist (on nodes with room)."""
        for key, o in list(self.objs.items()):
            if key[0] not in ("StatefulSet", "Deployment"):
                continue
            if gen and o["metadata"]["labels"].get("baton.dev/generation") != gen:
                continue
            n = o["spec"].get("replicas", 1)
            o["status"] = {"observedGeneration": o["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
                           "readyReplicas": n if ready else 0, "availableReplicas": n if ready else 0}
            if key[0] != "StatefulSet":
                continue
            pods = {k: p for k, p in self.objs.items() if k[0] == "Pod" and p["metadata"]["labels"].get("sts") == key[2]}
            for k in pods:
                if not keep_pods:
                    self.objs.pop(k)
            gpus = int(o["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            selector = o["spec"]["template"]["spec"].get("nodeSelector") or {}
            for i in range(n):
                name = f"{key[2]}-{i}"
                if keep_pods and ("Pod", key[1], name) in pods:
                    continue
                labels = {**o["spec"]["template"]["metadata"]["labels"], "sts": key[2]}
                self.objs[("Pod", key[1], name)] = {
                    "metadata": {"name": name, "namespace": key[1], "labels": labels},
                    "spec": {"nodeName": self._place(selector, gpus),
                             "containers": [{"resources": {"requests": {"nvidia.com/gpu": str(gpus)}}}]},
                    "status": {"phase": "Running", "podIP": f"10.0.0.{i}",
                               "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}

    def _place(self, selector, gpus):
        free = rollout.free_gpus(self.nodes, [o for k, o in self.objs.items() if k[0] == "Pod"])
        for n in self.nodes:
            if all((n["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()) and free[n["metadata"]["name"]] >= gpus:
                return n["metadata"]["name"]
        return None


def node(name, pool, gpus):
    return {"metadata": {"name": name, "labels": {"baton.dev/pool": pool}}, "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}


@pytest.fixture(autouse=True)
def engines(monkeypatch):
    """Probes pass (but, as the real probe, fail with no Ready pod in a tier), the old generation has work in
    flight, the schedulers saw no errors."""
    calls = []

    def probe_handoffs(prefill, decode, model, timeout=20.0):
        calls.append(1)
        return (True, "ok") if prefill and decode else (False, "no ready pods to probe")

    monkeypatch.setattr(rollout, "probe_handoffs", probe_handoffs)
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 1)
    monkeypatch.setattr(rollout, "read_schedulers", lambda schedulers, optional=(), timeout=2.0: rollout.SchedulerReadout())
    return calls


PINNED = "0123456789abcdef0123456789abcdef01234567"


class Model:
    def __init__(self, gpus=8, mutate=None, settle=True):
        self.kube = FakeKube([node("p1", "prefill-h100", gpus), node("d1", "decode-l40s", gpus), node("s", "system", 0)])
        doc = yaml.safe_load(EXAMPLE.read_text())
        doc["metadata"] = {"name": "m", "namespace": "ns", "uid": "model-uid", "generation": 1, "annotations": {}}
        doc["spec"]["model"]["source"]["huggingFace"]["revision"] = PINNED  # as in production: no warning of it
        if mutate:
            mutate(doc["spec"])
        self.kube.objs[("DisaggregatedModel", "ns", "m")] = doc
        self.r = Reconciler(self.kube, None)
        self.pass_()
        if settle:
            self.kube.settle()
            self.pass_()

    @property
    def obj(self):
        return self.kube.objs[("DisaggregatedModel", "ns", "m")]

    @property
    def ro(self):
        return self.obj.get("status", {}).get("rollout", {})

    def cond(self, ctype):
        return next((c for c in self.obj.get("status", {}).get("conditions", []) if c["type"] == ctype), {})

    def edit(self, fn):
        fn(self.obj["spec"])
        self.obj["metadata"]["generation"] += 1

    def image(self, tag):
        self.edit(lambda s: s["engine"].__setitem__("image", IMAGE + tag))

    def annotate(self, key, value):
        annotations = self.obj["metadata"]["annotations"]
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value

    def pass_(self, n=1):
        for _ in range(n):
            self.r.reconcile("ns", "m")

    def generations(self):
        return sorted({o["metadata"]["labels"]["baton.dev/generation"] for k, o in self.kube.objs.items() if k[0] == "StatefulSet"})

    def replicas(self, gen):
        return {t: self.kube.objs[("StatefulSet", "ns", f"m-{t}-{gen}")]["spec"]["replicas"] for t in ("prefill", "decode")}

    def switch(self, tag):
        """An engine change rolled out up to the switch (Draining)."""
        self.image(tag)
        self.pass_()
        self.kube.settle()
        self.pass_()
        assert self.ro["phase"] == "Draining", self.ro
        return self.ro["servingGeneration"]

    def warnings(self):
        return [e for e in self.kube.events if e[0] == "Warning"]


def iso(seconds_ago=0.0):
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return t.replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- 1. scaling during the rollback window

def test_lost_ready_pods_counts_only_replicas_that_were_there_at_the_switch():
    def pod(name, ready, created, restarts=0, deleting=False):
        return {"metadata": {"name": name, "creationTimestamp": created, **({"deletionTimestamp": iso()} if deleting else {})},
                "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                           "containerStatuses": [{"restartCount": restarts}]}}

    switched = iso(30)
    assert lost_ready_pods([pod("a", True, iso(120)), pod("b", False, iso(5))], switched) == []  # scale-up starting
    assert lost_ready_pods([pod("a", False, iso(120))], switched) == ["a"]  # was serving at the switch
    assert lost_ready_pods([pod("c", False, iso(5), restarts=2)], switched) == ["c"]  # a new one that crashed
    assert lost_ready_pods([pod("d", False, iso(120), deleting=True)], switched) == []  # scaled down / evicted


def test_lost_ready_pods_tells_replicas_there_at_the_switch_by_ordinal_when_the_status_records_them():
    def pod(name, tier, ready, created, restarts=0):
        return {"metadata": {"name": name, "creationTimestamp": created, "labels": {"baton.dev/tier": tier}},
                "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                           "containerStatuses": [{"restartCount": restarts}]}}

    switched, at_switch = iso(30), {"prefill": 1, "decode": 2}
    # recreated since the switch (an eviction): still one of the replicas that served, and not Ready
    assert lost_ready_pods([pod("m-decode-g-1", "decode", False, iso(5))], switched, at_switch) == ["m-decode-g-1"]
    # an ordinal above the count at the switch is a scale-up still starting, whatever its age
    assert lost_ready_pods([pod("m-decode-g-2", "decode", False, iso(5)), pod("m-prefill-g-1", "prefill", False, iso(5))],
                           switched, at_switch) == []
    assert lost_ready_pods([pod("m-prefill-g-1", "prefill", False, iso(5), restarts=1)], switched, at_switch) == ["m-prefill-g-1"]


def _evict(m, gen, tier, recreate=True):
    """The StatefulSet's pods of a tier evicted (a node drain, a preemption) and, if `recreate`, made again
    under the same names, newer than the switch and not Ready yet."""
    sts = m.kube.objs[("StatefulSet", "ns", f"m-{tier}-{gen}")]
    for key in [k for k, o in m.kube.objs.items() if k[0] == "Pod" and o["metadata"]["labels"].get("sts") == sts["metadata"]["name"]]:
        pod = m.kube.objs.pop(key)
        if recreate:
            pod["metadata"]["creationTimestamp"] = iso(-2)
            pod["status"] = {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}],
                             "containerStatuses": [{"restartCount": 0}]}
            m.kube.objs[key] = pod
    sts["status"].update(readyReplicas=0, availableReplicas=0)


@pytest.mark.parametrize("recreate", [True, False], ids=["recreated-not-ready", "not-recreated"])
def test_a_tier_evicted_after_the_switch_is_rolled_back_onto_the_generation_kept_for_it(recreate):
    """Every decode pod of the new generation evicted in the rollback window: the pods the StatefulSet makes
    again are newer than the switch but are not a scale-up, and a pod it cannot make again (a quota, an
    admission webhook) is not Ready either. Traffic goes back to the previous generation, which is Ready,
    instead of the window ending on a generation with no decode replica and deleting the previous one."""
    m = Model()
    old = m.ro["servingGeneration"]
    new = m.switch("1.2.1")
    assert m.ro["replicasAtSwitch"] == m.replicas(new)
    _evict(m, new, "decode", recreate=recreate)
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == old and m.ro["failedGeneration"] == new, m.ro
    assert "lost readiness after the switch" in m.ro["message"]
    assert ("no pod: " if not recreate else "not Ready: ") + f"m-decode-{new}-0" in m.ro["message"]


def test_a_replica_scaled_down_and_up_again_after_the_switch_is_a_new_one_still_starting():
    m = Model(mutate=lambda s: s["decode"].__setitem__("replicas", 2))
    new = m.switch("1.2.1")
    assert m.ro["replicasAtSwitch"]["decode"] == 2
    m.edit(lambda s: s["decode"].__setitem__("replicas", 1))
    m.pass_()
    m.kube.objs.pop(("Pod", "ns", f"m-decode-{new}-1"))
    m.kube.settle(keep_pods=True)
    m.pass_()
    assert m.ro["replicasAtSwitch"]["decode"] == 1
    m.edit(lambda s: s["decode"].__setitem__("replicas", 2))
    m.pass_()
    m.kube.settle(keep_pods=True, ready=False, gen=new)  # the replica added back is starting
    for key in [("Pod", "ns", f"m-decode-{new}-0"), ("Pod", "ns", f"m-prefill-{new}-0")]:
        m.kube.objs[key]["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    m.kube.objs[("Pod", "ns", f"m-decode-{new}-1")]["metadata"]["creationTimestamp"] = iso(-2)
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == new and not m.warnings(), m.ro


def test_scaling_a_tier_during_the_rollback_window_keeps_the_new_generation(engines):
    m = Model()
    new = m.switch("1.2.1")
    m.edit(lambda s: s["decode"].__setitem__("replicas", 2))  # kubectl scale / an HPA / a replicas edit
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == new, m.ro
    m.kube.settle(keep_pods=True)  # the added replica becomes Ready
    m.pass_()
    assert m.ro["servingGeneration"] == new and not m.warnings()
    assert m.replicas(new)["decode"] == 2


def test_a_generation_losing_readiness_after_the_switch_is_still_rolled_back():
    m = Model()
    old = m.ro["servingGeneration"]
    new = m.switch("1.2.1")
    m.kube.settle(ready=False, gen=new)
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == old and m.ro["failedGeneration"] == new
    assert "lost readiness after the switch" in m.ro["message"]


def test_a_drain_timeout_shorter_than_the_rollback_window_does_not_cut_the_window_short(monkeypatch):
    """drainTimeout caps how long in-flight requests may keep the previous generation; it never deletes
    that generation before rollbackWindow, which is what a failing new generation is rolled back onto."""
    m = Model()
    m.edit(lambda s: s.setdefault("rollout", {}).update({"drainTimeout": "2s", "rollbackWindow": "10m"}))
    m.pass_()
    old = m.ro["servingGeneration"]
    new = m.switch("1.2.1")
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 5.0 if ts else 0.0)  # past the drain timeout
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 1)
    m.pass_()
    assert m.ro["phase"] == "Draining" and old in m.generations(), m.ro
    m.kube.settle(ready=False, gen=new)
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == old
    # past the window, the drain timeout (long over) no longer waits for the requests in flight
    m2 = Model()
    m2.edit(lambda s: s.setdefault("rollout", {}).update({"drainTimeout": "2s", "rollbackWindow": "10m"}))
    m2.pass_()
    old = m2.ro["servingGeneration"]
    m2.switch("1.2.1")
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 601.0 if ts else 0.0)
    m2.pass_()
    assert m2.ro["phase"] == "Serving" and old not in m2.generations() and "drain timeout reached" in m2.ro["message"]


# ---------------------------------------------------------------- 2. transient API errors

@pytest.mark.parametrize("code,expected", [(500, True), (503, True), (429, True), (409, True), (0, True),
                                           (400, False), (422, False), (403, False), (404, False)])
def test_transient_api_errors_are_told_from_permanent_ones(code, expected):
    assert transient(ApiException(status=code)) is expected


def test_a_transient_error_during_a_rollout_is_retried_not_rolled_back():
    m = Model()
    m.image("1.2.1")
    fails = {"n": 1}

    def flaky(obj):
        if obj["kind"] == "StatefulSet" and fails["n"] and obj["metadata"]["labels"].get("baton.dev/generation") != m.ro["servingGeneration"]:
            fails["n"] -= 1
            return 500
        return None

    m.kube.fail_apply = flaky
    before = copy.deepcopy(m.obj["status"])
    outcome = m.r.reconcile("ns", "m")
    assert 0 < outcome.requeue_after <= 2 and not outcome.failed
    assert m.obj["status"] == before and not m.warnings()  # nothing rolled back, no status written
    m.pass_()
    m.kube.settle()
    m.pass_()
    assert m.ro["phase"] == "Draining" and not m.ro.get("failedGeneration"), m.ro


def test_transient_errors_in_a_row_back_off():
    m = Model()
    m.kube.fail_apply = lambda o: 503 if o["kind"] == "Deployment" else None
    m.edit(lambda s: s["scheduler"].__setitem__("replicas", 2))
    outcomes = [m.r.reconcile("ns", "m") for _ in range(8)]
    assert [o.requeue_after for o in outcomes] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert all(o.transient and not o.failed for o in outcomes)  # counted as result="transient", not "ok"
    assert issubclass(TransientApiError, __import__("kopf").TemporaryError)


@pytest.mark.parametrize("call", ["scale", "delete"])
def test_a_transient_error_scaling_or_deleting_in_a_rollout_is_retried_with_backoff(call):
    """A 503 on the scale that gives the serving generation its replicas back, or on the delete of the
    rolled-back generation: the pass ends as for any transient error (retried after 1 s, nothing
    decided, no status write), and the retry finishes the rollback."""
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    m.annotate(ANNOTATION_ROLLBACK, "true")
    if call == "delete":
        m.pass_()  # rolled back: the generation goes on the next pass
    before = copy.deepcopy(m.ro)
    real = getattr(m.kube, call)
    failures = {"n": 1}

    def flaky(*args):
        if failures["n"]:
            failures["n"] -= 1
            raise ApiException(status=503, reason="Service Unavailable")
        return real(*args)

    setattr(m.kube, call, flaky)
    outcome = m.r.reconcile("ns", "m")
    assert outcome.transient and outcome.requeue_after == 1.0 and not failures["n"]
    assert m.ro == before
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["swap"]["generation"] == "" and m.replicas(g0) == {"prefill": 3, "decode": 3}
    m.pass_()
    assert m.generations() == [g0]


def test_an_invalid_new_generation_is_still_rolled_back():
    m = Model()
    m.image("1.2.1")
    m.kube.fail_apply = lambda obj: 422 if obj["kind"] == "StatefulSet" and m.ro["servingGeneration"] not in obj["metadata"]["name"] else None
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and "refused by the API server" in m.ro["message"]


def test_a_transient_error_in_steady_state_is_not_stalled():
    m = Model()
    fails = {"n": 1}
    m.kube.fail_apply = lambda o: (o["kind"] == "Deployment" and fails.pop("n", None) and 503) or None
    m.edit(lambda s: s["scheduler"].__setitem__("replicas", 2))
    assert m.r.reconcile("ns", "m").requeue_after <= 2
    assert m.cond("Stalled")["status"] == "False" and m.cond("Ready")["status"] == "True" and not m.warnings()
    m.pass_()
    assert m.kube.objs[("Deployment", "ns", "m-scheduler")]["spec"]["replicas"] == 2


# ---------------------------------------------------------------- 3. RolloutSucceeded and stale fields

def test_rollout_succeeded_turns_true_again_once_a_rollout_succeeds(monkeypatch):
    m = Model(gpus=1)
    m.image("1.2.1")
    m.pass_()
    assert m.ro["phase"] == "BlockedOnCapacity" and m.cond("RolloutSucceeded")["status"] == "False"
    for n in m.kube.nodes:
        n["status"]["allocatable"]["nvidia.com/gpu"] = "2"
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)
    m.pass_()
    m.kube.settle()
    m.pass_()
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 3600.0 if ts else 0.0)  # past the rollback window
    m.pass_()
    assert m.ro["phase"] == "Serving"
    assert m.cond("RolloutSucceeded")["status"] == "True" and m.ro["servingGeneration"] in m.cond("RolloutSucceeded")["message"]


def test_reverting_the_spec_after_a_rollback_clears_the_failed_rollout():
    m = Model()
    old = m.ro["servingGeneration"]
    m.image("1.2.1")
    m.pass_()
    m.kube.settle(ready=False)
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.cond("RolloutSucceeded")["status"] == "False"
    # The old generation serves, but the spec does not run and is not tried again: Baton needs the user
    # (kstatus Failed, Argo CD Degraded), not a model that looks healthy and current.
    stalled = m.cond("Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "RolledBack" and "rolled back" in stalled["message"]
    # counted as a stalled pass (baton_operator_reconciles_total{result="stalled"}: the Stalled alert)
    assert m.r.reconcile("ns", "m").failed
    m.image("1.2.0")  # back to what serves
    m.pass_()
    assert not m.r.reconcile("ns", "m").failed
    assert m.ro["servingGeneration"] == old and m.ro["targetGeneration"] == old and m.ro["failedGeneration"] == ""
    assert m.ro["phase"] == "Serving" and m.cond("RolloutSucceeded")["status"] == "True"
    assert m.cond("Stalled")["status"] == "False"


# ---------------------------------------------------------------- 4. fingerprints after a rollback

def test_status_shows_the_serving_generations_fingerprint_after_a_rollback():
    m = Model()
    good_fp = m.obj["status"]["prefill"]["kvFingerprint"]
    m.edit(lambda s: s["engine"]["kvCache"].__setitem__("dtype", "fp8"))
    m.pass_()
    m.kube.settle()
    m.pass_()
    new = m.ro["servingGeneration"]
    assert m.obj["status"]["prefill"]["kvFingerprint"] != good_fp
    m.kube.settle(ready=False, gen=new)
    m.pass_()
    assert m.ro["phase"] == "RolledBack"
    assert m.obj["status"]["prefill"]["kvFingerprint"] == good_fp == m.obj["status"]["decode"]["kvFingerprint"]


# ---------------------------------------------------------------- 5. a second edit mid-rollout

def test_a_second_edit_while_progressing_deletes_the_abandoned_generation():
    m = Model(gpus=2)
    serving = m.ro["servingGeneration"]
    m.image("1.2.1")
    m.pass_()
    first = m.ro["targetGeneration"]
    m.kube.settle(ready=False, gen=first)  # holds the spare GPUs, never Ready
    m.pass_()
    m.image("1.2.2")
    m.pass_()
    second = m.ro["targetGeneration"]
    assert first not in m.generations() and m.generations() == sorted([serving, second])
    assert m.ro["phase"] == "Progressing", m.ro["message"]


def test_a_second_edit_while_draining_keeps_the_serving_generation_as_last_known_good(monkeypatch):
    m = Model()
    g0 = m.ro["servingGeneration"]
    g1 = m.switch("1.2.1")
    m.image("1.2.2")
    m.pass_()
    assert m.ro["lastKnownGood"]["generation"] == g1
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)  # g0 drained
    m.kube.settle()
    m.pass_()
    g2 = m.ro["servingGeneration"]
    assert g2 not in (g0, g1) and m.ro["previousGeneration"] == g1 and g0 not in m.generations()
    m.kube.settle(ready=False, gen=g2)
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g1


# ---------------------------------------------------------------- 6. the control annotations act once

def test_handled_value_reads_back_what_was_recorded():
    conditions = [{"type": "RollbackRequestHandled", "status": "True", "message": f"{ANNOTATION_ROLLBACK}=true: generation x rolled back"}]
    assert handled_value(conditions, ANNOTATION_ROLLBACK) == "true"
    assert handled_value(conditions, ANNOTATION_RETRY) == ""


def test_a_rollback_annotation_left_in_place_does_not_roll_back_the_next_rollout():
    m = Model()
    m.image("1.2.1")
    m.pass_()
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack"
    m.image("1.2.2")  # the next upgrade, annotation still there (GitOps)
    m.pass_()
    assert m.ro["phase"] == "Progressing" and len(m.warnings()) == 1
    # Removing the annotation forgets it; setting it again aborts again.
    m.annotate(ANNOTATION_ROLLBACK, None)
    m.pass_()
    assert not m.cond("RollbackRequestHandled")
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and len(m.warnings()) == 2


def test_a_retried_generation_is_probed_again_and_retried_once(engines, monkeypatch):
    m = Model()
    g = m.switch("1.2.1")
    m.kube.settle(ready=False, gen=g)
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["probe"]["passed"] is True
    m.annotate(ANNOTATION_RETRY, g)
    monkeypatch.setattr(rollout, "probe_handoffs", lambda p, d, mm, timeout=20.0: (engines.append(1), (False, "handoff failed"))[1])
    probes = len(engines)
    m.pass_()
    m.kube.settle()
    m.pass_()
    assert len(engines) == probes + 1 and m.ro["phase"] == "RolledBack" and m.ro["probe"]["passed"] is False
    m.pass_(3)
    m.kube.settle()
    m.pass_()
    assert len(engines) == probes + 1 and m.ro["phase"] == "RolledBack"  # not retried in a loop
    assert g not in m.generations()


# ---------------------------------------------------------------- 7. first deployment fixed

def test_fixing_a_broken_first_deployment_replaces_its_never_ready_generation():
    m = Model(gpus=1, settle=False)
    m.kube.settle(ready=False)
    m.pass_()
    broken = m.ro["targetGeneration"]
    m.image("1.2.1")
    m.pass_()
    assert broken not in m.generations()
    m.kube.settle()
    assert all(p["spec"]["nodeName"] for k, p in m.kube.objs.items() if k[0] == "Pod")
    m.pass_()
    assert m.ro["phase"] == "Serving" and m.ro["servingGeneration"] != broken


# ---------------------------------------------------------------- 8. progress deadline without startedAt

def test_the_progress_deadline_holds_when_the_start_was_never_recorded(monkeypatch):
    m = Model()
    m.image("1.2.1")

    def unavailable(*a, **kw):
        raise ApiException(status=503)

    real = m.kube.patch_status
    m.kube.patch_status = unavailable
    assert m.r.reconcile("ns", "m").transient  # the status write failed: retried with backoff
    m.kube.patch_status = real
    m.kube.settle(ready=False, gen=[g for g in m.generations() if g != m.ro["servingGeneration"]][0])
    m.pass_()
    assert m.ro["startedAt"]
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 1e6 if ts else 0.0)
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and "progressDeadline" in m.ro["message"]


def test_time_paused_does_not_count_against_the_progress_deadline():
    m = Model()
    m.image("1.2.1")
    m.pass_()
    m.kube.settle(ready=False, gen=m.ro["targetGeneration"])
    m.edit(lambda s: s.setdefault("rollout", {}).__setitem__("paused", True))
    m.pass_()
    assert m.ro["phase"] == "Paused"
    m.ro["startedAt"] = iso(3600)  # paused for an hour
    m.edit(lambda s: s["rollout"].__setitem__("paused", False))
    m.pass_()
    assert m.ro["phase"] == "Progressing", m.ro["message"]


# ---------------------------------------------------------------- 9. PairwiseSwap re-spec

def mid_pairwise_swap(gpus: int):
    """A Model three replicas per tier wide in the middle of a PairwiseSwap to image 1.2.1: schedulers
    route to both generations. Returns (model, serving generation, new generation)."""
    m = Model(gpus=gpus, mutate=pairwise_swap(3))
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    for _ in range(4):
        m.pass_()
        m.kube.settle()
    g1 = m.ro["targetGeneration"]
    assert m.ro["swap"]["generation"] == g1  # schedulers route to both
    return m, g0, g1


def pairwise_swap(replicas: int):
    """A Model `mutate`: the PairwiseSwap strategy, `replicas` in each tier (room to scale to 4)."""
    def mutate(s):
        s["rollout"] = {"strategy": "PairwiseSwap"}
        for t in ("prefill", "decode"):
            s[t].update(minReplicas=1, maxReplicas=4, replicas=replicas)

    return mutate


def test_a_pairwise_swap_is_not_blamed_for_a_replica_of_the_old_generation_that_was_already_down(monkeypatch):
    """One old decode pod NotReady (a bad node): each step still waits for the old generation's scale-down
    to finish, but not for that pod, so the healthy new generation is not rolled back at the deadline."""
    m = Model(gpus=4, mutate=pairwise_swap(3))
    g0 = m.ro["servingGeneration"]

    def degrade_old():
        sts = m.kube.objs[("StatefulSet", "ns", f"m-decode-{g0}")]
        n = sts["spec"]["replicas"]
        sts["status"].update(readyReplicas=n - 1, availableReplicas=n - 1)

    # Every step that was already waiting at the start of a pass is past every deadline: a step not done
    # by the next pass after its StatefulSets settled is rolled back.
    stamps = (f"2026-01-01T00:00:{i:02d}Z" for i in range(60))
    earlier: set[str] = set()
    monkeypatch.setattr(rollout_pass, "_now", lambda: next(stamps))
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 1e6 if ts in earlier else 0.0)
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)
    m.image("1.2.1")
    g1 = None
    for _ in range(20):
        earlier.update(str(v) for v in m.ro.values() if isinstance(v, str))
        m.pass_()
        g1 = g1 or m.ro["targetGeneration"]
        assert m.ro["phase"] != "RolledBack", m.ro
        if m.ro["servingGeneration"] == g1:
            break
        m.kube.settle()
        if g0 in m.generations():
            degrade_old()
    assert m.ro["servingGeneration"] == g1 and m.replicas(g1) == {"prefill": 3, "decode": 3}, m.ro


def test_a_respec_mid_pairwise_swap_records_the_full_size_to_restore():
    m, g0, _ = mid_pairwise_swap(gpus=4)
    assert m.replicas(g0)["prefill"] < 3  # mid-swap: the serving generation shrank
    m.image("1.2.2")
    m.pass_(2)  # the abandoned generation is deleted on the pass after schedulers stop routing to it
    m.kube.settle()
    assert m.ro["swap"]["prefillReplicas"] == 3 and m.ro["swap"]["decodeReplicas"] == 3, m.ro["swap"]
    rollout.probe_handoffs = lambda p, d, mm, timeout=20.0: (False, "handoff failed")
    for _ in range(3):
        m.pass_()
        m.kube.settle()
    assert m.ro["phase"] == "RolledBack" and m.replicas(g0) == {"prefill": 3, "decode": 3}


@pytest.mark.parametrize("strategy", ["PairwiseSwap", "AtomicGeneration"])
def test_an_edit_mid_pairwise_swap_is_not_reported_as_a_failure(strategy):
    """Another engine change while a swap serves both generations ends the swap (routing first, the serving
    generation's size back), but nothing failed: no RolledBack phase, Warning or condition, not Stalled."""
    m, g0, g1 = mid_pairwise_swap(gpus=8)
    m.edit(lambda s: (s["rollout"].update(strategy=strategy), s["engine"].update(image=IMAGE + "1.2.2")))
    m.pass_()
    g2 = m.ro["targetGeneration"]
    assert m.ro["phase"] != "RolledBack" and f"rollout of generation {g1} is abandoned" in m.ro["message"], m.ro
    assert m.ro["swap"]["generation"] == "" and g1 in m.generations() and m.replicas(g0) == {"prefill": 3, "decode": 3}
    assert not m.warnings() and m.cond("Stalled").get("status") != "True", m.warnings()
    assert m.cond("RolloutSucceeded").get("reason") != "RolledBack" and m.ro["failedGeneration"] == ""
    assert any(e[:2] == ("Normal", "Abandoned") for e in m.kube.events)
    m.pass_()
    assert g1 not in m.generations() and m.ro["targetGeneration"] == g2 and m.ro["phase"] != "RolledBack"


def test_a_respec_to_atomic_mid_pairwise_swap_stops_routing_to_the_abandoned_generation_before_deleting_it():
    """The strategy goes back to AtomicGeneration with another engine change while a swap serves both
    generations: status stops routing to the swap's generation and restores the serving one's size in one
    pass, and the abandoned generation is deleted only on the next."""
    m, g0, g1 = mid_pairwise_swap(gpus=8)
    assert m.replicas(g0)["prefill"] < 3
    m.edit(lambda s: (s["rollout"].update(strategy="AtomicGeneration"), s["engine"].update(image=IMAGE + "1.2.2")))
    m.kube.log.clear()
    m.pass_()
    assert m.ro["swap"]["generation"] == "" and m.ro["targetGeneration"] not in ("", g1)
    assert g1 in m.generations(), "deleted while schedulers still routed to it"
    assert m.replicas(g0) == {"prefill": 3, "decode": 3} and m.ro["failedGeneration"] == ""
    m.pass_()
    assert g1 not in m.generations()


def test_going_back_to_atomic_mid_pairwise_swap_gives_the_generation_a_fresh_deadline():
    """A swap that has been stepping for longer than progressDeadline (each step within it) is taken over by
    AtomicGeneration (the same generation, now room for a full one): the generation grows to full size
    against a deadline that starts then, not when the swap began."""
    m, g0, g1 = mid_pairwise_swap(gpus=8)
    m.obj["status"]["rollout"]["startedAt"] = iso(20 * 60)  # the swap began 20 minutes ago (progressDeadline 15m)
    m.edit(lambda s: s["rollout"].__setitem__("strategy", "AtomicGeneration"))
    m.pass_()
    assert m.ro["phase"] == "Progressing" and m.ro["targetGeneration"] == g1, m.ro
    m.kube.settle()
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == g1, m.ro
    assert m.replicas(g1) == {"prefill": 3, "decode": 3} and not m.warnings(), m.warnings()


# ---------------------------------------------------------------- 10. rollback annotation while draining

def test_the_rollback_annotation_works_while_draining_and_switches_back_before_deleting():
    m = Model()
    old = m.ro["servingGeneration"]
    new = m.switch("1.2.1")
    m.kube.log.clear()
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == old and "rollback requested" in m.ro["message"]
    m.pass_()
    assert new not in m.generations()
    first_delete = next(i for i, (what, _) in enumerate(m.kube.log) if what == "delete")
    assert ("status", old) in m.kube.log[:first_delete], m.kube.log


def test_rollout_succeeded_appears_with_the_first_generation_rollout_only(monkeypatch):
    m = Model()
    assert not m.cond("RolloutSucceeded")  # a first deployment is not a rollout
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)
    m.switch("1.2.1")
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 3600.0 if ts else 0.0)
    m.pass_()
    assert m.ro["phase"] == "Serving" and m.cond("RolloutSucceeded")["status"] == "True"


# ---------------------------------------------------------------- 11. the scheduler config follows the serving generation

def scheduler_config(m):
    return yaml.safe_load(m.kube.objs[("ConfigMap", "ns", "m-scheduler")]["data"]["config.yaml"])


def generation_bound(m):
    c = scheduler_config(m)
    return c["model"], c["runtime"], c["routing"]["kvTransferCompression"]


def rename_and_retune(s):
    """A new generation (model name, KV transfer compression) and a routing setting, in one edit."""
    s["model"]["name"] = "llama-3.1-8b"
    s["engine"]["kvTransfer"] = {**(s["engine"].get("kvTransfer") or {}), "compression": "fp8"}
    s["scheduler"]["localPrefillBelowTokens"] = 512


def test_a_blocked_rollout_keeps_the_serving_generations_model_name_in_the_scheduler_config():
    m = Model(gpus=1)  # no room for a second generation
    old = m.ro["servingGeneration"]
    assert generation_bound(m) == ("llama-3-8b", "trtllm-serve", "none")
    m.edit(rename_and_retune)
    m.pass_(2)
    assert m.ro["phase"] == "BlockedOnCapacity" and m.ro["servingGeneration"] == old, m.ro
    # Clients' model name keeps working while the old generation serves; routing settings apply at once.
    assert generation_bound(m) == ("llama-3-8b", "trtllm-serve", "none")
    assert scheduler_config(m)["routing"]["localPrefillBelowTokens"] == 512
    # The capacity frees up: the new name reaches the scheduler with the switch, not before.
    m.kube.nodes = [node("p1", "prefill-h100", 8), node("d1", "decode-l40s", 8), node("s", "system", 0)]
    m.pass_()
    assert m.ro["phase"] == "Progressing" and generation_bound(m)[0] == "llama-3-8b"
    m.kube.settle()
    m.kube.log.clear()
    applied = []
    apply = m.kube.apply
    m.kube.apply = lambda obj, dry_run=False: (applied.append((obj["kind"], dry_run)), apply(obj, dry_run))[1]
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] != old, m.ro
    assert generation_bound(m) == ("llama-3.1-8b", "trtllm-serve", "fp8")
    assert ("ConfigMap", False) in applied and m.kube.log[-1][0] == "status"  # same pass as the switch


def test_a_rollback_after_the_switch_restores_the_old_model_name_with_the_traffic():
    m = Model()
    old = m.ro["servingGeneration"]
    m.edit(lambda s: s["model"].__setitem__("name", "llama-3.1-8b"))
    m.pass_()
    m.kube.settle()
    m.pass_()
    assert m.ro["phase"] == "Draining" and generation_bound(m)[0] == "llama-3.1-8b", m.ro
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == old, m.ro
    assert generation_bound(m)[0] == "llama-3-8b"
    m.pass_(2)  # the failed generation deleted, the spec still names it: the old name stays
    assert m.ro["servingGeneration"] == old and generation_bound(m)[0] == "llama-3-8b"


def test_a_rollback_switches_traffic_back_even_when_the_scheduler_config_is_refused():
    """A policy refuses the scheduler ConfigMap with the old model name (422) when the new generation is rolled
    back: traffic still goes back (status written, and before the failed generation is deleted), the model
    is Stalled on the refusal, and the scheduler config follows once the policy lets it."""
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.edit(lambda s: s["model"].__setitem__("name", "llama-3.1-8b"))
    m.pass_()
    m.kube.settle()
    m.pass_()
    g1 = m.ro["servingGeneration"]
    assert m.ro["phase"] == "Draining" and g1 != g0
    m.kube.fail_apply = lambda o: 422 if o["metadata"]["name"] == "m-scheduler" and "llama-3-8b" in str(o.get("data")) else None
    m.kube.log.clear()
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0, m.ro
    assert f"generation {g1} rolled back" in m.cond("RollbackRequestHandled")["message"]
    assert m.cond("Stalled")["reason"] == "ApplyFailed" and g1 in m.generations()
    m.pass_()
    assert m.ro["servingGeneration"] == g0 and g1 in m.generations()  # nothing more while refused
    assert m.kube.log[0] == ("status", g0), m.kube.log
    m.kube.fail_apply = None
    m.pass_(2)
    assert m.generations() == [g0] and m.ro["servingGeneration"] == g0 and generation_bound(m)[0] == "llama-3-8b"


def test_a_pairwise_swap_serves_the_old_model_name_until_the_final_switch():
    m = Model(gpus=3, mutate=pairwise_swap(2))
    old = m.ro["servingGeneration"]
    m.edit(lambda s: s["model"].__setitem__("name", "llama-3.1-8b"))
    both_served = False
    for _ in range(20):
        m.pass_()
        m.kube.settle()
        if m.ro["servingGeneration"] != old:
            break
        both_served |= bool(m.ro["swap"]["generation"])
        assert generation_bound(m)[0] == "llama-3-8b", m.ro  # both serve: the name clients use until the switch
    assert both_served and m.ro["phase"] == "Draining", m.ro
    assert generation_bound(m)[0] == "llama-3.1-8b"


def test_a_generation_rendered_without_the_annotation_keeps_the_live_scheduler_config():
    """StatefulSets of an operator from before the annotation: the live ConfigMap (rendered while that
    generation served) says what the scheduler must keep."""
    m = Model(gpus=1)
    for key, obj in m.kube.objs.items():
        if key[0] == "StatefulSet":
            obj["metadata"].get("annotations", {}).pop("baton.dev/scheduler-config", None)
    m.edit(lambda s: s["model"].__setitem__("name", "llama-3.1-8b"))
    m.pass_(2)
    assert m.ro["phase"] == "BlockedOnCapacity" and generation_bound(m)[0] == "llama-3-8b"


# ---------------------------------------------------------------- 12. a revert during the drain

@pytest.mark.parametrize("failure", ["annotation", "lost readiness"])
def test_a_rollback_after_a_revert_during_the_drain_returns_to_the_generation_that_served(failure):
    m = Model()
    g0 = m.ro["servingGeneration"]
    g1 = m.switch("1.2.1")
    m.image("1.2.0")  # a GitOps revert while g1 drains: g0 is switched to again
    m.pass_()
    assert m.ro["servingGeneration"] == g0 and m.ro["previousGeneration"] == g1, m.ro
    assert m.ro["lastKnownGood"]["generation"] == g1
    if failure == "annotation":
        m.annotate(ANNOTATION_ROLLBACK, "true")
    else:
        m.kube.settle(ready=False, gen=g0)
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g1 and m.ro["failedGeneration"] == g0, m.ro
    assert m.generations() == sorted([g0, g1])  # g0 goes only after the status write that moved traffic
    m.pass_()
    assert m.generations() == [g1] and m.replicas(g1) == {"prefill": 1, "decode": 1}
    assert m.cond("Ready")["status"] == "True" and m.obj["status"]["revision"] == g1


def rolled_back_while_an_older_generation_drains(monkeypatch) -> tuple[Model, str, str, str]:
    """g1 serves and g0 still drains (requests in flight) when the engine changes again and g2 fails its
    probe: rolled back onto g1, with g0 still draining. (model, g0, g1, g2)."""
    m = Model()
    g0 = m.ro["servingGeneration"]
    g1 = m.switch("1.2.1")
    m.image("1.2.2")
    m.pass_()
    g2 = m.ro["targetGeneration"]
    monkeypatch.setattr(rollout, "probe_handoffs", lambda p, d, mm, timeout=20.0: (False, "handoff failed"))
    m.kube.settle(gen=g2)
    m.pass_(3)
    return m, g0, g1, g2


def test_a_rollback_of_the_next_generation_lets_the_older_one_still_draining_finish(monkeypatch):
    """g1 serves, g0 still drains (requests in flight) when the engine changes again and g2 fails: g0 is not
    cut off with its requests, but drained like any previous generation (once idle, or at drainTimeout)."""
    m, g0, g1, g2 = rolled_back_while_an_older_generation_drains(monkeypatch)
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g1 and m.ro["failedGeneration"] == g2
    assert m.generations() == sorted([g0, g1]) and m.ro["previousGeneration"] == g0, m.ro
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)  # g0's last request finished
    m.pass_()
    assert m.generations() == [g1] and m.ro["previousGeneration"] == "" and m.ro["servingGeneration"] == g1
    assert any(e[:2] == ("Normal", "Drained") and g0 in e[2] for e in m.kube.events), m.kube.events


# ---------------------------------------------------------------- 13. scaling while another generation is targeted

def test_scaling_while_rolled_back_reaches_the_serving_generation():
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    m.pass_()
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack"
    m.edit(lambda s: s["decode"].__setitem__("replicas", 4))  # kubectl scale dm / an HPA
    m.pass_()
    assert m.replicas(g0) == {"prefill": 1, "decode": 4}
    assert m.obj["status"]["decode"]["replicas"] == 4 and m.cond("Ready")["status"] == "False"  # 4 asked, 1 ready
    assert "only the spec's replica counts reach it" in m.cond("RolloutSucceeded")["message"]
    m.kube.settle()
    m.pass_()
    assert m.obj["status"]["decode"]["summary"] == "4/4" and m.cond("Ready")["status"] == "True"
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0


def test_scaling_while_blocked_on_capacity_reaches_the_serving_generation():
    m = Model(gpus=1)
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    m.pass_()
    m.edit(lambda s: s["decode"].update(replicas=0, minReplicas=0))
    m.pass_()
    assert m.ro["phase"] == "BlockedOnCapacity" and m.replicas(g0) == {"prefill": 1, "decode": 0}
    assert m.obj["status"]["decode"]["replicas"] == 0
    m.kube.settle()
    m.pass_()
    assert m.ro["phase"] == "BlockedOnCapacity" and m.cond("Ready")["status"] == "True"
    assert "only the spec's replica counts reach it" in m.cond("Reconciling")["message"]


# ---------------------------------------------------------------- 14. a retry judges only its own requests

def test_a_retried_generation_is_judged_on_the_requests_after_its_switch(monkeypatch):
    counters = {}  # the schedulers' counters: per generation, from the scheduler's start, never reset
    monkeypatch.setattr(rollout, "read_schedulers",
                        lambda schedulers, optional=(), timeout=2.0: rollout.SchedulerReadout(outcomes=copy.deepcopy(counters)))
    m = Model()
    g1 = m.switch("1.2.1")
    counters[g1] = {"failed": 15, "completed": 10}
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and "15 of 25" in m.ro["message"]
    m.pass_()
    m.annotate(ANNOTATION_RETRY, g1)
    m.pass_()
    m.kube.settle()
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == g1
    # counted from the counters at the switch: none since
    assert m.ro["errorRate"] == {"generation": g1, "failed": 0, "total": 0, "failedAtSwitch": 15, "totalAtSwitch": 25}
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == g1, m.ro["message"]
    counters[g1] = {"failed": 15, "completed": 40}  # 30 more, all completed
    m.pass_()
    assert m.ro["phase"] == "Draining" and "0 of 30 request(s)" in m.ro["message"]
    assert (m.ro["errorRate"]["failed"], m.ro["errorRate"]["total"]) == (0, 30)
    counters[g1] = {"failed": 35, "completed": 40}  # then 20 failures of 50
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and "20 of 50" in m.ro["message"]
    assert (m.ro["errorRate"]["failed"], m.ro["errorRate"]["total"]) == (20, 50)


# ---------------------------------------------------------------- 15. a pairwise rollback stops routing first

def test_a_pairwise_swap_rollback_stops_routing_to_the_new_generation_before_deleting_it():
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["swap"]["generation"] == ""
    assert g1 in m.generations() and m.replicas(g0) == {"prefill": 3, "decode": 3}  # deleted after that write
    m.pass_()
    assert m.generations() == [g0]


# ---------------------------------------------------------------- 15b. a GitOps revert mid-swap, a rollback after a scale

ORIGINAL_IMAGE = yaml.safe_load(EXAMPLE.read_text())["spec"]["engine"]["image"]


def log_swap_writes(m):
    """Also log, after each status write, the swap generation schedulers route to from then on."""
    write = m.kube.patch_status

    def patch_status(ns, name, status, **kwargs):
        write(ns, name, status, **kwargs)
        m.kube.log.append(("swap", m.ro.get("swap", {}).get("generation", "")))

    m.kube.patch_status = patch_status


def test_a_gitops_revert_mid_pairwise_swap_stops_routing_to_the_new_generation_before_deleting_it():
    """The image is reverted in Git while a swap serves both generations (the old one at 1 replica per tier,
    the new one at 2): the status write that clears swap.generation comes first, the old generation goes
    back to the spec's 3 replicas per tier, and the new one is deleted only on a later pass."""
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    assert m.replicas(g0) == {"prefill": 1, "decode": 1} and m.replicas(g1) == {"prefill": 2, "decode": 2}
    log_swap_writes(m)
    m.kube.log.clear()
    m.edit(lambda s: s["engine"].__setitem__("image", ORIGINAL_IMAGE))  # the revert commit
    m.pass_()
    assert g1 in m.generations(), f"deleted while schedulers still routed to it: {m.kube.log}"
    assert m.ro["servingGeneration"] == g0 and m.ro["swap"]["generation"] == "", m.ro
    assert not rollout_pass._swap_sized(m.ro["swap"]), m.ro["swap"]
    assert m.replicas(g0) == {"prefill": 3, "decode": 3}
    m.pass_()
    assert m.generations() == [g0]
    first_delete = next(i for i, (what, name) in enumerate(m.kube.log) if what == "delete" and name.endswith(g1))
    assert ("swap", "") in m.kube.log[:first_delete] and ("swap", g1) not in m.kube.log, m.kube.log
    m.kube.settle()
    m.pass_()
    assert m.ro["phase"] == "Serving" and m.ro["targetGeneration"] == g0 and m.ro["failedGeneration"] == ""
    assert m.replicas(g0) == {"prefill": 3, "decode": 3} and m.cond("Ready")["status"] == "True"
    assert not m.warnings(), m.warnings()


def test_a_gitops_revert_mid_pairwise_swap_deletes_the_new_generation_while_an_older_one_drains():
    """The swap started while the generation before the serving one was still draining: the revert ends
    the swap the same way, and its generation does not wait for that drain (it holds GPUs the serving
    generation needs to grow back)."""
    m = Model(gpus=5, mutate=pairwise_swap(3))
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    for _ in range(12):
        m.pass_()
        m.kube.settle()
        if m.ro["phase"] == "Draining":
            break
    g1 = m.ro["servingGeneration"]
    assert g1 != g0 and m.ro["previousGeneration"] == g0, m.ro  # g0 drains (requests in flight)
    m.image("1.2.2")
    for _ in range(4):
        m.pass_()
        m.kube.settle()
    g2 = m.ro["targetGeneration"]
    assert m.ro["swap"]["generation"] == g2 and m.ro["previousGeneration"] == g0, m.ro
    log_swap_writes(m)
    m.kube.log.clear()
    m.image("1.2.1")  # back to the serving generation
    m.pass_()
    assert m.ro["servingGeneration"] == g1 and m.ro["swap"]["generation"] == "" and g2 in m.generations()
    assert m.replicas(g1) == {"prefill": 3, "decode": 3}
    m.pass_()
    assert m.generations() == sorted([g0, g1]) and m.ro["previousGeneration"] == g0  # g0 still drains
    first_delete = next(i for i, (what, name) in enumerate(m.kube.log) if what == "delete" and name.endswith(g2))
    assert ("swap", "") in m.kube.log[:first_delete], m.kube.log


def test_a_pairwise_rollback_after_a_mid_swap_scale_down_restores_the_spec_size_directly():
    """decode is scaled from 3 to 2 mid-swap, then the swap is rolled back: the old generation's decode
    goes from 1 straight to 2 replicas (the spec), never up to the 3 recorded before the swap and down."""
    m, g0, _ = mid_pairwise_swap(gpus=4)
    m.edit(lambda s: s["decode"].__setitem__("replicas", 2))
    m.pass_()
    m.kube.settle()
    assert m.replicas(g0) == {"prefill": 1, "decode": 1} and m.ro["swap"]["decodeReplicas"] == 3
    sizes = []
    scale = m.kube.scale

    def record(kind, ns, name, replicas):
        sizes.append((name, replicas))
        return scale(kind, ns, name, replicas)

    m.kube.scale = record
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.replicas(g0) == {"prefill": 3, "decode": 2}
    for _ in range(2):
        m.pass_()
        m.kube.settle()
    assert m.generations() == [g0] and m.replicas(g0) == {"prefill": 3, "decode": 2}
    assert [n for name, n in sizes if name == f"m-decode-{g0}"] == [2], sizes
    assert [n for name, n in sizes if name == f"m-prefill-{g0}"] == [3], sizes


# ---------------------------------------------------------------- 16. a tier at 0 replicas

@pytest.mark.parametrize("strategy", ["AtomicGeneration", "PairwiseSwap"])
def test_a_rollout_with_a_tier_at_zero_replicas_skips_the_probe_and_switches(strategy, engines):
    def mutate(s):
        s["prefill"].update(minReplicas=0, replicas=0)
        s["rollout"] = {"strategy": strategy}

    m = Model(mutate=mutate)
    g0 = m.ro["servingGeneration"]
    probes = len(engines)
    m.image("1.2.1")
    for _ in range(4):
        m.pass_()
        m.kube.settle()
    g1 = m.ro["servingGeneration"]
    assert m.ro["phase"] == "Draining" and g1 != g0, m.ro
    assert m.ro["probe"]["passed"] and "0 prefill replicas" in m.ro["probe"]["message"] and len(engines) == probes
    assert m.replicas(g1) == {"prefill": 0, "decode": 1}


def swap_to_the_end(m, old):
    """Passes (each followed by the StatefulSets settling) until the swap's final switch or a rollback."""
    for _ in range(20):
        m.pass_()
        m.kube.settle()
        if m.ro["servingGeneration"] != old or m.ro["phase"] == "RolledBack":
            break


def test_a_pass_cut_short_between_creating_the_two_tiers_of_a_swap_does_not_fail_it():
    """A transient API error (or an operator restart) right after the new generation's prefill StatefulSet
    was created: the next pass creates the decode one with its surge replica, and the swap goes on."""
    m = Model(gpus=5, mutate=pairwise_swap(3))
    g0 = m.ro["servingGeneration"]
    failures = {"n": 1}

    def once(obj):
        name = obj["metadata"]["name"]
        if obj["kind"] == "StatefulSet" and name.startswith("m-decode-") and not name.endswith(g0) and failures["n"]:
            failures["n"] -= 1
            return 500
        return None

    m.kube.fail_apply = once
    m.image("1.2.1")
    m.pass_()
    assert failures["n"] == 0 and len(m.generations()) == 2  # prefill created, decode not
    m.kube.fail_apply = None
    swap_to_the_end(m, g0)
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] != g0, m.ro
    assert m.replicas(m.ro["servingGeneration"]) == {"prefill": 3, "decode": 3} and not m.warnings(), m.warnings()


def test_scaling_a_tier_up_from_zero_mid_swap_does_not_fail_the_swap():
    def mutate(s):
        s["rollout"] = {"strategy": "PairwiseSwap"}
        s["prefill"].update(minReplicas=0, maxReplicas=4, replicas=0)
        s["decode"].update(minReplicas=1, maxReplicas=4, replicas=3)

    m = Model(gpus=5, mutate=mutate)
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    for _ in range(3):
        m.pass_()
        m.kube.settle()
    assert m.ro["phase"] == "Swapping" and m.ro["swap"]["generation"], m.ro
    m.edit(lambda s: s["prefill"].__setitem__("replicas", 1))  # an autoscaler wakes prefill up
    swap_to_the_end(m, g0)
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] != g0, m.ro
    assert m.replicas(m.ro["servingGeneration"]) == {"prefill": 1, "decode": 3} and not m.warnings(), m.warnings()
    assert m.ro["probe"]["passed"] and m.ro["probe"]["message"] == "ok"  # probed through the prefill replica


# ---------------------------------------------------------------- 17. PairwiseSwap chosen mid-rollout

def test_switching_to_pairwise_swap_mid_rollout_never_shrinks_the_old_generation_unrecorded():
    def three(s):
        for t in ("prefill", "decode"):
            s[t].update(minReplicas=1, maxReplicas=4, replicas=3)

    m = Model(gpus=6, mutate=three)
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    m.pass_()
    g1 = m.ro["targetGeneration"]
    assert m.ro["phase"] == "Progressing" and m.replicas(g1) == {"prefill": 3, "decode": 3}
    m.edit(lambda s: s.setdefault("rollout", {}).__setitem__("strategy", "PairwiseSwap"))
    for _ in range(4):
        m.kube.settle()
        m.pass_()
        assert m.replicas(g0) == {"prefill": 3, "decode": 3}, m.ro  # the new one already has every replica
    assert m.ro["phase"] == "Draining" and m.ro["swap"]["prefillReplicas"] == 3 and m.ro["swap"]["decodeReplicas"] == 3
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    m.kube.settle()
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0
    assert m.generations() == [g0] and m.replicas(g0) == {"prefill": 3, "decode": 3}


# ---------------------------------------------------------------- 18. the phases the API documents

def test_the_documented_rollout_phases_are_the_ones_the_code_sets():
    from baton.api.v1alpha1 import RolloutStatus

    phases = set(re.findall(r'_phase\("(\w+)"', Path(rollout_pass.__file__).read_text()))
    described = RolloutStatus.model_fields["phase"].description
    assert {"Serving", "Swapping", "RolledBack"} <= phases
    assert [p for p in sorted(phases) if p not in described] == [] and "Probing" not in described, described


# ---------------------------------------------------------------- 19. a refused spec during the drain

@pytest.mark.parametrize("refused", ["InvalidSpec", "ApplyFailed"])
def test_a_refused_edit_while_draining_keeps_the_rollback_protection(refused):
    m = Model()
    g0 = m.ro["servingGeneration"]
    g1 = m.switch("1.2.1")
    if refused == "InvalidSpec":
        m.edit(lambda s: s["engine"].__setitem__("env", [{"name": "POD_IP", "value": "1.2.3.4"}]))
    else:
        m.kube.fail_apply = lambda o: 422 if o["kind"] == "Deployment" and not o["metadata"].get("uid") else None
        m.edit(lambda s: s["scheduler"].__setitem__("replicas", 2))
    m.pass_()
    assert m.cond("Stalled")["reason"] == refused and m.ro["phase"] == "Draining"
    m.kube.settle(ready=False, gen=g1)  # the new generation fails within its rollback window
    m.pass_()
    assert m.cond("Stalled")["reason"] == refused
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0 and m.ro["failedGeneration"] == g1
    assert g0 in m.generations() and m.replicas(g0) == {"prefill": 1, "decode": 1}



def test_a_refused_edit_after_the_user_moved_on_does_not_reopen_a_closed_rollback_window(monkeypatch):
    """g1 serves and g0 still drains when the engine changes again (g2): the user chose a newer generation,
    so g1's rollback window is over (it is the last known-good) and g2 failing rolls back onto g1. A refused
    edit now must not judge g1 by its window and send traffic back to g0, which only drains."""
    m, g0, g1, _ = rolled_back_while_an_older_generation_drains(monkeypatch)
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g1 and m.ro["previousGeneration"] == g0
    m.edit(lambda s: s["engine"].__setitem__("env", [{"name": "POD_IP", "value": "1.2.3.4"}]))
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.cond("Stalled")["reason"] == "InvalidSpec"
    assert m.ro["servingGeneration"] == g1, m.ro  # not back on the draining g0
    assert g1 in m.generations()


def test_the_rollback_annotation_works_while_a_refused_edit_is_stalled():
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.switch("1.2.1")
    m.edit(lambda s: s["engine"].__setitem__("env", [{"name": "POD_IP", "value": "1.2.3.4"}]))
    m.pass_()
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0
    assert m.cond("RollbackRequestHandled")["status"] == "True" and m.cond("Stalled")["reason"] == "InvalidSpec"


def test_the_rollback_annotation_ends_a_pairwise_swap_while_a_refused_edit_is_stalled():
    """Both generations serve mid-swap when an edit is refused: a rollback asked for then stops the routing
    to the swap's generation and gives the serving one its replicas back, as without the refused edit; the
    swap's generation is deleted once a spec is accepted, and fixing the spec does not undo the rollback."""
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    m.edit(lambda s: s["engine"].__setitem__("env", [{"name": "POD_IP", "value": "1.2.3.4"}]))
    m.pass_()
    assert m.cond("Stalled")["reason"] == "InvalidSpec" and m.ro["swap"]["generation"] == g1
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["swap"]["generation"] == "" and m.ro["servingGeneration"] == g0, m.ro
    assert m.replicas(g0) == {"prefill": 3, "decode": 3} and m.cond("Stalled")["reason"] == "InvalidSpec"
    assert f"generation {g1} rolled back" in m.cond("RollbackRequestHandled")["message"]
    m.edit(lambda s: s["engine"].__setitem__("env", []))  # the spec fixed
    m.pass_()
    m.kube.settle()
    m.pass_()
    assert m.generations() == [g0] and m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0, m.ro
    assert m.replicas(g0) == {"prefill": 3, "decode": 3} and m.cond("Ready")["status"] == "True"


def test_a_rollback_asked_for_while_stalled_with_nothing_draining_is_answered_not_kept_for_later():
    """Nothing to roll back (no switched generation drains, the spec is refused): the request is answered
    at once, visibly, instead of waiting unseen to abort the next valid rollout."""
    m = Model()
    g0 = m.ro["servingGeneration"]
    m.edit(lambda s: s["engine"].__setitem__("env", [{"name": "POD_IP", "value": "1.2.3.4"}]))
    m.pass_()
    assert m.cond("Stalled")["reason"] == "InvalidSpec"
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    handled = m.cond("RollbackRequestHandled")
    assert handled["status"] == "True" and "nothing to roll back" in handled["message"], handled
    m.edit(lambda s: s["engine"].__setitem__("env", []))  # the spec fixed, and a new engine shipped
    m.image("1.2.1")
    m.pass_()
    assert m.ro["phase"] == "Progressing" and m.ro["servingGeneration"] == g0, m.ro


# ---------------------------------------------------------------- a refused child changes nothing

def test_an_in_place_edit_with_one_refused_child_changes_no_shared_object_either():
    """The tier Services and the scheduler are in the same all-or-nothing batch as the generation's
    StatefulSets: a port change with an env entry the API server refuses leaves the scheduler's config and
    the Services on the old port, as the Stalled condition's "nothing changed" says."""
    m = Model()
    before = {k: json.dumps(o, sort_keys=True) for k, o in m.kube.objs.items() if k[0] in ("Service", "ConfigMap", "Deployment")}
    m.edit(lambda s: s["prefill"].update(port=9000, podTemplate={"env": [{"name": "BROKEN", "valueFrom": {}}]}))
    m.kube.fail_apply = lambda o: 422 if o["kind"] == "StatefulSet" else None
    m.pass_()
    assert m.cond("Stalled")["status"] == "True" and m.cond("Stalled")["reason"] == "ApplyFailed"
    after = {k: json.dumps(o, sort_keys=True) for k, o in m.kube.objs.items() if k in before}
    assert after == before


def test_a_generation_that_failed_on_a_refused_child_is_tried_again_once_the_spec_is_fixed():
    """An engine change and an env entry the API server refuses, in one edit: the new generation is rolled
    back. Removing the env entry keeps the generation key, but changes what shapes its pods, so it is
    tried again (no retry annotation needed) and rolls out."""
    def broken(o):
        if o["kind"] != "StatefulSet":
            return None
        env = o["spec"]["template"]["spec"]["containers"][0]["env"]
        return 422 if any(e.get("name") == "BROKEN" for e in env) else None

    m = Model()
    g0 = m.ro["servingGeneration"]
    m.kube.fail_apply = broken

    def change(s):
        s["engine"]["image"] = IMAGE + "1.2.1"
        s["decode"]["podTemplate"] = {"env": [{"name": "BROKEN", "valueFrom": {}}]}

    m.edit(change)
    m.pass_()
    g1 = m.ro["failedGeneration"]
    assert m.ro["phase"] == "RolledBack" and g1 and m.ro["servingGeneration"] == g0
    m.pass_()
    assert m.ro["phase"] == "RolledBack"  # the same spec is not tried again
    m.edit(lambda s: s["decode"].__setitem__("podTemplate", {}))
    for _ in range(4):
        m.pass_()
        m.kube.settle()
    assert m.ro["failedGeneration"] == "" and m.ro["servingGeneration"] == g1, m.ro["message"]


def test_ready_says_why_pods_cannot_start():
    """A bad image or a pod the API server would not create: the Ready message names the pod, the
    container and the kubelet's or controller's reason, not only "waiting for decode 0/1"."""
    m = Model()
    m.edit(lambda s: s["engine"].update(env=[{"name": "NCCL_DEBUG", "value": "INFO"}]))  # in place: pods replaced
    m.pass_()
    m.kube.settle(ready=False)
    for key, pod in m.kube.objs.items():
        if key[0] == "Pod" and pod["metadata"]["labels"].get("baton.dev/tier") == "decode":
            pod["status"]["containerStatuses"] = [{"name": "engine", "state": {"waiting": {
                "reason": "ImagePullBackOff", "message": 'Back-off pulling image "nvcr.io/nvidia/tensorrt-llm/release:9.9"'}}}]
    deployment = next(o for k, o in m.kube.objs.items() if k[0] == "Deployment")
    deployment["status"]["conditions"] = [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                           "message": 'pods "m-scheduler-x" is forbidden: exceeded quota: compute'}]
    m.r._unschedulable.clear()  # the pod listing is cached for a few seconds
    m.pass_()
    message = m.cond("Ready")["message"]
    assert m.cond("Ready")["status"] == "False" and "waiting for" in message
    assert "engine ImagePullBackOff" in message and "release:9.9" in message
    assert "exceeded quota" in message



def test_a_model_gone_without_its_delete_event_ends_its_loop_and_leaves_nothing_behind():
    """A model deleted while the watch was down (its DELETED event never came): the next pass finds it
    gone, says so (the loop ends), and what passes remembered of it is dropped, so a model created again
    under the name does not see the old one's pod messages."""
    m = Model()
    m.r._unschedulable[("ns", "m")] = (time.monotonic(), (["m-decode-0: 0/3 nodes are available"], []))
    m.r._transient[("ns", "m")] = 3
    m.kube.objs.pop(("DisaggregatedModel", "ns", "m"))
    outcome = m.r.reconcile("ns", "m")
    assert outcome.gone
    assert ("ns", "m") not in m.r._unschedulable and ("ns", "m") not in m.r._transient


# ---------------------------------------------------------------- disruption budgets

def test_a_disruption_budget_the_api_server_refuses_is_a_warning_not_a_stalled_model():
    """The budgets protect what serves, they are not needed to serve: a policy or RBAC that refuses them
    leaves the model Ready and its rollouts running, with a Warning saying what to do."""
    m = Model()
    for key in [k for k in m.kube.objs if k[0] == "PodDisruptionBudget"]:
        del m.kube.objs[key]  # as before an operator upgrade, on a cluster that refuses budgets
    attempts = []
    m.kube.fail_apply = lambda o: attempts.append(o["kind"]) or (403 if o["kind"] == "PodDisruptionBudget" else None)
    m.edit(lambda spec: spec["decode"].__setitem__("replicas", 2))  # and the model's own changes go on
    m.pass_()
    m.kube.settle()
    m.pass_()
    assert m.cond("Ready")["status"] == "True" and m.cond("Stalled")["status"] == "False"
    assert m.obj["status"]["decode"]["summary"] == "2/2"
    warnings = [e for e in m.kube.events if e[0] == "Warning"]
    assert len(warnings) == 1 and warnings[0][1] == "DisruptionBudgetNotApplied"
    assert all(f"PodDisruptionBudget/m-{c}" in warnings[0][2] for c in ("prefill", "decode", "scheduler"))
    assert "operator.disruptionBudgets" in warnings[0][2]
    assert not any(k[0] == "PodDisruptionBudget" for k in m.kube.objs)
    tried = attempts.count("PodDisruptionBudget")
    m.pass_(2)  # settled: the refused budgets are not tried again each pass, nor the Warning posted again
    assert attempts.count("PodDisruptionBudget") == tried
    assert len([e for e in m.kube.events if e[0] == "Warning"]) == 1
    m.kube.fail_apply = None
    m.r.child_list_seconds = 0  # a child-listing period later they are tried again: allowed now, applied
    m.pass_()
    assert {k[2] for k in m.kube.objs if k[0] == "PodDisruptionBudget"} == {"m-prefill", "m-decode", "m-scheduler"}


def test_the_previous_generation_stays_while_a_scheduler_has_requests_on_it_that_its_engines_do_not_report(monkeypatch):
    """trtllm-serve's /metrics may answer [] while a long request runs (it hands out iteration records since
    the last read, or a buffer only its own collector fills) and Triton has no such records: what the
    schedulers count on the old replicas keeps the previous generation until they end (or drainTimeout)."""
    m = Model()
    m.edit(lambda s: s.setdefault("rollout", {}).update({"drainTimeout": "10m", "rollbackWindow": "5s"}))
    m.pass_()
    old = m.ro["servingGeneration"]
    m.switch("1.2.1")
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 60.0 if ts else 0.0)  # past the window, within the timeout
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)  # the engines say nothing
    old_decode = f"10.0.0.0:{m.obj['spec']['decode'].get('port', 8000)}"  # the old decode tier's first pod
    seen = []

    def read_schedulers(schedulers, optional=(), timeout=2.0):
        seen.append(list(schedulers))
        return rollout.SchedulerReadout(in_flight={old_decode: 1})

    monkeypatch.setattr(rollout, "read_schedulers", read_schedulers)
    m.pass_()
    assert seen and m.ro["phase"] == "Draining" and old in m.generations(), m.ro
    assert "drains (0 request" not in m.ro["message"] and "request(s) in flight" in m.ro["message"], m.ro
    monkeypatch.setattr(rollout, "read_schedulers", lambda schedulers, optional=(), timeout=2.0: rollout.SchedulerReadout())  # it ended
    m.pass_()
    assert m.ro["phase"] == "Serving" and old not in m.generations() and "drained" in m.ro["message"], m.ro


def test_the_previous_generation_stays_while_a_scheduler_does_not_answer_and_goes_at_the_drain_timeout(monkeypatch):
    """A scheduler that does not answer /metrics (busy, restarting) may have requests on the old generation that
    nothing else shows: in flight is unknown, so the generation stays until drainTimeout, not a moment less."""
    m = Model()
    m.edit(lambda s: s.setdefault("rollout", {}).update({"drainTimeout": "10m", "rollbackWindow": "5s"}))
    m.pass_()
    old = m.ro["servingGeneration"]
    m.switch("1.2.1")
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 60.0 if ts else 0.0)  # past the window
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)
    monkeypatch.setattr(rollout, "read_schedulers",  # no answer
                        lambda schedulers, optional=(), timeout=2.0: rollout.SchedulerReadout(complete=False))
    m.pass_()
    assert m.ro["phase"] == "Draining" and old in m.generations(), m.ro
    assert "in flight unknown: a scheduler did not answer" in m.ro["message"], m.ro
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 601.0 if ts else 0.0)  # the drain timeout
    m.pass_()
    assert m.ro["phase"] == "Serving" and old not in m.generations(), m.ro
    assert "drain timeout reached with requests in flight unknown" in m.ro["message"], m.ro


def test_requests_on_an_old_pod_that_lost_readiness_still_keep_the_previous_generation(monkeypatch):
    """A pod of the draining generation that is no longer Ready may still run requests (a readiness flap): what
    the schedulers count on it keeps the generation."""
    m = Model()
    m.edit(lambda s: s.setdefault("rollout", {}).update({"drainTimeout": "10m", "rollbackWindow": "5s"}))
    m.pass_()
    old = m.ro["servingGeneration"]
    m.switch("1.2.1")
    for key, pod in m.kube.objs.items():  # every old pod loses readiness
        if key[0] == "Pod" and pod["metadata"]["labels"].get("baton.dev/generation") == old:
            pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 60.0 if ts else 0.0)
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: 0)
    asked = []

    def read_schedulers(schedulers, optional=(), timeout=2.0):
        return rollout.SchedulerReadout(in_flight={f"10.0.0.0:{m.obj['spec']['decode'].get('port', 8000)}": 1})

    def in_flight(engines, schedulers, engine_reads=True):
        asked.append(list(engines))
        return real_in_flight(engines, schedulers, engine_reads)
    real_in_flight = rollout.in_flight
    monkeypatch.setattr(rollout, "read_schedulers", read_schedulers)
    monkeypatch.setattr(rollout, "in_flight", in_flight)
    m.pass_()
    assert asked and asked[-1], "the old generation's unready pods were not asked about"
    assert m.ro["phase"] == "Draining" and old in m.generations(), m.ro


# ---------------------------------------------------------------- a model deleted and created again mid-pass

def _replaced_by(m, spec, uid="uid-B"):
    """`kubectl replace --force` (Argo CD Replace=true, Flux force, helm uninstall + install): the model is
    deleted and one of the same name created, with no status yet."""
    m.kube.objs[("DisaggregatedModel", "ns", "m")] = {
        "apiVersion": m.obj.get("apiVersion"), "kind": "DisaggregatedModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": uid, "generation": 1, "annotations": {},
                     "resourceVersion": "1"},
        "spec": copy.deepcopy(spec)}


def test_a_pass_whose_model_is_replaced_under_it_deletes_nothing_and_writes_nothing_into_the_new_model(monkeypatch):
    """A Draining pass of model A is reading the schedulers when A is replaced by B with A's previous spec (a
    GitOps revert by re-creation). A's loop is stopped (`handlers._stop_loop` sets its stop): the pass must not
    go on to delete the previous generation, which B is about to adopt, nor write A's rollout into B's status.
    B's own first pass then serves that generation."""
    import threading

    m = Model()
    x = m.ro["servingGeneration"]
    spec_x = copy.deepcopy(m.obj["spec"])
    y = m.switch("1.2.1")
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 120.0 if ts else 0.0)  # past the rollback window
    stop = threading.Event()

    def in_flight(engines, schedulers, engine_reads=True):  # the pass is reading /metrics when the model is replaced
        _replaced_by(m, spec_x)
        stop.set()
        return 0

    monkeypatch.setattr(rollout, "in_flight", in_flight)
    writes = m.kube.writes()
    outcome = m.r.reconcile("ns", "m", uid="model-uid", stop=stop)
    assert outcome.gone and m.kube.writes() == writes
    assert ("StatefulSet", "ns", f"m-prefill-{x}") in m.kube.objs and "status" not in m.obj
    # a pass of A's loop that starts after the replace is not B's either
    assert m.r.reconcile("ns", "m", uid="model-uid").gone and "status" not in m.obj
    monkeypatch.undo()
    outcome = m.r.reconcile("ns", "m", uid="uid-B")
    assert not outcome.failed and m.ro["servingGeneration"] == x, m.ro
    owners = m.kube.objs[("StatefulSet", "ns", f"m-decode-{x}")]["metadata"]["ownerReferences"]
    assert [o["uid"] for o in owners] == ["uid-B"] and y != x


def test_a_status_write_into_a_model_changed_since_the_pass_read_it_is_refused_and_the_pass_is_retried():
    """The status is written only into the model as the pass read it (its resourceVersion): a model changed
    meanwhile (an edit, or another object of the same name) gets no status computed from the old one."""
    m = Model()
    read = m.kube.get

    def get(kind, ns, name):
        obj = read(kind, ns, name)
        if kind == "DisaggregatedModel":
            m.kube._bump(m.obj)  # changed right after this pass read it
        return obj

    m.kube.get = get
    m.image("1.2.1")
    before = copy.deepcopy(m.obj.get("status"))
    outcome = m.r.reconcile("ns", "m")
    assert outcome.transient and m.obj.get("status") == before
    m.kube.get = read
    assert not m.r.reconcile("ns", "m").transient and m.ro["targetGeneration"] != m.ro["servingGeneration"]


def test_traffic_never_switches_back_to_a_generation_that_cannot_serve():
    """In the rollback window the previous generation lost its prefill StatefulSet (deleted by hand, or a
    deletion cut short) and its decode pods are down; then the new generation loses a replica's readiness.
    Switching back would leave no prefill tier at all: the new generation keeps serving, with a Warning."""
    m = Model()
    old = m.ro["servingGeneration"]
    new = m.switch("1.2.1")
    m.kube.objs.pop(("StatefulSet", "ns", f"m-prefill-{old}"))
    m.kube.settle(ready=False, gen=old)
    m.kube.settle(ready=False, gen=new)
    m.pass_(2)
    assert m.ro["servingGeneration"] == new and new in m.generations()
    assert any(w[1] == "RolledBack" and "no other generation is there to serve instead" in w[2] for w in m.warnings())


def test_readiness_lost_after_the_rollback_window_is_no_rollback(monkeypatch):
    """Past rollout.rollbackWindow the new generation is accepted: a replica losing readiness then (while long
    requests still drain from the old one) is an incident for the serving generation, not a failed rollout."""
    m = Model()
    new = m.switch("1.2.1")
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 120.0 if ts else 0.0)  # past the 60 s window
    m.kube.settle(ready=False, gen=new)
    m.pass_()
    assert m.ro["servingGeneration"] == new and m.ro["phase"] == "Draining", m.ro


def test_a_rollback_whose_status_write_is_lost_is_not_undone_by_a_fresh_start(monkeypatch):
    """The new generation missed its progress deadline and is rolled back, but that pass's status write fails
    (etcd timeout, the operator restarted): the generation must still be there for the next pass, which rolls
    it back again from the same deadline, rather than gone and created anew with a fresh deadline (holding
    GPUs for another whole progressDeadline)."""
    m = Model()
    m.image("1.2.1")
    m.pass_()
    new = m.ro["targetGeneration"]
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 10_000.0 if ts else 0.0)  # past progressDeadline
    real = m.kube.patch_status

    def lost(*args, **kwargs):
        raise ApiException(status=500, reason="etcd timeout")

    m.kube.patch_status = lost
    assert m.r.reconcile("ns", "m").transient
    assert new in m.generations() and m.ro["phase"] == "Progressing"  # nothing recorded, nothing deleted
    m.kube.patch_status = real
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["failedGeneration"] == new, m.ro
    m.pass_()
    assert new not in m.generations()


def _scheduler_pod(name, ip, ready=True, deleting=False):
    meta = {"name": name, "namespace": "ns", "labels": {"baton.dev/model": "m", "baton.dev/tier": "scheduler"}}
    if deleting:
        meta["deletionTimestamp"] = iso()
    return {"metadata": meta, "spec": {},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_a_draining_pass_reads_each_scheduler_once_and_the_engines_only_when_their_answer_decides(monkeypatch):
    """Within the rollback window a Draining pass needs the schedulers' request outcomes (the error rate) and
    their in-flight counts (the message): one /metrics read per scheduler serves both. The engines' /metrics is
    read only once the window is over (trtllm-serve hands its records out once: reading them for a message
    takes them from whoever else reads them). A terminating or unready scheduler pod is asked too, but one that
    does not answer leaves in flight known."""
    m = Model()
    m.switch("1.2.1")
    for pod in (_scheduler_pod("m-scheduler-a", "10.0.9.1"), _scheduler_pod("m-scheduler-b", "10.0.9.2", deleting=True),
                _scheduler_pod("m-scheduler-c", "10.0.9.3", ready=False)):
        m.kube.objs[("Pod", "ns", pod["metadata"]["name"])] = pod
    reads, engine_reads = [], []

    def read_schedulers(schedulers, optional=(), timeout=2.0):
        reads.append((list(schedulers), list(optional)))
        return rollout.SchedulerReadout()

    monkeypatch.setattr(rollout, "read_schedulers", read_schedulers)
    monkeypatch.setattr(rollout, "active_requests", lambda a, timeout=3.0: engine_reads.append(a) or 0)
    m.pass_()
    assert m.ro["phase"] == "Draining"
    port = m.obj["spec"].get("scheduler", {}).get("port", 8000)
    assert reads == [([f"10.0.9.1:{port}"], [f"10.0.9.2:{port}", f"10.0.9.3:{port}"])]
    assert engine_reads == []
    message = m.ro["message"]
    m.pass_()
    assert m.ro["message"] == message and "stays for rollback until 20" in message  # a time, not a countdown
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 120.0 if ts else 0.0)  # past the window
    m.pass_()
    assert engine_reads and m.ro["phase"] == "Serving"


def test_only_schedulers_whose_answer_counts_make_in_flight_unknown(monkeypatch):
    """Loopback ports nothing listens on: a required scheduler that does not answer makes the readout
    incomplete (in flight unknown); an optional one (terminating, not Ready) does not."""
    import socket

    monkeypatch.undo()  # the real reads, not the `engines` fixture's

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, not listening: refused
        assert not rollout.read_schedulers([silent], timeout=1.0).complete
        readout = rollout.read_schedulers([], [silent], timeout=1.0)
        assert readout.complete and rollout.in_flight(["127.0.0.1:9"], readout, engine_reads=False) == 0
        assert rollout.in_flight(["127.0.0.1:9"], rollout.read_schedulers([silent], timeout=1.0)) is None


def test_fields_from_a_crd_newer_than_the_operator_are_ignored_not_a_reason_to_stall(caplog):
    """The CRD is upgraded before the operator (the documented order), or kept through a `helm rollback` of the
    operator: the API server serves every model with the newer CRD's defaults filled in, fields this operator
    has never heard of. They are left out, said once in the log, and the model goes on being reconciled; a
    real problem beside them is still refused."""
    m = Model()
    m.obj["spec"]["engine"]["someFutureField"] = "30m"
    m.obj["spec"]["rollout"] = {**(m.obj["spec"].get("rollout") or {}), "futureKnob": True}
    m.obj["status"]["rollout"]["futureStatus"] = {"x": 1}
    with caplog.at_level("WARNING", logger="baton.operator"):
        m.pass_(2)
        m.image("1.2.1")
        m.pass_()
    assert m.cond("Stalled").get("status") != "True", m.cond("Stalled")
    assert m.ro["targetGeneration"] != m.ro["servingGeneration"]  # the edit is acted on
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warned) == 1 and "spec.engine.someFutureField" in warned[0] and "spec.rollout.futureKnob" in warned[0]
    m.obj["spec"]["decode"]["replicas"] = "many"  # a real problem: refused, as ever
    m.pass_()
    assert m.cond("Stalled")["status"] == "True" and "decode.replicas" in m.cond("Stalled")["message"]


def test_a_crash_looping_container_is_reported_between_its_back_offs_too():
    """Between two back-offs a crash-looping container runs again (not ready): the model's message must not
    drop it each time, so its restarts and last exit are said until it is ready."""
    from baton.operator.status import failing_containers

    def pod(state, ready=False, restarts=3):
        return {"metadata": {"name": "m-decode-g-0"}, "status": {"containerStatuses": [{
            "name": "engine", "ready": ready, "restartCount": restarts, "state": state,
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}

    waiting = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}}
    assert failing_containers(pod(waiting)) == [
        "m-decode-g-0: engine CrashLoopBackOff: back-off 40s restarting failed container"]
    running = {"running": {"startedAt": "2026-12-07T17:00:00Z"}}
    assert failing_containers(pod(running)) == ["m-decode-g-0: engine restarted 3 time(s), last exit code 1 (Error)"]
    assert failing_containers(pod(running, ready=True)) == []
    assert failing_containers(pod(running, restarts=0)) == []


def test_an_unpinned_hugging_face_revision_is_warned_of_once_per_spec_change():
    m = Model(mutate=lambda spec: spec["model"]["source"]["huggingFace"].pop("revision"))
    m.pass_(3)
    assert [w[1] for w in m.warnings()] == ["ModelRevisionNotPinned"]
    assert "40-character commit hash" in m.warnings()[0][2]
    m.edit(lambda spec: spec["decode"].__setitem__("replicas", 2))
    m.pass_(2)
    assert [w[1] for w in m.warnings()] == ["ModelRevisionNotPinned"] * 2
    m.edit(lambda spec: spec["model"]["source"]["huggingFace"].__setitem__("revision", PINNED))
    m.pass_(2)
    assert len(m.warnings()) == 2


# ---------------------------------------------------------------- 15. a pairwise swap's generation is judged while it serves beside the old one

def _counting_schedulers(monkeypatch, complete=lambda: True):
    """The schedulers' per-generation counters (from their start, never reset), as /metrics reads them."""
    counters = {}
    monkeypatch.setattr(rollout, "read_schedulers", lambda schedulers, optional=(), timeout=2.0: rollout.SchedulerReadout(
        outcomes=copy.deepcopy(counters), complete=complete()))
    return counters


def test_a_pairwise_swaps_generation_failing_beside_the_serving_one_is_rolled_back_mid_swap(monkeypatch):
    """Schedulers count each request under the generation of the replicas it went to: 80% of the requests
    the new generation takes beside the old one fail, and the swap ends before it takes everything."""
    counters = _counting_schedulers(monkeypatch)
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    counters[g0] = {"failed": 0, "completed": 500}
    counters[g1] = {"failed": 40, "completed": 10}
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0 and m.ro["failedGeneration"] == g1, m.ro
    assert m.ro["swap"]["generation"] == "", m.ro["swap"]  # schedulers stop routing to it in this write
    assert "40 of 50 requests dispatched to it failed (80%) since it took traffic beside the serving generation" in m.ro["message"]


def test_requests_a_swaps_generation_failed_before_the_final_switch_still_count_after_it(monkeypatch):
    """15 failures of 15 while both generations serve (fewer than errorRateMinRequests, so not judged yet),
    then 10 that complete after the final switch: 15 of 25 failed since it took traffic."""
    counters = _counting_schedulers(monkeypatch)
    m = Model(gpus=5, mutate=pairwise_swap(3))
    g0 = m.ro["servingGeneration"]
    m.image("1.2.1")
    g1 = None
    for _ in range(12):
        m.pass_()
        m.kube.settle()
        g1 = m.ro["swap"].get("generation") or g1
        if g1 and not counters.get(g1):
            counters[g1] = {"failed": 15, "completed": 0}
        if m.ro["servingGeneration"] != g0:
            break
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == g1, m.ro
    assert m.ro["errorRate"]["generation"] == g1 and m.ro["errorRate"]["failedAtSwitch"] == 0, m.ro["errorRate"]
    counters[g1]["completed"] = 10
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == g0, m.ro
    assert "15 of 25 requests dispatched to it failed (60%) after the switch" in m.ro["message"]


def test_no_error_baseline_is_taken_while_a_scheduler_does_not_answer(monkeypatch):
    """A scheduler that does not answer when the new generation takes traffic is missing from the baseline:
    its earlier counts (here 30 failures before the switch) would later read as failures since, and roll a
    healthy generation back. The baseline waits for a readout every counted scheduler answered."""
    answered = {"all": False}
    counters = {}
    silent = {}  # what the scheduler that does not answer yet has counted

    def read_schedulers(schedulers, optional=(), timeout=2.0):
        seen = copy.deepcopy(counters)
        if answered["all"]:
            for gen, outcomes in silent.items():
                for k, v in outcomes.items():
                    seen.setdefault(gen, {})[k] = seen.get(gen, {}).get(k, 0) + v
        return rollout.SchedulerReadout(outcomes=seen, complete=answered["all"])

    monkeypatch.setattr(rollout, "read_schedulers", read_schedulers)
    m = Model()
    m.image("1.2.1")
    m.pass_()
    m.kube.settle()
    g1 = m.ro["targetGeneration"]
    silent[g1] = {"failed": 30, "completed": 0}
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == g1, m.ro
    assert (m.ro.get("errorRate") or {}).get("generation") != g1, m.ro["errorRate"]
    answered["all"] = True
    m.pass_()
    assert m.ro["errorRate"] == {"generation": g1, "failed": 0, "total": 0, "failedAtSwitch": 30, "totalAtSwitch": 30}
    counters[g1] = {"failed": 0, "completed": 30}
    m.pass_()
    assert m.ro["phase"] == "Draining" and m.ro["servingGeneration"] == g1, m.ro
    assert m.ro["errorRate"]["total"] == 30 and m.ro["errorRate"]["failed"] == 0


# ---------------------------------------------------------------- 16. the strategy changed mid-swap

def test_a_swap_goes_on_when_the_strategy_becomes_atomic_without_room_for_two_full_generations():
    """4 GPUs per pool, 3 replicas per tier: the atomic way would want both generations at full size (6 per
    pool). The serving generation keeps its swap size, the new one grows pair by pair, and status says why."""
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    m.edit(lambda s: s["rollout"].__setitem__("strategy", "AtomicGeneration"))
    m.pass_()
    for t in ("prefill", "decode"):  # one GPU per replica: what the pools hold
        assert m.replicas(g0)[t] + m.replicas(g1)[t] <= 4, (m.replicas(g0), m.replicas(g1))
    assert m.ro["phase"] == "Swapping" and "the pairwise swap goes on" in m.ro["message"], m.ro
    for _ in range(20):
        m.kube.settle()
        m.pass_()
        for t in ("prefill", "decode"):
            assert m.replicas(g0)[t] + (m.replicas(g1)[t] if g1 in m.generations() else 0) <= 4, (m.replicas(g0), m.ro)
        if m.ro["servingGeneration"] == g1:
            break
    assert m.ro["servingGeneration"] == g1 and m.ro["phase"] == "Draining", m.ro
    assert m.replicas(g1) == {"prefill": 3, "decode": 3}


def test_an_atomic_takeover_of_a_swap_goes_ahead_where_the_pools_have_room():
    m, g0, g1 = mid_pairwise_swap(gpus=8)
    m.edit(lambda s: s["rollout"].__setitem__("strategy", "AtomicGeneration"))
    m.pass_()
    assert m.replicas(g0) == {"prefill": 3, "decode": 3} and m.replicas(g1) == {"prefill": 3, "decode": 3}
    assert m.ro["phase"] != "Swapping" and "goes on" not in m.ro["message"], m.ro


# ---------------------------------------------------------------- 17. a first deployment that never becomes Ready

def test_a_first_deployment_past_its_progress_deadline_is_stalled_and_keeps_trying(monkeypatch):
    """Nothing serves yet, so there is nothing to roll back to: after rollout.progressDeadline the model is
    Stalled (kstatus Failed, Argo CD Degraded, a Flux wait fails) with what it waits for, nothing is deleted,
    and it recovers by itself once the pods are Ready. Editing the spec starts its deadline again."""
    stamps = iter(f"2026-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z" for i in range(1, 86400))
    monkeypatch.setattr(rollout_pass, "_now", lambda: next(stamps))
    edited = {"after": ""}
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: 0.0 if not ts or (edited["after"] and ts > edited["after"]) else 960.0)
    m = Model(settle=False)
    gens = m.generations()
    outcome = m.r.reconcile("ns", "m")
    stalled = m.cond("Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ProgressDeadlineExceeded", stalled
    assert "did not become Ready within rollout.progressDeadline 15m of its first deployment" in stalled["message"]
    assert "waiting for prefill 0/1" in stalled["message"], stalled["message"]
    assert m.cond("Ready")["status"] == "False" and m.cond("Reconciling")["status"] == "True"
    assert outcome.failed  # counted Stalled, as the BatonModelStalled alert reads it
    assert m.generations() == gens and m.ro["phase"] == "Progressing"
    # a fix in place (the same generation): its own deadline, from the edit
    edited["after"] = m.ro["startedAt"]
    m.edit(lambda s: s["decode"].setdefault("podTemplate", {}).setdefault("env", []).append({"name": "X", "value": "1"}))
    m.pass_()
    assert m.cond("Stalled")["status"] == "False", m.cond("Stalled")
    edited["after"] = ""
    m.pass_()
    assert m.cond("Stalled")["status"] == "True"
    m.kube.settle()
    m.pass_()
    assert m.cond("Stalled")["status"] == "False" and m.cond("Ready")["status"] == "True" and m.ro["phase"] == "Serving"


# ---------------------------------------------------------------- 18. a rolled-back generation's requests in flight

class _Everywhere(dict):
    """A readout's in-flight map with `n` requests on every engine address."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def get(self, key, default=None):
        return self.box["n"]


def test_a_rolled_back_generation_finishes_its_requests_in_flight_before_it_is_deleted(monkeypatch):
    """Traffic goes back at once, but the requests the schedulers had already sent to the failed generation
    (most of which may well succeed) are not cut: it is deleted when they have ended, or FAILED_DRAIN_SECONDS
    after the switch back at the latest."""
    box = {"n": 0}
    monkeypatch.setattr(rollout, "read_schedulers", lambda schedulers, optional=(), timeout=2.0: rollout.SchedulerReadout(
        in_flight=_Everywhere(box)))

    def rolled_back_with_requests_in_flight():
        m = Model()
        old = m.ro["servingGeneration"]
        new = m.switch("1.2.1")
        box["n"] = 3
        m.kube.settle(ready=False, gen=new)
        m.pass_()
        assert m.ro["phase"] == "RolledBack" and m.ro["servingGeneration"] == old, m.ro
        m.pass_(2)
        assert new in m.generations() and m.ro["servingGeneration"] == old, "cut with requests in flight"
        return m, old

    m, old = rolled_back_with_requests_in_flight()
    box["n"] = 0
    m.pass_()
    assert m.generations() == [old]
    # at most FAILED_DRAIN_SECONDS: a request that never ends does not keep it
    m, old = rolled_back_with_requests_in_flight()
    monkeypatch.setattr(rollout_pass, "_age", lambda ts: rollout_pass.FAILED_DRAIN_SECONDS if ts else 0.0)
    m.pass_()
    assert m.generations() == [old]


def test_after_a_pairwise_swap_is_rolled_back_its_generation_goes_at_once_to_give_the_gpus_back(monkeypatch):
    """The serving generation grows back to its size and needs the GPUs the swap's generation holds."""
    box = {"n": 3}
    monkeypatch.setattr(rollout, "read_schedulers", lambda schedulers, optional=(), timeout=2.0: rollout.SchedulerReadout(
        in_flight=_Everywhere(box)))
    m, g0, g1 = mid_pairwise_swap(gpus=4)
    m.annotate(ANNOTATION_ROLLBACK, "true")
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and m.ro["swap"]["generation"] == "", m.ro
    m.pass_()
    assert g1 not in m.generations(), m.generations()


# ---------------------------------------------------------------- 19. the status under steady traffic

def test_steady_traffic_in_the_rollback_window_does_not_rewrite_the_status_every_pass(monkeypatch):
    """Every scheduler watches the model: the request counts shown in status.rollout.errorRate move when a
    failure is added or the total grew by a tenth, not on every pass; the verdict uses the counts as they are."""
    counters = _counting_schedulers(monkeypatch)
    m = Model()
    g1 = m.switch("1.2.1")
    writes = []
    patch = m.kube.patch_status
    monkeypatch.setattr(m.kube, "patch_status", lambda *a, **k: (writes.append(1), patch(*a, **k))[1])
    counters[g1] = {"failed": 0, "completed": 100}
    m.pass_()
    assert (m.ro["errorRate"]["failed"], m.ro["errorRate"]["total"]) == (0, 100)
    writes.clear()
    for completed in range(101, 110):  # +1 request a pass: under a tenth
        counters[g1]["completed"] = completed
        m.pass_()
    assert writes == [] and m.ro["errorRate"]["total"] == 100, (len(writes), m.ro["errorRate"])
    counters[g1]["completed"] = 110
    m.pass_()
    assert m.ro["errorRate"]["total"] == 110 and len(writes) == 1
    counters[g1]["failed"] = 1  # a failure is always shown
    m.pass_()
    assert (m.ro["errorRate"]["failed"], m.ro["errorRate"]["total"]) == (1, 111) and len(writes) == 2
    # judged as before: 12 failures of 121 (10%, above the 5% threshold) roll it back
    counters[g1]["failed"] = 12
    counters[g1]["completed"] = 109
    m.pass_()
    assert m.ro["phase"] == "RolledBack" and "12 of 121" in m.ro["message"], m.ro
