"""Capacity: batch-slot queueing, KV-block waiting (including KV held for a handoff), impossible requests."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from simproc import sim_config, worker_yaml


def run_concurrently(engine, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: engine.post("/v1/completions", b), bodies))


def timings(engine) -> list[dict]:
    status, records = engine.get("/perf_metrics")
    assert status == 200
    return sorted((r["perf_metrics"]["timing_metrics"] for r in records if r["status"] == "ok"),
                  key=lambda t: t["first_scheduled_time"])


@pytest.fixture(scope="module")
def one_slot(engines):
    # max_batch_size 1: a second request waits for the first. Real-time decode (~5 ms/step for 8B).
    return engines.start(worker_yaml(ctx=True, max_batch_size=1, max_num_tokens=512,
                                     kv_cache_config={"max_tokens": 4096}))


@pytest.fixture(scope="module")
def small_cache(engines):
    # 256 tokens of KV = 8 blocks of 32; held ctx KV expires after 500 ms.
    return engines.start(worker_yaml(ctx=True, timeout_ms=500, max_batch_size=8,
                                     kv_cache_config={"max_tokens": 256}), "--sim-speed", "0.5")


def test_batch_slots_queue_fifo(one_slot):
    one_slot.get("/perf_metrics")
    one_slot.get("/metrics")
    bodies = [{"prompt": list(range(1, 11)), "max_tokens": 60}, {"prompt": list(range(2, 12)), "max_tokens": 60}]
    results = run_concurrently(one_slot, bodies)
    assert [status for status, _ in results] == [200, 200]
    first, second = timings(one_slot)
    assert second["arrival_time"] < first["last_token_time"], "requests did not overlap"
    assert second["first_scheduled_time"] >= first["last_token_time"]
    records = one_slot.get("/metrics")[1]
    assert max(r["numQueuedRequests"] for r in records) >= 1
    assert max(r["numActiveRequests"] for r in records) == 1


@pytest.mark.parametrize("request_type", ["context_and_generation", "context_only"])
def test_prompt_over_max_num_tokens_is_refused_with_trtllm_text(one_slot, request_type):
    status, err = one_slot.post("/v1/completions", {"prompt": list(range(1, 601)), "max_tokens": 1,
                                                    "disaggregated_params": {"request_type": request_type}})
    assert status == 400 and err["type"] == "BadRequestError"
    # LLM._check_arguments: prompt_len / cp_size is a float in TensorRT-LLM's text
    assert err["message"] == "The sum of prompt length (600.0), query length (0) should not exceed max_num_tokens (512)"


@pytest.fixture(scope="module")
def short_seq(engines):
    # max_seq_len 256 below max_num_tokens 512: a prompt can fit an iteration but leave no room to generate
    return engines.start(worker_yaml(ctx=True, max_seq_len=256, max_num_tokens=512), "--sim-speed", "0")


def _ids_request(path: str, prompt_len: int, **fields) -> dict:
    """A completion or chat request whose prompt is `prompt_len` token ids."""
    key = "prompt" if "chat" not in path else "prompt_token_ids"
    body = {key: list(range(1, prompt_len + 1)), **fields}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "x"}]
    return body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_is_lowered_to_what_max_seq_len_leaves(short_seq, path):
    """As the PyTorch worker's _deduce_max_tokens: max_tokens above max_seq_len - prompt is lowered (with
    TensorRT-LLM's warning in the log), not refused."""
    status, resp = short_seq.post(path, _ids_request(path, 200, max_tokens=1000))
    assert status == 200, resp
    assert resp["usage"] == {"prompt_tokens": 200, "completion_tokens": 56, "total_tokens": 256}
    assert resp["choices"][0]["finish_reason"] == "length"
    assert ("User-specified `max_tokens` (1000) is greater than deduced `default_max_tokens` (56), using "
            "default_max_tokens instead.") in short_seq.log()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_request_without_max_tokens_generates_what_max_seq_len_leaves(short_seq, path):
    """trtllm-serve 1.x: its request models default max_tokens to none and the worker deduces it, so a
    request that sets none generates up to max_seq_len (here 256), without the lowering warning."""
    status, resp = short_seq.post(path, _ids_request(path, 180))
    assert status == 200, resp
    assert resp["usage"] == {"prompt_tokens": 180, "completion_tokens": 76, "total_tokens": 256}
    assert resp["choices"][0]["finish_reason"] == "length"
    assert "is greater than deduced `default_max_tokens` (76)" not in short_seq.log()


