"""`baton replay`: trace parsing, scheduling, percentile math and the summary shape, and runs against small
stub servers on 127.0.0.1 (timeouts, errors, send lag, --max-concurrency)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from baton.replay import (
    EXIT_USAGE,
    Result,
    Summary,
    TraceRow,
    build_parser,
    event_tokens,
    format_table,
    main,
    parse_timestamp,
    percentile,
    read_trace,
    run_replay,
    schedule,
    split_sse_events,
    sse_data,
    summarize,
    synthetic_prompt,
)

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:05.0781490,110,0
"""


def test_timestamps_with_seven_fraction_digits():
    ts = parse_timestamp("2023-11-16 18:17:03.9799600")
    assert (ts.second, ts.microsecond) == (3, 979960)
    assert parse_timestamp("2023-11-16T18:17:03").second == 3


def test_read_trace_sorts_offsets_and_clamps_zero_lengths():
    rows = read_trace(io.StringIO(CSV))
    assert rows[0] == TraceRow(0.0, 4808, 10)
    assert rows[1].offset_s == pytest.approx(0.052)
    assert rows[2].generated_tokens == 1
    assert [r.zero_raised for r in rows] == [False, False, True]
    assert len(read_trace(io.StringIO(CSV), limit=2)) == 2


def test_read_trace_reports_bad_lines_and_columns():
    with pytest.raises(ValueError, match="line 2"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\nnope,1,2\n"))
    with pytest.raises(ValueError, match="GeneratedTokens"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens\n"))
    with pytest.raises(ValueError, match="line 3: negative token count"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:00,1,2\n"
                               "2023-11-16 18:17:01,1,-2\n"))
    with pytest.raises(ValueError, match="line 2: field larger than field limit"):  # the csv module's own error
        read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\n\"" + "x" * 200_000 + "\",1,2\n"))


def test_real_trace_parses():
    trace = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure-llm-inference-2023-code-first-100.csv"
    rows = read_trace(trace, limit=100)
    assert len(rows) == 100 and rows[0].offset_s == 0.0
    assert all(1 <= r.context_tokens <= 8192 for r in rows)


def test_schedule_by_speedup_or_rate():
    rows = [TraceRow(0, 1, 1), TraceRow(2, 1, 1), TraceRow(4, 1, 1)]
    assert schedule(rows, speedup=2) == [0, 1, 2]
    assert schedule(rows, rate=4) == [0, 0.25, 0.5]
    assert schedule(rows) == [0, 2, 4]


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([7], 99) == 7
    data = list(range(1, 101))
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 90) == pytest.approx(90.1)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3


def test_synthetic_prompt_length_and_range():
    p = synthetic_prompt(5, 1000)
    assert len(p) == 1000 and min(p) >= 1000 and max(p) < 30000
    assert synthetic_prompt(6, 10) != synthetic_prompt(5, 10)


def test_summary_counts_and_percentiles():
    results = [
        Result("completed", route="local", ttft_s=0.010, tpot_s=0.002, latency_s=0.1, output_tokens=5,
               send_lag_s=0.001),
        Result("completed", route="disaggregated", ttft_s=0.030, tpot_s=0.004, latency_s=0.3, output_tokens=5,
               send_lag_s=0.003),
        Result("rejected", "queue_full", route="local", send_lag_s=0.002),
        Result("failed", "timeout", send_lag_s=0.250),
        Result("unfinished"),
    ]
    report = summarize(Summary(results, duration_s=2.0, interrupted=True))
    assert (report["requests"], report["completed"], report["rejected"], report["failed"]) == (4, 2, 1, 1)
    assert report["rejected_by_reason"] == {"queue_full": 1}
    assert report["routes"] == {"local": 1, "disaggregated": 1}  # of the completed: a rejection took no route
    assert report["ttft_ms"]["p50"] == pytest.approx(20.0)
    assert report["latency_ms"]["p99"] == pytest.approx(298.0)
    assert report["throughput_rps"] == 1.0
    # every request sent counts in the send lag, whatever its answer
    assert report["send_lag_ms"] == pytest.approx({"p50": 2.5, "p90": 175.9, "p99": 242.59, "max": 250.0})
    table = format_table(report)
    assert "TTFT ms" in table
    assert [line.split() for line in table.splitlines() if line.startswith("send lag ms")] == [
        ["send", "lag", "ms", "2.5", "175.9", "242.6", "(max", "250.0)"]]


