"""An in-memory view of Baton's children, fed by the watch streams kopf already runs.

The reconciler reads children from here instead of GETting each one on every pass, so a pass over a
settled model costs one request (the model itself) and a cluster of hundreds of models does not
turn into thousands of GETs per minute. What the cache lacks (not yet seen, or deleted) is read from
the API server, so a cold or lagging cache is never wrong, only slower.

Writes Baton makes are recorded from their responses at once; a watch event carrying an older
resourceVersion never overwrites a newer object.

Objects are held as compressed JSON (a tenth of the memory of the parsed dicts, which dominated the
operator's footprint at hundreds of models) and decoded on each read, so every reader gets its own
copy; an object's status is kept apart from the rest, which status-only events (most of them) leave
untouched. An index by model keeps per-model lookups independent of how many models there are.
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


def _pack(data: Any) -> bytes:
    return zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 1)


def _unpack(blob: bytes) -> Any:
    return json.loads(zlib.decompress(blob))


class _Entry:
    """One object: everything but its status (with a fingerprint), and its status, compressed apart.

    Most watch events of a starting model only change a workload's status: the rest is then reused as is
    (not compressed again), and its unchanged fingerprint tells the reconciler that what it verified
    against the object last time still holds (`verified`: the digest of the rendered object it matched).
    """

    __slots__ = ("rv", "fingerprint", "main", "status", "verified")

    def __init__(self, rv: int, fingerprint: int, main: bytes, status: bytes | None) -> None:
        self.rv = rv  # resourceVersion (etcd revisions are integers)
        self.fingerprint = fingerprint
        self.main = main
        self.status = status
        self.verified: int | None = None

    def decode(self) -> dict[str, Any]:
        obj = _unpack(self.main)
        if self.rv:
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        if self.status is not None:
            obj["status"] = _unpack(self.status)
        return obj


class ChildCache:
    def __init__(self) -> None:
        self._objects: dict[Key, _Entry] = {}
        self._by_model: dict[ModelKey, set[Key]] = defaultdict(set)
        self._lock = threading.Lock()

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        key = (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
        rv = _rv(obj)
        with self._lock:
            current = self._objects.get(key)
            if current is not None and rv < current.rv:
                return
        # managedFields are often the largest part of an object and the reconciler never reads them.
        main = {k: v for k, v in obj.items() if k != "status"}
        main["metadata"] = {k: v for k, v in meta.items() if k not in ("managedFields", "resourceVersion")}
        main_json = json.dumps(main, separators=(",", ":")).encode()  # outside the lock: the costly part
        fingerprint = hash(main_json)
        status = obj.get("status")
        status_blob = _pack(status) if status is not None else None
        reuse = current is not None and current.fingerprint == fingerprint
        entry = _Entry(rv, fingerprint,
                       current.main if reuse else zlib.compress(main_json, 1), status_blob)  # type: ignore[union-attr]
        if reuse:
            entry.verified = current.verified  # type: ignore[union-attr]
        model = (meta.get("labels") or {}).get(LABEL_MODEL)
        with self._lock:
            latest = self._objects.get(key)
            if latest is None or rv >= latest.rv:
                if latest is not None and latest is not current and latest.fingerprint == fingerprint:
                    entry.verified = latest.verified
                self._objects[key] = entry
                if model:
                    self._by_model[(key[1], model)].add(key)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects.pop((kind, namespace, name), None)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._objects.get((kind, namespace, name))
        return entry.decode() if entry else None

    def verified(self, kind: str, namespace: str, name: str) -> int | None:
        """The digest of the rendered object this cached object was last found to carry (None: never, or
        it changed since). Costs no decoding."""
        with self._lock:
            entry = self._objects.get((kind, namespace, name))
            return entry.verified if entry else None

    def mark_verified(self, kind: str, namespace: str, name: str, rv: str, digest: int) -> None:
        """The object at resourceVersion `rv` carries the rendered object whose digest is `digest`."""
        with self._lock:
            entry = self._objects.get((kind, namespace, name))
            if entry is not None and str(entry.rv) == rv:
                entry.verified = digest

    def list_kind(self, kind: str, namespace: str, model: str) -> list[dict[str, Any]]:
        with self._lock:
            entries = [self._objects[k] for k in self._by_model.get((namespace, model), ())
                       if k[0] == kind and k in self._objects]
        return [e.decode() for e in entries]

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._by_model.clear()

    def forget_model(self, namespace: str, model: str) -> None:
        with self._lock:
            for key in self._by_model.pop((namespace, model), ()):
                self._objects.pop(key, None)
