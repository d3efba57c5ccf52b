"""Triton's readiness on the engine simulator's Triton front end is strict from the first answer: the server
is never ready while its models are not (as tritonserver with TensorRT-LLM's backend, whose models load
before the server serves), so a readinessProbe on /v2/health/ready, as the operator renders for Triton
pods, never passes early. Its ports are the ones given: HTTP, gRPC and Triton's metrics."""

from __future__ import annotations

import socket
import time
import urllib.error
from pathlib import Path

import pytest
import yaml
from baton.localproc import NO_PROXY_OPENER
from triton_harness import MODEL, MODEL_DIR, REPO, Proc, engine_options

pytestmark = pytest.mark.timeout(1500)  # may install the PyTriton venv (~1.5 minutes on a fresh machine)

HOST = "127.0.0.1"


def free_ports(n: int) -> int:
    """A port P with P..P+n-1 free on HOST."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free port range")


def get(url: str) -> tuple[int, bytes]:
    """Status and body of GET `url` (0 when nothing answers), straight to the process, never via a proxy."""
    try:
        with NO_PROXY_OPENER.open(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def status(url: str) -> int:
    return get(url)[0]


def test_triton_is_not_ready_before_its_models_and_binds_the_ports_given(pytriton_python: str, tmp_path: Path) -> None:
    port = free_ports(3)
    cfg = tmp_path / "decode.yaml"
    cfg.write_text(yaml.safe_dump(engine_options("decode")))
    argv = [pytriton_python, "-m", "baton.cli", "engine-sim", str(MODEL_DIR), "--sim-frontend", "triton",
            "--host", HOST, "--port", str(port), "--sim-triton-grpc-port", str(port + 1),
            "--sim-triton-metrics-port", str(port + 2), "--extra_llm_api_options", str(cfg),
            "--sim-model-name", MODEL]
    proc = Proc("decode", argv, tmp_path / "decode.log", env={"PYTHONPATH": str(REPO / "operator")})
    base = f"http://{HOST}:{port}"
    seen: list[tuple[int, int, int]] = []  # (server ready, context ready, generation ready) whenever the server was
    try:
        deadline = time.monotonic() + 120
        while b"listening on" not in Path(proc.log_path).read_bytes():
            assert proc.proc.poll() is None, proc.tail()
            assert time.monotonic() < deadline, "no listening line within 120 s:\n" + proc.tail()
            if status(base + "/v2/health/ready") == 200:
                # models never unload here: once the server said ready, both must be
                seen.append((200, status(base + "/v2/models/context/ready"), status(base + "/v2/models/generation/ready")))
            time.sleep(0.02)
        proc.wait_listening(deadline)
        assert (proc.port, proc.grpc_port) == (port, port + 1)
        assert all(s == (200, 200, 200) for s in seen), f"ready before its models: {seen}"
        assert status(base + "/v2/health/ready") == 200
        code, metrics = get(f"http://{HOST}:{port + 2}/metrics")
        assert code == 200 and b"nv_inference_request_success" in metrics
    finally:
        proc.stop()
