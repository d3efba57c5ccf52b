"""`baton replay` against a real scheduler and engines: the JSON summary adds up."""

from __future__ import annotations

import json
import subprocess

from scheduler_harness import BATON

TRACE = "/work/shared/traces/azure-llm-inference-2023-code.csv"


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
    assert report["throughput_rps"] > 0
    assert "30/30" in out.stderr  # the progress bar
