"""baton.http1.client over real sockets on 127.0.0.1: against the http1 server, against small raw asyncio servers
that send hand-written answers (exact framing, split writes, early closes, silence), and against the standard
library's http.server."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import re
import socket
import struct
import threading
import time

import baton.http1.client as client_mod
import pytest
from baton.http1.client import ClosedBeforeAnswer, HttpClient, ProtocolError
from baton.http1.server import (
    PushResponse,
    Response,
    StreamResponse,
    text_response,
)
from http1_harness import HOST, http_client, run, serving, until


# ---------------------------------------------------------------------------------------------- helpers
class Scripted:
    """A raw TCP server; `script(srv, reader, writer, index)` plays one connection (index counts connections)."""

    def __init__(self, script):
        self.script = script
        self.accepted = 0
        self.requests: list[tuple[int, str, dict, bytes]] = []  # (connection index, request line, headers, body)
        self.eofs: set[int] = set()  # connections on which the client closed its side
        self.tasks: set[asyncio.Task] = set()
        self.port = 0
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._on_connection, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _on_connection(self, reader, writer):
        self.tasks.add(asyncio.current_task())
        index = self.accepted
        self.accepted += 1
        try:
            await self.script(self, reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.tasks.discard(asyncio.current_task())

    async def read_request(self, reader, index):
        """One request off the connection, or None when the client closed it."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.eofs.add(index)
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((index, lines[0], headers, body))
        return lines[0], headers, body

    async def wait_eof(self, reader, index):
        """Block until the client closes the connection (recording it)."""
        while await reader.read(65536):
            pass
        self.eofs.add(index)


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def keep_answering(body_for=lambda line: line.encode()):
    """A script answering every request on the connection with Content-Length (the body echoes the request line)."""

    async def script(srv, reader, writer, index):
        while (req := await srv.read_request(reader, index)) is not None:
            writer.write(answer(body_for(req[0])))
            await writer.drain()

    return script


async def write_slowly(writer, pieces):
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.002)  # separate TCP segments: the client parses across reads


class Collector:
    """relay() callbacks that record what they get."""

    def __init__(self):
        self.data: list[bytes] = []
        self.ends = 0
        self.errors: list[Exception] = []
        self.done = asyncio.Event()

    def on_data(self, data):
        assert self.ends == 0 and not self.errors, "data after the end"
        self.data.append(data)

    def on_end(self):
        self.ends += 1
        self.done.set()

    def on_error(self, exc):
        self.errors.append(exc)
        self.done.set()

    @property
    def body(self):
        return b"".join(self.data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- answers
def test_request_against_the_serving():
    async def echo(request):
        return Response(201, request.body[::-1], "text/plain", {"X-Seen": request.headers.get("x-echo", "")})

    async def main():
        async with serving({("POST", "/echo"): echo}) as server, http_client() as client:
            status, headers, body = await client.request("POST", HOST, server.port, "/echo", b"abc",
                                                         {"X-Echo": "hi"})
            assert (status, body) == (201, b"cba")
            assert headers["x-seen"] == "hi" and headers["content-type"] == "text/plain"  # names lower-cased
            resp = await client.open("POST", HOST, server.port, "/echo", b"xyz")
            assert resp.status == 201 and resp.content_type == "text/plain"
            assert await resp.read() == b"zyx"
            big = bytes(range(256)) * 4096  # 1 MiB: over the size the client sends with its head in one write
            status, _, body = await client.request("POST", HOST, server.port, "/echo", big)
            assert status == 201 and body == big[::-1]

    run(main())


def test_complete_reports_a_fully_read_answer():
    async def main():
        async with Scripted(keep_answering()) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/a")
            body = await resp.read()  # the whole body arrived (and the connection went back to the pool)
            assert body == b"GET /a HTTP/1.1"
            assert resp.complete

    run(main())


def test_request_head_as_sent():
    async def main():
        async with Scripted(keep_answering()) as srv, http_client() as client:
            await client.request("GET", HOST, srv.port, "/p?q=1", headers={"X-A": "b", "Accept": "*/*"})
            await client.request("POST", HOST, srv.port, "/post", b"payload")
            (_, line1, h1, b1), (_, line2, h2, b2) = srv.requests
            assert line1 == "GET /p?q=1 HTTP/1.1"
            assert h1["host"] == f"{HOST}:{srv.port}" and h1["content-length"] == "0"
            assert h1["x-a"] == "b" and h1["accept"] == "*/*" and b1 == b""
            assert line2 == "POST /post HTTP/1.1" and h2["content-length"] == "7" and b2 == b"payload"

    run(main())


def test_content_length_body_split_across_writes():
    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            await write_slowly(writer, [b"HTTP/1.1 200 OK\r\nConte", b"nt-Length: 12\r\nX-Y: z\r\n\r", b"\nhello",
                                        b" ", b"world!"])

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            status, headers, body = await client.request("GET", HOST, srv.port, "/")
            assert (status, headers["x-y"], body) == (200, "z", b"hello world!")
            assert headers["content-length"] == "12"
            status, _, body = await client.request("GET", HOST, srv.port, "/")
            assert body == b"hello world!"
            assert srv.accepted == 1

    run(main())


CHUNKED_PIECES = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n",
    b"5\r\nhel", b"lo\r\n",                 # a chunk split inside its data
    b"1", b"0;ext=1\r\n",                    # a size line split, with an extension
    b"0123456789abcdef", b"\r", b"\n",       # the CRLF after data split
    b"3\r\nxyz\r\n4\r\n1234\r\n",            # two chunks in one write
    b"0\r\nX-Trailer: t\r\n", b"\r\n",       # trailer, then the end
]
CHUNKED_BODY = b"hello0123456789abcdefxyz1234"