def test_sim_default_max_tokens_fixes_the_default(engines):
    engine = engines.start(worker_yaml(ctx=True, max_seq_len=256, max_num_tokens=512), "--sim-speed", "0",
                           "--sim-default-max-tokens", "5")
    status, resp = engine.post("/v1/completions", {"prompt": list(range(1, 11))})
    assert status == 200, resp
    assert resp["usage"]["completion_tokens"] == 5
    status, resp = engine.post("/v1/completions", {"prompt": list(range(1, 11)), "max_tokens": 7})
    assert resp["usage"]["completion_tokens"] == 7


@pytest.mark.parametrize("request_type", ["context_and_generation", "context_only"])
@pytest.mark.parametrize("prompt_len", [256, 300])
def test_prompt_that_leaves_no_room_in_max_seq_len_is_refused(short_seq, request_type, prompt_len):
    status, err = short_seq.post("/v1/completions", {"prompt": [7] * prompt_len, "max_tokens": 1,
                                                     "disaggregated_params": {"request_type": request_type}})
    assert status == 400 and err["type"] == "BadRequestError"
    left = 256 - prompt_len
    assert err["message"] == (f"`default_max_tokens` ({left}) must be greater than 0, `default_max_tokens` ({left}) "
                              f"= max_seq_len (256) - `splited_prompt_len` ({prompt_len})")


@pytest.fixture(scope="module")
def chunked(engines):
    # enable_chunked_prefill: a prompt longer than max_num_tokens 512 is prefilled 512 tokens per iteration
    return engines.start(worker_yaml(ctx=True, max_num_tokens=512, enable_chunked_prefill=True), "--sim-speed", "0")


def context_iterations(records: list[dict]) -> list[tuple[int, int, int]]:
    """(context requests, context tokens, generation requests) of each iteration that ran a prefill."""
    out = []
    for r in records:
        stats = r.get("inflightBatchingStats")
        if stats and stats["numContextRequests"]:
            out.append((stats["numContextRequests"], stats["numCtxTokens"], stats["numGenRequests"]))
    return out


@pytest.mark.parametrize("request_type", ["context_and_generation", "context_only"])
def test_chunked_prefill_runs_a_prompt_longer_than_max_num_tokens(chunked, request_type):
    """With enable_chunked_prefill TensorRT-LLM accepts a prompt longer than max_num_tokens and prefills it in
    chunks of at most max_num_tokens tokens, one per iteration; the first token comes with the last chunk."""
    chunked.get("/metrics")
    chunked.get("/perf_metrics")
    status, resp = chunked.post("/v1/completions", {"prompt": list(range(1, 2001)), "max_tokens": 3,
                                                    "disaggregated_params": {"request_type": request_type}})
    assert status == 200, resp
    assert resp["usage"]["prompt_tokens"] == 2000
    assert resp["usage"]["completion_tokens"] == (1 if request_type == "context_only" else 3)
    # 2000 = 512 + 512 + 512 + 464: four context iterations, each within max_num_tokens
    assert context_iterations(chunked.get("/metrics")[1]) == [(1, 512, 0), (1, 512, 0), (1, 512, 0), (1, 464, 0)]
    (rec,) = [r for r in chunked.get("/perf_metrics")[1] if r["status"] == "ok"]
    metrics = rec["perf_metrics"]
    # the prefill spans iterations first_iter .. first_iter + 3; the first token is produced by the last chunk
    assert metrics["last_iter"] - metrics["first_iter"] == 3 + (resp["usage"]["completion_tokens"] - 1)
    # a prompt within max_num_tokens still prefills in one iteration
    chunked.get("/metrics")
    assert chunked.post("/v1/completions", {"prompt": list(range(1, 501)), "max_tokens": 2})[0] == 200
    assert context_iterations(chunked.get("/metrics")[1]) == [(1, 500, 0)]


def test_chunked_prefill_shares_the_budget_with_decoding_sequences(engines):
    """In a mixed iteration a chunk takes max_num_tokens minus one token per decoding sequence, rounded down to
    whole chunk units (tokens_per_block, 32): 512 - 1 = 511 -> 480; the last chunk takes the rest."""
    engine = engines.start(worker_yaml(ctx=True, max_num_tokens=512, enable_chunked_prefill=True),
                           "--sim-speed", "1")
    engine.get("/metrics")
    with ThreadPoolExecutor(2) as pool:
        decoding = pool.submit(engine.post, "/v1/completions", {"prompt": [3, 4, 5], "max_tokens": 400})
        engine.wait_for(lambda: engine.state()["numActiveRequests"] == 1, "a decoding sequence")
        time.sleep(0.1)  # past its prefill: it decodes (~5 ms a step) for about 2 s
        long = pool.submit(engine.post, "/v1/completions", {"prompt": list(range(1, 2001)), "max_tokens": 1})
        assert long.result()[0] == 200
        assert decoding.result()[0] == 200
    chunks = [c for c in context_iterations(engine.get("/metrics")[1]) if c != (1, 3, 0)]
    assert chunks == [(1, 480, 1)] * 4 + [(1, 80, 1)]


