"""Keep-alive HTTP/1.1 server on an asyncio protocol.

A handler takes a `Request` and returns one of:
- `Response`: a whole answer (Content-Length);
- `StreamResponse`: chunked, from an async iterator of bytes; the iterator is always exhausted or closed
  (`aclose`), so its `finally` block runs even when the client goes away; one that raises before its first
  piece is answered 500 (as a push producer that fails to start), one that raises later cuts the answer;
- `PushResponse`: chunked, pushed by a producer through a `Sink` from data callbacks (how the scheduler
  splices an engine's stream into the client's connection without a coroutine switch per chunk). The
  producer is told to pause and resume with the client connection's write buffer, and is aborted when
  the client goes away; when the server stops with its answer unfinished, a producer with a `cut()`
  method ends the answer itself (an error event, the last chunk) before the connection closes. A producer
  whose answer fails can break it off with `sink.cut()`: the connection closes without the last chunk, as
  uvicorn closes it when a streamed response's generator raises.

Requests on one connection are answered in order (pipelining is allowed, not parallelised; reading pauses
while 16 requests, or bodies of more than max(max_body_bytes, PIPELINE_BYTES), wait their turn). Handlers are
not cancelled when their client disconnects unless `cancel_on_disconnect` is set; a stream the client
abandons is closed either way. A handler still running when `stop` ends the drain is cancelled with
`STOPPING` as the message (`cancelled_by_stop`), and may still answer its client. A HEAD request gets the
head of the GET answer (or of the 404/405/500), with its Content-Length, never a body.

Requests are parsed strictly where laxness would let a client smuggle one request inside another or inject
header lines (RFC 9112, RFC 9110); these are answered 400 (501 for a transfer coding other than chunked)
and the connection closes:
- a CR or LF anywhere in the head other than in a CRLF line end, or any other control character except
  HTAB (NUL included); obs-fold (a field line starting with whitespace); a field name that is not a token
  (whitespace before the colon included);
- Transfer-Encoding other than exactly `chunked`, or together with Content-Length, or in HTTP/1.0; a
  Content-Length that is not plain digits, or repeated with different values;
- a chunk size that is not plain hex, chunk data not followed by CRLF; a trailer section over
  `MAX_HEAD_BYTES` (431) or with stray CR/LF/control characters (trailer fields are dropped).
A chunked body in more than `MANY_CHUNKS` chunks averaging under `MIN_CHUNK_BYTES` bytes is refused the same
way (400): parsing it would cost far more than its size says.

When the server closes a connection after an answer (an error, `Connection: close`, shutting down) while the
client may still be sending (a body over `max_body_bytes`, say), it does not reset the connection, which
could destroy the answer before the client reads it: it half-closes (FIN after the answer) and discards what
still arrives, up to `LINGER_S` seconds or `LINGER_BYTES` bytes, or until the client closes too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

from baton.http1.fields import FIELD_BYTES, chunk_size, connection_options
from baton.http1.reading import ReusedBufferProtocol

try:  # the kernel's unsent/unacknowledged bytes of a TCP socket (Linux): progress of a slow reader
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):
    fcntl = None  # type: ignore[assignment]
    _SIOCOUTQ = None

log = logging.getLogger("baton.http1.server")

MAX_HEAD_BYTES = 64 * 1024  # the request line and header fields; also the trailer section of a chunked body
# Each chunk of a chunked body costs the parser a few microseconds of Python whatever its size, and the body
# limit counts only data: 4 MiB in 2-byte chunks took seconds of the event loop's time. So past MANY_CHUNKS
# chunks (a client writing a small body as it produces it, a piece at a time, stays under that) a body whose
# chunks average under MIN_CHUNK_BYTES bytes is refused (400). A body then has at most max_body_bytes /
# MIN_CHUNK_BYTES chunks: at the 64 MiB default, under a second of parsing in all, where 2-byte chunks would
# take minutes.
MANY_CHUNKS = 4096
MIN_CHUNK_BYTES = 256
# Requests read ahead of the one being answered (pipelining) wait in `pending`. Reading pauses while 16 of
# them wait, or while their bodies come to more than max(max_body_bytes, PIPELINE_BYTES): without the
# second bound one connection behind a slow handler could hold 16 bodies at the limit. This floor leaves
# pipelines of small bodies under a small limit (16 at up to 64 KiB) to the count alone, which bounds them
# well enough, rather than pausing and resuming reading for every other request.
PIPELINE_BYTES = 1024 * 1024
LINGER_S = 2.0  # after a closing answer, how long what the client still sends is read and dropped
LINGER_BYTES = 64 * 1024 * 1024  # ... and how much of it (an over-limit body at the default limit fits)
# Header fields in one request head at most (431 beyond): each becomes a dict entry, and a 64 KiB head of
# tiny fields would otherwise hold a megabyte per request while it waits.
MAX_HEADER_FIELDS = 256
IDLE_TIMEOUT_S = 75.0  # longer than clients' keep-alive expiry, so a client never reuses a connection we close
# A client that stops reading while its answer is being written (its connection's write buffer stays full
# and nothing of what is queued for it, in this process or in the kernel's send queue, goes out) for this
# long is cut off, as by nginx's send_timeout: a pushed stream is aborted, so an engine slot held for it is
# given back, instead of waiting for as long as the client keeps its socket open. Any progress starts the
# time again, however slowly the client reads.
SEND_TIMEOUT_S = 60.0
# A request must arrive whole (head and body) within this long of its first byte, else it is answered 408
# and the connection closed: a client trickling a byte now and then would otherwise hold its connection
# and buffer for as long as it likes (the idle timeout restarts with every byte). Time in which the
# server does not read (its pipeline full) or owes the client a 100 Continue does not count.
RECEIVE_TIMEOUT_S = 60.0
SWEEP_INTERVAL_S = 5.0
# The message of the cancellation `HttpServer.stop` gives a handler still running when the drain (and
# `after_s`) ran out, so that it can tell that from its client going away (`cancelled_by_stop`); and how
# long such handlers then get to write an answer of their own (an explicit 503, say) before the close.
STOPPING = "baton.http1.server: the server is stopping"
STOP_ANSWER_S = 1.0
_REASONS = {s.value: s.phrase for s in HTTPStatus}

# RFC 9110 5.6.2, lower-case (names are checked once lower-cased): deleting these from all the names of a
# head, joined, leaves nothing when each is a token
_TCHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"


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

    def cut(self, data: bytes = b"") -> None:
        """End the answer broken, as a server whose response generator raised mid-body does (uvicorn closes
        the connection): `data` (and the head, if not sent yet) goes out, then the connection closes without
        the last chunk, so the client sees a body cut short."""


class Producer(Protocol):
    def start(self, sink: Sink) -> None:
        """Begin pushing: call `sink.write` for each piece and `sink.end` once at the end."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def abort(self) -> None:
        """The client went away (or the server is closing): stop and clean up; `sink` is dead."""

    # Optional: `cut()`, called instead of `abort` when the server stops with the answer unfinished (the
    # drain ran out): end it through `sink.end` (which still works) in a way the client can tell from a
    # complete answer, e.g. with an error event, and clean up.


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


