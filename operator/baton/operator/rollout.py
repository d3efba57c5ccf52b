"""Rollout mechanics that touch the outside world: GPU capacity, the live handoff probe, drain checks.

Pure where it can be (`fit_replicas` is the capacity arithmetic); the probe and the drain check talk
to engine pods at their pod IPs, the way the scheduler does.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from baton.direct_http import NO_PROXY_OPENER

GPU = "nvidia.com/gpu"


def _tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t.get("key") == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _node_matches(node: dict[str, Any], selector: dict[str, str], tolerations: list[dict[str, Any]]) -> bool:
    meta, spec = node.get("metadata", {}), node.get("spec", {})
    labels = meta.get("labels") or {}
    if spec.get("unschedulable") or any(labels.get(k) != v for k, v in selector.items()):
        return False
    return all(_tolerates(tolerations, t) for t in spec.get("taints") or [] if t.get("effect") in ("NoSchedule", "NoExecute"))


def free_gpus(nodes: list[dict[str, Any]], pods: Iterable[dict[str, Any]]) -> dict[str, int]:
    """nvidia.com/gpu still free on each node: allocatable minus what non-finished pods request."""
    free = {n["metadata"]["name"]: int((n.get("status", {}).get("allocatable") or {}).get(GPU, 0)) for n in nodes}
    for pod in pods:
        node = pod.get("spec", {}).get("nodeName")
        if node not in free or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        for c in pod.get("spec", {}).get("containers", []):
            resources = c.get("resources") or {}
            free[node] -= int((resources.get("requests") or resources.get("limits") or {}).get(GPU, 0))
    return free


# The pods that can hold GPUs, as the scheduler counts them: bound to a node and not finished.
HOLDING_PODS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


def _node_summary(node: dict[str, Any]) -> dict[str, Any]:
    """What the capacity check reads of a node (its status lists every image on it, for one)."""
    meta, spec = node.get("metadata", {}), node.get("spec", {})
    return {"metadata": {"name": meta["name"], "labels": meta.get("labels") or {}},
            "spec": {k: spec[k] for k in ("unschedulable", "taints") if k in spec},
            "status": {"allocatable": {GPU: (node.get("status", {}).get("allocatable") or {}).get(GPU, 0)}}}


def cluster_capacity(kube: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The cluster's nodes (what `fit_replicas` reads of them) and the GPUs free on each. Pods are read a
    page at a time and only their GPU requests counted, so a cluster of 10,000 pods costs a page of them
    in memory, not the whole list."""
    nodes = [_node_summary(n) for n in kube.list_cluster("Node")]
    return nodes, free_gpus(nodes, kube.list_cluster("Pod", field_selector=HOLDING_PODS))


