"""The operator's Prometheus metrics: reconcile passes, their duration and outcome, every API request
it made by verb (what the benchmark reports as requests per reconcile), and the size of its child
cache."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "baton_operator_reconciles_total", "Reconcile passes, by result (ok, stalled, transient, error).", ["result"], registry=REGISTRY
)
RESULTS = ("ok", "stalled", "transient", "error")
for _result in RESULTS:
    # Each series exists from the start at 0: the first error after a start is then an increase, which
    # increase() sees (a series whose first sample is already 1 shows none).
    RECONCILES.labels(_result)
STALLED_MODELS = Gauge(
    "baton_operator_models_stalled",
    "Models whose last reconcile pass found them Stalled (a spec Baton cannot serve, a rolled-back generation).",
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "baton_operator_reconcile_duration_seconds", "Duration of one reconcile pass.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)


class _ApiRequests:
    """Reads the Kube client's own request counters at scrape time."""

    def __init__(self, kube) -> None:
        self.kube = kube

    def collect(self):
        family = CounterMetricFamily("baton_operator_api_requests", "Kubernetes API requests made, by verb.", labels=["verb"])
        for verb, count in sorted(self.kube.requests.items()):
            family.add_metric([verb], count)
        yield family


def watch_client(kube) -> None:
    REGISTRY.register(_ApiRequests(kube))


class _CacheSize:
    def __init__(self, cache) -> None:
        self.cache = cache

    def collect(self):
        objects, size = self.cache.footprint()
        yield GaugeMetricFamily("baton_operator_cache_objects", "Child objects held in the operator's cache.", value=objects)
        yield GaugeMetricFamily("baton_operator_cache_bytes", "Bytes of compressed JSON the cached children take.", value=size)


def watch_cache(cache) -> None:
    REGISTRY.register(_CacheSize(cache))
