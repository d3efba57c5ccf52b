"""kopf's per-object bookkeeping, cut to what Baton's event-only handlers use."""

from __future__ import annotations

import asyncio

import kopf
from baton.operator.bookkeeping import ModelMemories, NoDiffBase
from kopf._cogs.structs import bodies, diffs


def body(kind: str, uid: str) -> dict:
    return {"kind": kind, "apiVersion": "v1", "metadata": {"namespace": "ns", "name": uid, "uid": uid}}


def test_models_are_remembered_and_children_are_not():
    async def scenario() -> None:
        memories = ModelMemories()
        model = body("DisaggregatedModel", "m-1")
        first = await memories.recall(model, noticed_by_listing=True)
        assert await memories.recall(model) is first  # the same record on the next event
        assert first.noticed_by_listing
        for kind in ("StatefulSet", "Deployment", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"):
            child = body(kind, f"{kind}-1")
            one = await memories.recall(child)
            assert await memories.recall(child) is not one  # made per event, never kept
        assert len(memories) == 1
        assert list(memories.iter_all_memories()) == [first]
        await memories.forget(model)
        assert len(memories) == 0

    asyncio.run(scenario())


def test_no_diff_base_is_built_or_stored():
    storage = NoDiffBase()
    obj = bodies.Body({**body("StatefulSet", "s-1"), "spec": {"replicas": 3}})
    assert not diffs.diff(storage.fetch(body=obj), storage.build(body=obj))
    patch = kopf.Patch()
    storage.store(body=obj, patch=patch, essence=storage.build(body=obj))
    assert not patch  # nothing written to the object


def test_baton_registers_event_handlers_only():
    """What the two shortcuts above rely on: no change, resume, timer or daemon handlers anywhere."""
    import baton.operator.handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    assert registry._watching.get_all_handlers()  # the model and child event handlers
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    assert not registry._indexing.get_all_handlers()
