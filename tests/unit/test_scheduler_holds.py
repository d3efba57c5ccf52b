"""Degradation holds: the in-memory store with a fake clock, and the redis store against a fake client."""

from __future__ import annotations

import asyncio

import pytest

from baton.scheduler.holds import Hold, MemoryHoldStore, RedisHoldStore, make_hold_store


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_memory_store_expires_by_clock():
    clock = Clock()
    store = MemoryHoldStore(clock)

    async def main():
        await store.put(Hold("r1", "p:1", {"ctx_request_id": 1}, 0.0, 10.0))
        await store.put(Hold("r2", "p:1", {"ctx_request_id": 2}, 0.0, 20.0))
        assert len(store) == 2
        assert (await store.get("r1")).handle == {"ctx_request_id": 1}
        clock.now = 15
        assert await store.get("r1") is None
        gone = await store.expired()
        assert [h.request_id for h in gone] == ["r1"]
        assert len(store) == 1
        assert (await store.remove("r2")).request_id == "r2"
        assert await store.remove("r2") is None

    asyncio.run(main())


class FakeRedis:
    def __init__(self):
        self.data = {}
        self.ttl = {}

    async def set(self, key, value, px=None):
        self.data[key] = value
        self.ttl[key] = px

    async def get(self, key):
        return self.data.get(key)

    async def delete(self, key):
        self.data.pop(key, None)

    async def aclose(self):
        pass


def test_redis_store_round_trip_with_ttl():
    clock = Clock()
    fake = FakeRedis()
    store = RedisHoldStore("redis://unused", clock, client=fake)

    async def main():
        await store.put(Hold("r1", "p:1", {"ctx_request_id": 1}, 0.0, 2.5, ("d:1",)))
        assert fake.ttl["baton:hold:r1"] == 2500
        hold = await store.get("r1")
        assert hold.ring == ("d:1",) and hold.handle == {"ctx_request_id": 1}
        assert len(store) == 1
        clock.now = 3
        assert [h.request_id for h in await store.expired()] == ["r1"]
        assert "baton:hold:r1" not in fake.data
        await store.close()

    asyncio.run(main())


def test_redis_store_without_package_explains(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_redis(name, *args, **kwargs):
        if name.startswith("redis"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_redis)
    with pytest.raises(RuntimeError, match="pip install redis"):
        make_hold_store("redis", "redis://localhost:6379")
    assert isinstance(make_hold_store("memory"), MemoryHoldStore)
