"""A bare aiohttp pass-through proxy: the CPU floor of any aiohttp-based router on the machine.

    python -m baton.bench.proxy UPSTREAM_HOST:PORT

It serves POST /v1/completions and /v1/chat/completions on 127.0.0.1 (a free port, printed as
`listening on http://127.0.0.1:PORT`) and forwards each request body unchanged to the upstream engine with
one pooled aiohttp ClientSession (as the scheduler does), relaying the answer chunk by chunk. No parsing, no
routing, no metrics, no logs. `baton bench scheduler` sends it the same requests as the scheduler, so the
difference in CPU time per request is what the scheduler's own work costs.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
from aiohttp import web


async def serve(upstream: str) -> None:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600))
    base = f"http://{upstream}"

    async def forward(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {"Content-Type": "application/json", "X-Request-Id": request.headers.get("X-Request-Id", "")}
        async with session.post(base + request.path, data=raw, headers=headers) as upstream_resp:
            resp = web.StreamResponse(status=upstream_resp.status)
            resp.headers["Content-Type"] = upstream_resp.headers.get("Content-Type", "application/json")
            await resp.prepare(request)
            async for chunk in upstream_resp.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", forward)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/healthz", lambda _r: _ok())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


async def _ok() -> web.Response:
    return web.Response(text="ok")


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m baton.bench.proxy UPSTREAM_HOST:PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(sys.argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
