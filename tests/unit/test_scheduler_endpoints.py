"""EndpointSlice parsing: ready pod IPs with their slice's port, fingerprints through targetRef."""

from __future__ import annotations

from kubernetes import client

from http1_harness import until

from baton.scheduler.endpoints import Endpoint, PodInfo, endpoints_from_slices, static_endpoints
from baton.scheduler.config import parse_config

SLICE = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "m-decode-abc12",
        "namespace": "ns",
        "labels": {"kubernetes.io/service-name": "m-decode", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
    },
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
    "endpoints": [
        {"addresses": ["127.244.1.7"], "conditions": {"ready": True, "serving": True, "terminating": False},
         "targetRef": {"kind": "Pod", "name": "m-decode-1", "namespace": "ns", "uid": "u1"}, "nodeName": "n1"},
        {"addresses": ["127.244.1.5"], "conditions": {"ready": True},
         "targetRef": {"kind": "Pod", "name": "m-decode-0", "namespace": "ns", "uid": "u0"}},
        {"addresses": ["127.244.2.9"], "conditions": {"ready": False, "serving": True, "terminating": True},
         "targetRef": {"kind": "Pod", "name": "m-decode-2", "namespace": "ns", "uid": "u2"}},
        {"addresses": ["127.244.2.10"], "conditions": {},  # nil ready means ready
         "targetRef": {"kind": "Pod", "name": "m-decode-3", "namespace": "ns", "uid": "u3"}},
    ],
}


class WatchOnlyCustomObjectsApi:
    """The model's API as discovery uses it: only watched (the watch itself is faked per test)."""

    def __init__(self, api_client):
        pass

    def list_namespaced_custom_object(self, *args, **kwargs):
        raise AssertionError("only watched")


def test_ready_endpoints_only_with_the_slices_port_sorted():
    out = endpoints_from_slices([SLICE], 8001, "decode")  # the slice's port, not the configured one
    assert [e.address for e in out] == ["127.244.1.5:8000", "127.244.1.7:8000", "127.244.2.10:8000"]
    assert all(e.tier == "decode" and e.fingerprint is None for e in out)
    assert out[0].pod == "m-decode-0"


def test_a_tier_port_changing_in_a_rolling_update_reaches_each_pod_on_its_own_port():
    """The tier Services target the pods' port by name, so Kubernetes puts pods whose `http` port differs
    in separate slices, each with its port: old pods are still dialled on the old port, new ones on the
    new. A slice that names no port (none published yet) gets the configured one."""
    old = {**SLICE, "endpoints": SLICE["endpoints"][:2]}
    new = {**SLICE, "metadata": {"name": "m-decode-new"}, "ports": [{"name": "http", "port": 9000, "protocol": "TCP"}],
           "endpoints": [SLICE["endpoints"][3]]}
    out = endpoints_from_slices([old, new], 9000, "decode")
    assert [e.address for e in out] == ["127.244.1.5:8000", "127.244.1.7:8000", "127.244.2.10:9000"]
    unnamed = {**SLICE, "ports": None, "endpoints": SLICE["endpoints"][:1]}
    assert [e.address for e in endpoints_from_slices([unnamed], 9000, "decode")] == ["127.244.1.7:9000"]


def test_fingerprint_and_generation_come_from_the_pod():
    info = {"m-decode-0": PodInfo("fpA", "g2"), "m-decode-1": PodInfo("fpB", "g1"), "m-decode-3": PodInfo()}
    calls = []

    def pod_info(name, uid):
        calls.append((name, uid))
        return info[name]

    out = endpoints_from_slices([SLICE], 8000, "decode", pod_info, generation="g2")
    # m-decode-1 belongs to another generation; unlabelled m-decode-3 is kept
    assert [(e.address, e.fingerprint, e.generation) for e in out] == [("127.244.1.5:8000", "fpA", "g2"),
                                                                       ("127.244.2.10:8000", None, None)]
    assert ("m-decode-0", "u0") in calls


