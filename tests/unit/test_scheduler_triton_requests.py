"""The `triton` runtime's request translation and error mapping (`baton.scheduler.engines.TritonClient`) against a
stand-in for `tritonclient.grpc.aio`'s client: what goes out as Triton inputs, and what a Triton answer or error
becomes for the request flow (status, body, whether `classify_failure` retries it)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizer_fixture import BOS, write_tokenizer
from tritonclient.utils import InferenceServerException

from baton import tokens
from baton.engine_sim.triton_frontend import parse_request
from baton.model_tokenizer import load_tokenizer
from baton.scheduler.endpoints import Endpoint
from baton.scheduler.engines import TritonClient, _BadRequest, _TritonCall, classify_failure, triton_error

EP = Endpoint("127.0.0.1:8000", "decode")
MISMATCH = ("Disagg server does not currently support these cacheState, please check the cacheState of the context "
            "and gen executors: only support same kv cache dtype (kvCacheDtype: context=fp8, generation=fp16)")


# ------------------------------------------------------------------------------ a tritonclient stand-in
class Result:
    """An InferResult: `as_numpy` of the named outputs."""

    def __init__(self, **arrays: Any) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str) -> Any:
        return self.arrays.get(name)


def tokens_result(ids: list[int], text: str = "", n_in: int = 3, **extra: Any) -> Result:
    return Result(output_ids=np.array([[ids]], dtype=np.int32), sequence_length=np.array([[len(ids)]], dtype=np.int32),
                  num_input_tokens=np.array([[n_in]], dtype=np.int32),
                  text_output=np.array([[text.encode()]], dtype=np.object_), **extra)


class Stream:
    """What `stream_infer` returns: an async iterator of (result, error) with `cancel()`."""

    def __init__(self, requests: Any, items: list[tuple[Any, Any]]) -> None:
        self._requests = requests
        self._items = list(items)
        self.sent: list[dict] | None = None
        self.cancelled = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> tuple[Any, Any]:
        if self.sent is None:
            self.sent = [r async for r in self._requests]
        if not self._items:
            raise StopAsyncIteration
        return self._items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


SIM_INPUTS = ["input_ids", "text_input", "input_lengths", "request_output_len", "streaming", "beam_width",
              "context_phase_params", "return_num_input_tokens", "return_num_output_tokens", "exclude_input_in_output"]
SIM_OUTPUTS = ["output_ids", "sequence_length", "num_input_tokens", "num_output_tokens", "text_output",
               "context_phase_params"]


class FakeTriton:
    def __init__(self, items: list[tuple[Any, Any]] | None = None, result: Any = None,
                 error: Exception | None = None) -> None:
        self.items = items or []
        self.result = result
        self.error = error
        self.stream: Stream | None = None
        self.infer_inputs: list[Any] | None = None

    async def get_model_metadata(self, model_name: str, **_: Any) -> dict:
        """The engine simulator's models: the tensorrt_llm model's tensors and the text ones."""
        return {"name": model_name, "inputs": [{"name": n} for n in SIM_INPUTS],
                "outputs": [{"name": n} for n in SIM_OUTPUTS]}

    async def get_model_config(self, model_name: str, **_: Any) -> dict:
        return {"config": {"name": model_name, "model_transaction_policy": {"decoupled": model_name == "generation"}}}

    def stream_infer(self, inputs_iterator: Any, headers: Any = None) -> Stream:
        self.stream = Stream(inputs_iterator, self.items)
        return self.stream

    async def infer(self, model_name: str, inputs: list[Any], **_: Any) -> Any:
        self.infer_inputs = inputs
        if self.error is not None:
            raise self.error
        return self.result

    async def close(self) -> None:
        pass


def client_with(fake: FakeTriton) -> TritonClient:
    client = TritonClient(read_timeout=5)
    client._clients["127.0.0.1:8001"] = fake  # noqa: SLF001 - the channel of EP (gRPC at the HTTP port + 1)
    return client


def post(fake: FakeTriton, body: dict, path: str = "/v1/completions") -> tuple[int, Any]:
    status, data, _ = asyncio.run(client_with(fake).post(EP, path, json.dumps(body).encode(), "rid"))
    return status, json.loads(data)


def open_(fake: FakeTriton, body: dict, path: str = "/v1/completions") -> tuple[int, bytes]:
    async def run() -> tuple[int, bytes]:
        response = await client_with(fake).open(EP, path, json.dumps({**body, "stream": True}).encode(), "rid")
        return response.status, await response.read()

    return asyncio.run(run())


def sent_inputs(fake: FakeTriton) -> dict[str, Any]:
    """name -> numpy value of the inputs the scheduler sent (stream or unary)."""
    from tritonclient.utils import deserialize_bytes_tensor

    inputs = fake.infer_inputs if fake.infer_inputs is not None else fake.stream.sent[0]["inputs"]
    out = {}
    for t in inputs:
        raw = t._get_content()  # noqa: SLF001 - the serialized tensor, as sent on the wire
        if t.datatype() == "BYTES":
            out[t.name()] = [v.decode() for v in deserialize_bytes_tensor(raw)]
        else:
            dtype = {"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64, "BOOL": np.bool_,
                     "UINT8": np.uint8}[t.datatype()]
            out[t.name()] = np.frombuffer(raw, dtype=dtype).reshape(t.shape()).tolist()
    return out


def stream_error(message: str) -> tuple[None, InferenceServerException]:
    """An error response inside a gRPC stream, as tritonclient's aio `stream_infer` builds it: no status."""
    return None, InferenceServerException(msg=message)


