"""Engine clients: how the scheduler talks to one engine replica.

`EngineClient` is the interface the request flow uses; `TrtllmServeClient` implements it for
trtllm-serve workers (and Baton's engine simulator) over HTTP with `baton.http1`'s keep-alive pools.
Requests are sent as ready-made JSON bytes (the service serializes each body once), and responses are
either read whole (`post`) or streamed (`open`). `classify_failure` decides what a failed call means:
a KV-format mismatch (never retried onto the same pair, whatever its status), lost KV (prefilled again), a
retryable replica failure (connection error, timeout, 5xx, another failed KV transfer), or an engine answer to
pass through (other 4xx).

`TritonClient` implements the same interface for `runtime: triton` with `tritonclient.grpc.aio`: it turns
each OpenAI body into KServe v2 requests on the `tensorrt_llm`-style models (`context`, unary `infer`, or a
stream when it is decoupled, for `context_only`; `generation`, decoupled, gRPC `stream_infer`, for the rest)
and their answers back into the OpenAI JSON / SSE bytes the request flow expects, so everything above this
module is runtime-agnostic. Each replica's models are described once per channel (`ModelLayout`: metadata and
config): only the outputs a model declares are requested, and a model without `text_input` / `text_output`
(NVIDIA's `tensorrt_llm` model) gets token ids encoded, and gives token ids decoded, with the scheduler's model
tokenizer (`detokenize`).
Sampling parameters become the backend's optional input tensors (`_sampling_inputs`); a parameter no tensor
carries is refused with a 400 `invalid_request_error` naming it, never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from baton.http1.client import ClosedBeforeAnswer, HttpClient
from baton.openai_stream import wants_usage
from baton.scheduler.detokenize import Detokenizer, model_tokenizer
from baton.scheduler.endpoints import PREFILL, Endpoint
from baton.scheduler.replies import SchedulerError, error_body
from baton.tokens import chat_text, is_token_ids, tokenize_async

# Fragments of TensorRT-LLM's cache-transceiver errors for incompatible KV layouts (cacheFormatter.cpp,
# cacheTransferLayer.cpp). A generation-only request failing with one of these will fail the same way on
# the same prefill/decode pair every time.
KV_MISMATCH_MARKERS = (
    "does not currently support these cacheState",
    "cache-transfer protocol mismatch",
    "only support same",
    "only support equal number of heads",
    # the engine simulator's refusal of a hand-off between separately started workers on backend MPI: a pair
    # that can never hand off, like a KV-format mismatch (not a replica fault to retry or count)
    "needs the context and generation executors in one MPI world",
)


def is_kv_mismatch(text: str, sent: str = "") -> bool:
    return _says(text, KV_MISMATCH_MARKERS, sent)


def _says(text: str, markers: tuple[str, ...], sent: str) -> bool:
    """Whether an engine's error `text` carries one of `markers` that is not in `sent` (`_sent_text`, what it
    was sent): engines quote a request's own values back in their refusals of it (trtllm-serve's validation
    errors, the simulator's "got ..."), so a marker a client put in a field would otherwise make its own 400
    look like a KV-format mismatch (its pair kept out for minutes) or a failed transfer (the replica counted
    as failing)."""
    return any(marker in text and marker not in sent for marker in markers)


def _sent_text(sent: bytes) -> str:
    """The body an engine was sent as the text it could quote back: JSON escapes undone (a client's \\u0073
    is an s once the engine has parsed it)."""
    if not sent:
        return ""
    try:
        return json.dumps(json.loads(sent), ensure_ascii=False)
    except (ValueError, RecursionError):
        return sent.decode("utf-8", "replace")


class EngineFailure(Exception):
    """A call to an engine replica failed in a way the scheduler must handle."""

    def __init__(
        self, endpoint: Endpoint, message: str, status: int | None = None, body: bytes = b"", kind: str = "retryable"
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.message = message
        self.status = status
        self.body = body
        # "retryable" | "kv_mismatch" | "kv_lost" | "connection" | "stream_cut" (a streamed answer the engine
        # ended, in order, before its first event: trtllm-serve's stream generator raised after the 200) |
        # "closed_before_answer" (a reused connection closed before any answer: counted as a 5xx is, not
        # taken as the replica being down, which a fresh connection for the retry shows if it is) |
        # "engine_gone" (its executor has shut down: it answers every request "LLM is shutting down")
        self.kind = kind

    @property
    def connection_level(self) -> bool:
        """The replica itself failed (unreachable, or its executor gone), not one request on it: it leaves
        rotation at once and the retry avoids it, not only the pair."""
        return self.kind in ("connection", "engine_gone")


def classify_failure(endpoint: Endpoint, status: int, body: bytes, sent: bytes = b"") -> EngineFailure | None:
    """None for answers to pass through (2xx, and 4xx about the request); an EngineFailure for 5xx, and for a
    4xx that is a KV-format mismatch, lost KV, another failed KV transfer or an executor that is gone:
    trtllm-serve answers any exception of a generation 400 BadRequestError (`create_error_response(str(e))`),
    a failed handoff included, so the text decides, but not text that `sent`, the request, carries itself
    (`_says`)."""
    if status < 400:
        return None
    text = body.decode("utf-8", "replace")
    message = _error_message(text)
    if message == ENGINE_GONE_MESSAGE:  # the whole message, not text a client's own field could carry
        return EngineFailure(endpoint, message, status, body, "engine_gone")
    # what was sent, read only when the answer names a failure (a 220 KB prompt is not parsed for every 5xx)
    asked = _sent_text(sent) if any(marker in text for marker in _FAILURE_MARKERS) else ""
    kind = "kv_mismatch" if is_kv_mismatch(text, asked) else "kv_lost" if is_kv_lost(text, asked) else "retryable"
    if status < 500 and kind == "retryable" and not is_kv_transfer_failure(text, asked):
        return None
    return EngineFailure(endpoint, message or f"HTTP {status}", status, body, kind)


# A KV transfer that failed otherwise (TensorRT-LLM's "Error in kv cache transfer for generation requests"; the
# engine simulator's failed pull from the context worker, or a transfer buffer too small for NIXL): answered
# 400 by trtllm-serve like any failed generation, but a failure of the handoff, retried as a 5xx is.
_KV_TRANSFER_FAILED_MARKERS = ("Error in kv cache transfer", "KV transfer from context worker",
                               "KV cache transfer failed")


def is_kv_transfer_failure(text: str, sent: str = "") -> bool:
    return _says(text, _KV_TRANSFER_FAILED_MARKERS, sent)


# trtllm-serve whose executor has shut down (a fatal error in a worker, or the server stopping) answers every
# request 400 with LLM.generate_async's "LLM is shutting down" as the whole message: the replica's failure
# (kind "engine_gone": out of rotation, the request retried on another replica and counted against this one,
# the error rate a rollout is judged on included), not the client's mistake passed on. Only the whole message
# counts: a 400 about a client's field quotes the field's value, which could be that text.
ENGINE_GONE_MESSAGE = "LLM is shutting down"


# A generation worker could not get a handle's KV because the context worker no longer has it: freed at its
# kv_transfer_timeout_ms (TensorRT-LLM logs "due to KV cache transfer timeout"; the simulator's KVTransferTimeout
# and NotFoundError answers), or already sent, or the context worker restarted since (the simulator's handle naming
# an earlier instance). The decode replica is fine; the request needs a new prefill.
_KV_LOST_MARKERS = ("KV cache transfer timed out", "due to KV cache transfer timeout", "KVTransferTimeout",
                    "is not available on this context worker", "(it restarted since the prefill)")


def is_kv_lost(text: str, sent: str = "") -> bool:
    return _says(text, _KV_LOST_MARKERS, sent)


_FAILURE_MARKERS = KV_MISMATCH_MARKERS + _KV_TRANSFER_FAILED_MARKERS + _KV_LOST_MARKERS


def _error_message(text: str) -> str:
    """The message inside an OpenAI-style error body, or the text itself."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:2000]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(data.get("detail"), str):
            return data["detail"]
        if isinstance(data.get("message"), str):
            return data["message"]
    return text.strip()[:2000]


