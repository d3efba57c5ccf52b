"""A bare pass-through proxy on the scheduler's own HTTP layer: the CPU floor of a router built on it.

    python -m baton.bench.proxy UPSTREAM_HOST:PORT [--prefill HOST:PORT] [--flush-interval-ms MS]

It serves POST /v1/completions and /v1/chat/completions on 127.0.0.1 (a free port, printed as
`listening on http://127.0.0.1:PORT`) and forwards each request body unchanged to the upstream engine
with `baton.http1` (the scheduler's server and client), splicing the answer into the client's connection
with the scheduler's own `StreamRelay` (same flush interval, default 1 ms). No routing, no admission, no
metrics, no logs. `baton bench scheduler` sends it the same requests as the scheduler, so the difference
in CPU time per request is what the scheduler's own work costs.

With `--prefill`, every request takes the disaggregated route with the least work a router can do for it:
the body goes context_only to the prefill engine (its prompt ids cut out and spliced back as text, as the
scheduler does), the handle and the prompt ids of the answer go generation_only to UPSTREAM (the decode
engine), and that stream is relayed. A failed context call is answered as the engine answered it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

from baton.bench.loadgen import compact_json, context_only, generation_only_params
from baton.gcpauses import freeze_heap
from baton.http1.client import HttpClient
from baton.http1.server import AnyResponse, HttpServer, PushResponse, Request, Response
from baton.idlists import cut_id_list
from baton.scheduler.relay import StreamRelay

_PROMPT_KEY = b'"prompt"'


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def with_prompt(fields: dict[str, Any], ids: bytes | None) -> bytes:
    """`fields` as a JSON body, with the raw prompt ids `ids` spliced in last (or `fields` as they are)."""
    if ids is None:
        return compact_json(fields)
    return b"".join((compact_json(fields)[:-1], b',"prompt":' if fields else b'"prompt":', ids, b"}"))


def context_body(body: bytes) -> tuple[bytes, dict[str, Any]]:
    """The context_only body for a client body, and the client's fields (prompt ids cut out, unchecked)."""
    fields, ids, _ = cut_id_list(body, _PROMPT_KEY, "prompt", check=False)
    if ids is not None:
        del fields["prompt"]
    return with_prompt(context_only(fields), ids), fields


def generation_body(fields: dict[str, Any], answer: bytes) -> bytes:
    """The generation_only body: the client's fields, the context answer's handle and its prompt ids."""
    params, ids = generation_only_params(answer)
    gen = {k: v for k, v in fields.items() if k != "prompt"} if ids is not None else dict(fields)
    gen["disaggregated_params"] = params
    return with_prompt(gen, ids)


async def serve(decode: str, prefill: str | None, interval_ms: float) -> None:
    host, port = _address(decode)
    ctx_host, ctx_port = _address(prefill) if prefill else ("", 0)
    client = HttpClient(connect_timeout=5, read_timeout=600)

    def forwarded_headers(request: Request) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Request-Id": request.headers.get("X-Request-Id") or ""}

    async def relay(body: bytes, request: Request, headers: dict[str, str]) -> AnyResponse:
        resp = await client.open("POST", host, port, request.path, body, headers)
        if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
            return Response(resp.status, await resp.read(), resp.content_type)
        first = await resp.first()
        stream = StreamRelay(resp, first, decode, interval_ms / 1000.0, time.monotonic,
                             on_broken=lambda exc: str(exc), on_finish=lambda outcome, r: None)
        return PushResponse(stream, 200, resp.content_type)

    async def forward(request: Request) -> AnyResponse:
        return await relay(request.body, request, forwarded_headers(request))

    async def handoff(request: Request) -> AnyResponse:
        headers = forwarded_headers(request)
        ctx, fields = context_body(request.body)
        status, ctx_headers, answer = await client.request("POST", ctx_host, ctx_port, request.path, ctx, headers)
        if status != 200:
            return Response(status, answer, ctx_headers.get("content-type") or "application/json")
        return await relay(generation_body(fields, answer), request, headers)

    async def ok(request: Request) -> AnyResponse:
        return Response(200, b"ok", "text/plain")

    server = HttpServer()
    route = handoff if prefill else forward
    server.route("POST", "/v1/completions", route)
    server.route("POST", "/v1/chat/completions", route)
    server.route("GET", "/healthz", ok)
    await server.start("127.0.0.1", 0)
    freeze_heap()  # as the scheduler does, so the two compare on the same footing
    print(f"listening on http://127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(5)
    await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baton.bench.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("upstream", metavar="UPSTREAM_HOST:PORT", help="the engine (with --prefill: the decode engine)")
    parser.add_argument("--prefill", metavar="HOST:PORT", help="take the disaggregated route through this prefill engine")
    parser.add_argument("--flush-interval-ms", type=float, default=1.0, help="the stream hold (default 1, as the scheduler)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.upstream, args.prefill, args.flush_interval_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