# ------------------------------------------------------------------------------ 1. errors inside a stream
VALIDATION_ERRORS = [  # Triton core's INVALID_ARG texts (src/model.cc, src/infer_request.cc)
    "unexpected inference input 'random_seed' for model 'generation'",
    "[request id: rid] unexpected shape for input 'temperature' for model 'generation'. Expected [1,1], got [1,2]. ",
    "[request id: rid] inference input 'seed' data-type is 'INT64', but model 'generation' expects 'UINT64'",
    "[request id: rid] expected 3 inputs but got 2 inputs for model 'generation'. Got input(s) ['input_ids', "
    "'streaming'], but missing required input(s) ['request_output_len']. Please provide all required input(s).",
    "[request id: rid] expected number of inputs between 2 and 30 but got 1 inputs for model 'generation'. Got "
    "input(s) ['input_ids'], but missing required input(s) ['request_output_len']. Please provide all required "
    "input(s).",
    "[request id: rid] input byte size mismatch for input 'input_ids' for model 'generation'. Expected 12, got 8",
    "unexpected datatype FP64 for input temperature",
]


@pytest.mark.parametrize("message", VALIDATION_ERRORS)
def test_tritons_request_validation_errors_without_a_status_are_400s_passed_through(message):
    status, body = triton_error(message, None)
    assert status == 400 and json.loads(body)["type"] == "BadRequestError"
    assert classify_failure(EP, status, body) is None  # passed through, never retried


def test_other_status_less_errors_stay_retryable_and_kv_mismatches_stay_kv_mismatches():
    assert classify_failure(EP, *triton_error("boom", None)).kind == "retryable"
    assert classify_failure(EP, *triton_error(MISMATCH, None)).kind == "kv_mismatch"
    # a KV-format mismatch whose text happens to quote a validation phrase is still a mismatch
    assert classify_failure(EP, *triton_error(MISMATCH + " (unexpected shape for input 'x')", None)).kind == \
        "kv_mismatch"


@pytest.mark.parametrize("stream", [False, True])
def test_a_validation_error_inside_the_generation_stream_is_the_clients_400(stream):
    """The docs' example: `seed` sent to a backend that names the input `random_seed` (before May 2025)."""
    message = "unexpected inference input 'seed' for model 'generation'"
    body = {"prompt": [1, 2, 3], "max_tokens": 4, "seed": 7}
    if stream:
        status, raw = open_(FakeTriton([stream_error(message)]), body)
        data = json.loads(raw)
    else:
        status, data = post(FakeTriton([stream_error(message)]), body)
    assert status == 400 and data["message"] == message
    assert classify_failure(EP, status, json.dumps(data).encode()) is None


