"""The fast paths added after profiling `baton bench scheduler` behave exactly like the code they replaced.

- scheduler: token-id prompts are checked at C speed (`requests._is_token_ids`); the context answer's
  prompt_token_ids are cut out of its bytes and spliced into the generation request undecoded
  (`parse_context_answer`, `RawJSON`); the decode TPOT p95 is not re-sorted after every sample; Prometheus
  children are looked up once;
- engine simulator: token lists are validated at C speed (`SimServer._token_list`); token-id prompts are
  read as text (`baton.idlists`, tested in test_idlists.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from baton import tokens
from baton.engine_sim.engine import EngineError
from baton.engine_sim.server import SimServer
from baton.scheduler.admission import LatencyWindow
from baton.scheduler.metrics import PrometheusHooks
from baton.idlists import RawJSON
from baton.scheduler.requests import RequestError, _is_token_ids, parse_context_answer, parse_request

JSON_VALUES = ["[]", "[1, 2, 3]", "[0]", "[1, true]", "[false]", "[1.0]", "[1, \"a\"]", "[[1, 2]]", "[1, null]",
               "\"text\"", "{}", "null", "7", f"[{2**70}]", "[-3, 4]"]


@pytest.mark.parametrize("text", JSON_VALUES)
def test_token_id_check_matches_the_shared_one(text):
    value = json.loads(text)
    assert _is_token_ids(value) == tokens.is_token_ids(value)


def test_parse_request_counts_and_refuses_as_before():
    raw = json.dumps({"model": "m", "prompt": list(range(5000))}).encode()
    assert parse_request(raw, "completions", {}, "m").tokens == 5000
    assert parse_request(b'{"model": "m", "prompt": []}', "completions", {}, "m").tokens == 0
    for bad in (b'{"model": "m", "prompt": [1, true]}', b'{"model": "m", "prompt": [1.5]}'):
        with pytest.raises(RequestError) as err:
            parse_request(bad, "completions", {}, "m")
        assert err.value.status == 400 and err.value.param == "prompt"


CTX = {"id": "cmpl-1", "choices": [{"index": 0, "text": " a", "finish_reason": "length",
                                    "disaggregated_params": {"request_type": "context_only", "first_gen_tokens": [7],
                                                             "ctx_request_id": 99, "encoded_opaque_state": "eA==",
                                                             "draft_tokens": None}}],
       "usage": {"prompt_tokens": 3}, "prompt_token_ids": [5, 6, 70000]}


@pytest.mark.parametrize("answer", [
    CTX,
    {**CTX, "prompt_token_ids": []},
    {"prompt_token_ids": [1, 2], **{k: v for k, v in CTX.items() if k != "prompt_token_ids"}},  # key first
])
def test_context_answer_ids_are_cut_out_verbatim(answer):
    for data in (json.dumps(answer).encode(), json.dumps(answer, indent=2).encode(),
                 json.dumps(answer, separators=(",", ":")).encode()):
        decoded, ids = parse_context_answer(data)
        assert ids is not None and json.loads(ids) == answer["prompt_token_ids"]
        assert {**decoded, "prompt_token_ids": answer["prompt_token_ids"]} == answer


@pytest.mark.parametrize("answer", [
    {**CTX, "prompt_token_ids": None},  # not a list
    {k: v for k, v in CTX.items() if k != "prompt_token_ids"},  # absent
    {**CTX, "prompt_token_ids": [[1, 2], [3]]},  # nested: the cut is not valid JSON, decode it all
    {**CTX, "prompt_token_ids": ["a]", 1]},  # a "]" inside a string: likewise
    {**CTX, "prompt_token_ids": [1, 2], "choices": [{**CTX["choices"][0], "prompt_token_ids": [3]}]},  # twice
    {"choices": [{"prompt_token_ids": [3]}]},  # nested only
])
def test_context_answer_falls_back_to_a_full_decode(answer):
    decoded, ids = parse_context_answer(json.dumps(answer).encode())
    assert ids is None and decoded == answer


def test_context_answer_ids_are_passed_on_unchecked():
    """The decode engine checks the ids of a generation request itself (and answers 400, relayed), so the
    scheduler does not check the ones it only passes on."""
    answer = {**CTX, "prompt_token_ids": [1, -2, 3.5]}
    decoded, ids = parse_context_answer(json.dumps(answer).encode())
    assert ids == b"[1, -2, 3.5]" and decoded["prompt_token_ids"] == [] and decoded["choices"] == CTX["choices"]


def test_context_answer_key_quoted_inside_a_string_does_not_confuse_the_cut():
    # inside a JSON string the quotes are escaped, so the key's byte pattern cannot occur there
    answer = {**CTX, "choices": [{**CTX["choices"][0], "text": 'say "prompt_token_ids": [1]'}]}
    decoded, ids = parse_context_answer(json.dumps(answer).encode())
    assert ids is not None and json.loads(ids) == answer["prompt_token_ids"]
    assert decoded["choices"] == answer["choices"]


@pytest.mark.parametrize("api,body", [
    ("completions", {"model": "m", "prompt": "hello world", "max_tokens": 4, "stream": True,
                     "stream_options": {"include_usage": True}, "user": "\u0000baton-raw\u0000"}),
    ("chat", {"model": "m", "max_tokens": 4, "user": "\u0000baton-raw\u0000",
              "messages": [{"role": "user", "content": "hi \u0000baton-raw\u0000 \u0000baton-prompt\u0000"}]}),
])
def test_generation_body_from_raw_ids_equals_the_one_from_a_list(api, body):
    req = parse_request(json.dumps(body).encode(), api, {}, "m")
    handle = CTX["choices"][0]["disaggregated_params"]
    from_list = json.loads(req.generation_body(handle, [5, 6, 70000]))
    from_raw = json.loads(req.generation_body(handle, RawJSON(b"[5, 6, 70000]")))
    from_bytes = json.loads(req.generation_body(handle, b"[5,6,70000]"))
    assert from_list == from_raw == from_bytes
    assert from_raw["disaggregated_params"]["request_type"] == "generation_only"
    if api == "completions":
        assert from_raw["prompt"] == [5, 6, 70000] and from_raw["user"] == body["user"]
    else:
        assert from_raw["prompt_token_ids"] == [5, 6, 70000] and from_raw["messages"] == body["messages"]


def test_latency_window_sees_new_samples_within_its_cache_time():
    now = [100.0]
    w = LatencyWindow(window_s=30, clock=lambda: now[0], cache_s=0.25)
    assert w.p95() is None
    w.record(0.5)
    assert w.p95() == 0.5  # the first sample after an empty window shows at once
    for _ in range(50):
        w.record(2.0)
    assert w.p95() == 0.5  # cached ...
    now[0] += 0.3
    assert w.p95() == 2.0  # ... for at most cache_s


def test_prometheus_children_are_reused_and_counted():
    hooks = PrometheusHooks()
    for _ in range(3):
        hooks.routed("local", "short-prompt", 10)
        hooks.finished("local", "completed", 0.01)
    hooks.finished("disaggregated", "failed", 0.02)
    text = hooks.exposition().decode()
    assert 'baton_scheduler_routing_decisions_total{reason="short-prompt",route="local"} 3.0' in text
    assert 'baton_scheduler_prompt_tokens_total{route="local"} 30.0' in text
    assert 'baton_scheduler_requests_total{outcome="completed",route="local"} 3.0' in text
    assert 'baton_scheduler_requests_total{outcome="failed",route="disaggregated"} 1.0' in text
    assert len(hooks._children) == 6  # one per metric and label values


def _token_list(value, vocab=1000):
    return SimServer._token_list(SimpleNamespace(cfg=SimpleNamespace(vocab_size=vocab)), value, "prompt")


def test_engine_token_list_accepts_and_refuses_as_before():
    assert _token_list([0, 5, 999]) == [0, 5, 999]
    assert _token_list([]) == []
    for bad, message in (([1, True], "must be a list of integer token ids"), ([1.0], "must be a list"),
                         ("abc", "must be a list"), ([3, 1000, -1], "token id 1000 outside"),
                         ([3, -1, 1000], "token id -1 outside")):
        with pytest.raises(EngineError) as err:
            _token_list(bad)
        assert message in err.value.message
