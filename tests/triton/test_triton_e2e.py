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
import time
from collections.abc import Iterator

import pytest
from tokenizer_fixture import model_dir_with_tokenizer
from triton_harness import (
    MODEL,
    MODEL_DIR,
    get_json,
    http,
    loopback_listeners,
    parse_sse,
    post_json,
    prompt_ids,
    start_http_engine,
    stop_all,
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
    # one token: the context-only answer says "length" (as trtllm-serve's), so generation still runs
    ("/v1/completions", {"prompt": prompt_ids(1500, seed=4), "max_tokens": 1}, "disaggregated"),
]


def kv_port(proc) -> int:
    """The port of a worker's KV transfer listener, which its handles name (as UCX/NIXL's under TensorRT-LLM)."""
    return get_json(proc.sim_url + "/_sim/state")["kv_port"]


def _choice_text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize(("path", "body", "route"), CASES, ids=[
    "completions-short-ids", "completions-long-ids", "completions-long-text", "chat-short", "chat-long",
    "completions-long-one-token"])
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
    # fp8 llama-3-8b: 65,536 bytes per token, moved (and counted) in whole blocks of 32 tokens: 63 blocks
    assert gen[0]["perf_metrics"]["timing_metrics"]["kv_cache_size"] == 63 * 32 * 65536
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
    # a value the executor's range check refuses (its Triton backend would report it as INTERNAL, the replica's
    # fault) is the client's 400 before any replica is asked
    status, _, bad = post_json(sched.url + "/v1/completions",
                               {"model": MODEL, "prompt": prompt_ids(40, seed=24), "temperature": -1})
    assert status == 400, bad
    assert "temperature must be at least 0" in json.dumps(bad)


@pytest.mark.parametrize(("extra", "param"), [
    ({"max_tokens": 2**31}, "max_tokens"),  # beyond the INT32 request_output_len: not a 500
    ({"prompt": [1, 2**31]}, "prompt"),
    ({"top_p": 0}, "top_p"),  # the backend would drop it (runtime_top_p <= 0 is unset)
    ({"best_of": 3}, "best_of"),  # best-of sampling without beam search: not what the backend does
    ({"max_completion_tokens": 5}, "max_completion_tokens"),  # chat's field: trtllm-serve refuses it here too
])
def test_requests_the_triton_runtime_cannot_translate_are_400s(deployment, extra, param):
    sched = deployment["scheduler"]
    body = {"model": MODEL, "prompt": prompt_ids(40, seed=25), "max_tokens": 4, **extra}
    status, headers, answer = post_json(sched.url + "/v1/completions", body)
    assert status == 400, answer
    error = answer.get("error", answer)
    assert error["param"] == param, answer
    assert "X-Baton-Error" not in headers or headers["X-Baton-Error"] != "engine_error", headers


