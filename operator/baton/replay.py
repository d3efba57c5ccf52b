"""`baton replay`: replay a request trace against a scheduler (or any OpenAI-compatible server).

    baton replay TRACE.csv --url http://127.0.0.1:8000 [--speedup X | --rate R] [--limit N]
                 [--max-tokens-cap N] [--max-concurrency N] [--json] [--model NAME] [--timeout S]

The trace is a CSV with TIMESTAMP,ContextTokens,GeneratedTokens (the Azure LLM inference trace format;
the one beside this checkout, ../shared/traces/azure-llm-inference-2023-code.csv, is from Azure/AzurePublicDataset, CC-BY 4.0, Patel et al.,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024). Each row becomes one
streaming /v1/completions request whose prompt is exactly ContextTokens token ids and whose max_tokens is
GeneratedTokens, sent at its arrival time divided by --speedup (or at a fixed --rate per second). A zero
count is sent as 1 (no server takes an empty prompt or max_tokens 0) and the summary counts those rows.
Timestamps with a UTC offset are converted to UTC; timestamps without one are taken as UTC, so a trace may
mix both. --limit N keeps the N earliest arrivals (the whole trace is read and sorted first).

It measures time to first token (first streamed token), time per output token, end-to-end latency (all
from the moment a request is handed to the HTTP client), each request's send lag (that moment less its
scheduled time: the replay's own lateness, with a warning when it is large), and counts completed /
rejected (HTTP 429, by reason) / failed requests and the routes the scheduler reports (X-Baton-Route).
A progress line goes to stderr when it is a terminal; the summary to stdout, as a table or (--json) one
object. Requests in flight are not bounded unless --max-concurrency says so.
The run is bounded: every request has a timeout and no request is sent after the schedule ends.
Ctrl-C (or SIGTERM, SIGHUP) stops sending, cancels the requests in flight and prints the summary of those
that finished, marked as interrupted. Each request sends ignore_eos: true (--no-ignore-eos: not), so that a
real engine generates the trace's output lengths rather than stopping at an end-of-sequence token.

Exit status: 0 when at least one request completed (rejections are a normal outcome of a load test),
1 when none did, 2 for bad arguments or an unreadable trace, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import errno
import functools
import itertools
import json
import math
import re
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

VOCAB_LOW, VOCAB_HIGH = 1000, 30000  # token ids used for synthetic prompts (valid for any Llama vocabulary)
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

EXIT_OK = 0  # at least one request completed
EXIT_NONE_COMPLETED = 1  # every request was rejected or failed
EXIT_USAGE = 2  # bad arguments or an unreadable trace (argparse's own code)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after printing the partial summary

# A p99 send lag above this means the replay could not keep its schedule: its event loop was too busy to send
# on time, so the offered rate was not kept and the latencies it measured include its own queueing. Well over
# the timer's jitter on a loaded machine, well under the TTFT of any model.
SEND_LAG_WARN_MS = 20.0


@dataclass(frozen=True)
class TraceRow:
    offset_s: float  # arrival time relative to the first row
    context_tokens: int
    generated_tokens: int
    zero_raised: bool = False  # a count was 0 in the trace and is sent as 1


@dataclass
class Result:
    status: str  # completed | rejected | failed | unfinished (not sent, or cancelled by Ctrl-C)
    reason: str = ""
    route: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    send_lag_s: float | None = None  # sent this late against the schedule (None: not sent)
    requested_tokens: int = 0  # max_tokens asked for


@dataclass
class Summary:
    results: list[Result] = field(default_factory=list)
    duration_s: float = 0.0
    interrupted: bool = False
    zero_counts_raised: int = 0  # rows whose zero ContextTokens or GeneratedTokens was sent as 1


_FRACTION = re.compile(r"\.(\d+)")


_EPOCH = datetime(1970, 1, 1)


def parse_timestamp(text: str) -> datetime:
    """'2023-11-16 18:17:03.9799600' (7 fractional digits) or ISO 8601, as naive UTC; or a number of seconds
    (a trace of offsets such as 0.0, 0.25, ...).

    A timestamp with an offset ('+02:00', 'Z') is converted to UTC; one without is taken as UTC already,
    so naive and offset timestamps in one trace compare correctly.
    """
    text = original = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"timestamp {original!r} is not a time")
        return _EPOCH + timedelta(seconds=seconds)
    match = _FRACTION.search(text)
    if match:  # only the digits right after the dot: an offset such as '+00:00' follows them
        digits = (match.group(1) + "000000")[:6]
        text = f"{text[:match.start()]}.{digits}{text[match.end():]}"
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp {original!r} is neither ISO 8601 (e.g. 2023-11-16 18:17:03.9799600) nor a "
                         "number of seconds") from None
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc).replace(tzinfo=None)
    return ts


def read_trace(path: str | Path | TextIO, limit: int | None = None) -> list[TraceRow]:
    """Rows sorted by arrival, offsets relative to the first; bad rows raise ValueError with the line number.

    A UTF-8 byte order mark and spaces around header names and values are ignored; blank rows are skipped.
    `limit` keeps the `limit` earliest arrivals (the whole trace is read and sorted first). A zero count
    becomes 1, marked `zero_raised`: no server takes an empty prompt or max_tokens 0, and a trace may well
    hold such rows (a request cancelled before its first token).
    """
    handle = open(path, newline="", encoding="utf-8-sig") if isinstance(path, (str, Path)) else path
    try:
        reader = csv.DictReader(handle)
        if reader.fieldnames:  # the BOM too, for a handle opened without utf-8-sig
            reader.fieldnames = [(name or "").strip().lstrip("\ufeff").strip() for name in reader.fieldnames]
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            found = ", ".join(reader.fieldnames or []) or "none"
            raise ValueError(f"trace is missing column(s) {', '.join(sorted(missing))} (found: {found}; the "
                             f"header must name {', '.join(COLUMNS)}, comma-separated, as written)")
        raw: list[tuple[datetime, int, int]] = []
        for row in reader:
            values = [row.get(name) for name in COLUMNS]
            if all(not (v or "").strip() for v in values):
                continue  # a row of separators or spaces only
            try:
                absent = [name for name, v in zip(COLUMNS, values) if v is None or not v.strip()]
                if absent:
                    raise ValueError(f"no value for {', '.join(absent)}")
                ts, context, generated = (v or "" for v in values)
                counts = int(context), int(generated)
                if min(counts) < 0:
                    raise ValueError(f"negative token count ContextTokens={counts[0]}, GeneratedTokens={counts[1]}")
                raw.append((parse_timestamp(ts), *counts))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"trace line {reader.line_num}: {exc}") from None
    except csv.Error as exc:  # e.g. a field over the csv module's size limit, raised before its line counts
        raise ValueError(f"trace line {reader.line_num + 1}: {exc}") from None
    finally:
        if handle is not path:
            handle.close()
    raw.sort(key=lambda r: r[0])  # stable: rows with equal timestamps keep their order in the file
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        return []
    t0 = raw[0][0]
    return [TraceRow((ts - t0).total_seconds(), max(1, c), max(1, g), not (c and g)) for ts, c, g in raw]


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


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000.0, 3) if seconds is not None else None


def _ms_stats(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": _ms(percentile(values, q)) for q in (50, 90, 99)}


_ID_SPAN = VOCAB_HIGH - VOCAB_LOW
_INDEX_STEP, _ID_STEP = 7919, 31  # _ID_STEP is prime to _ID_SPAN: the ids run through the span before repeating


def synthetic_prompt(index: int, length: int) -> list[int]:
    """`length` token ids, different for each request index, within every Llama vocabulary."""
    start = (index * _INDEX_STEP) % _ID_SPAN
    return [VOCAB_LOW + (start + i * _ID_STEP) % _ID_SPAN for i in range(length)]


@functools.cache
def _id_cycle_json() -> tuple[bytes, list[int]]:
    """One period of the ids every synthetic prompt is a run of (request 0's), as JSON numbers each followed by
    a comma, and where each number starts (one more entry: the text's length)."""
    numbers = [b"%d," % i for i in synthetic_prompt(0, _ID_SPAN)]
    return b"".join(numbers), list(itertools.accumulate(map(len, numbers), initial=0))


def synthetic_prompt_json(index: int, length: int) -> bytes:
    """synthetic_prompt(index, length) as a JSON array, cut from the text of one period of the ids: a
    request's body costs a copy, not an encoding (~1 ms for a 7,000-token prompt, on the replay's loop)."""
    if length == 0:
        return b"[]"
    text, starts = _id_cycle_json()
    first = (index * _INDEX_STEP) * pow(_ID_STEP, -1, _ID_SPAN) % _ID_SPAN  # request 0's term it starts at
    laps, end = divmod(first + length, _ID_SPAN)
    if laps:
        ids = text[starts[first]:] + text * (laps - 1) + text[:starts[end]]
    else:
        ids = text[starts[first]:starts[end]]
    return b"[" + ids[:-1] + b"]"


def requested_tokens(row: TraceRow, max_tokens_cap: int | None) -> int:
    return min(row.generated_tokens, max_tokens_cap) if max_tokens_cap else row.generated_tokens


def request_body(model: str, index: int, row: TraceRow, max_tokens_cap: int | None, ignore_eos: bool = True) -> bytes:
    """The request for one row. `ignore_eos`: generate max_tokens whatever the model would end on (a real
    engine given a synthetic prompt may stop early, and the decode load would not be the trace's)."""
    fields: dict[str, Any] = {"model": model, "max_tokens": requested_tokens(row, max_tokens_cap), "stream": True,
                              # usage at the end: the token count TPOT divides by, whatever the chunks carry
                              "stream_options": {"include_usage": True}}
    if ignore_eos:
        fields["ignore_eos"] = True
    head = json.dumps(fields, separators=(",", ":")).encode()
    return head[:-1] + b',"prompt":' + synthetic_prompt_json(index, row.context_tokens) + b"}"


def summarize(summary: Summary) -> dict[str, Any]:
    """The report; `requests` counts the finished ones (all of them, unless the run was interrupted)."""
    results = [r for r in summary.results if r.status != "unfinished"]
    completed = [r for r in results if r.status == "completed"]
    rejected = [r for r in results if r.status == "rejected"]
    failed = [r for r in results if r.status == "failed"]
    lags = [r.send_lag_s for r in results if r.send_lag_s is not None]
    return {
        "requests": len(results),
        "completed": len(completed),
        "rejected": len(rejected),
        "failed": len(failed),
        "rejected_by_reason": dict(Counter(r.reason or "unknown" for r in rejected)),
        "failed_by_reason": dict(Counter(r.reason or "unknown" for r in failed)),
        "routes": dict(Counter(r.route for r in completed if r.route)),
        "ttft_ms": _ms_stats([r.ttft_s for r in completed if r.ttft_s is not None]),
        "tpot_ms": _ms_stats([r.tpot_s for r in completed if r.tpot_s is not None]),
        "latency_ms": _ms_stats([r.latency_s for r in completed if r.latency_s is not None]),
        "send_lag_ms": {**_ms_stats(lags), "max": _ms(max(lags, default=None))},
        "zero_counts_raised": summary.zero_counts_raised,
        "output_tokens": sum(r.output_tokens for r in completed),
        "requested_output_tokens": sum(r.requested_tokens for r in completed),
        "duration_s": round(summary.duration_s, 3),
        "throughput_rps": round(len(completed) / summary.duration_s, 3) if summary.duration_s > 0 else 0.0,
        "interrupted": summary.interrupted,
        "unfinished": len(summary.results) - len(results),
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
    if report.get("interrupted"):
        lines.insert(0, f"interrupted: {report['unfinished']} request(s) not sent or cancelled, not counted below")
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("latency_ms", "latency ms"),
                       ("send_lag_ms", "send lag ms")):
        s = report[key]
        most = f"   (max {f(s['max'])})" if "max" in s else ""
        lines.append(f"{label:<14}{f(s['p50']):>10}{f(s['p90']):>10}{f(s['p99']):>10}{most}")
    if report["zero_counts_raised"]:
        lines += ["", f"zero token counts: {report['zero_counts_raised']} trace row(s) sent with 1 instead of 0"]
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


_SSE_LINE_END = re.compile(rb"\r\n|\r|\n")


def split_sse_events(buffer: bytes, final: bool = False) -> tuple[list[bytes], bytes]:
    """The complete events at the start of `buffer` (their lines joined by LF) and the unparsed rest.

    Lines end in CRLF, LF or CR (the SSE spec) and a blank line ends an event. A CR at the very end of the
    buffer may be half of a CRLF split across reads, so it is kept for the next call unless `final`.
    """
    events: list[bytes] = []
    lines: list[bytes] = []
    pos = rest = 0
    for match in _SSE_LINE_END.finditer(buffer):
        if match.group() == b"\r" and match.end() == len(buffer) and not final:
            break
        line = buffer[pos:match.start()]
        pos = match.end()
        if line:
            lines.append(line)
            continue
        if lines:
            events.append(b"\n".join(lines))
            lines = []
        rest = pos
    return events, buffer[rest:]


def sse_data(event: bytes) -> bytes | None:
    """The data of one event (its `data:` lines, each less one leading space, joined by LF), or None."""
    data = [line[6:] if line.startswith(b"data: ") else line[5:]
            for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data).strip() if data else None


def exception_reason(exc: BaseException) -> str:
    """A request's failure reason for an exception: its class, and the name of its errno when it has one
    (ClientConnectorError:EMFILE is the replay out of file descriptors, ...:ECONNREFUSED the server)."""
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code) if isinstance(code, int) else None
    return f"{type(exc).__name__}:{name}" if name else type(exc).__name__


async def send_one(session: Any, url: str, index: int, body: bytes, timeout: float) -> Result:
    """POST one request body and read its answer; times are from the call."""
    import aiohttp

    headers = {"Content-Type": "application/json", "X-Request-Id": f"replay-{index}"}
    t0 = time.perf_counter()
    route = ""
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
                usage_tokens: int | None = None
                done = False
                buffer = b""
                eof = False
                chunks = resp.content.iter_any()
                while not eof and not done:
                    chunk = await anext(chunks, None)
                    eof = chunk is None
                    buffer += chunk or b""
                    events, buffer = split_sse_events(buffer, final=eof)
                    for event in events:
                        payload = sse_data(event)
                        if payload is None:
                            continue
                        if payload == b"[DONE]":
                            done = True  # the last event: the answer is complete whether or not the body ends
                            break
                        try:
                            data = json.loads(payload)
                        except ValueError:
                            continue
                        if not isinstance(data, dict):
                            continue
                        if "error" in data or data.get("object") == "error":
                            err = data.get("error", data)
                            code = err.get("code") if isinstance(err, dict) else None
                            return Result("failed", str(code or "stream_error"), route)
                        n = event_tokens(data)
                        if n is None:
                            return Result("failed", "bad_event", route)
                        usage = data.get("usage")
                        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                            usage_tokens = usage["completion_tokens"]
                        if n:
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            last = now
                            tokens += n
                end = time.perf_counter()
                if not done:
                    return Result("failed", "stream_incomplete", route)
                if usage_tokens is not None:
                    tokens = usage_tokens
                ttft = (first - t0) if first is not None else None
                tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
                return Result("completed", "", route, ttft, tpot, end - t0, tokens)
    except TimeoutError:
        return Result("failed", "timeout", route)
    except (aiohttp.ClientError, OSError) as exc:
        return Result("failed", exception_reason(exc), route)


def event_tokens(data: dict[str, Any]) -> int | None:
    """Tokens one streamed event carries: its choices' token ids where it sends them, else one per choice
    that is a generation step: trtllm-serve (token_ids null) sends a chunk per step also when the step's
    text is held back (part of a UTF-8 character, a special token skipped), so empty text counts too. Not
    counted: a chat stream's role chunk, a closing chunk with nothing but its finish_reason, the usage
    chunk (no choices). None for an event that is not a completion chunk as OpenAI's API shapes one."""
    choices = data.get("choices") or []
    if not isinstance(choices, list):
        return None
    n = 0
    for choice in choices:
        if not isinstance(choice, dict):
            return None
        ids = choice.get("token_ids")
        delta = choice.get("delta")
        if not (delta is None or isinstance(delta, dict)) or not (ids is None or isinstance(ids, list)):
            return None
        if ids is not None:  # the ids a step produced, when the server sends them (the simulator, Baton's Triton path)
            n += len(ids)
            continue
        if delta is None:
            text = choice.get("text")
        else:
            text = delta.get("content")
            if text is None:
                text = delta.get("reasoning_content") or delta.get("reasoning")
            if "role" in delta and not text:
                continue  # the role chunk
        if text or (isinstance(text, str) and choice.get("finish_reason") is None):
            n += 1
    return n


async def run_replay(rows: Sequence[TraceRow], url: str, *, model: str, speedup: float | None = None,
                     rate: float | None = None, max_tokens_cap: int | None = None, timeout: float = 60.0,
                     max_concurrency: int | None = None, progress: Progress | None = None,
                     summary: Summary | None = None, ignore_eos: bool = True) -> Summary:
    """Send every row on schedule and collect the results into `summary` (a new one if None).

    One dispatcher sleeps until each row is due and only then starts its request (memory and start-up time do
    not grow with the trace's length). At most `max_concurrency` requests are in flight (None: no bound); one
    due while they are waits for one to finish, and that wait is part of its send lag. Results are recorded as
    requests finish, so when the run is cancelled (Ctrl-C under asyncio.run) the caller's `summary` still holds
    those that finished, with the duration so far; requests not sent or cancelled in flight stay "unfinished".
    """
    import aiohttp

    url = url.rstrip("/")
    times = schedule(rows, speedup, rate)
    if summary is None:
        summary = Summary()
    summary.results = [Result("unfinished")] * len(rows)
    summary.zero_counts_raised = sum(row.zero_raised for row in rows)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    _id_cycle_json()  # made once, before the clock starts
    connector = aiohttp.TCPConnector(limit=0, force_close=False)  # the slots bound the connections
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def fire(i: int) -> None:
            async with slots:
                # not ahead: a trace's bodies are ~100 MB
                body = request_body(model, i, rows[i], max_tokens_cap, ignore_eos)
                lag = max(0.0, loop.time() - start - times[i])  # a timer may fire a clock tick early
                try:
                    result = await send_one(session, url, i, body, timeout)
                except Exception as exc:  # noqa: BLE001 - one request's surprise must not end the run
                    result = Result("failed", exception_reason(exc))
            result.send_lag_s = lag
            result.requested_tokens = requested_tokens(rows[i], max_tokens_cap)
            summary.results[i] = result
            if progress is not None:
                progress.update(result.status)

        in_flight: set[asyncio.Task[None]] = set()
        try:
            for i in range(len(rows)):
                delay = start + times[i] - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = loop.create_task(fire(i))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight:
                await asyncio.wait(list(in_flight))
        finally:
            for task in list(in_flight):  # cancelled (Ctrl-C, a signal): so are the requests in flight
                task.cancel()
            if in_flight:
                await asyncio.wait(list(in_flight))
            summary.duration_s = loop.time() - start
    return summary


def discover_model(url: str, timeout: float) -> str:
    """The first model id served at `url` (GET /v1/models), or "model" when it cannot be read. Nothing
    listening at `url` (connection refused, no such host) raises OSError: the replay would only fail every
    request."""
    import urllib.error

    from baton.direct_http import NO_PROXY_OPENER

    try:  # like the requests themselves (aiohttp, which ignores proxy variables by default): no proxy
        with NO_PROXY_OPENER.open(url.rstrip("/") + "/v1/models", timeout=min(timeout, 10.0)) as resp:
            return str(json.loads(resp.read())["data"][0]["id"])
    except urllib.error.URLError as exc:
        reason = getattr(exc, "reason", None)
        if not isinstance(exc, urllib.error.HTTPError) and isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
            raise OSError(f"nothing answers at {url.rstrip('/')} ({reason}): start the scheduler, or check --url") \
                from None
        print(f"baton replay: could not read the model name from {url.rstrip('/')}/v1/models "
              f"({type(exc).__name__}: {exc}); sending model \"model\" (name one with --model)", file=sys.stderr)
        return "model"
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        print(f"baton replay: could not read the model name from {url.rstrip('/')}/v1/models "
              f"({type(exc).__name__}: {exc}); sending model \"model\" (name one with --model)", file=sys.stderr)
        return "model"


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def base_url(text: str) -> str:
    """An argparse type: an http:// or https:// URL with a host (aiohttp sends nothing to anything else)."""
    from urllib.parse import urlsplit

    text = text.strip()
    parts = urlsplit(text)
    try:
        parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad URL {text!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL such as http://127.0.0.1:8000, "
                                         f"got {text!r}")
    if parts.path.rstrip("/").endswith("/v1"):
        # the usual OpenAI base URL: requests go to <url>/v1/completions, not /v1/v1/completions
        return text.rstrip("/")[:-len("/v1")]
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton replay", description="Replay a request trace against a scheduler.",
        epilog=f"Exit status: {EXIT_OK} when at least one request completed (rejections are a normal outcome); "
               f"{EXIT_NONE_COMPLETED} when none did; {EXIT_USAGE} for bad arguments or an unreadable trace; "
               f"{EXIT_INTERRUPTED} when interrupted by Ctrl-C, SIGTERM or SIGHUP (after printing the summary of the requests "
               "that finished).")
    p.add_argument("trace", help="CSV with TIMESTAMP,ContextTokens,GeneratedTokens")
    p.add_argument("--url", required=True, type=base_url, help="scheduler base URL, e.g. http://127.0.0.1:8000")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speedup", type=positive_number,
                      help="divide the trace's inter-arrival times by X (default 1)")
    pace.add_argument("--rate", type=positive_number, help="ignore the timestamps; send R requests per second")
    p.add_argument("--limit", type=positive_int, help="replay only the N earliest requests (by timestamp)")
    p.add_argument("--max-tokens-cap", type=positive_int, help="cap max_tokens (GeneratedTokens) at N")
    p.add_argument("--model", help="model name to send (default: the first id the URL's /v1/models lists)")
    p.add_argument("--timeout", type=positive_number, default=60.0,
                   help="per-request timeout in seconds (default 60)")
    p.add_argument("--max-concurrency", type=positive_int,
                   help="at most N requests in flight; one due while N are waits, and counts as send lag "
                        "(default: no bound, each request goes out on time)")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let the server end a generation before max_tokens (by default each request sends "
                        "ignore_eos: true, so the output lengths are the trace's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _stop_on_signals() -> list[str]:
    """SIGTERM and SIGHUP (`timeout`, a CI job cancelled, a closed terminal) stop the replay as Ctrl-C does:
    what finished is summarized. Returns the list the name of the signal that stopped it goes in."""
    caught: list[str] = []

    def stop(signum: int, frame: Any) -> None:
        caught.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    return caught


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = read_trace(args.trace, args.limit)
        if not rows:
            print("baton replay: the trace has no requests", file=sys.stderr)
            return EXIT_USAGE
        model = args.model or discover_model(args.url, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"baton replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("baton replay: interrupted before sending anything", file=sys.stderr)
        return EXIT_INTERRUPTED
    times = schedule(rows, args.speedup, args.rate)
    print(f"baton replay: {len(rows)} request(s) to {args.url}, model {model!r}, sent over "
          f"{times[-1]:.1f} s", file=sys.stderr)
    progress = Progress(len(rows), enabled=not args.no_progress and sys.stderr.isatty())
    summary = Summary()
    stopped_by = _stop_on_signals()
    try:
        asyncio.run(run_replay(rows, args.url, model=model, speedup=args.speedup, rate=args.rate,
                               max_tokens_cap=args.max_tokens_cap, timeout=args.timeout,
                               max_concurrency=args.max_concurrency, progress=progress, summary=summary,
                               ignore_eos=not args.no_ignore_eos))
    except KeyboardInterrupt:  # asyncio.run has cancelled the replay: summary holds what finished
        summary.interrupted = True
    progress.close()
    report = summarize(summary)
    print(json.dumps(report) if args.json else format_table(report), flush=True)
    lag = report["send_lag_ms"]["p99"]
    if lag is not None and lag > SEND_LAG_WARN_MS:
        print(f"baton replay: warning: p99 send lag {lag:.1f} ms (over {SEND_LAG_WARN_MS:g} ms): requests went "
              "out late, so the offered rate was not kept and the latencies include the replay's own queueing; "
              "try a lower --rate or --speedup, or fewer or shorter prompts"
              + (", or a higher --max-concurrency" if args.max_concurrency else ""), file=sys.stderr)
    short = report["requested_output_tokens"] - report["output_tokens"]
    if short > 0:
        print(f"baton replay: warning: the completed requests generated {report['output_tokens']} of the "
              f"{report['requested_output_tokens']} tokens asked for: the server ended generations early"
              + (" (--no-ignore-eos)" if args.no_ignore_eos else " although ignore_eos was sent")
              + ", so the decode load was lighter than the trace's", file=sys.stderr)
    if summary.interrupted:
        how = f" by {stopped_by[0]}" if stopped_by else ""
        print(f"baton replay: interrupted{how}; {report['unfinished']} request(s) not sent or cancelled",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if not report["completed"]:
        print("baton replay: no request completed", file=sys.stderr)
        return EXIT_NONE_COMPLETED
    return EXIT_OK
