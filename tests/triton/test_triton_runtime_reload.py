"""Switching a running scheduler from `runtime: trtllm-serve` to `runtime: triton` by its config file alone, as
the operator does when a generation on the other runtime starts serving (it rewrites the ConfigMap; the
scheduler's pod is not restarted): requests then go through the Triton path, a stream in flight on the old
runtime finishes, and the old engine client is closed once it has."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from triton_harness import (
    MODEL,
    SCHEDULER_LISTENING,
    Proc,
    http,
    parse_sse,
    post_json,
    prompt_ids,
    start_http_engine,
    start_triton_engine,
    stop_all,
)

pytestmark = pytest.mark.timeout(1500)  # the first Triton test of a session may install the PyTriton venv

START_TIMEOUT_S = 120.0


def _config(runtime: str, prefill: Proc, decode: Proc) -> dict:
    return {
        "model": MODEL,
        "runtime": runtime,
        "endpoints": {"discovery": "static", "static": {"prefill": [prefill.address], "decode": [decode.address]}},
        "routing": {"localPrefillBelowTokens": 256, "alwaysPrefillAtOrAboveTokens": 1024},
        "heartbeatSeconds": 0.5,
        "engineTimeoutSeconds": 30,
        "server": {"host": "127.0.0.1", "port": 0},
    }


def _reloads(url: str, result: str) -> float:
    _, _, raw = http("GET", url + "/metrics")
    match = re.search(rf'^baton_scheduler_config_reloads_total{{result="{result}"}} (\S+)$', raw.decode(), re.M)
    return float(match.group(1)) if match else 0.0


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def procs(pytriton_python: str, tmp_path: Path):
    started: dict[str, Proc] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        started["t_prefill"] = start_triton_engine(pytriton_python, tmp_path, "t_prefill", "prefill")
        started["t_decode"] = start_triton_engine(pytriton_python, tmp_path, "t_decode", "decode")
        started["h_prefill"] = start_http_engine(tmp_path, "h_prefill", "prefill")
        # slower decode steps: a stream of 400 tokens lasts a few seconds, long enough to span the reload
        started["h_decode"] = start_http_engine(tmp_path, "h_decode", "decode", sim_speed=1.0)
        for proc in started.values():
            proc.wait_listening(deadline)
        for name in ("h_prefill", "h_decode"):
            started[name].wait_http_ok("/health", deadline)
        cfg = tmp_path / "scheduler.yaml"
        cfg.write_text(yaml.safe_dump(_config("trtllm-serve", started["h_prefill"], started["h_decode"])))
        argv = [sys.executable, "-m", "baton.cli", "scheduler", "--config", str(cfg), "--port", "0",
                "--reload-interval", "0.2"]
        sched = started["scheduler"] = Proc("scheduler", argv, tmp_path / "scheduler.log")
        sched.wait_listening(deadline, pattern=SCHEDULER_LISTENING)
        sched.wait_http_ok("/readyz", deadline)
        for name in ("t_prefill", "t_decode"):
            started[name].wait_http_ok(started[name].url + "/v2/health/ready", deadline)
        yield started, cfg
    finally:
        stop_all(list(started.values()))


def test_a_runtime_change_in_the_config_file_applies_without_a_restart(procs):
    procs, config_path = procs
    sched = procs["scheduler"]
    pid = sched.proc.pid
    url = sched.url + "/v1/completions"
    long_body = {"model": MODEL, "prompt": prompt_ids(1500, seed=5), "max_tokens": 6}

    status, headers, before = post_json(url, long_body)
    assert status == 200, before
    assert headers["X-Baton-Route"] == "disaggregated"
    assert headers["X-Baton-Decode-Endpoint"] == procs["h_decode"].address

    # a stream in flight on the trtllm-serve (HTTP) engines while the runtime changes
    stream: dict = {}

    def streaming() -> None:
        body = {"model": MODEL, "prompt": prompt_ids(40, seed=6), "max_tokens": 400, "stream": True}
        stream["status"], stream["headers"], stream["raw"] = http("POST", url, body, timeout=60)

    thread = threading.Thread(target=streaming)
    thread.start()

    def decode_active() -> int:
        return sum(r["active"] for r in json.loads(http("GET", sched.url + "/debug/state")[2])["decode"])

    _wait_for(lambda: decode_active() == 1, 10, "the stream to start")

    cfg = _config("triton", procs["t_prefill"], procs["t_decode"])
    config_path.write_text(yaml.safe_dump(cfg))
    _wait_for(lambda: _reloads(sched.url, "applied") == 1, 10, "the new config to apply")
    assert thread.is_alive(), "the stream ended before the reload: it did not test an in-flight stream"

    # the next requests go through the Triton path: local and disaggregated, streamed or not
    status, headers, after = post_json(url, long_body)
    assert status == 200, after
    assert headers["X-Baton-Route"] == "disaggregated"
    assert headers["X-Baton-Prefill-Endpoint"] == procs["t_prefill"].address
    assert headers["X-Baton-Decode-Endpoint"] == procs["t_decode"].address
    assert after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]  # the same simulated model
    assert after["usage"] == before["usage"]
    short = {"model": MODEL, "prompt": prompt_ids(40, seed=8), "max_tokens": 5, "stream": True}
    status, headers, raw = http("POST", url, short)
    assert status == 200 and headers["X-Baton-Decode-Endpoint"] == procs["t_decode"].address
    events = parse_sse(raw)
    assert events[-1] == "[DONE]" and sum(len(e["choices"][0].get("token_ids") or ())
                                          for e in events[:-1] if e["choices"]) == 5

    # (info lines reach the log file within 0.1 s: they are written in batches)
    _wait_for(lambda: "event=engine_client_replaced runtime=triton engine_timeout_s=30 previous=trtllm-serve "
              "in_use=1" in sched.log(), 5, "the engine client to be replaced, with the stream still using the old")
    assert "config_needs_restart" not in sched.log()

    # the stream that started on the old runtime finished there, whole; then the old client was closed
    thread.join(30)
    assert not thread.is_alive()
    assert stream["status"] == 200 and stream["headers"]["X-Baton-Decode-Endpoint"] == procs["h_decode"].address
    events = parse_sse(stream["raw"])
    assert events[-1] == "[DONE]"
    assert sum(len(e["choices"][0].get("token_ids") or ()) for e in events[:-1] if e["choices"]) == 400
    _wait_for(lambda: "event=engine_client_closed runtime=trtllm-serve" in sched.log(), 5, "the old client to close")
    assert sched.proc.pid == pid and sched.proc.poll() is None
    assert http("GET", sched.url + "/readyz")[0] == 200
    assert _reloads(sched.url, "rejected") == 0
