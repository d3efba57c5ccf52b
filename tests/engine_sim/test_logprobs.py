"""Log probabilities: the simulator computes none, so a request for them is a 400 (as `n > 1` is), not a 200
with `"logprobs": null` that an OpenAI client would fail to read. Neutral values are served as usual.

Against a real `baton engine-sim` process, completions and chat, streaming and not.
"""

from __future__ import annotations

import pytest
from simproc import stream_text, text_of, worker_yaml

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
PROMPT = {"prompt": "Log probabilities are not simulated", "max_tokens": 4}
MESSAGES = {"messages": [{"role": "user", "content": "Log probabilities are not simulated"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def worker(engines):
    return engines.start(worker_yaml(ctx=True), "--sim-speed", "0")


def _answer(worker, path: str, body: dict, stream: bool) -> tuple[int, object]:
    return worker.stream(body, path) if stream else worker.post(path, body)


def _assert_refused(status: int, err: object, fragment: str) -> None:
    assert status == 400, err
    # the same shape as the n > 1 refusal (TensorRT-LLM's error body)
    assert isinstance(err, dict) and set(err) == {"object", "message", "type", "param", "code"}, err
    assert (err["object"], err["type"], err["param"], err["code"]) == ("error", "BadRequestError", None, 400)
    assert fragment in err["message"] and "no log probabilities" in err["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
@pytest.mark.parametrize("logprobs", [1, 5, True, "1", [1]])
def test_completions_logprobs_are_refused(worker, logprobs, stream):
    status, err = _answer(worker, COMPLETIONS, {**PROMPT, "logprobs": logprobs}, stream)
    _assert_refused(status, err, "only logprobs=null (or 0)")


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"logprobs": True}, "only logprobs=false"),
        ({"logprobs": True, "top_logprobs": 0}, "only logprobs=false"),
        ({"logprobs": True, "top_logprobs": 3}, "only logprobs=false"),
        ({"logprobs": "yes"}, "only logprobs=false"),
        ({"top_logprobs": 2}, "only top_logprobs=0"),
        ({"logprobs": False, "top_logprobs": 20}, "only top_logprobs=0"),
    ],
)
def test_chat_logprobs_are_refused(worker, fields, fragment, stream):
    status, err = _answer(worker, CHAT, {**MESSAGES, **fields}, stream)
    _assert_refused(status, err, fragment)


def test_refusal_matches_the_n_refusal(worker):
    _, n_err = worker.post(COMPLETIONS, {**PROMPT, "n": 2})
    _, lp_err = worker.post(COMPLETIONS, {**PROMPT, "logprobs": 2})
    assert {k: v for k, v in n_err.items() if k != "message"} == {k: v for k, v in lp_err.items() if k != "message"}


@pytest.mark.parametrize("fields", [{}, {"logprobs": None}, {"logprobs": 0}], ids=["absent", "null", "zero"])
def test_completions_neutral_logprobs_are_served(worker, fields):
    body = {**PROMPT, **fields}
    full = worker.complete(body)
    assert full["choices"][0]["logprobs"] is None and len(full["choices"][0]["token_ids"]) == 4
    assert full["choices"] == worker.complete(PROMPT)["choices"]  # the same answer as without the field
    status, chunks = worker.stream(body)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert stream_text(chunks) == text_of(full)


@pytest.mark.parametrize(
    "fields",
    [{}, {"logprobs": None}, {"logprobs": False}, {"top_logprobs": None}, {"top_logprobs": 0},
     {"logprobs": False, "top_logprobs": 0}],
    ids=["absent", "null", "false", "top-null", "top-zero", "false-top-zero"],
)
def test_chat_neutral_logprobs_are_served(worker, fields):
    body = {**MESSAGES, **fields}
    full = worker.complete(body, CHAT)
    assert full["choices"][0]["logprobs"] is None and full["usage"]["completion_tokens"] == 4
    status, chunks = worker.stream(body, CHAT)
    assert status == 200 and chunks[-1] == "[DONE]"
    assert stream_text(chunks) == text_of(full)