# ------------------------------------------------------------------------------ 2. INT32 tensors
@pytest.mark.parametrize(("body", "path", "param"), [
    ({"prompt": "x", "max_tokens": 2**31}, "/v1/completions", "max_tokens"),
    ({"prompt": "x", "max_tokens": -(2**31) - 1}, "/v1/completions", "max_tokens"),
    ({"prompt": [1, 2**31], "max_tokens": 4}, "/v1/completions", "prompt"),
    ({"prompt": [[1, -(2**31) - 1]], "max_tokens": 4}, "/v1/completions", "prompt"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2**40}, "/v1/chat/completions",
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt_token_ids": [2**31]}, "/v1/chat/completions",
     "prompt_token_ids"),
    ({"prompt": "x", "best_of": 2**31, "use_beam_search": True}, "/v1/completions", "best_of"),
])
def test_values_beyond_int32_are_a_400_not_an_overflow(body, path, param):
    status, data = post(FakeTriton(), body, path)  # nothing reaches Triton
    assert status == 400 and data["code"] == 400 and data["param"] == param, data
    assert data["message"].startswith(param)


# ------------------------------------------------------------------------------ 3. finish_reason
def test_a_context_only_answer_says_length_even_for_one_token():
    """As trtllm-serve and the HTTP simulator: the router then sends the request on to a generation worker
    (a "stop" would make it answer the client from the prefill, unlike the same request served locally)."""
    raw = json.dumps({"first_gen_tokens": [7], "ctx_request_id": 5, "encoded_opaque_state": "x"}).encode()
    result = tokens_result([7], " a", context_phase_params=np.frombuffer(raw, dtype=np.uint8).reshape(1, -1))
    for max_tokens in (1, 4):
        status, data = post(FakeTriton(result=result), {"prompt": [1, 2], "max_tokens": max_tokens,
                                                        "disaggregated_params": {"request_type": "context_only"}})
        assert status == 200 and data["choices"][0]["finish_reason"] == "length"


def test_local_answers_say_length_at_max_tokens_and_stop_before():
    full = [(tokens_result([5, 6]), None), (tokens_result([7]), None)]
    assert post(FakeTriton(list(full)), {"prompt": [1], "max_tokens": 3})[1]["choices"][0]["finish_reason"] == "length"
    short = [(tokens_result([5, 6]), None)]
    assert post(FakeTriton(short), {"prompt": [1], "max_tokens": 3})[1]["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------------------ 4. top_p, max_completion_tokens
@pytest.mark.parametrize("top_p", [0, 0.0, -0.5])
def test_top_p_the_backend_would_drop_is_refused(top_p):
    status, data = post(FakeTriton(), {"prompt": "x", "top_p": top_p})
    error = data["error"]
    assert status == 400 and error["code"] == "unsupported_parameter" and error["param"] == "top_p"
    assert "runtime: triton" in error["message"] and "top_k" in error["message"]


def test_top_p_above_zero_is_sent():
    fake = FakeTriton([(tokens_result([5]), None)])
    assert post(fake, {"prompt": "x", "top_p": 0.1, "max_tokens": 1})[0] == 200
    assert sent_inputs(fake)["runtime_top_p"] == [[pytest.approx(0.1)]]


def test_max_completion_tokens_is_refused_on_completions_and_read_on_chat():
    status, data = post(FakeTriton(), {"prompt": "x", "max_completion_tokens": 5})
    assert status == 400 and data["param"] == "max_completion_tokens" and "max_tokens" in data["message"]
    fake = FakeTriton([(tokens_result([5]), None)])
    post(fake, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5}, "/v1/chat/completions")
    assert sent_inputs(fake)["request_output_len"] == [[5]]


