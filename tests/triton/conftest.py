"""Fixtures for the Triton runtime's end-to-end tests (Triton-fronted simulators and a real scheduler)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from triton_harness import (
    MODEL_DIR_FP16,
    SCHEDULER_LISTENING,
    Proc,
    start_http_engine,
    start_scheduler,
    start_triton_engine,
    stop_all,
    triton_python,
)

START_TIMEOUT_S = 120.0  # three Triton servers starting at once on 2 cores take ~20 s


@pytest.fixture(scope="session")
def pytriton_python() -> str:
    """The PyTriton venv (made by triton-venv.sh on first use). Never skipped: a failed install fails."""
    try:
        return triton_python()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


class Deployment:
    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs

    def __getitem__(self, name: str) -> Proc:
        return self.procs[name]


@pytest.fixture(scope="module")
def deployment(pytriton_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """prefill (fp8 KV, overlap off), decode (fp8) and decode_fp16 behind Triton; `reference`, a plain
    HTTP simulator configured like decode; `scheduler` (prefill -> decode) and `scheduler_fp16`
    (prefill -> decode_fp16), both `runtime: triton`."""
    tmp = tmp_path_factory.mktemp("triton")
    procs: dict[str, Proc] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        procs["prefill"] = start_triton_engine(pytriton_python, tmp, "prefill", "prefill")
        procs["decode"] = start_triton_engine(pytriton_python, tmp, "decode", "decode")
        # fp16 KV: kv_cache_config.dtype auto on the float16 copy of the checkpoint
        procs["decode_fp16"] = start_triton_engine(pytriton_python, tmp, "decode_fp16", "decode", kv_dtype="auto",
                                                   model_dir=MODEL_DIR_FP16)
        procs["reference"] = start_http_engine(tmp, "reference", "decode")
        for name in ("prefill", "decode", "decode_fp16", "reference"):
            procs[name].wait_listening(deadline)
        for name in ("prefill", "decode", "decode_fp16"):
            procs[name].wait_http_ok(procs[name].url + "/v2/health/ready", deadline)
        procs["reference"].wait_http_ok(procs["reference"].url + "/health", deadline)
        procs["scheduler"] = start_scheduler(tmp, "scheduler", [procs["prefill"]], [procs["decode"]])
        procs["scheduler_fp16"] = start_scheduler(tmp, "scheduler_fp16", [procs["prefill"]], [procs["decode_fp16"]])
        for name in ("scheduler", "scheduler_fp16"):
            procs[name].wait_listening(deadline, pattern=SCHEDULER_LISTENING)
            procs[name].wait_http_ok(procs[name].url + "/readyz", deadline)
        yield Deployment(procs)
    finally:
        stop_all(list(procs.values()))
