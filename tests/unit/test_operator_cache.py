"""The operator's child cache: newest object wins, per-model views, readers get their own copies."""

from __future__ import annotations

import json
import tracemalloc
import zlib

from baton.operator import cache as cache_module
from baton.operator.cache import ChildCache


def sts(name: str, model: str, rv: int, replicas: int = 1) -> dict:
    return {"kind": "StatefulSet", "metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv),
                                                 "labels": {"baton.dev/model": model},
                                                 "managedFields": [{"manager": "baton-operator"}]},
            "spec": {"replicas": replicas}}


def test_an_older_watch_event_never_replaces_a_newer_object():
    cache = ChildCache()
    cache.put(sts("a-decode", "a", 20, replicas=3))
    cache.put(sts("a-decode", "a", 10, replicas=1))
    got = cache.get("StatefulSet", "ns", "a-decode")
    assert got["spec"]["replicas"] == 3 and got["metadata"]["resourceVersion"] == "20"
    assert "managedFields" not in got["metadata"]
    cache.put(sts("a-decode", "a", 30, replicas=2))
    assert cache.get("StatefulSet", "ns", "a-decode")["spec"]["replicas"] == 2
    cache.put(sts("a-decode", "a", 30, replicas=5))  # one version is one content: the copy held stays
    assert cache.get("StatefulSet", "ns", "a-decode")["spec"]["replicas"] == 2


def test_readers_get_copies_that_cannot_change_the_cache():
    cache = ChildCache()
    cache.put(sts("a-decode", "a", 1))
    cache.get("StatefulSet", "ns", "a-decode")["spec"]["replicas"] = 99
    assert cache.get("StatefulSet", "ns", "a-decode")["spec"]["replicas"] == 1


def test_per_model_views_and_forgetting_a_model():
    cache = ChildCache()
    for model in ("a", "b"):
        cache.put(sts(f"{model}-prefill", model, 1))
        cache.put(sts(f"{model}-decode", model, 1))
        cache.seed("StatefulSet", "ns", model, [])
    assert sorted(o["metadata"]["name"] for o in cache.list_kind("StatefulSet", "ns", "a")) == ["a-decode", "a-prefill"]
    cache.seed("Deployment", "ns", "a", [])
    assert cache.list_kind("Deployment", "ns", "a") == []

    cache.forget_model("ns", "a")
    assert cache.get("StatefulSet", "ns", "a-decode") is None and cache.list_kind("StatefulSet", "ns", "a") is None
    assert cache.get("StatefulSet", "ns", "b-decode") is not None
    cache.forget("StatefulSet", "ns", "b-decode")
    assert [o["metadata"]["name"] for o in cache.list_kind("StatefulSet", "ns", "b")] == ["b-prefill"]
    cache.clear()
    assert cache.get("StatefulSet", "ns", "b-prefill") is None
    assert cache.list_kind("StatefulSet", "ns", "b") is None  # a cleared cache knows no list complete


def test_a_model_list_is_unknown_until_seeded_from_the_api_then_kept_by_events():
    """After a restart, kopf's initial listing arrives object by object: a model whose prefill StatefulSet
    has arrived and whose decode one has not must not read as having no decode tier."""
    cache = ChildCache()
    cache.put(sts("a-prefill", "a", 5))  # delivered by the watch; a-decode not yet
    assert cache.list_kind("StatefulSet", "ns", "a") is None
    listed = [{k: v for k, v in sts(name, "a", 5).items() if k != "kind"} for name in ("a-prefill", "a-decode")]
    cache.seed("StatefulSet", "ns", "a", listed)  # list items carry no kind
    assert sorted(o["metadata"]["name"] for o in cache.list_kind("StatefulSet", "ns", "a")) == ["a-decode", "a-prefill"]
    assert cache.get("StatefulSet", "ns", "a-decode")["kind"] == "StatefulSet"
    cache.put(sts("a-extra", "a", 9))  # later watch events keep the list current
    assert len(cache.list_kind("StatefulSet", "ns", "a")) == 3