# ------------------------------------------------------------------------------ 5. beam search
@pytest.mark.parametrize(("extra", "width"), [
    ({}, 1),
    ({"use_beam_search": True}, 1),  # beam width = best_of or n (1), as trtllm-serve's SamplingParams
    ({"use_beam_search": True, "best_of": 3}, 3),
    ({"use_beam_search": False, "best_of": 1}, 1),
    ({"best_of": 1}, 1),
])
def test_beam_width_is_best_of_or_n_only_with_use_beam_search(extra, width):
    call = _TritonCall(json.dumps({"prompt": "x", **extra}).encode(), "/v1/completions", "r")
    assert call.beam_width == width


@pytest.mark.parametrize(("extra", "param", "unsupported"), [
    ({"best_of": 3}, "best_of", True),  # trtllm-serve samples best_of sequences and returns the best: not here
    ({"best_of": 2, "use_beam_search": False}, "best_of", True),
    ({"best_of": 0, "use_beam_search": True}, "best_of", False),
    ({"best_of": "2", "use_beam_search": True}, "best_of", False),
    ({"use_beam_search": "yes"}, "use_beam_search", False),
])
def test_best_of_without_beam_search_and_bad_values_are_refused(extra, param, unsupported):
    with pytest.raises(_BadRequest) as info:
        _TritonCall(json.dumps({"prompt": "x", **extra}).encode(), "/v1/completions", "r")
    body = json.loads(info.value.body())
    if unsupported:
        assert body["error"]["code"] == "unsupported_parameter" and body["error"]["param"] == param
    else:
        assert body["param"] == param and body["code"] == 400


def test_only_beam_zero_is_read_up_to_its_sequence_length():
    """A beam-width-2 answer as the tensorrt_llm backend shapes it: output_ids [1, beam, seq], padded."""
    result = Result(output_ids=np.array([[[11, 12, 2], [21, 22, 23]]], dtype=np.int32),
                    sequence_length=np.array([[2, 3]], dtype=np.int32),
                    text_output=np.array([[b" a b", b" d e f"]], dtype=np.object_),
                    num_input_tokens=np.array([[5]], dtype=np.int32))
    call = _TritonCall(b'{"prompt": "x", "max_tokens": 3, "best_of": 2, "use_beam_search": true}',
                       "/v1/completions", "r")
    assert call.tokens_of(result) == ([11, 12], " a b", 5)
    status, data = post(FakeTriton([(result, None)]), {"prompt": "x", "max_tokens": 3, "best_of": 2,
                                                      "use_beam_search": True})
    assert status == 200 and data["choices"][0]["token_ids"] == [11, 12] and data["choices"][0]["text"] == " a b"
    assert data["usage"]["completion_tokens"] == 2
    # without sequence_length: the whole of beam 0
    assert call.tokens_of(Result(output_ids=np.array([[[4, 5]]], dtype=np.int32))) == ([4, 5], "", None)


