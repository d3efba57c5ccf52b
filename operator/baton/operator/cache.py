"""An in-memory view of Baton's children, fed by the watch streams kopf already runs.

The reconciler reads children from here instead of GETting each one on every pass, so a pass over a
settled model costs one request (the model itself) and a cluster of hundreds of models does not
turn into thousands of GETs per minute. What the cache lacks (not yet seen, or deleted) is read from
the API server, so a cold or lagging cache is never wrong, only slower.

Writes Baton makes are recorded from their responses at once; a watch event carrying an older
resourceVersion never overwrites a newer object, nor brings back one that was deleted (deletions are
remembered for `gone_seconds`, the operator's childListSeconds, and then forgotten).

A per-model list (`list_kind`) is only answered once it is known complete: after an operator starts,
kopf delivers its initial listing object by object (in pages), so a model can be reconciled while some
of its children have arrived and others have not. Until the reconciler has listed a model's children of
a kind from the API server once (`seed`), `list_kind` says it does not know (None) rather than give a
partial answer a rollout could act on (a missing tier reads as one that lost readiness).

Objects are held as compressed JSON (a tenth of the memory of the parsed dicts, which dominated the
operator's footprint at hundreds of models) and decoded on each read, so every reader gets its own
copy; an object's status is kept apart from the rest, which status-only events (most of them) leave
untouched. Every object of one kind is rendered from the same template, so each is compressed against
a preset dictionary: the first object of its kind the cache saw. What is stored is then little more
than how an object differs from that one, about a sixth of compressing it on its own (and faster).
An index by model keeps per-model lookups independent of how many models there are.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections import OrderedDict, defaultdict
from time import monotonic
from typing import Any

from baton.render.naming import LABEL_MODEL

Key = tuple[str, str, str]  # kind, namespace, name
ModelKey = tuple[str, str]  # namespace, model


def _version(value: str | int | None) -> int:
    """A resourceVersion as an integer (etcd revisions are), 0 when absent or not a number."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _rv(obj: dict[str, Any]) -> int:
    return _version(obj.get("metadata", {}).get("resourceVersion"))


# An 8 KiB window and a smaller hash table: children are a few KiB of JSON, and setting up zlib's
# default state (a 32 KiB window, 64 Ki hash entries) for each costs more than compressing them.
_WBITS, _MEMLEVEL = 13, 6


def _compress(data: bytes, zdict: bytes) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, _WBITS, _MEMLEVEL, zlib.Z_DEFAULT_STRATEGY, zdict)
    return packer.compress(data) + packer.flush()


def _unpack(blob: bytes, zdict: bytes) -> Any:
    unpacker = zlib.decompressobj(_WBITS, zdict=zdict)
    return json.loads(unpacker.decompress(blob) + unpacker.flush())


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

    def decode(self, zdicts: tuple[bytes, bytes]) -> dict[str, Any]:
        obj = _unpack(self.main, zdicts[0])
        if self.rv:
            obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        if self.status is not None:
            obj["status"] = _unpack(self.status, zdicts[1])
        return obj


