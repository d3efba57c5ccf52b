"""`baton engine-sim`: run one simulated trtllm-serve worker until SIGTERM/SIGINT.

`--sim-frontend triton` serves the same simulated worker behind a real Triton server instead
(`triton_frontend.py`; needs the PyTriton venv made by `triton-venv.sh`).

Exit codes: 0 after a clean shutdown, 1 when the worker cannot start (the message is on stderr, as
trtllm-serve would print it), 2 for command-line usage errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from baton.engine_sim import config as config_mod
from baton.engine_sim import logs
from baton.engine_sim.config import SimConfig, StartupError
from baton.engine_sim.server import SimServer

log = logging.getLogger("baton.engine_sim.main")

SHUTDOWN_GRACE_S = 30.0


async def serve(cfg: SimConfig, *, stop: asyncio.Event | None = None) -> None:
    """Bind, serve until `stop` is set (or a signal arrives), then drain in-flight requests and exit."""
    server = SimServer(cfg)
    runner = web.AppRunner(server.app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - aiohttp exposes no public accessor
    port = sockets[0].getsockname()[1] if sockets else cfg.port
    server.engine.start()
    server.started(port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info("engine simulator listening", extra={"fields": {
        "event": "listening", "url": f"http://{cfg.host}:{port}", **config_mod.describe(cfg)}})
    print(f"baton engine-sim listening on http://{cfg.host}:{port}", flush=True)
    await stop.wait()
    server.draining = True
    log.info("shutting down", extra={"fields": {"event": "shutdown"}})
    await runner.cleanup()
    await server.engine.stop()


def _frontend(argv: list[str]) -> tuple[str, list[str]]:
    """Take `--sim-frontend http|triton` (default http) out of argv."""
    frontend, rest, i = "http", [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--sim-frontend" and i + 1 < len(argv):
            frontend, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--sim-frontend="):
            frontend = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return frontend, rest


def main(argv: list[str]) -> int:
    frontend, argv = _frontend(argv)
    if frontend == "triton":  # a real Triton server (PyTriton): see triton_frontend.py
        from baton.engine_sim import triton_frontend

        return triton_frontend.main(argv)
    if frontend != "http":
        print(f"baton engine-sim: --sim-frontend must be http or triton, got {frontend!r}", file=sys.stderr)
        return 2
    try:
        cfg = config_mod.load_config(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    except StartupError as exc:
        logs.setup("INFO")
        log.error("startup failed", extra={"fields": {"event": "startup_failed", "error": str(exc)}})
        print(f"baton engine-sim: startup failed: {exc}", file=sys.stderr, flush=True)
        return 1
    logs.setup(cfg.log_level)
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        print(f"baton engine-sim: cannot bind {cfg.host}:{cfg.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
