"""Protection end to end: queue limit (429 + Retry-After), decode backpressure, degradation holds."""

from __future__ import annotations

import json
import threading

import pytest

from redis_harness import free_port
from scheduler_harness import (
    MODEL,
    http,
    metric,
    metrics,
    perf,
    post,
    post_concurrently,
    prompt_ids,
    scheduler_config,
    start_scheduler,
    wait_for,
)


def _short(seed: int, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": prompt_ids(20, seed), "max_tokens": max_tokens}


def _long(seed: int, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": prompt_ids(2000, seed), "max_tokens": max_tokens}


def test_queue_limit_answers_429_with_retry_after(engines, make_scheduler):
    decode = engines["decode1"]
    sched = make_scheduler([engines["prefill"]], [decode], queue={"maxDepth": 1},
                           backpressure={"maxActivePerDecodeReplica": 1})
    # one runs, one waits, the rest are turned away; a 429 is immediate, the others finish
    results = post_concurrently(sched.url + "/v1/completions", [_short(i, 300) for i in range(5)])
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 429, 429, 429]
    for status, headers, raw in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            err = json.loads(raw)["error"]
            assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
            assert headers["X-Baton-Error"] == "queue_full"
            # a short prompt meeting a busy decode tier is routed to disaggregate, then refused
            assert headers["X-Baton-Route"] in ("local", "disaggregated")
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_rejections_total", reason="queue_full") == 3
    assert metric(values, "baton_scheduler_requests_total", outcome="rejected") == 3
    assert metric(values, "baton_scheduler_requests_total", outcome="completed") == 2


def test_decode_backpressure_caps_active_sequences_per_replica(engines, make_scheduler):
    decode = engines["decode1"]
    sched = make_scheduler([engines["prefill"]], [decode], backpressure={"maxActivePerDecodeReplica": 1})
    perf(decode)
    results = post_concurrently(sched.url + "/v1/completions", [_short(10 + i, 60) for i in range(3)])
    assert [r[0] for r in results] == [200, 200, 200]
    # the engine never ran two of them at once
    spans = sorted(
        (r["perf_metrics"]["timing_metrics"]["arrival_time"], r["perf_metrics"]["timing_metrics"]["last_token_time"])
        for r in perf(decode)
    )
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end
    # the two that found the slot taken waited for it: in the decode queue, or (routed to disaggregate
    # because the decode replica was busy) prefilled and held
    values = metrics(sched.url)
    waits = [(pool, metric(values, "baton_scheduler_queue_wait_seconds_sum", pool=pool)) for pool in ("decode", "hold")]
    assert sum(w for _, w in waits) > 0.02, waits


def _hold_events(url: str) -> dict[str, float]:
    values = metrics(url)
    return {e: metric(values, "baton_scheduler_hold_events_total", event=e)
            for e in ("held", "resumed", "expired", "reprefilled")}


def _occupy(url: str, body: dict, out: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(post(url + "/v1/completions", body, timeout=60)))
    thread.start()
    return thread


def test_finished_prefill_is_held_until_a_decode_slot_frees(engines, make_scheduler):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]],
                           backpressure={"maxActivePerDecodeReplica": 1}, degradation={"holdTtlSeconds": 20})
    first: list = []
    occupier = _occupy(sched.url, _short(20, 1200), first)  # holds the only decode slot for ~1.2 s
    wait_for(lambda: json.loads(http("GET", sched.url + "/debug/state")[2])["decode"][0]["active"] == 1, 10,
             "the first request to occupy the decode slot")
    status, headers, body = post(sched.url + "/v1/completions", _long(21, 5))
    occupier.join(30)
    assert first[0][0] == 200
    assert status == 200 and headers["X-Baton-Route"] == "disaggregated"
    assert body["usage"]["completion_tokens"] == 5
    events = _hold_events(sched.url)
    assert events["held"] == 1 and events["resumed"] == 1 and events["expired"] == 0
    assert metric(metrics(sched.url), "baton_scheduler_holds") == 0


def test_expired_hold_is_reprefilled_once_then_fails_explicitly(engines, make_scheduler):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]],
                           backpressure={"maxActivePerDecodeReplica": 1}, degradation={"holdTtlSeconds": 0.3})
    first: list = []
    occupier = _occupy(sched.url, _short(30, 2500), first)  # ~2.5 s on the only decode slot
    wait_for(lambda: json.loads(http("GET", sched.url + "/debug/state")[2])["decode"][0]["active"] == 1, 10,
             "the first request to occupy the decode slot")
    status, headers, body = post(sched.url + "/v1/completions", _long(31, 5))
    assert occupier.is_alive()  # it failed after two short holds, not after waiting for the slot
    occupier.join(30)
    assert first[0][0] == 200
    assert status == 503, body
    assert body["error"]["code"] == "hold_expired" and "holdTtlSeconds" in body["error"]["message"]
    assert headers["X-Baton-Error"] == "hold_expired"
    events = _hold_events(sched.url)
    assert events == {"held": 2, "resumed": 0, "expired": 2, "reprefilled": 1}
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_requests_total", route="disaggregated", outcome="failed") == 1