class ChildCache:
    def __init__(self, gone_seconds: float = 600.0) -> None:
        self._objects: dict[Key, _Entry] = {}
        self._by_model: dict[ModelKey, set[Key]] = defaultdict(set)
        self._complete: set[tuple[str, str, str]] = set()  # (kind, namespace, model) lists known complete
        # Deleted objects: the resourceVersion they were last seen at, and when, oldest first. Kept for
        # `gone_seconds`: an older copy comes from a read or listing that was under way at the deletion, and
        # those end within a minute; a later one would still be dropped by its model's next child listing.
        self._gone: OrderedDict[Key, tuple[int, float]] = OrderedDict()
        self._gone_seconds = gone_seconds
        # kind -> (main, status) preset dictionaries; set once per kind, so every stored blob stays readable
        self._zdicts: dict[str, tuple[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def _zdicts_for(self, kind: str, main_json: bytes, status_json: bytes) -> tuple[bytes, bytes]:
        zdicts = self._zdicts.get(kind)
        if zdicts is None:
            with self._lock:
                zdicts = self._zdicts.setdefault(kind, (main_json, status_json or b"{}"))
        return zdicts

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        key = (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
        rv = _rv(obj)
        with self._lock:
            current = self._objects.get(key)
            if current is not None and (rv < current.rv or (rv and rv == current.rv)):
                return  # older, or the same version again (a seeding list, a no-op apply): nothing to redo
            if rv <= self._gone_rv(key):
                return
        # managedFields are often the largest part of an object and the reconciler never reads them.
        main = {k: v for k, v in obj.items() if k != "status"}
        main["metadata"] = {k: v for k, v in meta.items() if k not in ("managedFields", "resourceVersion")}
        main_json = json.dumps(main, separators=(",", ":")).encode()  # outside the lock: the costly part
        fingerprint = hash(main_json)
        status = obj.get("status")
        status_json = json.dumps(status, separators=(",", ":")).encode() if status is not None else b""
        zdicts = self._zdicts_for(key[0], main_json, status_json)
        status_blob = _compress(status_json, zdicts[1]) if status is not None else None
        reuse = current is not None and current.fingerprint == fingerprint
        entry = _Entry(rv, fingerprint,
                       current.main if reuse else _compress(main_json, zdicts[0]), status_blob)  # type: ignore[union-attr]
        if reuse:
            entry.verified = current.verified  # type: ignore[union-attr]
        model = (meta.get("labels") or {}).get(LABEL_MODEL)
        with self._lock:
            latest = self._objects.get(key)
            if (latest is None or rv >= latest.rv) and rv > self._gone_rv(key):
                if latest is not None and latest is not current and latest.fingerprint == fingerprint:
                    entry.verified = latest.verified
                self._objects[key] = entry
                self._gone.pop(key, None)  # created again
                if model:
                    self._by_model[(key[1], model)].add(key)

    def forget(self, kind: str, namespace: str, name: str, rv: str | int | None = None) -> None:
        """The object was deleted (`rv`: the resourceVersion its deletion was seen at, if known): older
        copies of it that arrive later (a listing that was under way) are not taken."""
        with self._lock:
            self._drop((kind, namespace, name), _version(rv))

    def _gone_rv(self, key: Key) -> int:
        """The version `key`'s deletion was seen at, -1 if none is remembered (the caller holds the lock)."""
        return self._gone.get(key, (-1, 0.0))[0]

    def _drop(self, key: Key, rv: int) -> None:
        """Drop `key`, remembering the version its deletion was seen at (the caller holds the lock)."""
        entry = self._objects.pop(key, None)
        seen = max(entry.rv if entry else 0, rv)
        now = monotonic()
        while self._gone and now - next(iter(self._gone.values()))[1] >= self._gone_seconds:
            self._gone.popitem(last=False)  # deletions long past: whatever was under way then has ended
        if seen:
            self._gone[key] = (max(seen, self._gone_rv(key)), now)
            self._gone.move_to_end(key)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._objects.get((kind, namespace, name))
        return entry.decode(self._zdicts[kind]) if entry else None

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

    def list_kind(self, kind: str, namespace: str, model: str) -> list[dict[str, Any]] | None:
        """The model's objects of `kind`; None until that list is known complete (see `seed`)."""
        with self._lock:
            if (kind, namespace, model) not in self._complete:
                return None
            entries = [self._objects[k] for k in self._by_model.get((namespace, model), ())
                       if k[0] == kind and k in self._objects]
        return [e.decode(self._zdicts[kind]) for e in entries]

    def seed(self, kind: str, namespace: str, model: str, objects: list[dict[str, Any]]) -> None:
        """Take the model's objects of `kind` as listed by the API server (items of a list carry no kind);
        from now on the watch streams keep that list complete."""
        for obj in objects:
            self.put({**obj, "kind": kind})
        with self._lock:
            self._complete.add((kind, namespace, model))

    def resync(self, kind: str, namespace: str, model: str, objects: list[dict[str, Any]], listed_at: int) -> list[str]:
        """Check the model's cached objects of `kind` against a listing taken at resourceVersion `listed_at`:
        those the listing lacks although the cache saw them at or before it were deleted while the watch
        was away (kopf lists again after a watch gap, and a listing carries no deletions), so they are
        dropped and a read goes to the API server. The listed objects are taken as `seed` takes them.
        Returns the names dropped."""
        listed = {(o.get("metadata") or {}).get("name") for o in objects}
        with self._lock:  # checked and dropped at once: an event taken meanwhile (a newer object) stays
            index = self._by_model.get((namespace, model), set())
            stale = [k for k in index
                     if k[0] == kind and k[2] not in listed and k in self._objects and self._objects[k].rv <= listed_at]
            for key in stale:
                self._drop(key, listed_at)
            index.difference_update(stale)
        self.seed(kind, namespace, model, objects)
        return sorted(k[2] for k in stale)

    def footprint(self) -> tuple[int, int]:
        """How many objects are held and the bytes their compressed forms take."""
        with self._lock:
            entries = list(self._objects.values())
        return len(entries), sum(len(e.main) + len(e.status or b"") for e in entries)

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._by_model.clear()
            self._complete.clear()
            self._gone.clear()

    def forget_model(self, namespace: str, model: str) -> None:
        with self._lock:
            for key in self._by_model.pop((namespace, model), ()):
                self._objects.pop(key, None)
                self._gone.pop(key, None)
            self._complete = {c for c in self._complete if c[1:] != (namespace, model)}
