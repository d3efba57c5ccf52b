"""A replica paused for a peer: its model loops stop and its child cache is emptied only once the reconcile
pass already under way has ended (a pass in a thread cannot be cancelled and writes into the cache)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from types import SimpleNamespace

import pytest

from baton.operator import handlers
from baton.operator.cache import ChildCache


class Gate:
    """Stands in for kopf's pause state."""

    def __init__(self) -> None:
        self.paused = False
        self._changed: asyncio.Event | None = None

    def set(self, paused: bool) -> None:
        self.paused = paused
        assert self._changed is not None
        self._changed.set()

    async def wait(self, paused: bool) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        while self.paused != paused:
            self._changed.clear()
            await self._changed.wait()


class SlowReconciler:
    """A pass that, once let go, writes a child it read into the cache (as a real pass does after a GET)."""

    def __init__(self, cache: ChildCache) -> None:
        self.cache = cache
        self.started = threading.Event()
        self.release = threading.Event()

    def reconcile(self, namespace: str, name: str, uid=None, stop=None):
        self.started.set()
        assert self.release.wait(10)
        self.cache.put({"kind": "Service", "metadata": {"namespace": namespace, "name": f"{name}-decode",
                                                        "resourceVersion": "7", "labels": {"baton.dev/model": name}}})
        return SimpleNamespace(failed=False, transient=False, gone=False, requeue_after=60.0)

    def forget(self, namespace: str, name: str) -> None:
        pass


@pytest.fixture
def runtime(monkeypatch):
    cache = ChildCache()
    reconciler = SlowReconciler(cache)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    gate = Gate()
    monkeypatch.setattr(handlers, "pause_gate", gate)
    for attr, value in (("cache", cache), ("reconciler", reconciler), ("executor", executor), ("loops", {}),
                        ("triggers", {}), ("seen", {}), ("passes", set()),
                        ("running", {}), ("stalled", set())):
        monkeypatch.setattr(handlers.runtime, attr, value)
    yield SimpleNamespace(cache=cache, reconciler=reconciler, gate=gate)
    reconciler.release.set()
    executor.shutdown(wait=True)


def test_a_pause_empties_the_cache_after_the_pass_under_way_has_written_to_it(runtime):
    async def main():
        follower = asyncio.create_task(handlers.follow_pauses())
        key = ("ns", "llama-8b")
        handlers.runtime.loops[key] = handlers.ModelLoop(asyncio.create_task(handlers.reconcile_loop(*key)), "")
        await asyncio.to_thread(runtime.reconciler.started.wait, 5)
        runtime.gate.set(True)  # a peer of higher priority appeared: the loop stops, its pass goes on
        await asyncio.sleep(0.2)
        assert not handlers.runtime.loops and len(handlers.runtime.passes) == 1
        runtime.reconciler.release.set()  # the pass writes what it read, after the pause began
        for _ in range(100):
            if not handlers.runtime.passes:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert not handlers.runtime.passes
        # emptied after that write: nothing in it can outlive a deletion made while paused
        assert runtime.cache.get("Service", "ns", "llama-8b-decode") is None
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

    asyncio.run(main())
