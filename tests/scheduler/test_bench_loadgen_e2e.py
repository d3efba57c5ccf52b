"""The benchmark's load generator against real processes: engine simulators and a scheduler on 127.0.0.1.

`baton bench scheduler` reads everything it reports from what the load generator records, so this checks
that those records are right for each kind of target: streamed answers straight from an engine, the
two-call handoff (context_only, then generation_only with the handle), the scheduler's routes, and the
bare proxies the benchmark compares the scheduler with (local, and disaggregated through the prefill engine).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from baton.bench import scheduler as sb


def test_loadgen_records_every_target_kind(tmp_path: Path) -> None:
    cluster = sb.Cluster(tmp_path)
    try:
        decode = cluster.engine("decode", "decode", 0.0, False)
        prefill = cluster.engine("prefill", "prefill", 0.0, False)
        deadline = time.monotonic() + 60
        for proc in (decode, prefill):
            proc.wait_ready("/health", deadline)
        sched = cluster.scheduler("sched", sb.scheduler_config(prefill, decode, "disaggregated",
                                                               **sb.unlimited_sections()))
        sched.wait_ready("/readyz", deadline)
        proxy = cluster.proxy("proxy", decode)
        proxy_disagg = cluster.proxy("proxy-disagg", decode, prefill)
        for proc in (proxy, proxy_disagg):
            proc.wait_ready("/healthz", deadline)
        rows = [[40 + 7 * i, 3 + i % 5] for i in range(12)]
        bodies = {"kind": "ids", "rows": rows, "first_index": 0}
        spec = {"watch": {"sched": sched.pid, "decode": decode.pid}, "phases": [
            sb.phase_spec("direct", sb.single(decode.address), bodies, rate=40, max_seconds=10),
            sb.phase_spec("handoff", sb.handoff(prefill.address, decode.address), bodies, rate=40, max_seconds=10),
            sb.phase_spec("sched", sb.single(sched.address), bodies, mode="closed", concurrency=4, max_seconds=10),
            sb.phase_spec("whole", sb.single(sched.address), bodies, rate=40, max_seconds=10, stream=False),
            sb.phase_spec("proxy", sb.single(proxy.address), bodies, rate=40, max_seconds=10),
            sb.phase_spec("proxy-disagg", sb.single(proxy_disagg.address), bodies, mode="closed", concurrency=4,
                          max_seconds=10),
        ]}
        phases = {p["name"]: p for p in sb.run_loadgen(spec, tmp_path, "e2e")}
        with urllib.request.urlopen(f"http://{prefill.address}/_sim/state", timeout=10) as answer:
            prefill_stats = json.loads(answer.read())["counters"]
    finally:
        cluster.stop()

    for name in ("direct", "handoff", "sched", "whole", "proxy", "proxy-disagg"):
        phase = phases[name]
        assert phase["sent"] == len(rows), name
        requests = phase["requests"]
        assert [r[0] for r in requests] == list(range(len(rows))), name
        assert all(r[1] == 200 and r[7] == "" for r in requests), (name, requests)
        assert phase["cpu_s"]["decode"] > 0 and phase["loadgen_cpu_s"] > 0, name
    for name in ("direct", "handoff", "sched", "proxy", "proxy-disagg"):
        for index, status, latency, ttft, _retry, _route, _engine_s, _error, _sent_at, events in phases[name]["requests"]:
            # one event per generated token, plus [DONE]
            assert events == rows[index][1] + 1, (name, index, events)
            assert 0 < ttft <= latency, (name, index)
    assert {r[5] for r in phases["sched"]["requests"]} == {"disaggregated"}
    # open loops record how late their requests started against the schedule; closed loops have none
    assert all(phases[name]["send_lag_ms"]["max"] >= phases[name]["send_lag_ms"]["p50"] >= 0
               for name in ("direct", "handoff", "whole", "proxy"))
    assert phases["sched"]["send_lag_ms"] == {"p50": None, "p99": None, "max": None}
    assert all(r[6] is not None and r[6] > 0 for r in phases["handoff"]["requests"])  # the two round trips
    assert all(r[9] == 0 for r in phases["whole"]["requests"])  # a whole JSON answer has no SSE events
    # every KV pull the prefill engine served: the handoff, the scheduler's two phases and the disaggregated
    # proxy each moved one per request; the local proxy, like the direct phase, none
    assert prefill_stats["kvPullsServed"] == 4 * len(rows)
