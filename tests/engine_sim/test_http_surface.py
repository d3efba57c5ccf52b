"""The trtllm-serve HTTP surface of one simulated worker (no handoff)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from simproc import LLAMA_8B, NO_MODEL, stream_text, text_of, with_model, worker_yaml

from baton import tokens


@pytest.fixture(scope="module")
def worker(engines):
    # A ctx-capable worker at zero latency: serves every request type.
    return engines.start(worker_yaml(ctx=True), "--sim-speed", "0")


def test_health_version_models(worker):
    status, body = worker.get("/health")
    assert (status, body) == (200, "")
    assert worker.get("/version") == (200, {"version": "1.2.0"})
    status, models = worker.get("/v1/models")
    assert status == 200 and models["object"] == "list"
    # trtllm-serve serves an existing model directory under its name (`model_dir.name`), not its path
    assert [m["id"] for m in models["data"]] == [LLAMA_8B.name]


def test_completion_non_streaming(worker):
    resp = worker.complete({"prompt": "The quick brown fox jumps over the lazy dog", "max_tokens": 7})
    assert resp["object"] == "text_completion" and resp["model"] == LLAMA_8B.name
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 7
    assert len(choice["text"].split()) == 7  # one word per token
    prompt_tokens = tokens.count_prompt_tokens("The quick brown fox jumps over the lazy dog")
    assert resp["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7}


def test_output_is_deterministic_and_prompt_dependent(worker):
    a = worker.complete({"prompt": "same prompt", "max_tokens": 5})
    b = worker.complete({"prompt": "same prompt", "max_tokens": 5})
    c = worker.complete({"prompt": "another prompt", "max_tokens": 5})
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"] != c["choices"][0]["token_ids"]
    # token ids and text agree
    ids = tokens.tokenize("same prompt")
    d = worker.complete({"prompt": ids, "max_tokens": 5})
    assert d["choices"][0]["token_ids"] == a["choices"][0]["token_ids"]


def _post_bytes(worker, path: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(worker.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_token_id_prompts_mean_the_same_however_they_are_written(worker):
    """The simulator reads token-id prompts as text; spacing, a batch of one and the chat field must not
    change what a prompt means, and ids at the vocabulary's edge are still in it."""
    ids = [128255, 0, 99999, 7, 100000, 31]
    bodies = [
        b'{"model":"m","prompt":[128255,0,99999,7,100000,31],"max_tokens":6}',
        b'{"model": "m", "prompt": [128255, 0, 99999, 7, 100000, 31], "max_tokens": 6}',
        b'{"max_tokens": 6, "model" : "m", "prompt" : [ 128255 ,\n 0,\t99999 , 7,100000, 31 ]}',
        b'{"prompt": [[128255, 0, 99999, 7, 100000, 31]], "max_tokens": 6, "model": "m"}',
    ]
    answers = [_post_bytes(worker, "/v1/completions", body) for body in bodies]
    assert [status for status, _ in answers] == [200] * len(bodies), answers
    generated = [answer["choices"][0]["token_ids"] for _, answer in answers]
    assert generated == [generated[0]] * len(bodies)
    assert [answer["usage"]["prompt_tokens"] for _, answer in answers] == [len(ids)] * len(bodies)
    chat = worker.complete({"messages": [{"role": "user", "content": "ignored"}], "prompt_token_ids": ids,
                            "max_tokens": 6}, "/v1/chat/completions")
    assert chat["choices"][0]["token_ids"] == generated[0]
    assert worker.complete({"prompt": ids[:-1], "max_tokens": 6})["choices"][0]["token_ids"] != generated[0]
    status, err = _post_bytes(worker, "/v1/chat/completions",
                              b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt_token_ids": [3, 200000]}')
    assert status == 400 and "prompt_token_ids contains token id 200000 outside the vocabulary" in err["message"]


def test_streaming_equals_non_streaming(worker):
    body = {"prompt": "Streaming must produce the same words", "max_tokens": 12}
    full = worker.complete(body)
    status, chunks = worker.stream({**body, "stream_options": {"include_usage": True}})
    assert status == 200
    assert chunks[-1] == "[DONE]"
    assert stream_text(chunks) == text_of(full)
    ids = [t for c in chunks[:-1] if c.get("choices") for t in c["choices"][0]["token_ids"]]
    assert ids == full["choices"][0]["token_ids"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c.get("choices")]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-2]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("options,usage", [({}, True), ({"include_usage": False}, False), (None, False)])
def test_the_usage_chunk_follows_stream_options_defaults(worker, options, usage):
    """trtllm-serve's StreamOptions.include_usage defaults to true: `"stream_options": {}` gets the usage chunk;
    without stream_options, none."""
    body = {"prompt": "usage or not", "max_tokens": 3, **({} if options is None else {"stream_options": options})}
    status, chunks = worker.stream(body)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert any(c.get("usage") for c in chunks[:-1]) is usage