# ------------------------------------------------------------------------------ timestamps with offsets
def test_fraction_digits_stop_before_a_utc_offset():
    expected = datetime(2024, 5, 10, 0, 0, 0, 9930)
    assert parse_timestamp("2024-05-10 00:00:00.009930+00:00") == expected
    assert parse_timestamp("2024-05-10 00:00:00.0099300Z") == expected
    assert parse_timestamp("2024-05-10 00:00:00.009930") == expected  # naive is taken as UTC
    assert parse_timestamp("2024-05-10 00:00:01+00:00").tzinfo is None  # all naive UTC, so all comparable


def test_non_utc_offsets_are_converted_to_utc():
    assert parse_timestamp("2024-05-10 02:00:00.5+02:00") == datetime(2024, 5, 10, 0, 0, 0, 500000)
    assert parse_timestamp("2024-05-09T19:30:00-04:30") == datetime(2024, 5, 10, 0, 0, 0)


def test_trace_mixing_naive_and_offset_timestamps():
    rows = read_trace(io.StringIO(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,10,11\n"
        "2024-05-10 00:00:01Z,20,11\n"
        "2024-05-10 00:00:02,30,11\n"
        "2024-05-10 02:00:00.5+02:00,40,11\n"
    ))
    assert [r.context_tokens for r in rows] == [10, 40, 20, 30]
    assert [r.offset_s for r in rows] == pytest.approx([0.0, 0.49007, 0.99007, 1.99007])


# ------------------------------------------------------------------------------ tokens per streamed event
def _completion(text, finish=None, ids=None):
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish, **({"token_ids": ids} if ids else {})}]}


def _chat(delta, finish=None):
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.mark.parametrize(("event", "tokens"), [
    (_completion("Hello"), 1),
    (_completion("", ids=[5, 6]), 2),
    ({"choices": [{"index": 0, "text": "", "token_ids": [], "finish_reason": None}]}, 0),  # ids say: none
    # trtllm-serve sends a chunk per generation step; its text may be held back (half a UTF-8 character)
    (_completion(""), 1),
    (_completion("", finish="length"), 0),  # a closing chunk: the finish_reason alone
    (_completion("!", finish="length"), 1),
    (_chat({"role": "assistant"}), 0),  # the role chunk, as trtllm-serve sends it
    (_chat({"role": "assistant", "content": ""}), 0),  # and as OpenAI does
    (_chat({"content": ""}), 1),
    (_chat({"content": "Hi"}), 1),
    (_chat({"reasoning_content": "hmm"}), 1),
    (_chat({}, finish="stop"), 0),
    ({"choices": [], "usage": {"completion_tokens": 3}}, 0),
    ({"choices": "x"}, None),
])
def test_a_generation_step_counts_as_a_token_even_when_its_text_is_held_back(event, tokens):
    assert event_tokens(event) == tokens


# ------------------------------------------------------------------------------ SSE line endings
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_events_end_with_any_line_ending(eol):
    stream = b"data: {\"a\":1}" + eol + eol + b": comment" + eol + eol + b"data: [DONE]" + eol + eol
    events, rest = split_sse_events(stream, final=True)
    assert [sse_data(e) for e in events] == [b'{"a":1}', None, b"[DONE]"]
    assert rest == b""


def test_sse_crlf_split_across_reads_is_one_line_end():
    events, rest = split_sse_events(b"data: 1\r\n\r")  # the last CR may be half of a CRLF
    assert events == [] and rest == b"data: 1\r\n\r"
    events, rest = split_sse_events(rest + b"\ndata: 2\r\n")
    assert [sse_data(e) for e in events] == [b"1"] and rest == b"data: 2\r\n"
    events, rest = split_sse_events(b"data: [DONE]\r\r", final=False)
    assert events == []  # could still be CR + CRLF
    events, rest = split_sse_events(b"data: [DONE]\r\r", final=True)
    assert [sse_data(e) for e in events] == [b"[DONE]"] and rest == b""


