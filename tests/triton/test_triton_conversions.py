"""The pure parts of the Triton runtime, without processes: the scheduler's OpenAI <-> KServe v2 translation
(`baton.scheduler.engines`) and the front end's request parsing (`baton.engine_sim.triton_frontend`, whose
PyTriton import is deferred, so it loads in the project's own venv)."""

from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace

import numpy as np
import pytest

from baton import kvformat
from baton.engine_sim.handoff import OpaqueState, encode_opaque
from baton.engine_sim.triton_frontend import (
    BEAM_MESSAGE,
    EngineRequestError,
    decode_context_phase_params,
    encode_context_phase_params,
    parse_request,
    response_tensors,
)
from baton.scheduler.endpoints import Endpoint
from baton.tokens import is_token_ids
from baton.scheduler.engines import (
    EngineFailure,
    TritonClient,
    _BadRequest,
    _TritonCall,
    classify_failure,
    grpc_address,
    triton_error,
)

VOCAB = 128_256
MISMATCH = ("Disagg server does not currently support these cacheState, please check the cacheState of the context "
            "and gen executors: only support same kv cache dtype (kvCacheDtype: context=fp8, generation=fp16)")


def _state() -> kvformat.CacheState:
    return kvformat.from_wire({
        "kv_dtype": "fp8", "tokens_per_block": 32, "num_layers": 32, "num_kv_heads": 8, "head_dim": 128,
        "attention_type": "DEFAULT", "kv_factor": 2, "tp": 1, "pp": 1, "cp": 1, "enable_attention_dp": False,
        "transfer_backend": "UCX", "trtllm_version": "1.2.0", "speculative": "", "model_identity": "m",
        "beam_width": 1})


def _handle_bytes(ctx_id: int = 42) -> bytes:
    opaque = encode_opaque(OpaqueState("127.0.0.1", 9000, "abc", ctx_id, _state()))
    return encode_context_phase_params([7], ctx_id, opaque)


def _request(params: dict | None = None, **data) -> SimpleNamespace:
    arrays = {"request_output_len": np.array([[4]], dtype=np.int32)}
    arrays.update(data)
    return SimpleNamespace(parameters=params or {}, data=arrays)


def _arrays(inputs: list) -> dict[str, np.ndarray]:
    """The scheduler's Triton inputs as the model receives them: name -> numpy array."""
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    out = {}
    for t in inputs:
        raw = t._get_content()  # noqa: SLF001 - the serialized tensor, as sent on the wire
        if t.datatype() == "BYTES":
            out[t.name()] = deserialize_bytes_tensor(raw).reshape(t.shape())
        else:
            out[t.name()] = np.frombuffer(raw, dtype=triton_to_np_dtype(t.datatype())).reshape(t.shape())
    return out


