"""Routing: the local-vs-disaggregated decision by prompt length, flags and load."""

from __future__ import annotations

import pytest

from baton.scheduler.config import RoutingConfig
from baton.scheduler.routing import Band, LoadView, Route, classify, decide

CFG = RoutingConfig(local_prefill_below_tokens=100, always_prefill_at_or_above_tokens=1000)
LATENCY = CFG.model_copy(update={"algorithm": "latency-optimized"})
FP8 = CFG.model_copy(update={"kv_transfer_compression": "fp8"})


@pytest.mark.parametrize(("tokens", "band"), [(0, Band.SHORT), (99, Band.SHORT), (100, Band.MEDIUM),
                                              (999, Band.MEDIUM), (1000, Band.LONG), (10**6, Band.LONG)])
def test_bands_use_below_and_at_or_above(tokens, band):
    assert classify(tokens, CFG) is band


def test_short_goes_local_when_decode_has_room_else_disaggregated():
    assert decide(10, False, CFG, LoadView()).route is Route.LOCAL
    d = decide(10, False, CFG, LoadView(decode_has_room=False))
    assert (d.route, d.reason) == (Route.DISAGGREGATED, "short-prompt-decode-busy")


def test_long_always_disaggregated_even_when_decode_idle():
    d = decide(5000, False, CFG, LoadView(decode_has_room=True, prefill_backed_up=True))
    assert (d.route, d.reason) == (Route.DISAGGREGATED, "long-prompt")


def test_no_prefill_pair_falls_back_to_local():
    d = decide(5000, False, CFG, LoadView(prefill_available=False))
    assert (d.route, d.reason) == (Route.LOCAL, "no-prefill-pair")


def test_high_precision_takes_local_path_only_with_fp8_transfer():
    assert decide(5000, True, FP8, LoadView()).route is Route.LOCAL
    assert decide(5000, True, CFG, LoadView()).route is Route.DISAGGREGATED


def test_high_precision_is_handed_off_compressed_when_its_fallback_is_off():
    no_fallback = FP8.model_copy(update={"high_precision_fallback": False})
    d = decide(5000, True, no_fallback, LoadView())
    assert (d.route, d.reason) == (Route.DISAGGREGATED, "long-prompt")


def test_throughput_optimized_prefers_disaggregation_unless_prefill_backed_up():
    assert decide(500, False, CFG, LoadView()).route is Route.DISAGGREGATED
    assert decide(500, False, CFG, LoadView(prefill_backed_up=True)).route is Route.LOCAL
    # backed up, but no decode room: still disaggregated (it will queue)
    assert decide(500, False, CFG, LoadView(prefill_backed_up=True, decode_has_room=False)).route is Route.DISAGGREGATED


def test_latency_optimized_compares_queue_delay_with_local_cost():
    busy_prefill = LoadView(prefill_queue_delay_s=0.5, local_prefill_cost_s=0.1, decode_idle_fraction=0.9)
    assert decide(500, False, LATENCY, busy_prefill).route is Route.LOCAL
    idle_prefill = LoadView(prefill_queue_delay_s=0.0, local_prefill_cost_s=0.1, decode_idle_fraction=0.9)
    assert decide(500, False, LATENCY, idle_prefill).route is Route.DISAGGREGATED
    busy_decode = LoadView(prefill_queue_delay_s=0.5, local_prefill_cost_s=0.1, decode_idle_fraction=0.2)
    assert decide(500, False, LATENCY, busy_decode).route is Route.DISAGGREGATED