def test_beam_search_with_one_beam_is_served(worker):
    """use_beam_search with n = 1 and no best_of is a beam width of 1 in TensorRT-LLM: served as usual."""
    plain = worker.complete({"prompt": "one beam", "max_tokens": 4})
    beam = worker.complete({"prompt": "one beam", "max_tokens": 4, "use_beam_search": True})
    assert text_of(beam) == text_of(plain)


def test_chat_completions(worker):
    body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 6}
    full = worker.complete(body, "/v1/chat/completions")
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"]["role"] == "assistant"
    status, chunks = worker.stream(body, "/v1/chat/completions")
    assert status == 200 and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream_text(chunks) == text_of(full)
    assert full["usage"]["prompt_tokens"] == len(tokens.tokenize(tokens.chat_prompt_text(body["messages"])))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": 42}, "prompt must be"),
        ({"prompt": [1, -2]}, "outside the vocabulary"),
        ({"prompt": [1, 128256, 3]}, "token id 128256 outside the vocabulary [0, 128256)"),
        ({"prompt": [7, 99999999]}, "token id 99999999 outside"),
        ({"prompt": [1, 2.5]}, "must be a list of integer token ids"),
        ({"prompt": []}, "at least one token"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"prompt": "hi", "n": 2}, "only n=1"),
        ({"prompt": "hi", "use_beam_search": True, "best_of": 2}, "only beam width 1 is supported"),
        ({"prompt": "hi", "best_of": 3}, "only beam width 1 is supported"),
        ({"prompt": "hi", "disaggregated_params": {"request_type": "prefill"}}, "request_type must be one of"),
        ({"prompt": [1, 2], "disaggregated_params": {"request_type": "generation_only"}}, "first_gen_tokens"),
        (
            {"prompt": [1, 2], "disaggregated_params": {"request_type": "generation_only", "first_gen_tokens": [3],
                                                        "ctx_request_id": 1, "encoded_opaque_state": "bm90IGpzb24="}},
            "encoded_opaque_state",
        ),
    ],
)
def test_invalid_requests_get_trtllm_error_shape(worker, body, fragment):
    status, err = worker.post("/v1/completions", body)
    assert status == 400
    assert err["object"] == "error" and err["type"] == "BadRequestError" and err["code"] == 400
    assert fragment in err["message"]


def test_a_generation_request_without_its_handle_names_the_field_once(worker):
    status, err = worker.post("/v1/completions", {"prompt": [1, 2], "disaggregated_params": {
        "request_type": "generation_only", "first_gen_tokens": [3], "ctx_request_id": 1}})
    assert status == 400
    assert err["message"] == "disaggregated_params.encoded_opaque_state must be a non-empty base64 string"


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "fragments"),
    [
        ("/v1/completions", {"prompt": "hi", "max_token": 4},
         ["'type': 'extra_forbidden', 'loc': ('body', 'max_token')", "Extra inputs are not permitted"]),
        ("/v1/chat/completions", {**CHAT, "max_tokns": 4, "temprature": 0.5},
         ["2 validation errors", "('body', 'max_tokns')", "('body', 'temprature')"]),
        ("/v1/completions", {"prompt": "hi", "messages": []}, ["('body', 'messages')"]),  # a chat field
        ("/v1/chat/completions", {**CHAT, "detokenize": False}, ["('body', 'detokenize')"]),  # a completions one
        ("/v1/completions", {"prompt": [1, 2], "disaggregated_params": {"request_type": "context_only", "bogus": 1}},
         ["('body', 'disaggregated_params', 'bogus')"]),
        ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
         ["('body', 'stream_options', 'x')"]),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
         ["Stream options can only be defined when stream is true."]),
        ("/v1/chat/completions", {**CHAT, "stream_options": {}}, ["stream_options can only be set if stream is true"]),
        ("/v1/completions", {"prompt": "hi", "suffix": "!"}, ["suffix is not supported"]),
        ("/v1/completions", {"prompt": "hi", "model": NO_MODEL}, ["'type': 'missing', 'loc': ('body', 'model')", "Field required"]),
        ("/v1/chat/completions", {"prompt_token_ids": [1, 2, 3], "max_tokens": 2},
         ["'type': 'missing', 'loc': ('body', 'messages')"]),
    ],
)
def test_fields_trtllm_serve_does_not_define_are_refused_as_its_validation_refuses_them(worker, path, body, fragments):
    """trtllm-serve's request models forbid extra fields (also in disaggregated_params and stream_options)
    and require `model` (and chat `messages`): a misspelt field is a 400, never silently ignored."""
    status, err = worker.post(path, body)
    assert status == 400, err
    assert err["object"] == "error" and err["type"] == "BadRequestError" and err["code"] == 400
    for fragment in fragments:
        assert fragment in err["message"], err["message"]


