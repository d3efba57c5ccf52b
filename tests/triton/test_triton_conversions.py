"""The pure parts of the Triton runtime, without processes: the scheduler's OpenAI <-> KServe v2 translation
(`baton.scheduler.engines`) and the front end's request parsing (`baton.engine_sim.triton_frontend`, whose
PyTriton import is deferred, so it loads in the project's own venv)."""

from __future__ import annotations

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
    assert call.finish_reason(1) == "stop"  # complete after the prefill: the router answers from it
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
