"""The request flow in-process against a scripted fake engine: retries, KV mismatch, throttling, buckets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time

import pytest

from http1_harness import until

from baton.http1.server import STOPPING
from baton.scheduler.config import parse_config
from baton.scheduler.endpoints import Endpoint
from baton.scheduler.engines import EngineFailure, IteratedResponse
from baton.scheduler.metrics import SchedulerHooks
from baton.scheduler.service import Reply, SchedulerService

KV_ERROR = ("Disagg server does not currently support these cacheState: "
            "selfConfig.getDataType() != destConfig.getDataType()")


KV_GONE_ERROR = ("KV cache transfer timed out: ctx_request_id 1 was not sent within kv_transfer_timeout_ms=30000 of "
                 "the context worker; the context request was cancelled and its KV cache freed")


class FakeEngine:
    """Answers like trtllm-serve; `fail` maps an address to a failure mode for generation requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, str] = {}
        self.delay = 0.0

    async def post(self, endpoint, path, body, request_id):
        data = json.loads(body)
        dp = data.get("disaggregated_params") or {}
        kind = dp.get("request_type", "context_and_generation")
        self.calls.append((endpoint.address, kind))
        if self.delay:
            await asyncio.sleep(self.delay)
        mode = self.fail.get(endpoint.address)
        if mode == "connect":
            raise EngineFailure(endpoint, "ClientConnectorError: refused", kind="connection")
        if mode == "closed" and kind == "generation_only":  # a reused connection closed before any answer
            self.fail.pop(endpoint.address)  # once
            raise EngineFailure(endpoint, "ClosedBeforeAnswer: closed", kind="closed_before_answer")
        if mode == "kv" and kind == "generation_only":
            return 500, json.dumps({"object": "error", "message": KV_ERROR}).encode(), "application/json"
        if mode == "500":
            return 500, b'{"object": "error", "message": "boom"}', "application/json"
        if mode == "kv_gone" and kind == "generation_only":  # the context worker freed the KV at its timeout
            self.fail.pop(endpoint.address)  # once
            return 500, json.dumps({"object": "error", "message": KV_GONE_ERROR}).encode(), "application/json"
        if kind == "context_only":
            answer = {"choices": [{"text": " a", "finish_reason": "length",
                                   "disaggregated_params": {"request_type": "context_only", "first_gen_tokens": [7],
                                                            "ctx_request_id": 1, "encoded_opaque_state": "x",
                                                            "draft_tokens": None}}],
                      "prompt_token_ids": [1, 2, 3]}
        else:
            answer = {"choices": [{"text": " a b", "finish_reason": "length"}], "served_by": endpoint.address}
        return 200, json.dumps(answer).encode(), "application/json"

    async def open(self, endpoint, path, body, request_id):  # streaming is covered end to end
        raise NotImplementedError

    async def health(self, endpoint, timeout):
        return self.fail.get(endpoint.address) != "connect"

    async def close(self):
        pass


def make(config_yaml: str = "", prefill=("p1:1",), decode=("d1:1", "d2:1")):
    cfg = parse_config("model: m\nrouting: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n"
                       + config_yaml)
    engine = FakeEngine()
    svc = SchedulerService(cfg, engine=engine, discover=False)
    svc.update_endpoints([Endpoint(a, "prefill") for a in prefill], [Endpoint(a, "decode") for a in decode])
    return svc, engine


def long_request(n=200):
    return json.dumps({"model": "m", "prompt": list(range(1, n + 1)), "max_tokens": 2}).encode()


def run(coro):
    return asyncio.run(coro)


def test_generation_failure_is_retried_on_another_pair():
    async def main():
        svc, engine = make()
        engine.fail["d1:1"] = "500"
        reply = await svc.complete("completions", long_request(), {})
        assert isinstance(reply, Reply) and reply.status == 200
        assert reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
        assert [k for _, k in engine.calls] == ["context_only", "generation_only", "context_only", "generation_only"]
        await svc.stop()

    run(main())


def test_the_first_heartbeat_probes_a_replica_never_heard_from_on_a_host_up_for_less_than_a_period():
    """The clock is monotonic time, which starts near 0 at boot. A replica whose arrival was not probed (its
    endpoints came before the event loop ran) is probed at the first heartbeat even when the host has been up
    for less than one heartbeat period (this failed on a machine up for 13 minutes, heartbeatSeconds 3600)."""
    cfg = parse_config("model: m\nheartbeatSeconds: 15\n")
    engine = FakeEngine()
    probed: list[str] = []

    async def health(endpoint, timeout):
        probed.append(endpoint.address)
        return True
    engine.health = health
    svc = SchedulerService(cfg, engine=engine, discover=False, clock=lambda: 5.0)  # the host is up for 5 s
    svc.update_endpoints([], [Endpoint("d1:1", "decode")])  # no loop yet: no arrival probe

    async def main():
        await svc.heartbeat_once()
        assert probed == ["d1:1"]
        await svc.heartbeat_once()  # heard from at 5.0: not again within the period
        assert probed == ["d1:1"]
        await svc.stop()

    run(main())


def test_connection_failure_marks_the_replica_unhealthy():
    async def main():
        svc, engine = make(decode=("d1:1",))
        engine.fail["d1:1"] = "connect"
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 502 and json.loads(reply.body)["error"]["code"] == "engine_error"
        assert not svc.decode["d1:1"].healthy
        assert svc.ready() == (False, "no healthy decode endpoint")
        engine.fail.clear()
        await svc.heartbeat_once()
        assert svc.decode["d1:1"].healthy
        await svc.stop()

    run(main())


def test_kv_mismatch_is_not_retried_and_the_pair_is_avoided():
    async def main():
        svc, engine = make(decode=("d1:1",))
        engine.fail["d1:1"] = "kv"
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 502
        err = json.loads(reply.body)["error"]
        assert err["code"] == "kv_format_mismatch" and "cacheState" in err["message"]
        assert [k for _, k in engine.calls] == ["context_only", "generation_only"]  # no blind retry
        assert ("p1:1", "d1:1") in svc.incompatible
        reply = await svc.complete("completions", long_request(), {})
        assert reply.headers["X-Baton-Route"] == "local"  # no compatible pair left: local prefill
        await svc.stop()

    run(main())


def _quoting_engine(engine, field):
    """The engine refuses a string `field` 400 and quotes its value, as trtllm-serve's validation errors and the
    simulator's "got ..." do."""
    post = engine.post

    async def quoting(endpoint, path, body, request_id):
        data = json.loads(body)
        if isinstance(data.get(field), str) and (data.get("disaggregated_params") or {}).get(
                "request_type") != "context_only":
            engine.calls.append((endpoint.address, "refused"))
            return 400, json.dumps({"object": "error", "type": "BadRequestError", "code": 400,
                                    "message": f"{field} must be an integer, got {data[field]!r}"}).encode(), \
                "application/json"
        return await post(endpoint, path, body, request_id)
    engine.post = quoting


@pytest.mark.parametrize("marker", ["only support same", "Error in kv cache transfer", "KVTransferTimeout",
                                    "only support \\u0073ame"])
def test_an_engine_quoting_a_clients_field_back_is_the_clients_400_whatever_the_field_says(marker):
    """A client's field holding the text of a KV-format mismatch or a failed transfer, quoted back in the
    engine's refusal, is the client's 400: its pair is not kept out, no replica counts as failing, nothing is
    retried, and the next request is served as usual."""
    async def main():
        svc, engine = make()
        _quoting_engine(engine, "max_tokens")
        for prompt in (list(range(1, 201)), [1, 2, 3]):  # disaggregated (refused at generation), local
            body = ('{"model": "m", "prompt": %s, "max_tokens": "%s"}' % (json.dumps(prompt), marker)).encode()
            for _ in range(3):
                engine.calls.clear()
                reply = await svc.complete("completions", body, {})
                assert reply.status == 400, reply.body
                assert "must be an integer" in json.loads(reply.body)["message"]
                assert [k for _, k in engine.calls].count("refused") == 1, engine.calls  # not retried
        assert svc.incompatible == {}
        assert all(r.healthy and not r.failures for r in (*svc.prefill.values(), *svc.decode.values()))
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 200 and reply.headers["X-Baton-Route"] == "disaggregated"
        await svc.stop()

    run(main())


@pytest.mark.parametrize("request_type", ["context_only", "generation_only", "context_and_generation"])
def test_a_clients_disaggregated_params_are_refused_before_any_engine_sees_them(request_type):
    """disaggregated_params are the scheduler's: a client's would run a context-only request on a decode
    replica (its KV held there outside the scheduler's count, the handle returned) or pass a made-up handle."""
    async def main():
        svc, engine = make()
        for prompt in ([1, 2, 3], list(range(1, 201))):
            body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 2,
                               "disaggregated_params": {"request_type": request_type}}).encode()
            reply = await svc.complete("completions", body, {})
            err = json.loads(reply.body)["error"]
            assert reply.status == 400 and err["param"] == "disaggregated_params", err
            assert "set by the scheduler" in err["message"]
        assert engine.calls == []
        await svc.stop()

    run(main())