# ------------------------------------------------------------------------------ 6. chat prompts
@pytest.fixture
def model_tokenizer(tmp_path: Path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tok"))
    tokens.set_tokenizer(tokenizer)
    try:
        yield tokenizer
    finally:
        tokens.set_tokenizer(None)


def test_chat_goes_as_the_tokenized_template_when_the_scheduler_has_the_tokenizer(model_tokenizer):
    """One BOS (the template's), as trtllm-serve encodes a chat; text_input would get a second one from the
    preprocessing's add_special_tokens."""
    messages = [{"role": "user", "content": "alpha bravo"}]
    want = model_tokenizer.encode_chat(messages)
    bos = model_tokenizer.tokenizer.token_to_id(BOS)
    assert want.count(bos) == 1
    for stream in (False, True):
        fake = FakeTriton([(tokens_result([5]), None)])
        body = {"messages": messages, "max_tokens": 1}
        if stream:
            assert open_(fake, body, "/v1/chat/completions")[0] == 200
        else:
            assert post(fake, body, "/v1/chat/completions")[0] == 200
        sent = sent_inputs(fake)
        assert "text_input" not in sent and sent["input_ids"] == [want] and sent["input_lengths"] == [[len(want)]]
    # the engine simulator's Triton front end reads them as the same prompt trtllm-serve's chat would have
    req = type("R", (), {"parameters": {}, "data": {"input_ids": np.array([want], dtype=np.int32),
                                                    "request_output_len": np.array([[1]], dtype=np.int32)}})
    assert parse_request(req, 600).prompt == want
    # context-only (unary infer) too
    raw = json.dumps({"first_gen_tokens": [5], "ctx_request_id": 1, "encoded_opaque_state": "x"}).encode()
    fake = FakeTriton(result=tokens_result([5], context_phase_params=np.frombuffer(raw, dtype=np.uint8).reshape(1, -1)))
    post(fake, {"messages": messages, "disaggregated_params": {"request_type": "context_only"}}, "/v1/chat/completions")
    assert sent_inputs(fake)["input_ids"] == [want]



def test_a_chats_template_fields_reach_its_tokens_as_they_reach_its_count(tmp_path: Path):
    """`tools: []` selects the template's tool branch (`tools is not none`), as trtllm-serve renders it and as
    routing counted the chat: the ids sent are those of that rendering."""
    template = ("{{ bos_token }}{% if tools is not none %}[tools]{% endif %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tok", chat_template=template))
    tokens.set_tokenizer(tokenizer)
    try:
        body = {"messages": [{"role": "user", "content": "alpha"}], "max_tokens": 1, "tools": []}
        want = tokenizer.encode_chat(body["messages"], body)
        assert want != tokenizer.encode_chat(body["messages"])  # the field changes the prompt
        assert tokens.count_chat_tokens(body["messages"], body) == len(want)
        fake = FakeTriton([(tokens_result([5]), None)])
        assert post(fake, body, "/v1/chat/completions")[0] == 200
        assert sent_inputs(fake)["input_ids"] == [want]
    finally:
        tokens.set_tokenizer(None)


def test_a_chat_the_template_refuses_is_a_400(model_tokenizer):
    status, data = post(FakeTriton(), {"messages": [{"role": "tool", "content": "x"}]}, "/v1/chat/completions")
    assert status == 400 and "unknown role tool" in data["message"]


def test_chat_goes_as_text_without_the_models_tokenizer():
    fake = FakeTriton([(tokens_result([5]), None)])
    post(fake, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, "/v1/chat/completions")
    sent = sent_inputs(fake)
    assert sent["text_input"] == ["<|user|>hi"] and "input_ids" not in sent


def test_a_channel_with_a_stream_in_flight_is_not_closed_until_the_stream_ends():
    """A replica out of the lists can still be streaming (a pod that failed readiness under load keeps
    serving what it started): its channel stays open past RETIRED_CHANNEL_S until that stream is over."""
    from baton.scheduler import engines

    now = [0.0]
    fake = FakeTriton(items=[(tokens_result([5]), None), (tokens_result([6]), None)])
    closed = []

    async def close() -> None:
        closed.append(True)

    fake.close = close
    client = client_with(fake)
    client._clock = lambda: now[0]  # noqa: SLF001

    async def main():
        body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}).encode()
        response = await client.open(EP, "/v1/completions", body, "rid")
        await client.retain([])
        now[0] = engines.RETIRED_CHANNEL_S + 1
        await client.retain([])
        assert not closed  # the stream is still being read
        assert b"[DONE]" in await response.read()
        await client.retain([])
        assert closed == [True]

    asyncio.run(main())


