"""Every Prometheus metric the scheduler exports, and the hooks object the request path calls.

The request flow never touches a metric directly: it calls `SchedulerHooks` methods at each step
(`routed`, `queue_wait`, `first_token`, `finished`, ...), and `PrometheusHooks` owns the metrics.
Each service instance gets its own `CollectorRegistry` (tests run several in one process).

Naming: prefix `baton_scheduler_`, unit suffixes (`_seconds`, `_tokens`, `_ratio`), `_total` only on
counters. Every per-request counter and histogram carries `route` = `local` | `disaggregated` (or
`unrouted` for requests rejected before a route was chosen, e.g. unknown model).
Gauges that describe current state (queue depth, holds, active sequences, utilisation, endpoint health)
are computed at scrape time from a snapshot function, so the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from baton.gcpauses import PauseClock, frozen_objects, pause_clock

PREFIX = "baton_scheduler"

# 1 ms .. 10 min: time to first token and end-to-end latency (long prompts, long outputs: engineTimeoutSeconds 600).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# 1 ms .. 1 s: time per output token.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.35, 0.5, 1)
# 0.1 ms .. 5 min: time spent waiting in the scheduler's queue, and a held prefill's wait (holdTtlSeconds,
# 120 s by default).
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# 0.5 ms .. 10 s: prefill -> decode KV handoff.
KV_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# 10 us .. 100 ms: latency the scheduler itself adds (parse, route, serialize) before dispatch.
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

ROUTE_UNROUTED = "unrouted"


class SchedulerHooks:
    """No-op hooks: the request path's view of observability. Subclass to record."""

    def routed(self, route: str, reason: str, prompt_tokens: int) -> None: ...

    def queue_wait(self, route: str, pool: str, seconds: float) -> None: ...

    def dispatched(self, route: str, overhead_seconds: float) -> None: ...

    def rejected(self, route: str, reason: str) -> None: ...

    def retried(self, route: str, reason: str) -> None: ...

    def first_token(self, route: str, seconds: float) -> None: ...

    def tpot(self, route: str, seconds: float) -> None: ...

    def kv_transfer(self, seconds: float, source: str) -> None: ...

    def hold(self, event: str) -> None: ...

    def hold_store_error(self, store: str, operation: str) -> None: ...

    def finished(self, route: str, outcome: str, seconds: float) -> None: ...

    def generation_finished(self, generation: str, outcome: str) -> None: ...

    def heartbeat(self, tier: str, ok: bool) -> None: ...

    def config_reload(self, result: str) -> None: ...


class _StateCollector(Collector):
    """Gauges read from the service's state at scrape time."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registering must not call the snapshot (the service is still being built)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.snapshot()
        g = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting in the scheduler queue", labels=["pool"])
        for pool, value in s.get("queue_depth", {}).items():
            g.add_metric([pool], value)
        yield g
        yield GaugeMetricFamily(
            f"{PREFIX}_holds", "Finished prefills held waiting for a decode slot", value=s.get("holds", 0)
        )
        store = s.get("hold_store")
        if store is not None:
            g = GaugeMetricFamily(
                f"{PREFIX}_hold_store_healthy",
                "1 while the hold store takes writes (a redis store: 0 from a failed write until one succeeds; "
                "holds go on from memory meanwhile)",
                labels=["store"],
            )
            g.add_metric([store[0]], 1.0 if store[1] else 0.0)
            yield g
        g = GaugeMetricFamily(f"{PREFIX}_active_sequences", "Requests in flight on each tier", labels=["tier"])
        for tier, value in s.get("active", {}).items():
            g.add_metric([tier], value)
        yield g
        g = GaugeMetricFamily(
            f"{PREFIX}_tier_utilization_ratio",
            "In-flight requests over the tier's admission capacity (healthy replicas x per-replica cap)",
            labels=["tier"],
        )
        for tier, value in s.get("utilization", {}).items():
            g.add_metric([tier], value)
        yield g
        g = GaugeMetricFamily(
            f"{PREFIX}_endpoint_active_requests", "Requests in flight per engine replica", labels=["tier", "endpoint"]
        )
        for (tier, address), value in s.get("endpoint_active", {}).items():
            g.add_metric([tier, address], value)
        yield g
        g = GaugeMetricFamily(
            f"{PREFIX}_endpoint_held_requests",
            "Finished prefills held for a decode slot, per prefill replica (their KV cache is still on it)",
            labels=["endpoint"],
        )
        for address, value in s.get("endpoint_held", {}).items():
            g.add_metric([address], value)
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_endpoints", "Known engine replicas by health", labels=["tier", "state"])
        for (tier, state), value in s.get("endpoints", {}).items():
            g.add_metric([tier, state], value)
        yield g
        yield GaugeMetricFamily(
            f"{PREFIX}_decode_tpot_p95_seconds",
            "p95 of recent decode time-per-output-token samples (drives backpressure; NaN when none)",
            value=s.get("decode_tpot_p95", float("nan")),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_decode_throttled",
            "1 while decode admissions are throttled because the p95 TPOT exceeds its threshold",
            value=1.0 if s.get("decode_throttled") else 0.0,
        )


class _GcCollector(Collector):
    """The process's garbage-collector pauses by generation, and how much of its heap is frozen."""

    def __init__(self, clock: PauseClock) -> None:
        self.clock = clock

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        h = HistogramMetricFamily(
            f"{PREFIX}_gc_pause_seconds",
            "Time the process stood still for each garbage collection, by generation (2 = full pass)",
            labels=["generation"],
        )
        for generation, pauses in self.clock.generations.items():
            h.add_metric([generation], pauses.cumulative(), pauses.total_s)
        yield h
        yield GaugeMetricFamily(
            f"{PREFIX}_gc_frozen_objects",
            "Objects frozen after start-up, which full collections no longer walk",
            value=frozen_objects(),
        )


