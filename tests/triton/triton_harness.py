"""Helpers for the Triton runtime's end-to-end tests: real processes on 127.0.0.1 only.

- `triton_python()` runs operator/baton/engine_sim/triton-venv.sh (creates the PyTriton venv from Debian's
  /usr/bin/python3.11 once per machine, then only prints its python) and returns that python.
- `Proc` starts a child in its own session with its output in a log file, learns its port from its
  "listening" line, and `stop()` always terminates the whole session (SIGTERM, then SIGKILL).
Every wait has a deadline.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from baton import kvformat
from baton.localproc import ListeningProcess
from process_harness import session_pids

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "tests" / "data" / "models" / "llama-3-8b"
# The same checkpoint saved in float16: kv_cache_config.dtype auto caches KV in fp16 (TensorRT-LLM's PyTorch
# backend refuses an explicit bf16/fp16 KV dtype, so a tier's KV dtype other than fp8 comes from its checkpoint).
MODEL_DIR_FP16 = REPO / "tests" / "data" / "models" / "llama-3-8b-fp16"
MODEL = "llama-3-8b"
INSTALLER = REPO / "operator" / "baton" / "engine_sim" / "triton-venv.sh"
INSTALL_TIMEOUT_S = 1200.0

_SIM_RE = re.compile(rb"listening on http://[^:\s]+:(\d+)(?: grpc=[^:\s]+:(\d+) sim-http=http://[^:\s]+:(\d+))?")
SCHEDULER_LISTENING = re.compile(rb"event=listening url=http://[^:\s]+:(\d+)")


def triton_python() -> str:
    """The PyTriton venv's python (installed on first use; the install's output is in the failure message)."""
    try:
        done = subprocess.run(["bash", str(INSTALLER), str(REPO)], capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"triton-venv.sh did not finish in {INSTALL_TIMEOUT_S:.0f}s:\n{exc.stderr}") from None
    if done.returncode != 0:
        raise RuntimeError(f"triton-venv.sh failed ({done.returncode}):\n{done.stderr[-5000:]}")
    python = done.stdout.strip().splitlines()[-1]
    if not os.access(python, os.X_OK):
        raise RuntimeError(f"triton-venv.sh printed {python!r}, not an executable")
    return python


def engine_options(tier: str, kv_dtype: str = "fp8") -> dict[str, Any]:
    """LLM-API options of an engine; kv_dtype is kv_cache_config.dtype: "fp8" or "auto" (the checkpoint's)."""
    options: dict[str, Any] = {
        "cache_transceiver_config": {"backend": "UCX"},
        "kv_cache_config": {"dtype": kv_dtype, "tokens_per_block": 32},
    }
    if tier == "prefill":
        options["disable_overlap_scheduler"] = True
    return options


class Proc(ListeningProcess):
    """A child process in a session of its own; an engine simulator with the Triton front end also reports
    its gRPC port and its own HTTP port ("sim-http") on its 'listening' line."""

    listening = _SIM_RE
    poll_s = 0.1

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRTLLM_USE_")}
        full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
        super().__init__(name, argv, log_path, env=full_env, cwd=log_path.parent)
        self.grpc_port: int | None = None
        self.sim_port: int | None = None

    def on_listening(self, match: re.Match[bytes]) -> None:
        self.port = int(match.group(1))
        if match.re is _SIM_RE and match.group(2):
            self.grpc_port, self.sim_port = int(match.group(2)), int(match.group(3))

    @property
    def sim_url(self) -> str:
        """The Triton-fronted simulator's own HTTP endpoint (/_sim/state, /perf_metrics, KV pulls)."""
        return f"http://127.0.0.1:{self.sim_port}"

    def wait_listening(self, deadline: float, pattern: re.Pattern[bytes] = _SIM_RE) -> None:
        self.listening = pattern
        super().wait_listening(deadline)

    def session_pids(self) -> list[int]:
        """This process and every process in its session (Triton, its Python-backend stubs)."""
        return session_pids(self.proc.pid)

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM to the session, wait, then SIGKILL whatever is left of it (Triton's children too)."""
        super().stop(timeout)


def stop_all(procs: list[Proc]) -> None:
    """Stop processes in parallel (a Triton server takes a few seconds to unload its models)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop()


def start_triton_engine(python: str, tmp: Path, name: str, tier: str, kv_dtype: str = "fp8",
                        sim_speed: float = 0.1, model_dir: Path = MODEL_DIR, extra: tuple[str, ...] = ()) -> Proc:
    """A Triton-fronted engine. On another `model_dir` than MODEL_DIR (MODEL_DIR_FP16: the same checkpoint in
    float16) the engine names MODEL_DIR's weights (--sim-model-identity), so that a KV dtype that `auto`
    resolves differently is the only field its CacheState differs in."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(engine_options(tier, kv_dtype)))
    argv = [python, "-m", "baton.cli", "engine-sim", str(model_dir), "--sim-frontend", "triton",
            "--host", "127.0.0.1", "--port", "0", "--extra_llm_api_options", str(cfg),
            "--sim-speed", str(sim_speed), "--sim-model-name", MODEL]
    if model_dir != MODEL_DIR:
        argv += ["--sim-model-identity", kvformat.checkpoint_identity(MODEL_DIR)]
    argv += extra
    # PYTHONPATH: this checkout's code, whichever clone the shared venv's editable install points at
    return Proc(name, argv, tmp / f"{name}.log", env={"PYTHONPATH": str(REPO / "operator")})


def start_http_engine(tmp: Path, name: str, tier: str, kv_dtype: str = "fp8", sim_speed: float = 0.1,
                      model_dir: Path = MODEL_DIR) -> Proc:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(engine_options(tier, kv_dtype)))
    argv = [sys.executable, "-m", "baton.cli", "engine-sim", str(model_dir), "--host", "127.0.0.1", "--port", "0",
            "--extra_llm_api_options", str(cfg), "--sim-speed", str(sim_speed), "--sim-model-name", MODEL]
    if model_dir != MODEL_DIR:
        argv += ["--sim-model-identity", kvformat.checkpoint_identity(MODEL_DIR)]
    return Proc(name, argv, tmp / f"{name}.log")


def start_scheduler(tmp: Path, name: str, prefill: list[Proc], decode: list[Proc],
                    extra: dict[str, Any] | None = None) -> Proc:
    config = {
        "model": MODEL,
        "runtime": "triton",
        "endpoints": {"discovery": "static", "static": {"prefill": [p.address for p in prefill],
                                                         "decode": [d.address for d in decode]}},
        "routing": {"localPrefillBelowTokens": 256, "alwaysPrefillAtOrAboveTokens": 1024},
        "heartbeatSeconds": 0.5,
        "engineTimeoutSeconds": 30,
        "server": {"host": "127.0.0.1", "port": 0},
        **(extra or {}),
    }
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "baton.cli", "scheduler", "--config", str(cfg), "--port", "0"]
    return Proc(name, argv, tmp / f"{name}.log")


# ------------------------------------------------------------------------------ HTTP helpers
def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    status, hdrs, raw = http("POST", url, body, headers)
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


def get_json(url: str) -> Any:
    status, _, raw = http("GET", url)
    assert status == 200, (url, status, raw[:500])
    return json.loads(raw)


def parse_sse(raw: bytes) -> list[Any]:
    events = []
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if block.startswith(b"data:"):
            payload = block[5:].strip()
            events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def without_ids(events: list[Any]) -> list[Any]:
    """SSE events without the fields that legitimately differ between two answers (id, created)."""
    return [{k: v for k, v in e.items() if k not in ("id", "created")} if isinstance(e, dict) else e for e in events]


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [1000 + (seed * 7919 + i * 31) % 29000 for i in range(n)]


def loopback_listeners(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by `pids` (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            # the kernel prints each 32-bit word of the address in host (little-endian) byte order
            raw = b"".join(bytes.fromhex(addr_hex[i:i + 8])[::-1] for i in range(0, len(addr_hex), 8))
            ip = ipaddress.ip_address(raw)
            if v6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 (gRPC binds IPv4 this way)
                ip = ip.ipv4_mapped
            addr = str(ip)
            found.append((addr, int(port_hex, 16)))
    return found
