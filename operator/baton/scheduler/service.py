"""The request flow: route, admit, place, dispatch, hand off, stream, retry, account.

One `SchedulerService` per process (tests build several). For each OpenAI request it:
1. parses the body once and counts the prompt (`requests`);
2. decides local vs disaggregated (`routing.decide`) from a snapshot of the endpoint state;
3. local: waits for a decode slot (decode queue: token bucket, per-replica cap, backpressure), sends the
   request unchanged (context and generation on the decode replica) and relays the answer;
4. disaggregated: waits for a prefill slot (prefill queue: token bucket, per-replica batch size, total
   concurrent prefills; placement policy), sends `context_only`, then takes a decode slot in that prefill
   replica's ring -- or, when the ring is saturated, holds the handle (`holds`) until one frees or the hold
   expires -- and sends `generation_only` with the handle and the prompt token ids;
5. retries on another replica/pair when an engine fails before anything reached the client (connection
   error, 5xx), within `retries.maxAttempts` and the retry budget; a KV-format mismatch is never retried
   onto the same pair: the pair is remembered as incompatible and the engine's message is returned. A
   streamed handoff cut with no reason given (trtllm-serve's way) is retried, and its pair checked with a tiny
   unstreamed handoff that gets the engine's error text (`_check_pair`).
Every request ends in a response or an explicit error and is counted once by outcome:
completed | rejected (429) | failed | invalid (4xx from the client's own request) | cancelled (client left).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from baton import tokens
from baton.http1.client import ClosedMidAnswer
from baton.http1.server import cancelled_by_stop
from baton.model_tokenizer import ModelTokenizer, fetch_tokenizer, load_tokenizer
from baton.openai_stream import wants_usage
from baton.scheduler.admission import (
    PASS,
    LatencyWindow,
    QueueTimeout,
    RetryBudget,
    TokenBucket,
    WaitQueue,
    retry_after_seconds,
)
from baton.scheduler.config import ConfigError, SchedulerConfig, TokenizerConfig
from baton.scheduler.endpoints import DECODE, PREFILL, Endpoint, KubernetesDiscovery, make_discovery
from baton.scheduler.engines import (
    EngineClient,
    EnginesByRuntime,
    EngineFailure,
    classify_failure,
    make_engine_client,
)
from baton.scheduler.holds import Hold, HoldStore, hold_key, make_hold_store, redacted_redis_url
from baton.scheduler.metrics import ROUTE_UNROUTED, PrometheusHooks, SchedulerHooks
from baton.scheduler.placement import (
    ReplicaState,
    build_rings,
    make_policy,
    pick_decode,
)
from baton.scheduler.relay import StreamRelay, starts_with_error_event
from baton.scheduler.replies import (
    HDR_DECODE,
    HDR_ERROR,
    HDR_PREFILL,
    HDR_REQUEST_ID,
    HDR_ROUTE,
    AnyReply,
    RelayReply,
    Reply,
    SchedulerError,
    StreamReply,
    error_body,
)
from baton.scheduler.requests import (
    CHAT,
    COMPLETIONS,
    ParsedRequest,
    RequestError,
    parse_context_answer,
    parse_request,
)
from baton.scheduler.routing import Band, LoadView, Route, classify, decide, must_stay_uncompressed

log = logging.getLogger("baton.scheduler")

LOCAL = Route.LOCAL.value
DISAGG = Route.DISAGGREGATED.value

# The outcome `generation_requests_total` counts a request under when it failed by the scheduler's own
# decision (capacity, shutdown) rather than by its engines' (`SchedulerError.shed`)
GENERATION_SHED = "shed"
DEFAULT_PREFILL_TPS = 20_000.0  # prefill throughput assumed until one is observed (tokens/s)
INCOMPATIBLE_PAIR_TTL_S = 300.0  # how long a KV-format mismatch keeps a pair out of placement
# A pair whose streamed handoff was cut with no reason given is checked (`_check_pair`) at most this often
PAIR_CHECK_INTERVAL_S = 30.0
PAIR_CHECK_TIMEOUT_S = 30.0  # the whole check: a tiny context_only, then its generation_only
PAIR_CHECK_PROMPT = list(range(1, 17))  # token ids: a prompt a block or two long, whatever the engine's vocabulary
# While decode is throttled, requests waiting for a decode slot look again this often: the throttle lifts
# as slow samples age out of the p95 window, which no release or arrival announces.
THROTTLE_RECHECK_S = 0.5
# A reload that replaces the engine client (`runtime`, `engineTimeoutSeconds`) closes the old one when the
# last request attempt or stream using it ends; one still in use this long after is closed anyway.
RETIRED_ENGINE_GRACE_S = 1800.0
UNHEALTHY_AFTER_5XX = 3  # consecutive 5xx answers before a replica is taken out of rotation
# When an endpoint update takes the last healthy decode replica away, requests that need one wait up to this
# long for a replacement before the 503: a rolling update publishes the old pod's departure and its
# replacement in separate EndpointSlice events (a slice per port, say), and the lists must not read as an
# outage in between. A replica failing its calls or its heartbeat is an outage at once.
DECODE_SETTLE_S = 2.0

# A client's X-Request-Id is carried through both tiers and into logs: kept when it is a plain token
# (what tracing systems and ingress controllers generate), replaced by a fresh id otherwise.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


# ---------------------------------------------------------------------------------------------- per request
class _StrandedHold(Exception):
    """A held prefill whose KV is gone: its prefill replica left the endpoint lists, or another pod answers
    at its address."""


def _request_id(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id when it is a plain token (it is copied into headers to both tiers), else a
    generated one."""
    rid = headers.get(HDR_REQUEST_ID)
    return rid if rid and _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex


# Retry-After on a 503 for a tier with no healthy replica: a replica restarting or scaled from zero takes
# longer than this, but a client that retries sooner only adds load while none is there.
NO_ENDPOINTS_RETRY_AFTER_S = 5


def _no_decode_endpoints() -> SchedulerError:
    return SchedulerError(503, "no healthy decode endpoint is available", "no_decode_endpoints", "service_unavailable",
                          retry_after=NO_ENDPOINTS_RETRY_AFTER_S)


def _shutting_down(message: str) -> SchedulerError:
    """503 shutting_down with Retry-After (another scheduler replica can take the request): the scheduler's
    own decision, not its engines' failure (`shed`)."""
    return SchedulerError(503, message, "shutting_down", "service_unavailable", retry_after=1, shed=True)


class _NoPrefillPair(Exception):
    """A request waiting for a prefill slot has no usable prefill replica left (all unhealthy or excluded)."""


class _EngineSlot:
    """An engine client and how many request attempts (and streams) use it now. A reload that changes
    `runtime` or `engineTimeoutSeconds` puts a new slot in place for the attempts that start after it; the
    old slot is `retired` and its client closed when its last user is done (or after RETIRED_ENGINE_GRACE_S)."""

    __slots__ = ("client", "runtime", "timeout", "users", "retired", "closed", "timer")

    def __init__(self, client: EnginesByRuntime, runtime: str, timeout: float) -> None:
        self.client = client
        self.runtime = runtime
        self.timeout = timeout
        self.users = 0
        self.retired = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None


def load_scheduler_tokenizer(config: TokenizerConfig, environ: Mapping[str, str]) -> ModelTokenizer | None:
    """The model's tokenizer the config names, or None for the estimate (blocking: file or network I/O)."""
    if config.path:
        return load_tokenizer(config.path)
    if config.hugging_face_id:
        return fetch_tokenizer(config.hugging_face_id, config.revision, environ)
    return None


