"""Routing end to end: short prompts stay on a decode replica, long ones go prefill -> paired decode,
and what the client gets equals what the engine itself answers."""

from __future__ import annotations

import json

from scheduler_harness import (
    MODEL,
    http,
    metric,
    metrics,
    parse_sse,
    perf,
    post,
    prompt_ids,
    stream_text,
)


def _drain(*engines):
    for e in engines:
        perf(e)


def test_short_prompt_is_served_locally_on_a_decode_replica(engines, make_scheduler):
    prefill, decode = engines["prefill"], engines["decode1"]
    sched = make_scheduler([prefill], [decode])
    _drain(prefill, decode)
    status, headers, body = post(sched.url + "/v1/completions",
                                 {"model": MODEL, "prompt": prompt_ids(50), "max_tokens": 5},
                                 headers={"X-Request-Id": "short-1"})
    assert status == 200, body
    assert headers["X-Baton-Route"] == "local"
    assert headers["X-Baton-Decode-Endpoint"] == decode.address
    assert "X-Baton-Prefill-Endpoint" not in headers
    assert headers["X-Request-Id"] == "short-1"
    assert body["usage"]["completion_tokens"] == 5
    records = [r for r in perf(decode) if r["x_request_id"] == "short-1"]
    assert [r["request_type"] for r in records] == ["context_and_generation"]
    assert not [r for r in perf(prefill) if r["x_request_id"] == "short-1"]


def test_long_prompt_is_prefilled_then_decoded_on_the_paired_replica(engines, make_scheduler):
    prefill, decode = engines["prefill"], engines["decode1"]
    sched = make_scheduler([prefill], [decode])
    _drain(prefill, decode)
    status, headers, body = post(sched.url + "/v1/completions",
                                 {"model": MODEL, "prompt": prompt_ids(2000), "max_tokens": 6},
                                 headers={"X-Request-Id": "long-1"})
    assert status == 200, body
    assert headers["X-Baton-Route"] == "disaggregated"
    assert headers["X-Baton-Prefill-Endpoint"] == prefill.address
    assert headers["X-Baton-Decode-Endpoint"] == decode.address
    ctx = [r for r in perf(prefill) if r["x_request_id"] == "long-1"]
    gen = [r for r in perf(decode) if r["x_request_id"] == "long-1"]
    assert [r["request_type"] for r in ctx] == ["context_only"]
    assert [r["request_type"] for r in gen] == ["generation_only"]
    assert gen[0]["ctx_request_id"] == ctx[0]["ctx_request_id"]  # the decode pulled that prefill's KV
    assert gen[0]["perf_metrics"]["timing_metrics"]["kv_cache_size"] > 0
    assert body["usage"]["prompt_tokens"] == 2000 and body["usage"]["completion_tokens"] == 6
    assert "disaggregated_params" not in body or body["choices"][0].get("disaggregated_params") in (None, {})
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_requests_total", route="disaggregated", outcome="completed") == 1
    assert metric(values, "baton_scheduler_kv_transfer_seconds_count") == 0  # non-streaming: no handoff timing


