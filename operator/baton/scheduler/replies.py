"""What the scheduler answers: reply objects the HTTP layer writes, its own errors, and header names.

`Reply` is a complete answer; `StreamReply` wraps an async iterator of SSE bytes whose `finally` block
does the request's accounting, so the HTTP layer must exhaust or close it; `RelayReply` carries a push
producer (`baton.http1.server.Producer`) that splices an engine's stream into the client's connection and
does the accounting when it ends or is aborted. `SchedulerError` is an
error the scheduler itself produces, rendered in the OpenAI error shape.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

HDR_REQUEST_ID = "X-Request-Id"
HDR_ROUTE = "X-Baton-Route"
HDR_PREFILL = "X-Baton-Prefill-Endpoint"
HDR_DECODE = "X-Baton-Decode-Endpoint"
HDR_ERROR = "X-Baton-Error"

STREAM_ERROR = b'"object": "error"'  # trtllm-serve's in-stream error event
STREAM_ERROR_COMPACT = b'"object":"error"'


@dataclass
class Reply:
    """A complete answer."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamReply:
    """A streamed answer; `chunks` must be consumed or closed (its finally block does the accounting)."""

    chunks: AsyncIterator[bytes]
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass
class RelayReply:
    """A streamed answer pushed by `producer` (start / pause / resume / abort); the HTTP layer starts it
    once the status line is written and aborts it if the client goes away."""

    producer: Any
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


AnyReply = Reply | StreamReply | RelayReply


class SchedulerError(Exception):
    """A request ends with an error the scheduler itself produces (OpenAI-style body). `shed`: a failure
    that is the scheduler's own decision about capacity or shutdown (a hold that ran out, a held prefill
    whose replica left, shutting down), not a failure of the engines the request was dispatched to: counted
    `failed` among the requests, `shed` for their engine generation (what the operator's rollback reads)."""

    def __init__(self, status: int, message: str, code: str, err_type: str = "server_error",
                 outcome: str = "failed", retry_after: int | None = None, param: str | None = None,
                 shed: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.err_type = err_type
        self.outcome = outcome
        self.retry_after = retry_after
        self.param = param  # the request field at fault, for the error body's `param`
        self.shed = shed


def error_body(message: str, err_type: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": err_type, "param": param, "code": code}}).encode()


def sse_error(message: str, err_type: str, code: str) -> bytes:
    return b"data: " + error_body(message, err_type, code) + b"\n\n"
