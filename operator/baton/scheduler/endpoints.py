"""Engine endpoints: the endpoint model and where the lists come from.

- `Endpoint` is what discovery produces: an address, its tier, an optional KV-format fingerprint and the
  runtime that serves it (read from the pod's engine container; None: the config's `runtime`).
- `endpoints_from_slices` is the pure part of Kubernetes discovery: EndpointSlice objects (dicts as the
  API returns them, or `kubernetes` client models) -> the ready endpoints' pod IPs with the tier's port.
- `StaticDiscovery` and `KubernetesDiscovery` push `(prefill, decode)` lists into a callback on the event
  loop; the Kubernetes one watches EndpointSlices in a background thread (the `kubernetes` client is
  blocking) and reads each pod's `baton.dev/kv-fingerprint` annotation, generation label and engine
  command through the endpoint's targetRef.
"""

from __future__ import annotations

import asyncio
import os
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from baton.pod_ports import PORT_NAME, engine_container, format_address, http_port
from baton.scheduler.config import EndpointsConfig, KubernetesEndpoints

log = logging.getLogger("baton.scheduler.endpoints")

FINGERPRINT_ANNOTATION = "baton.dev/kv-fingerprint"
GENERATION_LABEL = "baton.dev/generation"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# The engine container's command says which runtime serves a pod (see baton.render.tiers.engine_container).
RUNTIME_OF_COMMAND = {"trtllm-serve": "trtllm-serve", "tritonserver": "triton"}

PREFILL = "prefill"
DECODE = "decode"
# A pod that could not be read (the API server throttled, timed out, failed) is left out of its tier's
# list; the tier is computed again after this long, without waiting for its next watch event.
POD_LOOKUP_RETRY_S = 2.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One engine replica as discovery sees it. Replicas of equal `pairing` (fingerprint, runtime and
    generation; None == None) may be paired."""

    address: str  # host:port ([v6]:port for IPv6)
    tier: str  # "prefill" | "decode"
    fingerprint: str | None = None
    pod: str | None = None  # pod name when discovered from Kubernetes
    # "trtllm-serve" | "triton" as the pod's engine container runs it; None (static endpoints, a pod that
    # could not be read): the config's `runtime`. Requests to the endpoint go through that runtime's client,
    # so a generation switch that changes the runtime is followed with the endpoints, not when the
    # ConfigMap's new `runtime` reaches the pod (the kubelet takes up to a minute or so).
    runtime: str | None = None
    # the pod's `baton.dev/generation` label (None: static endpoints, an unlabelled pod)
    generation: str | None = None

    @property
    def pairing(self) -> tuple[str | None, str | None, str | None]:
        """What a prefill and a decode replica must share to be paired: the KV format, the runtime (a
        handle is only handed on between engines of the same front end) and the generation. While a
        PairwiseSwap routes to two generations, their fingerprints can agree although their engines
        differ (an image change that declares the same TensorRT-LLM version, other extraOptions): a
        request then stays old-to-old or new-to-new."""
        return self.fingerprint, self.runtime, self.generation

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


class PodInfo(NamedTuple):
    """What discovery reads from an endpoint's pod."""

    fingerprint: str | None = None
    generation: str | None = None
    runtime: str | None = None


def runtime_of_pod(pod: Mapping[str, Any]) -> str | None:
    """The runtime a pod's engine container runs (the container named `engine`, else the first), from its
    command; None when it is neither trtllm-serve nor tritonserver."""
    command = engine_container(pod).get("command") or []
    return RUNTIME_OF_COMMAND.get(os.path.basename(str(command[0]))) if command else None


def _as_dict(obj: Any) -> dict[str, Any]:
    """EndpointSlice as the API spells it (camelCase dict), from a dict or a kubernetes client model."""
    if isinstance(obj, Mapping):
        return dict(obj)
    from kubernetes.client import ApiClient  # only when handed client models

    return ApiClient().sanitize_for_serialization(obj)


