"""The pod runner's stand-in for Triton tier pods (`spec.engine.runtime: triton`), against a fake API (no
cluster): the `tritonserver` container the operator renders becomes the engine simulator behind Triton
(`--sim-frontend triton`) on the pod's IP and the container's ports, with the tier's engine ConfigMap and the
hostPath checkpoint, run by the PyTriton venv's python, which is made (once, in the background) only when a
Triton pod appears; a failed install leaves the pod unready with what to do."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from baton.engine_sim import config as sim_config
from baton.engine_sim import main as sim_main
from baton.engine_sim import triton_frontend
from baton.podrunner.runner import OPERATOR_DIR, PodRunner, tritonserver_options
from baton.render import render_children
from baton.render.naming import Target
from baton.scheduler.config import parse_config
from baton.scheduler.endpoints import Endpoint
from baton.scheduler.engines import grpc_address
from example_models import example_model
from kubernetes.client import V1Pod
from test_podrunner_sync import FakeCore, make_runner, scheduler_pod

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "tests" / "data" / "models" / "llama-3-8b"
VENV_PYTHON = "/opt/pytriton-venv/bin/python"  # never run: these runners start no process


def rendered(source: dict | None = None, **spec: Any) -> list[dict]:
    """The children the operator renders for small.yaml with `engine.runtime: triton` (and `spec` fields set)."""
    m = example_model("small.yaml", engine__runtime="triton",
                      model__source=source or {"hostPath": {"path": str(MODEL_DIR)}}, **spec)
    return render_children(Target(name=m.metadata["name"], namespace="ns", uid="uid-1", spec=m.spec))


def triton_pod(objects: list[dict], tier: str, ip: str, name: str | None = None,
               edit: Callable[[dict], None] | None = None) -> V1Pod:
    """A Running pod of the tier's StatefulSet, as the API server would show it."""
    sts = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["labels"]["app.kubernetes.io/component"] == tier)
    template = yaml.safe_load(yaml.safe_dump(sts["spec"]["template"]))
    if edit:
        edit(template["spec"]["containers"][0])
    return V1Pod.from_dict({
        "metadata": {**template["metadata"], "name": name or f"{sts['metadata']['name']}-0", "namespace": "ns",
                     "uid": f"uid-{tier}-{ip}"},
        "spec": template["spec"],
        "status": {"phase": "Running", "podIP": ip}})


def fake_core(objects: list[dict], *pods: V1Pod) -> FakeCore:
    core = FakeCore()
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            core.cms[("ns", obj["metadata"]["name"])] = obj["data"]
    core.pods = list(pods)
    return core


