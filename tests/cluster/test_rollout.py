"""Two-tier rollouts under live traffic: local cluster, operator, pod runner, engine simulators and
Baton's scheduler, with requests flowing through the scheduler during every rollout."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from kopf.testing import KopfRunner

from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from cluster_plugin import load_example, wait_for

pytestmark = pytest.mark.cluster
NAME = "llama-8b"


def get_dm(cluster, namespace):
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME)


def patch_spec(cluster, namespace, spec):
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME, {"spec": spec})


def rollout(cluster, namespace):
    return (get_dm(cluster, namespace).get("status") or {}).get("rollout") or {}


def condition(obj, ctype):
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def generations(cluster, namespace):
    items = cluster.apps.list_namespaced_stateful_set(namespace, label_selector=f"baton.dev/model={NAME}").items
    return sorted({s.metadata.labels["baton.dev/generation"] for s in items})


def manifest(**spec_updates):
    m = load_example("small.yaml")
    m["spec"]["decode"].update({"minReplicas": 2, "replicas": 2, "maxReplicas": 4})
    m["spec"]["rollout"] = {"rollbackWindow": "5s", "progressDeadline": "60s", "drainTimeout": "60s", "minReadySeconds": 2}
    for key, value in spec_updates.items():
        m["spec"][key] = {**m["spec"].get(key, {}), **value}
    return m


def deploy(cluster, namespace, m=None):
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, m or manifest())

    def serving():
        obj = get_dm(cluster, namespace)
        ro = (obj.get("status") or {}).get("rollout") or {}
        return obj if condition(obj, "Ready").get("status") == "True" and ro.get("phase") == "Serving" else None

    return wait_for(serving, 120, what="model Ready and Serving")


class Traffic:
    """Requests through the scheduler until stopped (bounded: at most `limit`), counting outcomes,
    plus a sampler of every engine's KV-format rejection counter."""

    def __init__(self, cluster, namespace, limit=5000, model="llama-3-8b"):
        self.cluster, self.namespace, self.limit, self.model = cluster, namespace, limit, model
        self.outcomes: Counter[str] = Counter()
        self.routes: Counter[str] = Counter()
        self.decode_endpoints: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.rejections: dict[str, int] = {}
        self._stop = threading.Event()
        pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"baton.dev/model={NAME},baton.dev/tier=scheduler").items
        self.url = f"http://{next(p.status.pod_ip for p in pods if p.status.pod_ip)}:8000"
        wait_for(self._ready, 60, what="scheduler ready")
        self.threads = [threading.Thread(target=self._send, daemon=True), threading.Thread(target=self._sample, daemon=True)]

    def _ready(self):
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _send(self):
        i = 0
        while not self._stop.is_set() and i < self.limit:
            prompt = list(range(1, 50)) if i % 2 else list(range(1, 6001))  # local and disaggregated
            body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": 4}).encode()
            request = urllib.request.Request(f"{self.url}/v1/completions", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    resp.read()
                    self.outcomes["ok"] += 1
                    self.routes[resp.headers.get("X-Baton-Route", "?")] += 1
                    self.decode_endpoints.append((time.monotonic(), resp.headers.get("X-Baton-Decode-Endpoint", "")))
            except urllib.error.HTTPError as exc:
                self.outcomes[f"http {exc.code}"] += 1
                self.errors.append(exc.read().decode()[:300])
            except OSError as exc:
                self.outcomes["connection"] += 1
                self.errors.append(str(exc))
            i += 1
            time.sleep(0.02)

    def _sample(self):
        while not self._stop.is_set():
            pods = self.cluster.core.list_namespaced_pod(self.namespace, label_selector=f"baton.dev/model={NAME}").items
            for pod in pods:
                if pod.metadata.labels.get("baton.dev/tier") in ("prefill", "decode") and pod.status.pod_ip:
                    try:
                        with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8000/_sim/state", timeout=2) as resp:
                            counters = json.loads(resp.read()).get("counters", {})
                        key = f"{pod.metadata.name}/{pod.metadata.uid}"
                        self.rejections[key] = max(self.rejections.get(key, 0), int(counters.get("kvFormatRejections", 0)))
                    except (OSError, ValueError):
                        pass
            self._stop.wait(0.5)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self.threads:
            t.join(timeout=40)

    def failed(self):
        return sum(n for k, n in self.outcomes.items() if k != "ok")


def wait_phase(cluster, namespace, phase, timeout=120):
    return wait_for(lambda: (ro := rollout(cluster, namespace)).get("phase") == phase and ro, timeout, what=f"rollout phase {phase}")


def events_of(cluster, namespace):
    return [(e.reason, e.message) for e in cluster.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}").items]


def test_a_kv_neutral_change_rolls_in_place_with_zero_failed_requests(cluster, namespace, operator, pod_runner):
    before = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]
    with Traffic(cluster, namespace) as traffic:
        time.sleep(1)
        patch_spec(cluster, namespace, {"decode": {"replicas": 3}, "scheduler": {"maxQueueDepth": 128}})
        wait_for(lambda: get_dm(cluster, namespace)["status"]["decode"]["summary"] == "3/3", 60, what="decode 3/3")
        time.sleep(2)
    assert traffic.outcomes["ok"] > 20 and traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    assert rollout(cluster, namespace)["servingGeneration"] == before
    assert generations(cluster, namespace) == [before]
    assert any(r == "Applied" and "in place" in m for r, m in events_of(cluster, namespace))


