"""The Triton front end of the engine simulator (`baton engine-sim --sim-frontend triton`).

The same simulated worker as the trtllm-serve front end (`engine.Engine`: batching, KV accounting, the
CacheState check, the KV pull), served by a real Triton Inference Server started with PyTriton and spoken
to over the KServe v2 protocol (HTTP and gRPC). The models follow the `tensorrt_llm` model of
TensorRT-LLM's Triton backend, batch size 1, plus (unless `--sim-triton-text-io off`) the text tensors of its
ensemble (`text_input`, `text_output`, `stop_words`/`bad_words`), which that model does not have:

- `context` (not decoupled: unary `infer`) and `generation` (decoupled: gRPC `stream_infer` or
  `/generate_stream`) both serve every request type; the request *parameter* `request_type` is
  `context_only` | `generation_only` | `context_and_generation` (default), as in the backend's utils.h.
- Inputs (leading dimension 1, the batch): `input_ids` INT32 [1, N] or `text_input` BYTES [1, 1] (tokenized
  with `baton.tokens`, as the ensemble's preprocessing would), `input_lengths` INT32 [1, 1] (optional),
  `request_output_len` INT32 [1, 1] (required), `streaming` BOOL [1, 1], `beam_width` INT32 [1, 1],
  `context_phase_params` UINT8 [1, -1] on `generation_only`, and the backend's optional sampling inputs
  (`SAMPLING_INPUTS`: `temperature`, `runtime_top_k`, `runtime_top_p`, `seed`, the penalties, `min_tokens`,
  `end_id`/`pad_id`, `return_log_probs`, word lists `stop_words_list`/`bad_words_list` INT32 [1, 2, N] and
  their text forms `stop_words`/`bad_words` BYTES [1, K]). Those are checked as the backend checks them
  (datatype, shape, the executor's SamplingConfig ranges, the word-list layout) and then, like the HTTP front
  end's `temperature`/`stop`/..., ignored: tokens are a function of the prompt, generation runs to
  `request_output_len` (no EOS, no stop-word match). What each request carried is kept for tests
  (GET /_sim/triton/requests on the simulator's own endpoint).
- Outputs: `output_ids` INT32 [1, 1, n] (generated tokens only, unless the BOOL input
  `exclude_input_in_output` is false: then the first response starts with the prompt ids),
  `sequence_length` INT32 [1, 1], `num_input_tokens` / `num_output_tokens` INT32 [1, 1] (only when the BOOL
  inputs `return_num_input_tokens` / `return_num_output_tokens` ask for them, as in the backend), `text_output`
  BYTES [1, 1] (the tokens' text, as the ensemble's postprocessing would), and `context_phase_params` UINT8
  [1, -1] on `context_only`.

`context_phase_params` stands in for the executor-serialized ContextPhaseParams: UTF-8 JSON
`{"first_gen_tokens", "ctx_request_id", "encoded_opaque_state", "draft_tokens"}`, `encoded_opaque_state`
being exactly the HTTP front end's (base64 of the CommState + CacheState, see handoff.py). The KV itself
moves between workers over the same KV transfer channel as the HTTP front end's (transfer_server.py,
standing in for UCX/NIXL). The simulator's own HTTP endpoint serves `/health`, `/metrics`, `/perf_metrics`
and `/_sim/*` (`/_sim/triton/requests[?request_id=X]`: the last requests' sampling inputs, as received).

Errors reach Triton clients as `... EngineRequestError: <status> <type>: <message>` inside Triton's error
text (PyTriton wraps the Python traceback); status and type are the HTTP front end's, and the message is
the same, e.g. TensorRT-LLM's "Disagg server does not currently support these cacheState ..." on a
KV-format mismatch.

PyTriton must run from a venv made with Debian's /usr/bin/python3.11 (see triton-venv.sh); it is imported
only when this front end starts.

Triton starts with both models already in its model store (PyTriton's local model store), so its strict
readiness (`/v2/health/ready`) holds only once they are loaded, as with tritonserver serving TensorRT-LLM's
models: a readinessProbe on it (the operator renders one for Triton pods) never passes early. Triton's own
Prometheus metrics are served when `--sim-triton-metrics-port` is given (tritonserver's `--metrics-port`).

Threads: the engine and the simulator's HTTP endpoint run on one asyncio loop in a thread of their own;
PyTriton runs each model instance's inference callable on a loop of its own; the callables hand their work
to the engine loop (`run_coroutine_threadsafe`) and get results and streamed tokens back through
thread-safe calls. The main thread starts Triton (so its parent-death signal is tied to a thread that lives
as long as the process) and waits for SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from baton import tokens
from baton.engine_sim import config as config_mod
from baton.engine_sim import logs
from baton.engine_sim.config import SimConfig, StartupError
from baton.engine_sim.engine import (
    CTX_AND_GEN,
    CTX_ONLY,
    GEN_ONLY,
    REQUEST_TYPES,
    EngineError,
    Prompt,
    Seq,
    token_text,
)
from baton.engine_sim.handoff import OpaqueState, decode_opaque, encode_opaque
from baton.engine_sim.server import SimServer
from baton.engine_sim.transfer_server import KVTransferServer
from baton.http1.server import Handler, Headers, Request, Response
from baton.localproc import proc_start_time

log = logging.getLogger("baton.engine_sim.triton")

CONTEXT_MODEL = "context"
GENERATION_MODEL = "generation"
SHUTDOWN_GRACE_S = 30
REQUEST_ID_PARAMETER = "x-request-id"  # forwarded from the gRPC metadata / HTTP header of the same name
BEAM_MESSAGE = "Currently, only beam width 1 is supported."
VENV_HINT = (
    "the Triton front end needs nvidia-pytriton in a venv made from Debian's /usr/bin/python3.11: "
    "run `bash operator/baton/engine_sim/triton-venv.sh` and start the simulator with the python it prints"
)


class EngineRequestError(Exception):
    """A refused or failed request. Its text, `<status> <type>: <message>`, is what Triton clients see at the
    end of the error (after PyTriton's traceback); status and type are those of the HTTP front end."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError") -> None:
        message = " ".join(str(message).splitlines())
        super().__init__(f"{status} {err_type}: {message}")
        self.message = message
        self.status = status
        self.err_type = err_type

    @classmethod
    def from_engine(cls, exc: EngineError) -> EngineRequestError:
        if exc.in_generation and exc.status < 500:
            # a generation that failed (a failed KV handoff): the HTTP front end answers it 400 as trtllm-serve
            # does; through Triton it stays the backend's internal error
            return cls(exc.message, 500, "InternalServerError")
        return cls(exc.message, exc.status, exc.err_type)


# ---------------------------------------------------------------------------------------------- options
@dataclass
class TritonOptions:
    grpc_port: int | None
    sim_http_port: int
    context_instances: int
    log_verbose: int
    metrics_port: int | None = None  # None: Triton's metrics endpoint off
    text_io: bool = True  # False: exactly the tensorrt_llm model's tensors (no text_input/text_output, no text words)
    models: tuple[str, ...] = ("context", "generation")  # the models loaded (tritonserver --load-model)


def _options_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton engine-sim --sim-frontend triton", add_help=False)
    p.add_argument("--sim-triton-grpc-port", type=int, default=None, metavar="PORT",
                   help="Triton's gRPC port (default: --port + 1, as the operator renders Triton pods)")
    p.add_argument("--sim-http-port", type=int, default=0, metavar="PORT",
                   help="the simulator's own HTTP endpoint: /health, /metrics, /_sim/* (default: any free)")
    p.add_argument("--sim-triton-context-instances", type=int, default=1, metavar="N",
                   help="instances of the (not decoupled) context model = context requests in the engine at once "
                        "(default 1; PyTriton's multi-instance start-up is racy, failed starts are retried)")
    p.add_argument("--sim-triton-metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Triton's own Prometheus metrics (GET /metrics: its inference counters) on PORT, "
                        "as tritonserver --metrics-port does (default: Triton's metrics endpoint off; the engine's "
                        "statistics are on the simulator endpoint either way)")
    p.add_argument("--sim-triton-log-verbose", type=int, default=0, metavar="N", help="Triton's --log-verbose")
    p.add_argument("--sim-triton-models", default="context,generation", metavar="NAMES",
                   help="the models to load, comma-separated (default both; tritonserver --model-control-mode="
                        "explicit --load-model=NAME loads only those: a prefill pod needs context, a decode pod "
                        "generation)")
    p.add_argument("--sim-triton-text-io", choices=("on", "off"), default="on",
                   help="on (default): the models also have text_input/text_output and the text word lists "
                        "stop_words/bad_words (the ensemble's pre/postprocessing folded in); off: exactly the tensors "
                        "of TensorRT-LLM's tensorrt_llm model (token ids only), as NVIDIA's context/generation models")
    return p


def split_options(argv: list[str]) -> tuple[TritonOptions, list[str]]:
    """This front end's own options, and the rest (the engine simulator's command line)."""
    ns, rest = _options_parser().parse_known_args(argv)
    if ns.sim_triton_context_instances < 1:
        raise StartupError("--sim-triton-context-instances must be >= 1")
    if ns.sim_triton_metrics_port is not None and not 0 < ns.sim_triton_metrics_port < 65536:
        raise StartupError("--sim-triton-metrics-port must be a port number (1-65535): Triton cannot bind port 0")
    models = tuple(dict.fromkeys(m.strip() for m in ns.sim_triton_models.split(",") if m.strip()))
    unknown = sorted(set(models) - {"context", "generation"})
    if not models or unknown:
        raise StartupError(f"--sim-triton-models must name context and/or generation, got {ns.sim_triton_models!r}")
    return TritonOptions(ns.sim_triton_grpc_port, ns.sim_http_port, ns.sim_triton_context_instances,
                         ns.sim_triton_log_verbose, ns.sim_triton_metrics_port, ns.sim_triton_text_io == "on",
                         models), rest


def options_help() -> str:
    return _options_parser().format_help().split("\n", 1)[1]


def _bind_host(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "") else host


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_ports(host: str, http_port: int, grpc_port: int | None) -> tuple[int, int]:
    """Triton's HTTP and gRPC ports. Triton cannot bind port 0 itself: for `--port 0` pick a free pair
    P, P+1 (the layout the operator renders: HTTP on the tier port, gRPC on the next one)."""
    if http_port:
        return http_port, grpc_port or http_port + 1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        if grpc_port:
            return port, grpc_port
        if _port_free(host, port + 1) and _port_free(host, port):
            return port, port + 1
    raise StartupError(f"no two consecutive free ports found on {host}")


# ---------------------------------------------------------------------------------------------- requests
# The optional sampling inputs of TensorRT-LLM's `tensorrt_llm` model (all_models/inflight_batcher_llm/
# tensorrt_llm/config.pbtxt: name, datatype, dims with the batch dimension in front), plus the ensemble's / BLS's
# text word lists. Checked as the backend checks them, then ignored (see the module docstring).
SAMPLING_INPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "end_id": ("INT32", (1, 1)),
    "pad_id": ("INT32", (1, 1)),
    "temperature": ("FP32", (1, 1)),
    "runtime_top_k": ("INT32", (1, 1)),
    "runtime_top_p": ("FP32", (1, 1)),
    "runtime_top_p_min": ("FP32", (1, 1)),
    "len_penalty": ("FP32", (1, 1)),
    "repetition_penalty": ("FP32", (1, 1)),
    "presence_penalty": ("FP32", (1, 1)),
    "frequency_penalty": ("FP32", (1, 1)),
    "min_tokens": ("INT32", (1, 1)),
    "seed": ("UINT64", (1, 1)),
    "return_log_probs": ("BOOL", (1, 1)),
    "stop_words_list": ("INT32", (1, 2, -1)),
    "bad_words_list": ("INT32", (1, 2, -1)),
    "stop_words": ("BYTES", (1, -1)),
    "bad_words": ("BYTES", (1, -1)),
}
# The inputs of the models' text I/O (`--sim-triton-text-io on`), which the tensorrt_llm model does not have: the
# ensemble's text prompt and its text word lists.
TEXT_INPUTS = ("text_input", "stop_words", "bad_words")
_NUMPY_NAMES = {"INT32": "int32", "FP32": "float32", "UINT64": "uint64", "BOOL": "bool", "UINT8": "uint8"}
_TRITON_NAMES = {**{v: k for k, v in _NUMPY_NAMES.items()}, "float64": "FP64", "float16": "FP16"}
# TensorRT-LLM's executor SamplingConfig checks (samplingConfig.cpp); runtime_top_p <= 0 means "not set" there
# (the backend's getSamplingConfigFromTensors drops it).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "runtime_top_k": (lambda v: v >= 0, ">= 0"),
    "runtime_top_p": (lambda v: v <= 1, "<= 1"),
    "runtime_top_p_min": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "min_tokens": (lambda v: v >= 0, ">= 0"),
}
RECENT_REQUESTS = 256  # kept for GET /_sim/triton/requests


