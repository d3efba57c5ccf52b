"""context_only -> generation_only between two processes, KV lifetime on the ctx side, format mismatches."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import re
import socket
import time

import pytest
from simproc import SERVED_MODEL, handoff, sim_config, stream_text, text_of, with_model, worker_yaml

from baton import kvformat, tokens
from baton.engine_sim.handoff import HandoffError, KVPuller, OpaqueState, decode_opaque

MISMATCHES = {
    # name: (gen YAML overrides, extra gen args, expected fragment of TRT-LLM's text)
    "fp8": ({"dtype": "fp8"}, (), "only support same kv cache dtype (kvCacheDtype: context=bf16, generation=fp8)"),
    "tokens_per_block": ({"tokens_per_block": 64}, (),
                         "only support same tokens per block and size per head (tokensPerBlock: context=32, generation=64)"),
    "version": ({}, ("--sim-trtllm-version", "1.1.0"), "trtllmVersion: context=1.2.0, generation=1.1.0"),
    # the model run in float16 (top-level dtype): kv_cache_config.dtype auto caches fp16, not the checkpoint's bf16
    "model_dtype": ({"model_dtype": "float16"}, (),
                    "only support same kv cache dtype (kvCacheDtype: context=bf16, generation=fp16)"),
    "attention_window": ({"kv_cache_config": {"max_attention_window": [512]}}, (),
                         "only support same max_attention_window: it sets the KV pool layout (Baton) "
                         "(maxAttentionWindow: context=unset, generation=[512])"),
}


@pytest.fixture(scope="module")
def ctx(engines):
    return engines.start(worker_yaml(ctx=True, timeout_ms=60_000), "--sim-speed", "0")


@pytest.fixture(scope="module")
def gen(engines):
    return engines.start(worker_yaml(ctx=False), "--sim-speed", "0")


@pytest.fixture(scope="module")
def bad_gens(engines):
    return {
        name: engines.start(worker_yaml(ctx=False, **yaml_kw), "--sim-speed", "0", *args)
        for name, (yaml_kw, args, _) in MISMATCHES.items()
    }


def held(engine) -> int:
    return engine.state()["counters"]["numHeldKvRequests"]


def test_context_only_response_shape(ctx):
    resp = ctx.complete({"prompt": "prefill me please", "max_tokens": 20,
                         "disaggregated_params": {"request_type": "context_only"}})
    choice = resp["choices"][0]
    params = choice["disaggregated_params"]
    assert params["request_type"] == "context_only"
    assert params["first_gen_tokens"] == choice["token_ids"] and len(params["first_gen_tokens"]) == 1
    assert isinstance(params["ctx_request_id"], int) and params["draft_tokens"] is None
    assert isinstance(params["encoded_opaque_state"], str)
    # what the handle carries (the simulator's stand-in for DataTransceiverState): how to reach this worker,
    # which request, and its KV format, as the worker's own state reports them
    opaque = json.loads(base64.b64decode(params["encoded_opaque_state"]))
    own = ctx.state()
    # the port is the KV transfer listener's, a channel apart from the HTTP server (as UCX/NIXL under TensorRT-LLM)
    assert own["kv_port"] not in (0, ctx.port)
    assert opaque == {"protocol": "baton-engine-sim/1", "ctx_request_id": params["ctx_request_id"],
                      "comm_state": {"host": "127.0.0.1", "port": own["kv_port"], "instance": own["instance"]},
                      "cache_state": own["cache_state"]}
    assert choice["finish_reason"] == "length"  # max_tokens forced to 1, original asked for more
    assert resp["prompt_token_ids"] == tokens.tokenize("prefill me please")
    assert resp["usage"]["completion_tokens"] == 1
    # a prompt of ids comes back as sent (the simulator keeps it as JSON text, never decoded)
    ids = [5, 70000, 0, 128255, 31]
    by_ids = ctx.complete({"prompt": ids, "max_tokens": 3, "disaggregated_params": {"request_type": "context_only"}})
    assert by_ids["prompt_token_ids"] == ids and by_ids["usage"]["prompt_tokens"] == len(ids)
    # asked for exactly one token: still "length" (no EOS), as TensorRT-LLM reports it; a router goes on
    one = ctx.complete({"prompt": "one token only", "max_tokens": 1,
                        "disaggregated_params": {"request_type": "context_only"}})
    assert one["choices"][0]["finish_reason"] == "length"


def test_context_only_ignores_stream(ctx):
    resp = ctx.complete({"prompt": "no streaming here", "max_tokens": 4, "stream": True,
                         "disaggregated_params": {"request_type": "context_only"}})
    assert resp["choices"][0]["disaggregated_params"]["ctx_request_id"]


@pytest.mark.parametrize("max_tokens", [1, 2, 9])
def test_handoff_produces_the_same_tokens_as_local(ctx, gen, max_tokens):
    body = {"prompt": f"The same answer either way, {max_tokens}", "max_tokens": max_tokens}
    local = gen.complete(body)
    ctx_resp, (status, gen_resp) = handoff(ctx, gen, body)
    assert status == 200, gen_resp
    assert gen_resp["choices"][0]["token_ids"] == local["choices"][0]["token_ids"]
    assert text_of(gen_resp) == text_of(local)
    assert gen_resp["choices"][0]["token_ids"][0] == ctx_resp["choices"][0]["token_ids"][0]


def test_streaming_handoff(ctx, gen):
    body = {"prompt": "streamed from the decode tier", "max_tokens": 10}
    local = gen.complete(body)
    _, (status, chunks) = handoff(ctx, gen, body, stream=True)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert stream_text(chunks) == text_of(local)


def test_chat_handoff(ctx, gen):
    body = {"messages": [{"role": "user", "content": "hello over two tiers"}], "max_tokens": 5}
    local = gen.complete(body, "/v1/chat/completions")
    _, (status, resp) = handoff(ctx, gen, body, path="/v1/chat/completions")
    assert status == 200 and text_of(resp) == text_of(local)


def test_kv_held_until_pulled_then_freed(ctx, gen):
    before = ctx.state()  # earlier tests may have left unpulled KV behind
    held0, used0 = before["counters"]["numHeldKvRequests"], before["kvCacheStats"]["usedNumBlocks"]
    ctx_body = {"prompt": list(range(1, 101)), "max_tokens": 8, "disaggregated_params": {"request_type": "context_only"}}
    ctx_resp = ctx.complete(ctx_body)
    state = ctx.state()
    assert state["counters"]["numHeldKvRequests"] == held0 + 1
    assert state["kvCacheStats"]["usedNumBlocks"] == used0 + 4  # 100 tokens in blocks of 32
    gen.get("/perf_metrics")
    params = {**ctx_resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    status, gen_resp = gen.post("/v1/completions", {"prompt": ctx_resp["prompt_token_ids"], "max_tokens": 8,
                                                    "disaggregated_params": params})
    assert status == 200, gen_resp
    state = ctx.state()
    assert state["counters"]["numHeldKvRequests"] == held0 and state["kvCacheStats"]["usedNumBlocks"] == used0
    # the gen side recorded the transfer
    records = [r for r in gen.get("/perf_metrics")[1] if r["request_type"] == "generation_only"]
    assert len(records) == 1
    rec = records[0]
    assert rec["ctx_request_id"] == params["ctx_request_id"]
    t = rec["perf_metrics"]["timing_metrics"]
    assert t["kv_cache_size"] == 4 * 32 * 131_072  # 8B bf16: 100 tokens move as 4 whole blocks of 32
    assert t["kv_cache_transfer_start"] <= t["kv_cache_transfer_end"]
    # a second pull of the same KV fails clearly
    status, err = gen.post("/v1/completions", {"prompt": ctx_resp["prompt_token_ids"], "max_tokens": 8,
                                               "disaggregated_params": params})
    assert status == 400 and "already transferred" in err["message"]


def test_decode_worker_with_overlap_rejects_context_only(gen):
    status, err = gen.post("/v1/completions", {"prompt": "x", "disaggregated_params": {"request_type": "context_only"}})
    assert status == 400
    assert err["message"] == "Context only requests are not supported in pytorch backend when overlap is enabled."
    # ... but serves the other two request types
    assert gen.post("/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    assert gen.post("/v1/completions", {"prompt": "x", "max_tokens": 2,
                                        "disaggregated_params": {"request_type": "context_and_generation"}})[0] == 200


@pytest.mark.parametrize("name", sorted(MISMATCHES))
def test_mismatched_tiers_are_rejected_and_counted(ctx, bad_gens, name):
    bad = bad_gens[name]
    before = bad.state()["counters"]["kvFormatRejections"]
    held0 = held(ctx)
    bad.get("/perf_metrics")
    _, (status, err) = handoff(ctx, bad, {"prompt": "cross-generation handoff", "max_tokens": 4})
    assert status == 400
    assert err["message"].startswith("Disagg server does not currently support these cacheState")
    assert MISMATCHES[name][2] in err["message"]
    # counted (cumulative counter in /_sim/state) and visible in /perf_metrics
    assert bad.state()["counters"]["kvFormatRejections"] == before + 1
    rejected = [r for r in bad.get("/perf_metrics")[1] if r["status"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["error"] == err["message"]
    # the gen side told the ctx side in the handshake: the context request failed there and its KV is freed
    ctx.wait_for(lambda: held(ctx) == held0, "the refused handoff's KV to be freed on the ctx side", deadline_s=5)


def test_separately_started_workers_cannot_hand_off_over_mpi(engines):
    """MPI connects only executors launched together in one MPI world: two trtllm-serve processes on
    backend MPI agree on every CacheState field, yet the handoff fails, saying what to change, and the
    context side frees the KV."""
    ctx = engines.start(worker_yaml(ctx=True, backend="MPI"), "--sim-speed", "0")
    gen = engines.start(worker_yaml(ctx=False, backend="MPI"), "--sim-speed", "0")
    _, (status, err) = handoff(ctx, gen, {"prompt": "over mpi", "max_tokens": 4})
    assert status == 400
    assert err["message"].startswith("KV cache transfer over MPI needs the context and generation executors in one")
    assert "UCX or NIXL" in err["message"]
    ctx.wait_for(lambda: held(ctx) == 0, "the refused handoff's KV to be freed on the ctx side", deadline_s=5)


def pull(handles: list[OpaqueState], own: kvformat.CacheState) -> list:
    """Pull over the KV channel as a gen worker does, all of `handles` at once on one channel (without turns to
    receive, so that they all reach the ctx worker at once): the answers or HandoffErrors, in the order of
    `handles`."""
    async def run() -> list:
        puller = KVPuller(timeout_s=10, in_turn=False)
        try:
            return await asyncio.gather(*(puller.pull(h, own, link_bytes_per_s=50e9, x_request_id=f"t-{i}")
                                          for i, h in enumerate(handles)), return_exceptions=True)
        finally:
            await puller.close()
    return asyncio.run(run())


def context_handle(ctx, prompt: str | list[int]) -> OpaqueState:
    resp = ctx.complete({"prompt": prompt, "max_tokens": 3, "disaggregated_params": {"request_type": "context_only"}})
    return decode_opaque(resp["choices"][0]["disaggregated_params"]["encoded_opaque_state"])


def test_ctx_side_also_checks_the_format(ctx):
    """inquireSupport runs on the ctx side: a pull announcing an incompatible CacheState is refused there."""
    handle = context_handle(ctx, "guarded KV")
    own = kvformat.from_wire(ctx.state()["cache_state"])
    peer = kvformat.CacheState(**{**kvformat.to_wire(own), "num_layers": 80})
    before = ctx.state()["counters"]["kvFormatRejections"]
    [err] = pull([handle], peer)
    assert isinstance(err, HandoffError) and err.kind == "format"
    assert err.message.startswith("Disagg server does not currently support these cacheState")
    assert "only support same number of layers (numLayers: context=32, generation=80)" in err.message
    assert ctx.state()["counters"]["kvFormatRejections"] == before + 1
    # the failed handshake failed the context request: its KV is gone, even for a compatible pull
    [gone] = pull([handle], own)
    assert isinstance(gone, HandoffError) and gone.kind == "transfer"
    assert "its handoff failed in the handshake with a generation worker (the KV cache formats differ)" in gone.message
    ok_handle = context_handle(ctx, "guarded KV, pulled right")
    [ok] = pull([ok_handle], own)
    assert ok["ctx_request_id"] == ok_handle.ctx_request_id
    assert ok["kv_cache_size"] == -(-ok["num_tokens"] // 32) * 32 * 131_072  # whole blocks of 32 tokens


def test_kv_channel_serves_concurrent_pulls_and_refuses_stale_handles(ctx):
    """Pulls share one channel and are answered by id; a handle from an earlier incarnation of the worker
    (another instance id) or a second pull of the same KV are refused with the reason."""
    own = kvformat.from_wire(ctx.state()["cache_state"])
    handles = [context_handle(ctx, f"one of many {i}") for i in range(8)]
    served = ctx.state()["counters"]["kvPullsServed"]
    answers = pull(handles, own)
    assert [a["ctx_request_id"] for a in answers] == [h.ctx_request_id for h in handles]
    assert ctx.state()["counters"]["kvPullsServed"] == served + len(handles)
    again, = pull([handles[0]], own)
    assert isinstance(again, HandoffError) and "already transferred" in again.message
    stale = context_handle(ctx, "from another life")
    failed = ctx.state()["counters"]["kvPullsFailed"]
    another_life = OpaqueState(stale.host, stale.port, "0123456789abcdef", stale.ctx_request_id, stale.cache_state)
    [err] = pull([another_life], own)
    assert isinstance(err, HandoffError) and "(it restarted since the prefill)" in err.message
    assert ctx.state()["counters"]["kvPullsFailed"] == failed + 1
    [ok] = pull([stale], own)  # the real owner of that KV still gets it
    assert ok["ctx_request_id"] == stale.ctx_request_id


def test_kv_channel_drops_a_peer_that_does_not_speak_it(ctx, gen):
    """Bytes that are not the KV protocol (say, an HTTP request sent to the KV port) close that connection
    and nothing else: the worker goes on serving handoffs."""
    kv_port = ctx.state()["kv_port"]
    for junk in (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x00\x00\x05hello"):
        with socket.create_connection(("127.0.0.1", kv_port), timeout=5) as sock:
            sock.sendall(junk)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sock.recv(4096):
                pass
            assert sock.recv(4096) == b""  # closed by the worker
    _, (status, resp) = handoff(ctx, gen, {"prompt": "still serving", "max_tokens": 3})
    assert status == 200, resp


def test_held_kv_expires_after_timeout(engines, gen):
    short = engines.start(worker_yaml(ctx=True, timeout_ms=300), "--sim-speed", "0")
    ctx_resp = short.complete({"prompt": list(range(1, 65)), "max_tokens": 4,
                               "disaggregated_params": {"request_type": "context_only"}})
    assert held(short) == 1 and short.state()["kvCacheStats"]["usedNumBlocks"] == 2
    short.wait_for(lambda: held(short) == 0, "held KV to expire", deadline_s=10)
    state = short.state()
    assert state["kvCacheStats"]["usedNumBlocks"] == 0 and state["counters"]["kvExpired"] == 1
    params = {**ctx_resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    status, err = gen.post("/v1/completions", {"prompt": ctx_resp["prompt_token_ids"], "max_tokens": 4,
                                               "disaggregated_params": params})
    assert status == 400 and "expired after kv_transfer_timeout_ms=300" in err["message"]


def test_gen_failure_when_ctx_is_gone(engines, gen):
    doomed = engines.start(worker_yaml(ctx=True), "--sim-speed", "0")
    ctx_resp = doomed.complete({"prompt": "orphaned", "max_tokens": 4,
                                "disaggregated_params": {"request_type": "context_only"}})
    doomed.proc.terminate()
    doomed.proc.wait(timeout=10)
    params = {**ctx_resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    status, err = gen.post("/v1/completions", {"prompt": ctx_resp["prompt_token_ids"], "max_tokens": 4,
                                               "disaggregated_params": params})
    assert status == 400 and "KV transfer from context worker 127.0.0.1:" in err["message"]
    assert gen.state()["counters"]["kvTransferFailures"] >= 1


def test_a_transfer_cut_off_midway_frees_the_blocks(engines):
    """The gen worker goes away during the transfer: the ctx side frees the KV and counts a failed pull."""
    slow = engines.start(worker_yaml(ctx=True), "--sim-speed", "1", "--sim-link-gbps", "0.05")  # 6.25 MB/s
    used0 = slow.state()["kvCacheStats"]["usedNumBlocks"]
    resp = slow.complete({"prompt": list(range(1, 65)), "max_tokens": 3,
                          "disaggregated_params": {"request_type": "context_only"}})
    handle = decode_opaque(resp["choices"][0]["disaggregated_params"]["encoded_opaque_state"])
    own = kvformat.from_wire(slow.state()["cache_state"])
    assert slow.state()["kvCacheStats"]["usedNumBlocks"] == used0 + 2

    async def cut_off() -> None:
        puller = KVPuller(timeout_s=10)
        pulling = asyncio.ensure_future(puller.pull(handle, own, link_bytes_per_s=50e9))
        await asyncio.sleep(0.3)  # 64 tokens x 128 KiB take ~1.3 s at 6.25 MB/s
        assert not pulling.done()
        await puller.close()  # the channel goes down with the pull in flight
        with pytest.raises(HandoffError, match="KV transfer from context worker 127.0.0.1:"):
            await pulling
    asyncio.run(cut_off())
    slow.wait_for(lambda: slow.state()["kvCacheStats"]["usedNumBlocks"] == used0, "the blocks to be freed",
                  deadline_s=5)
    state = slow.state()
    assert state["counters"]["kvPullsFailed"] == 1 and state["counters"]["kvPullsServed"] == 0
    assert state["counters"]["numHeldKvRequests"] == 0


def test_concurrent_transfers_share_the_context_workers_link(engines):
    """Two pulls at once from one context worker take the link one after the other: the pair is done after
    twice the time one takes alone, not side by side at the full rate each."""
    slow = engines.start(worker_yaml(ctx=True), "--sim-speed", "1", "--sim-link-gbps", "0.1")  # 12.5 MB/s
    own = kvformat.from_wire(slow.state()["cache_state"])
    handles = [context_handle(slow, list(range(1, 33))) for _ in range(3)]
    one = 32 * 131_072 / 12.5e6  # 0.34 s: 32 tokens x 128 KiB at 12.5 MB/s

    async def timed(batch) -> float:
        puller = KVPuller(timeout_s=10, in_turn=False)  # both reach the context worker at once
        start = time.monotonic()
        try:
            await asyncio.gather(*(puller.pull(h, own, link_bytes_per_s=50e9) for h in batch))
        finally:
            await puller.close()
        return time.monotonic() - start

    alone = asyncio.run(timed(handles[:1]))
    pair = asyncio.run(timed(handles[1:]))
    assert alone >= one * 0.95
    assert pair >= 1.8 * alone, (alone, pair)  # side by side at the full rate each would take ~alone


def test_a_generation_worker_receives_one_requests_kv_at_a_time_unless_told_otherwise(engines):
    """TensorRT-LLM's generation executor reuses one set of receive resources, so it takes in one request's KV
    at a time, even from two context workers with idle links; TRTLLM_REQUEST_KV_CACHE_CONCURRENT=1 gives it
    resources per context worker, and transfers from two of them arrive side by side."""
    ctxs = [engines.start(worker_yaml(ctx=True), "--sim-speed", "1", "--sim-link-gbps", "0.1") for _ in range(2)]
    serial = engines.start(worker_yaml(ctx=False), "--sim-speed", "1", env={"TRTLLM_REQUEST_KV_CACHE_CONCURRENT": "0"})
    side_by_side = engines.start(worker_yaml(ctx=False), "--sim-speed", "1",
                                 env={"TRTLLM_REQUEST_KV_CACHE_CONCURRENT": "1"})
    assert serial.state()["kv_receive"] == "one at a time"
    assert side_by_side.state()["kv_receive"] == "one at a time per context worker"
    unmodelled = engines.start(worker_yaml(ctx=False), "--sim-speed", "0")
    assert unmodelled.state()["kv_receive"] == "unordered (no modelled time)"
    one = 96 * 131_072 / 12.5e6  # 1.0 s: 96 tokens x 128 KiB at 12.5 MB/s

    def both(gen) -> float:
        """One request prefilled on each context worker, both generated on `gen` at once: how long they took."""
        bodies = []
        for ctx in ctxs:
            resp = ctx.complete({"prompt": list(range(1, 97)), "max_tokens": 2,
                                 "disaggregated_params": {"request_type": "context_only"}})
            params = {**resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
            bodies.append({"prompt": resp["prompt_token_ids"], "max_tokens": 2, "disaggregated_params": params})
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda body: gen.post("/v1/completions", body), bodies))
        took = time.monotonic() - start
        assert [status for status, _ in answers] == [200, 200], answers
        return took

    one_at_a_time = both(serial)
    at_once = both(side_by_side)
    assert one_at_a_time >= 1.8 * one, (one_at_a_time, one)  # the second waited for the first
    assert at_once < 0.75 * one_at_a_time, (at_once, one_at_a_time)
    assert serial.state()["counters"]["kvTransfersCompleted"] == 2


def test_pulls_given_up_while_waiting_for_their_turn_to_receive_free_the_kv_and_leave_the_queue(engines):
    """kv_transfer_timeout_ms also bounds a pull's wait for the generation worker's turn to receive: one that
    runs out there fails saying how long it waited, and one whose request goes away leaves the queue. Neither
    reached the context worker, which is told and frees their KV; the next pull gets its turn as usual."""
    slow = engines.start(worker_yaml(ctx=True), "--sim-speed", "1", "--sim-link-gbps", "0.1")  # 12.5 MB/s
    own = kvformat.from_wire(slow.state()["cache_state"])
    first, timed_out, cancelled, last = (context_handle(slow, list(range(1, 65))) for _ in range(4))  # 0.67 s each

    async def main() -> tuple:
        puller = KVPuller(timeout_s=10)
        try:
            receiving = asyncio.ensure_future(puller.pull(first, own, link_bytes_per_s=50e9))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(puller.pull(cancelled, own, link_bytes_per_s=50e9))
            expired = await asyncio.gather(puller.pull(timed_out, own, link_bytes_per_s=50e9, timeout_s=0.2),
                                           return_exceptions=True)
            waiting.cancel()  # its client went away
            done = await receiving
            after = await puller.pull(last, own, link_bytes_per_s=50e9, timeout_s=5)
            return done, expired[0], after
        finally:
            await asyncio.sleep(0.2)  # the context worker being told of the two given up
            await puller.close()

    done, err, after = asyncio.run(main())
    assert done["ctx_request_id"] == first.ctx_request_id and after["ctx_request_id"] == last.ctx_request_id
    assert isinstance(err, HandoffError) and err.kind == "timeout", err
    assert (f"ctx_request_id {timed_out.ctx_request_id} was not received from context worker 127.0.0.1:"
            f"{timed_out.port} within kv_transfer_timeout_ms=200 of the generation worker") in err.message
    assert re.search(r"\(it waited \d+ ms for this generation worker's turn to receive KV, one request at a time "
                     r"behind other requests\)", err.message), err.message
    slow.wait_for(lambda: held(slow) == 0, "the KV of the pulls given up to be freed", deadline_s=5)
    counters = slow.state()["counters"]
    assert counters["kvPullsServed"] == 2 and counters["kvPullsFailed"] == 2
    [gone] = pull([cancelled], own)
    assert isinstance(gone, HandoffError) and "gave up the pull" in gone.message, gone


def test_transfers_that_run_out_of_time_waiting_for_the_link_leave_it(engines):
    """kv_transfer_timeout_ms also bounds the wait for the link: transfers queued behind others are cut off
    when it runs out, with the wait in the error, their KV freed, and they take no time on the link, so a
    pull arriving afterwards is sent at once."""
    ctx = engines.start(worker_yaml(ctx=True, timeout_ms=1500), "--sim-speed", "1", "--sim-link-gbps", "0.1")
    own = kvformat.from_wire(ctx.state()["cache_state"])
    used = ctx.state()["kvCacheStats"]["usedNumBlocks"]

    def handle() -> OpaqueState:
        return context_handle(ctx, list(range(1, 33)))

    answers = pull([handle() for _ in range(12)], own)  # 0.34 s each on the link: at most four fit in 1.5 s
    assert isinstance(answers[0], dict)
    failed = [a for a in answers if isinstance(a, HandoffError)]
    assert len(failed) >= 7
    assert all("was not sent within kv_transfer_timeout_ms=1500 of the context worker" in e.message for e in failed)
    assert any("ms for the context worker's link behind other transfers" in e.message for e in failed)
    ctx.wait_for(lambda: ctx.state()["kvCacheStats"]["usedNumBlocks"] == used and held(ctx) == 0,
                 "the KV of every transfer to be freed", deadline_s=5)
    # had the cut-off transfers kept their time on the link (8 x 0.34 s), this one would wait past 1.5 s and fail
    [fresh] = pull([handle()], own)
    assert isinstance(fresh, dict), fresh


def test_a_malformed_receive_buffer_size_is_refused_and_the_channel_stays_up(ctx, gen):
    """A pull frame whose recv_buffer_tokens is not a whole number of tokens gets a 400 answer; the channel
    and the other pulls on it go on."""
    from baton.engine_sim.handoff import frame_json

    kv_port = ctx.state()["kv_port"]
    handle = context_handle(ctx, "malformed buffer size")
    own = ctx.state()["cache_state"]
    with socket.create_connection(("127.0.0.1", kv_port), timeout=5) as sock:
        for fid, bad in enumerate(("lots", -1, 2.5, True, 1e400)):
            sock.sendall(frame_json({"id": fid, "ctx_request_id": handle.ctx_request_id,
                                     "instance": handle.instance, "cache_state": own,
                                     "link_bytes_per_s": 50e9, "recv_buffer_tokens": bad}))
            size = int.from_bytes(sock.recv(4), "big")
            data = b""
            while len(data) < size:
                data += sock.recv(size - len(data))
            answer = json.loads(data)
            assert answer["id"] == fid and answer["error"]["status"] == 400, answer
            assert "invalid KV pull request" in answer["error"]["message"]
    [ok] = pull([handle], kvformat.from_wire(own))  # the KV was never touched by the refused frames
    assert ok["ctx_request_id"] == handle.ctx_request_id


def test_refused_handoffs_do_not_starve_the_context_worker(engines, bad_gens):
    """A gen worker that refuses a handle (CacheState mismatch) tells the ctx worker in the handshake, which
    frees the KV at once: refused handoffs no longer pile up held KV until kv_transfer_timeout_ms (here unset:
    forever) and block later context requests."""
    small = engines.start(worker_yaml(ctx=True, kv_cache_config={"max_tokens": 1024}), "--sim-speed", "0")  # 32 blocks
    bad = bad_gens["tokens_per_block"]
    handles = []
    for i in range(2):  # 500 tokens = 16 blocks each: together they fill the cache
        ctx_resp, (status, err) = handoff(small, bad, {"prompt": [5 + i] * 500, "max_tokens": 8})
        assert status == 400 and err["message"].startswith("Disagg server does not currently support these cacheState")
        handles.append(decode_opaque(ctx_resp["choices"][0]["disaggregated_params"]["encoded_opaque_state"]))
    small.wait_for(lambda: small.state()["counters"]["heldKvBlocks"] == 0, "the refused handoffs' KV to be freed",
                   deadline_s=5)
    state = small.state()
    assert state["counters"]["numHeldKvRequests"] == 0 and state["kvCacheStats"]["usedNumBlocks"] == 0
    assert state["counters"]["kvFormatRejections"] == 2  # the ctx side's inquireSupport failed too
    # the context worker still serves
    status, resp = small.request("POST", "/v1/completions", {
        "prompt": [9] * 500, "max_tokens": 1, "disaggregated_params": {"request_type": "context_only"}}, timeout=10)
    assert status == 200, resp
    # a pull of a refused handle says why its KV is gone
    [err] = pull([handles[0]], kvformat.from_wire(small.state()["cache_state"]))
    assert isinstance(err, HandoffError) and "failed in the handshake" in err.message


@pytest.fixture(scope="module")
def short_tiers(engines):
    """A ctx and a gen worker with max_seq_len 256."""
    return (engines.start(worker_yaml(ctx=True, max_seq_len=256, timeout_ms=60_000), "--sim-speed", "0"),
            engines.start(worker_yaml(ctx=False, max_seq_len=256), "--sim-speed", "0"))


def test_max_tokens_lowered_to_max_seq_len_on_both_tiers(short_tiers):
    """TensorRT-LLM's _deduce_max_tokens lowers max_tokens to max_seq_len - prompt on every request type: a
    context-only request that was accepted is followed by a generation-only request that is accepted too."""
    ctx, gen = short_tiers
    body = {"prompt": list(range(1, 201)), "max_tokens": 100}  # 200 + 100 > 256: lowered to 56
    local = gen.complete(body)
    assert local["usage"]["completion_tokens"] == 56 and local["choices"][0]["finish_reason"] == "length"
    _, (status, resp) = handoff(ctx, gen, body)
    assert status == 200, resp
    assert resp["choices"][0]["token_ids"] == local["choices"][0]["token_ids"]
    assert ("User-specified `max_tokens` (100) is greater than deduced `default_max_tokens` (56), using "
            "default_max_tokens instead.") in gen.log()


def test_kv_transfer_timeout_bounds_the_pull_on_the_gen_side(engines, gen):
    """kv_transfer_timeout_ms on the gen worker bounds its pull: the request is cancelled when it runs out,
    and the ctx worker stops sending and frees the KV (the cancel goes over the KV channel)."""
    # 500 tokens x 128 KiB = 65.5 MB over 0.01 Gbit/s (1.25 MB/s): a 52 s transfer; gen timeout 0.5 s
    slow = engines.start(worker_yaml(ctx=True), "--sim-speed", "1", "--sim-link-gbps", "0.01")
    impatient = engines.start(worker_yaml(ctx=False, timeout_ms=500), "--sim-speed", "0")
    used0 = slow.state()["kvCacheStats"]["usedNumBlocks"]
    ctx_resp = slow.complete({"prompt": [3] * 500, "max_tokens": 4,
                              "disaggregated_params": {"request_type": "context_only"}})
    params = {**ctx_resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    started = time.monotonic()
    status, err = impatient.request("POST", "/v1/completions", {
        "prompt": ctx_resp["prompt_token_ids"], "max_tokens": 4, "disaggregated_params": params}, timeout=20)
    assert time.monotonic() - started < 10
    assert status == 400 and err["type"] == "BadRequestError"
    assert err["message"].startswith("KV cache transfer timed out")
    assert "within kv_transfer_timeout_ms=500 of the generation worker" in err["message"]
    assert impatient.state()["counters"]["kvTransferFailures"] == 1
    assert "due to KV cache transfer timeout" in impatient.log()
    slow.wait_for(lambda: slow.state()["kvCacheStats"]["usedNumBlocks"] == used0, "the ctx side to free the KV",
                  deadline_s=5)
    counters = slow.state()["counters"]
    assert counters["kvPullsFailed"] == 1 and counters["kvPullsServed"] == 0
    assert counters["numSendingKvRequests"] == 0 and counters["numHeldKvRequests"] == 0


def test_kv_transfer_timeout_bounds_the_send_on_the_ctx_side(engines, gen):
    """kv_transfer_timeout_ms on the ctx worker counts from the end of the prefill and also bounds the transfer:
    a send still running when it expires is cancelled, the KV freed, and the gen request fails."""
    # a 52 s transfer (see above); the ctx timeout of 3 s leaves ample time to start the pull
    slow = engines.start(worker_yaml(ctx=True, timeout_ms=3000), "--sim-speed", "1", "--sim-link-gbps", "0.01")
    used0 = slow.state()["kvCacheStats"]["usedNumBlocks"]
    ctx_resp = slow.complete({"prompt": [4] * 500, "max_tokens": 4,
                              "disaggregated_params": {"request_type": "context_only"}})
    params = {**ctx_resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    failures = gen.state()["counters"]["kvTransferFailures"]
    started = time.monotonic()
    status, err = gen.request("POST", "/v1/completions", {
        "prompt": ctx_resp["prompt_token_ids"], "max_tokens": 4, "disaggregated_params": params}, timeout=20)
    assert time.monotonic() - started < 10  # the 52 s transfer was cut off
    assert status == 400 and err["message"].startswith("KV cache transfer timed out")
    assert "was not sent within kv_transfer_timeout_ms=3000 of the context worker" in err["message"]
    assert gen.state()["counters"]["kvTransferFailures"] == failures + 1
    state = slow.state()
    assert state["kvCacheStats"]["usedNumBlocks"] == used0
    assert state["counters"]["kvExpired"] == 1 and state["counters"]["kvPullsServed"] == 0
    assert state["counters"]["numSendingKvRequests"] == 0 and state["counters"]["numHeldKvRequests"] == 0
    assert "Terminating context request" in slow.log()


def test_chunked_prefill_prompt_hands_off(engines):
    """A prompt longer than max_num_tokens, prefilled in chunks on a context worker with enable_chunked_prefill,
    hands its whole KV to a generation worker (which checks no prompt length: it prefills nothing), and the
    tokens are the ones a local run produces."""
    opts = {"max_num_tokens": 512, "enable_chunked_prefill": True}
    ctx = engines.start(worker_yaml(ctx=True, timeout_ms=60_000, **opts), "--sim-speed", "0")
    gen = engines.start(worker_yaml(ctx=False, max_num_tokens=512), "--sim-speed", "0")
    body = {"prompt": list(range(1, 2001)), "max_tokens": 6}
    ctx.get("/metrics")
    ctx_resp, (status, gen_resp) = handoff(ctx, gen, body)
    assert status == 200, gen_resp
    assert len(ctx_resp["prompt_token_ids"]) == 2000 and ctx_resp["usage"]["completion_tokens"] == 1
    ctx_iters = [r["inflightBatchingStats"]["numCtxTokens"] for r in ctx.get("/metrics")[1]
                 if r.get("inflightBatchingStats", {}).get("numContextRequests")]
    assert ctx_iters == [512, 512, 512, 464]
    assert gen_resp["usage"] == {"prompt_tokens": 2000, "completion_tokens": 6, "total_tokens": 2006}
    assert gen_resp["choices"][0]["token_ids"][0] == ctx_resp["choices"][0]["token_ids"][0]
    (rec,) = [r for r in gen.get("/perf_metrics")[1] if r["request_type"] == "generation_only"]
    assert rec["perf_metrics"]["timing_metrics"]["kv_cache_size"] == 63 * 32 * ctx.state()["kv_bytes_per_token"]
    assert held(ctx) == 0
    local = ctx.complete(body)
    assert text_of(local) == text_of(gen_resp)


def small_buffer(backend: str) -> dict:
    return {"backend": backend, "max_tokens_in_buffer": 256}  # room for 256 tokens + one block of 32


LONG_PROMPT = list(range(1, 400))  # 13 blocks of 32 = 416 tokens of KV: more than 288
SHORT_PROMPT = list(range(1, 250))  # 8 blocks: fits


@pytest.mark.parametrize(("ctx_buffer", "gen_buffer", "where", "counted"), [
    (256, 256, "the pre-allocated transfer buffers of both workers", ("ctx", "gen")),
    (256, 1024, "the context worker's pre-allocated transfer buffer", ("ctx",)),
    (1024, 256, "the generation worker's pre-allocated transfer buffer", ("gen",)),
])
def test_nixl_fails_a_transfer_that_does_not_fit_a_buffer_and_frees_its_kv(engines, ctx_buffer, gen_buffer, where,
                                                                           counted):
    """TensorRT-LLM sends KV that does not fit a pre-allocated transfer buffer (the context worker's send
    buffer, or the generation worker's receive buffer) through a buffer allocated for it, which the NIXL
    backend cannot do: the transfer fails with an error naming max_tokens_in_buffer, and the context worker
    frees the KV at once. KV that fits is handed off as usual. Each worker counts its own buffer's misses."""
    ctx = engines.start(worker_yaml(ctx=True, backend="NIXL", cache_transceiver_config={"max_tokens_in_buffer": ctx_buffer}),
                        "--sim-speed", "0")
    gen = engines.start(worker_yaml(ctx=False, backend="NIXL", cache_transceiver_config={"max_tokens_in_buffer": gen_buffer}),
                        "--sim-speed", "0")
    _, (status, resp) = handoff(ctx, gen, {"prompt": SHORT_PROMPT, "max_tokens": 3})
    assert status == 200, resp
    used = ctx.state()["kvCacheStats"]["usedNumBlocks"]
    _, (status, err) = handoff(ctx, gen, {"prompt": LONG_PROMPT, "max_tokens": 3})
    assert status == 400
    assert f"(399 tokens) does not fit {where}, and the NIXL backend cannot" in err["message"]
    assert "set cache_transceiver_config.max_tokens_in_buffer to at least the longest prompt" in err["message"]
    assert held(ctx) == 0 and ctx.state()["kvCacheStats"]["usedNumBlocks"] == used  # freed at once
    assert ctx.state()["counters"]["kvPullsFailed"] == 1 and gen.state()["counters"]["kvTransferFailures"] == 1
    for name, engine in (("ctx", ctx), ("gen", gen)):
        assert engine.state()["counters"]["kvTransfersDynamicBuffer"] == (1 if name in counted else 0), name
    _, (status, resp) = handoff(ctx, gen, {"prompt": SHORT_PROMPT, "max_tokens": 3})
    assert status == 200, resp


def test_a_handle_that_fails_the_handshake_is_not_reported_as_a_buffer_problem(engines):
    """The buffers are checked after the handshake: KV that is gone is reported as gone, however long."""
    ctx = engines.start(worker_yaml(ctx=True, backend="NIXL", timeout_ms=200,
                                    cache_transceiver_config={"max_tokens_in_buffer": 256}), "--sim-speed", "0")
    gen = engines.start(worker_yaml(ctx=False, backend="NIXL", cache_transceiver_config={"max_tokens_in_buffer": 256}),
                        "--sim-speed", "0")
    ctx_resp = ctx.complete({"prompt": LONG_PROMPT, "max_tokens": 3,
                             "disaggregated_params": {"request_type": "context_only"}})
    ctx.wait_for(lambda: held(ctx) == 0, "held KV to expire", deadline_s=10)
    params = {**ctx_resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    status, err = gen.post("/v1/completions", {"prompt": ctx_resp["prompt_token_ids"], "max_tokens": 3,
                                               "disaggregated_params": params})
    assert status == 400 and "expired after kv_transfer_timeout_ms=200" in err["message"]
    assert gen.state()["counters"]["kvTransfersDynamicBuffer"] == 0
    assert ctx.state()["counters"]["kvTransfersDynamicBuffer"] == 0


def test_ucx_sends_what_does_not_fit_the_buffers_more_slowly_with_a_warning(engines):
    """With UCX the same transfer succeeds through dynamically allocated buffers, each side whose buffer is too
    small adding --sim-dynamic-buffer-ms (counted in the context worker's transfer time, so within its
    kv_transfer_timeout_ms) and logging a warning that names max_tokens_in_buffer."""
    args = ("--sim-speed", "1", "--sim-dynamic-buffer-ms", "400")
    ctx = engines.start(worker_yaml(ctx=True, cache_transceiver_config=small_buffer("UCX")), *args)
    gen = engines.start(worker_yaml(ctx=False, cache_transceiver_config=small_buffer("UCX")), *args)
    _, (status, fits) = handoff(ctx, gen, {"prompt": SHORT_PROMPT, "max_tokens": 1})
    assert status == 200, fits
    start = time.monotonic()
    _, (status, resp) = handoff(ctx, gen, {"prompt": LONG_PROMPT, "max_tokens": 1})
    elapsed = time.monotonic() - start
    assert status == 200, resp
    assert elapsed >= 0.8  # 400 ms for each side, on top of the prefill and the transfer itself
    for engine in (ctx, gen):
        assert engine.state()["counters"]["kvTransfersDynamicBuffer"] == 1
        assert '"event": "kv_transfer_dynamic_buffer"' in engine.log()
        assert "max_tokens_in_buffer to at least the longest prompt" in engine.log()
    # a transfer that would end past the context worker's kv_transfer_timeout_ms because of it is cut off
    strict = engines.start(worker_yaml(ctx=True, timeout_ms=300, cache_transceiver_config=small_buffer("UCX")), *args)
    _, (status, err) = handoff(strict, gen, {"prompt": LONG_PROMPT, "max_tokens": 1})
    assert status == 400 and "was not sent within kv_transfer_timeout_ms=300 of the context worker" in err["message"]


@pytest.mark.parametrize(("backend", "dynamic"), [("NIXL", 0), ("UCX", 1)])
def test_the_buffer_baton_renders_lets_the_longest_prompts_through(engines, backend, dynamic):
    """The engine configs the operator renders for examples/small.yaml (maxPromptTokens 16384), left without
    maxTokensInBuffer: with NIXL the buffer holds the longest prompt and a 10,000-token handoff goes through
    it; with UCX (8192 tokens) it goes through a buffer allocated for it, counted on both workers."""
    from pathlib import Path

    import yaml
    from spec_fields import set_spec_fields

    from baton.api.v1alpha1 import DisaggregatedModel
    from baton.render import engine_config

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "small.yaml").read_text())
    set_spec_fields(data["spec"], {"engine__kvTransfer": {"backend": backend}})
    m = DisaggregatedModel.model_validate(data)
    ctx = engines.start(engine_config.engine_options(m.spec, "prefill"), "--sim-speed", "0")
    gen = engines.start(engine_config.engine_options(m.spec, "decode"), "--sim-speed", "0")
    assert ctx.state()["transfer_buffer_tokens"] == (16384 if backend == "NIXL" else 8192) + 32
    _, (status, resp) = handoff(ctx, gen, {"prompt": list(range(1, 10_001)), "max_tokens": 2})
    assert status == 200, resp
    assert ctx.state()["counters"]["kvTransfersDynamicBuffer"] == dynamic
    assert gen.state()["counters"]["kvTransfersDynamicBuffer"] == dynamic