def _held_request(sched, seed: int) -> tuple[list, _Both, list]:
    """Occupy the only decode slot, then send a long prompt: its prefill finishes and is held."""
    first: list = []
    occupier = _occupy(sched.url, _short(seed, 1500), first)  # ~1.5 s on the only decode slot
    wait_for(lambda: json.loads(http("GET", sched.url + "/debug/state")[2])["decode"][0]["active"] == 1, 10,
             "the first request to occupy the decode slot")
    held: list = []
    thread = _occupy(sched.url, _long(seed + 1, 5), held)
    return first, _Both(occupier, thread), held


class _Both:
    """Joins two threads: the held request's and the one occupying the decode slot before it."""

    def __init__(self, *threads: threading.Thread) -> None:
        self.threads = threads

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def test_held_prefills_are_published_to_redis_while_held(engines, make_scheduler, redis_server, tmp_path):
    with redis_server.client() as c:
        c.flushdb()
    prefill = engines["prefill"]
    url_file = tmp_path / "redis-url"  # as the operator mounts spec.scheduler.degradation.redisUrlSecret
    url_file.write_text(redis_server.url + "\n")
    sched = make_scheduler([prefill], [engines["decode1"]], backpressure={"maxActivePerDecodeReplica": 1},
                           degradation={"holdTtlSeconds": 20, "store": "redis", "redisUrlFile": str(url_file)})
    first, thread, held = _held_request(sched, 40)
    with redis_server.client() as c:
        key = wait_for(lambda: c.keys("baton:hold:*"), 10, "the held prefill to be published to redis")[0]
        record = json.loads(c.get(key))
        ttl_ms = c.pttl(key)
    assert record["prefill"] == prefill.address and record["ring"] == [engines["decode1"].address]
    assert isinstance(record["handle"]["ctx_request_id"], int) and record["handle"]["encoded_opaque_state"]
    assert 0 < ttl_ms <= 20_000
    thread.join(30)
    status, headers, body = held[0]
    assert status == 200 and headers["X-Baton-Route"] == "disaggregated"
    # one key per hold: the request's id, then a suffix of its own
    assert key.decode() == f"baton:hold:{record['key']}" and record["request_id"] == headers["X-Request-Id"]
    assert record["key"].startswith(headers["X-Request-Id"] + "#")
    assert body["usage"]["completion_tokens"] == 5
    with redis_server.client() as c:
        wait_for(lambda: not c.keys("baton:hold:*"), 5, "the resumed hold's key to be deleted")
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_hold_store_healthy", store="redis") == 1
    assert metric(values, "baton_scheduler_hold_store_errors_total") == 0
    assert _hold_events(sched.url)["resumed"] == 1
    assert first[0][0] == 200


def test_a_dead_redis_does_not_fail_held_requests(engines, make_scheduler):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]], backpressure={"maxActivePerDecodeReplica": 1},
                           degradation={"holdTtlSeconds": 20, "store": "redis",
                                        "redisUrl": f"redis://127.0.0.1:{free_port()}/0"})
    first, thread, held = _held_request(sched, 50)
    thread.join(30)
    assert first[0][0] == 200
    status, headers, body = held[0]
    assert status == 200 and headers["X-Baton-Route"] == "disaggregated" and body["usage"]["completion_tokens"] == 5
    events = _hold_events(sched.url)
    assert events["held"] == 1 and events["resumed"] == 1
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_hold_store_errors_total", store="redis", operation="put") == 1
    assert metric(values, "baton_scheduler_hold_store_healthy", store="redis") == 0
    assert metric(values, "baton_scheduler_holds") == 0
    assert http("GET", sched.url + "/readyz")[0] == 200  # serving does not depend on redis
    assert "event=hold_store_unavailable store=redis operation=put" in sched.log()


@pytest.mark.parametrize("source", ["file", "variable"])
def test_a_redis_url_that_is_missing_stops_the_scheduler_at_start(tmp_path, engines, source):
    missing = {"file": {"redisUrlFile": str(tmp_path / "no-such-secret" / "url")},
               "variable": {"redisUrlEnv": "BATON_REDIS_URL_UNSET"}}[source]
    config = scheduler_config([engines["prefill"]], [engines["decode1"]], degradation={"store": "redis", **missing})
    proc = start_scheduler(tmp_path, f"no-redis-url-{source}", config)
    try:
        assert proc.proc.wait(timeout=30) == 2
        expected = {"file": f"redisUrlFile {tmp_path / 'no-such-secret' / 'url'} is unreadable",
                    "variable": "BATON_REDIS_URL_UNSET holds no URL: it is unset or empty"}[source]
        assert expected in proc.log()
    finally:
        proc.stop()