class PrometheusHooks(SchedulerHooks):
    def __init__(self, snapshot: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests_total", "Requests by route and final outcome", ["route", "outcome"], registry=r
        )
        # The operator reads this after a generation switch and rolls back when the new one fails too often:
        # `failed` counts the failures of the generation's engines only, `shed` the requests the scheduler
        # itself gave up on (capacity, shutdown).
        self.generation_requests = Counter(
            f"{PREFIX}_generation_requests_total",
            "Requests dispatched to each engine generation, by final outcome (failed: by its engines; shed: by "
            "the scheduler's own capacity or shutdown decision)", ["generation", "outcome"], registry=r
        )
        self.routing_decisions = Counter(
            f"{PREFIX}_routing_decisions_total", "Routing decisions by route and reason", ["route", "reason"], registry=r
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens_total", "Prompt tokens routed", ["route"], registry=r
        )
        self.rejections = Counter(
            f"{PREFIX}_rejections_total", "Requests rejected (HTTP 429) by reason", ["route", "reason"], registry=r
        )
        self.retries = Counter(
            f"{PREFIX}_retries_total", "Retries onto another replica or pair, by cause", ["route", "reason"], registry=r
        )
        self.holds = Counter(
            f"{PREFIX}_hold_events_total",
            "Degradation hold events (held; then resumed, expired, stranded, cancelled, shed or failed; reprefilled)",
            ["event"],
            registry=r,
        )
        self.hold_store_errors = Counter(
            f"{PREFIX}_hold_store_errors_total",
            "Hold-store writes that failed or were skipped while the store was failing, by store and operation "
            "(put, remove, expire); the holds themselves go on from memory",
            ["store", "operation"],
            registry=r,
        )
        self.heartbeats = Counter(
            f"{PREFIX}_heartbeats_total", "Heartbeat probes by tier and result", ["tier", "result"], registry=r
        )
        self.reloads = Counter(
            f"{PREFIX}_config_reloads_total", "Config file reloads by result", ["result"], registry=r
        )
        self.queue_wait_seconds = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time spent waiting for admission",
            ["route", "pool"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from arrival to the first streamed token",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot_seconds = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time between streamed tokens after the first",
            ["route"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "End-to-end request latency, arrival to last byte",
            ["route", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_transfer_seconds = Histogram(
            f"{PREFIX}_kv_transfer_seconds",
            "Prefill->decode KV handoff as the scheduler sees it (source=handoff): from dispatching the "
            "generation request to its first streamed byte (KV pull + first step)",
            ["source"],
            buckets=KV_BUCKETS,
            registry=r,
        )
        self.overhead_seconds = Histogram(
            f"{PREFIX}_overhead_seconds",
            "Time the scheduler adds before dispatching to an engine (excludes queue wait)",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        if snapshot is not None:
            self.registry.register(_StateCollector(snapshot))
        self.registry.register(_GcCollector(pause_clock()))
        # labelled children, looked up once: `labels()` validates and locks on every call, and the request
        # path records about eight samples per request (label values are a small fixed set)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def routed(self, route: str, reason: str, prompt_tokens: int) -> None:
        self._child(self.routing_decisions, route, reason).inc()
        self._child(self.prompt_tokens, route).inc(prompt_tokens)

    def queue_wait(self, route: str, pool: str, seconds: float) -> None:
        self._child(self.queue_wait_seconds, route, pool).observe(seconds)

    def dispatched(self, route: str, overhead_seconds: float) -> None:
        self._child(self.overhead_seconds, route).observe(overhead_seconds)

    def rejected(self, route: str, reason: str) -> None:
        self._child(self.rejections, route, reason).inc()

    def retried(self, route: str, reason: str) -> None:
        self._child(self.retries, route, reason).inc()

    def first_token(self, route: str, seconds: float) -> None:
        self._child(self.ttft_seconds, route).observe(seconds)

    def tpot(self, route: str, seconds: float) -> None:
        self._child(self.tpot_seconds, route).observe(seconds)

    def kv_transfer(self, seconds: float, source: str) -> None:
        self._child(self.kv_transfer_seconds, source).observe(seconds)

    def hold(self, event: str) -> None:
        self._child(self.holds, event).inc()

    def hold_store_error(self, store: str, operation: str) -> None:
        self._child(self.hold_store_errors, store, operation).inc()

    def finished(self, route: str, outcome: str, seconds: float) -> None:
        self._child(self.requests, route, outcome).inc()
        self._child(self.e2e_seconds, route, outcome).observe(seconds)

    def generation_finished(self, generation: str, outcome: str) -> None:
        self._child(self.generation_requests, generation, outcome).inc()

    def heartbeat(self, tier: str, ok: bool) -> None:
        self._child(self.heartbeats, tier, "ok" if ok else "failed").inc()

    def config_reload(self, result: str) -> None:
        self._child(self.reloads, result).inc()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