def test_outputs_equal_the_engines_own_output_streaming_and_not(engines, make_scheduler):
    prefill, decode = engines["prefill"], engines["decode1"]
    sched = make_scheduler([prefill], [decode])
    for n in (40, 1500):  # local and disaggregated
        body = {"model": MODEL, "prompt": prompt_ids(n, seed=n), "max_tokens": 12}
        _, _, direct = post(decode.url + "/v1/completions", body)
        status, headers, routed = post(sched.url + "/v1/completions", body)
        assert status == 200
        assert routed["choices"][0]["text"] == direct["choices"][0]["text"]
        assert routed["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
        assert routed["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"]
        status, headers, raw = http("POST", sched.url + "/v1/completions", {**body, "stream": True})
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        events = parse_sse(raw)
        assert events[-1] == "[DONE]"
        text, ids = stream_text(events)
        assert (text, ids) == (direct["choices"][0]["text"], direct["choices"][0]["token_ids"])
        assert headers["X-Baton-Route"] == ("local" if n < 256 else "disaggregated")
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_time_to_first_token_seconds_count", route="disaggregated") == 1
    assert metric(values, "baton_scheduler_kv_transfer_seconds_count", source="handoff") == 1


def test_chat_completions_both_routes(engines, make_scheduler):
    prefill, decode = engines["prefill"], engines["decode1"]
    sched = make_scheduler([prefill], [decode])
    for content, route in (("hello", "local"), ("x" * 6000, "disaggregated")):
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5}
        _, _, direct = post(decode.url + "/v1/chat/completions", body)
        status, headers, routed = post(sched.url + "/v1/chat/completions", body)
        assert status == 200 and headers["X-Baton-Route"] == route
        assert routed["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        status, headers, raw = http("POST", sched.url + "/v1/chat/completions", {**body, "stream": True})
        assert status == 200 and headers["X-Baton-Route"] == route
        assert stream_text(parse_sse(raw))[0] == direct["choices"][0]["message"]["content"]


def test_a_one_token_request_goes_on_to_generation_as_with_trtllm_and_returns_that_token(engines, make_scheduler):
    """max_tokens=1: the context worker's one token ends it with finish_reason "length" (not an EOS), so the
    request is handed to a decode replica, as TensorRT-LLM's own router does, which returns that token."""
    prefill, decode = engines["prefill"], engines["decode1"]
    sched = make_scheduler([prefill], [decode])
    _drain(prefill, decode)
    body = {"model": MODEL, "prompt": prompt_ids(2000, seed=3), "max_tokens": 1}
    direct = post(prefill.url + "/v1/completions", {**body, "disaggregated_params": {"request_type": "context_only"}})[2]
    status, headers, routed = post(sched.url + "/v1/completions", body, headers={"X-Request-Id": "one-1"})
    assert status == 200 and headers["X-Baton-Route"] == "disaggregated"
    assert routed["choices"][0]["token_ids"] == direct["choices"][0]["disaggregated_params"]["first_gen_tokens"]
    assert routed["choices"][0]["finish_reason"] == "length" and routed["usage"]["completion_tokens"] == 1
    assert [r for r in perf(decode) if r["x_request_id"] == "one-1"], "never handed to the decode replica"
    status, _, raw = http("POST", sched.url + "/v1/completions", {**body, "stream": True})
    events = parse_sse(raw)
    assert status == 200 and events[-1] == "[DONE]" and len(stream_text(events)[1]) == 1


def test_service_endpoints_and_errors(engines, make_scheduler):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]])
    status, _, raw = http("GET", sched.url + "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == [MODEL]
    assert http("GET", sched.url + "/healthz")[0] == 200
    assert http("GET", sched.url + "/readyz")[0] == 200
    status, headers, body = post(sched.url + "/v1/completions", {"model": "other", "prompt": "hi"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, _, body = post(sched.url + "/v1/completions", b"{nope")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # the HTTP layer's own errors come in the same OpenAI shape (an SDK reads error.message from them)
    status, headers, body = post(sched.url + "/v1/completion", {"model": MODEL, "prompt": "hi"})
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert body["error"]["code"] == "not_found" and "/v1/completion" in body["error"]["message"]
    status, headers, body = http("GET", sched.url + "/v1/completions")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    status, headers, body = post(sched.url + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 200 and len(headers["X-Request-Id"]) >= 16  # generated when the client sent none
    values = metrics(sched.url)
    # the unknown model, the bad JSON, and the GET the HTTP layer refused (the unknown path is no completion)
    assert metric(values, "baton_scheduler_requests_total", route="unrouted", outcome="invalid") == 3
    assert metric(values, "baton_scheduler_requests_total", route="local", outcome="completed") == 1
    assert 'baton_scheduler_endpoints{state="healthy",tier="decode"}' in values


def test_bodies_the_scheduler_cannot_read_are_the_clients_400_not_a_500(engines, make_scheduler):
    """A body nested past the JSON decoder's recursion, and chat content parts whose text is not a string,
    are the client's error: 400 naming what is wrong, counted invalid, no traceback in the log."""
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]])
    deep = b"[" * 50_000 + b"]" * 50_000
    for path, field in (("/v1/completions", b"prompt"), ("/v1/chat/completions", b"messages")):
        status, headers, body = post(sched.url + path, b'{"model": "%s", "%s": %s}' % (MODEL.encode(), field, deep))
        assert status == 400 and body["error"]["code"] == "invalid_request", body
        assert "levels deep" in body["error"]["message"] and headers["X-Baton-Error"] == "invalid_request"
    for text in (None, 5):
        status, _, body = post(sched.url + "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})
        assert status == 400 and body["error"]["code"] == "invalid_request" and body["error"]["param"] == "messages"
        assert "`messages[0].content[0].text` must be a string" in body["error"]["message"]
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_requests_total", route="unrouted", outcome="invalid") == 4
    assert metric(values, "baton_scheduler_requests_total", outcome="failed") == 0
    assert "Traceback" not in sched.log()


def test_scheduler_freezes_its_start_up_heap_and_exports_gc_pauses(engines, make_scheduler):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]])
    for i in range(20):
        assert post(sched.url + "/v1/completions", {"model": MODEL, "prompt": f"hi {i}", "max_tokens": 2})[0] == 200
    values = metrics(sched.url)
    # full collections no longer walk the modules, config and registry it started with
    assert metric(values, "baton_scheduler_gc_frozen_objects") > 10_000
    for generation in "012":  # collections are rare after the freeze: the counts may still be 0
        count = values[f'baton_scheduler_gc_pause_seconds_count{{generation="{generation}"}}']
        assert metric(values, "baton_scheduler_gc_pause_seconds_bucket", generation=generation, le="+Inf") == count


