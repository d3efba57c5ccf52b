"""The full path on the local cluster: operator -> StatefulSets -> pod runner -> scheduler discovers
the engines from EndpointSlices -> requests served through both tiers."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from kubernetes import watch

from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from cluster_plugin import load_example, wait_for

pytestmark = pytest.mark.cluster


def _ready_model(cluster, namespace, name):
    obj = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    status = obj.get("status") or {}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    return obj if ready and status.get("observedGeneration") == obj["metadata"]["generation"] else None


def _post(url, body, headers=None, timeout=60):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read().decode()


def _scheduler_url(cluster, namespace, name):
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"baton.dev/model={name},baton.dev/tier=scheduler").items
    pod = next(p for p in pods if p.status.pod_ip and p.metadata.deletion_timestamp is None)
    return f"http://{pod.status.pod_ip}:8000"


def _scheduler_ready(url):
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class ReadyHistory:
    """Every Ready condition the namespace's pods went through, from a watch started before they exist."""

    def __init__(self, cluster, namespace):
        self.cluster, self.namespace = cluster, namespace
        self.seen: list[tuple[str, str, str | None, str]] = []  # (pod, Ready status, reason, pod IP)
        self._watch = watch.Watch()

    def _run(self, version):
        try:
            for event in self._watch.stream(self.cluster.core.list_namespaced_pod, self.namespace,
                                            resource_version=version, timeout_seconds=180):
                pod = event["object"]
                ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
                if ready is not None:
                    self.seen.append((pod.metadata.name, ready.status, ready.reason, pod.status.pod_ip or ""))
        except Exception:
            if not self._stopped:
                raise

    def __enter__(self):
        self._stopped = False
        version = self.cluster.core.list_namespaced_pod(self.namespace).metadata.resource_version
        self._thread = threading.Thread(target=self._run, args=(version,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stopped = True
        self._watch.stop()


def test_requests_flow_through_the_scheduler_to_engines_the_operator_created(cluster, namespace, operator, pod_runner):
    manifest = load_example("small.yaml")
    # Low thresholds so a 600-token prompt must take the prefill tier.
    manifest["spec"]["scheduler"].update({"localPrefillBelowTokens": 100, "alwaysPrefillAtOrAboveTokens": 200})
    manifest["spec"]["decode"].update({"minReplicas": 2, "replicas": 2})
    with ReadyHistory(cluster, namespace) as history:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        wait_for(lambda: _ready_model(cluster, namespace, "llama-8b"), 120, what="model Ready with real processes behind it")

    # Readiness reflects the processes: every Baton pod's Ready comes from the runner's probe.
    pods = cluster.core.list_namespaced_pod(namespace, label_selector="baton.dev/model=llama-8b").items
    assert len(pods) == 4
    for pod in pods:
        ready = next(c for c in pod.status.conditions if c.type == "Ready")
        assert ready.status == "True" and ready.reason == "ProbeSucceeded", (pod.metadata.name, ready)
        # ...and never from anything else, not even for a moment: a pod that was Ready before its own
        # process answered could be handed requests by whatever still listened at its IP.
        states = [(status, reason) for name, status, reason, _ in history.seen if name == pod.metadata.name]
        assert ("False", "ReadinessProbePending") in states, states
        assert {reason for status, reason in states if status == "True"} == {"ProbeSucceeded"}, states

    url = _scheduler_url(cluster, namespace, "llama-8b")
    assert url.startswith("http://127.")
    wait_for(lambda: _scheduler_ready(url), 60, what="scheduler /readyz (endpoints discovered)")

    # Short prompt: context and generation on one decode replica.
    status, headers, body = _post(f"{url}/v1/completions", {"model": "llama-3-8b", "prompt": "Hello there", "max_tokens": 8})
    assert status == 200 and headers["X-Baton-Route"] == "local"
    decode_ips = {p.status.pod_ip for p in pods if p.metadata.labels["baton.dev/tier"] == "decode"}
    assert headers["X-Baton-Decode-Endpoint"].split(":")[0] in decode_ips
    assert json.loads(body)["usage"]["completion_tokens"] == 8

    # Long prompt: context_only on the prefill tier, KV pulled by a paired decode replica.
    status, headers, body = _post(f"{url}/v1/completions", {"model": "llama-3-8b", "prompt": list(range(1, 601)), "max_tokens": 5})
    assert status == 200 and headers["X-Baton-Route"] == "disaggregated"
    prefill_ip = next(p.status.pod_ip for p in pods if p.metadata.labels["baton.dev/tier"] == "prefill")
    assert headers["X-Baton-Prefill-Endpoint"] == f"{prefill_ip}:8000"
    assert headers["X-Baton-Decode-Endpoint"].split(":")[0] in decode_ips
    assert json.loads(body)["usage"]["prompt_tokens"] == 600

    # Streaming through the scheduler.
    request = urllib.request.Request(f"{url}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "llama-3-8b", "prompt": list(range(1, 601)), "max_tokens": 4, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as resp:
        events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 5


def test_a_killed_decode_engine_is_marked_unready_and_comes_back(cluster, namespace, operator, pod_runner):
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, load_example("small.yaml"))
    wait_for(lambda: _ready_model(cluster, namespace, "llama-8b"), 120, what="model Ready")
    decode_pod = cluster.core.list_namespaced_pod(namespace, label_selector="baton.dev/model=llama-8b,baton.dev/tier=decode").items[0].metadata.name
    pod_runner.kill(namespace, decode_pod)

    def decode_pod_ready(expected):
        pod = cluster.core.read_namespaced_pod(decode_pod, namespace)
        return next(c.status for c in pod.status.conditions if c.type == "Ready") == expected

    wait_for(lambda: decode_pod_ready("False"), 30, what="pod Ready=False after its process died")
    wait_for(lambda: decode_pod_ready("True"), 60, what="process restarted and Ready again")
    wait_for(lambda: _ready_model(cluster, namespace, "llama-8b"), 60, what="model Ready again")


def test_the_scheduler_counts_text_with_the_tokenizer_of_the_checkpoint_it_mounts(cluster, namespace, operator, pod_runner, tmp_path):
    """`spec.scheduler.tokenizer: model` on the local cluster: the scheduler reads tokenizer.json from the
    hostPath checkpoint the engines load, so both count a text prompt alike and routing follows the real
    length; a Hugging Face model, which the cluster cannot fetch, leaves the scheduler pod unready with
    the reason rather than letting it reach out to the Hub."""
    from baton.model_tokenizer import load_tokenizer
    from baton.podrunner.runner import packaged_models_root
    from baton.tokens import BYTES_PER_TOKEN
    from tokenizer_fixture import WORDS, model_dir_with_tokenizer

    checkpoint = model_dir_with_tokenizer(tmp_path / "checkpoint",
                                          packaged_models_root() / "meta-llama/Llama-3.1-8B-Instruct/config.json")
    threshold = 150
    exact = load_example("small.yaml")
    exact["metadata"]["name"] = "tok-hostpath"
    exact["spec"]["model"]["source"] = {"hostPath": {"path": str(checkpoint)}}
    exact["spec"]["scheduler"].update({"tokenizer": "model", "localPrefillBelowTokens": threshold,
                                       "alwaysPrefillAtOrAboveTokens": threshold})
    hub = load_example("small.yaml")
    hub["metadata"]["name"] = "tok-hub"
    hub["spec"]["scheduler"]["tokenizer"] = "model"
    for manifest in (exact, hub):
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    wait_for(lambda: _ready_model(cluster, namespace, "tok-hostpath"), 120, what="model Ready")
    url = _scheduler_url(cluster, namespace, "tok-hostpath")
    wait_for(lambda: _scheduler_ready(url), 60, what="scheduler /readyz")

    text = " ".join(WORDS * 5)
    real = load_tokenizer(checkpoint).count_text(text)
    assert real < threshold <= -(-len(text.encode()) // BYTES_PER_TOKEN)  # the estimate would go to prefill
    status, headers, body = _post(f"{url}/v1/completions", {"model": "llama-3-8b", "prompt": text, "max_tokens": 4})
    assert status == 200 and headers["X-Baton-Route"] == "local", headers
    assert json.loads(body)["usage"]["prompt_tokens"] == real  # counted by the engine, from the same files

    def hub_scheduler_refused():
        pods = cluster.core.list_namespaced_pod(
            namespace, label_selector="baton.dev/model=tok-hub,baton.dev/tier=scheduler").items
        conditions = [c for p in pods for c in p.status.conditions or [] if c.type == "Ready"]
        return next((c for c in conditions if c.reason == "CannotRunLocally"), None)

    refused = wait_for(hub_scheduler_refused, 60, what="the Hub-tokenizer scheduler pod marked CannotRunLocally")
    assert refused.status == "False"
    assert "meta-llama/Llama-3.1-8B-Instruct" in refused.message and "Hugging Face Hub" in refused.message
    assert "tokenizer: estimate" in refused.message


def test_a_rotated_redis_url_secret_reaches_the_running_scheduler(cluster, namespace, operator, pod_runner, redis_server):
    """`redisUrlSecret`: the URL reaches the scheduler from the Secret (never the ConfigMap), and when the
    Secret is rotated the same scheduler process moves to the new Redis, with no restart and no new pod."""
    db0, db1 = redis_server.url, redis_server.url[:-1] + "1"
    cluster.core.create_namespaced_secret(namespace, {"metadata": {"name": "hold-store"}, "stringData": {"url": db0}})
    manifest = load_example("small.yaml")
    manifest["metadata"]["name"] = "redis-holds"
    manifest["spec"]["scheduler"]["degradation"] = {"store": "redis", "redisUrlSecret": {"name": "hold-store"}}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    wait_for(lambda: _ready_model(cluster, namespace, "redis-holds"), 120, what="model Ready")
    url = _scheduler_url(cluster, namespace, "redis-holds")
    wait_for(lambda: _scheduler_ready(url), 60, what="scheduler /readyz")
    config_map = cluster.core.read_namespaced_config_map("redis-holds-scheduler", namespace)
    assert "redis://" not in config_map.data["config.yaml"]

    def hold_store():
        with urllib.request.urlopen(f"{url}/debug/state", timeout=5) as resp:
            return json.loads(resp.read())["holdStore"]

    assert hold_store()["redis"] == db0
    pods = cluster.core.list_namespaced_pod(namespace, label_selector="baton.dev/model=redis-holds,baton.dev/tier=scheduler").items
    assert len(pods) == 1
    process = pod_runner.processes[f"{namespace}/{pods[0].metadata.name}"]
    pid = process.proc.pid

    def reloads():
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            lines = resp.read().decode().splitlines()
        return {result: next((float(line.split()[-1]) for line in lines
                              if line.startswith(f'baton_scheduler_config_reloads_total{{result="{result}"}}')), 0.0)
                for result in ("applied", "rejected")}

    before = reloads()

    cluster.core.patch_namespaced_secret("hold-store", namespace, {"stringData": {"url": db1}})
    wait_for(lambda: hold_store()["redis"] == db1, 60, what="the scheduler on the rotated Secret's Redis")
    assert process.proc.pid == pid and process.restarts == 0, "the scheduler was restarted"
    after = cluster.core.list_namespaced_pod(namespace, label_selector="baton.dev/model=redis-holds,baton.dev/tier=scheduler").items
    assert [p.metadata.uid for p in after] == [pods[0].metadata.uid], "a new scheduler pod"
    assert reloads() == {"applied": before["applied"] + 1, "rejected": before["rejected"]}
    status, headers, body = _post(f"{url}/v1/completions", {"model": "llama-3-8b", "prompt": list(range(1, 601)), "max_tokens": 4})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4