def test_a_pairwise_swap_accepts_both_generations_and_no_other():
    info = {"m-decode-0": PodInfo("fpNew", "g2"), "m-decode-1": PodInfo("fpOld", "g1"), "m-decode-3": PodInfo()}
    out = endpoints_from_slices([SLICE], 8000, "decode", lambda name, uid: info[name], generation="g1,g2")
    assert sorted(e.fingerprint or "-" for e in out) == ["-", "fpNew", "fpOld"]
    out = endpoints_from_slices([SLICE], 8000, "decode", lambda name, uid: info[name], generation="g1,g3")
    assert sorted(e.fingerprint or "-" for e in out) == ["-", "fpOld"]


def test_multiple_slices_deduplicate_and_skip_fqdn():
    second = {**SLICE, "metadata": {"name": "m-decode-def34"}, "endpoints": [SLICE["endpoints"][0]]}
    fqdn = {"addressType": "FQDN", "endpoints": [{"addresses": ["db.example.com"], "conditions": {"ready": True}}]}
    out = endpoints_from_slices([SLICE, second, fqdn], 8000, "decode")
    assert len(out) == 3


def test_ipv6_addresses_are_bracketed():
    v6 = {"addressType": "IPv6", "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": True}}]}
    assert endpoints_from_slices([v6], 8000, "prefill") == [Endpoint("[fd00::5]:8000", "prefill")]


def test_kubernetes_client_models_are_accepted():
    model = client.V1EndpointSlice(
        address_type="IPv4",
        metadata=client.V1ObjectMeta(name="m-prefill-x", labels={"kubernetes.io/service-name": "m-prefill"}),
        endpoints=[
            client.V1Endpoint(addresses=["127.1.0.4"], conditions=client.V1EndpointConditions(ready=True),
                              target_ref=client.V1ObjectReference(kind="Pod", name="m-prefill-0", uid="p0")),
            client.V1Endpoint(addresses=["127.1.0.5"], conditions=client.V1EndpointConditions(ready=False)),
        ],
        ports=[client.DiscoveryV1EndpointPort(port=9999)],
    )
    out = endpoints_from_slices([model], 8000, "prefill", lambda name, uid: PodInfo("fp" + uid))
    assert out == [Endpoint("127.1.0.4:9999", "prefill", "fpp0", "m-prefill-0")]  # the slice's only port


def test_static_endpoints_from_config():
    cfg = parse_config('endpoints: {static: {prefill: ["a:1"], decode: [{address: "b:2", fingerprint: x}]}}')
    prefill, decode = static_endpoints(cfg.endpoints)
    assert prefill == [Endpoint("a:1", "prefill")]
    assert decode == [Endpoint("b:2", "decode", "x")]


