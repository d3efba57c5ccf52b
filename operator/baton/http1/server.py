"""Keep-alive HTTP/1.1 server on an asyncio protocol.

A handler takes a `Request` and returns one of:
- `Response`: a whole answer (Content-Length);
- `StreamResponse`: chunked, from an async iterator of bytes; the iterator is always exhausted or closed
  (`aclose`), so its `finally` block runs even when the client goes away;
- `PushResponse`: chunked, pushed by a producer through a `Sink` from data callbacks (how the scheduler
  splices an engine's stream into the client's connection without a coroutine switch per chunk). The
  producer is told to pause and resume with the client connection's write buffer, and is aborted when
  the client goes away.

Requests on one connection are answered in order (pipelining is allowed, not parallelised). Handlers are
not cancelled when their client disconnects unless `cancel_on_disconnect` is set; a stream the client
abandons is closed either way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

log = logging.getLogger("baton.http1.server")

MAX_HEAD_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 75.0  # longer than clients' keep-alive expiry, so a client never reuses a connection we close
SWEEP_INTERVAL_S = 5.0
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Headers(dict):  # type: ignore[type-arg]
    """Header names stored lower-case; looked up case-insensitively."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)


class Request:
    __slots__ = ("method", "path", "query", "version", "headers", "body")

    def __init__(self, method: str, path: str, query: str, version: str, headers: Headers,
                 body: bytes) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers  # a repeated header keeps its last value
        self.body = body


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = "application/json",
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class StreamResponse:
    __slots__ = ("status", "chunks", "content_type", "headers")

    def __init__(self, chunks: AsyncIterator[bytes], status: int = 200, content_type: str = "text/event-stream",
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.chunks = chunks
        self.content_type = content_type
        self.headers = headers


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def end(self, data: bytes = b"") -> None: ...


class Producer(Protocol):
    def start(self, sink: Sink) -> None:
        """Begin pushing: call `sink.write` for each piece and `sink.end` once at the end."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def abort(self) -> None:
        """The client went away (or the server is closing): stop and clean up; `sink` is dead."""


class PushResponse:
    __slots__ = ("status", "producer", "content_type", "headers")

    def __init__(self, producer: Producer, status: int = 200, content_type: str = "text/event-stream",
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.producer = producer
        self.content_type = content_type
        self.headers = headers


AnyResponse = Response | StreamResponse | PushResponse
Handler = Callable[[Request], Awaitable[AnyResponse]]


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, body, "application/json", headers)


def text_response(text: str, status: int = 200) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


class _Date:
    """The Date header, formatted at most once a second."""

    value = b""
    at = 0.0

    @classmethod
    def get(cls) -> bytes:
        now = time.time()
        if now - cls.at >= 1.0:
            cls.at = now
            cls.value = formatdate(now, usegmt=True).encode()
        return cls.value


def _head(status: int, content_type: str, headers: dict[str, str] | None, length: int | None, keep: bool) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\nServer: baton\r\nDate: %s\r\nContent-Type: %s\r\n"
             % (status, _REASONS.get(status, "Unknown").encode(), _Date.get(), content_type.encode())]
    if length is None:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    else:
        parts.append(b"Content-Length: %d\r\n" % length)
    if not keep:
        parts.append(b"Connection: close\r\n")
    if headers:
        for key, value in headers.items():
            parts.append(f"{key}: {value}\r\n".encode("latin-1"))
    parts.append(b"\r\n")
    return b"".join(parts)


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER = range(5)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in `data_received`, answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _HEAD
        self.pending: collections.deque[Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.keep = True
        self.eof = False
        self.dead = False  # an unparseable request was seen: nothing more is read
        self.paused_reading = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.producer: Producer | None = None
        self.last_active = 0.0
        # request being parsed
        self._method = self._path = self._query = self._version = ""
        self._headers = Headers()
        self._need = 0
        self._parts: list[bytes] = []
        self._size = 0

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_active = self.server.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.pending.clear()
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.abort()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionResetError("client closed the connection"))
        if self.task is not None and not self.task.done() and self.server.cancel_on_disconnect:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.producer is not None:
            self.producer.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.producer is not None:
            self.producer.resume()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        self.last_active = self.server.loop.time()
        self.buf += data
        try:
            self._parse()
        except _BadRequest as exc:
            self._fail(exc.status, exc.message)
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(400, f"malformed request: {exc}")

    def eof_received(self) -> bool | None:
        # the client half-closed: finish what it asked for, then close
        self.eof = True
        if self.task is None:
            self._close()
        return True

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        buf = self.buf
        while not self.closed:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise _BadRequest(431, "request header fields too large")
                    return
                if end == 0:  # a stray empty line between requests
                    del buf[:4]
                    continue
                self._start(bytes(buf[:end]))
                del buf[:end + 4]
            elif state == _BODY:
                if len(buf) < self._need:
                    return
                body = bytes(buf[:self._need])
                del buf[:self._need]
                self._complete(body)
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise _BadRequest(400, "malformed chunk size line")
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[:end + 2]
                if size == 0:
                    self.state = _TRAILER
                else:
                    self._size += size
                    if self._size > self.server.max_body_bytes:
                        raise _BadRequest(413, f"request body exceeds {self.server.max_body_bytes} bytes")
                    self._need = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(buf) < self._need + 2:
                    return
                self._parts.append(bytes(buf[:self._need]))
                del buf[:self._need + 2]
                self.state = _CHUNK_SIZE
            else:  # _TRAILER
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:
                    body = b"".join(self._parts)
                    self._parts = []
                    self._complete(body)

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(400, f"malformed request line {lines[0][:100]!r}") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, f"unsupported protocol {version[:20]!r}")
        headers = Headers()
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, f"malformed header line {line[:100]!r}")
            dict.__setitem__(headers, key.strip().lower(), value.strip())
        path, _, query = target.partition("?")
        self._method, self._path, self._query, self._version = method, path, query, version
        self._headers = headers
        conn = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.keep = self.keep and conn == "keep-alive"
        elif conn == "close":
            self.keep = False
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self._parts = []
            self._size = 0
            self.state = _CHUNK_SIZE
        else:
            length = int(headers.get("content-length", "0") or "0")
            if length < 0:
                raise _BadRequest(400, "negative Content-Length")
            if length > self.server.max_body_bytes:
                raise _BadRequest(413, f"request body exceeds {self.server.max_body_bytes} bytes")
            if length == 0:
                self._complete(b"")
                return
            self._need = length
            self.state = _BODY
        if headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _complete(self, body: bytes) -> None:
        self.state = _HEAD
        request = Request(self._method, self._path, self._query, self._version, self._headers, body)
        if self.task is None:
            self.task = self.server.loop.create_task(self._serve(request))
        else:
            self.pending.append(request)
            if len(self.pending) >= 16 and not self.paused_reading and self.transport is not None:
                self.paused_reading = True
                self.transport.pause_reading()

    def _fail(self, status: int, message: str) -> None:
        """A request we cannot parse: answer it (after whatever is in progress) and close."""
        self.keep = False
        self.dead = True
        self.buf.clear()
        if self.task is None and self.transport is not None and not self.closed:
            body = message.encode()
            self.transport.write(_head(status, "text/plain; charset=utf-8", None, len(body), False) + body)
            self._close()

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    # ------------------------------------------------------------------ answering
    async def _serve(self, request: Request) -> None:
        while True:
            try:
                await self._answer(request)
            except Exception:  # a bug in a handler: answered 500 if nothing was sent yet
                log.exception("request handler failed: %s %s", request.method, request.path)
                self.keep = False
            self.last_active = self.server.loop.time()
            if self.closed:
                break
            if not self.keep:
                self._close()
                break
            if not self.pending:
                if self.eof:
                    self._close()
                break
            request = self.pending.popleft()
            if self.paused_reading and len(self.pending) < 8 and self.transport is not None:
                self.paused_reading = False
                self.transport.resume_reading()
        self.task = None

    async def _answer(self, request: Request) -> None:
        handler = self.server.routes.get((request.method, request.path))
        if handler is None:
            methods = [m for (m, p) in self.server.routes if p == request.path]
            status = 405 if methods else 404
            body = (f"{request.method} is not allowed on {request.path}" if methods
                    else f"no such path: {request.path}").encode()
            self._write_whole(Response(status, body, "text/plain; charset=utf-8",
                                       {"Allow": ", ".join(methods)} if methods else None))
            return
        if self.server.draining:
            self.keep = False
        try:
            response = await handler(request)
        except Exception:
            log.exception("request handler failed: %s %s", request.method, request.path)
            self.keep = False
            self._write_whole(Response(500, b"internal server error", "text/plain; charset=utf-8"))
            return
        if isinstance(response, Response):
            self._write_whole(response)
        elif isinstance(response, PushResponse):
            await self._push(response)
        else:
            await self._iterate(response)

    def _write_whole(self, response: Response) -> None:
        if self.closed or self.transport is None:
            return
        body = response.body
        self.transport.write(_head(response.status, response.content_type, response.headers, len(body), self.keep)
                             + body)

    async def _iterate(self, response: StreamResponse) -> None:
        chunks = response.chunks
        try:
            if self.closed or self.transport is None:
                return
            transport = self.transport
            transport.write(_head(response.status, response.content_type, response.headers, None, self.keep))
            async for chunk in chunks:
                if self.closed:
                    return
                if chunk:
                    transport.write(_frame(chunk))
                if self.write_paused:
                    await self._drain()
            if not self.closed:
                transport.write(b"0\r\n\r\n")
        except ConnectionError:
            pass  # the client went away; closing the iterator below runs its accounting
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _drain(self) -> None:
        if not self.write_paused or self.closed:
            return
        self.drain_waiter = self.server.loop.create_future()
        try:
            await self.drain_waiter
        finally:
            self.drain_waiter = None

    async def _push(self, response: PushResponse) -> None:
        producer = response.producer
        if self.closed or self.transport is None:
            producer.abort()
            return
        done: asyncio.Future[None] = self.server.loop.create_future()
        sink = _PushSink(self, done)
        self.transport.write(_head(response.status, response.content_type, response.headers, None, self.keep))
        self.producer = producer
        try:
            try:
                producer.start(sink)
            except BaseException:
                self.producer = None
                producer.abort()
                raise
            if self.write_paused and self.producer is not None:
                producer.pause()
            await done
        except ConnectionError:
            pass
        finally:
            self.producer = None


class _PushSink:
    """Where a producer writes; `end` finishes the response."""

    __slots__ = ("conn", "done")

    def __init__(self, conn: _Connection, done: asyncio.Future[None]) -> None:
        self.conn = conn
        self.done = done

    def write(self, data: bytes) -> None:
        conn = self.conn
        if data and not conn.closed and conn.transport is not None:
            conn.transport.write(_frame(data))

    def end(self, data: bytes = b"") -> None:
        conn = self.conn
        if not conn.closed and conn.transport is not None:
            conn.transport.write((_frame(data) if data else b"") + b"0\r\n\r\n")
        if not self.done.done():
            self.done.set_result(None)


class HttpServer:
    """Routes `(method, path)` to handlers and serves them on one listening socket."""

    def __init__(self, *, max_body_bytes: int = 64 * 1024 * 1024, cancel_on_disconnect: bool = False) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.max_body_bytes = max_body_bytes
        self.cancel_on_disconnect = cancel_on_disconnect
        self.connections: set[_Connection] = set()
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, backlog: int = 1024) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.task is None and now - conn.last_active > IDLE_TIMEOUT_S:
                conn._close()  # noqa: SLF001 - the server owns its connections
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace_s`), then close every connection."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.keep = False
            if conn.task is None:
                conn._close()  # noqa: SLF001
        deadline = time.monotonic() + grace_s
        while any(c.task is not None for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.producer is not None:
                conn.producer.abort()
                conn.producer = None
            if conn.task is not None:
                conn.task.cancel()
            conn._close()  # noqa: SLF001
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

