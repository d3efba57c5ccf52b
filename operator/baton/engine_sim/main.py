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

from baton import tokens
from baton.engine_sim import config as config_mod
from baton.engine_sim import logs
from baton.engine_sim.config import SimConfig, StartupError
from baton.engine_sim.server import MAX_BODY_BYTES, SimServer
from baton.engine_sim.transfer_server import KVTransferServer
from baton.gcpauses import freeze_heap
from baton.http1.server import HttpServer

log = logging.getLogger("baton.engine_sim.main")

SHUTDOWN_GRACE_S = 30.0


async def serve(cfg: SimConfig, *, stop: asyncio.Event | None = None) -> None:
    """Bind, serve until `stop` is set (or a signal arrives), then drain in-flight requests and exit."""
    tokens.set_tokenizer(cfg.tokenizer)
    server = SimServer(cfg)
    # a handler whose client went away is cancelled, so the engine drops that request's sequence
    http = HttpServer(max_body_bytes=MAX_BODY_BYTES, cancel_on_disconnect=True)
    for method, path, handler in server.routes():
        http.route(method, path, handler)
    await http.start(cfg.host, cfg.port, backlog=1024)
    port = http.port
    transfer = KVTransferServer(server.engine)
    kv_port = await transfer.start(cfg.host, cfg.kv_port)
    server.engine.start()
    server.started(port, kv_port)
    freeze_heap()  # as the scheduler: full GC passes skip the start-up heap
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info("engine simulator listening", extra={"fields": {
        "event": "listening", "url": f"http://{cfg.host}:{port}", "kv_transfer": f"{cfg.host}:{kv_port}",
        **config_mod.describe(cfg)}})
    print(f"baton engine-sim listening on http://{cfg.host}:{port}", flush=True)
    await stop.wait()
    server.draining = True
    log.info("shutting down", extra={"fields": {"event": "shutdown"}})
    await http.stop(SHUTDOWN_GRACE_S)  # stop accepting, let in-flight requests finish, then close
    # KV transfers under way get the grace to end; KV held for a pull not yet asked for goes with the worker
    # (the generation request that would have pulled it fails, and the scheduler prefills again elsewhere)
    await transfer.stop(SHUTDOWN_GRACE_S)
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
        print(f"baton engine-sim: cannot bind {cfg.host} (port {cfg.port}, KV transfer port {cfg.kv_port}): {exc}",
              file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
