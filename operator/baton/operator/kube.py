"""The operator's Kubernetes access: get, server-side apply and status patches, nothing else.

Children are applied server-side under Baton's field manager, so Baton owns exactly the fields it
renders and never fights other writers (an HPA, a GitOps tool) over fields it does not set. Every
request is counted by verb, which the benchmark reports and tests use to prove a no-op resync writes
nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from baton import __version__
from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from baton.render import disruption
from baton.render.naming import FIELD_MANAGER

USER_AGENT = f"baton-operator/{__version__}"

# kind -> (API path prefix, plural). Only the kinds Baton renders.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Event": ("/api/v1", "events"),
    "Pod": ("/api/v1", "pods"),
    "Node": ("/api/v1", "nodes"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "DisaggregatedModel": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


# The kinds Baton renders for a model: watched (kopf, `api_resource`) and listed (the child cache's check).
CHILD_KINDS = ("StatefulSet", "Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding",
               *(("PodDisruptionBudget",) if disruption.ENABLED else ()))


def api_resource(kind: str) -> tuple[str, str, str]:
    """(API group, version, plural) of a kind in RESOURCES, as kopf names a resource."""
    prefix, plural = RESOURCES[kind]
    parts = prefix.strip("/").split("/")  # ["api", version] or ["apis", group, version]
    return ("", parts[1], plural) if parts[0] == "api" else (parts[1], parts[2], plural)


# (connect, read) seconds for every call: without a limit a half-open connection (an API server load balancer
# failing over) blocks the worker thread of a reconcile pass forever, and a few of them stop every model.
REQUEST_TIMEOUT = (10.0, 60.0)
# Objects per page of a cluster-wide list (`Kube.list_cluster`).
LIST_PAGE = 500


class PassStopped(Exception):
    """The loop of the pass making this call was stopped (its model deleted, perhaps created again under the
    same name, or the operator paused for a peer): the pass writes nothing more (`Kube.stopping_on`)."""


class Kube:
    """A thin, thread-safe REST client over the official client's ApiClient."""

    def __init__(self, api_client: client.ApiClient | None = None):
        if api_client is None:
            # One attempt per call: urllib3 would try a call that timed out three more times, holding a
            # reconcile worker for four timeouts (a GET: four minutes). The pass and kopf retry on their own.
            configuration = client.Configuration()
            configuration.retries = False
            try:
                config.load_incluster_config(client_configuration=configuration)
                api_client = client.ApiClient(configuration)
            except config.ConfigException:
                # The client reads $KUBECONFIG once, at import; read it now.
                api_client = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"),
                                                           client_configuration=configuration)
        api_client.user_agent = USER_AGENT
        self.api = api_client
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pass = threading.local()  # .stop: the Event that stops the writes of this thread's pass

    @contextlib.contextmanager
    def stopping_on(self, stop: threading.Event | None) -> Iterator[None]:
        """Within this, a write from this thread raises PassStopped once `stop` is set (reads go on): a pass
        whose loop stopped while it ran must not write into what replaced its model."""
        self._pass.stop = stop
        try:
            yield
        finally:
            self._pass.stop = None

    def _count(self, verb: str) -> None:
        with self._lock:
            self.requests[verb] += 1

    def writes(self) -> int:
        return sum(n for verb, n in self.requests.items() if verb not in ("GET", "LIST", "DRYRUN"))

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None,
              content_type: str = "application/json", count_as: str = "") -> Any:
        if method != "GET":
            stop = getattr(self._pass, "stop", None)
            if stop is not None and stop.is_set():
                raise PassStopped(f"{method} {path}: the pass's model loop stopped")
        self._count(count_as or method)
        verb, url, headers, payload, post = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [], body=body,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(verb, url, header_params=headers, body=payload, post_params=post,
                                         _request_timeout=REQUEST_TIMEOUT)
            data = response.read()
        except urllib3.exceptions.HTTPError as exc:
            # No answer at all (refused, reset, timed out): status 0, which callers (`transient`) take as
            # "not now", as for a 5xx, rather than an unknown error.
            raise ApiException(status=0, reason=f"no answer from the API server: {exc}") from exc
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response, body=data.decode(errors="replace") if data else None)
        return json.loads(data) if data else None

    @staticmethod
    def path(kind: str, namespace: str, name: str = "", subresource: str = "") -> str:
        prefix, plural = RESOURCES[kind]
        out = f"{prefix}/namespaces/{namespace}/{plural}"
        if name:
            out += f"/{name}"
        if subresource:
            out += f"/{subresource}"
        return out

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", self.path(kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, label_selector: str = "", field_selector: str = "") -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        if field_selector:
            query.append(("fieldSelector", field_selector))
        return self._call("GET", self.path(kind, namespace), query=query, count_as="LIST").get("items", [])

    def list_recent(self, kind: str, namespace: str, label_selector: str) -> tuple[list[dict[str, Any]], int]:
        """A list served from the API server's watch cache (resourceVersion=0: no etcd read, at most a
        moment behind), and the resourceVersion it was taken at."""
        data = self._call("GET", self.path(kind, namespace), count_as="LIST",
                          query=[("labelSelector", label_selector), ("resourceVersion", "0")])
        try:
            version = int((data.get("metadata") or {}).get("resourceVersion") or 0)
        except (TypeError, ValueError):
            version = 0
        return data.get("items", []), version

    def list_cluster(self, kind: str, field_selector: str = "") -> Iterator[dict[str, Any]]:
        """Every object of a kind across the cluster (Nodes, or Pods in all namespaces), read in pages of
        LIST_PAGE: a page is dropped before the next is asked for, so a caller that keeps only what it needs
        holds one page at a time, not a whole cluster's pods (10,000 pods are 40 MB of JSON, five times
        that parsed)."""
        prefix, plural = RESOURCES[kind]
        query = [("limit", str(LIST_PAGE))] + ([("fieldSelector", field_selector)] if field_selector else [])
        token = ""
        while True:
            page = self._call("GET", f"{prefix}/{plural}", count_as="LIST",
                              query=query + ([("continue", token)] if token else []))
            token = (page.get("metadata") or {}).get("continue") or ""
            yield from page.pop("items", None) or []
            if not token:
                return

    def apply(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply `obj` under Baton's field manager (forcing: Baton owns what it renders)."""
        meta = obj["metadata"]
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")] + ([("dryRun", "All")] if dry_run else [])
        return self._call(
            "PATCH", self.path(obj["kind"], meta["namespace"], meta["name"]), body=obj, query=query,
            content_type="application/apply-patch+yaml", count_as="DRYRUN" if dry_run else "",
        )

    def scale(self, kind: str, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        """Set a workload's replicas through its scale subresource (what `kubectl scale` does)."""
        return self._call("PATCH", self.path(kind, namespace, name, "scale"), body={"spec": {"replicas": replicas}},
                          query=[("fieldManager", FIELD_MANAGER)],
                          content_type="application/merge-patch+json")

    def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                     resource_version: str = "") -> dict[str, Any]:
        """Merge `status` into a model's; with `resource_version`, only into that version of the model
        (409 otherwise: it changed since it was read, or it is another object of the same name)."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._call(
            "PATCH", self.path("DisaggregatedModel", namespace, name, "status"),
            body=body, content_type="application/merge-patch+json",
        )

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self._call("DELETE", self.path(kind, namespace, name),
                       body={"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def create_event(self, event: dict[str, Any]) -> None:
        self._call("POST", self.path("Event", event["metadata"]["namespace"]), body=event)

    def patch_event(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Update an Event Baton posted (a repeat of it: its count and last timestamp)."""
        self._call("PATCH", self.path("Event", namespace, name), body=patch,
                   content_type="application/merge-patch+json")


def api_error_message(exc: ApiException) -> str:
    """The API server's own message from an error response (what `kubectl` would print)."""
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError):
        return f"{exc.status} {exc.reason}"