def test_scheduler_without_healthy_decode_is_not_ready(engines, tmp_path):
    from scheduler_harness import start_scheduler, wait_all

    # an endpoint nobody listens on: the first heartbeat marks it unhealthy, /readyz turns 503
    cfg = {"model": MODEL, "heartbeatSeconds": 0.2,
           "endpoints": {"static": {"prefill": [], "decode": ["127.0.0.1:9"]}}}
    proc = start_scheduler(tmp_path, "lonely", cfg)
    try:
        wait_all([proc], "/healthz")
        from scheduler_harness import wait_for

        wait_for(lambda: http("GET", proc.url + "/readyz")[0] == 503, 10, "readyz 503")
        status, _, body = post(proc.url + "/v1/completions", {"model": MODEL, "prompt": "hi"})
        assert status == 503 and body["error"]["code"] == "no_decode_endpoints"
    finally:
        proc.stop()


def test_a_misspelt_field_is_the_engines_400_to_the_client_on_both_routes_and_no_replica_is_blamed(engines, make_scheduler):
    """trtllm-serve refuses fields its request models do not define: a client's typo comes back as the
    engine's 400 naming the field, on the local route (decode) and the disaggregated one (the prefill refuses
    the context request), counted as the client's invalid request; both replicas stay in rotation. The
    scheduler's own extension field (`baton`) never reaches an engine."""
    prefill, decode = engines["prefill"], engines["decode1"]
    sched = make_scheduler([prefill], [decode])
    for route, prompt in (("local", prompt_ids(20)), ("disaggregated", prompt_ids(2000))):
        status, headers, body = post(sched.url + "/v1/completions",
                                     {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temprature": 0.2})
        assert status == 400, body
        message = body["message"]  # the engine's answer, relayed as it came
        assert "('body', 'temprature')" in message and "Extra inputs are not permitted" in message, body
        assert headers["X-Baton-Route"] == route
        status, headers, body = post(sched.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                                                     "baton": {"highPrecision": False}})
        assert status == 200 and headers["X-Baton-Route"] == route, body
    values = metrics(sched.url)
    for route in ("local", "disaggregated"):
        assert metric(values, "baton_scheduler_requests_total", route=route, outcome="invalid") == 1
        assert metric(values, "baton_scheduler_requests_total", route=route, outcome="completed") == 1
    assert metric(values, "baton_scheduler_requests_total", outcome="failed") == 0
    assert metric(values, "baton_scheduler_endpoints", state="healthy", tier="decode") == 1
    assert metric(values, "baton_scheduler_endpoints", state="healthy", tier="prefill") == 1