def argv_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def sync_until(runner: PodRunner, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        runner.sync()
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_tritonserver_container_becomes_the_engine_simulator_behind_triton(tmp_path: Path) -> None:
    objects = rendered()
    pods = {tier: triton_pod(objects, tier, ip) for tier, ip in (("prefill", "127.64.0.7"), ("decode", "127.64.0.9"))}
    core = fake_core(objects, *pods.values())
    runner = make_runner(tmp_path, core, triton_python=VENV_PYTHON, sim_args=["--sim-speed", "0.05"])
    runner.sync()

    scheduler = parse_config(next(o for o in objects if o["kind"] == "ConfigMap"
                                  and o["metadata"]["name"].endswith("-scheduler"))["data"]["config.yaml"])
    assert scheduler.runtime == "triton"
    for tier, pod in pods.items():
        container = pod.spec.containers[0]
        assert container.command == ["tritonserver"]  # what the operator renders for runtime: triton
        local = runner.processes[f"ns/{pod.metadata.name}"]
        ip = pod.status.pod_ip
        config_file = Path(argv_value(local.argv, "--extra_llm_api_options"))
        assert local.argv == [
            VENV_PYTHON, "-m", "baton.cli", "engine-sim", str(MODEL_DIR), "--sim-frontend", "triton",
            "--host", ip, "--port", "8000", "--sim-triton-grpc-port", "8001", "--sim-triton-metrics-port", "8002",
            # --model-control-mode=explicit --load-model=<the tier's model>: only that one is loaded
            "--sim-triton-models", {"prefill": "context", "decode": "generation"}[tier],
            "--extra_llm_api_options", str(config_file), "--sim-speed", "0.05", "--sim-trtllm-version", "1.2.0",
            "--sim-model-name", "/models",
        ], tier
        # the tier's engine options: the ConfigMap mounted at /etc/baton/engine, as for trtllm-serve
        engine_cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(f"llama-8b-{tier}-engine"))
        assert config_file.is_relative_to(runner.workdir) and config_file.read_text() == engine_cm["data"]["config.yaml"]
        assert yaml.safe_load(config_file.read_text())["disable_overlap_scheduler"] is (tier == "prefill")
        # the scheduler (runtime triton) reaches the replica's gRPC where this Triton listens
        endpoint = Endpoint(address=f"{ip}:{scheduler.endpoints.kubernetes.tier_port(tier)}", tier=tier)
        assert grpc_address(endpoint) == f"{ip}:{argv_value(local.argv, '--sim-triton-grpc-port')}"
        assert local.probe_url == f"http://{ip}:8000/v2/health/ready"  # the container's readinessProbe
        assert local.env["PYTHONPATH"].split(":")[0] == str(OPERATOR_DIR)  # this checkout's code
        assert local.env["POD_IP"] == ip
    assert runner.unrunnable == {} and runner.triton_venv.installs == 0


def test_the_translated_command_line_is_one_the_triton_front_end_accepts(tmp_path: Path) -> None:
    objects = rendered()
    pod = triton_pod(objects, "prefill", "127.64.0.7")
    runner = make_runner(tmp_path, fake_core(objects, pod), triton_python=VENV_PYTHON)
    runner.sync()
    argv = runner.processes[f"ns/{pod.metadata.name}"].argv
    assert argv[1:4] == ["-m", "baton.cli", "engine-sim"]
    frontend, rest = sim_main._frontend(argv[4:])
    assert frontend == "triton"
    opts, rest = triton_frontend.split_options(rest)
    cfg = sim_config.load_config(rest)
    assert (cfg.host, cfg.port, opts.grpc_port, opts.metrics_port) == ("127.64.0.7", 8000, 8001, 8002)
    assert opts.sim_http_port == 0  # the simulator's own endpoint: any free port on the pod's IP
    assert opts.models == ("context",)  # a prefill pod loads only its model
    assert cfg.cache_state.tp == 1 and cfg.cache_state.kv_dtype == "bf16"  # small.yaml: bf16, from config.json


def test_tritonserver_options_in_either_spelling_and_the_ones_with_no_stand_in(tmp_path: Path) -> None:
    assert tritonserver_options(["--http-port", "9000", "--grpc-port=9005", "--strict-readiness=true"]) == [
        ("http-port", "9000"), ("grpc-port", "9005"), ("strict-readiness", "true")]
    objects = rendered()

    def rewrite(container: dict) -> None:
        container["args"] = ["--model-repository", "/models", "--http-port", "9000", "--grpc-port=9005",
                             "--allow-metrics=false", "--log-verbose=1", "--http-address=0.0.0.0"]

    custom = triton_pod(objects, "decode", "127.64.0.9", edit=rewrite)

    def unknown(container: dict) -> None:
        container["args"] += ["--model-control-mode=poll", "--repository-poll-secs=5"]

    refused = triton_pod(objects, "prefill", "127.64.0.7", edit=unknown)
    core = fake_core(objects, custom, refused)
    runner = make_runner(tmp_path, core, triton_python=VENV_PYTHON)
    runner.sync()
    argv = runner.processes[f"ns/{custom.metadata.name}"].argv
    assert (argv_value(argv, "--port"), argv_value(argv, "--sim-triton-grpc-port")) == ("9000", "9005")
    assert "--sim-triton-metrics-port" not in argv  # --allow-metrics=false
    assert argv_value(argv, "--sim-triton-log-verbose") == "1"
    assert argv_value(argv, "--host") == "127.64.0.9"  # the pod's IP, whatever address Triton was told
    status, reason, message = core.conditions(refused.metadata.name)[-1]
    assert (status, reason) == ("False", "CannotRunLocally")
    assert "--repository-poll-secs" in message and "no stand-in" in message