def test_a_change_to_one_tier_restarts_only_that_tiers_engines(cluster, namespace, operator, pod_runner):
    """decode.maxBatchSize reaches only the decode engines' config: their pods roll (in place, same
    generation) and the prefill engine keeps running, the same pod, never restarted."""
    before = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]

    def tier_pods(tier):
        return cluster.core.list_namespaced_pod(
            namespace, label_selector=f"baton.dev/model={NAME},baton.dev/tier={tier}").items

    def ready(p):
        return not p.metadata.deletion_timestamp and any(
            c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])

    prefill = {(p.metadata.name, p.metadata.uid) for p in tier_pods("prefill")}
    old_decode = {p.metadata.uid for p in tier_pods("decode")}
    assert len(prefill) == 1 and len(old_decode) == 2
    with Traffic(cluster, namespace) as traffic:
        time.sleep(1)
        patch_spec(cluster, namespace, {"decode": {"maxBatchSize": 32}})
        wait_for(lambda: (pods := tier_pods("decode")) and len(pods) == 2 and all(map(ready, pods))
                 and not {p.metadata.uid for p in pods} & old_decode, 120, what="both decode pods replaced and Ready")
        wait_for(lambda: condition(get_dm(cluster, namespace), "Ready").get("status") == "True", 30, what="Ready")
    assert traffic.outcomes["ok"] > 20 and traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    after = tier_pods("prefill")
    assert {(p.metadata.name, p.metadata.uid) for p in after} == prefill, "the prefill engine was restarted"
    assert all(ready(p) and all(c.restart_count == 0 for c in p.status.container_statuses or []) for p in after)
    assert rollout(cluster, namespace)["servingGeneration"] == before and generations(cluster, namespace) == [before]


def test_a_tier_port_change_rolls_in_place_with_zero_failed_requests(cluster, namespace, operator, pod_runner):
    """The scheduler's config names the new port at once, while the pods still serving were started with
    the old one: it reaches each pod on the port Kubernetes publishes for it (the Services target the
    named port), so the rolling update fails no request. With two decode replicas the last old one leaves
    the endpoint lists (its slice, on the old port) an instant before its replacement arrives (in the
    new port's slice): requests arriving in between wait for the replacement instead of getting 503."""
    before = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]

    def tier_pods_on(port):
        pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"baton.dev/model={NAME}").items
        tier = [p for p in pods if p.metadata.labels.get("baton.dev/tier") in ("prefill", "decode")]
        return len(tier) == 3 and all(
            not p.metadata.deletion_timestamp and p.spec.containers[0].ports[0].container_port == port
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) for p in tier)

    # New pods take a few seconds to load, so the scheduler has its new config long before the last old
    # pod is replaced.
    slow = {"env": [{"name": "BATON_SIM_ARGS", "value": "--sim-load-seconds 6"}]}
    with Traffic(cluster, namespace) as traffic:
        time.sleep(1)
        patch_spec(cluster, namespace, {"prefill": {"port": 8100, "podTemplate": slow},
                                        "decode": {"port": 8100, "podTemplate": slow}})
        wait_for(lambda: tier_pods_on(8100), 120, what="every tier pod replaced and Ready on port 8100")
        wait_for(lambda: condition(get_dm(cluster, namespace), "Ready").get("status") == "True", 30, what="Ready")
        sent = sum(traffic.outcomes.values())
        wait_for(lambda: sum(traffic.outcomes.values()) >= sent + 10, 30, what="requests after the change")
    assert traffic.outcomes["ok"] > 20 and traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    assert traffic.routes["disaggregated"] > 0 and traffic.routes["local"] > 0
    assert rollout(cluster, namespace)["servingGeneration"] == before and generations(cluster, namespace) == [before]


def test_a_kv_changing_change_swaps_both_tiers_atomically_with_zero_failures(cluster, namespace, operator, pod_runner):
    old = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]
    with Traffic(cluster, namespace) as traffic:
        time.sleep(1)
        patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
        wait_phase(cluster, namespace, "Draining")
        ro = wait_phase(cluster, namespace, "Serving", timeout=90)
        time.sleep(2)
    new = ro["servingGeneration"]
    assert new != old and ro["lastKnownGood"]["generation"] == new and ro["probe"]["passed"] is True
    assert generations(cluster, namespace) == [new], "the old generation is deleted after draining"
    assert traffic.outcomes["ok"] > 20 and traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    assert sum(traffic.rejections.values()) == 0, traffic.rejections  # never a cross-generation pair
    assert {"local", "disaggregated"} <= set(traffic.routes)
    reasons = [r for r, _ in events_of(cluster, namespace)]
    for reason in ("NewGeneration", "ProbePassed", "Switched", "Drained"):
        assert reason in reasons
    obj = get_dm(cluster, namespace)
    assert obj["status"]["revision"] == new and obj["status"]["prefill"]["kvFingerprint"] == obj["status"]["decode"]["kvFingerprint"]