def test_sse_multiline_events_and_mixed_endings():
    events, rest = split_sse_events(b"event: x\r\ndata: a\rdata: b\n\r\ndata: c")
    assert [sse_data(e) for e in events] == [b"a\nb"] and rest == b"data: c"
    assert split_sse_events(b"data: c", final=True) == ([], b"data: c")  # unterminated: not an event


# ------------------------------------------------------------------------------ flag validation
@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "--limit: must be an integer >= 1"),
    (["--limit=-2"], "--limit: must be an integer >= 1"),
    (["--max-tokens-cap", "0"], "--max-tokens-cap: must be an integer >= 1"),
    (["--max-tokens-cap=-1"], "--max-tokens-cap: must be an integer >= 1"),
    (["--timeout", "0"], "--timeout: must be a positive finite number"),
    (["--timeout=-5"], "--timeout: must be a positive finite number"),
    (["--timeout", "nan"], "--timeout: must be a positive finite number"),
    (["--speedup", "nan"], "--speedup: must be a positive finite number"),
    (["--speedup", "inf"], "--speedup: must be a positive finite number"),
    (["--speedup", "0"], "--speedup: must be a positive finite number"),
    (["--rate", "nan"], "--rate: must be a positive finite number"),
    (["--rate=-inf"], "--rate: must be a positive finite number"),
    (["--rate", "fast"], "--rate: expected a number"),
])
def test_bad_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["trace.csv", "--url", "http://127.0.0.1:1", *flags])
    assert exc.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_good_flags_parse():
    args = build_parser().parse_args(["t.csv", "--url", "https://127.0.0.1:8000/", "--rate", "2.5", "--limit", "1",
                                      "--max-tokens-cap", "1", "--timeout", "0.5"])
    assert (args.url, args.rate, args.limit, args.max_tokens_cap, args.timeout) == (
        "https://127.0.0.1:8000/", 2.5, 1, 1, 0.5)


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000", "ftp://127.0.0.1", "http://", "http://h:99999"])
def test_url_needs_http_scheme_and_host(url, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["trace.csv", "--url", url])
    assert exc.value.code == EXIT_USAGE
    assert "argument --url:" in capsys.readouterr().err


def test_main_rejects_a_url_before_reading_the_trace(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-trace.csv", "--url", "127.0.0.1:8000"])
    assert exc.value.code == EXIT_USAGE
    assert "must be an http:// or https:// URL" in capsys.readouterr().err


# ------------------------------------------------------------------------------ trace header and rows
def test_trace_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:00,10,11\n".encode())
    assert read_trace(path) == [TraceRow(0.0, 10, 11)]
    assert read_trace(io.StringIO(path.read_text(encoding="utf-8"))) == [TraceRow(0.0, 10, 11)]


def test_trace_with_spaces_around_names_and_values():
    rows = read_trace(io.StringIO(
        " TIMESTAMP , ContextTokens,GeneratedTokens \n"
        " 2023-11-16 18:17:00.0000000 , 10 , 11 \n"
        "2023-11-16 18:17:01 ,20, 12\n"
    ))
    assert rows == [TraceRow(0.0, 10, 11), TraceRow(1.0, 20, 12)]


def test_bad_row_after_blank_lines_names_its_own_line():
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:00,10,11\n\n\n2023-11-16 18:17:01,x,11\n"
    with pytest.raises(ValueError, match="trace line 5:"):
        read_trace(io.StringIO(text))
    with pytest.raises(ValueError, match="trace line 3: no value for GeneratedTokens"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:00,10,11\n"
                               "2023-11-16 18:17:01,10\n"))


def test_limit_keeps_the_earliest_arrivals():
    text = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2023-11-16 18:17:05,1,1\n"
            "2023-11-16 18:17:04,2,1\n"
            "2023-11-16 18:17:01,3,1\n"
            "2023-11-16 18:17:02,4,1\n")
    rows = read_trace(io.StringIO(text), limit=2)
    assert rows == [TraceRow(0.0, 3, 1), TraceRow(1.0, 4, 1)]