def test_only_the_models_tritonserver_is_told_to_load_are_served(tmp_path: Path) -> None:
    """--model-control-mode=explicit --load-model=NAME (what the operator renders: a tier's own model) becomes
    the front end's --sim-triton-models; a mode or a model it cannot stand in for is refused, saying so."""
    objects = rendered()

    def args(*extra: str):
        def edit(container: dict) -> None:
            container["args"] = ["--model-repository=/models", *extra]
        return edit

    both = triton_pod(objects, "decode", "127.64.0.9", "d-0", edit=args())
    star = triton_pod(objects, "decode", "127.64.0.10", "d-1",
                      edit=args("--model-control-mode=explicit", "--load-model=*"))
    poll = triton_pod(objects, "prefill", "127.64.0.7", "p-0", edit=args("--model-control-mode=poll"))
    other = triton_pod(objects, "prefill", "127.64.0.8", "p-1",
                       edit=args("--model-control-mode=explicit", "--load-model=ensemble"))
    core = fake_core(objects, both, star, poll, other)
    runner = make_runner(tmp_path, core, triton_python=VENV_PYTHON)
    runner.sync()
    assert "--sim-triton-models" not in runner.processes[f"ns/{both.metadata.name}"].argv  # none: all of them
    assert argv_value(runner.processes[f"ns/{star.metadata.name}"].argv, "--sim-triton-models") == "context,generation"
    assert "--model-control-mode=poll has no stand-in" in core.conditions(poll.metadata.name)[-1][2]
    assert "--load-model ensemble" in core.conditions(other.metadata.name)[-1][2]


def test_a_triton_model_without_a_hostpath_checkpoint_cannot_run_locally(tmp_path: Path) -> None:
    objects = rendered(source={"huggingFace": {"id": "meta-llama/Llama-3.1-8B-Instruct"}})
    pod = triton_pod(objects, "decode", "127.64.0.9")
    core = fake_core(objects, pod)
    runner = make_runner(tmp_path, core, triton_python=VENV_PYTHON)
    runner.sync()
    assert runner.processes == {}
    status, reason, message = core.conditions(pod.metadata.name)[-1]
    assert (status, reason) == ("False", "CannotRunLocally")
    assert "/models" in message and "hostPath" in message


INSTALLER = """#!/usr/bin/env bash
# a stand-in for triton-venv.sh: counts its runs; fails the first FAIL runs, then prints PYTHON
n=$(( $(cat "{count}" 2>/dev/null || echo 0) + 1 )); echo "$n" > "{count}"
sleep 0.3
if [ "$n" -le {fail} ]; then echo "[triton-venv] progress" >&2; echo "[triton-venv] error: no python3.11 here (try apt-get)" >&2; exit 1; fi
echo "{python}"
"""


def installer(tmp_path: Path, fail: int = 0) -> tuple[Path, Path]:
    count = tmp_path / "installs"
    script = tmp_path / "triton-venv.sh"
    script.write_text(INSTALLER.format(count=count, fail=fail, python=sys.executable))
    return script, count