def cancelled_by_stop(exc: BaseException) -> bool:
    """Whether `exc` is the cancellation `HttpServer.stop` gives a handler still running at its end, rather
    than its client going away: its client is still connected, and an answer the handler returns anyway is
    written before the connection closes (within STOP_ANSWER_S)."""
    return isinstance(exc, asyncio.CancelledError) and exc.args[:1] == (STOPPING,)


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, body, "application/json", headers)


def _plain_error(status: int, message: str) -> tuple[bytes, str]:
    return message.encode(), "text/plain; charset=utf-8"


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

    __slots__ = ("status", "message", "path")

    def __init__(self, status: int, message: str, path: str = "") -> None:
        self.status = status
        self.message = message
        self.path = path  # the request's path, if its request line was read before the fault


async def _step_once(chunks: AsyncIterator[bytes]) -> None:
    """Take one step of a stream that will not be sent: a generator that never started does not run its
    finally block on aclose(), and that block holds its accounting and cleanup."""
    with contextlib.suppress(Exception):
        await chunks.__anext__()  # type: ignore[attr-defined]


def _control_fault(lines: list[str]) -> str:
    """Why a head failed the control-character check (the error path: a slow scan is fine here)."""
    for number, line in enumerate(lines):
        bad = next((ch for ch in line if (ch < " " and ch != "\t") or ch == "\x7f"), None)
        if bad is not None:
            where = "the request line" if number == 0 else f"header field {line.partition(':')[0][:60]!r}"
            if bad in "\r\n":
                return f"bare CR or LF in {where} (lines must end with CRLF)"
            return f"{'NUL' if bad == chr(0) else f'control character {bad!r}'} in {where}"
    return "control character in the request head"


