"""Degradation holds: finished prefills waiting for a decode slot instead of being dropped.

When the decode tier is saturated, the handle returned by a context-only request (its
`disaggregated_params`) is kept in a hold until a decode slot in the prefill replica's ring frees, at
most `degradation.holdTtlSeconds`. The waiting itself is done by the request's coroutine (a priority
waiter in the decode queue); the store is the record of what is held: it backs the `baton_scheduler_holds`
gauge, lets an operator see held handles (redis), and expires entries on its own.

Keep the TTL below the prefill workers' `kv_transfer_timeout_ms`: after that the context worker frees
the KV and a late generation-only request fails (the service then re-prefills once, budget permitting).

Stores: `MemoryHoldStore` (default, injectable clock) and `RedisHoldStore` (`degradation.store: redis`,
needs the optional `redis` package; keys `baton:hold:<request id>` with a TTL).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class Hold:
    request_id: str
    prefill: str  # address of the context worker that holds the KV
    handle: dict[str, Any]  # choices[0].disaggregated_params of the context-only response
    created: float
    expires: float
    ring: tuple[str, ...] = field(default_factory=tuple)


class HoldStore(Protocol):
    async def put(self, hold: Hold) -> None: ...

    async def get(self, request_id: str) -> Hold | None: ...

    async def remove(self, request_id: str) -> Hold | None: ...

    async def expired(self) -> list[Hold]: ...

    def __len__(self) -> int: ...

    async def close(self) -> None: ...


class MemoryHoldStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._holds: dict[str, Hold] = {}

    def __len__(self) -> int:
        return len(self._holds)

    async def put(self, hold: Hold) -> None:
        self._holds[hold.request_id] = hold

    async def get(self, request_id: str) -> Hold | None:
        hold = self._holds.get(request_id)
        if hold is not None and hold.expires <= self.clock():
            return None
        return hold

    async def remove(self, request_id: str) -> Hold | None:
        return self._holds.pop(request_id, None)

    async def expired(self) -> list[Hold]:
        """Remove and return every hold past its expiry."""
        now = self.clock()
        gone = [h for h in self._holds.values() if h.expires <= now]
        for hold in gone:
            del self._holds[hold.request_id]
        return gone

    async def close(self) -> None:
        self._holds.clear()


class RedisHoldStore:
    """Holds in redis (`redis.asyncio`), with the TTL enforced by redis itself."""

    PREFIX = "baton:hold:"

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic, client: Any = None) -> None:
        if client is None:
            try:
                import redis.asyncio as redis_asyncio  # optional dependency
            except ImportError as exc:
                raise RuntimeError(
                    "degradation.store is 'redis' but the 'redis' package is not installed "
                    "(pip install redis), or use degradation.store: memory"
                ) from exc
            client = redis_asyncio.from_url(url)
        self.client = client
        self.clock = clock
        self._local: dict[str, float] = {}  # request id -> expiry, for the count and expiry sweeps

    def __len__(self) -> int:
        return len(self._local)

    async def put(self, hold: Hold) -> None:
        ttl_ms = max(1, int((hold.expires - self.clock()) * 1000))
        await self.client.set(self.PREFIX + hold.request_id, json.dumps(asdict(hold)), px=ttl_ms)
        self._local[hold.request_id] = hold.expires

    async def get(self, request_id: str) -> Hold | None:
        raw = await self.client.get(self.PREFIX + request_id)
        if raw is None:
            return None
        data = json.loads(raw)
        data["ring"] = tuple(data.get("ring") or ())
        return Hold(**data)

    async def remove(self, request_id: str) -> Hold | None:
        hold = await self.get(request_id)
        await self.client.delete(self.PREFIX + request_id)
        self._local.pop(request_id, None)
        return hold

    async def expired(self) -> list[Hold]:
        now = self.clock()
        gone = [rid for rid, exp in self._local.items() if exp <= now]
        out = []
        for rid in gone:
            self._local.pop(rid, None)
            await self.client.delete(self.PREFIX + rid)
            out.append(Hold(rid, "", {}, 0.0, self._local.get(rid, now)))
        return out

    async def close(self) -> None:
        close = getattr(self.client, "aclose", None) or getattr(self.client, "close", None)
        if close is not None:
            result = close()
            if hasattr(result, "__await__"):
                await result


def make_hold_store(store: str, redis_url: str = "", clock: Callable[[], float] = time.monotonic) -> HoldStore:
    if store == "redis":
        return RedisHoldStore(redis_url, clock)
    return MemoryHoldStore(clock)
