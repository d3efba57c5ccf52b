"""`spec.engine.runtime: triton` on the local cluster: operator -> StatefulSets rendering `tritonserver` ->
the pod runner runs each as the engine simulator behind a real Triton server (PyTriton venv) on the pod's
IP and the container's ports -> the scheduler (runtime triton) reaches them over gRPC and serves a short
prompt locally and a long one through both tiers."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from baton.engine_sim.triton_frontend import WORKSPACE_PREFIX
from cluster_plugin import REPO, load_example, wait_for
from process_harness import alive, session_pids
from test_data_plane import ReadyHistory, _post, _ready_model, _scheduler_ready, _scheduler_url

# The first Triton pod may make the PyTriton venv (triton-venv.sh: 1-2 minutes on a fresh machine).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

MODEL_DIR = REPO / "tests" / "data" / "models" / "llama-3-8b"
PORT = 8000  # the tiers' port: Triton HTTP; gRPC on PORT + 1, metrics on PORT + 2 (as the operator renders them)
SIM_HTTP = re.compile(r"listening on http://\S+ grpc=\S+ sim-http=http://([0-9.]+):(\d+)")


def _triton_harness():
    """tests/triton/triton_harness.py (its /proc listener table), whichever directory pytest started from."""
    if "triton_harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("triton_harness", REPO / "tests" / "triton" / "triton_harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["triton_harness"] = module
        spec.loader.exec_module(module)
    return sys.modules["triton_harness"]


def _triton_workspaces() -> list[Path]:
    """The Triton front ends' workspaces in the temp dir that say which simulator made them."""
    return [p for p in Path(tempfile.gettempdir()).glob(f"{WORKSPACE_PREFIX}*") if p.joinpath("owner").is_file()]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def test_a_triton_model_serves_through_triton_fronted_engines_on_the_local_cluster(cluster, namespace, operator, pod_runner):
    manifest = load_example("small.yaml")
    manifest["metadata"]["name"] = "llama-8b-triton"
    manifest["spec"]["engine"]["runtime"] = "triton"
    manifest["spec"]["model"]["source"] = {"hostPath": {"path": str(MODEL_DIR)}}
    # Low thresholds so a 600-token prompt must take the prefill tier. One replica per tier.
    manifest["spec"]["scheduler"].update({"localPrefillBelowTokens": 100, "alwaysPrefillAtOrAboveTokens": 200})
    # The PyTriton venv made beforehand if this machine has none yet (the same script the runner runs), so
    # that the waits below (and the history's watch) do not include a first install's minutes.
    harness = _triton_harness()
    try:
        harness.triton_python()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    with ReadyHistory(cluster, namespace) as history:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        # the runner runs triton-venv.sh itself on the first Triton pod (it now only prints the python)
        def venv_or_refusal():
            refusals = [c.message for p in cluster.core.list_namespaced_pod(namespace).items
                        for c in p.status.conditions or [] if c.type == "Ready" and c.reason == "CannotRunLocally"]
            return pod_runner.triton_venv.installed or refusals

        outcome = wait_for(venv_or_refusal, 120, interval=0.5,
                           what=f"the PyTriton venv (see {pod_runner.workdir / 'triton-venv.log'})")
        assert outcome == pod_runner.triton_venv.installed, outcome
        wait_for(lambda: _ready_model(cluster, namespace, "llama-8b-triton"), 150,
                 what="the triton model Ready with Triton-fronted engine processes behind it")

    pods = {p.metadata.labels["baton.dev/tier"]: p for p in cluster.core.list_namespaced_pod(
        namespace, label_selector="baton.dev/model=llama-8b-triton").items}
    assert sorted(pods) == ["decode", "prefill", "scheduler"]
    for tier in ("prefill", "decode"):
        pod = pods[tier]
        assert pod.spec.containers[0].command == ["tritonserver"]
        ip = pod.status.pod_ip
        assert ip.startswith("127.")
        # Ready only from the runner's probe of Triton's own /v2/health/ready, and then for good
        states = [(status, reason) for name, status, reason, _ in history.seen if name == pod.metadata.name]
        assert ("False", "ReadinessProbePending") in states, states
        assert {reason for status, reason in states if status == "True"} == {"ProbeSucceeded"}, states
        first_ready = states.index(("True", "ProbeSucceeded"))
        assert all(status == "True" for status, _ in states[first_ready:]), states

        local = pod_runner.processes[f"{namespace}/{pod.metadata.name}"]
        assert "--sim-frontend" in local.argv and local.argv[local.argv.index("--sim-frontend") + 1] == "triton"
        assert local.argv[0] == pod_runner.triton_venv.installed  # the PyTriton venv's python
        # Triton on the container's ports at the pod's IP: KServe v2 HTTP, metrics (gRPC: the requests below)
        assert _get(f"http://{ip}:{PORT}/v2/health/ready")[0] == 200
        # only the tier's own model is loaded (--model-control-mode=explicit --load-model=...)
        served, other = ("context", "generation") if tier == "prefill" else ("generation", "context")
        assert _get(f"http://{ip}:{PORT}/v2/models/{served}/ready")[0] == 200
        assert local.argv[local.argv.index("--sim-triton-models") + 1] == served
        try:
            not_loaded = _get(f"http://{ip}:{PORT}/v2/models/{other}/ready")[0]
        except urllib.error.HTTPError as exc:
            not_loaded = exc.code
        assert not_loaded != 200, f"{other} is loaded on the {tier} pod"
        status, metrics = _get(f"http://{ip}:{PORT + 2}/metrics")
        assert status == 200 and "nv_inference_request_success" in metrics
        # every socket the pod's processes (the simulator, Triton, its Python-backend stubs) listen on is
        # on the pod's own loopback address
        listeners = harness.loopback_listeners(session_pids(local.proc.pid))
        assert {(ip, PORT), (ip, PORT + 1), (ip, PORT + 2)} <= set(listeners), listeners
        assert {addr for addr, _ in listeners} == {ip}, listeners

    url = _scheduler_url(cluster, namespace, "llama-8b-triton")
    assert url.startswith("http://127.")
    wait_for(lambda: _scheduler_ready(url), 60, what="scheduler /readyz (Triton engines healthy over gRPC)")
    prefill_ip, decode_ip = pods["prefill"].status.pod_ip, pods["decode"].status.pod_ip

    def triton_requests(tier: str, request_id: str) -> list[str]:
        """The request types the pod's Triton models received for `request_id` (the simulator's own endpoint,
        whose port the process printed)."""
        log = pod_runner.processes[f"{namespace}/{pods[tier].metadata.name}"].log_path.read_text()
        host, port = SIM_HTTP.search(log).groups()
        _, body = _get(f"http://{host}:{port}/_sim/triton/requests?request_id={request_id}")
        return [r["request_type"] for r in json.loads(body)]

    # Short prompt: context and generation on the decode replica, through Triton's generation model.
    status, headers, body = _post(f"{url}/v1/completions", {"model": "llama-3-8b", "prompt": "Hello there", "max_tokens": 8},
                                  headers={"X-Request-Id": "triton-short"})
    assert status == 200 and headers["X-Baton-Route"] == "local", headers
    assert headers["X-Baton-Decode-Endpoint"] == f"{decode_ip}:{PORT}"
    assert json.loads(body)["usage"]["completion_tokens"] == 8
    assert triton_requests("decode", "triton-short") == ["context_and_generation"]

    # Long prompt: context_only on the prefill replica's Triton, KV pulled by the decode replica.
    status, headers, body = _post(f"{url}/v1/completions", {"model": "llama-3-8b", "prompt": list(range(1, 601)), "max_tokens": 5},
                                  headers={"X-Request-Id": "triton-long"})
    assert status == 200 and headers["X-Baton-Route"] == "disaggregated", headers
    assert headers["X-Baton-Prefill-Endpoint"] == f"{prefill_ip}:{PORT}"
    assert headers["X-Baton-Decode-Endpoint"] == f"{decode_ip}:{PORT}"
    answer = json.loads(body)
    assert answer["usage"]["prompt_tokens"] == 600 and answer["usage"]["completion_tokens"] == 5
    assert triton_requests("prefill", "triton-long") == ["context_only"]
    assert triton_requests("decode", "triton-long") == ["generation_only"]

    # A crashed engine: the whole session goes (the simulator, Triton, its stubs), the pod turns unready
    # with ProcessExited, and the restarted engine binds the same ports again and serves.
    decode = pods["decode"].metadata.name
    session = session_pids(pod_runner.processes[f"{namespace}/{decode}"].proc.pid)
    assert len(session) > 1, session  # Triton runs as the simulator's child

    def decode_ready():
        pod = cluster.core.read_namespaced_pod(decode, namespace)
        return next(c for c in pod.status.conditions if c.type == "Ready")

    killed_pid = pod_runner.processes[f"{namespace}/{decode}"].proc.pid
    workspaces = [p for p in _triton_workspaces() if p.joinpath("owner").read_text().split()[0] == str(killed_pid)]
    assert len(workspaces) == 1, workspaces  # PyTriton's model store, sockets and tritonserver copy (~20 MB)
    pod_runner.kill(namespace, decode)
    wait_for(lambda: decode_ready().reason == "ProcessExited", 30, what="decode pod unready with ProcessExited")
    assert decode_ready().status == "False"
    wait_for(lambda: not any(alive(pid) for pid in session), 15, what="every process of the killed session gone")
    wait_for(lambda: decode_ready().status == "True", 60, what="the restarted Triton engine Ready again")
    status, headers, _ = wait_for(lambda: _post(f"{url}/v1/completions", {"model": "llama-3-8b", "prompt": "Hi again", "max_tokens": 3}),
                                  30, what="the scheduler serving through the restarted engine")
    assert status == 200 and headers["X-Baton-Decode-Endpoint"] == f"{decode_ip}:{PORT}"
    # SIGKILL skipped every cleanup: the restarted engine removed the killed one's workspace
    assert not workspaces[0].exists(), f"{workspaces[0]} of the killed engine is still there"