def _field_fault(line: str) -> str | None:
    """What is wrong with a header field line, if anything (the error path)."""
    if line[:1] in (" ", "\t"):
        return f"obs-fold (a header line starting with whitespace) is not allowed: {line[:100]!r}"
    name, sep, _ = line.partition(":")
    if not sep:
        return f"malformed header line {line[:100]!r}"
    if not name:
        return f"empty header field name in {line[:100]!r}"
    if name.lower().encode("latin-1").translate(None, _TCHARS):
        if name != name.rstrip(" \t"):
            return f"whitespace between header field name {name.rstrip()[:60]!r} and the colon is not allowed"
        return f"invalid header field name {name[:100]!r}"
    return None


def _repeat_fault(lines: list[str]) -> _BadRequest | None:
    """A framing field given more than once (the slow path, taken only when some field is repeated)."""
    lengths, codings = set(), 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.lower()
        if name == "content-length":
            lengths.add(value.strip(" \t"))
        elif name == "transfer-encoding":
            codings += 1
    if len(lengths) > 1:
        return _BadRequest(400, "conflicting Content-Length values")
    if codings > 1:
        return _BadRequest(501, "repeated Transfer-Encoding: only a single chunked coding is supported")
    return None


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
        self.write_paused_at = 0.0  # loop time the sweep last saw what is queued for the client change
        self.write_paused_size = 0  # how much that was (-1: not seen since the buffer filled)
        self.drain_waiter: asyncio.Future[None] | None = None
        self.producer: Producer | None = None
        self.receiving_since = 0.0  # loop time the request being received began to arrive (0: none)
        self.push_done: asyncio.Future[None] | None = None
        self.last_active = 0.0
        self.linger: asyncio.TimerHandle | None = None  # half-closed after a final answer, dropping input
        self.discarded = 0  # bytes dropped while lingering
        self.pending_bytes = 0  # the sum of the bodies in `pending`
        self._head_scan = 0  # how much of `buf` was searched for the end of a head already
        # request being parsed
        self._method = self._path = self._query = self._version = ""
        self._headers = Headers()
        self._keep = True
        self._need = 0
        self._chunked = bytearray()  # a chunked body's data so far: one buffer, not an object per chunk
        self._chunks = 0
        self._size = 0
        self._scan = 0  # where the search for the trailer section's end resumes

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_active = self.server.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.pending.clear()
        self.pending_bytes = 0
        if self.linger is not None:
            self.linger.cancel()
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
        self.write_paused_size = -1  # the next sweep reads it and starts the clock
        if self.producer is not None:
            self.producer.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.producer is not None:
            self.producer.resume()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data: memoryview) -> None:  # valid during the call only (ReusedBufferProtocol)
        if self.dead:  # nothing more is parsed: dropped
            if self.linger is not None:
                self.discarded += len(data)
                if self.discarded > LINGER_BYTES:
                    self._close()
            return
        now = self.last_active = self.server.loop.time()
        self.buf += data
        self._feed()
        if not self.receiving_since and (self.buf or self.state != _HEAD) and not self.dead:
            self.receiving_since = now  # a request has begun to arrive (`RECEIVE_TIMEOUT_S`)

    def eof_received(self) -> bool | None:
        if self.server.cancel_on_disconnect:
            return False  # a client that stops sending has gone away: close, and cancel what it asked for
        # the client half-closed: finish what it asked for, then close
        self.eof = True
        if self.task is None:
            self._close()
        return True

    # ------------------------------------------------------------------ parsing
    def _feed(self) -> None:
        """Parse what is buffered; a request that cannot be parsed is answered in its turn (`_fail`)."""
        try:
            self._parse()
        except _BadRequest as exc:
            self._fail(exc.status, exc.message)
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(400, f"malformed request: {exc}")

    def _parse(self) -> None:
        buf = self.buf
        # no more requests are taken while the pipeline is full (reading paused): what is buffered waits, and
        # is parsed when reading resumes (`_serve`), so one large read cannot queue thousands of requests
        while not self.closed and not self.dead and not self.paused_reading:
            state = self.state
            if state == _HEAD:
                while buf[:2] == b"\r\n":  # blank lines before a request line are ignored (RFC 9112 2.2)
                    del buf[:2]
                    self._head_scan = 0
                # what earlier reads brought was searched already: a head trickling in a byte at a time would
                # otherwise cost a search of the whole buffer per byte
                end = buf.find(b"\r\n\r\n", max(0, self._head_scan - 3))
                if end < 0:
                    if buf:  # empty after each whole request: the usual case costs this one test
                        if len(buf) > MAX_HEAD_BYTES:
                            raise _BadRequest(431, "request header fields too large")
                        # A head ended with bare LFs is never taken for a whole one: it would wait for the 408.
                        # With no CRLF CRLF in the buffer, an LF LF or LF CRLF in it is such an end (its LF bare).
                        start = max(0, self._head_scan - 2)
                        if buf.find(b"\n\n", start) >= 0 or buf.find(b"\n\r\n", start) >= 0:
                            raise _BadRequest(400, _control_fault(bytes(buf).decode("latin-1").split("\r\n")))
                        self._head_scan = len(buf)
                    return
                if end > MAX_HEAD_BYTES:
                    raise _BadRequest(431, "request header fields too large")
                self._head_scan = 0
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
                try:
                    size = chunk_size(bytes(buf[:end]))
                except ValueError as exc:
                    raise _BadRequest(400, str(exc)) from None
                del buf[:end + 2]
                if size == 0:
                    self._scan = 0
                    self.state = _TRAILER
                else:
                    self._size += size
                    if self._size > self.server.max_body_bytes:
                        raise _BadRequest(413, f"request body exceeds {self.server.max_body_bytes} bytes")
                    self._chunks += 1
                    if self._chunks > MANY_CHUNKS and self._size < self._chunks * MIN_CHUNK_BYTES:
                        raise _BadRequest(400, f"chunked body in too many small chunks: {self._chunks} chunks "
                                          f"averaging {self._size // self._chunks} bytes; send larger chunks")
                    self._need = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                need = self._need
                if len(buf) < need + 2:
                    return
                if buf[need:need + 2] != b"\r\n":
                    raise _BadRequest(400, "chunk data not followed by CRLF")
                self._chunked += buf[:need]
                del buf[:need + 2]
                self.state = _CHUNK_SIZE
            else:  # _TRAILER: field lines, then an empty line; checked like the head, bounded, dropped
                if buf[:2] == b"\r\n":  # no trailer fields (the usual case)
                    end = -2
                else:
                    end = buf.find(b"\r\n\r\n", self._scan)
                    if end < 0 or end > MAX_HEAD_BYTES:
                        if len(buf) > MAX_HEAD_BYTES:
                            raise _BadRequest(431, f"request trailer section exceeds {MAX_HEAD_BYTES} bytes")
                        self._scan = max(0, len(buf) - 3)  # the part searched is not searched again
                        return
                    trailer = bytes(buf[:end + 2])
                    if len(trailer.translate(None, FIELD_BYTES)) != 2 * trailer.count(b"\r\n"):
                        raise _BadRequest(400, "bare CR or LF, or a control character, in the trailer section")
                del buf[:end + 4]
                body = bytes(self._chunked)
                self._chunked = bytearray()
                self._complete(body)

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        # One C pass over the whole head: every CR and LF is in a CRLF line end (so no line hides inside
        # another), and there is no NUL or other control character but HTAB.
        if len(head.translate(None, FIELD_BYTES)) != 2 * len(lines) - 2:
            raise _BadRequest(400, _control_fault(lines))
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(400, f"malformed request line {lines[0][:100]!r}") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, f"unsupported protocol {version[:20]!r}")
        if len(lines) - 1 > MAX_HEADER_FIELDS:
            raise _BadRequest(431, f"more than {MAX_HEADER_FIELDS} header fields")
        headers = Headers()
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, _field_fault(line) or f"malformed header line {line[:100]!r}")
            dict.__setitem__(headers, key.lower(), value.strip(" \t"))
        # every name a token (no whitespace before the colon, no obs-fold): one C pass over all of them
        if "".join(headers).encode("latin-1").translate(None, _TCHARS) or dict.__contains__(headers, ""):
            raise _BadRequest(400, next(filter(None, map(_field_fault, lines[1:])), "invalid header field name"))
        if len(headers) != len(lines) - 1:  # some field is repeated: not a framing one
            fault = _repeat_fault(lines)
            if fault is not None:
                raise fault
            # a repeated Connection is one list (RFC 9110 5.3): a close in any of its lines counts
            values = [v.strip(" \t") for k, _, v in (line.partition(":") for line in lines[1:])
                      if k.lower() == "connection"]
            if len(values) > 1:
                dict.__setitem__(headers, "connection", ", ".join(values))
        path, _, query = target.partition("?")
        self._method, self._path, self._query, self._version = method, path, query, version
        self._headers = headers
        options = connection_options(dict.get(headers, "connection", ""))
        self._keep = "keep-alive" in options if version == "HTTP/1.0" else "close" not in options
        coding = dict.get(headers, "transfer-encoding")
        length_field = dict.get(headers, "content-length")
        if coding is not None:  # RFC 9112 6.1: a smuggling vector unless unambiguous
            if length_field is not None:
                raise _BadRequest(400, "both Transfer-Encoding and Content-Length")
            if coding.lower() != "chunked":
                raise _BadRequest(501, f"unsupported Transfer-Encoding {coding[:100]!r}: only chunked is")
            if version == "HTTP/1.0":
                raise _BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            self._chunked = bytearray()
            self._chunks = self._size = 0
            self.state = _CHUNK_SIZE
        else:
            if length_field is None:
                length = 0
            elif length_field.isdigit() and length_field.isascii():  # int() would take "+5", "1_0", " 5"
                length = int(length_field)
            else:
                raise _BadRequest(400, f"invalid Content-Length {length_field[:40]!r}")
            if length > self.server.max_body_bytes:
                raise _BadRequest(413, f"request body exceeds {self.server.max_body_bytes} bytes")
            if length == 0:
                self.state = _HEAD
                return
            self._need = length
            self.state = _BODY
        if dict.get(headers, "expect", "").lower() == "100-continue":
            if self.task is None:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self.continue_owed = True  # not inside the answer being written: after it

    def _complete(self, body: bytes) -> None:
        self.state = _HEAD
        self.receiving_since = 0.0
        self.continue_owed = False  # the body is here: no 100 Continue is owed for it any more
        self._enqueue(Request(self._method, self._path, self._query, self._version, self._headers, body, self._keep))
        self._path = ""  # a fault in the next request's head is not charged to this one's path
        if not self._keep:
            self.dead = True  # the client said this is its last request: nothing after it is read

    def _enqueue(self, item: Request | _Failure) -> None:
        if self.task is None:
            self.task = self.server.loop.create_task(self._serve(item))
        else:
            self.pending.append(item)
            if isinstance(item, Request):
                self.pending_bytes += len(item.body)
            if ((len(self.pending) >= 16 or self.pending_bytes > self.server.pipeline_bytes)
                    and not self.paused_reading and self.transport is not None):
                self.paused_reading = True
                self.transport.pause_reading()

    def _fail(self, status: int, message: str) -> None:
        """A request we cannot parse: answered in its turn, then the connection closes."""
        self.dead = True
        self.buf.clear()
        self._enqueue(_Failure(status, message, self._path))

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def _close_after_answer(self) -> None:
        """Close once the last answer is written, without a reset: closing a socket with unread input makes
        the kernel reset the connection, and the client, often still sending (a body over the limit, say),
        gets the reset instead of the answer. So send a FIN after the answer and keep reading, dropping what
        arrives, until the client closes too or `LINGER_S` / `LINGER_BYTES` run out."""
        transport = self.transport
        if self.closed or transport is None:
            return
        if self.eof or self.linger is not None or not transport.can_write_eof():
            self._close()
            return
        self.dead = True  # nothing more is parsed or answered
        self.buf.clear()
        self.pending.clear()
        self.pending_bytes = 0
        self.discarded = 0
        try:
            transport.write_eof()
        except OSError:  # the client reset the connection already (ENOTCONN): nothing to linger for
            self._close()
            return
        if self.paused_reading:
            self.paused_reading = False
            transport.resume_reading()
        self.linger = self.server.loop.call_later(LINGER_S, self._close)

    # ------------------------------------------------------------------ answering
    async def _serve(self, item: Request | _Failure) -> None:
        try:
            while True:
                keep = False
                if isinstance(item, _Failure):
                    body, ctype = self.server.error_body(item.status, item.message)
                    extra = self.server.refused(item.path, item.status, None)
                    self._write(_head(item.status, ctype, extra, len(body), False) + body)
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
                    self._close_after_answer()
                    break
                if not self.pending:
                    if self.continue_owed:
                        self.continue_owed = False
                        self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        self.receiving_since = self.server.loop.time()  # its body can come only now
                    if self.eof:
                        self._close()
                    break
                if self.write_paused:
                    # The client is not reading its answers: the next one waits, so the pipeline fills, reading
                    # pauses, and what is queued for it stays bounded however many requests it sends.
                    try:
                        await self._drain()
                    except ConnectionError:
                        break
                    if self.closed:
                        break
                item = self.pending.popleft()
                if isinstance(item, Request):
                    self.pending_bytes -= len(item.body)
                # as reading paused when the pipeline was full, it resumes once half of it has emptied
                if (self.paused_reading and len(self.pending) < 8 and self.transport is not None
                        and self.pending_bytes <= self.server.pipeline_bytes // 2):
                    self.paused_reading = False
                    self.transport.resume_reading()
                    if self.receiving_since:  # the time reading was paused is not the client's
                        self.receiving_since = self.server.loop.time()
                    if self.buf:
                        self._feed()  # requests read before the pause, not parsed yet
        finally:
            self.task = None

    async def _answer(self, request: Request) -> bool:
        """Answer one request; returns whether the connection may serve another."""
        keep = request.keep_alive and not self.server.draining
        handler = self.server.routes.get((request.method, request.path))
        head_only = request.method == "HEAD"  # whatever answers it, a HEAD answer has no body
        if handler is None and head_only:  # HEAD on a GET route: the GET answer's head
            handler = self.server.routes.get(("GET", request.path))
        if handler is None:
            methods = [m for (m, p) in self.server.routes if p == request.path]
            status = 405 if methods else 404
            body, ctype = self.server.error_body(status, f"{request.method} is not allowed on {request.path}" if methods
                                                 else f"no such path: {request.path}")
            extra = {**({"Allow": ", ".join(methods)} if methods else {}),
                     **(self.server.refused(request.path, status, request.headers) or {})}
            self._write_whole(Response(status, body, ctype, extra or None), request, keep)
            return keep
        try:
            response = await handler(request)
        except Exception:
            log.exception("request handler failed: %s %s", request.method, request.path)
            extra = self.server.refused(request.path, 500, request.headers)
            self._write_whole(Response(500, *self.server.error_body(500, "internal server error"), extra), request, False)
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
        """`response` with its body; for HEAD, its head alone (with the body's Content-Length)."""
        body = response.body
        head = _head(response.status, response.content_type, response.headers, len(body), keep, request.version)
        self._write(head if request.method == "HEAD" else head + body)

    async def _iterate(self, response: StreamResponse, request: Request, keep: bool) -> bool:
        chunks = response.chunks
        chunked = request.version != "HTTP/1.0"
        head = b""
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
        except Exception as exc:
            if isinstance(exc, ConnectionError) and self.closed:
                return False  # the client went away; closing the iterator below runs its accounting
            if head:  # the stream failed before its first piece: a clean error instead of a cut 200, as for a push
                body, ctype = self.server.error_body(500, "internal server error")
                self._write(_head(500, ctype, None, len(body), False) + body)
            raise  # the stream's own source failed: the answer is cut, and the connection closes
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
                    body, ctype = self.server.error_body(500, "internal server error")
                    self._write(_head(500, ctype, None, len(body), False) + body)
                raise
            sink.flush_head()  # a producer that wrote nothing yet: the client gets the status line now
            if paused_before and self.write_paused and not done.done() and self.producer is not None:
                producer.pause()
            await done
        finally:
            self.producer = None
            self.push_done = None
        return keep and not self.closed and not sink.broken


class _PushSink:
    """Where a producer writes; `end` finishes the response, `cut` breaks it off. The response head goes out
    with the first write (one write, one TCP segment for head and first token)."""

    __slots__ = ("conn", "done", "chunked", "head", "broken")

    def __init__(self, conn: _Connection, done: asyncio.Future[None], chunked: bool, head: bytes) -> None:
        self.conn = conn
        self.done = done
        self.chunked = chunked
        self.head = head
        self.broken = False  # `cut`: the connection closes after what was written

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

    def cut(self, data: bytes = b"") -> None:
        if self.done.done():
            return
        head, self.head = self.head, b""
        if head or data:
            self.conn._write(head + (_frame(data) if data and self.chunked else data))  # noqa: SLF001
        self.broken = True  # no last chunk: `_push` tells the connection to close after this
        self.done.set_result(None)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes of a connection's answers not yet taken by the client: the transport's buffer, plus the kernel's
    send queue (written, not yet acknowledged) where the platform says (Linux's SIOCOUTQ). The kernel's part
    moves as soon as the client reads anything; the transport's only once much of that queue has drained."""
    queued = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and _SIOCOUTQ is not None:
        try:
            queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            pass
    return queued


class HttpServer:
    """Routes `(method, path)` to handlers and serves them on one listening socket."""

    def __init__(self, *, max_body_bytes: int = 64 * 1024 * 1024, cancel_on_disconnect: bool = False,
                 error_body: Callable[[int, str], tuple[bytes, str]] | None = None,
                 on_refused: Callable[[str, int, Headers | None], Mapping[str, str] | None] | None = None) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        # Told of every request the server answers with an error of its own instead of its handler's
        # (unparseable, too large, a handler that raised) before that answer is written: (its path, "" if
        # unread; the status; its headers, None if unread), e.g. so an application's request counts include
        # them. It may return headers to add to the answer (e.g. a request id).
        self.on_refused = on_refused
        # The body and content type of the answers the server itself makes (400, 404, 405, 413, 431, 500,
        # 501, 505): plain text unless the application speaks another error shape (the scheduler: OpenAI's).
        self.error_body = error_body or _plain_error
        self.max_body_bytes = max_body_bytes
        self.pipeline_bytes = max(max_body_bytes, PIPELINE_BYTES)  # reading pauses past this much waiting
        self.cancel_on_disconnect = cancel_on_disconnect
        self.connections: set[_Connection] = set()
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def refused(self, path: str, status: int, headers: Headers | None) -> dict[str, str] | None:
        if self.on_refused is None:
            return None
        try:
            extra = self.on_refused(path, status, headers)
        except Exception:  # counting must never break answering
            log.exception("on_refused failed")
            return None
        return dict(extra) if extra else None

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
            if (conn.receiving_since and not conn.paused_reading and not conn.continue_owed and not conn.dead
                    and now - conn.receiving_since > RECEIVE_TIMEOUT_S):
                conn.receiving_since = 0.0
                log.warning("a client sent too little of its request in %.0f s: answered 408", RECEIVE_TIMEOUT_S)
                conn._fail(408, f"the request did not arrive whole within {RECEIVE_TIMEOUT_S:g}s of its "  # noqa: SLF001
                           "first byte")
            elif conn.task is None and not conn.closed and now - conn.last_active > IDLE_TIMEOUT_S:
                conn._close()  # noqa: SLF001 - the server owns its connections
            elif (conn.write_paused or conn.closed) and conn.transport is not None:
                # a full write buffer, or a closed connection still here: its flush has not ended, however little
                # is left (under the high-water mark nothing pauses writing), and can stall as well
                size = _unsent(conn.transport)
                if size != conn.write_paused_size:  # the client took some of it: progress
                    conn.write_paused_at, conn.write_paused_size = now, size
                elif now - conn.write_paused_at > SEND_TIMEOUT_S:
                    log.warning("a client took none of its answer for %.0f s: connection closed", SEND_TIMEOUT_S)
                    conn.transport.abort()  # what is buffered cannot be delivered: drop it (connection_lost follows)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def _busy(self) -> bool:
        return any(c.task is not None for c in self.connections)

    async def _wait_idle(self, deadline: float) -> None:
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self, grace_s: float = 10.0, *, before_cancel: Callable[[], object] | None = None,
                   after_s: float = 1.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace_s`), then close every connection.

        Handlers still running when the grace period ends are cancelled (and push producers cut or aborted).
        If `before_cancel` is given, it is called once at that point first (not at all if every handler
        finished in time), as a last chance to make them answer (the scheduler answers the requests still
        waiting in its queues 503), and they get up to `after_s` more seconds to write those answers; only
        then is the rest cancelled. An awaitable it returns is awaited (within `after_s`); an exception from
        it is logged and shutting down goes on. The cancellation carries STOPPING (`cancelled_by_stop`): a
        handler that answers anyway (a 503 rather than a connection closed on its client) has its answer
        written, within STOP_ANSWER_S; a handler that lets the cancellation through leaves its client with
        no answer."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.task is None:
                conn._close()  # noqa: SLF001
        await self._wait_idle(time.monotonic() + grace_s)
        if before_cancel is not None and self._busy():
            deadline = time.monotonic() + after_s
            try:
                result = before_cancel()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, max(0.0, after_s))
            except TimeoutError:
                log.warning("before_cancel did not finish within %.1f s", after_s)
            except Exception:
                log.exception("before_cancel failed")
            await self._wait_idle(deadline)
        for conn in list(self.connections):
            producer, conn.producer = conn.producer, None
            if producer is not None:
                # a producer that can say why its answer ends here does (its sink writes before the close)
                cut = getattr(producer, "cut", None)
                (cut if cut is not None and not conn.closed else producer.abort)()
            if conn.push_done is not None and not conn.push_done.done():
                conn.push_done.set_result(None)
            if conn.task is not None:
                conn.task.cancel(STOPPING)
        answering = [c.task for c in self.connections if c.task is not None]
        if answering:  # the handlers that answer the cancellation write their answers before the close
            await asyncio.wait(answering, timeout=STOP_ANSWER_S)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()  # still not done: its connection closes now, with no answer of its own
            conn._close()  # noqa: SLF001
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

