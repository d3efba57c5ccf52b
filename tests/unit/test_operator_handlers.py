"""The per-model loops: what the operator keeps about a model goes with it, and a model deleted and created
again gets a loop of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from types import SimpleNamespace

import pytest

from baton.operator import handlers
from baton.operator.cache import ChildCache


class Gate:
    paused = False


class Reconciler:
    """Keeps per-model records and, as a pass that applied a child does, records the child in the cache;
    `hold` keeps a pass under way until released."""

    def __init__(self, cache: ChildCache) -> None:
        self.cache = cache
        self.records: dict[tuple[str, str], int] = {}
        self.started = threading.Event()
        self.release = threading.Event()
        self.hold = False
        self.begun: list[str | None] = []  # the uid of each pass, as it began
        self.ended: list[tuple[str | None, bool]] = []  # (uid, whether its loop had stopped) as each ended
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def reconcile(self, namespace: str, name: str, uid=None, stop=None):
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.begun.append(uid)
        self.started.set()
        try:
            if self.hold:
                assert self.release.wait(10)
        finally:
            with self._lock:
                self.running -= 1
                self.ended.append((uid, stop is not None and stop.is_set()))
        self.records[(namespace, name)] = self.records.get((namespace, name), 0) + 1
        self.cache.put({"kind": "StatefulSet", "metadata": {"namespace": namespace, "name": f"{name}-decode",
                                                            "resourceVersion": "7", "labels": {"baton.dev/model": name}}})
        return SimpleNamespace(failed=False, transient=False, gone=False, requeue_after=60.0)

    def forget(self, namespace: str, name: str) -> None:
        self.records.pop((namespace, name), None)


@pytest.fixture
def runtime(monkeypatch):
    cache = ChildCache()
    reconciler = Reconciler(cache)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    monkeypatch.setattr(handlers, "pause_gate", Gate())
    monkeypatch.setattr(handlers, "WAKE_COALESCE_SECONDS", 0.0)
    for attr, value in (("cache", cache), ("reconciler", reconciler), ("executor", executor), ("loops", {}),
                        ("triggers", {}), ("seen", {}), ("passes", set()),
                        ("running", {}), ("stalled", set())):
        monkeypatch.setattr(handlers.runtime, attr, value)
    yield SimpleNamespace(cache=cache, reconciler=reconciler)
    reconciler.release.set()
    executor.shutdown(wait=True)


def model(generation: int = 1, uid: str = "uid-1") -> dict:
    return {"metadata": {"name": "m", "namespace": "ns", "generation": generation, "uid": uid}}


async def until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_model_deleted_during_a_pass_leaves_nothing_behind_once_the_pass_ends(runtime):
    runtime.reconciler.hold = True

    async def main():
        await handlers.model_event(body=model(), name="m", namespace="ns", type="ADDED")
        await asyncio.to_thread(runtime.reconciler.started.wait, 5)
        await handlers.model_event(body=model(), name="m", namespace="ns", type="DELETED")  # kubectl delete dm m
        await asyncio.sleep(0.05)
        runtime.reconciler.release.set()  # the pass under way ends, writing what it applied
        await until(lambda: not handlers.runtime.passes)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert runtime.reconciler.records == {}
    assert runtime.cache.footprint() == (0, 0)


def test_a_model_deleted_and_created_again_at_once_still_acts_on_spec_edits_at_once(runtime):
    """`kubectl replace --force` (or a delete and an apply): the DELETED and ADDED events arrive back to back,
    and the old loop ends only after the new one started."""

    async def main():
        await handlers.model_event(body=model(), name="m", namespace="ns", type="ADDED")
        await until(lambda: runtime.reconciler.records.get(("ns", "m")) == 1)
        await asyncio.sleep(0.05)  # the loop sleeps until a change or its resync (60 s)
        await handlers.model_event(body=model(), name="m", namespace="ns", type="DELETED")
        await handlers.model_event(body=model(), name="m", namespace="ns", type="ADDED")
        await until(lambda: runtime.reconciler.records.get(("ns", "m")) == 1)  # the new model's first pass
        await asyncio.sleep(0.2)
        await handlers.model_event(body=model(generation=2), name="m", namespace="ns", type="MODIFIED")  # a spec edit
        await until(lambda: runtime.reconciler.records.get(("ns", "m")) == 2, timeout=2)
        for loop in handlers.runtime.loops.values():
            loop.task.cancel()

    asyncio.run(main())


@pytest.mark.parametrize("deleted_event", [True, False], ids=["with its DELETED event", "DELETED event missed"])
def test_a_model_created_again_while_a_pass_runs_gets_its_first_pass_only_after_that_one_which_writes_no_more(
        runtime, deleted_event):
    """`kubectl replace --force` (or an Argo CD Replace) while a pass of the old model is under way in its thread:
    the old pass must not act on the new model (a thread cannot be cancelled, so it is told to stop writing) and
    the new model's first pass waits for it to end: two passes of one name never run at once. Also when the
    DELETED event was missed (a watch re-listing): the new uid alone starts a new loop."""
    r = runtime.reconciler
    r.hold = True

    async def main():
        await handlers.model_event(body=model(uid="a"), name="m", namespace="ns", type="ADDED")
        await asyncio.to_thread(r.started.wait, 5)
        if deleted_event:
            await handlers.model_event(body=model(uid="a"), name="m", namespace="ns", type="DELETED")
        await handlers.model_event(body=model(uid="b"), name="m", namespace="ns", type="ADDED")
        await asyncio.sleep(0.2)
        assert r.begun == ["a"]  # the new model's first pass waits
        r.release.set()
        await until(lambda: [uid for uid, _ in r.ended] == ["a", "b"])
        assert r.ended == [("a", True), ("b", False)]  # the old pass was told to stop writing; the new one runs
        assert r.most_at_once == 1
        assert {key: loop.uid for key, loop in handlers.runtime.loops.items()} == {("ns", "m"): "b"}
        # a DELETED event of the old object coming late does not stop the new model's loop
        await handlers.model_event(body=model(uid="a"), name="m", namespace="ns", type="DELETED")
        assert ("ns", "m") in handlers.runtime.loops
        for loop in handlers.runtime.loops.values():
            loop.task.cancel()

    asyncio.run(main())


def test_the_stalled_models_gauge_follows_each_models_last_pass(runtime):
    """baton_operator_models_stalled, what the BatonModelStalled alert reads, holds between passes and drops when
    the model's next pass is fine or the model goes."""
    from baton.operator import metrics

    r = runtime.reconciler
    outcomes = iter([True, False, True])
    real = r.reconcile

    def reconcile(namespace, name, uid=None, stop=None):
        real(namespace, name, uid, stop)
        return SimpleNamespace(failed=next(outcomes, True), transient=False, gone=False, requeue_after=60.0)

    r.reconcile = reconcile
    gauge = lambda: metrics.REGISTRY.get_sample_value("baton_operator_models_stalled")  # noqa: E731

    async def main():
        await handlers.model_event(body=model(), name="m", namespace="ns", type="ADDED")
        await until(lambda: gauge() == 1)
        await handlers.model_event(body=model(generation=2), name="m", namespace="ns", type="MODIFIED")
        await until(lambda: gauge() == 0)
        await handlers.model_event(body=model(generation=3), name="m", namespace="ns", type="MODIFIED")
        await until(lambda: gauge() == 1)
        await handlers.model_event(body=model(generation=3), name="m", namespace="ns", type="DELETED")
        assert gauge() == 0

    asyncio.run(main())
