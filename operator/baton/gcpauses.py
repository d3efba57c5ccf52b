"""Short garbage-collector pauses for long-running servers, and a clock on them.

CPython's cycle collector stops the whole process while it runs, and a full (generation 2) pass walks
every tracked object. In a server most of those are the start-up heap: modules, classes, parsed config,
the metrics registry; none of it ever becomes garbage. On the benchmark machine the scheduler's full
passes took 8-14 ms under load (4.5 ms idle for its imports alone), and every stream in flight waited.

`freeze_heap()` moves everything alive at that moment into the collector's permanent generation
(`gc.freeze()`), so later full passes walk only what was created since. Servers call it once they are
serving; the benchmark's load generator before each measured phase (what earlier phases recorded stays
until it exits). The price: a reference cycle among the frozen objects is never collected; what is
frozen is kept for the life of the process anyway.

`PauseClock` times every collection by generation through `gc.callbacks`; the scheduler exports it on
`/metrics`. One clock per process (`pause_clock()`), however many registries read it.
"""

from __future__ import annotations

import bisect
import gc
import threading
import time
from dataclasses import dataclass, field

# 0.1 ms .. 250 ms: a young pass is tens of microseconds, a full one over a large heap tens of ms.
PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
GENERATIONS = ("0", "1", "2")


def freeze_heap() -> int:
    """Collect the garbage there is, then freeze what is alive; returns the frozen object count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def frozen_objects() -> int:
    return gc.get_freeze_count()


@dataclass
class PauseHistogram:
    """Pauses of one generation: cumulative bucket counts as Prometheus wants them, sum and max."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(PAUSE_BUCKETS) + 1))  # last: +Inf
    total_s: float = 0.0
    max_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*(repr(b) for b in PAUSE_BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class PauseClock:
    """Times each collection (wall time between the collector's start and stop callbacks)."""

    def __init__(self) -> None:
        self.generations = {g: PauseHistogram() for g in GENERATIONS}
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:  # bound methods of one clock compare equal
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.generations[GENERATIONS[info["generation"]]].observe(time.perf_counter() - self._started)


_CLOCK: PauseClock | None = None
_CLOCK_LOCK = threading.Lock()


def pause_clock() -> PauseClock:
    """This process's clock, installed on first use."""
    global _CLOCK
    with _CLOCK_LOCK:
        if _CLOCK is None:
            _CLOCK = PauseClock()
            _CLOCK.install()
        return _CLOCK