def test_capacity_that_frees_with_no_release_goes_to_the_waiting_request_before_a_newcomer():
    """The decode throttle lifts as slow samples age out, with no release to wake the queue: a request arriving
    then must not take the slot ahead of one that has been waiting for it (until the queue's next recheck)."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 2, decodeP95LatencyThresholdMs: 50}\n"
                           "queue: {maxWaitSeconds: 5}\n", prefill=(), decode=("d1:1",))
        started: list[str] = []
        post = engine.post

        async def recording(endpoint, path, body, request_id):
            started.append(request_id)
            return await post(endpoint, path, body, request_id)
        engine.post = recording
        svc.tpot_window.window_s, svc.tpot_window.cache_s = 0.3, 0.0
        for _ in range(20):
            svc.tpot_window.record(0.2)
        assert svc._decode_cap() == 1  # throttled: half of 2
        engine.delay = 1.0
        first = asyncio.create_task(svc.complete("completions", long_request(5), {"X-Request-Id": "first"}))
        await until(lambda: started == ["first"])
        waiting = asyncio.create_task(svc.complete("completions", long_request(5), {"X-Request-Id": "waiting"}))
        await until(lambda: svc.decode_queue.waiting == 1)
        await until(lambda: not svc.decode_throttled(), timeout=2)  # the slow samples aged out: room for two
        newcomer = asyncio.create_task(svc.complete("completions", long_request(5), {"X-Request-Id": "newcomer"}))
        await until(lambda: len(started) == 2)
        assert started == ["first", "waiting"], started
        replies = await asyncio.gather(first, waiting, newcomer)
        assert [r.status for r in replies] == [200] * 3 and started == ["first", "waiting", "newcomer"]
        await svc.stop()

    run(main())


def test_budget_exhausted_fails_explicitly():
    async def main():
        svc, engine = make("retries: {maxAttempts: 3, budgetRatio: 0}\n")
        svc.retry_budget._reserve = 0
        svc.retry_budget.reserve = 0
        engine.fail.update({"d1:1": "500", "d2:1": "500"})
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 502 and len(engine.calls) == 2
        await svc.stop()

    run(main())


def test_decode_p95_above_threshold_halves_the_per_replica_cap():
    svc, _ = make("backpressure: {maxActivePerDecodeReplica: 8, decodeP95LatencyThresholdMs: 50}\n")
    assert svc._decode_cap() == 8 and not svc.decode_throttled()
    for _ in range(20):
        svc.tpot_window.record(0.080)
    svc.tpot_window._cached = None
    assert svc.decode_throttled() and svc._decode_cap() == 4
    assert svc.snapshot()["decode_throttled"] is True


def test_prefill_token_bucket_makes_the_next_long_prompt_wait():
    async def main():
        svc, engine = make("admission: {prefillTokensPerSecond: 2000, prefillBurstTokens: 200}\n")
        waits = []

        class Hooks(SchedulerHooks):
            def queue_wait(self, route, pool, seconds):
                waits.append((pool, seconds))

        svc.hooks = Hooks()
        r1, r2 = await asyncio.gather(svc.complete("completions", long_request(200), {}),
                                      svc.complete("completions", long_request(200), {}))
        assert r1.status == r2.status == 200
        prefill_waits = sorted(s for pool, s in waits if pool == "prefill")
        # the first goes at once (the burst), the second waits for 200 tokens at 2,000/s = 0.1 s
        assert prefill_waits[0] < prefill_waits[1] / 2 and 0.05 < prefill_waits[1] < 1.0
        await svc.stop()

    run(main())


def test_rings_pair_prefill_with_its_own_decode_subset():
    async def main():
        svc, engine = make(prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1"))
        assert svc.rings == {"p1:1": ("d1:1",), "p2:1": ("d2:1",)}
        seen = set()
        for _ in range(4):
            reply = await svc.complete("completions", long_request(), {})
            seen.add((reply.headers["X-Baton-Prefill-Endpoint"], reply.headers["X-Baton-Decode-Endpoint"]))
        assert seen == {("p1:1", "d1:1"), ("p2:1", "d2:1")}
        await svc.stop()

    run(main())


def test_base_hooks_take_every_call_and_do_nothing():
    """Custom hooks subclass SchedulerHooks and override what they watch: the rest must be no-ops."""
    import inspect

    hooks = SchedulerHooks()
    called = []
    for name, method in inspect.getmembers(hooks, inspect.ismethod):
        if not name.startswith("_"):
            args = ["x" if p.annotation in ("str",) else 1 for p in inspect.signature(method).parameters.values()]
            assert method(*args) is None
            called.append(name)
    assert {"routed", "finished", "generation_finished", "heartbeat", "config_reload"} <= set(called)


# ---------------------------------------------------------------------------------------------- lifecycle
def _outcomes(svc):
    seen = []
    orig = svc.hooks.finished
    svc.hooks.finished = lambda route, outcome, s: (seen.append(outcome), orig(route, outcome, s))
    return seen


def test_a_held_handle_never_resumes_on_a_pair_known_to_be_incompatible():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", decode=("d1:1", "d2:1"))
        svc.incompatible[("p1:1", "d1:1")] = (svc.clock() + 300, KV_ERROR)
        engine.fail["d1:1"] = "kv"
        svc.decode["d2:1"].active = 1  # the only compatible decode replica is full: the handle is held
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.05)
        assert len(svc.holds) == 1 and not task.done()  # d1 was free, but not for this handle
        svc.decode["d2:1"].active = 0
        svc.decode_queue.notify()
        reply = await asyncio.wait_for(task, 2)
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
        assert ("d1:1", "generation_only") not in engine.calls
        await svc.stop()

    run(main())


def test_a_held_retry_does_not_go_back_to_the_pair_that_failed_it():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\nretries: {maxAttempts: 3}\n",
                           decode=("d1:1", "d2:1"))
        engine.fail["d1:1"] = "500"
        svc.decode["d2:1"].active = 1  # first attempt: only d1 is free, and it fails the handoff
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.05)
        assert len(svc.holds) == 1  # the retry's handle waits for d2 instead of going back to d1
        svc.decode["d2:1"].active = 0
        svc.decode_queue.notify()
        reply = await asyncio.wait_for(task, 2)
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
        assert engine.calls.count(("d1:1", "generation_only")) == 1
        await svc.stop()

    run(main())


def test_a_handle_held_for_a_prefill_whose_address_now_serves_another_engine_is_prefilled_again():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", decode=("d1:1",))
        svc.decode["d1:1"].active = 1
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.05)
        assert len(svc.holds) == 1
        # the prefill pod was replaced: same address, another pod (its KV, and the handle's, are gone)
        svc.update_endpoints([Endpoint("p1:1", "prefill", pod="prefill-0-new")], [Endpoint("d1:1", "decode")])
        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        reply = await asyncio.wait_for(task, 2)
        assert reply.status == 200
        assert [k for a, k in engine.calls if a == "p1:1"] == ["context_only", "context_only"]
        await svc.stop()

    run(main())


def test_requests_waiting_for_a_prefill_slot_are_routed_again_when_the_prefill_tier_dies():
    async def main():
        svc, engine = make("routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, prefillBatchSize: 1}\nqueue: {maxWaitSeconds: 5}\n", decode=("d1:1",))
        outcomes = _outcomes(svc)
        orig = engine.post

        async def post(ep, path, body, rid):
            if ep.address == "p1:1":
                await asyncio.sleep(0.1)
                raise EngineFailure(ep, "ConnectionResetError: the prefill pod died", kind="connection")
            return await orig(ep, path, body, rid)

        engine.post = post
        first = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.02)
        assert svc.prefill_queue.waiting == 1  # the second waits for p1's only slot
        replies = await asyncio.wait_for(asyncio.gather(first, second), 2)  # long before maxWaitSeconds
        assert [r.status for r in replies] == [200, 200]
        assert [r.headers["X-Baton-Route"] for r in replies] == ["local", "local"]
        assert outcomes == ["completed", "completed"]
        await svc.stop()

    run(main())


def test_a_retried_request_avoiding_an_idle_replica_does_not_block_the_queue_behind_it():
    async def main():
        svc, engine = make("routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, prefillBatchSize: 1}\nqueue: {maxWaitSeconds: 5}\n",
                           prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1"))
        gate = asyncio.Event()
        orig = engine.post

        async def post(ep, path, body, rid):
            if rid == "slow" and ep.address == "p1:1":
                await gate.wait()  # a long prefill holds p1
            return await orig(ep, path, body, rid)

        engine.post = post
        slow = asyncio.create_task(svc.complete("completions", long_request(), {"X-Request-Id": "slow"}))
        await asyncio.sleep(0.02)
        assert svc.prefill["p1:1"].active == 1
        ctx_a = asyncio.create_task(svc.complete("completions", long_request(), {"X-Request-Id": "a"}))
        await asyncio.sleep(0.02)  # "a" took p2; make it a retry that must avoid p2, waiting for p1
        svc.prefill["p2:1"].active = 0
        svc.prefill_queue.notify()
        await asyncio.wait_for(ctx_a, 1)
        from baton.scheduler.service import _Ctx
        avoiding = _Ctx("avoid", "completions", svc.clock())
        avoiding.excluded.add("p2:1")
        waiter = asyncio.create_task(svc._admit(  # noqa: SLF001 - a retry's admission, as _run makes it
            avoiding, svc.prefill_queue, lambda: svc._try_prefill(200, avoiding.excluded),  # noqa: SLF001
            lambda r: svc._release_prefill(r, 200), "prefill"))  # noqa: SLF001
        await asyncio.sleep(0.02)
        assert svc.prefill_queue.waiting == 1 and not waiter.done()
        behind = await asyncio.wait_for(svc.complete("completions", long_request(), {"X-Request-Id": "b"}), 1)
        assert behind.status == 200 and behind.headers["X-Baton-Prefill-Endpoint"] == "p2:1"
        gate.set()
        await asyncio.wait_for(slow, 1)
        got = await asyncio.wait_for(waiter, 1)  # p1 freed: the waiter that avoids p2 gets it
        assert got.address == "p1:1"
        svc._release_prefill(got, 200)  # noqa: SLF001
        await svc.stop()

    run(main())


def test_a_request_whose_client_leaves_gives_back_its_place_and_counts_as_cancelled():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", prefill=(), decode=("d1:1",))
        outcomes = _outcomes(svc)
        svc.decode["d1:1"].active = 1
        task = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await asyncio.sleep(0.02)
        assert svc.decode_queue.waiting == 1
        task.cancel()  # what the HTTP server does when the client disconnects
        await asyncio.gather(task, return_exceptions=True)
        assert svc.decode_queue.waiting == 0 and outcomes == ["cancelled"]
        svc.decode["d1:1"].active = 0
        engine.delay = 5
        task = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await asyncio.sleep(0.02)
        assert svc.decode["d1:1"].active == 1  # in the engine call now
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert svc.decode["d1:1"].active == 0 and outcomes == ["cancelled", "cancelled"]
        await svc.stop()

    run(main())


def test_shutdown_answers_waiting_and_held_requests_with_503_and_retry_after():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", decode=("d1:1",))
        svc.decode["d1:1"].active = 1
        held = asyncio.create_task(svc.complete("completions", long_request(), {}))
        waiting = asyncio.create_task(svc.complete("completions", long_request(50), {}))
        await asyncio.sleep(0.05)
        assert len(svc.holds) + svc.decode_queue.waiting + svc.prefill_queue.waiting == 2
        assert len(svc.holds) >= 1
        assert svc.shed_waiting() == 2
        for reply in await asyncio.wait_for(asyncio.gather(held, waiting), 1):
            assert reply.status == 503 and reply.headers["Retry-After"] == "1"
            assert json.loads(reply.body)["error"]["code"] == "shutting_down"
        assert len(svc.holds) == 0
        await svc.stop()

    run(main())


def test_after_the_shed_nothing_waits_or_starts_a_generation_it_answers_503_at_once():
    """A prefill still in flight when the drain ends finishes afterwards: it is answered 503 shutting_down
    at once, rather than held (where no shed would reach it) or started on a decode slot only to be cut."""
    async def main():
        for decode_full in (True, False):
            svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", decode=("d1:1",))
            outcomes = _outcomes(svc)
            svc.decode["d1:1"].active = 1 if decode_full else 0
            engine.delay = 0.2  # the prefill is in flight when the drain ends
            task = asyncio.create_task(svc.complete("completions", long_request(), {}))
            await asyncio.sleep(0.05)
            assert svc.shed_waiting() == 0  # nothing waits yet
            reply = await asyncio.wait_for(task, 2)
            assert reply.status == 503 and reply.headers["Retry-After"] == "1"
            assert json.loads(reply.body)["error"]["code"] == "shutting_down"
            assert len(svc.holds) == 0 and svc.decode["d1:1"].active == (1 if decode_full else 0)
            assert not [c for c in engine.calls if c[1] == "generation_only"], "a generation started after the shed"
            fresh = await asyncio.wait_for(svc.complete("completions", long_request(5), {}), 1)  # a local one
            assert fresh.status == 503 and json.loads(fresh.body)["error"]["code"] == "shutting_down"
            assert outcomes == ["failed", "failed"]
            await svc.stop()

    run(main())


async def _waiting_for_the_only_decode_replica():
    """A scheduler whose only decode replica (d1, no prefill tier) is full, and a local request waiting for it."""
    svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\nqueue: {maxWaitSeconds: 5}\n",
                       prefill=(), decode=("d1:1",))
    outcomes = _outcomes(svc)
    svc.decode["d1:1"].active = 1
    waiting = asyncio.create_task(svc.complete("completions", long_request(5), {}))
    await asyncio.sleep(0.05)
    assert svc.decode_queue.waiting == 1
    return svc, engine, outcomes, waiting


def test_a_request_waiting_for_decode_when_the_tier_goes_away_gets_503_at_once_not_a_timeout():
    """The only decode replica leaves rotation while a local request waits for it: the waiter gets what a
    new request gets (503 no_decode_endpoints) now, not a 429 queue_timeout once maxWaitSeconds ran out."""
    async def main():
        svc, _, outcomes, waiting = await _waiting_for_the_only_decode_replica()
        svc._engine_failed(EngineFailure(svc.decode["d1:1"].endpoint, "reset", kind="connection"), svc.decode["d1:1"])
        reply = await asyncio.wait_for(waiting, 1)
        assert reply.status == 503 and json.loads(reply.body)["error"]["code"] == "no_decode_endpoints"
        fresh = await svc.complete("completions", long_request(5), {})
        assert fresh.status == 503 and json.loads(fresh.body)["error"]["code"] == "no_decode_endpoints"
        assert outcomes == ["failed", "failed"] and svc.decode_queue.waiting == 0
        assert reply.headers["Retry-After"] == fresh.headers["Retry-After"] == "5"  # a client backs off
        await svc.stop()

    run(main())


def test_requests_arriving_between_a_departure_and_its_replacement_in_the_endpoint_lists_are_served():
    """A rolling update publishes the last old decode pod's departure and its replacement in two endpoint
    updates (a slice per port, say). Requests arriving in between, local and disaggregated alike, and one
    already waiting for a decode slot, are served by the replacement instead of getting 503 at once."""
    async def main():
        svc, _, outcomes, waiting = await _waiting_for_the_only_decode_replica()
        waits = []
        orig_wait = svc.hooks.queue_wait
        svc.hooks.queue_wait = lambda route, pool, s: (waits.append((route, pool)), orig_wait(route, pool, s))
        svc.update_endpoints([], [])  # d1 leaves the lists ...
        local = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        disagg = asyncio.create_task(svc.complete("completions", long_request(200), {}))
        await asyncio.sleep(0.2)
        assert not (waiting.done() or local.done() or disagg.done())
        assert svc.ready() == (False, "no healthy decode endpoint")
        svc.update_endpoints([Endpoint("p1:1", "prefill")], [Endpoint("d9:1", "decode")])  # ... replacements arrive
        replies = await asyncio.wait_for(asyncio.gather(waiting, local, disagg), 2)
        assert [r.status for r in replies] == [200, 200, 200]
        assert {r.headers["X-Baton-Decode-Endpoint"] for r in replies} == {"d9:1"}
        # routed once the lists settled, with both tiers in view: the long prompt goes to the prefill tier
        assert [r.headers["X-Baton-Route"] for r in replies] == ["local", "local", "disaggregated"]
        # each wait for the replacement is recorded as a wait for decode under the route the request took
        assert ("local", "decode") in waits and ("disaggregated", "decode") in waits
        assert not [w for w in waits if w[0] == "unrouted"]
        # a prefill tier that stays while decode is replaced: a long prompt waits, then goes disaggregated
        svc.update_endpoints([Endpoint("p1:1", "prefill")], [])
        disagg = asyncio.create_task(svc.complete("completions", long_request(200), {}))
        await asyncio.sleep(0.2)
        assert not disagg.done()
        svc.update_endpoints([Endpoint("p1:1", "prefill")], [Endpoint("d8:1", "decode")])
        reply = await asyncio.wait_for(disagg, 2)
        assert reply.status == 200 and reply.headers["X-Baton-Route"] == "disaggregated"
        assert reply.headers["X-Baton-Decode-Endpoint"] == "d8:1"
        assert outcomes.count("failed") == 0
        await svc.stop()

    run(main())


def test_requests_waiting_out_a_settle_window_count_against_the_queue_limit():
    """Waiting for a replacement decode replica is waiting: such requests count in the backlog that
    `queue.maxDepth` bounds, and one beyond it gets 429 queue_full at once, not a place in the wait."""
    async def main():
        svc, _ = make("queue: {maxDepth: 2}\n", prefill=(), decode=("d1:1",))
        svc.update_endpoints([], [])
        first = [asyncio.create_task(svc.complete("completions", long_request(5), {})) for _ in range(2)]
        await asyncio.sleep(0.1)
        over = await svc.complete("completions", long_request(5), {})
        assert over.status == 429 and json.loads(over.body)["error"]["code"] == "queue_full"
        svc.update_endpoints([], [Endpoint("d9:1", "decode")])
        replies = await asyncio.wait_for(asyncio.gather(*first), 2)
        assert [r.status for r in replies] == [200, 200]
        assert svc._decode_settle_until == 0.0 and svc._decode_settle_timer is None  # noqa: SLF001 - window over
        await svc.stop()

    run(main())


def test_a_decode_tier_the_endpoint_lists_emptied_for_good_gets_503_once_the_settle_window_passes(monkeypatch):
    from baton.scheduler import service

    monkeypatch.setattr(service, "DECODE_SETTLE_S", 0.3)

    async def main():
        svc, _, _, waiting = await _waiting_for_the_only_decode_replica()
        t0 = time.monotonic()
        svc.update_endpoints([], [])
        fresh = await svc.complete("completions", long_request(200), {})
        reply = await asyncio.wait_for(waiting, 2)
        waited = time.monotonic() - t0
        assert fresh.status == 503 and json.loads(fresh.body)["error"]["code"] == "no_decode_endpoints"
        assert reply.status == 503 and json.loads(reply.body)["error"]["code"] == "no_decode_endpoints"
        assert 0.25 <= waited < 1.5  # the window, not queue.maxWaitSeconds
        later = await svc.complete("completions", long_request(5), {})  # after the window: at once
        assert later.status == 503 and json.loads(later.body)["error"]["code"] == "no_decode_endpoints"
        assert time.monotonic() - t0 - waited < 0.2
        await svc.stop()

    run(main())


def test_a_request_id_that_is_not_a_plain_token_is_replaced():
    async def main():
        svc, _ = make(prefill=(), decode=("d1:1",))
        reply = await svc.complete("completions", long_request(5), {"X-Request-Id": "trace-1a2b:3/4=+_."})
        assert reply.headers["X-Request-Id"] == "trace-1a2b:3/4=+_."
        for bad in ("abc\nSet-Cookie: x=1", "a b", "x" * 129, "é"):
            reply = await svc.complete("completions", long_request(5), {"X-Request-Id": bad})
            rid = reply.headers["X-Request-Id"]
            assert rid != bad and len(rid) == 32 and rid.isalnum()
        await svc.stop()

    run(main())


def test_a_stream_the_prefill_finished_carries_usage_when_asked():
    async def main():
        svc, engine = make(decode=("d1:1",))
        orig = engine.post

        async def post(ep, path, body, rid):
            status, data, ctype = await orig(ep, path, body, rid)
            answer = json.loads(data)
            if "prompt_token_ids" in answer:  # the context phase ended the request (EOS on the first token)
                answer["choices"][0]["finish_reason"] = "stop"
                answer["usage"] = {"prompt_tokens": 200, "completion_tokens": 1, "total_tokens": 201}
            return status, json.dumps(answer).encode(), ctype

        engine.post = post
        for api, body in (("completions", {"model": "m", "prompt": list(range(1, 201))}),
                          ("chat", {"model": "m", "messages": [{"role": "user", "content": "x " * 400}]})):
            # trtllm-serve's StreamOptions.include_usage defaults to true: {} asks for the usage chunk too
            for options, include in (({"include_usage": True}, True), ({"include_usage": False}, False),
                                     ({}, True)):
                req = {**body, "max_tokens": 2, "stream": True, "stream_options": options}
                reply = await svc.complete(api, json.dumps(req).encode(), {})
                events = [e async for e in reply.chunks]
                text = b"".join(events).decode()
                chunks = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
                assert text.endswith("data: [DONE]\n\n")
                usage = [c for c in chunks if c.get("usage")]
                if include:
                    assert len(usage) == 1 and usage[0]["choices"] == [] and chunks[-1] is usage[0]
                    assert usage[0]["usage"]["total_tokens"] >= usage[0]["usage"]["prompt_tokens"] > 0
                else:
                    assert usage == []
        # each of those streams had its time to first token recorded, as every other stream has
        exposition = svc.metrics.exposition().decode()
        assert 'baton_scheduler_time_to_first_token_seconds_count{route="disaggregated"} 6.0' in exposition
        await svc.stop()

    run(main())


def test_a_request_that_times_out_in_the_queue_has_its_wait_recorded(caplog):
    """The worst waits are the ones that end in a 429 queue_timeout: they reach the queue-wait histogram and
    the request's log line like every other wait."""
    async def main():
        caplog.set_level(logging.INFO, logger="baton.scheduler")
        svc, _ = make("backpressure: {maxActivePerDecodeReplica: 1}\nqueue: {maxWaitSeconds: 0.2}\n",
                      prefill=(), decode=("d1:1",))
        svc.decode["d1:1"].active = 1  # the only decode slot is taken
        reply = await svc.complete("completions", long_request(5), {"X-Request-Id": "waited-1"})
        assert reply.status == 429 and json.loads(reply.body)["error"]["code"] == "queue_timeout"
        exposition = svc.metrics.exposition().decode()
        count = re.search(r'baton_scheduler_queue_wait_seconds_count\{pool="decode",route="local"\} (\S+)', exposition)
        total = re.search(r'baton_scheduler_queue_wait_seconds_sum\{pool="decode",route="local"\} (\S+)', exposition)
        assert count and float(count.group(1)) == 1.0 and total and float(total.group(1)) >= 0.2
        (line,) = [r.getMessage() for r in caplog.records if "request_id=waited-1" in r.getMessage()]
        queue_ms = float(re.search(r"queue_ms=(\S+)", line).group(1))
        assert queue_ms >= 200, line
        await svc.stop()

    run(main())