def test_a_deleted_object_is_not_brought_back_by_an_older_copy():
    cache = ChildCache()
    cache.put(sts("a-decode", "a", 5))
    cache.forget("StatefulSet", "ns", "a-decode", "7")  # the deletion event
    cache.seed("StatefulSet", "ns", "a", [sts("a-decode", "a", 5)])  # a listing taken before the deletion
    assert cache.get("StatefulSet", "ns", "a-decode") is None
    assert cache.list_kind("StatefulSet", "ns", "a") == []
    cache.put(sts("a-decode", "a", 7))  # not newer than the deletion either
    assert cache.get("StatefulSet", "ns", "a-decode") is None
    cache.put(sts("a-decode", "a", 12))  # created again
    assert cache.get("StatefulSet", "ns", "a-decode")["metadata"]["resourceVersion"] == "12"
    # a deletion Baton makes itself (no event yet) guards with the last version it had
    cache.forget("StatefulSet", "ns", "a-decode")
    cache.put(sts("a-decode", "a", 12))
    assert cache.get("StatefulSet", "ns", "a-decode") is None


def test_deleted_models_leave_nothing_behind_once_their_deletions_are_old(monkeypatch):
    """Each deleted child is remembered (an older copy of it, from a read under way, must not bring it back),
    but only for `gone_seconds`: an operator that sees thousands of models come and go stays the same size."""
    now = [1000.0]
    monkeypatch.setattr(cache_module, "monotonic", lambda: now[0])
    cache = ChildCache(gone_seconds=600)
    rv = iter(range(1, 10**6))

    def models_come_and_go(first: int) -> None:
        for m in range(first, first + 2000):
            children = [sts(f"m{m}-{tier}", f"m{m}", next(rv)) for tier in ("prefill", "decode", "scheduler")]
            for child in children:
                cache.put(child)
            cache.forget_model("ns", f"m{m}")  # the model's loop ends, then its children's deletion events come
            for child in children:
                cache.forget("StatefulSet", "ns", child["metadata"]["name"], next(rv))

    tracemalloc.start()
    try:
        models_come_and_go(0)
        cache.seed("StatefulSet", "ns", "m0", [sts("m0-decode", "m0", 1)])  # a listing from before the deletion
        assert cache.get("StatefulSet", "ns", "m0-decode") is None
        after_first = tracemalloc.get_traced_memory()[0]
        now[0] += 601
        models_come_and_go(2000)
        grown = tracemalloc.get_traced_memory()[0] - after_first
    finally:
        tracemalloc.stop()
    assert grown < 2**20 / 4, f"{grown / 2**20:.1f} MiB more after 2,000 more models came and went"


def test_a_verification_survives_status_changes_and_ends_with_any_other_change():
    cache = ChildCache()
    cache.put(sts("a-decode", "a", 1))
    assert cache.verified("StatefulSet", "ns", "a-decode") is None
    cache.mark_verified("StatefulSet", "ns", "a-decode", "1", digest=1234)
    assert cache.verified("StatefulSet", "ns", "a-decode") == 1234

    with_status = {**sts("a-decode", "a", 2), "status": {"readyReplicas": 1}}
    cache.put(with_status)  # the controller reports progress: what Baton renders is untouched
    assert cache.verified("StatefulSet", "ns", "a-decode") == 1234
    got = cache.get("StatefulSet", "ns", "a-decode")
    assert got["status"] == {"readyReplicas": 1} and got["metadata"]["resourceVersion"] == "2"

    cache.put({**sts("a-decode", "a", 3, replicas=5), "status": {"readyReplicas": 1}})  # someone edits the spec
    assert cache.verified("StatefulSet", "ns", "a-decode") is None
    assert cache.get("StatefulSet", "ns", "a-decode")["spec"]["replicas"] == 5

    labelled = sts("a-decode", "a", 4, replicas=5)
    cache.mark_verified("StatefulSet", "ns", "a-decode", "3", digest=99)
    labelled["metadata"]["labels"]["extra"] = "x"  # a metadata edit is a change too
    cache.put(labelled)
    assert cache.verified("StatefulSet", "ns", "a-decode") is None


