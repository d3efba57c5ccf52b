"""Startup checks (TensorRT-LLM's messages and Baton's stricter rules), command-line aliases, health states."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import pytest
from simproc import LLAMA_70B, LLAMA_8B, worker_yaml

from baton import kvformat


@pytest.mark.parametrize(
    ("options", "args", "expected"),
    [
        pytest.param(worker_yaml(ctx=True, backend=None), (), kvformat.TRANSCEIVER_DISABLED_MESSAGE,
                     id="no-cache_transceiver_config"),
        pytest.param({**worker_yaml(ctx=True), "cache_transceiver_config": {"max_tokens_in_buffer": 8192}}, (),
                     kvformat.TRANSCEIVER_DISABLED_MESSAGE, id="transceiver-without-backend"),
        pytest.param(None, (), kvformat.TRANSCEIVER_DISABLED_MESSAGE, id="no-yaml-at-all"),
        pytest.param(worker_yaml(ctx=True, dtype="auto"), (), "Baton requires an explicit KV cache dtype",
                     id="dtype-auto"),
        pytest.param(worker_yaml(ctx=True), ("--tp_size", "3"), "TP per DP group must be a power of two",
                     id="tp-3"),
        pytest.param(worker_yaml(ctx=True, context_parallel_size=2), (),
                     "context parallelism is not currently supported", id="cp-non-mla"),
        pytest.param(worker_yaml(ctx=True, max_beam_width=2), (), "only beam width 1 is supported", id="beam-2"),
        pytest.param(worker_yaml(ctx=True), ("--backend", "trt"), "models the pytorch backend", id="trt-backend"),
    ],
)
def test_startup_failures(fresh_engines, options, args, expected):
    code, output = fresh_engines.run_to_exit(options, *args)
    assert code == 1
    assert expected in output


def test_trtllm_transceiver_message_is_verbatim(fresh_engines):
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=False, backend=None))
    assert code == 1
    assert ("kv_cache_transceiver is disabled, please set 'cache_transceiver_config: backend:<backend_type>` "
            "in config file for disaggregated serving") in output


def test_model_that_does_not_fit_is_refused(fresh_engines):
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=True), model=LLAMA_70B)
    assert code == 1 and "do not fit" in output


def test_missing_model_config(fresh_engines, tmp_path):
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=True), model=tmp_path)
    assert code == 1 and "config.json" in output


def test_usage_error_exits_2(fresh_engines):
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=True), "--sim-no-such-flag")
    assert code == 2 and "unrecognized arguments" in output


def test_extra_llm_api_options_and_default_backend_resolution(fresh_engines, tmp_path):
    import yaml

    cfg = tmp_path / "opts.yaml"
    cfg.write_text(yaml.safe_dump(worker_yaml(ctx=True, backend="DEFAULT")))
    ucx = fresh_engines.start(None, "--extra_llm_api_options", str(cfg), "--sim-speed", "0",
                              env={"TRTLLM_USE_UCX_KVCACHE": "1"})
    nixl = fresh_engines.start(None, "--extra_llm_api_options", str(cfg), "--sim-speed", "0")
    assert ucx.state()["cache_state"]["transfer_backend"] == "UCX"
    assert nixl.state()["cache_state"]["transfer_backend"] == "NIXL"  # 1.2.0's built-in default
    assert ucx.state()["fingerprint"] != nixl.state()["fingerprint"]


def test_tp_size_and_capacity_reported(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=False, kv_cache_config={"max_tokens": 4096}), "--tp_size", "2",
                              "--sim-speed", "0", model=LLAMA_70B)
    state = eng.state()
    assert state["cache_state"]["tp"] == 2 and state["tp_speedup"] == pytest.approx(1.7)
    assert state["max_blocks"] == 4096 // 32
    assert state["kv_bytes_per_token"] == 327_680 and state["timing_model"] == "llama3-70b"


def test_loading_then_ready(fresh_engines):
    proc, port, _ = fresh_engines.launch(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-load-seconds", "1.5")
    url = f"http://127.0.0.1:{port}/health"
    saw_loading = False
    end = time.monotonic() + 20
    while time.monotonic() < end:
        assert proc.poll() is None
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except urllib.error.HTTPError as err:
            assert err.code == 503
            saw_loading = True
        except OSError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("worker never became ready")
    assert saw_loading


def test_fatal_state_and_fault_injection(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-fail-after", "2")
    assert eng.post("/v1/completions", {"prompt": "one", "max_tokens": 2})[0] == 200
    assert eng.post("/v1/completions", {"prompt": "two", "max_tokens": 2})[0] == 200
    eng.wait_for(lambda: eng.get("/health")[0] == 503, "the injected fatal state")
    status, err = eng.post("/v1/completions", {"prompt": "three", "max_tokens": 2})
    assert status == 503 and err["type"] == "ServiceUnavailableError"

    other = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0")
    assert other.post("/_sim/fatal", {"reason": "GPU fell off the bus"})[0] == 200
    status, body = other.get("/health")
    assert status == 503 and "GPU fell off the bus" in body


def test_error_ratio_fails_that_share_of_requests_while_health_stays_ok(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-error-ratio", "0.25")
    statuses = [eng.post("/v1/completions", {"prompt": f"p{i}", "max_tokens": 2}) for i in range(8)]
    failed = [body for status, body in statuses if status == 500]
    assert [status for status, _ in statuses].count(200) == 6 and len(failed) == 2
    assert all(b["type"] == "InternalServerError" and "--sim-error-ratio" in b["message"] for b in failed)
    assert eng.get("/health")[0] == 200


def test_sigterm_exits_cleanly(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0")
    assert re.search(r"listening on http://127\.0\.0\.1:\d+", eng.log())
    eng.proc.send_signal(signal.SIGTERM)
    assert eng.proc.wait(timeout=15) == 0


def test_port_zero_picks_a_free_port(fresh_engines):
    proc, _, log_path = fresh_engines.launch(worker_yaml(ctx=True), "--sim-speed", "0", port=0)
    end = time.monotonic() + 20
    match = None
    while time.monotonic() < end and match is None:
        assert proc.poll() is None, log_path.read_text()
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        time.sleep(0.05)
    assert match and int(match.group(1)) > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/version", timeout=5) as resp:
        assert resp.status == 200


def test_model_identity_and_name_options(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-model-name", "llama",
                              "--sim-model-identity", "hf:meta-llama/Meta-Llama-3-8B@main")
    assert [m["id"] for m in eng.get("/v1/models")[1]["data"]] == ["llama"]
    state = eng.state()
    assert state["cache_state"]["model_identity"] == "hf:meta-llama/Meta-Llama-3-8B@main"
    expected = kvformat.cache_state_from_files(LLAMA_8B, worker_yaml(ctx=True), trtllm_version="1.2.0", env={},
                                               model_identity="hf:meta-llama/Meta-Llama-3-8B@main")
    assert state["fingerprint"] == kvformat.fingerprint(expected)
