"""The scheduler's Kubernetes discovery against the real API server, with the RBAC the operator renders
for it: EndpointSlices of the two tier Services, fingerprints and generations from the pods the slices
point at, and the serving generation from the model's status.

On the local cluster the EndpointSlice controller cannot fill slices (the API server refuses loopback
addresses, and every pod here has one), so the test writes the slices itself, with addresses from
192.0.2.0/24 (TEST-NET-1, documentation only). Nothing connects to them: only the discovery component
runs (no scheduler, so no heartbeats); it reads API objects and reports endpoint lists.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml
from cluster_plugin import REPO, Cluster

from baton.api.v1alpha1 import DisaggregatedModel
from baton.render.naming import Target
from baton.render.scheduler import role, role_binding, service_account
from baton.scheduler.config import KubernetesEndpoints
from baton.scheduler.endpoints import FINGERPRINT_ANNOTATION, GENERATION_LABEL, KubernetesDiscovery

pytestmark = pytest.mark.cluster

MODEL = "m"
PORT = 8000


def _scheduler_identity(cluster: Cluster, namespace: str) -> Any:
    """An API client authenticated as the scheduler's ServiceAccount, bound to the Role the operator renders."""
    from kubernetes import client

    spec = yaml.safe_load((REPO / "examples" / "small.yaml").read_text())["spec"]
    target = Target(name=MODEL, namespace=namespace, uid="u", spec=DisaggregatedModel.model_validate(
        {"apiVersion": "serving.baton.dev/v1alpha1", "kind": "DisaggregatedModel", "metadata": {"name": MODEL},
         "spec": spec}).spec)
    for obj in (service_account(target), role(target), role_binding(target)):
        obj = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}}
        if obj["kind"] == "ServiceAccount":
            cluster.core.create_namespaced_service_account(namespace, obj)
        elif obj["kind"] == "Role":
            client.RbacAuthorizationV1Api(cluster.api_client).create_namespaced_role(namespace, obj)
        else:
            client.RbacAuthorizationV1Api(cluster.api_client).create_namespaced_role_binding(namespace, obj)
    sa = service_account(target)["metadata"]["name"]
    token = cluster.core.create_namespaced_service_account_token(
        sa, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    admin = cluster.api_client.configuration
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert, cfg.verify_ssl = admin.host, admin.ssl_ca_cert, admin.verify_ssl
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def _pod(name: str, fingerprint: str, generation: str) -> dict[str, Any]:
    # Never scheduled (no node matches): only its metadata matters to discovery.
    return {"metadata": {"name": name, "labels": {GENERATION_LABEL: generation},
                         "annotations": {FINGERPRINT_ANNOTATION: fingerprint}},
            "spec": {"nodeSelector": {"baton.dev/test": "no-such-node"},
                     "containers": [{"name": "engine", "image": "registry.invalid/engine:0"}]}}


def _slice(name: str, service: str, endpoints: list[tuple[str, str, bool]]) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/service-name": service,
                                                  "endpointslice.kubernetes.io/managed-by": "baton-test"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                           "targetRef": {"kind": "Pod", "name": pod, "namespace": ""}}
                          for ip, pod, ready in endpoints]}