def test_a_cancel_right_behind_its_pull_frees_the_kv(engines):
    """A cancel frame that arrives with its pull (the generation side gave up at once) frees the KV even
    though the transfer never began."""
    from baton.engine_sim.handoff import frame_json

    ctx = engines.start(worker_yaml(ctx=True), "--sim-speed", "1", "--sim-link-gbps", "0.1")
    used = ctx.state()["kvCacheStats"]["usedNumBlocks"]
    handle = context_handle(ctx, "given up at once")
    pull_frame = frame_json({"id": 1, "ctx_request_id": handle.ctx_request_id, "instance": handle.instance,
                             "cache_state": ctx.state()["cache_state"], "link_bytes_per_s": 50e9})
    with socket.create_connection(("127.0.0.1", ctx.state()["kv_port"]), timeout=5) as sock:
        sock.sendall(pull_frame + frame_json({"id": 1, "cancel": True}))
        ctx.wait_for(lambda: ctx.state()["kvCacheStats"]["usedNumBlocks"] == used, "the KV to be freed",
                     deadline_s=5)
    state = ctx.state()
    assert state["counters"]["kvPullsFailed"] == 1 and state["counters"]["numSendingKvRequests"] == 0
    assert state["counters"]["kvPullsServed"] == 0


def test_a_generation_request_cancelled_mid_transfer_stops_the_transfer(engines):
    """The client of a generation_only request goes away while its KV is on the way: the pull is cancelled,
    and the context worker frees the KV and its link then, not when the transfer would have ended."""
    ctx = engines.start(worker_yaml(ctx=True), "--sim-speed", "1", "--sim-link-gbps", "0.1")
    gen = engines.start(worker_yaml(ctx=False), "--sim-speed", "1")
    used = ctx.state()["kvCacheStats"]["usedNumBlocks"]
    resp = ctx.complete({"prompt": list(range(1, 321)), "max_tokens": 3,  # 320 x 128 KiB at 12.5 MB/s: 3.4 s
                         "disaggregated_params": {"request_type": "context_only"}})
    params = {**resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    body = json.dumps({"model": SERVED_MODEL, "prompt": resp["prompt_token_ids"], "max_tokens": 3, "stream": True,
                       "disaggregated_params": params}).encode()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", gen.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        ctx.wait_for(lambda: ctx.state()["counters"]["numSendingKvRequests"] == 1, "the transfer to start",
                     deadline_s=5)
    ctx.wait_for(lambda: ctx.state()["kvCacheStats"]["usedNumBlocks"] == used, "the KV to be freed", deadline_s=5)
    assert time.monotonic() - start < 2.5  # the transfer alone would have taken 3.4 s
    assert ctx.state()["counters"]["kvPullsFailed"] == 1 and ctx.state()["counters"]["kvPullsServed"] == 0
    assert gen.state()["counters"]["requestsCancelled"] == 1