class Channel:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def test_the_channel_of_a_replica_long_out_of_the_endpoint_lists_is_closed():
    """Pod churn must not pile up gRPC channels: one whose replica left the lists is closed after
    RETIRED_CHANNEL_S (its streams ended with its pod long before); one whose replica came back is kept."""
    from baton.scheduler import engines

    now = [0.0]
    client = TritonClient(read_timeout=5, clock=lambda: now[0])
    a, b, c = (Endpoint(f"127.0.0.{i}:8000", "decode") for i in (1, 2, 3))
    channels = {e: Channel() for e in (a, b, c)}
    for e, ch in channels.items():
        client._clients[engines.grpc_address(e)] = ch  # noqa: SLF001 - as `_client` would have made them
    by_runtime = engines.EnginesByRuntime("trtllm-serve", lambda runtime: client, first=engines.TrtllmServeClient())
    by_runtime.clients["triton"] = client

    async def main():
        await by_runtime.retain([a])  # b and c leave the lists
        now[0] = engines.RETIRED_CHANNEL_S - 1
        await by_runtime.retain([a, c])  # c comes back (its pod's address again) before b's channel retires
        assert not any(ch.closed for ch in channels.values())
        now[0] = engines.RETIRED_CHANNEL_S
        await by_runtime.retain([a, c])
        assert [channels[e].closed for e in (a, b, c)] == [False, True, False]
        assert client._client(b) is not channels[b]  # noqa: SLF001 - a replica at b again gets a new channel
        await by_runtime.close()

    asyncio.run(main())


def test_a_failed_handoff_answered_400_as_trtllm_serve_does_is_still_a_mismatch_or_lost_kv():
    """trtllm-serve answers any exception of a generation 400 BadRequestError: the text, not the status,
    says a handoff failed (never passed through to the client as its own mistake)."""
    def body(message):
        return json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400}).encode()

    assert classify_failure(EP, 400, body(MISMATCH)).kind == "kv_mismatch"
    lost = classify_failure(EP, 400, body("Terminating generation request 7 due to KV cache transfer timeout"))
    assert lost.kind == "kv_lost" and lost.status == 400
    assert classify_failure(EP, 400, body("max_tokens must be at least 1")) is None
    assert classify_failure(EP, 404, body("model not found")) is None


@pytest.mark.parametrize("message", [
    "Error in kv cache transfer for generation requests",  # TensorRT-LLM's PyExecutor
    "KV transfer from context worker 127.0.0.1:9 failed: ConnectionRefusedError: [Errno 111] Connect call failed",
    "KV cache transfer failed: the KV cache of ctx_request_id 3 (399 tokens) does not fit the context worker's "
    "pre-allocated transfer buffer, and the NIXL backend cannot transfer through a buffer allocated for one transfer",
])
def test_another_failed_kv_transfer_answered_400_is_retried_not_passed_through(message):
    """A KV transfer that failed otherwise (the context worker died, a buffer too small for NIXL) comes as
    trtllm-serve's 400 too: a failure of the handoff, retried as a 5xx answer is, not the client's mistake."""
    body = json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400}).encode()
    failure = classify_failure(EP, 400, body)
    assert failure is not None and failure.kind == "retryable" and failure.message == message


def test_kv_of_a_context_worker_that_restarted_since_the_prefill_is_lost_kv():
    text = ("KV cache for ctx_request_id 4 is not available: the handle names context worker instance ab, this "
            "worker is cd (it restarted since the prefill)")
    body = json.dumps({"object": "error", "message": text, "type": "BadRequestError", "code": 400}).encode()
    assert classify_failure(EP, 400, body).kind == "kv_lost"


# ------------------------------------------------------------------------------ NVIDIA's bare models
class BareTriton(FakeTriton):
    """NVIDIA's context/generation models (copies of tensorrt_llm): token ids in and out, end_id and pad_id
    optional inputs, no preprocessing model to fill them."""

    async def get_model_metadata(self, model_name: str, **_: Any) -> dict:
        inputs = [n for n in SIM_INPUTS if n != "text_input"] + ["end_id", "pad_id"]
        outputs = [n for n in SIM_OUTPUTS if n != "text_output"]
        return {"name": model_name, "inputs": [{"name": n} for n in inputs], "outputs": [{"name": n} for n in outputs]}


