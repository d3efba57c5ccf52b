"""A bare pass-through proxy on the scheduler's own HTTP layer: the CPU floor of a router built on it.

    python -m baton.bench.proxy UPSTREAM_HOST:PORT [FLUSH_INTERVAL_MS]

It serves POST /v1/completions and /v1/chat/completions on 127.0.0.1 (a free port, printed as
`listening on http://127.0.0.1:PORT`) and forwards each request body unchanged to the upstream engine
with `baton.http1` (the scheduler's server and client), splicing the answer into the client's connection
with the scheduler's own `StreamRelay` (same flush interval, default 1 ms). No parsing, no routing, no
admission, no metrics, no logs. `baton bench scheduler` sends it the same requests as the scheduler, so
the difference in CPU time per request is what the scheduler's own work costs.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from baton.http1.client import HttpClient
from baton.http1.server import AnyResponse, HttpServer, PushResponse, Request, Response
from baton.scheduler.relay import StreamRelay


async def serve(upstream: str, interval_ms: float) -> None:
    host, _, port_text = upstream.rpartition(":")
    port = int(port_text)
    client = HttpClient(connect_timeout=5, read_timeout=600)

    async def forward(request: Request) -> AnyResponse:
        headers = {"Content-Type": "application/json", "X-Request-Id": request.headers.get("X-Request-Id") or ""}
        resp = await client.open("POST", host, port, request.path, request.body, headers)
        if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
            return Response(resp.status, await resp.read(), resp.content_type)
        first = await resp.first()
        relay = StreamRelay(resp, first, upstream, interval_ms / 1000.0, time.monotonic,
                            on_broken=lambda exc: str(exc), on_finish=lambda outcome, r: None)
        return PushResponse(relay, 200, resp.content_type)

    async def ok(request: Request) -> AnyResponse:
        return Response(200, b"ok", "text/plain")

    server = HttpServer()
    server.route("POST", "/v1/completions", forward)
    server.route("POST", "/v1/chat/completions", forward)
    server.route("GET", "/healthz", ok)
    await server.start("127.0.0.1", 0)
    print(f"listening on http://127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)
    await client.close()


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print("usage: python -m baton.bench.proxy UPSTREAM_HOST:PORT [FLUSH_INTERVAL_MS]", file=sys.stderr)
        return 2
    asyncio.run(serve(sys.argv[1], float(sys.argv[2]) if len(sys.argv) == 3 else 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
