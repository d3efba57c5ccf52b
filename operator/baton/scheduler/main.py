"""`baton scheduler`: run Baton's request scheduler.

    baton scheduler --config /etc/baton/scheduler.yaml
    baton scheduler --prefill-endpoints 127.0.0.1:8001 --decode-endpoints 127.0.0.1:8002 --model llama-3-8b

Flags override the config file (and keep overriding it across reloads); `--tokenizer` replaces the file's
whole `tokenizer` section. With neither a file nor endpoint flags the scheduler starts with no endpoints
and stays unready. An empty config file is an error (write `{}` for all defaults, or leave out --config).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import signal
import sys
import time
from typing import Any

from baton import tokens
from baton.gcpauses import freeze_heap
from baton.model_tokenizer import TokenizerError
from baton.scheduler.config import (
    ConfigError,
    ConfigWatcher,
    load_config,
    parse_address,
    parse_config,
    read_config_file,
)

log = logging.getLogger("baton.scheduler")

SHUTDOWN_GRACE_S = 30.0  # default --drain-seconds: in-flight requests get this long to finish on SIGTERM


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {value}")
    return seconds


def _endpoint_list(value: str) -> str:
    """A comma-separated host:port list, checked here so that a bad flag is named as such."""
    for item in value.split(","):
        if item.strip():
            try:
                parse_address(item)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton scheduler", description="Baton's disaggregated prefill/decode router.")
    p.add_argument("--config", help="YAML/JSON config file (reloaded when its content changes)")
    p.add_argument("--drain-seconds", type=_positive_seconds, default=SHUTDOWN_GRACE_S,
                   help="on SIGTERM, how long in-flight requests may finish; requests still waiting for a slot "
                        "then get 503 shutting_down with Retry-After (keep it a few seconds below the pod's "
                        "terminationGracePeriodSeconds)")
    p.add_argument("--reload-interval", type=_positive_seconds, default=1.0,
                   help="seconds between config file checks (> 0; a change applies once two checks agree)")
    p.add_argument("--model", help="served model name (/v1/models; other names get 404)")
    p.add_argument("--prefill-endpoints", type=_endpoint_list,
                   help="comma-separated host:port list of prefill (context) workers")
    p.add_argument("--decode-endpoints", type=_endpoint_list,
                   help="comma-separated host:port list of decode (generation) workers")
    p.add_argument("--prefill-batch-size", type=int, help="max context-only requests in flight per prefill replica")
    p.add_argument("--decode-batch-size", type=int, help="max local prefills in flight per decode replica")
    p.add_argument("--max-concurrent-prefills", type=int, help="max context-only requests in flight in total")
    p.add_argument("--kv-cache-transfer-compression", choices=["none", "fp8"])
    p.add_argument("--placement-policy", choices=["shortest-prefill-first", "round-robin", "least-loaded"])
    p.add_argument("--routing-algorithm", choices=["throughput-optimized", "latency-optimized"])
    p.add_argument("--local-prefill-below-tokens", type=int)
    p.add_argument("--always-prefill-at-or-above-tokens", type=int)
    p.add_argument("--ring-size", type=int)
    p.add_argument("--max-queue-depth", type=int)
    p.add_argument("--max-queue-wait-seconds", type=float)
    p.add_argument("--max-active-per-decode-replica", type=int)
    p.add_argument("--decode-p95-latency-threshold-ms", type=float)
    p.add_argument("--hold-ttl-seconds", type=float)
    p.add_argument("--heartbeat-seconds", type=float)
    p.add_argument("--max-attempts", type=int, help="attempts per request including the first")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="count text prompts with the model's tokenizer: a checkpoint directory with tokenizer.json "
                        "(and tokenizer_config.json), or that file (default: the documented estimate); "
                        "replaces the config file's tokenizer section")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000; 0 = pick a free one)")
    p.add_argument("--stream-flush-interval-ms", type=float,
                   help="gather streamed tokens arriving sooner than this after the last write (default 1; 0 = off)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="kv", choices=["kv", "json"], help="key=value lines or JSON lines")
    return p


# flag dest -> dotted camelCase path in the config file
FLAG_PATHS = {
    "model": "model",
    "prefill_batch_size": "routing.prefillBatchSize",
    "decode_batch_size": "routing.decodeBatchSize",
    "max_concurrent_prefills": "routing.maxConcurrentPrefills",
    "kv_cache_transfer_compression": "routing.kvTransferCompression",
    "placement_policy": "routing.placementPolicy",
    "routing_algorithm": "routing.algorithm",
    "local_prefill_below_tokens": "routing.localPrefillBelowTokens",
    "always_prefill_at_or_above_tokens": "routing.alwaysPrefillAtOrAboveTokens",
    "ring_size": "routing.ringSize",
    "max_queue_depth": "queue.maxDepth",
    "max_queue_wait_seconds": "queue.maxWaitSeconds",
    "max_active_per_decode_replica": "backpressure.maxActivePerDecodeReplica",
    "decode_p95_latency_threshold_ms": "backpressure.decodeP95LatencyThresholdMs",
    "hold_ttl_seconds": "degradation.holdTtlSeconds",
    "heartbeat_seconds": "heartbeatSeconds",
    "max_attempts": "retries.maxAttempts",
    "host": "server.host",
    "port": "server.port",
    "stream_flush_interval_ms": "server.streamFlushIntervalMs",
    "tokenizer": "tokenizer.path",
}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, path in FLAG_PATHS.items():
        value = getattr(args, dest)
        if value is not None:
            out[path] = value
    if args.prefill_endpoints is not None or args.decode_endpoints is not None:
        out["endpoints.discovery"] = "static"
        if args.prefill_endpoints is not None:
            out["endpoints.static.prefill"] = args.prefill_endpoints
        if args.decode_endpoints is not None:
            out["endpoints.static.decode"] = args.decode_endpoints
    return out


def _timestamp(record: logging.LogRecord, _cache: list[Any] = [-1, ""]) -> str:  # noqa: B006 - per-second cache
    second = int(record.created)
    if second != _cache[0]:
        _cache[0], _cache[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_cache[1]}.{int(record.msecs):03d}Z"


class _BatchedStderrHandler(logging.Handler):
    """Writes log lines to stderr in batches: one write per FLUSH_S (or per 256 lines) instead of one per
    request line; warnings and errors, and lines logged outside the event loop, are written at once."""

    FLUSH_S = 0.1
    MAX_LINES = 256

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self.lines) >= self.MAX_LINES:
            self.flush()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)
            except RuntimeError:  # no event loop: nothing would flush later
                self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr] - a Handler always has its lock
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.lines:
                lines, self.lines = self.lines, []
                try:
                    sys.stderr.write("\n".join(lines) + "\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        self.flush()
        super().close()


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = _timestamp(record)
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


# A `key=` at the start of a field; a bare value runs to the whitespace before the next `key=` (so a `%s`
# value with spaces or quotes stays whole), a quoted one is a Python string literal (`%r` of a str).
_LOG_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-]*)=")
_LOG_NEXT_KEY = re.compile(r"\s+(?=[A-Za-z_][A-Za-z0-9_.\-]*=)")
_LOG_SPACE = re.compile(r"\s*")
_LOG_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{1,3}|.)", re.DOTALL)
_LOG_SIMPLE_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                       "t": "\t", "v": "\v", "\n": ""}


def _unescape(match: re.Match[str]) -> str:
    esc = match.group(1)
    if esc in _LOG_SIMPLE_ESCAPES:
        return _LOG_SIMPLE_ESCAPES[esc]
    if esc[0] in "xuU" and len(esc) > 1:
        code = int(esc[1:], 16)
    elif esc[0] in "01234567":
        code = int(esc, 8)
    else:
        return match.group(0)  # not an escape: kept as written, as in a Python literal
    return chr(code) if code <= 0x10FFFF else match.group(0)


def _string_literal(text: str, start: int) -> tuple[str, int] | None:
    """The Python string literal (as repr() writes a str) opening at `start`, decoded, and the index after it;
    None when it does not close before a whitespace or the end of `text`."""
    quote = text[start]
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == quote:
            end = i + 1
            if end < n and not text[end].isspace():
                return None
            body = text[start + 1:i]
            return (_LOG_ESCAPE.sub(_unescape, body) if "\\" in body else body), end
        else:
            i += 1
    return None


def _log_fields(message: str) -> tuple[list[tuple[str, str]], str]:
    """The `key=value` fields of a log message, in order, and its other text (space-joined, may be empty).

    Values written with `%r` (Python string literals, either quote, escapes included) are decoded to the
    exact string; other values are taken as written, up to the next ` key=`. No content makes it fail."""
    fields: list[tuple[str, str]] = []
    free: list[str] = []
    i, n = 0, len(message)
    while True:
        i = _LOG_SPACE.match(message, i).end()  # type: ignore[union-attr] - \s* always matches
        if i >= n:
            break
        key = _LOG_KEY.match(message, i)
        start = key.end() if key else i
        if key and start < n and message[start] in "'\"":
            literal = _string_literal(message, start)
            if literal is not None:
                fields.append((key.group(1), literal[0]))
                i = literal[1]
                continue
        nxt = _LOG_NEXT_KEY.search(message, start)
        end = nxt.start() if nxt else n
        value = message[start:end]
        if key:
            fields.append((key.group(1), value if nxt else value.rstrip()))
        else:
            free.append(value.rstrip())
        i = end
    return fields, " ".join(free)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        ts = _timestamp(record)
        data: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
        fields, text = _log_fields(record.getMessage())
        data.update(fields)
        if text:
            data.setdefault("msg", text)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str, fmt: str) -> None:
    # No caller, thread or process lookup per record: the lines carry none of them (the logging
    # documentation's own advice for hot paths).
    logging._srcfile = None  # type: ignore[attr-defined]  # noqa: SLF001
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _BatchedStderrHandler()
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _KeyValueFormatter())
    root = logging.getLogger("baton")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


async def serve(args: argparse.Namespace) -> int:
    from baton.scheduler.server import build_server
    from baton.scheduler.service import SchedulerService, load_scheduler_tokenizer

    overrides = overrides_from_args(args)
    loaded: bytes | None = None  # the file's content the running config comes from, for the watcher
    try:
        if args.config:
            loaded = read_config_file(args.config)
            config = parse_config(loaded, overrides, source=args.config)
        else:
            config = load_config(None, overrides)
        tokenizer = await asyncio.to_thread(load_scheduler_tokenizer, config.tokenizer, os.environ)
        tokens.set_tokenizer(tokenizer)
        watcher = None
        if args.config:
            watcher = ConfigWatcher(
                args.config, lambda new: service.apply_config(new), overrides, interval=args.reload_interval,
                on_error=lambda _msg: service.hooks.config_reload("rejected"),
            )
            # Not a re-read of the config: it may have changed while the tokenizer loaded. Its watched files
            # (the redis URL) are read now, and the service uses what was read: a change after this is applied.
            watcher.prime(loaded, config)
        service = SchedulerService(config)
    except (ConfigError, TokenizerError, NotImplementedError, RuntimeError) as exc:
        print(f"baton scheduler: {exc}", file=sys.stderr)
        return 2
    if tokenizer is not None:
        log.info("event=tokenizer_loaded source=%s", tokenizer.source)
    server = build_server(service)
    await service.start()
    try:
        await server.start(config.server.host, config.server.port)
    except OSError as exc:
        print(f"baton scheduler: cannot listen on {config.server.host}:{config.server.port}: {exc}", file=sys.stderr)
        await service.stop()
        return 1
    if watcher is not None:
        watcher.start()
    freeze_heap()  # full GC passes now skip the start-up heap: shorter stalls for every stream
    log.info("event=listening url=http://%s:%d model=%s", config.server.host, server.port, config.model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
    log.info("event=shutting_down")
    # waiting and held requests still unserved when the drain ends are answered 503 (retry elsewhere)
    await server.stop(args.drain_seconds, before_cancel=service.shed_waiting)
    if watcher is not None:
        await watcher.stop()
    await service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