@dataclass
class TritonRequest:
    kind: str
    prompt: list[int]
    max_tokens: int
    streaming: bool
    x_request_id: str
    handle: OpaqueState | None = None
    first_tokens: list[int] | None = None
    sampling: dict[str, Any] | None = None  # the sampling inputs given: name -> value (word lists decoded)
    # the backend's optional BOOL inputs asking for the token counts (it fills those outputs only when asked)
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    # the backend's optional `exclude_input_in_output` (absent: the model parameter, true here): false puts the
    # prompt ids before the first response's tokens
    exclude_input: bool = True


def _datatype(array: Any) -> str:
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    return _TRITON_NAMES.get(array.dtype.name, array.dtype.name.upper())


def _word_list(name: str, array: Any) -> list[list[int]]:
    """A [1, 2, N] word list (ids, then each word's end offset, -1 padded) as words, checked as TensorRT-LLM's
    backend checks it (utils::convertWordList)."""
    ids, offsets = array[0].tolist()
    words: list[list[int]] = []
    start = 0
    for i, end in enumerate(offsets):
        if end == -1:
            if any(o != -1 for o in offsets[i:]):
                raise EngineRequestError(f"input {name}: sparse list must not have additional -1s: {offsets}")
            break
        if end > len(ids) or end < 0:
            raise EngineRequestError(f"input {name}: sparse list must not have out-of-bound offsets: {offsets}")
        if end <= start and i:
            raise EngineRequestError(f"input {name}: sparse list must not have non-increasing offsets: {offsets}")
        words.append(ids[start:end])
        start = end
    return words