def test_a_verification_of_an_outdated_read_is_not_recorded():
    cache = ChildCache()
    cache.put(sts("a-decode", "a", 1))
    cache.put(sts("a-decode", "a", 2, replicas=4))
    cache.mark_verified("StatefulSet", "ns", "a-decode", "1", digest=7)  # compared against version 1
    assert cache.verified("StatefulSet", "ns", "a-decode") is None


def deployment(name: str, image: str, rv: int, status: dict | None) -> dict:
    obj = {"kind": "Deployment", "apiVersion": "apps/v1",
           "metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv),
                        "labels": {"baton.dev/model": name, "app.kubernetes.io/managed-by": "baton"}},
           "spec": {"replicas": 1, "template": {"spec": {"containers": [
               {"name": "scheduler", "image": image, "args": ["--config", f"/etc/baton/{name}.json"] * 20}]}}}}
    if status is not None:
        obj["status"] = status
    return obj


def test_objects_of_one_kind_are_stored_as_their_differences_and_read_back_exactly():
    cache = ChildCache()
    first = deployment("alpha", "baton:1", 5, None)  # the kind's first object has no status at all
    cache.put(first)
    others = [deployment(f"model-{i}", f"baton:{i}", 10 + i, {"readyReplicas": i, "conditions": [{"type": "Available"}]})
              for i in range(20)]
    for obj in others:
        cache.put(obj)
    for obj in [first, *others]:
        got = cache.get("Deployment", "ns", obj["metadata"]["name"])
        assert got == obj
    objects, stored = cache.footprint()
    alone = sum(len(zlib.compress(json.dumps(o, separators=(",", ":")).encode(), 1)) for o in others)
    assert objects == 21
    assert stored < alone / 2, (stored, alone)  # every object after the first costs a fraction of itself
    cache.clear()
    cache.put(others[3])
    assert cache.get("Deployment", "ns", "model-3") == others[3]


def test_a_listing_drops_the_children_whose_deletion_the_watch_missed():
    """A child deleted while the watch was away never gets its DELETED event (kopf lists again, and a list
    carries no deletions): a later listing drops it from the cache; what the listing cannot know of yet
    (seen after it was taken), another model's objects, and another kind are kept."""
    cache = ChildCache()
    cache.put(sts("a-prefill", "a", 10))
    cache.put(sts("a-decode", "a", 11))  # deleted at, say, 15: missed
    cache.put(sts("a-new", "a", 30))  # created after the listing was taken
    cache.put(sts("b-decode", "b", 12))
    cache.put({**sts("a-decode", "a", 13), "kind": "ConfigMap"})
    dropped = cache.resync("StatefulSet", "ns", "a", [sts("a-prefill", "a", 10)], listed_at=20)
    assert dropped == ["a-decode"]
    assert cache.get("StatefulSet", "ns", "a-decode") is None
    assert sorted(o["metadata"]["name"] for o in cache.list_kind("StatefulSet", "ns", "a")) == ["a-new", "a-prefill"]
    assert cache.get("StatefulSet", "ns", "b-decode") is not None
    assert cache.get("ConfigMap", "ns", "a-decode") is not None
    cache.put(sts("a-decode", "a", 14))  # a watch event older than the listing: the deletion stands
    assert cache.get("StatefulSet", "ns", "a-decode") is None
    cache.put(sts("a-decode", "a", 25))  # created again
    assert cache.get("StatefulSet", "ns", "a-decode")["metadata"]["resourceVersion"] == "25"
