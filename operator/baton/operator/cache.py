"""An in-memory view of Baton's children, fed by the watch streams kopf already runs.

The reconciler reads children from here instead of GETting each one on every pass, so a pass over a
settled model costs one request (the model itself) and a cluster of hundreds of models does not
turn into thousands of GETs per minute. What the cache lacks (not yet seen, or deleted) is read from
the API server, so a cold or lagging cache is never wrong, only slower.

Writes Baton makes are recorded from their responses at once; a watch event carrying an older
resourceVersion never overwrites a newer object.

Objects are held as compressed JSON (a tenth of the memory of the parsed dicts, which dominated the
operator's footprint at hundreds of models) and decoded on each read, so every reader gets its own
copy. An index by model keeps per-model lookups independent of how many models there are.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections import defaultdict
from typing import Any

from baton.render.naming import LABEL_MODEL

Key = tuple[str, str, str]  # kind, namespace, name
ModelKey = tuple[str, str]  # namespace, model


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion", "0"))
    except (TypeError, ValueError):
        return 0


def _encode(obj: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 1)


def _decode(blob: bytes) -> dict[str, Any]:
    return json.loads(zlib.decompress(blob))


def _without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """managedFields are often the largest part of an object and the reconciler never reads them."""
    meta = obj.get("metadata")
    if not meta or "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


class ChildCache:
    def __init__(self) -> None:
        self._objects: dict[Key, tuple[int, bytes]] = {}  # key -> (resourceVersion, compressed JSON)
        self._by_model: dict[ModelKey, set[Key]] = defaultdict(set)
        self._lock = threading.Lock()

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        key = (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
        rv = _rv(obj)
        with self._lock:
            current = self._objects.get(key)
            if current is not None and rv < current[0]:
                return
        blob = _encode(_without_managed_fields(obj))  # outside the lock: the costly part
        model = (meta.get("labels") or {}).get(LABEL_MODEL)
        with self._lock:
            current = self._objects.get(key)
            if current is None or rv >= current[0]:
                self._objects[key] = (rv, blob)
                if model:
                    self._by_model[(key[1], model)].add(key)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects.pop((kind, namespace, name), None)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._objects.get((kind, namespace, name))
        return _decode(entry[1]) if entry else None

    def list_kind(self, kind: str, namespace: str, model: str) -> list[dict[str, Any]]:
        with self._lock:
            blobs = [self._objects[k][1] for k in self._by_model.get((namespace, model), ())
                     if k[0] == kind and k in self._objects]
        return [_decode(b) for b in blobs]

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._by_model.clear()

    def forget_model(self, namespace: str, model: str) -> None:
        with self._lock:
            for key in self._by_model.pop((namespace, model), ()):
                self._objects.pop(key, None)
