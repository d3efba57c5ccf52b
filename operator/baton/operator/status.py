"""Status: observed children in, the DisaggregatedModel's status out (pure).

Conditions follow Kubernetes conventions and kstatus: `Ready` is the summary, `Reconciling` is True
while the children are on their way to the spec, `Stalled` is True when Baton cannot make progress
without the user (the reason and message say what to do). Each reason is a constant here.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

# Condition types.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
KV_FORMAT_COMPATIBLE = "KVFormatCompatible"

# Reasons.
REASON_ALL_READY = "AllComponentsReady"  # both tiers and the scheduler serve at the desired scale
REASON_PROGRESSING = "Progressing"  # children are being created, scaled or updated
REASON_NOT_READY = "ComponentsNotReady"  # some replicas are not ready yet
REASON_RECONCILED = "Reconciled"  # nothing left to do
REASON_INVALID_SPEC = "InvalidSpec"  # the spec passed the schema but cannot be served as written
REASON_APPLY_FAILED = "ApplyFailed"  # the API server refused a child object
REASON_PODS_UNSCHEDULABLE = "PodsUnschedulable"  # pods cannot be placed (GPUs, selectors, taints)
REASON_ROLLOUT = "RollingOut"  # a new generation of both tiers is being created, probed or drained
REASON_ROLLED_BACK = "RolledBack"  # the spec's generation failed and was rolled back; another serves
REASON_PROGRESS_DEADLINE = "ProgressDeadlineExceeded"  # a first deployment not Ready within progressDeadline
REASON_KV_FORMAT_MISMATCH = "KVFormatMismatch"  # prefill and decode could not hand KV to each other
REASON_KV_FORMAT_MATCH = "KVFormatMatch"  # every hard-equal KV-format field agrees


def now() -> str:
    return iso(datetime.datetime.now(datetime.timezone.utc))


def iso(moment: datetime.datetime) -> str:
    """A time as status timestamps are written (UTC, whole seconds, `Z`)."""
    return moment.astimezone(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Observed:
    """What the reconciler saw in the cluster."""

    prefill: dict[str, Any] | None = None  # the StatefulSet
    decode: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None  # the Deployment
    problem: tuple[str, str] | None = None  # (reason, message) when Baton is stuck
    unschedulable: list[str] = field(default_factory=list)  # "pod: scheduler message"
    failing: list[str] = field(default_factory=list)  # "pod: container reason: message" (`failing_containers`)


# Why a container cannot start, as the kubelet reports it (state.waiting.reason): each needs the user.
FAILING_WAIT_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff",
                        "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def failing_containers(pod: dict[str, Any]) -> list[str]:
    """The pod's containers that cannot start, e.g. "m-decode-x-0: engine ImagePullBackOff: Back-off ..."."""
    out = []
    statuses = (pod.get("status") or {}).get("initContainerStatuses") or []
    statuses = [*statuses, *((pod.get("status") or {}).get("containerStatuses") or [])]
    for cs in statuses:
        waiting = ((cs.get("state") or {}).get("waiting") or {})
        if waiting.get("reason") in FAILING_WAIT_REASONS:
            detail = f": {waiting['message'][:200]}" if waiting.get("message") else ""
            out.append(f"{pod['metadata']['name']}: {cs.get('name')} {waiting['reason']}{detail}")
            continue
        # A crash-looping container is running again between its back-offs: not ready, restarted, its last
        # exit said (else the message would come and go with each restart)
        last = ((cs.get("lastState") or {}).get("terminated") or {})
        restarts = int(cs.get("restartCount") or 0)
        if restarts and last and not cs.get("ready"):
            how = f"exit code {last.get('exitCode')}" + (f" ({last['reason']})" if last.get("reason") else "")
            out.append(f"{pod['metadata']['name']}: {cs.get('name')} restarted {restarts} time(s), last {how}")
    return out


def replica_failures(workloads: list[dict[str, Any] | None]) -> list[str]:
    """A StatefulSet's or Deployment's ReplicaFailure condition: its pods could not even be created (a
    quota, an admission policy, a missing service account), so there are none to look at."""
    out = []
    for obj in workloads:
        for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
            if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
                out.append(f"{obj['kind'] if obj.get('kind') else 'workload'} {obj['metadata']['name']}: "
                           f"{cond.get('message') or cond.get('reason', '')}"[:300])
    return out


def tier_status(sts: dict[str, Any] | None, desired: int, fingerprint: str, selector: str = "") -> dict[str, Any]:
    status = (sts or {}).get("status", {})
    ready = int(status.get("readyReplicas", 0) or 0)
    updated = int(status.get("updatedReplicas", 0) or 0)
    return {
        "replicas": desired,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "summary": f"{ready}/{desired}",
        "kvFingerprint": fingerprint,
        **({"selector": selector} if selector else {}),
    }


def scaled_to(obj: dict[str, Any] | None, desired: int) -> bool:
    """The workload has exactly `desired` pods (a scale-down has finished), Ready or not."""
    if obj is None:
        return False
    meta, status = obj.get("metadata", {}), obj.get("status", {})
    return status.get("observedGeneration", 0) >= meta.get("generation", 1) and int(status.get("replicas", 0) or 0) == desired


