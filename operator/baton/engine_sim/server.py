"""The HTTP surface of the engine simulator: trtllm-serve's worker endpoints, plus /_sim/* internals.

Public (as trtllm-serve): GET /health, /health_generate, /version, /v1/models, /metrics, /perf_metrics;
POST /v1/completions, /v1/chat/completions, /kv_cache_events.
Internal: GET /_sim/state (cumulative counters, not drained), POST /_sim/fatal (fault injection).
The KV transfer between workers has its own listener (transfer_server.py), as in TensorRT-LLM.

Errors use TensorRT-LLM's shape: {"object": "error", "message": ..., "type": ..., "param": null, "code": status}.
This module only translates HTTP (`baton.http1`) to `Engine.submit()` and back; the behaviour lives in
engine.py. `routes()` lists the handlers; main.py serves them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from baton import tokens
from baton.engine_sim import config as config_mod
from baton.engine_sim.config import SimConfig
from baton.engine_sim.engine import (
    CTX_AND_GEN,
    CTX_ONLY,
    ENGINE_GONE,
    GEN_ONLY,
    REQUEST_TYPES,
    Engine,
    EngineError,
    Prompt,
    Seq,
    token_text,
)
from baton.engine_sim.handoff import OpaqueState, decode_opaque, encode_opaque
from baton.engine_sim.request_fields import check_request_fields
from baton.http1.server import (
    AnyResponse,
    Handler,
    PushResponse,
    Request,
    Response,
    text_response,
)
from baton.idlists import RawJSON, all_below, cut_id_list
from baton.openai_stream import wants_usage

log = logging.getLogger("baton.engine_sim.server")

MAX_BODY_BYTES = 256 * 1024 * 1024  # the largest request body (long prompts travel as JSON token ids)
_STREAM_HEADERS = {"Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"

_dumps = json.dumps
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # as Starlette's JSONResponse renders
_loads = json.loads
_TOKEN_TEXT_JSON: dict[str, bytes] = {}  # one token's text as JSON (a few hundred words: bounded)
_PROMPT_KEY = b'"prompt"'
_PROMPT_IDS_KEY = b'"prompt_token_ids"'
_IDS_MARK = "\u0000prompt-ids\u0000"  # stands for a context answer's prompt_token_ids until spliced in
_IDS_MARK_JSON = _compact(_IDS_MARK).encode()


def error_body(message: str, status: int, err_type: str) -> dict:
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status}


def error_response(message: str, status: int = 400, err_type: str = "BadRequestError") -> Response:
    return Response(status, _dumps(error_body(message, status, err_type)).encode())


def _json(data: object, status: int = 200) -> Response:
    return Response(status, _compact(data).encode())


@dataclass(slots=True)
class Parsed:
    kind: str
    prompt: Prompt
    max_tokens: int
    stream: bool
    include_usage: bool
    handle: OpaqueState | None = None
    first_tokens: list[int] | None = None


class SimServer:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.port = cfg.port
        self.kv_port = 0  # the KV transfer listener's, written into handles (CommState)
        self.ready_at: float | None = None  # loop time when /health turns 200
        self.draining = False
        self._completion_requests = 0  # for --sim-error-ratio

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) of every endpoint, for a `baton.http1.server.HttpServer`."""
        return [
            ("GET", "/health", self.health),
            ("GET", "/health_generate", self.health_generate),
            ("GET", "/version", self.version),
            ("GET", "/v1/models", self.models),
            ("GET", "/metrics", self.metrics),
            ("GET", "/perf_metrics", self.perf_metrics),
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/kv_cache_events", self.kv_cache_events),
            ("GET", "/_sim/state", self.sim_state),
            ("POST", "/_sim/fatal", self.sim_fatal),
        ]

    # ------------------------------------------------------------------ readiness
    def started(self, port: int, kv_port: int) -> None:
        self.port = port
        self.kv_port = kv_port
        self.ready_at = asyncio.get_running_loop().time() + self.cfg.load_seconds

    def not_ready_reason(self) -> str | None:
        if self.engine.fatal is not None:
            return f"engine is in a fatal state: {self.engine.fatal}"
        if self.draining:
            return "server is shutting down"
        if self.ready_at is None or asyncio.get_running_loop().time() < self.ready_at:
            return "model is loading"
        return None

    async def health(self, request: Request) -> Response:
        reason = self.not_ready_reason()
        if reason:
            return text_response(reason, 503)
        return text_response("", 200)

    async def health_generate(self, request: Request) -> Response:
        reason = self.not_ready_reason()
        if reason and self.engine.fatal is None:  # loading or draining; a fatal engine fails the generation
            return text_response(reason, 503)
        try:
            seq = self.engine.submit(kind=CTX_AND_GEN, prompt=Prompt.of([1]), max_tokens=1,
                                      x_request_id="health_generate")
            await seq.done
        except EngineError as exc:
            # trtllm-serve runs a one-token chat request and answers any failure of it 500 with this text
            log.warning("health_generate failed", extra={"fields": {"event": "health_generate_failed", "error": exc.message}})
            return text_response("Generation health check failed", 500)
        return text_response("Generation health check OK", 200)

    async def version(self, request: Request) -> Response:
        return _json({"version": self.cfg.trtllm_version})

    async def models(self, request: Request) -> Response:
        return _json({
            "object": "list",
            "data": [{"id": self.cfg.model_name, "object": "model", "created": int(time.time()),
                      "owned_by": "tensorrt_llm"}],
        })

    async def metrics(self, request: Request) -> Response:
        return _json(self.engine.drain_iteration_stats())  # as trtllm-serve: [] when nothing ran since

    async def perf_metrics(self, request: Request) -> Response:
        return _json(self.engine.drain_perf())

    async def kv_cache_events(self, request: Request) -> Response:
        return _json([])  # block reuse is not simulated: no stored/removed events

    async def sim_state(self, request: Request) -> Response:
        return _json(self.state())

    def state(self) -> dict:
        """What GET /_sim/state answers."""
        snap = self.engine.snapshot()
        return {
            **config_mod.describe(self.cfg),
            "instance": self.engine.instance,
            "port": self.port,
            "kv_port": self.kv_port,
            "ready": self.not_ready_reason() is None,
            "counters": snap["sim"],
            "kvCacheStats": snap["kvCacheStats"],
            "numActiveRequests": snap["numActiveRequests"],
            "numQueuedRequests": snap["numQueuedRequests"],
        }

    async def sim_fatal(self, request: Request) -> Response:
        try:
            body = _loads(request.body)
        except ValueError:
            body = {}
        reason = str((body or {}).get("reason") or "injected fault (POST /_sim/fatal)")
        self.engine.set_fatal(reason)
        return _json({"fatal": self.engine.fatal})

    # ------------------------------------------------------------------ OpenAI endpoints
    async def completions(self, request: Request) -> AnyResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> AnyResponse:
        return await self._generate(request, chat=True)

    def _token_list(self, value: object, what: str) -> list[int]:
        # Checked at C speed first (prompts hold thousands of ids; a per-id Python loop was a third of the
        # simulator's CPU time per request); the slow checks only run to reject, or for int subclasses.
        exact = isinstance(value, list) and (not value or set(map(type, value)) == {int})
        if not exact and not tokens.is_token_ids(value):
            raise EngineError(f"{what} must be a list of integer token ids")
        vocab = self.cfg.vocab_size
        if value and (min(value) < 0 or max(value) >= vocab):  # type: ignore[type-var, arg-type]
            for t in value:  # type: ignore[union-attr]
                if t < 0 or t >= vocab:
                    raise EngineError(f"{what} contains token id {t} outside the vocabulary [0, {vocab})")
        return list(value)  # type: ignore[arg-type]

    def _prompt(self, value: object, ids_json: RawJSON | None, count: int, what: str) -> Prompt:
        """The prompt of token ids `value`, or of `ids_json` when the body's reading cut it out as text
        (`value` is then its [] placeholder): checked against the vocabulary without being decoded, and
        decoded only to name an id outside it."""
        if ids_json is None:
            return Prompt.of(self._token_list(value, what))
        compact = ids_json[1:-1]  # cut_id_list hands a checked list back compact
        if not all_below(compact, self.cfg.vocab_size):
            self._token_list(json.loads(ids_json), what)  # raises, naming the id
        return Prompt(compact, count)

    async def _parse(self, body: dict, chat: bool, ids_json: RawJSON | None = None, count: int = 0) -> Parsed:
        """`body` decoded, but for the prompt's ids when they were cut out of it as text (`ids_json`, `count`
        of them). Text is tokenized as trtllm-serve does (`baton.tokens`: the model's tokenizer when MODEL_DIR
        has one, a long text off the event loop; else the documented estimate)."""
        check_request_fields(body, chat)
        dp = body.get("disaggregated_params")
        if dp is None:
            dp = {}
        elif not isinstance(dp, dict):
            raise EngineError("disaggregated_params must be an object")
        kind = dp.get("request_type") or CTX_AND_GEN
        if kind not in REQUEST_TYPES:
            raise EngineError(f"disaggregated_params.request_type must be one of {', '.join(REQUEST_TYPES)}, got {kind!r}")

        if chat:
            if body.get("prompt_token_ids") is not None:
                prompt = self._prompt(body["prompt_token_ids"], ids_json, count, "prompt_token_ids")
            else:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                    raise EngineError("messages must be a non-empty list of message objects")
                try:
                    prompt = Prompt.of(await tokens.tokenize_async("", messages, body))
                except ValueError as exc:  # the chat template refused the messages (or the request's fields for it)
                    raise EngineError(str(exc)) from None
            max_tokens = body.get("max_completion_tokens")
            if max_tokens is None:
                max_tokens = body.get("max_tokens")
        else:
            raw = body.get("prompt")
            if ids_json is None and isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
                raw = raw[0]
            if isinstance(raw, str):
                prompt = Prompt.of(await tokens.tokenize_async(raw))
            elif isinstance(raw, list):
                prompt = self._prompt(raw, ids_json, count, "prompt")
            else:
                raise EngineError("prompt must be a string or a list of token ids (one prompt per request)")
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.cfg.default_max_tokens  # None: the engine deduces it (`Engine.submit`)
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise EngineError(f"max_tokens must be an integer, got {max_tokens!r}")
        n = body.get("n")
        if n not in (None, 1):
            raise EngineError("only n=1 is supported")
        # TensorRT-LLM's beam width is best_of (else n) with use_beam_search: with n = 1 and no best_of that
        # is one beam, which disaggregated serving supports; more is refused, as best_of > 1 sampling is.
        best_of = body.get("best_of")
        if isinstance(best_of, int) and best_of > 1:
            raise EngineError("Currently, only beam width 1 is supported.")
        # No log probabilities are computed, so a request for them is refused rather than answered with
        # `"logprobs": null`. Neutral values are those trtllm-serve also answers without logprobs (it asks for
        # them with `bool(request.logprobs)`): completions `logprobs` null or 0 (OpenAI's 0 would return the
        # sampled token's logprob; trtllm-serve returns none), chat `logprobs` null/false, `top_logprobs` null/0.
        if chat:
            if body.get("logprobs") not in (None, False):
                raise EngineError("only logprobs=false is supported: the simulator computes no log probabilities")
            if body.get("top_logprobs") not in (None, 0):
                raise EngineError("only top_logprobs=0 is supported: the simulator computes no log probabilities")
        elif body.get("logprobs") not in (None, 0):
            raise EngineError("only logprobs=null (or 0) is supported: the simulator computes no log probabilities")
        stream_options = body.get("stream_options")
        parsed = Parsed(
            kind=kind,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=bool(body.get("stream")),
            include_usage=wants_usage(stream_options),
        )
        if kind == GEN_ONLY:
            parsed.first_tokens = self._token_list(dp.get("first_gen_tokens"), "disaggregated_params.first_gen_tokens")
            if not parsed.first_tokens:
                raise EngineError("disaggregated_params.first_gen_tokens must not be empty")
            ctx_id = dp.get("ctx_request_id")
            if isinstance(ctx_id, bool) or not isinstance(ctx_id, int):
                raise EngineError("disaggregated_params.ctx_request_id must be an integer")
            try:
                parsed.handle = decode_opaque(dp.get("encoded_opaque_state"))
            except ValueError as exc:
                raise EngineError(f"disaggregated_params.{exc}") from exc
            if parsed.handle.ctx_request_id != ctx_id:
                raise EngineError(
                    f"disaggregated_params.ctx_request_id {ctx_id} does not match the encoded_opaque_state "
                    f"({parsed.handle.ctx_request_id})"
                )
        return parsed

    def _maybe_inject_error(self) -> None:
        """--sim-error-ratio R fails request n when floor(n*R) steps up: exactly R of them, evenly spread."""
        ratio = self.cfg.error_ratio
        if ratio <= 0:
            return
        n = self._completion_requests = self._completion_requests + 1
        if math.floor(n * ratio) > math.floor((n - 1) * ratio):
            raise EngineError(f"injected fault: request {n} failed (--sim-error-ratio {ratio:g})", 500, "InternalServerError")

    def _error(self, exc: EngineError, x_rid: str) -> Response:
        _log_failure(exc, x_rid)
        return error_response(exc.message, exc.status, exc.err_type)

    async def _generate(self, request: Request, chat: bool) -> AnyResponse:
        x_rid = request.headers.get("x-request-id", "")
        if self.engine.fatal is not None:
            # as trtllm-serve once its executor is gone: generate_async raises "LLM is shutting down", which
            # openai_completion answers like any exception of a generation, 400 BadRequestError
            return self._error(EngineError(ENGINE_GONE, 400, "BadRequestError"), x_rid)
        reason = self.not_ready_reason()
        if reason:
            return error_response(reason, 503, "ServiceUnavailableError")
        stream: _TokenStream | None = None
        try:
            try:
                # the prompt's ids are cut out of the body as text, not decoded (`baton.idlists`)
                if chat:
                    body, ids_json, count = cut_id_list(request.body, _PROMPT_IDS_KEY, "prompt_token_ids")
                else:
                    body, ids_json, count = cut_id_list(request.body, _PROMPT_KEY, "prompt")
            except ValueError:
                raise EngineError("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise EngineError("request body must be a JSON object")
            parsed = await self._parse(body, chat, ids_json, count)
            self._maybe_inject_error()
            stream = _TokenStream(self, chat, parsed.include_usage) if parsed.stream and parsed.kind != CTX_ONLY \
                else None
            seq = self.engine.submit(
                kind=parsed.kind,
                prompt=parsed.prompt,
                max_tokens=parsed.max_tokens,
                x_request_id=x_rid,
                handle=parsed.handle,
                first_tokens=parsed.first_tokens,
                on_change=stream.changed if stream is not None else None,
            )
        except EngineError as exc:
            if stream is not None and exc.in_generation:
                # failed where TensorRT-LLM fails it after accepting the request (a handoff refused in the
                # cache transceiver): trtllm-serve had returned its StreamingResponse already
                _log_failure(exc, x_rid)
                return PushResponse(_BrokenStream(), headers=_STREAM_HEADERS)
            return self._error(exc, x_rid)
        if stream is not None:
            # As trtllm-serve returns its StreamingResponse once the request is accepted: the status line and
            # the SSE headers go out now, before the first token; a failure from here on (a failed handoff
            # included) breaks the stream off (`_TokenStream`). The stream owns `seq` (it cancels it if the
            # client goes away).
            stream.seq = seq
            return PushResponse(stream, headers=_STREAM_HEADERS)
        try:
            try:
                await seq.done
            except EngineError as exc:
                return self._error(exc, x_rid)
        finally:
            if not seq.finished:
                self.engine.cancel(seq)
        _log_done(seq, x_rid)
        data = _compact(self._full_response(seq, chat)).encode()
        if seq.kind == CTX_ONLY:
            data = data.replace(_IDS_MARK_JSON, seq.prompt.ids_json, 1)
        return Response(200, data)

    def _finish_reason(self, seq: Seq) -> str:
        # No EOS here: every answer ends at max_tokens, a context-only one at its forced single token, even
        # when the client asked for one token (TensorRT-LLM reports "length", so a router still sends the
        # request on to a generation worker, which returns that first token).
        return "length"

    def _disagg_out(self, seq: Seq) -> dict | None:
        if seq.kind != CTX_ONLY:
            return None
        handle = OpaqueState(self.cfg.advertise_host, self.kv_port, self.engine.instance, seq.rid, self.cfg.cache_state)
        return {
            "request_type": CTX_ONLY,
            "first_gen_tokens": list(seq.tokens),
            "ctx_request_id": seq.rid,
            "encoded_opaque_state": encode_opaque(handle),
            "draft_tokens": None,
        }

    def _usage(self, seq: Seq) -> dict:
        return {"prompt_tokens": seq.prompt.length, "completion_tokens": len(seq.tokens),
                "total_tokens": seq.prompt.length + len(seq.tokens)}

    def _full_response(self, seq: Seq, chat: bool) -> dict:
        text = "".join(token_text(t) for t in seq.tokens)
        created = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self._finish_reason(seq), "token_ids": list(seq.tokens),
                      "disaggregated_params": self._disagg_out(seq)}
            out = {"id": f"chatcmpl-{seq.rid}", "object": "chat.completion", "created": created,
                   "model": self.cfg.model_name, "choices": [choice], "usage": self._usage(seq)}
        else:
            choice = {"index": 0, "text": text, "token_ids": list(seq.tokens), "logprobs": None,
                      "finish_reason": self._finish_reason(seq), "stop_reason": None,
                      "disaggregated_params": self._disagg_out(seq)}
            out = {"id": f"cmpl-{seq.rid}", "object": "text_completion", "created": created,
                   "model": self.cfg.model_name, "choices": [choice], "usage": self._usage(seq)}
        if seq.kind == CTX_ONLY:
            out["prompt_token_ids"] = _IDS_MARK  # spliced in as text by the caller
        return out