def endpoints_from_slices(
    slices: Iterable[Any],
    port: int,
    tier: str,
    pod_info: Callable[[str, str | None], PodInfo] | None = None,
    generation: str = "",
) -> list[Endpoint]:
    """The ready endpoints of a Service's EndpointSlices, as pod IP + port, sorted and deduplicated.

    The port is the slice's: Baton's tier Services target the pods' port by name (`http`), which
    Kubernetes resolves per pod, so while a tier's port changes in a rolling update the old pods are in a
    slice with the old port and the new ones in another; `port` (the configured one) only for a slice
    that names none. An endpoint counts when `conditions.ready` is true or unset (the API says nil means
    ready); terminating and not-ready endpoints are skipped, as are FQDN slices. `pod_info(pod_name,
    pod_uid)` returns the pod's `PodInfo`, or None when the pod could not be read just now: such an
    endpoint is left out (its generation, KV format and runtime are unknown, so it could be paired across
    them). With `generation` set, pods labelled with another generation are skipped.
    """
    seen: dict[str, Endpoint] = {}
    for raw in slices:
        eps = _as_dict(raw)
        if eps.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        slice_port = _slice_port(eps.get("ports") or [], port)
        for ep in eps.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            if conditions.get("ready") is False:
                continue
            addresses = ep.get("addresses") or []
            if not addresses:
                continue
            target = ep.get("targetRef") or {}
            pod = target.get("name") if target.get("kind", "Pod") == "Pod" else None
            info = pod_info(pod, target.get("uid")) if pod and pod_info is not None else PodInfo()
            if info is None or not _generation_accepted(info.generation, generation):
                continue
            address = format_address(addresses[0], slice_port)
            seen.setdefault(address, Endpoint(address=address, tier=tier, fingerprint=info.fingerprint, pod=pod,
                                              runtime=info.runtime, generation=info.generation))
    return [seen[a] for a in sorted(seen)]


def _slice_port(ports: list[dict[str, Any]], default: int) -> int:
    """The port an EndpointSlice gives its endpoints: the one named `http` (Baton's tier Services), else
    its only one, else `default`."""
    numbered = [p for p in ports if isinstance(p, Mapping) and isinstance(p.get("port"), int)]
    named = [p for p in numbered if p.get("name") == PORT_NAME]
    if named:
        return int(named[0]["port"])
    return int(numbered[0]["port"]) if len(numbered) == 1 else default


def _generation_accepted(pod_generation: str | None, accepted: str) -> bool:
    """`accepted` is one generation key or several, comma-separated (a PairwiseSwap routes to two);
    empty accepts every pod, as does a pod without a generation label."""
    return not accepted or not pod_generation or pod_generation in accepted.split(",")


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def endpoints_from_pods(pods: Iterable[Any], port: int, tier: str, generation: str = "") -> list[Endpoint]:
    """The ready pods behind a Service, as pod IP + port: what the EndpointSlice controller would publish
    (each pod's port named `http`, else `port`)."""
    seen: dict[str, Endpoint] = {}
    for raw in pods:
        pod = _as_dict(raw)
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or not status.get("podIP") or not _pod_ready(pod):
            continue
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        if not _generation_accepted(labels.get(GENERATION_LABEL), generation):
            continue
        address = format_address(status["podIP"], http_port(pod, port))
        seen.setdefault(address, Endpoint(address=address, tier=tier, fingerprint=annotations.get(FINGERPRINT_ANNOTATION),
                                          pod=meta.get("name"), runtime=runtime_of_pod(pod),
                                          generation=labels.get(GENERATION_LABEL)))
    return [seen[a] for a in sorted(seen)]


def static_endpoints(config: EndpointsConfig) -> tuple[list[Endpoint], list[Endpoint]]:
    prefill = [Endpoint(e.address, PREFILL, e.fingerprint) for e in config.static.prefill]
    decode = [Endpoint(e.address, DECODE, e.fingerprint) for e in config.static.decode]
    return prefill, decode


UpdateCallback = Callable[[list[Endpoint], list[Endpoint]], None]