def test_a_reload_warns_about_a_restart_only_for_the_listen_address(caplog):
    """Everything else applies in place (the engine client, hold store and tokenizer: test_scheduler_reload)."""
    import logging

    async def main():
        svc, engine = make(prefill=(), decode=("d1:1",))
        base = "model: m\nrouting: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n"
        with caplog.at_level(logging.WARNING, logger="baton.scheduler"):
            svc.apply_config(parse_config(base + "server: {streamFlushIntervalMs: 0}\n"))  # applies at once
            assert "config_needs_restart" not in caplog.text
            assert svc.config.server.stream_flush_interval_ms == 0
            svc.apply_config(parse_config(base + "engineTimeoutSeconds: 30\n"))
            assert "config_needs_restart" not in caplog.text
            assert svc.engine is not engine and svc.engine.http.read_timeout == 30  # a new client, in place
            svc.apply_config(parse_config(base + "engineTimeoutSeconds: 30\nserver: {port: 9999}\n"))
            assert "config_needs_restart field=server" in caplog.text
        await svc.stop()

    run(main())


def test_overhead_is_the_schedulers_own_time_not_a_failed_attempts_or_an_expired_holds():
    def observe(svc):
        seen, waits = [], []
        orig_dispatched, orig_wait = svc.hooks.dispatched, svc.hooks.queue_wait
        svc.hooks.dispatched = lambda route, s: (seen.append(s), orig_dispatched(route, s))
        svc.hooks.queue_wait = lambda route, pool, s: (waits.append((pool, s)), orig_wait(route, pool, s))
        return seen, waits

    async def retried():
        svc, engine = make("retries: {maxAttempts: 3}\n")
        seen, _ = observe(svc)
        engine.fail["d1:1"] = "500"
        engine.delay = 0.2  # every engine call takes 200 ms; the first generation fails
        assert (await svc.complete("completions", long_request(), {})).status == 200
        assert len(seen) == 2 and max(seen) < 0.1, seen  # not the failed attempt's 400 ms of engine calls
        await svc.stop()

    async def reprefilled():
        svc, _ = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 0.3}\n",
                      decode=("d1:1",))
        seen, waits = observe(svc)
        svc.decode["d1:1"].active = 1
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.45)  # the hold expired; the request was prefilled again and is held again
        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        assert (await asyncio.wait_for(task, 3)).status == 200
        assert len(seen) == 2 and max(seen) < 0.1, seen  # the expired hold is a wait, not overhead
        holds = [s for pool, s in waits if pool == "hold"]
        assert len(holds) == 2 and holds[0] >= 0.25, holds  # the expired hold's wait is recorded too
        await svc.stop()

    run(retried())
    run(reprefilled())


def test_requests_sharing_a_client_request_id_are_held_apart():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", decode=("d1:1",))
        engine.delay = 0.1
        svc.decode["d1:1"].active = 1  # decode full: both finished prefills are held
        headers = {"X-Request-Id": "same-id"}
        first = asyncio.create_task(svc.complete("completions", long_request(), headers))
        second = asyncio.create_task(svc.complete("completions", long_request(150), headers))
        await asyncio.sleep(0.15)
        assert len(svc.holds) == 2  # a record each, not the second written over the first
        assert svc.snapshot()["holds"] == 2
        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        await asyncio.sleep(0.05)  # one resumed and is generating; the other is still held
        assert len(svc.holds) == 1 and svc.decode["d1:1"].active == 1
        replies = await asyncio.wait_for(asyncio.gather(first, second), 2)
        assert [r.status for r in replies] == [200, 200]
        assert [r.headers["X-Request-Id"] for r in replies] == ["same-id", "same-id"]
        assert len(svc.holds) == 0
        await svc.stop()

    run(main())