def parse_sampling(data: dict) -> dict[str, Any]:
    """The optional sampling inputs given, checked: datatype and shape (as Triton checks them against the
    model config), the executor's value ranges, the word lists' layout. EngineRequestError (400) otherwise."""
    out: dict[str, Any] = {}
    for name, (datatype, shape) in SAMPLING_INPUTS.items():
        array = data.get(name)
        if array is None:
            continue
        got = _datatype(array)
        if got != datatype:
            raise EngineRequestError(f"unexpected datatype {got} for input {name}, expecting {datatype}")
        if len(array.shape) != len(shape) or any(want not in (-1, have) for want, have in zip(shape, array.shape)):
            want = "[" + ",".join(str(d) for d in shape) + "]"
            raise EngineRequestError(
                f"unexpected shape for input {name}: {list(array.shape)}, the model expects {want}")
        if datatype == "BYTES":
            try:
                out[name] = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in array.reshape(-1)]
            except UnicodeDecodeError as exc:
                raise EngineRequestError(f"input {name} is not UTF-8: {exc}") from None
        elif shape == (1, 2, -1):
            out[name] = _word_list(name, array)
        else:
            value = array.reshape(-1)[0].item()
            check = _RANGES.get(name)
            if check is not None and not check[0](value):
                raise EngineRequestError(f"input {name} must be {check[1]}, got {value}")
            out[name] = value
    return out