# ------------------------------------------------------------------------------ interrupted summary
def test_interrupted_summary_counts_only_finished_requests():
    results = [Result("completed", ttft_s=0.01, tpot_s=0.001, latency_s=0.02, output_tokens=3),
               Result("unfinished"), Result("unfinished")]
    report = summarize(Summary(results, duration_s=1.0, interrupted=True))
    assert (report["requests"], report["completed"], report["failed"]) == (1, 1, 0)
    assert report["interrupted"] is True and report["unfinished"] == 2
    assert format_table(report).startswith("interrupted: 2 request(s)")
    report = summarize(Summary([Result("completed")], duration_s=1.0))
    assert report["interrupted"] is False and report["unfinished"] == 0
    assert "interrupted" not in format_table(report)


# ------------------------------------------------------------------------------ runs against a stub server
Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """An OpenAI-style /v1/completions on 127.0.0.1 that `handler` answers, given the request's replay index."""
    async def completions(req: web.Request) -> web.StreamResponse:
        return await handler(req, int(req.headers["X-Request-Id"].rsplit("-", 1)[1]))

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # then a handler still waiting is cancelled
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def stream(req: web.Request, events: list[bytes], end: bool = True) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(req)
    for event in events:
        await resp.write(b"data: " + event + b"\n\n")
    if end:
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    return resp


async def answer(req: web.Request, index: int) -> web.StreamResponse:
    body = await req.json()
    return await stream(req, [json.dumps({"choices": [{"index": 0, "text": " w", "token_ids": [100 + i]}]}).encode()
                              for i in range(body["max_tokens"])])


def replay_report(rows: list[TraceRow], handler: Handler, **options: Any) -> dict[str, Any]:
    async def scenario() -> dict[str, Any]:
        async with serving(handler) as url:
            return summarize(await run_replay(rows, url, model="stub", rate=1000, **options))

    return asyncio.run(scenario())


def rows_of(count: int, context: int = 16, generated: int = 3) -> list[TraceRow]:
    return [TraceRow(0.0, context, generated)] * count


@pytest.mark.parametrize("stall", ["before the headers", "mid-stream"])
def test_timeout_fails_a_request_the_server_never_finishes(stall):
    async def handler(req: web.Request, index: int) -> web.StreamResponse:
        if index != 1:
            return await answer(req, index)
        if stall == "mid-stream":
            await stream(req, [b'{"choices": [{"index": 0, "text": " w", "token_ids": [1]}]}'], end=False)
        await asyncio.sleep(60)  # cancelled at the stub's shutdown
        raise AssertionError("not reached")

    report = replay_report(rows_of(3), handler, timeout=0.5)
    assert (report["completed"], report["failed"], report["failed_by_reason"]) == (2, 1, {"timeout": 1}), report


def test_error_event_mid_stream_and_a_503_fail_their_requests_by_reason():
    async def handler(req: web.Request, index: int) -> web.StreamResponse:
        token = b'{"choices": [{"index": 0, "text": " w", "token_ids": [1]}]}'
        if index == 0:
            return await stream(req, [token, b'{"error": {"code": "engine_failed", "message": "boom"}}'])
        if index == 1:
            return await stream(req, [token, b'{"object": "error", "message": "boom"}'])
        if index == 2:
            return web.json_response({"error": {"code": "no_decode_endpoints"}}, status=503,
                                     headers={"X-Baton-Error": "no_decode_endpoints"})
        if index == 3:
            return web.Response(status=503)
        return await answer(req, index)

    report = replay_report(rows_of(5), handler, timeout=10)
    assert (report["completed"], report["rejected"], report["failed"]) == (1, 0, 4), report
    assert report["failed_by_reason"] == {"engine_failed": 1, "stream_error": 1, "no_decode_endpoints": 1,
                                          "http_503": 1}