def test_a_client_that_stops_reading_its_stream_gives_its_decode_slot_back(monkeypatch):
    """The client keeps its socket open but reads nothing: the relay pauses the engine, and the HTTP
    server's send timeout ends the stream, so the decode slot comes back (counted cancelled: the client
    left its request) instead of staying taken for as long as the socket stays open."""
    import socket

    from baton.http1 import server as http_server
    from baton.scheduler.server import build_server

    monkeypatch.setattr(http_server, "SEND_TIMEOUT_S", 0.3)
    monkeypatch.setattr(http_server, "SWEEP_INTERVAL_S", 0.03)

    async def engine(reader, writer):  # streams far more than the sockets between hold, then hangs
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        event = b"data: " + json.dumps({"choices": [{"text": "x" * 4000}]}).encode() + b"\n\n"
        try:
            for _ in range(5000):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            await asyncio.sleep(30)
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def main():
        eng = await asyncio.start_server(engine, "127.0.0.1", 0)
        address = f"127.0.0.1:{eng.sockets[0].getsockname()[1]}"
        svc = SchedulerService(parse_config(f"model: m\nendpoints: {{static: {{decode: ['{address}']}}}}\n"))
        outcomes = _outcomes(svc)
        await svc.start()
        server = build_server(svc)
        await server.start("127.0.0.1", 0)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", server.port))
        body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 5000, "stream": True}).encode()
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        replica = svc.decode[address]
        await until(lambda: replica.active == 1, 1.0, "the stream to take the decode slot")
        # within a few send timeouts, with the client's socket still open
        await until(lambda: replica.active == 0, 3.0, "the stalled stream to give the slot back")
        assert outcomes == ["cancelled"]
        client.close()
        await server.stop(0.1)
        await svc.stop()
        eng.close()

    run(main())


def test_completion_requests_the_http_layer_refuses_are_counted_too(monkeypatch, caplog):
    """A completion request answered by the HTTP layer itself (too large, wrong method) still ends with one
    outcome in requests_total (`invalid`, route unrouted); a request for another path or one whose request
    line cannot be read is not a completion request and is not counted. Every such answer carries a request
    id, the client's own when it sent a valid one, and the request's log line has the documented fields."""
    import socket

    from baton.scheduler import server as scheduler_server

    monkeypatch.setattr(scheduler_server, "MAX_BODY_BYTES", 100)

    def exchange(port: int, raw: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(raw)
            return sock.recv(65536)

    async def main():
        caplog.set_level(logging.INFO, logger="baton.scheduler")
        svc, _ = make(prefill=(), decode=("d1:1",))
        outcomes = _outcomes(svc)
        server = scheduler_server.build_server(svc)
        await server.start("127.0.0.1", 0)
        big = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        answers = [await asyncio.to_thread(exchange, server.port, raw) for raw in (
            big, b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: mine-1\r\n\r\n",
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", b"NONSENSE\r\n\r\n")]
        assert [a.split(b" ", 2)[1] for a in answers] == [b"413", b"405", b"404", b"400"]
        ids = [re.search(rb"\r\nX-Request-Id: ([^\r]+)\r\n", a) for a in answers]
        assert all(ids) and ids[1].group(1) == b"mine-1" and len({m.group(1) for m in ids}) == 4
        assert outcomes == ["invalid", "invalid"]
        (line,) = [r.getMessage() for r in caplog.records if "request_id=mine-1" in r.getMessage()]
        for field in ("event=request_done", "api=chat", "route=unrouted", "outcome=invalid", "status=405",
                      "latency_ms=", "error='answered by the HTTP layer'"):
            assert field in line, line
        exposition = svc.metrics.exposition().decode()
        assert 'baton_scheduler_requests_total{outcome="invalid",route="unrouted"} 2.0' in exposition
        await server.stop(0.1)
        await svc.stop()

    run(main())


def test_a_hold_stranded_twice_fails_with_a_message_that_says_so_not_a_ttl_expiry():
    """The prefill pod holding the KV is replaced (another engine answers at its address) while the request
    is held: it is prefilled again once; if that happens again, the request fails 503 hold_stranded with
    the reason, long before the hold TTL, not 'hold_expired ... decode tier saturated'."""
    async def main():
        svc, _ = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 30}\n",
                      prefill=("p1:1",), decode=("d1:1",))
        events: list[str] = []
        counted = svc.hooks.hold
        svc.hooks.hold = lambda event: (events.append(event), counted(event))
        svc.decode["d1:1"].active = 1  # decode full: every finished prefill is held
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        for held in (1, 2):
            await until(lambda: events.count("held") == held, 1.0, f"hold number {held}")
            assert len(svc.holds) == 1
            pod = f"pod-{held}"
            svc.update_endpoints([Endpoint("p1:1", "prefill", pod=pod)], [Endpoint("d1:1", "decode")])
            svc.decode["d1:1"].active = 1
            svc.decode_queue.notify()
        reply = await asyncio.wait_for(task, 2)
        error = json.loads(reply.body)["error"]
        assert reply.status == 503 and error["code"] == "hold_stranded" and "p1:1" in error["message"]
        assert "holdTtlSeconds" not in error["message"]
        assert events == ["held", "stranded", "reprefilled", "held", "stranded"]
        await svc.stop()

    run(main())


HOLD_CONFIG = ("routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n"
               "backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: %s}\n")


@pytest.mark.parametrize(("before", "after"), [(30.0, 0.2), (0.3, 30.0)])
def test_a_reload_that_shortens_the_hold_ttl_ends_the_holds_already_waiting_by_it(before, after):
    """Lowered, the new TTL applies to the holds already waiting, counted from when each was held (their
    request is prefilled again once, held again, and fails 503 when that hold ends too). Raised, it applies
    to new holds only: the waiting one ends when it would have."""
    async def main():
        svc, _ = make(HOLD_CONFIG % before, prefill=("p1:1",), decode=("d1:1",))
        events: list[str] = []
        counted = svc.hooks.hold
        svc.hooks.hold = lambda event: (events.append(event), counted(event))
        svc.decode["d1:1"].active = 1  # decode full: every finished prefill is held
        start = time.monotonic()
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: events.count("held") == 1, 1.0, "the hold")
        svc.apply_config(parse_config("model: m\n" + HOLD_CONFIG % after))
        # the store's record (what redis publishes) ends by the new TTL too, if that is sooner
        assert [hold.expires - hold.created for hold in svc.holds.held()] == [pytest.approx(min(before, after))]
        await until(lambda: "expired" in events, 1.0, "the first hold to end by the shorter TTL")
        assert time.monotonic() - start < 1.0 and events[:2] == ["held", "expired"]
        if after < before:
            reply = await asyncio.wait_for(task, 1.0)  # held again under the new TTL, which ends too
            error = json.loads(reply.body)["error"]
            assert reply.status == 503 and error["code"] == "hold_expired"
            assert "holdTtlSeconds=0.2s" in error["message"]
            assert events == ["held", "expired", "reprefilled", "held", "expired"]
        else:
            await until(lambda: events.count("held") == 2, 1.0, "the second hold, under the longer TTL")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert len(svc.holds) == 0 and not svc._hold_limits
        await svc.stop()

    run(main())


def test_a_request_waiting_while_decode_is_throttled_is_served_once_the_throttle_lifts():
    """The throttle (decode p95 over its threshold halves the per-replica cap) lifts as slow samples age
    out of the window, which no release announces: a request waiting for a decode slot is served then, not
    left to time out while the restored cap has room."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 2, decodeP95LatencyThresholdMs: 50}\n"
                           "queue: {maxWaitSeconds: 2}\n", prefill=(), decode=("d1:1",))
        svc.tpot_window.window_s = 0.5  # the 30 s window, shortened
        svc.tpot_window.cache_s = 0.0
        for _ in range(20):
            svc.tpot_window.record(0.2)  # p95 200 ms > 50 ms: the cap of 2 is halved
        assert svc._decode_cap() == 1
        engine.delay = 3.0  # the first request holds its slot for 3 s
        first = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        second = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        while svc.decode["d1:1"].active < 2 and time.monotonic() - started < 2.5:
            await asyncio.sleep(0.01)
        assert svc.decode["d1:1"].active == 2 and time.monotonic() - started < 1.5  # as the window emptied
        assert [r.status for r in await asyncio.gather(first, second)] == [200, 200]
        await svc.stop()

    run(main())


def test_a_reload_that_shortens_the_heartbeat_applies_at_once():
    async def main():
        svc, engine = make("heartbeatSeconds: 3600\n", prefill=(), decode=("d1:1",))
        await svc.start()
        engine.fail["d1:1"] = "connect"
        await svc.heartbeat_once()
        assert not svc.decode["d1:1"].healthy
        engine.fail.clear()  # the replica is back; only a heartbeat can tell
        svc.apply_config(parse_config("model: m\nheartbeatSeconds: 0.1\n"))
        await until(lambda: svc.decode["d1:1"].healthy, 2.0, "a heartbeat at the new period (not the old 3600 s)")
        await svc.stop()

    run(main())


def test_a_request_routed_again_is_counted_under_each_decision():
    """The prefill replica refuses the connection: the retry decides again and, with no prefill replica
    left, falls back to the local route; the routing counts show where the prompt went, not only the first
    decision."""
    async def main():
        svc, engine = make(prefill=("p1:1",), decode=("d1:1",))
        engine.fail["p1:1"] = "connect"
        reply = await svc.complete("completions", long_request(500), {})
        assert reply.status == 200 and reply.headers["X-Baton-Route"] == "local"
        text = svc.metrics.exposition().decode()
        decisions = sorted(line for line in text.splitlines()
                           if line.startswith("baton_scheduler_routing_decisions_total{"))
        assert decisions == [
            'baton_scheduler_routing_decisions_total{reason="long-prompt",route="disaggregated"} 1.0',
            'baton_scheduler_routing_decisions_total{reason="no-prefill-pair",route="local"} 1.0',
        ], decisions
        assert 'baton_scheduler_prompt_tokens_total{route="local"} 500.0' in text
        await svc.stop()

    run(main())


def test_a_high_precision_request_waiting_when_compression_comes_on_is_served_uncompressed():
    """Routed disaggregated while kvTransferCompression was none, it waits for the only prefill slot; a
    reload turns fp8 on: it then takes the local route, never a compressed KV transfer."""
    async def main():
        routing = ("routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, prefillBatchSize: 1, "
                   "maxConcurrentPrefills: 1%s}\nadmission: {prefillTokensPerSecond: 1, prefillBurstTokens: 1000}\n")
        svc, engine = make(routing % "", decode=("d1:1",))
        engine.delay = 0.3
        first = asyncio.create_task(svc.complete("completions", long_request(500), {}))
        await asyncio.sleep(0.05)
        precise = asyncio.create_task(svc.complete("completions", long_request(500), {"X-Baton-High-Precision": "true"}))
        await asyncio.sleep(0.05)
        assert svc.prefill_queue.waiting == 1
        svc.apply_config(parse_config("model: m\n" + routing % ", kvTransferCompression: fp8"))
        reply = await asyncio.wait_for(precise, 3)
        assert reply.status == 200 and reply.headers["X-Baton-Route"] == "local"
        assert "X-Baton-Prefill-Endpoint" not in reply.headers
        assert (await first).headers["X-Baton-Route"] == "disaggregated"
        # only the first request's prompt was prefilled on the tier: the other's tokens came back
        assert 500 <= svc.prefill_bucket.available() < 510
        await svc.stop()

    run(main())


def test_the_engine_simulators_mpi_refusal_is_a_pair_that_cannot_hand_off_not_a_replica_fault():
    from baton.scheduler.endpoints import Endpoint as Ep
    from baton.scheduler.engines import classify_failure

    body = json.dumps({"object": "error", "message": (
        "KV cache transfer over MPI needs the context and generation executors in one MPI world, launched "
        "together; the context server at 127.0.0.1:9 was started on its own: set "
        "cache_transceiver_config.backend to UCX or NIXL")}).encode()
    failure = classify_failure(Ep("d1:1", "decode"), 500, body)
    assert failure is not None and failure.kind == "kv_mismatch"


def test_a_refused_request_names_the_field_at_fault():
    """OpenAI's error body has `param`: the scheduler's own 400s fill it in, as openai-python shows it."""
    async def main():
        svc, _ = make(prefill=(), decode=("d1:1",))
        for api, body, param in (("completions", {"model": "m", "max_tokens": 2}, "prompt"),
                                 ("chat", {"model": "m", "messages": "hi"}, "messages"),
                                 ("completions", {"model": "other", "prompt": "hi"}, "model")):
            reply = await svc.complete(api, json.dumps(body).encode(), {})
            error = json.loads(reply.body)["error"]
            assert reply.status in (400, 404) and error["param"] == param, error
        await svc.stop()

    run(main())



def test_a_handle_whose_kv_the_prefill_freed_is_prefilled_again_and_the_decode_replica_stays_healthy():
    """The context worker freed the KV at its kv_transfer_timeout_ms before the decode pulled it: that says
    nothing of the decode replica, which stays in rotation (three such answers used to take it out); the
    request is prefilled again and served."""
    async def main():
        svc, engine = make(decode=("d1:1",))
        retried = []
        orig = svc.hooks.retried
        svc.hooks.retried = lambda route, kind: (retried.append(kind), orig(route, kind))
        for _ in range(3):
            engine.fail["d1:1"] = "kv_gone"
            reply = await svc.complete("completions", long_request(), {})
            assert reply.status == 200, reply.body
        assert retried == ["kv_lost"] * 3
        # with the retry budget spent (its reserve is 3), the client is told what happened, as a 503
        engine.fail["d1:1"] = "kv_gone"
        reply = await svc.complete("completions", long_request(), {})
        error = json.loads(reply.body)["error"]
        assert reply.status == 503 and error["code"] == "kv_cache_lost" and "freed" in error["message"]
        assert int(reply.headers["Retry-After"]) >= 1  # it asks the client to retry: when, as every 503 says
        assert svc.decode["d1:1"].healthy and svc.decode["d1:1"].failures == 0 and svc.ready() == (True, "ok")
        await svc.stop()

    run(main())


def test_a_hold_whose_prefill_replica_leaves_is_stranded_and_prefilled_again_not_resumed_elsewhere():
    """The prefill replica holding a handle's KV leaves the endpoint lists (scaled away, no longer ready):
    the KV went with it, so the hold ends as stranded and the request is prefilled again on a replica
    that is there, instead of resuming on another ring with a handle nobody can serve."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n"
                           "routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, prefillBatchSize: 1}\n",
                           prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1"))
        events = []
        orig = svc.hooks.hold
        svc.hooks.hold = lambda e: (events.append(e), orig(e))
        svc.prefill["p2:1"].active = 1  # p2 busy: the request is prefilled on p1
        svc.decode["d1:1"].active = svc.decode["d2:1"].active = 1  # every decode slot taken
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1)
        svc.prefill["p2:1"].active = 0
        svc.update_endpoints([Endpoint("p2:1", "prefill")], [Endpoint("d1:1", "decode"), Endpoint("d2:1", "decode")])
        svc.decode["d2:1"].active = 0
        svc.decode_queue.notify()
        reply = await asyncio.wait_for(task, 2)
        assert reply.status == 200 and reply.headers["X-Baton-Prefill-Endpoint"] == "p2:1"
        assert events == ["held", "stranded", "reprefilled"]
        assert [call for call in engine.calls if call[1] == "generation_only"] == [("d2:1", "generation_only")]
        await svc.stop()

    run(main())