def _scalar(data: dict, name: str, default: Any = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    flat = value.reshape(-1)
    if flat.size != 1:
        raise EngineRequestError(f"input {name} must hold exactly one value, got {flat.size}")
    return flat[0].item() if hasattr(flat[0], "item") else flat[0]


def encode_context_phase_params(first_tokens: list[int], ctx_request_id: int, opaque: str) -> bytes:
    return json.dumps({"first_gen_tokens": list(first_tokens), "ctx_request_id": ctx_request_id,
                       "encoded_opaque_state": opaque, "draft_tokens": None}, separators=(",", ":")).encode()


def decode_context_phase_params(raw: bytes) -> tuple[list[int], int, OpaqueState]:
    """(first_gen_tokens, ctx_request_id, opaque state); EngineRequestError (400) when it is not ours."""
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeError, ValueError) as exc:
        raise EngineRequestError(f"context_phase_params is not the simulator's ContextPhaseParams: {exc}") from exc
    if not isinstance(payload, dict):
        raise EngineRequestError("context_phase_params must hold a JSON object")
    first = payload.get("first_gen_tokens")
    if not tokens.is_token_ids(first) or not first:
        raise EngineRequestError("context_phase_params.first_gen_tokens must be a non-empty list of token ids")
    ctx_id = payload.get("ctx_request_id")
    if isinstance(ctx_id, bool) or not isinstance(ctx_id, int):
        raise EngineRequestError("context_phase_params.ctx_request_id must be an integer")
    try:
        handle = decode_opaque(payload.get("encoded_opaque_state"))
    except ValueError as exc:
        raise EngineRequestError(f"context_phase_params.{exc}") from exc
    if handle.ctx_request_id != ctx_id:
        raise EngineRequestError(
            f"context_phase_params.ctx_request_id {ctx_id} does not match the encoded_opaque_state "
            f"({handle.ctx_request_id})")
    return list(first), ctx_id, handle