class _Result:
    """An InferResult holding the given outputs (`as_numpy` is None for any other, as for an output not sent)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)


def _answer(body: dict, path: str = "/v1/completions", generated: tuple[int, ...] = (11, 12),
            model_excludes_input: bool = True) -> dict:
    """The OpenAI answer the scheduler builds for `body` from the simulator's response to the scheduler's inputs;
    `model_excludes_input` stands for the model's exclude_input_in_output parameter (what applies when the
    request does not set the input)."""
    call = _TritonCall(json.dumps(body).encode(), path, "r")
    arrays = {"exclude_input_in_output": np.array([[model_excludes_input]]), **_arrays(call.inputs(False))}
    parsed = parse_request(_request(**arrays), VOCAB)
    ids, text, n_in = call.tokens_of(_Result(response_tensors(parsed, len(parsed.prompt), 2, list(generated))))
    return json.loads(call.full(ids, text, n_in))


EP = Endpoint("127.0.0.1:8000", "decode")


# The tensors of the engine simulator's models (its default: text_input / text_output included)
SIM_INPUTS = ["input_ids", "text_input", "input_lengths", "request_output_len", "streaming", "beam_width",
              "context_phase_params", "return_num_input_tokens", "return_num_output_tokens", "exclude_input_in_output"]
SIM_OUTPUTS = ["output_ids", "sequence_length", "num_input_tokens", "num_output_tokens", "text_output",
               "context_phase_params"]


class _FakeTriton:
    """tritonclient.grpc.aio's client in front of models declaring `inputs` / `outputs` (and, as Triton does,
    refusing a request naming any other): `infer` answers `error` or the first of `responses`; a stream answers
    `error` as its one response (an error response inside a stream: no status), or `responses` one by one.
    `sent` holds each request's model, inputs (name -> array) and requested outputs."""

    def __init__(self, error: Exception | None = None, responses: list[dict] | None = None,
                 inputs: list[str] = SIM_INPUTS, outputs: list[str] = SIM_OUTPUTS,
                 decoupled: tuple[str, ...] = ("generation",)) -> None:
        self.error = error
        self.decoupled = decoupled
        self.responses = responses or []
        self.inputs, self.outputs = inputs, outputs
        self.metadata_reads = 0
        self.sent: list[dict] = []

    async def get_model_metadata(self, model_name: str, **_: object) -> dict:
        self.metadata_reads += 1
        return {"name": model_name, "inputs": [{"name": n} for n in self.inputs],
                "outputs": [{"name": n} for n in self.outputs]}

    async def get_model_config(self, model_name: str, **_: object) -> dict:
        return {"config": {"name": model_name, "model_transaction_policy": {"decoupled": model_name in self.decoupled}}}

    def _receive(self, model: str, inputs: list, outputs: list) -> Exception | None:
        from tritonclient.utils import InferenceServerException

        self.sent.append({"model": model, "inputs": _arrays(inputs), "outputs": [o.name() for o in outputs]})
        for kind, names, declared in (("input", self.sent[-1]["inputs"], self.inputs),
                                      ("output", self.sent[-1]["outputs"], self.outputs)):
            for name in names:
                if name not in declared:
                    return InferenceServerException(f"[request id: r] unexpected inference {kind} '{name}' for "
                                                    f"model '{model}'", "StatusCode.INVALID_ARGUMENT")
        return self.error

    async def infer(self, model_name: str, inputs: list, outputs: list, **_: object) -> _Result:
        from tritonclient.utils import InferenceServerException

        if model_name in self.decoupled:  # Triton's own refusal
            raise InferenceServerException("ModelInfer RPC doesn't support models with decoupled transaction policy",
                                           "StatusCode.UNIMPLEMENTED")
        error = self._receive(model_name, inputs, outputs)
        if error is not None:
            raise error
        return _Result(self.responses[0])

    def stream_infer(self, requests: object, headers: object = None) -> object:
        fake = self

        class Stream:
            items: list | None = None

            def __aiter__(self):
                return self

            async def __anext__(self):
                if self.items is None:
                    request = [r async for r in requests][0]
                    error = fake._receive(request["model_name"], request["inputs"], request["outputs"])
                    if error is not None:  # inside a stream: the text only
                        error = type(error)(error.message())
                    self.items = [(None, error)] if error is not None else [(_Result(r), None) for r in fake.responses]
                if not self.items:
                    raise StopAsyncIteration
                return self.items.pop(0)

            def cancel(self) -> None:
                pass

        return Stream()

    async def close(self) -> None:
        pass


def _with(fake: _FakeTriton, client: TritonClient | None = None) -> TritonClient:
    client = client or TritonClient(read_timeout=5)
    client._clients[grpc_address(EP)] = fake  # noqa: SLF001 - as `_client` would have made it
    return client


def _post(fake: _FakeTriton, body: dict, client: TritonClient | None = None) -> tuple[int, bytes]:
    status, data, _ = asyncio.run(_with(fake, client).post(EP, "/v1/completions", json.dumps(body).encode(), "r"))
    return status, data


def _open(fake: _FakeTriton, body: dict) -> tuple[int, bytes]:
    async def run() -> tuple[int, bytes]:
        response = await _with(fake).open(EP, "/v1/completions", json.dumps({**body, "stream": True}).encode(), "r")
        return response.status, await response.read()

    return asyncio.run(run())


# ------------------------------------------------------------------------------ scheduler side
@pytest.mark.parametrize("request_type", ["context_only", "context_and_generation"])  # unary infer, stream_infer
def test_a_full_triton_queue_is_an_overloaded_replica_retried_elsewhere_not_a_lost_one(request_type):
    from tritonclient.utils import InferenceServerException

    # as Triton core refuses a request beyond default_queue_policy.max_queue_size (inside a stream: no status)
    status = "StatusCode.UNAVAILABLE" if request_type == "context_only" else None
    fake = _FakeTriton(InferenceServerException("Exceeds maximum queue size", status))
    code, data = _post(fake, {"prompt": [1, 2], "disaggregated_params": {"request_type": request_type}})
    failure = classify_failure(EP, code, data)
    assert code == 503 and json.loads(data)["type"] == "ServiceUnavailableError"
    assert failure is not None and failure.kind == "retryable" and not failure.connection_level
    assert failure.message == "Exceeds maximum queue size"