def test_every_hold_ends_with_one_event():
    """hold_events_total balances: a hold the client leaves ends as cancelled, one shed at shutdown as shed."""
    async def main():
        svc, _ = make("backpressure: {maxActivePerDecodeReplica: 1}\n", decode=("d1:1",))
        events = []
        orig = svc.hooks.hold
        svc.hooks.hold = lambda e: (events.append(e), orig(e))
        svc.decode["d1:1"].active = 1
        left = asyncio.create_task(svc.complete("completions", long_request(), {}))
        shed = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 2)
        left.cancel()
        await until(lambda: len(svc.holds) == 1)
        svc.shed_waiting()
        reply = await asyncio.wait_for(shed, 2)
        assert reply.status == 503 and reply.headers["X-Baton-Error"] == "shutting_down"
        assert sorted(events) == ["cancelled", "held", "held", "shed"]
        await svc.stop()

    run(main())


# ---------------------------------------------------------------------------------------------- endings
class _Discovery:
    """Stands in for endpoint discovery following a rollout: the generation requests are dispatched to."""

    generation = "g1"

    def stop(self) -> None:
        pass


def _generation_outcomes(svc) -> dict[str, float]:
    """generation_requests_total{generation="g1"} by outcome, from the exposition."""
    out: dict[str, float] = {}
    for line in svc.metrics.exposition().decode().splitlines():
        if line.startswith('baton_scheduler_generation_requests_total{generation="g1"'):
            outcome = re.search(r'outcome="([^"]+)"', line).group(1)
            out[outcome] = float(line.rpartition(" ")[2])
    return out


class StreamingEngine(FakeEngine):
    """FakeEngine whose streamed generations yield `pieces()`'s chunks (an `IteratedResponse`, as Triton's)."""

    def __init__(self, pieces) -> None:
        super().__init__()
        self.pieces = pieces

    async def open(self, endpoint, path, body, request_id):
        self.calls.append((endpoint.address, "stream"))
        return IteratedResponse(200, self.pieces(), "text/event-stream")


class StreamSink:
    """The client's side of a relayed stream."""

    def __init__(self) -> None:
        self.data = b""
        self.ended = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.data += data

    def end(self, data: bytes = b"") -> None:
        self.data += data
        self.ended.set()


def _stream_request(n=5):
    return json.dumps({"model": "m", "prompt": list(range(1, n + 1)), "max_tokens": 2, "stream": True}).encode()


def test_a_request_in_an_engine_call_when_the_drain_runs_out_is_answered_503_not_cut_off():
    """The HTTP server cancels the handlers still running when the drain (and the second after it) ran out,
    with STOPPING: a request then in an engine call -- its prefill, a generation not streamed -- is answered
    503 shutting_down with Retry-After (another scheduler replica can take it) and counted failed, and what
    it held is given back. A client that leaves is still counted cancelled."""
    async def main():
        for body, engine_call in ((long_request(), "context_only"), (long_request(5), "context_and_generation")):
            svc, engine = make()
            outcomes = _outcomes(svc)
            engine.delay = 5
            task = asyncio.create_task(svc.complete("completions", body, {}))
            await until(lambda: engine.calls, what="the engine call")
            assert engine.calls[0][1] == engine_call
            task.cancel(STOPPING)
            reply = await asyncio.wait_for(task, 1)
            assert reply.status == 503 and reply.headers["Retry-After"] == "1", reply
            assert json.loads(reply.body)["error"]["code"] == "shutting_down"
            assert reply.headers["X-Baton-Error"] == "shutting_down"
            assert outcomes == ["failed"]
            assert svc.prefills_in_flight == 0 and all(r.active == 0 for r in [*svc.prefill.values(),
                                                                                *svc.decode.values()])
            left = asyncio.create_task(svc.complete("completions", body, {}))
            await until(lambda: len(engine.calls) == 2, what="the second engine call")
            left.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await left
            assert outcomes == ["failed", "cancelled"]
            await svc.stop()

    run(main())


def test_the_generation_metric_counts_only_its_engines_failures():
    """generation_requests_total, which the operator rolls a new generation back on, counts `failed` only
    what its engines did (an engine error here); what the scheduler decided itself -- a hold that expired
    with decode saturated, shutting down (waiting, in an engine call, or a stream cut) -- counts `shed`.
    requests_total counts them all `failed`, as the client sees them."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 0.05}\n"
                           "retries: {maxAttempts: 1}\n", decode=("d1:1",))
        svc._discovery = _Discovery()
        outcomes = _outcomes(svc)
        svc.decode["d1:1"].active = 1  # decode saturated: held, prefilled again, held again, expired
        reply = await asyncio.wait_for(svc.complete("completions", long_request(), {}), 2)
        assert reply.status == 503 and json.loads(reply.body)["error"]["code"] == "hold_expired"
        assert 1 <= int(reply.headers["Retry-After"]) <= 30  # as for a 429: backlog over completion rate
        svc.decode["d1:1"].active = 0
        engine.fail["d1:1"] = "500"
        reply = await asyncio.wait_for(svc.complete("completions", long_request(), {}), 2)
        assert reply.status == 502 and json.loads(reply.body)["error"]["code"] == "engine_error"
        assert outcomes == ["failed", "failed"]
        assert _generation_outcomes(svc) == {"shed": 1.0, "failed": 1.0}
        engine.fail.clear()
        engine.delay = 5
        in_call = asyncio.create_task(svc.complete("completions", long_request(5), {}))  # local, in its call
        await until(lambda: engine.calls[-1] == ("d1:1", "context_and_generation"), what="the local call")
        engine.delay = 0  # read by each call as it starts: the local one sleeps on, holding the decode slot
        held = asyncio.create_task(svc.complete("completions", long_request(), {}))  # decode saturated: held
        await until(lambda: len(svc.holds) == 1, what="the hold")
        svc.shed_waiting()
        assert (await asyncio.wait_for(held, 1)).status == 503
        in_call.cancel(STOPPING)
        assert (await asyncio.wait_for(in_call, 1)).status == 503
        assert outcomes == ["failed"] * 4
        assert _generation_outcomes(svc) == {"shed": 3.0, "failed": 1.0}
        await svc.stop()

    run(main())


def test_a_stream_cut_at_shutdown_is_shed_for_its_generation_and_one_that_breaks_is_failed():
    gate = asyncio.Event()

    async def pieces():
        yield b'data: {"choices": [{"text": "a"}]}\n\n'
        await gate.wait()
        raise RuntimeError("the stream broke")

    async def main():
        svc, _ = make(decode=("d1:1",))
        svc._engine_slot.client = svc._engines("trtllm", 1.0, StreamingEngine(pieces))
        svc._discovery = _Discovery()
        for ending in ("cut", "broken"):
            reply = await svc.complete("completions", _stream_request(), {})
            sink = StreamSink()
            reply.producer.start(sink)
            if ending == "cut":
                reply.producer.cut()
            else:
                gate.set()
            await asyncio.wait_for(sink.ended.wait(), 1)
        assert _generation_outcomes(svc) == {"shed": 1.0, "failed": 1.0}
        await svc.stop()

    run(main())


def test_a_stream_whose_engine_iterator_fails_ends_with_an_error_and_gives_its_slot_back():
    """A Triton stream (an `IteratedResponse`) whose iterator raises something other than a transport error
    (an answer that cannot be translated, a bug) still ends the client's stream with an explicit error event,
    counts failed and frees the decode slot, rather than leaving the stream open with nothing coming. It is
    not a lost connection: the replica stays in rotation (the failure counts as a 5xx does)."""
    async def pieces():
        yield b'data: {"choices": [{"text": "a"}]}\n\n'
        raise KeyError("output_ids")

    async def main():
        svc, _ = make(decode=("d1:1",))
        svc._engine_slot.client = svc._engines("trtllm", 1.0, StreamingEngine(pieces))
        outcomes = _outcomes(svc)
        reply = await svc.complete("completions", _stream_request(), {})
        sink = StreamSink()
        reply.producer.start(sink)
        await asyncio.wait_for(sink.ended.wait(), 1)
        error = json.loads(sink.data.strip().splitlines()[-1][len(b"data: "):])["error"]
        assert error["code"] == "stream_interrupted" and "KeyError" in error["message"]
        assert b"[DONE]" not in sink.data
        assert outcomes == ["failed"] and svc.decode["d1:1"].active == 0
        assert svc.decode["d1:1"].healthy and svc.decode["d1:1"].failures == 1
        await svc.stop()

    run(main())


def test_a_request_routed_locally_after_its_hold_names_no_prefill_replica_and_avoids_a_failing_decode_one():
    """The prefill replica of a held request leaves; prefilled again, the request finds no prefill tier and
    is served locally. It carries no X-Baton-Prefill-Endpoint then, and a 5xx from its decode replica is
    that replica's failure (the retry avoids it), not a failed handoff of a pair it never used."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", decode=("d1:1", "d2:1"))
        svc.decode["d1:1"].active = svc.decode["d2:1"].active = 1  # decode saturated: the prefill is held
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1, what="the hold")
        svc.update_endpoints([], [Endpoint("d1:1", "decode"), Endpoint("d2:1", "decode")])  # the prefill left
        await until(lambda: svc.decode_queue.waiting == 1, what="the local request to wait for decode")
        engine.fail["d1:1"] = "500"
        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        await until(lambda: ("d1:1", "context_and_generation") in engine.calls, what="the local call on d1")
        svc.decode["d2:1"].active = 0
        svc.decode_queue.notify()
        reply = await asyncio.wait_for(task, 2)
        assert reply.status == 200, reply
        assert reply.headers["X-Baton-Route"] == "local" and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
        assert "X-Baton-Prefill-Endpoint" not in reply.headers
        assert engine.calls.count(("d1:1", "context_and_generation")) == 1
        await svc.stop()

    run(main())


