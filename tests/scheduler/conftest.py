"""Fixtures for the scheduler's end-to-end tests (real engine-sim and scheduler processes on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scheduler_harness import (
    MODEL_DIR_FP16,
    Proc,
    same_weights_args,
    scheduler_config,
    start_engine,
    start_scheduler,
    wait_all,
)

# Shared engines: decode steps take ~1 ms (llama-3-8b at --sim-speed 0.2), so 1,000 tokens last ~1 s.
POOL_SPEED = 0.2


class Pool:
    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs

    def __getitem__(self, name: str) -> Proc:
        return self.procs[name]


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One prefill and two decode replicas (fp8 KV), plus a decode replica with an fp16 KV cache."""
    tmp = tmp_path_factory.mktemp("engines")
    procs: dict[str, Proc] = {}
    try:
        procs["prefill"] = start_engine(tmp, "prefill", "prefill", POOL_SPEED)
        procs["decode1"] = start_engine(tmp, "decode1", "decode", POOL_SPEED)
        procs["decode2"] = start_engine(tmp, "decode2", "decode", POOL_SPEED)
        # fp16 KV: kv_cache_config.dtype auto on the float16 copy of the checkpoint (same weights identity)
        procs["decode_fp16"] = start_engine(tmp, "decode_fp16", "decode", POOL_SPEED, kv_dtype="auto",
                                            model_dir=MODEL_DIR_FP16, extra_args=same_weights_args())
        wait_all(list(procs.values()), "/health")
        yield Pool(procs)
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture
def make_scheduler(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start a real `baton scheduler` process for the given tiers; stopped after the test."""
    started: list[Proc] = []

    def make(prefill: list[Proc], decode: list[Proc], name: str = "scheduler", extra_args: list[str] | None = None,
             env: dict[str, str] | None = None, **sections: Any) -> Proc:
        proc = start_scheduler(tmp_path, name, scheduler_config(prefill, decode, **sections), extra_args, env)
        started.append(proc)
        wait_all([proc], "/readyz")
        return proc

    yield make
    for proc in started:
        proc.stop()
