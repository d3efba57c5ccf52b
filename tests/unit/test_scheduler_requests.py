"""Request parsing and the upstream bodies (context_only / generation_only) built from one parse."""

from __future__ import annotations

import asyncio
import json

import pytest
from tokenizer_fixture import write_tokenizer

from baton import tokens
from baton.model_tokenizer import load_tokenizer
from baton.scheduler.requests import MAX_JSON_DEPTH, RequestError, parse_request
from baton.tokens import chat_prompt_text, count_text_tokens


def parse(body, api="completions", headers=None, model="m"):
    return parse_request(json.dumps(body).encode(), api, headers or {}, model)


def test_token_ids_count_exactly_and_local_body_is_the_raw_bytes():
    raw = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}).encode()
    req = parse_request(raw, "completions", {}, "m")
    assert req.tokens == 3
    assert req.local_body() is raw


def test_text_and_chat_prompts_use_the_shared_estimate():
    assert parse({"model": "m", "prompt": "x" * 401}).tokens == count_text_tokens("x" * 401) == 101
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert parse({"model": "m", "messages": msgs}, "chat").tokens == count_text_tokens(chat_prompt_text(msgs))


def test_errors():
    with pytest.raises(RequestError) as e:
        parse({"model": "other", "prompt": "x"})
    assert e.value.status == 404 and e.value.code == "model_not_found"
    with pytest.raises(RequestError, match="prompt"):
        parse({"model": "m"})
    with pytest.raises(RequestError, match="one prompt per request"):
        parse({"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(RequestError):
        parse_request(b"{not json", "completions", {}, "m")
    with pytest.raises(RequestError, match="messages"):
        parse({"model": "m", "messages": []}, "chat")


def test_missing_model_and_baton_extension_are_rewritten():
    req = parse({"prompt": "hi", "baton": {"highPrecision": True}})
    assert req.high_precision
    body = json.loads(req.local_body())
    assert body == {"prompt": "hi", "model": "m"}
    assert parse({"model": "m", "prompt": "hi"}, headers={"X-Baton-High-Precision": "true"}).high_precision
    assert not parse({"model": "m", "prompt": "hi"}).high_precision


def test_context_body_forces_context_only_non_streaming():
    req = parse({"model": "m", "prompt": "hello \u00e9\"quoted\"", "stream": True,
                 "stream_options": {"include_usage": True}, "max_tokens": 7})
    body = json.loads(req.context_body())
    assert body == {"model": "m", "max_tokens": 7, "stream": False,
                    "disaggregated_params": {"request_type": "context_only"}, "prompt": "hello \u00e9\"quoted\""}


def test_generation_body_swaps_prompt_for_token_ids():
    req = parse({"model": "m", "prompt": "hello", "stream": True, "max_tokens": 3})
    handle = {"request_type": "context_only", "first_gen_tokens": [5], "ctx_request_id": 42,
              "encoded_opaque_state": "abc", "draft_tokens": None}
    body = json.loads(req.generation_body(handle, [9, 8]))
    assert body["prompt"] == [9, 8]
    assert body["stream"] is True
    assert body["disaggregated_params"] == {**handle, "request_type": "generation_only"}
    chat = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "chat")
    body = json.loads(chat.generation_body(handle, [9, 8]))
    assert body["prompt_token_ids"] == [9, 8] and body["messages"] == [{"role": "user", "content": "hi"}]


def test_prompt_marker_in_other_fields_does_not_confuse_the_splice():
    req = parse({"model": "m", "prompt": [1, 2], "user": "\u0000baton-prompt\u0000"})
    body = json.loads(req.context_body())
    assert body["prompt"] == [1, 2] and body["user"] == "\u0000baton-prompt\u0000"


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("field", ["prompt", "user"])
def test_a_lone_surrogate_escape_is_the_clients_error_and_a_pair_is_text(api, field):
    base = '{"model": "m", %s, "user": "u"}' % (
        '"prompt": "hi"' if api == "completions" else '"messages": [{"role": "user", "content": "hi"}]')
    lone = base.replace('"hi"', '"a\\ud800b"') if field == "prompt" else base.replace('"u"', '"\\uDFFF"')
    with pytest.raises(RequestError) as err:
        parse_request(lone.encode(), api, {}, "m")
    assert err.value.status == 400 and err.value.code == "invalid_json" and "surrogate" in err.value.message
    pair = base.replace('"hi"', '"smile \\ud83d\\ude00"')
    req = parse_request(pair.encode(), api, {}, "m")
    assert "\U0001F600" in json.dumps(json.loads(req.local_body()), ensure_ascii=False)


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("depth", [101, 900, 50_000])
def test_a_body_nested_too_deep_is_the_clients_400(api, depth):
    """Past the JSON decoder's recursion (50,000), or decoded but deeper than MAX_JSON_DEPTH (encoding it
    again for an engine, deeper in the stack, could fail then): 400, never a RecursionError (a 500)."""
    field = "prompt" if api == "completions" else "messages"
    nested = b"[" * depth + b"]" * depth
    for raw in (b'{"%s": %s}' % (field.encode(), nested), b'{"%s": "hi", "x": %s}' % (field.encode(), nested)):
        with pytest.raises(RequestError, match="more than 100 levels deep") as e:
            parse_request(raw, api, {}, "m")
        assert e.value.status == 400 and e.value.code == "invalid_request"


def test_a_body_nested_up_to_the_limit_is_fine():
    nested = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)  # inside the body's object: 100 levels
    assert parse_request(b'{"prompt": "hi", "x": %s}' % nested, "completions", {}, "m").tokens == 1