@pytest.mark.parametrize("busy", ["backlog_full", "prefill_busy"])
def test_a_request_prefilled_again_after_its_hold_is_never_turned_away_as_new(busy):
    """A request whose hold expired was admitted and waited the hold TTL already: prefilled again, it is not
    refused 429 because the backlog is full, and when no prefill slot frees within queue.maxWaitSeconds for
    it, it gets 503 hold_expired (counted failed), not 429 queue_timeout (counted rejected)."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 0.05}\n"
                           "queue: {maxDepth: 1, maxWaitSeconds: 0.2}\n", decode=("d1:1",))
        outcomes = _outcomes(svc)
        rejected = []
        svc.hooks.rejected = lambda route, reason: rejected.append(reason)
        svc.decode["d1:1"].active = 1  # decode saturated
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1, what="the hold")
        if busy == "backlog_full":  # as many prefills in flight as allowed: the backlog is full too
            svc.prefills_in_flight = svc.config.routing.max_concurrent_prefills
        else:
            svc.prefill["p1:1"].active = svc.config.routing.prefill_batch_size
        reply = await asyncio.wait_for(task, 2)
        error = json.loads(reply.body)["error"]
        assert reply.status == 503 and error["code"] == "hold_expired", error
        assert "queue.maxWaitSeconds" in error["message"]
        assert outcomes == ["failed"] and rejected == []
        assert engine.calls == [("p1:1", "context_only")]
        svc.prefills_in_flight = svc.prefill["p1:1"].active = 0
        await svc.stop()

    run(main())


def test_a_request_prefilled_again_under_a_full_backlog_waits_for_its_prefill_and_is_served():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 0.05}\n"
                           "queue: {maxDepth: 1}\n", decode=("d1:1",))
        svc.decode["d1:1"].active = 1
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1, what="the hold")
        svc.prefills_in_flight = svc.config.routing.max_concurrent_prefills
        await until(lambda: svc.prefill_queue.waiting == 1, what="the second prefill to wait")
        svc.prefills_in_flight = 0
        svc.decode["d1:1"].active = 0
        svc.prefill_queue.notify()
        reply = await asyncio.wait_for(task, 2)
        assert reply.status == 200 and reply.headers["X-Baton-Route"] == "disaggregated"
        assert [k for _, k in engine.calls] == ["context_only", "context_only", "generation_only"]
        await svc.stop()

    run(main())


@pytest.mark.parametrize(("messages", "field"), [
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 5}], "messages[1].content"),
])
def test_a_chat_message_counting_cannot_read_is_the_clients_400_not_a_500(messages, field):
    """(Bodies nested too deep: test_scheduler_requests.py.)"""
    async def main():
        svc, _ = make()
        outcomes = _outcomes(svc)
        reply = await svc.complete("chat", json.dumps({"model": "m", "messages": messages}).encode(), {})
        error = json.loads(reply.body)["error"]
        assert reply.status == 400 and error["code"] == "invalid_request" and error["param"] == "messages"
        assert f"`{field}` must be" in error["message"]
        assert outcomes == ["invalid"]
        await svc.stop()

    run(main())


def test_a_health_check_started_by_cut_streams_never_brings_back_a_replica_they_took_out():
    """Cut streams each start a health check; the replica's /health keeps answering 200 while its
    generations fail. Three cuts take it out; the checks still in flight must not put it back (only the
    heartbeat does, with its count cleared)."""
    async def main():
        svc, _ = make()
        await asyncio.sleep(0.05)  # the probe of fresh endpoints
        d1 = svc.decode["d1:1"]
        for _ in range(3):
            svc._engine_failed(EngineFailure(d1.endpoint, "cut", 200, kind="stream_cut"), d1)
        assert not d1.healthy and d1.failures == 3
        await asyncio.sleep(0.05)  # the checks the cuts started have answered 200
        assert not d1.healthy and d1.failures == 3
        await svc.heartbeat_once()
        assert d1.healthy and d1.failures == 0
        await svc.stop()

    run(main())


def test_handoffs_a_decode_replica_cuts_do_not_count_against_it_but_a_dead_one_is_taken_out_before_the_retry():
    """trtllm-serve cuts a stream whose handoff it refused (a KV-format mismatch, KV already freed): that
    says nothing of the decode replica, which stays in rotation however often it happens. A process that
    ended closes its streams the same way: its health is checked before the retry is placed, so the retry
    never goes back to it."""
    from baton.http1.client import ClosedMidAnswer

    async def cut():
        raise ClosedMidAnswer("the server closed the connection mid-answer")
        yield b""  # pragma: no cover - an async generator that fails at its first item

    async def tokens():
        yield b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n'
        yield b"data: [DONE]\n\n"

    class CuttingEngine(FakeEngine):
        async def open(self, endpoint, path, body, request_id):
            self.calls.append((endpoint.address, "stream"))
            return IteratedResponse(200, cut() if endpoint.address == "d1:1" else tokens(), "text/event-stream")

    async def main():
        cfg = parse_config("model: m\nrouting: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n"
                           "retries: {budgetRatio: 1.0}\n")  # every request may be retried once
        engine = CuttingEngine()
        svc = SchedulerService(cfg, engine=engine, discover=False)
        svc.update_endpoints([Endpoint("p1:1", "prefill")], [Endpoint("d1:1", "decode"), Endpoint("d2:1", "decode")])
        await asyncio.sleep(0.05)
        d1 = svc.decode["d1:1"]
        for _ in range(6):
            reply = await svc.complete("completions", _stream_request(200), {})
            assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
            reply.producer.start(StreamSink())
        assert ("d1:1", "stream") in engine.calls  # it was tried, and cut
        assert d1.healthy and d1.failures == 0
        engine.fail["d1:1"] = "connect"  # now the process is gone: its health check fails
        engine.calls.clear()
        while ("d1:1", "stream") not in engine.calls:
            reply = await svc.complete("completions", _stream_request(200), {})
            assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
            reply.producer.start(StreamSink())
        assert not d1.healthy  # taken out by the check before the retry, not by the next heartbeat
        await svc.stop()

    run(main())


def _short_request():
    return json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}).encode()


def test_prefill_results_waiting_on_the_decode_rate_limit_stay_within_the_queue_limit():
    """A decode bucket that is empty saturates the decode tier as full replicas do: prefills that would
    only feed holds are turned away 429 queue_full (with Retry-After) beyond queue.maxDepth, instead of
    piling up held and failing 503 hold_expired later."""
    async def main():
        svc, _ = make("queue: {maxDepth: 2, maxWaitSeconds: 5}\n"
                      "admission: {decodeRequestsPerSecond: 1, decodeBurst: 1}\ndegradation: {holdTtlSeconds: 3}\n"
                      "routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, "
                      "maxConcurrentPrefills: 4}\n")
        tasks = [asyncio.create_task(svc.complete("completions", long_request(), {})) for _ in range(12)]
        peak = 0
        while not all(t.done() for t in tasks):
            peak = max(peak, len(svc.holds))
            await asyncio.sleep(0.01)
        replies = [t.result() for t in tasks]
        assert peak <= 2
        codes = [json.loads(r.body)["error"]["code"] for r in replies if r.status != 200]
        assert codes and set(codes) == {"queue_full"}, codes
        assert all(r.headers.get("Retry-After") for r in replies if r.status == 429)
        await svc.stop()

    run(main())


def test_a_prefill_result_whose_ring_filled_during_the_prefill_is_not_held_past_the_queue_limit():
    """The check before a prefill looks at the whole decode tier; a result whose own ring is full is held
    only while the backlog has room for it, else answered 429 queue_full."""
    async def main():
        svc, _ = make("queue: {maxDepth: 1}\nbackpressure: {maxActivePerDecodeReplica: 1}\n"
                      "degradation: {holdTtlSeconds: 5}\n"
                      "routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, prefillBatchSize: 1}\n",
                      prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1"))
        assert svc.rings == {"p1:1": ("d1:1",), "p2:1": ("d2:1",)}
        svc.prefill["p2:1"].active = 1  # p2 busy: every prefill goes to p1, whose ring (d1) is full
        svc.decode["d1:1"].active = 1
        first = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1)
        second = await svc.complete("completions", long_request(), {})  # d2 has room, but not p1's ring
        assert second.status == 429 and json.loads(second.body)["error"]["code"] == "queue_full"
        assert second.headers.get("Retry-After") and len(svc.holds) == 1
        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        assert (await asyncio.wait_for(first, 2)).status == 200
        await svc.stop()

    run(main())


def test_a_prefill_goes_to_a_replica_whose_ring_has_a_free_decode_slot():
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\n", prefill=("p1:1", "p2:1"),
                           decode=("d1:1", "d2:1"))
        svc.decode["d1:1"].active = 1  # p1's ring is full; p1 would win the tie on its address
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 200 and reply.headers["X-Baton-Prefill-Endpoint"] == "p2:1"
        assert engine.calls == [("p2:1", "context_only"), ("d2:1", "generation_only")]  # never held
        await svc.stop()

    run(main())


@pytest.mark.parametrize("route", ["local", "disaggregated"])
def test_a_slot_granted_to_a_waiter_whose_client_has_gone_gives_its_bucket_tokens_back(route):
    """The slot and the bucket's tokens are taken together when a waiter is served; a client that left in
    the same turn gets neither, and the next request is not made to wait for a refill."""
    async def main():
        local = route == "local"
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\nrouting: {localPrefillBelowTokens: 10, "
                           "alwaysPrefillAtOrAboveTokens: 100, prefillBatchSize: 1}\n"
                           "admission: {decodeRequestsPerSecond: 0.01, decodeBurst: 2, prefillTokensPerSecond: 1, "
                           "prefillBurstTokens: 1000}\n", prefill=() if local else ("p1:1",), decode=("d1:1",))
        busy = svc.decode["d1:1"] if local else svc.prefill["p1:1"]
        bucket = svc.decode_bucket if local else svc.prefill_bucket
        busy.active = 1
        waiter = asyncio.create_task(svc.complete("completions", _short_request() if local else long_request(), {}))
        await until(lambda: (svc.decode_queue if local else svc.prefill_queue).waiting == 1)
        before = bucket.available()
        busy.active = 0
        (svc.decode_queue if local else svc.prefill_queue).notify()  # served: slot and tokens taken ...
        assert bucket.available() < before
        waiter.cancel()  # ... as its client goes away, before it ran again
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert engine.calls == []
        assert bucket.available() == pytest.approx(before, abs=0.01)
        assert busy.active == 0
        await svc.stop()

    run(main())


def test_a_replica_described_anew_keeps_its_load_and_its_held_handles():
    """Discovery publishes the same pod again with other details (its pod lookup failed the first time):
    the same process, so the sequences in flight still count against its cap, and handles held on it
    still resume."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\nqueue: {maxWaitSeconds: 2}\n",
                           prefill=(), decode=())
        svc.update_endpoints([Endpoint("p1:1", "prefill", pod="prefill-0")], [Endpoint("d1:1", "decode", pod="decode-0")])
        in_engine, peak = 0, 0
        gate = asyncio.Event()
        post = engine.post

        async def counting(ep, path, body, rid):
            nonlocal in_engine, peak
            if ep.address == "d1:1":
                in_engine += 1
                peak = max(peak, in_engine)
                await gate.wait()
            try:
                return await post(ep, path, body, rid)
            finally:
                if ep.address == "d1:1":
                    in_engine -= 1

        engine.post = counting
        first = asyncio.create_task(svc.complete("completions", _short_request(), {}))
        await until(lambda: in_engine == 1)
        held = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1)
        svc.update_endpoints([Endpoint("p1:1", "prefill", "fp", pod="prefill-0")],
                             [Endpoint("d1:1", "decode", "fp", pod="decode-0")])
        second = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 2)  # d1 is still full: held too, not sent to it
        await asyncio.sleep(0.05)
        assert peak == 1 and svc.decode["d1:1"].active == 1
        gate.set()
        replies = await asyncio.wait_for(asyncio.gather(first, held, second), 5)
        assert [r.status for r in replies] == [200, 200, 200]
        # both held handles resumed on the same prefill replica, neither was prefilled again
        assert [k for a, k in engine.calls if a == "p1:1"] == ["context_only", "context_only"]
        assert peak == 1 and svc.decode["d1:1"].active == 0
        await svc.stop()

    run(main())