def _log_done(seq: Seq, x_rid: str | None) -> None:
    """One line per finished request, with the id the scheduler sent (X-Request-Id): a request can be
    followed from the scheduler's log through the context worker's and the generation worker's."""
    if log.isEnabledFor(logging.INFO):
        log.info("request done", extra={"fields": {
            "event": "request_done", "request_id": x_rid or seq.rid, "request_type": seq.kind,
            "prompt_tokens": seq.prompt.length, "completion_tokens": len(seq.tokens)}})


def _log_failure(exc: EngineError, x_rid: str) -> None:
    if exc.is_failure:
        log.warning("request failed", extra={"fields": {
            "event": "request_failed", "request_id": x_rid, "status": exc.status, "error": exc.message}})
    else:
        log.debug("request refused", extra={"fields": {
            "event": "request_refused", "request_id": x_rid, "status": exc.status, "error": exc.message}})


class _BrokenStream:
    """The streamed answer of a request whose generation failed as it was submitted: the status line and the
    SSE headers, then the connection closes without the last chunk (what trtllm-serve's client sees when the
    stream's generator raises before its first token)."""

    def start(self, sink: Any) -> None:
        sink.cut(b"")

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _TokenStream:
    """The SSE answer of a streamed request, as trtllm-serve frames it, pushed to the client by the engine
    loop (a `baton.http1` push producer).

    The response starts (status line and headers) as soon as the request is accepted, before its first
    token, as trtllm-serve's StreamingResponse does. The engine calls `changed` after each change of the
    sequence (new tokens, its end, a failure); what happened before the response starts goes out then. From
    `start` on, the tokens produced since the last write go out as one write right away: one write per engine
    iteration, as a server loop draining the executor's responses does, without a task woken per stream and
    per token. A chat stream's role chunk goes out with the first token (trtllm-serve's postprocessor makes
    it from the first output). While the client's connection is full (`pause`) tokens wait in the sequence
    and go out together on `resume`. A failure -- before the first token (a failed handoff) or after some --
    is logged and breaks the stream off (`sink.cut`: no error event, no `[DONE]`, no last chunk), as uvicorn
    closes the connection when trtllm-serve's stream generator re-raises. `abort` (the client went away)
    cancels the sequence."""

    __slots__ = ("chat", "closed", "closing", "head", "include_usage", "middle", "opening", "paused",
                 "pending", "role", "sent", "seq", "sim", "sink", "unfinished")

    _FINISH = b', "logprobs": null, "finish_reason": '

    def __init__(self, sim: SimServer, chat: bool, include_usage: bool) -> None:
        self.sim = sim
        self.seq: Seq = None  # type: ignore[assignment]  # set right after submit, before the engine runs it
        self.chat = chat
        self.include_usage = include_usage
        self.sink: Any = None
        self.sent = 0
        self.paused = False
        self.closed = False
        self.head = self.opening = self.middle = self.closing = self.unfinished = self.role = b""
        self.pending: list[bytes] = []

    def changed(self) -> None:
        if self.sink is not None and not self.paused:  # before `start`, `start` writes what there is
            self._flush()

    # ------------------------------------------------------------------ producer interface
    def start(self, sink: Any) -> None:
        self.sink = sink
        seq = self.seq
        # Each event is the json.dumps of a dict; the constant parts are serialized once per stream.
        cid = f"{'chatcmpl' if self.chat else 'cmpl'}-{seq.rid}"
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        self.head = b"data: " + _dumps({"id": cid, "object": obj, "created": int(time.time()),
                                        "model": self.sim.cfg.model_name})[:-1].encode() + b', "choices": '
        if self.chat:
            self.opening = self.head + b'[{"index": 0, "delta": {"content": '
            self.middle = b'}, "token_ids": '
            self.closing = b"}]}\n\n"
            # as trtllm-serve's first chat chunk (DeltaMessage(role=...), dumped with exclude_none)
            self.role = self.head + b'[{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
        else:
            self.opening = self.head + b'[{"index": 0, "text": '
            self.middle = b', "token_ids": '
            self.closing = b', "stop_reason": null}]}\n\n'
        self.unfinished = self._FINISH + b"null" + self.closing
        self._flush()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._flush()

    def abort(self) -> None:
        self.closed = True
        if not self.seq.finished:
            self.sim.engine.cancel(self.seq)

    # ------------------------------------------------------------------ writing
    def _flush(self) -> None:
        if self.closed:
            return
        try:
            self._write()
        except Exception:  # called from the engine loop: a bug here must only end this stream
            log.exception("stream failed", extra={"fields": {"event": "stream_failed",
                                                             "request_id": self.seq.x_request_id}})
            self.closed = True
            self.sink.cut(b"")
            if not self.seq.finished:
                self.sim.engine.cancel(self.seq)

    def _write(self) -> None:
        seq = self.seq
        tokens_ = seq.tokens
        produced = len(tokens_)
        out = self.pending
        if self.sent < produced:
            if self.role:  # the chat role chunk, with the first token
                out.append(self.role)
                self.role = b""
            if produced - self.sent == 1:
                token = tokens_[self.sent]
                text = token_text(token)
                text_json = _TOKEN_TEXT_JSON.get(text)
                if text_json is None:
                    text_json = _TOKEN_TEXT_JSON[text] = _dumps(text).encode()
                ids = b"[%d]" % token
            else:
                new = tokens_[self.sent: produced]
                text_json = _dumps("".join([token_text(t) for t in new])).encode()
                ids = _dumps(new).encode()
            self.sent = produced
            if seq.finished and seq.error is None:
                end = self._FINISH + _dumps(self.sim._finish_reason(seq)).encode() + self.closing
            else:
                end = self.unfinished
            out.append(b"".join((self.opening, text_json, self.middle, ids, end)))
        if seq.finished:
            if seq.error is not None:
                # trtllm-serve's stream generator logs and re-raises; uvicorn closes the connection: what was
                # produced goes out, then the body ends without its last chunk (no error event, no [DONE])
                _log_failure(seq.error, seq.x_request_id)
                self.closed = True
                self.pending = []
                self.sink.cut(b"".join(out))
                return
            if self.include_usage:
                out.append(self.head + b'[], "usage": ' + _dumps(self.sim._usage(seq)).encode()
                           + b"}\n\n")
            out.append(_DONE)
            _log_done(seq, seq.x_request_id)
            self.closed = True
            self.pending = []
            self.sink.end(b"".join(out))
        elif out:
            self.pending = []
            self.sink.write(out[0] if len(out) == 1 else b"".join(out))
