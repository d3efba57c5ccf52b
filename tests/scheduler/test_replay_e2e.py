"""`baton replay` against a real scheduler and engines (the JSON summary adds up), and against a stub server
(SSE line endings, exit codes, Ctrl-C, running out of file descriptors, --max-concurrency)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from scheduler_harness import BATON, wait_for

TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure-llm-inference-2023-code-first-100.csv"


def test_replay_reports_a_correct_json_summary(engines, make_scheduler, tmp_path):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"], engines["decode2"]],
                           routing={"localPrefillBelowTokens": 1024, "alwaysPrefillAtOrAboveTokens": 4096})
    trace = tmp_path / "trace.csv"
    lines = open(TRACE).read().splitlines()[:31]
    trace.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [*BATON, "replay", str(trace), "--url", sched.url, "--rate", "40", "--max-tokens-cap", "8",
         "--timeout", "30", "--json"],  # no --model: read from the scheduler's /v1/models
        capture_output=True, text=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["requests"] == 30
    assert report["completed"] == 30 and report["rejected"] == 0 and report["failed"] == 0
    assert sum(report["routes"].values()) == 30
    assert report["routes"].get("local", 0) > 0 and report["routes"].get("disaggregated", 0) > 0
    for key in ("ttft_ms", "tpot_ms", "latency_ms"):
        assert set(report[key]) == {"p50", "p90", "p99"}
        assert 0 < report[key]["p50"] <= report[key]["p90"] <= report[key]["p99"]
    assert report["ttft_ms"]["p50"] <= report["latency_ms"]["p50"]
    lag = report["send_lag_ms"]  # every request sent has one
    assert set(lag) == {"p50", "p90", "p99", "max"} and 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    assert report["zero_counts_raised"] == 0
    assert report["throughput_rps"] > 0
    assert "30 request(s) to" in out.stderr and "30/30" not in out.stderr  # no progress bar off a terminal


# ------------------------------------------------------------------------------ against a stub server
# A small OpenAI-style streaming server on 127.0.0.1 in a background thread, so each behaviour (event line
# endings, 429s, a request that never answers) is exact. What it does with a request depends on its index
# (X-Request-Id replay-N); it records arrivals, finished answers and clients that hung up.


class Stub:
    def __init__(self, behave: Callable[[int], str], eol: bytes = b"\n") -> None:
        self.behave = behave  # index -> "ok" | "429" | "hang"
        self.eol = eol
        self.arrived: list[int] = []
        self.answered: list[int] = []
        self.hung_up: list[int] = []
        self.bodies: dict[int, dict] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="replay-stub", daemon=True)
        self.thread.start()
        self.release = asyncio.Event()  # ends every "hang" at teardown
        self.runner, self.url = self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _start(self) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def _completions(self, req: web.Request) -> web.StreamResponse:
        index = int(req.headers["X-Request-Id"].rsplit("-", 1)[1])
        body = await req.json()
        self.bodies[index] = body
        self.arrived.append(index)
        mode = self.behave(index)
        if mode == "429":
            self.answered.append(index)
            return web.json_response({"error": {"code": "queue_full"}}, status=429,
                                     headers={"X-Baton-Error": "queue_full"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Baton-Route": "local"})
        await resp.prepare(req)
        if mode == "hang":
            deadline = time.monotonic() + 30
            while not self.release.is_set() and time.monotonic() < deadline:
                if req.transport is None or req.transport.is_closing():
                    self.hung_up.append(index)
                    return resp
                await asyncio.sleep(0.02)
            return resp
        end = self.eol * 2
        if mode == "bad":  # not a completion chunk as OpenAI's API shapes one
            await resp.write(b'data: {"choices": ["oops"]}' + end)
        if mode in ("open", "text"):
            # "text": no token ids, one chunk with two tokens' text, one with none (a partial character),
            # then the usage the request asked for; "open": [DONE], then the body stays open
            for text in ((" one two", " three", "", " four") if mode == "text" else (" a", " b")):
                await resp.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": text}]}).encode() + end)
                await asyncio.sleep(0.01)
            if mode == "text" and body.get("stream_options", {}).get("include_usage"):
                await resp.write(b'data: {"choices": [], "usage": {"completion_tokens": 4}}' + end)
            await resp.write(b"data: [DONE]" + end)
            self.answered.append(index)
            if mode == "open":
                while not self.release.is_set() and req.transport is not None and not req.transport.is_closing():
                    await asyncio.sleep(0.02)
                return resp
            await resp.write_eof()
            return resp
        # "eos": as a real engine given a synthetic prompt may do, it ends at half of max_tokens unless asked to
        # ignore end-of-sequence
        count = body["max_tokens"] if mode != "eos" or body.get("ignore_eos") else body["max_tokens"] // 2
        for i in range(count):
            event = {"choices": [{"index": 0, "text": " w", "token_ids": [100 + i]}]}
            await resp.write(b"data: " + json.dumps(event).encode() + end)
        await resp.write(b": keep-alive" + end + b"data: [DONE]" + end)
        await resp.write_eof()
        self.answered.append(index)
        return resp

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.release.set)
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    started: list[Stub] = []

    def make(behave: Callable[[int], str], eol: bytes = b"\n") -> Stub:
        started.append(Stub(behave, eol))
        return started[-1]

    yield make
    for s in started:
        s.stop()


def write_trace(path: Path, offsets: list[float]) -> Path:
    t0 = datetime(2023, 11, 16, 18, 17, 0)
    rows = [f"{(t0 + timedelta(seconds=s)).isoformat(sep=' ')},16,3" for s in offsets]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return path


def replay(trace: Path, url: str, *extra: str, max_fds: int | None = None) -> subprocess.CompletedProcess[str]:
    limit = ["sh", "-c", f'ulimit -n {max_fds} && exec "$@"', "sh"] if max_fds else []
    return subprocess.run([*limit, *BATON, "replay", str(trace), "--url", url, "--model", "stub", "--json",
                           "--no-progress", "--timeout", "20", *extra], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_replay_reads_events_with_any_line_ending(stub, tmp_path, eol):
    server = stub(lambda i: "ok", eol)
    out = replay(write_trace(tmp_path / "t.csv", [0, 0, 0, 0]), server.url, "--rate", "1000")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["completed"], report["failed"], report["output_tokens"]) == (4, 0, 12), report
    assert report["interrupted"] is False


def test_replay_survives_odd_streams_and_counts_tokens_from_usage(stub, tmp_path):
    """A malformed event fails its own request (bad_event) and the run goes on; an answer is complete at
    [DONE] even if the body stays open; tokens come from the answer's usage when its chunks carry no ids."""
    server = stub(lambda i: {0: "bad", 1: "open", 2: "text"}[i])
    started = time.monotonic()
    out = replay(write_trace(tmp_path / "t.csv", [0, 0, 0]), server.url, "--rate", "1000")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["completed"], report["failed"], report["failed_by_reason"]) == (2, 1, {"bad_event": 1}), report
    assert report["routes"] == {"local": 2}  # the completed ones
    assert report["output_tokens"] == 2 + 4  # "open": two chunks with text; "text": usage says 4
    assert time.monotonic() - started < 10  # the open body was not waited on until --timeout (20 s)
    assert "3 request(s) to" in out.stderr and "sent over 0.0 s" in out.stderr