def test_a_generation_request_that_leaves_while_queued_frees_its_kv_on_the_context_worker(engines):
    """The generation worker's one batch slot is busy, so a generation_only request waits in its queue; its
    client goes away there, before any pull. The context worker is told and frees the KV now, not at its
    kv_transfer_timeout_ms (none here: it would hold the KV forever)."""
    ctx = engines.start(worker_yaml(ctx=True), "--sim-speed", "0")
    gen = engines.start(worker_yaml(ctx=False, max_batch_size=1), "--sim-speed", "1")
    used = ctx.state()["kvCacheStats"]["usedNumBlocks"]
    resp = ctx.complete({"prompt": list(range(1, 200)), "max_tokens": 3,
                         "disaggregated_params": {"request_type": "context_only"}})
    assert ctx.state()["kvCacheStats"]["usedNumBlocks"] > used  # held for the handoff
    hog = json.dumps(with_model("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2000, "stream": True})).encode()
    body = json.dumps(with_model("/v1/completions", generation_body(resp, "/v1/completions"))).encode()
    with socket.create_connection(("127.0.0.1", gen.port), timeout=5) as busy:
        busy.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(hog) + hog)
        gen.wait_for(lambda: gen.state()["numActiveRequests"] == 1, "the slot to be taken", deadline_s=5)
        with socket.create_connection(("127.0.0.1", gen.port), timeout=5) as waiting:
            waiting.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
            gen.wait_for(lambda: gen.state()["numQueuedRequests"] == 1, "the handoff to queue", deadline_s=5)
        gen.wait_for(lambda: gen.state()["counters"]["requestsCancelled"] == 1, "the cancel", deadline_s=5)
        ctx.wait_for(lambda: ctx.state()["kvCacheStats"]["usedNumBlocks"] == used, "the KV to be freed", deadline_s=5)
        assert ctx.state()["counters"]["kvPullsServed"] == 0


# ------------------------------------------------------------------------------ in process
async def _ctx_with_a_handle(tmp_path, *args: str, speed: str = "1", prompt_len: int = 499):
    """A context worker (in process, with its KV listener; no kv_transfer_timeout_ms, so unpulled KV is held
    for ever) and the handle of one finished context-only request: (engine, listener, handle, prompt, seq)."""
    from baton.engine_sim.engine import CTX_ONLY, Engine, Prompt
    from baton.engine_sim.transfer_server import KVTransferServer

    ctx = Engine(sim_config(tmp_path, *args, ctx=True, speed=speed))
    server = KVTransferServer(ctx)
    port = await server.start("127.0.0.1", 0)
    ctx.start()
    prompt = Prompt.of(list(range(1, prompt_len + 1)))
    seq = ctx.submit(kind=CTX_ONLY, prompt=prompt, max_tokens=1)
    await seq.done
    return ctx, server, OpaqueState("127.0.0.1", port, ctx.instance, seq.rid, ctx.state), prompt, seq


async def _until(predicate, deadline_s: float = 5.0) -> bool:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def test_a_generation_request_cancelled_before_its_pull_task_ran_frees_its_kv(tmp_path):
    """The engine loop admitted the request and created its pull task, and the client's disconnect is handled
    before that task's first step: the task never runs, so the pull frame never goes out. The context worker
    is told, and frees the KV (it has no kv_transfer_timeout_ms: it would hold it for ever)."""
    from baton.engine_sim.engine import GEN_ONLY, Engine

    async def main():
        ctx, server, handle, prompt, seq = await _ctx_with_a_handle(tmp_path)
        gen = Engine(sim_config(tmp_path, ctx=False))
        try:
            assert ctx.snapshot()["sim"]["numHeldKvRequests"] == 1
            g = gen.submit(kind=GEN_ONLY, prompt=prompt, max_tokens=50, handle=handle, first_tokens=list(seq.tokens))
            gen._admit()  # what the loop does at the top of an iteration: the pull task is created, not yet run
            assert g.pulling is not None and not g.pulling.done()
            gen.cancel(g)
            freed = await _until(lambda: ctx.snapshot()["sim"]["numHeldKvRequests"] == 0)
            return freed, ctx.snapshot(), g.pulling.cancelled()
        finally:
            await gen.stop()
            await server.stop()
            await ctx.stop()

    freed, snapshot, cancelled = asyncio.run(main())
    assert cancelled and freed, snapshot["sim"]
    assert snapshot["sim"]["heldKvBlocks"] == 0 and snapshot["sim"]["reservedNumBlocks"] == 0
    assert snapshot["sim"]["kvPullsFailed"] == 1 and snapshot["sim"]["kvPullsServed"] == 0  # told once


@pytest.mark.parametrize("how", ["cancelled", "timed_out"])
def test_a_pull_given_up_while_it_connects_frees_the_kv(tmp_path, monkeypatch, how):
    """The pull has its turn and is connecting to the context worker (a slow connect: SYN retries, DNS) when its
    request goes away, or when the generation worker's kv_transfer_timeout_ms runs out: its frame never went
    out, so no cancel frame can follow it. The context worker is told instead and frees the KV."""
    from baton.engine_sim.engine import GEN_ONLY, TRANSFER, Engine, EngineError

    connect = KVPuller._channel

    async def slow_channel(self, host, port):
        await asyncio.sleep(0.3)
        return await connect(self, host, port)

    monkeypatch.setattr(KVPuller, "_channel", slow_channel)

    async def main():
        ctx, server, handle, prompt, seq = await _ctx_with_a_handle(tmp_path)
        gen = Engine(sim_config(tmp_path, ctx=False, **({"timeout_ms": 100} if how == "timed_out" else {})))
        gen.start()
        try:
            g = gen.submit(kind=GEN_ONLY, prompt=prompt, max_tokens=50, handle=handle, first_tokens=list(seq.tokens))
            if how == "cancelled":
                await asyncio.sleep(0.05)  # admitted; the pull has its turn and is connecting (for 0.3 s)
                assert g.phase == TRANSFER and not g.pulling.done()
                gen.cancel(g)
            else:  # 100 ms: it runs out while the pull connects
                with pytest.raises(EngineError, match="KV cache transfer timed out"):
                    await g.done
            freed = await _until(lambda: ctx.snapshot()["sim"]["numHeldKvRequests"] == 0)
            return freed, ctx.snapshot()
        finally:
            await gen.stop()
            await server.stop()
            await ctx.stop()

    freed, snapshot = asyncio.run(main())
    assert freed, snapshot["sim"]
    assert snapshot["sim"]["heldKvBlocks"] == 0 and snapshot["sim"]["reservedNumBlocks"] == 0
    assert snapshot["sim"]["kvPullsFailed"] == 1 and snapshot["sim"]["kvPullsServed"] == 0


def test_a_puller_keeps_no_receive_turn_for_context_workers_it_no_longer_pulls_from(engines):
    """With TRTLLM_REQUEST_KV_CACHE_CONCURRENT=1 a generation worker takes turns per context worker; a turn
    nobody holds or waits for is dropped, so a long-lived worker does not keep one for every context worker
    it ever pulled from (context workers come and go with every rollout)."""
    ctxs = [engines.start(worker_yaml(ctx=True), "--sim-speed", "1") for _ in range(2)]
    own = kvformat.from_wire(ctxs[0].state()["cache_state"])
    handles = [context_handle(c, [1, 2, 3]) for c in ctxs]

    async def main():
        puller = KVPuller(timeout_s=10, receive_per_context_worker=True)
        try:
            answers = await asyncio.gather(*(puller.pull(h, own, link_bytes_per_s=50e9) for h in handles))
            return answers, dict(puller._turns)
        finally:
            await puller.close()

    answers, turns = asyncio.run(main())
    assert [a["ctx_request_id"] for a in answers] == [h.ctx_request_id for h in handles]
    assert turns == {}


def test_kv_moves_and_is_counted_in_whole_blocks(tmp_path):
    """TensorRT-LLM sends a request's KV block by block, the last one partly filled, and counts the blocks'
    bytes in kv_cache_size: a 100-token prompt in blocks of 32 moves 4 blocks, 128 tokens' worth of KV, and the
    transfer takes their time over the link."""
    from baton.engine_sim.engine import CTX_ONLY, Engine, Prompt

    async def main():
        ctx = Engine(sim_config(tmp_path, ctx=True))  # --sim-speed 1, the default 50 GB/s link
        ctx.start()
        try:
            seq = ctx.submit(kind=CTX_ONLY, prompt=Prompt.of(list(range(1, 101))), max_tokens=1)
            await seq.done
            held = ctx.begin_pull(seq.rid, ctx.instance, ctx.state)
            seconds = ctx.pull_seconds(held, None)
            return held, seconds, ctx.end_pull(held, time.monotonic()), dict(ctx.counters)
        finally:
            await ctx.stop()

    held, seconds, answer, counters = asyncio.run(main())
    block_bytes = 32 * 131_072  # Llama-3-8B, bf16: 128 KiB per token
    assert held.kv_bytes == answer["kv_cache_size"] == counters["kvBytesSent"] == 4 * block_bytes
    assert answer["num_tokens"] == 100
    assert seconds == pytest.approx(4 * block_bytes / 50e9)


def test_a_generation_request_that_ends_with_its_transfer_counts_as_completed(tmp_path):
    """A generation_only request whose max_tokens the context worker's tokens already cover ends as its KV
    arrives, outside any iteration: the next iteration record counts it in numCompletedRequests, and
    --sim-fail-after counts it at once."""
    from baton.engine_sim.engine import CTX_AND_GEN, GEN_ONLY, Engine, Prompt

    async def main(*gen_args: str):
        ctx, server, handle, prompt, seq = await _ctx_with_a_handle(tmp_path, speed="0")
        gen = Engine(sim_config(tmp_path, *gen_args, ctx=False, speed="0"))
        gen.start()
        try:
            g = gen.submit(kind=GEN_ONLY, prompt=prompt, max_tokens=1, handle=handle, first_tokens=list(seq.tokens))
            await g.done
            await asyncio.sleep(0.05)
            fatal = gen.fatal
            if fatal is None:
                local = gen.submit(kind=CTX_AND_GEN, prompt=Prompt.of([1, 2, 3]), max_tokens=2)
                await local.done
            return fatal, gen.drain_iteration_stats(), dict(gen.counters)
        finally:
            await gen.stop()
            await server.stop()
            await ctx.stop()

    fatal, records, counters = asyncio.run(main())
    assert fatal is None and counters["requestsCompleted"] == 2
    assert sum(r["numCompletedRequests"] for r in records) == 2
    fatal, _, counters = asyncio.run(main("--sim-fail-after", "1"))
    assert counters["requestsCompleted"] == 1
    assert fatal == "injected fault after 1 finished requests (--sim-fail-after)"


def test_a_pull_that_fails_after_the_engine_went_fatal_is_not_a_transfer_failure(tmp_path):
    """The generation worker enters the fatal state while a KV transfer is under way: its request fails with the
    fatal reason then. The pull breaking off afterwards (here the context worker goes away) is no transfer
    failure of a live request, and is not counted in kvTransferFailures."""
    from baton.engine_sim.engine import GEN_ONLY, TRANSFER, Engine, EngineError

    async def main():
        # 499 tokens = 16 blocks of 4 MiB at 12.5 MB/s: a 5 s transfer
        ctx, server, handle, prompt, seq = await _ctx_with_a_handle(tmp_path, "--sim-link-gbps", "0.1")
        gen = Engine(sim_config(tmp_path, "--sim-link-gbps", "0.1", ctx=False))
        gen.start()
        try:
            g = gen.submit(kind=GEN_ONLY, prompt=prompt, max_tokens=4, handle=handle, first_tokens=list(seq.tokens))
            assert await _until(lambda: ctx.snapshot()["sim"]["numSendingKvRequests"] == 1)
            assert g.phase == TRANSFER
            gen.set_fatal("test")
            with pytest.raises(EngineError, match="engine is in a fatal state: test"):
                await g.done
            await server.stop()  # the channel breaks: the pull still under way fails
            await asyncio.wait_for(asyncio.shield(g.pulling), 5)
            return dict(gen.counters)
        finally:
            await gen.stop()
            await server.stop()
            await ctx.stop()

    counters = asyncio.run(main())
    assert counters["kvTransferFailures"] == 0 and counters["requestsFailed"] == 1


# ------------------------------------------------------------------------------ failed generations, as trtllm-serve
def raw_post(engine, path: str, body: dict, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """POST `body` on a fresh connection and read until the server closes it: (head, raw body as sent)."""
    data = json.dumps(with_model(path, body)).encode()
    with socket.create_connection(("127.0.0.1", engine.port), timeout=timeout) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), len(data)) + data)
        got = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            got += piece
    head, _, rest = got.partition(b"\r\n\r\n")
    return head, rest


