"""`baton demo`: Baton's main job, end to end, on a local cluster it brings up itself.

1. bring up the local control plane with its fake GPU node pools (building the binaries on first use);
2. install the DisaggregatedModel CRD and start the operator;
3. apply an example DisaggregatedModel and wait until it is Ready;
4. print what was created: pods per node pool, and `kubectl get dm`;
5. run every Baton pod as a local process (the pod runner: engine simulators for the GPU tiers,
   Baton's scheduler) and send a handful of requests through the scheduler, printing the path
   each one took (local or disaggregated, which replicas) and its timings.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from baton.api import crd as crd_module
from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from baton.devcluster import binaries, pools
from baton.devcluster.cli import devcluster_command, pool_table, wait_nodes_ready
from baton.devcluster.controlplane import ControlPlane

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def install_crd(api_client: Any) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    ext = client.ApiextensionsV1Api(api_client)
    body = crd_module.crd()
    name = body["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        live = ext.read_custom_resource_definition(name)
        body["metadata"]["resourceVersion"] = live.metadata.resource_version
        ext.replace_custom_resource_definition(name, body)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = ext.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in live.status.conditions or []):
            return
        time.sleep(0.3)
    raise RuntimeError(f"CRD {name} did not become Established")


def apply_model(api_client: Any, namespace: str, manifest: dict[str, Any]) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api_client)
    name = manifest["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except ApiException as exc:
        if exc.status != 409:
            raise
        live = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        manifest["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, manifest)


def wait_ready(api_client: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)
        line = f"prefill {status.get('prefill', {}).get('summary', '-')}, decode {status.get('decode', {}).get('summary', '-')}"
        if ready:
            line += f" - {ready['reason']}: {ready['message']}"
        if line != last:
            say(line)
            last = line
        if ready and ready["status"] == "True" and status.get("observedGeneration") == obj["metadata"]["generation"]:
            return obj
        time.sleep(1)
    raise RuntimeError(f"{name} not Ready after {timeout:.0f}s")


def pods_by_pool(api_client: Any, namespace: str) -> str:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    pool_of = {n.metadata.name: n.metadata.labels.get(pools.POOL_LABEL, "-") for n in core.list_node().items}
    rows = [("POOL", "NODE", "POD", "TIER", "GPUS", "POD IP")]
    for pod in sorted(core.list_namespaced_pod(namespace).items, key=lambda p: (pool_of.get(p.spec.node_name or "", "~"), p.metadata.name)):
        gpus = sum(int((c.resources.limits or {}).get("nvidia.com/gpu", 0)) for c in pod.spec.containers)
        rows.append((pool_of.get(pod.spec.node_name or "", "(pending)"), pod.spec.node_name or "-", pod.metadata.name,
                     (pod.metadata.labels or {}).get("baton.dev/tier", "-"), str(gpus or "-"), pod.status.pod_ip or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _stream(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """One streaming completion: route headers, time to first token, total time, tokens."""
    import json
    import urllib.request

    from baton.direct_http import NO_PROXY_OPENER
    from baton.replay import event_tokens

    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    start = time.monotonic()
    first = None
    tokens = 0
    usage = None
    error = ""
    with NO_PROXY_OPENER.open(request, timeout=timeout) as resp:  # the scheduler pod's IP: never via a proxy
        headers = dict(resp.headers)
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if "error" in event:  # an error event mid-stream: no token, and the row says so
                err = event["error"]
                error = str(err.get("code") or err.get("message") if isinstance(err, dict) else err)
                break
            if isinstance(event.get("usage"), dict):
                usage = event["usage"].get("completion_tokens")
            n = event_tokens(event)  # as `baton replay` counts them: ids, else one per generation step
            if n:
                if first is None:
                    first = time.monotonic()
                tokens += n
    end = time.monotonic()
    return {"headers": headers, "ttft": (first or end) - start, "total": end - start,
            "tokens": usage if isinstance(usage, int) else tokens, "error": error}


def send_requests(api_client: Any, namespace: str, name: str, manifest: dict[str, Any]) -> None:
    import urllib.error

    from kubernetes import client

    core = client.CoreV1Api(api_client)
    pods = core.list_namespaced_pod(namespace, label_selector=f"baton.dev/model={name}").items
    by_ip = {p.status.pod_ip: p.metadata.name for p in pods if p.status.pod_ip}
    scheduler = next(p for p in pods if p.metadata.labels.get("baton.dev/tier") == "scheduler" and p.status.pod_ip)
    url = f"http://{scheduler.status.pod_ip}:{manifest['spec'].get('scheduler', {}).get('port', 8000)}"
    from baton.direct_http import NO_PROXY_OPENER

    deadline = time.monotonic() + 60
    while True:
        try:
            with NO_PROXY_OPENER.open(f"{url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the scheduler at {url} did not answer /readyz with 200 within 60 s; its log is in the "
                            "pod runner's work directory")
        time.sleep(0.5)
    model = manifest["spec"]["model"]["name"]
    say(f"scheduler at {url} (its pod IP), model {model!r}")
    rows = [("PROMPT TOKENS", "ROUTE", "PREFILL REPLICA", "DECODE REPLICA", "TTFT (ms)", "TOTAL (ms)", "TOKENS")]
    for prompt_tokens, max_tokens in ((200, 16), (1500, 16), (6000, 32), (12000, 32), (16000, 16)):
        try:
            result = _stream(url, {"model": model, "prompt": list(range(1, prompt_tokens + 1)), "max_tokens": max_tokens})
        except urllib.error.HTTPError as exc:
            rows.append((str(prompt_tokens), f"error {exc.code}", exc.read().decode()[:60], "", "", "", ""))
            continue
        except OSError as exc:  # no answer at all (refused, reset, timed out)
            rows.append((str(prompt_tokens), "error", f"{type(exc).__name__}: {exc}"[:60], "", "", "", ""))
            continue
        h = result["headers"]
        if result["error"]:
            rows.append((str(prompt_tokens), h.get("X-Baton-Route", "?"), f"error event: {result['error']}"[:60],
                         "", "", "", ""))
            continue
        name_of = lambda endpoint: by_ip.get((endpoint or "").rsplit(":", 1)[0], "-")  # noqa: E731
        rows.append((str(prompt_tokens), h.get("X-Baton-Route", "?"), name_of(h.get("X-Baton-Prefill-Endpoint")),
                     name_of(h.get("X-Baton-Decode-Endpoint")), f"{result['ttft'] * 1000:.0f}",
                     f"{result['total'] * 1000:.0f}", str(result["tokens"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    say("short prompts are prefilled on a decode replica (local); long ones go through the prefill tier, "
        "whose KV the paired decode replica pulls (disaggregated). Engine timing: H200-calibrated simulator.")


def wait_claimed(core: Any, namespace: str, runner: subprocess.Popen, runner_log: Path, timeout: float = 60) -> None:
    """Wait until the pod runner `runner` has claimed the namespace (a live claim of its own, not one an
    earlier runner left): from then on it, not the cluster's readiness stand-in, decides when a Baton pod
    there is Ready."""
    from baton.podrunner.runner import CLAIM_ANNOTATION, claim_holder_pid, claim_live

    def claimed() -> bool:
        value = (core.read_namespace(namespace).metadata.annotations or {}).get(CLAIM_ANNOTATION)
        return claim_live(value) and claim_holder_pid(value) == runner.pid

    deadline = time.monotonic() + timeout
    while not claimed():
        if runner.poll() is not None:
            raise SystemExit(f"the pod runner exited with code {runner.returncode}; see {runner_log}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the pod runner did not claim namespace {namespace} within {timeout:g}s; see {runner_log}")
        time.sleep(0.2)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", default=str(REPO_EXAMPLES / "llama-70b.yaml"), help="DisaggregatedModel manifest to apply")
    parser.add_argument("--namespace", default="baton-demo")
    parser.add_argument("--cluster", default="baton", help="local cluster name")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    # SIGTERM or a closed terminal ends the demo as Ctrl-C does: through its `finally`, which stops the operator
    # and pod runner it started (left running, the next demo's pod runner would find the cluster claimed)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)

    from kubernetes import client, config

    say("step 1/5: local cluster (the first run builds Kubernetes, etcd, KWOK and Helm from source)")
    plane = ControlPlane(bin_dir=binaries.ensure_built(), name=args.cluster)
    kubeconfig = plane.up(timeout=180)
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    core = client.CoreV1Api(api_client)
    wait_nodes_ready(core, pools.apply_pools(core, pools.load_pools()), timeout=120)
    print(pool_table(core))

    say("step 2/5: CRD and operator")
    install_crd(api_client)
    try:
        core.create_namespace({"metadata": {"name": args.namespace}})
    except client.rest.ApiException as exc:
        if exc.status != 409:
            raise
    log_path = plane.dir / "logs" / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "NO_PROXY": "127.0.0.1,localhost"}
    with open(log_path, "ab") as log:
        operator = subprocess.Popen([sys.executable, "-m", "baton.cli", "operator", "--namespace", args.namespace],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
    say(f"operator running (pid {operator.pid}, log {log_path})")
    runner_log = plane.dir / "logs" / "pod-runner.log"
    with open(runner_log, "ab") as log:
        runner = subprocess.Popen([sys.executable, "-m", "baton.cli", "pod-runner", "--namespace", args.namespace,
                                   "--workdir", str(plane.dir / "pods")], stdout=log, stderr=subprocess.STDOUT, env=env)
    say(f"pod runner running (pid {runner.pid}, log {runner_log}): each Baton pod becomes a local process")
    try:
        wait_claimed(core, args.namespace, runner, runner_log)
        manifest = yaml.safe_load(Path(args.example).read_text())
        name = manifest["metadata"]["name"]
        say(f"step 3/5: applying {args.example} as {args.namespace}/{name}")
        apply_model(api_client, args.namespace, manifest)
        wait_ready(api_client, args.namespace, name, args.timeout)

        say("step 4/5: what Baton created")
        print(pods_by_pool(api_client, args.namespace))
        print()
        kubectl = [str(plane.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", "-n", args.namespace]
        subprocess.run([*kubectl, "get", "dm"], check=True)
        print()
        subprocess.run([*kubectl, "get", "statefulsets,deployments,services", "-l", f"baton.dev/model={name}"], check=True)
        print()
        say("step 5/5: requests through the scheduler")
        send_requests(api_client, args.namespace, name, manifest)
    finally:
        for proc in (runner, operator):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    command = devcluster_command(args.cluster)
    say(f"done. Explore with: eval \"$({command} env)\"; kubectl -n {args.namespace} describe dm {name}")
    say(f"tear down with: {command} down")
    return 0