def _run_in_process(cfg, submit) -> tuple[list, list[dict]]:
    """Run an engine built in this process on what `submit(engine)` queues before it starts (so the first
    iteration sees all of it); returns (the requests, the iteration records)."""
    from baton.engine_sim.engine import Engine

    async def main():
        engine = Engine(cfg)
        seqs = submit(engine)
        engine.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(s.done for s in seqs)), 10)
            return seqs, engine.drain_iteration_stats()
        finally:
            await engine.stop()

    return asyncio.run(main())


def test_pipeline_parallelism_admits_a_micro_batch_per_stage(tmp_path):
    """TensorRT-LLM's PyTorch backend admits max_batch_size x pp_size requests (PyExecutor's
    max_num_active_requests = get_max_num_sequences(); the capacity scheduler's max_num_sequences), one
    micro-batch of up to max_batch_size in flight per pipeline stage; an iteration still runs at most
    max_batch_size of them. The simulator takes the active requests in turn, those that waited longest first."""
    from baton.engine_sim.engine import CTX_AND_GEN, Prompt

    def submit(engine):
        return [engine.submit(kind=CTX_AND_GEN, prompt=Prompt.of([i, i + 1, i + 2]), max_tokens=6)
                for i in range(1, 6)]

    cfg = sim_config(tmp_path, ctx=True, speed="0", max_batch_size=2, pipeline_parallel_size=2)
    seqs, records = _run_in_process(cfg, submit)
    assert max(r["numActiveRequests"] for r in records) == 4  # 2 x 2; the fifth waits in the queue
    assert {(r["maxNumActiveRequests"], r["maxBatchSizeStatic"]) for r in records} == {(4, 2)}
    assert max(r["inflightBatchingStats"]["numScheduledRequests"] for r in records) == 2
    admitted = seqs[:4]  # they take turns, two an iteration: their first tokens come in iterations 1 and 2,
    assert [s.first_iter for s in admitted] == [1, 1, 2, 2]  # and they finish together
    assert max(s.last_iter for s in admitted) - min(s.last_iter for s in admitted) <= 2
    # without pipeline parallelism: max_batch_size active, all of them in every iteration
    plain = sim_config(tmp_path, ctx=True, speed="0", max_batch_size=2)
    _, records = _run_in_process(plain, submit)
    assert max(r["numActiveRequests"] for r in records) == 2
    assert {r["maxNumActiveRequests"] for r in records} == {2}


def test_an_iteration_decodes_at_most_max_num_tokens_sequences(tmp_path):
    """Each decoding sequence takes one token of max_num_tokens; TensorRT-LLM's MicroBatchScheduler stops at
    the first one that would go past it. Generation-only requests, whose prompts were prefilled elsewhere,
    can be more than that: the ones beyond it wait for a later iteration."""
    from baton.engine_sim.engine import CTX_ONLY, GEN_ONLY, Engine, Prompt
    from baton.engine_sim.handoff import OpaqueState
    from baton.engine_sim.transfer_server import KVTransferServer

    async def main():
        ctx = Engine(sim_config(tmp_path, ctx=True, speed="0"))
        server = KVTransferServer(ctx)
        port = await server.start("127.0.0.1", 0)
        ctx.start()
        gen = Engine(sim_config(tmp_path, ctx=False, speed="0", max_num_tokens=2))
        try:
            handed = []
            for i in range(1, 5):
                prompt = Prompt.of(list(range(i, i + 40)))
                seq = ctx.submit(kind=CTX_ONLY, prompt=prompt, max_tokens=1)
                await seq.done
                handed.append((prompt, OpaqueState("127.0.0.1", port, ctx.instance, seq.rid, ctx.state), seq.tokens))
            seqs = [gen.submit(kind=GEN_ONLY, prompt=prompt, max_tokens=5, handle=handle, first_tokens=list(tokens))
                    for prompt, handle, tokens in handed]
            gen._admit()
            await asyncio.gather(*(s.pulling for s in seqs))  # all four decoding before the first iteration
            gen.start()
            await asyncio.wait_for(asyncio.gather(*(s.done for s in seqs)), 10)
            return seqs, gen.drain_iteration_stats()
        finally:
            await gen.stop()
            await server.stop()
            await ctx.stop()

    seqs, records = asyncio.run(main())
    assert all(len(s.tokens) == 5 for s in seqs)
    scheduled = [r["inflightBatchingStats"]["numGenRequests"] for r in records]
    assert max(scheduled) == 2 and sum(scheduled) == 4 * 4, scheduled  # 4 tokens each after the first