def test_a_prefill_replica_that_comes_back_shares_the_ties_instead_of_taking_them_all():
    """Placement breaks ties by how many requests each replica took; one that left and came back starts
    level with the least-used one, not at 0 (which would win every tie until it caught up)."""
    async def main():
        svc, _ = make(prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1", "d3:1", "d4:1"))
        for _ in range(40):
            assert (await svc.complete("completions", long_request(), {})).status == 200
        eps = [Endpoint(a, "decode") for a in ("d1:1", "d2:1", "d3:1", "d4:1")]
        svc.update_endpoints([Endpoint("p2:1", "prefill")], eps)  # p1 blinks out of the lists ...
        svc.update_endpoints([Endpoint("p1:1", "prefill"), Endpoint("p2:1", "prefill")], eps)  # ... and back
        used = []
        for _ in range(10):
            reply = await svc.complete("completions", long_request(), {})
            used.append(reply.headers["X-Baton-Prefill-Endpoint"])
        assert used.count("p1:1") == used.count("p2:1") == 5, used
        await svc.stop()

    run(main())


def test_a_held_handle_whose_ring_lost_every_compatible_decode_replica_is_not_handed_to_the_old_ring():
    """The held handle's ring is looked up afresh; when no decode replica of its prefill's KV format is
    left (the ring is empty now), it does not fall back to the replicas it was held with, which may now
    be of another format: it waits, and when the hold ends the request is served another way."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 0.2}\n",
                           prefill=(), decode=())
        svc.update_endpoints([Endpoint("p1:1", "prefill", "fp-a", pod="prefill-0")],
                             [Endpoint("d1:1", "decode", "fp-a", pod="decode-0")])
        svc.decode["d1:1"].active = 1
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1)
        # decode-0 replaced by a pod of another KV format at the same address
        svc.update_endpoints([Endpoint("p1:1", "prefill", "fp-a", pod="prefill-0")],
                             [Endpoint("d1:1", "decode", "fp-b", pod="decode-0-new")])
        reply = await asyncio.wait_for(task, 3)
        assert ("d1:1", "generation_only") not in engine.calls
        assert reply.status == 200 and "X-Baton-Prefill-Endpoint" not in reply.headers  # served locally
        await svc.stop()

    run(main())


def test_decode_utilisation_is_measured_against_the_cap_in_force_while_throttled():
    svc, _ = make("backpressure: {maxActivePerDecodeReplica: 8, decodeP95LatencyThresholdMs: 50}\n")
    for _ in range(20):
        svc.tpot_window.record(0.080)  # p95 80 ms > 50 ms: the cap is halved to 4
    svc.tpot_window._cached = None
    for replica in svc.decode.values():
        replica.active = 4  # every replica full at that cap: nothing more is admitted
    assert svc.decode_throttled() and not svc._decode_candidates(None, set(), False)
    assert svc.snapshot()["utilization"]["decode"] == 1.0


def test_a_stream_whose_first_event_is_an_engine_error_adds_no_first_token_or_transfer_sample():
    async def main():
        async def pieces():
            yield b'data: {"object": "error", "message": "Error in kv cache transfer", "type": "x", "code": 500}\n\n'

        svc, _ = make(decode=("d1:1",))
        svc._engine_slot.client = svc._engines("trtllm", 1.0, StreamingEngine(pieces))
        reply = await svc.complete("completions", _stream_request(200), {})  # long: a handoff
        sink = StreamSink()
        reply.producer.start(sink)
        await asyncio.wait_for(sink.ended.wait(), 2)
        text = svc.metrics.exposition().decode()
        assert 'baton_scheduler_requests_total{outcome="failed",route="disaggregated"} 1.0' in text
        assert "baton_scheduler_time_to_first_token_seconds_count" not in text
        assert "baton_scheduler_kv_transfer_seconds_count" not in text
        await svc.stop()

    run(main())


def test_the_http_layers_own_answers_carry_their_own_error_codes():
    """A request the HTTP layer answers itself (408 for one that did not arrive in time, among others) gets a
    code that says what happened, not the 500's internal_error."""
    from baton.scheduler.server import openai_http_error

    for status, code in ((408, "request_timeout"), (413, "request_too_large"), (431, "request_header_fields_too_large")):
        body, ctype = openai_http_error(status, "x")
        error = json.loads(body)["error"]
        assert ctype == "application/json" and error["code"] == code and error["type"] == "invalid_request_error"


def test_a_reused_connection_closed_before_any_answer_is_retried_without_taking_the_replica_out():
    """The HTTP client no longer sends a POST again when a reused connection dies before answering (the
    engine may have read it): the scheduler retries it on another pair, visibly, and the replica stays in
    rotation (an idle connection the engine closed as it was reused says nothing of its health)."""
    async def main():
        svc, engine = make()
        engine.fail["d1:1"] = "closed"
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
        assert svc.decode["d1:1"].healthy and svc.decode["d1:1"].failures == 1
        assert 'baton_scheduler_retries_total{reason="closed_before_answer",route="disaggregated"} 1.0' in (
            svc.metrics.exposition().decode())
        await svc.stop()

    run(main())


def test_a_decode_replica_that_closed_a_handoff_unanswered_is_not_tried_again_for_that_request():
    """A reused connection closed before any answer may be a replica that died after reading the request:
    the retry avoids that replica (not only the pair), even when another prefill's ring leads back to it."""
    async def main():
        svc, engine = make("routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, ringSize: 1}\n",
                           prefill=("p1:1", "p2:1", "p3:1"), decode=("d1:1", "d2:1"))
        svc.rings = {"p1:1": ("d1:1",), "p2:1": ("d1:1",), "p3:1": ("d2:1",)}  # rings that overlap on d1
        svc.prefill["p3:1"].dispatched = 10  # p1 then p2 win the ties: the retry would go back to d1
        engine.fail["d1:1"] = "closed"
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1"
        assert [a for a, k in engine.calls if k == "generation_only"] == ["d1:1", "d2:1"]
        await svc.stop()

    run(main())


def test_a_replica_back_in_the_lists_after_a_flap_keeps_counting_its_requests_against_its_cap():
    """A readiness flap takes a decode replica out of the lists and puts it back while its requests still run
    in the same process: they count against maxActivePerDecodeReplica when it is back (not a fresh 0, which
    would double the load on it), and /metrics counts them on it all along."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 2}\nqueue: {maxWaitSeconds: 10}\n",
                           prefill=(), decode=("d1:1",))
        engine.delay = 0.3
        running, peak = 0, 0
        post = engine.post

        async def counting(endpoint, path, body, request_id):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                return await post(endpoint, path, body, request_id)
            finally:
                running -= 1
        engine.post = counting
        short = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}).encode()
        first = [asyncio.create_task(svc.complete("completions", short, {})) for _ in range(2)]
        await until(lambda: running == 2)
        svc.update_endpoints([], [])  # d1 not Ready for a moment ...
        assert svc.snapshot()["endpoint_active"][("decode", "d1:1")] == 2
        svc.update_endpoints([], [Endpoint("d1:1", "decode")])  # ... and back
        assert svc.snapshot()["endpoint_active"][("decode", "d1:1")] == 2
        later = [asyncio.create_task(svc.complete("completions", short, {})) for _ in range(2)]
        replies = await asyncio.gather(*first, *later)
        assert [r.status for r in replies] == [200] * 4
        assert peak == 2, f"{peak} requests ran at once on a replica capped at 2"
        assert svc.snapshot()["endpoint_active"][("decode", "d1:1")] == 0
        await svc.stop()

    run(main())


def test_a_queue_full_after_hours_without_a_completion_is_a_429_with_retry_after_not_a_500():
    """The completion rate Retry-After divides by decays towards 0 while nothing completes; about two
    hours on it is a denormal float and depth / rate overflows: still 429 queue_full, Retry-After 30."""
    async def main():
        clock = [0.0]
        cfg = parse_config("model: m\nbackpressure: {maxActivePerDecodeReplica: 1}\n"
                           "queue: {maxWaitSeconds: 0.05, maxDepth: 1}\n")
        svc = SchedulerService(cfg, engine=FakeEngine(), discover=False, clock=lambda: clock[0])
        svc.update_endpoints([], [Endpoint("d1:1", "decode")])
        svc.completions.tick()  # a request completed, long ago
        clock[0] = 7200.0  # two hours without a completion (engines wedged)
        svc.decode["d1:1"].active = 1  # decode full
        waiting = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await asyncio.sleep(0.01)
        second = await svc.complete("completions", long_request(5), {})
        first = await waiting
        assert (second.status, second.headers.get("Retry-After")) == (429, "30"), second.body
        assert first.status == 429 and first.headers.get("Retry-After"), first.body  # its wait timed out
        await svc.stop()

    run(main())


def test_a_held_prefill_whose_whole_ring_failed_resumes_on_another_healthy_decode_replica_at_once():
    """Rings p1->d1, p2->d2; a prefill result held on p1 waits for d1, which then fails: the handle goes to d2
    (same KV format and generation) as soon as it has room, not after the hold TTL, and is not prefilled again."""
    from baton.scheduler.engines import EngineFailure

    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 5}\n",
                           prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1"))
        svc.decode["d1:1"].active = svc.decode["d2:1"].active = 1  # both full: the prefill result is held
        t0 = time.monotonic()
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1)
        held_on = engine.calls[0][0]
        ring = svc.rings[held_on][0]
        other = "d2:1" if ring == "d1:1" else "d1:1"
        svc._engine_failed(EngineFailure(svc.decode[ring].endpoint, "refused", kind="connection"), svc.decode[ring])
        svc.decode[other].active = 0
        svc.decode_queue.notify()
        reply = await task
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == other
        assert time.monotonic() - t0 < 2, "the hold waited for its failed ring"
        assert [k for _, k in engine.calls] == ["context_only", "generation_only"]  # no second prefill
        await svc.stop()

    run(main())


def test_a_held_prefill_never_resumes_on_a_decode_replica_of_another_kv_format():
    """The fallback outside a failed ring keeps to the prefill's KV format: with only another format's decode
    replica healthy, the hold waits (and expires) rather than pair across formats."""
    from baton.scheduler.engines import EngineFailure

    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 0.3}\n")
        svc.retry_budget.try_spend = lambda: False  # no second prefill: the expiry answers
        svc.update_endpoints([Endpoint("p1:1", "prefill", fingerprint="a")],
                             [Endpoint("d1:1", "decode", fingerprint="a"), Endpoint("d2:1", "decode", fingerprint="b")])
        svc.decode["d1:1"].active = 1
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1)
        svc._engine_failed(EngineFailure(svc.decode["d1:1"].endpoint, "refused", kind="connection"),
                           svc.decode["d1:1"])
        svc.decode_queue.notify()
        reply = await task
        assert reply.status == 503 and reply.headers.get("X-Baton-Error") == "hold_expired", reply.body
        assert "d2:1" not in [a for a, _ in engine.calls]
        await svc.stop()

    run(main())


def test_a_retried_local_request_whose_remaining_replicas_fail_while_it_waits_gets_503_at_once():
    """A local request failed on d1 (5xx) and waits for d2 (full); d2 then fails while d1 is healthy again:
    nothing it may use is left, so it is answered 503 no_decode_endpoints now, not 429 after queue.maxWaitSeconds."""
    from baton.scheduler.engines import EngineFailure

    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\nqueue: {maxWaitSeconds: 5}\n",
                           prefill=(), decode=("d1:1", "d2:1"))
        engine.fail["d1:1"] = "500"
        svc.decode["d2:1"].active = 1  # d2 busy: the first attempt goes to d1
        t0 = time.monotonic()
        task = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await until(lambda: svc.decode_queue.waiting == 1)  # failed on d1, waiting for d2
        engine.fail.clear()
        svc._engine_failed(EngineFailure(svc.decode["d2:1"].endpoint, "refused", kind="connection"),
                           svc.decode["d2:1"])
        reply = await task
        assert reply.status == 503 and reply.headers["X-Baton-Error"] == "no_decode_endpoints", reply.body
        assert time.monotonic() - t0 < 2, "it waited out queue.maxWaitSeconds"
        await svc.stop()

    run(main())


def test_a_reload_lowering_max_wait_seconds_bounds_the_requests_already_waiting():
    """queue.maxWaitSeconds lowered from 30 s to 0.2 s while a request waits: it gets its 429 queue_timeout by
    the new bound (from when it began to wait), not up to 30 s later, after requests that came after it."""
    async def main():
        base = "backpressure: {maxActivePerDecodeReplica: 1}\n"
        svc, engine = make(base + "queue: {maxWaitSeconds: 30}\n", prefill=(), decode=("d1:1",))
        svc.decode["d1:1"].active = 1  # full: requests wait
        t0 = time.monotonic()
        waiting = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await until(lambda: svc.decode_queue.waiting == 1)
        svc.apply_config(parse_config(
            "model: m\nrouting: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n"
            + base + "queue: {maxWaitSeconds: 0.2}\n"))
        reply = await asyncio.wait_for(waiting, 5)
        assert reply.status == 429 and reply.headers["X-Baton-Error"] == "queue_timeout", reply.body
        assert time.monotonic() - t0 < 1.5, "it waited by the old bound"
        await svc.stop()

    run(main())


def test_a_settle_window_wait_the_client_leaves_is_recorded_as_a_wait():
    """The last decode replica left the lists: a request waits for a replacement (the settle window) before
    it is routed; its client leaving then still leaves the wait in queue_wait_seconds (route unrouted)."""
    async def main():
        svc, engine = make(prefill=(), decode=("d1:1",))
        svc.update_endpoints([], [])  # the last decode replica left: a settle window
        task = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        text = svc.metrics.exposition().decode()
        count = [line for line in text.splitlines()
                 if line.startswith('baton_scheduler_queue_wait_seconds_count{pool="decode",route="unrouted"}')
                 or line.startswith('baton_scheduler_queue_wait_seconds_count{route="unrouted",pool="decode"}')]
        assert count and float(count[0].split()[-1]) == 1.0, [l for l in text.splitlines() if "queue_wait_seconds_count" in l]
        await svc.stop()

    run(main())


def test_a_decode_replica_whose_executor_is_gone_is_avoided_by_the_retry_not_only_its_pair():
    """trtllm-serve with its executor gone answers every request 400 "LLM is shutting down": on a disaggregated
    request the retry avoids that decode replica (through any prefill replica) and it leaves rotation."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 8}\n",
                           prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1"))
        post = engine.post

        async def gone(endpoint, path, body, rid):
            if endpoint.address == "d1:1":
                engine.calls.append((endpoint.address, "gone"))
                return 400, json.dumps({"object": "error", "message": "LLM is shutting down",
                                        "type": "BadRequestError", "param": None, "code": 400}).encode(), \
                    "application/json"
            return await post(endpoint, path, body, rid)
        engine.post = gone
        svc.decode["d2:1"].active = 2  # d1, failing at once, is the least loaded
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d2:1", reply.body
        assert [a for a, k in engine.calls if a.startswith("d")] == ["d1:1", "d2:1"]  # d1 met once, not again
        assert not svc.decode["d1:1"].healthy
        await svc.stop()

    run(main())


@pytest.mark.parametrize("status,body,kind", [
    (400, {"object": "error", "message": "LLM is shutting down", "type": "BadRequestError", "code": 400},
     "engine_gone"),
    # a 400 about the client's own field quotes its value: passed through, no replica blamed
    (400, {"error": "1 validation error for CompletionRequest\ntemperature\n  Input should be a valid number, "
                    "unable to parse string as a number [input_value='LLM is shutting down']"}, None),
    (400, {"object": "error", "message": "prompt 'LLM is shutting down' is too long", "code": 400}, None),
])
def test_only_the_whole_llm_is_shutting_down_message_is_an_engine_gone(status, body, kind):
    from baton.scheduler.engines import classify_failure

    failure = classify_failure(Endpoint("d1:1", "decode"), status, json.dumps(body).encode())
    assert (failure.kind if failure else None) == kind
    assert failure is None or failure.connection_level


def test_a_held_prefill_whose_ring_has_only_replicas_the_request_must_avoid_resumes_elsewhere():
    """The request failed on d1 (excluded); its retry is held on p1 for d2; d1 is healthy again and then d2
    fails: d1 does not count as a healthy member of the ring for this request, so it resumes on d3 at once."""
    from baton.scheduler.engines import EngineFailure

    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\ndegradation: {holdTtlSeconds: 5}\n"
                           "routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, ringSize: 2}\n",
                           prefill=("p1:1", "p2:1"), decode=("d1:1", "d2:1", "d3:1"))
        ring = list(svc.rings["p1:1"])
        failed, held_for = ring
        other = next(d for d in svc.decode if d not in ring)
        serve = svc._serve_disaggregated

        async def after_a_failure_on(ctx):
            ctx.excluded.add(failed)  # as _run does after a connection failure on it
            return await serve(ctx)
        svc._serve_disaggregated = after_a_failure_on
        svc.prefill["p2:1"].healthy = False  # the prefill lands on p1
        svc.decode[held_for].active = svc.decode[other].active = 1  # full: the result is held
        t0 = time.monotonic()
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await until(lambda: len(svc.holds) == 1)
        svc._engine_failed(EngineFailure(svc.decode[held_for].endpoint, "refused", kind="connection"),
                           svc.decode[held_for])
        svc.decode[other].active = 0
        svc.decode_queue.notify()
        reply = await task
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == other, reply.body
        assert time.monotonic() - t0 < 2, "the hold waited for a ring member this request must avoid"
        await svc.stop()

    run(main())


