"""baton.http1.server over real sockets on 127.0.0.1: raw bytes (exact framing, malformed input, pipelining),
the http1 client, and the standard library's http.client/urllib as an independent client."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import http.client
import itertools
import socket
import struct
import time
import urllib.error
import urllib.request

import baton.http1.server as server_mod
import pytest
from baton.http1.client import HttpClient
from baton.http1.reading import READ_BUFFER_BYTES
from baton.http1.server import (
    Headers,
    HttpServer,
    PushResponse,
    Request,
    Response,
    StreamResponse,
    cancelled_by_stop,
    json_response,
    text_response,
)
from http1_harness import HOST, run, serving, until


# ---------------------------------------------------------------------------------------------- helpers
async def connect(port, rcvbuf=None):
    if rcvbuf is None:
        return await asyncio.open_connection(HOST, port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    return await asyncio.open_connection(sock=sock)


def reset_on_close(writer):
    """Make `writer.close()` send a TCP RST (an abortive close) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def close(writer):
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


class Raw:
    def __init__(self, status, reason, headers, body, chunks, head):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.chunks = chunks
        self.head = head

    def __repr__(self):
        return f"Raw({self.status} {self.reason!r}, {self.headers!r}, {self.body[:200]!r})"


async def read_head(reader, timeout=3.0):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head[:-4].decode("latin-1").split("\r\n")
    version, status, reason = (lines[0].split(" ", 2) + [""])[:3]
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        assert sep, f"bad header line {line!r}"
        headers[key.strip().lower()] = value.strip()
    return int(status), reason, headers, head


async def read_chunked(reader, timeout=3.0):
    async def go():
        chunks = []
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line[:-2].split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return chunks
            chunks.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n"

    return await asyncio.wait_for(go(), timeout)


async def read_response(reader, timeout=3.0):
    status, reason, headers, head = await read_head(reader, timeout)
    chunks = None
    if headers.get("transfer-encoding") == "chunked":
        chunks = await read_chunked(reader, timeout)
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    else:
        body = await asyncio.wait_for(reader.read(), timeout)
    return Raw(status, reason, headers, body, chunks, head)


async def expect_eof(reader, timeout=3.0):
    rest = await asyncio.wait_for(reader.read(), timeout)
    assert rest == b"", f"expected the server to close, got {rest[:200]!r}"


def get(path, extra=""):
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def post(path, body, extra=""):
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def echo(request: Request) -> Response:
    return Response(200, request.body, "application/octet-stream", {"X-Method": request.method})


async def numbered(request: Request) -> Response:
    return text_response(request.query)


ROUTES = {("POST", "/echo"): echo, ("GET", "/n"): numbered}