# NVIDIA's tensorrt_llm model (and the disaggregated context / generation models copied from it): no text tensors
TRTLLM_INPUTS = [n for n in SIM_INPUTS if n != "text_input"]
TRTLLM_OUTPUTS = [n for n in SIM_OUTPUTS if n != "text_output"]
COMPLETION = " alpha \u00e9 bravo"  # the accented letter is two byte-level tokens: its first decodes to U+FFFD


@pytest.fixture
def model_tokenizer(tmp_path):
    from tokenizer_fixture import write_tokenizer

    from baton import tokens
    from baton.model_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(write_tokenizer(tmp_path / "tokenizer"))
    tokens.set_tokenizer(tokenizer)
    yield tokenizer
    tokens.set_tokenizer(None)


def _one_token_each(ids: list[int], prompt_tokens: int) -> list[dict]:
    """A tensorrt_llm model's streamed responses: one token each, no text."""
    return [{"output_ids": np.array([[[t]]], dtype=np.int32), "sequence_length": np.array([[1]], dtype=np.int32),
             "num_input_tokens": np.array([[prompt_tokens]], dtype=np.int32)} for t in ids]


def test_a_text_prompt_to_a_tensorrt_llm_model_goes_as_the_tokenizers_ids_and_comes_back_as_text(model_tokenizer):
    from triton_harness import parse_sse

    completion = model_tokenizer.tokenizer.encode(COMPLETION, add_special_tokens=False).ids
    prompt_ids = model_tokenizer.encode_text("alpha bravo")
    assert len(completion) > len(COMPLETION.split())  # the accented letter takes more than one token
    body = {"prompt": "alpha bravo", "max_tokens": len(completion)}
    fake = _FakeTriton(responses=_one_token_each(completion, len(prompt_ids)), inputs=TRTLLM_INPUTS,
                       outputs=TRTLLM_OUTPUTS)
    status, data = _post(fake, body)
    answer = json.loads(data)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == COMPLETION and answer["choices"][0]["token_ids"] == completion
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids)
    assert fake.sent[0]["inputs"]["input_ids"].tolist() == [prompt_ids]  # with the tokenizer's BOS
    status, raw = _open(fake, body)
    texts = [e["choices"][0]["text"] for e in parse_sse(raw) if isinstance(e, dict)]
    assert status == 200 and "".join(texts) == COMPLETION
    assert not any("\ufffd" in t for t in texts)  # the accented letter's first byte is held back, not garbled


def test_a_tensorrt_llm_model_without_a_model_tokenizer_is_a_clear_configuration_error():
    from baton.scheduler.replies import SchedulerError

    fake = _FakeTriton(responses=_one_token_each([1], 2), inputs=TRTLLM_INPUTS, outputs=TRTLLM_OUTPUTS)
    for body in ({"prompt": "alpha bravo"}, {"prompt": [1, 2]}):  # no text_input; no text_output
        with pytest.raises(SchedulerError) as info:
            _post(fake, body)
        assert info.value.status == 500 and info.value.code == "tokenizer_required"
        assert "configure the scheduler's model tokenizer" in info.value.message
    assert fake.sent == []  # nothing was sent that the model would refuse


def test_a_models_tensors_are_read_once_per_channel():
    fake = _FakeTriton(responses=_one_token_each([7], 2))
    client = TritonClient(read_timeout=5)
    for _ in range(2):
        status, data = _post(fake, {"prompt": [1, 2], "max_tokens": 1}, client)
        assert status == 200 and json.loads(data)["choices"][0]["text"] == ""  # text_output empty in responses
    assert fake.metadata_reads == 1
    rebuilt = _FakeTriton(responses=_one_token_each([7], 2), inputs=TRTLLM_INPUTS, outputs=TRTLLM_OUTPUTS)
    with pytest.raises(Exception, match="tokenizer"):  # the new channel's model is read, and has no text tensors
        _post(rebuilt, {"prompt": [1, 2], "max_tokens": 1}, client)
    assert rebuilt.metadata_reads == 1