def generation_body(ctx_resp: dict, path: str, **extra) -> dict:
    params = {**ctx_resp["choices"][0]["disaggregated_params"], "request_type": "generation_only"}
    if "chat" in path:  # the request's messages stay (trtllm-serve requires them), its ids carry the prompt
        prompt = {"messages": [{"role": "user", "content": "x"}], "prompt_token_ids": ctx_resp["prompt_token_ids"]}
    else:
        prompt = {"prompt": ctx_resp["prompt_token_ids"]}
    return {**prompt, "max_tokens": 4, "disaggregated_params": params, **extra}


def test_a_failed_handoff_not_streamed_is_a_400_bad_request_with_the_message(ctx, gen, bad_gens):
    """trtllm-serve answers any exception of a generation `create_error_response(str(e))`: 400 BadRequestError
    with the message, a failed KV handoff included (a CacheState mismatch, KV the context worker no longer has);
    the failure is logged as one (WARNING), not as a refused request."""
    _, (status, err) = handoff(ctx, bad_gens["fp8"], {"prompt": "mismatched, not streamed", "max_tokens": 4})
    assert status == 400
    assert err == {"object": "error", "message": err["message"], "type": "BadRequestError", "param": None,
                   "code": 400}
    assert err["message"].startswith("Disagg server does not currently support these cacheState")
    ctx_resp = ctx.complete({"prompt": "pulled twice", "max_tokens": 4,
                             "disaggregated_params": {"request_type": "context_only"}})
    assert gen.post("/v1/completions", generation_body(ctx_resp, "/v1/completions"),
                    headers={"X-Request-Id": "pulled-twice"})[0] == 200
    status, err = gen.post("/v1/completions", generation_body(ctx_resp, "/v1/completions"),
                           headers={"X-Request-Id": "pulled-twice-again"})
    assert status == 400 and err["type"] == "BadRequestError" and err["code"] == 400
    assert "is not available on this context worker" in err["message"]
    failed = [json.loads(line) for line in gen.log().splitlines() if "pulled-twice-again" in line]
    assert any(e.get("event") == "request_failed" and e["level"] == "WARNING" for e in failed), failed


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("failure", ["kv_mismatch", "kv_gone"])
def test_a_failed_streamed_handoff_answers_200_then_closes_the_connection_mid_body(ctx, gen, bad_gens, path, failure):
    """trtllm-serve returns its StreamingResponse once the request is accepted: the 200 and the SSE headers are
    out before the first token. When the generation then raises (a failed handoff), the stream generator
    re-raises and uvicorn closes the connection: a chunked body without its last chunk, no error event, no
    [DONE]. The chat role chunk comes with the first token, so nothing at all is in the body."""
    ctx_resp = ctx.complete({"prompt": f"streamed {failure} {path}", "max_tokens": 4,
                             "disaggregated_params": {"request_type": "context_only"}})
    target = gen
    if failure == "kv_mismatch":
        target = bad_gens["tokens_per_block"]
    else:  # the KV was pulled already: the context worker no longer has it (failed during the transfer)
        assert gen.post(path, generation_body(ctx_resp, path))[0] == 200
    head, body = raw_post(target, path, generation_body(ctx_resp, path, stream=True))
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK", head
    fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert fields["content-type"].startswith("text/event-stream") and fields["transfer-encoding"] == "chunked"
    assert body == b""  # no event, no [DONE], and no last chunk ("0\r\n\r\n"): the connection just closed


