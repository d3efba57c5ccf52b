"""Structured logs: one JSON object per line on stderr.

Call sites pass their fields as `extra={"fields": {...}}`; `request_id` is the client's X-Request-Id (or the
engine's own id when the client sent none), so one request can be followed across the scheduler, the
context worker and the generation worker.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str, component: dict | None = None) -> None:
    """Send baton.engine_sim logs (and, for the Triton front end's side app, aiohttp's errors) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name, lvl in (("baton.engine_sim", level), ("aiohttp", "WARNING")):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(lvl)
        logger.propagate = False
