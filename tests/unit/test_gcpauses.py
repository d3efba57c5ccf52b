"""GC pause clock and heap freezing: what the scheduler exports and what full collections walk."""

from __future__ import annotations

import gc
import weakref

from baton.gcpauses import PAUSE_BUCKETS, PauseClock, PauseHistogram, freeze_heap, frozen_objects


def test_histogram_buckets_are_cumulative_with_sum_and_max():
    h = PauseHistogram()
    for seconds in (0.00005, 0.0003, 0.0003, 0.02, 1.0):
        h.observe(seconds)
    buckets = dict(h.cumulative())
    assert list(buckets)[-1] == "+Inf" and len(buckets) == len(PAUSE_BUCKETS) + 1
    assert buckets["0.0001"] == 1 and buckets["0.00025"] == 1 and buckets["0.0005"] == 3
    assert buckets["0.025"] == 4 and buckets["0.25"] == 4 and buckets["+Inf"] == 5 == h.count
    assert abs(h.total_s - 1.02065) < 1e-9 and h.max_s == 1.0


def test_a_pause_on_a_bucket_bound_counts_in_that_bucket():
    h = PauseHistogram()
    h.observe(0.001)  # Prometheus buckets are "less than or equal"
    assert dict(h.cumulative())["0.001"] == 1 and dict(h.cumulative())["0.0005"] == 0


def test_clock_times_real_collections_by_generation():
    clock = PauseClock()
    clock.install()
    clock.install()  # once only
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        clock.uninstall()
    assert clock.generations["0"].count >= 1 and clock.generations["2"].count == 1
    assert clock.generations["2"].total_s > 0
    gc.collect()
    assert clock.generations["2"].count == 1  # uninstalled: no longer called


class Node:
    """An object a weak reference can follow, for a reference cycle of one."""


def test_frozen_heap_is_left_out_of_full_collections():
    junk = [[i] for i in range(20_000)]  # tracked objects alive now
    walked_before = len(gc.get_objects())
    try:
        assert freeze_heap() == frozen_objects() >= 20_000
        assert len(gc.get_objects()) < walked_before // 10  # what a full pass still has to walk
        # objects made afterwards are collected as before: a cycle nothing refers to goes at the next full pass
        collected = []
        cycle = Node()
        cycle.self = cycle
        weakref.finalize(cycle, collected.append, "cycle")
        del cycle
        gc.collect()
        assert collected == ["cycle"]
    finally:
        gc.unfreeze()
    assert frozen_objects() == 0 and len(gc.get_objects()) >= walked_before
    del junk