def test_use_beam_search_alone_is_one_beam(deployment):
    """beam width = best_of or n (1) with use_beam_search, as trtllm-serve's SamplingParams: no beam_width input,
    the same answer as the HTTP front end gives the same request (one beam there too); the Triton front end
    refuses a width > 1."""
    sched, ref = deployment["scheduler"], deployment["reference"]
    body = {"model": MODEL, "prompt": prompt_ids(40, seed=26), "max_tokens": 3, "use_beam_search": True}
    status, _, routed = post_json(sched.url + "/v1/completions", body)
    assert status == 200, routed
    status, _, direct = post_json(ref.url + "/v1/completions", body)
    assert status == 200, direct
    assert routed["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]


def test_tritons_own_refusal_inside_a_stream_is_the_clients_400(deployment, monkeypatch):
    """Triton's input validation (here: an input the model does not declare, as `seed` is to a backend before May
    2025) reaches tritonclient's stream without a status; it must still be a 400 passed through, not a retried
    500, on the unary context model and in the generation stream, streamed or not."""
    import numpy as np
    from tritonclient.grpc import InferInput

    from baton.scheduler import engines
    from baton.scheduler.endpoints import Endpoint

    original = engines._TritonCall.inputs

    def renamed(self, streaming):
        out = []
        for tensor in original(self, streaming):
            if tensor.name() == "seed":
                tensor = InferInput("random_seed", [1, 1], "UINT64")
                tensor.set_data_from_numpy(np.array([[7]], dtype=np.uint64))
            out.append(tensor)
        return out

    monkeypatch.setattr(engines._TritonCall, "inputs", renamed)
    ids = prompt_ids(40, seed=27)

    async def run():
        client = engines.TritonClient(read_timeout=30)
        answers = {}
        try:
            for name, worker, body in (
                    ("context", "prefill", {"prompt": ids, "max_tokens": 4, "seed": 7,
                                            "disaggregated_params": {"request_type": "context_only"}}),
                    ("local", "decode", {"prompt": ids, "max_tokens": 4, "seed": 7}),
                    ("local-stream", "decode", {"prompt": ids, "max_tokens": 4, "seed": 7, "stream": True})):
                endpoint = Endpoint(deployment[worker].address, "decode")
                raw = json.dumps({"model": MODEL, **body}).encode()
                if body.get("stream"):
                    response = await client.open(endpoint, "/v1/completions", raw, f"refused-{name}")
                    answers[name] = (response.status, await response.read())
                else:
                    status, data, _ = await client.post(endpoint, "/v1/completions", raw, f"refused-{name}")
                    answers[name] = (status, data)
        finally:
            await client.close()
        return answers

    for name, (status, data) in asyncio.run(run()).items():
        assert status == 400, (name, data)
        assert "unexpected inference input 'random_seed'" in json.loads(data)["message"], (name, data)
        assert engines.classify_failure(Endpoint("x:1", "decode"), status, data) is None, name


# ------------------------------------------------------------------------------ chat with the model's tokenizer
@pytest.fixture(scope="module")
def tokenizer_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """An HTTP-fronted simulator of the deployment's model with a real tokenizer (and chat template) in its
    directory: it encodes a chat as trtllm-serve does. (The PyTriton venv has no `tokenizers` package, so the
    Triton-fronted workers count with the estimate; given token ids they need no tokenizer.)"""
    tmp = tmp_path_factory.mktemp("triton-tokenizer")
    model = model_dir_with_tokenizer(tmp / "model", MODEL_DIR / "config.json")
    proc = start_http_engine(tmp, "tok_http", "decode", model_dir=model)
    try:
        deadline = time.monotonic() + 120.0
        proc.wait_listening(deadline)
        proc.wait_http_ok(proc.url + "/health", deadline)
        yield model, proc
    finally:
        stop_all([proc])


def test_chat_with_the_models_tokenizer_reaches_triton_as_the_templates_token_ids(deployment, tokenizer_reference):
    """With the model's tokenizer the scheduler sends a chat as the template's token ids (one BOS, as trtllm-serve
    encodes it), so the Triton worker generates from the prompt trtllm-serve's worker would (same tokens, same
    usage); as text_input the preprocessing would tokenize it again and add a second BOS."""
    from baton import tokens
    from baton.model_tokenizer import load_tokenizer
    from baton.scheduler.endpoints import Endpoint
    from baton.scheduler.engines import TritonClient

    model, reference = tokenizer_reference
    body = {"model": MODEL, "messages": [{"role": "system", "content": "kilo lima"},
                                         {"role": "user", "content": "alpha bravo charlie"}], "max_tokens": 5}
    status, _, direct = post_json(reference.url + "/v1/chat/completions", body)
    assert status == 200, direct
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    _, _, raw_direct = http("POST", reference.url + "/v1/chat/completions", streamed)

    async def run():
        client = TritonClient(read_timeout=30)
        endpoint = Endpoint(deployment["decode"].address, "decode")
        try:
            status, data, _ = await client.post(endpoint, "/v1/chat/completions", json.dumps(body).encode(), "tok-1")
            response = await client.open(endpoint, "/v1/chat/completions", json.dumps(streamed).encode(), "tok-2")
            return status, json.loads(data), response.status, await response.read()
        finally:
            await client.close()

    tokenizer = load_tokenizer(model)
    tokens.set_tokenizer(tokenizer)
    try:
        status, routed, stream_status, raw = asyncio.run(run())
    finally:
        tokens.set_tokenizer(None)
    assert status == 200 and stream_status == 200, routed
    assert direct["usage"]["prompt_tokens"] == tokenizer.count_chat(body["messages"])
    assert routed["usage"] == direct["usage"]
    assert routed["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
    usage = [e["usage"] for e in parse_sse(raw) if isinstance(e, dict) and e.get("usage")]
    direct_usage = [e["usage"] for e in parse_sse(raw_direct) if isinstance(e, dict) and e.get("usage")]
    assert usage == direct_usage == [direct["usage"]]