def parse_request(req: Any, vocab_size: int) -> TritonRequest:
    """A PyTriton request (numpy inputs + parameters) -> what `Engine.submit` needs."""
    params = dict(req.parameters or {})
    data = req.data
    kind = params.get("request_type") or CTX_AND_GEN
    if kind not in REQUEST_TYPES:
        raise EngineRequestError(f"request_type must be one of {', '.join(REQUEST_TYPES)}, got {kind!r}")
    x_rid = ""
    for key, value in params.items():
        if key.lower() == REQUEST_ID_PARAMETER:
            x_rid = str(value)
    ids, text = data.get("input_ids"), data.get("text_input")
    if ids is not None and text is not None:
        raise EngineRequestError("send either input_ids or text_input, not both")
    if ids is not None:
        flat = ids.reshape(-1)
        length = _scalar(data, "input_lengths")
        if length is not None:
            if not 0 < int(length) <= flat.size:
                raise EngineRequestError(f"input_lengths ({length}) must be in [1, {flat.size}] (the input_ids given)")
            flat = flat[: int(length)]
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
            bad = next(int(t) for t in flat if t < 0 or t >= vocab_size)
            raise EngineRequestError(f"input_ids contains token id {bad} outside the vocabulary [0, {vocab_size})")
        prompt = [int(t) for t in flat.tolist()]
    elif text is not None:
        raw = _scalar(data, "text_input")
        prompt = tokens.tokenize(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
    else:
        raise EngineRequestError("input_ids or text_input is required")
    max_tokens = _scalar(data, "request_output_len")
    if max_tokens is None:
        raise EngineRequestError("request_output_len is required")
    beam = _scalar(data, "beam_width", 1)
    if int(beam) != 1:
        raise EngineRequestError(BEAM_MESSAGE)
    parsed = TritonRequest(kind, prompt, int(max_tokens), bool(_scalar(data, "streaming", False)), x_rid,
                           sampling=parse_sampling(data),
                           return_num_input_tokens=bool(_scalar(data, "return_num_input_tokens", False)),
                           return_num_output_tokens=bool(_scalar(data, "return_num_output_tokens", False)),
                           exclude_input=bool(_scalar(data, "exclude_input_in_output", True)))
    cpp = data.get("context_phase_params")
    if kind == GEN_ONLY:
        if cpp is None or cpp.size == 0:
            raise EngineRequestError("generation_only requests need the context_phase_params input")
        parsed.first_tokens, _, parsed.handle = decode_context_phase_params(cpp.astype("uint8").tobytes())
    elif cpp is not None and cpp.size:
        raise EngineRequestError(f"context_phase_params is only accepted with request_type generation_only, not {kind}")
    return parsed


def response_tensors(parsed: TritonRequest, prompt_length: int, generated: int, new: list[int]) -> dict[str, Any]:
    """The outputs of one response with `new` tokens (`generated` so far), as the backend fills them: the token
    counts only when the request asked for them (`return_num_input_tokens` / `return_num_output_tokens`), the
    prompt ids before the first response's tokens unless `exclude_input_in_output`."""
    import numpy as np

    ids = new if parsed.exclude_input or generated > len(new) else parsed.prompt + new
    out = {
        "output_ids": np.array([[ids]], dtype=np.int32).reshape(1, 1, len(ids)),
        "sequence_length": np.array([[len(ids)]], dtype=np.int32),
        "text_output": np.array([["".join(token_text(t) for t in new).encode()]], dtype=np.object_),
    }
    if parsed.return_num_input_tokens:
        out["num_input_tokens"] = np.array([[prompt_length]], dtype=np.int32)
    if parsed.return_num_output_tokens:
        out["num_output_tokens"] = np.array([[generated]], dtype=np.int32)
    return out


def _aiohttp(handler: Handler) -> Callable[[web.Request], Any]:
    """A `SimServer` handler (a `baton.http1` request in, a whole `Response` out) as an aiohttp handler."""

    async def serve(request: web.Request) -> web.Response:
        headers = Headers((key.lower(), value) for key, value in request.headers.items())
        version = f"HTTP/{request.version.major}.{request.version.minor}"
        resp = await handler(Request(request.method, request.path, request.query_string, version, headers,
                                     await request.read()))
        assert isinstance(resp, Response), "the side endpoint serves whole answers only"
        return web.Response(body=resp.body, status=resp.status,
                            headers={**(resp.headers or {}), "Content-Type": resp.content_type})

    return serve


# ---------------------------------------------------------------------------------------------- the front end
class TritonFrontend:
    """One simulated worker behind Triton. `start()` runs the engine thread and Triton; `stop()` undoes it."""

    def __init__(self, cfg: SimConfig, opts: TritonOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.host = _bind_host(cfg.host)
        self.server = SimServer(cfg)  # engine + the HTTP handlers the side endpoint reuses
        self.engine = self.server.engine
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sim_http_port: int | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.triton: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop_async: asyncio.Event | None = None
        self._workspace: str | None = None
        # the sampling inputs of the last requests (engine loop only): GET /_sim/triton/requests
        self.received: collections.deque[dict] = collections.deque(maxlen=RECENT_REQUESTS)

    # ------------------------------------------------------------------ engine thread
    def _side_app(self) -> web.Application:
        s = self.server
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/health", _aiohttp(s.health))
        app.router.add_get("/version", _aiohttp(s.version))
        app.router.add_get("/metrics", _aiohttp(s.metrics))
        app.router.add_get("/perf_metrics", _aiohttp(s.perf_metrics))
        app.router.add_post("/kv_cache_events", _aiohttp(s.kv_cache_events))
        app.router.add_get("/_sim/state", self._state)
        app.router.add_get("/_sim/triton/requests", self._requests)
        app.router.add_post("/_sim/fatal", _aiohttp(s.sim_fatal))
        return app

    async def _state(self, request: web.Request) -> web.Response:
        data = self.server.state()
        data["triton"] = {"http_port": self.http_port, "grpc_port": self.grpc_port,
                          "models": list(self.opts.models)}
        return web.json_response(data)

    async def _requests(self, request: web.Request) -> web.Response:
        rid = request.query.get("request_id")
        return web.json_response([r for r in self.received if rid is None or r["x_request_id"] == rid])

    async def _engine_main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        runner = web.AppRunner(self._side_app(), access_log=None, handler_cancellation=True,
                               shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.opts.sim_http_port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self._startup_error = exc
            self._ready.set()
            return
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - aiohttp exposes no public accessor
        transfer = KVTransferServer(self.engine)
        try:
            kv_port = await transfer.start(self.host, self.cfg.kv_port)
        except OSError as exc:
            await runner.cleanup()
            self._startup_error = exc
            self._ready.set()
            return
        self.sim_http_port = sockets[0].getsockname()[1] if sockets else self.opts.sim_http_port
        self.engine.start()
        self.server.started(self.sim_http_port, kv_port)  # kv_port is the one written into handles (CommState)
        self._ready.set()
        await self._stop_async.wait()
        self.server.draining = True
        await runner.cleanup()
        await transfer.stop(SHUTDOWN_GRACE_S)
        await self.engine.stop()

    def _engine_thread(self) -> None:
        try:
            asyncio.run(self._engine_main())
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            self._startup_error = self._startup_error or exc
            self._ready.set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        try:
            from pytriton.model_config import ModelConfig
            from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        except ImportError as exc:
            raise StartupError(f"cannot import pytriton ({exc}); {VENV_HINT}") from exc
        base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        if base != os.path.realpath("/usr/bin/python3.11"):
            log.warning("not Debian's python3.11: Triton's Python-backend stub links the system libpython, and a "
                        "different CPython build fails at model load ('_thread.RLock' object has no attribute "
                        "'_recursion_count')", extra={"fields": {"event": "python_mismatch", "python": base}})
        self._thread = threading.Thread(target=self._engine_thread, name="engine-loop", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._startup_error is not None or self.sim_http_port is None:
            raise OSError(f"cannot bind the simulator endpoint {self.host}:{self.opts.sim_http_port} or its KV "
                          f"transfer port {self.cfg.kv_port}: "
                          f"{self._startup_error}")
        self.http_port, self.grpc_port = pick_ports(self.host, self.cfg.port, self.opts.grpc_port)
        triton_config = TritonConfig(
            http_address=self.host, http_port=self.http_port,
            grpc_address=self.host, grpc_port=self.grpc_port,
            metrics_address=self.host, allow_metrics=self.opts.metrics_port is not None,
            metrics_port=self.opts.metrics_port, allow_gpu_metrics=False, allow_cpu_metrics=False,
            allow_sagemaker=False, allow_vertex_ai=False,
            strict_readiness=True, exit_timeout_secs=SHUTDOWN_GRACE_S, log_verbose=self.opts.log_verbose,
            http_header_forward_pattern=REQUEST_ID_PARAMETER, grpc_header_forward_pattern=REQUEST_ID_PARAMETER,
        )
        # Tensors are tiny here: base64 over PyTriton's sockets instead of its shared-memory tensor store (whose
        # manager process slows model start-up and adds a process per model).
        os.environ["PYTRITON_NO_TENSORSTORE"] = "1"
        # PyTriton's extra model instances wait one second for instance 0's handshake socket and fail to load
        # when they lose that race (likely on a busy machine); with several instances, start over a few times.
        attempts = 3 if self.opts.context_instances > 1 else 1
        for path in sweep_stale_workspaces():
            log.info("removed the Triton workspace of a simulator that is gone",
                     extra={"fields": {"event": "stale_workspace_removed", "path": path}})
        for attempt in range(1, attempts + 1):
            self._workspace = new_workspace()
            # The models go in the model store before Triton starts and load with it: readiness is never true
            # without them (PyTriton's default loads them after the server answers, ready with no models).
            self.triton = Triton(config=triton_config, workspace=f"{self._workspace}/workspace",
                                 triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=False,
                                                                               local_model_store=True))
            inputs, outputs = self._signature(self.opts.text_io)
            if CONTEXT_MODEL in self.opts.models:
                self.triton.bind(
                    model_name=CONTEXT_MODEL, infer_func=[self._context_infer] * self.opts.context_instances,
                    inputs=inputs, outputs=outputs, config=ModelConfig(batching=False),
                )
            if GENERATION_MODEL in self.opts.models:
                self.triton.bind(
                    model_name=GENERATION_MODEL, infer_func=self._generation_infer,
                    inputs=inputs, outputs=outputs, config=ModelConfig(batching=False, decoupled=True),
                )
            try:
                self.triton.run()
                return
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    self.triton.stop()
                self.triton = None
                shutil.rmtree(self._workspace, ignore_errors=True)
                log.warning("Triton did not start", extra={"fields": {
                    "event": "triton_start_failed", "attempt": attempt, "error": error[:2000]}})
        raise OSError(f"Triton did not start on {self.host}:{self.http_port}/{self.grpc_port}: {error}")

    def alive(self) -> bool:
        return (self.triton is not None and self.triton.is_alive() and self._thread is not None
                and self._thread.is_alive())

    def stop(self) -> None:
        if self.triton is not None:
            with contextlib.suppress(Exception):
                self.triton.stop()
        if self.loop is not None and self._stop_async is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop_async.set)
        if self._thread is not None:
            self._thread.join(SHUTDOWN_GRACE_S + 5)
        if self._workspace:
            shutil.rmtree(self._workspace, ignore_errors=True)

    @staticmethod
    def _signature(text_io: bool) -> tuple[list, list]:
        """The models' inputs and outputs: the tensorrt_llm model's, plus the text tensors with `text_io`."""
        import numpy as np
        from pytriton.model_config import Tensor

        inputs = [
            Tensor(name="input_ids", dtype=np.int32, shape=(1, -1), optional=True),
            Tensor(name="text_input", dtype=bytes, shape=(1, 1), optional=True),
            Tensor(name="input_lengths", dtype=np.int32, shape=(1, 1), optional=True),
            Tensor(name="request_output_len", dtype=np.int32, shape=(1, 1)),
            Tensor(name="streaming", dtype=np.bool_, shape=(1, 1), optional=True),
            Tensor(name="beam_width", dtype=np.int32, shape=(1, 1), optional=True),
            Tensor(name="context_phase_params", dtype=np.uint8, shape=(1, -1), optional=True),
            Tensor(name="return_num_input_tokens", dtype=np.bool_, shape=(1, 1), optional=True),
            Tensor(name="return_num_output_tokens", dtype=np.bool_, shape=(1, 1), optional=True),
            Tensor(name="exclude_input_in_output", dtype=np.bool_, shape=(1, 1), optional=True),
        ]
        inputs += [Tensor(name=name, dtype=bytes if datatype == "BYTES" else np.dtype(_NUMPY_NAMES[datatype]).type,
                          shape=shape, optional=True) for name, (datatype, shape) in SAMPLING_INPUTS.items()]
        outputs = [
            Tensor(name="output_ids", dtype=np.int32, shape=(1, 1, -1)),
            Tensor(name="sequence_length", dtype=np.int32, shape=(1, 1)),
            Tensor(name="num_input_tokens", dtype=np.int32, shape=(1, 1)),
            Tensor(name="num_output_tokens", dtype=np.int32, shape=(1, 1)),
            Tensor(name="text_output", dtype=bytes, shape=(1, 1)),
            Tensor(name="context_phase_params", dtype=np.uint8, shape=(1, -1)),
        ]
        if not text_io:
            inputs = [t for t in inputs if t.name not in TEXT_INPUTS]
            outputs = [t for t in outputs if t.name != "text_output"]
        return inputs, outputs

    # ------------------------------------------------------------------ inference callables (PyTriton loops)
    async def _context_infer(self, requests: list) -> list[dict]:
        """Unary: one full response per request (the context model is not decoupled)."""
        out = []
        for req in requests:
            result = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._run_unary(req), self.loop))
            out.append(result)
        return out

    async def _generation_infer(self, requests: list) -> AsyncIterator[list[dict]]:
        """Decoupled: one response per engine iteration with `streaming`, else one response."""
        if len(requests) != 1:
            raise EngineRequestError(f"the simulator serves one request per call, got {len(requests)}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = asyncio.run_coroutine_threadsafe(self._run_stream(requests[0], put), self.loop)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "data":
                    yield [payload]
                elif kind == "error":
                    raise payload
                else:
                    break
        finally:
            if not future.done():
                future.cancel()

    # ------------------------------------------------------------------ engine-loop side
    def _submit(self, req: Any) -> tuple[TritonRequest, Seq]:
        reason = self.server.not_ready_reason()
        if reason:
            raise EngineRequestError(reason, 503, "ServiceUnavailableError")
        parsed = parse_request(req, self.cfg.vocab_size)
        self.received.append({"x_request_id": parsed.x_request_id, "request_type": parsed.kind,
                              "inputs": sorted(req.data), "sampling": parsed.sampling})
        try:
            seq = self.engine.submit(
                kind=parsed.kind, prompt=Prompt.of(parsed.prompt), max_tokens=parsed.max_tokens,
                x_request_id=parsed.x_request_id, stream=parsed.streaming and parsed.kind != CTX_ONLY,
                handle=parsed.handle, first_tokens=parsed.first_tokens,
            )
        except EngineError as exc:
            self._log_failure(exc, parsed.x_request_id)
            raise EngineRequestError.from_engine(exc) from None
        return parsed, seq

    def _log_failure(self, exc: EngineError, x_rid: str) -> None:
        fields = {"event": "request_failed" if exc.is_failure else "request_refused", "request_id": x_rid,
                  "status": EngineRequestError.from_engine(exc).status, "error": exc.message, "frontend": "triton"}
        if exc.is_failure:
            log.warning("request failed", extra={"fields": fields})
        else:
            log.debug("request refused", extra={"fields": fields})

    def _response(self, parsed: TritonRequest, seq: Seq, new: list[int], *, final: bool) -> dict:
        import numpy as np

        out = response_tensors(parsed, seq.prompt.length, len(seq.tokens), new)
        if final and seq.kind == CTX_ONLY:
            handle = OpaqueState(self.cfg.advertise_host, self.server.kv_port, self.engine.instance, seq.rid,
                                 self.cfg.cache_state)
            raw = encode_context_phase_params(seq.tokens, seq.rid, encode_opaque(handle))
            out["context_phase_params"] = np.frombuffer(raw, dtype=np.uint8).reshape(1, -1).copy()
        return out

    async def _run_unary(self, req: Any) -> dict:
        seq = None
        try:
            parsed, seq = self._submit(req)
            try:
                await seq.done
            except EngineError as exc:
                self._log_failure(exc, parsed.x_request_id)
                raise EngineRequestError.from_engine(exc) from None
            return self._response(parsed, seq, list(seq.tokens), final=True)
        finally:
            if seq is not None and not seq.finished:
                self.engine.cancel(seq)

    async def _run_stream(self, req: Any, put: Callable[[tuple[str, Any]], None]) -> None:
        seq = None
        try:
            try:
                parsed, seq = self._submit(req)
            except EngineRequestError as exc:
                put(("error", exc))
                return
            if seq.changed is None:  # one response with every token
                try:
                    await seq.done
                except EngineError as exc:
                    self._log_failure(exc, parsed.x_request_id)
                    put(("error", EngineRequestError.from_engine(exc)))
                    return
                put(("data", self._response(parsed, seq, list(seq.tokens), final=True)))
                put(("end", None))
                return
            changed = seq.changed
            sent = 0
            while True:
                produced = len(seq.tokens)
                if sent < produced:
                    new = seq.tokens[sent:produced]
                    sent = produced
                    put(("data", self._response(parsed, seq, new, final=seq.finished and seq.error is None)))
                    continue
                if seq.finished:
                    break
                changed.clear()
                await changed.wait()
            if seq.error is not None:
                self._log_failure(seq.error, parsed.x_request_id)
                put(("error", EngineRequestError.from_engine(seq.error)))
            else:
                put(("end", None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still end the client's stream
            log.exception("triton stream failed", extra={"fields": {"event": "stream_failed"}})
            put(("error", EngineRequestError(f"{type(exc).__name__}: {exc}", 500, "InternalServerError")))
        finally:
            if seq is not None and not seq.finished:
                self.engine.cancel(seq)


# ---------------------------------------------------------------------------------------------- entry point
WORKSPACE_PREFIX = "baton-triton-"
WORKSPACE_OWNER = "owner"  # "<pid> <start time>" of the simulator that made the workspace


def new_workspace() -> str:
    """A fresh directory for PyTriton's workspace (its model store, sockets, a copy of tritonserver: ~20 MB),
    marked with this process: `stop()` removes it, and should the process be killed (SIGKILL skips every
    cleanup) the next simulator to start on the machine does (`sweep_stale_workspaces`)."""
    path = tempfile.mkdtemp(prefix=WORKSPACE_PREFIX)
    pid = os.getpid()
    started = proc_start_time(pid)
    if started is not None:  # without /proc nothing could tell it from a dead one's: left unmarked, never swept
        with open(os.path.join(path, WORKSPACE_OWNER), "w") as handle:
            handle.write(f"{pid} {started}\n")
    return path


def sweep_stale_workspaces(root: str | None = None) -> list[str]:
    """Remove the workspaces under `root` (the temp dir) of simulators no longer running, as their owner
    file says (a reused pid has another start time); a directory without one is left alone. The paths
    removed."""
    removed = []
    try:
        entries = list(os.scandir(root or tempfile.gettempdir()))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(WORKSPACE_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            with open(os.path.join(entry.path, WORKSPACE_OWNER)) as handle:
                pid, started = handle.read().split()
            owner_alive = proc_start_time(int(pid)) == started
        except (OSError, ValueError):
            continue  # being made right now, or not made by this code
        if not owner_alive:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def main(argv: list[str]) -> int:
    """`baton engine-sim --sim-frontend triton ...` (the flag itself already removed by engine_sim.main)."""
    if "-h" in argv or "--help" in argv:
        config_mod.build_parser().print_help()
        print("\nTriton front end options:\n" + options_help())
        return 0
    try:
        opts, rest = split_options(argv)
        cfg = config_mod.load_config(rest)
    except SystemExit as exc:
        return int(exc.code or 0)
    except StartupError as exc:
        logs.setup("INFO")
        log.error("startup failed", extra={"fields": {"event": "startup_failed", "error": str(exc)}})
        print(f"baton engine-sim: startup failed: {exc}", file=sys.stderr, flush=True)
        return 1
    logs.setup(cfg.log_level)
    tokens.set_tokenizer(cfg.tokenizer)
    for name, level in (("pytriton", "WARNING"), ("pytriton.proxy.inference", "ERROR")):
        logging.getLogger(name).handlers[:] = logging.getLogger("baton.engine_sim").handlers
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).propagate = False

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    frontend = TritonFrontend(cfg, opts)
    try:
        try:
            frontend.start()
        except StartupError as exc:
            print(f"baton engine-sim: startup failed: {exc}", file=sys.stderr, flush=True)
            return 1
        except OSError as exc:
            print(f"baton engine-sim: {exc}", file=sys.stderr, flush=True)
            return 1
        host = frontend.host
        log.info("engine simulator listening (triton)", extra={"fields": {
            "event": "listening", "frontend": "triton", "url": f"http://{host}:{frontend.http_port}",
            "grpc": f"{host}:{frontend.grpc_port}", "sim_http": f"http://{host}:{frontend.sim_http_port}",
            "kv_transfer": f"{host}:{frontend.server.kv_port}",
            "models": list(frontend.opts.models), **config_mod.describe(cfg)}})
        print(f"baton engine-sim (triton) listening on http://{host}:{frontend.http_port} "
              f"grpc={host}:{frontend.grpc_port} sim-http=http://{host}:{frontend.sim_http_port}", flush=True)
        while not stop.wait(0.5):
            if not frontend.alive():
                print("baton engine-sim: Triton exited unexpectedly", file=sys.stderr, flush=True)
                return 1
        log.info("shutting down", extra={"fields": {"event": "shutdown"}})
        return 0
    finally:
        started = time.monotonic()
        frontend.stop()
        log.debug("stopped", extra={"fields": {"event": "stopped", "seconds": round(time.monotonic() - started, 2)}})
        for sig, handler in previous.items():
            signal.signal(sig, handler)
