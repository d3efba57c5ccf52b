"""`baton bench scheduler`: what Baton's scheduler costs, measured against the engines alone in one run.

    baton bench scheduler [--quick] [--output BENCHMARKS.md | --no-write] [--json] [--trace CSV]
                          [--rate R] [--overload-sim-speed X] [--keep-logs]

Everything runs on 127.0.0.1 as separate processes: `baton engine-sim` replicas (a decode and a prefill
worker), `baton scheduler` processes in front of them, a bare pass-through proxy on the scheduler's own
HTTP layer for reference (`baton.bench.proxy`), and the load generator (`baton.bench.loadgen`) in a process of its own, so that
each one's CPU time can be read separately from /proc/<pid>/stat.

Part 1, engines at `--sim-speed 0` (no modelled GPU time: whatever latency remains is HTTP and Python):
  - overhead at a fixed 500 req/s (the issue's rate) with trace prompt sizes (token-id prompts, streamed):
    the same requests sent straight to the engine(s) and through a scheduler, in rounds that rotate the
    order; added latency = scheduler-path percentile - direct percentile, plus the per-request (paired)
    difference, the same two figures for the direct requests sent a second time (A/A: what the machine's
    noise alone makes of a path that adds nothing), and the scheduler's CPU time per request. Measured for
    the local route (scheduler -> decode replica) and the disaggregated route (scheduler -> context_only on
    the prefill replica -> generation_only on the decode replica; the direct baseline makes the same two
    engine calls from the load generator and counts only their round trips); the bare proxy on each route
    gets the same requests too, a same-run baseline for the CPU time, which on a shared machine varies from
    run to run;
  - the same at a lower reference rate (50 req/s), where the bare proxy also gets the same requests;
  - 220 KB text prompts on both routes;
  - throughput: a closed loop through one scheduler process: routed req/s and CPU time per request; each
    route's loop also goes through the bare proxy on that route, in rounds that alternate the two (what any
    router on the same HTTP layer reached on the machine at that moment).
Part 2, engines at a realistic `--overload-sim-speed` (1 = the calibrated H200 timing), a scheduler with a
small queue: capacity is probed with rising open-loop rates, then the TTFT p99 at light load is compared
with the admitted requests' TTFT p99 at 2x the capacity, and the excess is checked for 429 + Retry-After.

Every phase is bounded by a request count and a time limit; a run takes ~4 minutes (`--quick`: ~1.5).
The results, with the machine's facts and the targets, go to the scheduler section of BENCHMARKS.md.
Prompt and output sizes come from the Azure LLM inference trace (code, 2023-11-16; Azure/AzurePublicDataset,
CC-BY 4.0; Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from baton.bench.report import (
    Metric,
    Target,
    added,
    code_version,
    default_output,
    fmt_result,
    fmt_target,
    fmt_value,
    machine_facts,
    markdown_cells,
    markdown_row,
    markdown_table,
    paired_differences,
    per_item,
    percentiles,
    ratio,
    table_rows_under,
    text_table,
    write_section,
)
from baton.checkout import repo_root
from baton.localproc import ListeningProcess, baton_command

SECTION = "scheduler"
HISTORY_HEADING = "### Recent runs"
HISTORY_KEPT = 12  # runs listed in the section, newest first
MODEL = "llama-3-8b"
TRACE_NAME = "azure-llm-inference-2023-code.csv"
TRACE_ATTRIBUTION = (
    "Prompt and output sizes: Azure LLM inference trace (code, 2023-11-16), Azure/AzurePublicDataset, "
    "CC-BY 4.0; Patel et al., \"Splitwise: Efficient generative LLM inference using phase splitting\", "
    "ISCA 2024."
)
# The engine simulator needs a Hugging Face config.json; this is Meta-Llama-3-8B-Instruct's.
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128009, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
UNLIMITED = 1_000_000  # admission limits for the overhead phases: nothing should queue there
SUSTAINED_SHARE = 0.9  # of the offered rate both paths must complete for a fixed-rate comparison to count
ADMITTED_SHARE = 0.8  # of capacity x seconds the 2x phase must admit for its TTFT p99 to be judged
UNHELD_PROC = "sched-local-unheld"  # a local scheduler with streamFlushIntervalMs 0, for the hold's trade-off

TARGETS = {
    "added_p50_ms": Target("<=", 1.0),
    "added_p99_ms": Target("<=", 5.0),
    "routed_rps": Target(">=", 1500.0),
    "cpu_ms_per_request": Target("<=", 1.0),
    "big_added_p50_ms": Target("<=", 60.0),
    "overload_ttft_ratio": Target("<=", 2.0),
}
# how late (p99) the load generator may start requests against their schedule for its timings to judge the
# latency targets at the target rate: the added p99 target (a stall that long delays its reading of answers too)
SEND_LAG_BOUND_MS = TARGETS["added_p99_ms"].limit


@dataclass(frozen=True)
class Settings:
    rate: float = 500.0  # req/s of the overhead phases the targets are defined at
    requests: int = 2000  # per path and route at `rate`, split into `rounds` (a p99 of 800 rested on 8 requests)
    rounds: int = 5
    ref_rate: float = 50.0  # a second, lower fixed rate (informational: overhead where the machine keeps up)
    ref_requests: int = 300
    warmup: int = 150
    big_kb: int = 220
    big_requests: int = 30  # per path and route, in `big_rounds`
    big_rounds: int = 5
    big_rate: float = 5.0
    throughput_requests: int = 8000  # bodies for each round of a closed loop (4,000 req/s for 2 s)
    throughput_seconds: float = 10.0  # per path and route, split into `throughput_rounds`
    throughput_rounds: int = 5
    concurrency: int = 32
    max_tokens_cap: int = 64
    overload_sim_speed: float = 1.0
    overload_queue_depth: int = 2
    overload_max_wait_s: float = 0.1
    overload_prefill_batch: int = 1
    probe_seconds: float = 3.0
    light_fraction: float = 0.25
    load_seconds: float = 20.0  # light and overload phases, each
    timeout_s: float = 30.0


FULL = Settings()
QUICK = Settings(requests=300, rounds=2, ref_requests=100, warmup=50, big_requests=6, big_rounds=2,
                 throughput_requests=6000, throughput_seconds=3.0, throughput_rounds=2, probe_seconds=1.5,
                 load_seconds=6.0)

# fields of a load generator request record (see baton.bench.loadgen)
I_INDEX, I_STATUS, I_LATENCY, I_TTFT, I_RETRY_AFTER, I_ROUTE, I_ENGINE, I_ERROR, I_SENT_AT, I_EVENTS = range(10)


# ------------------------------------------------------------------------------------------------ processes
class Cluster:
    """The processes of one part of the benchmark; `stop()` ends every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[ListeningProcess] = []
        self.model_dir = workdir / "model"
        self.model_dir.mkdir(exist_ok=True)
        (self.model_dir / "config.json").write_text(json.dumps(LLAMA_3_8B, indent=2))

    def engine(self, name: str, tier: str, sim_speed: float, big_prompts: bool) -> ListeningProcess:
        options: dict[str, Any] = {
            "cache_transceiver_config": {"backend": "UCX"},
            "kv_cache_config": {"dtype": "fp8", "tokens_per_block": 32},
        }
        if tier == "prefill":
            options["disable_overlap_scheduler"] = True
        if big_prompts:  # room for 220 KB prompts (~56K tokens) in one sequence and one iteration
            options["max_seq_len"] = 131072
            options["max_num_tokens"] = 131072
        cfg = self.workdir / f"{name}.json"
        cfg.write_text(json.dumps(options))  # JSON is YAML
        argv = [*baton_command(), "engine-sim", str(self.model_dir), "--host", "127.0.0.1", "--port", "0",
                "--extra_llm_api_options", str(cfg), "--sim-speed", repr(sim_speed), "--sim-model-name", MODEL,
                # a line per request is the engines' cost, not the scheduler's: kept out of their CPU here
                "--sim-log-level", "WARNING"]
        proc = ListeningProcess(name, argv, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def scheduler(self, name: str, config: dict[str, Any]) -> ListeningProcess:
        cfg = self.workdir / f"{name}.json"
        cfg.write_text(json.dumps(config, indent=2))
        argv = [*baton_command(), "scheduler", "--config", str(cfg)]
        proc = ListeningProcess(name, argv, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def proxy(self, name: str, upstream: ListeningProcess, prefill: ListeningProcess | None = None) -> ListeningProcess:
        """The bare proxy to `upstream`; with `prefill`, on the disaggregated route through it."""
        argv = [sys.executable, "-m", "baton.bench.proxy", upstream.address]
        if prefill is not None:
            argv += ["--prefill", prefill.address]
        proc = ListeningProcess(name, argv, self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception:  # keep stopping the others
                pass
        self.procs.clear()


def scheduler_config(prefill: ListeningProcess, decode: ListeningProcess, route: str, **sections: Any
                     ) -> dict[str, Any]:
    """A scheduler config sending every prompt down `route` ('local' | 'disaggregated' | 'default')."""
    routing: dict[str, Any] = {}
    if route == "local":
        routing = {"localPrefillBelowTokens": UNLIMITED * 1000, "alwaysPrefillAtOrAboveTokens": UNLIMITED * 1000}
    elif route == "disaggregated":
        routing = {"localPrefillBelowTokens": 0, "alwaysPrefillAtOrAboveTokens": 0}
    config: dict[str, Any] = {
        "model": MODEL,
        "endpoints": {"discovery": "static", "static": {"prefill": [prefill.address], "decode": [decode.address]}},
        "routing": routing,
        "server": {"host": "127.0.0.1", "port": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def unlimited_sections() -> dict[str, Any]:
    """Admission limits out of the way: the overhead phases measure the request path, not queueing."""
    return {
        "routing": {"decodeBatchSize": UNLIMITED, "prefillBatchSize": UNLIMITED, "maxConcurrentPrefills": UNLIMITED},
        "queue": {"maxDepth": UNLIMITED},
        "backpressure": {"maxActivePerDecodeReplica": UNLIMITED, "decodeP95LatencyThresholdMs": 0},
    }


def run_loadgen(spec: dict[str, Any], workdir: Path, label: str) -> list[dict[str, Any]]:
    """Run the load generator in its own process; returns its recorded phases."""
    budget = sum(float(p.get("max_seconds", 60)) + float(p.get("timeout_s", 30)) + 5 for p in spec["phases"])
    (workdir / f"loadgen-{label}.json").write_text(json.dumps({**spec, "phases": [
        {k: v for k, v in p.items() if k != "bodies"} for p in spec["phases"]]}, indent=1))
    proc = subprocess.run([sys.executable, "-m", "baton.bench.loadgen"], input=json.dumps(spec).encode(),
                          capture_output=True, timeout=budget + 30)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")[-3000:]
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{err}")
    return json.loads(proc.stdout)["phases"]


# ------------------------------------------------------------------------------------------------ workload
def trace_path(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    if not explicit:
        if os.environ.get("BATON_TRACE"):
            candidates.append(Path(os.environ["BATON_TRACE"]))
        root = repo_root() or Path.cwd()
        candidates += [root / "shared" / "traces" / TRACE_NAME, root.parent / "shared" / "traces" / TRACE_NAME,
                       Path("/work/shared/traces") / TRACE_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"trace not found (tried {', '.join(map(str, candidates))}); pass --trace")


def trace_rows(path: Path, count: int, cap: int) -> list[list[int]]:
    """[prompt tokens, max tokens] of the first `count` trace rows in arrival order (wrapping around)."""
    from baton.replay import read_trace

    rows = read_trace(path)
    if not rows:
        raise ValueError(f"{path}: no requests")
    return [[rows[i % len(rows)].context_tokens, min(rows[i % len(rows)].generated_tokens, cap)]
            for i in range(count)]


def phase_spec(name: str, target: dict[str, Any], bodies: dict[str, Any], *, mode: str = "open",
               rate: float = 0.0, concurrency: int = 0, max_seconds: float = 60.0, timeout_s: float = 30.0,
               record: bool = True, stream: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "target": target, "bodies": bodies, "model": MODEL, "stream": stream,
                            "mode": mode, "max_seconds": max_seconds, "timeout_s": timeout_s, "record": record}
    if mode == "open":
        spec["rate"] = rate
    else:
        spec["concurrency"] = concurrency
    return spec


def single(addr: str) -> dict[str, Any]:
    return {"kind": "single", "addr": addr, "path": "/v1/completions"}


def handoff(prefill: str, decode: str) -> dict[str, Any]:
    return {"kind": "handoff", "ctx": prefill, "gen": decode, "path": "/v1/completions"}


def balanced_rounds(rounds: int, paths: int) -> int:
    """`rounds` rounded up to a multiple of `paths`: with the order rotating by one path per round, each path
    then takes each place in a round equally often."""
    return -(-max(1, rounds) // paths) * paths


def rotations(paths: Sequence[tuple[str, dict[str, Any]]], rounds: int
              ) -> list[list[tuple[str, dict[str, Any]]]]:
    """The paths' order in each of `balanced_rounds(rounds, len(paths))` rounds, rotating by one per round."""
    return [[*paths[r % len(paths):], *paths[:r % len(paths)]] for r in range(balanced_rounds(rounds, len(paths)))]


def interleaved(group: str, paths: Sequence[tuple[str, dict[str, Any]]], make_bodies: Any, total: int,
                rounds: int, rate: float, timeout_s: float) -> list[dict[str, Any]]:
    """At least `rounds` rounds (see `rotations`) of the same requests sent down each path ('direct',
    'sched', ...) at a fixed rate, `total` requests per path in all; the order of the paths rotates from round
    to round, each path taking each place equally often, so that drift on the machine hits them alike.
    Phase names are GROUP-PATH-ROUND."""
    phases = []
    orders = rotations(paths, rounds)
    per = max(1, total // len(orders))
    for r, order in enumerate(orders):
        bodies = make_bodies(r * per, per)
        for path, target in order:
            phases.append(phase_spec(f"{group}-{path}-{r}", target, bodies, rate=rate,
                                     max_seconds=per / rate * 1.5 + 2, timeout_s=timeout_s))
    return phases


def closed_rounds(group: str, paths: Sequence[tuple[str, dict[str, Any]]], bodies: dict[str, Any], rounds: int,
                  concurrency: int, seconds: float, timeout_s: float) -> list[dict[str, Any]]:
    """Closed loops of `seconds` per path in all, in at least `rounds` rounds that rotate the paths (as
    `interleaved` does for fixed rates), so that drift on the machine hits the scheduler and the bare proxy
    alike. Phase names are GROUP-PATH-ROUND; `closed_loop` adds the rounds of one path up."""
    phases = []
    orders = rotations(paths, rounds)
    for r, order in enumerate(orders):
        for path, target in order:
            phases.append(phase_spec(f"{group}-{path}-{r}", target, bodies, mode="closed", concurrency=concurrency,
                                     max_seconds=seconds / len(orders), timeout_s=timeout_s))
    return phases


def woven(groups: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rounds of several measurements (each a list of GROUP-PATH-ROUND phases from `interleaved` or
    `closed_rounds`) woven into one run, each measurement's rounds evenly spread over all of it: round j of
    n goes at (j + 1/2) / n of the way through. A spell in which the machine is slower then costs each
    measurement a round or so, not all of one measurement's rounds. The order inside a round, and so the
    rotation of its paths, is kept."""
    blocks: list[tuple[float, int, list[dict[str, Any]]]] = []
    for g, phases in enumerate(groups):
        rounds: dict[str, list[dict[str, Any]]] = {}
        for p in phases:
            rounds.setdefault(split_name(p["name"])[2], []).append(p)
        blocks += [((j + 0.5) / len(rounds), g, block) for j, block in enumerate(rounds.values())]
    blocks.sort(key=lambda b: (b[0], b[1]))
    return [p for _, _, block in blocks for p in block]


# ------------------------------------------------------------------------------------------------ analysis
def ok(req: Sequence[Any]) -> bool:
    return req[I_STATUS] == 200 and not req[I_ERROR]


def split_name(name: str) -> tuple[str, str, str]:
    """'ref-local-sched-3' -> ('ref-local', 'sched', '3')."""
    head, rnd = name.rsplit("-", 1)
    group, path = head.rsplit("-", 1)
    return group, path, rnd


def merge(phases: Sequence[dict[str, Any]], group: str, path: str) -> dict[str, Any]:
    """Every round of one group and path: requests keyed by (round, index), CPU and wall summed, and the
    highest of the rounds' send lag p99s."""
    requests: dict[tuple[str, int], list[Any]] = {}
    cpu: dict[str, float] = {}
    wall = loadgen_cpu = foreign = steal = 0.0
    lags = []
    sent = 0
    for p in phases:
        g, pth, rnd = split_name(p["name"])
        if (g, pth) != (group, path):
            continue
        for req in p["requests"]:
            requests[(rnd, req[I_INDEX])] = req
        for name, value in p["cpu_s"].items():
            if value is not None:
                cpu[name] = cpu.get(name, 0.0) + value
        wall += p["wall_s"]
        loadgen_cpu += p["loadgen_cpu_s"]
        foreign += foreign_cpu_s(p) or 0.0
        steal += steal_cpu_s(p) or 0.0
        sent += p["sent"]
        if p["send_lag_ms"]["p99"] is not None:
            lags.append(p["send_lag_ms"]["p99"])
    return {"requests": requests, "cpu_s": cpu, "wall_s": wall, "loadgen_cpu_s": loadgen_cpu, "sent": sent,
            "foreign_cpu_s": foreign, "steal_s": steal, "send_lag_p99_ms": max(lags) if lags else None}


def closed_loop(phases: Sequence[dict[str, Any]], group: str, path: str) -> dict[str, Any]:
    """Every round of one path's closed loop as one phase, for `throughput`: requests, wall and CPU added up."""
    merged = merge(phases, group, path)
    ours = sum(merged["cpu_s"].values()) + merged["loadgen_cpu_s"]
    return {"requests": list(merged["requests"].values()), "wall_s": merged["wall_s"], "cpu_s": merged["cpu_s"],
            "loadgen_cpu_s": merged["loadgen_cpu_s"], "machine_steal_s": merged["steal_s"],
            "machine_busy_s": ours + merged["foreign_cpu_s"] + merged["steal_s"]}


def foreign_cpu_s(phase: dict[str, Any]) -> float | None:
    """CPU seconds other processes on the machine used during a phase (machine busy time minus ours, and
    minus the host's steal time, which `steal_cpu_s` reports)."""
    busy = phase.get("machine_busy_s")
    if busy is None:
        return None
    ours = sum(v for v in phase["cpu_s"].values() if v is not None) + phase["loadgen_cpu_s"]
    return max(0.0, busy - ours - (steal_cpu_s(phase) or 0.0))


def steal_cpu_s(phase: dict[str, Any]) -> float | None:
    """CPU seconds the host ran something else on the machine's CPUs during a phase (a VM's steal time)."""
    return phase.get("machine_steal_s")


def _average_cpus(phases: Sequence[dict[str, Any]], seconds: Callable[[dict[str, Any]], float | None]) -> float | None:
    """CPUs `seconds` kept busy on average over `phases` (those that could read it)."""
    read = [(seconds(p), p["wall_s"]) for p in phases]
    wall = sum(w for v, w in read if v is not None)
    return sum(v for v, _ in read if v is not None) / wall if wall else None


def latencies(merged: dict[str, Any]) -> dict[tuple[str, int], float]:
    """(round, index) -> end-to-end latency in seconds, successful requests only."""
    return {key: req[I_LATENCY] for key, req in merged["requests"].items() if ok(req)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _ms_pcts(values: Sequence[float]) -> dict[str, float | None]:
    return percentiles([v * 1000.0 for v in values])


def _errors(requests: Sequence[Sequence[Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for req in requests:
        if not ok(req):
            key = req[I_ERROR] or f"http_{req[I_STATUS]}"
            out[key] = out.get(key, 0) + 1
    return out


def _rate(merged: dict[str, Any]) -> float | None:
    return merged["sent"] / merged["wall_s"] if merged["wall_s"] else None


def _completed_rate(merged: dict[str, Any], completed: int) -> float | None:
    """Successful requests per second of a path's phases (what `sustained` holds to the offered rate)."""
    return completed / merged["wall_s"] if merged["wall_s"] else None


def overhead(phases: Sequence[dict[str, Any]], group: str, sched_proc: str, engine_procs: Sequence[str],
             proxy_proc: str = "proxy") -> dict[str, Any]:
    """One group: direct vs scheduler (and bare proxy, if measured) latency percentiles in ms, the added
    latency (difference of percentiles), the paired per-request difference, and CPU per request."""
    direct, sched = merge(phases, group, "direct"), merge(phases, group, "sched")
    fail_differing_answers(sched, direct)
    d_lat, s_lat = latencies(direct), latencies(sched)
    d_ms, s_ms = _ms_pcts(list(d_lat.values())), _ms_pcts(list(s_lat.values()))
    n_sched = len(s_lat)
    routes: dict[str, int] = {}
    for req in sched["requests"].values():
        if req[I_ROUTE]:
            routes[req[I_ROUTE]] = routes.get(req[I_ROUTE], 0) + 1
    events = [req[I_EVENTS] for req in sched["requests"].values() if ok(req)]
    engine_cpu = sum(direct["cpu_s"].get(name, 0.0) for name in engine_procs)
    wall = direct["wall_s"] + sched["wall_s"]
    out: dict[str, Any] = {
        "direct_ms": d_ms,
        "sched_ms": s_ms,
        "added_ms": added(s_ms, d_ms),
        "paired_ms": _ms_pcts(paired_differences(s_lat, d_lat)),
        "round_added_p50_ms": _round_added_p50(d_lat, s_lat),
        "requests": {"direct": len(direct["requests"]), "sched": len(sched["requests"])},
        "ok": {"direct": len(d_lat), "sched": n_sched},
        "errors": _errors([*direct["requests"].values(), *sched["requests"].values()]),
        "failed": {"direct": _errors(list(direct["requests"].values())),
                   "sched": _errors(list(sched["requests"].values()))},
        "routes": routes,
        "sse_events_mean": sum(events) / len(events) if events else None,
        "sched_cpu_ms_per_request": _ms(per_item(sched["cpu_s"].get(sched_proc), n_sched)),
        "engine_cpu_ms_per_request": _ms(per_item(engine_cpu, len(d_lat))),
        "loadgen_cpu_ms_per_request": _ms(per_item(direct["loadgen_cpu_s"] + sched["loadgen_cpu_s"],
                                                   direct["sent"] + sched["sent"])),
        "achieved_rps": {"direct": _rate(direct), "sched": _rate(sched)},
        "completed_rps": {"direct": _completed_rate(direct, len(d_lat)), "sched": _completed_rate(sched, n_sched)},
        "send_lag_p99_ms": {"direct": direct["send_lag_p99_ms"], "sched": sched["send_lag_p99_ms"]},
        "foreign_cpus": (direct["foreign_cpu_s"] + sched["foreign_cpu_s"]) / wall if wall else None,
    }
    proxy = merge(phases, group, "proxy")
    if proxy["requests"]:
        p_lat = latencies(proxy)
        out["proxy_ms"] = _ms_pcts(list(p_lat.values()))
        out["proxy_cpu_ms_per_request"] = _ms(per_item(proxy["cpu_s"].get(proxy_proc), len(p_lat)))
        out["ok"]["proxy"] = len(p_lat)
    again = merge(phases, group, "again")
    if again["requests"]:  # the direct requests sent a second time: what the comparison reads with no hop (A/A)
        out["aa"] = _against_direct(latencies(again), d_lat, d_ms)
    unheld = merge(phases, group, "unheld")
    if unheld["requests"]:  # a second scheduler with streamFlushIntervalMs 0: the stream hold's trade-off
        u_lat = latencies(unheld)
        out["unheld"] = {**_against_direct(u_lat, d_lat, d_ms),
                         "cpu_ms_per_request": _ms(per_item(unheld["cpu_s"].get(UNHELD_PROC), len(u_lat))),
                         "requests": len(unheld["requests"])}
    return out


def fail_differing_answers(subject: dict[str, Any], direct: dict[str, Any]) -> None:
    """Mark as failed ("answer_differs") each successful request of `subject` (a `merge`d path) whose answer
    had a different number of SSE events than the same request's successful direct answer: the relay lost or
    added part of the answer. (The stream hold writes held events together but keeps each one, so a whole
    answer has as many events either way; the engine simulator's answer to a request is the same each time.)"""
    for key, req in subject["requests"].items():
        base = direct["requests"].get(key)
        if ok(req) and base is not None and ok(base) and req[I_EVENTS] != base[I_EVENTS]:
            failed = list(req)
            failed[I_ERROR] = "answer_differs"
            subject["requests"][key] = failed


def _against_direct(lat: Mapping[tuple[str, int], float], d_lat: Mapping[tuple[str, int], float],
                    d_ms: dict[str, float | None]) -> dict[str, Any]:
    """Another path's latencies (`lat`) compared with the direct path's as the scheduler's are: its
    percentiles (`ms`), their difference from direct's, and the per-request (paired) difference."""
    ms = _ms_pcts(list(lat.values()))
    return {"ms": ms, "added_ms": added(ms, d_ms), "paired_ms": _ms_pcts(paired_differences(lat, d_lat)),
            "ok": len(lat)}


def _round_added_p50(direct: Mapping[tuple[str, int], float], sched: Mapping[tuple[str, int], float]
                     ) -> list[float]:
    """The added p50 of each round on its own (ms, in round order): how much the figure moves within one
    run, as the machine's speed drifts."""
    out = []
    for rnd in sorted({key[0] for key in direct} & {key[0] for key in sched}, key=int):
        d = _ms_pcts([v for k, v in direct.items() if k[0] == rnd])
        s_ = _ms_pcts([v for k, v in sched.items() if k[0] == rnd])
        value = added(s_, d)["p50"]
        if value is not None:
            out.append(value)
    return out


def throughput(phase: dict[str, Any], sched_proc: str) -> dict[str, Any]:
    reqs = phase["requests"]
    good = [r for r in reqs if ok(r)]
    wall = phase["wall_s"]
    cpu = phase["cpu_s"]
    sched_cpu = cpu.get(sched_proc)
    utilization = {name: value / wall for name, value in cpu.items() if value is not None and wall > 0 and value > 0.05}
    if wall > 0:
        utilization["loadgen"] = phase["loadgen_cpu_s"] / wall
        foreign = foreign_cpu_s(phase)
        if foreign is not None:
            utilization["other processes"] = foreign / wall
        steal = steal_cpu_s(phase)
        if steal:
            utilization["the host (steal)"] = steal / wall
    cpu_ms = _ms(per_item(sched_cpu, len(good)))
    return {
        "requests": len(reqs),
        "ok": len(good),
        "wall_s": wall,
        "routed_rps": len(good) / wall if wall > 0 else None,
        "sched_cpu_ms_per_request": cpu_ms,
        "ceiling_rps": 1000.0 / cpu_ms if cpu_ms else None,  # one fully busy core at this CPU cost
        "cpu_utilization": utilization,
        "latency_ms": _ms_pcts([r[I_LATENCY] for r in good]),
        "errors": _errors(reqs),
    }


def capacity_from_probe(phase: dict[str, Any], settle_s: float = 0.5) -> dict[str, Any]:
    """Completions per second at saturation: successful answers that ended inside the sending window
    (after `settle_s`), per second of that window; plus the share of 429s."""
    reqs = phase["requests"]
    sent_end = max((r[I_SENT_AT] for r in reqs), default=0.0)
    window = sent_end - settle_s
    done = [r for r in reqs if ok(r) and settle_s <= r[I_SENT_AT] + r[I_LATENCY] <= sent_end]
    rejected = sum(1 for r in reqs if r[I_STATUS] == 429)
    return {"capacity_rps": len(done) / window if window > 0 else None,
            "rejected_share": rejected / len(reqs) if reqs else 0.0,
            "requests": len(reqs), "ok": sum(1 for r in reqs if ok(r)), "rejected": rejected}


def load_summary(phase: dict[str, Any]) -> dict[str, Any]:
    reqs = phase["requests"]
    good = [r for r in reqs if ok(r)]
    rejected = [r for r in reqs if r[I_STATUS] == 429]
    with_retry_after = [r for r in rejected if r[I_RETRY_AFTER] is not None and str(r[I_RETRY_AFTER]).isdigit()]
    return {
        "requests": len(reqs),
        "admitted_ok": len(good),
        "rejected_429": len(rejected),
        "rejected_with_retry_after": len(with_retry_after),
        "retry_after_values": sorted({int(r[I_RETRY_AFTER]) for r in with_retry_after}),
        "other_failures": _errors([r for r in reqs if r[I_STATUS] != 429]),
        "ttft_ms": _ms_pcts([r[I_TTFT] for r in good if r[I_TTFT] is not None]),
        "latency_ms": _ms_pcts([r[I_LATENCY] for r in good]),
        "achieved_rps": phase["sent"] / phase["wall_s"] if phase["wall_s"] else None,
        "send_lag_p99_ms": phase["send_lag_ms"]["p99"],
    }


# ------------------------------------------------------------------------------------------------ the run
def part_overhead(s: Settings, workdir: Path, trace: Path, log: Any) -> dict[str, Any]:
    """Engines at --sim-speed 0; direct vs scheduler at fixed rates, 220 KB prompts, closed-loop throughput."""
    cluster = Cluster(workdir)
    try:
        decode = cluster.engine("decode", "decode", 0.0, big_prompts=True)
        prefill = cluster.engine("prefill", "prefill", 0.0, big_prompts=True)
        deadline = time.monotonic() + 60
        for p in (decode, prefill):
            p.wait_ready("/health", deadline)
        unl = unlimited_sections()
        s_local = cluster.scheduler("sched-local", scheduler_config(prefill, decode, "local", **unl))
        s_unheld = cluster.scheduler(UNHELD_PROC, scheduler_config(
            prefill, decode, "local", **{**unl, "server": {"streamFlushIntervalMs": 0}}))
        s_disagg = cluster.scheduler("sched-disagg", scheduler_config(prefill, decode, "disaggregated", **unl))
        proxy = cluster.proxy("proxy", decode)
        proxy_disagg = cluster.proxy("proxy-disagg", decode, prefill)
        for p in (s_local, s_disagg, s_unheld):
            p.wait_ready("/readyz", deadline)
        for p in (proxy, proxy_disagg):
            p.wait_ready("/healthz", deadline)
        log(f"part 1: engines at --sim-speed 0 (decode {decode.address}, prefill {prefill.address}); schedulers "
            f"{s_local.address} (every request local) and {s_disagg.address} (every request disaggregated)")

        n_rate = s.requests // s.rounds * s.rounds
        n_ref = s.ref_requests // s.rounds * s.rounds
        offsets = {"warm": 0, "rate": s.warmup, "ref": s.warmup + n_rate, "tp": s.warmup + n_rate + n_ref}
        rows = trace_rows(trace, offsets["tp"] + s.throughput_requests, s.max_tokens_cap)

        def ids(offset: int) -> Any:
            def make(first: int, count: int) -> dict[str, Any]:
                return {"kind": "ids", "rows": rows[offset + first: offset + first + count],
                        "first_index": offset + first}
            return make

        def text(first: int, count: int) -> dict[str, Any]:
            return {"kind": "text", "bytes": s.big_kb * 1024, "count": count, "max_tokens": 16,
                    "first_index": first}

        t_local, t_disagg, t_proxy = single(s_local.address), single(s_disagg.address), single(proxy.address)
        t_proxy_disagg = single(proxy_disagg.address)
        t_decode, t_handoff = single(decode.address), handoff(prefill.address, decode.address)
        local_paths = [("direct", t_decode), ("sched", t_local)]
        disagg_paths = [("direct", t_handoff), ("sched", t_disagg)]
        # at the target rate the direct requests are also sent a second time ("again"): the same comparison
        # between two runs of the engines alone shows how much of a difference the machine makes by itself
        local_aa, disagg_aa = ("again", t_decode), ("again", t_handoff)
        warm = ids(0)(0, s.warmup)
        phases: list[dict[str, Any]] = []
        for name, target in (("warm-local-direct", t_decode), ("warm-local-sched", t_local),
                             ("warm-local-proxy", t_proxy), ("warm-disagg-direct", t_handoff),
                             ("warm-disagg-sched", t_disagg), ("warm-disagg-proxy", t_proxy_disagg)):
            phases.append(phase_spec(f"{name}-0", target, warm, rate=s.ref_rate * 2,
                                     max_seconds=s.warmup / s.ref_rate + 5, record=False))
        phases.append(phase_spec("warm-local-unheld-0", single(s_unheld.address), warm, rate=s.ref_rate * 2,
                                 max_seconds=s.warmup / s.ref_rate + 5, record=False))
        phases.append(phase_spec("warm-big-sched-0", t_local, text(10**6, 2), rate=s.big_rate, record=False))
        tp_bodies = ids(offsets["tp"])(0, s.throughput_requests)
        phases += woven([
            interleaved("local", [*local_paths, local_aa, ("proxy", t_proxy), ("unheld", single(s_unheld.address))],
                        ids(offsets["rate"]), n_rate, s.rounds, s.rate, s.timeout_s),
            interleaved("disagg", [*disagg_paths, disagg_aa, ("proxy", t_proxy_disagg)], ids(offsets["rate"]),
                        n_rate, s.rounds, s.rate, s.timeout_s),
            interleaved("ref-local", [*local_paths, ("proxy", t_proxy)], ids(offsets["ref"]), n_ref, s.rounds,
                        s.ref_rate, s.timeout_s),
            interleaved("ref-disagg", disagg_paths, ids(offsets["ref"]), n_ref, s.rounds, s.ref_rate, s.timeout_s),
            interleaved("big-local", local_paths, text, s.big_requests, s.big_rounds, s.big_rate, 60.0),
            interleaved("big-disagg", disagg_paths, text, s.big_requests, s.big_rounds, s.big_rate, 60.0),
            *(closed_rounds(group, paths, tp_bodies, s.throughput_rounds, s.concurrency, s.throughput_seconds,
                            s.timeout_s)
              for group, paths in (("tp-local", [("sched", t_local), ("proxy", t_proxy)]),
                                   ("tp-disagg", [("sched", t_disagg), ("proxy", t_proxy_disagg)]))),
        ])
        watch = {"sched-local": s_local.pid, "sched-disagg": s_disagg.pid, "decode": decode.pid,
                 "prefill": prefill.pid, "proxy": proxy.pid, "proxy-disagg": proxy_disagg.pid,
                 UNHELD_PROC: s_unheld.pid}
        log(f"part 1: {len(phases)} load phases: overhead at {s.rate:g} and {s.ref_rate:g} req/s, "
            f"{s.big_kb} KB prompts, throughput")
        results = run_loadgen({"watch": watch, "phases": phases}, workdir, "overhead")
    finally:
        cluster.stop()
    local_engines, disagg_engines = ("decode",), ("decode", "prefill")
    out = {
        "local": overhead(results, "local", "sched-local", local_engines),
        "disagg": overhead(results, "disagg", "sched-disagg", disagg_engines, "proxy-disagg"),
        "ref_local": overhead(results, "ref-local", "sched-local", local_engines),
        "ref_disagg": overhead(results, "ref-disagg", "sched-disagg", disagg_engines),
        "big_local": overhead(results, "big-local", "sched-local", local_engines),
        "big_disagg": overhead(results, "big-disagg", "sched-disagg", disagg_engines),
        "throughput_local": {**throughput(closed_loop(results, "tp-local", "sched"), "sched-local"),
                             "proxy": throughput(closed_loop(results, "tp-local", "proxy"), "proxy")},
        "throughput_disagg": {**throughput(closed_loop(results, "tp-disagg", "sched"), "sched-disagg"),
                              "proxy": throughput(closed_loop(results, "tp-disagg", "proxy"), "proxy-disagg")},
    }
    out["foreign_cpus"] = _average_cpus(results, foreign_cpu_s)
    out["steal_cpus"] = _average_cpus(results, steal_cpu_s)
    return out


class TraceCursor:
    """Trace rows for successive phases of part 2: `take` gives the next slice of rows (the rows wrap around)
    with request indices, and so prompt ids, that follow on from the previous phase's."""

    def __init__(self, rows: Sequence[Sequence[int]], first_index: int) -> None:
        if not rows:
            raise ValueError("no trace rows")
        self.rows = [list(r) for r in rows]
        self.row = 0  # the next trace row
        self.index = first_index  # the next request index

    def take(self, count: int, *, cycle: int | None = None) -> dict[str, Any]:
        """The bodies of `count` requests: the next `count` rows or, with `cycle`, the next `cycle` rows
        repeated until there are `count` (the cursor then moves on by `cycle` rows only)."""
        span = count if cycle is None else max(1, cycle)
        pool = [self.rows[(self.row + i) % len(self.rows)] for i in range(span)]
        bodies = {"kind": "ids", "rows": [pool[i % span] for i in range(count)], "first_index": self.index}
        self.row = (self.row + span) % len(self.rows)
        self.index += count
        return bodies

    def __call__(self, count: int) -> dict[str, Any]:
        return self.take(count)


def load_phases(bodies: TraceCursor, target: dict[str, Any], light_rate: float, over_rate: float, s: Settings
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The light-load and the 2x-capacity phases. Both go through the same slice of the trace (as many rows as
    the light phase sends; the overload phase cycles through it), so that their TTFT p99s see the same prompt
    sizes and differ by the load alone; each request still has prompt ids of its own."""
    n_light = max(1, int(light_rate * s.load_seconds))
    n_over = max(1, int(over_rate * s.load_seconds))
    start = bodies.row
    light = phase_spec("light-sched-0", target, bodies.take(n_light, cycle=n_light), rate=light_rate,
                       max_seconds=s.load_seconds + 1, timeout_s=s.timeout_s)
    light["pause_after_s"] = 2.0
    bodies.row = start  # the same rows again
    over = phase_spec("overload-sched-0", target, bodies.take(n_over, cycle=n_light), rate=over_rate,
                      max_seconds=s.load_seconds + 1, timeout_s=s.timeout_s)
    return light, over


def overload_config(prefill: ListeningProcess, decode: ListeningProcess, s: Settings) -> dict[str, Any]:
    """Default routing; admission small enough that queueing cannot stretch TTFT much (see the docs)."""
    return scheduler_config(
        prefill, decode, "default",
        routing={"prefillBatchSize": s.overload_prefill_batch},
        queue={"maxDepth": s.overload_queue_depth, "maxWaitSeconds": s.overload_max_wait_s},
    )


def part_overload(s: Settings, workdir: Path, trace: Path, log: Any) -> dict[str, Any]:
    """Engines with modelled GPU time: capacity probe, then light load vs 2x capacity."""
    cluster = Cluster(workdir)
    try:
        decode = cluster.engine("decode-timed", "decode", s.overload_sim_speed, big_prompts=False)
        prefill = cluster.engine("prefill-timed", "prefill", s.overload_sim_speed, big_prompts=False)
        deadline = time.monotonic() + 60
        for p in (decode, prefill):
            p.wait_ready("/health", deadline)
        config = overload_config(prefill, decode, s)
        sched = cluster.scheduler("sched-overload", config)
        sched.wait_ready("/readyz", deadline)
        log(f"part 2: engines at --sim-speed {s.overload_sim_speed:g}, scheduler {sched.address} with "
            f"queue.maxDepth={s.overload_queue_depth}, queue.maxWaitSeconds={s.overload_max_wait_s:g}, "
            f"routing.prefillBatchSize={s.overload_prefill_batch}")
        target = single(sched.address)
        watch = {"sched": sched.pid, "decode": decode.pid, "prefill": prefill.pid}
        # request indices apart from part 1's, so the prompts differ
        bodies = TraceCursor(trace_rows(trace, 8000, s.max_tokens_cap), first_index=100_000)
        run_loadgen({"watch": watch, "phases": [
            phase_spec("warm-overload-sched-0", target, bodies(20), rate=10, record=False)]}, workdir, "warm")
        probes = []
        capacity = None
        for rate in (10, 20, 40, 80, 160, 320):
            phase = phase_spec(f"probe-{rate}-sched-0", target, bodies(int(rate * s.probe_seconds)), rate=rate,
                               max_seconds=s.probe_seconds + 1, timeout_s=s.timeout_s)
            result = run_loadgen({"watch": watch, "phases": [phase]}, workdir, f"probe-{rate}")[0]
            probe = {"rate": rate, **capacity_from_probe(result)}
            probes.append(probe)
            log(f"  capacity probe at {rate} req/s: {probe['ok']} ok, {probe['rejected']} x 429, "
                f"{fmt_value(probe['capacity_rps'], 'req/s')} completed")
            if probe["rejected_share"] >= 0.2:
                capacity = probe["capacity_rps"]
                break
            time.sleep(0.5)
        saturated = capacity is not None
        if capacity is None:
            capacity = probes[-1]["capacity_rps"]
        capacity = max(1.0, capacity or 1.0)
        light_rate = max(1.0, s.light_fraction * capacity)
        over_rate = 2.0 * capacity
        log(f"  capacity {capacity:.1f} req/s: light load {light_rate:.1f} req/s, overload {over_rate:.1f} req/s, "
            f"{s.load_seconds:g} s each")
        time.sleep(1.0)
        light, over = load_phases(bodies, target, light_rate, over_rate, s)
        results = run_loadgen({"watch": watch, "phases": [light, over]}, workdir, "overload")
    finally:
        cluster.stop()
    light_s, over_s = load_summary(results[0]), load_summary(results[1])
    return {
        "config": {"queue": config["queue"], "routing": config["routing"], "sim_speed": s.overload_sim_speed},
        "probes": probes,
        "capacity_rps": capacity,
        "saturated": saturated,
        "light_rate": light_rate,
        "overload_rate": over_rate,
        "light": light_s,
        "overload": over_s,
        "ttft_p99_ratio": ratio(over_s["ttft_ms"]["p99"], light_s["ttft_ms"]["p99"]),
        "foreign_cpus": _average_cpus(results[:2], foreign_cpu_s),
        "steal_cpus": _average_cpus(results[:2], steal_cpu_s),
    }


# ------------------------------------------------------------------------------------------------ report
def build_metrics(r: dict[str, Any], s: Settings) -> list[Metric]:
    """The issue's targets, one row each, evaluated; informational rows have no target."""
    T = TARGETS
    metrics: list[Metric] = []
    rate = f"@ {s.rate:g} req/s"
    unsustained: set[str] = set()
    # target rows not met whatever their value, each with (short reason, note): requests failed via the
    # scheduler, an overload run that does not show what its target is about, ...
    void: dict[str, list[tuple[str, str]]] = {}

    def void_if(reason: tuple[str, str] | None, *keys: str) -> None:
        if reason is not None:
            for k in keys:
                void.setdefault(k, []).append(reason)

    paired: dict[str, float | None] = {}  # added-latency rows: the paired percentile is held to the target too
    # ... unless the engines alone, sent the same requests again, miss it too: (A/A paired value, whether the
    # A/A path completed as many requests as direct)
    aa_paired: dict[str, tuple[float | None, bool]] = {}
    for key, route in (("local", "local"), ("disagg", "disaggregated")):
        o = r.get(key)
        if not o:
            continue
        note = _rate_note(o, s.rate)
        if not sustained(o, s.rate):
            unsustained |= {f"{key}_added_p50", f"{key}_added_p99"}
            note = f"NOT SUSTAINED, the comparison is void: {note}"
        void_if(lost_requests(o), f"{key}_added_p50", f"{key}_added_p99")
        void_if(late_sends(o), f"{key}_added_p50", f"{key}_added_p99")
        paired[f"{key}_added_p50"], paired[f"{key}_added_p99"] = o["paired_ms"]["p50"], o["paired_ms"]["p99"]
        aa = o.get("aa")
        if aa:
            complete = aa["ok"] >= o["ok"]["direct"]
            aa_paired[f"{key}_added_p50"] = (aa["paired_ms"]["p50"], complete)
            aa_paired[f"{key}_added_p99"] = (aa["paired_ms"]["p99"], complete)
        metrics += [
            Metric(f"{key}_added_p50", f"added latency p50, {route} route, trace prompts {rate}", o["added_ms"]["p50"],
                   "ms", T["added_p50_ms"], "; ".join(filter(None, (
                       f"paired p50 {fmt_value(o['paired_ms']['p50'], 'ms')}", _aa_note(aa, "p50"),
                       _rounds_note(o), note)))),
            Metric(f"{key}_added_p99", f"added latency p99, {route} route, trace prompts {rate}", o["added_ms"]["p99"],
                   "ms", T["added_p99_ms"], "; ".join(filter(None, (
                       f"paired p99 {fmt_value(o['paired_ms']['p99'], 'ms')}", _aa_note(aa, "p99"),
                       "" if sustained(o, s.rate) else "rate not sustained")))),
            Metric(f"{key}_cpu", f"scheduler CPU per request, {route} route {rate}", o["sched_cpu_ms_per_request"],
                   "ms", T["cpu_ms_per_request"], f"{fmt_value(o['sse_events_mean'])} SSE events relayed per request"
                   + _baseline_note(o["sched_cpu_ms_per_request"], o.get("proxy_cpu_ms_per_request"), "ms",
                                    "same requests")),
        ]
    for key, route in (("throughput_local", "local"), ("throughput_disagg", "disaggregated")):
        t = r.get(key)
        if not t:
            continue
        void_if(lost_in_loop(t), f"{key}_rps")
        metrics += [
            Metric(f"{key}_rps", f"routed req/s, one scheduler process, {route} route", t["routed_rps"], "req/s",
                   T["routed_rps"], _tp_note(t)),
            Metric(f"{key}_cpu", f"scheduler CPU per request at that throughput, {route} route",
                   t["sched_cpu_ms_per_request"], "ms", T["cpu_ms_per_request"],
                   f"= {fmt_value(t['ceiling_rps'], 'req/s')} for a dedicated core" + _tp_cpu_note(t)),
        ]
    for key, route in (("big_local", "local"), ("big_disagg", "disaggregated")):
        o = r.get(key)
        if o:
            paired[f"{key}_added_p50"] = o["paired_ms"]["p50"]
            void_if(lost_requests(o), f"{key}_added_p50")
            metrics.append(Metric(f"{key}_added_p50", f"added latency p50, {s.big_kb} KB prompts, {route} route",
                                  o["added_ms"]["p50"], "ms", T["big_added_p50_ms"],
                                  f"paired p50 {fmt_value(o['paired_ms']['p50'], 'ms')}; direct p50 "
                                  f"{fmt_value(o['direct_ms']['p50'], 'ms')}"))
    ov = r.get("overload")
    if ov:
        void_if(overload_unfit(ov, s), "overload_ttft_ratio")
        metrics.append(Metric(
            "overload_ttft_ratio", "admitted TTFT p99 at 2x capacity / TTFT p99 at light load", ov["ttft_p99_ratio"],
            "x", T["overload_ttft_ratio"],
            f"{fmt_value(ov['overload']['ttft_ms']['p99'], 'ms')} / {fmt_value(ov['light']['ttft_ms']['p99'], 'ms')}"))
        over = ov["overload"]
        excess_ok = (over["rejected_429"] > 0 and over["rejected_with_retry_after"] == over["rejected_429"]
                     and not over["other_failures"])
        metrics.append(Metric(
            "overload_429", "excess at 2x capacity answered 429 with Retry-After", over["rejected_429"], "count", None,
            f"{over['rejected_with_retry_after']}/{over['rejected_429']} carried Retry-After "
            f"(values {', '.join(map(str, over['retry_after_values'])) or '-'}); other failures: "
            f"{json.dumps(over['other_failures']) if over['other_failures'] else 'none'}", passed=excess_ok))
    unheld = (r.get("local") or {}).get("unheld")
    if unheld:
        label = f"local route {rate}, streamFlushIntervalMs 0 (reference)"
        metrics += [
            Metric("unheld_added_p50", f"added latency p50, {label}", unheld["added_ms"]["p50"], "ms", None,
                   f"paired p50 {fmt_value(unheld['paired_ms']['p50'], 'ms')}; scheduler CPU "
                   f"{fmt_value(unheld['cpu_ms_per_request'], 'ms')} per request (default 1 ms: "
                   f"{fmt_value(r['local']['sched_cpu_ms_per_request'], 'ms')})"),
            Metric("unheld_added_p99", f"added latency p99, {label}", unheld["added_ms"]["p99"], "ms", None,
                   f"paired p99 {fmt_value(unheld['paired_ms']['p99'], 'ms')}"),
        ]
    for key, route in (("ref_local", "local"), ("ref_disagg", "disaggregated")):
        o = r.get(key)
        if o:
            metrics += [
                Metric(f"{key}_added_p50", f"added latency p50, {route} route @ {s.ref_rate:g} req/s (reference)",
                       o["added_ms"]["p50"], "ms", None, f"paired p50 {fmt_value(o['paired_ms']['p50'], 'ms')}; "
                       + _rate_note(o, s.ref_rate)),
                Metric(f"{key}_added_p99", f"added latency p99, {route} route @ {s.ref_rate:g} req/s (reference)",
                       o["added_ms"]["p99"], "ms", None, f"paired p99 {fmt_value(o['paired_ms']['p99'], 'ms')}"),
                Metric(f"{key}_cpu", f"scheduler CPU per request, {route} route @ {s.ref_rate:g} req/s (reference)",
                       o["sched_cpu_ms_per_request"], "ms", None,
                       f"bare proxy, same requests: {fmt_value(o['proxy_cpu_ms_per_request'], 'ms')}"
                       if o.get("proxy_cpu_ms_per_request") is not None else ""),
            ]
    metrics = [m.evaluate() for m in metrics]
    for m in metrics:
        if m.key in unsustained:
            m.passed = False  # the rate was not reached, so neither was the target at that rate
            m.missed_by = "rate not sustained"
        # A difference of two percentiles can meet a target by noise alone (a tail in the direct phase makes it
        # small or negative); the per-request difference must then meet it as well. Unless the engines alone
        # miss it too: when the same direct requests, sent again, differ from the first time by more than the
        # target, that much of the paired percentile is the machine's noise, so it is held to the noise plus
        # the target (A/A's paired value + the target) instead; never when A/A completed fewer requests.
        both = paired.get(m.key)
        if m.key in paired and m.passed and m.target is not None and not m.target.check(both):
            noise, complete = aa_paired.get(m.key, (None, False))
            noisy = noise is not None and not m.target.check(noise)
            bound = Target(m.target.op, noise + m.target.limit) if noisy else None
            if bound is not None and complete and bound.check(both):
                m.note += (f"; the paired value is above the target, as is the engines' own (A/A), and within A/A's "
                           f"+ the target ({fmt_value(bound.limit, 'ms')}): machine noise, so the difference of "
                           "percentiles decides")
            else:
                why = ""
                if bound is not None:
                    why = (f" and above A/A's + the target ({fmt_value(bound.limit, 'ms')})" if complete
                           else " and A/A completed fewer requests than direct")
                m.passed = False
                m.missed_by = f"paired {m.key.rsplit('_', 1)[1]} {fmt_value(both, 'ms')}"
                m.note += f"; the paired value is above the target{why}, so not met"
        for short, note in void.get(m.key, []):
            _fail(m, short, note)
        if m.passed is None and m.target is not None:
            # a target with nothing measured to hold to it (no request completed, say) is not met
            _fail(m, "no measurement", "NO MEASUREMENT, so not met")
    return metrics


def _fail(m: Metric, short: str, note: str) -> None:
    """Mark a target row not met: `short` says what decided (the run's row), `note` is added to its note."""
    m.passed = False
    m.missed_by = short
    m.note = f"{m.note}; {note}" if m.note else note


def _aa_note(aa: dict[str, Any] | None, q: str) -> str:
    """The A/A figures of one percentile: the direct requests sent again, compared with the first time."""
    if not aa:
        return ""
    return (f"A/A (engines alone, the same requests again): paired {q} {fmt_value(aa['paired_ms'][q], 'ms')}, "
            f"difference {fmt_value(aa['added_ms'][q], 'ms')}")


def _proxy_and_sched_cpu(o: dict[str, Any] | None) -> tuple[float, float] | None:
    """CPU ms per request of the bare proxy and of the scheduler on the same requests, when both were measured."""
    proxy, sched = (o or {}).get("proxy_cpu_ms_per_request"), (o or {}).get("sched_cpu_ms_per_request")
    return (proxy, sched) if proxy and sched else None


def _baseline_note(sched: float | None, proxy: float | None, unit: str, what: str) -> str:
    """The same-run baseline of a row whose target is an absolute number (CPU per request, routed req/s): the
    bare proxy's figure on `what` and the scheduler's as a multiple of it, the machine-independent figure."""
    if not proxy:
        return "; no bare-proxy baseline measured"
    ratio_text = f" (scheduler = {sched / proxy:.2f}x)" if sched else ""
    return f"; bare proxy, {what}: {fmt_value(proxy, unit)}{ratio_text}"


def sustained(o: dict[str, Any], offered: float, share: float = SUSTAINED_SHARE) -> bool:
    """Both paths completed requests (successfully) at (nearly) the offered rate; otherwise their latencies
    measure a backlog, or leave out what failed, not the hop, and their difference means nothing."""
    got = o["completed_rps"]
    return all(v is not None and v >= share * offered for v in (got["direct"], got["sched"]))


def _rate_note(o: dict[str, Any], offered: float) -> str:
    got, done = o["achieved_rps"], o["completed_rps"]
    return (f"offered {offered:g} req/s, sent {fmt_value(got['direct'])} direct / {fmt_value(got['sched'])} "
            f"via scheduler req/s, completed {fmt_value(done['direct'])} / {fmt_value(done['sched'])}")


def _reasons(failed: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} x {n}" for reason, n in sorted(failed.items())) or "none"


def lost_requests(o: dict[str, Any]) -> tuple[str, str] | None:
    """(short reason, note) when the scheduler path completed fewer requests than the direct path in the same
    phases, or some of its requests failed where none of the direct ones did: its percentiles then leave out
    what failed (a timeout or a cut stream), so no latency target can be met on them. None otherwise."""
    done = o["ok"]
    failed = o.get("failed") or {}
    s_failed, d_failed = failed.get("sched") or {}, failed.get("direct") or {}
    if done["sched"] >= done["direct"] and not (s_failed and not d_failed):
        return None
    sent = o.get("requests") or {}
    short = (f"{sum(s_failed.values())} failed via the scheduler ({_reasons(s_failed)}), "
             f"{sum(d_failed.values())} direct")
    note = (f"REQUESTS FAILED VIA THE SCHEDULER, so not met: completed {done['sched']} of {sent.get('sched', '-')} "
            f"via the scheduler, {done['direct']} of {sent.get('direct', '-')} direct; failed via the scheduler: "
            f"{_reasons(s_failed)}; direct: {_reasons(d_failed)}")
    return short, note


def overload_unfit(ov: dict[str, Any], s: Settings) -> tuple[str, str] | None:
    """(short reason, note) when the overload run does not show what its TTFT target is about: the capacity
    probes never reached 429s (so 2x "capacity" need not be an overload), the light phase had 429s or other
    failures (so it was no light load), or the 2x phase admitted fewer than `ADMITTED_SHARE` of capacity x
    seconds (turning nearly everything away keeps any p99 low). None otherwise."""
    light, over = ov["light"], ov["overload"]
    floor = ADMITTED_SHARE * ov["capacity_rps"] * s.load_seconds
    reasons = []
    if not ov["saturated"]:
        reasons.append("the capacity probes never got 429s")
    if light["rejected_429"] or light["other_failures"]:
        reasons.append(f"the light phase had {light['rejected_429']} x 429 and other failures: "
                       f"{_reasons(light['other_failures'])}")
    if over["admitted_ok"] < floor:
        reasons.append(f"2x capacity admitted {over['admitted_ok']} requests, fewer than {ADMITTED_SHARE:.0%} of "
                       f"capacity x {s.load_seconds:g} s ({floor:.0f})")
    if not reasons:
        return None
    return "; ".join(reasons), f"NOT AN OVERLOAD RUN THE TARGET CAN BE JUDGED ON, so not met: {'; '.join(reasons)}"


def late_sends(o: dict[str, Any]) -> tuple[str, str] | None:
    """(short reason, note) when the load generator started either path's requests later than
    `SEND_LAG_BOUND_MS` against their schedule (p99): its own stalls were then as large as the largest
    latency target, and they delay its reading of answers as much, so its timings cannot judge the targets."""
    lag = o["send_lag_p99_ms"]
    if all(v is not None and v <= SEND_LAG_BOUND_MS for v in lag.values()):
        return None
    figures = f"{fmt_value(lag['direct'], 'ms')} direct / {fmt_value(lag['sched'], 'ms')} via the scheduler"
    return (f"send lag p99 {figures}",
            f"THE LOAD GENERATOR FELL BEHIND, so not met: send lag p99 {figures}, above "
            f"{fmt_value(SEND_LAG_BOUND_MS, 'ms')}")


def lost_in_loop(t: dict[str, Any]) -> tuple[str, str] | None:
    """(short reason, note) when the scheduler's closed loop had failed requests and the bare proxy's, on the
    same requests and route, had none (for the throughput rows, which count successful requests only)."""
    proxy = t.get("proxy") or {}
    errors = t.get("errors") or {}
    if not errors or not proxy or proxy.get("errors"):
        return None
    return (f"{sum(errors.values())} failed via the scheduler ({_reasons(errors)}), none via the bare proxy",
            f"REQUESTS FAILED VIA THE SCHEDULER, so not met: {t.get('ok', '-')} of {t.get('requests', '-')} "
            f"completed; failed: {_reasons(errors)}; bare proxy: none of {proxy.get('requests', '-')}")


def _rounds_note(o: dict[str, Any]) -> str:
    rounds = o.get("round_added_p50_ms") or []
    if len(rounds) < 2:
        return ""
    return f"rounds' own added p50 {fmt_value(min(rounds))} to {fmt_value(max(rounds), 'ms')}"


def _tp_note(t: dict[str, Any]) -> str:
    parts = [f"{k} {v * 100:.0f}%" for k, v in t["cpu_utilization"].items()]
    note = "CPU busy: " + ", ".join(parts)
    # the same closed loop through the bare proxy: what the machine allows
    return note + _baseline_note(t.get("routed_rps"), (t.get("proxy") or {}).get("routed_rps"), "req/s",
                                 "same closed loop")


def _tp_cpu_note(t: dict[str, Any]) -> str:
    """The bare proxy's CPU per request in the same closed loop: what the scheduler's own work adds to it."""
    return _baseline_note(t.get("sched_cpu_ms_per_request"), (t.get("proxy") or {}).get("sched_cpu_ms_per_request"),
                          "ms", "same closed loop")


def metric_dicts(metrics: Sequence[Metric]) -> list[dict[str, Any]]:
    return [{**asdict(m), "target": asdict(m.target) if m.target else None, "value_text": fmt_value(m.value, m.unit),
             "target_text": "429 + Retry-After" if m.key == "overload_429" else fmt_target(m.target, m.unit),
             "result": fmt_result(m.passed)} for m in metrics]


HISTORY_COLUMNS = ["run", "code", "machine", "targets met", "bare proxy, disaggregated closed loop", "missed"]
_MACHINE_COLUMN = HISTORY_COLUMNS.index("machine")
_PROXY_COLUMN = HISTORY_COLUMNS.index("bare proxy, disaggregated closed loop")


def run_cells(report: dict[str, Any]) -> list[str]:
    """One run as the cells of the section's "Recent runs" table: when, which code, which targets it
    missed, and how fast the machine was (the bare proxy's closed loop)."""
    evaluated = [m for m in report["metrics"] if m["passed"] is not None]

    def why(m: dict[str, Any]) -> str:
        return f"{m['value_text']}, {m['missed_by']}" if m.get("missed_by") else m["value_text"]

    missed = "; ".join(f"{m['label']}: {why(m)} (target {m['target_text']})" for m in evaluated if not m["passed"])
    when = report["date"] + (" (--quick)" if report["quick"] else "")
    proxy = ((report["results"].get("throughput_disagg") or {}).get("proxy") or {}).get("routed_rps")
    facts = report.get("machine") or {}
    machine = f"{facts.get('nproc')} CPUs" + (f" ({facts['cpu']})" if facts.get("cpu") else "") if facts else "-"
    return [when, report.get("code", "-"), machine, f"{sum(1 for m in evaluated if m['passed'])} of {len(evaluated)}",
            fmt_value(proxy, "req/s") if proxy else "-", missed or "-"]


def run_summary(report: dict[str, Any]) -> str:
    """One run as a row of the section's "Recent runs" table."""
    return markdown_row(run_cells(report))


def _history_cells(row: str) -> list[str]:
    """A carried-over row with the current columns: rows written before the machine column (and before the
    bare-proxy one) get '-' there."""
    cells = markdown_cells(row)
    if len(cells) <= len(HISTORY_COLUMNS) - 2:
        cells.insert(_PROXY_COLUMN - 1, "-")
    if len(cells) == len(HISTORY_COLUMNS) - 1:
        cells.insert(_MACHINE_COLUMN, "-")
    return cells


def write_report(report: dict[str, Any], output: Path) -> None:
    """The scheduler section of `output` rewritten with `report`, its "Recent runs" carried over."""
    earlier = table_rows_under(output.read_text(encoding="utf-8"), SECTION, HISTORY_HEADING) \
        if output.exists() else []
    report["history"] = [run_cells(report), *map(_history_cells, earlier)][:HISTORY_KEPT]
    write_section(output, SECTION, render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    s = Settings(**report["settings"])
    r = report["results"]
    facts = report["machine"]
    metrics = report["metrics"]
    evaluated = [m for m in metrics if m["passed"] is not None]
    lines = [
        "## Scheduler",
        "",
        f"`baton bench scheduler{' --quick' if report['quick'] else ''}` on {report['date']} took "
        f"{report['duration_s']:.0f} s. Machine: {facts.get('nproc')} CPUs"
        f"{' (' + facts['cpu'] + ')' if facts.get('cpu') else ''}, Python {facts.get('python')}, "
        f"{facts.get('platform')}; load average {facts.get('loadavg_1m', 0):.2f} at the start; other processes "
        f"kept {fmt_value(r.get('foreign_cpus'))} CPUs busy on average during part 1 and "
        f"{fmt_value((r.get('overload') or {}).get('foreign_cpus'))} during part 2; the host took "
        f"{fmt_value(r.get('steal_cpus'))} and {fmt_value((r.get('overload') or {}).get('steal_cpus'))} CPUs "
        "from the machine (steal time). "
        f"**{sum(1 for m in evaluated if m['passed'])} of {len(evaluated)} targets met.**",
        "",
        markdown_table(["metric", "value", "target", "result", "note"],
                       [[m["label"], m["value_text"], m["target_text"], m["result"], m["note"]] for m in metrics]),
        "",
        HISTORY_HEADING,
        "",
        f"Each run adds a row here, newest first (the last {HISTORY_KEPT} are kept). Runs are made on whichever "
        "machine the work is done on, so they differ by that machine's speed as well as by the code. The bare "
        "proxy's closed loop (the disaggregated requests through a forwarder on the same HTTP layer that does no "
        "scheduling, in the same rounds as the scheduler's) shows how fast the machine was during each run: where "
        "it stays under 1,500 req/s, no router on this HTTP layer reaches the routed req/s target there.",
        "",
        markdown_table(HISTORY_COLUMNS, report.get("history") or [run_cells(report)]),
        "",
        "Latency percentiles in ms (to the end of the streamed answer; direct = the engines alone, sched = through "
        "the scheduler):",
        "",
    ]
    rows = []
    for key, label in (("local", f"local, trace prompts @ {s.rate:g} req/s"),
                       ("disagg", f"disaggregated, trace prompts @ {s.rate:g} req/s"),
                       ("ref_local", f"local, trace prompts @ {s.ref_rate:g} req/s"),
                       ("ref_disagg", f"disaggregated, trace prompts @ {s.ref_rate:g} req/s"),
                       ("big_local", f"local, {s.big_kb} KB prompts @ {s.big_rate:g} req/s"),
                       ("big_disagg", f"disaggregated, {s.big_kb} KB prompts @ {s.big_rate:g} req/s")):
        o = r.get(key)
        if not o:
            continue
        rows.append([label, f"{o['ok']['direct']} / {o['ok']['sched']}",
                     *(f"{fmt_value(o['direct_ms'][q])} / {fmt_value(o['sched_ms'][q])}"
                       for q in ("p50", "p90", "p99")),
                     f"{fmt_value(o['paired_ms']['p50'])} / {fmt_value(o['paired_ms']['p99'])}",
                     fmt_value(o["engine_cpu_ms_per_request"]), fmt_value(o["sched_cpu_ms_per_request"]),
                     fmt_value(o["loadgen_cpu_ms_per_request"]),
                     f"{fmt_value(o['send_lag_p99_ms']['direct'])} / {fmt_value(o['send_lag_p99_ms']['sched'])}"])
        aa = o.get("aa")
        if aa:  # the direct requests sent again: the columns read direct / again
            rows.append([f"{label}, A/A: direct / the same requests again", f"{o['ok']['direct']} / {aa['ok']}",
                         *(f"{fmt_value(o['direct_ms'][q])} / {fmt_value(aa['ms'][q])}"
                           for q in ("p50", "p90", "p99")),
                         f"{fmt_value(aa['paired_ms']['p50'])} / {fmt_value(aa['paired_ms']['p99'])}",
                         "-", "-", "-", "-"])
    lines.append(markdown_table(
        ["phase", "ok direct / sched", "p50 direct / sched", "p90", "p99", "paired diff p50 / p99",
         "engine CPU ms/req", "sched CPU ms/req", "load generator CPU ms/req", "send lag p99 ms direct / sched"],
        rows))
    ov = r.get("overload")
    if ov:
        cfg = ov["config"]
        lines += [
            "",
            f"Overload: engines at `--sim-speed {cfg['sim_speed']:g}` (the calibrated H200 timing of Llama-3-8B), "
            f"scheduler with `queue: {json.dumps(cfg['queue'])}`, `routing: {json.dumps(cfg['routing'])}`, other "
            f"settings default. Capacity {fmt_value(ov['capacity_rps'], 'req/s')} (completions per second while "
            f"the probe was turning requests away{'' if ov['saturated'] else '; NOT reached by the probes'}); light "
            f"load {ov['light_rate']:.1f} req/s, overload {ov['overload_rate']:.1f} req/s, {s.load_seconds:g} s each.",
            "",
            markdown_table(
                ["load", "sent", "ok", "429", "TTFT p50", "TTFT p99", "latency p99", "other failures"],
                [[name, str(x["requests"]), str(x["admitted_ok"]), str(x["rejected_429"]),
                  fmt_value(x["ttft_ms"]["p50"], "ms"), fmt_value(x["ttft_ms"]["p99"], "ms"),
                  fmt_value(x["latency_ms"]["p99"], "ms"),
                  json.dumps(x["other_failures"]) if x["other_failures"] else "-"]
                 for name, x in (("light", ov["light"]), ("2x capacity", ov["overload"]))]),
        ]
    lines += ["", *_reading_notes(r, s), "How it is measured:", ""]
    lines += [
        "- Separate processes on 127.0.0.1: a decode and a prefill `baton engine-sim` (Llama-3-8B config), "
        "`baton scheduler` processes in front of them, and the load generator (`baton.bench.loadgen`, on the "
        "scheduler's own keep-alive HTTP/1.1 client) in a process of its own. CPU times are read around each phase "
        "from `/proc/<pid>/task/*/schedstat` (ns; `/proc/<pid>/stat` ticks as a cross-check); 'other "
        "processes' is the machine's busy time (`/proc/stat`) minus ours and minus its steal time (on a virtual "
        "machine, time the host gave its CPUs to something else: reported on its own as 'the host (steal)').",
        f"- Part 1, engines at `--sim-speed 0` (no modelled GPU time, so what remains is HTTP and Python): streamed "
        f"`/v1/completions` with token-id prompts of the trace's `ContextTokens` and `max_tokens` = `GeneratedTokens` "
        f"capped at {s.max_tokens_cap}, sent at a fixed rate in rounds: at least {s.rounds}, as many more as make "
        "a multiple of the paths compared, each round sending the same requests down every path in an order that "
        "rotates by one path per round, so that each path takes each place equally often. The rounds of all of "
        "part 1's measurements (these, the "
        f"{s.big_kb} KB prompts' and the closed loops') are woven together, each measurement's spread evenly "
        "over the whole part, so a spell in which the machine is slower falls on a round of several of them "
        "rather than on every round of one. One scheduler sends everything local (to the decode "
        "engine), the other everything disaggregated (context_only to the prefill engine, then generation_only to "
        "the decode engine, which pulls the KV from the prefill engine); their admission limits are raised out of "
        f"the way. A third, local with streamFlushIntervalMs 0, also gets the {s.rate:g} req/s local requests (the "
        "reference rows on the stream hold's trade-off). The direct baseline of the disaggregated route makes the "
        "same two engine calls from the load generator and counts only their round trips, not its own JSON work "
        "in between.",
        "- Added latency = scheduler percentile - direct percentile (the issue's definition); 'paired' = the "
        "percentile of the per-request difference between the two paths. A latency target counts as met only when "
        "both are within it (a tail in the direct phase alone can make the difference small or negative), except "
        f"when the A/A comparison misses it too: at {s.rate:g} req/s the direct requests are sent a second time in "
        "each round ('again'), and the same two figures between those two runs of the engines alone show what the "
        "machine's noise makes of a path that adds nothing. When even A/A's paired percentile is above the target, "
        "that much of the scheduler's is the machine's noise: the scheduler's paired percentile is then held to "
        "A/A's plus the target instead (and the difference of percentiles to the target), provided the requests "
        "sent again completed as many as the direct ones. A request completed with status 200 and a stream "
        "ending in [DONE]; through the scheduler also with as many SSE events as the same request's direct "
        "answer (the stream hold writes held events together but keeps each one), else the relay lost part of "
        "the answer and the request counts as failed. Percentiles are of the requests that completed, so no "
        "latency target is met when fewer completed through the scheduler than direct, or some failed through it "
        "where none did direct (nor a throughput target when some failed in the scheduler's "
        "closed loop and none in the bare proxy's); a rate counts as sustained when completed requests kept up "
        f"with it: both paths completed at least {SUSTAINED_SHARE:.0%} of the offered rate (successful requests per "
        "second of their phases' whole time, lead-in and wait for the last answers included). The load generator "
        "records how late each fixed-rate request started against its schedule (send lag; the table shows each "
        f"path's highest p99 over its rounds); at {s.rate:g} req/s the latency targets are not met when either "
        f"path's exceeds {fmt_value(SEND_LAG_BOUND_MS, 'ms')}, the added p99 target: a stall of the load generator "
        "that long delays its reading of answers as much, so its timings could not resolve the targets. A target "
        "with no value to hold to it (nothing completed to measure it on) is not met.",
        f"- {s.big_kb} KB prompts: text of {s.big_kb * 1024:,} bytes (~{s.big_kb * 1024 // 4:,} tokens), "
        f"{s.big_requests} requests per path (fewer when they do not divide evenly over the rounds), 16 output "
        "tokens.",
        f"- Throughput: closed loop with {s.concurrency} connections, {s.throughput_seconds:g} s per path in "
        f"{balanced_rounds(s.throughput_rounds, 2)} rounds. The load generator and the engines share the machine's "
        "CPUs with the scheduler, so this is what one scheduler process reached here, not its ceiling; 1000 / "
        "(CPU ms per request) is what a dedicated core would give. Each route's loop also goes through the bare proxy on "
        "that route, the rounds alternating the two: what a router on the same HTTP layer reached on the machine "
        "at that moment.",
        "- The bare proxy (`baton.bench.proxy`) forwards the same requests with the scheduler's own HTTP server, "
        "client and stream relay (`baton.http1`, `StreamRelay`, same flush interval) but does nothing else: the "
        "CPU floor of a router built on that layer on this machine. On the disaggregated route it does the least "
        "a router can: the body context_only to the prefill engine, the answer's handle and prompt ids "
        "generation_only to the decode engine, that stream relayed. It gets the scheduler's requests at "
        f"{s.rate:g} req/s on both routes and at {s.ref_rate:g} req/s on the local route, and runs both closed "
        "loops. The "
        "targets on routed req/s and CPU per request are absolute numbers by the issue's definition, so they "
        "depend on the machine; each of their rows gives the bare proxy's figure from the same run and the "
        "scheduler's as a multiple of it ('scheduler = 1.23x'), the machine-independent figure (no target is "
        "set on it).",
        f"- Overload: capacity probed with open-loop rates doubling from 10 req/s until at least 20% get 429; then "
        f"{s.light_fraction:g}x and 2x that capacity, requests as in part 1 (`max_tokens` capped at "
        f"{s.max_tokens_cap}); both phases cycle through the same slice of the trace (as many rows as the light "
        "phase sends), so their TTFT p99s see the same prompt sizes. The TTFT target is met only on a run that "
        "shows an overload: the probes reached 429s, the light phase had no 429 and no other failure, and the 2x "
        f"phase completed at least {ADMITTED_SHARE:.0%} of capacity x {s.load_seconds:g} s requests (turning nearly "
        "everything away would keep any p99 low).",
        f"- {TRACE_ATTRIBUTION}",
    ]
    return "\n".join(lines)


def _reading_notes(r: dict[str, Any], s: Settings) -> list[str]:
    """Sentences computed from this run that say what limits the numbers (empty when nothing to say)."""
    notes = []
    ref = r.get("ref_local") or {}
    cpu = _proxy_and_sched_cpu(ref)
    if cpu is not None:
        proxy, sched = cpu
        notes.append(
            f"Reading these numbers: at {s.ref_rate:g} req/s a bare pass-through proxy on the same HTTP layer spent "
            f"{fmt_value(proxy, 'ms')} of CPU per request on the same requests, the scheduler "
            f"{fmt_value(sched, 'ms')}: its own work (parsing, routing, admission, metrics, logs) was "
            f"{fmt_value(sched - proxy, 'ms')}, the rest is the HTTP server and client it is built on, per request "
            f"and per relayed SSE event ({fmt_value(ref.get('sse_events_mean'))} per request here)."
            + (" On this machine the CPU target is below what that HTTP stack costs on its own."
               if proxy > TARGETS["cpu_ms_per_request"].limit else ""))
    cpu = _proxy_and_sched_cpu(r.get("local"))
    if cpu is not None:
        proxy, sched = cpu
        notes.append(
            f"At {s.rate:g} req/s the bare proxy spent {fmt_value(proxy, 'ms')} of CPU per request on the same "
            f"requests and the scheduler {fmt_value(sched, 'ms')} ({sched / proxy:.2f}x): the share of the "
            "scheduler's own work is the steadier figure from run to run, as the machine's speed varies.")
    local = r.get("local") or {}
    unheld = local.get("unheld")
    if unheld and local.get("sched_cpu_ms_per_request") and unheld.get("cpu_ms_per_request"):
        notes.append(
            f"The stream hold's trade-off, same run, same requests at {s.rate:g} req/s: with the default "
            f"streamFlushIntervalMs of 1 the scheduler added {fmt_value(local['paired_ms']['p50'], 'ms')} (paired "
            f"p50) for {fmt_value(local['sched_cpu_ms_per_request'], 'ms')} of CPU per request; with 0 (every piece "
            f"written as it comes) {fmt_value(unheld['paired_ms']['p50'], 'ms')} for "
            f"{fmt_value(unheld['cpu_ms_per_request'], 'ms')}. The engine here answers in no time, so tokens come "
            "faster than one per millisecond and the hold gathers them (never the last event, so a stream's end is "
            "not delayed); at real decode speeds nothing is held and both settings cost the same.")
    for key in ("local", "disagg"):
        o = r.get(key)
        if o and not sustained(o, s.rate):
            lg = o.get("loadgen_cpu_ms_per_request")
            notes.append(
                f"At {s.rate:g} req/s the {'local' if key == 'local' else 'disaggregated'} phases were not sustained "
                f"(completed {fmt_value(o['completed_rps']['direct'])} req/s direct, "
                f"{fmt_value(o['completed_rps']['sched'])} via the scheduler): the engine simulator alone needs "
                f"{fmt_value(o['engine_cpu_ms_per_request'], 'ms')} and the load generator "
                f"{fmt_value(lg, 'ms')} of CPU per request, so their latencies measure a backlog; the overhead is "
                f"better read at {s.ref_rate:g} req/s and in the CPU rows.")
    return [line for note in notes for line in (note, "")]  # each note its own paragraph


def render_text(report: dict[str, Any]) -> str:
    rows = [[m["label"], m["value_text"], m["target_text"], m["result"], m["note"]] for m in report["metrics"]]
    evaluated = [m for m in report["metrics"] if m["passed"] is not None]
    return (text_table(["metric", "value", "target", "result", "note"], rows)
            + f"\n\n{sum(1 for m in evaluated if m['passed'])} of {len(evaluated)} targets met "
              f"({report['duration_s']:.0f} s)")


# ------------------------------------------------------------------------------------------------ entry
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton bench scheduler",
                                description="Measure the scheduler against the engines alone and write BENCHMARKS.md.")
    p.add_argument("--quick", action="store_true", help="smaller counts: about a minute and a half")
    p.add_argument("--output", type=Path, help="BENCHMARKS.md to update (default: the checkout's)")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a table")
    p.add_argument("--trace", help=f"trace CSV (default: shared/traces/{TRACE_NAME})")
    p.add_argument("--rate", type=float, help="req/s of the fixed-rate overhead phases (default 500)")
    p.add_argument("--overload-sim-speed", type=float, help="engine --sim-speed in the overload part (default 1)")
    p.add_argument("--parts", default="overhead,overload", help=argparse.SUPPRESS)
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (the path is printed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.rate:
        s = replace(s, rate=args.rate)
    if args.overload_sim_speed is not None:
        s = replace(s, overload_sim_speed=args.overload_sim_speed)
    parts = set(args.parts.split(","))
    try:
        trace = trace_path(args.trace)
    except FileNotFoundError as exc:
        print(f"baton bench scheduler: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-scheduler-"))
    t0 = time.monotonic()
    facts = machine_facts()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    code = code_version(repo_root())  # read before the run: the code that is measured

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)

    finished = False
    try:
        log(f"baton bench scheduler{' --quick' if args.quick else ''}: {facts.get('nproc')} CPUs, Python "
            f"{facts['python']}, load average {facts.get('loadavg_1m', 0):.2f}; logs in {workdir}")
        results: dict[str, Any] = {}
        if "overhead" in parts:
            results.update(part_overhead(s, workdir, trace, log))
        if "overload" in parts:
            results["overload"] = part_overload(s, workdir, trace, log)
        finished = True
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        print(f"baton bench scheduler: {exc}\n(logs kept in {workdir})", file=sys.stderr)
        return 1
    finally:
        if finished and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    metrics = build_metrics(results, s)
    report: dict[str, Any] = {
        "benchmark": SECTION,
        "date": date,
        "code": code,
        "quick": bool(args.quick),
        "duration_s": time.monotonic() - t0,
        "machine": {**facts, "loadavg_1m_end": machine_facts().get("loadavg_1m")},
        "settings": asdict(s),
        "trace": str(trace),
        "metrics": metric_dicts(metrics),
        "results": results,
    }
    print(json.dumps(report, indent=1) if args.json else render_text(report))
    if not args.no_write:
        if parts != {"overhead", "overload"}:
            print("baton bench scheduler: a partial run (--parts) does not write BENCHMARKS.md", file=sys.stderr)
        else:
            output = args.output or default_output()
            write_report(report, output)
            print(f"wrote the scheduler section of {output}", file=sys.stderr)
    if args.keep_logs:
        print(f"logs: {workdir}", file=sys.stderr)
    return 0
