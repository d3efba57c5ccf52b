"""HTTP wiring only: aiohttp routes onto `SchedulerService`, lifecycle hooks, and reply writing.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /healthz (process alive),
GET /readyz (config loaded and a healthy decode endpoint), GET /metrics (Prometheus text),
GET /debug/state (endpoint load, rings, queues; JSON).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from baton.scheduler.config import ConfigWatcher
from baton.scheduler.metrics import CONTENT_TYPE
from baton.scheduler.requests import CHAT, COMPLETIONS
from baton.scheduler.replies import Reply, StreamReply
from baton.scheduler.service import SchedulerService

log = logging.getLogger("baton.scheduler.server")

MAX_BODY_BYTES = 64 * 1024 * 1024  # a 128k-token prompt as JSON ids is ~1 MB; leave ample room

SERVICE_KEY: web.AppKey[SchedulerService] = web.AppKey("service", SchedulerService)
WATCHER_KEY: web.AppKey[Any] = web.AppKey("watcher", object)


def _to_response(reply: Reply) -> web.Response:
    resp = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
    resp.headers["Content-Type"] = reply.content_type
    return resp


async def _write_stream(request: web.Request, reply: StreamReply) -> web.StreamResponse:
    resp = web.StreamResponse(status=reply.status, headers=reply.headers)
    resp.headers["Content-Type"] = reply.content_type
    resp.headers["Cache-Control"] = "no-cache"
    chunks = reply.chunks
    try:
        await resp.prepare(request)
        async for chunk in chunks:  # type: ignore[attr-defined]
            await resp.write(chunk)
        await resp.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away; closing the generator below accounts it as cancelled
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    return resp


def _completion_handler(api: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        service = request.app[SERVICE_KEY]
        raw = await request.read()
        reply = await service.complete(api, raw, request.headers)
        if isinstance(reply, StreamReply):
            return await _write_stream(request, reply)
        return _to_response(reply)

    return handler


async def _models(request: web.Request) -> web.Response:
    return _to_response(request.app[SERVICE_KEY].models())


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ok, why = request.app[SERVICE_KEY].ready()
    return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE_KEY].metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


async def _debug_state(request: web.Request) -> web.Response:
    return web.Response(body=json.dumps(request.app[SERVICE_KEY].debug_state()).encode(),
                        content_type="application/json")


def build_app(service: SchedulerService, watcher: ConfigWatcher | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVICE_KEY] = service
    app[WATCHER_KEY] = watcher
    app.router.add_post("/v1/completions", _completion_handler(COMPLETIONS))
    app.router.add_post("/v1/chat/completions", _completion_handler(CHAT))
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/debug/state", _debug_state)

    async def on_startup(app: web.Application) -> None:
        await service.start()
        if watcher is not None:
            watcher.start()

    async def on_cleanup(app: web.Application) -> None:
        if watcher is not None:
            await watcher.stop()
        await service.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
