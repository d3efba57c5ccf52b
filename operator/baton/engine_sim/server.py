"""The HTTP surface of the engine simulator: trtllm-serve's worker endpoints, plus /_sim/* internals.

Public (as trtllm-serve): GET /health, /health_generate, /version, /v1/models, /metrics, /perf_metrics;
POST /v1/completions, /v1/chat/completions, /kv_cache_events.
Internal: POST /_sim/kv/pull (the KV transfer between workers), GET /_sim/state (cumulative counters,
not drained), POST /_sim/fatal (fault injection).

Errors use TensorRT-LLM's shape: {"object": "error", "message": ..., "type": ..., "param": null, "code": status}.
This module only translates HTTP to `Engine.submit()` and back; the behaviour lives in engine.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass

from aiohttp import web

from baton import kvformat, tokens
from baton.engine_sim import config as config_mod
from baton.engine_sim.config import SimConfig
from baton.engine_sim.engine import (
    CTX_AND_GEN,
    CTX_ONLY,
    GEN_ONLY,
    REQUEST_TYPES,
    Engine,
    EngineError,
    Seq,
    token_text,
)
from baton.engine_sim.handoff import OpaqueState, decode_opaque, encode_opaque

log = logging.getLogger("baton.engine_sim.server")

_dumps = json.dumps


def error_body(message: str, status: int, err_type: str) -> dict:
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status}


def error_response(message: str, status: int = 400, err_type: str = "BadRequestError") -> web.Response:
    return web.Response(
        body=_dumps(error_body(message, status, err_type)).encode(), status=status, content_type="application/json"
    )


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(data).encode(), status=status, content_type="application/json")


@dataclass
class Parsed:
    kind: str
    prompt: list[int]
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
        self.ready_at: float | None = None  # loop time when /health turns 200
        self.draining = False
        self._completion_requests = 0  # for --sim-error-ratio
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health_generate)
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/perf_metrics", self.perf_metrics)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/kv_cache_events", self.kv_cache_events)
        app.router.add_post("/_sim/kv/pull", self.kv_pull)
        app.router.add_get("/_sim/state", self.sim_state)
        app.router.add_post("/_sim/fatal", self.sim_fatal)
        self.app = app

    # ------------------------------------------------------------------ readiness
    def started(self, port: int) -> None:
        self.port = port
        self.ready_at = asyncio.get_running_loop().time() + self.cfg.load_seconds

    def not_ready_reason(self) -> str | None:
        if self.engine.fatal is not None:
            return f"engine is in a fatal state: {self.engine.fatal}"
        if self.draining:
            return "server is shutting down"
        if self.ready_at is None or asyncio.get_running_loop().time() < self.ready_at:
            return "model is loading"
        return None

    async def health(self, request: web.Request) -> web.Response:
        reason = self.not_ready_reason()
        if reason:
            return web.Response(status=503, text=reason)
        return web.Response(status=200, text="")

    async def health_generate(self, request: web.Request) -> web.Response:
        reason = self.not_ready_reason()
        if reason:
            return web.Response(status=503, text=reason)
        try:
            seq = self.engine.submit(kind=CTX_AND_GEN, prompt=[1], max_tokens=1, x_request_id="health_generate")
            await seq.done
        except EngineError as exc:
            return web.Response(status=503, text=exc.message)
        return web.Response(status=200, text="")

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": self.cfg.trtllm_version})

    async def models(self, request: web.Request) -> web.Response:
        return _json({
            "object": "list",
            "data": [{"id": self.cfg.model_name, "object": "model", "created": int(time.time()),
                      "owned_by": "tensorrt_llm"}],
        })

    async def metrics(self, request: web.Request) -> web.Response:
        return _json(self.engine.drain_iteration_stats() + [self.engine.snapshot()])

    async def perf_metrics(self, request: web.Request) -> web.Response:
        return _json(self.engine.drain_perf())

    async def kv_cache_events(self, request: web.Request) -> web.Response:
        return _json([])  # block reuse is not simulated: no stored/removed events

    async def sim_state(self, request: web.Request) -> web.Response:
        snap = self.engine.snapshot()
        return _json({
            **config_mod.describe(self.cfg),
            "instance": self.engine.instance,
            "port": self.port,
            "ready": self.not_ready_reason() is None,
            "counters": snap["sim"],
            "kvCacheStats": snap["kvCacheStats"],
            "numActiveRequests": snap["numActiveRequests"],
            "numQueuedRequests": snap["numQueuedRequests"],
        })

    async def sim_fatal(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        reason = str((body or {}).get("reason") or "injected fault (POST /_sim/fatal)")
        self.engine.set_fatal(reason)
        return _json({"fatal": self.engine.fatal})

    # ------------------------------------------------------------------ KV transfer (ctx side)
    async def kv_pull(self, request: web.Request) -> web.Response:
        x_rid = request.headers.get("X-Request-Id", "")
        try:
            body = await request.json()
            ctx_request_id = int(body["ctx_request_id"])
            instance = str(body["instance"])
            peer = kvformat.from_wire(body["cache_state"])
            link = body.get("link_bytes_per_s")
            link = float(link) if link else None
        except (ValueError, KeyError, TypeError) as exc:
            return error_response(f"invalid KV pull request: {exc}")
        try:
            result = await self.engine.serve_pull(ctx_request_id, instance, peer, link, x_rid)
        except EngineError as exc:
            return error_response(exc.message, exc.status, exc.err_type)
        return _json(result)

    # ------------------------------------------------------------------ OpenAI endpoints
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
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

    def _parse(self, body: dict, chat: bool) -> Parsed:
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
                prompt = self._token_list(body["prompt_token_ids"], "prompt_token_ids")
            else:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                    raise EngineError("messages must be a non-empty list of message objects")
                prompt = tokens.tokenize(tokens.chat_prompt_text(messages))
            max_tokens = body.get("max_completion_tokens")
            if max_tokens is None:
                max_tokens = body.get("max_tokens")
        else:
            raw = body.get("prompt")
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
                raw = raw[0]
            if isinstance(raw, str):
                prompt = tokens.tokenize(raw)
            elif isinstance(raw, list):
                prompt = self._token_list(raw, "prompt")
            else:
                raise EngineError("prompt must be a string or a list of token ids (one prompt per request)")
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.cfg.default_max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise EngineError(f"max_tokens must be an integer, got {max_tokens!r}")
        n = body.get("n")
        if n not in (None, 1):
            raise EngineError("only n=1 is supported")
        best_of = body.get("best_of")
        if body.get("use_beam_search") or (isinstance(best_of, int) and best_of > 1):
            raise EngineError("Currently, only beam width 1 is supported.")
        stream_options = body.get("stream_options") or {}
        parsed = Parsed(
            kind=kind,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=bool(body.get("stream")),
            include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
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

    def _error(self, exc: EngineError, x_rid: str) -> web.Response:
        if exc.status >= 500:
            log.warning("request failed", extra={"fields": {
                "event": "request_failed", "request_id": x_rid, "status": exc.status, "error": exc.message}})
        else:
            log.debug("request refused", extra={"fields": {
                "event": "request_refused", "request_id": x_rid, "status": exc.status, "error": exc.message}})
        return error_response(exc.message, exc.status, exc.err_type)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        x_rid = request.headers.get("X-Request-Id", "")
        reason = self.not_ready_reason()
        if reason:
            return error_response(reason, 503, "ServiceUnavailableError")
        try:
            try:
                body = await request.json()
            except ValueError:
                raise EngineError("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise EngineError("request body must be a JSON object")
            parsed = self._parse(body, chat)
            self._maybe_inject_error()
            seq = self.engine.submit(
                kind=parsed.kind,
                prompt=parsed.prompt,
                max_tokens=parsed.max_tokens,
                x_request_id=x_rid,
                stream=parsed.stream and parsed.kind != CTX_ONLY,
                handle=parsed.handle,
                first_tokens=parsed.first_tokens,
            )
        except EngineError as exc:
            return self._error(exc, x_rid)
        try:
            if seq.changed is not None:
                return await self._stream(request, seq, parsed, chat)
            try:
                await seq.done
            except EngineError as exc:
                return self._error(exc, x_rid)
            log.debug("request done", extra={"fields": {
                "event": "request_done", "request_id": x_rid or seq.rid, "request_type": seq.kind,
                "prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.tokens)}})
            return _json(self._full_response(seq, chat))
        finally:
            if not seq.finished:
                self.engine.cancel(seq)

    def _finish_reason(self, seq: Seq) -> str:
        if seq.kind == CTX_ONLY:
            return "stop" if seq.original_max_tokens == 1 else "length"
        return "length"

    def _disagg_out(self, seq: Seq) -> dict | None:
        if seq.kind != CTX_ONLY:
            return None
        handle = OpaqueState(self.cfg.advertise_host, self.port, self.engine.instance, seq.rid, self.cfg.cache_state)
        return {
            "request_type": CTX_ONLY,
            "first_gen_tokens": list(seq.tokens),
            "ctx_request_id": seq.rid,
            "encoded_opaque_state": encode_opaque(handle),
            "draft_tokens": None,
        }

    def _usage(self, seq: Seq) -> dict:
        return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.tokens),
                "total_tokens": len(seq.prompt) + len(seq.tokens)}

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
            out["prompt_token_ids"] = list(seq.prompt)
        return out

    async def _stream(self, request: web.Request, seq: Seq, parsed: Parsed, chat: bool) -> web.StreamResponse:
        changed = seq.changed
        assert changed is not None
        # Hold the status line until the first token (or the failure): a failed handoff is still an HTTP error.
        while not seq.tokens and not seq.finished:
            changed.clear()
            await changed.wait()
        if seq.error is not None and not seq.tokens:
            return self._error(seq.error, seq.x_request_id)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        model = self.cfg.model_name
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{seq.rid}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            first = {"id": cid, "object": obj, "created": created, "model": model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
            await resp.write(b"data: " + _dumps(first).encode() + b"\n\n")
        sent = 0
        while True:
            produced = len(seq.tokens)
            if sent < produced:
                new = seq.tokens[sent:produced]
                sent = produced
                done = seq.finished and seq.error is None
                text = "".join(token_text(t) for t in new)
                fr = self._finish_reason(seq) if done else None
                if chat:
                    choice = {"index": 0, "delta": {"content": text}, "token_ids": new, "logprobs": None,
                              "finish_reason": fr}
                else:
                    choice = {"index": 0, "text": text, "token_ids": new, "logprobs": None, "finish_reason": fr,
                              "stop_reason": None}
                chunk = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
                await resp.write(b"data: " + _dumps(chunk).encode() + b"\n\n")
                continue
            if seq.finished:
                break
            changed.clear()
            await changed.wait()
        if seq.error is not None:
            err = error_body(seq.error.message, seq.error.status, seq.error.err_type)
            await resp.write(b"data: " + _dumps(err).encode() + b"\n\n")
        elif parsed.include_usage:
            usage = {"id": cid, "object": obj, "created": created, "model": model, "choices": [],
                     "usage": self._usage(seq)}
            await resp.write(b"data: " + _dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