def test_the_venv_is_made_once_in_the_background_and_only_when_a_triton_pod_appears(tmp_path: Path) -> None:
    script, count = installer(tmp_path)
    objects = rendered()
    core = fake_core(objects, scheduler_pod())
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    runner = make_runner(tmp_path, core, triton_venv_script=script)
    runner.sync()
    runner.sync()
    assert set(runner.processes) == {"ns/m-scheduler-abc"}
    assert not count.exists(), "the installer ran without a Triton pod"

    tritons = [triton_pod(objects, "prefill", "127.64.0.7"), triton_pod(objects, "decode", "127.64.0.9")]
    core.pods += tritons
    runner.sync()  # the install starts; the pods wait, and say so
    for pod in tritons:
        assert f"ns/{pod.metadata.name}" not in runner.processes
        status, reason, message = core.conditions(pod.metadata.name)[-1]
        assert (status, reason) == ("False", "Starting") and "PyTriton venv" in message and str(script) in message
    sync_until(runner, lambda: all(f"ns/{p.metadata.name}" in runner.processes for p in tritons))
    for pod in tritons:
        assert runner.processes[f"ns/{pod.metadata.name}"].argv[0] == sys.executable
        assert core.conditions(pod.metadata.name).count(core.conditions(pod.metadata.name)[0]) == 1  # written once
    assert count.read_text().strip() == "1" and runner.triton_venv.installs == 1
    assert argv_value(runner.triton_venv.command, "bash") == str(script)


def test_a_failed_install_marks_triton_pods_unready_with_what_to_do_and_is_tried_again(tmp_path: Path) -> None:
    script, count = installer(tmp_path, fail=1)
    objects = rendered()
    pod = triton_pod(objects, "decode", "127.64.0.9")
    core = fake_core(objects, pod, scheduler_pod())
    core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
    runner = make_runner(tmp_path, core, triton_venv_script=script, triton_install_retry_s=1.0)

    def refused():
        conditions = core.conditions(pod.metadata.name)
        return conditions and conditions[-1][1] == "CannotRunLocally" and conditions[-1]

    status, _, message = sync_until(runner, refused)
    assert status == "False"
    assert "no python3.11 here (try apt-get)" in message and "exit code 1" in message
    assert str(runner.workdir / "triton-venv.log") in message and "--triton-python" in message
    assert "ns/m-scheduler-abc" in runner.processes, "the other pods must run regardless"
    # fixed (here: the second run succeeds): the pod runs without restarting the runner
    sync_until(runner, lambda: f"ns/{pod.metadata.name}" in runner.processes)
    assert count.read_text().strip() == "2"
    assert core.conditions(pod.metadata.name)[-1][1] == "Starting"


def test_the_real_installer_failing_says_how_to_get_debians_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """triton-venv.sh itself, on a machine without the python it needs (here: pointed at one that is missing)."""
    monkeypatch.setenv("BATON_TRITON_PYTHON", str(tmp_path / "missing" / "python3.11"))
    objects = rendered()
    pod = triton_pod(objects, "prefill", "127.64.0.7")
    core = fake_core(objects, pod)
    runner = make_runner(tmp_path, core)

    def refused():
        conditions = core.conditions(pod.metadata.name)
        return conditions and conditions[-1][1] == "CannotRunLocally" and conditions[-1]

    _, _, message = sync_until(runner, refused)
    assert f"{tmp_path}/missing/python3.11 not found" in message
    assert "apt-get install -y python3.11 python3.11-venv libpython3.11" in message
    assert runner.processes == {}


@pytest.mark.parametrize("source,served", [({"hostPath": {"path": str(MODEL_DIR)}}, "models"),
                                           ({"huggingFace": {"id": "meta-llama/Llama-3.1-8B-Instruct"}},
                                            "meta-llama/Llama-3.1-8B-Instruct")])
def test_a_trtllm_serve_engine_serves_the_model_id_trtllm_serve_would(tmp_path: Path, source: dict, served: str) -> None:
    """trtllm-serve serves an existing model directory under its name (the pod's mount, not wherever the
    runner found the checkpoint on this machine), and a Hugging Face id as it is."""
    m = example_model("small.yaml", model__source=source)
    objects = render_children(Target(name=m.metadata["name"], namespace="ns", uid="uid-1", spec=m.spec))
    pod = triton_pod(objects, "decode", "127.64.0.9")
    assert pod.spec.containers[0].command == ["trtllm-serve"]
    runner = make_runner(tmp_path, fake_core(objects, pod))
    runner.sync()
    assert argv_value(runner.processes[f"ns/{pod.metadata.name}"].argv, "--sim-model-name") == served