def test_a_trace_with_a_negative_count_is_refused_with_its_line(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:00,16,3\n2023-11-16 18:17:01,-5,3\n")
    out = replay(trace, "http://127.0.0.1:9")
    assert out.returncode == 2 and "trace line 3: negative token count" in out.stderr


def test_replay_exits_1_when_no_request_completes(stub, tmp_path):
    trace = write_trace(tmp_path / "t.csv", [0, 0, 0])
    with socket.socket() as sock:  # bound, not listening: connections are refused, and no one else takes it
        sock.bind(("127.0.0.1", 0))
        out = replay(trace, f"http://127.0.0.1:{sock.getsockname()[1]}", "--rate", "1000")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert (report["requests"], report["completed"], report["failed"]) == (3, 0, 3)
    assert "no request completed" in out.stderr

    rejecting = stub(lambda i: "429")
    out = replay(trace, rejecting.url, "--rate", "1000")
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["rejected_by_reason"] == {"queue_full": 3}

    partly = stub(lambda i: "ok" if i == 0 else "429")  # rejections are a normal outcome of a load test
    out = replay(trace, partly.url, "--rate", "1000")
    assert out.returncode == 0, out.stderr
    assert (json.loads(out.stdout)["completed"], json.loads(out.stdout)["rejected"]) == (1, 2)


def test_replay_url_without_scheme_is_a_usage_error(tmp_path):
    out = replay(write_trace(tmp_path / "t.csv", [0]), "127.0.0.1:8000")
    assert out.returncode == 2
    assert "--url: must be an http:// or https:// URL" in out.stderr and out.stdout == ""


def test_ctrl_c_cancels_in_flight_requests_and_prints_what_finished(stub, tmp_path):
    # replay-0 answers, replay-1 never does, replay-2 is due in an hour: SIGINT once 0 is done and 1 is in flight
    server = stub(lambda i: "ok" if i == 0 else "hang")
    # replay-1 goes out a second after replay-0 was answered: by then the client has recorded replay-0 (the
    # stub's having answered it does not mean the client has read the answer yet)
    trace = write_trace(tmp_path / "t.csv", [0, 1.0, 3600])
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # even if SIGINT is
            "from baton.replay import main; sys.exit(main(sys.argv[1:]))")  # ignored where the tests run
    proc = subprocess.Popen([sys.executable, "-c", code, str(trace), "--url", server.url, "--model", "stub",
                             "--json", "--no-progress", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: 0 in server.answered and 1 in server.arrived, 20, "replay-0 answered, replay-1 sent")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)  # not the 60 s --timeout: the request is cancelled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True
    assert (report["requests"], report["completed"], report["unfinished"]) == (1, 1, 2), report
    assert "Traceback" not in stderr and "interrupted" in stderr
    wait_for(lambda: 1 in server.hung_up, 10, "the stub to see replay-1's connection closed")
    assert 2 not in server.arrived  # nothing is sent after Ctrl-C


