"""Helpers for the engine-simulator tests: real `baton engine-sim` processes on 127.0.0.1.

Every process is started through `EngineProcs.start(...)`, which waits for /health (with a deadline); the
fixtures in conftest.py stop them all in their finalizers, whatever the test did.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests" / "data" / "models"
LLAMA_8B = MODELS / "llama-3-8b"
LLAMA_70B = MODELS / "llama-3-70b"
LLAMA_8B_FP16 = MODELS / "llama-3-8b-fp16"  # torch_dtype float16: kv_cache_config.dtype auto caches fp16
START_DEADLINE_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_yaml(*, ctx: bool, dtype: str | None = "auto", tokens_per_block: int = 32, backend: str | None = "UCX",
                timeout_ms: int | None = None, model_dtype: str | None = None, **extra) -> dict:
    """LLM-API options of a ctx (overlap scheduler off) or gen (overlap on) worker. `dtype` is
    kv_cache_config.dtype: "auto" (the checkpoint's dtype, bf16 for the test models) or "fp8", as the PyTorch
    backend accepts; None leaves it unset (TensorRT-LLM's default, auto). `model_dtype` is the top-level
    `dtype` (the model dtype, e.g. "float16"), left unset when None."""
    opts: dict = {"kv_cache_config": {"tokens_per_block": tokens_per_block}}
    if model_dtype is not None:
        opts["dtype"] = model_dtype
    if dtype is not None:
        opts["kv_cache_config"]["dtype"] = dtype
    if backend is not None:
        opts["cache_transceiver_config"] = {"backend": backend}
        if timeout_ms is not None:
            opts["cache_transceiver_config"]["kv_transfer_timeout_ms"] = timeout_ms
    if ctx:
        opts["disable_overlap_scheduler"] = True
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(opts.get(key), dict):
            opts[key].update(value)
        else:
            opts[key] = value
    return opts


SERVED_MODEL = "llama-3-8b"
NO_MODEL = "model"  # a key of the body that, set to this, sends the request without `model`


def with_model(path: str, body: object) -> object:
    """An OpenAI request as clients send it: with `model` (trtllm-serve requires it), unless the test asks
    for none (`{"model": NO_MODEL}` sends no `model` key)."""
    if not (path.startswith("/v1/") and isinstance(body, dict)):
        return body
    if body.get("model") is NO_MODEL:
        return {k: v for k, v in body.items() if k != "model"}
    return body if "model" in body else {"model": SERVED_MODEL, **body}


class Engine:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- plain HTTP
    def request(self, method: str, path: str, body: object = None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, object]:
        body = with_model(path, body)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw) if raw else ""
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> tuple[int, object]:
        return self.request("GET", path)

    def post(self, path: str, body: object, headers: dict | None = None) -> tuple[int, object]:
        return self.request("POST", path, body, headers)

    def complete(self, body: dict, path: str = "/v1/completions", headers: dict | None = None) -> dict:
        status, data = self.post(path, body, headers)
        assert status == 200, (status, data)
        return data  # type: ignore[return-value]

    def stream(self, body: dict, path: str = "/v1/completions", headers: dict | None = None) -> tuple[int, list]:
        """POST with stream=true; returns (status, [parsed data chunks..., "[DONE]"]) or (status, error body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", path, json.dumps(with_model(path, {**body, "stream": True})),
                         {"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            if resp.status != 200:
                return resp.status, json.loads(resp.read())
            assert resp.getheader("Content-Type", "").startswith("text/event-stream")
            chunks: list = []
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                chunks.append(payload if payload == "[DONE]" else json.loads(payload))
            return 200, chunks
        finally:
            conn.close()

    def state(self) -> dict:
        status, data = self.get("/_sim/state")
        assert status == 200
        return data  # type: ignore[return-value]

    def wait_for(self, predicate, what: str, deadline_s: float = 10.0, interval: float = 0.02):
        end = time.monotonic() + deadline_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
            time.sleep(interval)


class EngineProcs:
    """Starts simulator processes and guarantees they are stopped."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.count = 0

    def launch(self, options: dict | None, *args: str, model: Path = LLAMA_8B, env: dict | None = None,
               port: int | None = None) -> tuple[subprocess.Popen, int, Path]:
        self.count += 1
        port = port or free_port()
        cmd = [sys.executable, "-m", "baton.cli", "engine-sim", str(model), "--host", "127.0.0.1", "--port", str(port)]
        if options is not None:
            cfg = self.tmp / f"engine-{self.count}.yaml"
            cfg.write_text(yaml.safe_dump(options))
            cmd += ["--config", str(cfg)]
        cmd += list(args)
        log_path = self.tmp / f"engine-{self.count}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRTLLM_USE_")}
        full_env.update(env or {})
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, cwd=self.tmp)
        self.procs.append(proc)
        return proc, port, log_path

    def start(self, options: dict | None, *args: str, **kw) -> Engine:
        proc, port, log_path = self.launch(options, *args, **kw)
        engine = Engine(proc, port, log_path)
        end = time.monotonic() + START_DEADLINE_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"engine-sim exited with {proc.returncode}:\n{engine.log()}")
            try:
                with urllib.request.urlopen(engine.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return engine
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > end:
                raise AssertionError(f"engine-sim did not become healthy in {START_DEADLINE_S}s:\n{engine.log()}")
            time.sleep(0.05)

    def run_to_exit(self, options: dict | None, *args: str, timeout: float = 20.0, **kw) -> tuple[int, str]:
        """Start a worker expected to fail at startup; returns (exit code, output)."""
        proc, _, log_path = self.launch(options, *args, **kw)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"engine-sim did not exit:\n{log_path.read_text(errors='replace')}") from None
        return code, log_path.read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def text_of(response: dict) -> str:
    choice = response["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def stream_text(chunks: list) -> str:
    out = []
    for chunk in chunks:
        if chunk == "[DONE]" or not chunk.get("choices"):
            continue
        choice = chunk["choices"][0]
        out.append(choice.get("text") if "text" in choice else choice["delta"].get("content", ""))
    return "".join(out)


def handoff(ctx: Engine, gen: Engine, body: dict, *, stream: bool = False, path: str = "/v1/completions"):
    """Do what the router does: context_only on ctx, then generation_only on gen with prompt_token_ids."""
    ctx_body = {**body, "stream": False, "disaggregated_params": {"request_type": "context_only"}}
    ctx_resp = ctx.complete(ctx_body, path)
    params = dict(ctx_resp["choices"][0]["disaggregated_params"])
    params["request_type"] = "generation_only"
    gen_body = {**body, "disaggregated_params": params}
    if path.endswith("/completions") and "chat" not in path:
        gen_body["prompt"] = ctx_resp["prompt_token_ids"]
    else:
        gen_body["prompt_token_ids"] = ctx_resp["prompt_token_ids"]
    if stream:
        return ctx_resp, gen.stream(gen_body, path)
    return ctx_resp, gen.post(path, gen_body)


def sim_config(tmp: Path, *args: str, ctx: bool, speed: str = "1", **options):
    """The SimConfig of a worker built in this process (`baton.engine_sim.engine.Engine(sim_config(...))`), with
    `worker_yaml(ctx=ctx, **options)` as its LLM-API options and `args` on its command line."""
    from baton.engine_sim.config import load_config

    path = tmp / f"sim-{'ctx' if ctx else 'gen'}-{abs(hash((repr(options), args)))}.yaml"
    path.write_text(yaml.safe_dump(worker_yaml(ctx=ctx, **options)))
    return load_config([str(LLAMA_8B), "--host", "127.0.0.1", "--port", "0", "--config", str(path),
                        "--sim-speed", speed, *args], env={})
