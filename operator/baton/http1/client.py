"""Keep-alive HTTP/1.1 client on an asyncio protocol.

`HttpClient.request` returns a whole answer. `HttpClient.open` returns a `ClientResponse` once the status
line and headers have arrived; its body is then either read whole (`read`), or its first bytes awaited
(`first`) and the rest pushed to callbacks from the socket's data callback (`relay`), which is how the
scheduler relays a token stream without a coroutine switch per chunk. A relayed body can be paused and
resumed (the client's connection applies backpressure through them).

Every failure is an `OSError`: `ConnectionError` (refused, reset, closed early -- `ClosedMidAnswer` when the
server closed it in order after its answer began --, unparseable answer) or
`TimeoutError` (connect timeout, no bytes for `read_timeout` seconds, a request's own `timeout`).
Idle connections expire after `keepalive_s` (below uvicorn's 5 s default, so a server never closes one
under a request). A GET or HEAD that fails on a reused connection before any answer byte is sent once
more on a fresh one; a POST is not (RFC 9112 9.3.1): the server may have read it and worked on it before
the connection died, and sending it again would run a generation twice, unseen by the caller's own
accounting of failures and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from baton.http1.fields import chunk_size, connection_options
from baton.http1.reading import ReusedBufferProtocol

DataCallback = Callable[[bytes], None]
EndCallback = Callable[[], None]
ErrorCallback = Callable[[Exception], None]

SWEEP_INTERVAL_S = 1.0
_IDEMPOTENT = ("GET", "HEAD")  # sent once more after a reused connection failed before answering

_IDLE, _HEAD, _LENGTH, _CHUNKS, _TRAILER, _UNTIL_CLOSE, _DONE = range(7)

# _LEAST[k]: the least size written in k hex digits without a leading zero. int(line, 16) also takes a sign,
# blanks, '_' and a 0x prefix; a line with any of them has fewer digits than characters, so a size below
# _LEAST[len(line)]. That one compare (where `size <= 0` was) keeps the usual line off the strict path.
_LEAST = tuple(16 ** (k - 1) if k else 0 for k in range(17))


def _length_conflict(lines: list[str]) -> bool:
    """Content-Length is repeated with different values (the slow path: some header field is repeated)."""
    lengths = set()
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            lengths.add(value.strip())  # as the head is read
    return len(lengths) > 1


def _take_chunks(buf: bytearray, out: list[bytes]) -> bool:
    """Move the data of every complete chunk at the front of `buf` to `out`; True when the last chunk
    (size 0) was reached and taken. A streamed answer is one chunk per SSE event, many per read: they are
    walked by index and cut from `buf` once, not one deletion and state change per chunk. Per chunk: one
    find, one int() of the size line and one compare of it with `_LEAST` (any other line -- an extension, a
    leading zero, the malformed -- is read strictly, as the server reads it: `fields.chunk_size`), two byte
    compares for the CRLF after the data, one copy of the data."""
    pos = 0
    last = False
    n = len(buf)
    find = buf.find
    view = memoryview(buf)
    try:
        while True:
            end = find(b"\r\n", pos)
            if end < 0:
                if n - pos > 1024:
                    raise ValueError("chunk size line too long")
                break
            try:
                size = int(buf[pos:end], 16)
                least = _LEAST[end - pos]
            except (ValueError, IndexError):  # not a number to int(), or a line over 16 characters
                size, least = -1, 0
            if size < least:  # not all hex digits (or a leading zero, or the last chunk): read strictly
                if size or end - pos != 1:  # but the last chunk's usual "0" needs no second look
                    size = chunk_size(bytes(buf[pos:end]))
                if not size:
                    pos = end + 2
                    last = True
                    break
            start = end + 2
            stop = start + size
            if stop + 2 > n:
                break  # not all here yet: taken from its size line on the next read
            if buf[stop] != 13 or buf[stop + 1] != 10:
                raise ValueError("chunk data not followed by CRLF")
            out.append(view[start:stop].tobytes())
            pos = stop + 2
    finally:
        view.release()
    if pos:
        del buf[:pos]
    return last


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 we understand."""