def test_running_out_of_file_descriptors_is_named_and_max_concurrency_stays_within(stub, tmp_path):
    """Each request in flight holds a connection: under `ulimit -n 40`, 100 at once run the replay out of file
    descriptors, and the summary says so (not a bare ClientConnectorError, which reads as the server refusing).
    --max-concurrency keeps within the limit; the wait for a free slot is send lag, with a warning."""
    server = stub(lambda i: "hang")
    out = replay(write_trace(tmp_path / "t.csv", [0] * 100), server.url, "--timeout", "3", max_fds=40)
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert report["failed"] == 100 and report["failed_by_reason"].get("ClientConnectorError:EMFILE", 0) > 0, report
    assert set(report["failed_by_reason"]) <= {"timeout", "ClientConnectorError:EMFILE"}, report

    out = replay(write_trace(tmp_path / "t30.csv", [0] * 30), server.url, "--timeout", "0.5",
                 "--max-concurrency", "10", max_fds=40)
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert report["failed_by_reason"] == {"timeout": 30}, report
    # all due at once: the last ten go out when the second ten have timed out, a second after the start at least
    assert report["send_lag_ms"]["max"] >= 900, report
    assert "warning: p99 send lag" in out.stderr and "--max-concurrency" in out.stderr


def test_replay_asks_for_the_traces_output_lengths_and_says_when_it_did_not_get_them(stub, tmp_path):
    """Each request sends ignore_eos: true, so a real engine generates GeneratedTokens rather than stopping
    at an end-of-sequence token of a synthetic prompt; with --no-ignore-eos it may stop early, and the replay
    says the decode load was lighter than the trace's."""
    server = stub(lambda i: "eos")
    trace = write_trace(tmp_path / "t.csv", [0, 0])
    out = replay(trace, server.url, "--rate", "1000")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert all(b["ignore_eos"] is True and b["max_tokens"] == 3 for b in server.bodies.values()), server.bodies
    assert report["output_tokens"] == report["requested_output_tokens"] == 6 and "ended generations" not in out.stderr
    server.bodies.clear()
    out = replay(trace, server.url, "--rate", "1000", "--no-ignore-eos")
    report = json.loads(out.stdout)
    assert not any("ignore_eos" in b for b in server.bodies.values())
    assert (report["output_tokens"], report["requested_output_tokens"]) == (2, 6)
    assert "generated 2 of the 6 tokens asked for: the server ended generations early" in out.stderr


def test_sigterm_stops_a_replay_with_the_summary_of_what_finished(stub, tmp_path):
    """`timeout`, a CI job cancelled or a closed terminal: the replay stops as on Ctrl-C, printing what
    finished and exiting 130, rather than dying with nothing printed."""
    import signal

    server = stub(lambda i: "ok" if i < 2 else "hang")
    trace = write_trace(tmp_path / "t.csv", [0, 0, 0, 0, 30])
    proc = subprocess.Popen([*BATON, "replay", str(trace), "--url", server.url, "--model", "stub", "--json",
                             "--no-progress", "--timeout", "20", "--speedup", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(server.answered) == 2 and len(server.arrived) == 4, 20, "two answered, two hanging")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    report = json.loads(out)
    assert report["interrupted"] is True and report["completed"] == 2 and report["unfinished"] == 3, report
    assert "interrupted by SIGTERM" in err


def test_an_openai_style_base_url_is_taken_and_nothing_listening_is_an_error_not_an_hour_of_failures(stub, tmp_path):
    server = stub(lambda i: "ok")
    trace = write_trace(tmp_path / "t.csv", [0, 0])
    out = replay(trace, server.url + "/v1/", "--rate", "1000")  # the usual OpenAI base URL
    assert out.returncode == 0 and json.loads(out.stdout)["completed"] == 2, out.stderr
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        out = subprocess.run([*BATON, "replay", str(trace), "--url", url, "--json", "--no-progress"],
                             capture_output=True, text=True, timeout=60)  # no --model: /v1/models is asked
    assert out.returncode == 2 and "nothing answers at" in out.stderr, (out.returncode, out.stderr)
