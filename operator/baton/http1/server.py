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

from baton.http1.reading import ReusedBufferProtocol

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
    __slots__ = ("method", "path", "query", "version", "headers", "body", "keep_alive")

    def __init__(self, method: str, path: str, query: str, version: str, headers: Headers,
                 body: bytes, keep_alive: bool = True) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers  # a repeated header keeps its last value
        self.body = body
        self.keep_alive = keep_alive  # the client allows another request on this connection


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


def _head(status: int, content_type: str, headers: dict[str, str] | None, length: int | None, keep: bool,
          version: str = "HTTP/1.1") -> bytes:
    """A response head; `length` None means a streamed body (chunked for HTTP/1.1, delimited by closing
    the connection for HTTP/1.0)."""
    parts = [b"HTTP/1.1 %d %s\r\nServer: baton\r\nDate: %s\r\nContent-Type: %s\r\n"
             % (status, _REASONS.get(status, "Unknown").encode(), _Date.get(), content_type.encode())]
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
    elif version != "HTTP/1.0":
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if not keep:
        parts.append(b"Connection: close\r\n")
    elif version == "HTTP/1.0":
        parts.append(b"Connection: keep-alive\r\n")
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


class _Failure:
    """An unparseable request, answered in its turn (after the requests before it), then the connection closes."""

    __slots__ = ("status", "message")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


async def _step_once(chunks: AsyncIterator[bytes]) -> None:
    """Take one step of a stream that will not be sent: a generator that never started does not run its
    finally block on aclose(), and that block holds its accounting and cleanup."""
    with contextlib.suppress(Exception):
        await chunks.__anext__()  # type: ignore[attr-defined]


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER = range(5)