def test_an_incompatible_spec_is_refused_and_the_old_generation_keeps_serving(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]
    from kubernetes.client.rest import ApiException

    with Traffic(cluster, namespace) as traffic:
        # The CRD's validation rules refuse it at admission (the operator's KV gate is the second line).
        with pytest.raises(ApiException) as refused:
            patch_spec(cluster, namespace, {"decode": {"engineOverrides": {"tokensPerBlock": 64}}})
        assert refused.value.status == 422, refused.value
        message = refused.value.body or ""
        time.sleep(3)
    assert "tokensPerBlock" in message
    assert generations(cluster, namespace) == [serving]
    assert traffic.outcomes["ok"] > 20 and traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])


def test_a_new_generation_that_never_becomes_ready_is_rolled_back(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace, manifest(rollout={"progressDeadline": "10s"}))["status"]["rollout"]["servingGeneration"]
    with Traffic(cluster, namespace) as traffic:
        # A checkpoint that is not there: the new engines can never start.
        patch_spec(cluster, namespace, {"model": {"source": {"huggingFace": None, "hostPath": {"path": "/nonexistent/model"}}}})
        ro = wait_phase(cluster, namespace, "RolledBack", timeout=90)
        time.sleep(2)
    assert ro["servingGeneration"] == serving and ro["failedGeneration"] != serving
    assert "did not become Ready within progressDeadline 10s" in ro["message"]
    # removed by the pass after the one whose status write recorded the rollback
    wait_for(lambda: generations(cluster, namespace) == [serving], 15, what="the failed generation removed")
    assert traffic.failed() == 0 and traffic.outcomes["ok"] > 20, (traffic.outcomes, traffic.errors[:3])
    obj = get_dm(cluster, namespace)
    assert condition(obj, "Ready")["status"] == "True" and condition(obj, "RolloutSucceeded")["status"] == "False"
    assert condition(obj, "Stalled")["status"] == "True" and condition(obj, "Stalled")["reason"] == "RolledBack"
    assert any(r == "RolledBack" for r, _ in events_of(cluster, namespace))


def test_a_failed_handoff_probe_means_no_switch(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]
    seen_serving = set()
    with Traffic(cluster, namespace) as traffic:
        # The new decode replicas load other weights than the new prefill replicas: same declared KV
        # format, so only a real handoff can tell.
        patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}},
                                        "decode": {"podTemplate": {"env": [{"name": "BATON_SIM_ARGS", "value": "--sim-model-identity other-weights"}]}}})
        deadline = time.monotonic() + 90
        while (ro := rollout(cluster, namespace)).get("phase") != "RolledBack" and time.monotonic() < deadline:
            seen_serving.add(ro.get("servingGeneration"))
            time.sleep(0.2)
        time.sleep(2)
    assert ro["phase"] == "RolledBack", ro
    assert seen_serving == {serving}, "traffic never switched"
    assert ro["probe"]["passed"] is False and "Disagg server does not currently support these cacheState" in ro["probe"]["message"]
    assert traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    assert any(r == "ProbeFailed" for r, _ in events_of(cluster, namespace))


def test_a_generation_failing_after_the_switch_is_rolled_back_within_the_bound(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace, manifest(rollout={"rollbackWindow": "120s"}))["status"]["rollout"]["servingGeneration"]
    with Traffic(cluster, namespace) as traffic:
        # The new decode engines go fatal after a few requests, once traffic is on them.
        patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}},
                                        "decode": {"podTemplate": {"env": [{"name": "BATON_SIM_ARGS", "value": "--sim-fail-after 4"}]}}})
        switched = wait_phase(cluster, namespace, "Draining", timeout=90)
        new = switched["servingGeneration"]
        ro = wait_phase(cluster, namespace, "RolledBack", timeout=90)
        back_at = time.monotonic()
        # When did a new-generation decode pod first lose readiness (the failure Baton detects)?
        pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"baton.dev/generation={new},baton.dev/tier=decode").items
        time.sleep(3)
    assert ro["servingGeneration"] == serving and ro["failedGeneration"] == new
    assert "lost readiness after the switch" in ro["message"]
    assert 0 <= ro["lastRollbackMillis"] < 30_000
    # End to end: after the rollback every request is served by the old generation's decode pods.
    old_decode = {p.status.pod_ip for p in cluster.core.list_namespaced_pod(
        namespace, label_selector=f"baton.dev/generation={serving},baton.dev/tier=decode").items}
    late = [ep.split(":")[0] for t, ep in traffic.decode_endpoints if t > back_at + 1 and ep]
    assert late and set(late) <= old_decode
    print(f"\nrollback: detection -> switch {ro['lastRollbackMillis']} ms; new decode pods: {[p.metadata.name for p in pods]}")


