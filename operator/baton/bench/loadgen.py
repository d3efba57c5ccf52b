"""The benchmarks' load generator: a separate process that sends HTTP requests and times them.

    python -m baton.bench.loadgen < spec.json > results.json

It runs in its own process so that, on a small machine, its CPU time is not charged to the processes
under test and can be reported separately. It uses the scheduler's own HTTP/1.1 client (`baton.http1`,
parsed in the data callbacks) because a general-purpose client library would cost several times more CPU
per request than the scheduler being measured.

Input (stdin, one JSON object):
    {"watch": {"name": pid, ...},          # processes whose CPU time is read from /proc before/after each phase
     "phases": [PHASE, ...]}             # (nanosecond schedstat counts when they agree with the ticks)
PHASE:
    {"name": str,
     "target": {"kind": "single", "addr": "127.0.0.1:PORT", "path": "/v1/completions"}
             | {"kind": "handoff", "ctx": ADDR, "gen": ADDR, "path": "/v1/completions"},
     "bodies": {"kind": "ids", "rows": [[prompt_tokens, max_tokens], ...], "first_index": int}
             | {"kind": "text", "bytes": int, "count": int, "max_tokens": int, "first_index": int},
     "model": str, "stream": bool,
     "mode": "open", "rate": float            # fixed-rate arrivals (open loop)
           | "closed", "concurrency": int     # each worker sends its next request when the last one ends
     "max_seconds": float,                     # no request is sent after this; outstanding ones get `timeout_s`
     "timeout_s": float,
     "record": bool}                           # false: warm-up, results not returned
Output (stdout, one JSON object): {"phases": [RESULT, ...]} where RESULT has "name", "sent", "wall_s"
(first send to last answer), "loadgen_cpu_s", "cpu_s" ({name: seconds} of the watched processes),
"machine_busy_s" (busy CPU seconds of the whole machine, every process included, and the time the
host ran something else on its CPUs, "steal"), "machine_steal_s" (that steal time alone),
"send_lag_ms" ({p50, p99, max}: how late an open loop's requests started against their schedule, read
when each request's coroutine starts and its clock with it; null for a closed loop), and "requests": one list per
request, in index order: [index, status, latency_s, ttft_s, retry_after, route, engine_s, error, sent_at_s,
sse_events] (`sent_at_s` from the phase's start), where
`engine_s` (handoff target only) is the sum of the two engine round trips, excluding the client's own
work between them, and `retry_after` is the Retry-After header's value or null.
Every phase is bounded by its request count and `max_seconds`; every request by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from typing import Any

from baton.gcpauses import freeze_heap
from baton.http1.client import HttpClient
from baton.idlists import RawJSON
from baton.scheduler.requests import parse_context_answer

VOCAB_LOW, VOCAB_HIGH = 1000, 30000  # token ids valid for any Llama vocabulary (as baton.replay uses)
_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu the of and to in is that for it as"
).split()
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ------------------------------------------------------------------------------------------------ bodies
def prompt_ids(index: int, length: int) -> list[int]:
    """`length` token ids, different for each request index (the same ids as `baton replay` sends)."""
    span = VOCAB_HIGH - VOCAB_LOW
    start = (index * 7919) % span
    return [VOCAB_LOW + (start + i * 31) % span for i in range(length)]


def prompt_text(index: int, nbytes: int) -> str:
    """ASCII text of exactly `nbytes` bytes, different for each request index (no JSON escaping needed)."""
    words = []
    size = 0
    k = index * 2654435761
    while size < nbytes:
        k = (k * 1103515245 + 12345) & 0x7FFFFFFF
        word = _WORDS[k % len(_WORDS)]
        words.append(word)
        size += len(word) + 1
    return (f"{index} " + " ".join(words))[:nbytes]


def build_bodies(spec: dict[str, Any], model: str, stream: bool) -> list[dict[str, Any]]:
    first = int(spec.get("first_index", 0))
    if spec["kind"] == "ids":
        return [{"model": model, "prompt": prompt_ids(first + i, int(n)), "max_tokens": int(m), "stream": stream}
                for i, (n, m) in enumerate(spec["rows"])]
    if spec["kind"] == "text":
        return [{"model": model, "prompt": prompt_text(first + i, int(spec["bytes"])),
                 "max_tokens": int(spec["max_tokens"]), "stream": stream} for i in range(int(spec["count"]))]
    raise ValueError(f"unknown bodies kind {spec['kind']!r}")


def compact_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def context_only(body: dict[str, Any]) -> dict[str, Any]:
    """A request's fields as the context_only half of a handoff sends them (a whole JSON answer)."""
    return {**body, "stream": False, "disaggregated_params": {"request_type": "context_only"}}


