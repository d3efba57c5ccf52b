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
  publishes each one to redis as `baton:hold:<hold key>` (the hold as JSON, its created/expires times
  as wall-clock epoch seconds so other replicas can read them, with the hold's remaining TTL as the
  key's expiry), so every scheduler replica's held handles can be seen in one place and a key never
  outlives its hold. Redis is a record, never on the request path: a request only appends its write to
  a queue; one writer task sends the queue in order (so in order per hold), a pipelined batch per round
  trip, each round trip bounded by a timeout, over a pool of at most `MAX_CONNECTIONS`. So at most one
  round trip is ever in flight, and while redis's health is unknown (at start) or failing, the writer
  sends a single write as a probe and the rest wait behind it. After a failure every write is skipped
  for `BACKOFF_S` (each skip counted in `baton_scheduler_hold_store_errors_total`; failures logged at
  most once per `ERROR_LOG_INTERVAL_S`), then one probe goes out: a dead or hung redis costs one
  connection and one timeout per back-off period, not one per request. When redis answers again, every
  hold still held is published again, so the record regains those whose writes were skipped (with no
  other write to probe with, the heartbeat's sweep sends them once the back-off has passed). A key whose
  delete was skipped still expires by its TTL. The queue is bounded (`MAX_PENDING`; a write beyond it is skipped and counted).

A reload that changes the store (or its redis URL) moves the holds: `held()` lists the old store's, `adopt()`
files them in the new one at once without publishing; the service empties and closes the old store, then
`put`s the moved holds still held into the new one (so an old store on the same redis never deletes them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger("baton.scheduler.holds")


@dataclass
class Hold:
    request_id: str  # the request's id (the client's X-Request-Id, or the scheduler's): logs and the record
    prefill: str  # address of the context worker that holds the KV
    handle: dict[str, Any]  # choices[0].disaggregated_params of the context-only response
    created: float
    expires: float
    ring: tuple[str, ...] = field(default_factory=tuple)
    # What the store files the hold under (and its redis key's suffix). A client may send the same
    # X-Request-Id on several requests at once, and several scheduler replicas may publish to one redis,
    # so the service gives each hold a key of its own (`hold_key`); it defaults to the request id.
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.request_id


def hold_key(request_id: str) -> str:
    """A key no other hold has, in this process or another: the request id (so a key still names its
    request), then '#' and 64 random bits."""
    return f"{request_id}#{secrets.token_hex(8)}"


class HoldStore(Protocol):
    kind: str  # "memory" | "redis": the metrics' store label

    async def put(self, hold: Hold) -> None: ...

    async def get(self, key: str) -> Hold | None: ...

    async def remove(self, key: str) -> Hold | None: ...

    async def expired(self) -> list[Hold]: ...

    def shorten(self, key: str, ttl: float) -> bool:
        """The hold now ends `ttl` seconds after it was created, if that is sooner than its end (a reload
        lowered the TTL). True if it was brought forward."""
        ...

    def held(self) -> list[Hold]:
        """Every hold filed now (a reload moving them to another store)."""
        ...

    def adopt(self, holds: list[Hold]) -> None:
        """File `holds` at once, without publishing them anywhere (a reload moving them here from another
        store; it publishes them with `put` once the old store has let go of them)."""
        ...

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
        self._holds[hold.key] = hold

    async def get(self, key: str) -> Hold | None:
        hold = self._holds.get(key)
        if hold is not None and hold.expires <= self.clock():
            return None
        return hold

    async def remove(self, key: str) -> Hold | None:
        return self._holds.pop(key, None)

    async def expired(self) -> list[Hold]:
        """Remove and return every hold past its expiry."""
        now = self.clock()
        gone = [h for h in self._holds.values() if h.expires <= now]
        for hold in gone:
            del self._holds[hold.key]
        return gone

    def shorten(self, key: str, ttl: float) -> bool:
        hold = self._holds.get(key)
        if hold is None or hold.created + ttl >= hold.expires:
            return False
        hold.expires = hold.created + ttl
        return True

    def held(self) -> list[Hold]:
        return list(self._holds.values())

    def adopt(self, holds: list[Hold]) -> None:
        for hold in holds:
            self._holds[hold.key] = hold

    async def close(self) -> None:
        self._holds.clear()


def _redis_client(url: str, timeout_s: float, max_connections: int) -> Any:
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
        # A bounded pool: the store's one writer needs one connection; a pool that is used up fails at once
        # (redis-py's default pool raises instead of waiting), which the store counts like any failed write.
        return redis_asyncio.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0), max_connections=max_connections)
    except ValueError:
        # not redis-py's message: it quotes the part of the URL it could not parse, which may be the password
        raise RuntimeError("the degradation redis URL cannot be parsed: percent-encode the reserved characters "
                           "(/ ? # @ : %) in its user name and password") from None


@dataclass(slots=True)
class _Write:
    hold: str  # the hold's key
    operation: str  # "put" | "remove" | "expire": the metrics' operation label
    key: str
    payload: str | None = None  # a put's JSON; None for a delete
    expires: float = 0.0  # a put's expiry on the store's clock: its key's TTL is taken when it is sent


class RedisHoldStore(MemoryHoldStore):
    """The memory store, each hold also published to redis in the background (see the module docstring)."""

    kind = "redis"
    PREFIX = "baton:hold:"
    TIMEOUT_S = 0.5  # one redis round trip (a batch of writes), connect included
    BACKOFF_S = 5.0  # after a failed write, later writes are skipped this long
    ERROR_LOG_INTERVAL_S = 30.0
    MAX_BATCH = 256  # writes sent in one pipeline (one round trip) while redis answers
    MAX_PENDING = 10_000  # queued writes; beyond this a write is skipped (and counted) instead of queued
    MAX_CONNECTIONS = 2  # the pool's bound: one writer, plus one being released after a timeout

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic, client: Any = None, *,
                 timeout_s: float | None = None, backoff_s: float | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        super().__init__(clock)
        self.timeout_s = self.TIMEOUT_S if timeout_s is None else timeout_s
        self.backoff_s = self.BACKOFF_S if backoff_s is None else backoff_s
        self.client = client if client is not None else _redis_client(url, self.timeout_s, self.MAX_CONNECTIONS)
        self.on_error = on_error
        # One writer task drains one FIFO queue: at most one redis round trip is in flight at any time, and the
        # writes of a hold are applied in the order they were made (a delete never runs before its put).
        self._queue: deque[_Write] = deque()
        self._pending: dict[str, int] = {}  # queued or in-flight writes per hold key
        self._writer: asyncio.Task[None] | None = None
        self._down_until = 0.0  # monotonic time before which writes are skipped (after a failure)
        self._confirmed = False  # a write has succeeded since start or since the last failure
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
        self._publish(hold)

    def _publish(self, hold: Hold) -> None:
        # Other replicas read the record: its times are wall-clock epoch seconds, not this process's clock.
        offset = time.time() - self.clock()
        record = asdict(hold)
        record["created"] = hold.created + offset
        record["expires"] = hold.expires + offset
        self._write(_Write(hold.key, "put", self.PREFIX + hold.key, json.dumps(record), hold.expires))

    def shorten(self, key: str, ttl: float) -> bool:
        if not super().shorten(key, ttl):
            return False
        self._publish(self._holds[key])  # set again: the record's expiry and its key's TTL
        return True

    def _republish(self) -> None:
        """Publish every hold held now again: those whose writes were skipped while redis was failing are
        missing from the record (a hold that is there already is only set again)."""
        for hold in self.held():
            self._publish(hold)

    async def remove(self, key: str) -> Hold | None:
        hold = await super().remove(key)
        if hold is not None or key in self._pending:
            self._write(_Write(key, "remove", self.PREFIX + key))
        return hold

    async def expired(self) -> list[Hold]:
        """Remove and return every hold past its expiry (its key has expired in redis by itself). Called
        periodically (the scheduler's heartbeat): while redis is failing and nothing else is written, one
        held hold is published again once the back-off has passed, which probes redis; once it answers,
        every hold is published again (`_send`)."""
        gone = await super().expired()
        for hold in gone:
            self._write(_Write(hold.key, "expire", self.PREFIX + hold.key))
        if self._failing and not self._queue and len(self) and time.monotonic() >= self._down_until:
            self._publish(next(iter(self.held())))  # one probe; once it gets through, the rest follow
        return gone

    async def flush(self) -> None:
        """Wait for the background writes queued so far (tests, shutdown)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer])

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), self.timeout_s * 2)
        except asyncio.TimeoutError:
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.wait([self._writer])
        self._queue.clear()
        self._pending.clear()
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
    def _write(self, write: _Write) -> None:
        """Queue `write` for the writer task (started if it is not running); never waits."""
        if len(self._queue) >= self.MAX_PENDING:  # redis is far behind: keep memory bounded, count the skip
            self._count_error(write.operation)
            return
        self._queue.append(write)
        self._pending[write.hold] = self._pending.get(write.hold, 0) + 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """The one writer: send the queue in order, a batch per round trip, until it is empty."""
        while self._queue:
            if time.monotonic() < self._down_until:
                size = len(self._queue)  # backing off: every queued write is skipped at once
            elif not self._confirmed:
                size = 1  # redis's health is unknown or failing: one probe write, the rest wait behind it
            else:
                size = self.MAX_BATCH
            batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the writer; the hold goes on from memory
                log.exception("hold store writer failed")
            finally:
                for write in batch:
                    left = self._pending.get(write.hold, 0) - 1
                    if left > 0:
                        self._pending[write.hold] = left
                    else:
                        self._pending.pop(write.hold, None)

    async def _send(self, batch: list[_Write]) -> None:
        if time.monotonic() < self._down_until:
            for write in batch:
                self._failed(write.operation, None)
            return
        sent: list[_Write] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.client.pipeline(transaction=False) as pipe:
                    for write in batch:
                        if write.payload is None:
                            pipe.delete(write.key)
                            sent.append(write)
                            continue
                        ttl_ms = int((write.expires - self.clock()) * 1000)
                        if ttl_ms > 0:  # else the hold has expired while queued: nothing to publish
                            pipe.set(write.key, write.payload, px=ttl_ms)
                            sent.append(write)
                    if not sent:
                        return
                    results = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis errors, OSError, TimeoutError: the holds go on from memory
            self._back_off()
            for write in sent:
                self._failed(write.operation, exc)
            return
        refused = 0
        for write, result in zip(sent, results):
            if isinstance(result, Exception):  # redis answered with an error for this one command
                refused += 1
                self._count_error(write.operation)
                self._log_error(write.operation, result)
            else:
                self.writes += 1
        if refused == len(sent):
            # Every write refused (OOM under noeviction, READONLY replica, a full disk): the record is not being
            # kept, as when redis is unreachable. Unhealthy, backed off, and republished once a write succeeds.
            self._failing = True
            self._back_off()
            return
        self._confirmed = True
        if refused:
            # Some refused: they are missing from the record; what is held is published again once redis
            # takes every write of a batch.
            self._failing = True
            return
        if self._failing:
            self._failing = False
            log.info("event=hold_store_recovered store=redis failed_writes=%d republished=%d",
                     self._errors_since_log, len(self))
            self._errors_since_log = 0
            self._republish()  # what was skipped while it failed

    def _back_off(self) -> None:
        """Redis keeps no record now: skip writes for `backoff_s`, then probe with one write."""
        self._down_until = time.monotonic() + self.backoff_s
        self._confirmed = False

    def _count_error(self, operation: str) -> None:
        self.errors += 1
        self._errors_since_log += 1
        if self.on_error is not None:
            self.on_error(operation)

    def _failed(self, operation: str, exc: BaseException | None) -> None:
        self._failing = True
        self._count_error(operation)
        if exc is not None:
            self._log_error(operation, exc)

    def _log_error(self, operation: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._logged_at >= self.ERROR_LOG_INTERVAL_S:
            self._logged_at = now
            log.warning("event=hold_store_unavailable store=redis operation=%s failed_writes=%d error=%r "
                        "detail=%r", operation, self._errors_since_log, f"{type(exc).__name__}: {exc}",
                        f"holds go on from memory; redis writes are skipped for {self.backoff_s:g}s after a failure")
            self._errors_since_log = 0


_QUERY_SECRET = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redacted_redis_url(url: str) -> str:
    """`url` fit to show (in /debug/state and logs): a password masked as `***` wherever redis-py takes one
    from (the user info, even with an unescaped `/` or `@` in it, and a `password` query parameter), the
    rest kept, so an operator can tell which Redis, database and user a scheduler writes to. Masks too much
    rather than too little: everything between `://` and the last `@` is user info here."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        if ":" in userinfo:
            rest = f"{userinfo.partition(':')[0]}:***@{host}"
    return _QUERY_SECRET.sub(r"\1***", scheme + sep + rest)


def make_hold_store(store: str, redis_url: str = "", clock: Callable[[], float] = time.monotonic,
                    on_error: Callable[[str], None] | None = None) -> HoldStore:
    if store == "redis":
        return RedisHoldStore(redis_url, clock, on_error=on_error)
    return MemoryHoldStore(clock)