def test_the_bare_models_get_the_tokenizers_end_id_so_generation_stops_at_the_end_of_the_sequence(model_tokenizer):
    """NVIDIA's ensemble fills end_id in its preprocessing model; calling the bare models, the scheduler must
    send it, or the engine's end id stays -1 and every generation runs to max_tokens."""
    from tokenizer_fixture import EOS

    eos = model_tokenizer.tokenizer.token_to_id(EOS)
    fake = BareTriton(result=tokens_result([7, 8]))
    status, _ = post(fake, {"prompt": [1, 2, 3], "max_tokens": 4})
    sent = sent_inputs(fake)
    assert status == 200 and sent["end_id"] == [[eos]] and sent["pad_id"] == [[eos]]  # no pad token: the EOS
    fake = BareTriton(result=tokens_result([7, 8]))
    post(fake, {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
    assert sent_inputs(fake)["end_id"] == [[-1]]  # ignore_eos wins, as TensorRT-LLM's LLM API has it
    fake = FakeTriton(result=tokens_result([7, 8], " a"))  # a model that declares no end_id gets none
    post(fake, {"prompt": [1, 2, 3], "max_tokens": 4})
    assert "end_id" not in sent_inputs(fake)


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_k", -1), ("top_p", 1.5),
                                         ("repetition_penalty", 0), ("min_tokens", -2)])
def test_sampling_values_tensorrt_llm_refuses_are_the_clients_400_before_any_replica(field, value):
    """TensorRT-LLM's executor checks these ranges and its Triton backend reports a failure as INTERNAL, which
    would read as the replica's fault (retried, and three in a row take it out of rotation)."""
    fake = FakeTriton(result=tokens_result([7]))
    status, body = post(fake, {"prompt": [1, 2, 3], "max_tokens": 4, field: value})
    assert status == 400 and body["param"] == field and fake.infer_inputs is None, body


@pytest.mark.parametrize("message", [
    "Executor failed process requestId 7 due to the following error: [TensorRT-LLM][ERROR] Assertion failed: "
    "Prompt length (9000) exceeds maximum input length (8192). (llmRequest.h:412)",
    "[TensorRT-LLM][ERROR] Assertion failed: temperature.value() >= 0.f (samplingConfig.cpp:233)",
    "request_output_len is not present in the request",
])
@pytest.mark.parametrize("grpc_status", [None, "StatusCode.INTERNAL"])
def test_the_backends_refusals_of_a_request_are_400s_not_replica_failures(message, grpc_status):
    status, body = triton_error(message, grpc_status)
    assert status == 400 and classify_failure(EP, status, body) is None


def test_streamed_beam_search_is_refused_rather_than_relayed_as_repeated_tokens():
    """Streaming with beam width > 1, TensorRT-LLM returns every beam whole at each step."""
    status, raw = open_(FakeTriton([]), {"prompt": [1, 2, 3], "max_tokens": 4, "use_beam_search": True, "best_of": 2})
    assert status == 400 and "stream with use_beam_search is not supported" in raw.decode(), raw



def test_a_replica_is_healthy_when_the_model_its_tier_serves_is_ready():
    """A prefill pod loads only `context`, a decode pod only `generation` (--load-model)."""
    class Loaded(FakeTriton):
        def __init__(self, models):
            super().__init__()
            self.models = models

        async def is_server_ready(self, **_):
            return True

        async def is_model_ready(self, name, **_):
            return name in self.models

    async def healthy(tier, models):
        client = TritonClient(read_timeout=5)
        client._clients["127.0.0.1:8001"] = Loaded(models)  # noqa: SLF001
        return await client.health(Endpoint("127.0.0.1:8000", tier), 1.0)

    assert asyncio.run(healthy("prefill", {"context"})) and asyncio.run(healthy("decode", {"generation"}))
    assert not asyncio.run(healthy("prefill", {"generation"})) and not asyncio.run(healthy("decode", {"context"}))
