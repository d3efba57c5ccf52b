"""The Triton runtime end to end: Triton-fronted engine simulators (a real Triton server through PyTriton,
KServe v2 over HTTP and gRPC) behind a real `baton scheduler` with `runtime: triton`.

What the client gets through the scheduler must equal what the simulator answers for the same request over
its HTTP front end, on the local path (context_and_generation on the decode worker) and the disaggregated
one (context_only on the prefill worker, then generation_only with the context_phase_params tensor and a KV
pull), streaming or not; an incompatible pair fails with TensorRT-LLM's message.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from triton_harness import (
    MODEL,
    get_json,
    http,
    loopback_listeners,
    parse_sse,
    post_json,
    prompt_ids,
    without_ids,
)

# The first test to use the deployment may install the PyTriton venv (~1.5 minutes on a fresh machine).
pytestmark = pytest.mark.timeout(1500)

CASES = [  # (api path, body): short prompts stay local, long ones (>= 1024 tokens) are disaggregated
    ("/v1/completions", {"prompt": prompt_ids(40, seed=1), "max_tokens": 9}, "local"),
    ("/v1/completions", {"prompt": prompt_ids(1500, seed=2), "max_tokens": 9}, "disaggregated"),
    ("/v1/completions", {"prompt": "Tell me about batons. " * 300, "max_tokens": 5}, "disaggregated"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6}, "local"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "relay " * 1000}], "max_tokens": 6},
     "disaggregated"),
]


def kv_port(proc) -> int:
    """The port of a worker's KV transfer listener, which its handles name (as UCX/NIXL's under TensorRT-LLM)."""
    return get_json(proc.sim_url + "/_sim/state")["kv_port"]


def _choice_text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize(("path", "body", "route"), CASES, ids=[
    "completions-short-ids", "completions-long-ids", "completions-long-text", "chat-short", "chat-long"])
def test_outputs_equal_the_http_front_end_streaming_and_not(deployment, path, body, route):
    sched, ref = deployment["scheduler"], deployment["reference"]
    body = {"model": MODEL, **body}
    rid = f"triton-{route}-{path.rsplit('/', 1)[-1]}-{len(json.dumps(body))}"

    status, headers, routed = post_json(sched.url + path, body, headers={"X-Request-Id": rid})
    assert status == 200, routed
    assert headers["X-Baton-Route"] == route
    assert headers["X-Baton-Decode-Endpoint"] == deployment["decode"].address
    status, _, direct = post_json(ref.url + path, body)
    assert status == 200, direct
    assert _choice_text(routed) == _choice_text(direct)
    assert routed["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
    assert routed["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"] == "length"
    assert routed["usage"] == direct["usage"]

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = http("POST", sched.url + path, streamed, headers={"X-Request-Id": rid + "-s"})
    assert status == 200, raw[:500]
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Baton-Route"] == route
    _, _, raw_direct = http("POST", ref.url + path, streamed)
    events, direct_events = parse_sse(raw), parse_sse(raw_direct)
    assert events[-1] == "[DONE]"
    assert without_ids(events) == without_ids(direct_events)


def test_disaggregated_requests_hand_the_kv_over_through_context_phase_params(deployment):
    """The prefill worker ran context_only, the decode worker generation_only on that ctx_request_id and
    pulled its KV; the request id reached both engines through Triton's header forwarding."""
    sched, prefill, decode = deployment["scheduler"], deployment["prefill"], deployment["decode"]
    get_json(prefill.sim_url + "/perf_metrics")
    get_json(decode.sim_url + "/perf_metrics")
    pulls = get_json(prefill.sim_url + "/_sim/state")["counters"]["kvPullsServed"]
    body = {"model": MODEL, "prompt": prompt_ids(2000, seed=7), "max_tokens": 4}
    status, headers, answer = post_json(sched.url + "/v1/completions", body, headers={"X-Request-Id": "handoff-1"})
    assert status == 200, answer
    assert headers["X-Baton-Route"] == "disaggregated"
    assert headers["X-Baton-Prefill-Endpoint"] == prefill.address
    ctx = [r for r in get_json(prefill.sim_url + "/perf_metrics") if r["x_request_id"] == "handoff-1"]
    gen = [r for r in get_json(decode.sim_url + "/perf_metrics") if r["x_request_id"] == "handoff-1"]
    assert [r["request_type"] for r in ctx] == ["context_only"]
    assert [r["request_type"] for r in gen] == ["generation_only"]
    assert gen[0]["ctx_request_id"] == ctx[0]["ctx_request_id"]
    assert gen[0]["perf_metrics"]["timing_metrics"]["kv_cache_size"] == 2000 * 65536  # fp8 llama-3-8b
    assert answer["usage"] == {"prompt_tokens": 2000, "completion_tokens": 4, "total_tokens": 2004}
    assert get_json(prefill.sim_url + "/_sim/state")["counters"]["kvPullsServed"] == pulls + 1