def test_a_failed_model_read_nobody_waited_for_is_read_again():
    """The client that asked for a replica's model left before the read failed: the failure is not kept for
    the next request, which reads the model again (the replica may well be back)."""
    from tritonclient.utils import InferenceServerException

    fake = _FakeTriton(responses=_one_token_each([7], 2))
    read = fake.get_model_metadata
    gate: list[asyncio.Event] = []  # made in the test's event loop

    async def first_read_fails(model_name: str, **kwargs: object) -> dict:
        if fake.metadata_reads == 0:
            fake.metadata_reads += 1
            await gate[0].wait()
            raise InferenceServerException("failed to connect to all addresses", "StatusCode.UNAVAILABLE")
        return await read(model_name, **kwargs)

    fake.get_model_metadata = first_read_fails
    body = json.dumps({"prompt": [1, 2], "max_tokens": 1}).encode()

    async def run() -> tuple[int, bytes, object]:
        gate.append(asyncio.Event())
        client = _with(fake)
        left = asyncio.ensure_future(client.post(EP, "/v1/completions", body, "r1"))
        await asyncio.sleep(0.05)
        left.cancel()  # the client went away while the read was under way
        gate[0].set()
        await asyncio.sleep(0.05)  # the read fails, with nobody waiting for it
        return await client.post(EP, "/v1/completions", body, "r2")

    status, _, _ = asyncio.run(run())
    assert status == 200 and fake.metadata_reads == 2


def test_a_decoupled_context_model_is_served_over_a_stream():
    """NVIDIA's streaming layout makes `context` decoupled too, and Triton refuses unary infer on it: the context
    step then reads the model's answer from a stream."""
    raw = _handle_bytes(42)
    fake = _FakeTriton(decoupled=("context", "generation"), responses=[{
        "output_ids": np.array([[[7]]], dtype=np.int32), "sequence_length": np.array([[1]], dtype=np.int32),
        "context_phase_params": np.frombuffer(raw, dtype=np.uint8).reshape(1, -1)}])
    status, data = _post(fake, {"prompt": [1, 2], "max_tokens": 3,
                                "disaggregated_params": {"request_type": "context_only"}})
    answer = json.loads(data)
    assert status == 200, answer
    handle = answer["choices"][0]["disaggregated_params"]
    assert handle["ctx_request_id"] == 42 and base64.b64decode(handle["context_phase_params"]) == raw
    assert answer["choices"][0]["token_ids"] == [7] and [s["model"] for s in fake.sent] == ["context"]


def test_an_unreachable_replica_stays_a_connection_failure():
    from tritonclient.utils import InferenceServerException

    fake = _FakeTriton(InferenceServerException("failed to connect to all addresses", "StatusCode.UNAVAILABLE"))
    with pytest.raises(EngineFailure) as info:
        _post(fake, {"prompt": [1, 2], "disaggregated_params": {"request_type": "context_only"}})
    assert info.value.connection_level


def test_usage_counts_the_prompt_the_backend_reports_when_asked():
    """The backend fills num_input_tokens only for a request carrying return_num_input_tokens: the scheduler asks,
    and the prompt tokens of the answer are the engine's count."""
    usage = _answer({"prompt": [5, 6, 7], "max_tokens": 2})["usage"]
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = _answer({"prompt": "hello world", "max_tokens": 2})["usage"]  # tokenized by the engine: only it knows
    assert text["prompt_tokens"] == 3 and text["total_tokens"] == 5


@pytest.mark.parametrize("model_excludes_input", [True, False])
def test_the_completion_never_carries_the_prompt_whatever_the_models_parameter(model_excludes_input):
    answer = _answer({"prompt": [5, 6, 7], "max_tokens": 2}, model_excludes_input=model_excludes_input)
    assert answer["choices"][0]["token_ids"] == [11, 12] and answer["usage"]["completion_tokens"] == 2


def test_front_end_puts_the_prompt_before_the_first_tokens_when_input_is_not_excluded():
    parsed = parse_request(_request(input_ids=np.array([[5, 6]], dtype=np.int32),
                                    exclude_input_in_output=np.array([[False]])), VOCAB)
    assert response_tensors(parsed, 2, 1, [9])["output_ids"].tolist() == [[[5, 6, 9]]]
    assert response_tensors(parsed, 2, 2, [10])["output_ids"].tolist() == [[[10]]]  # later responses: new ones
    assert response_tensors(parse_request(_request(input_ids=np.array([[5, 6]], dtype=np.int32)), VOCAB),
                            2, 1, [9])["output_ids"].tolist() == [[[9]]]  # not set: the model parameter (true)


