"""Helpers shared by the baton.http1 server and client tests: a fresh event loop per scenario, an
HttpServer on 127.0.0.1 for the scenario's lifetime, an HttpClient closed after it, and polling."""

from __future__ import annotations

import asyncio
import contextlib
import time

from baton.http1.client import HttpClient
from baton.http1.server import HttpServer

HOST = "127.0.0.1"


def run(coro):
    """Every scenario runs in a fresh loop with a hard ceiling, so a hang fails fast instead of at pytest-timeout."""
    return asyncio.run(asyncio.wait_for(coro, 15))


async def until(predicate, timeout=3.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def serving(routes=None, **kwargs):
    """An HttpServer with `routes` ({(method, path): handler}) listening on an ephemeral port."""
    server = HttpServer(**kwargs)
    for (method, path), handler in (routes or {}).items():
        server.route(method, path, handler)
    await server.start(HOST, 0)
    try:
        yield server
    finally:
        await server.stop(grace_s=0.5)


@contextlib.asynccontextmanager
async def http_client(**kwargs):
    client = HttpClient(**kwargs)
    try:
        yield client
    finally:
        await client.close()