def test_incompatible_kv_formats_fail_with_the_engines_message(deployment):
    sched, prefill, decode16 = deployment["scheduler_fp16"], deployment["prefill"], deployment["decode_fp16"]
    before = get_json(decode16.sim_url + "/_sim/state")["counters"]["kvFormatRejections"]
    body = {"model": MODEL, "prompt": prompt_ids(1500, seed=3), "max_tokens": 4}
    status, headers, answer = post_json(sched.url + "/v1/completions", body)
    assert status == 502, answer
    assert headers["X-Baton-Error"] == "kv_format_mismatch"
    assert headers["X-Baton-Prefill-Endpoint"] == prefill.address
    assert headers["X-Baton-Decode-Endpoint"] == decode16.address
    message = answer["error"]["message"]
    assert "Disagg server does not currently support these cacheState" in message
    assert "only support same kv cache dtype (kvCacheDtype: context=fp8, generation=fp16)" in message
    assert "Traceback" not in message
    assert get_json(decode16.sim_url + "/_sim/state")["counters"]["kvFormatRejections"] == before + 1
    debug = get_json(sched.url + "/debug/state")
    assert f"{prefill.address}->{decode16.address}" in debug["incompatiblePairs"]


def test_kserve_v2_surface_and_loopback_only(deployment, pytriton_python):
    prefill, decode = deployment["prefill"], deployment["decode"]
    # KServe v2 over HTTP
    assert http("GET", prefill.url + "/v2/health/live")[0] == 200
    meta = get_json(prefill.url + "/v2/models/context")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["context_phase_params"] == "UINT8"
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["context_phase_params"] == "UINT8"
    config = get_json(decode.url + "/v2/models/generation/config")
    assert config["model_transaction_policy"]["decoupled"] is True
    # every listening socket of the Triton-fronted workers (Triton, stubs, the simulator) is on 127.0.0.1
    for proc in (prefill, decode):
        listeners = loopback_listeners(proc.session_pids())
        ports = {port for _, port in listeners}
        own = {proc.port, proc.grpc_port, proc.sim_port, kv_port(proc)}  # with the KV transfer listener
        assert len(own) == 4 and own <= ports, listeners
        assert all(addr == "127.0.0.1" for addr, _ in listeners), listeners