def test_kubernetes_discovery_lists_watches_and_reads_fingerprints(monkeypatch):
    """The watch loop with the kubernetes client replaced by fakes: list, then a MODIFIED event."""
    import asyncio
    import threading

    from kubernetes import watch as k8s_watch

    from baton.scheduler.config import KubernetesEndpoints
    from baton.scheduler.endpoints import KubernetesDiscovery

    def slice_obj(name, ips):
        return client.V1EndpointSlice(
            address_type="IPv4", metadata=client.V1ObjectMeta(name=name),
            endpoints=[client.V1Endpoint(addresses=[ip], conditions=client.V1EndpointConditions(ready=True),
                                         target_ref=client.V1ObjectReference(kind="Pod", name=f"pod-{ip}", uid=ip))
                       for ip in ips])

    class FakeDiscoveryApi:
        def __init__(self, api_client):
            pass

        def list_namespaced_endpoint_slice(self, namespace, label_selector, **kw):
            svc = label_selector.split("=", 1)[1]
            return client.V1EndpointSliceList(items=[slice_obj(f"{svc}-a", [f"127.0.{len(svc)}.1"])],
                                              metadata=client.V1ListMeta(resource_version="1"))

    class FakeCoreApi:
        def __init__(self, api_client):
            pass

        def read_namespaced_pod(self, name, namespace, **kw):
            return client.V1Pod(metadata=client.V1ObjectMeta(name=name,
                                                             annotations={"baton.dev/kv-fingerprint": "fp-" + name}))

    stop = threading.Event()

    class FakeWatch:
        def stream(self, fn, namespace, label_selector, **kw):
            svc = label_selector.split("=", 1)[1]
            if svc == "m-decode":
                yield {"type": "MODIFIED", "object": slice_obj("m-decode-a", ["127.0.8.1", "127.0.8.2"])}
            stop.wait(5)

        def stop(self):
            pass

    monkeypatch.setattr(client, "DiscoveryV1Api", FakeDiscoveryApi)
    monkeypatch.setattr(client, "CoreV1Api", FakeCoreApi)
    monkeypatch.setattr(k8s_watch, "Watch", FakeWatch)

    async def main():
        updates = []
        done = asyncio.Event()

        def on_update(prefill, decode):
            updates.append((prefill, decode))
            if prefill and len(decode) == 2:
                done.set()

        disc = KubernetesDiscovery(KubernetesEndpoints(namespace="ns", prefill_service="m-prefill",
                                                       decode_service="m-decode", port=8000),
                                   on_update, asyncio.get_running_loop())
        disc._api_client = object()
        disc.start()
        await asyncio.wait_for(done.wait(), 5)
        disc.stop()
        stop.set()
        prefill, decode = updates[-1]
        assert [e.address for e in prefill] == ["127.0.9.1:8000"]
        assert [(e.address, e.fingerprint) for e in decode] == [("127.0.8.1:8000", "fp-pod-127.0.8.1"),
                                                                ("127.0.8.2:8000", "fp-pod-127.0.8.2")]

    asyncio.run(main())


def test_endpoints_from_pods_keeps_ready_running_pods_with_their_fingerprints():
    from baton.scheduler.endpoints import endpoints_from_pods

    def pod(name, ip, ready="True", deleting=False, fingerprint="fp1", generation=None):
        meta = {"name": name, "annotations": {"baton.dev/kv-fingerprint": fingerprint}, "labels": {}}
        if generation:
            meta["labels"]["baton.dev/generation"] = generation
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}

    pods = [pod("b", "127.64.0.2"), pod("a", "127.64.0.1"), pod("c", "127.64.0.3", ready="False"),
            pod("d", "127.64.0.4", deleting=True), pod("e", "", ready="True"), pod("f", "127.64.0.6", generation="g2")]
    eps = endpoints_from_pods(pods, 8000, "decode", generation="g1")
    assert [(e.address, e.pod, e.fingerprint) for e in eps] == [("127.64.0.1:8000", "a", "fp1"), ("127.64.0.2:8000", "b", "fp1")]
    both = endpoints_from_pods(pods, 8000, "decode", generation="g1,g2")
    assert [(e.pod, e.generation) for e in both] == [("a", None), ("b", None), ("f", "g2")]


def test_a_tier_change_during_a_generation_switch_is_not_overwritten_by_the_switchs_older_lists():
    """The generation watch and the tier watches are separate threads. A switch that is still reading
    pods when a tier changes must not publish its older view of that tier after the newer one."""
    import asyncio
    import threading
    import time

    from baton.scheduler.config import KubernetesEndpoints
    from baton.scheduler.endpoints import KubernetesDiscovery

    def slices(*ips):
        return {"s": {"addressType": "IPv4", "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": f"pod-{ip}", "uid": ip}}
            for ip in ips]}}

    generation_of = {"127.0.0.1": "old", "127.0.0.2": "new", "127.0.0.3": "new"}
    in_switch, release = threading.Event(), threading.Event()

    def pod_info(name, uid):
        if threading.current_thread().name == "switch" and not release.is_set():
            in_switch.set()  # the switch is mid-way through reading the decode tier's pods
            release.wait(5)
        return PodInfo(f"fp-{generation_of[uid]}", generation_of[uid])

    loop = asyncio.new_event_loop()
    published = []
    disc = KubernetesDiscovery(KubernetesEndpoints(namespace="ns", prefill_service="p", decode_service="d", port=8000),
                               lambda prefill, decode: published.append([e.address for e in decode]), loop)
    disc._pod_info = pod_info
    disc.generation = "old"
    disc._raw["prefill"] = ("slices", {})  # both tiers listed: discovery publishes nothing before
    disc._raw["decode"] = ("slices", slices("127.0.0.1", "127.0.0.2"))
    try:
        switch = threading.Thread(target=disc._switch, args=("new", ""), name="switch")
        switch.start()
        assert in_switch.wait(5)
        tier = threading.Thread(target=disc._update_tier, args=("decode", "slices", slices("127.0.0.2", "127.0.0.3")))
        tier.start()
        time.sleep(0.2)
        release.set()
        switch.join(5)
        tier.join(5)
        loop.run_until_complete(asyncio.sleep(0))  # run the queued on_update calls in order
    finally:
        loop.close()
    assert published[-1] == ["127.0.0.2:8000", "127.0.0.3:8000"], published


