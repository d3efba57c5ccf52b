"""An in-memory view of Baton's children, fed by the watch streams kopf already runs.

The reconciler reads children from here instead of GETting each one on every pass, so a pass over a
settled model costs one request (the model itself) and a cluster of hundreds of models does not
turn into thousands of GETs per minute. What the cache lacks (not yet seen, or deleted) is read from
the API server, so a cold or lagging cache is never wrong, only slower.

Writes Baton makes are recorded from their responses at once; a watch event carrying an older
resourceVersion never overwrites a newer object.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

Key = tuple[str, str, str]  # kind, namespace, name


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion", "0"))
    except (TypeError, ValueError):
        return 0


def _without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """managedFields are often the largest part of an object and the reconciler never reads them."""
    meta = obj.get("metadata")
    if not meta or "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def _slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """Only what the reconciler reads of a pod: identity, labels, readiness, IP and scheduling state."""
    meta, status = pod.get("metadata", {}), pod.get("status", {})
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels", "annotations", "deletionTimestamp") if k in meta},
        "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
        "status": {k: status[k] for k in ("phase", "podIP", "conditions") if k in status},
    }


class ChildCache:
    def __init__(self) -> None:
        self._objects: dict[Key, dict[str, Any]] = {}
        self._pods: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)  # (ns, model) -> name -> pod
        self._lock = threading.Lock()

    def put(self, obj: dict[str, Any]) -> None:
        obj = _without_managed_fields(obj)
        meta = obj.get("metadata", {})
        key = (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            current = self._objects.get(key)
            if current is None or _rv(obj) >= _rv(current):
                self._objects[key] = obj

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects.pop((kind, namespace, name), None)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((kind, namespace, name))

    def list_kind(self, kind: str, namespace: str, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return [v for (k, ns, _), v in self._objects.items()
                    if k == kind and ns == namespace and (v.get("metadata", {}).get("labels") or {}).get("baton.dev/model") == model]

    def put_pod(self, model: str, pod: dict[str, Any], deleted: bool = False) -> None:
        meta = pod.get("metadata", {})
        with self._lock:
            pods = self._pods[(meta.get("namespace", ""), model)]
            if deleted:
                pods.pop(meta.get("name", ""), None)
            else:
                pods[meta.get("name", "")] = _slim_pod(pod)

    def pods(self, namespace: str, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._pods.get((namespace, model), {}).values())

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._pods.clear()

    def forget_model(self, namespace: str, model: str) -> None:
        with self._lock:
            self._pods.pop((namespace, model), None)
            for key in [k for k, v in self._objects.items()
                        if k[1] == namespace and (v.get("metadata", {}).get("labels") or {}).get("baton.dev/model") == model]:
                del self._objects[key]