def generation_only_params(answer: bytes) -> tuple[dict[str, Any], RawJSON | None]:
    """From a context_only answer: the `disaggregated_params` the generation_only half sends, and the
    answer's prompt ids as raw JSON (None when it had none) for that request's prompt."""
    data, ids = parse_context_answer(answer)
    params = dict(data["choices"][0]["disaggregated_params"])
    params["request_type"] = "generation_only"
    return params, ids


_PAYLOADS_BUDGET = 768 << 20  # bytes of bodies kept (a closed loop's 8,000 trace prompts are ~100 MB)
_payloads: dict[tuple[str, str, bool, str], tuple[list[bytes], list[bytes]]] = {}


def _set_bytes(kept: tuple[list[bytes], list[bytes]]) -> int:
    return sum(map(len, kept[0])) + sum(map(len, kept[1]))


def payloads(spec: dict[str, Any], model: str, stream: bool, kind: str) -> tuple[list[bytes], list[bytes]]:
    """The request bodies of a phase (and, for the handoff target, the generation_only bodies' heads).

    Building them takes seconds for a closed loop's thousands of token-id prompts, and the same requests
    come back: down another path in the same round (`interleaved`, the alternating closed loops), or a few
    phases later when the rounds of several measurements are woven together. So the most recently used
    sets are kept, up to `_PAYLOADS_BUDGET` bytes of bodies (the newest set always)."""
    key = (json.dumps(spec, sort_keys=True), model, stream, kind)
    kept = _payloads.pop(key, None)
    if kept is None:
        bodies = build_bodies(spec, model, stream)
        if kind == "single":
            kept = [compact_json(b) for b in bodies], []
        elif kind == "handoff":
            kept = ([compact_json(context_only(b)) for b in bodies],
                    # generation_only bodies are this head + the handle + the context answer's prompt ids (spliced)
                    [compact_json({k: v for k, v in b.items() if k != "prompt"})[:-1] for b in bodies])
        else:
            raise ValueError(f"unknown target kind {kind!r}")
    _payloads[key] = kept
    total = sum(map(_set_bytes, _payloads.values()))
    while total > _PAYLOADS_BUDGET and len(_payloads) > 1:
        oldest = next(iter(_payloads))  # the least recently used
        total -= _set_bytes(_payloads.pop(oldest))
    return kept


# ------------------------------------------------------------------------------------------------ HTTP
class Answer:
    __slots__ = ("status", "headers", "body", "t_first", "done", "events")

    def __init__(self, status: int, headers: dict[str, str], body: bytes, t_first: float | None,
                 done: bool, events: int = 0) -> None:
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body  # b"" for a streamed 200 answer (only its events are counted)
        self.t_first = t_first  # perf_counter when the first body bytes arrived
        self.done = done  # a streamed answer ended with [DONE]
        self.events = events  # SSE events ("data:" lines) in the body


class _StreamCount:
    """Counts a relayed stream's SSE events and watches for `[DONE]` (also across a read boundary)."""

    __slots__ = ("events", "done", "tail", "ended")

    def __init__(self, ended: asyncio.Future[None], first: bytes) -> None:
        self.events = 0
        self.done = False
        self.tail = b""
        self.ended = ended
        self.data(first)

    def data(self, chunk: bytes) -> None:
        if b"[DONE]" in chunk or b"[DONE]" in self.tail + chunk[:8]:
            self.done = True
        self.tail = chunk[-8:]
        self.events += chunk.count(b"data:")

    def end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def error(self, exc: Exception) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)