def test_a_generation_whose_requests_fail_after_the_switch_is_rolled_back_on_its_error_rate(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace, manifest(rollout={"rollbackWindow": "120s", "errorRateMinRequests": 10}))["status"]["rollout"]["servingGeneration"]
    with Traffic(cluster, namespace) as traffic:
        # Every second request on the new decode engines fails with a 500 while they stay healthy: the
        # probe passes (one handoff per replica) and readiness never drops; only the error rate shows it.
        patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}},
                                        "decode": {"podTemplate": {"env": [{"name": "BATON_SIM_ARGS", "value": "--sim-error-ratio 0.5"}]}}})
        switched = wait_phase(cluster, namespace, "Draining", timeout=90)
        new = switched["servingGeneration"]
        assert new != serving
        ro = wait_phase(cluster, namespace, "RolledBack", timeout=90)
        back_at = time.monotonic()
        time.sleep(1)  # a request in flight at the switch may still end badly
        failed_after_switch_back = traffic.failed()
        time.sleep(4)
    assert ro["servingGeneration"] == serving and ro["failedGeneration"] == new
    assert "above rollout.errorRateThresholdPercent=5" in ro["message"], ro["message"]
    errors = ro["errorRate"]
    assert errors["generation"] == new and errors["total"] >= 10 and errors["failed"] * 100 > 5 * errors["total"]
    assert 0 <= ro["lastRollbackMillis"] < 30_000
    assert any(r == "RolledBack" and "errorRateThresholdPercent" in m for r, m in events_of(cluster, namespace))
    # Back on the old generation, requests are served again, and none failed any more.
    old_decode = {p.status.pod_ip for p in cluster.core.list_namespaced_pod(
        namespace, label_selector=f"baton.dev/generation={serving},baton.dev/tier=decode").items}
    late = [ep.split(":")[0] for t, ep in traffic.decode_endpoints if t > back_at + 1 and ep]
    assert late and set(late) <= old_decode
    assert traffic.failed() == failed_after_switch_back, (traffic.outcomes, traffic.errors[-3:])
    print(f"\nerror-rate rollback: {errors['failed']}/{errors['total']} failed; detection -> switch {ro['lastRollbackMillis']} ms")


def test_an_operator_killed_mid_rollout_resumes_and_leaves_nothing_orphaned(cluster, namespace, pod_runner):
    args = ["run", "--standalone", "--namespace", namespace, "-m", "baton.operator.handlers"]
    with KopfRunner(args, timeout=60):
        old = deploy(cluster, namespace, manifest(rollout={"rollbackWindow": "8s"}))["status"]["rollout"]["servingGeneration"]
        # New engines take a while to load, so the rollout is caught in Progressing.
        patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}},
                                        "prefill": {"podTemplate": {"env": [{"name": "BATON_SIM_ARGS", "value": "--sim-load-seconds 6"}]}}})
        wait_phase(cluster, namespace, "Progressing", timeout=60)
    assert len(generations(cluster, namespace)) == 2  # killed with both generations present
    with KopfRunner(args, timeout=60):
        draining = wait_phase(cluster, namespace, "Draining", timeout=90)
    assert draining["servingGeneration"] != old
    with KopfRunner(args, timeout=60):
        ro = wait_phase(cluster, namespace, "Serving", timeout=90)
    assert ro["servingGeneration"] == draining["servingGeneration"]
    assert generations(cluster, namespace) == [ro["servingGeneration"]]
    configmaps = [c.metadata.name for c in cluster.core.list_namespaced_config_map(namespace, label_selector=f"baton.dev/model={NAME}").items]
    assert sorted(configmaps) == sorted([f"{NAME}-prefill-engine-{ro['servingGeneration']}",
                                         f"{NAME}-decode-engine-{ro['servingGeneration']}", f"{NAME}-scheduler"])


def test_a_rollout_without_gpus_for_the_new_generation_is_blocked_with_the_numbers(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]
    # 4 replicas x 4 GPUs = the whole decode pool, while the serving generation still holds 2 GPUs of it.
    patch_spec(cluster, namespace, {"decode": {"gpusPerReplica": 4, "tensorParallelSize": 4, "replicas": 4}})
    ro = wait_phase(cluster, namespace, "BlockedOnCapacity", timeout=60)
    assert "decode needs 4 replica(s) x 4 GPU(s) but only" in ro["message"]
    assert "decode-l40s-0:" in ro["message"]
    assert generations(cluster, namespace) == [serving] and ro["servingGeneration"] == serving
    # The replica count asked for reaches the generation that serves meanwhile (as a scale or an
    # autoscaler's would), and it turns Ready again at that size.

    def serving_at_four():
        obj = get_dm(cluster, namespace)
        sts = cluster.apps.read_namespaced_stateful_set(f"{NAME}-decode-{serving}", namespace)
        return obj if (condition(obj, "Ready").get("status") == "True" and sts.spec.replicas == 4
                       and obj["status"]["decode"]["readyReplicas"] == 4) else None

    obj = wait_for(serving_at_four, 60, what="the serving generation at 4 Ready decode replicas")
    assert condition(obj, "RolloutSucceeded")["reason"] == "BlockedOnCapacity"
    assert obj["status"]["rollout"]["phase"] == "BlockedOnCapacity" and generations(cluster, namespace) == [serving]