def test_a_retried_local_request_waits_through_a_settle_window_for_the_replacement():
    """An endpoint update empties the decode tier for a moment (a generation switch): a retried local request
    waits for the replacement like any other, not 503 at once."""
    async def main():
        svc, engine = make("backpressure: {maxActivePerDecodeReplica: 1}\nqueue: {maxWaitSeconds: 5}\n",
                           prefill=(), decode=("d1:1", "d2:1"))
        engine.fail["d1:1"] = "500"
        svc.decode["d2:1"].active = 1
        retried = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await until(lambda: svc.decode_queue.waiting == 1)  # failed on d1, waits for d2
        engine.fail.clear()
        svc.update_endpoints([], [])  # the old replicas leave ...
        await asyncio.sleep(0.2)
        svc.update_endpoints([], [Endpoint("d3:1", "decode")])  # ... the new one comes within the window
        reply = await retried
        assert reply.status == 200 and reply.headers["X-Baton-Decode-Endpoint"] == "d3:1", reply.body
        await svc.stop()

    run(main())


def test_a_replica_back_after_a_flap_is_probed_if_it_was_out_and_leaves_no_state_behind():
    async def main():
        svc, engine = make(prefill=(), decode=("d1:1", "d2:1"))
        probed = []
        health = engine.health

        async def probe(ep, timeout):
            probed.append(ep.address)
            return await health(ep, timeout)
        engine.health = probe
        await asyncio.sleep(0.05)
        probed.clear()
        d1 = svc.decode["d1:1"]
        d1.active, d1.healthy = 1, False  # a request still on it; it was taken out
        svc.update_endpoints([], [Endpoint("d2:1", "decode")])  # readiness flap ...
        svc.update_endpoints([], [Endpoint("d1:1", "decode"), Endpoint("d2:1", "decode")])  # ... back
        await until(lambda: d1.healthy)
        assert svc.decode["d1:1"] is d1 and probed == ["d1:1"]
        for _ in range(50):  # flaps whose requests end while it is out leave nothing behind, scraped or not
            state = svc.decode["d1:1"]
            state.active = 1
            svc.update_endpoints([], [Endpoint("d2:1", "decode")])
            state.active = 0
            svc.update_endpoints([], [Endpoint("d1:1", "decode"), Endpoint("d2:1", "decode")])
        assert sum(len(v) for v in svc._departed.values()) <= 1
        await svc.stop()

    run(main())


def test_a_pair_whose_streamed_handoff_was_cut_is_checked_unstreamed_and_kept_out_only_on_a_kv_mismatch(caplog):
    """A cut stream gives no reason; the pair check does a tiny unstreamed handoff on the pair. The engine's
    KV-format mismatch keeps the pair out of placement; KV already freed (or anything else) changes nothing. A
    pair is checked at most once per PAIR_CHECK_INTERVAL_S, however many streams are cut on it."""
    from baton.scheduler import service as service_module

    async def checked(svc, prefill, decode):
        svc._start_pair_check(svc.prefill[prefill], svc.decode[decode], "m")
        await asyncio.gather(*svc._probe_tasks)

    async def main():
        now = [1000.0]
        svc, engine = make()
        svc.clock = lambda: now[0]
        engine.fail["d2:1"] = "kv_gone"
        await checked(svc, "p1:1", "d2:1")
        assert svc.incompatible == {}
        assert engine.calls[-2:] == [("p1:1", "context_only"), ("d2:1", "generation_only")]
        engine.fail["d1:1"] = "kv"
        await checked(svc, "p1:1", "d1:1")
        assert set(svc.incompatible) == {("p1:1", "d1:1")}
        assert "cacheState" in svc.incompatible[("p1:1", "d1:1")][1]
        calls = len(engine.calls)
        engine.fail["d2:1"] = "kv"
        now[0] += service_module.PAIR_CHECK_INTERVAL_S - 1
        await checked(svc, "p1:1", "d2:1")  # checked a moment ago: not again yet
        assert len(engine.calls) == calls and ("p1:1", "d2:1") not in svc.incompatible
        now[0] += 1
        await checked(svc, "p1:1", "d2:1")
        assert ("p1:1", "d2:1") in svc.incompatible
        # both pairs out: a long prompt is prefilled on a decode replica itself
        reply = await svc.complete("completions", long_request(), {})
        assert reply.status == 200 and reply.headers["X-Baton-Route"] == "local"
        await svc.stop()

    with caplog.at_level("INFO", logger="baton.scheduler"):
        run(main())
    assert "event=pair_check_inconclusive pair=p1:1->d2:1" in caplog.text
    assert "event=kv_format_mismatch found_by=pair_check prefill=p1:1 decode=d1:1" in caplog.text


def test_requests_count_under_the_generation_of_the_replicas_that_served_them():
    """During a PairwiseSwap the scheduler routes to both generations: the new generation's failures must be
    counted under it (the operator rolls it back on them), not under the serving generation."""
    class Swapping:
        generation, swap_generation = "g1", "g2"

        def stop(self) -> None:
            pass

    async def main():
        cfg = parse_config("model: m\nrouting: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100, "
                           "placementPolicy: round-robin}\nretries: {maxAttempts: 1}\n")
        engine = FakeEngine()
        svc = SchedulerService(cfg, engine=engine, discover=False)
        svc._discovery = Swapping()
        svc.update_endpoints([Endpoint("p1:1", "prefill", pod="m-prefill-g1-0", generation="g1"),
                              Endpoint("p2:1", "prefill", pod="m-prefill-g2-0", generation="g2")],
                             [Endpoint("d1:1", "decode", pod="m-decode-g1-0", generation="g1"),
                              Endpoint("d2:1", "decode", pod="m-decode-g2-0", generation="g2")])
        engine.fail["p2:1"] = engine.fail["d2:1"] = "500"  # the new generation's engines are broken
        statuses = [(await svc.complete("completions", long_request(), {})).status for _ in range(6)]
        assert sorted(statuses) == [200] * 3 + [502] * 3
        counted = {}
        for line in svc.metrics.exposition().decode().splitlines():
            if line.startswith("baton_scheduler_generation_requests_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                counted[(labels["generation"], labels["outcome"])] = float(line.rpartition(" ")[2])
        assert counted.get(("g1", "completed")) == 3 and counted.get(("g2", "failed")) == 3, counted
        assert not counted.get(("g1", "failed")), counted
        await svc.stop()

    run(main())
