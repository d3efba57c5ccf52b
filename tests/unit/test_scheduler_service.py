"""The request flow in-process against a scripted fake engine: retries, KV mismatch, throttling, buckets."""

from __future__ import annotations

import asyncio
import json

from baton.scheduler.config import parse_config
from baton.scheduler.endpoints import Endpoint
from baton.scheduler.engines import EngineFailure
from baton.scheduler.metrics import SchedulerHooks
from baton.scheduler.service import Reply, SchedulerService

KV_ERROR = ("Disagg server does not currently support these cacheState: "
            "selfConfig.getDataType() != destConfig.getDataType()")


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
        if mode == "kv" and kind == "generation_only":
            return 500, json.dumps({"object": "error", "message": KV_ERROR}).encode(), "application/json"
        if mode == "500":
            return 500, b'{"object": "error", "message": "boom"}', "application/json"
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
        assert prefill_waits[0] < 0.01 and 0.05 < prefill_waits[1] < 1.0  # 200 tokens at 2,000/s = 0.1 s
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