def fit_replicas(
    nodes: list[dict[str, Any]], free: dict[str, int], tiers: list[tuple[str, int, int, dict[str, str], list[dict[str, Any]]]]
) -> list[str]:
    """Place each tier's replicas (name, replicas, gpus each, nodeSelector, tolerations) greedily on the
    free GPUs, tier after tier; return one sentence per tier that does not fit (empty: all fit)."""
    free = dict(free)
    problems = []
    for name, replicas, gpus, selector, tolerations in tiers:
        matching = [n["metadata"]["name"] for n in nodes if _node_matches(n, selector, tolerations)]
        before = {n: free[n] for n in matching}
        placed = 0
        for node in sorted(matching, key=lambda n: -free[n]):
            while placed < replicas and free[node] >= gpus:
                free[node] -= gpus
                placed += 1
        if placed < replicas:
            detail = ", ".join(f"{n}: {before[n]}" for n in sorted(before)) or "no node matches its pool"
            problems.append(
                f"{name} needs {replicas} replica(s) x {gpus} GPU(s) but only {placed} fit "
                f"(free nvidia.com/gpu per matching node: {detail})"
            )
    return problems


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST, retrying only while the engine is not accepting connections yet (bounded by `timeout`):
    an engine that answers with an error has answered, and that answer is the verdict."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-Id": "baton-probe"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with NO_PROXY_OPENER.open(request, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            if not isinstance(reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _error_text(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        try:
            body = json.loads(exc.read())
            return str(body.get("message") or body.get("error", {}).get("message") or body)
        except ValueError:
            return f"HTTP {exc.code}"
    return str(exc)


def probe_handoffs(prefill: list[str], decode: list[str], model: str, timeout: float = 20.0) -> tuple[bool, str]:
    """A real KV handoff through every new replica: context_only on each prefill pod, then
    generation_only with its handle on a paired decode pod, until every pod took part once."""
    if not prefill or not decode:
        return False, "no ready pods to probe"
    prompt = list(range(1, 33))
    rounds = max(len(prefill), len(decode))
    for i in range(rounds):
        p, d = prefill[i % len(prefill)], decode[i % len(decode)]
        try:
            ctx = _post(f"http://{p}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1,
                                                        "disaggregated_params": {"request_type": "context_only"}}, timeout)
            params = dict(ctx["choices"][0]["disaggregated_params"])
        except (OSError, ValueError, KeyError, IndexError) as exc:
            return False, f"context_only on prefill {p} failed: {_error_text(exc)}"
        params["request_type"] = "generation_only"
        try:
            _post(f"http://{d}/v1/completions", {"model": model, "prompt": ctx.get("prompt_token_ids") or prompt,
                                                  "max_tokens": 2, "disaggregated_params": params}, timeout)
        except (OSError, ValueError) as exc:
            return False, f"generation_only on decode {d} with the handle from {p} failed: {_error_text(exc)}"
    return True, f"{rounds} handoff(s) succeeded across {len(prefill)} prefill and {len(decode)} decode replica(s)"


def active_requests(address: str, timeout: float = 3.0) -> int:
    """Requests an engine still holds (running or queued), from the last iteration record of its /metrics;
    0 when unreachable, when it has no record, or when it is no trtllm-serve (Triton). trtllm-serve's
    /metrics hands out the iteration records since it was last read (or, with `return_perf_metrics`, a
    buffer its own collector fills), so an engine busy with long requests may well answer `[]`: this is
    only a lower bound, see `in_flight`."""
    try:
        with NO_PROXY_OPENER.open(f"http://{address}/metrics", timeout=timeout) as resp:
            stats = json.loads(resp.read())
    except (OSError, ValueError):
        return 0
    if isinstance(stats, list) and stats:
        last = stats[-1]
        return int(last.get("numActiveRequests", 0)) + int(last.get("numQueuedRequests", 0))
    return 0


ENDPOINT_ACTIVE = "baton_scheduler_endpoint_active_requests"
ENDPOINT_HELD = "baton_scheduler_endpoint_held_requests"
GENERATION_REQUESTS = "baton_scheduler_generation_requests_total"


@dataclass(frozen=True)
class SchedulerReadout:
    """What the schedulers' /metrics said, read once per pass (`read_schedulers`)."""

    # requests the schedulers have in flight on each engine replica (by address), held prefill results
    # counted with their prefill replica, summed over the schedulers that answered
    in_flight: dict[str, int] = field(default_factory=dict)
    # requests the schedulers dispatched to each engine generation, by outcome, summed likewise
    outcomes: dict[str, dict[str, float]] = field(default_factory=dict)
    complete: bool = True  # every scheduler whose answer counts answered


def read_schedulers(schedulers: list[str], optional: Iterable[str] = (), timeout: float = 2.0) -> SchedulerReadout:
    """Read each scheduler's /metrics once. `schedulers` must answer (one that is unreachable, slow, cuts its
    answer short or garbles it makes the readout incomplete: what it has in flight is unknown); `optional`
    ones (terminating or not Ready: one stuck on a lost node never answers) count when they answer."""
    from prometheus_client.parser import text_string_to_metric_families

    in_flight: dict[str, int] = {}
    outcomes: dict[str, dict[str, float]] = {}
    complete = True
    required = set(schedulers)
    for address in [*schedulers, *optional]:
        try:
            with NO_PROXY_OPENER.open(f"http://{address}/metrics", timeout=timeout) as resp:
                text = resp.read().decode("utf-8", "replace")
            families = list(text_string_to_metric_families(text))
        except (OSError, ValueError, http.client.HTTPException):
            if address in required:
                complete = False
            continue
        for sample in (s for family in families for s in family.samples):
            if sample.name in (ENDPOINT_ACTIVE, ENDPOINT_HELD):
                if sample.value > 0:
                    endpoint = sample.labels.get("endpoint", "")
                    in_flight[endpoint] = in_flight.get(endpoint, 0) + int(sample.value)
            elif sample.name == GENERATION_REQUESTS:
                by_outcome = outcomes.setdefault(sample.labels.get("generation", ""), {})
                outcome = sample.labels.get("outcome", "")
                by_outcome[outcome] = by_outcome.get(outcome, 0.0) + sample.value
    return SchedulerReadout(in_flight, outcomes, complete)


def in_flight(engines: list[str], schedulers: SchedulerReadout, engine_reads: bool = True) -> int | None:
    """Requests still in flight on the engine replicas `engines` (host:port): per replica the larger of
    what the schedulers say they have on it (their own count of requests they sent there, also after the
    replica left their endpoint lists) and, with `engine_reads`, what the engine's /metrics says
    (`active_requests`: requests from elsewhere). None (unknown) when a scheduler did not answer: what it has
    on them cannot be told, and an engine's /metrics may say nothing of a long request (see
    `active_requests`)."""
    if not engines:
        return 0
    if not schedulers.complete:
        return None
    counted = schedulers.in_flight
    return sum(max(counted.get(address, 0), active_requests(address) if engine_reads else 0) for address in engines)


def generation_outcomes(schedulers: SchedulerReadout, generation: str) -> dict[str, float]:
    """Requests the schedulers dispatched to `generation`, by outcome, summed over those that answered."""
    return dict(schedulers.outcomes.get(generation, {}))
