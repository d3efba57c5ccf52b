"""`baton replay`: trace parsing, scheduling, percentile math and the summary shape."""

from __future__ import annotations

import io

import pytest

from baton.replay import (
    Result,
    Summary,
    TraceRow,
    format_table,
    parse_timestamp,
    percentile,
    read_trace,
    schedule,
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
    assert len(read_trace(io.StringIO(CSV), limit=2)) == 2


def test_read_trace_reports_bad_lines_and_columns():
    with pytest.raises(ValueError, match="line 2"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens,GeneratedTokens\nnope,1,2\n"))
    with pytest.raises(ValueError, match="GeneratedTokens"):
        read_trace(io.StringIO("TIMESTAMP,ContextTokens\n"))


def test_real_trace_parses():
    rows = read_trace("/work/shared/traces/azure-llm-inference-2023-code.csv", limit=100)
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
        Result("completed", route="local", ttft_s=0.010, tpot_s=0.002, latency_s=0.1, output_tokens=5),
        Result("completed", route="disaggregated", ttft_s=0.030, tpot_s=0.004, latency_s=0.3, output_tokens=5),
        Result("rejected", "queue_full", route="local"),
        Result("failed", "timeout"),
    ]
    report = summarize(Summary(results, duration_s=2.0))
    assert (report["requests"], report["completed"], report["rejected"], report["failed"]) == (4, 2, 1, 1)
    assert report["rejected_by_reason"] == {"queue_full": 1}
    assert report["routes"] == {"local": 2, "disaggregated": 1}
    assert report["ttft_ms"]["p50"] == pytest.approx(20.0)
    assert report["latency_ms"]["p99"] == pytest.approx(298.0)
    assert report["throughput_rps"] == 1.0
    assert "TTFT ms" in format_table(report)
