"""`baton replay`: replay a request trace against a scheduler (or any OpenAI-compatible server).

    baton replay TRACE.csv --url http://127.0.0.1:8000 [--speedup X | --rate R] [--limit N]
                 [--max-tokens-cap N] [--json] [--model NAME] [--timeout S]

The trace is a CSV with TIMESTAMP,ContextTokens,GeneratedTokens (the Azure LLM inference trace format;
shared/traces/azure-llm-inference-2023-code.csv is from Azure/AzurePublicDataset, CC-BY 4.0, Patel et al.,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024). Each row becomes one
streaming /v1/completions request whose prompt is exactly ContextTokens token ids and whose max_tokens is
GeneratedTokens, sent at its arrival time divided by --speedup (or at a fixed --rate per second).

It measures time to first token (first streamed token), time per output token, end-to-end latency, and
counts completed / rejected (HTTP 429, by reason) / failed requests and the routes the scheduler reports
(X-Baton-Route). A progress line goes to stderr; the summary to stdout, as a table or (--json) one object.
The run is bounded: every request has a timeout and no request is sent after the schedule ends.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

VOCAB_LOW, VOCAB_HIGH = 1000, 30000  # token ids used for synthetic prompts (valid for any Llama vocabulary)


@dataclass(frozen=True)
class TraceRow:
    offset_s: float  # arrival time relative to the first row
    context_tokens: int
    generated_tokens: int


@dataclass
class Result:
    status: str  # completed | rejected | failed
    reason: str = ""
    route: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0


@dataclass
class Summary:
    results: list[Result] = field(default_factory=list)
    duration_s: float = 0.0


def parse_timestamp(text: str) -> datetime:
    """'2023-11-16 18:17:03.9799600' (7 fractional digits) or ISO 8601; naive, as written."""
    text = text.strip()
    base, dot, frac = text.partition(".")
    if dot:
        digits = "".join(ch for ch in frac if ch.isdigit())
        tail = frac[len(digits):]
        text = f"{base}.{(digits + '000000')[:6]}{tail}"
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def read_trace(path: str | Path | TextIO, limit: int | None = None) -> list[TraceRow]:
    """Rows sorted by arrival, offsets relative to the first; bad rows raise ValueError with the line number."""
    handle = open(path, newline="", encoding="utf-8") if isinstance(path, (str, Path)) else path
    try:
        reader = csv.DictReader(handle)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"trace is missing column(s) {', '.join(sorted(missing))}")
        raw: list[tuple[datetime, int, int]] = []
        for line, row in enumerate(reader, start=2):
            try:
                raw.append((parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"trace line {line}: {exc}") from None
            if limit is not None and len(raw) >= limit:
                break
    finally:
        if handle is not path:
            handle.close()
    if not raw:
        return []
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
    return [TraceRow((ts - t0).total_seconds(), max(1, c), max(1, g)) for ts, c, g in raw]


def schedule(rows: Sequence[TraceRow], speedup: float | None = None, rate: float | None = None) -> list[float]:
    """Send time (seconds from start) of each row: fixed rate, or trace arrival / speedup."""
    if rate:
        return [i / rate for i in range(len(rows))]
    factor = speedup or 1.0
    return [row.offset_s / factor for row in rows]


def percentile(values: Iterable[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), as numpy's default; None for no values."""
    data = sorted(values)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _ms_stats(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in (50, 90, 99):
        p = percentile(values, q)
        out[f"p{q}"] = round(p * 1000.0, 3) if p is not None else None
    return out


def synthetic_prompt(index: int, length: int) -> list[int]:
    """`length` token ids, different for each request index, within every Llama vocabulary."""
    span = VOCAB_HIGH - VOCAB_LOW
    start = (index * 7919) % span
    return [VOCAB_LOW + (start + i * 31) % span for i in range(length)]


def summarize(summary: Summary) -> dict[str, Any]:
    results = summary.results
    completed = [r for r in results if r.status == "completed"]
    rejected = [r for r in results if r.status == "rejected"]
    failed = [r for r in results if r.status == "failed"]
    return {
        "requests": len(results),
        "completed": len(completed),
        "rejected": len(rejected),
        "failed": len(failed),
        "rejected_by_reason": dict(Counter(r.reason or "unknown" for r in rejected)),
        "failed_by_reason": dict(Counter(r.reason or "unknown" for r in failed)),
        "routes": dict(Counter(r.route for r in results if r.route)),
        "ttft_ms": _ms_stats([r.ttft_s for r in completed if r.ttft_s is not None]),
        "tpot_ms": _ms_stats([r.tpot_s for r in completed if r.tpot_s is not None]),
        "latency_ms": _ms_stats([r.latency_s for r in completed if r.latency_s is not None]),
        "output_tokens": sum(r.output_tokens for r in completed),
        "duration_s": round(summary.duration_s, 3),
        "throughput_rps": round(len(completed) / summary.duration_s, 3) if summary.duration_s > 0 else 0.0,
    }


def format_table(report: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"requests {report['requests']}  completed {report['completed']}  rejected {report['rejected']}  "
        f"failed {report['failed']}  duration {report['duration_s']:.1f}s  "
        f"throughput {report['throughput_rps']:.2f} req/s",
        "",
        f"{'metric':<14}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("latency_ms", "latency ms")):
        s = report[key]
        lines.append(f"{label:<14}{f(s['p50']):>10}{f(s['p90']):>10}{f(s['p99']):>10}")
    if report["routes"]:
        lines += ["", "routes: " + ", ".join(f"{k}={v}" for k, v in sorted(report["routes"].items()))]
    if report["rejected_by_reason"]:
        lines.append("rejected: " + ", ".join(f"{k}={v}" for k, v in sorted(report["rejected_by_reason"].items())))
    if report["failed_by_reason"]:
        lines.append("failed: " + ", ".join(f"{k}={v}" for k, v in sorted(report["failed_by_reason"].items())))
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.counts: Counter[str] = Counter()
        self._last = 0.0

    def update(self, status: str, force: bool = False) -> None:
        if status:
            self.counts[status] += 1
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.1):
            return
        self._last = now
        done = sum(self.counts.values())
        width = 30
        filled = int(width * done / self.total) if self.total else width
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"ok={self.counts['completed']} 429={self.counts['rejected']} failed={self.counts['failed']}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update("", force=True)
            self.stream.write("\n")
            self.stream.flush()


def _error_reason(status: int, headers: Any, body: bytes) -> str:
    reason = headers.get("X-Baton-Error", "") if headers is not None else ""
    if not reason:
        try:
            data = json.loads(body)
            err = data.get("error", data) if isinstance(data, dict) else {}
            code = err.get("code") if isinstance(err, dict) else None
            reason = str(code) if code not in (None, "") else ""
        except ValueError:
            pass
    return reason or f"http_{status}"


async def send_one(session: Any, url: str, model: str, index: int, row: TraceRow, max_tokens_cap: int | None,
                   timeout: float) -> Result:
    import aiohttp

    max_tokens = min(row.generated_tokens, max_tokens_cap) if max_tokens_cap else row.generated_tokens
    body = json.dumps({"model": model, "prompt": synthetic_prompt(index, row.context_tokens),
                       "max_tokens": max_tokens, "stream": True}, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": f"replay-{index}"}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + "/v1/completions", data=body, headers=headers) as resp:
                route = resp.headers.get("X-Baton-Route", "")
                if resp.status != 200:
                    data = await resp.read()
                    status = "rejected" if resp.status == 429 else "failed"
                    return Result(status, _error_reason(resp.status, resp.headers, data), route)
                first: float | None = None
                last = t0
                tokens = 0
                done = False
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        payload = event.strip()
                        if not payload.startswith(b"data:"):
                            continue
                        payload = payload[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        try:
                            data = json.loads(payload)
                        except ValueError:
                            continue
                        if "error" in data or data.get("object") == "error":
                            err = data.get("error", data)
                            code = err.get("code") if isinstance(err, dict) else None
                            return Result("failed", str(code or "stream_error"), route)
                        n = 0
                        for choice in data.get("choices") or []:
                            ids = choice.get("token_ids")
                            if ids:
                                n += len(ids)
                            elif choice.get("text") or (choice.get("delta") or {}).get("content"):
                                n += 1
                        if n:
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            last = now
                            tokens += n
                end = time.perf_counter()
                if not done:
                    return Result("failed", "stream_incomplete", route)
                ttft = (first - t0) if first is not None else None
                tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
                return Result("completed", "", route, ttft, tpot, end - t0, tokens)
    except TimeoutError:
        return Result("failed", "timeout")
    except (aiohttp.ClientError, OSError) as exc:
        return Result("failed", type(exc).__name__)


async def run_replay(rows: Sequence[TraceRow], url: str, *, model: str, speedup: float | None = None,
                     rate: float | None = None, max_tokens_cap: int | None = None, timeout: float = 60.0,
                     progress: Progress | None = None) -> Summary:
    import aiohttp

    url = url.rstrip("/")
    times = schedule(rows, speedup, rate)
    summary = Summary(results=[Result("failed", "not_sent")] * len(rows))
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def fire(i: int) -> None:
            delay = start + times[i] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            result = await send_one(session, url, model, i, rows[i], max_tokens_cap, timeout)
            summary.results[i] = result
            if progress is not None:
                progress.update(result.status)

        await asyncio.gather(*(fire(i) for i in range(len(rows))))
        summary.duration_s = loop.time() - start
    return summary


def discover_model(url: str, timeout: float) -> str:
    """The first model id served at `url` (GET /v1/models), or "model" when it cannot be read."""
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=min(timeout, 10.0)) as resp:
            return str(json.loads(resp.read())["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton replay", description="Replay a request trace against a scheduler.")
    p.add_argument("trace", help="CSV with TIMESTAMP,ContextTokens,GeneratedTokens")
    p.add_argument("--url", required=True, help="scheduler base URL, e.g. http://127.0.0.1:8000")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=float, help="divide the trace's inter-arrival times by X (default 1)")
    pace.add_argument("--rate", type=float, help="ignore the timestamps; send R requests per second")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--max-tokens-cap", type=int, help="cap max_tokens (GeneratedTokens) at N")
    p.add_argument("--model", help="model name to send (default: the first id the URL's /v1/models lists)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.speedup is not None and args.speedup <= 0:
        print("baton replay: --speedup must be > 0", file=sys.stderr)
        return 2
    if args.rate is not None and args.rate <= 0:
        print("baton replay: --rate must be > 0", file=sys.stderr)
        return 2
    try:
        rows = read_trace(args.trace, args.limit)
    except (OSError, ValueError) as exc:
        print(f"baton replay: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("baton replay: the trace has no requests", file=sys.stderr)
        return 2
    model = args.model or discover_model(args.url, args.timeout)
    progress = Progress(len(rows), enabled=not args.no_progress)
    summary = asyncio.run(run_replay(rows, args.url, model=model, speedup=args.speedup, rate=args.rate,
                                     max_tokens_cap=args.max_tokens_cap, timeout=args.timeout, progress=progress))
    progress.close()
    report = summarize(summary)
    print(json.dumps(report) if args.json else format_table(report))
    return 0