class EngineResponse(Protocol):
    """An engine's answer whose status is known and whose body is read whole (`read`), or awaited for its
    first bytes (`first`) and then pushed to callbacks (`relay`); `release` is called once either way."""

    status: int
    content_type: str

    async def read(self) -> bytes: ...

    async def first(self) -> bytes: ...

    def relay(self, on_data: Callable[[bytes], None], on_end: Callable[[], None],
              on_error: Callable[[Exception], None]) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def release(self) -> None: ...


class EngineClient(Protocol):
    async def post(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> tuple[int, bytes, str]:
        """Send a request and read the whole answer: (status, body, content type)."""
        ...

    async def open(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> EngineResponse:
        """Send a request and return the response with its body unread (for streaming)."""
        ...

    async def health(self, endpoint: Endpoint, timeout: float) -> bool: ...

    async def close(self) -> None: ...


class IteratedResponse:
    """An `EngineResponse` over an async iterator of body pieces (Triton's streams, complete answers):
    `relay` pumps the iterator from a task, which ends with `on_end` when the iterator does and with
    `on_error` when it raises, whatever it raises."""

    def __init__(self, status: int, chunks: AsyncIterator[bytes], content_type: str,
                 on_release: Callable[[], None] | None = None) -> None:
        self.status = status
        self.content_type = content_type
        self._chunks = chunks.__aiter__()
        self._on_release = on_release
        self._task: asyncio.Task[None] | None = None
        self._running = asyncio.Event()
        self._running.set()

    async def read(self) -> bytes:
        try:
            return b"".join([chunk async for chunk in self._chunks])
        finally:
            self.release()

    async def first(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""

    def relay(self, on_data: Callable[[bytes], None], on_end: Callable[[], None],
              on_error: Callable[[Exception], None]) -> None:
        async def pump() -> None:
            try:
                async for chunk in self._chunks:
                    on_data(chunk)
                    if not self._running.is_set():
                        await self._running.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a transport error, an answer that cannot be translated, a bug:
                on_error(exc)  # the stream ends with an error either way, never left open with nothing coming
                return
            on_end()

        self._task = asyncio.get_running_loop().create_task(pump())

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def release(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()


def _static(status: int, body: bytes, content_type: str = "application/json") -> IteratedResponse:
    """An answer that is already complete (an error before the first token)."""

    async def once() -> AsyncIterator[bytes]:
        yield body

    return IteratedResponse(status, once(), content_type)


def _call_failure(endpoint: Endpoint, exc: OSError) -> EngineFailure:
    """The EngineFailure of an HTTP call that did not get its answer: a connection failure, but for a reused
    connection closed before any answer (`ClosedBeforeAnswer`), which does not say the replica is down."""
    kind = "closed_before_answer" if isinstance(exc, ClosedBeforeAnswer) else "connection"
    return EngineFailure(endpoint, f"{type(exc).__name__}: {exc}", kind=kind)


class TrtllmServeClient:
    """trtllm-serve's OpenAI HTTP API over `baton.http1`'s keep-alive pools (one client for all replicas)."""

    def __init__(self, read_timeout: float = 600.0, connect_timeout: float = 5.0) -> None:
        self.http = HttpClient(connect_timeout=connect_timeout, read_timeout=read_timeout)

    @staticmethod
    def _headers(request_id: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Request-Id": request_id}

    async def post(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> tuple[int, bytes, str]:
        host, port = endpoint.host_port
        try:
            status, headers, data = await self.http.request("POST", host, port, path, body, self._headers(request_id))
        except OSError as exc:  # ConnectionError, TimeoutError
            raise _call_failure(endpoint, exc) from exc
        return status, data, headers.get("content-type", "application/json")

    async def open(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> EngineResponse:
        host, port = endpoint.host_port
        try:
            return await self.http.open("POST", host, port, path, body, self._headers(request_id))
        except OSError as exc:
            raise _call_failure(endpoint, exc) from exc

    async def health(self, endpoint: Endpoint, timeout: float) -> bool:
        host, port = endpoint.host_port
        try:
            status, _, _ = await self.http.request("GET", host, port, "/health", timeout=timeout)
        except OSError:
            return False
        return status == 200

    async def close(self) -> None:
        await self.http.close()


# ---------------------------------------------------------------------------------------------- Triton
TRITON_CONTEXT_MODEL = "context"
TRITON_GENERATION_MODEL = "generation"
TRITON_GRPC_PORT_OFFSET = 1  # the operator renders Triton pods with --http-port=P --grpc-port=P+1
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default; request_output_len is a required Triton input
_TRITON_OUTPUTS = ("output_ids", "sequence_length", "num_input_tokens", "num_output_tokens", "text_output")
# Optional BOOL inputs of the tensorrt_llm model sent true with every request: without the first two the backend
# leaves num_input_tokens / num_output_tokens out of its answer (model_instance_state.cc); without the third,
# output_ids carry the prompt before the completion when the model's exclude_input_in_output parameter is false.
_TRUE_INPUTS = ("return_num_input_tokens", "return_num_output_tokens", "exclude_input_in_output")
# The engine simulator's errors end with "EngineRequestError: <status> <type>: <message>" inside Triton's
# error text (PyTriton wraps the traceback); other Triton errors are mapped by their gRPC status.
_ENGINE_ERROR_RE = re.compile(r"EngineRequestError: (\d{3}) ([A-Za-z]+): ([^\n]*)")
_CONNECTION_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
# Triton core's refusal of a request its model's queue has no room for (`default_queue_policy { max_queue_size }`):
# gRPC status UNAVAILABLE on unary calls, no status inside a stream. The replica is up but overloaded: answered as
# an HTTP engine's 503 is (retried on another replica, counted as a 5xx), not as a connection failure.
_QUEUE_FULL_MARKER = "Exceeds maximum queue size"
# Triton's own checks of a request against the model configuration (triton-inference-server/core: model.cc,
# infer_request.cc; all INVALID_ARG). An error response inside a gRPC stream carries only its text
# (ModelStreamInferResponse.error_message: tritonclient's aio `stream_infer` raises no status with it), so
# these are recognised by their text there: the client's request is wrong, and every replica will say so.
_VALIDATION_RE = re.compile(
    r"unexpected inference (?:input|output) '"
    r"|unexpected shape for input '"
    r"|unexpected datatype "
    r"|data-type is '[^']*', but model '[^']*' expects"
    r"|expected \d+ inputs but got \d+ inputs"
    r"|expected number of inputs between \d+ and \d+"
    r"|missing required input"
    r"|input byte size mismatch for input '"
    r"|batch size does not match other inputs"
    r"|has no shape but model requires batch dimension"
    r"|inference request batch-size must be <="
    r"|All input dimensions should be specified for input '"
    r"|unexpected number of string elements"
    r"|incomplete string length indicator for inference input '"
    r"|string elements for inference input '"
    # TensorRT-LLM's backend refusing the request it builds from the inputs (model_instance_state.cc: the
    # exception becomes TRITONSERVER_ERROR_INTERNAL, also "Executor failed process requestId N due to ..."):
    # a prompt over the engine's limit (LlmRequest::validate), a sampling value out of range (SamplingConfig)
    r"|Prompt length \(\d+\) exceeds maximum input length"
    r"|Assertion failed: [^\n]*(?:samplingConfig|SamplingConfig)"
    r"|request_output_len is not present"
)


@dataclass(frozen=True)
class ModelLayout:
    """The tensors a replica's Triton model declares (its metadata) and whether it is decoupled (its config):
    read once per model and channel (`TritonClient._layout`). NVIDIA's `tensorrt_llm` model, of which the
    disaggregated `context` / `generation` models are copies, has no `text_input` / `text_output` (the
    ensemble's pre/postprocessing has them); the engine simulator's models have both by default."""

    inputs: frozenset[str]
    outputs: frozenset[str]
    decoupled: bool = False

    @classmethod
    def of(cls, metadata: dict, config: dict) -> ModelLayout:
        """From `get_model_metadata` and `get_model_config` answers (as JSON)."""
        policy = config.get("config", config).get("model_transaction_policy") or {}
        return cls(frozenset(t["name"] for t in metadata.get("inputs", [])),
                   frozenset(t["name"] for t in metadata.get("outputs", [])), bool(policy.get("decoupled")))


def _tokenizer_required(model: str, missing: str) -> SchedulerError:
    """The answer for a model without text tensors when the scheduler has no model tokenizer to stand in."""
    return SchedulerError(
        500, f"the Triton model {model!r} has no {missing} tensor (TensorRT-LLM's tensorrt_llm model has token ids "
        "only), so the scheduler must encode prompts and decode answers itself: configure the scheduler's model "
        "tokenizer (`tokenizer.path` or `tokenizer.huggingFaceId` in its config, or --tokenizer), or serve "
        "models with text_input/text_output", "tokenizer_required", "server_error")


class _BadRequest(Exception):
    """The OpenAI body cannot become a Triton request: answered 400. An invalid value gets the engine's error
    shape (as the HTTP engine would answer); a parameter the `triton` runtime cannot carry (`unsupported`)
    gets an OpenAI `invalid_request_error` naming it, as the scheduler's own 400s do."""

    def __init__(self, message: str, param: str | None = None, unsupported: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.unsupported = unsupported

    def body(self) -> bytes:
        if self.unsupported:
            return error_body(self.message, "invalid_request_error", "unsupported_parameter", self.param)
        return _error_json(self.message, 400, "BadRequestError", self.param)


def _error_json(message: str, status: int, err_type: str, param: str | None = None) -> bytes:
    return json.dumps({"object": "error", "message": message, "type": err_type, "param": param,
                       "code": status}).encode()


# OpenAI / trtllm-serve request fields -> optional inputs of TensorRT-LLM's Triton models (names, datatypes and
# shapes of all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt; `stop_words` is the ensemble's / BLS's
# text form). Every value is a [1, 1] tensor (batch 1) unless noted. Values are checked for the tensor's type
# here, and for the ranges TensorRT-LLM's executor asserts (`_SAMPLING_LOWEST`); the engine's own 400s are
# passed through.
_FP32_MAX = 3.4028234663852886e38
_INT32 = (-(2**31), 2**31 - 1)
_TENSOR_FIELDS: dict[str, tuple[str, str]] = {  # field -> (Triton input, datatype)
    "temperature": ("temperature", "FP32"),
    "top_p": ("runtime_top_p", "FP32"),
    "top_k": ("runtime_top_k", "INT32"),
    "seed": ("seed", "UINT64"),
    "presence_penalty": ("presence_penalty", "FP32"),
    "frequency_penalty": ("frequency_penalty", "FP32"),
    "repetition_penalty": ("repetition_penalty", "FP32"),
    "length_penalty": ("len_penalty", "FP32"),
    "min_tokens": ("min_tokens", "INT32"),
}
# The ranges TensorRT-LLM's executor checks (SamplingConfig: TLLM_CHECK, which the Triton backend reports as an
# INTERNAL error that would read as the replica's failure): field -> (lowest, whether the lowest is allowed),
# and top_p's highest. The client's mistake, answered 400 here as trtllm-serve's validation answers it.
_SAMPLING_LOWEST: dict[str, tuple[float, bool]] = {
    "temperature": (0.0, True), "top_k": (0, True), "repetition_penalty": (0.0, False), "min_tokens": (0, True),
}
_TOP_P_HIGHEST = 1.0
# Fields read elsewhere in `_TritonCall` (prompt, lengths, streaming, beam width, the disaggregated handle).
_HANDLED_FIELDS = frozenset((
    "model", "prompt", "messages", "prompt_token_ids", "max_tokens", "max_completion_tokens", "stream",
    "stream_options", "disaggregated_params", "n", "best_of", "use_beam_search", "stop", "stop_token_ids",
    "ignore_eos",
))
# Fields without effect on the generation: accepted with any value (trtllm-serve does not use them either).
_IGNORED_FIELDS = frozenset(("user", "conversation_params"))
# Fields no Triton input carries (or whose answer the runtime cannot build): refused with 400 unless they hold
# their neutral value (listed; None is always neutral). The reason is added to the message.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (0, False), "top_logprobs": (0,), "echo": (False,), "logit_bias": ({},), "suffix": ("",),
    "min_p": (0,), "top_p_min": (0,), "early_stopping": (), "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "detokenize": (True,),
    "truncate_prompt_tokens": (), "return_context_logits": (False,), "response_format": ({"type": "text"},),
    "lora_request": (), "prompt_ignore_length": (0,), "thinking_token_budget": (), "priority": (),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "parallel_tool_calls": (), "chat_template": (), "chat_template_kwargs": ({},), "documents": ([],),
    "add_generation_prompt": (True,), "continue_final_message": (False,), "add_special_tokens": (),
    "reasoning_effort": (), "mm_processor_kwargs": ({},),
}
_REASONS = {
    "logprobs": "the runtime does not turn output_log_probs into OpenAI logprobs",
    "top_logprobs": "the answer carries no log probabilities",
    "logit_bias": "the tensorrt_llm model's embedding_bias needs the vocabulary size, unknown to the scheduler",
    "top_p_min": "the backend reads runtime_top_k_min, not the declared runtime_top_p_min, so the value would be "
                 "ignored",
    "early_stopping": "the backend reads the BOOL early_stopping input as INT32",
    "response_format": "guided decoding inputs are not sent by the scheduler",
}


def triton_error(text: str, grpc_status: str | None = None) -> tuple[int, bytes]:
    """(HTTP-like status, OpenAI error body) for a Triton error text, so `classify_failure` applies unchanged."""
    matches = _ENGINE_ERROR_RE.findall(text or "")
    if matches:
        status, err_type, message = matches[-1]
        return int(status), _error_json(message.strip(), int(status), err_type)
    code = (grpc_status or "").rsplit(".", 1)[-1]
    if _QUEUE_FULL_MARKER in (text or ""):
        code = "UNAVAILABLE"  # an overloaded replica's 503, with or without its status (inside a stream)
    elif code in ("", "INTERNAL", "UNKNOWN") and is_request_validation_error(text or ""):
        # Triton's own refusal, reported inside a stream without its status, or TensorRT-LLM's backend refusing
        # the request it builds (as INTERNAL): the client's request, which every replica refuses alike
        code = "INVALID_ARGUMENT"
    status = 400 if code in ("INVALID_ARGUMENT", "NOT_FOUND") else 503 if code == "UNAVAILABLE" else 500
    err_type = {400: "BadRequestError", 503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return status, _error_json((text or f"Triton error {code}").strip()[:2000], status, err_type)


def is_transport_failure(message: str, grpc_status: str | None) -> bool:
    """Whether a failed unary call says the replica cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED), rather
    than answering with an error: the engine's own errors and Triton's queue-full refusal are answers."""
    return ((grpc_status or "").rsplit(".", 1)[-1] in _CONNECTION_CODES and _QUEUE_FULL_MARKER not in message
            and not _ENGINE_ERROR_RE.search(message))


def is_request_validation_error(text: str) -> bool:
    """Triton's refusal of the request's inputs (a 400), not a KV-format mismatch (which stays one)."""
    return _VALIDATION_RE.search(text) is not None and not is_kv_mismatch(text)


def grpc_address(endpoint: Endpoint) -> str:
    """Triton's gRPC address for an endpoint discovered by its HTTP port."""
    host, _, port = endpoint.address.rpartition(":")
    return f"{host}:{int(port) + TRITON_GRPC_PORT_OFFSET}"


_NP_DTYPES = {"FP32": "float32", "INT32": "int32", "UINT64": "uint64", "BOOL": "bool"}


def _unsupported(key: str, value: Any) -> _BadRequest:
    reason = _REASONS.get(key)
    known = key in _NEUTRAL
    what = f"{key}={json.dumps(value)[:80]}" if known else key
    return _BadRequest(
        f"{what} is not supported with runtime: triton ("
        + (reason or ("no input of TensorRT-LLM's Triton models carries it" if known else "unknown parameter"))
        + "); remove it, or use runtime: trtllm-serve", key, unsupported=True)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_FP32_MAX <= value <= _FP32_MAX:
        raise _BadRequest(f"{key} must be a finite number, got {value!r}", key)
    return float(value)


def _integer(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"{key} must be an integer, got {value!r}", key)
    if not lo <= value <= hi:
        raise _BadRequest(f"{key} must be in [{lo}, {hi}], got {value}", key)
    return value


def _sampling_inputs(data: dict) -> list[tuple[str, str, Any]]:
    """(Triton input, datatype, value) for every sampling field the request sets; _BadRequest (400) for a value
    the input cannot hold and for a field the `triton` runtime cannot carry. One pass over the body's keys."""
    out: list[tuple[str, str, Any]] = []
    for key, value in data.items():
        if value is None or key in _HANDLED_FIELDS or key in _IGNORED_FIELDS:
            continue
        spec = _TENSOR_FIELDS.get(key)
        if spec is not None:
            name, dtype = spec
            if dtype == "FP32":
                number: float = _number(key, value)
                if key == "top_p" and number <= 0:
                    raise _BadRequest(
                        f"top_p={json.dumps(value)} is not supported with runtime: triton (TensorRT-LLM's Triton "
                        "backend treats runtime_top_p <= 0 as unset, so the value would be dropped); for greedy "
                        "decoding send top_k: 1, or use runtime: trtllm-serve", key, unsupported=True)
                if key == "top_p" and number > _TOP_P_HIGHEST:
                    raise _BadRequest(f"top_p must be at most {_TOP_P_HIGHEST:g}, got {json.dumps(value)}", key)
            elif dtype == "UINT64":
                number = _integer(key, value, 0, 2**64 - 1)
            else:
                number = _integer(key, value, *_INT32)
            lowest = _SAMPLING_LOWEST.get(key)
            if lowest is not None and (number < lowest[0] or (number == lowest[0] and not lowest[1])):
                raise _BadRequest(f"{key} must be {'at least' if lowest[1] else 'above'} {lowest[0]:g}, got "
                                  f"{json.dumps(value)}", key)
            out.append((name, dtype, number))
            continue
        neutral = _NEUTRAL.get(key)
        if neutral is None or value not in neutral:
            raise _unsupported(key, value)
    stop = data.get("stop")
    if stop is not None:
        words = [stop] if isinstance(stop, str) else stop
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise _BadRequest(f"stop must be a string or a list of strings, got {stop!r}", "stop")
        words = [w for w in words if w]
        if words:
            out.append(("stop_words", "BYTES", words))
    ids = data.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(not isinstance(t, bool) and isinstance(t, int) and 0 <= t < 2**31
                                                for t in ids):
            raise _BadRequest(f"stop_token_ids must be a list of token ids, got {ids!r}", "stop_token_ids")
        if ids:
            out.append(("stop_words_list", "INT32", ids))
    ignore_eos = data.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _BadRequest(f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos")
    if ignore_eos:
        out.append(("end_id", "INT32", -1))  # as TensorRT-LLM's LLM API does for ignore_eos
    return out


class _TritonCall:
    """One OpenAI request as Triton inputs, and the OpenAI shapes of its answer."""

    def __init__(self, body: bytes, path: str, request_id: str) -> None:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise _BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _BadRequest("request body must be a JSON object")
        self.chat = path.endswith("/chat/completions")
        self.request_id = request_id
        self.model = data.get("model")
        self.created = int(time.time())
        dp = data.get("disaggregated_params") or {}
        if not isinstance(dp, dict):
            raise _BadRequest("disaggregated_params must be an object")
        self.kind = dp.get("request_type") or "context_and_generation"
        self.ids: list[int] | None = None
        self.text: str | None = None
        # chat messages still to be tokenized (`tokenize`): when the scheduler has the model's tokenizer
        self.messages: list[dict] | None = None
        self.template_request: dict | None = None
        ids_field = "prompt"
        if self.chat:
            if data.get("prompt_token_ids") is not None:
                self.ids, ids_field = data["prompt_token_ids"], "prompt_token_ids"
                if not is_token_ids(self.ids):
                    raise _BadRequest(f"{ids_field} must be a list of integer token ids", ids_field)
            else:
                messages = data.get("messages")
                if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                    raise _BadRequest("messages must be a non-empty list of message objects")
                if model_tokenizer() is not None:
                    # the model's chat template and tokenizer, as trtllm-serve encodes a chat (the template's
                    # BOS only): sent as input_ids, since the preprocessing would add a second BOS to text_input
                    self.messages = messages
                    self.template_request = data  # its template fields, as routing counted the chat with them
                else:
                    try:
                        self.text = chat_text(messages)  # flattened: the preprocessing adds the special tokens
                    except ValueError as exc:
                        raise _BadRequest(str(exc)) from None
            tokens_field = "max_completion_tokens"
            max_tokens = data.get(tokens_field)
            if max_tokens is None:
                tokens_field = "max_tokens"
                max_tokens = data.get(tokens_field)
        else:
            prompt = data.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                self.text = prompt
            elif is_token_ids(prompt):
                self.ids = prompt
            else:
                raise _BadRequest("prompt must be a string or a list of token ids (one prompt per request)")
            if data.get("max_completion_tokens") is not None:  # trtllm-serve's CompletionRequest refuses it too
                raise _BadRequest("max_completion_tokens is not a field of /v1/completions (it is chat's); use "
                                  "max_tokens", "max_completion_tokens")
            tokens_field = "max_tokens"
            max_tokens = data.get(tokens_field)
        if self.ids is not None:  # token ids already (`is_token_ids`, a pass in Python over a long prompt: once)
            self._check_range(self.ids, ids_field)
        self.max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else _integer(tokens_field, max_tokens, *_INT32)
        n = data.get("n")
        if n is not None and (n != 1 or isinstance(n, bool)):
            raise _BadRequest(f"n={n!r} is not supported with runtime: triton (only n=1: the scheduler reads one "
                              f"sequence per request)", "n", unsupported=True)
        self.sampling = _sampling_inputs(data)
        # trtllm-serve's SamplingParams: beam search (use_beam_search) with best_of (else n) beams; without it
        # best_of > 1 samples that many sequences and returns the best, which the backend cannot do
        use_beam_search = data.get("use_beam_search")
        if use_beam_search is not None and not isinstance(use_beam_search, bool):
            raise _BadRequest(f"use_beam_search must be a boolean, got {use_beam_search!r}", "use_beam_search")
        best_of = data.get("best_of")
        if best_of is not None:
            best_of = _integer("best_of", best_of, 1, _INT32[1])
            if best_of > 1 and not use_beam_search:
                raise _BadRequest(
                    f"best_of={best_of} without use_beam_search is not supported with runtime: triton (trtllm-serve "
                    "samples best_of sequences and returns the best; the backend returns every sequence it "
                    "generates, and the scheduler reads one); set use_beam_search: true for beam search with "
                    "best_of beams, or use runtime: trtllm-serve", "best_of", unsupported=True)
        self.beam_width = (best_of or 1) if use_beam_search else 1
        self.stream = bool(data.get("stream")) and self.kind != "context_only"
        if self.stream and self.beam_width > 1:
            # streamed beam search returns every beam whole at each step (TensorRT-LLM's
            # returnAllGeneratedTokens), which a stream of new tokens cannot carry
            raise _BadRequest("stream with use_beam_search is not supported with runtime: triton (each step "
                              "returns every beam whole); set stream: false, or use runtime: trtllm-serve",
                              "stream", unsupported=True)
        self.include_usage = wants_usage(data.get("stream_options"))
        self.context_phase_params: bytes | None = None
        self.layout: ModelLayout | None = None  # the replica's model (`prepare`); None: every tensor is sent
        self.detokenizer: Detokenizer | None = None  # the answer's text from its token ids (`prepare`)
        if self.kind == "generation_only":
            self.context_phase_params = self._handle_bytes(dp)

    @staticmethod
    def _check_range(ids: list[int], field: str) -> None:
        """Token ids the INT32 `input_ids` tensor can hold (their range in the vocabulary is the engine's)."""
        lo, hi = _INT32
        if min(ids, default=lo) < lo or max(ids, default=hi) > hi:  # at C speed: a prompt can hold 100K ids
            bad = next(t for t in ids if not lo <= t <= hi)
            raise _BadRequest(f"{field} must hold token ids in [{lo}, {hi}], got {bad}", field)

    async def tokenize(self) -> None:
        """Encode the chat messages left for the model's tokenizer (long ones off the event loop)."""
        messages, self.messages = self.messages, None
        if messages is None:
            return
        try:
            self.ids = await tokenize_async("", messages, self.template_request)
        except ValueError as exc:  # the model's chat template refused the messages
            raise _BadRequest(str(exc)) from None

    @staticmethod
    def _handle_bytes(dp: dict) -> bytes:
        raw = dp.get("context_phase_params")
        if isinstance(raw, str) and raw:
            try:
                return base64.b64decode(raw, validate=True)
            except ValueError as exc:
                raise _BadRequest(f"disaggregated_params.context_phase_params is not base64: {exc}") from None
        # a trtllm-serve-style handle: the simulator's ContextPhaseParams encoding of the same fields
        fields = {k: dp.get(k) for k in ("first_gen_tokens", "ctx_request_id", "encoded_opaque_state", "draft_tokens")}
        return json.dumps(fields, separators=(",", ":")).encode()

    # ---------------------------------------------------------------- Triton side
    def inputs(self, streaming: bool) -> list[Any]:
        import numpy as np
        from tritonclient.grpc import InferInput

        def tensor(name: str, array: Any, dtype: str) -> Any:
            t = InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            return t

        out = []
        if self.ids is not None:
            out.append(tensor("input_ids", np.array([self.ids], dtype=np.int32).reshape(1, -1), "INT32"))
            out.append(tensor("input_lengths", np.array([[len(self.ids)]], dtype=np.int32), "INT32"))
        else:
            out.append(tensor("text_input", np.array([[(self.text or "").encode()]], dtype=np.object_), "BYTES"))
        out.append(tensor("request_output_len", np.array([[self.max_tokens]], dtype=np.int32), "INT32"))
        if self.beam_width != 1:
            out.append(tensor("beam_width", np.array([[self.beam_width]], dtype=np.int32), "INT32"))
        out.append(tensor("streaming", np.array([[streaming]], dtype=bool), "BOOL"))
        for flag in _TRUE_INPUTS:
            if self.layout is None or flag in self.layout.inputs:  # optional: an older model may not declare it
                out.append(tensor(flag, np.array([[True]], dtype=bool), "BOOL"))
        if self.context_phase_params is not None:
            cpp = np.frombuffer(self.context_phase_params, dtype=np.uint8).reshape(1, -1)
            out.append(tensor("context_phase_params", cpp, "UINT8"))
        for name, dtype, value in self.sampling:
            if dtype == "BYTES":
                array = np.array([[v.encode() for v in value]], dtype=np.object_)
            elif name == "stop_words_list":  # [1, 2, N]: the ids, then each word's end offset (one token each)
                array = np.array([[value, list(range(1, len(value) + 1))]], dtype=np.int32)
            else:
                array = np.array([[value]], dtype=_NP_DTYPES[dtype])
            out.append(tensor(name, array, dtype))
        return out

    def outputs(self, context: bool) -> list[Any]:
        """The outputs to ask for: those of _TRITON_OUTPUTS (and the handle, on context) the model declares
        (Triton refuses a request for an output its model does not have)."""
        from tritonclient.grpc import InferRequestedOutput

        names = (*_TRITON_OUTPUTS, "context_phase_params") if context else _TRITON_OUTPUTS
        return [InferRequestedOutput(n) for n in names if self.layout is None or n in self.layout.outputs]

    async def prepare(self, model: str, layout: ModelLayout) -> None:
        """Fit the request to the replica's model: a text prompt becomes token ids (encoded with the model
        tokenizer as trtllm-serve encodes a completions prompt) when the model has no `text_input`, and the
        answer's text is decoded from its token ids when it has no `text_output`. SchedulerError (500
        `tokenizer_required`) when that is needed and the scheduler has no model tokenizer."""
        self.layout = layout
        needs_ids = self.ids is None and "text_input" not in layout.inputs
        needs_text = "text_output" not in layout.outputs
        tokenizer = model_tokenizer()
        if "end_id" in layout.inputs and tokenizer is not None and not any(n == "end_id" for n, _, _ in self.sampling):
            # NVIDIA's ensemble fills end_id (and pad_id) in its preprocessing model from the tokenizer; the
            # bare context/generation models the scheduler calls get none, and the engine then never stops at
            # the end of the sequence (its end id defaults to -1): sent here, as TensorRT-LLM's LLM API sets them
            eos = tokenizer.eos_token_id
            if eos is not None:
                self.sampling.append(("end_id", "INT32", eos))
                if "pad_id" in layout.inputs:
                    pad = tokenizer.pad_token_id
                    self.sampling.append(("pad_id", "INT32", eos if pad is None else pad))
        if not (needs_ids or needs_text):
            self.detokenizer = None
            return
        if tokenizer is None:
            raise _tokenizer_required(model, "text_input" if needs_ids else "text_output")
        if needs_ids:
            self.ids = await tokenize_async(self.text or "")
        self.detokenizer = Detokenizer(tokenizer.tokenizer) if needs_text else None

    def text_of(self, ids: list[int], text: str, final: bool = False) -> str:
        """A response's text: its `text_output`, or what its token ids add to the answer's decoded text
        (`final`: the answer's last response, nothing held back)."""
        return text if self.detokenizer is None else self.detokenizer.push(ids, final)

    @staticmethod
    def tokens_of(result: Any) -> tuple[list[int], str, int | None]:
        """(token ids, text, prompt length) of one response: beam 0 only (output_ids is [batch, beam, seq],
        each beam padded to the longest; `sequence_length` [batch, beam] says how much of it is the beam's)."""
        ids = result.as_numpy("output_ids")
        text = result.as_numpy("text_output")
        n_in = result.as_numpy("num_input_tokens")
        new: list[int] = []
        if ids is not None and ids.size:
            beam0 = ids.reshape(-1, ids.shape[-1])[0] if ids.ndim > 1 else ids
            lengths = result.as_numpy("sequence_length")
            if lengths is not None and lengths.size:
                beam0 = beam0[:max(0, int(lengths.reshape(-1)[0]))]
            new = [int(t) for t in beam0]
        piece = ""
        if text is not None and text.size:
            first = text.reshape(-1)[0]
            piece = (first if isinstance(first, bytes) else str(first).encode()).decode("utf-8", "replace")
        return new, piece, int(n_in.reshape(-1)[0]) if n_in is not None and n_in.size else None

    # ---------------------------------------------------------------- OpenAI side
    def answer(self, results: list[Any]) -> bytes:
        """The whole OpenAI answer from the request's responses (one, unless a decoupled model sent several),
        with the context-only handle when they carry `context_phase_params`."""
        ids: list[int] = []
        texts: list[str] = []
        prompt_tokens = raw = None
        for result in results:
            new, text, n_in = self.tokens_of(result)
            ids += new
            texts.append(self.text_of(new, text))
            prompt_tokens = n_in if n_in is not None else prompt_tokens
            cpp = result.as_numpy("context_phase_params")
            raw = cpp if cpp is not None else raw
        texts.append(self.text_of([], "", final=True))
        handle = self.context_handle(ids, raw.astype("uint8").tobytes()) if raw is not None else None
        return self.full(ids, "".join(texts), prompt_tokens, handle)

    @property
    def cid(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.request_id}"

    def finish_reason(self, produced: int) -> str:
        """"length" when max_tokens tokens came back, else "stop" (the backend ended early: EOS, a stop word,
        or max_seq_len, which the Triton model's configuration does not expose). A context-only answer always
        says "length", as trtllm-serve's and the engine simulator's do even for max_tokens 1: the router then
        goes on to generation, which returns that first token (a context-only answer cannot say whether its
        one token ended the sequence)."""
        if self.kind == "context_only":
            return "length"
        return "length" if produced >= self.max_tokens else "stop"

    def usage(self, prompt_tokens: int | None, completion_tokens: int) -> dict:
        """OpenAI `usage`: the prompt length the engine reported (`num_input_tokens`), else that of the ids sent."""
        p = prompt_tokens if prompt_tokens is not None else len(self.ids) if self.ids is not None else 0
        return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}

    def full(self, ids: list[int], text: str, prompt_tokens: int | None, handle: dict | None = None) -> bytes:
        fr = self.finish_reason(len(ids))
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": fr, "token_ids": ids, "disaggregated_params": handle}
            out = {"id": self.cid, "object": "chat.completion", "created": self.created, "model": self.model,
                   "choices": [choice], "usage": self.usage(prompt_tokens, len(ids))}
        else:
            choice = {"index": 0, "text": text, "token_ids": ids, "logprobs": None, "finish_reason": fr,
                      "stop_reason": None, "disaggregated_params": handle}
            out = {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [choice], "usage": self.usage(prompt_tokens, len(ids))}
        return json.dumps(out).encode()

    def _event(self, payload: dict) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def chunk(self, ids: list[int], text: str, finish_reason: str | None) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "token_ids": ids, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "token_ids": ids, "logprobs": None, "finish_reason": finish_reason,
                      "stop_reason": None}
        return self._event({"id": self.cid, "object": obj, "created": self.created, "model": self.model,
                            "choices": [choice]})

    def role_chunk(self) -> bytes:
        """A chat stream's first chunk, as trtllm-serve sends it (DeltaMessage(role=...) dumped with exclude_none)."""
        return self._event({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})

    def usage_chunk(self, prompt_tokens: int | None, completion_tokens: int) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._event({"id": self.cid, "object": obj, "created": self.created, "model": self.model,
                            "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)})

    def context_handle(self, first_tokens: list[int], raw: bytes) -> dict:
        """`disaggregated_params` of a context-only answer. The raw ContextPhaseParams bytes travel as base64
        (passed back verbatim on generation); the simulator's bytes are JSON, whose fields are copied out."""
        handle: dict[str, Any] = {"request_type": "context_only", "first_gen_tokens": first_tokens,
                                  "ctx_request_id": self.request_id, "encoded_opaque_state": None,
                                  "draft_tokens": None, "context_phase_params": base64.b64encode(raw).decode()}
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None  # a real executor's binary ContextPhaseParams: opaque to the scheduler
        if isinstance(decoded, dict):
            for key in ("first_gen_tokens", "ctx_request_id", "encoded_opaque_state", "draft_tokens"):
                if decoded.get(key) is not None:
                    handle[key] = decoded[key]
        return handle


class _TritonStream:
    """A streamed generation: Triton responses -> OpenAI SSE events, ending with `[DONE]` as trtllm-serve does.
    A transport failure mid-stream surfaces as ConnectionError (an OSError), which the relay treats as a
    broken engine stream. `response()` wraps it as an `EngineResponse`."""

    def response(self) -> IteratedResponse:
        return IteratedResponse(200, self.chunks(), "text/event-stream", self.release)

    def __init__(self, call: _TritonCall, responses: Any, first: Any, read_timeout: float,
                 on_end: Callable[[], None] | None = None) -> None:
        self._call = call
        self._responses = responses
        self._first = first
        self._timeout = read_timeout
        self._done = False
        self._on_end = on_end  # run once, however the stream ends (its channel is no longer in use by it)

    def _ended(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    async def chunks(self) -> AsyncIterator[bytes]:
        call = self._call
        produced = 0
        prompt_tokens = None
        if call.chat:
            yield call.role_chunk()
        item = self._first
        while item is not None:
            result, error = item
            if error is not None:
                _, body = triton_error(error.message(), error.status())
                yield b"data: " + body + b"\n\n" + b"data: [DONE]\n\n"
                self._done = True
                self._ended()
                return
            ids, text, n_in = call.tokens_of(result)
            prompt_tokens = n_in if n_in is not None else prompt_tokens
            produced += len(ids)
            last = produced >= call.max_tokens
            text = call.text_of(ids, text, final=last)
            if ids or text:
                yield call.chunk(ids, text, call.finish_reason(produced) if last else None)
            item = await self._next()
        if produced < call.max_tokens:  # ended early (a real engine's EOS): say so in an empty last chunk
            yield call.chunk([], call.text_of([], "", final=True), call.finish_reason(produced))
        if call.include_usage:
            yield call.usage_chunk(prompt_tokens, produced)
        yield b"data: [DONE]\n\n"
        self._done = True
        self._ended()

    async def _next(self) -> Any:
        try:
            return await asyncio.wait_for(self._responses.__anext__(), self._timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            self.release()
            raise
        except Exception as exc:  # grpc.aio.AioRpcError and the like: the stream broke
            raise ConnectionError(f"Triton stream failed: {type(exc).__name__}: {exc}") from exc

    def release(self) -> None:
        if not self._done:
            self._done = True
            _cancel(self._responses)
        self._ended()


def _cancel(responses: Any) -> None:
    """Cancel a gRPC stream (nothing happens when it has already ended)."""
    try:
        responses.cancel()
    except Exception:  # noqa: BLE001 - already finished, or no stream
        pass


# How long the gRPC channel of a replica that left the endpoint lists is kept before it is closed: its pod
# is gone well before (a terminating pod has its grace period), and so are the streams it was serving.
RETIRED_CHANNEL_S = 900.0


class TritonClient:
    """Triton's KServe v2 gRPC API through `tritonclient.grpc.aio`; one client (channel) per replica, closed
    once its replica has been out of the endpoint lists for RETIRED_CHANNEL_S (`retain`)."""

    def __init__(self, read_timeout: float = 600.0, connect_timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import tritonclient.grpc.aio  # noqa: F401 - fail at start-up, not at the first request

        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self._clock = clock
        self._clients: dict[str, Any] = {}
        # (gRPC address, model) -> (the channel it was read on, its layout being read or read): read again on a
        # new channel (the replica's channel was rebuilt), and after a failed read
        self._layouts: dict[tuple[str, str], tuple[Any, asyncio.Future[ModelLayout]]] = {}
        self._departed: dict[str, float] = {}  # gRPC address -> when its replica left the endpoint lists
        self._in_use: dict[str, int] = {}  # gRPC address -> calls and streams in flight on its channel

    async def retain(self, endpoints: Iterable[Endpoint]) -> None:
        """Keep the channels of `endpoints` (every replica in the lists); close those of replicas that left
        the lists more than RETIRED_CHANNEL_S ago, so that pod churn does not pile up channels (each keeps
        trying to reconnect to an address nothing serves any more)."""
        keep = {grpc_address(e) for e in endpoints}
        now = self._clock()
        retired = []
        for address in list(self._clients):
            if address in keep:
                self._departed.pop(address, None)
            elif now - self._departed.setdefault(address, now) >= RETIRED_CHANNEL_S and not self._in_use.get(address):
                retired.append(self._clients.pop(address))
                del self._departed[address]
                for key in [k for k in self._layouts if k[0] == address]:
                    del self._layouts[key]
        for client in retired:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - close the others
                pass

    def _using(self, endpoint: Endpoint) -> str:
        """Count a call or stream on `endpoint`'s channel until `_used` (`retain` leaves such a channel open)."""
        address = grpc_address(endpoint)
        self._in_use[address] = self._in_use.get(address, 0) + 1
        return address

    def _used(self, address: str) -> None:
        left = self._in_use.get(address, 0) - 1
        if left > 0:
            self._in_use[address] = left
        else:
            self._in_use.pop(address, None)

    def _client(self, endpoint: Endpoint) -> Any:
        address = grpc_address(endpoint)
        client = self._clients.get(address)
        if client is None:
            from tritonclient.grpc.aio import InferenceServerClient

            client = self._clients[address] = InferenceServerClient(address)
        return client

    @staticmethod
    def _metadata(request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id}

    async def _layout(self, endpoint: Endpoint, model: str) -> ModelLayout:
        """The tensors `model` declares on `endpoint`'s replica, read once per channel (concurrent calls share
        one read). A failed read is an EngineFailure (a connection failure when the replica cannot be reached),
        and the next call reads again."""
        client = self._client(endpoint)
        key = (grpc_address(endpoint), model)
        cached = self._layouts.get(key)
        if cached is None or cached[0] is not client:
            cached = self._layouts[key] = (client, asyncio.ensure_future(self._read_layout(client, model)))
            cached[1].add_done_callback(functools.partial(self._drop_failed_layout, key, cached))
        try:
            return await asyncio.shield(cached[1])
        except Exception as exc:  # InferenceServerException, timeouts (a cancellation is no Exception: it passes)
            from tritonclient.utils import InferenceServerException

            if isinstance(exc, InferenceServerException) and not is_transport_failure(exc.message() or "",
                                                                                      str(exc.status() or "")):
                # an answer (e.g. the model is not there): counted as a 5xx is, not as the replica being down
                raise EngineFailure(endpoint, f"cannot read model {model!r}: {exc.message()}") from exc
            raise self._failure(endpoint, exc) from exc

    def _drop_failed_layout(self, key: tuple[str, str], entry: tuple[Any, asyncio.Future], read: asyncio.Future) -> None:
        """A failed read is not kept (the next call reads again), also when every caller waiting on it was
        cancelled first: a later request must not get that old failure."""
        if read.cancelled() or read.exception() is not None:
            if self._layouts.get(key) is entry:
                del self._layouts[key]

    async def _read_layout(self, client: Any, model: str) -> ModelLayout:
        metadata = await client.get_model_metadata(model, as_json=True, client_timeout=self.connect_timeout)
        config = await client.get_model_config(model, as_json=True, client_timeout=self.connect_timeout)
        return ModelLayout.of(metadata, config)

    async def _prepared(self, endpoint: Endpoint, call: _TritonCall, model: str) -> ModelLayout:
        layout = await self._layout(endpoint, model)
        await call.prepare(model, layout)
        return layout

    def _failure(self, endpoint: Endpoint, exc: Exception) -> EngineFailure:
        return EngineFailure(endpoint, f"{type(exc).__name__}: {exc}", kind="connection")

    async def _context(self, endpoint: Endpoint, call: _TritonCall) -> tuple[int, bytes, str]:
        """The context step: unary `infer` on `context`, or a stream when that model is decoupled (NVIDIA's
        streaming layout makes both models decoupled, and Triton refuses unary `infer` on a decoupled model)."""
        from tritonclient.utils import InferenceServerException

        if (await self._prepared(endpoint, call, TRITON_CONTEXT_MODEL)).decoupled:
            return await self._whole(endpoint, call, TRITON_CONTEXT_MODEL)
        try:
            result = await self._client(endpoint).infer(
                TRITON_CONTEXT_MODEL, call.inputs(False), outputs=call.outputs(context=True),
                request_id=call.request_id, parameters={"request_type": call.kind},
                headers=self._metadata(call.request_id), client_timeout=self.read_timeout,
            )
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if is_transport_failure(exc.message() or "", status):
                raise self._failure(endpoint, exc) from exc
            code, body = triton_error(exc.message() or "", status)
            return code, body, "application/json"
        return 200, call.answer([result]), "application/json"

    async def _start_stream(self, endpoint: Endpoint, call: _TritonCall, streaming: bool,
                            model: str = TRITON_GENERATION_MODEL) -> tuple[Any, Any]:
        """Open a stream on `model` (decoupled; `call` prepared for it) and wait for its first response
        (result, error)."""
        request = {"model_name": model, "inputs": call.inputs(streaming),
                   "outputs": call.outputs(context=model == TRITON_CONTEXT_MODEL), "request_id": call.request_id,
                   "parameters": {"request_type": call.kind}}

        async def one() -> AsyncIterator[dict]:
            yield request

        try:
            responses = self._client(endpoint).stream_infer(one(), headers=self._metadata(call.request_id))
            first = await asyncio.wait_for(responses.__anext__(), self.read_timeout)
        except StopAsyncIteration:
            return None, None
        except Exception as exc:  # InferenceServerException, grpc.aio.AioRpcError, timeouts: transport-level
            raise self._failure(endpoint, exc) from exc
        return responses, first

    async def _whole(self, endpoint: Endpoint, call: _TritonCall, model: str) -> tuple[int, bytes, str]:
        """A request not streamed on a decoupled `model`: its responses, read to the stream's end, as one answer."""
        responses, item = await self._start_stream(endpoint, call, False, model)
        results = []
        try:
            while item is not None:
                result, error = item
                if error is not None:
                    code, err = triton_error(error.message(), error.status())
                    return code, err, "application/json"
                results.append(result)
                try:
                    item = await asyncio.wait_for(responses.__anext__(), self.read_timeout)
                except StopAsyncIteration:
                    item = None
        except Exception as exc:
            raise self._failure(endpoint, exc) from exc
        finally:
            if item is not None:  # left before the stream's end
                _cancel(responses)
        return 200, call.answer(results), "application/json"

    @staticmethod
    async def _call(body: bytes, path: str, request_id: str) -> _TritonCall:
        call = _TritonCall(body, path, request_id)
        await call.tokenize()
        return call

    async def post(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> tuple[int, bytes, str]:
        address = self._using(endpoint)
        try:
            return await self._post(endpoint, path, body, request_id)
        finally:
            self._used(address)

    async def _post(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> tuple[int, bytes, str]:
        try:
            call = await self._call(body, path, request_id)
        except _BadRequest as exc:
            return 400, exc.body(), "application/json"
        if call.kind == "context_only":
            return await self._context(endpoint, call)
        await self._prepared(endpoint, call, TRITON_GENERATION_MODEL)
        return await self._whole(endpoint, call, TRITON_GENERATION_MODEL)

    async def open(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> EngineResponse:
        address = self._using(endpoint)
        streaming = False
        try:
            try:
                call = await self._call(body, path, request_id)
            except _BadRequest as exc:
                return _static(400, exc.body())
            if call.kind == "context_only":
                status, data, ctype = await self._context(endpoint, call)
                return _static(status, data, ctype)
            await self._prepared(endpoint, call, TRITON_GENERATION_MODEL)
            responses, first = await self._start_stream(endpoint, call, streaming=True)
            if first is not None and first[1] is not None:  # failed before the first token: an ordinary error
                _cancel(responses)
                status, data = triton_error(first[1].message(), first[1].status())
                return _static(status, data)
            streaming = True  # the channel stays in use until the stream ends
            return _TritonStream(call, responses, first, self.read_timeout, lambda: self._used(address)).response()
        finally:
            if not streaming:
                self._used(address)

    async def health(self, endpoint: Endpoint, timeout: float) -> bool:
        try:
            client = self._client(endpoint)
            # the model the replica's tier serves: a prefill pod loads only `context`, a decode pod `generation`
            model = TRITON_CONTEXT_MODEL if endpoint.tier == PREFILL else TRITON_GENERATION_MODEL
            return bool(await client.is_server_ready(client_timeout=timeout)
                        and await client.is_model_ready(model, client_timeout=timeout))
        except Exception:  # noqa: BLE001 - any failure means not healthy
            return False

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        self._layouts.clear()
        for client in clients.values():
            try:
                await client.close()
            except Exception:  # noqa: BLE001
                pass


# How long a runtime's engine client that could not be built (e.g. tritonclient missing) is not tried again:
# meanwhile its replicas' calls fail at once with the same error, not with a new import attempt each.
CLIENT_BUILD_RETRY_S = 30.0


class EnginesByRuntime:
    """An engine client per runtime: `client_for(endpoint)` is the client of the endpoint's runtime
    (`Endpoint.runtime`, which discovery reads from the pod), or of `default` (the config's `runtime`) for
    an endpoint that does not say; the request flow awaits that client's calls itself. The client of
    another runtime is built when an endpoint of it first needs one; one that cannot be built (tritonclient
    missing) fails that endpoint's calls as a connection failure, so the request goes on to another
    replica, and is tried again after CLIENT_BUILD_RETRY_S."""

    def __init__(self, default: str, build: Callable[[str], EngineClient], first: EngineClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default
        self._build = build
        self._clock = clock
        self.clients: dict[str, EngineClient] = {default: first if first is not None else build(default)}
        self.primary = self.clients[default]
        self._unbuildable: dict[str, tuple[float, str]] = {}  # runtime -> (retry after, why it failed)

    def client_for(self, endpoint: Endpoint) -> EngineClient:
        runtime = endpoint.runtime
        if runtime is None or runtime == self.default:
            return self.primary
        client = self.clients.get(runtime)
        if client is None:
            failed = self._unbuildable.get(runtime)
            if failed is not None and self._clock() < failed[0]:
                raise EngineFailure(endpoint, failed[1], kind="connection")
            try:
                client = self.clients[runtime] = self._build(runtime)
            except Exception as exc:  # noqa: BLE001 - e.g. the tritonclient package missing
                message = f"no {runtime} engine client: {type(exc).__name__}: {exc}"
                self._unbuildable[runtime] = (self._clock() + CLIENT_BUILD_RETRY_S, message)
                raise EngineFailure(endpoint, message, kind="connection") from None
            self._unbuildable.pop(runtime, None)
        return client

    async def health(self, endpoint: Endpoint, timeout: float) -> bool:
        try:
            client = self.client_for(endpoint)
        except EngineFailure:
            return False
        return await client.health(endpoint, timeout)

    async def retain(self, endpoints: Iterable[Endpoint]) -> None:
        """Tell each client that keeps something per replica (Triton's channels) which replicas are listed."""
        listed = list(endpoints)
        for client in list(self.clients.values()):
            retain = getattr(client, "retain", None)
            if retain is not None:
                await retain(listed)

    async def close(self) -> None:
        for client in list(self.clients.values()):
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - close the others
                pass


def make_engine_client(runtime: str, read_timeout: float) -> EngineClient:
    if runtime == "triton":
        return TritonClient(read_timeout=read_timeout)
    return TrtllmServeClient(read_timeout=read_timeout)
