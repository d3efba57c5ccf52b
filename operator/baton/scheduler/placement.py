"""Placement: which prefill replica gets a context-only request, and which decode replicas it may feed.

Pure: no I/O, no clock. `ReplicaState` is the per-replica load the service keeps up to date; policies
read it and pick one of the candidates they are handed (the service filters out unhealthy, full and
excluded replicas first).

Prefill policies (`routing.placementPolicy`):
- `shortest-prefill-first`: the replica with the fewest queued prefill tokens (prompt tokens of the
  context-only requests it has in flight), ties broken by fewer in-flight requests, then by fewer
  dispatches so far (which spreads ties round-robin);
- `least-loaded`: the fewest in-flight requests, then the fewest queued tokens;
- `round-robin`: each candidate in turn, regardless of load.

Rings (`build_rings`): each prefill replica feeds a fixed subset of decode replicas, so KV transfers
stay within small groups (bounded cross-traffic and connection fan-out). Replicas are grouped by KV
fingerprint, runtime and generation first (`Endpoint.pairing`): a prefill replica only ever pairs with
decode replicas of the same fingerprint, runtime and generation (None pairs only with None). Within a
group of P prefill and D decode replicas, in the order of their pod names (a StatefulSet's ordinals, so a
restarted pod, which comes back with another IP, gets its place back and every ring is as it was; static
endpoints by address), the
ring size is `ringSize` or ceil(D / P), and prefill i feeds decode replicas floor(i * D / P) onwards,
wrapping around. When D is a multiple of P the rings are disjoint; otherwise neighbouring rings overlap
by one replica. Every decode replica is in at least one ring when `ringSize` is 0. Rings are built over
the replicas present: while one is away (not ready, restarting) the others' rings shift so that every
decode replica stays fed, at the cost of some pairs that are new for a while (a first transfer between
two replicas sets up its connection); they shift back when it returns. Rings over fixed slots would keep
the other pairs, but leave the decode replicas of an absent prefill replica without handoffs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol

from baton.scheduler.endpoints import Endpoint


class ReplicaState:
    """Live load of one engine replica, owned and updated by the service."""

    __slots__ = (
        "endpoint",
        "healthy",
        "active",
        "local_prefills",
        "queued_tokens",
        "dispatched",
        "failures",
        "last_ok",
        "prefill_tps",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.healthy = True
        self.active = 0  # prefill: context-only requests in flight; decode: sequences (local + generation)
        self.local_prefills = 0  # decode: local requests still in their context phase
        self.queued_tokens = 0  # prefill: prompt tokens of the requests in flight
        self.dispatched = 0
        self.failures = 0
        # never heard from: the first heartbeat probes it. (Not 0.0: the clock is monotonic time, which on a
        # host up for less than a heartbeat period is itself below the period, so a new replica went unprobed.)
        self.last_ok = -math.inf
        self.prefill_tps = 0.0  # observed prefill throughput (tokens/s), 0 = unknown

    @property
    def address(self) -> str:
        return self.endpoint.address

    def __repr__(self) -> str:
        return (
            f"ReplicaState({self.address}, healthy={self.healthy}, active={self.active}, "
            f"queued_tokens={self.queued_tokens})"
        )


class PrefillPolicy(Protocol):
    name: str

    def pick(self, candidates: Sequence[ReplicaState], tokens: int) -> ReplicaState | None: ...


class ShortestPrefillFirst:
    name = "shortest-prefill-first"

    def pick(self, candidates: Sequence[ReplicaState], tokens: int) -> ReplicaState | None:
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.queued_tokens, r.active, r.dispatched, r.address))


class LeastLoaded:
    name = "least-loaded"

    def pick(self, candidates: Sequence[ReplicaState], tokens: int) -> ReplicaState | None:
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.active, r.queued_tokens, r.dispatched, r.address))


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._last = ""  # the address picked last: the turn passes to the next one after it

    def pick(self, candidates: Sequence[ReplicaState], tokens: int) -> ReplicaState | None:
        """The candidate whose address follows the last pick's (wrapping): the turn moves through the
        replicas however often, and among however many candidates, it is asked."""
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda r: r.address)
        choice = next((r for r in ordered if r.address > self._last), ordered[0])
        self._last = choice.address
        return choice


POLICIES = {p.name: p for p in (ShortestPrefillFirst, LeastLoaded, RoundRobin)}


def make_policy(name: str) -> PrefillPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {sorted(POLICIES)}") from None


def pick_decode(candidates: Sequence[ReplicaState]) -> ReplicaState | None:
    """Decode replicas are always chosen least-loaded: fewest sequences, then fewest local prefills."""
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.active, r.local_prefills, r.dispatched, r.address))


def _ring_order(ep: Endpoint) -> tuple[int, str, int, str]:
    """Pods by name, a StatefulSet's ordinal compared as a number (m-decode-g-2 before m-decode-g-10);
    endpoints without a pod (static) by address, after them."""
    if ep.pod:
        stem, _, ordinal = ep.pod.rpartition("-")
        if stem and ordinal.isdigit():
            return 0, stem, int(ordinal), ep.address
        return 0, ep.pod, -1, ep.address
    return 1, ep.address, -1, ep.address


def build_rings(
    prefill: Iterable[Endpoint], decode: Iterable[Endpoint], ring_size: int = 0
) -> dict[str, tuple[str, ...]]:
    """prefill address -> the decode addresses it may feed (same fingerprint and runtime only; see module doc)."""
    groups: dict[tuple[str | None, ...], tuple[list[Endpoint], list[Endpoint]]] = {}
    for ep in prefill:
        groups.setdefault(ep.pairing, ([], []))[0].append(ep)
    for ep in decode:
        groups.setdefault(ep.pairing, ([], []))[1].append(ep)
    rings: dict[str, tuple[str, ...]] = {}
    for prefill_eps, decode_eps in groups.values():
        prefills = [ep.address for ep in sorted(prefill_eps, key=_ring_order)]
        decodes = [ep.address for ep in sorted(decode_eps, key=_ring_order)]
        p, d = len(prefills), len(decodes)
        for i, address in enumerate(prefills):
            if d == 0:
                rings[address] = ()
                continue
            k = min(d, ring_size if ring_size > 0 else math.ceil(d / p))
            start = (i * d) // p
            rings[address] = tuple(decodes[(start + j) % d] for j in range(k))
    return rings
