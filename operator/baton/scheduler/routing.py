"""Length-based routing: should this prompt be prefilled locally on a decode replica or disaggregated?

Pure: `decide(tokens, high_precision, routing_config, view)` reads a `LoadView` snapshot the service builds
from its endpoint state and returns a `Decision`. The rules, in order:

1. no usable prefill -> decode pair (no prefill tier, or every pair known KV-incompatible) -> local;
2. `kvTransferCompression: fp8` and the request is flagged high-precision -> local (no compressed transfer);
3. prompt >= `alwaysPrefillAtOrAboveTokens` -> disaggregated;
4. prompt < `localPrefillBelowTokens` -> local when the least-loaded decode replica has room, else disaggregated;
5. in between, the algorithm decides:
   - `throughput-optimized` keeps prefill off the decode tier: disaggregated, unless the prefill tier is
     backed up (every prefill slot busy, requests already waiting for one, or the prefill token bucket
     cannot cover the prompt) *and* a decode replica has room, then local;
   - `latency-optimized` goes local when a decode replica has room and is idle enough (at most half of
     its active-sequence cap in use) and the estimated prefill-queue delay is larger than the estimated
     cost of prefilling the prompt locally; otherwise disaggregated.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from baton.scheduler.config import RoutingConfig

LOCAL_IDLE_FRACTION = 0.5  # latency-optimized: the decode replica must have at least half its slots free


class Route(str, Enum):
    LOCAL = "local"
    DISAGGREGATED = "disaggregated"


class Band(str, Enum):
    SHORT = "short"  # below localPrefillBelowTokens
    MEDIUM = "medium"  # in between: the algorithm decides
    LONG = "long"  # at or above alwaysPrefillAtOrAboveTokens


@dataclass(frozen=True, slots=True)
class LoadView:
    """What the routing decision may know about the tiers right now."""

    prefill_available: bool = True  # at least one healthy prefill replica with a compatible decode replica
    decode_has_room: bool = True  # the least-loaded decode replica can take a local prefill now
    decode_idle_fraction: float = 1.0  # free share of that replica's active-sequence cap (0..1)
    prefill_backed_up: bool = False  # no free prefill slot, waiters queued, or the token bucket is short
    prefill_queue_delay_s: float = 0.0  # estimated wait before a new prefill would start
    local_prefill_cost_s: float = 0.0  # estimated time to prefill this prompt on a decode replica


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    reason: str
    band: Band


def classify(tokens: int, config: RoutingConfig) -> Band:
    if tokens >= config.always_prefill_at_or_above_tokens:
        return Band.LONG
    if tokens < config.local_prefill_below_tokens:
        return Band.SHORT
    return Band.MEDIUM


def must_stay_uncompressed(high_precision: bool, config: RoutingConfig) -> bool:
    """A high-precision request while KV transfers are compressed (and `highPrecisionFallback` is on): it is
    served locally, never handed off."""
    return high_precision and config.kv_transfer_compression == "fp8" and config.high_precision_fallback


def decide(tokens: int, high_precision: bool, config: RoutingConfig, view: LoadView) -> Decision:
    band = classify(tokens, config)
    if not view.prefill_available:
        return Decision(Route.LOCAL, "no-prefill-pair", band)
    if must_stay_uncompressed(high_precision, config):
        return Decision(Route.LOCAL, "high-precision", band)
    if band is Band.LONG:
        return Decision(Route.DISAGGREGATED, "long-prompt", band)
    if band is Band.SHORT:
        if view.decode_has_room:
            return Decision(Route.LOCAL, "short-prompt", band)
        return Decision(Route.DISAGGREGATED, "short-prompt-decode-busy", band)
    if config.algorithm == "latency-optimized":
        if (
            view.decode_has_room
            and view.decode_idle_fraction >= LOCAL_IDLE_FRACTION
            and view.prefill_queue_delay_s > view.local_prefill_cost_s
        ):
            return Decision(Route.LOCAL, "latency-local-faster", band)
        return Decision(Route.DISAGGREGATED, "latency-disaggregate", band)
    if view.prefill_backed_up and view.decode_has_room:
        return Decision(Route.LOCAL, "throughput-prefill-backed-up", band)
    return Decision(Route.DISAGGREGATED, "throughput-disaggregate", band)