def test_a_stream_that_fails_after_its_first_tokens_is_cut_without_an_error_event(engines):
    """A generation that fails after some tokens were streamed (here the engine enters its fatal state): the
    tokens sent stay sent, then the connection closes without the last chunk, an error event or [DONE]."""
    worker = engines.start(worker_yaml(ctx=False), "--sim-speed", "1")
    data = json.dumps(with_model("/v1/completions", {"prompt": "a long story", "max_tokens": 2000, "stream": True})).encode()
    with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(data) + data)
        got = b""
        while got.count(b"data: ") < 3:
            piece = sock.recv(65536)
            assert piece, got
            got += piece
        assert worker.post("/_sim/fatal", {"reason": "mid-stream test"})[0] == 200
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            got += piece
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body.count(b"data: ") >= 3 and b"[DONE]" not in body and b'"object": "error"' not in body
    assert not body.endswith(b"0\r\n\r\n")


def test_every_finished_request_is_logged_at_info_with_the_request_id_it_came_with(ctx, gen):
    """One request followed through both workers' logs by the scheduler's X-Request-Id: its context phase on
    the context worker, its generation on the generation worker, streamed or not."""
    for rid, streamed in (("followed-streamed", True), ("followed-whole", False)):
        ctx_resp = ctx.complete({"prompt": f"a request to follow, {rid}", "max_tokens": 4,
                                 "disaggregated_params": {"request_type": "context_only"}},
                                headers={"X-Request-Id": rid})
        body = generation_body(ctx_resp, "/v1/completions")
        if streamed:
            status, chunks = gen.stream(body, headers={"X-Request-Id": rid})
            assert status == 200 and chunks[-1] == "[DONE]"
        else:
            assert gen.post("/v1/completions", body, headers={"X-Request-Id": rid})[0] == 200
        for engine, kind in ((ctx, "context_only"), (gen, "generation_only")):
            engine.wait_for(lambda: rid in engine.log(), f"{rid} in the {kind} worker's log")
            done = [json.loads(line) for line in engine.log().splitlines() if f'"{rid}"' in line]
            assert [(e["event"], e["level"], e["request_type"]) for e in done] == [("request_done", "INFO", kind)]
            assert done[0]["completion_tokens"] == (1 if kind == "context_only" else 4)