# ---------------------------------------------------------------------------------------------- basics
def test_whole_response_status_headers_and_body():
    async def hello(request):
        return Response(201, b'{"a": 1}', headers={"X-Thing": "v1"})

    async def main():
        async with serving({("GET", "/hello"): hello}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/hello"))
            resp = await read_response(reader)
            assert resp.status == 201 and resp.reason == "Created"
            assert resp.body == b'{"a": 1}'
            assert resp.headers["content-length"] == "8"
            assert resp.headers["content-type"] == "application/json"
            assert resp.headers["x-thing"] == "v1"
            assert resp.headers["server"] == "baton"
            assert email.utils.parsedate_to_datetime(resp.headers["date"]).tzinfo is not None
            assert "connection" not in resp.headers  # HTTP/1.1 default: keep-alive
            assert "transfer-encoding" not in resp.headers
            await close(writer)

    run(main())


def test_request_fields_reach_the_handler():
    seen = []

    async def capture(request):
        seen.append(request)
        return json_response(b"{}", 202, {"X-A": "b"})

    async def main():
        async with serving({("PUT", "/items/7"): capture}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"PUT /items/7?x=1&y=two HTTP/1.1\r\nHost: t\r\nX-Custom:   padded value  \r\n"
                         b"X-Dup: first\r\nx-dup: second\r\nContent-Length: 5\r\n\r\nhello")
            resp = await read_response(reader)
            assert resp.status == 202 and resp.headers["x-a"] == "b" and resp.body == b"{}"
            await close(writer)
        (req,) = seen
        assert (req.method, req.path, req.query, req.version) == ("PUT", "/items/7", "x=1&y=two", "HTTP/1.1")
        assert req.body == b"hello"
        assert req.headers.get("X-CUSTOM") == "padded value" and req.headers["x-custom"] == "padded value"
        assert "X-Custom" in req.headers and "x-missing" not in req.headers
        assert req.headers.get("x-missing", "dflt") == "dflt"
        assert req.headers["X-Dup"] == "second"  # a repeated header keeps its last value

    run(main())


def test_headers_mapping_is_case_insensitive():
    headers = Headers()
    dict.__setitem__(headers, "content-type", "text/plain")
    assert headers["Content-Type"] == "text/plain"
    assert headers.get("CONTENT-TYPE") == "text/plain"
    assert "Content-TYPE" in headers and "content-length" not in headers and 3 not in headers
    assert headers.get("Nope") is None
    with pytest.raises(KeyError):
        headers["Nope"]


def test_text_response_helper_sets_plain_text():
    async def text(request):
        return text_response("héllo", 418)

    async def main():
        async with serving({("GET", "/t"): text}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/t"))
            resp = await read_response(reader)
            assert resp.status == 418 and resp.reason == "I'm a Teapot"
            assert resp.headers["content-type"] == "text/plain; charset=utf-8"
            assert resp.body == "héllo".encode()
            await close(writer)

    run(main())


# ---------------------------------------------------------------------------------------------- keep-alive / pipelining
def test_keep_alive_serves_several_requests_on_one_connection():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            for i in range(5):
                writer.write(post("/echo", b"body-%d" % i))
                resp = await read_response(reader)
                assert resp.status == 200 and resp.body == b"body-%d" % i
                assert "connection" not in resp.headers
                assert len(server.connections) == 1  # the very same connection answered each time
            await close(writer)

    run(main())


def test_pipelined_requests_are_answered_in_order():
    async def slow_then_fast(request):
        n = int(request.query)
        for _ in range(40 - n):  # earlier requests take longer: answering out of order would show
            await asyncio.sleep(0)
        return text_response(str(n))

    async def main():
        async with serving({("GET", "/n"): slow_then_fast}) as server:
            reader, writer = await connect(server.port)
            # 40 requests in one write: more than the 16 after which the server stops reading for a while
            writer.write(b"".join(get(f"/n?{i}") for i in range(40)))
            got = [(await read_response(reader)).body for _ in range(40)]
            assert got == [str(i).encode() for i in range(40)]
            writer.write(get("/n?40"))  # reading was resumed
            assert (await read_response(reader)).body == b"40"
            await close(writer)

    run(main())


def test_pipelined_requests_with_bodies_fed_one_byte_at_a_time():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            stream = (post("/echo", b"first")
                      + b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nsec\r\n3;x=y\r\nond\r\n0\r\n\r\n"
                      + get("/n?third")
                      + post("/echo", b""))
            for i in range(len(stream)):
                writer.write(stream[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)
            bodies = [(await read_response(reader)).body for _ in range(4)]
            assert bodies == [b"first", b"second", b"third", b""]
            await close(writer)

    run(main())


def test_stray_blank_line_between_requests_is_ignored():
    # RFC 9112 section 2.2: a server SHOULD ignore at least one empty line (CRLF) received before the request-line;
    # some clients send an extra CRLF after a POST body
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(post("/echo", b"abc") + b"\r\n")
            first = await read_response(reader)
            assert (first.status, first.body) == (200, b"abc")
            writer.write(get("/n?2"))
            second = await read_response(reader)
            assert (second.status, second.body) == (200, b"2")
            await close(writer)

    run(main())


def test_pipelined_connection_close_answers_that_request_then_closes():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/n?1") + get("/n?2", "Connection: close\r\n") + get("/n?3"))
            first = await read_response(reader)
            assert (first.status, first.body) == (200, b"1")
            assert "connection" not in first.headers  # only the second request asked to close
            second = await read_response(reader)
            assert (second.status, second.body) == (200, b"2")
            assert second.headers["connection"] == "close"
            await expect_eof(reader)  # the third request, sent after "close", is not answered
            await close(writer)

    run(main())


def test_pipelined_valid_requests_before_a_malformed_one_are_answered():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/n?1") + get("/n?2") + b"THIS IS NOT HTTP\r\n\r\n")
            assert (await read_response(reader)).body == b"1"
            assert (await read_response(reader)).body == b"2"
            third = await read_response(reader)
            assert third.status == 400
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_malformed_request_behind_an_inflight_one_still_gets_its_400():
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request):
        entered.set()
        await release.wait()
        return text_response("slow done")

    async def main():
        async with serving({("GET", "/slow"): slow}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/slow"))
            await asyncio.wait_for(entered.wait(), 3)
            writer.write(b"BROKEN\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # let the server read the broken request while /slow is in flight
            release.set()
            first = await read_response(reader)
            assert (first.status, first.body) == (200, b"slow done")
            second = await read_response(reader)
            assert second.status == 400 and second.headers["connection"] == "close"
            await expect_eof(reader)
            await close(writer)

    run(main())


# ---------------------------------------------------------------------------------------------- request bodies
def test_chunked_request_body_split_across_writes():
    seen = []

    async def capture(request):
        seen.append(request)
        return Response(200, b"%d" % len(request.body))

    async def main():
        async with serving({("POST", "/up"): capture}) as server:
            reader, writer = await connect(server.port)
            pieces = [b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n",
                      b"5\r\nhel", b"lo\r\n", b"1", b"0;name=value\r\n", b"0123456789abcdef\r", b"\n",
                      b"0\r\nX-Trailer: yes\r\n", b"\r\n"]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"21"
            assert seen[0].body == b"hello0123456789abcdef"
            writer.write(get("/up"))  # the connection is in a clean state after the trailer: next request parses
            assert (await read_response(reader)).status == 405
            await close(writer)

    run(main())


def test_chunked_body_in_many_tiny_chunks_is_refused_400_at_once():
    """Each chunk costs the parser microseconds whatever its size, and the body limit counts only data: a body
    in 2-byte chunks held the event loop for seconds (and a bytes object per chunk: 111 MiB for 4 MiB). Past
    MANY_CHUNKS chunks averaging under MIN_CHUNK_BYTES bytes it is refused, as soon as that is so."""
    calls = []

    async def capture(request):
        calls.append(request)
        return Response(200)

    async def main():
        async with serving({("POST", "/up"): capture}) as server:
            reader, writer = await connect(server.port)
            request = (b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"2\r\nxx\r\n" * (1024 * 1024 // 2) + b"0\r\n\r\n")  # 1 MiB in 2-byte chunks
            writer.write(request)
            resp = await read_response(reader)
            assert resp.status == 400 and resp.headers["connection"] == "close"
            # refused at the 4097th chunk, not after reading the whole body
            assert b"chunked body in too many small chunks: 4097 chunks averaging 2 bytes" in resp.body, resp.body
            await expect_eof(reader)
            assert calls == []
            await close(writer)

    run(main())


@pytest.mark.parametrize("size, chunk", [
    (4 * 1024 * 1024, 4096),  # an ordinary chunked upload
    (2 * 1024 * 1024, 256),   # 8192 chunks, averaging exactly MIN_CHUNK_BYTES
    (4096, 1),                # MANY_CHUNKS chunks, however small
], ids=["4MiB-in-4KiB", "2MiB-in-256B", "4096-in-1B"])
def test_chunked_body_in_chunks_of_reasonable_size_or_number_arrives_whole(size, chunk):
    seen = []

    async def capture(request):
        seen.append(request.body)
        return Response(200, b"%d" % len(request.body))

    async def main():
        async with serving({("POST", "/up"): capture}) as server:
            reader, writer = await connect(server.port)
            data = (bytes(range(251)) * (size // 251 + 1))[:size]  # 251: no two chunks alike
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"".join(b"%x\r\n%s\r\n" % (chunk, data[i:i + chunk]) for i in range(0, size, chunk))
                         + b"0\r\n\r\n")
            resp = await read_response(reader, timeout=10)
            assert resp.status == 200 and resp.body == b"%d" % size
            assert seen == [data] and type(seen[0]) is bytes
            writer.write(get("/up"))  # the connection goes on
            assert (await read_response(reader)).status == 405
            await close(writer)

    run(main())


def test_expect_100_continue_is_answered_before_the_body_is_sent():
    calls = []

    async def capture(request):
        calls.append(request.body)
        return Response(200, request.body)

    async def main():
        async with serving({("POST", "/up"): capture}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            assert calls == []  # the handler waits for the body
            writer.write(b"hello world")
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"hello world"
            # chunked bodies get the interim answer too
            writer.write(b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-Continue\r\n\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"2\r\nok\r\n0\r\n\r\n")
            assert (await read_response(reader)).body == b"ok"
            await close(writer)

    run(main())


def test_expect_100_continue_for_an_oversized_body_gets_413_instead():
    async def main():
        async with serving(ROUTES, max_body_bytes=10) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /echo HTTP/1.1\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
            resp = await read_response(reader)
            assert resp.status == 413 and resp.headers["connection"] == "close"
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_interim_100_for_a_pipelined_request_does_not_land_inside_the_previous_answer():
    go = asyncio.Event()

    async def stream(request):
        async def chunks():
            yield b"first"
            await go.wait()
            yield b"second"

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/stream"): stream, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/stream") + b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
            status, _, headers, _ = await read_head(reader)
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            go.set()
            assert await read_chunked(reader) == [b"first", b"second"]
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"abc")
            assert (await read_response(reader)).body == b"abc"
            await close(writer)

    run(main())


def test_no_100_continue_follows_the_answer_of_a_pipelined_request_whose_body_came_without_waiting():
    async def slow(request):
        await asyncio.sleep(0.05)
        return text_response("slow")

    async def main():
        async with serving({("GET", "/slow"): slow, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            # the body follows its Expect head at once, while /slow is in flight: no 100 is owed any more
            writer.write(get("/slow") + b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 2\r\n\r\nhi")
            assert (await read_response(reader)).body == b"slow"
            second = await read_response(reader)
            assert (second.status, second.body) == (200, b"hi")
            writer.write(get("/n?3"))
            status, _, _, _ = await read_head(reader)
            assert status == 200  # not a stray "100 Continue" ahead of it
            assert await asyncio.wait_for(reader.readexactly(1), 3) == b"3"
            await close(writer)

    run(main())


def test_body_at_the_limit_is_accepted():
    async def main():
        async with serving(ROUTES, max_body_bytes=100) as server:
            reader, writer = await connect(server.port)
            writer.write(post("/echo", b"x" * 100))
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"x" * 100
            writer.write(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n32\r\n" + b"y" * 50
                         + b"\r\n32\r\n" + b"z" * 50 + b"\r\n0\r\n\r\n")
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"y" * 50 + b"z" * 50
            await close(writer)

    run(main())


@pytest.mark.parametrize("limit, request_bytes", [
    (100, b"POST /up HTTP/1.1\r\nContent-Length: 101\r\n\r\n"),  # refused on the head alone
    (16, b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n" + b"a" * 16 + b"\r\n1\r\nb\r\n"),
], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413_and_the_connection_closes(limit, request_bytes):
    calls = []

    async def capture(request):
        calls.append(request)
        return Response(200)

    async def main():
        async with serving({("POST", "/up"): capture}, max_body_bytes=limit) as server:
            reader, writer = await connect(server.port)
            writer.write(request_bytes)
            resp = await read_response(reader)
            assert resp.status == 413 and resp.headers["connection"] == "close"
            assert str(limit).encode() in resp.body
            await expect_eof(reader)
            assert calls == []
            await close(writer)

    run(main())


def send_all_then_read(port, head, piece, total):
    """A client that sends its whole request before it reads the answer (as http.client does), over a
    blocking socket: an answer the server sends early must not be lost to a connection reset."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(head)
        for _ in range(total // len(piece)):
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


MIB = 1024 * 1024


@pytest.mark.parametrize("status, head, piece", [
    (413, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (16 * MIB), b"x" * MIB),
    (413, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"%x\r\n%s\r\n" % (MIB - 10, b"x" * (MIB - 10))),
    (431, b"GET /n HTTP/1.1\r\nHost: t\r\n", b"X-Filler: %s\r\n" % (b"v" * (MIB - 12))),
], ids=["content-length", "chunked", "head"])
def test_client_still_sending_a_refused_request_gets_the_answer_not_a_reset(status, head, piece):
    async def main():
        async with serving(ROUTES, max_body_bytes=64 * 1024) as server:
            for _ in range(2):
                answer = await asyncio.to_thread(send_all_then_read, server.port, head, piece, 16 * MIB)
                assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
                assert b"\r\nConnection: close\r\n" in answer

    run(main())


def test_reading_after_a_closing_answer_stops_after_linger_seconds(monkeypatch):
    monkeypatch.setattr(server_mod, "LINGER_S", 0.5)

    async def main():
        async with serving(ROUTES, max_body_bytes=10) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /echo HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            resp = await read_response(reader)
            assert resp.status == 413 and resp.headers["connection"] == "close"
            await expect_eof(reader)  # a FIN after the answer ...
            answered = time.monotonic()
            assert len(server.connections) == 1  # ... while what the client still sends is read and dropped
            writer.write(b"x" * 1000)
            await until(lambda: not server.connections, what="the server to close after LINGER_S")
            assert time.monotonic() - answered >= 0.3
            await close(writer)

    run(main())


def test_reading_after_a_closing_answer_stops_after_linger_bytes(monkeypatch):
    monkeypatch.setattr(server_mod, "LINGER_BYTES", 100_000)

    async def main():
        async with serving(ROUTES, max_body_bytes=10) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /echo HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
            assert (await read_response(reader)).status == 413
            await expect_eof(reader)
            assert len(server.connections) == 1
            with contextlib.suppress(ConnectionError):
                writer.write(b"x" * 200_000)
                await writer.drain()
            await until(lambda: not server.connections, timeout=1.5, what="the server to close after LINGER_BYTES")
            await close(writer)

    run(main())


def test_a_client_closing_after_the_closing_answer_ends_the_linger_at_once():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/n?bye", "Connection: close\r\n"))
            assert (await read_response(reader)).body == b"bye"
            await expect_eof(reader)
            writer.write_eof()
            await until(lambda: not server.connections, timeout=1, what="the server to close when the client does")
            await close(writer)

    run(main())


@pytest.mark.parametrize("trailer", [
    b"X" * (100 * 1024),  # one line without an end
    b"".join(b"X-Trailer-%05d: %s\r\n" % (i, b"v" * 100) for i in range(700)),  # many lines, no empty one
], ids=["one-line", "many-lines"])
def test_trailer_section_over_the_limit_is_431(trailer):
    calls = []

    async def capture(request):
        calls.append(request)
        return Response(200)

    async def main():
        async with serving({("POST", "/up"): capture}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n" + trailer)
            resp = await read_response(reader)
            assert resp.status == 431 and b"trailer" in resp.body
            assert resp.headers["connection"] == "close"
            await expect_eof(reader)
            (conn,) = server.connections or (None,)
            assert conn is None or len(conn.buf) == 0  # nothing kept of it
            assert calls == []
            await close(writer)

    run(main())


def test_trailer_fields_fed_one_byte_at_a_time_are_dropped_and_the_next_request_parses():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            stream = (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2 ;ext=1\r\nhi\r\n0\r\n"
                      b"X-One: 1\r\nX-Two: \t2\r\n\r\n" + get("/n?next"))
            for i in range(len(stream)):
                writer.write(stream[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)
            assert (await read_response(reader)).body == b"hi"
            assert (await read_response(reader)).body == b"next"
            await close(writer)

    run(main())


# ---------------------------------------------------------------------------------------------- errors
def test_incomplete_head_over_the_limit_is_431():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"v" * 100) for i in range(700))  # ~84 KiB, no end
            assert len(filler) > server_mod.MAX_HEAD_BYTES
            writer.write(b"GET /n?1 HTTP/1.1\r\n" + filler)
            resp = await read_response(reader)
            assert resp.status == 431 and resp.reason == "Request Header Fields Too Large"
            assert resp.headers["connection"] == "close"
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_complete_head_over_the_limit_is_431():
    calls = []

    async def capture(request):
        calls.append(request)
        return Response(200)

    async def main():
        async with serving({("GET", "/n"): capture}) as server:
            reader, writer = await connect(server.port)
            filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"v" * 100) for i in range(700))
            writer.write(b"GET /n?1 HTTP/1.1\r\n" + filler + b"\r\n")  # the whole oversized head in one write
            resp = await read_response(reader)
            assert resp.status == 431
            await expect_eof(reader)
            assert calls == []

    run(main())


@pytest.mark.parametrize("raw", [
    b"GET /n\r\n\r\n",                                                 # no version
    b"GET  /n HTTP/1.1\r\n\r\n",                                       # two spaces
    b"GET /n HTTP/1.1 extra\r\n\r\n",                                  # four parts
    b"garbage\r\n\r\n",
    b"GET /n HTTP/1.1\r\nno-colon-here\r\n\r\n",                       # header line without a colon
    b"POST /echo HTTP/1.1\r\nContent-Length: ten\r\n\r\n",              # unparseable length
    b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n",               # negative length
    b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
])
def test_malformed_request_is_400_and_the_connection_closes(raw):
    calls = []

    async def capture(request):
        calls.append(request)
        return Response(200)

    async def main():
        async with serving({("GET", "/n"): capture, ("POST", "/echo"): capture}) as server:
            reader, writer = await connect(server.port)
            writer.write(raw)
            resp = await read_response(reader)
            assert resp.status == 400 and resp.reason == "Bad Request"
            assert resp.headers["connection"] == "close"
            assert resp.headers["content-type"] == "text/plain; charset=utf-8"
            await expect_eof(reader)
            assert calls == []
            # the server itself is fine
            reader2, writer2 = await connect(server.port)
            writer2.write(get("/n?ok"))
            assert (await read_response(reader2)).status == 200
            await close(writer2)
            await close(writer)

    run(main())


@pytest.mark.parametrize("raw, reason", [
    (b"GET /n HTTP/1.1\r\nX-Request-Id: abc\nSet-Cookie: injected=1\r\n\r\n", b"bare CR or LF"),
    (b"GET /n HTTP/1.1\r\nX-Request-Id: abc\rSet-Cookie: injected=1\r\n\r\n", b"bare CR or LF"),
    (b"GET /n HTTP/1.1\nHost: t\r\n\r\n", b"bare CR or LF in the request line"),
    (b"GET /n HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", b"NUL in header field 'X-A'"),
    (b"GET /n\x00 HTTP/1.1\r\nHost: t\r\n\r\n", b"NUL in the request line"),
    (b"GET /n HTTP/1.1\r\nX-A: a\x1bb\r\n\r\n", b"control character"),
    (b"GET /n HTTP/1.1\r\nX-A: a\x7f\r\n\r\n", b"control character"),
    (b"GET /n HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n", b"obs-fold"),
    (b"GET /n HTTP/1.1\r\nX-A: a\r\n\tb: c\r\n\r\n", b"obs-fold"),
    (b"GET /n HTTP/1.1\r\n Host: t\r\n\r\n", b"obs-fold"),  # whitespace before the first field line
    (b"GET /n HTTP/1.1\r\nHost : t\r\n\r\n", b"whitespace between header field name 'Host' and the colon"),
    (b"GET /n HTTP/1.1\r\nX(A): t\r\n\r\n", b"invalid header field name"),
    (b"GET /n HTTP/1.1\r\nX-Caf\xe9: t\r\n\r\n", b"invalid header field name"),
    (b"GET /n HTTP/1.1\r\n: t\r\n\r\n", b"empty header field name"),
], ids=["lf-in-value", "cr-in-value", "lf-ends-request-line", "nul-in-value", "nul-in-target", "esc", "del",
        "obs-fold-sp", "obs-fold-htab", "space-before-first-field", "space-before-colon", "non-token-name",
        "non-ascii-name", "empty-name"])
def test_head_with_a_bare_cr_lf_control_character_or_invalid_field_is_400(raw, reason):
    calls = []

    async def capture(request):
        calls.append(request)
        return Response(200, request.headers.get("x-request-id", "").encode())

    async def main():
        async with serving({("GET", "/n"): capture}) as server:
            reader, writer = await connect(server.port)
            writer.write(raw)
            resp = await read_response(reader)
            assert resp.status == 400 and resp.headers["connection"] == "close"
            assert reason in resp.body, resp.body
            await expect_eof(reader)
            assert calls == []
            await close(writer)

    run(main())


@pytest.mark.parametrize("raw", [
    b"GET /n HTTP/1.1\nHost: t\n\n",
    b"GET /n HTTP/1.1\r\nHost: t\r\n\n",
    b"GET /n HTTP/1.1\nHost: t\n\r\n",
], ids=["lf-lf", "crlf-lf", "lf-crlf"])
def test_head_ended_with_bare_lfs_is_400_at_once_not_408_after_the_receive_timeout(raw):
    """Such a head never contains CRLF CRLF, so it was never taken for a whole one: the client waited for the
    408 (a minute) for the 400 the module promises for a bare LF."""
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(raw)
            resp = await read_response(reader, timeout=1.0)
            assert resp.status == 400 and resp.headers["connection"] == "close"
            assert b"bare CR or LF" in resp.body, resp.body
            await expect_eof(reader, timeout=1.0)
            await close(writer)

    run(main())


def test_field_values_keep_htab_and_obs_text_and_any_token_is_a_name():
    seen = []

    async def capture(request):
        seen.append(request)
        return Response(200, request.body)

    async def main():
        async with serving({("POST", "/echo"): capture}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nX-Tab:\ta\tb \t\r\nX-Obs: caf\xe9\r\n"
                         b"A!#$%&'*+-.^_`|~9z: token\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nhi")
            resp = await read_response(reader)
            assert (resp.status, resp.body) == (200, b"hi")  # a repeated Content-Length with one value is fine
            await close(writer)
        (req,) = seen
        assert req.headers["x-tab"] == "a\tb" and req.headers["x-obs"] == "caf\xe9"
        assert req.headers["a!#$%&'*+-.^_`|~9z"] == "token"

    run(main())


@pytest.mark.parametrize("raw, status, reason", [
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", 501,
     b"unsupported Transfer-Encoding 'gzip, chunked'"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 501, b"unsupported Transfer-Encoding"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501,
     b"repeated Transfer-Encoding"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nhi\r\n0\r\n\r\n", 400,
     b"both Transfer-Encoding and Content-Length"),
    (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", 400, b"HTTP/1.0"),
    (b"POST /echo HTTP/1.1\r\nContent-Length: +2\r\n\r\nhi", 400, b"invalid Content-Length '+2'"),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 0_2\r\n\r\nhi", 400, b"invalid Content-Length '0_2'"),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nhi", 400, b"invalid Content-Length"),
    (b"POST /echo HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nhi", 400, b"invalid Content-Length"),  # superscript 2
    (b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi", 400,
     b"conflicting Content-Length"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nhi\r\n0\r\n\r\n", 400, b"chunk size"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nhi\r\n0\r\n\r\n", 400, b"chunk size"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;x\ny\r\nhi\r\n0\r\n\r\n", 400, b"chunk size"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n", 400,
     b"chunk data not followed by CRLF"),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX: a\nb\r\n\r\n", 400,
     b"trailer section"),
], ids=["te-gzip-chunked", "te-identity", "te-repeated", "te-and-cl", "te-in-http10", "cl-plus", "cl-underscore",
        "cl-list", "cl-unicode-digit", "cl-conflicting", "chunk-size-0x", "chunk-size-plus", "chunk-ext-lf",
        "chunk-data-no-crlf", "trailer-lf"])
def test_ambiguous_body_framing_is_refused_and_the_connection_closes(raw, status, reason):
    calls = []

    async def capture(request):
        calls.append(request)
        return Response(200, request.body)

    async def main():
        async with serving({("POST", "/echo"): capture}) as server:
            reader, writer = await connect(server.port)
            writer.write(raw)
            resp = await read_response(reader)
            assert resp.status == status and resp.headers["connection"] == "close"
            assert reason in resp.body, resp.body
            await expect_eof(reader)
            assert calls == []
            await close(writer)

    run(main())


def test_oversized_chunk_size_line_is_400():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000)
            resp = await read_response(reader)
            assert resp.status == 400 and b"chunk" in resp.body
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_unsupported_protocol_version_is_505():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(b"GET /n HTTP/2.0\r\n\r\n")
            resp = await read_response(reader)
            assert resp.status == 505 and resp.headers["connection"] == "close"
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_unknown_path_is_404_and_the_connection_stays_usable():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/nowhere?n=1"))
            resp = await read_response(reader)
            assert resp.status == 404 and b"/nowhere" in resp.body
            assert "allow" not in resp.headers and "connection" not in resp.headers
            writer.write(get("/n?still-open"))
            assert (await read_response(reader)).body == b"still-open"
            await close(writer)

    run(main())


def test_wrong_method_is_405_with_allow():
    async def ok(request):
        return Response(200)

    async def main():
        async with serving({("GET", "/x"): ok, ("POST", "/x"): ok, ("DELETE", "/y"): ok}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"PATCH /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            resp = await read_response(reader)
            assert resp.status == 405 and resp.reason == "Method Not Allowed"
            assert sorted(m.strip() for m in resp.headers["allow"].split(",")) == ["GET", "POST"]
            assert b"PATCH" in resp.body
            writer.write(get("/x"))  # the body was consumed: the next request parses
            assert (await read_response(reader)).status == 200
            await close(writer)

    run(main())


def test_http10_without_keep_alive_closes_after_the_answer():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(b"GET /n?old HTTP/1.0\r\n\r\n")
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"old"
            assert resp.headers["connection"] == "close"
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_http10_with_keep_alive_stays_open():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(b"GET /n?a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            resp = await read_response(reader)
            assert resp.body == b"a" and resp.headers.get("connection") != "close"
            writer.write(b"GET /n?b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (await read_response(reader)).body == b"b"
            await close(writer)

    run(main())


def test_connection_close_request_is_answered_then_closed():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/n?bye", "Connection: Close\r\n"))
            resp = await read_response(reader)
            assert resp.body == b"bye" and resp.headers["connection"] == "close"
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_client_half_close_still_gets_its_answers():
    async def main():
        async with serving(ROUTES) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/n?1") + get("/n?2"))
            writer.write_eof()
            assert (await read_response(reader)).body == b"1"
            assert (await read_response(reader)).body == b"2"
            await expect_eof(reader)
            await close(writer)

    run(main())


def test_handler_exception_is_500_and_the_server_keeps_serving():
    async def boom(request):
        raise RuntimeError("handler bug")

    async def main():
        async with serving({("GET", "/boom"): boom, **ROUTES}) as server:
            other_reader, other_writer = await connect(server.port)
            other_writer.write(get("/n?before"))
            assert (await read_response(other_reader)).body == b"before"

            reader, writer = await connect(server.port)
            writer.write(get("/boom"))
            resp = await read_response(reader)
            assert resp.status == 500 and resp.body == b"internal server error"
            assert resp.headers["connection"] == "close"
            await expect_eof(reader)
            await close(writer)

            other_writer.write(get("/n?after"))  # an open keep-alive connection is unaffected
            assert (await read_response(other_reader)).body == b"after"
            await close(other_writer)
            reader3, writer3 = await connect(server.port)  # and new connections are accepted
            writer3.write(get("/n?new"))
            assert (await read_response(reader3)).body == b"new"
            await close(writer3)

    run(main())


# ---------------------------------------------------------------------------------------------- StreamResponse
def test_stream_response_uses_chunked_framing():
    async def stream(request):
        async def chunks():
            yield b"data: one\n\n"
            await asyncio.sleep(0)
            yield b""  # empty pieces are skipped, they would end the body
            yield b"data: two\n\n"
            await asyncio.sleep(0.01)
            yield b"x" * 70000

        return StreamResponse(chunks(), headers={"X-Stream": "1"})

    async def main():
        async with serving({("GET", "/s"): stream, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/s"))
            resp = await read_response(reader)
            assert resp.status == 200
            assert resp.headers["transfer-encoding"] == "chunked" and "content-length" not in resp.headers
            assert resp.headers["content-type"] == "text/event-stream" and resp.headers["x-stream"] == "1"
            assert resp.chunks == [b"data: one\n\n", b"data: two\n\n", b"x" * 70000]
            writer.write(get("/n?next"))  # the stream ended cleanly: the connection is reusable
            assert (await read_response(reader)).body == b"next"
            await close(writer)

    run(main())


def test_stream_generator_finally_runs_when_the_client_disconnects():
    finalized = asyncio.Event()
    produced = []

    async def stream(request):
        async def chunks():
            try:
                while True:
                    produced.append(1)
                    yield b"tick\n"
                    await asyncio.sleep(0.002)
            finally:
                finalized.set()

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/s"): stream}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/s"))
            await read_head(reader)
            assert await asyncio.wait_for(reader.readuntil(b"tick\n\r\n"), 3)
            await close(writer)  # an ordinary close (FIN) in the middle of the stream
            await asyncio.wait_for(finalized.wait(), 3)
            count = len(produced)
            await asyncio.sleep(0.05)
            assert len(produced) == count  # nothing is pulled from the generator any more
            await until(lambda: not server.connections, what="the server to drop the connection")

    run(main())


def test_stream_blocked_generator_is_closed_on_reset_with_cancel_on_disconnect():
    finalized = asyncio.Event()
    never = asyncio.Event()

    async def stream(request):
        async def chunks():
            try:
                yield b"first"
                await never.wait()  # e.g. waiting for an upstream that never answers
                yield b"unreachable"
            finally:
                finalized.set()

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/s"): stream}, cancel_on_disconnect=True) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/s"))
            await read_head(reader)
            assert await asyncio.wait_for(reader.readuntil(b"first\r\n"), 3)
            reset_on_close(writer)
            await close(writer)
            await asyncio.wait_for(finalized.wait(), 3)
            await until(lambda: not server.connections, what="the server to drop the connection")

    run(main())


def test_cancel_on_disconnect_cancels_a_handler_when_the_client_closes_normally():
    cancelled = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request):
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    async def main():
        async with serving({("GET", "/slow"): slow}, cancel_on_disconnect=True) as server:
            _, writer = await connect(server.port)
            writer.write(get("/slow"))
            await asyncio.wait_for(entered.wait(), 3)
            await close(writer)  # the client gives up: an ordinary close, as curl or a browser does
            await asyncio.wait_for(cancelled.wait(), 2)

    run(main())


def test_stream_generator_error_mid_stream_closes_without_the_terminating_chunk():
    async def stream(request):
        async def chunks():
            yield b"partial"
            raise RuntimeError("generator bug")

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/s"): stream, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/s"))
            status, _, headers, _ = await read_head(reader)
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            rest = await asyncio.wait_for(reader.read(), 3)  # the server closes: the client sees a cut body
            assert rest == b"7\r\npartial\r\n"
            await close(writer)
            reader2, writer2 = await connect(server.port)
            writer2.write(get("/n?alive"))
            assert (await read_response(reader2)).body == b"alive"
            await close(writer2)

    run(main())


@pytest.mark.parametrize("error, first", [
    (RuntimeError("generator bug"), None),
    (ConnectionResetError("upstream went away"), None),
    (RuntimeError("generator bug"), b""),  # an empty piece sends nothing: still nothing sent
], ids=["raises", "connection-error", "after-an-empty-piece"])
def test_stream_generator_failing_before_its_first_piece_is_a_clean_500(error, first):
    """Nothing was sent yet: the client gets a 500 (as when a push producer fails to start), not a connection
    closed before any answer."""
    async def stream(request):
        async def chunks():
            if first is not None:
                yield first
            raise error
            yield b"never"

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/s"): stream, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/s"))
            resp = await read_response(reader)
            assert resp.status == 500 and resp.headers["connection"] == "close"
            assert resp.headers["content-type"] == "text/plain; charset=utf-8"
            await expect_eof(reader)
            await close(writer)
            reader2, writer2 = await connect(server.port)  # the server is fine
            writer2.write(get("/n?alive"))
            assert (await read_response(reader2)).body == b"alive"
            await close(writer2)

    run(main())


def test_stream_generator_raising_connection_error_does_not_leave_the_client_hanging():
    # a generator relaying from an upstream (an engine) fails with ConnectionResetError when that upstream dies;
    # the client must learn the body is cut (the connection closes), not wait for a terminating chunk forever
    async def stream(request):
        async def chunks():
            yield b"partial"
            raise ConnectionResetError("upstream went away")

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/s"): stream}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/s"))
            await read_head(reader)
            rest = await asyncio.wait_for(reader.read(), 2)
            assert rest.startswith(b"7\r\npartial\r\n")
            await close(writer)

    run(main())


def test_stream_waits_for_a_slow_reader_then_delivers_everything():
    piece = bytes(range(256)) * 256  # 64 KiB
    total_pieces = 256  # 16 MiB: far more than the socket buffers hold
    produced = []

    async def stream(request):
        async def chunks():
            for i in range(total_pieces):
                produced.append(i)
                yield piece

        return StreamResponse(chunks(), content_type="application/octet-stream")

    async def main():
        async with serving({("GET", "/big"): stream, **ROUTES}) as server:
            reader, writer = await connect(server.port, rcvbuf=16384)
            writer.write(get("/big"))
            await until(lambda: server.connections, what="the server to accept")
            (conn,) = server.connections
            await until(lambda: conn.write_paused, what="write backpressure")
            stalled = len(produced)
            await asyncio.sleep(0.1)
            assert len(produced) == stalled < total_pieces  # the generator is not pulled while the client lags
            resp = await read_response(reader, timeout=10)
            assert len(resp.body) == total_pieces * len(piece)
            assert resp.body == piece * total_pieces
            assert len(produced) == total_pieces
            writer.write(get("/n?next"))
            assert (await read_response(reader)).body == b"next"
            await close(writer)

    run(main())


# ---------------------------------------------------------------------------------------------- PushResponse
class Pusher:
    """A producer writing 64 KiB pieces synchronously until paused or done."""

    def __init__(self, total: int, piece: int = 65536, end: bool = True) -> None:
        self.total = total
        self.piece = bytes(range(256)) * (piece // 256)
        self.end_when_done = end
        self.calls: list[str] = []
        self.sink = None
        self.sent = 0
        self.paused = False
        self.ended = False
        self.paused_event = asyncio.Event()
        self.aborted = asyncio.Event()
        self.started = asyncio.Event()

    def start(self, sink) -> None:
        self.calls.append("start")
        self.sink = sink
        self.started.set()
        self.pump()

    def pump(self) -> None:
        while not self.paused and not self.aborted.is_set() and self.sent < self.total:
            data = self.piece[:min(len(self.piece), self.total - self.sent)]
            self.sent += len(data)
            self.sink.write(data)
        if self.sent >= self.total and not self.paused and not self.ended and self.end_when_done:
            self.ended = True
            self.calls.append("end")
            self.sink.end(b"<END>")

    def pause(self) -> None:
        self.calls.append("pause")
        self.paused = True
        self.paused_event.set()

    def resume(self) -> None:
        self.calls.append("resume")
        self.paused = False
        self.pump()

    def abort(self) -> None:
        self.calls.append("abort")
        self.aborted.set()


def test_push_response_delivers_a_small_body_in_chunked_framing():
    async def push(request):
        return PushResponse(Pusher(1000, piece=256), status=203, headers={"X-Push": "yes"})

    async def main():
        async with serving({("GET", "/p"): push, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/p"))
            resp = await read_response(reader)
            assert resp.status == 203 and resp.headers["x-push"] == "yes"
            assert resp.headers["transfer-encoding"] == "chunked"
            assert [len(c) for c in resp.chunks] == [256, 256, 256, 232, 5]
            assert resp.chunks[-1] == b"<END>"
            writer.write(get("/n?next"))
            assert (await read_response(reader)).body == b"next"
            await close(writer)

    run(main())


class Cutter:
    """A producer that writes `pieces`, then breaks its answer off (`sink.cut`)."""

    def __init__(self, pieces: list[bytes], last: bytes = b"") -> None:
        self.pieces = pieces
        self.last = last

    def start(self, sink) -> None:
        for piece in self.pieces:
            sink.write(piece)
        sink.cut(self.last)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def abort(self) -> None:
        pass


@pytest.mark.parametrize(("pieces", "last"), [([], b""), ([b"data: 1\n\n"], b"data: 2\n\n")])
def test_a_push_producer_can_cut_its_answer_off_the_connection_closes_without_the_last_chunk(pieces, last):
    """What uvicorn does when a streamed response's generator raises: the head (sent even when nothing else
    was) and what was written go out, then the connection closes, without the chunked body's last chunk; the
    client's HttpClient reports that as ClosedMidAnswer."""
    from baton.http1.client import ClosedMidAnswer

    async def push(request):
        return PushResponse(Cutter(list(pieces), last))

    async def main():
        async with serving({("GET", "/p"): push, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/p"))
            raw = await asyncio.wait_for(reader.read(), 5)  # until the server closes the connection
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head.lower()
            expected = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in [*pieces, last] if p)
            assert body == expected and not body.endswith(b"0\r\n\r\n")
            await close(writer)
            client = HttpClient()
            try:
                resp = await client.open("GET", HOST, server.port, "/p")
                assert resp.status == 200
                with pytest.raises(ClosedMidAnswer):
                    await (resp.read() if pieces else resp.first())
            finally:
                await client.close()

    run(main())


def test_push_producer_is_paused_while_the_client_does_not_read_and_resumed_after():
    total = 16 * 1024 * 1024
    producers = []

    async def push(request):
        producers.append(Pusher(total))
        return PushResponse(producers[-1], content_type="application/octet-stream")

    async def main():
        async with serving({("GET", "/p"): push, **ROUTES}) as server:
            reader, writer = await connect(server.port, rcvbuf=16384)
            writer.write(get("/p"))  # ... and read nothing for now
            await until(lambda: producers and producers[0].paused_event.is_set(), what="the producer to be paused")
            producer = producers[0]
            assert producer.calls[0] == "start"
            assert producer.sent < total and not producer.ended
            sent = producer.sent
            await asyncio.sleep(0.1)
            assert producer.sent == sent  # still paused: nothing more is pushed
            resp = await read_response(reader, timeout=10)
            assert len(resp.body) == total + len(b"<END>")
            assert resp.body[:total] == (producer.piece * (total // len(producer.piece)))
            assert "resume" in producer.calls and producer.calls[-1] == "end"
            assert "abort" not in producer.calls
            writer.write(get("/n?next"))  # the connection is reusable after a pushed body
            assert (await read_response(reader)).body == b"next"
            await close(writer)

    run(main())


def test_push_producer_pause_and_resume_calls_alternate():
    producers = []

    async def push(request):
        producers.append(Pusher(16 * 1024 * 1024))
        return PushResponse(producers[-1])

    async def main():
        async with serving({("GET", "/p"): push}) as server:
            reader, writer = await connect(server.port, rcvbuf=16384)
            writer.write(get("/p"))
            await until(lambda: producers and producers[0].paused_event.is_set(), what="the producer to be paused")
            await read_response(reader, timeout=10)
            flow = [c for c in producers[0].calls if c in ("pause", "resume")]
            assert flow and all(a != b for a, b in itertools.pairwise(flow)), flow
            await close(writer)

    run(main())


def test_push_producer_is_aborted_when_the_client_resets():
    producers = []

    async def push(request):
        producers.append(Pusher(10, piece=256, end=False))  # writes 10 bytes and then waits for "upstream"
        return PushResponse(producers[-1])

    async def main():
        async with serving({("GET", "/p"): push}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/p"))
            await read_head(reader)
            assert await asyncio.wait_for(reader.readexactly(15), 3) == b"a\r\n" + bytes(range(10)) + b"\r\n"
            reset_on_close(writer)
            await close(writer)
            producer = producers[0]
            await asyncio.wait_for(producer.aborted.wait(), 3)
            assert producer.calls == ["start", "abort"]
            await until(lambda: not server.connections, what="the server to drop the connection")

    run(main())


def test_push_producer_is_aborted_when_the_client_closes_mid_stream():
    class Ticker:
        """Pushes a piece every few milliseconds, as an engine relaying tokens does."""

        def __init__(self):
            self.calls = []
            self.aborted = asyncio.Event()
            self.handle = None
            self.sink = None

        def start(self, sink):
            self.calls.append("start")
            self.sink = sink
            self.tick()

        def tick(self):
            self.sink.write(b"data: token\n\n")
            self.handle = asyncio.get_running_loop().call_later(0.002, self.tick)

        def pause(self):
            self.calls.append("pause")

        def resume(self):
            self.calls.append("resume")

        def abort(self):
            self.calls.append("abort")
            self.handle.cancel()
            self.aborted.set()

    tickers = []

    async def push(request):
        tickers.append(Ticker())
        return PushResponse(tickers[-1])

    async def main():
        async with serving({("GET", "/p"): push}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/p"))
            await read_head(reader)
            await asyncio.wait_for(reader.readuntil(b"token\n\n\r\n"), 3)
            await close(writer)
            await asyncio.wait_for(tickers[0].aborted.wait(), 3)
            assert tickers[0].calls.count("abort") == 1
            await until(lambda: not server.connections, what="the server to drop the connection")

    run(main())


async def started_with_two_clients(path, handler, *targets):
    """A server (stopped by the test itself) routing GET `path` to `handler`, and one client connection per
    target, each having sent its GET."""
    server = HttpServer()
    server.route("GET", path, handler)
    await server.start(HOST, 0)
    clients = []
    for target in targets:
        reader, writer = await connect(server.port)
        writer.write(get(target))
        clients.append((reader, writer))
    return server, clients


def test_stop_lets_a_producer_that_can_cut_end_its_answer_and_aborts_one_that_cannot():
    """At the end of the drain an unfinished pushed answer is cut: a producer with `cut()` ends it itself
    (the client reads a final piece and the end of the chunked body); one without is aborted (the body just
    stops)."""
    class Cutter(Pusher):
        def cut(self) -> None:
            self.calls.append("cut")
            self.sink.end(b"<CUT>")

    producers: list[Pusher] = []

    async def push(request):
        producers.append((Cutter if request.query == "cut" else Pusher)(256, piece=256, end=False))
        return PushResponse(producers[-1])

    async def main():
        server, ((cut_reader, cut_writer), (plain_reader, plain_writer)) = await started_with_two_clients(
            "/p", push, "/p?cut", "/p?plain")
        await until(lambda: len(producers) == 2 and all(p.sent == 256 for p in producers),
                    what="both answers to start")
        await server.stop(grace_s=0.1, after_s=0.1)
        cut_raw = await asyncio.wait_for(cut_reader.read(), 3)
        plain_raw = await asyncio.wait_for(plain_reader.read(), 3)
        by_query = {type(p).__name__: p.calls for p in producers}
        assert by_query == {"Cutter": ["start", "cut"], "Pusher": ["start", "abort"]}
        assert cut_raw.endswith(b"5\r\n<CUT>\r\n0\r\n\r\n")
        assert not plain_raw.endswith(b"0\r\n\r\n")  # cut off: the client can tell it is incomplete
        await close(cut_writer)
        await close(plain_writer)

    run(main())


def test_aborted_push_does_not_leave_the_connection_task_behind():
    producers = []

    async def push(request):
        producers.append(Pusher(10, piece=256, end=False))
        return PushResponse(producers[-1])

    async def main():
        baseline = asyncio.all_tasks()
        async with serving({("GET", "/p"): push}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/p"))
            await read_head(reader)
            await asyncio.wait_for(reader.readexactly(15), 3)
            reset_on_close(writer)
            await close(writer)
            await asyncio.wait_for(producers[0].aborted.wait(), 3)
            # the producer was told the sink is dead and will never call end(): the server must not wait for it
            await until(lambda: not (asyncio.all_tasks() - baseline), timeout=2,
                        what="the connection's serving task to finish")

    run(main())


def test_push_producer_that_fails_to_start_gets_abort_and_the_connection_closes():
    class Failing:
        def __init__(self):
            self.calls = []

        def start(self, sink):
            self.calls.append("start")
            raise RuntimeError("cannot start")

        def pause(self):
            self.calls.append("pause")

        def resume(self):
            self.calls.append("resume")

        def abort(self):
            self.calls.append("abort")

    failing = Failing()

    async def push(request):
        return PushResponse(failing)

    async def main():
        async with serving({("GET", "/p"): push}) as server:
            reader, writer = await connect(server.port)
            writer.write(get("/p"))
            resp = await read_response(reader)
            assert resp.status == 500 and resp.headers["connection"] == "close"  # nothing was sent: a clean 500
            await expect_eof(reader)
            assert failing.calls == ["start", "abort"]
            await close(writer)

    run(main())


# ---------------------------------------------------------------------------------------------- lifecycle
def test_stop_lets_an_inflight_request_finish_then_closes():
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request):
        entered.set()
        await release.wait()
        return text_response("finished")

    async def main():
        server = HttpServer()
        server.route("GET", "/slow", slow)
        server.route("GET", "/n", numbered)
        await server.start(HOST, 0)
        port = server.port
        try:
            idle_reader, idle_writer = await connect(port)
            idle_writer.write(get("/n?idle"))
            assert (await read_response(idle_reader)).body == b"idle"

            reader, writer = await connect(port)
            writer.write(get("/slow"))
            await asyncio.wait_for(entered.wait(), 3)

            stopping = asyncio.create_task(server.stop(grace_s=5))
            await expect_eof(idle_reader)  # an idle keep-alive connection is closed at once
            with pytest.raises(OSError):
                await asyncio.open_connection(HOST, port)  # no new connections
            assert not stopping.done()  # waits for the in-flight request

            release.set()
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"finished"
            assert resp.headers["connection"] == "close"
            await expect_eof(reader)
            await asyncio.wait_for(stopping, 2)
            assert not server.connections
            await close(writer)
            await close(idle_writer)
        finally:
            await server.stop(grace_s=0)

    run(main())


def test_stop_cancels_requests_still_running_after_the_grace_period():
    entered = asyncio.Event()
    cancelled = []

    async def stuck(request):
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return Response(200)

    async def main():
        server = HttpServer()
        server.route("GET", "/stuck", stuck)
        await server.start(HOST, 0)
        reader, writer = await connect(server.port)
        writer.write(get("/stuck"))
        await asyncio.wait_for(entered.wait(), 3)
        started = time.monotonic()
        await server.stop(grace_s=0.2)
        assert time.monotonic() - started < 1.5
        await expect_eof(reader)  # no answer, just closed
        await until(lambda: cancelled, what="the handler to be cancelled")
        await close(writer)

    run(main())


def test_stop_calls_before_cancel_once_and_lets_handlers_answer_before_cancelling_the_rest():
    entered = []
    shutting_down = asyncio.Event()
    cancelled = []
    calls = []

    async def waiting(request):
        entered.append(request.query)
        if request.query == "stubborn":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
        await shutting_down.wait()
        return Response(503, b"shutting down")

    def before_cancel():
        calls.append(time.monotonic())
        shutting_down.set()

    async def main():
        server, ((polite_reader, polite_writer), (stubborn_reader, stubborn_writer)) = await started_with_two_clients(
            "/w", waiting, "/w?polite", "/w?stubborn")
        await until(lambda: len(entered) == 2, what="both handlers to start")
        started = time.monotonic()
        await server.stop(grace_s=0.2, before_cancel=before_cancel, after_s=0.5)
        elapsed = time.monotonic() - started
        assert len(calls) == 1 and calls[0] - started >= 0.15  # once, when the grace period ended
        assert 0.6 <= elapsed < 1.5  # then up to after_s for the stubborn handler, then cancelled
        resp = await read_response(polite_reader)
        assert (resp.status, resp.body) == (503, b"shutting down") and resp.headers["connection"] == "close"
        await expect_eof(polite_reader)
        await expect_eof(stubborn_reader)  # no answer
        await until(lambda: cancelled, what="the stubborn handler to be cancelled")
        await close(polite_writer)
        await close(stubborn_writer)

    run(main())


def test_stop_returns_once_handlers_answered_after_before_cancel():
    shutting_down = asyncio.Event()
    entered = asyncio.Event()

    async def waiting(request):
        entered.set()
        await shutting_down.wait()
        return Response(503, b"bye")

    async def before_cancel():  # an awaitable result is awaited
        await asyncio.sleep(0.01)
        shutting_down.set()

    async def main():
        server = HttpServer()
        server.route("GET", "/w", waiting)
        await server.start(HOST, 0)
        reader, writer = await connect(server.port)
        writer.write(get("/w"))
        await asyncio.wait_for(entered.wait(), 3)
        started = time.monotonic()
        await server.stop(grace_s=0.1, before_cancel=before_cancel, after_s=5)
        assert time.monotonic() - started < 1.0  # not the whole after_s
        assert (await read_response(reader)).status == 503
        await close(writer)

    run(main())


def test_stop_does_not_call_before_cancel_when_handlers_finish_in_time_and_survives_one_that_fails():
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request):
        entered.set()
        await release.wait()
        return text_response("done")

    async def main():
        calls = []
        server = HttpServer()
        server.route("GET", "/slow", slow)
        await server.start(HOST, 0)
        reader, writer = await connect(server.port)
        writer.write(get("/slow"))
        await asyncio.wait_for(entered.wait(), 3)
        asyncio.get_running_loop().call_later(0.05, release.set)
        await server.stop(grace_s=3, before_cancel=lambda: calls.append(1))
        assert calls == []  # nothing was left to cancel
        assert (await read_response(reader)).body == b"done"
        await close(writer)

        def failing():
            raise RuntimeError("before_cancel bug")

        stuck = HttpServer()
        stuck.route("GET", "/stuck", lambda request: asyncio.Event().wait())
        await stuck.start(HOST, 0)
        reader, writer = await connect(stuck.port)
        writer.write(get("/stuck"))
        await until(lambda: any(c.task for c in stuck.connections), what="the handler to start")
        await asyncio.wait_for(stuck.stop(grace_s=0.05, before_cancel=failing, after_s=0.1), 2)
        await expect_eof(reader)
        await close(writer)

    run(main())


def test_a_handler_cancelled_by_stop_can_still_answer_its_client():
    """The cancellation `stop` gives the handlers still running at its end says so (`cancelled_by_stop`),
    unlike a client going away: a handler that answers it anyway (a 503 its client can retry on, instead of
    a connection closed with no answer) has that answer written before the connection closes; one that lets
    the cancellation through leaves its client with none, as before."""
    seen: list[tuple[str, bool]] = []

    async def waiting(request):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            seen.append((request.query, cancelled_by_stop(exc)))
            if request.query == "answers" and cancelled_by_stop(exc):
                asyncio.current_task().uncancel()
                await asyncio.sleep(0.01)  # unwinding may take a moment
                return Response(503, b"stopping", headers={"Retry-After": "1"})
            raise
        return Response(200)

    async def main():
        server = HttpServer(cancel_on_disconnect=True)
        server.route("GET", "/w", waiting)
        await server.start(HOST, 0)
        clients = {}
        for query in ("answers", "silent", "leaves"):
            clients[query] = await connect(server.port)
            clients[query][1].write(get("/w?" + query))
        await until(lambda: sum(c.task is not None for c in server.connections) == 3, what="three handlers")
        await close(clients["leaves"][1])
        await until(lambda: ("leaves", False) in seen, what="the handler of the client that left to be cancelled")
        started = time.monotonic()
        await server.stop(grace_s=0.1, after_s=0.1)
        assert time.monotonic() - started < 1.5
        resp = await read_response(clients["answers"][0])
        assert (resp.status, resp.body, resp.headers["retry-after"]) == (503, b"stopping", "1")
        assert resp.headers["connection"] == "close"
        await expect_eof(clients["answers"][0])
        await expect_eof(clients["silent"][0])  # no answer, just closed
        assert sorted(seen) == [("answers", True), ("leaves", False), ("silent", True)]
        for query in ("answers", "silent"):
            await close(clients[query][1])

    run(main())


def test_a_handler_still_unwinding_when_stop_closes_its_connection_is_not_told_it_may_answer():
    """A handler that took the stop's cancellation as a chance to answer, but is still unwinding when
    STOP_ANSWER_S is over, is cancelled again as its connection closes: that cancellation no longer says it
    may answer (`cancelled_by_stop` is false), since no answer can reach its client any more."""
    seen: list[bool] = []

    async def slow_to_unwind(request):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            seen.append(cancelled_by_stop(exc))
            asyncio.current_task().uncancel()
            try:
                await asyncio.sleep(30)  # e.g. giving back a hold kept in a slow Redis
            except asyncio.CancelledError as again:
                seen.append(cancelled_by_stop(again))
                raise
        return Response(503, b"too late")

    async def main():
        server = HttpServer()
        server.route("GET", "/w", slow_to_unwind)
        await server.start(HOST, 0)
        reader, writer = await connect(server.port)
        writer.write(get("/w"))
        await until(lambda: any(c.task is not None for c in server.connections), what="the handler")
        await server.stop(grace_s=0.1, after_s=0.1)
        await until(lambda: len(seen) == 2, what="the second cancellation")
        assert seen == [True, False]
        await expect_eof(reader)
        await close(writer)

    run(main())


def test_idle_connections_are_reaped_but_busy_ones_are_not(monkeypatch):
    monkeypatch.setattr(server_mod, "IDLE_TIMEOUT_S", 0.15)
    monkeypatch.setattr(server_mod, "SWEEP_INTERVAL_S", 0.03)
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return text_response("slow")

    async def main():
        async with serving({("GET", "/slow"): slow, **ROUTES}) as server:
            idle_reader, idle_writer = await connect(server.port)
            idle_writer.write(get("/n?1"))
            assert (await read_response(idle_reader)).body == b"1"
            busy_reader, busy_writer = await connect(server.port)
            busy_writer.write(get("/slow"))
            started = time.monotonic()
            await expect_eof(idle_reader, timeout=3)
            assert time.monotonic() - started >= 0.1  # not before it was idle long enough
            await asyncio.sleep(0.3)  # the busy connection is now well past the idle timeout too
            release.set()
            assert (await read_response(busy_reader)).body == b"slow"
            await close(idle_writer)
            await close(busy_writer)

    run(main())


def test_a_client_that_stops_reading_is_cut_off_and_its_producer_aborted_but_a_slow_reader_is_not(monkeypatch):
    """A stream whose client reads nothing for SEND_TIMEOUT_S (its connection's write buffer stays full) is
    ended: the producer is aborted (what it holds, e.g. an engine slot, is given back). A client that keeps
    reading, however slowly, is never cut."""
    monkeypatch.setattr(server_mod, "SEND_TIMEOUT_S", 0.3)
    monkeypatch.setattr(server_mod, "SWEEP_INTERVAL_S", 0.03)
    producers: list[Pusher] = []

    async def push(request):
        producers.append(Pusher(64 * 1024 * 1024, end=False))  # far more than the socket buffers hold
        return PushResponse(producers[-1])

    async def main():
        async with serving({("GET", "/p"): push}) as server:
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect((HOST, server.port))
            stalled.sendall(get("/p"))
            await until(lambda: producers and producers[0].paused, what="the stalled stream to pause")
            started = time.monotonic()
            await asyncio.wait_for(producers[0].aborted.wait(), 3)
            assert time.monotonic() - started >= 0.2  # not before the timeout
            await until(lambda: len(server.connections) == 0, what="the connection to be dropped")
            stalled.close()

            reader, writer = await connect(server.port)
            writer.write(get("/p"))
            await until(lambda: len(producers) == 2 and producers[1].paused, what="the second stream to pause")
            # ~1 MB/s for 3 s, almost four send timeouts: each read moves what the kernel has queued for this
            # client (~4 MB here) only slightly, yet it moves, so the client is not cut off
            monkeypatch.setattr(server_mod, "SEND_TIMEOUT_S", 0.8)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                await reader.read(64 * 1024)
                await asyncio.sleep(0.05)
            assert not producers[1].aborted.is_set() and "abort" not in producers[1].calls
            await close(writer)

    run(main())


def test_a_closing_connection_whose_client_reads_nothing_is_dropped_too(monkeypatch):
    """A last answer (Connection: close) far larger than the socket buffers, to a client that reads none of
    it: the connection is closing, its flush can never end, and the send timeout drops it all the same."""
    monkeypatch.setattr(server_mod, "SEND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server_mod, "LINGER_S", 0.1)  # closed (not only half-closed) well before the timeout
    monkeypatch.setattr(server_mod, "SWEEP_INTERVAL_S", 0.03)

    async def big(request):
        return Response(200, b"x" * (32 * 1024 * 1024))

    async def main():
        async with serving({("GET", "/big"): big}) as server:
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect((HOST, server.port))
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await until(lambda: server.connections and all(c.closed for c in server.connections),
                        what="the connection to be closing")
            await until(lambda: not server.connections, timeout=5, what="the stalled closing connection to go")
            stalled.close()

    run(main())


def test_the_server_reports_each_request_it_answers_with_an_error_of_its_own():
    """on_refused hears of every answer the server makes itself (with the request's path and headers once
    read), and of none its handlers make; the headers it returns go out with that answer."""
    refused: list[tuple[str, int]] = []
    seen_ids: list[str | None] = []

    def on_refused(path, status, headers):
        refused.append((path, status))
        seen_ids.append(headers.get("x-request-id") if headers is not None else None)
        return {"X-Request-Id": seen_ids[-1] or "made-up"}

    async def boom(request):
        raise RuntimeError("a bug")

    async def fine(request):
        return Response(418, b"handler's own error")

    async def main():
        async with serving({("POST", "/up"): fine, ("POST", "/boom"): boom}, max_body_bytes=10,
                           on_refused=on_refused) as server:
            for raw, status in ((b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok", 418),
                                (b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n", 413),
                                (b"POST /boom HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-500\r\nContent-Length: 0\r\n\r\n", 500),
                                (b"GET /up HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-405\r\n\r\n", 405),
                                (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
                                (b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"
                                 b"GARBAGE\r\n\r\n", 418)):
                reader, writer = await connect(server.port)
                writer.write(raw)
                response = await read_response(reader)
                assert response.status == status
                if status in (500, 405):  # answered with the request's own id
                    assert response.headers["x-request-id"] == f"r-{status}"
                    assert status != 405 or response.headers["allow"] == "POST"
                elif status != 418:
                    assert response.headers["x-request-id"] == "made-up"
                if raw.endswith(b"GARBAGE\r\n\r\n"):  # a second, unparseable request after a good one
                    assert (await read_response(reader)).status == 400
                await close(writer)
        assert refused == [("/up", 413), ("/boom", 500), ("/up", 405), ("/nowhere", 404), ("", 400)]
        assert seen_ids == [None, "r-500", "r-405", None, None]

    run(main())


# ---------------------------------------------------------------------------------------------- other clients
def test_standard_library_clients_interoperate():
    async def stream(request):
        async def chunks():
            for word in (b"alpha ", b"beta ", b"gamma"):
                yield word
                await asyncio.sleep(0)

        return StreamResponse(chunks(), content_type="text/plain")

    async def only_get(request):
        return Response(200, b"got")

    def blocking(port):
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        conn.request("POST", "/echo", body=b"plain body")
        r = conn.getresponse()
        first = (r.status, r.getheader("X-Method"), r.read())
        sock = conn.sock
        conn.request("POST", "/echo", body=iter([b"chunk-1 ", b"chunk-2"]), encode_chunked=True)
        r = conn.getresponse()
        chunked = (r.status, r.read())
        same_socket_1 = conn.sock is sock
        conn.request("GET", "/stream")
        r = conn.getresponse()
        streamed = (r.status, r.getheader("Transfer-Encoding"), r.read())
        same_socket_2 = conn.sock is sock
        conn.close()

        with urllib.request.urlopen(f"http://{HOST}:{port}/only-get", timeout=5) as r:
            via_urllib = (r.status, r.read())
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(f"http://{HOST}:{port}/missing", timeout=5)
        nf = (not_found.value.code, not_found.value.read())
        req = urllib.request.Request(f"http://{HOST}:{port}/only-get", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as not_allowed:
            urllib.request.urlopen(req, timeout=5)
        na = (not_allowed.value.code, not_allowed.value.headers["Allow"])
        return first, chunked, streamed, same_socket_1, same_socket_2, via_urllib, nf, na

    async def main():
        async with serving({("GET", "/stream"): stream, ("GET", "/only-get"): only_get, **ROUTES}) as server:
            first, chunked, streamed, same1, same2, via_urllib, nf, na = await asyncio.to_thread(
                blocking, server.port)
        assert first == (200, "POST", b"plain body")
        assert chunked == (200, b"chunk-1 chunk-2")
        assert streamed == (200, "chunked", b"alpha beta gamma")
        assert same1 and same2  # http.client kept its one connection alive
        assert via_urllib == (200, b"got")
        assert nf == (404, b"no such path: /missing")
        assert na == (405, "GET")

    run(main())


def test_http1_client_against_the_server():
    async def stream(request):
        async def chunks():
            for i in range(5):
                yield b"part%d;" % i
                await asyncio.sleep(0)

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/stream"): stream, **ROUTES}) as server:
            client = HttpClient()
            try:
                status, headers, body = await client.request("POST", HOST, server.port, "/echo", b"via client")
                assert (status, headers["x-method"], body) == (200, "POST", b"via client")
                resp = await client.open("GET", HOST, server.port, "/stream")
                assert resp.status == 200 and resp.headers["transfer-encoding"] == "chunked"
                assert await resp.read() == b"part0;part1;part2;part3;part4;"
                status, _, body = await client.request("GET", HOST, server.port, "/missing")
                assert (status, body) == (404, b"no such path: /missing")
                big = bytes(range(256)) * 4096  # 1 MiB, sent in two writes by the client
                status, _, body = await client.request("POST", HOST, server.port, "/echo", big)
                assert status == 200 and body == big
                assert len(server.connections) == 1  # all of it over one kept-alive connection
            finally:
                await client.close()

    run(main())


def test_concurrent_large_bodies_through_the_shared_read_buffer_arrive_intact():
    """Server and client connections of one thread read into one reused buffer (baton.http1.reading):
    interleaved reads of different connections must not leak into each other."""

    async def main():
        async with serving(ROUTES) as server:
            client = HttpClient()
            try:
                bodies = [bytes([i]) * (300_000 + 4099 * i) for i in range(8)]  # each over one read's 256 KiB
                answers = await asyncio.gather(*(client.request("POST", HOST, server.port, "/echo", body)
                                                 for body in bodies))
                assert [(status, body) for status, _, body in answers] == [(200, body) for body in bodies]
                assert len(server.connections) == len(bodies)
            finally:
                await client.close()

    run(main())


def test_stream_whose_client_left_before_it_started_still_runs_its_finally():
    """A handler that takes a while returns a stream after its client has gone: the generator never
    starts, yet its finally block (accounting, cleanup) must run."""
    finalized = asyncio.Event()
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request):
        entered.set()
        await release.wait()

        async def chunks():
            try:
                yield b"never sent"
            finally:
                finalized.set()

        return StreamResponse(chunks())

    async def main():
        async with serving({("GET", "/slow"): slow}) as server:
            reader, writer = await connect(server.port)
            reset_on_close(writer)
            writer.write(get("/slow"))
            await asyncio.wait_for(entered.wait(), 3)
            await close(writer)
            await until(lambda: not server.connections, what="the server to see the client go")
            release.set()
            await asyncio.wait_for(finalized.wait(), 3)

    run(main())


def test_head_on_a_get_route_gets_the_head_without_a_body():
    async def hello(request):
        return Response(200, b"hello world", "text/plain")

    async def main():
        async with serving({("GET", "/h"): hello}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, headers, _ = await read_head(reader)
            assert status == 200 and headers["content-length"] == "11"
            writer.write(get("/h"))  # the next answer starts right after the head: no body was sent
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"hello world"
            await close(writer)

    run(main())


def test_head_without_a_get_route_gets_the_error_head_without_its_body():
    async def explicit_head(request):
        return Response(200, b"explicit body", "text/plain")

    async def boom(request):
        raise RuntimeError("handler bug")

    async def main():
        async with serving({("HEAD", "/explicit"): explicit_head, ("GET", "/boom"): boom, **ROUTES}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"HEAD /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"
                         b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n"
                         b"HEAD /explicit HTTP/1.1\r\nHost: t\r\n\r\n" + get("/n?after"))
            status, _, headers, _ = await read_head(reader)  # each head: Content-Length of the body not sent
            assert status == 404 and headers["content-length"] == str(len(b"no such path: /nowhere"))
            status, _, headers, _ = await read_head(reader)
            assert status == 405 and headers["allow"] == "POST"
            assert headers["content-length"] == str(len(b"HEAD is not allowed on /echo"))
            status, _, headers, _ = await read_head(reader)
            assert status == 200 and headers["content-length"] == "13"
            resp = await read_response(reader)  # framing intact: the next answer starts right after the heads
            assert (resp.status, resp.body) == (200, b"after")
            writer.write(b"HEAD /boom HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, headers, _ = await read_head(reader)
            assert status == 500 and headers["content-length"] == str(len(b"internal server error"))
            assert headers["connection"] == "close"
            await expect_eof(reader)  # and no body before the close
            await close(writer)

    run(main())


def test_the_servers_own_errors_take_the_applications_error_shape():
    import json

    def as_json(status, message):
        return json.dumps({"error": {"status": status, "message": message}}).encode(), "application/json"

    async def boom(request):
        raise RuntimeError("a bug")

    async def main():
        async with serving({("GET", "/boom"): boom}, error_body=as_json, max_body_bytes=16) as server:
            for request, status, words in ((get("/nowhere"), 404, "/nowhere"), (get("/boom"), 500, "internal"),
                                           (b"POST /boom HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100,
                                            413, "")):
                reader, writer = await connect(server.port)
                writer.write(request)
                resp = await read_response(reader)
                assert resp.status == status and resp.headers["content-type"] == "application/json"
                error = json.loads(resp.body)["error"]
                assert error["status"] == status and words in error["message"]
                await close(writer)

    run(main())


def test_a_client_pipelining_requests_it_never_reads_the_answers_of_keeps_what_is_buffered_bounded():
    """Whole answers obey the client's reading as streams do: while its connection's write buffer is full the
    next pipelined request waits, the pipeline fills, reading pauses, and memory stays bounded however many
    requests it sends (before, every answer went into the write buffer: gigabytes within seconds)."""
    body = b"x" * 32 * 1024

    async def big(request):
        return Response(200, body, "text/plain")

    async def main():
        async with serving({("GET", "/metrics"): big}) as server:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((HOST, server.port))
            sock.setblocking(False)
            burst = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200
            sent, deadline = 0, time.monotonic() + 2.0
            try:
                while time.monotonic() < deadline:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(loop.sock_sendall(sock, burst), 0.2)
                        sent += 200
                    await asyncio.sleep(0)
                (conn,) = server.connections
                assert conn.write_paused and conn.paused_reading
                assert conn.transport.get_write_buffer_size() < 4 * 1024 * 1024, conn.transport.get_write_buffer_size()
                assert sent * len(body) > 64 * 1024 * 1024  # answers for what was sent would have taken that much
            finally:
                sock.close()

    run(main())


def test_pipelined_large_bodies_behind_a_slow_handler_pause_reading_by_their_bytes():
    """Reading paused only once 16 requests waited: behind a slow handler one connection held up to 16 bodies
    at the limit. It pauses too once the waiting bodies come to more than max(max_body_bytes, PIPELINE_BYTES),
    so what the connection holds stays about twice the limit; every request is still answered, in order."""
    limit = 1024 * 1024  # not over PIPELINE_BYTES: the bound is the limit itself
    count = 10
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return text_response(request.query)

    async def main():
        async with serving({("POST", "/slow"): slow}, max_body_bytes=limit) as server:
            reader, writer = await connect(server.port)
            for i in range(count):
                writer.write(post(f"/slow?{i}", b"x" * limit))
            await until(lambda: server.connections, what="the connection")
            (conn,) = server.connections
            await until(lambda: conn.paused_reading, what="reading to pause")
            await asyncio.sleep(0.2)  # time to read on, were reading not paused
            held = sum(len(item.body) for item in conn.pending) + len(conn.buf)
            assert conn.paused_reading and len(conn.pending) < 16
            assert held <= 2 * limit + READ_BUFFER_BYTES, held
            release.set()
            for i in range(count):
                resp = await read_response(reader)
                assert resp.status == 200 and resp.body == b"%d" % i
            assert not conn.paused_reading and conn.pending_bytes == 0
            await close(writer)

    run(main())


def test_a_request_trickled_in_is_answered_408_once_it_has_taken_too_long_to_arrive(monkeypatch):
    """Each byte restarts the idle timeout, so a client sending a byte now and then would hold its connection
    (and a partial body's buffer) for good: the whole request must arrive within RECEIVE_TIMEOUT_S of its
    first byte. A client that is quiet between requests is not affected."""
    monkeypatch.setattr(server_mod, "SWEEP_INTERVAL_S", 0.03)
    monkeypatch.setattr(server_mod, "RECEIVE_TIMEOUT_S", 0.3)

    async def ok(request):
        return Response(200, b"ok", "text/plain")

    async def main():
        async with serving({("POST", "/v1/completions"): ok}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz")
            assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.5)  # quiet between requests: no request is arriving, nothing to time out
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            for _ in range(8):  # a byte every 0.1 s: never idle, never whole
                await asyncio.sleep(0.1)
                if writer.is_closing():
                    break
                writer.write(b"a")
            answer = await asyncio.wait_for(reader.read(), 2)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
            writer.close()

    run(main())


def test_connection_close_among_other_options_closes_the_connection():
    async def ok(request):
        return Response(200, b"ok", "text/plain")

    async def main():
        async with serving({("GET", "/"): echo}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: TE, close\r\nTE: trailers\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 2)  # read to the end: the server closes
            assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
            writer.close()

    run(main())


def test_a_client_that_stops_taking_its_answer_is_dropped_whatever_is_left_of_it(monkeypatch):
    """The send timeout holds however the stall looks: a keep-alive answer whose unsent rest is too small to
    pause writing (the idle reaper closes it, then its flush stalls), and a client that read slowly past the
    idle timeout and then stopped. Neither connection (nor the answer it holds) may stay."""
    monkeypatch.setattr(server_mod, "SEND_TIMEOUT_S", 0.3)
    monkeypatch.setattr(server_mod, "IDLE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server_mod, "SWEEP_INTERVAL_S", 0.03)

    async def sized(request):
        return Response(200, b"x" * int(request.query))

    def stalled_client(port: int, size: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((HOST, port))
        s.setblocking(False)
        s.sendall(f"GET /s?{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return s

    async def main():
        async with serving({("GET", "/s"): sized}) as server:
            # how much of an answer the kernel takes off a client that reads nothing: a little more than that
            # leaves less than the high-water mark in the transport
            probe = stalled_client(server.port, 8 * 1024 * 1024)
            await until(lambda: server.connections and next(iter(server.connections)).write_paused,
                        what="the probe's answer to fill the buffers")
            await asyncio.sleep(0.2)
            (conn,) = server.connections
            taken = 8 * 1024 * 1024 - conn.transport.get_write_buffer_size()
            probe.close()
            await until(lambda: not server.connections, what="the probe's connection to go")
            small = stalled_client(server.port, taken + 20_000)
            await until(lambda: len(server.connections) == 1, what="the small answer's connection")
            (held,) = server.connections
            await asyncio.sleep(0.2)
            assert not held.write_paused and held.transport.get_write_buffer_size() > 0  # the case under test
            await until(lambda: not server.connections, timeout=5, what="the small stalled answer to be dropped")
            small.close()

            slow = stalled_client(server.port, 16 * 1024 * 1024)
            await until(lambda: len(server.connections) == 1, what="the slow reader's connection")
            deadline = time.monotonic() + 1.0  # reads past the idle timeout: its answer never stalls that long
            while time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    slow.recv(4096)
                await asyncio.sleep(0.05)
            assert server.connections  # still being served
            await until(lambda: not server.connections, timeout=5, what="the stopped reader to be dropped")
            slow.close()

    run(main())


def test_a_head_trickling_in_is_searched_once_not_once_per_byte():
    """A request head arriving a byte per read: each read searches only what it brought for the end of the
    head (a client parking 60 KB of head and trickling bytes cost a search of all of it per byte)."""
    class Counting(bytearray):
        searched = 0

        def find(self, sub, start=0, *args):
            Counting.searched += len(self) - start
            return super().find(sub, start, *args)

    server = server_mod.HttpServer()
    conn = server_mod._Connection(server)  # noqa: SLF001
    conn.buf = Counting()
    server.loop = asyncio.new_event_loop()
    try:
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000
        conn.data_received(memoryview(head[:10_000]))
        for i in range(10_000, len(head)):
            conn.data_received(memoryview(head[i:i + 1]))
        # a few bytes per read (the new byte and the overlap of the patterns), not the buffer: was ~450 million
        assert Counting.searched < 20 * len(head), Counting.searched
    finally:
        server.loop.close()


def test_header_fields_beyond_the_limit_are_refused_431():
    async def main():
        async with serving({("GET", "/"): echo}) as server:
            reader, writer = await connect(server.port)
            fields = "".join(f"f{i}:\r\n" for i in range(server_mod.MAX_HEADER_FIELDS))  # with Host: one over
            writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode())
            resp = await read_response(reader)
            assert resp.status == 431 and b"more than 256 header fields" in resp.body
            await close(writer)
            reader, writer = await connect(server.port)
            fields = "".join(f"f{i}:\r\n" for i in range(server_mod.MAX_HEADER_FIELDS - 1))
            writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode())
            assert (await read_response(reader)).status == 200
            await close(writer)

    run(main())


def test_one_read_of_many_pipelined_requests_queues_no_more_than_the_pipeline_holds():
    """Thousands of tiny pipelined requests in one read: parsing stops when the pipeline is full and goes on
    as it empties, so every request is answered, in order, with at most 16 waiting at a time."""
    most = 0
    gate = asyncio.Event()

    async def slow(request):
        nonlocal most
        await gate.wait()
        most = max(most, max(len(c.pending) for c in server_ref[0].connections))
        return Response(200, request.query.encode())

    server_ref = []

    async def main():
        async with serving({("GET", "/q"): slow}) as server:
            server_ref.append(server)
            reader, writer = await connect(server.port)
            writer.write(b"".join(f"GET /q?{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(2000)))
            await writer.drain()
            await asyncio.sleep(0.2)
            (conn,) = server.connections
            assert len(conn.pending) <= 16, len(conn.pending)
            gate.set()
            for i in range(2000):
                resp = await read_response(reader)
                assert resp.status == 200 and resp.body == str(i).encode()
            assert most <= 16
            await close(writer)

    run(main())


def test_a_close_in_any_connection_field_closes():
    """A repeated Connection field is one list (RFC 9110 5.3): close in any line of it ends the connection."""
    async def main():
        async with serving({("GET", "/"): echo}) as server:
            reader, writer = await connect(server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"
                         b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader)).status == 200
            assert await reader.read() == b""  # closed after the first: the second is never answered
            await close(writer)

    run(main())


def test_a_client_that_leaves_before_its_closing_answer_is_out_raises_nothing():
    """A request answered with a close (a 400, or Connection: close) from a client that closes at once: shutting
    down the sending side fails (ENOTCONN), which must end the connection quietly, not as an exception nobody
    retrieves (logged at ERROR for every such client)."""
    async def main():
        unhandled = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        async with serving({("GET", "/"): echo}) as server:
            for raw in (b"BAD\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
                for _ in range(20):
                    s = socket.create_connection((HOST, server.port))
                    s.sendall(raw)
                    s.close()
                    await asyncio.sleep(0.01)
            await until(lambda: not server.connections, what="the connections to go")
            gc.collect()  # an exception nobody retrieved is reported when its task is collected
            await asyncio.sleep(0.1)
        assert unhandled == []

    run(main())