def test_connection_refused_is_named_with_its_errno():
    with socket.socket() as sock:  # bound, not listening: connections are refused, and no one else takes it
        sock.bind(("127.0.0.1", 0))
        summary = asyncio.run(run_replay(rows_of(2), f"http://127.0.0.1:{sock.getsockname()[1]}", model="stub",
                                         rate=1000, timeout=10))
    assert summarize(summary)["failed_by_reason"] == {"ClientConnectorError:ECONNREFUSED": 2}


def test_max_concurrency_bounds_requests_in_flight_and_the_wait_is_send_lag():
    in_flight: set[int] = set()  # not yet answered: the client cannot have its answer
    seen: list[int] = []  # how many were in flight as each one arrived, itself included

    async def handler(req: web.Request, index: int) -> web.StreamResponse:
        in_flight.add(index)
        seen.append(len(in_flight))
        await asyncio.sleep(0.2)
        in_flight.discard(index)
        return await answer(req, index)

    report = replay_report(rows_of(5), handler, timeout=10, max_concurrency=2)
    assert report["completed"] == 5 and max(seen) == 2, (report, seen)
    # all five are due at once: the third goes out when one of the first two has answered, 0.2 s on at least
    lag = report["send_lag_ms"]
    assert set(lag) == {"p50", "p90", "p99", "max"}
    assert lag["max"] >= 200 and lag["p50"] <= lag["p90"] <= lag["p99"] <= lag["max"], lag


def test_zero_counts_are_sent_as_one_and_counted():
    received = []

    async def handler(req: web.Request, index: int) -> web.StreamResponse:
        body = await req.json()
        received.append((len(body["prompt"]), body["max_tokens"]))
        return await answer(req, index)

    rows = read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:00,0,4\n"
                                  "2023-11-16 18:17:00,5,0\n2023-11-16 18:17:00,5,4\n"))
    report = replay_report(rows, handler, timeout=10)
    assert report["completed"] == 3 and sorted(received) == [(1, 4), (5, 1), (5, 4)]
    assert report["zero_counts_raised"] == 2
    assert "zero token counts: 2 trace row(s) sent with 1 instead of 0" in format_table(report)


@pytest.mark.parametrize("context", [1, 7433, 28999, 29000, 29001, 61000])
def test_prompts_are_the_synthetic_ids_whatever_their_length(context):
    prompts = {}

    async def handler(req: web.Request, index: int) -> web.StreamResponse:
        prompts[index] = (await req.json())["prompt"]
        return await answer(req, index)

    replay_report([TraceRow(0.0, context, 1)] * 3, handler, timeout=10)
    assert prompts == {i: synthetic_prompt(i, context) for i in range(3)}


def test_a_trace_of_second_offsets_is_read_and_a_bad_timestamp_is_quoted_as_written():
    rows = read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,10,2\n0.25,20,3\n1.5,30,4\n"))
    assert [r.offset_s for r in rows] == [0.0, 0.25, 1.5]
    with pytest.raises(ValueError, match=r"trace line 2: timestamp '0\.0\.1' is neither ISO 8601"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0.1,10,2\n"))
    with pytest.raises(ValueError, match=r"missing column\(s\) .* \(found: timestamp, contexttokens, generatedtokens;"):
        read_trace(io.StringIO("timestamp,contexttokens,generatedtokens\n0,1,1\n"))


def test_requests_are_started_when_due_not_all_at_the_start(monkeypatch):
    """A long trace must not become one task (and timer) per row before the first request goes out: that cost
    ~2 KB and 10 us a row, all after the clock started, and sent everything due meanwhile in a burst."""
    from baton import replay as replay_module

    async def instant(session, url, index, body, timeout):
        return Result("completed", output_tokens=1)

    monkeypatch.setattr(replay_module, "send_one", instant)
    rows = [TraceRow(i * 0.01, 10, 1) for i in range(3000)]  # 30 s of trace
    seen: list[int] = []

    async def main():
        run = asyncio.ensure_future(run_replay(rows, "http://127.0.0.1:9", model="m"))
        for _ in range(5):
            await asyncio.sleep(0.05)
            seen.append(len(asyncio.all_tasks()))
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    asyncio.run(main())
    assert max(seen) < 50, seen