class ClosedBeforeAnswer(ConnectionResetError):
    """A request that is not sent again (a POST) failed on a reused connection before any answer byte: the
    server closed an idle connection as it was reused (its keep-alive ran out), or read the request and then
    died. Which one cannot be told, so it is neither re-sent nor proof that the server is down."""


class ClosedMidAnswer(ConnectionResetError):
    """The server closed the connection (an orderly close, not a reset) after it began its answer and before
    the answer's end: what a client of uvicorn sees when a streamed response's generator raises."""


class _Conn(ReusedBufferProtocol):
    def __init__(self, client: HttpClient, key: tuple[str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buf = bytearray()
        self.state = _IDLE
        self.last_active = 0.0
        self.head_waiter: asyncio.Future[None] | None = None
        self.got_bytes = False
        self.keep = True
        self.status = 0
        self.headers: dict[str, str] = {}
        self.need = 0
        # body delivery: collected until a consumer attaches, then pushed
        self.parts: list[bytes] = []
        self.body_waiter: asyncio.Future[None] | None = None  # first body bytes, or the end
        self.on_data: DataCallback | None = None
        self.on_end: EndCallback | None = None
        self.on_error: ErrorCallback | None = None
        self.error: Exception | None = None
        self.paused = False
        self.method = ""

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)  # noqa: SLF001
        if self.state == _UNTIL_CLOSE and exc is None:
            self._end()  # the body is delimited by the server closing the connection
            return
        if self.state not in (_IDLE, _DONE):
            err: Exception
            if isinstance(exc, OSError):
                err = exc
            elif self.got_bytes and exc is None:
                err = ClosedMidAnswer("the server closed the connection mid-answer")
            else:
                err = ConnectionResetError("the server closed the connection"
                                           + (" mid-answer" if self.got_bytes else " before answering"))
            self._fail(err)

    def data_received(self, data: memoryview) -> None:  # valid during the call only (ReusedBufferProtocol)
        self.last_active = self.client.loop.time()
        if self.state in (_IDLE, _DONE):
            self.keep = False  # bytes nobody asked for: the connection is not reused
            if self.state == _IDLE:
                self.close()
            return
        self.got_bytes = True
        self.buf += data
        try:
            self._parse()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            self.abort(ProtocolError(f"unparseable answer: {exc}"))

    # ------------------------------------------------------------------ request
    def send(self, method: str, head: bytes, body: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.method = method
        loop = self.client.loop
        self.head_waiter = loop.create_future()
        self.body_waiter = None
        self.buf.clear()
        self.state = _HEAD
        self.got_bytes = False
        self.keep = True
        self.status = 0
        self.headers = {}
        self.parts = []
        self.on_data = self.on_end = self.on_error = None
        self.error = None
        self.last_active = loop.time()
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        return self.head_waiter

    def abort(self, exc: Exception) -> None:
        """Fail what is in progress with `exc` and drop the connection."""
        if self.state not in (_IDLE, _DONE):
            self._fail(exc)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.client._forget(self)  # noqa: SLF001

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        buf = self.buf
        out: list[bytes] = []
        ended = False
        while True:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ValueError("response head over 64 KiB")
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[:end + 4]
                parts = lines[0].split(" ", 2)
                if not parts[0].startswith("HTTP/1.") or len(parts) < 2:
                    raise ValueError(f"bad status line {lines[0][:80]!r}")
                status = int(parts[1])
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                if 100 <= status < 200:
                    continue  # 100 Continue and friends: the real answer follows
                self.status = status
                self.headers = headers
                self.keep = "close" not in connection_options(headers.get("connection", "")) and parts[0] != "HTTP/1.0"
                if status in (204, 304) or self.method == "HEAD":  # RFC 9112 6.3: first, before any framing field
                    self.need = 0
                    self.state = _LENGTH
                    ended = True  # no body, whatever the headers say (Transfer-Encoding included)
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    self.state = _CHUNKS
                elif (length := headers.get("content-length")) is not None:
                    # ASCII digits only (a latin-1 str has no other decimals): int() would take "-1", "+3", "0_3"
                    if not length.isdecimal():
                        raise ValueError(f"invalid Content-Length {length[:40]!r}")
                    if len(headers) != len(lines) - 1 and _length_conflict(lines):  # some field is repeated
                        raise ValueError("conflicting Content-Length values")
                    self.need = int(length)
                    self.state = _LENGTH
                    if self.need == 0:
                        ended = True
                else:
                    self.keep = False
                    self.state = _UNTIL_CLOSE
                waiter = self.head_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                if ended:
                    break
            elif state == _LENGTH:
                if not buf:
                    break
                take = min(len(buf), self.need)
                out.append(bytes(buf[:take]))
                del buf[:take]
                self.need -= take
                if self.need == 0:
                    ended = True
                break
            elif state == _UNTIL_CLOSE:
                if buf:
                    out.append(bytes(buf))
                    buf.clear()
                break
            elif state == _CHUNKS:
                if _take_chunks(buf, out):
                    self.state = _TRAILER
                else:
                    break
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                del buf[:end + 2]
                if end == 0:
                    ended = True
                    break
            else:
                return
        if out:
            self._deliver(out[0] if len(out) == 1 else b"".join(out))
        if ended:
            self._end()

    def _deliver(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self.parts.append(data)
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self) -> None:
        self.state = _DONE
        if self.buf:
            self.keep = False  # bytes after the answer: do not trust the connection
        if self.on_end is not None:
            on_end = self.on_end
            self.on_data = self.on_end = self.on_error = None
            on_end()
            return
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.state = _DONE
        self.keep = False
        self.error = exc
        for waiter in (self.head_waiter, self.body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # mark retrieved: nobody may be waiting any more
        if self.on_error is not None:
            on_error = self.on_error
            self.on_data = self.on_end = self.on_error = None
            on_error(exc)


class ClientResponse:
    """An answer whose status and headers have arrived; the body is read, awaited or relayed."""

    __slots__ = ("_conn", "status", "headers", "content_type", "_released", "_complete")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.content_type = conn.headers.get("content-type", "application/json")
        self._released = False
        self._complete = False

    @property
    def complete(self) -> bool:
        """The whole body has arrived (and nothing failed)."""
        if self._released:
            return self._complete
        return self._conn.state == _DONE and self._conn.error is None

    async def read(self) -> bytes:
        """The whole body (the connection then goes back to the pool)."""
        conn = self._conn
        try:
            while conn.state != _DONE:
                conn.body_waiter = conn.client.loop.create_future()
                await conn.body_waiter
            if conn.error is not None:
                raise conn.error
            return b"".join(conn.parts)
        finally:
            self.release()

    async def first(self) -> bytes:
        """The first body bytes that arrive (b"" when the body is empty); `relay` gets the rest."""
        conn = self._conn
        if not conn.parts and conn.state != _DONE:
            conn.body_waiter = conn.client.loop.create_future()
            try:
                await conn.body_waiter
            except BaseException:
                self.release()
                raise
        if conn.error is not None and not conn.parts:
            raise conn.error
        data = b"".join(conn.parts)
        conn.parts = []
        return data

    def relay(self, on_data: DataCallback, on_end: EndCallback, on_error: ErrorCallback) -> None:
        """Push the rest of the body: `on_data` per socket read, then `on_end` or `on_error` exactly once."""
        conn = self._conn
        early = b"".join(conn.parts)
        conn.parts = []
        if early:
            on_data(early)
        if conn.state == _DONE:
            if conn.error is not None:
                on_error(conn.error)
            else:
                on_end()
            return
        conn.on_data, conn.on_end, conn.on_error = on_data, on_end, on_error

    def pause(self) -> None:
        conn = self._conn
        if not conn.paused and not conn.closed and conn.transport is not None:
            conn.paused = True
            conn.transport.pause_reading()

    def resume(self) -> None:
        conn = self._conn
        if conn.paused and not conn.closed and conn.transport is not None:
            conn.paused = False
            conn.transport.resume_reading()

    def release(self) -> None:
        """Done with the answer: a fully read connection is reused, any other is closed."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        self._complete = conn.state == _DONE and conn.error is None
        conn.on_data = conn.on_end = conn.on_error = None
        if conn.paused:
            self.resume()
        if conn.state == _DONE and conn.error is None and conn.keep and not conn.closed:
            conn.client._idle(conn)  # noqa: SLF001
        else:
            conn.state = _DONE
            conn.close()


class HttpClient:
    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 600.0,
                 keepalive_s: float = 4.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self.idle: dict[tuple[str, int], list[tuple[float, _Conn]]] = {}
        self.busy: set[_Conn] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.closed = False

    # ------------------------------------------------------------------ pool
    def _idle(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        conn.state = _IDLE
        self.idle.setdefault(conn.key, []).append((self.loop.time(), conn))

    def _forget(self, conn: _Conn) -> None:
        self.busy.discard(conn)

    def _take(self, key: tuple[str, int]) -> _Conn | None:
        stack = self.idle.get(key)
        now = self.loop.time()
        while stack:
            since, conn = stack.pop()
            if not conn.closed and now - since < self.keepalive_s:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self, key), key[0], key[1]), self.connect_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"connect to {key[0]}:{key[1]} timed out after {self.connect_timeout:g}s") from None
        return conn

    def _sweep(self) -> None:
        now = self.loop.time()
        for key, stack in list(self.idle.items()):
            keep = []
            for since, c in stack:
                if not c.closed and now - since < self.keepalive_s:
                    keep.append((since, c))
                else:
                    c.close()
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        for conn in list(self.busy):
            if not conn.paused and now - conn.last_active > self.read_timeout:
                conn.abort(TimeoutError(f"no answer bytes from {conn.key[0]}:{conn.key[1]} for "
                                        f"{self.read_timeout:g}s"))
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep) if (self.idle or self.busy) else None

    # ------------------------------------------------------------------ requests
    async def open(self, method: str, host: str, port: int, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None, timeout: float | None = None) -> ClientResponse:
        """Send a request and return once the answer's status and headers are in."""
        if self.closed:
            raise ConnectionAbortedError("the HTTP client is closed")
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        key = (host, port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = (f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                ).encode("latin-1")
        conn = self._take(key)
        reused = conn is not None
        for attempt in (0, 1):
            if conn is None:
                conn = await self._connect(key)
                if self.closed:
                    conn.close()
                    raise ConnectionAbortedError("the HTTP client is closed")
            self.busy.add(conn)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)
            timer = None
            if timeout is not None:
                timer = self.loop.call_later(timeout, conn.abort, TimeoutError(
                    f"{method} {host}:{port}{path} got no answer within {timeout:g}s"))
            try:
                await conn.send(method, head, body)
            except ConnectionError as exc:
                conn.close()
                if attempt == 0 and reused and not conn.got_bytes and not self.closed:
                    if method in _IDEMPOTENT:
                        conn = None  # the server dropped an idle connection as we used it: once more, fresh
                        continue
                    raise ClosedBeforeAnswer(f"a reused connection closed before any answer ({exc}): the server "
                                             "dropped it while idle, or read the request and then failed") from exc
                raise
            except BaseException:
                conn.close()
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            return ClientResponse(conn)
        raise ConnectionResetError("unreachable")  # pragma: no cover

    async def request(self, method: str, host: str, port: int, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None, timeout: float | None = None
                      ) -> tuple[int, dict[str, str], bytes]:
        """Send a request and return `(status, headers, body)`."""
        if timeout is None:
            resp = await self.open(method, host, port, path, body, headers)
            return resp.status, resp.headers, await resp.read()
        async with asyncio.timeout(timeout):
            resp = await self.open(method, host, port, path, body, headers)
            return resp.status, resp.headers, await resp.read()

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for stack in self.idle.values():
            for _, conn in stack:
                conn.close()
        self.idle.clear()
        for conn in list(self.busy):
            conn.abort(ConnectionAbortedError("client closed"))
        self.busy.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