@pytest.mark.parametrize(("content", "message"), [
    ([{"type": "text", "text": None}], "`messages[0].content[0].text` must be a string, got null"),
    ([{"type": "text", "text": 5}], "`messages[0].content[0].text` must be a string, got a number"),
    ([{"type": "text"}], "`messages[0].content[0].text` must be a string, got null"),
    ([{"type": "image_url", "text": ["a"]}], "`messages[0].content[0].text` must be a string, got an array"),
    (["hi"], "`messages[0].content[0]` must be a content part object, got a string"),
    ({"text": "hi"}, "`messages[0].content` must be a string or a list of content parts, got an object"),
    (7, "`messages[0].content` must be a string or a list of content parts, got a number"),
])
def test_chat_content_that_cannot_be_counted_is_the_clients_400_naming_the_field(content, message):
    with pytest.raises(RequestError) as e:
        parse({"model": "m", "messages": [{"role": "user", "content": content}]}, "chat")
    assert (e.value.status, e.value.code, e.value.param, e.value.message) == (400, "invalid_request", "messages",
                                                                              message)
    with pytest.raises(RequestError, match=r"`messages\[1\]\.role` must be a string, got a number"):
        parse({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": 1, "content": "b"}]}, "chat")


def test_chat_content_parts_and_null_content_are_counted():
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url",
                                                                               "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": None, "tool_calls": []}]
    assert parse({"model": "m", "messages": messages}, "chat").tokens == count_text_tokens(chat_prompt_text(messages))
    # the flattening counted: "<|user|>hello<|assistant|>", 26 bytes (a null content adds nothing, not "None")
    assert parse({"model": "m", "messages": messages}, "chat").tokens == 7


def test_a_chat_requests_prompt_token_ids_are_its_prompt():
    """As trtllm-serve and the engine simulator prompt from them: counted, and routed by that count."""
    ids = list(range(1, 5001))
    req = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt_token_ids": ids,
                 "max_tokens": 3}, "chat")
    assert req.tokens == 5000
    assert json.loads(req.context_body())["prompt_token_ids"] == ids
    handle = {"request_type": "context_only", "first_gen_tokens": [5], "ctx_request_id": 42,
              "encoded_opaque_state": "abc", "draft_tokens": None}
    assert json.loads(req.generation_body(handle, b"[7,8]"))["prompt_token_ids"] == [7, 8]
    assert json.loads(req.generation_body(handle, None))["prompt_token_ids"] == ids  # no ids in the answer
    assert parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt_token_ids": []},
                 "chat").tokens == 0
    for bad in ("1 2 3", [1, "2"], [1.5], {"ids": [1]}):
        with pytest.raises(RequestError) as e:
            parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt_token_ids": bad}, "chat")
        assert (e.value.status, e.value.param) == (400, "prompt_token_ids")


@pytest.fixture
def model_tokenizer(tmp_path):
    template = ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer = load_tokenizer(write_tokenizer(tmp_path, chat_template=template))
    tokens.set_tokenizer(tokenizer)
    try:
        yield tokenizer
    finally:
        tokens.set_tokenizer(None)


@pytest.mark.parametrize("long", [False, True])
def test_a_chat_prompt_is_counted_with_the_requests_template_fields(model_tokenizer, long):
    """`tools`, `add_generation_prompt`, ... reach the chat template, as trtllm-serve (and the engine simulator,
    through the same `baton.tokens`) passes them; long chats too (counted off the event loop)."""
    messages = [{"role": "user", "content": "alpha bravo " * (2000 if long else 1)}]
    plain = {"model": "m", "messages": messages}
    body = {**plain, "tools": [{"type": "function", "function": {"name": "kilo", "description": "lima mike"}}],
            "add_generation_prompt": False}

    def count(request):
        req = parse(request, "chat")
        asyncio.run(req.count_deferred())
        return req.tokens

    assert count(body) > count(plain) == model_tokenizer.count_chat(messages)
    assert count(body) == model_tokenizer.count_chat(messages, body) == len(
        asyncio.run(tokens.tokenize_async("", messages, body)))  # what the engine simulator encodes
    with pytest.raises(RequestError) as e:
        count({**plain, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert e.value.status == 400 and "add_generation_prompt" in e.value.message
