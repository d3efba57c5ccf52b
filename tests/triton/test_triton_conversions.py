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
)
from baton.scheduler.endpoints import Endpoint
from baton.scheduler.engines import _BadRequest, _TritonCall, classify_failure, grpc_address, triton_error

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


# ------------------------------------------------------------------------------ scheduler side
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
    assert set(plain) == {"text_input", "request_output_len", "streaming"}
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