def test_a_gpu_tight_model_rolls_pair_by_pair_with_pairwise_swap_and_zero_failed_requests(cluster, namespace, operator, pod_runner):
    # 3 decode replicas x 4 GPUs hold 12 of the decode pool's 16 GPUs: no room for a second full
    # generation, room for one more replica.
    serving = deploy(cluster, namespace, manifest(
        prefill={"gpusPerReplica": 8, "tensorParallelSize": 8},
        decode={"gpusPerReplica": 4, "tensorParallelSize": 4, "replicas": 3}))["status"]["rollout"]["servingGeneration"]
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
    ro = wait_phase(cluster, namespace, "BlockedOnCapacity", timeout=60)
    assert "decode needs 3 replica(s) x 4 GPU(s)" in ro["message"]

    ip_generation: dict[str, str] = {}
    most = Counter()
    swapping_seen = False
    switched_at = None
    with Traffic(cluster, namespace) as traffic:
        patch_spec(cluster, namespace, {"rollout": {"strategy": "PairwiseSwap"}})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ro = rollout(cluster, namespace)
            pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"baton.dev/model={NAME}").items
            per_tier = Counter(p.metadata.labels.get("baton.dev/tier") for p in pods if not p.metadata.deletion_timestamp)
            for tier in ("prefill", "decode"):
                most[tier] = max(most[tier], per_tier[tier])
            for p in pods:
                if p.status.pod_ip and p.metadata.labels.get("baton.dev/generation"):
                    ip_generation[p.status.pod_ip] = p.metadata.labels["baton.dev/generation"]
            swapping_seen |= (ro.get("swap") or {}).get("generation", "") not in ("", serving)
            if switched_at is None and ro.get("servingGeneration") not in (None, "", serving):
                switched_at = time.monotonic()
            if ro.get("phase") == "Serving" and ro.get("servingGeneration") != serving:
                break
            assert ro.get("phase") != "RolledBack", ro
            time.sleep(0.3)
        else:
            raise AssertionError(f"the pairwise swap did not finish: {rollout(cluster, namespace)}")
        time.sleep(2)
    new = ro["servingGeneration"]
    assert generations(cluster, namespace) == [new]
    assert swapping_seen, "the new generation never served beside the old one"
    # Never more than one extra replica per tier (the surge), so it fits where a full generation does not.
    assert most["prefill"] <= 2 and most["decode"] <= 4, most
    # Both generations served requests before the final switch, each only within its own pairs.
    before_switch = {ip_generation.get(ep.split(":")[0]) for t, ep in traffic.decode_endpoints if ep and t < switched_at}
    assert {serving, new} <= before_switch, before_switch
    assert traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    assert sum(traffic.rejections.values()) == 0, "a prefill handed KV to a decode of the other generation"
    reasons = [r for r, _ in events_of(cluster, namespace)]
    assert "SwapStarted" in reasons and "Switched" in reasons
    obj = cluster.apps.list_namespaced_stateful_set(namespace, label_selector=f"baton.dev/model={NAME},baton.dev/tier=decode").items
    assert [s.spec.replicas for s in obj] == [3]


def test_a_pairwise_swap_whose_new_replicas_fail_mid_swap_restores_the_old_generation(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace, manifest(
        decode={"replicas": 3},
        rollout={"strategy": "PairwiseSwap", "progressDeadline": "15s"}))["status"]["rollout"]["servingGeneration"]
    with Traffic(cluster, namespace) as traffic:
        # The new decode engines pass the probe, serve a few requests beside the old ones, then die.
        patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}},
                                        "decode": {"podTemplate": {"env": [{"name": "BATON_SIM_ARGS", "value": "--sim-fail-after 6"}]}}})
        wait_for(lambda: (rollout(cluster, namespace).get("swap") or {}).get("generation"), 90, what="the swap serving both generations")
        ro = wait_phase(cluster, namespace, "RolledBack", timeout=120)
        back_at = time.monotonic()
        time.sleep(4)
    assert ro["servingGeneration"] == serving and ro["failedGeneration"] != serving
    assert (ro.get("swap") or {}).get("generation", "") == ""
    wait_for(lambda: generations(cluster, namespace) == [serving], 30, what="the failed generation deleted")
    decode = cluster.apps.list_namespaced_stateful_set(namespace, label_selector=f"baton.dev/model={NAME},baton.dev/tier=decode").items
    assert [s.spec.replicas for s in decode] == [3], "the old generation got its replicas back"
    late = [ep for t, ep in traffic.decode_endpoints if t > back_at + 1 and ep]
    assert late, "requests are served after the rollback"