def test_usage_without_the_engines_count_is_the_length_of_the_ids_sent():
    call = _TritonCall(b'{"prompt": [5, 6, 7, 8], "max_tokens": 2}', "/v1/completions", "r")
    answer = json.loads(call.full(*call.tokens_of(_Result({"output_ids": np.array([[[11, 12]]], dtype=np.int32)}))))
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_engine_errors_keep_status_type_and_message_out_of_the_traceback():
    text = ("Failed to process the request(s) for model 'generation_0_0', message: Traceback (most recent call "
            "last):\n  File \"x.py\", line 1\nbaton.engine_sim.triton_frontend.EngineRequestError: 500 "
            f"InternalServerError: {MISMATCH}\n\n\n\nAt:\n  model.py(501): execute\n")
    status, body = triton_error(text)
    assert status == 500
    assert json.loads(body) == {"object": "error", "message": MISMATCH, "type": "InternalServerError",
                                "param": None, "code": 500}
    failure = classify_failure(Endpoint("127.0.0.1:1", "decode"), status, body)
    assert failure is not None and failure.kind == "kv_mismatch" and failure.message == MISMATCH


def test_other_triton_errors_map_by_grpc_status():
    status, body = triton_error("unexpected shape for input 'input_ids'", "StatusCode.INVALID_ARGUMENT")
    assert status == 400 and json.loads(body)["message"].startswith("unexpected shape")
    assert triton_error("boom", "StatusCode.INTERNAL")[0] == 500
    assert classify_failure(Endpoint("a:1", "decode"), *triton_error("boom", "StatusCode.INTERNAL")).kind == "retryable"


def test_grpc_address_is_the_next_port():
    assert grpc_address(Endpoint("127.0.0.1:8000", "decode")) == "127.0.0.1:8001"
    assert grpc_address(Endpoint("[::1]:8000", "decode")) == "[::1]:8001"


def test_openai_bodies_become_triton_inputs():
    call = _TritonCall(json.dumps({"model": "m", "prompt": [[1, 2, 3]][0], "max_tokens": 5}).encode(),
                       "/v1/completions", "r1")
    assert (call.ids, call.text, call.max_tokens, call.kind, call.stream) == ([1, 2, 3], None, 5, "context_and_generation", False)
    chat = _TritonCall(json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
                                   "stream": True}).encode(), "/v1/chat/completions", "r2")
    assert chat.text == "<|user|>hi" and chat.max_tokens == 3 and chat.stream and chat.chat
    default = _TritonCall(b'{"prompt": "x"}', "/v1/completions", "r3")
    assert default.max_tokens == 16
    ctx = _TritonCall(json.dumps({"prompt": "x", "stream": True,
                                  "disaggregated_params": {"request_type": "context_only"}}).encode(),
                      "/v1/completions", "r4")
    assert ctx.kind == "context_only" and not ctx.stream  # context-only is never streamed
    with pytest.raises(_BadRequest, match="only n=1"):
        _TritonCall(b'{"prompt": "x", "n": 2}', "/v1/completions", "r5")
    with pytest.raises(_BadRequest, match="max_tokens must be an integer"):
        _TritonCall(b'{"prompt": "x", "max_tokens": "9"}', "/v1/completions", "r6")


def test_a_prompts_token_ids_are_looked_at_once(monkeypatch):
    """Checking that a prompt is token ids is a pass in Python (tens of milliseconds on the event loop for a
    128K-token prompt): each request's ids are checked once."""
    from baton.scheduler import engines

    checked = []
    monkeypatch.setattr(engines, "is_token_ids", lambda ids: checked.append(len(ids)) or is_token_ids(ids))
    _TritonCall(json.dumps({"prompt": list(range(1000))}).encode(), "/v1/completions", "r1")
    _TritonCall(json.dumps({"messages": [], "prompt_token_ids": list(range(1000))}).encode(), "/v1/chat/completions",
                "r2")
    assert checked == [1000, 1000]
    with pytest.raises(_BadRequest, match="prompt_token_ids must be a list of integer token ids"):
        _TritonCall(b'{"prompt_token_ids": [1, "2"]}', "/v1/chat/completions", "r3")