def test_chunked_body_split_across_writes():
    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            await write_slowly(writer, CHUNKED_PIECES)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            status, headers, body = await client.request("GET", HOST, srv.port, "/")
            assert status == 200 and body == CHUNKED_BODY
            assert "x-trailer" not in headers
            resp = await client.open("GET", HOST, srv.port, "/")
            assert resp.content_type == "text/event-stream"
            first = await resp.first()
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            await asyncio.wait_for(got.done.wait(), 3)
            assert first + got.body == CHUNKED_BODY and got.ends == 1 and not got.errors
            resp.release()
            await client.request("GET", HOST, srv.port, "/")
            assert srv.accepted == 1  # chunked answers ended cleanly: one connection served all three

    run(main())


def test_body_until_close():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        await write_slowly(writer, [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno ", b"length, ", b"read to close"])
        writer.close()

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            status, _, body = await client.request("GET", HOST, srv.port, "/")
            assert (status, body) == (200, b"no length, read to close")
            status, _, body = await client.request("GET", HOST, srv.port, "/")
            assert body == b"no length, read to close"
            assert srv.accepted == 2  # such a connection cannot be reused

    run(main())


def test_interim_1xx_answers_are_skipped():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        await write_slowly(writer, [b"HTTP/1.1 100 Continue\r\n\r\n",
                                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                                    answer(b"final", "202 Accepted", "X-Final: 1\r\n")])
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"again"))  # all in one segment too
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            status, headers, body = await asyncio.wait_for(client.request("POST", HOST, srv.port, "/", b"x"), 3)
            assert (status, body) == (202, b"final")
            assert headers["x-final"] == "1" and "link" not in headers
            status, _, body = await asyncio.wait_for(client.request("POST", HOST, srv.port, "/", b"y"), 3)
            assert (status, body) == (200, b"again")
            assert srv.accepted == 1  # the interim answers left the connection in step

    run(main())


def test_204_without_a_body_completes_and_keeps_the_connection():
    # RFC 9112 section 6.3: 1xx, 204 and 304 answers end at the head, whatever their headers say
    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            status, headers, body = await asyncio.wait_for(client.request("DELETE", HOST, srv.port, "/x"), 2)
            assert (status, headers["x-a"], body) == (204, "1", b"")
            await asyncio.wait_for(client.request("DELETE", HOST, srv.port, "/y"), 2)
            assert srv.accepted == 1

    run(main())