def test_endpointslice_discovery_with_the_schedulers_own_rbac(cluster, namespace):
    from kubernetes import client

    discovery_api = client.DiscoveryV1Api(cluster.api_client)
    for name in ("m-prefill", "m-decode"):  # Services without selectors: their slices are ours to write
        cluster.core.create_namespaced_service(namespace, {"metadata": {"name": name},
                                                           "spec": {"ports": [{"name": "http", "port": PORT}]}})
    pods = {"p-g1": ("fp-a", "g1"), "d1-g1": ("fp-a", "g1"), "d2-g1": ("fp-a", "g1"),
            "p-g2": ("fp-b", "g2"), "d1-g2": ("fp-b", "g2")}
    uids = {}
    for name, (fingerprint, generation) in pods.items():
        uids[name] = cluster.core.create_namespaced_pod(namespace, _pod(name, fingerprint, generation)).metadata.uid

    def write_slice(name, service, endpoints):
        body = _slice(name, service, endpoints)
        for ep, (_, pod, _) in zip(body["endpoints"], endpoints):
            ep["targetRef"].update(namespace=namespace, uid=uids[pod])
        try:
            discovery_api.create_namespaced_endpoint_slice(namespace, body)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            discovery_api.replace_namespaced_endpoint_slice(
                name, namespace, {**body, "metadata": {**body["metadata"], "resourceVersion":
                                  discovery_api.read_namespaced_endpoint_slice(name, namespace).metadata.resource_version}})

    write_slice("m-prefill-a", "m-prefill", [("192.0.2.10", "p-g1", True), ("192.0.2.11", "p-g2", True)])
    write_slice("m-decode-a", "m-decode", [("192.0.2.20", "d1-g1", True), ("192.0.2.21", "d2-g1", True)])
    write_slice("m-decode-b", "m-decode", [("192.0.2.30", "d1-g2", True)])
    dm = yaml.safe_load((REPO / "examples" / "small.yaml").read_text())
    dm["metadata"] = {"name": MODEL}
    custom = cluster.custom
    custom.create_namespaced_custom_object("serving.baton.dev", "v1alpha1", namespace, "disaggregatedmodels", dm)

    def serve_generation(serving: str, swap: str = "") -> None:
        rollout: dict[str, Any] = {"servingGeneration": serving}
        if swap:
            rollout["swap"] = {"generation": swap}
        custom.patch_namespaced_custom_object_status("serving.baton.dev", "v1alpha1", namespace, "disaggregatedmodels",
                                                     MODEL, {"status": {"rollout": rollout}})

    serve_generation("g1")
    api = _scheduler_identity(cluster, namespace)

    async def main() -> None:
        seen: list[tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]] = []
        changed = asyncio.Event()

        def on_update(prefill, decode):
            seen.append(([(e.address, e.fingerprint) for e in prefill], [(e.address, e.fingerprint) for e in decode]))
            changed.set()

        async def until(prefill, decode, what):
            async def match():
                while not seen or seen[-1] != (prefill, decode):
                    changed.clear()
                    await changed.wait()
            try:
                await asyncio.wait_for(match(), 30)
            except asyncio.TimeoutError:
                raise AssertionError(f"discovery never reported {what}; last: {seen[-1] if seen else None}") from None

        config = KubernetesEndpoints(namespace=namespace, prefill_service="m-prefill", decode_service="m-decode",
                                     port=PORT, model=MODEL)
        discovery = KubernetesDiscovery(config, on_update, asyncio.get_running_loop())
        discovery.source = "endpointslices"  # whatever BATON_DISCOVERY_SOURCE this process has: the real path
        discovery._api_client = api  # noqa: SLF001 - the scheduler's ServiceAccount, not the admin
        discovery.start()
        try:
            await until([("192.0.2.10:8000", "fp-a")], [("192.0.2.20:8000", "fp-a"), ("192.0.2.21:8000", "fp-a")],
                        "generation g1's endpoints")
            # nothing was handed over before the model was read: g2's pods (not serving) never showed
            assert all(not {"192.0.2.11:8000", "192.0.2.30:8000"} & {a for tier in lists for a, _ in tier}
                       for lists in seen), seen
            write_slice("m-decode-a", "m-decode", [("192.0.2.20", "d1-g1", True), ("192.0.2.21", "d2-g1", False)])
            await until([("192.0.2.10:8000", "fp-a")], [("192.0.2.20:8000", "fp-a")], "an endpoint turning unready")
            serve_generation("g1", swap="g2")  # a PairwiseSwap routes to both generations
            await until([("192.0.2.10:8000", "fp-a"), ("192.0.2.11:8000", "fp-b")],
                        [("192.0.2.20:8000", "fp-a"), ("192.0.2.30:8000", "fp-b")], "both generations during a swap")
            serve_generation("g2")
            await until([("192.0.2.11:8000", "fp-b")], [("192.0.2.30:8000", "fp-b")], "the switch to g2")
            discovery_api.delete_namespaced_endpoint_slice("m-decode-b", namespace)
            await until([("192.0.2.11:8000", "fp-b")], [], "the deleted slice's endpoint leaving")
        finally:
            discovery.stop()

    asyncio.run(main())