class _Connection(ReusedBufferProtocol):
    """One client connection: parses requests in `data_received`, answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _HEAD
        self.pending: collections.deque[Request | _Failure] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.eof = False
        self.dead = False  # an unparseable request was seen: nothing more is read
        self.continue_owed = False  # a 100 Continue to send once the answers before it are out
        self.paused_reading = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.producer: Producer | None = None
        self.push_done: asyncio.Future[None] | None = None
        self.last_active = 0.0
        # request being parsed
        self._method = self._path = self._query = self._version = ""
        self._headers = Headers()
        self._keep = True
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
        if self.push_done is not None and not self.push_done.done():
            self.push_done.set_result(None)  # the sink is dead: the answer is over
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

    def data_received(self, data: memoryview) -> None:  # valid during the call only (ReusedBufferProtocol)
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
        if self.server.cancel_on_disconnect:
            return False  # a client that stops sending has gone away: close, and cancel what it asked for
        # the client half-closed: finish what it asked for, then close
        self.eof = True
        if self.task is None:
            self._close()
        return True

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        buf = self.buf
        while not self.closed and not self.dead:
            state = self.state
            if state == _HEAD:
                while buf[:2] == b"\r\n":  # blank lines before a request line are ignored (RFC 9112 2.2)
                    del buf[:2]
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise _BadRequest(431, "request header fields too large")
                    return
                if end > MAX_HEAD_BYTES:
                    raise _BadRequest(431, "request header fields too large")
                self._start(bytes(buf[:end]))
                del buf[:end + 4]
                if self.state == _HEAD:  # no body
                    self._complete(b"")
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
                if size < 0:
                    raise _BadRequest(400, "negative chunk size")
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
        self._keep = conn == "keep-alive" if version == "HTTP/1.0" else conn != "close"
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
                self.state = _HEAD
                return
            self._need = length
            self.state = _BODY
        if headers.get("expect", "").lower() == "100-continue":
            if self.task is None:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self.continue_owed = True  # not inside the answer being written: after it

    def _complete(self, body: bytes) -> None:
        self.state = _HEAD
        self._enqueue(Request(self._method, self._path, self._query, self._version, self._headers, body, self._keep))
        if not self._keep:
            self.dead = True  # the client said this is its last request: nothing after it is read

    def _enqueue(self, item: Request | _Failure) -> None:
        if self.task is None:
            self.task = self.server.loop.create_task(self._serve(item))
        else:
            self.pending.append(item)
            if len(self.pending) >= 16 and not self.paused_reading and self.transport is not None:
                self.paused_reading = True
                self.transport.pause_reading()

    def _fail(self, status: int, message: str) -> None:
        """A request we cannot parse: answered in its turn, then the connection closes."""
        self.dead = True
        self.buf.clear()
        self._enqueue(_Failure(status, message))

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    # ------------------------------------------------------------------ answering
    async def _serve(self, item: Request | _Failure) -> None:
        try:
            while True:
                keep = False
                if isinstance(item, _Failure):
                    body = item.message.encode()
                    self._write(_head(item.status, "text/plain; charset=utf-8", None, len(body), False) + body)
                else:
                    try:
                        keep = await self._answer(item)
                    except Exception:  # a bug in a handler: answered 500 if nothing was sent yet
                        log.exception("request handler failed: %s %s", item.method, item.path)
                        keep = False
                self.last_active = self.server.loop.time()
                if self.closed:
                    break
                if not keep:
                    self._close()
                    break
                if not self.pending:
                    if self.continue_owed:
                        self.continue_owed = False
                        self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    if self.eof:
                        self._close()
                    break
                item = self.pending.popleft()
                if self.paused_reading and len(self.pending) < 8 and self.transport is not None:
                    self.paused_reading = False
                    self.transport.resume_reading()
        finally:
            self.task = None

    async def _answer(self, request: Request) -> bool:
        """Answer one request; returns whether the connection may serve another."""
        keep = request.keep_alive and not self.server.draining
        handler = self.server.routes.get((request.method, request.path))
        head_only = False
        if handler is None and request.method == "HEAD":  # HEAD on a GET route: the GET answer's head
            handler = self.server.routes.get(("GET", request.path))
            head_only = handler is not None
        if handler is None:
            methods = [m for (m, p) in self.server.routes if p == request.path]
            status = 405 if methods else 404
            body = (f"{request.method} is not allowed on {request.path}" if methods
                    else f"no such path: {request.path}").encode()
            self._write_whole(Response(status, body, "text/plain; charset=utf-8",
                                       {"Allow": ", ".join(methods)} if methods else None), request, keep)
            return keep
        try:
            response = await handler(request)
        except Exception:
            log.exception("request handler failed: %s %s", request.method, request.path)
            body = b"" if head_only else b"internal server error"
            self._write_whole(Response(500, body, "text/plain; charset=utf-8"), request, False)
            return False
        keep = keep and not self.server.draining
        if head_only:
            return await self._answer_head(response, request, keep)
        if isinstance(response, Response):
            self._write_whole(response, request, keep)
            return keep
        if request.version == "HTTP/1.0":
            keep = False  # no chunked encoding: the body ends when the connection does
        if isinstance(response, PushResponse):
            return await self._push(response, request, keep)
        return await self._iterate(response, request, keep)

    async def _answer_head(self, response: AnyResponse, request: Request, keep: bool) -> bool:
        """The head of `response` without its body; a streamed body is dropped unsent."""
        length = len(response.body) if isinstance(response, Response) else 0
        if isinstance(response, PushResponse):
            response.producer.abort()
        elif isinstance(response, StreamResponse):
            await _step_once(response.chunks)
            aclose = getattr(response.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        self._write(_head(response.status, response.content_type, response.headers, length, keep, request.version))
        return keep

    def _write_whole(self, response: Response, request: Request, keep: bool) -> None:
        body = response.body
        self._write(_head(response.status, response.content_type, response.headers, len(body), keep,
                          request.version) + body)

    async def _iterate(self, response: StreamResponse, request: Request, keep: bool) -> bool:
        chunks = response.chunks
        chunked = request.version != "HTTP/1.0"
        try:
            if self.closed:
                await _step_once(chunks)  # the client left while the handler ran
                return False
            # The head goes out with the first piece (one write, one segment), or alone if there is none.
            head = _head(response.status, response.content_type, response.headers, None, keep, request.version)
            async for chunk in chunks:
                if self.closed:
                    return False
                if chunk:
                    self._write(head + (_frame(chunk) if chunked else chunk))
                    head = b""
                if self.write_paused:
                    await self._drain()
            self._write(head + b"0\r\n\r\n" if chunked else head)
            return keep
        except ConnectionError:
            if not self.closed:
                raise  # the stream's own source failed: the answer is cut, and the connection closes
            return False  # the client went away; closing the iterator below runs its accounting
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

    async def _push(self, response: PushResponse, request: Request, keep: bool) -> bool:
        producer = response.producer
        if self.closed:
            producer.abort()
            return False
        done: asyncio.Future[None] = self.server.loop.create_future()
        self.push_done = done
        sink = _PushSink(self, done, request.version != "HTTP/1.0",
                         _head(response.status, response.content_type, response.headers, None, keep, request.version))
        paused_before = self.write_paused  # pause_writing tells the producer only of pauses from now on
        self.producer = producer
        try:
            try:
                producer.start(sink)
            except BaseException:
                self.producer = None
                producer.abort()
                if sink.head and not done.done():  # nothing was sent yet: a clean error instead of a cut 200
                    sink.head = b""
                    body = b"internal server error"
                    self._write(_head(500, "text/plain; charset=utf-8", None, len(body), False) + body)
                raise
            sink.flush_head()  # a producer that wrote nothing yet: the client gets the status line now
            if paused_before and self.write_paused and not done.done() and self.producer is not None:
                producer.pause()
            await done
        finally:
            self.producer = None
            self.push_done = None
        return keep and not self.closed


class _PushSink:
    """Where a producer writes; `end` finishes the response. The response head goes out with the first
    write (one write, one TCP segment for head and first token)."""

    __slots__ = ("conn", "done", "chunked", "head")

    def __init__(self, conn: _Connection, done: asyncio.Future[None], chunked: bool, head: bytes) -> None:
        self.conn = conn
        self.done = done
        self.chunked = chunked
        self.head = head

    def flush_head(self) -> None:
        if self.head and not self.done.done():
            head, self.head = self.head, b""
            self.conn._write(head)  # noqa: SLF001

    def write(self, data: bytes) -> None:
        if data and not self.done.done():
            head, self.head = self.head, b""
            self.conn._write(head + (_frame(data) if self.chunked else data))  # noqa: SLF001

    def end(self, data: bytes = b"") -> None:
        if self.done.done():
            return
        head, self.head = self.head, b""
        if self.chunked:
            self.conn._write(head + (_frame(data) if data else b"") + b"0\r\n\r\n")  # noqa: SLF001
        elif head or data:
            self.conn._write(head + data)  # noqa: SLF001
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
            if conn.task is None:
                conn._close()  # noqa: SLF001
        deadline = time.monotonic() + grace_s
        while any(c.task is not None for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            producer, conn.producer = conn.producer, None
            if producer is not None:
                producer.abort()
            if conn.push_done is not None and not conn.push_done.done():
                conn.push_done.set_result(None)
            if conn.task is not None:
                conn.task.cancel()
            conn._close()  # noqa: SLF001
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