def test_grpc_context_only_and_overlap_refusal(deployment):
    """Direct tritonclient calls: the context model returns the handle; a decode worker (overlap scheduler
    on) refuses context_only with TensorRT-LLM's message, as its HTTP front end does."""
    import numpy as np
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import InferInput
    from tritonclient.utils import InferenceServerException

    prefill, decode = deployment["prefill"], deployment["decode"]
    ids = prompt_ids(64, seed=11)

    def inputs():
        a = InferInput("input_ids", [1, len(ids)], "INT32")
        a.set_data_from_numpy(np.array([ids], dtype=np.int32))
        b = InferInput("request_output_len", [1, 1], "INT32")
        b.set_data_from_numpy(np.array([[3]], dtype=np.int32))
        return [a, b]

    async def run():
        ctx = grpcclient.InferenceServerClient(f"127.0.0.1:{prefill.grpc_port}")
        gen = grpcclient.InferenceServerClient(f"127.0.0.1:{decode.grpc_port}")
        try:
            result = await ctx.infer("context", inputs(), parameters={"request_type": "context_only"})
            handle = json.loads(result.as_numpy("context_phase_params").tobytes())
            opaque = json.loads(base64.b64decode(handle["encoded_opaque_state"]))
            refused = unary = None
            try:
                await gen.infer("context", inputs(), parameters={"request_type": "context_only"})
            except InferenceServerException as exc:
                refused = exc.message()
            try:  # Triton itself: the decoupled model only streams
                await gen.infer("generation", inputs())
            except InferenceServerException as exc:
                unary = exc.message()
            return result.as_numpy("output_ids").tolist(), handle, opaque, refused, unary
        finally:
            await ctx.close()
            await gen.close()

    output_ids, handle, opaque, refused, unary = asyncio.run(run())
    assert output_ids == [[handle["first_gen_tokens"]]]
    assert opaque["protocol"] == "baton-engine-sim/1"
    assert opaque["comm_state"]["host"] == "127.0.0.1" and opaque["comm_state"]["port"] == kv_port(prefill)
    assert opaque["ctx_request_id"] == handle["ctx_request_id"]
    assert opaque["cache_state"]["kv_dtype"] == "fp8"
    assert refused is not None
    assert "400 BadRequestError: Context only requests are not supported in pytorch backend when overlap is enabled." in refused
    assert unary is not None and "decoupled" in unary


def test_sampling_parameters_reach_the_engines_as_tensors(deployment):
    """temperature/top_p/seed/stop go through a `runtime: triton` scheduler as the backend's input tensors, on the
    local route and to both workers of a disaggregated one; the answer is the simulator's (which, like its HTTP
    front end, generates the same tokens whatever the sampling); a parameter no tensor carries is a 400."""
    sched, ref = deployment["scheduler"], deployment["reference"]
    sampling = {"temperature": 0.5, "top_p": 0.25, "seed": 1234, "stop": ["\n\n", "END"], "stop_token_ids": [13],
                "min_tokens": 2}
    want = {"temperature": 0.5, "runtime_top_p": 0.25, "seed": 1234, "stop_words": ["\n\n", "END"],
            "stop_words_list": [[13]], "min_tokens": 2}
    for route, prompt, workers in (("local", prompt_ids(40, seed=21), ("decode",)),
                                   ("disaggregated", prompt_ids(1500, seed=22), ("prefill", "decode"))):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, **sampling}
        rid = f"sampling-{route}"
        status, headers, routed = post_json(sched.url + "/v1/completions", body, headers={"X-Request-Id": rid})
        assert status == 200, routed
        assert headers["X-Baton-Route"] == route
        status, _, direct = post_json(ref.url + "/v1/completions", body)
        assert status == 200, direct
        assert routed["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
        assert routed["choices"][0]["text"] == direct["choices"][0]["text"]
        for name in workers:
            seen = get_json(deployment[name].sim_url + f"/_sim/triton/requests?request_id={rid}")
            assert len(seen) == 1, (name, seen)
            assert seen[0]["sampling"] == want, (name, seen)

    status, _, refused = post_json(sched.url + "/v1/completions",
                                   {"model": MODEL, "prompt": prompt_ids(40, seed=23), "logit_bias": {"5": 1}})
    assert status == 400, refused
    assert refused["error"]["type"] == "invalid_request_error" and refused["error"]["param"] == "logit_bias"
    assert "runtime: triton" in refused["error"]["message"]
    # a value the engine refuses (the executor's range check) comes back as the engine's 400
    status, _, bad = post_json(sched.url + "/v1/completions",
                               {"model": MODEL, "prompt": prompt_ids(40, seed=24), "temperature": -1})
    assert status == 400, bad
    assert "temperature must be >= 0" in bad["message"]
