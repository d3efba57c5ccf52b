"""The operator's child cache: newest object wins, per-model views, readers get their own copies."""

from __future__ import annotations

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