class Pool:
    """Requests to one host:port over the shared `baton.http1` client (keep-alive, one request per
    connection at a time): whole answers are read, a streamed answer is timed at its first bytes and its
    events counted from the client's data callbacks (no coroutine switch per SSE chunk: the load generator
    must stay cheaper than what it measures)."""

    def __init__(self, addr: str, client: HttpClient) -> None:
        host, _, port = addr.rpartition(":")
        self.host = host
        self.port = int(port)
        self.client = client

    async def request(self, path: str, body: bytes, request_id: str) -> Answer:
        resp = await self.client.open("POST", self.host, self.port, path, body,
                                      {"Content-Type": "application/json", "X-Request-Id": request_id})
        try:
            if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                data = await resp.read()
                return Answer(resp.status, resp.headers, data, time.perf_counter(), False,
                              data.count(b"data:"))
            first = await resp.first()
            t_first = time.perf_counter()
            ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            count = _StreamCount(ended, first)
            resp.relay(count.data, count.end, count.error)
            await ended
            return Answer(200, resp.headers, b"", t_first, count.done, count.events)
        finally:
            resp.release()  # a connection not read to its end is closed, not reused


# ------------------------------------------------------------------------------------------------ phases
def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a whole process (all its threads, live or exited) from /proc/<pid>/stat, in
    10 ms ticks; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_cpu_ns_seconds(pid: int) -> float | None:
    """CPU time of a process's live threads from /proc/<pid>/task/*/schedstat (nanoseconds); None if
    unreadable. Finer than `proc_cpu_seconds` but blind to threads that exited."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as handle:
                total += int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def cpu_reading(pid: int) -> tuple[float | None, float | None]:
    return proc_cpu_seconds(pid), proc_cpu_ns_seconds(pid)


def cpu_delta(before: tuple[float | None, float | None], after: tuple[float | None, float | None]) -> float | None:
    """CPU seconds between two `cpu_reading`s: the nanosecond count when it agrees with the tick count
    (within two ticks and 5%), else the tick count (a thread exited in between)."""
    if before[0] is None or after[0] is None:
        return None
    ticks = after[0] - before[0]
    if before[1] is not None and after[1] is not None:
        ns = after[1] - before[1]
        if ns >= 0 and abs(ns - ticks) <= 2.0 / CLK_TCK + 0.05 * ticks:
            return ns
    return ticks


def machine_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of all CPUs since boot, from /proc/stat: busy = not idle or waiting for
    I/O, steal (a virtual machine's CPUs running nothing of ours because the host ran something else)
    included; None if unreadable."""
    try:
        with open("/proc/stat", "rb") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class Phase:
    def __init__(self, spec: dict[str, Any], pools: dict[str, Pool], client: HttpClient) -> None:
        self.spec = spec
        self.name = spec["name"]
        self.stream = bool(spec.get("stream", True))
        self.timeout = float(spec.get("timeout_s", 30.0))
        target = spec["target"]
        self.kind = target["kind"]
        self.path = target.get("path", "/v1/completions")

        def pool(addr: str) -> Pool:
            if addr not in pools:
                pools[addr] = Pool(addr, client)
            return pools[addr]

        self.first_index = int(spec["bodies"].get("first_index", 0))
        self.payloads, self.gen_heads = payloads(spec["bodies"], spec["model"], self.stream, self.kind)
        if self.kind == "single":
            self.pool = pool(target["addr"])
        else:
            self.ctx_pool = pool(target["ctx"])
            self.gen_pool = pool(target["gen"])
        self.results: list[list[Any] | None] = [None] * len(self.payloads)
        self.lags: list[float] = []  # open loop: how late each request started against its schedule (s)
        self.t_start = time.perf_counter()

    async def one(self, i: int, scheduled: float | None = None) -> None:
        """Send request `i` and record it; `scheduled` (loop time) is when an open loop meant to send it."""
        rid = f"bench-{self.name}-{self.first_index + i}"
        if scheduled is not None:  # measured where the request starts (and its latency with it), not where
            # its task was created: a busy loop can run a created task late
            self.lags.append(max(0.0, asyncio.get_running_loop().time() - scheduled))
        t0 = time.perf_counter()
        sent_at = t0 - self.t_start
        engine_s = None
        try:
            async with asyncio.timeout(self.timeout):
                if self.kind == "single":
                    answer = await self.pool.request(self.path, self.payloads[i], rid)
                else:
                    ctx = await self.ctx_pool.request(self.path, self.payloads[i], rid)
                    t_ctx = time.perf_counter()
                    if ctx.status != 200:
                        self.results[i] = [i, ctx.status, t_ctx - t0, None, None, "", None, "context_failed",
                                           sent_at, 0]
                        return
                    params, ids = generation_only_params(ctx.body)
                    payload = b"".join((self.gen_heads[i], b',"disaggregated_params":', compact_json(params),
                                        b',"prompt":', ids, b"}"))
                    t_gen = time.perf_counter()
                    answer = await self.gen_pool.request(self.path, payload, rid)
                    engine_s = (t_ctx - t0) + (time.perf_counter() - t_gen)
                    if answer.t_first is not None:  # TTFT as the engines alone would give it
                        answer.t_first = t0 + (t_ctx - t0) + (answer.t_first - t_gen)
        except TimeoutError:
            self.results[i] = [i, 0, time.perf_counter() - t0, None, None, "", None, "timeout", sent_at, 0]
            return
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            self.results[i] = [i, 0, time.perf_counter() - t0, None, None, "", None, type(exc).__name__, sent_at, 0]
            return
        t_end = time.perf_counter()
        latency = engine_s if engine_s is not None else t_end - t0
        ttft = (answer.t_first - t0) if answer.t_first is not None else None
        error = ""
        if answer.status != 200:
            error = answer.headers.get("x-baton-error") or f"http_{answer.status}"
        elif self.stream and not answer.done:
            error = "stream_incomplete"
        self.results[i] = [i, answer.status, latency, ttft, answer.headers.get("retry-after"),
                           answer.headers.get("x-baton-route", ""), engine_s, error, sent_at, answer.events]

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        loop = asyncio.get_running_loop()
        n = len(self.payloads)
        max_seconds = float(spec.get("max_seconds", 60.0))
        tasks: list[asyncio.Task[None]] = []
        start = loop.time() + 0.02
        deadline = start + max_seconds
        sent = 0
        t_wall0 = time.perf_counter()
        self.t_start = t_wall0
        if spec["mode"] == "open":
            rate = float(spec["rate"])
            for i in range(n):
                at = start + i / rate
                now = loop.time()
                if at > deadline:
                    break
                if at > now:
                    await asyncio.sleep(at - now)
                tasks.append(loop.create_task(self.one(i, at)))
                sent += 1
            if tasks:
                await asyncio.wait(tasks)
        else:
            next_index = 0

            async def worker() -> None:
                nonlocal next_index, sent
                while next_index < n and loop.time() < deadline:
                    i = next_index
                    next_index += 1
                    sent += 1
                    await self.one(i)

            await asyncio.gather(*(worker() for _ in range(int(spec["concurrency"]))))
        wall = time.perf_counter() - t_wall0
        return {
            "name": self.name,
            "sent": sent,
            "wall_s": wall,
            "send_lag_ms": {"p50": _ms(_pct(self.lags, 50)), "p99": _ms(_pct(self.lags, 99)),
                            "max": _ms(max(self.lags, default=None))},
            "requests": [r for r in self.results if r is not None],
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    watch = {name: int(pid) for name, pid in (spec.get("watch") or {}).items()}
    pools: dict[str, Pool] = {}
    client = HttpClient(connect_timeout=10.0)
    out = []
    for phase_spec in spec["phases"]:
        phase = Phase(phase_spec, pools, client)  # bodies are built before the clocks start
        # so are earlier phases' results: frozen, a full GC pass in this phase does not walk them (unfrozen,
        # passes of tens of ms stalled the sending and showed up as the measured processes' latency)
        freeze_heap()
        cpu0 = {name: cpu_reading(pid) for name, pid in watch.items()}
        self0 = _self_cpu()
        machine0 = machine_seconds()
        result = await phase.run()
        machine1 = machine_seconds()
        self1 = _self_cpu()
        cpu1 = {name: cpu_reading(pid) for name, pid in watch.items()}
        result["loadgen_cpu_s"] = self1 - self0
        both = machine0 is not None and machine1 is not None
        result["machine_busy_s"] = machine1[0] - machine0[0] if both else None  # type: ignore[index]
        result["machine_steal_s"] = machine1[1] - machine0[1] if both else None  # type: ignore[index]
        result["cpu_s"] = {name: cpu_delta(cpu0[name], cpu1[name]) for name in watch}
        if phase_spec.get("record", True):
            out.append(result)
        await asyncio.sleep(float(phase_spec.get("pause_after_s", 0.2)))
    await client.close()
    return {"phases": out}


def main() -> int:
    spec = json.load(sys.stdin)
    result = asyncio.run(run(spec))
    json.dump(result, sys.stdout, separators=(",", ":"))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
