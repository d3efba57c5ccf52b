"""HTTP wiring only: `baton.http1` routes onto `SchedulerService`, and replies turned into responses.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /healthz (process alive),
GET /readyz (config loaded and a healthy decode endpoint), GET /metrics (Prometheus text),
GET /debug/state (endpoint load, rings, queues; JSON).
"""

from __future__ import annotations

import json
import logging

from baton.http1.server import AnyResponse, HttpServer, PushResponse, Request, Response, StreamResponse
from baton.scheduler.metrics import CONTENT_TYPE
from baton.scheduler.replies import AnyReply, RelayReply, Reply, error_body
from baton.scheduler.requests import CHAT, COMPLETIONS
from baton.scheduler.service import SchedulerService

log = logging.getLogger("baton.scheduler.server")

MAX_BODY_BYTES = 64 * 1024 * 1024  # a 128k-token prompt as JSON ids is ~1 MB; leave ample room
_STREAM_HEADERS = {"Cache-Control": "no-cache"}
# The HTTP layer's own answers in OpenAI's error shape, as the scheduler's other errors are
_HTTP_ERRORS = {400: ("invalid_request_error", "bad_request"), 404: ("invalid_request_error", "not_found"),
                405: ("invalid_request_error", "method_not_allowed"),
                408: ("invalid_request_error", "request_timeout"),
                413: ("invalid_request_error", "request_too_large"),
                431: ("invalid_request_error", "request_header_fields_too_large"),
                501: ("invalid_request_error", "not_implemented"),
                505: ("invalid_request_error", "http_version_not_supported")}


def openai_http_error(status: int, message: str) -> tuple[bytes, str]:
    err_type, code = _HTTP_ERRORS.get(status, ("server_error", "internal_error"))
    return error_body(message, err_type, code), "application/json"


def to_response(reply: AnyReply) -> AnyResponse:
    if isinstance(reply, Reply):
        return Response(reply.status, reply.body, reply.content_type, reply.headers)
    headers = {**reply.headers, **_STREAM_HEADERS}
    if isinstance(reply, RelayReply):
        return PushResponse(reply.producer, reply.status, reply.content_type, headers)
    return StreamResponse(reply.chunks, reply.status, reply.content_type, headers)


COMPLETION_PATHS = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT}


def build_server(service: SchedulerService) -> HttpServer:
    # a client that goes away takes its request with it: its queue place, hold, slot and engine call
    server = HttpServer(max_body_bytes=MAX_BODY_BYTES, cancel_on_disconnect=True, error_body=openai_http_error,
                        on_refused=lambda path, status, headers: service.refused(COMPLETION_PATHS.get(path), status,
                                                                                 headers))

    def completion_handler(api: str):  # type: ignore[no-untyped-def]
        async def handler(request: Request) -> AnyResponse:
            return to_response(await service.complete(api, request.body, request.headers))

        return handler

    async def models(request: Request) -> AnyResponse:
        return to_response(service.models())

    async def healthz(request: Request) -> AnyResponse:
        return Response(200, b'{"status": "ok"}')

    async def readyz(request: Request) -> AnyResponse:
        ok, why = service.ready()
        return Response(200 if ok else 503, json.dumps({"ready": ok, "reason": why}).encode())

    async def metrics(request: Request) -> AnyResponse:
        return Response(200, service.metrics.exposition(), CONTENT_TYPE)

    async def debug_state(request: Request) -> AnyResponse:
        return Response(200, json.dumps(service.debug_state()).encode())

    for path, api in COMPLETION_PATHS.items():
        server.route("POST", path, completion_handler(api))
    server.route("GET", "/v1/models", models)
    server.route("GET", "/healthz", healthz)
    server.route("GET", "/readyz", readyz)
    server.route("GET", "/metrics", metrics)
    server.route("GET", "/debug/state", debug_state)
    return server