def test_every_field_trtllm_serve_defines_is_accepted(worker):
    """Fields of trtllm-serve's request models the simulator does not act on are still taken, at neutral values."""
    neutral = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "seed": 1, "stop": [], "temperature": 1.0,
               "top_p": 1.0, "user": "u", "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
               "early_stopping": False, "stop_token_ids": [], "include_stop_str_in_output": False, "ignore_eos": False,
               "min_tokens": 0, "skip_special_tokens": True, "spaces_between_special_tokens": True,
               "add_special_tokens": True, "echo": False, "logit_bias": None, "response_format": None}
    assert worker.complete({"prompt": "hi", "max_tokens": 2, "suffix": "", "detokenize": True, **neutral})
    chat = {**CHAT, "max_completion_tokens": 2, "add_generation_prompt": True, "chat_template_kwargs": None,
            "documents": None, "tool_choice": "none", "cache_salt": "s", **neutral}
    assert worker.complete(chat, "/v1/chat/completions")


def test_metrics_report_iterations_and_kv_stats(worker):
    worker.get("/metrics")  # drain
    worker.complete({"prompt": "count my iterations", "max_tokens": 4})
    status, records = worker.get("/metrics")
    assert status == 200 and len(records) >= 4  # an iteration record per token
    last = records[-1]
    kv = last["kvCacheStats"]
    assert {"maxNumBlocks", "freeNumBlocks", "usedNumBlocks", "tokensPerBlock"} <= set(kv)
    assert kv["tokensPerBlock"] == 32 and kv["usedNumBlocks"] + kv["freeNumBlocks"] == kv["maxNumBlocks"]
    assert {"numActiveRequests", "numQueuedRequests"} <= set(records[0])
    assert records[0]["inflightBatchingStats"]["numContextRequests"] == 1
    # drained on read, as trtllm-serve's: nothing ran since, nothing to say (no invented current-state record)
    status, again = worker.get("/metrics")
    assert status == 200 and again == []


def test_perf_metrics_are_drained_on_read(worker):
    worker.get("/perf_metrics")
    worker.complete({"prompt": "timed", "max_tokens": 3}, headers={"X-Request-Id": "perf-1"})
    status, records = worker.get("/perf_metrics")
    assert status == 200 and len(records) == 1
    rec = records[0]
    assert rec["x_request_id"] == "perf-1" and rec["request_type"] == "context_and_generation"
    t = rec["perf_metrics"]["timing_metrics"]
    assert t["arrival_time"] <= t["first_scheduled_time"] <= t["first_token_time"] <= t["last_token_time"]
    assert worker.get("/perf_metrics") == (200, [])


def test_logs_carry_the_request_id(worker):
    worker.post("/v1/completions", {"prompt": "hi", "n": 3}, headers={"X-Request-Id": "trace-me-42"})
    # a refused request is logged at DEBUG; a failed one (5xx, or a generation that failed: answered 400 as
    # trtllm-serve does) at WARNING: use a handoff failure instead
    bogus = {"prompt": [1, 2], "max_tokens": 2, "disaggregated_params": {
        "request_type": "generation_only", "first_gen_tokens": [5], "ctx_request_id": 9,
        "encoded_opaque_state": _opaque_for(worker, ctx_request_id=9)}}
    status, _ = worker.post("/v1/completions", bogus, headers={"X-Request-Id": "trace-me-43"})
    assert status == 400
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any(entry.get("request_id") == "trace-me-43" for entry in lines)


def _opaque_for(worker, ctx_request_id: int) -> str:
    """A well-formed handle naming `worker` as the ctx worker, for an id it never produced."""
    from baton import kvformat
    from baton.engine_sim.handoff import OpaqueState, encode_opaque

    state = kvformat.from_wire(worker.state()["cache_state"])
    own = worker.state()
    return encode_opaque(OpaqueState("127.0.0.1", own["kv_port"], own["instance"], ctx_request_id, state))


def test_many_concurrent_requests(worker):
    def one(i):
        return worker.complete({"prompt": f"request number {i}", "max_tokens": 3})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert all(len(r["choices"][0]["token_ids"]) == 3 for r in results)


def test_health_generate(worker):
    assert worker.get("/health_generate") == (200, "Generation health check OK")
    assert worker.post("/kv_cache_events", {}) == (200, [])


def test_client_disconnect_frees_the_request(engines):
    import http.client
    import json as _json

    slow = engines.start(worker_yaml(ctx=True), "--sim-speed", "1")
    conn = http.client.HTTPConnection("127.0.0.1", slow.port, timeout=30)
    conn.request("POST", "/v1/completions", _json.dumps(with_model("/v1/completions", {"prompt": "long story", "max_tokens": 2000, "stream": True})),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # generation is under way (2000 steps would take ~10 s)
    assert slow.state()["numActiveRequests"] == 1
    resp.close()
    conn.close()
    slow.wait_for(lambda: slow.state()["numActiveRequests"] == 0, "the abandoned request to be dropped",
                  deadline_s=5)
    state = slow.state()
    assert state["counters"]["requestsCancelled"] == 1 and state["kvCacheStats"]["usedNumBlocks"] == 0
