"""Placement: prefill policies and prefill->decode rings (fingerprint-aware)."""

from __future__ import annotations

import pytest

from baton.scheduler.endpoints import Endpoint
from baton.scheduler.placement import ReplicaState, build_rings, make_policy, pick_decode


def eps(tier, n, fingerprint=None, base=8000):
    return [Endpoint(f"10.0.0.{i}:{base}", tier, fingerprint) for i in range(1, n + 1)]


def test_rings_split_decode_evenly_when_divisible():
    rings = build_rings(eps("prefill", 2), eps("decode", 4, base=9000))
    assert rings == {
        "10.0.0.1:8000": ("10.0.0.1:9000", "10.0.0.2:9000"),
        "10.0.0.2:8000": ("10.0.0.3:9000", "10.0.0.4:9000"),
    }


def test_rings_cover_every_decode_replica_when_uneven():
    p, d = eps("prefill", 3), eps("decode", 4, base=9000)
    rings = build_rings(p, d)
    assert all(len(r) == 2 for r in rings.values())
    assert {a for r in rings.values() for a in r} == {e.address for e in d}


def test_more_prefill_than_decode_share_decode_replicas():
    rings = build_rings(eps("prefill", 4), eps("decode", 2, base=9000))
    assert [len(r) for r in rings.values()] == [1, 1, 1, 1]
    assert {a for r in rings.values() for a in r} == {"10.0.0.1:9000", "10.0.0.2:9000"}


def test_explicit_ring_size_is_capped_by_decode_count():
    rings = build_rings(eps("prefill", 1), eps("decode", 3, base=9000), ring_size=5)
    assert len(rings["10.0.0.1:8000"]) == 3


def test_rings_only_pair_equal_fingerprints():
    prefill = [Endpoint("p-old:1", "prefill", "fpA"), Endpoint("p-new:1", "prefill", "fpB"), Endpoint("p-none:1", "prefill")]
    decode = [Endpoint("d-old:1", "decode", "fpA"), Endpoint("d-new:1", "decode", "fpB"), Endpoint("d-none:1", "decode")]
    rings = build_rings(prefill, decode)
    assert rings == {"p-old:1": ("d-old:1",), "p-new:1": ("d-new:1",), "p-none:1": ("d-none:1",)}
    assert build_rings([Endpoint("p:1", "prefill", "fpA")], [Endpoint("d:1", "decode")]) == {"p:1": ()}


def test_rings_keep_two_generations_apart_when_their_fingerprints_agree():
    """A PairwiseSwap of an image change that declares the same TensorRT-LLM version: both generations
    are routed to and their KV fingerprints agree, yet no request crosses from one to the other."""
    def ep(name, tier, generation):
        return Endpoint(f"{name}:1", tier, "fpA", pod=name, runtime="trtllm-serve", generation=generation)

    prefill = [ep("p-old", "prefill", "g1"), ep("p-new", "prefill", "g2")]
    decode = [ep("d-old-0", "decode", "g1"), ep("d-old-1", "decode", "g1"), ep("d-new", "decode", "g2")]
    assert build_rings(prefill, decode) == {"p-old:1": ("d-old-0:1", "d-old-1:1"), "p-new:1": ("d-new:1",)}


def states(*loads):
    out = []
    for i, (queued, active) in enumerate(loads):
        r = ReplicaState(Endpoint(f"h{i}:1", "prefill"))
        r.queued_tokens, r.active = queued, active
        out.append(r)
    return out


def test_shortest_prefill_first_picks_least_queued_tokens():
    cands = states((5000, 1), (100, 3), (2000, 0))
    assert make_policy("shortest-prefill-first").pick(cands, 10).address == "h1:1"


def test_shortest_prefill_first_spreads_ties():
    policy = make_policy("shortest-prefill-first")
    cands = states((0, 0), (0, 0))
    picked = []
    for _ in range(4):
        r = policy.pick(cands, 1)
        r.dispatched += 1
        picked.append(r.address)
    assert picked == ["h0:1", "h1:1", "h0:1", "h1:1"]


def test_least_loaded_and_round_robin():
    cands = states((5000, 1), (100, 3), (2000, 0))
    assert make_policy("least-loaded").pick(cands, 1).address == "h2:1"
    rr = make_policy("round-robin")
    assert [rr.pick(cands, 1).address for _ in range(4)] == ["h0:1", "h1:1", "h2:1", "h0:1"]
    assert rr.pick([], 1) is None


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown placement policy"):
        make_policy("random")


def test_pick_decode_prefers_fewest_sequences():
    a, b = (ReplicaState(Endpoint(x, "decode")) for x in ("a:1", "b:1"))
    a.active, b.active = 3, 1
    assert pick_decode([a, b]) is b
    assert pick_decode([]) is None


def test_a_restarted_pod_keeps_every_ring_as_it_was():
    """Rings follow the pods' names (StatefulSet ordinals), not their IPs: a decode pod that restarts and
    comes back with another address takes its predecessor's place, and no other pairing moves."""
    def ep(tier, i, ip):
        return Endpoint(f"{ip}:8000", tier, "fp", pod=f"m-{tier}-g-{i}", runtime="trtllm-serve", generation="g")

    prefill = [ep("prefill", 0, "127.0.0.50"), ep("prefill", 1, "127.0.0.9")]
    decode = [ep("decode", i, ip) for i, ip in enumerate(["127.0.0.30", "127.0.0.4", "127.0.0.200", "127.0.0.11"])]
    before = build_rings(prefill, decode)
    assert before == {"127.0.0.50:8000": ("127.0.0.30:8000", "127.0.0.4:8000"),
                      "127.0.0.9:8000": ("127.0.0.200:8000", "127.0.0.11:8000")}
    decode[1] = ep("decode", 1, "127.0.0.99")  # m-decode-g-1 restarted with another IP
    after = build_rings(prefill, decode)
    assert after == {"127.0.0.50:8000": ("127.0.0.30:8000", "127.0.0.99:8000"),
                     "127.0.0.9:8000": ("127.0.0.200:8000", "127.0.0.11:8000")}
    # ordinals compare as numbers
    many = [ep("decode", i, f"127.0.1.{i}") for i in (10, 2, 1)]
    assert build_rings([ep("prefill", 0, "127.0.0.1")], many, ring_size=3)["127.0.0.1:8000"] == (
        "127.0.1.1:8000", "127.0.1.2:8000", "127.0.1.10:8000")


def test_round_robin_keeps_its_turns_when_asked_twice_for_one_grant():
    """Placement asks again among the candidates whose ring has room when the first pick's ring is full:
    the turn passes on from the replica picked, so the free ones still share the work evenly."""
    rr = make_policy("round-robin")
    a, b, c = states((0, 0), (0, 0), (0, 0))
    picked = []
    for _ in range(300):
        first = rr.pick([a, b, c], 1)
        picked.append(first.address if first is not a else rr.pick([b, c], 1).address)  # a's ring is full
    assert picked.count("h1:1") == picked.count("h2:1") == 150