def test_a_stopped_discovery_publishes_nothing_even_what_it_queued_before_stopping():
    """A config reload stops the old discovery and starts a new one; a watch thread of the old one that
    was mid-way (or whose lists are still queued for the loop) must not overwrite the new one's lists."""
    import asyncio

    from baton.scheduler.config import KubernetesEndpoints
    from baton.scheduler.endpoints import KubernetesDiscovery

    loop = asyncio.new_event_loop()
    published = []
    disc = KubernetesDiscovery(KubernetesEndpoints(namespace="ns", prefill_service="p", decode_service="d", port=8000),
                               lambda prefill, decode: published.append([e.address for e in decode]), loop)
    disc._pod_info = lambda name, uid: PodInfo()
    one = {"s": {"addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]}}
    try:
        disc._update_tier("decode", "slices", one)  # queued for the loop ...
        disc.stop()  # ... then the reload stops this discovery before the loop ran it
        disc._update_tier("decode", "slices", one)  # a watch thread past its stop check
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert published == []


def test_kubernetes_discovery_dials_each_tier_on_its_own_port():
    """prefillPort and decodePort from the config, for both sources (EndpointSlices and pods); `port` is
    the default for a tier without its own."""
    import asyncio

    from baton.scheduler.config import KubernetesEndpoints
    from baton.scheduler.endpoints import KubernetesDiscovery

    slices = {"s": {"addressType": "IPv4", "endpoints": [
        {"addresses": ["127.0.0.7"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "pod-7", "uid": "u7"}}]}}
    pods = {"pod-7": {"metadata": {"name": "pod-7"},
                      "status": {"podIP": "127.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]}}}

    def addresses(config):
        loop = asyncio.new_event_loop()
        try:
            disc = KubernetesDiscovery(config, lambda prefill, decode: None, loop)
            disc._pod_info = lambda name, uid: PodInfo()
            return {(tier, kind): [e.address for e in disc._tier_endpoints(tier, kind, objects)]
                    for tier in ("prefill", "decode") for kind, objects in (("slices", slices), ("pods", pods))}
        finally:
            loop.close()

    per_tier = KubernetesEndpoints(namespace="ns", prefill_service="p", decode_service="d", port=9000,
                                   prefill_port=8001, decode_port=8000)
    assert addresses(per_tier) == {("prefill", "slices"): ["127.0.0.7:8001"], ("prefill", "pods"): ["127.0.0.7:8001"],
                                   ("decode", "slices"): ["127.0.0.7:8000"], ("decode", "pods"): ["127.0.0.7:8000"]}
    one_port = KubernetesEndpoints(namespace="ns", prefill_service="p", decode_service="d", port=9000)
    assert set(map(tuple, addresses(one_port).values())) == {("127.0.0.7:9000",)}


def test_endpoints_from_pods_use_each_pods_http_port():
    from baton.scheduler.endpoints import endpoints_from_pods

    def pod(name, ip, port=None):
        containers = [{"name": "sidecar", "ports": [{"name": "http", "containerPort": 1234}]},
                      {"name": "engine", "ports": [{"name": "http", "containerPort": port}] if port else []}]
        return {"metadata": {"name": name}, "spec": {"containers": containers},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}

    eps = endpoints_from_pods([pod("a", "127.64.0.1", 8000), pod("b", "127.64.0.2", 9000)], 9000, "decode")
    assert [e.address for e in eps] == ["127.64.0.1:8000", "127.64.0.2:9000"]


def test_a_pod_that_cannot_be_read_is_left_out_until_it_can_and_a_forbidden_read_is_not(monkeypatch):
    """A pod read that fails (the API server throttling during a rollout) leaves the endpoint out: with its
    generation and KV format unknown it could be paired across them. Its tier is computed again shortly
    after, without waiting for the next watch event. Reading pods forbidden (standalone, no RBAC) is the
    documented exception: the pod is used, without a fingerprint."""
    import asyncio

    from kubernetes.client.exceptions import ApiException

    from baton.scheduler import endpoints as endpoints_module
    from baton.scheduler.config import KubernetesEndpoints
    from baton.scheduler.endpoints import KubernetesDiscovery

    monkeypatch.setattr(endpoints_module, "POD_LOOKUP_RETRY_S", 0.05)
    failures = {"pod-2": [429], "pod-3": [403] * 3}  # a forbidden read is not cached: read again each time

    class FakeCoreApi:
        def __init__(self, api_client):
            pass

        def read_namespaced_pod(self, name, namespace, **kw):
            if failures.get(name):
                raise ApiException(status=failures[name].pop(0), reason="refused")
            return client.V1Pod(metadata=client.V1ObjectMeta(
                name=name, labels={"baton.dev/generation": "g1"}, annotations={"baton.dev/kv-fingerprint": "fp"}))

    monkeypatch.setattr(client, "CoreV1Api", FakeCoreApi)

    def slices(*ips):
        return {"s": {"addressType": "IPv4", "endpoints": [
            {"addresses": [f"127.0.0.{i}"], "conditions": {"ready": True},
             "targetRef": {"kind": "Pod", "name": f"pod-{i}", "uid": f"u{i}"}} for i in ips]}}

    async def main():
        published = []
        disc = KubernetesDiscovery(KubernetesEndpoints(namespace="ns", prefill_service="p", decode_service="d",
                                                       port=8000), lambda p, d: published.append(d),
                                   asyncio.get_running_loop())
        disc._api_client = object()
        disc.generation = "g1"
        disc._update_tier("prefill", "slices", slices(1))
        disc._update_tier("decode", "slices", slices(2, 3))
        await asyncio.sleep(0)
        assert [(e.pod, e.fingerprint) for e in published[-1]] == [("pod-3", None)]  # pod-2 unknown: left out
        # the retry, with no watch event
        await until(lambda: [(e.pod, e.fingerprint) for e in published[-1]] == [("pod-2", "fp"), ("pod-3", None)],
                    what="pod-2 published once its pod could be read")
        disc.stop()

    asyncio.run(main())


def test_discovery_publishes_nothing_before_it_knows_both_tiers_and_the_serving_generation(monkeypatch):
    """A scheduler that starts (or follows a reload that changes `endpoints`) never routes with one tier
    missing or to a generation that does not serve: discovery publishes only once both tiers were listed
    and the model was read; a reload keeps the running discovery's serving generation and the replicas'
    load."""
    import asyncio
    import threading
    import time

    from kubernetes import watch as k8s_watch

    from baton.scheduler import endpoints as endpoints_module
    from baton.scheduler.config import parse_config
    from baton.scheduler.service import SchedulerService
    from test_scheduler_service import FakeEngine

    stop = threading.Event()
    generation_of = {"m-prefill-g1-0": "g1", "m-decode-g1-0": "g1", "m-decode-g2-0": "g2"}
    ip_of = {"m-prefill-g1-0": "127.0.0.1", "m-decode-g1-0": "127.0.1.1", "m-decode-g2-0": "127.0.1.2"}

    def slice_for(service):
        tier = service.rsplit("-", 1)[1]
        return client.V1EndpointSlice(
            address_type="IPv4", metadata=client.V1ObjectMeta(name=service + "-x"),
            ports=[client.DiscoveryV1EndpointPort(name="http", port=8000)],
            endpoints=[client.V1Endpoint(addresses=[ip_of[p]], conditions=client.V1EndpointConditions(ready=True),
                                         target_ref=client.V1ObjectReference(kind="Pod", name=p, uid=p))
                       for p in generation_of if f"-{tier}-" in p])

    class FakeDiscoveryApi:
        def __init__(self, api_client):
            pass

        def list_namespaced_endpoint_slice(self, namespace, label_selector, **kw):
            service = label_selector.split("=", 1)[1]
            if service.endswith("decode"):
                time.sleep(0.1)  # the decode tier is listed later than the prefill tier
            return client.V1EndpointSliceList(items=[slice_for(service)], metadata=client.V1ListMeta(resource_version="1"))

    class FakeCoreApi:
        def __init__(self, api_client):
            pass

        def read_namespaced_pod(self, name, namespace, **kw):
            return client.V1Pod(metadata=client.V1ObjectMeta(name=name, labels={"baton.dev/generation": generation_of[name]},
                                                             annotations={"baton.dev/kv-fingerprint": "fp"}))

    class FakeWatch:
        def stream(self, fn, *args, **kwargs):
            if fn.__name__ == "list_namespaced_custom_object":
                time.sleep(0.3)  # the model is read last
                yield {"type": "ADDED", "object": {"status": {"rollout": {"servingGeneration": "g1"}}}}
            stop.wait(5)
            return
            yield

        def stop(self):
            pass

    monkeypatch.setattr(client, "DiscoveryV1Api", FakeDiscoveryApi)
    monkeypatch.setattr(client, "CoreV1Api", FakeCoreApi)
    monkeypatch.setattr(client, "CustomObjectsApi", WatchOnlyCustomObjectsApi)
    monkeypatch.setattr(k8s_watch, "Watch", FakeWatch)
    monkeypatch.setattr(endpoints_module.KubernetesDiscovery, "_client", lambda self: object())
    config = ("model: m\nendpoints: {discovery: kubernetes, kubernetes: {namespace: ns, prefillService: m-prefill, "
              "decodeService: m-decode, model: m, decodePort: %d}}\n")

    async def main():
        svc = SchedulerService(parse_config(config % 8000), engine=FakeEngine())
        seen = []
        update = svc.update_endpoints
        svc.update_endpoints = lambda p, d: (seen.append(([e.pod for e in p], [e.pod for e in d])), update(p, d))
        await svc.start()
        await until(lambda: seen, 3, "the first lists")
        assert seen == [(["m-prefill-g1-0"], ["m-decode-g1-0"])]  # both tiers, the serving generation only
        svc.decode["127.0.1.1:8000"].active = 7  # sequences in flight
        seen.clear()
        svc.apply_config(parse_config(config % 8001))  # the operator re-rendered the config
        await until(lambda: seen, 3, "the lists after the reload")
        await asyncio.sleep(0.2)
        assert seen and all(lists == (["m-prefill-g1-0"], ["m-decode-g1-0"]) for lists in seen), seen
        assert svc.decode["127.0.1.1:8000"].active == 7
        stop.set()
        await svc.stop()

    from http1_harness import until
    asyncio.run(main())


def test_a_model_that_cannot_be_found_is_said_so_while_nothing_is_published(monkeypatch, caplog):
    """With `model` set nothing is published before the model is read; a model that does not exist (a wrong
    name or namespace) must not leave the scheduler silently without endpoints."""
    import asyncio
    import logging
    import threading

    from kubernetes import watch as k8s_watch

    from baton.scheduler import endpoints as endpoints_module
    from baton.scheduler.config import KubernetesEndpoints
    from baton.scheduler.endpoints import KubernetesDiscovery

    stop = threading.Event()

    class FakeDiscoveryApi:
        def __init__(self, api_client):
            pass

        def list_namespaced_endpoint_slice(self, namespace, label_selector, **kw):
            return client.V1EndpointSliceList(items=[], metadata=client.V1ListMeta(resource_version="1"))

    class FakeWatch:
        def stream(self, fn, *args, **kwargs):
            stop.wait(0.1 if fn.__name__ == "list_namespaced_custom_object" else 5)  # a watch period, no event
            return
            yield

        def stop(self):
            pass

    monkeypatch.setattr(client, "DiscoveryV1Api", FakeDiscoveryApi)
    monkeypatch.setattr(client, "CustomObjectsApi", WatchOnlyCustomObjectsApi)
    monkeypatch.setattr(k8s_watch, "Watch", FakeWatch)
    monkeypatch.setattr(endpoints_module.KubernetesDiscovery, "_client", lambda self: object())

    async def main():
        published = []
        disc = KubernetesDiscovery(KubernetesEndpoints(namespace="ns", prefill_service="p", decode_service="d",
                                                       model="no-such-model"),
                                   lambda p, d: published.append((p, d)), asyncio.get_running_loop())
        with caplog.at_level(logging.WARNING, logger="baton.scheduler.endpoints"):
            disc.start()
            await asyncio.sleep(0.5)
            disc.stop()
            stop.set()
        assert published == []
        assert "event=model_not_found model=no-such-model namespace=ns" in caplog.text

    asyncio.run(main())


def test_a_watch_connection_gone_silent_is_given_up_and_listed_again_and_a_hung_pod_read_ends(tmp_path, monkeypatch):
    """An API server (on loopback) that answers the lists but then sends nothing on the watch connections, as a
    dead peer behind a lost NAT entry looks: the server-side timeout never comes, so only the client's own
    read limit ends the watch and gets the tier listed again. A pod read that hangs likewise ends, so a
    generation switch waiting for the publish lock goes out."""
    import asyncio
    import http.server
    import json
    import threading
    import time

    from baton.scheduler.config import KubernetesEndpoints
    from baton.scheduler.endpoints import KubernetesDiscovery

    calls = {"list": 0, "watch": 0}
    hang_pods = threading.Event()
    release = threading.Event()

    class Api(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _silent(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            release.wait(30)

        def do_GET(self):
            if "/endpointslices" in self.path:
                if "watch=" in self.path:
                    calls["watch"] += 1
                    return self._silent()
                calls["list"] += 1
                pod = "p-0" if "svc-p" in self.path else "d-0"
                return self._json({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                   "metadata": {"resourceVersion": "1"}, "items": [{
                                       "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                                       "addressType": "IPv4", "metadata": {"name": pod, "resourceVersion": "1"},
                                       "ports": [{"name": "http", "port": 8000}],
                                       "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                                                      "targetRef": {"kind": "Pod", "name": pod, "uid": pod}}]}]})
            if "/pods/" in self.path:
                if hang_pods.is_set():
                    release.wait(30)
                    return
                name = self.path.rsplit("/", 1)[1].split("?")[0]
                return self._json({"kind": "Pod", "apiVersion": "v1", "metadata": {
                    "name": name, "uid": name, "labels": {"baton.dev/generation": "g1"}}})
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from kubernetes.config import kube_config

    kubeconfig = tmp_path / "kubeconfig"  # the discovery's own client (`_client`), pointed at the fake API server
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "fake", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    async def main():
        disc = KubernetesDiscovery(KubernetesEndpoints(namespace="ns", prefill_service="svc-p", decode_service="svc-d",
                                                       port=8000), lambda p, d: None, asyncio.get_running_loop())
        disc.WATCH_TIMEOUT_S = 30  # asked of the server, which never honours it here
        disc.WATCH_READ_TIMEOUT_S = 1.0
        disc.CALL_TIMEOUT = (1.0, 1.0)
        disc.generation = "g1"
        disc.start()
        deadline = time.monotonic() + 15
        while calls["list"] < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert calls["list"] >= 4 and calls["watch"] >= 2, calls  # each tier listed again after its silent watch
        hang_pods.set()
        with disc._lock:
            disc._pods.clear()
        started = time.monotonic()
        await asyncio.to_thread(disc._switch, "g2", "")  # recomputes both tiers: their pod reads hang
        assert disc.generation == "g2" and time.monotonic() - started < 10
        disc.stop()

    try:
        asyncio.run(main())
    finally:
        release.set()
        server.shutdown()
        client.Configuration.set_default(None)  # load_kube_config made the fake API server the default