def test_prompt_over_max_num_tokens_is_refused_without_chunked_prefill(engines):
    """Without enable_chunked_prefill the same prompt is refused with TensorRT-LLM's text (as in
    test_prompt_over_max_num_tokens_is_refused_with_trtllm_text); generation_only requests are not checked."""
    plain = engines.start(worker_yaml(ctx=True, max_num_tokens=512), "--sim-speed", "0")
    status, err = plain.post("/v1/completions", {"prompt": list(range(1, 2001)), "max_tokens": 1})
    assert status == 400 and err["type"] == "BadRequestError"
    assert err["message"] == "The sum of prompt length (2000.0), query length (0) should not exceed max_num_tokens (512)"
    off = engines.start(worker_yaml(ctx=True, max_num_tokens=512, enable_chunked_prefill=False), "--sim-speed", "0")
    assert off.post("/v1/completions", {"prompt": list(range(1, 2001)), "max_tokens": 1})[0] == 400
    # a quoted "false" is false, as TensorRT-LLM's pydantic options read it (not a non-empty, truthy string)
    quoted = engines.start(worker_yaml(ctx=True, max_num_tokens=512, enable_chunked_prefill="false"), "--sim-speed", "0")
    assert quoted.post("/v1/completions", {"prompt": list(range(1, 2001)), "max_tokens": 1})[0] == 400


def test_request_that_can_never_fit_the_cache_is_refused(small_cache):
    status, err = small_cache.post("/v1/completions", {"prompt": list(range(1, 201)), "max_tokens": 100})
    assert status == 400
    assert "can never fit in the KV cache" in err["message"] and "the cache has 8" in err["message"]


def test_request_that_fits_waits_for_blocks(small_cache):
    small_cache.wait_for(lambda: small_cache.state()["counters"]["numHeldKvRequests"] == 0, "no held KV")
    small_cache.get("/perf_metrics")
    # each needs ceil((100 + 60) / 32) = 5 blocks; two do not fit in 8 at once
    bodies = [{"prompt": list(range(1, 101)), "max_tokens": 60}, {"prompt": list(range(3, 103)), "max_tokens": 60}]
    results = run_concurrently(small_cache, bodies)
    assert [status for status, _ in results] == [200, 200]
    first, second = timings(small_cache)
    assert second["arrival_time"] < first["last_token_time"], "requests did not overlap"
    assert second["first_scheduled_time"] >= first["last_token_time"]


def test_held_kv_counts_against_capacity(small_cache):
    small_cache.wait_for(lambda: small_cache.state()["counters"]["numHeldKvRequests"] == 0, "no held KV")
    expired_before = small_cache.state()["counters"]["kvExpired"]
    status, _ = small_cache.post("/v1/completions", {"prompt": list(range(1, 201)), "max_tokens": 1,
                                                     "disaggregated_params": {"request_type": "context_only"}})
    assert status == 200
    assert small_cache.state()["kvCacheStats"]["usedNumBlocks"] == 7  # 200 tokens held
    small_cache.get("/perf_metrics")
    # needs 4 blocks: waits until the held KV expires (kv_transfer_timeout_ms 500), then runs
    status, resp = small_cache.post("/v1/completions", {"prompt": list(range(1, 101)), "max_tokens": 16})
    assert status == 200, resp
    assert small_cache.state()["counters"]["kvExpired"] == expired_before + 1
    (t,) = timings(small_cache)
    assert t["first_scheduled_time"] - t["arrival_time"] > 0.2


MLA_CONFIG = {  # DeepSeek-V2-Lite's shape: MLA, which context parallelism is allowed with
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
    "num_attention_heads": 16, "num_hidden_layers": 27, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
    "intermediate_size": 10944, "vocab_size": 102400, "max_position_embeddings": 16384, "torch_dtype": "bfloat16",
}


def test_context_parallel_ranks_each_prefill_their_share_of_a_prompt(engines, tmp_path):
    """With context_parallel_size 2 a prompt of up to twice max_num_tokens is admitted without chunking (each
    rank prefills half): it is prefilled, and the request queued behind it runs too."""
    import json

    model = tmp_path / "deepseek-v2-lite"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MLA_CONFIG))
    engine = engines.start(worker_yaml(ctx=False, context_parallel_size=2, max_num_tokens=256),
                           "--sim-speed", "0", "--sim-kv-cache-gib", "4", model=model)
    long_prompt, short_prompt = list(range(1, 400)), [5, 6, 7]  # 399 / 2 ranks <= 256
    results = run_concurrently(engine, [{"prompt": long_prompt, "max_tokens": 2},
                                        {"prompt": short_prompt, "max_tokens": 2}])
    assert [status for status, _ in results] == [200, 200], results
    assert [r["usage"]["prompt_tokens"] for _, r in results] == [399, 3]