def _in_daemon_thread(fn: Any, *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` run in a thread of its own, its result (or exception) in the future returned. A daemon
    thread, not the loop's default executor (`asyncio.to_thread`): `asyncio.run` joins the executor's
    threads at exit without a timeout, so a tokenizer download still under way would hold up the shutdown.
    An answer arriving after the loop closed (or the future was cancelled) is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits for it any more
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def work() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the waiter
            error = exc
        except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit in the loader: a failed load all the same
            error = RuntimeError(f"{type(exc).__name__}: {exc}")
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: the process is shutting down
            pass

    threading.Thread(target=work, name="baton-tokenizer-load", daemon=True).start()
    return future


class _Ctx:
    __slots__ = ("rid", "api", "t0", "req", "route", "reason", "attempt", "excluded", "prefill", "decode",
                 "reprefilled", "stranded", "queue_wait", "settle_wait", "mark", "generation", "engine", "slot")

    def __init__(self, rid: str, api: str, t0: float) -> None:
        self.rid = rid
        self.api = api
        self.t0 = t0
        self.req: ParsedRequest | None = None
        self.route = ROUTE_UNROUTED
        self.reason = ""
        self.attempt = 0
        self.excluded: set[str] = set()
        self.prefill: ReplicaState | None = None
        self.decode: ReplicaState | None = None
        self.reprefilled = False
        self.stranded = False  # how its last hold ended: stranded (its prefill replica left), else expired
        self.queue_wait = 0.0
        self.settle_wait = 0.0  # waited out a settle window before being routed (`_route` records it)
        # where the scheduler's own work on the current attempt began, moved on by the time it waited:
        # what `overhead_seconds` measures up to the dispatch
        self.mark = t0
        self.generation = ""  # the engine generation serving when the request was dispatched
        # the current attempt's engine client, taken from the service's slot when the attempt starts: a
        # reload replacing the client leaves the attempt (and its stream) on the one it started with
        self.engine: EnginesByRuntime | None = None
        self.slot: _EngineSlot | None = None  # the slot this attempt holds a use of (None once a stream has it)

    def headers(self) -> dict[str, str]:
        h = {HDR_REQUEST_ID: self.rid}
        if self.route != ROUTE_UNROUTED:
            h[HDR_ROUTE] = self.route
        if self.prefill is not None:
            h[HDR_PREFILL] = self.prefill.address
        if self.decode is not None:
            h[HDR_DECODE] = self.decode.address
        return h


class _DecodeLease:
    """A decode slot: `first_token()` ends a local request's context phase, `release()` frees the slot."""

    __slots__ = ("svc", "replica", "local_open", "open")

    def __init__(self, svc: SchedulerService, replica: ReplicaState, local: bool) -> None:
        self.svc = svc
        self.replica = replica
        self.local_open = local
        self.open = True

    def first_token(self) -> None:
        if self.local_open:
            self.local_open = False
            self.replica.local_prefills -= 1
            self.svc.decode_queue.notify()

    def release(self) -> None:
        if self.local_open:
            self.local_open = False
            self.replica.local_prefills -= 1
        if self.open:
            self.open = False
            self.replica.active -= 1
            self.svc.decode_queue.notify()

    def unused(self) -> None:
        """Give back a slot granted to a waiter that went away before using it, with its bucket token."""
        self.svc.decode_bucket.give_back(1)
        self.release()


class _RateMeter:
    """Events per second, exponentially decayed (time constant `tau` seconds)."""

    __slots__ = ("tau", "value", "stamp", "clock")

    def __init__(self, clock: Any, tau: float = 10.0) -> None:
        self.clock = clock
        self.tau = tau
        self.value = 0.0
        self.stamp = clock()

    def _decay(self) -> None:
        now = self.clock()
        self.value *= math.exp(-(now - self.stamp) / self.tau)
        self.stamp = now

    def tick(self) -> None:
        self._decay()
        self.value += 1.0 / self.tau

    def rate(self) -> float:
        self._decay()
        return self.value


# ---------------------------------------------------------------------------------------------- service
class SchedulerService:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        engine: EngineClient | None = None,
        hooks: SchedulerHooks | None = None,
        hold_store: HoldStore | None = None,
        clock: Any = time.monotonic,
        discover: bool = True,
        engine_factory: Any = None,
        tokenizer_loader: Any = None,
    ) -> None:
        """`engine_factory(runtime, timeout)` builds engine clients (default `make_engine_client`).
        `config.tokenizer` is taken as the tokenizer installed in `baton.tokens` now (the caller loads it at
        start); a reload that changes it loads the new one with `tokenizer_loader(config, environ)` (default
        `load_scheduler_tokenizer`) in a thread."""
        self.config = config
        self.clock = clock
        self.metrics = PrometheusHooks(self.snapshot)
        self.hooks: SchedulerHooks = hooks or self.metrics
        self._engine_factory = engine_factory or make_engine_client
        timeout = config.engine_timeout_seconds
        self._engine_slot = _EngineSlot(self._engines(config.runtime, timeout, engine), config.runtime, timeout)
        self._retired_engines: set[_EngineSlot] = set()
        if hold_store is None:
            self._holds_target = self._hold_store_target(config)
            self.holds: HoldStore = self._make_hold_store(self._holds_target)
        else:
            try:
                self._holds_target = self._hold_store_target(config)
            except ConfigError:
                self._holds_target = (config.degradation.store, "")
            self.holds = hold_store
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer_loaded = config.tokenizer  # the tokenizer config counting uses now
        self._tokenizer_wanted = config.tokenizer  # ... or is being loaded to (a reload changed it)
        self._tokenizer_seq = 0  # bumped by every tokenizer change: a superseded load is dropped
        self._background: set[asyncio.Task[Any]] = set()  # closing replaced clients and stores
        self._loads: set[asyncio.Task[Any]] = set()  # tokenizer loads (cancelled on stop)
        self._hold_retirement: asyncio.Task[Any] | None = None  # the latest hold store retirement
        self.prefill: dict[str, ReplicaState] = {}
        self.decode: dict[str, ReplicaState] = {}
        # Replicas that left the endpoint lists (a generation switch, a scale-down) with requests still in
        # flight on them: their counts stay in /metrics until those end, which is how the operator knows a
        # generation it is draining still serves (an engine's own /metrics need not say so).
        self._departed: dict[tuple[str, str], list[ReplicaState]] = {}
        self._prefill_eps: list[Endpoint] = []
        self._decode_eps: list[Endpoint] = []
        self.rings: dict[str, tuple[str, ...]] = {}
        self.policy = make_policy(config.routing.placement_policy)
        adm = config.admission
        self.prefill_bucket = TokenBucket(adm.prefill_tokens_per_second, adm.prefill_burst_tokens, clock)
        self.decode_bucket = TokenBucket(adm.decode_requests_per_second, adm.decode_burst, clock)
        self.prefill_queue: WaitQueue[ReplicaState] = WaitQueue("prefill", strict=True)
        self.decode_queue: WaitQueue[_DecodeLease] = WaitQueue("decode", strict=False)
        self.retry_budget = RetryBudget(config.retries.budget_ratio, clock)
        self.tpot_window = LatencyWindow(clock=clock)
        self.incompatible: dict[tuple[str, str], tuple[float, str]] = {}
        self.pair_checked: dict[tuple[str, str], float] = {}  # when each pair was last checked (`_check_pair`)
        self.prefills_in_flight = 0
        self.prefill_tps = 0.0
        self.completions = _RateMeter(clock)
        self.config_loaded = True
        self._discover = discover
        self._discovery: Any = None
        self._endpoints_config: Any = config.endpoints  # what the running discovery follows
        self._tasks: list[asyncio.Task[Any]] = []
        self._probe_tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat_changed = asyncio.Event()  # set by a reload that changes heartbeatSeconds
        # until when requests wait for decode replicas an endpoint update took away (DECODE_SETTLE_S)
        self._decode_settle_until = 0.0
        self._decode_settle_timer: asyncio.TimerHandle | None = None
        self._replicas_event = asyncio.Event()  # set (and replaced) whenever replicas change: settle waiters look again
        self._settling = 0  # requests waiting out a settle window (`_decode_replaced`)
        # the holds waiting for a decode slot, with the timeout that ends each (a reload that shortens
        # degradation.holdTtlSeconds brings their ends forward: `_shorten_holds`)
        self._hold_limits: dict[str, tuple[float, asyncio.Timeout]] = {}  # hold key: (loop time held, its end)

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._discover:
            self._discovery = make_discovery(self.config.endpoints, self.update_endpoints, loop)
            self._endpoints_config = self.config.endpoints
            self._discovery.start()
        self._tasks.append(loop.create_task(self._heartbeat_loop(), name="baton-heartbeat"))
        log.info("event=scheduler_started model=%s discovery=%s", self.config.model, self.config.endpoints.discovery)

    async def stop(self) -> None:
        if self._discovery is not None:
            self._discovery.stop()
        for task in [*self._tasks, *self._probe_tasks]:
            task.cancel()
        for task in [*self._tasks, *self._probe_tasks]:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self._decode_settle_timer is not None:
            self._decode_settle_timer.cancel()
            self._decode_settle_timer = None
        for task in self._loads:
            task.cancel()
        while pending := [*self._background, *self._loads]:
            await asyncio.wait(pending)  # closing what reloads replaced is bounded; a load's thread is let go
        self.prefill_queue.close()
        self.decode_queue.close()
        await self.holds.close()
        for slot in [*self._retired_engines, self._engine_slot]:
            await self._close_engine_now(slot)
        self._retired_engines.clear()

    # ------------------------------------------------------------------------------ reload
    @property
    def engine(self) -> EngineClient:
        """The client of the config's runtime that new request attempts and health checks use (for the
        endpoints whose pods do not say which runtime serves them)."""
        return self._engine_slot.client.primary

    def _engines(self, runtime: str, timeout: float, first: EngineClient | None = None) -> EnginesByRuntime:
        """A client per runtime (see `EnginesByRuntime`), `runtime` the default, all with `timeout`."""
        factory = self._engine_factory
        return EnginesByRuntime(runtime, lambda other: factory(other, timeout), first)

    def apply_config(self, new: SchedulerConfig) -> None:
        """Hot reload: everything but the listen address changes in place. Thresholds, policies, limits and
        endpoints at once; a new engine client (`runtime`, `engineTimeoutSeconds`) for the request attempts
        that start from now on, the old one closed once its last attempt or stream ends; a new hold store
        (`degradation.store`, the redis URL) taking over the current holds; a new tokenizer once loaded (in a
        thread). A client, store, endpoint discovery or tokenizer that cannot be built is logged, the running
        one kept, and the reload counted `rejected` (the rest of it applies); otherwise `applied` (when the
        tokenizer is loaded, if it changed). Each reload is counted once: a reload that raises (a bug) is
        counted `rejected` here, as the caller only logs it."""
        failed: list[str] = []
        try:
            loading = self._apply_config(new, failed)
        except Exception:
            self._count_reload(["error"])
            raise
        if not loading:
            self._count_reload(failed)

    def _apply_config(self, new: SchedulerConfig, failed: list[str]) -> bool:
        """`apply_config`'s work; True when a tokenizer load was started (it counts the reload when it ends).
        The load is started last, so that nothing after it can fail the reload it counts."""
        old = self.config
        self.config = new
        if new.routing.placement_policy != old.routing.placement_policy:
            self.policy = make_policy(new.routing.placement_policy)
        adm = new.admission
        self.prefill_bucket.configure(adm.prefill_tokens_per_second, adm.prefill_burst_tokens)
        self.decode_bucket.configure(adm.decode_requests_per_second, adm.decode_burst)
        self.retry_budget.ratio = new.retries.budget_ratio
        if new.degradation.hold_ttl_seconds < old.degradation.hold_ttl_seconds:
            self._shorten_holds(new.degradation.hold_ttl_seconds)
        if new.queue.max_wait_seconds < old.queue.max_wait_seconds:
            # requests already waiting keep to the new bound too (measured from when each began to wait)
            for queue in (self.prefill_queue, self.decode_queue):
                queue.shorten_waits(new.queue.max_wait_seconds)
        if new.heartbeat_seconds != old.heartbeat_seconds:
            self._heartbeat_changed.set()
        if (new.server.host, new.server.port) != (old.server.host, old.server.port):
            log.warning("event=config_needs_restart field=server detail=%r", "listen address changes need a restart")
        engine_replaced = self._reload_engine(new, failed)  # before the endpoints: new replicas get its probes
        self._reload_hold_store(new, failed)
        known = [*self.prefill.values(), *self.decode.values()] if engine_replaced else []
        rediscovered = (self._discover and new.endpoints != self._endpoints_config
                        and self._reload_discovery(new, failed))
        if not rediscovered and new.routing.ring_size != old.routing.ring_size:
            self.rings = build_rings(self._prefill_eps, self._decode_eps, new.routing.ring_size)
        if known:
            # the replicas known before answered the old client's health checks: ask those that stay the new
            # one's (replicas that discovery adds are probed as they arrive, through the new client)
            self._start_probe([r for r in known if (self.prefill if r.endpoint.tier == PREFILL else self.decode)
                               .get(r.address) is r])
        self.prefill_queue.notify()
        self.decode_queue.notify()
        return self._reload_tokenizer(new, failed)

    def _shorten_holds(self, ttl: float) -> None:
        """A reload lowered the hold TTL: the holds already waiting end when the new TTL, counted from when
        each was held, runs out (at once if it already has); the store's record of each (and its redis key's
        TTL) ends then too. A longer TTL applies to new holds only."""
        for key, (held_at, limit) in self._hold_limits.items():
            when = held_at + ttl  # loop time, as the timeout's
            current = limit.when()
            if not limit.expired() and (current is None or when < current):
                limit.reschedule(when)
                self.holds.shorten(key, ttl)

    async def reloads_settled(self) -> None:
        """Wait for what reloads started in the background: tokenizer loads, closing replaced hold stores and
        idle engine clients (tests; a replaced client still in use is closed when its requests end)."""
        while pending := [*self._background, *self._loads]:
            await asyncio.wait(pending)

    def _count_reload(self, failed: list[str]) -> None:
        self.hooks.config_reload("rejected" if failed else "applied")

    def _spawn(self, coro: Any, tasks: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
        tasks = self._background if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    # endpoint discovery
    def _reload_discovery(self, new: SchedulerConfig, failed: list[str]) -> bool:
        """Follow `new.endpoints` with a new discovery; True if done. One that cannot be built (e.g. no
        Kubernetes credentials) keeps the running one, and a later reload tries again."""
        try:
            discovery = make_discovery(new.endpoints, self.update_endpoints, asyncio.get_running_loop())
            if isinstance(discovery, KubernetesDiscovery):
                discovery.check_credentials()
                discovery.follow(self._discovery)
        except Exception as exc:  # noqa: BLE001 - keep following the endpoints as now
            failed.append("endpoints")
            log.error("event=config_reload_failed field=endpoints discovery=%s error=%r detail=%r",
                      new.endpoints.discovery, f"{type(exc).__name__}: {exc}", "keeping the running endpoint discovery")
            return False
        if self._discovery is not None:
            self._discovery.stop()
        self._discovery = discovery
        discovery.start()
        self._endpoints_config = new.endpoints
        return True

    # engine client
    def _reload_engine(self, new: SchedulerConfig, failed: list[str]) -> bool:
        """Put a new engine client in place when `runtime` or `engineTimeoutSeconds` changed; True if done."""
        current = self._engine_slot
        if (new.runtime, new.engine_timeout_seconds) == (current.runtime, current.timeout):
            return False
        try:
            client = self._engines(new.runtime, new.engine_timeout_seconds)
        except Exception as exc:  # noqa: BLE001 - e.g. tritonclient not installed: keep the running client
            failed.append("runtime")
            log.error("event=config_reload_failed field=runtime runtime=%s error=%r detail=%r", new.runtime,
                      f"{type(exc).__name__}: {exc}",
                      f"keeping the {current.runtime} engine client (engineTimeoutSeconds={current.timeout:g})")
            return False
        self._engine_slot = _EngineSlot(client, new.runtime, new.engine_timeout_seconds)
        current.retired = True
        log.info("event=engine_client_replaced runtime=%s engine_timeout_s=%g previous=%s in_use=%d", new.runtime,
                 new.engine_timeout_seconds, current.runtime, current.users)
        if current.users:
            self._retired_engines.add(current)
            current.timer = asyncio.get_running_loop().call_later(
                RETIRED_ENGINE_GRACE_S, self._close_engine, current)
        else:
            self._close_engine(current)
        return True

    def _engine_released(self, slot: _EngineSlot) -> None:
        """An attempt (or its stream) is done with `slot`'s client."""
        slot.users -= 1
        if slot.retired and not slot.users:
            self._close_engine(slot)

    def _close_engine(self, slot: _EngineSlot) -> None:
        if slot.closed:
            return
        if slot.users:
            log.warning("event=engine_client_closed_in_use runtime=%s in_use=%d grace_s=%g", slot.runtime,
                        slot.users, RETIRED_ENGINE_GRACE_S)
        self._spawn(self._close_engine_now(slot))

    async def _close_engine_now(self, slot: _EngineSlot) -> None:
        if slot.closed:
            return
        slot.closed = True
        self._retired_engines.discard(slot)
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        try:
            await slot.client.close()
        except Exception:  # noqa: BLE001 - closing must not fail a reload or the shutdown
            log.exception("event=engine_client_close_failed runtime=%s", slot.runtime)
        else:
            if slot.retired:
                log.info("event=engine_client_closed runtime=%s", slot.runtime)

    # hold store
    @staticmethod
    def _hold_store_target(config: SchedulerConfig) -> tuple[str, str]:
        """(store kind, redis URL or ""): what the hold store is built from (ConfigError: an unusable URL)."""
        degradation = config.degradation
        if degradation.store == "redis":
            return degradation.store, degradation.resolved_redis_url(os.environ)
        return degradation.store, ""

    def _make_hold_store(self, target: tuple[str, str]) -> HoldStore:
        kind, url = target
        return make_hold_store(kind, url, self.clock,
                               on_error=lambda operation: self.hooks.hold_store_error(kind, operation))

    def _reload_hold_store(self, new: SchedulerConfig, failed: list[str]) -> None:
        """A new hold store when the store or its redis URL changed: the current holds move into it at once
        (their requests remove them from whichever store holds them then, by key); the old one is emptied and
        closed in the background, then the moved holds still held are published in the new one."""
        try:
            target = self._hold_store_target(new)
            if target == self._holds_target:
                return
            store = self._make_hold_store(target)
        except (ConfigError, RuntimeError) as exc:  # no redis package, an unusable URL: keep the running store
            failed.append("degradation.store")
            log.error("event=config_reload_failed field=degradation.store store=%s error=%r detail=%r",
                      new.degradation.store, str(exc), f"keeping the {self.holds.kind} hold store")
            return
        old = self.holds
        moved = old.held()
        store.adopt(moved)  # no await between reading the old store's holds and the switch: none is missed
        self.holds = store
        self._holds_target = target
        log.info("event=hold_store_replaced store=%s redis=%s previous=%s holds_moved=%d", store.kind,
                 redacted_redis_url(target[1]) or "-", old.kind, len(moved))
        self._hold_retirement = self._spawn(self._retire_hold_store(old, store, moved, self._hold_retirement))

    async def _retire_hold_store(self, old: HoldStore, new: HoldStore, moved: list[Hold],
                                 previous: asyncio.Task[Any] | None) -> None:
        try:
            for hold in moved:
                await old.remove(hold.key)  # a redis store deletes its records of them
            await old.close()
        except Exception:  # noqa: BLE001 - the old store is gone either way; the holds live on in the new one
            log.exception("event=hold_store_close_failed store=%s", old.kind)
        # Published only now, so that an old store on the same redis cannot delete the new store's keys: not
        # this retirement's old store, nor an earlier one's (A -> memory -> A' in quick succession: the first
        # retirement's deletes in A must land before this one publishes in A'), hence the wait for the
        # retirement before this one (which waited for its own predecessor), bounded as each store's close is.
        if previous is not None:
            await asyncio.wait([previous])
        for hold in moved:
            if self.holds is not new:  # replaced again meanwhile: that reload moved them on
                break
            if await new.get(hold.key) is hold:  # still held (its request did not end meanwhile)
                await new.put(hold)

    # tokenizer
    def _reload_tokenizer(self, new: SchedulerConfig, failed: list[str]) -> bool:
        """Start loading a changed tokenizer in a thread; True when started (the reload is counted when the
        load ends). Requests go on counting with the running tokenizer until the new one is installed."""
        if new.tokenizer == self._tokenizer_wanted:
            return False
        self._tokenizer_wanted = new.tokenizer
        self._tokenizer_seq += 1  # a load still under way is dropped when it ends
        if not (new.tokenizer.path or new.tokenizer.hugging_face_id):  # the estimate: nothing to load
            tokens.set_tokenizer(None)
            self._tokenizer_loaded = new.tokenizer
            log.info("event=tokenizer_loaded source=estimate")
            return False
        self._spawn(self._load_tokenizer(self._tokenizer_seq, new.tokenizer, failed), self._loads)
        return True

    async def _load_tokenizer(self, seq: int, config: TokenizerConfig, failed: list[str]) -> None:
        try:
            loader = self._tokenizer_loader or load_scheduler_tokenizer
            tokenizer = await _in_daemon_thread(loader, config, os.environ)
        except Exception as exc:  # noqa: BLE001 - TokenizerError, a missing package, a bug: keep counting as now
            if seq == self._tokenizer_seq:  # else a later reload wants another tokenizer: it decides
                self._tokenizer_wanted = self._tokenizer_loaded  # a later reload tries again
                failed.append("tokenizer")
                log.error("event=config_reload_failed field=tokenizer error=%r detail=%r",
                          f"{type(exc).__name__}: {exc}", "keeping the running tokenizer")
        else:
            if seq == self._tokenizer_seq:
                tokens.set_tokenizer(tokenizer)
                self._tokenizer_loaded = config
                log.info("event=tokenizer_loaded source=%s", tokenizer.source if tokenizer is not None else "estimate")
        self._count_reload(failed)

    def shed_waiting(self) -> int:
        """Shutdown, at the end of the grace period: every request still waiting for a slot, or held after
        its prefill, is answered 503 with Retry-After (another scheduler replica can take it) instead of
        having its connection closed unanswered, and so is every request that would wait or take a slot
        from now on (a prefill that finishes after this, a retry): the queues stay shut. Returns how many
        were waiting."""
        def shutting_down() -> SchedulerError:
            return _shutting_down("the scheduler is shutting down before a slot freed for this request; retry it")

        n = self.prefill_queue.shut(shutting_down) + self.decode_queue.shut(shutting_down)
        if n:
            log.warning("event=shutdown_shed waiting=%d", n)
        return n

    def update_endpoints(self, prefill: list[Endpoint], decode: list[Endpoint]) -> None:
        """Install new endpoint lists; state (load, health) is kept for replicas that stay. A list that takes
        the last healthy decode replica away starts a settle window (`DECODE_SETTLE_S`) in which requests
        wait for a replacement instead of getting 503 at once."""
        fresh: list[ReplicaState] = []
        had_decode = self._healthy_decode()

        def merge(old: dict[str, ReplicaState], eps: list[Endpoint]) -> dict[str, ReplicaState]:
            # A newcomer starts level with the least-used replica it joins: placement breaks ties by
            # `dispatched`, and from 0 it would win every tie until it caught up with its peers' lifetimes.
            floor = min((r.dispatched for r in old.values()), default=0)
            out = {}
            for ep in eps:
                state = old.get(ep.address)
                if state is None:
                    # back in the lists (a readiness flap): its requests still in flight count against its cap
                    state = self._rejoining(ep)
                    if state is not None and not state.healthy:
                        fresh.append(state)  # probed now, as a newcomer is, not at the next heartbeat
                if state is not None and state.endpoint != ep and state.endpoint.pod == ep.pod:
                    # The same pod, described anew (a pod lookup that failed before now answered): the
                    # same process, whose sequences in flight and held KV are still there.
                    state.endpoint = ep
                elif state is None or state.endpoint != ep:
                    state = ReplicaState(ep)
                    state.dispatched = floor
                    fresh.append(state)
                out[ep.address] = state
            return out

        new_prefill, new_decode = merge(self.prefill, prefill), merge(self.decode, decode)
        self._prune_departed()
        for tier, old, new in ((PREFILL, self.prefill, new_prefill), (DECODE, self.decode, new_decode)):
            for address, state in old.items():
                if state.active and new.get(address) is not state:
                    self._departed.setdefault((tier, address), []).append(state)
        self.prefill, self.decode = new_prefill, new_decode
        self._prefill_eps, self._decode_eps = list(prefill), list(decode)
        if had_decode and not self._healthy_decode():
            self._decode_settle_until = self.clock() + DECODE_SETTLE_S
            log.warning("event=decode_tier_empty detail=%r", f"no decode replica left in the endpoint lists: "
                        f"requests wait up to {DECODE_SETTLE_S:g}s for a replacement before 503")
        self.rings = build_rings(prefill, decode, self.config.routing.ring_size)
        known = set(self.prefill) | set(self.decode)
        self.incompatible = {k: v for k, v in self.incompatible.items() if k[0] in known and k[1] in known}
        self.pair_checked = {k: v for k, v in self.pair_checked.items() if k[0] in known and k[1] in known}
        log.info(
            "event=endpoints_updated prefill=%s decode=%s",
            ",".join(self.prefill) or "-", ",".join(self.decode) or "-",
        )
        if fresh:
            self._start_probe(fresh)
        self._replicas_changed()

    def _replicas_changed(self) -> None:
        """Replicas came, went or changed health: waiters look again (a prefill waiter with no usable replica
        left is routed again). With no healthy decode replica left, requests waiting for one are answered
        503 `no_decode_endpoints` now, as a new request would be, rather than timing the wait out as if the
        tier were only busy (held prefills wait on for their ring, bounded by the hold TTL); when an endpoint
        update emptied the tier, once its settle window has passed without a replacement."""
        event, self._replicas_event = self._replicas_event, asyncio.Event()
        event.set()
        self.prefill_queue.notify()
        if self._decode_settle_until and self._healthy_decode():  # replaced (or healthy again): window over
            self._decode_settle_until = 0.0
            if self._decode_settle_timer is not None:
                self._decode_settle_timer.cancel()
                self._decode_settle_timer = None
        if self.decode_queue.waiting and not self._healthy_decode():
            remaining = self._decode_settle_until - self.clock()
            if remaining > 0:
                self._recheck_after_settle(remaining)
            else:
                self.decode_queue.fail_normal(_no_decode_endpoints)
        self.decode_queue.notify()

    def _recheck_after_settle(self, delay: float) -> None:
        """Look at the decode waiters again when the settle window ends (one timer at a time)."""
        if self._decode_settle_timer is not None:
            self._decode_settle_timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._decode_settle_timer = loop.call_later(delay, self._settle_ended)

    def _settle_ended(self) -> None:
        self._decode_settle_timer = None
        self._replicas_changed()

    async def _decode_replaced(self, ctx: _Ctx) -> bool:
        """Whether a healthy decode replica (one `ctx` may use) is there, waiting for one while an endpoint
        update's settle window lasts. The waiters count in the backlog `queue.maxDepth` bounds (beyond it,
        429 queue_full), and the wait counts as a wait for decode."""
        if self._healthy_decode(ctx.excluded):
            return True
        if self._decode_settle_until - self.clock() <= 0:
            return False
        self.decode_queue.check_open()  # shutting down: nothing new waits
        self._check_backlog(ctx)
        since = self.clock()
        self._settling += 1
        try:
            while not self._healthy_decode(ctx.excluded):
                remaining = self._decode_settle_until - self.clock()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._replicas_event.wait(), remaining)
            return True
        finally:
            self._settling -= 1
            self._waited(ctx, DECODE, since)

    def _start_probe(self, replicas: list[ReplicaState], take_out_only: bool = False) -> None:
        if not replicas:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._probe(replicas, take_out_only))
        self._probe_tasks.add(task)
        task.add_done_callback(self._probe_tasks.discard)

    def _start_pair_check(self, prefill: ReplicaState, decode: ReplicaState, model: Any) -> None:
        """Check the pair `prefill` -> `decode` in the background (`_check_pair`), unless it was checked within
        PAIR_CHECK_INTERVAL_S or is already known to be incompatible."""
        key = (prefill.address, decode.address)
        now = self.clock()
        last = self.pair_checked.get(key)
        if (last is not None and now - last < PAIR_CHECK_INTERVAL_S) or not self._pair_ok(*key):
            return
        self.pair_checked[key] = now
        self._spawn(self._check_pair(prefill, decode, model), self._probe_tasks)

    async def _check_pair(self, prefill: ReplicaState, decode: ReplicaState, model: Any) -> None:
        """A streamed handoff the decode replica cut before its first token: trtllm-serve gives the reason only
        in its log (a KV-format mismatch, or KV the prefill replica had freed). The same handoff, tiny and not
        streamed, gets the engine's error text in its answer: a KV-format mismatch then keeps the pair out of
        placement, as one met unstreamed does, instead of costing every streamed request routed to it a
        prefill and a retry. Anything else found changes nothing (the requests' own failures count)."""
        slot = self._engine_slot
        slot.users += 1
        rid = f"baton-pair-check-{uuid.uuid4().hex[:12]}"
        pair = f"{prefill.address}->{decode.address}"
        try:
            fields: dict[str, Any] = {"prompt": PAIR_CHECK_PROMPT, "max_tokens": 2}
            if isinstance(model, str):
                fields["model"] = model
            probe = parse_request(json.dumps(fields).encode(), COMPLETIONS, {}, self.config.model)
            engine = slot.client

            async def handoff() -> tuple[int, bytes]:
                status, data, _ = await engine.client_for(prefill.endpoint).post(
                    prefill.endpoint, probe.path, probe.context_body(), rid)
                if status != 200:
                    raise EngineFailure(prefill.endpoint, f"context_only answered {status}", status, data)
                answer, ids_json = parse_context_answer(data)
                handle = answer["choices"][0]["disaggregated_params"]
                status, data, _ = await engine.client_for(decode.endpoint).post(
                    decode.endpoint, probe.path, probe.generation_body(handle, ids_json), rid)
                return status, data

            status, data = await asyncio.wait_for(handoff(), PAIR_CHECK_TIMEOUT_S)
        except (EngineFailure, asyncio.TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError,
                RequestError) as exc:
            log.warning("event=pair_check_inconclusive pair=%s request_id=%s error=%r", pair, rid, str(exc)[:300])
            return
        finally:
            self._engine_released(slot)
        failure = classify_failure(decode.endpoint, status, data)
        if failure is not None and failure.kind == "kv_mismatch":
            if self.prefill.get(prefill.address) is prefill and self.decode.get(decode.address) is decode:
                self.incompatible[(prefill.address, decode.address)] = (
                    self.clock() + INCOMPATIBLE_PAIR_TTL_S, failure.message)
            log.error("event=kv_format_mismatch found_by=pair_check prefill=%s decode=%s request_id=%s error=%r",
                      prefill.address, decode.address, rid, failure.message[:500])
        elif failure is None and status == 200:
            log.info("event=pair_check_passed pair=%s request_id=%s", pair, rid)
        else:
            log.warning("event=pair_check_inconclusive pair=%s request_id=%s status=%d error=%r", pair, rid, status,
                        failure.message[:300] if failure is not None else data[:300].decode("utf-8", "replace"))

    # ------------------------------------------------------------------------------ health
    async def _probe(self, replicas: list[ReplicaState], take_out_only: bool = False) -> None:
        """Health-check `replicas` now: a failed check takes a replica out, a good one brings it back and
        clears its count of failed calls. With `take_out_only` -- a check made because a call failed in a way
        that does not say whether the replica is down (a stream it cut) -- a good answer changes nothing: a
        replica its failed calls took out meanwhile stays out until the heartbeat brings it back, and its count
        of failed calls stands."""
        timeout = min(5.0, max(0.5, self.config.heartbeat_seconds))
        engine = self._engine_slot.client
        results = await asyncio.gather(*(engine.health(r.endpoint, timeout) for r in replicas))
        if engine is not self._engine_slot.client:
            return  # a reload replaced the client meanwhile (and probes through the new one): these answers are stale
        changed = False
        now = self.clock()
        for replica, ok in zip(replicas, results):
            self.hooks.heartbeat(replica.endpoint.tier, ok)
            if ok:
                replica.last_ok = now
                if take_out_only:
                    continue
                replica.failures = 0
                if not replica.healthy:
                    replica.healthy = True
                    changed = True
                    log.info("event=endpoint_healthy tier=%s endpoint=%s", replica.endpoint.tier, replica.address)
            elif replica.healthy:
                replica.healthy = False
                changed = True
                log.warning("event=endpoint_unhealthy tier=%s endpoint=%s cause=%s", replica.endpoint.tier,
                            replica.address, "health_check_after_a_cut_stream" if take_out_only else "heartbeat")
        if changed:
            self._replicas_changed()

    async def heartbeat_once(self) -> None:
        """Probe idle replicas not heard from for a heartbeat period, and every unhealthy one."""
        now = self.clock()
        period = self.config.heartbeat_seconds
        targets = [
            r
            for r in (*self.decode.values(), *self.prefill.values())
            if not r.healthy or (r.active == 0 and now - r.last_ok >= period)
        ]
        if targets:
            await self._probe(targets)
        await self.holds.expired()  # sweep (entries are normally removed by their request)
        await self._engine_slot.client.retain([*self._prefill_eps, *self._decode_eps])  # channels of gone replicas

    async def _heartbeat_loop(self) -> None:
        while True:
            # a reload that changes the period ends the wait (`_heartbeat_changed`): the new one applies at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heartbeat_changed.wait(), self.config.heartbeat_seconds)
                self._heartbeat_changed.clear()
                continue
            try:
                await self.heartbeat_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=heartbeat_failed")

    def _engine_ok(self, replica: ReplicaState) -> None:
        replica.failures = 0
        replica.last_ok = self.clock()

    def _engine_failed(self, failure: EngineFailure, replica: ReplicaState | None,
                       slot: _EngineSlot | None = None) -> None:
        """Count a failed call against `replica`'s health. Not when it went through `slot`, a client the
        scheduler itself closed (a replaced one still in use after RETIRED_ENGINE_GRACE_S, or at shutdown):
        its calls and streams break with the client, whatever the replica's state."""
        # Neither a KV-format mismatch nor KV the context worker no longer had says anything of this
        # replica's health: the pair, or the handle, was at fault.
        if replica is None or failure.kind in ("kv_mismatch", "kv_lost") or (slot is not None and slot.closed):
            return
        replica.failures += 1
        if replica.healthy and (failure.connection_level or replica.failures >= UNHEALTHY_AFTER_5XX):
            replica.healthy = False
            log.warning("event=endpoint_unhealthy tier=%s endpoint=%s cause=%r",
                        replica.endpoint.tier, replica.address, failure.message[:200])
            self._replicas_changed()

    def ready(self) -> tuple[bool, str]:
        if not self.config_loaded:
            return False, "config not loaded"
        if not self._healthy_decode():
            return False, "no healthy decode endpoint"
        return True, "ok"

    # ------------------------------------------------------------------------------ state views
    def _decode_cap(self) -> int:
        cap = self.config.backpressure.max_active_per_decode_replica
        return max(1, cap // 2) if self.decode_throttled() else cap

    def decode_throttled(self) -> bool:
        threshold_ms = self.config.backpressure.decode_p95_latency_threshold_ms
        if threshold_ms <= 0:
            return False
        p95 = self.tpot_window.p95()
        return p95 is not None and p95 * 1000.0 > threshold_ms

    def _pair_ok(self, prefill: str, decode: str) -> bool:
        mark = self.incompatible.get((prefill, decode))
        if mark is None:
            return True
        if mark[0] <= self.clock():
            del self.incompatible[(prefill, decode)]
            return True
        return False

    def _ring(self, prefill: str, excluded: set[str]) -> list[str]:
        """The healthy, compatible decode replicas `prefill` may feed; `excluded` holds this request's failed
        addresses and failed pairs ("prefill->decode")."""
        return [
            d for d in self.rings.get(prefill, ())
            if (r := self.decode.get(d)) is not None and r.healthy and self._pair_ok(prefill, d)
            and not (excluded and (d in excluded or f"{prefill}->{d}" in excluded))
        ]

    def _usable_prefills(self, excluded: set[str]) -> list[ReplicaState]:
        return [
            r for r in self.prefill.values()
            if r.healthy and r.address not in excluded and self._ring(r.address, excluded)
        ]

    def _decode_candidates(self, addresses: Any, excluded: set[str], local: bool) -> list[ReplicaState]:
        cap = self._decode_cap()
        batch = self.config.routing.decode_batch_size
        pool = self.decode.values() if addresses is None else [self.decode[a] for a in addresses if a in self.decode]
        return [
            r for r in pool
            if r.healthy and r.address not in excluded and r.active < cap and (not local or r.local_prefills < batch)
        ]

    def _load_view(self, req: ParsedRequest, excluded: set[str]) -> LoadView:
        usable = self._usable_prefills(excluded)
        if not usable:
            return LoadView(prefill_available=False)
        band = classify(req.tokens, self.config.routing)
        if band is Band.LONG:
            return LoadView()
        candidates = self._decode_candidates(None, excluded, local=True)
        best = pick_decode(candidates)
        if band is Band.SHORT:
            return LoadView(decode_has_room=best is not None)
        cap = self._decode_cap()
        routing = self.config.routing
        free = [r for r in usable if r.active < routing.prefill_batch_size]
        backed_up = (
            not free
            or self.prefill_queue.waiting > 0
            or self.prefills_in_flight >= routing.max_concurrent_prefills
            or not self.prefill_bucket.can_take(req.tokens)
        )
        tps = self.prefill_tps or DEFAULT_PREFILL_TPS
        queued = min(r.queued_tokens for r in usable)
        return LoadView(
            prefill_available=True,
            decode_has_room=best is not None,
            decode_idle_fraction=(1.0 - best.active / cap) if best is not None else 0.0,
            prefill_backed_up=backed_up,
            prefill_queue_delay_s=queued / tps + (self.prefill_queue.waiting * req.tokens) / tps,
            local_prefill_cost_s=req.tokens / tps,
        )

    def snapshot(self) -> dict[str, Any]:
        """Current state for the scrape-time gauges and /debug."""
        routing = self.config.routing
        healthy_d = sum(1 for r in self.decode.values() if r.healthy)
        healthy_p = sum(1 for r in self.prefill.values() if r.healthy)
        active_d = sum(r.active for r in self.decode.values())
        active_p = sum(r.active for r in self.prefill.values())
        p_cap = min(routing.max_concurrent_prefills, routing.prefill_batch_size * healthy_p)
        p95 = self.tpot_window.p95()
        endpoints: dict[tuple[str, str], int] = {}
        for tier, pool in ((PREFILL, self.prefill), (DECODE, self.decode)):
            for state in ("healthy", "unhealthy"):
                endpoints[(tier, state)] = sum(1 for r in pool.values() if r.healthy == (state == "healthy"))
        return {
            "queue_depth": {PREFILL: self.prefill_queue.waiting, DECODE: self.decode_queue.waiting},
            "holds": len(self.holds),
            "hold_store": (self.holds.kind, self.holds.healthy()),
            "active": {PREFILL: active_p, DECODE: active_d},
            "utilization": {
                PREFILL: active_p / p_cap if p_cap else 0.0,
                # against the cap in force (halved while decode is throttled): 1.0 is "no room"
                DECODE: active_d / (self._decode_cap() * healthy_d) if healthy_d else 0.0,
            },
            "endpoint_active": self._endpoint_active(),
            "endpoint_held": self._endpoint_held(),
            "endpoints": endpoints,
            "decode_tpot_p95": p95 if p95 is not None else float("nan"),
            "decode_throttled": self.decode_throttled(),
        }

    def _rejoining(self, ep: Endpoint) -> ReplicaState | None:
        """The state of a replica that left the lists with requests in flight and is back: the same pod
        (or the same static address), whose requests still run there; None otherwise."""
        states = self._departed.get((ep.tier, ep.address))
        for state in states or ():
            if state.active and state.endpoint.pod == ep.pod:
                states.remove(state)
                if not states:
                    del self._departed[(ep.tier, ep.address)]
                return state
        return None

    def _endpoint_active(self) -> dict[tuple[str, str], int]:
        """Requests in flight per (tier, replica address): the listed replicas', and those of replicas that
        left the lists with requests still in flight (until they end)."""
        out = {(PREFILL, a): r.active for a, r in self.prefill.items()}
        out.update({(DECODE, a): r.active for a, r in self.decode.items()})
        self._prune_departed()
        for key, states in self._departed.items():
            out[key] = out.get(key, 0) + sum(r.active for r in states)
        return out

    def _prune_departed(self) -> None:
        """Forget the departed replicas whose requests have all ended."""
        for key, states in list(self._departed.items()):
            states[:] = [r for r in states if r.active]
            if not states:
                del self._departed[key]

    def _endpoint_held(self) -> dict[str, int]:
        """Prefill results held for a decode slot, per prefill replica (their KV is still on it)."""
        out: dict[str, int] = {}
        for hold in self.holds.held():
            out[hold.prefill] = out.get(hold.prefill, 0) + 1
        return out

    def debug_state(self) -> dict[str, Any]:
        def replica(r: ReplicaState) -> dict[str, Any]:
            return {"address": r.address, "fingerprint": r.endpoint.fingerprint, "runtime": r.endpoint.runtime,
                    "generation": r.endpoint.generation, "healthy": r.healthy, "active": r.active, "localPrefills": r.local_prefills,
                    "queuedTokens": r.queued_tokens}

        return {
            "prefill": [replica(r) for r in self.prefill.values()],
            "decode": [replica(r) for r in self.decode.values()],
            "rings": {k: list(v) for k, v in self.rings.items()},
            "queue": {"prefill": self.prefill_queue.waiting, "decode": self.decode_queue.waiting,
                      "holds": len(self.holds)},
            "holdStore": {"kind": self.holds.kind, "healthy": self.holds.healthy(),
                          **({"redis": redacted_redis_url(self._holds_target[1])} if self._holds_target[1] else {})},
            "incompatiblePairs": [f"{p}->{d}" for (p, d) in self.incompatible],
            "decodeThrottled": self.decode_throttled(),
            "routing": self.config.routing.model_dump(by_alias=True),
        }

    # ------------------------------------------------------------------------------ admission
    def _queue_depth(self) -> int:
        return self.prefill_queue.waiting + self.decode_queue.waiting

    def _backlog(self) -> int:
        """What `queue.maxDepth` bounds: requests waiting for a slot, plus held prefills; while the decode
        tier is saturated, prefills in flight count too (each will wait for a decode slot next)."""
        depth = self.prefill_queue.waiting + self.decode_queue.waiting + len(self.holds) + self._settling
        if self._decode_saturated(set()):
            depth += self.prefills_in_flight
        return depth

    def _decode_saturated(self, excluded: set[str]) -> bool:
        """Whether a prefill finishing now would find no decode slot to hand off to: every decode replica
        (that a request avoiding `excluded` may use) is at its cap, or the decode token bucket is empty."""
        return not self._decode_candidates(None, excluded, False) or not self.decode_bucket.can_take(1)

    def _check_backlog(self, ctx: _Ctx) -> None:
        """Refuse (429 queue_full) a request that would wait while the backlog is at `queue.maxDepth`. Not a
        request served again after its hold ended (`ctx.reprefilled`): it was admitted, and counted in the
        backlog while held; it is not turned away now as if it were new."""
        if not ctx.reprefilled and self._backlog() >= self.config.queue.max_depth:
            raise self._reject(ctx, "queue_full", f"the scheduler queue is full ({self.config.queue.max_depth} "
                               "requests waiting); retry later")

    def _reject(self, ctx: _Ctx, reason: str, message: str) -> SchedulerError:
        retry_after = retry_after_seconds(self._backlog(), self.completions.rate())
        return SchedulerError(429, message, reason, "rate_limit_error", outcome="rejected", retry_after=retry_after)

    async def _admit(self, ctx: _Ctx, queue: WaitQueue[Any], try_acquire: Any, release: Any, pool: str) -> Any:
        """A slot from `queue`, now or after a wait: 429 queue_full when the backlog is full (`_check_backlog`),
        429 queue_timeout after `queue.maxWaitSeconds`; a request served again after its hold ended
        (`ctx.reprefilled`), which waited the hold TTL already, gets 503 hold_expired (hold_stranded) then."""
        queue.check_open()  # shutting down: nothing new starts
        t = self.clock()
        value = None
        ahead = len(queue) if queue.strict else 0
        if not ahead:
            queue.serve_waiting_first()
            value = try_acquire()
        if value is None or value is PASS:
            self._check_backlog(ctx)
            try:
                value = await queue.acquire(try_acquire, release, self.config.queue.max_wait_seconds)
            except QueueTimeout:
                if ctx.reprefilled:
                    raise self._hold_lost(ctx, "this request's prefill was held until "
                                          f"{'its prefill replica left' if ctx.stranded else 'its hold expired'}, "
                                          f"and no {pool} slot freed within queue.maxWaitSeconds="
                                          f"{self.config.queue.max_wait_seconds:g}s to serve it again; "
                                          "retry it") from None
                raise self._reject(ctx, "queue_timeout", "no capacity became free within "
                                   f"{self.config.queue.max_wait_seconds:g}s; retry later") from None
            finally:  # a wait, however it ended (a slot, a timeout, shed at shutdown, the client gone)
                self._waited(ctx, pool, t)
            return value
        self._waited(ctx, pool, t)
        return value

    def _waited(self, ctx: _Ctx, pool: str, since: float) -> None:
        waited = self.clock() - since
        ctx.queue_wait += waited
        ctx.mark += waited
        if ctx.route == ROUTE_UNROUTED:  # a settle window, waited out before routing: `_route` records it
            ctx.settle_wait += waited
        else:
            self.hooks.queue_wait(ctx.route, pool, waited)

    def _try_decode(self, addresses: Any, excluded: set[str], local: bool) -> _DecodeLease | None:
        replica = pick_decode(self._decode_candidates(addresses, excluded, local))
        if replica is None:
            if self.decode_throttled():  # a waiter must see the throttle lift, which nothing announces
                self.decode_queue.wake_after(THROTTLE_RECHECK_S)
            return None
        if not self.decode_bucket.try_take(1):
            self.decode_queue.wake_after(self.decode_bucket.time_until(1))
            return None
        replica.active += 1
        replica.dispatched += 1
        if local:
            replica.local_prefills += 1
        return _DecodeLease(self, replica, local)

    def _healthy_decode(self, excluded: Collection[str] = ()) -> bool:
        """Whether a healthy decode replica (one a request that avoids `excluded` may use) is left, busy or not."""
        return any(r.healthy and r.address not in excluded for r in self.decode.values())

    def _try_prefill(self, tokens: int, excluded: set[str]) -> ReplicaState | None:
        routing = self.config.routing
        if self.prefills_in_flight >= routing.max_concurrent_prefills:
            return None
        usable = self._usable_prefills(excluded)
        if not usable:
            raise _NoPrefillPair()
        candidates = [r for r in usable if r.active < routing.prefill_batch_size]
        if not candidates:
            if excluded and any(r.healthy and r.active < routing.prefill_batch_size for r in self.prefill.values()):
                return PASS  # what is free, this request must avoid: let the waiters behind it have it
            return None
        if not self.prefill_bucket.try_take(tokens):
            self.prefill_queue.wake_after(self.prefill_bucket.time_until(tokens))
            return None
        replica = self.policy.pick(candidates, tokens)
        if len(candidates) > 1 and not self._ring_has_room(replica, excluded):
            # a prefill replica whose ring has a free decode slot first: on a full ring the result is held
            # (looked at only when the policy's pick has none, so the usual request pays one ring check)
            with_room = [r for r in candidates if r is not replica and self._ring_has_room(r, excluded)]
            if with_room:
                replica = self.policy.pick(with_room, tokens)
        assert replica is not None
        replica.active += 1
        replica.queued_tokens += tokens
        replica.dispatched += 1
        self.prefills_in_flight += 1
        return replica

    def _ring_has_room(self, prefill: ReplicaState, excluded: set[str]) -> bool:
        return bool(self._decode_candidates(self._ring(prefill.address, excluded), excluded, False))

    def _unused_prefill(self, replica: ReplicaState, tokens: int) -> None:
        """Give back a prefill slot granted to a waiter that went away before using it, with its tokens."""
        self.prefill_bucket.give_back(tokens)
        self._release_prefill(replica, tokens)

    def _release_prefill(self, replica: ReplicaState, tokens: int) -> None:
        replica.active -= 1
        replica.queued_tokens -= tokens
        self.prefills_in_flight -= 1
        self.prefill_queue.notify()

    # ------------------------------------------------------------------------------ request entry
    def refused(self, api: str | None, status: int, headers: Mapping[str, str] | None) -> dict[str, str]:
        """The HTTP layer answers a request itself (unparseable, too large, a wrong method, a handler that
        failed): a completion request (`api` set) is counted and logged as every other request is,
        `invalid` (4xx) or `failed`. Every such answer carries the request's id, the client's if valid."""
        rid = _request_id(headers or {})
        if api is not None:
            self._account(_Ctx(rid, api, self.clock()), "invalid" if status < 500 else "failed", status,
                          "answered by the HTTP layer")
        return {HDR_REQUEST_ID: rid}

    def models(self) -> Reply:
        body = {"object": "list", "data": [{"id": self.config.model, "object": "model", "created": 0,
                                            "owned_by": "baton"}]}
        return Reply(200, json.dumps(body).encode())

    async def complete(self, api: str, raw: bytes, headers: Mapping[str, str]) -> AnyReply:
        """Serve one /v1/completions or /v1/chat/completions request."""
        ctx = _Ctx(_request_id(headers), api, self.clock())
        try:
            try:
                ctx.req = req = parse_request(raw, api, headers, self.config.model)
                if req.uncounted is not None:
                    await req.count_deferred()
            except RequestError as exc:
                return self._finish_error(ctx, SchedulerError(exc.status, exc.message, exc.code,
                                                              "invalid_request_error", outcome="invalid", param=exc.param))
            self.retry_budget.record_request()
            if self._decode_settle_until and not self._healthy_decode():
                try:  # routed once the endpoint lists settle: with both tiers in view
                    await self._decode_replaced(ctx)
                except SchedulerError as exc:  # the backlog is full, or shutting down
                    return self._finish_error(ctx, exc)
            self._decide(ctx)
            return await self._run(ctx)
        except asyncio.CancelledError as exc:
            # the client went away before its answer started, or the server stopped with the answer not
            # started (the HTTP server cancels the handler either way): whatever the request held -- a queue
            # place, a hold, a slot, an engine call -- is given back on the way out
            if cancelled_by_stop(exc):
                # the drain ran out during an engine call (a prefill, a generation not streamed): the client,
                # still there, is told so, as the requests still waiting were (`shed_waiting`)
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # answered, not cancelled
                log.warning("event=cut_at_shutdown request_id=%s route=%s", ctx.rid, ctx.route)
                return self._finish_error(ctx, _shutting_down(
                    "the scheduler shut down before this request's answer was ready; retry it"))
            self._account(ctx, "cancelled", 499, "the client closed the connection before the answer started")
            raise

    def _decide(self, ctx: _Ctx) -> None:
        req = ctx.req
        assert req is not None
        decision = decide(req.tokens, req.high_precision, self.config.routing, self._load_view(req, ctx.excluded))
        self._route(ctx, decision.route.value, decision.reason)

    def _route(self, ctx: _Ctx, route: str, reason: str) -> None:
        """Send the request down `route`, counted: its first decision, a retry's, or a fallback's."""
        ctx.route = route
        ctx.reason = reason
        assert ctx.req is not None
        self.hooks.routed(route, reason, ctx.req.tokens)
        if ctx.settle_wait:  # waited for decode replicas before it could be routed
            self.hooks.queue_wait(route, DECODE, ctx.settle_wait)
            ctx.settle_wait = 0.0

    async def _run(self, ctx: _Ctx) -> AnyReply:
        max_attempts = self.config.retries.max_attempts
        while True:
            ctx.attempt += 1
            # The attempt's engine client: its prefill, hand-off and generation all go through this one, even
            # if a reload replaces the service's client meanwhile (the old one is closed when its users are done).
            slot = ctx.slot = self._engine_slot
            ctx.engine = slot.client
            slot.users += 1
            try:
                if ctx.route == LOCAL:
                    return await self._serve_local(ctx)
                return await self._serve_disaggregated(ctx)
            except SchedulerError as exc:
                return self._finish_error(ctx, exc)
            except EngineFailure as failure:
                if failure.kind == "kv_mismatch":
                    return self._finish_error(ctx, SchedulerError(
                        502,
                        f"KV cache handoff from {ctx.prefill.address if ctx.prefill else '?'} to "
                        f"{failure.endpoint.address} failed: the two tiers' KV formats are incompatible: "
                        f"{failure.message}",
                        "kv_format_mismatch", "engine_error",
                    ))
                if failure.kind == "stream_cut":
                    # an orderly close: a refused handoff or a process that ended; its health, checked now,
                    # tells them apart before the retry is placed (a dead replica is not chosen again)
                    cut = self.decode.get(failure.endpoint.address)
                    if cut is not None and cut.healthy:
                        await self._probe([cut], take_out_only=True)
                    if cut is not None and cut.healthy and ctx.prefill is not None and ctx.req is not None:
                        # it lives: the handoff itself failed, and only the engines' logs say why
                        self._start_pair_check(ctx.prefill, cut, ctx.req.data.get("model"))
                if (ctx.prefill is not None and ctx.decode is not None and not failure.connection_level
                        and failure.kind != "closed_before_answer"):
                    # a generation-only request failed without losing the connection: the handoff between
                    # this pair failed (e.g. the context worker lost the KV); avoid the pair, not the replicas
                    ctx.excluded.add(f"{ctx.prefill.address}->{ctx.decode.address}")
                else:
                    ctx.excluded.add(failure.endpoint.address)
                elsewhere = any(r.healthy and r.address not in ctx.excluded for r in self.decode.values())
                if elsewhere and ctx.attempt < max_attempts and self.retry_budget.try_spend():
                    self.hooks.retried(ctx.route, failure.kind)
                    log.warning("event=retry request_id=%s route=%s attempt=%d endpoint=%s error=%r", ctx.rid,
                                ctx.route, ctx.attempt, failure.endpoint.address, failure.message[:300])
                    ctx.prefill = ctx.decode = None
                    ctx.mark = self.clock()  # the failed attempt's engine time is not the scheduler's
                    self._decide(ctx)
                    continue
                if failure.kind == "stream_cut":
                    return self._finish_error(ctx, self._stream_cut_error(ctx, failure))
                if failure.kind == "kv_lost":
                    return self._finish_error(ctx, SchedulerError(
                        503, f"the prefill replica {ctx.prefill.address if ctx.prefill else '?'} no longer had this "
                        f"request's KV cache when decode replica {failure.endpoint.address} pulled it (freed at the "
                        f"engines' KV transfer timeout), and it could not be prefilled again (retries or the retry "
                        f"budget spent): {failure.message}; retry the request", "kv_cache_lost", "service_unavailable",
                        retry_after=retry_after_seconds(self._backlog(), self.completions.rate())))
                return self._finish_error(ctx, SchedulerError(
                    502, f"engine {failure.endpoint.address} failed: {failure.message}", "engine_error", "engine_error"
                ))
            finally:
                if ctx.slot is slot:  # not handed on to a stream relay (which gives it back when the stream ends)
                    ctx.slot = None
                    self._engine_released(slot)

    @staticmethod
    def _stream_cut_error(ctx: _Ctx, failure: EngineFailure) -> SchedulerError:
        """502 for a stream the decode replica ended before its first token (and no retry): trtllm-serve sends
        no error event, so the message says what happened and where the reason is (the engines' logs)."""
        decode, prefill = failure.endpoint.address, ctx.prefill.address if ctx.prefill is not None else ""
        handoff = f" while taking over this request's KV cache from prefill replica {prefill}" if prefill else ""
        also = f" (and of prefill replica {prefill})" if prefill else ""
        typically = ("; for a failed KV handoff it is typically a KV-format mismatch between the two tiers ('Disagg "
                     "server does not currently support these cacheState') or KV the prefill replica had already "
                     "freed (its KV transfer timeout)") if prefill else ""
        return SchedulerError(
            502, f"decode replica {decode} ended its stream before the first token (it answered 200, then closed "
            f"the connection with no error event){handoff}. trtllm-serve reports the reason only in its own log: "
            f"look for request id {ctx.rid} in the log of decode replica {decode}{also}{typically}; it could not "
            "be retried (retries or the retry budget spent, or no other replica)", "engine_stream_cut",
            "engine_error")

    # ------------------------------------------------------------------------------ local route
    async def _serve_local(self, ctx: _Ctx) -> AnyReply:
        req = ctx.req
        assert req is not None
        # no prefill replica serves a local request: not the one of a hold that ended (the request was routed
        # here after it), which its headers, its log line and its failures must not name
        ctx.prefill = None
        if not self._healthy_decode(ctx.excluded) and not await self._decode_replaced(ctx):
            raise _no_decode_endpoints()
        excluded = ctx.excluded

        def try_local() -> _DecodeLease | None:
            lease = self._try_decode(None, excluded, True)
            if (lease is None and excluded and not self._healthy_decode(excluded)
                    and self._decode_settle_until <= self.clock()):  # not while a replacement is awaited
                # a retry: the replicas it may still use failed while it waited (the one that failed it is
                # healthy again, or it would have been failed with the tier): an answer now, not a timeout
                raise _no_decode_endpoints()
            return lease

        lease: _DecodeLease = await self._admit(ctx, self.decode_queue, try_local, _DecodeLease.unused, DECODE)
        ctx.decode = lease.replica
        ctx.generation = self._generation_of(lease.replica)
        return await self._generate(ctx, lease, req.local_body())

    # ------------------------------------------------------------------------------ disaggregated route
    async def _serve_disaggregated(self, ctx: _Ctx) -> AnyReply:
        req = ctx.req
        assert req is not None
        while True:
            if must_stay_uncompressed(req.high_precision, self.config.routing):
                # compression came on (a reload) after this request was routed: it must not be compressed
                self._route(ctx, LOCAL, "high-precision")
                return await self._serve_local(ctx)
            if not self._usable_prefills(ctx.excluded):
                if not self._healthy_decode(ctx.excluded) and await self._decode_replaced(ctx):
                    continue  # the decode tier came back within its settle window: route again
                if self._healthy_decode(ctx.excluded):
                    self._route(ctx, LOCAL, "no-prefill-pair")
                    return await self._serve_local(ctx)
                raise SchedulerError(503, "no healthy prefill/decode endpoint pair is available",
                                     "no_endpoints", "service_unavailable", retry_after=NO_ENDPOINTS_RETRY_AFTER_S)
            excluded = ctx.excluded
            if (not ctx.reprefilled and self._decode_saturated(excluded)
                    and self._backlog() >= self.config.queue.max_depth):
                # decode is saturated and the backlog is full: prefilling now would only feed a hold
                raise self._reject(ctx, "queue_full", "the decode tier is saturated and the scheduler queue is "
                                   f"full ({self.config.queue.max_depth}); retry later")
            try:
                prefill: ReplicaState = await self._admit(
                    ctx, self.prefill_queue, lambda: self._try_prefill(req.tokens, excluded),
                    lambda r: self._unused_prefill(r, req.tokens), PREFILL,
                )
            except _NoPrefillPair:
                continue  # the prefill tier went away while this request waited: route it again (above)
            if must_stay_uncompressed(req.high_precision, self.config.routing):
                self._release_prefill(prefill, req.tokens)  # compression came on while it waited: local
                self.prefill_bucket.give_back(req.tokens)  # and it will not prefill on this tier after all
                continue
            ctx.prefill = prefill
            ctx.decode = None
            ctx.generation = self._generation_of(prefill)
            t_ctx = self.clock()
            self.hooks.dispatched(ctx.route, max(0.0, t_ctx - ctx.mark))
            try:
                # the replica's runtime's client, called directly (no extra coroutine per call on the hot path)
                sent = req.context_body()
                status, data, ctype = await ctx.engine.client_for(prefill.endpoint).post(
                    prefill.endpoint, req.path, sent, ctx.rid)
            except EngineFailure as failure:
                self._engine_failed(failure, prefill, ctx.slot)
                raise
            finally:
                self._release_prefill(prefill, req.tokens)
            failure = classify_failure(prefill.endpoint, status, data, sent)
            if failure is not None:
                self._engine_failed(failure, prefill, ctx.slot)
                raise failure
            self._engine_ok(prefill)
            if status != 200:
                return self._finish_passthrough(ctx, status, data, ctype)
            elapsed = self.clock() - t_ctx
            if elapsed > 0 and req.tokens > 0:
                sample = req.tokens / elapsed
                self.prefill_tps = sample if not self.prefill_tps else 0.8 * self.prefill_tps + 0.2 * sample
            try:
                answer, ids_json = parse_context_answer(data)
                choice = answer["choices"][0]
                handle = choice.get("disaggregated_params") or {}
                if handle.get("ctx_request_id") is None:
                    raise KeyError("ctx_request_id")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                failure = EngineFailure(prefill.endpoint, "Context server did not return disaggregated params",
                                        status, data)
                self._engine_failed(failure, prefill, ctx.slot)
                raise failure from None
            if choice.get("finish_reason") not in ("length", "not_finished"):
                return self._finish_from_context(ctx, answer)
            ring = self._ring(prefill.address, ctx.excluded)
            self.decode_queue.check_open()  # shutting down: no generation starts only to be cut
            self.decode_queue.serve_waiting_first(priority=True)  # prefills held longer go first
            lease = self._try_decode(ring, ctx.excluded, False)
            if lease is None:
                if not ctx.reprefilled and self._backlog() >= self.config.queue.max_depth:
                    # Its ring filled up (or the decode bucket ran dry) during the prefill, which the check
                    # before it could not see: holding it would take the backlog past queue.maxDepth.
                    raise self._reject(ctx, "queue_full", "no decode slot is free for this request's prefill "
                                       "result and the scheduler queue is full "
                                       f"({self.config.queue.max_depth}); retry later")
                lease = await self._hold(ctx, prefill, handle, tuple(ring))
            if lease is None:  # the hold expired, or was stranded (ctx.stranded says which)
                if not ctx.reprefilled and self.retry_budget.try_spend():
                    ctx.reprefilled = True
                    self.hooks.hold("reprefilled")
                    log.warning("event=hold_reprefill request_id=%s prefill=%s", ctx.rid, prefill.address)
                    ctx.mark = self.clock()
                    continue
                if ctx.stranded:
                    raise self._hold_lost(
                        ctx, f"the prefill replica {prefill.address} holding this request's KV cache left before a "
                        "decode slot freed (an engine generation switch or a restart), and the request was already "
                        "prefilled again once (or the retry budget is spent); retry it")
                raise self._hold_lost(
                    ctx, f"no decode slot freed within degradation.holdTtlSeconds="
                    f"{self.config.degradation.hold_ttl_seconds:g}s after prefill (decode tier saturated)")
            ctx.decode = lease.replica
            ctx.generation = self._generation_of(lease.replica)
            body = req.generation_body(handle, ids_json if ids_json is not None else answer.get("prompt_token_ids"))
            return await self._generate(ctx, lease, body, handoff=True)

    def _hold_lost(self, ctx: _Ctx, message: str) -> SchedulerError:
        """503 for a request whose held prefill was lost -- the hold expired (`hold_expired`: decode stayed
        saturated), or its prefill replica left (`hold_stranded`) -- and that could not be served otherwise.
        The scheduler's own decision about capacity (`shed`), not a failure of the engines. Retry-After as
        for a 429: the backlog over the recent completion rate."""
        return SchedulerError(503, message, "hold_stranded" if ctx.stranded else "hold_expired",
                              "service_unavailable", shed=True,
                              retry_after=retry_after_seconds(self._backlog(), self.completions.rate()))

    def _held_ring(self, prefill: ReplicaState, ring: tuple[str, ...], excluded: set[str]) -> list[str]:
        """The decode replicas a held handle may go to now: its prefill's current ring (or the ring it was
        held with), less pairs known to be KV-incompatible and pairs that already failed this request; when
        none of those is healthy, the healthy decode replicas of the prefill's KV format and generation
        outside it. Never the ring it was held with once the rings changed: that may now hold replicas of
        another format."""
        if self.prefill.get(prefill.address) is not prefill:
            # The prefill replica left the endpoint lists (a generation switch, a pod no longer ready: one that
            # restarts comes back with an empty cache) or another engine answers at its address: the handle's
            # KV left with it.
            raise _StrandedHold()
        def usable(d: str) -> bool:
            return self._pair_ok(prefill.address, d) and not (
                excluded and (d in excluded or f"{prefill.address}->{d}" in excluded))

        current = [d for d in self.rings.get(prefill.address, ring) if usable(d)]
        if any((r := self.decode.get(d)) is not None and r.healthy for d in current):
            return current
        # Every decode replica of its ring failed (or none is left): any healthy one of the same KV format and
        # generation may take the handle, rather than the request waiting out the hold TTL for its ring to
        # heal while other pairs idle (the ring only bounds cross-traffic; the KV is already computed).
        pairing = prefill.endpoint.pairing
        return [a for a, r in self.decode.items() if r.healthy and r.endpoint.pairing == pairing and usable(a)]

    async def _hold(self, ctx: _Ctx, prefill: ReplicaState, handle: dict[str, Any],
                    ring: tuple[str, ...]) -> _DecodeLease | None:
        ttl = self.config.degradation.hold_ttl_seconds
        now = self.clock()
        hold = Hold(ctx.rid, prefill.address, handle, now, now + ttl, ring, key=hold_key(ctx.rid))
        await self.holds.put(hold)
        self.hooks.hold("held")
        log.info("event=hold request_id=%s key=%s prefill=%s ring=%s ttl_s=%g", ctx.rid, hold.key, prefill.address,
                 ",".join(ring), ttl)
        excluded = ctx.excluded
        limit: asyncio.Timeout | None = None
        try:
            # The hold's end is a timeout a reload can bring forward (`_shorten_holds`): the queue sets none.
            async with asyncio.timeout(ttl) as limit:
                self._hold_limits[hold.key] = (asyncio.get_running_loop().time(), limit)
                # The ring is looked up on every attempt: endpoints may change while the request is held
                # (a generation switch), and the handle fits any decode replica of the prefill's KV format.
                lease = await self.decode_queue.acquire(
                    lambda: self._try_decode(self._held_ring(prefill, ring, excluded), excluded, False),
                    _DecodeLease.unused, None, priority=True,
                )
        except _StrandedHold:
            # The prefill replica holding the KV is gone (`_held_ring`): give up the handle now and let the
            # request be prefilled again.
            ctx.stranded = True
            self.hooks.hold("stranded")
            log.warning("event=hold_stranded request_id=%s prefill=%s", ctx.rid, prefill.address)
            return None
        except TimeoutError:
            if limit is None or not limit.expired():
                raise  # not the hold's end: some call inside timed out on its own
            ctx.stranded = False
            self.hooks.hold("expired")
            log.warning("event=hold_expired request_id=%s prefill=%s", ctx.rid, prefill.address)
            return None
        except asyncio.CancelledError:
            self.hooks.hold("cancelled")  # the client went away while held
            raise
        except SchedulerError as exc:
            # shutting down (503 shutting_down), or the wait failed otherwise
            self.hooks.hold("shed" if exc.code == "shutting_down" else "failed")
            raise
        else:
            self.hooks.hold("resumed")
            return lease
        finally:
            self._hold_limits.pop(hold.key, None)
            await self.holds.remove(hold.key)
            self._waited(ctx, "hold", now)  # a wait, however the hold ended

    # ------------------------------------------------------------------------------ generation + relay
    async def _generate(self, ctx: _Ctx, lease: _DecodeLease, body: bytes, handoff: bool = False
                        ) -> AnyReply:
        req = ctx.req
        assert req is not None and ctx.engine is not None
        replica = lease.replica
        t_dispatch = self.clock()
        if not handoff:
            self.hooks.dispatched(ctx.route, max(0.0, t_dispatch - ctx.mark))
        try:
            engine = ctx.engine.client_for(replica.endpoint)  # the replica's runtime's (EngineFailure if none)
            if not req.stream:
                if lease.local_open:
                    # no first token to watch: end the local context phase after its estimated duration
                    asyncio.get_running_loop().call_later(
                        req.tokens / (self.prefill_tps or DEFAULT_PREFILL_TPS), lease.first_token)
                status, data, ctype = await engine.post(replica.endpoint, req.path, body, ctx.rid)
                failure = classify_failure(replica.endpoint, status, data, body)
                if failure is not None:
                    raise failure
                self._engine_ok(replica)
                lease.release()
                if status != 200:
                    return self._finish_passthrough(ctx, status, data, ctype)
                return self._finish_ok(ctx, Reply(status, data, ctype, ctx.headers()))
            resp = await engine.open(replica.endpoint, req.path, body, ctx.rid)
            if resp.status != 200:
                try:
                    data = await resp.read()
                except (asyncio.TimeoutError, OSError) as exc:
                    raise EngineFailure(replica.endpoint, f"{type(exc).__name__}: {exc}", kind="connection") from exc
                failure = classify_failure(replica.endpoint, resp.status, data, body)
                if failure is not None:
                    raise failure
                lease.release()
                return self._finish_passthrough(ctx, resp.status, data, resp.content_type)
            try:
                first = await resp.first()
            except ClosedMidAnswer as exc:
                # 200, then the connection closed in order before any event: trtllm-serve's stream generator
                # raised (a failed KV handoff, or any failure of the generation) after the response started,
                # or the process ended. Retried elsewhere, after a health check tells the two apart (`_run`).
                resp.release()
                log.warning("event=stream_cut_before_first_token request_id=%s prefill=%s decode=%s",
                            ctx.rid, ctx.prefill.address if handoff and ctx.prefill else "-", replica.address)
                raise EngineFailure(
                    replica.endpoint, f"decode replica {replica.address} ended its stream before the first token "
                    "(it answered 200, then closed the connection with no error event)",
                    200, kind="stream_cut") from exc
            except (asyncio.TimeoutError, OSError) as exc:
                resp.release()
                raise EngineFailure(replica.endpoint, f"{type(exc).__name__}: {exc}", kind="connection") from exc
            except BaseException:
                resp.release()
                raise
        except EngineFailure as failure:
            lease.release()
            if not (handoff and failure.kind == "stream_cut"):
                # a handoff the decode replica refused before its first token (trtllm-serve cuts the stream, as
                # for a KV-format mismatch or KV already freed) says nothing of its health, as kv_lost does not;
                # whether it died instead is checked before the retry (`_run`)
                self._engine_failed(failure, replica, ctx.slot)
            if failure.kind == "kv_mismatch" and ctx.prefill is not None:
                self.incompatible[(ctx.prefill.address, replica.address)] = (
                    self.clock() + INCOMPATIBLE_PAIR_TTL_S, failure.message)
                log.error("event=kv_format_mismatch request_id=%s prefill=%s decode=%s error=%r", ctx.rid,
                          ctx.prefill.address, replica.address, failure.message[:500])
            raise
        except BaseException:
            lease.release()
            raise
        lease.first_token()
        self._engine_ok(replica)
        t_first = self.clock()
        if not starts_with_error_event(first):  # an error event is no first token, nor a finished transfer
            self.hooks.first_token(ctx.route, t_first - ctx.t0)
            if handoff:
                self.hooks.kv_transfer(t_first - t_dispatch, "handoff")
        slot, ctx.slot = ctx.slot, None  # the stream keeps the engine client in use until it ends
        relay = StreamRelay(
            resp, first, replica.address, self.config.server.stream_flush_interval_ms / 1000.0, self.clock,
            on_broken=lambda exc: self._stream_broken(ctx, replica, exc, slot),
            on_finish=lambda outcome, r: self._stream_finished(ctx, lease, outcome, r, slot),
        )
        return RelayReply(relay, resp.content_type, ctx.headers())

    def _stream_broken(self, ctx: _Ctx, replica: ReplicaState, exc: Exception,
                       slot: _EngineSlot | None = None) -> str:
        # A lost connection (or a timeout) takes the replica out at once; a stream the engine closed in order
        # (trtllm-serve's generator raised for this request: it says why only in its log) and anything else
        # (an answer that could not be read, a bug) count against it as a 5xx answer does, the latter with
        # its traceback logged.
        if isinstance(exc, ClosedMidAnswer):
            failure = EngineFailure(replica.endpoint, "it closed the connection mid-stream with no error event: "
                                    "its generation failed (trtllm-serve reports why only in its own log), or "
                                    "the engine stopped", kind="stream_cut")
        else:
            failure = EngineFailure(replica.endpoint, f"{type(exc).__name__}: {exc}",
                                    kind="connection" if isinstance(exc, OSError) else "retryable")
        unexpected = not isinstance(exc, OSError)
        self._engine_failed(failure, replica, slot)
        if failure.kind == "stream_cut" and replica.healthy and not (slot is not None and slot.closed):
            # trtllm-serve ends a stream so when one generation fails and when it dies (the connection of a
            # killed process closes the same way): a health check now tells them apart, without waiting for
            # the heartbeat (a cut before the first token is checked before its retry instead: `_run`)
            self._start_probe([replica], take_out_only=True)
        log.error("event=stream_broken request_id=%s endpoint=%s error=%r%s", ctx.rid, replica.address,
                  failure.message, " cause=engine_client_closed" if slot is not None and slot.closed else "",
                  exc_info=exc if unexpected else None)
        return failure.message

    def _stream_finished(self, ctx: _Ctx, lease: _DecodeLease, outcome: str, relay: StreamRelay,
                         slot: _EngineSlot | None = None) -> None:
        lease.release()
        if slot is not None:
            self._engine_released(slot)
        shed = outcome == "shutdown"
        if outcome == "truncated":
            log.error("event=stream_truncated request_id=%s endpoint=%s", ctx.rid, lease.replica.address)
            outcome = "failed"
        elif outcome == "engine_error":  # reported inside the stream (already relayed to the client)
            log.error("event=stream_error request_id=%s endpoint=%s", ctx.rid, lease.replica.address)
            outcome = "failed"
        elif outcome == "shutdown":  # cut at the end of the drain, with a shutting_down error event
            log.warning("event=stream_cut_at_shutdown request_id=%s endpoint=%s", ctx.rid, lease.replica.address)
            outcome = "failed"
        elif outcome == "completed":
            tokens = relay.tokens  # not a chat role chunk, the usage chunk or [DONE]
            if tokens >= 2:
                tpot = (relay.t_last - relay.t_first) / (tokens - 1)
                self.hooks.tpot(ctx.route, tpot)
                self.tpot_window.record(tpot)
        self._account(ctx, outcome, 200, shed=shed)

    # ------------------------------------------------------------------------------ endings
    def _serving_generation(self) -> str:
        """The generation discovery follows (status.rollout.servingGeneration); empty when standalone."""
        return getattr(self._discovery, "generation", "") or ""

    def _generation_of(self, replica: ReplicaState) -> str:
        """The engine generation a request dispatched to `replica` is counted under: the replica's own (during
        a PairwiseSwap both generations serve, and at a switch the lists change after the serving generation
        does), else the one discovery follows."""
        return replica.endpoint.generation or self._serving_generation()

    def _account(self, ctx: _Ctx, outcome: str, status: int, error: str = "", shed: bool = False) -> None:
        """Count the request's final outcome, and log it. `shed`: a failure that is the scheduler's own
        decision (see `SchedulerError`), counted `shed` instead of `failed` for the engine generation the
        request was dispatched to: the operator rolls a generation back on the failures of its engines only."""
        elapsed = self.clock() - ctx.t0
        if ctx.settle_wait:  # a settle window it waited in, never routed after it (the client left, a 429)
            self.hooks.queue_wait(ctx.route, DECODE, ctx.settle_wait)
            ctx.settle_wait = 0.0
        self.hooks.finished(ctx.route, outcome, elapsed)
        if ctx.generation:
            self.metrics.generation_finished(ctx.generation, GENERATION_SHED if shed else outcome)
        if outcome == "completed":
            self.completions.tick()
        log.info(
            "event=request_done request_id=%s api=%s route=%s reason=%s tokens=%s prefill=%s decode=%s "
            "attempts=%d outcome=%s status=%d queue_ms=%.1f latency_ms=%.1f%s",
            ctx.rid, ctx.api, ctx.route, ctx.reason or "-", ctx.req.tokens if ctx.req else "-",
            ctx.prefill.address if ctx.prefill else "-", ctx.decode.address if ctx.decode else "-",
            ctx.attempt, outcome, status, ctx.queue_wait * 1000, elapsed * 1000,
            f" error={error!r}" if error else "",
        )

    def _finish_ok(self, ctx: _Ctx, reply: Reply) -> Reply:
        self._account(ctx, "completed", reply.status)
        return reply

    def _finish_passthrough(self, ctx: _Ctx, status: int, data: bytes, ctype: str) -> Reply:
        """An engine's own non-2xx/5xx answer (e.g. 400 for a prompt over its limits) goes back as is."""
        outcome = "completed" if status < 400 else "invalid"
        self._account(ctx, outcome, status, data[:200].decode("utf-8", "replace") if status >= 400 else "")
        return Reply(status, data, ctype, ctx.headers())

    def _finish_error(self, ctx: _Ctx, exc: SchedulerError) -> Reply:
        if exc.outcome == "rejected":
            self.hooks.rejected(ctx.route, exc.code)
        self._account(ctx, exc.outcome, exc.status, exc.message, exc.shed)
        headers = ctx.headers()
        headers[HDR_ERROR] = exc.code
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return Reply(exc.status, error_body(exc.message, exc.err_type, exc.code, exc.param), "application/json", headers)

    def _finish_from_context(self, ctx: _Ctx, answer: dict[str, Any]) -> AnyReply:
        """The prefill already finished the request (e.g. EOS on the first token): answer from it."""
        req = ctx.req
        assert req is not None
        for choice in answer.get("choices", []):
            choice.pop("disaggregated_params", None)
        answer.pop("prompt_token_ids", None)
        if not req.stream:
            return self._finish_ok(ctx, Reply(200, json.dumps(answer).encode(), "application/json", ctx.headers()))
        choice = answer["choices"][0]
        if req.api == CHAT:
            message = choice.get("message") or {}
            chunk_choice = {"index": 0, "delta": {"role": "assistant", "content": message.get("content", "")},
                            "finish_reason": choice.get("finish_reason")}
            obj = "chat.completion.chunk"
        else:
            chunk_choice = {"index": 0, "text": choice.get("text", ""), "finish_reason": choice.get("finish_reason")}
            obj = "text_completion"
        chunk = {"id": answer.get("id", ctx.rid), "object": obj, "created": answer.get("created", int(time.time())),
                 "model": answer.get("model", self.config.model), "choices": [chunk_choice]}
        payload = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        if wants_usage(req.data.get("stream_options")):
            usage = answer.get("usage")
            if not isinstance(usage, dict):
                produced = len(choice.get("token_ids") or ()) or 1
                usage = {"prompt_tokens": req.tokens, "completion_tokens": produced,
                         "total_tokens": req.tokens + produced}
            payload += b"data: " + json.dumps({**chunk, "choices": [], "usage": usage}).encode() + b"\n\n"
        payload += b"data: [DONE]\n\n"

        async def one_shot() -> AsyncIterator[bytes]:
            outcome = "cancelled"
            try:
                self.hooks.first_token(ctx.route, self.clock() - ctx.t0)
                yield payload
                outcome = "completed"
            finally:
                self._account(ctx, outcome, 200)

        return StreamReply(one_shot(), "text/event-stream", ctx.headers())