def test_context_handle_round_trips_through_the_scheduler():
    """The context answer's disaggregated_params carries the raw bytes (base64) and the decoded fields; the
    generation request sends the same bytes back; a trtllm-serve style handle is re-encoded."""
    raw = _handle_bytes(42)
    call = _TritonCall(b'{"prompt": [1, 2], "disaggregated_params": {"request_type": "context_only"}}',
                       "/v1/completions", "r1")
    handle = call.context_handle([7], raw)
    assert handle["ctx_request_id"] == 42 and handle["first_gen_tokens"] == [7]
    assert base64.b64decode(handle["context_phase_params"]) == raw
    gen_body = {"prompt": [1, 2], "disaggregated_params": {**handle, "request_type": "generation_only"}}
    gen = _TritonCall(json.dumps(gen_body).encode(), "/v1/completions", "r1")
    assert gen.kind == "generation_only" and gen.context_phase_params == raw
    fields = {k: v for k, v in handle.items() if k != "context_phase_params"}
    rebuilt = _TritonCall(json.dumps({"prompt": [1, 2], "disaggregated_params": {
        **fields, "request_type": "generation_only"}}).encode(), "/v1/completions", "r1")
    assert decode_context_phase_params(rebuilt.context_phase_params)[1] == 42
    opaque = call.context_handle([9], b"\x00\x01binary")  # a real executor's bytes: opaque, id from the request
    assert opaque["ctx_request_id"] == "r1" and opaque["first_gen_tokens"] == [9]


def test_finish_reasons_follow_the_http_front_end():
    call = _TritonCall(b'{"prompt": "x", "max_tokens": 1, "disaggregated_params": {"request_type": "context_only"}}',
                       "/v1/completions", "r")
    # "length", as trtllm-serve and the HTTP front end say: the router goes on to generation (a "stop" would make
    # it answer from the prefill, unlike the same request served locally)
    assert call.finish_reason(1) == "length"
    call = _TritonCall(b'{"prompt": "x", "max_tokens": 4, "disaggregated_params": {"request_type": "context_only"}}',
                       "/v1/completions", "r")
    assert call.finish_reason(1) == "length"
    local = _TritonCall(b'{"prompt": "x", "max_tokens": 4}', "/v1/completions", "r")
    assert local.finish_reason(4) == "length" and local.finish_reason(2) == "stop"


# ------------------------------------------------------------------------------ front-end side
def test_parse_request_reads_tensorrt_llm_style_inputs():
    req = _request({"request_type": "context_only", "x-request-id": "abc"},
                   input_ids=np.array([[5, 6, 7, 0]], dtype=np.int32), input_lengths=np.array([[3]], dtype=np.int32))
    parsed = parse_request(req, VOCAB)
    assert (parsed.kind, parsed.prompt, parsed.max_tokens, parsed.x_request_id) == ("context_only", [5, 6, 7], 4, "abc")
    text = parse_request(_request(text_input=np.array([[b"hello world"]], dtype=np.object_),
                                  streaming=np.array([[True]])), VOCAB)
    assert text.kind == "context_and_generation" and len(text.prompt) == 3 and text.streaming
    gen = parse_request(_request({"request_type": "generation_only"}, input_ids=np.array([[1, 2]], dtype=np.int32),
                                 context_phase_params=np.frombuffer(_handle_bytes(5), dtype=np.uint8).reshape(1, -1)),
                        VOCAB)
    assert gen.handle is not None and gen.handle.ctx_request_id == 5 and gen.first_tokens == [7]


@pytest.mark.parametrize(("params", "data", "message"), [
    ({"request_type": "both"}, {"input_ids": np.array([[1]], dtype=np.int32)}, "request_type must be one of"),
    ({}, {}, "input_ids or text_input is required"),
    ({}, {"input_ids": np.array([[1, VOCAB]], dtype=np.int32)}, "outside the vocabulary"),
    ({}, {"input_ids": np.array([[1]], dtype=np.int32), "beam_width": np.array([[2]], dtype=np.int32)}, BEAM_MESSAGE),
    ({"request_type": "generation_only"}, {"input_ids": np.array([[1]], dtype=np.int32)}, "need the context_phase_params"),
    ({"request_type": "generation_only"}, {"input_ids": np.array([[1]], dtype=np.int32),
                                           "context_phase_params": np.frombuffer(b"junk", dtype=np.uint8).reshape(1, -1)},
     "not the simulator's ContextPhaseParams"),
    ({}, {"input_ids": np.array([[1]], dtype=np.int32),
          "context_phase_params": np.frombuffer(b"{}", dtype=np.uint8).reshape(1, -1)}, "only accepted with request_type"),
])
def test_parse_request_refusals_are_400s(params, data, message):
    with pytest.raises(EngineRequestError) as info:
        parse_request(_request(params, **data), VOCAB)
    assert message in info.value.message and info.value.status == 400
    assert str(info.value).startswith("400 BadRequestError: ")


