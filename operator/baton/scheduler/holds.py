"""Degradation holds: finished prefills waiting for a decode slot instead of being dropped.

When the decode tier is saturated, the handle returned by a context-only request (its
`disaggregated_params`) is kept in a hold until a decode slot in the prefill replica's ring frees, at
most `degradation.holdTtlSeconds`. The waiting itself is done by the request's coroutine (a priority
waiter in the decode queue); the store is the record of what is held: it backs the `baton_scheduler_holds`
gauge and the backlog that `queue.maxDepth` bounds, and expires entries on its own.

Keep the TTL below the prefill workers' `kv_transfer_timeout_ms`: after that the context worker frees
the KV and a late generation-only request fails (the service then re-prefills once, budget permitting).

Stores:
- `MemoryHoldStore` (default, injectable clock).
- `RedisHoldStore` (`degradation.store: redis`, the optional `redis` package, `pip install baton[redis]`;
  the Baton image has it). The process keeps its holds in memory as the memory store does, and
  publishes each one to redis as `baton:hold:<request id>` (the hold as JSON, with the hold's TTL as the
  key's expiry), so every scheduler replica's held handles can be seen in one place and a key never
  outlives its hold. Redis is a record, never on the request path: writes go out in the background,
  in order per hold, each bounded by a timeout. While redis is unreachable the holds still work (from
  memory); failed writes are counted (`baton_scheduler_hold_store_errors_total`), logged at most once
  per `ERROR_LOG_INTERVAL_S`, and writes are skipped for `BACKOFF_S` after a failure, so a dead redis
  costs one timeout per back-off period, not one per request. A key whose delete was skipped still
  expires by its TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger("baton.scheduler.holds")


@dataclass
class Hold:
    request_id: str
    prefill: str  # address of the context worker that holds the KV
    handle: dict[str, Any]  # choices[0].disaggregated_params of the context-only response
    created: float
    expires: float
    ring: tuple[str, ...] = field(default_factory=tuple)


class HoldStore(Protocol):
    kind: str  # "memory" | "redis": the metrics' store label

    async def put(self, hold: Hold) -> None: ...

    async def get(self, request_id: str) -> Hold | None: ...

    async def remove(self, request_id: str) -> Hold | None: ...

    async def expired(self) -> list[Hold]: ...

    def __len__(self) -> int: ...

    def healthy(self) -> bool: ...

    async def close(self) -> None: ...


class MemoryHoldStore:
    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._holds: dict[str, Hold] = {}

    def __len__(self) -> int:
        return len(self._holds)

    def healthy(self) -> bool:
        return True

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


def _redis_client(url: str, timeout_s: float) -> Any:
    try:
        import redis.asyncio as redis_asyncio  # optional dependency
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:
        raise RuntimeError(
            "degradation.store is 'redis' but the 'redis' package is not installed "
            "(pip install 'baton[redis]', or pip install redis), or use degradation.store: memory"
        ) from exc
    try:
        # No retries inside the client: the store backs off on its own, and a write must end within its timeout.
        return redis_asyncio.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0))
    except ValueError as exc:
        raise RuntimeError(f"degradation redis URL is not usable: {exc}") from None


class RedisHoldStore(MemoryHoldStore):
    """The memory store, each hold also published to redis in the background (see the module docstring)."""

    kind = "redis"
    PREFIX = "baton:hold:"
    TIMEOUT_S = 0.5  # one redis write, connect included
    BACKOFF_S = 5.0  # after a failed write, later writes are skipped this long
    ERROR_LOG_INTERVAL_S = 30.0

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic, client: Any = None, *,
                 timeout_s: float | None = None, backoff_s: float | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        super().__init__(clock)
        self.timeout_s = self.TIMEOUT_S if timeout_s is None else timeout_s
        self.backoff_s = self.BACKOFF_S if backoff_s is None else backoff_s
        self.client = client if client is not None else _redis_client(url, self.timeout_s)
        self.on_error = on_error
        self._writes: dict[str, asyncio.Task[None]] = {}  # the last background write per request id
        self._down_until = 0.0  # monotonic time before which writes are skipped (after a failure)
        self._failing = False
        self._errors_since_log = 0
        self._logged_at = -1e18
        self.errors = 0  # failed or skipped writes, in all
        self.writes = 0  # writes that reached redis

    def healthy(self) -> bool:
        """False from a failed write until one succeeds again."""
        return not self._failing

    async def put(self, hold: Hold) -> None:
        await super().put(hold)
        ttl_ms = max(1, int((hold.expires - self.clock()) * 1000))
        payload = json.dumps(asdict(hold))
        key = self.PREFIX + hold.request_id
        self._write(hold.request_id, "put", lambda: self.client.set(key, payload, px=ttl_ms))

    async def remove(self, request_id: str) -> Hold | None:
        hold = await super().remove(request_id)
        if hold is not None or request_id in self._writes:
            key = self.PREFIX + request_id
            self._write(request_id, "remove", lambda: self.client.delete(key))
        return hold

    async def expired(self) -> list[Hold]:
        """Remove and return every hold past its expiry (its key has expired in redis by itself)."""
        gone = await super().expired()
        for hold in gone:
            key = self.PREFIX + hold.request_id
            self._write(hold.request_id, "expire", lambda key=key: self.client.delete(key))
        return gone

    async def flush(self) -> None:
        """Wait for the background writes started so far (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes.values()), return_exceptions=True)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), self.timeout_s * 2)
        except asyncio.TimeoutError:
            for task in list(self._writes.values()):
                task.cancel()
        await super().close()
        close = getattr(self.client, "aclose", None) or getattr(self.client, "close", None)
        if close is not None:
            try:
                result = close()
                if hasattr(result, "__await__"):
                    await result
            except Exception:  # closing a client whose server is gone
                log.debug("redis client close failed", exc_info=True)

    # ------------------------------------------------------------------ background writes
    def _write(self, request_id: str, operation: str, call: Callable[[], Awaitable[Any]]) -> None:
        """Start `call` after the hold's previous write (so a put is never applied after its remove)."""
        previous = self._writes.get(request_id)
        task = asyncio.get_running_loop().create_task(self._run(previous, operation, call))
        self._writes[request_id] = task
        task.add_done_callback(lambda t: self._writes.pop(request_id, None) if self._writes.get(request_id) is t
                               else None)

    async def _run(self, previous: asyncio.Task[None] | None, operation: str,
                   call: Callable[[], Awaitable[Any]]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        if time.monotonic() < self._down_until:
            self._failed(operation, None)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis errors, OSError, TimeoutError: the hold goes on from memory
            self._down_until = time.monotonic() + self.backoff_s
            self._failed(operation, exc)
            return
        self.writes += 1
        if self._failing:
            self._failing = False
            log.info("event=hold_store_recovered store=redis failed_writes=%d", self._errors_since_log)
            self._errors_since_log = 0

    def _failed(self, operation: str, exc: BaseException | None) -> None:
        self.errors += 1
        self._errors_since_log += 1
        self._failing = True
        if self.on_error is not None:
            self.on_error(operation)
        now = time.monotonic()
        if exc is not None and now - self._logged_at >= self.ERROR_LOG_INTERVAL_S:
            self._logged_at = now
            log.warning("event=hold_store_unavailable store=redis operation=%s failed_writes=%d error=%r "
                        "detail=%r", operation, self._errors_since_log, f"{type(exc).__name__}: {exc}",
                        f"holds go on from memory; redis writes are skipped for {self.backoff_s:g}s after a failure")
            self._errors_since_log = 0


def make_hold_store(store: str, redis_url: str = "", clock: Callable[[], float] = time.monotonic,
                    on_error: Callable[[str], None] | None = None) -> HoldStore:
    if store == "redis":
        return RedisHoldStore(redis_url, clock, on_error=on_error)
    return MemoryHoldStore(clock)