class StaticDiscovery:
    """Fixed lists from the config file or flags."""

    def __init__(self, config: EndpointsConfig, on_update: UpdateCallback) -> None:
        self.config = config
        self.on_update = on_update

    def start(self) -> None:
        self.on_update(*static_endpoints(self.config))

    def stop(self) -> None:
        pass


class KubernetesDiscovery:
    """Watches the two tier Services' EndpointSlices and reports ready pod endpoints.

    Runs the blocking `kubernetes` client in one daemon thread per tier; results are handed to the event
    loop with `call_soon_threadsafe`. Each watch is bounded (`timeout_seconds`) and re-listed after errors.
    Every call also has a client-side limit (`_request_timeout`) and TCP keepalive: the server-side bound
    alone leaves a read blocked for good on a connection that went silent (a lost NAT entry, an API server
    that died hard), freezing a tier's endpoints or the generation followed, with nothing logged.
    """

    WATCH_TIMEOUT_S = 30
    CALL_TIMEOUT = (5.0, 10.0)  # (connect, read) seconds for a list or a read
    WATCH_READ_TIMEOUT_S = WATCH_TIMEOUT_S + 15  # a watch's read: the server ends it at WATCH_TIMEOUT_S

    def __init__(self, config: KubernetesEndpoints, on_update: UpdateCallback, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.on_update = on_update
        self.loop = loop
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lists: dict[str, list[Endpoint]] = {PREFILL: [], DECODE: []}
        self._pods: dict[str, PodInfo] = {}  # by "name/uid"
        self._lock = threading.Lock()
        # Held while a list is computed and queued for the event loop, so lists reach the scheduler in
        # the order they were computed (the tier watches and the generation watch are three threads).
        self._publish_lock = threading.Lock()
        self._api_client: Any = None
        self.source = os.environ.get("BATON_DISCOVERY_SOURCE") or config.source
        self.generation = config.generation  # status.rollout.servingGeneration
        self.swap_generation = ""  # status.rollout.swap.generation: routed to as well during a PairwiseSwap
        self._raw: dict[str, tuple[str, dict[str, Any]]] = {}
        self._listed: set[str] = set()  # tiers listed at least once
        self._model_read = False  # the model's status read at least once (see `_publish`)
        self._retries: set[str] = set()  # tiers with a recompute pending (`_retry_later`)

    def _client(self) -> Any:
        if self._api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            import urllib3

            configuration = client.Configuration.get_default_copy()
            configuration.keep_alive = True  # TCP keepalive: a dead peer is found out, not waited on
            # A failed connect is tried again, a read that timed out is not: urllib3's default (3 retries of
            # everything) made each call that hangs cost four times its limit. The loops here retry.
            configuration.retries = urllib3.util.Retry(total=2, connect=2, read=0, status=0, other=0, redirect=0)
            self._api_client = client.ApiClient(configuration)
        return self._api_client

    def _watch_timeout(self) -> tuple[float, float]:
        return (self.CALL_TIMEOUT[0], float(self.WATCH_READ_TIMEOUT_S))

    def _pod_info(self, name: str, uid: str | None) -> PodInfo | None:
        """The pod's `PodInfo`; None when it could not be read now (the endpoint is left out and its tier
        computed again in `POD_LOOKUP_RETRY_S`). Reading pods forbidden (RBAC, standalone): an empty
        `PodInfo`, usable with peers that carry no fingerprint either."""
        # StatefulSet pods keep their names across rollouts, so the cache is keyed by uid too.
        key = f"{name}/{uid}"
        with self._lock:
            if key in self._pods:
                return self._pods[key]
        from kubernetes import client

        try:
            pod = _as_dict(client.CoreV1Api(self._client()).read_namespaced_pod(
                name, self.config.namespace, _request_timeout=self.CALL_TIMEOUT))
            meta = pod.get("metadata") or {}
            info = PodInfo((meta.get("annotations") or {}).get(FINGERPRINT_ANNOTATION),
                           (meta.get("labels") or {}).get(GENERATION_LABEL), runtime_of_pod(pod))
        except Exception as exc:  # noqa: BLE001 - throttled, timed out, gone, forbidden
            if getattr(exc, "status", None) == 403:
                log.warning("event=pod_lookup_failed pod=%s error=%r detail=%r", name, str(exc),
                            "reading pods is forbidden: used without a KV-format fingerprint")
                return PodInfo()
            log.warning("event=pod_lookup_failed pod=%s error=%r detail=%r", name, str(exc),
                        f"left out of the endpoint lists until it can be read (again in {POD_LOOKUP_RETRY_S:g}s)")
            return None
        with self._lock:
            if uid:  # without a uid the answer cannot be tied to one pod incarnation: do not cache it
                self._pods[key] = info
        return info

    def _tier_endpoints(self, tier: str, kind: str, objects: dict[str, Any],
                        unread: Collection[str] = ()) -> list[Endpoint]:
        values = list(objects.values())
        if kind == "pods":
            return endpoints_from_pods(values, self.config.tier_port(tier), tier, self.accepted_generations)
        return self._compute(tier, values, unread)

    def _update_tier(self, tier: str, kind: str, objects: dict[str, Any]) -> None:
        """A tier's objects changed: recompute its list and publish both tiers. Serialized with
        `_switch`, so a list computed before a generation switch never lands after it. The objects are
        copied: the watch thread goes on changing its own dict while a switch or a retry reads this one.
        The pods the slices name are read first, outside the lock: a slow read must not hold up a switch."""
        unread = self._read_pods(objects.values()) if kind == "slices" else set()
        with self._publish_lock:
            self._raw[tier] = (kind, dict(objects))
            self._publish({tier: self._tier_endpoints(tier, kind, self._raw[tier][1], unread)})

    @staticmethod
    def _pod_uids(slices: Iterable[Any]) -> set[str]:
        return {uid for raw in slices for ep in _as_dict(raw).get("endpoints") or []
                if (uid := (ep.get("targetRef") or {}).get("uid"))}

    def _forget_pods_not_in(self, tier: str, slices: Iterable[Any]) -> None:
        """At a re-list of `tier`: drop the cached pods no tier's slices name any more (pods of earlier
        rollouts and restarts), so the cache follows the live pods, not every pod there ever was."""
        keep = self._pod_uids(slices)
        for other, (kind, objects) in list(self._raw.items()):
            if other != tier and kind == "slices":
                keep |= self._pod_uids(list(objects.values()))
        with self._lock:
            self._pods = {key: info for key, info in self._pods.items() if key.rpartition("/")[2] in keep}

    def _read_pods(self, slices: Iterable[Any]) -> set[str]:
        """Read (into the cache) the pods the ready endpoints of `slices` name, that are not cached yet; the
        names of those that could not be read (not read again under the lock: left out, retried shortly)."""
        unread: set[str] = set()

        def read(name: str, uid: str | None) -> PodInfo:
            # `_pod_info` answers from the cache when it can; a pod without a uid is not cached, so it is read
            # in the tier's computation only
            if uid and not self._stop.is_set() and self._pod_info(name, uid) is None:
                unread.add(name)
            return PodInfo()  # every pod of the slices is visited (no generation filter)

        endpoints_from_slices(slices, 0, "", read)  # the same endpoints the tier's computation reads pods for
        return unread

    def _recompute(self, tier: str) -> None:
        """A pod of `tier` could not be read: compute the tier again from its last objects."""
        with self._publish_lock:
            self._retries.discard(tier)
            if tier in self._raw and not self._stop.is_set():
                kind, objects = self._raw[tier]
                self._publish({tier: self._tier_endpoints(tier, kind, objects)})

    def _retry_later(self, tier: str) -> None:
        with self._lock:
            if tier in self._retries or self._stop.is_set():
                return
            self._retries.add(tier)
        timer = threading.Timer(POD_LOOKUP_RETRY_S, self._recompute, (tier,))
        timer.daemon = True
        timer.start()

    def _publish(self, lists: dict[str, list[Endpoint]]) -> None:
        """Install new lists for some tiers and queue both tiers' lists for the event loop (the caller
        holds `_publish_lock`). Nothing goes out before both tiers were listed and, when a model's status
        names the generations to route to, before that was read: a scheduler starting (or following a
        reload) would otherwise route with one tier missing, or to generations that do not serve."""
        with self._lock:
            self._lists.update(lists)
            self._listed.update(lists)
            prefill, decode = list(self._lists[PREFILL]), list(self._lists[DECODE])
            if len(self._listed) < 2 or (self.config.model and not self._model_read):
                return
        if not self.loop.is_closed() and not self._stop.is_set():
            self.loop.call_soon_threadsafe(self._deliver, prefill, decode)

    def _deliver(self, prefill: list[Endpoint], decode: list[Endpoint]) -> None:
        """On the event loop: hand the lists over unless this discovery was stopped since they were queued
        (a config reload replaced it; its lists must not land after the new discovery's)."""
        if not self._stop.is_set():
            self.on_update(prefill, decode)

    def _watch_tier(self, tier: str, service: str) -> None:
        if self.source == "pods":
            return self._watch_tier_pods(tier, service)
        from kubernetes import client, watch

        selector = f"{SERVICE_NAME_LABEL}={service}"
        while not self._stop.is_set():
            try:
                api = client.DiscoveryV1Api(self._client())
                listing = api.list_namespaced_endpoint_slice(self.config.namespace, label_selector=selector,
                                                             _request_timeout=self.CALL_TIMEOUT)
                slices = {s.metadata.name: s for s in listing.items}
                self._forget_pods_not_in(tier, slices.values())
                self._update_tier(tier, "slices", slices)
                version = listing.metadata.resource_version
                w = watch.Watch()
                for event in w.stream(
                    api.list_namespaced_endpoint_slice,
                    self.config.namespace,
                    label_selector=selector,
                    resource_version=version,
                    timeout_seconds=self.WATCH_TIMEOUT_S,
                    _request_timeout=self._watch_timeout(),
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    if event["type"] == "DELETED":
                        slices.pop(obj.metadata.name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        slices[obj.metadata.name] = obj
                    else:
                        continue
                    self._update_tier(tier, "slices", slices)
            except Exception as exc:
                log.warning("event=endpointslice_watch_error tier=%s service=%s error=%r", tier, service, str(exc))
                self._stop.wait(2.0)

    def _watch_tier_pods(self, tier: str, service: str) -> None:
        """Watch the pods `service` selects; readiness from their Ready condition."""
        from kubernetes import client, watch

        while not self._stop.is_set():
            try:
                core = client.CoreV1Api(self._client())
                selector_map = core.read_namespaced_service(service, self.config.namespace,
                                                            _request_timeout=self.CALL_TIMEOUT).spec.selector or {}
                selector = ",".join(f"{k}={v}" for k, v in sorted(selector_map.items()))
                listing = core.list_namespaced_pod(self.config.namespace, label_selector=selector,
                                                   _request_timeout=self.CALL_TIMEOUT)
                pods = {p.metadata.name: p for p in listing.items}
                self._update_tier(tier, "pods", pods)
                w = watch.Watch()
                for event in w.stream(core.list_namespaced_pod, self.config.namespace, label_selector=selector,
                                      resource_version=listing.metadata.resource_version,
                                      timeout_seconds=self.WATCH_TIMEOUT_S, _request_timeout=self._watch_timeout()):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    if event["type"] == "DELETED":
                        pods.pop(obj.metadata.name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        pods[obj.metadata.name] = obj
                    else:
                        continue
                    self._update_tier(tier, "pods", pods)
            except Exception as exc:
                log.warning("event=pod_watch_error tier=%s service=%s error=%r", tier, service, str(exc))
                self._stop.wait(2.0)

    def _compute(self, tier: str, slices: Iterable[Any], skip: Collection[str] = ()) -> list[Endpoint]:
        """The tier's endpoints from its slices; the pods in `skip` just failed to be read: left out."""
        unread: list[str] = []

        def pod_info(name: str, uid: str | None) -> PodInfo | None:
            info = None if name in skip else self._pod_info(name, uid)
            if info is None:
                unread.append(name)
            return info

        endpoints = endpoints_from_slices(slices, self.config.tier_port(tier), tier, pod_info, self.accepted_generations)
        if unread:
            self._retry_later(tier)
        return endpoints

    @property
    def accepted_generations(self) -> str:
        return ",".join(g for g in (self.generation, self.swap_generation) if g)

    def _switch(self, serving: str, swap: str) -> None:
        """Re-filter both tiers for a new serving (and swap) generation and publish them together: the
        scheduler must never see the new prefill tier beside the old decode tier."""
        with self._publish_lock:
            self.generation, self.swap_generation = serving, swap
            # the model is read: from here on lists go out (`_publish`), never one computed before the filter
            self._model_read = True
            self._publish({tier: self._tier_endpoints(tier, kind, objects) for tier, (kind, objects) in self._raw.items()})

    def _watch_serving_generation(self) -> None:
        """Follow the DisaggregatedModel's status.rollout.servingGeneration: the operator switches
        traffic between generations by writing that one field, and every scheduler follows at once."""
        from kubernetes import client, watch

        name = self.config.model
        while not self._stop.is_set():
            try:
                api = client.CustomObjectsApi(self._client())
                w = watch.Watch()
                for event in w.stream(api.list_namespaced_custom_object, "serving.baton.dev", "v1alpha1",
                                      self.config.namespace, "disaggregatedmodels",
                                      field_selector=f"metadata.name={name}", timeout_seconds=self.WATCH_TIMEOUT_S,
                                      _request_timeout=self._watch_timeout()):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["object"]
                    ro = (obj.get("status") or {}).get("rollout") or {}
                    serving = ro.get("servingGeneration", "")
                    swap = (ro.get("swap") or {}).get("generation", "")
                    if serving and (serving, swap) != (self.generation, self.swap_generation):
                        log.info("event=generation_switch from=%s to=%s swap=%s", self.generation or "-", serving, swap or "-")
                        self._switch(serving, swap)
                    elif not self._model_read:  # the generations to route to are known now: publish what was held
                        self._switch(self.generation, self.swap_generation)
                if not self._model_read and not self._stop.is_set():  # a whole watch period without the model
                    log.warning("event=model_not_found model=%s namespace=%s detail=%r", name, self.config.namespace,
                                "no endpoints are used until this DisaggregatedModel can be read (its status names "
                                "the generations to route to); check endpoints.kubernetes.model and namespace")
            except Exception as exc:
                log.warning("event=model_watch_error model=%s error=%r", name, str(exc))
                self._stop.wait(2.0)

    def follow(self, previous: Any) -> None:
        """Start from what `previous` (the discovery a reload replaces) knew of the same model's serving
        generations, so the new one routes as the old one did from its first lists on."""
        if (isinstance(previous, KubernetesDiscovery) and previous._model_read and self.config.model
                and (previous.config.model, previous.config.namespace) == (self.config.model, self.config.namespace)):
            self.generation, self.swap_generation = previous.generation, previous.swap_generation
            self._model_read = True

    def check_credentials(self) -> None:
        """Load the Kubernetes client configuration now (in-cluster, else kubeconfig): raises when there is
        none, so that a reload to this discovery is refused instead of a watch failing forever."""
        self._client()

    def start(self) -> None:
        for tier, service in ((PREFILL, self.config.prefill_service), (DECODE, self.config.decode_service)):
            thread = threading.Thread(
                target=self._watch_tier, args=(tier, service), name=f"baton-discovery-{tier}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        if self.config.model:
            thread = threading.Thread(target=self._watch_serving_generation, name="baton-discovery-generation", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()


def make_discovery(config: EndpointsConfig, on_update: UpdateCallback, loop: asyncio.AbstractEventLoop) -> Any:
    if config.discovery == "kubernetes":
        return KubernetesDiscovery(config.kubernetes, on_update, loop)
    return StaticDiscovery(config, on_update)
