"""The operator's child cache: newest object wins, per-model views, readers get their own copies."""

from __future__ import annotations

import json
import zlib

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
    assert sorted(o["metadata"]["name"] for o in cache.list_kind("StatefulSet", "ns", "a")) == ["a-decode", "a-prefill"]
    assert cache.list_kind("Deployment", "ns", "a") == []

    cache.forget_model("ns", "a")
    assert cache.get("StatefulSet", "ns", "a-decode") is None and cache.list_kind("StatefulSet", "ns", "a") == []
    assert cache.get("StatefulSet", "ns", "b-decode") is not None
    cache.forget("StatefulSet", "ns", "b-decode")
    assert [o["metadata"]["name"] for o in cache.list_kind("StatefulSet", "ns", "b")] == ["b-prefill"]
    cache.clear()
    assert cache.get("StatefulSet", "ns", "b-prefill") is None


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
