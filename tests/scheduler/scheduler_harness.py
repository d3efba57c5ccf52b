"""Helpers for the scheduler's end-to-end tests: real `baton engine-sim` and `baton scheduler` processes.

Every process binds port 0 on 127.0.0.1 and reports its port in its log, which goes to a file under the
test's tmp_path (kept for diagnostics). Every wait has a deadline; `stop()` always terminates, then kills.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from baton import kvformat
from baton.localproc import ListeningProcess, baton_command

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "tests" / "data" / "models" / "llama-3-8b"
# The same checkpoint saved in float16: kv_cache_config.dtype auto caches KV in fp16 (TensorRT-LLM's PyTorch
# backend refuses an explicit bf16/fp16 KV dtype, so a tier's KV dtype other than fp8 comes from its checkpoint).
MODEL_DIR_FP16 = REPO / "tests" / "data" / "models" / "llama-3-8b-fp16"
BATON = baton_command()
MODEL = "llama-3-8b"


def engine_options(tier: str, kv_dtype: str = "fp8", **extra: Any) -> dict[str, Any]:
    """LLM-API options of an engine; kv_dtype is kv_cache_config.dtype: "fp8" or "auto" (the checkpoint's)."""
    options: dict[str, Any] = {
        "cache_transceiver_config": {"backend": "UCX"},
        "kv_cache_config": {"dtype": kv_dtype, "tokens_per_block": 32},
    }
    if tier == "prefill":
        options["disable_overlap_scheduler"] = True
    options.update(extra)
    return options


class Proc(ListeningProcess):
    """A `baton` child process (own session, log file under the test's tmp_path, port from its log)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(name, argv, log_path, cwd=REPO,
                         env=None if env is None else dict(os.environ, PYTHONUNBUFFERED="1", **env))
        self.config_path: Path | None = None  # a scheduler's config file, for the reload tests

    def stop(self, timeout: float = 8.0) -> None:
        super().stop(timeout)


def start_engine(tmp: Path, name: str, tier: str, sim_speed: float = 0.05, kv_dtype: str = "fp8",
                 extra_args: list[str] | None = None, model_dir: Path = MODEL_DIR, **options: Any) -> Proc:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(engine_options(tier, kv_dtype, **options)))
    argv = [*BATON, "engine-sim", str(model_dir), "--host", "127.0.0.1", "--port", "0",
            "--extra_llm_api_options", str(cfg), "--sim-speed", str(sim_speed), "--sim-model-name", MODEL,
            *(extra_args or [])]
    return Proc(name, argv, tmp / f"{name}.log")


def same_weights_args(model_dir: Path = MODEL_DIR) -> list[str]:
    """--sim-model-identity naming `model_dir`'s checkpoint: for an engine started on a copy of it that differs
    only in its dtype (MODEL_DIR_FP16), so that the KV dtype is the only field its CacheState differs in."""
    return ["--sim-model-identity", kvformat.checkpoint_identity(model_dir)]


def start_scheduler(tmp: Path, name: str, config: dict[str, Any], extra_args: list[str] | None = None,
                    env: dict[str, str] | None = None) -> Proc:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    argv = [*BATON, "scheduler", "--config", str(cfg), "--port", "0", "--reload-interval", "0.2",
            *(extra_args or [])]
    proc = Proc(name, argv, tmp / f"{name}.log", env)
    proc.config_path = cfg
    return proc


def wait_all(procs: list[Proc], ready_path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait_listening(deadline)
    for p in procs:
        p.wait_http_ok(ready_path, deadline)


def scheduler_config(prefill: list[Proc], decode: list[Proc], **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": MODEL,
        "endpoints": {"discovery": "static",
                      "static": {"prefill": [p.address for p in prefill], "decode": [d.address for d in decode]}},
        "routing": {"localPrefillBelowTokens": 256, "alwaysPrefillAtOrAboveTokens": 1024},
        "heartbeatSeconds": 0.5,
        "server": {"host": "127.0.0.1", "port": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


# ------------------------------------------------------------------------------ HTTP helpers
def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def post(url: str, body: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = http("POST", url, body, **kw)
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw


def parse_sse(raw: bytes) -> list[Any]:
    events = []
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if block.startswith(b"data:"):
            payload = block[5:].strip()
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def stream_text(events: list[Any]) -> tuple[str, list[int]]:
    text, ids = [], []
    for ev in events:
        if ev == "[DONE]":
            continue
        for choice in ev.get("choices", []):
            text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            ids.extend(choice.get("token_ids") or [])
    return "".join(text), ids


def metrics(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (label order as exposed)."""
    _, _, raw = http("GET", url + "/metrics")
    out: dict[str, float] = {}
    for line in raw.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def perf(engine: Proc) -> list[dict[str, Any]]:
    _, _, raw = http("GET", engine.url + "/perf_metrics")
    return json.loads(raw)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def _post_many(url: str, bodies: list[Any], timeout: float) -> list[tuple[int, dict[str, str], bytes]]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(body: Any) -> tuple[int, dict[str, str], bytes]:
            async with session.post(url, json=body) as resp:
                return resp.status, dict(resp.headers), await resp.read()

        return await asyncio.gather(*(one(b) for b in bodies))


def post_concurrently(url: str, bodies: list[Any], timeout: float = 60.0) -> list[tuple[int, dict[str, str], bytes]]:
    return asyncio.run(_post_many(url, bodies, timeout))


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [1000 + (seed * 7919 + i * 31) % 29000 for i in range(n)]