def test_a_paused_rollout_waits_and_an_explicit_rollback_aborts_it(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace, manifest(rollout={"paused": True}))["status"]["rollout"]["servingGeneration"]
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
    ro = wait_phase(cluster, namespace, "Paused", timeout=60)
    assert generations(cluster, namespace) == [serving], "nothing starts while paused"
    target = ro["targetGeneration"]
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME,
                                                  {"metadata": {"annotations": {"serving.baton.dev/rollback": "true"}}})
    ro = wait_phase(cluster, namespace, "RolledBack", timeout=60)
    assert ro["failedGeneration"] == target and ro["servingGeneration"] == serving
    assert "rollback requested" in ro["message"]
    # Retrying the same generation on purpose: annotate it, unpause, and it rolls out.
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME, {
        "metadata": {"annotations": {"serving.baton.dev/rollback": None, "serving.baton.dev/retry-generation": target}},
        "spec": {"rollout": {"paused": False}}})
    wait_for(lambda: rollout(cluster, namespace).get("servingGeneration") == target, 90, what="retried generation serving")


def test_scaling_a_tier_during_the_rollback_window_keeps_the_new_generation(cluster, namespace, operator, pod_runner):
    old = deploy(cluster, namespace, manifest(rollout={"rollbackWindow": "120s"}))["status"]["rollout"]["servingGeneration"]
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
    new = wait_phase(cluster, namespace, "Draining", timeout=90)["servingGeneration"]
    assert new != old
    # kubectl scale / an autoscaler / a replicas edit, inside the rollback window: not a readiness loss.
    patch_spec(cluster, namespace, {"decode": {"replicas": 3}})
    wait_for(lambda: get_dm(cluster, namespace)["status"]["decode"]["summary"] == "3/3", 60, what="decode 3/3")
    time.sleep(3)
    ro = rollout(cluster, namespace)
    assert ro["phase"] == "Draining" and ro["servingGeneration"] == new, ro
    assert not any(r == "RolledBack" for r, _ in events_of(cluster, namespace))


def test_a_transient_api_error_during_a_rollout_is_retried_not_rolled_back(cluster, namespace, operator, pod_runner, monkeypatch):
    from kubernetes.client.rest import ApiException

    from baton.operator.kube import Kube

    old = deploy(cluster, namespace)["status"]["rollout"]["servingGeneration"]
    real_apply, failed = Kube.apply, []

    def flaky(self, obj, dry_run=False):
        # One 500 (an etcd timeout) on the new generation's first StatefulSet, as the API server sends it.
        if obj["kind"] == "StatefulSet" and old not in obj["metadata"]["name"] and not failed:
            failed.append(obj["metadata"]["name"])
            exc = ApiException(status=500, reason="Internal Server Error")
            exc.body = json.dumps({"kind": "Status", "message": "etcdserver: request timed out", "code": 500})
            raise exc
        return real_apply(self, obj, dry_run=dry_run)

    monkeypatch.setattr(Kube, "apply", flaky)  # the operator runs in this process
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
    ro = wait_for(lambda: (r := rollout(cluster, namespace)).get("phase") in ("Draining", "RolledBack") and r, 90,
                  what="switch or rollback")
    assert failed, "the error was injected"
    assert ro["phase"] == "Draining" and ro["servingGeneration"] != old and not ro.get("failedGeneration"), ro
    obj = get_dm(cluster, namespace)
    assert condition(obj, "Stalled")["status"] == "False"
    assert not any(r in ("RolledBack", "ApplyFailed") for r, _ in events_of(cluster, namespace))


def test_rollout_succeeded_is_true_again_after_a_revert_and_a_kept_rollback_annotation_acts_once(cluster, namespace, operator, pod_runner):
    serving = deploy(cluster, namespace, manifest(rollout={"paused": True}))["status"]["rollout"]["servingGeneration"]
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
    target = wait_phase(cluster, namespace, "Paused", timeout=60)["targetGeneration"]
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME,
                                                  {"metadata": {"annotations": {"serving.baton.dev/rollback": "true"}}})
    wait_phase(cluster, namespace, "RolledBack", timeout=60)
    assert condition(get_dm(cluster, namespace), "RolloutSucceeded")["status"] == "False"
    # Revert the spec (as a GitOps revert would): nothing failed any more, the rollout state is clean.
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": manifest()["spec"]["engine"]["kvCache"]["dtype"]}}})
    wait_for(lambda: condition(get_dm(cluster, namespace), "RolloutSucceeded").get("status") == "True", 60, what="RolloutSucceeded=True")
    ro = rollout(cluster, namespace)
    assert ro["phase"] == "Serving" and ro["servingGeneration"] == serving
    assert ro["targetGeneration"] == serving and ro["failedGeneration"] == ""
    # The rollback annotation, left in place, was handled once: the next rollout is not aborted by it.
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}, "rollout": {"paused": False}})
    def switched_or_rolled_back():
        r = rollout(cluster, namespace)
        return r if r.get("phase") == "RolledBack" or r.get("servingGeneration") == target else None

    ro = wait_for(switched_or_rolled_back, 90, what="the next rollout switched or rolled back")
    assert ro["phase"] != "RolledBack" and ro["servingGeneration"] == target, ro