def workload_settled(obj: dict[str, Any] | None, desired: int) -> bool:
    if not scaled_to(obj, desired):
        return False
    status = obj.get("status", {})  # type: ignore[union-attr]  # scaled_to: not None
    # Available = Ready for at least minReadySeconds: a pod that only flickered Ready does not count.
    available = int(status.get("availableReplicas", status.get("readyReplicas", 0)) or 0)
    updated = int(status.get("updatedReplicas", 0) or 0)
    return available >= desired and updated >= desired


def _condition(ctype: str, ok: bool, reason: str, message: str, generation: int, previous: list[dict]) -> dict:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now()
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def compute(
    *,
    generation: int,
    previous: dict[str, Any],
    observed: Observed,
    desired_prefill: int,
    desired_decode: int,
    desired_scheduler: int,
    revision: str,
    fingerprints: tuple[str, str],
    scheduler_endpoint: str,
    kv_bytes_per_token: int,
    decode_kv_capacity_tokens: int,
    extra: list[tuple[str, bool, str, str]] = (),
    rolling: bool = False,
    rolling_note: str = "",
    selectors: tuple[str, str] = ("", ""),
    drop: list[str] | tuple[str, ...] = (),
    rolled_back: str = "",
    late: str = "",
) -> dict[str, Any]:
    """The whole status object; `lastTransitionTime`s move only when a condition's status changes.
    Conditions of the types in `drop` are left out (a merge patch replaces the whole list). `rolling_note`
    completes the message of Reconciling while a new generation rolls out. `rolled_back` says why the
    spec's generation was rolled back: another generation serves (Ready says how well) and the spec is
    not tried again until it changes, so Baton needs the user: Stalled (kstatus Failed, Argo CD
    Degraded, a Flux wait fails), not a healthy and current model. `late` says why a first deployment whose
    replicas are still not Ready is past its progress deadline: Stalled too, while it keeps trying."""
    conditions = [c for c in previous.get("conditions", []) or [] if c.get("type") not in drop]
    prefill = tier_status(observed.prefill, desired_prefill, fingerprints[0], selectors[0])
    decode = tier_status(observed.decode, desired_decode, fingerprints[1], selectors[1])
    settled = {
        "prefill": workload_settled(observed.prefill, desired_prefill),
        "decode": workload_settled(observed.decode, desired_decode),
        "scheduler": workload_settled(observed.scheduler, desired_scheduler),
    }
    waiting = [name for name, ok in settled.items() if not ok]
    if observed.problem:
        reason, message = observed.problem
        ready = (False, reason, message)
        reconciling = (False, reason, "reconciliation is blocked; see the Stalled condition")
        stalled = (True, reason, message)
    elif observed.unschedulable:
        message = "pods cannot be scheduled: " + "; ".join(observed.unschedulable[:3])
        ready = (False, REASON_PODS_UNSCHEDULABLE, message)
        reconciling = (True, REASON_PODS_UNSCHEDULABLE, message)
        stalled = (False, REASON_PODS_UNSCHEDULABLE, "waiting for capacity; the scheduler retries as nodes free up")
    elif waiting:
        detail = ", ".join(
            f"{n} {s['summary']}" for n, s in (("prefill", prefill), ("decode", decode)) if n in waiting
        )
        if "scheduler" in waiting:
            detail = ", ".join(filter(None, [detail, "scheduler not available"]))
        # What keeps them from starting, when it is something the user must fix.
        why = replica_failures([observed.prefill, observed.decode, observed.scheduler]) + observed.failing
        if why:
            detail += "; " + "; ".join(why[:3]) + (f" (and {len(why) - 3} more)" if len(why) > 3 else "")
        ready = (False, REASON_NOT_READY, f"waiting for {detail}")
        reconciling = (True, REASON_PROGRESSING, f"waiting for {detail}")
        stalled = (True, REASON_PROGRESS_DEADLINE, f"{late}: waiting for {detail}") if late \
            else (False, REASON_PROGRESSING, "")
    else:
        message = f"prefill {prefill['summary']}, decode {decode['summary']}, scheduler at {scheduler_endpoint}"
        ready = (True, REASON_ALL_READY, message)
        rolling_message = "; ".join(filter(None, ["a new generation is rolling out; see status.rollout", rolling_note]))
        reconciling = (True, REASON_ROLLOUT, rolling_message) if rolling else (False, REASON_RECONCILED, "")
        stalled = (False, REASON_RECONCILED, "")
    if rolled_back and not observed.problem:
        stalled = (True, REASON_ROLLED_BACK, rolled_back)
    return {
        "observedGeneration": generation,
        "conditions": [
            _condition(READY, *ready, generation, conditions),
            _condition(RECONCILING, *reconciling, generation, conditions),
            _condition(STALLED, *stalled, generation, conditions),
            *[_condition(ctype, ok, reason, message, generation, conditions) for ctype, ok, reason, message in extra],
            *[c for c in conditions if c.get("type") not in (READY, RECONCILING, STALLED, *(e[0] for e in extra))],
        ],
        "revision": revision,
        "prefill": prefill,
        "decode": decode,
        "schedulerEndpoint": scheduler_endpoint,
        "kvBytesPerToken": kv_bytes_per_token,
        "decodeKvCapacityTokens": decode_kv_capacity_tokens,
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal for writing purposes: condition timestamps aside, nothing differs."""

    def strip(status: dict[str, Any]) -> dict[str, Any]:
        out = dict(status)
        out["conditions"] = sorted(
            ({k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", []) or []),
            key=lambda c: c.get("type", ""),
        )
        return out

    return strip(a) == strip(b)