# ------------------------------------------------------------------------------ sampling parameters
def _tensors(body: dict, path: str = "/v1/completions") -> dict[str, tuple[str, list[int], object]]:
    """name -> (datatype, shape, value) of the Triton inputs built for an OpenAI body."""
    from tritonclient.utils import deserialize_bytes_tensor

    call = _TritonCall(json.dumps({"model": "m", "prompt": "hi", **body}).encode(), path, "r")
    out = {}
    for t in call.inputs(False):
        raw = t._get_content()  # noqa: SLF001 - the serialized tensor, as sent on the wire
        if t.datatype() == "BYTES":
            value = [v.decode() for v in deserialize_bytes_tensor(raw)]
        else:
            dtype = {"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64, "BOOL": np.bool_}[t.datatype()]
            value = np.frombuffer(raw, dtype=dtype).reshape(t.shape()).tolist()
        out[t.name()] = (t.datatype(), t.shape(), value)
    return out


def test_sampling_parameters_become_the_backends_input_tensors():
    got = _tensors({"temperature": 0.5, "top_p": 0.25, "top_k": 7, "seed": 2**63 + 5, "presence_penalty": 1.5,
                    "frequency_penalty": -0.5, "repetition_penalty": 1.25, "length_penalty": 0.75, "min_tokens": 3,
                    "stop": ["\n", "END"], "stop_token_ids": [13, 2], "ignore_eos": True})
    assert got["temperature"] == ("FP32", [1, 1], [[0.5]])
    assert got["runtime_top_p"] == ("FP32", [1, 1], [[0.25]])
    assert got["runtime_top_k"] == ("INT32", [1, 1], [[7]])
    assert got["seed"] == ("UINT64", [1, 1], [[2**63 + 5]])
    assert got["presence_penalty"] == ("FP32", [1, 1], [[1.5]])
    assert got["frequency_penalty"] == ("FP32", [1, 1], [[-0.5]])
    assert got["repetition_penalty"] == ("FP32", [1, 1], [[1.25]])
    assert got["len_penalty"] == ("FP32", [1, 1], [[0.75]])
    assert got["min_tokens"] == ("INT32", [1, 1], [[3]])
    assert got["stop_words"] == ("BYTES", [1, 2], ["\n", "END"])
    assert got["stop_words_list"] == ("INT32", [1, 2, 2], [[[13, 2], [1, 2]]])  # one-token words
    assert got["end_id"] == ("INT32", [1, 1], [[-1]])  # ignore_eos, as TensorRT-LLM's LLM API does it
    assert _tensors({"stop": "x"})["stop_words"] == ("BYTES", [1, 1], ["x"])
    # unset (or neutral) parameters send nothing: the model's defaults apply
    plain = _tensors({"stop": [], "stop_token_ids": [], "ignore_eos": False, "user": "u", "logprobs": 0,
                      "echo": False, "n": 1, "response_format": {"type": "text"}, "temperature": None})
    assert set(plain) == {"text_input", "request_output_len", "streaming", "return_num_input_tokens",
                          "return_num_output_tokens", "exclude_input_in_output"}
    chat = _tensors({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "logprobs": False,
                     "top_logprobs": 0, "seed": 1}, "/v1/chat/completions")
    assert chat["temperature"][2] == [[0.0]] and chat["seed"][2] == [[1]]


@pytest.mark.parametrize(("extra", "param"), [
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"echo": True}, "echo"),
    ({"n": 2}, "n"),
    ({"top_p_min": 0.1}, "top_p_min"),
    ({"min_p": 0.05}, "min_p"),
    ({"early_stopping": True}, "early_stopping"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"suffix": "tail"}, "suffix"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_parameters_the_runtime_cannot_carry_are_a_400_naming_them(extra, param):
    from baton.scheduler.engines import TritonClient

    body = json.dumps({"model": "m", "prompt": "hi", "temperature": 0.5, **extra}).encode()
    status, answer, ctype = asyncio.run(TritonClient().post(Endpoint("127.0.0.1:1", "decode"), "/v1/completions",
                                                            body, "r"))
    error = json.loads(answer)["error"]
    assert status == 400 and ctype == "application/json"
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_parameter"
    assert error["param"] == param
    assert error["message"].startswith(param) and "runtime: triton" in error["message"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": True}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"min_tokens": "3"}, "min_tokens"),
    ({"stop": [1]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_values_a_tensor_cannot_hold_are_a_400(extra, param):
    with pytest.raises(_BadRequest) as info:
        _TritonCall(json.dumps({"prompt": "x", **extra}).encode(), "/v1/completions", "r")
    body = json.loads(info.value.body())
    assert body["param"] == param and body["code"] == 400 and body["message"].startswith(param)


def test_front_end_reads_and_checks_the_sampling_inputs():
    f32, i32 = np.float32, np.int32
    req = _request(input_ids=np.array([[1, 2]], dtype=i32), temperature=np.array([[0.5]], dtype=f32),
                   runtime_top_k=np.array([[4]], dtype=i32), runtime_top_p=np.array([[0.0]], dtype=f32),
                   seed=np.array([[2**64 - 1]], dtype=np.uint64), min_tokens=np.array([[2]], dtype=i32),
                   end_id=np.array([[-1]], dtype=i32), return_log_probs=np.array([[True]]),
                   stop_words=np.array([[b"\n", b"END"]], dtype=np.object_),
                   stop_words_list=np.array([[[5, 6, 7, 0], [2, 3, -1, -1]]], dtype=i32))
    parsed = parse_request(req, VOCAB)
    assert parsed.sampling == {"temperature": 0.5, "runtime_top_k": 4, "runtime_top_p": 0.0, "seed": 2**64 - 1,
                               "min_tokens": 2, "end_id": -1, "return_log_probs": True,
                               "stop_words": ["\n", "END"], "stop_words_list": [[5, 6], [7]]}
    assert parsed.max_tokens == 4 and parsed.prompt == [1, 2]  # generation itself is unchanged
    assert parse_request(_request(input_ids=np.array([[1]], dtype=i32)), VOCAB).sampling == {}


def test_the_schedulers_tensors_pass_the_front_ends_checks():
    call = _TritonCall(json.dumps({"prompt": [1, 2], "temperature": 0.5, "top_p": 0.5, "seed": 9, "stop": ["a"],
                                   "stop_token_ids": [3, 4], "ignore_eos": True}).encode(), "/v1/completions", "r")
    data = {}
    for name, dtype, value in call.sampling:
        if dtype == "BYTES":
            data[name] = np.array([[v.encode() for v in value]], dtype=np.object_)
        elif name == "stop_words_list":
            data[name] = np.array([[value, list(range(1, len(value) + 1))]], dtype=np.int32)
        else:
            data[name] = np.array([[value]], dtype={"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64}[dtype])
    parsed = parse_request(_request(input_ids=np.array([[1, 2]], dtype=np.int32), **data), VOCAB)
    assert parsed.sampling == {"temperature": 0.5, "runtime_top_p": 0.5, "seed": 9, "stop_words": ["a"],
                               "stop_words_list": [[3], [4]], "end_id": -1}


@pytest.mark.parametrize(("data", "message"), [
    ({"temperature": np.array([[0.5]], dtype=np.float64)}, "unexpected datatype FP64 for input temperature"),
    ({"seed": np.array([[1]], dtype=np.int64)}, "unexpected datatype INT64 for input seed, expecting UINT64"),
    ({"stop_words": np.array([[1]], dtype=np.int32)}, "unexpected datatype INT32 for input stop_words"),
    ({"temperature": np.array([[0.5, 0.5]], dtype=np.float32)}, "unexpected shape for input temperature"),
    ({"stop_words_list": np.array([[1, 2]], dtype=np.int32)}, "unexpected shape for input stop_words_list"),
    ({"temperature": np.array([[-0.1]], dtype=np.float32)}, "temperature must be >= 0"),
    ({"runtime_top_p": np.array([[1.5]], dtype=np.float32)}, "runtime_top_p must be <= 1"),
    ({"runtime_top_k": np.array([[-1]], dtype=np.int32)}, "runtime_top_k must be >= 0"),
    ({"repetition_penalty": np.array([[0.0]], dtype=np.float32)}, "repetition_penalty must be > 0"),
    ({"min_tokens": np.array([[-2]], dtype=np.int32)}, "min_tokens must be >= 0"),
    ({"stop_words_list": np.array([[[1, 2], [2, 1]]], dtype=np.int32)}, "non-increasing offsets"),
    ({"stop_words_list": np.array([[[1, 2], [3, -1]]], dtype=np.int32)}, "out-of-bound offsets"),
    ({"bad_words_list": np.array([[[1, 2], [-1, 2]]], dtype=np.int32)}, "additional -1s"),
])
def test_front_end_refuses_sampling_inputs_as_the_backend_would(data, message):
    with pytest.raises(EngineRequestError) as info:
        parse_request(_request(input_ids=np.array([[1]], dtype=np.int32), **data), VOCAB)
    assert message in info.value.message and info.value.status == 400