def test_a_second_edit_mid_rollout_deletes_the_abandoned_generation(cluster, namespace, operator, pod_runner):
    m = manifest(rollout={"progressDeadline": "300s"})
    source = m["spec"]["model"]["source"]
    serving = deploy(cluster, namespace, m)["status"]["rollout"]["servingGeneration"]
    # A checkpoint that is not there: the first new generation can never start.
    patch_spec(cluster, namespace, {"model": {"source": {"huggingFace": None, "hostPath": {"path": "/nonexistent/model"}}}})
    broken = wait_phase(cluster, namespace, "Progressing", timeout=60)["targetGeneration"]
    wait_for(lambda: generations(cluster, namespace) == sorted([serving, broken]), 30, what="the broken generation created")
    # The user fixes it with another engine change before the deadline.
    patch_spec(cluster, namespace, {"model": {"source": {"hostPath": None, **source}}, "engine": {"kvCache": {"dtype": "fp8"}}})
    wait_for(lambda: broken not in generations(cluster, namespace), 30, what="the abandoned generation deleted")
    ro = wait_phase(cluster, namespace, "Serving", timeout=90)
    fixed = ro["servingGeneration"]
    assert fixed not in (serving, broken) and ro["lastKnownGood"]["generation"] == fixed
    assert generations(cluster, namespace) == [fixed]
    obj = get_dm(cluster, namespace)
    assert condition(obj, "RolloutSucceeded")["status"] == "True"


def test_an_engine_change_while_draining_drains_the_previous_generation_and_keeps_last_known_good(cluster, namespace, operator, pod_runner):
    g0 = deploy(cluster, namespace, manifest(rollout={"rollbackWindow": "120s"}))["status"]["rollout"]["servingGeneration"]
    patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
    g1 = wait_phase(cluster, namespace, "Draining", timeout=90)["servingGeneration"]
    # The next engine change, inside g1's rollback window: g1 is what serves, so it is the known-good one.
    patch_spec(cluster, namespace, {"prefill": {"engineOverrides": {"tokensPerBlock": 64}},
                                    "decode": {"engineOverrides": {"tokensPerBlock": 64}}})
    wait_for(lambda: rollout(cluster, namespace).get("lastKnownGood", {}).get("generation") == g1, 30, what="lastKnownGood = g1")
    wait_for(lambda: g0 not in generations(cluster, namespace), 60, what="g0 drained and deleted")
    ro = wait_for(lambda: (r := rollout(cluster, namespace)).get("servingGeneration") not in (g0, g1) and r, 90, what="g2 switched")
    assert ro["previousGeneration"] == g1 and ro["lastKnownGood"]["generation"] == g1, ro
    assert g0 not in generations(cluster, namespace)