@pytest.mark.parametrize("method, status", [
    ("HEAD", "200 OK"), ("GET", "304 Not Modified"), ("DELETE", "204 No Content"),
], ids=["head", "304", "204"])
def test_no_body_answers_ignore_transfer_encoding(method, status):
    # RFC 9112 section 6.3: the answer to a HEAD, and any 204 or 304, ends at its head, Transfer-Encoding or not
    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            writer.write(f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n".encode())

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            code, headers, body = await asyncio.wait_for(client.request(method, HOST, srv.port, "/x"), 2)
            assert (code, headers["x-a"], body) == (int(status[:3]), "1", b"")
            resp = await asyncio.wait_for(client.open(method, HOST, srv.port, "/y"), 2)
            assert resp.complete and await asyncio.wait_for(resp.first(), 2) == b""
            resp.release()
            assert srv.accepted == 1  # no body was waited for: the connection stayed in step

    run(main())


@pytest.mark.parametrize("framing, body", [
    (b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", b"hello"),  # repeated with the same value
    (b"Content-Length: 005\r\n\r\nhello", b"hello"),
    (b"Content-Length: 0\r\n\r\n", b""),
    (b"Transfer-Encoding: chunked\r\n\r\n003\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n", b"abc0123456789"),
    (b"Transfer-Encoding: chunked\r\n\r\n3 ;a=1;b\r\nabc\r\n00;end=\"x\"\r\n\r\n", b"abc"),  # BWS, extensions
    (b"Transfer-Encoding: chunked\r\n\r\n3\t;a\r\nabc\r\n000\r\nX-T: 1\r\n\r\n", b"abc"),
    (b"Transfer-Encoding: chunked\r\n\r\n00000000000000003\r\nabc\r\n0\r\n\r\n", b"abc"),  # over 16 characters
], ids=["repeated-length", "length-leading-zeros", "length-zero", "chunk-leading-zeros-and-upper-hex",
        "chunk-extensions", "chunk-extension-after-tab-and-trailer", "chunk-size-line-over-16-characters"])
def test_unusual_but_valid_framing_is_read(framing, body):
    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\n" + framing)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            for _ in range(2):
                status, _, got = await asyncio.wait_for(client.request("GET", HOST, srv.port, "/"), 2)
                assert (status, got) == (200, body)
            assert srv.accepted == 1  # each answer ended exactly where it should

    run(main())


def test_answer_without_content_type_defaults_to_json():
    async def main():
        async with Scripted(keep_answering()) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            assert resp.content_type == "application/json"
            await resp.read()

    run(main())


@pytest.mark.parametrize("answer, match", [
    (b"220 smtp.example.org ESMTP ready\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n", "not followed by CRLF"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz;x=1\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    # int() takes each of these; the answers below are framed as if it had (each would be read as 3)
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0X3;x\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\x0b\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n-0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a\x00\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+0000000000000003\r\nabc\r\n0\r\n\r\n",
     "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nhello", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0_3\r\n\r\nhello", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nhello", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nhello", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello", "conflicting Content-Length"),
], ids=["not-http", "chunk-without-crlf", "bad-chunk-size", "bad-chunk-size-with-extension", "negative-chunk-size",
        "chunk-size-0x", "chunk-size-0X-with-extension", "chunk-size-plus", "chunk-size-leading-space",
        "chunk-size-underscore", "chunk-size-vertical-tab", "last-chunk-minus-zero", "chunk-extension-with-nul",
        "chunk-size-plus-over-16-characters",
        "length-minus-1", "length-plus-3", "length-underscore", "length-list", "length-empty",
        "length-conflicting"])
def test_unparseable_answer_is_a_protocol_error(answer, match):
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(answer)
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            with pytest.raises(ProtocolError, match=match) as err:
                await client.request("GET", HOST, srv.port, "/")
            assert isinstance(err.value, ConnectionError)
            await until(lambda: 0 in srv.eofs, what="the client to drop the connection")

    run(main())


def test_chunk_size_lines_are_read_as_the_server_reads_them():
    # 1*HEXDIG, optional BWS and extensions, no control characters: what baton.http1.server takes; int(line, 16)
    # alone would also take a sign, blanks, '_' and a 0x prefix, and a size line over 16 characters skips the
    # client's fast path
    valid = re.compile(rb"[0-9A-Fa-f]+[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
    digits = [b"0", b"00", b"3", b"03", b"a", b"A", b"1f", b"1_0", b"0" * 16 + b"3", b"0" * 17]
    prefixes = [b"", b"+", b"-", b" ", b"\t", b"0x", b"0X", b"_", b"\x0c"]
    suffixes = [b"", b" ", b"\t", b"\x0b", b"_", b";x=1", b" ;x", b"\t;x=\"y\"", b";\x00", b";\x7f"]
    for line in (p + d + s for d in digits for p in prefixes for s in suffixes):
        size = int(line.split(b";")[0].rstrip(b" \t"), 16) if valid.fullmatch(line) else None
        data = b"x" * (size or 0)
        buf = bytearray(line + b"\r\n" + (data + b"\r\n0\r\n" if size else b"") + b"\r\n")
        out: list[bytes] = []
        if size is None:
            with pytest.raises(ValueError, match="malformed chunk size line"):
                client_mod._take_chunks(buf, out)
        else:
            assert client_mod._take_chunks(buf, out) and out == ([data] if size else []), line
            assert buf == b"\r\n", line  # taken up to the last chunk's size line


def test_many_chunks_in_one_read_with_extensions_arrive_in_order():
    events = [b"data: {\"n\": %d}\n\n" % i for i in range(40)]
    framed = b"".join(b"%x;ext=%d\r\n%s\r\n" % (len(e), i, e) if i % 3 == 0 else b"%x\r\n%s\r\n" % (len(e), e)
                      for i, e in enumerate(events))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            writer.write(head + framed + b"0\r\n\r\n")  # one write: every chunk in the same read
            await writer.drain()

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            status, _, body = await client.request("GET", HOST, srv.port, "/")
            assert status == 200 and body == b"".join(events)
            await client.request("GET", HOST, srv.port, "/")
            assert srv.accepted == 1  # the answer ended cleanly

    run(main())


def test_oversized_answer_head_is_a_protocol_error():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"v" * 70000 + b"\r\n")
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            with pytest.raises(ProtocolError):
                await client.request("GET", HOST, srv.port, "/")

    run(main())


# ---------------------------------------------------------------------------------------------- pooling
def test_released_connections_are_reused():
    async def main():
        async with Scripted(keep_answering()) as srv, http_client() as client:
            for i in range(3):
                _, _, body = await client.request("GET", HOST, srv.port, f"/{i}")
                assert body == f"GET /{i} HTTP/1.1".encode()
            resp = await client.open("GET", HOST, srv.port, "/open")
            assert await resp.read() == b"GET /open HTTP/1.1"
            resp = await client.open("GET", HOST, srv.port, "/relay")
            first = await resp.first()
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            await asyncio.wait_for(got.done.wait(), 3)
            assert first + got.body == b"GET /relay HTTP/1.1"
            resp.release()
            await client.request("GET", HOST, srv.port, "/last")
            assert srv.accepted == 1
            assert [r[0] for r in srv.requests] == [0] * 6

    run(main())


def test_unfinished_answer_is_closed_not_reused():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        if index == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf-")
            await srv.wait_eof(reader, index)
            return
        writer.write(answer(b"fresh"))
        while await srv.read_request(reader, index) is not None:
            writer.write(answer(b"fresh"))

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            assert await resp.first() == b"half-"
            assert not resp.complete
            resp.release()
            resp.release()  # idempotent
            await until(lambda: 0 in srv.eofs, what="the client to close the unfinished connection")
            assert (await client.request("GET", HOST, srv.port, "/"))[2] == b"fresh"
            assert srv.accepted == 2

    run(main())


def test_connection_close_answer_is_not_reused():
    async def script(srv, reader, writer, index):
        # says "close" but leaves the socket open: the client must not send another request on it
        while await srv.read_request(reader, index) is not None:
            writer.write(answer(b"bye", extra="Connection: close\r\n"))

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            assert (await client.request("GET", HOST, srv.port, "/1"))[2] == b"bye"
            assert (await client.request("GET", HOST, srv.port, "/2"))[2] == b"bye"
            assert srv.accepted == 2 and [r[0] for r in srv.requests] == [0, 1]
            await until(lambda: 0 in srv.eofs, what="the client to close the first connection")

    run(main())


def test_http10_answer_is_not_reused():
    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            assert (await client.request("GET", HOST, srv.port, "/1"))[2] == b"old"
            assert (await client.request("GET", HOST, srv.port, "/2"))[2] == b"old"
            assert srv.accepted == 2

    run(main())


def test_bytes_after_the_answer_make_the_connection_unusable():
    async def script(srv, reader, writer, index):
        while await srv.read_request(reader, index) is not None:
            writer.write(answer(b"ok") + b"HTTP/1.1 200 OK\r\n")  # a stray second answer

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            assert (await client.request("GET", HOST, srv.port, "/1"))[2] == b"ok"
            assert (await client.request("GET", HOST, srv.port, "/2"))[2] == b"ok"
            assert srv.accepted == 2

    run(main())


def test_concurrent_requests_use_separate_connections_then_reuse_them():
    arrived = []
    everyone_in = asyncio.Event()

    async def barrier(request):
        arrived.append(request.query)
        if len(arrived) % 4 == 0:
            everyone_in.set()
        await everyone_in.wait()  # nobody is answered until all four are in: they must be concurrent
        return text_response(request.query)

    async def main():
        async with serving({("GET", "/b"): barrier}) as server, http_client() as client:
            results = await asyncio.gather(*(client.request("GET", HOST, server.port, f"/b?{i}") for i in range(4)))
            assert [r[2] for r in results] == [b"0", b"1", b"2", b"3"]
            assert len(server.connections) == 4
            results = await asyncio.gather(*(client.request("GET", HOST, server.port, f"/b?{i}") for i in range(4)))
            assert [r[2] for r in results] == [b"0", b"1", b"2", b"3"]
            assert len(server.connections) == 4  # the same four, from the pool

    run(main())


def test_expired_idle_connection_is_not_reused():
    async def main():
        async with Scripted(keep_answering()) as srv, http_client(keepalive_s=0.05) as client:
            await client.request("GET", HOST, srv.port, "/1")
            await asyncio.sleep(0.1)  # past keepalive_s
            await client.request("GET", HOST, srv.port, "/2")
            assert srv.accepted == 2
            await until(lambda: 0 in srv.eofs, what="the expired connection to be closed")

    run(main())


def test_server_closing_an_idle_keep_alive_connection():
    closed = asyncio.Event()

    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(answer(b"conn%d" % index))  # keep-alive by default...
        await writer.drain()
        writer.close()  # ...but the server closes it right after (its own idle expiry)
        closed.set()

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            assert (await client.request("GET", HOST, srv.port, "/"))[2] == b"conn0"
            await closed.wait()
            assert (await client.request("GET", HOST, srv.port, "/"))[2] == b"conn1"
            assert srv.accepted == 2

    run(main())


def test_a_get_on_a_reused_connection_closed_before_any_answer_byte_is_retried_once():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(answer(b"conn%d" % index))
        if index == 0:
            # the next request arrives on a connection the server has decided to drop: closed unanswered
            await srv.read_request(reader, index)
            return
        while await srv.read_request(reader, index) is not None:
            writer.write(answer(b"conn%d" % index))

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            assert (await client.request("GET", HOST, srv.port, "/one"))[2] == b"conn0"
            assert (await client.request("GET", HOST, srv.port, "/two"))[2] == b"conn1"
            assert [(r[0], r[1].split()[1]) for r in srv.requests] == [(0, "/one"), (0, "/two"), (1, "/two")]
            assert (await client.request("GET", HOST, srv.port, "/three"))[2] == b"conn1"

    run(main())


def test_a_post_on_a_reused_connection_closed_before_any_answer_byte_is_not_sent_again():
    """The server may have read the POST and worked on it before its connection died (a worker that
    crashed, a proxy that cut it): sending it again would run it twice. The caller gets the error."""
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(answer(b"conn%d" % index))
        if index == 0:
            await srv.read_request(reader, index)  # read, worked on, then dropped unanswered
            return
        while await srv.read_request(reader, index) is not None:
            writer.write(answer(b"conn%d" % index))

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            assert (await client.request("POST", HOST, srv.port, "/", b"one"))[2] == b"conn0"
            with pytest.raises(ClosedBeforeAnswer):  # a ConnectionError the caller can tell from a dead server
                await client.request("POST", HOST, srv.port, "/", b"charge me once")
            assert [(r[0], r[3]) for r in srv.requests] == [(0, b"one"), (0, b"charge me once")]

    run(main())


def test_fresh_connection_closed_before_answering_is_not_retried():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)  # and close without a word

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            with pytest.raises(ConnectionError):
                await client.request("GET", HOST, srv.port, "/")
            assert srv.accepted == 1

    run(main())


def test_reused_connection_dying_mid_answer_is_not_retried():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(answer(b"first"))
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # part of an answer, then gone
        await writer.drain()

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            assert (await client.request("GET", HOST, srv.port, "/"))[2] == b"first"
            with pytest.raises(ConnectionError) as err:
                await client.request("GET", HOST, srv.port, "/")
            assert "mid-answer" in str(err.value)
            assert srv.accepted == 1

    run(main())


# ---------------------------------------------------------------------------------------------- first() / relay()
def test_first_then_relay_delivers_the_rest_and_one_on_end():
    step1, step2 = asyncio.Event(), asyncio.Event()

    async def stream(request):
        async def chunks():
            yield b"first;"
            await step1.wait()
            yield b"second;"
            yield b"third;"
            await step2.wait()
            yield b"fourth."

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/s"): stream}) as server, http_client() as client:
            resp = await client.open("GET", HOST, server.port, "/s")
            assert resp.status == 200 and resp.headers["transfer-encoding"] == "chunked"
            assert await resp.first() == b"first;"
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            assert got.data == []  # nothing more has arrived yet
            step1.set()
            await until(lambda: got.body == b"second;third;", what="the relayed middle")
            assert got.ends == 0
            step2.set()
            await asyncio.wait_for(got.done.wait(), 3)
            assert got.body == b"second;third;fourth." and got.ends == 1 and got.errors == []
            assert resp.complete
            await asyncio.sleep(0.02)
            assert got.ends == 1
            resp.release()
            _, _, body = await client.request("GET", HOST, server.port, "/s")  # reused connection
            assert body == b"first;second;third;fourth."
            assert len(server.connections) == 1

    run(main())


def test_relay_after_the_body_arrived_delivers_it_and_ends_at_once():
    go = asyncio.Event()

    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\naaa\r\n")
        await go.wait()
        writer.write(b"3\r\nbbb\r\n3\r\nccc\r\n0\r\n\r\n")
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            assert await resp.first() == b"aaa"
            go.set()
            await until(lambda: resp.complete, what="the rest of the body")
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            # synchronous: everything that was buffered, then the end
            assert got.data == [b"bbbccc"] and got.ends == 1 and got.errors == []
            resp.release()

    run(main())


def test_first_on_an_empty_body_and_relay_ends_immediately():
    async def main():
        async with Scripted(keep_answering(lambda line: b"")) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            assert await resp.first() == b""
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            assert got.data == [] and got.ends == 1
            resp.release()
            await client.request("GET", HOST, srv.port, "/")
            assert srv.accepted == 1

    run(main())


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_relay_calls_on_error_once_when_the_server_dies_mid_body(framing):
    die = asyncio.Event()

    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await die.wait()
        writer.write(b"5\r\nabcde\r\n" if framing == "chunked" else b"abcde")
        await writer.drain()
        # and the server process dies: the connection closes mid-body

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            assert await resp.first() == b"0123456789"
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            die.set()
            await asyncio.wait_for(got.done.wait(), 3)
            await asyncio.sleep(0.02)
            assert got.body == b"abcde"
            assert got.ends == 0 and len(got.errors) == 1
            assert isinstance(got.errors[0], ConnectionError)
            assert not resp.complete
            resp.release()

    run(main())


def test_read_raises_when_the_server_dies_mid_body_and_the_connection_is_dropped():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        if index == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            await writer.drain()
            return  # closes
        writer.write(answer(b"fine"))
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            with pytest.raises(ConnectionError) as err:
                await resp.read()
            assert "mid-answer" in str(err.value)
            assert (await client.request("GET", HOST, srv.port, "/"))[2] == b"fine"
            assert srv.accepted == 2

    run(main())


def test_first_raises_when_the_server_closes_before_any_body_byte():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            with pytest.raises(ConnectionError):
                await resp.first()

    run(main())


def test_body_until_close_cut_by_a_reset_is_an_error():
    # without Content-Length or chunked framing an orderly close ends the body; a reset means it was cut short
    crash = asyncio.Event()

    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await writer.drain()
        await crash.wait()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # TCP RST, not an orderly close

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            assert await resp.first() == b"partial"
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            crash.set()
            await asyncio.wait_for(got.done.wait(), 3)
            assert got.ends == 0 and len(got.errors) == 1 and isinstance(got.errors[0], ConnectionError)

    run(main())


# ---------------------------------------------------------------------------------------------- backpressure
def test_pause_and_resume_reach_the_server_producer():
    total = 8 * 1024 * 1024

    class Pusher:
        def __init__(self):
            self.piece = bytes(range(256)) * 256
            self.sink = None
            self.sent = 0
            self.paused = False
            self.pauses = 0
            self.resumes = 0
            self.paused_event = asyncio.Event()

        def start(self, sink):
            self.sink = sink
            self.pump()

        def pump(self):
            while not self.paused and self.sent < total:
                self.sent += len(self.piece)
                self.sink.write(self.piece)
            if self.sent >= total and not self.paused:
                self.sink.end()

        def pause(self):
            self.pauses += 1
            self.paused = True
            self.paused_event.set()

        def resume(self):
            self.resumes += 1
            self.paused = False
            self.pump()

        def abort(self):
            raise AssertionError("aborted")

    pushers = []

    async def push(request):
        pushers.append(Pusher())
        return PushResponse(pushers[-1], content_type="application/octet-stream")

    async def main():
        async with serving({("GET", "/p"): push}) as server, http_client() as client:
            resp = await client.open("GET", HOST, server.port, "/p")
            first = await resp.first()
            resp.pause()
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            producer = pushers[0]
            await until(lambda: producer.paused_event.is_set(), what="the server's producer to be paused")
            sent = producer.sent
            assert sent < total
            received = len(first) + len(got.body)
            await asyncio.sleep(0.05)
            assert len(first) + len(got.body) == received  # paused: nothing is read
            resp.resume()
            await asyncio.wait_for(got.done.wait(), 10)
            assert got.ends == 1 and not got.errors
            body = first + got.body
            assert len(body) == total and body == producer.piece * (total // len(producer.piece))
            assert producer.resumes >= 1
            resp.release()

    run(main())


def test_a_paused_answer_is_not_timed_out(monkeypatch):
    monkeypatch.setattr(client_mod, "SWEEP_INTERVAL_S", 0.02)
    go = asyncio.Event()
    sent = asyncio.Event()

    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nabcd")
        await go.wait()
        writer.write(b"efgh")
        await writer.drain()
        sent.set()
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client(read_timeout=0.1) as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            assert await resp.first() == b"abcd"
            resp.pause()
            await asyncio.sleep(0.3)  # three read timeouts, with sweeps every 20 ms
            go.set()
            await sent.wait()
            resp.resume()
            assert await resp.read() == b"efgh"

    run(main())


# ---------------------------------------------------------------------------------------------- timeouts / failures
def test_read_timeout_when_the_server_never_answers(monkeypatch):
    monkeypatch.setattr(client_mod, "SWEEP_INTERVAL_S", 0.02)

    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        await srv.wait_eof(reader, index)  # silence

    async def main():
        async with Scripted(script) as srv, http_client(read_timeout=0.15) as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.request("GET", HOST, srv.port, "/")
            assert 0.14 <= time.monotonic() - started < 1.5
            await until(lambda: 0 in srv.eofs, what="the timed-out connection to be closed")

    run(main())


def test_read_timeout_mid_body(monkeypatch):
    monkeypatch.setattr(client_mod, "SWEEP_INTERVAL_S", 0.02)

    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client(read_timeout=0.15) as client:
            resp = await client.open("GET", HOST, srv.port, "/")
            with pytest.raises(TimeoutError):
                await resp.read()
            resp = await client.open("GET", HOST, srv.port, "/")
            assert await resp.first() == b"abc"
            got = Collector()
            resp.relay(got.on_data, got.on_end, got.on_error)
            await asyncio.wait_for(got.done.wait(), 3)
            assert got.ends == 0 and len(got.errors) == 1 and isinstance(got.errors[0], TimeoutError)
            resp.release()

    run(main())


def test_request_timeout():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        if index == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nslow")  # head in time, body never
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client() as client:  # default read timeout: 600 s
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.request("GET", HOST, srv.port, "/", timeout=0.2)
            assert 0.19 <= time.monotonic() - started < 1.0
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.request("GET", HOST, srv.port, "/", timeout=0.2)  # covers the body as well
            assert time.monotonic() - started < 1.0
            await until(lambda: srv.eofs == {0, 1}, what="both timed-out connections to be closed")
            assert not client.busy and not any(client.idle.values())

    run(main())


def test_open_timeout_covers_the_head():
    async def script(srv, reader, writer, index):
        await srv.read_request(reader, index)
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv, http_client() as client:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.open("GET", HOST, srv.port, "/", timeout=0.2)
            assert time.monotonic() - started < 1.0

    run(main())


def test_connect_to_a_closed_port_fails_quickly():
    async def main():
        port = free_port()
        async with http_client() as client:
            started = time.monotonic()
            with pytest.raises(ConnectionError):
                await client.request("GET", HOST, port, "/")
            assert time.monotonic() - started < 1.0

    run(main())


def test_connect_timeout():
    async def main():
        listener = socket.socket()
        listener.bind((HOST, 0))
        listener.listen(0)  # never accepted, and its tiny queue is filled below: new connects hang
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((HOST, port))
            fillers.append(s)
        try:
            async with http_client(connect_timeout=0.2) as client:
                started = time.monotonic()
                with pytest.raises(TimeoutError) as err:
                    await client.request("GET", HOST, port, "/")
                assert "connect" in str(err.value)
                assert time.monotonic() - started < 1.0
        finally:
            for s in fillers:
                s.close()
            listener.close()

    run(main())


@pytest.mark.parametrize("reused", [False, True])
def test_close_fails_requests_in_flight(reused):
    waiting = asyncio.Event()

    async def script(srv, reader, writer, index):
        if reused:
            await srv.read_request(reader, index)
            writer.write(answer(b"warm-up"))
        await srv.read_request(reader, index)
        waiting.set()  # holds the request unanswered
        await srv.wait_eof(reader, index)

    async def main():
        async with Scripted(script) as srv:
            client = HttpClient()
            if reused:
                await client.request("GET", HOST, srv.port, "/warm-up")
            pending = asyncio.create_task(client.request("GET", HOST, srv.port, "/held"))
            await asyncio.wait_for(waiting.wait(), 3)
            await client.close()
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(pending, 2)
            assert srv.accepted == 1  # not sent again on a new connection after close()

    run(main())


# ---------------------------------------------------------------------------------------------- an independent server
def test_against_the_standard_library_http_server():
    peers = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            peers.append(self.client_address)
            out = body.upper()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def do_GET(self):
            peers.append(self.client_address)
            self.send_error(404, "nothing here")

        def log_message(self, *args):
            pass

    async def main():
        httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        port = httpd.server_address[1]
        try:
            async with http_client() as client:
                for word in (b"alpha", b"beta", b"gamma"):
                    status, headers, body = await client.request("POST", HOST, port, "/up", word)
                    assert (status, body, headers["content-type"]) == (200, word.upper(), "text/plain")
                status, _, body = await client.request("GET", HOST, port, "/missing")
                assert status == 404 and b"nothing here" in body
            assert len(set(peers)) == 1  # keep-alive: one client port for all four requests
        finally:
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()

    run(main())
