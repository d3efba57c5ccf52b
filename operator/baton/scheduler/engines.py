"""Engine clients: how the scheduler talks to one engine replica.

`EngineClient` is the interface the request flow uses; `TrtllmServeClient` implements it for
trtllm-serve workers (and Baton's engine simulator) over HTTP with one pooled aiohttp session.
Requests are sent as ready-made JSON bytes (the service serializes each body once), and responses are
either read whole (`post`) or streamed (`open`). `classify_failure` decides what a failed call means:
a KV-format mismatch (never retried onto the same pair), a retryable replica failure (connection error,
timeout, 5xx), or an engine answer to pass through (4xx).

The Triton (`runtime: triton`) path is not implemented: see docs/scheduler.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp

from baton.scheduler.endpoints import Endpoint

# Fragments of TensorRT-LLM's cache-transceiver errors for incompatible KV layouts (cacheFormatter.cpp,
# cacheTransferLayer.cpp). A generation-only request failing with one of these will fail the same way on
# the same prefill/decode pair every time.
KV_MISMATCH_MARKERS = (
    "does not currently support these cacheState",
    "cache-transfer protocol mismatch",
    "only support same",
    "only support equal number of heads",
)


def is_kv_mismatch(text: str) -> bool:
    return any(marker in text for marker in KV_MISMATCH_MARKERS)


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
        self.kind = kind  # "retryable" | "kv_mismatch" | "connection"

    @property
    def connection_level(self) -> bool:
        return self.kind == "connection"


def classify_failure(endpoint: Endpoint, status: int, body: bytes) -> EngineFailure | None:
    """None for answers to pass through (2xx, 4xx); an EngineFailure for 5xx."""
    if status < 500:
        return None
    text = body.decode("utf-8", "replace")
    kind = "kv_mismatch" if is_kv_mismatch(text) else "retryable"
    return EngineFailure(endpoint, _error_message(text) or f"HTTP {status}", status, body, kind)


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
    status: int
    content_type: str

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

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


class _AiohttpResponse:
    __slots__ = ("_resp", "status", "content_type")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        finally:
            self._resp.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.content.iter_any():
            yield chunk

    def release(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()  # fully read: the connection goes back to the pool
        else:
            self._resp.close()  # abandoned mid-body: drop the connection


class TrtllmServeClient:
    """trtllm-serve's OpenAI HTTP API; one ClientSession and connection pool for all replicas."""

    def __init__(self, read_timeout: float = 600.0, connect_timeout: float = 5.0) -> None:
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=60)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    @staticmethod
    def _headers(request_id: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Request-Id": request_id}

    async def post(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> tuple[int, bytes, str]:
        try:
            async with self.session.post(endpoint.url + path, data=body, headers=self._headers(request_id)) as resp:
                data = await resp.read()
                return resp.status, data, resp.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineFailure(endpoint, f"{type(exc).__name__}: {exc}", kind="connection") from exc

    async def open(self, endpoint: Endpoint, path: str, body: bytes, request_id: str) -> EngineResponse:
        try:
            resp = await self.session.post(endpoint.url + path, data=body, headers=self._headers(request_id))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EngineFailure(endpoint, f"{type(exc).__name__}: {exc}", kind="connection") from exc
        return _AiohttpResponse(resp)

    async def health(self, endpoint: Endpoint, timeout: float) -> bool:
        try:
            async with self.session.get(
                endpoint.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def make_engine_client(runtime: str, read_timeout: float) -> EngineClient:
    if runtime == "triton":
        raise NotImplementedError(
            "runtime 'triton' is not supported by the scheduler yet (Triton runs both tiers in one MPI world; "
            "see docs/scheduler.md); use runtime: trtllm-serve"
        )
    return TrtllmServeClient(read_timeout=read_timeout)