def served_status(url, model):
    """The HTTP status the scheduler answers a request naming `model` with."""
    body = json.dumps({"model": model, "prompt": [1, 2, 3], "max_tokens": 2}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_model_name_change_reaches_the_scheduler_with_the_switch_not_before(cluster, namespace, operator, pod_runner):
    """The served model name belongs to a generation: while a rollout to a new name cannot complete (its
    engines never become Ready, then it is rolled back) clients' current name keeps working; once a new
    generation serves, its name is the one served."""
    serving = deploy(cluster, namespace, manifest(rollout={"progressDeadline": "10s"}))["status"]["rollout"]["servingGeneration"]
    with Traffic(cluster, namespace) as traffic:
        time.sleep(1)
        patch_spec(cluster, namespace, {"model": {"name": "llama-3.1-8b",
                                                  "source": {"huggingFace": None, "hostPath": {"path": "/nonexistent/model"}}}})
        wait_phase(cluster, namespace, "Progressing", timeout=30)
        ro = wait_phase(cluster, namespace, "RolledBack", timeout=90)
        time.sleep(5)  # a scheduler config changed meanwhile would have been reloaded by now
    assert ro["servingGeneration"] == serving
    assert traffic.outcomes["ok"] > 20 and traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    assert served_status(traffic.url, "llama-3-8b") == 200
    # A new generation with the new name that does become Ready: after the switch the new name is served.
    patch_spec(cluster, namespace, {"model": {"name": "llama-3.1-8b", "source": {"hostPath": None, "huggingFace": {
        "id": "meta-llama/Llama-3.1-8B-Instruct"}}}})
    wait_for(lambda: (ro := rollout(cluster, namespace)).get("servingGeneration") not in ("", serving) and ro, 120,
             what="the switch to the renamed generation")
    wait_for(lambda: served_status(traffic.url, "llama-3.1-8b") == 200, 60, what="the new model name served")
    assert served_status(traffic.url, "llama-3-8b") == 404


def test_a_runtime_change_rolls_to_triton_under_traffic_without_restarting_the_scheduler(cluster, namespace, operator, pod_runner):
    """trtllm-serve -> triton: a new generation of tritonserver pods (Triton-fronted simulators) is probed
    and switched to while requests flow; the scheduler follows the switch in the new runtime, reading each
    replica's runtime from its pod and reloading its config, with no failed request and no restart."""
    from test_data_plane_triton import MODEL_DIR, _triton_harness

    _triton_harness().triton_python()  # the PyTriton venv, made beforehand if this machine has none yet
    m = manifest(model={"source": {"hostPath": {"path": str(MODEL_DIR)}}})
    m["spec"]["decode"].update({"minReplicas": 1, "replicas": 1})
    m["spec"]["rollout"]["progressDeadline"] = "120s"
    old = deploy(cluster, namespace, m)["status"]["rollout"]["servingGeneration"]
    scheduler_pod = lambda: cluster.core.list_namespaced_pod(  # noqa: E731
        namespace, label_selector=f"baton.dev/model={NAME},baton.dev/tier=scheduler").items
    [before] = scheduler_pod()
    process = pod_runner.processes[f"{namespace}/{before.metadata.name}"].proc
    with Traffic(cluster, namespace) as traffic:
        time.sleep(1)
        patch_spec(cluster, namespace, {"engine": {"runtime": "triton"}})
        wait_phase(cluster, namespace, "Draining", timeout=150)
        switched = len(traffic.decode_endpoints)
        ro = wait_phase(cluster, namespace, "Serving", timeout=90)
        time.sleep(2)
    new = ro["servingGeneration"]
    assert new != old and ro["probe"]["passed"] is True
    assert traffic.outcomes["ok"] > 20 and traffic.failed() == 0, (traffic.outcomes, traffic.errors[:3])
    assert len(traffic.decode_endpoints) > switched, "no request was served after the switch"
    tiers = {p.metadata.labels["baton.dev/tier"]: p for p in cluster.core.list_namespaced_pod(
        namespace, label_selector=f"baton.dev/model={NAME},baton.dev/generation={new}").items}
    assert {tiers[t].spec.containers[0].command[0] for t in ("prefill", "decode")} == {"tritonserver"}
    # the requests after the switch went to the Triton pods
    decode_ip = tiers["decode"].status.pod_ip
    assert traffic.decode_endpoints[-1][1] == f"{decode_ip}:8000", traffic.decode_endpoints[-3:]
    [after] = scheduler_pod()
    assert after.metadata.uid == before.metadata.uid and process.poll() is None, "the scheduler was restarted"
    assert pod_runner.processes[f"{namespace}/{after.metadata.name}"].proc is process
    with urllib.request.urlopen(f"{traffic.url}/debug/state", timeout=5) as resp:
        state = json.loads(resp.read())
    assert {r["runtime"] for tier in ("prefill", "decode") for r in state[tier]} == {"triton"}, state


def test_a_triton_generation_is_kept_while_a_stream_runs_on_it_and_deleted_once_it_ends(cluster, namespace, operator, pod_runner):
    """Triton has no iteration records to say what runs on it: the operator keeps the draining generation,
    past its rollback window, for as long as the scheduler has a request on it, and deletes it once that ends."""
    from test_data_plane_triton import MODEL_DIR, _triton_harness

    _triton_harness().triton_python()
    m = manifest(model={"source": {"hostPath": {"path": str(MODEL_DIR)}}}, engine={"runtime": "triton"})
    m["spec"]["decode"].update({"minReplicas": 1, "replicas": 1,
                                # calibrated timing x3 on decode: thousands of tokens take minutes
                                "podTemplate": {"env": [{"name": "BATON_SIM_ARGS", "value": "--sim-speed 3"}]}})
    m["spec"]["rollout"].update({"progressDeadline": "120s", "rollbackWindow": "5s", "drainTimeout": "300s"})
    old = deploy(cluster, namespace, m)["status"]["rollout"]["servingGeneration"]
    url = Traffic(cluster, namespace, limit=0).url
    body = json.dumps({"model": "llama-3-8b", "prompt": list(range(1, 41)), "max_tokens": 6000, "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    stream = urllib.request.urlopen(request, timeout=60)
    assert stream.status == 200 and stream.readline().startswith(b"data: "), "the stream did not start"
    stop, lines, errors = threading.Event(), [0], []

    def read_on():
        try:
            while not stop.is_set():
                line = stream.readline()
                if not line:
                    errors.append("the stream ended")
                    return
                if b'"error"' in line:
                    errors.append(line.decode()[:300])
                lines[0] += 1
        except (OSError, ValueError, AttributeError) as exc:  # closed by us at the end (a closed response has no fp)
            if not stop.is_set():
                errors.append(repr(exc))

    reader = threading.Thread(target=read_on, daemon=True)
    reader.start()
    try:
        patch_spec(cluster, namespace, {"engine": {"kvCache": {"dtype": "fp8"}}})
        switched = wait_phase(cluster, namespace, "Draining", timeout=150)
        assert switched["servingGeneration"] != old
        time.sleep(12)  # the 5 s rollback window, and several drain passes after it
        ro = rollout(cluster, namespace)
        assert old in generations(cluster, namespace), ("the draining generation was deleted under a running stream", ro)
        assert ro["phase"] == "Draining" and "1 request(s) in flight" in ro["message"], ro
        assert not errors and reader.is_alive(), errors
        seen = lines[0]
        time.sleep(1)
        assert lines[0] > seen, "the stream stopped flowing"
    finally:
        stop.set()
        stream.close()  # the client leaves: nothing is in flight on the old generation any more
        reader.join(timeout=10)
    ro = wait_phase(cluster, namespace, "Serving", timeout=60)
    assert old not in generations(cluster, namespace)
    assert "drained" in ro["message"] and "drain timeout" not in ro["message"], ro
