"""One reconcile pass of the generation state machine, with everything it decides kept in
status.rollout (so an operator restarted at any step resumes from the cluster and the status).

Phases of status.rollout.phase:
- Serving: one generation serves; spec changes that keep the KV format and engine roll in place.
- BlockedOnCapacity: a new generation is wanted but a GPU pool has no room for it; nothing started.
- Progressing: the new generation's StatefulSets run beside the serving ones, not yet Ready.
- Draining: traffic switched to the new generation; the previous one finishes its in-flight work and
  is kept for `rollout.rollbackWindow` so a failing new generation (replicas it had at the switch no
  longer Ready, too many failed requests, or the rollback annotation) can be switched back in one step.
  Scaling a tier meanwhile is not a failure. An engine change in this phase ends the window: the
  serving generation becomes lastKnownGood and the previous one is deleted once idle. A spec the
  reconciler refuses (Stalled) in this phase applies nothing but its replica counts (Reconciler.
  _scale_refused), and these checks still run (guard_drain).
- Swapping (strategy PairwiseSwap): the new generation runs beside the serving one with a surge of one
  replica per tier; both serve (schedulers pair only equal KV fingerprints) while the new one grows
  and the old one shrinks a replica per tier at a time, each step probed; then the switch and drain.
- Paused: `spec.rollout.paused`; nothing moves.
- RolledBack: the new generation failed (never Ready in time, probe failed, lost readiness after the
  switch, or the user asked); traffic is on the last known-good generation (that status write comes
  first); the failed generation is deleted and not retried until the spec changes or a new value of the
  retry annotation names it.

Transient API errors (5xx, 429, 409) never move the state machine: the pass is retried (reconciler).
A target the spec moved away from before it served is deleted.

Switching traffic is writing one field, status.rollout.servingGeneration, which every scheduler
watches; schedulers also only ever pair engines of equal KV fingerprint. The scheduler settings that
belong to a generation (served model name, runtime, KV transfer compression) follow that field too:
each generation's StatefulSets carry the values they were rendered with, and the reconciler renders the
scheduler config from the serving generation's (see reconciler._serving_generation_config).
"""

from __future__ import annotations

import datetime
import json
import time
from typing import TYPE_CHECKING, Any

from baton.api.units import parse_duration
from baton.operator import events, rollout, status
from baton.render.naming import LABEL_GENERATION, LABEL_TIER, revision
from baton.pod_ports import format_address, http_port

if TYPE_CHECKING:
    from baton.operator.reconciler import Reconciler

ANNOTATION_ROLLBACK = "serving.baton.dev/rollback"  # "true" (or the target generation): abort and roll back
ANNOTATION_RETRY = "serving.baton.dev/retry-generation"  # a failed generation's key: try it again

# Status is merge-patched, where {} changes nothing: clearing takes explicit empty values.
NO_SWAP = {"generation": "", "prefillReplicas": 0, "decodeReplicas": 0}
NO_PROBE = {"generation": "", "step": "", "passed": False, "message": "", "at": ""}

ROLLOUT = "RolloutSucceeded"  # condition type: False while a rollout is blocked or failed, True once one serves
# How long a generation traffic was switched back from may finish the requests it still has in flight
# before it is deleted (it is failing: not the whole drainTimeout).
FAILED_DRAIN_SECONDS = 30.0

# Which value of each control annotation was already acted on, kept as a condition (the status schema
# has no free-form field): an annotation left in place (GitOps) is acted on once, not on every rollout.
# Removing the annotation forgets it, so setting it again acts again.
HANDLED = {ANNOTATION_ROLLBACK: "RollbackRequestHandled", ANNOTATION_RETRY: "RetryRequestHandled"}


def handled_value(conditions: list[dict], annotation: str) -> str:
    """The value of `annotation` that was already handled ("" when none)."""
    cond = next((c for c in conditions or [] if c.get("type") == HANDLED[annotation]), None)
    prefix = f"{annotation}="
    message = (cond or {}).get("message", "")
    return message[len(prefix):].split(": ", 1)[0] if message.startswith(prefix) else ""


def handled_condition(annotation: str, value: str, what: str) -> tuple[str, bool, str, str]:
    return (HANDLED[annotation], True, "Handled", f"{annotation}={value}: {what}")


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in pod.get("status", {}).get("conditions") or [])


def lost_ready_pods(pods: list[dict], switched_at: str, at_switch: dict[str, int] | None = None) -> list[str]:
    """Pods that lost readiness since the switch: not Ready now although they were part of the
    generation when it was switched to (every replica was Ready then), or whose containers restarted.
    `at_switch` (replicas per tier at the switch) tells those apart by ordinal, so a pod the StatefulSet
    recreated since (an eviction, a drained node) is still one of them; without it, by creation time. A
    replica added later (a scale-up in progress) that is still starting is not a loss; a pod being
    deleted (scale-down, eviction) is not either."""
    lost = []
    for pod in pods:
        meta = pod.get("metadata", {})
        if meta.get("deletionTimestamp") or _ready(pod):
            continue
        restarted = any(int(c.get("restartCount", 0) or 0) > 0 for c in pod.get("status", {}).get("containerStatuses") or [])
        name = meta.get("name", "?")
        tier = (meta.get("labels") or {}).get(LABEL_TIER, "")
        ordinal = name.rsplit("-", 1)[-1]
        if at_switch is not None and tier in at_switch and ordinal.isdigit():
            there = int(ordinal) < at_switch[tier]
        else:
            created = meta.get("creationTimestamp", "")
            there = not created or not switched_at or _ts(created) < _ts(switched_at)
        if restarted or there:
            lost.append(name)
    return sorted(lost)


def in_place_held_back(serving: str, gen: str) -> str:
    """What of the spec does not reach the serving generation while the spec names another one."""
    return (f"generation {serving} serves while the spec names generation {gen}: only the spec's replica counts "
            "reach it; its other in-place changes (resources, pod template, pools, limits) reach pods with a "
            "generation of the spec's engine")


def _ts(timestamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _now() -> str:
    return status.now()


def _age(timestamp: str) -> float:
    if not timestamp:
        return 0.0
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def _fingerprints(tiers: dict[str, dict]) -> tuple[str, str]:
    """The KV fingerprints a generation's StatefulSets were rendered with ("" when unknown)."""
    from baton.render.naming import ANNOTATION_KV_FINGERPRINT

    return tuple(((((tiers.get(t) or {}).get("spec") or {}).get("template") or {}).get("metadata") or {})
                 .get("annotations", {}).get(ANNOTATION_KV_FINGERPRINT, "") for t in ("prefill", "decode"))  # type: ignore[return-value]


def generation_children(target: Any, derived: Any, live: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """The spec's generation as rendered, each StatefulSet annotated with the generation-bound scheduler
    settings it was rendered with (served model name, runtime, KV transfer compression): what the
    scheduler config must say while that generation serves (a metadata annotation: no pod restarts).
    `live`: the generation's StatefulSets as they are (tier -> object), for `_kept_revision`."""
    from baton.render import render_generation
    from baton.render.naming import LABEL_REVISION, LABEL_TIER
    from baton.render.scheduler import ANNOTATION_GENERATION_CONFIG, generation_config

    value = json.dumps(generation_config(target.spec), sort_keys=True, separators=(",", ":"))
    children = render_generation(target, derived)
    for child in children:
        if child["kind"] == "StatefulSet":
            child["metadata"]["annotations"] = {**(child["metadata"].get("annotations") or {}),
                                                ANNOTATION_GENERATION_CONFIG: value}
            kept = _kept_revision((live or {}).get(child["metadata"]["labels"].get(LABEL_TIER)), derived.revision)
            if kept:
                child["metadata"]["labels"][LABEL_REVISION] = kept
                child["spec"]["template"]["metadata"]["labels"][LABEL_REVISION] = kept
    return children


def _kept_revision(live: dict | None, whole_spec_revision: str) -> str:
    """The revision label to keep on a live StatefulSet's pods instead of its tier's own ("" for none). An
    operator before per-tier revisions labelled both tiers' pods with the hash of the whole spec
    (`naming.revision`): while their label is still that of the spec as it is (nothing that shapes the pods
    changed since), it is kept, so that upgrading the operator restarts no engine; the next change to the
    spec moves each tier to its own."""
    from baton.render.naming import LABEL_REVISION

    labels = ((((live or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
    return whole_spec_revision if whole_spec_revision and labels.get(LABEL_REVISION) == whole_spec_revision else ""


def rendered_generation_config(tiers: dict[str, dict]) -> dict[str, str]:
    """The generation-bound scheduler settings a generation's StatefulSets were rendered with (empty when
    they carry none: rendered by an operator before this annotation)."""
    from baton.render.scheduler import ANNOTATION_GENERATION_CONFIG, GENERATION_FIELDS

    for tier in ("prefill", "decode"):
        raw = (((tiers.get(tier) or {}).get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_GENERATION_CONFIG)
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            continue
        if isinstance(value, dict):
            out = {k: v for k, v in value.items() if k in GENERATION_FIELDS and isinstance(v, str) and v}
            if out:
                return out
    return {}


def _swap_sized(swap: dict[str, Any]) -> bool:
    """A PairwiseSwap recorded the serving generation's size before shrinking it (status.rollout.swap)."""
    return bool(swap.get("prefillReplicas") or swap.get("decodeReplicas"))


def _replicas(sts: dict[str, Any] | None, default: int) -> int:
    return int((sts or {}).get("spec", {}).get("replicas", default)) if sts else default


class RolloutPass:
    def __init__(self, reconciler: "Reconciler", body: dict, target: Any, derived: Any, ro: dict,
                 generations: dict[str, dict[str, dict]], changed: list[str], rollback_request: str = ""):
        self.r, self.body, self.target, self.derived = reconciler, body, target, derived
        self.ro = ro
        self._keeps_swapping: bool | None = None
        self.first_deploy_late = ""  # a first deployment past its progress deadline: why (Stalled)
        self._takeover_blocked = ""
        self.generations = generations
        self.changed = changed
        self.spec = target.spec
        self.ns, self.name = target.namespace, target.name
        self.problem: tuple[str, bool, str, str] | None = None
        self.rolling = False
        self.requeue = 60.0
        self._pod_list: list[dict] | None = None
        self._readout: rollout.SchedulerReadout | None = None  # the schedulers' /metrics, read once per pass
        # A value of the rollback annotation not acted on yet ("" when none): "true" or a generation key.
        self.rollback_request = rollback_request
        self.rollback_done = ""  # what the rollback request did, for the handled condition
        self.succeeded = False  # a new generation finished its rollout in this pass
        # A rolled-back generation schedulers still route to until this pass's status write: deleted next pass.
        self.deferred_delete = ""

    def _pods(self) -> list[dict]:
        """The model's pods, listed at most once per pass."""
        if self._pod_list is None:
            self._pod_list = self.r.model_pods(self.ns, self.name)
        return self._pod_list

    # ------------------------------------------------------------------ helpers

    def _event(self, kind: str, reason: str, message: str) -> None:
        events.record(self.r.kube, self.body, kind, reason, message)

    def _phase(self, phase: str, message: str) -> None:
        self.ro["phase"], self.ro["message"] = phase, message

    def _settled(self, gen: str) -> bool:
        tiers = self.generations.get(gen, {})
        wanted = {"prefill": self.spec.prefill.desired_replicas(), "decode": self.spec.decode.desired_replicas()}
        if gen != self.derived.generation:
            wanted = {t: _replicas(tiers.get(t), wanted[t]) for t in wanted}
        return all(status.workload_settled(tiers.get(t), n) for t, n in wanted.items())

    def _ref(self, gen: str, fingerprints: tuple[str, str]) -> dict[str, str]:
        return {"generation": gen, "prefillFingerprint": fingerprints[0], "decodeFingerprint": fingerprints[1]}

    def _pod_addresses(self, gen: str, tier: str, ready_only: bool = True) -> list[str]:
        """The Ready pods of a generation's tier (every one with an IP unless `ready_only`: a pod that lost
        readiness may still run requests), each on the port it serves on (a pod not yet replaced after a
        port change still serves on the old one)."""
        port = self.spec.tier(tier).port
        pods = self._pods()
        out = []
        for pod in pods:
            labels = pod.get("metadata", {}).get("labels") or {}
            ready = not ready_only or any(c.get("type") == "Ready" and c.get("status") == "True"
                                          for c in pod.get("status", {}).get("conditions") or [])
            if labels.get(LABEL_GENERATION) == gen and labels.get("baton.dev/tier") == tier and ready and pod["status"].get("podIP"):
                out.append(format_address(pod["status"]["podIP"], http_port(pod, port)))
        return sorted(out)

    def _in_flight(self, gen: str, engine_reads: bool = True) -> int | None:
        """Requests still in flight on generation `gen`'s engines, Ready or not; None when a scheduler did
        not answer (see `rollout.in_flight`): the generation is then kept, up to rollout.drainTimeout.
        Without `engine_reads`, only what the schedulers count (for a message: trtllm-serve's /metrics hands
        out its records once, so it is read only when the answer decides something)."""
        engines = [a for t in ("prefill", "decode") for a in self._pod_addresses(gen, t, ready_only=False)]
        return rollout.in_flight(engines, self._schedulers(), engine_reads) if engines else 0

    def _scheduler_addresses(self) -> tuple[list[str], list[str]]:
        """The scheduler pods' addresses: those whose answer counts (Ready, not being deleted), and the others
        (starting, or terminating: one stuck on a lost node would never answer), heard when they answer."""
        counted, others = [], []
        for p in self._pods():
            meta = p.get("metadata", {})
            if (meta.get("labels") or {}).get(LABEL_TIER) != "scheduler" or not p.get("status", {}).get("podIP"):
                continue
            address = format_address(p["status"]["podIP"], http_port(p, self.spec.scheduler.port))
            (counted if _ready(p) and not meta.get("deletionTimestamp") else others).append(address)
        return sorted(counted), sorted(others)

    def _schedulers(self) -> rollout.SchedulerReadout:
        """The schedulers' /metrics, read at most once per pass (in flight and request outcomes alike)."""
        if self._readout is None:
            counted, others = self._scheduler_addresses()
            self._readout = rollout.read_schedulers(counted, others)
        return self._readout

    def _request_counters(self, gen: str) -> tuple[int, int]:
        """(failed, completed + failed) requests the schedulers dispatched to `gen`, summed over them; their
        counters count from each scheduler's start and never reset."""
        outcomes = rollout.generation_outcomes(self._schedulers(), gen)
        failed = int(outcomes.get("failed", 0))
        return failed, failed + int(outcomes.get("completed", 0))

    def _error_counts(self, gen: str) -> dict[str, Any]:
        """status.rollout.errorRate when `gen` starts taking traffic (the switch, or a pairwise swap's first
        routed pair): the counters as they stand now, so that only the requests from there on are judged;
        none of those yet. Nothing ({}) while a scheduler that counts did not answer: its counts, missing
        from the baseline, would later read as requests since; the next pass records it."""
        if not self._schedulers().complete:
            return {}
        failed, total = self._request_counters(gen)
        return {"generation": gen, "failed": 0, "total": 0, "failedAtSwitch": failed, "totalAtSwitch": total}

    def _kept_error_counts(self, gen: str) -> dict[str, Any]:
        """errorRate at the final switch of a pairwise swap: the one recorded when the swap's generation first
        took traffic, so that what it did beside the serving generation is still judged."""
        counted = self.ro.get("errorRate") or {}
        return counted if counted.get("generation") == gen else self._error_counts(gen)

    def _error_rate_problem(self, gen: str) -> str:
        """Why the new generation must go, judged from what the schedulers saw it do since it took traffic; ""
        when it is fine. status.rollout.errorRate shows those requests."""
        threshold = self.spec.rollout.error_rate_threshold_percent
        if threshold >= 100:
            return ""
        counted = self.ro.get("errorRate") or {}
        if counted.get("generation") != gen:
            self.ro["errorRate"] = self._error_counts(gen)  # nothing recorded at the switch: judge from here on
            return ""
        failed_now, total_now = self._request_counters(gen)
        # Less than at the switch only when a scheduler restarted (its counters start again at 0).
        failed = max(0, failed_now - int(counted.get("failedAtSwitch", 0)))
        total = max(failed, total_now - int(counted.get("totalAtSwitch", 0)))
        # Judged on the counts as they are; shown in the status when a failure was added, when it starts being
        # judged, or when the total grew by a tenth: under steady traffic the status (which every scheduler
        # watches) is not rewritten every pass.
        shown = int(counted.get("total", 0))
        minimum = self.spec.rollout.error_rate_min_requests
        if (failed != int(counted.get("failed", 0)) or total * 10 >= shown * 11 or total < shown
                or (shown < minimum <= total)):
            self.ro["errorRate"] = {**counted, "failed": failed, "total": total}
        if total >= self.spec.rollout.error_rate_min_requests and failed * 100 > threshold * total:
            since = "since it took traffic beside the serving generation" if self.ro.get("servingGeneration") != gen \
                else "after the switch"
            return (f"{failed} of {total} requests dispatched to it failed ({100 * failed / total:.0f}%) {since}, "
                    f"above rollout.errorRateThresholdPercent={threshold}")
        return ""

    def _good_generation(self, failed: str) -> str:
        """Where traffic goes when `failed` is rolled back: the last known-good generation, else the one
        draining, else the one serving; never `failed` itself ("" when no other generation could serve).
        Traffic is only switched to a generation that can take it: both tiers there, each with a Ready
        replica (one half-deleted, or whose pods are all down, would be a worse outage than the failed one)."""
        serving = self.ro.get("servingGeneration", "")
        candidates = ((self.ro.get("lastKnownGood") or {}).get("generation", ""), self.ro.get("previousGeneration", ""), serving)
        return next((g for g in candidates if g and g != failed and (g == serving or self._can_serve(g))), "")

    def _can_serve(self, gen: str) -> bool:
        tiers = self.generations.get(gen, {})
        return all(int(((tiers.get(t) or {}).get("status") or {}).get("readyReplicas") or 0) > 0
                   for t in ("prefill", "decode"))

    def _scale(self, gen: str, tier: str, replicas: int) -> None:
        """Scale one StatefulSet of a generation, when it exists at another size; what this pass reads
        next (e.g. a new swap's restore target) sees the new size."""
        sts = self.generations.get(gen, {}).get(tier)
        if not sts or _replicas(sts, replicas) == replicas:
            return
        scaled = self.r.scale_statefulset(self.ns, sts["metadata"]["name"], replicas)
        self.generations[gen][tier] = scaled if isinstance(scaled, dict) and scaled.get("spec") else {
            **sts, "spec": {**sts.get("spec", {}), "replicas": replicas}}

    def _rollback(self, failed: str, why: str, detected_at: float | None = None) -> None:
        """Traffic to the last known-good generation, the failed one removed, the story told."""
        good = self._good_generation(failed)
        serving = self.ro.get("servingGeneration", "")
        if not good:
            # The failed generation serves and no other generation could: it is never deleted while it serves.
            self.problem = (ROLLOUT, False, "RolledBack", f"generation {failed} failed ({why}) but no other generation "
                                                          "is there to serve instead (with both tiers and a Ready "
                                                          "replica in each); it keeps serving. Fix the spec")
            self._event("Warning", "RolledBack", self.problem[3])
            return
        switched_back = serving == failed
        if switched_back:
            self.ro["servingGeneration"] = good
            self.ro.update(self._record_switch(good))
            if detected_at is not None:
                self.ro["lastRollbackMillis"] = int((time.monotonic() - detected_at) * 1000)
        # Deleted on the next pass, after this pass's status write: schedulers route to the failed generation
        # until that write (as the serving one, or beside it in a pairwise swap), and a write that fails (an
        # API error, an operator restart) must find it still there, not create it again with a new deadline.
        self._retire(failed, good, routed=True)
        # The spec as it was when the generation failed: an edit of anything that shapes its pods (an env
        # entry or resources the API server refused, a memory limit it ran out of) tries it again. (Not a
        # refused spec's, which the generation never ran with: fixing that spec does not undo the rollback.)
        self.ro.update({"failedGeneration": failed, "failedRevision": revision(self.spec) if self.derived else "",
                        "targetGeneration": failed})
        if self.ro.get("previousGeneration") in (good, failed):
            # Switched back to (or gone with the failed one); an older generation still draining drains on.
            self.ro["previousGeneration"] = ""
        where = f"traffic back on generation {good}" if switched_back else f"generation {good} kept serving"
        self._phase("RolledBack", f"generation {failed} rolled back: {why}; {where}")
        self.problem = (ROLLOUT, False, "RolledBack",
                        f"generation {failed} rolled back: {why}. Fix the spec (an engine or KV change starts a "
                        "new generation; a change of anything else that shapes its pods tries it again) or set "
                        f"annotation {ANNOTATION_RETRY}={failed} to try it again")
        self._event("Warning", "RolledBack", self.ro["message"])

    def _retire(self, gone: str, good: str, routed: bool) -> None:
        """`gone` goes and `good` serves on. A pairwise swap ends first: its record is cleared (schedulers
        stop routing to its generation with this pass's status write) and, as it had shrunk `good`, `good`
        grows back to what the spec asks for (its size before the swap unless a tier was scaled since:
        straight there, as the next pass's scale_serving would set it anyway, never up to the recorded size
        and down again). `gone` is deleted now, or, when schedulers still route to it (`routed`), on the
        next pass: never before the status write that stops the routing."""
        swap = self.ro.get("swap") or {}
        if _swap_sized(swap):
            for tier in ("prefill", "decode"):
                self._scale(good, tier, self.spec.tier(tier).desired_replicas())
        if _swap_sized(swap) or swap.get("generation") == gone:
            self.ro["swap"] = dict(NO_SWAP)
        if routed:
            self.deferred_delete = gone
            self.requeue = 2.0
        else:
            self.r.delete_generation(self.ns, self.name, gone)
            self.generations.pop(gone, None)

    def _abandon(self, abandoned: str, gen: str) -> None:
        """The spec moved on to `gen` while generation `abandoned` was being rolled out (a pairwise swap
        under way, whatever the strategy now): not a failure. It goes as a failed one would (_retire:
        routing stops and the serving generation gets its replicas back first), with a Normal Event."""
        serving = self.ro.get("servingGeneration", "")
        routed = (self.ro.get("swap") or {}).get("generation") == abandoned
        self._retire(abandoned, serving, routed)
        when = " on the next pass, once schedulers stop routing to it" if routed else ""
        message = (f"the spec changed to generation {gen}: the rollout of generation {abandoned} is abandoned; "
                   f"generation {serving} goes back to the spec's replica counts; generation {abandoned} is deleted{when}")
        self._phase("Swapping" if self.spec.rollout.strategy == "PairwiseSwap" else "Progressing", message)
        self._event("Normal", "Abandoned", message)

    def _rollback_requested(self, gen: str) -> bool:
        return self.rollback_request in ("true", gen)

    def _requested_rollback(self, gen: str) -> bool:
        """Roll `gen` back when a new rollback annotation asks for it; True when it did."""
        if not self._rollback_requested(gen):
            return False
        self._rollback(gen, f"rollback requested with annotation {ANNOTATION_ROLLBACK}")
        self.rollback_done = f"generation {gen} rolled back"
        return True

    def _remove_leftovers(self, keep: set[str]) -> None:
        """Delete every generation but `keep`: abandoned targets (they never served), a failed one."""
        for other in [g for g in self.generations if g not in keep and g != self.deferred_delete]:
            self.r.delete_generation(self.ns, self.name, other)
            self.generations.pop(other, None)
            self.changed.append(f"deleted generation {other}")

    def _lingering_previous(self, gen: str) -> bool:
        """The spec moved on while a previous generation was still draining (its rollback window is
        over: the user chose a newer generation). The serving one becomes the last known-good one, the
        previous one is deleted once idle (or at drainTimeout); True while it is still there."""
        serving = self.ro.get("servingGeneration", "")
        previous = self.ro.get("previousGeneration", "")
        if previous and previous != serving and previous in self.generations:
            # Also when the spec went back to the previous generation (a GitOps revert): the generation
            # that serves now is the one a rollback of the next switch returns to.
            if (self.ro.get("lastKnownGood") or {}).get("generation") != serving:
                self.ro["lastKnownGood"] = self._ref(serving, _fingerprints(self.generations.get(serving, {})))
        if not previous or previous in (serving, gen) or previous not in self.generations:
            if previous and previous not in self.generations:
                self.ro["previousGeneration"] = ""
            return False
        since = _age(self.ro.get("switchedAt", ""))
        in_flight = self._in_flight(previous)
        if in_flight != 0 and since < parse_duration(self.spec.rollout.drain_timeout):
            return True  # requests in flight, or unknown
        self.r.delete_generation(self.ns, self.name, previous)
        self.generations.pop(previous, None)
        self.ro["previousGeneration"] = ""
        self._event("Normal", "Drained", f"generation {previous} drained and deleted (generation {serving} serves)")
        return False

    def _held(self, gen: str, rollback_requested: bool | None = None) -> bool:
        """An explicit rollback or a pause stops a rollout where it is; True when one did."""
        if self._requested_rollback(gen):
            return True
        if self.spec.rollout.paused:
            self._phase("Paused", f"rollout to generation {gen} paused (spec.rollout.paused)")
            return True
        return False

    def _blocked(self, message: str) -> None:
        if self.ro.get("phase") != "BlockedOnCapacity" or self.ro.get("message") != message:
            self._event("Warning", "BlockedOnCapacity", message)
        self._phase("BlockedOnCapacity", message)
        self.problem = (ROLLOUT, False, "BlockedOnCapacity", message)
        self.requeue = 10.0

    # ------------------------------------------------------------------ phases

    def swap_sizes_serving(self) -> bool:
        """A PairwiseSwap owns the serving generation's size: it shrinks it step by step (within the size
        recorded in status.rollout.swap), and gives it the spec's replica counts back on a rollback."""
        swap = self.ro.get("swap") or {}
        return _swap_sized(swap) and (self.spec.rollout.strategy == "PairwiseSwap" or self.keeps_swapping())

    def keeps_swapping(self) -> bool:
        """The strategy became AtomicGeneration while a pairwise swap to the spec's generation was under way,
        and the pools have no room for the atomic way to take over: the new generation at full size beside
        the serving one grown back to its size. The swap then goes on (and says so); the new strategy
        applies once there is room, or to the next rollout."""
        if self._keeps_swapping is None:
            self._keeps_swapping = False
            if self.derived is None:  # a refused spec's drain guard: no strategy of its own to take over with
                return False
            gen, serving, swap = self.derived.generation, self.ro.get("servingGeneration", ""), self.ro.get("swap") or {}
            if (self.spec.rollout.strategy != "PairwiseSwap" and _swap_sized(swap) and serving and gen != serving
                    and self.ro.get("targetGeneration") == gen and gen in self.generations):
                tiers = ("prefill", "decode")
                desired = {t: self.spec.tier(t).desired_replicas() for t in tiers}
                new = {t: _replicas(self.generations[gen].get(t), 0) for t in tiers}
                old = {t: _replicas(self.generations.get(serving, {}).get(t), 0) for t in tiers}
                more = {t: max(0, desired[t] - new[t]) + max(0, desired[t] - old[t]) for t in tiers}
                blocked = self._capacity_problems(more) if any(more.values()) else []
                if blocked:
                    self._keeps_swapping = True
                    self._takeover_blocked = "; ".join(blocked)
        return self._keeps_swapping

    def scale_serving(self) -> None:
        """The spec names another generation than the serving one (targeted, or failed): its replica counts
        (kubectl scale, an autoscaler) still reach the serving generation, unless a pairwise swap sizes it.
        Its other in-place changes cannot: they reach pods with a generation of the spec's own engine."""
        serving = self.ro.get("servingGeneration", "")
        if not serving or self.swap_sizes_serving():
            return
        for tier in ("prefill", "decode"):
            before = _replicas(self.generations.get(serving, {}).get(tier), 0)
            self._scale(serving, tier, self.spec.tier(tier).desired_replicas())
            after = _replicas(self.generations.get(serving, {}).get(tier), 0)
            if after != before:
                self.changed.append(f"in place: scaled generation {serving} {tier} from {before} to {after} replicas")

    def tell_strategy_waits(self) -> None:
        """The status message of a swap that goes on under strategy AtomicGeneration says why."""
        if self.keeps_swapping() and self.ro.get("phase") == "Swapping":
            self.ro["message"] += (f"; rollout.strategy is AtomicGeneration, but the pools have no room for generation "
                                   f"{self.derived.generation} at full size beside the serving one ({self._takeover_blocked}): "
                                   "the pairwise swap goes on")

    def steady(self) -> None:
        """The spec's generation serves (or is being deployed for the first time)."""
        gen = self.derived.generation
        fps = (self.derived.fingerprint("prefill"), self.derived.fingerprint("decode"))
        if not self.ro.get("servingGeneration"):
            # First deployment: nothing serves, so an earlier generation that never became Ready (a
            # broken first spec, since fixed) only holds GPUs the fixed one needs.
            for other in [g for g in self.generations if g != gen and not self._settled(g)]:
                self.r.delete_generation(self.ns, self.name, other)
                self.generations.pop(other, None)
                self.changed.append(f"deleted generation {other} (never Ready)")
            if self._settled(gen):
                self.ro.update({"servingGeneration": gen, "targetGeneration": gen, "lastKnownGood": self._ref(gen, fps),
                                **self._record_switch(gen)})
                self._phase("Serving", f"generation {gen} serves")
            else:
                spec_changed = (self.body.get("metadata", {}).get("generation")
                                != (self.body.get("status") or {}).get("observedGeneration"))
                if self.ro.get("targetGeneration") != gen or spec_changed:
                    self.ro["startedAt"] = ""  # a new or edited first spec: its own deadline, from now
                self.ro["targetGeneration"] = gen
                self._phase("Progressing", f"deploying generation {gen}")
                self.rolling = True
                self.requeue = 2.0
                deadline = self.spec.rollout.progress_deadline
                if self._start_deadline(gen) > parse_duration(deadline):
                    # Nothing to roll back to: nothing is deleted, it keeps trying, but the user must look.
                    self.first_deploy_late = (f"generation {gen} did not become Ready within rollout.progressDeadline "
                                              f"{deadline} of its first deployment; nothing serves yet")
            return
        self._revert_swap(gen)
        previous = self.ro.get("previousGeneration", "")
        draining = bool(previous) and previous in self.generations and previous != gen
        # Leftovers of an aborted rollout (the operator died mid-way, a target the spec went back from, also
        # while a previous generation drains): removed, but a reverted swap's generation that schedulers
        # still route to until this pass's status write only on the next pass (see _revert_swap).
        self._remove_leftovers({gen, previous} if draining else {gen})
        if draining:
            self._drain(gen, previous)
            return
        if self.ro.get("phase") != "Serving" or self.ro.get("previousGeneration"):
            self.ro.update({"previousGeneration": "", "lastKnownGood": self._ref(gen, fps)})
            self._phase("Serving", f"generation {gen} serves")
        if self.rollback_request:
            self.rollback_done = "nothing to roll back"
        # The spec is back on the serving generation (e.g. reverted after a failed rollout): no rollout
        # is targeted or failed any more.
        if self.ro.get("targetGeneration") != gen or self.ro.get("failedGeneration"):
            self.ro.update({"targetGeneration": gen, "failedGeneration": ""})

    def _revert_swap(self, gen: str) -> None:
        """The spec went back to the serving generation during a PairwiseSwap (a GitOps revert): the swap
        ends. Schedulers stop routing to its generation in this pass's status write (swap cleared); the
        serving generation already got the spec's replica counts from this pass's in-place apply; the
        swap's generation is deleted on the next pass, never before that write (as in _rollback)."""
        swap, target = self.ro.get("swap") or {}, self.ro.get("targetGeneration", "")
        reverted = swap.get("generation", "")
        # (After a swap's final switch its record stays until the drain ends: a rollback in the window uses it.)
        if reverted in ("", gen) and not (_swap_sized(swap) and target not in ("", gen)):
            return
        if reverted in ("", gen) or reverted not in self.generations:
            self.ro["swap"] = dict(NO_SWAP)
            return  # not routed to (the swap had not passed its first probe): a leftover, deleted at once
        # The in-place apply scaled the serving generation after `generations` was listed: read it again,
        # so that it is not scaled a second time (a no-op unless that apply left a tier short).
        self.generations = self.r._generations(self.ns, self.name)
        self._retire(reverted, gen, routed=True)
        self.rolling = True
        self._event("Normal", "Switched",
                    f"the spec went back to generation {gen} during the pairwise swap: all traffic on generation {gen}, "
                    f"which grows back to {self.spec.prefill.desired_replicas()} prefill, "
                    f"{self.spec.decode.desired_replicas()} decode; generation {reverted} gets no new work and is deleted "
                    "on the next pass")

    def _drain(self, gen: str, previous: str) -> None:
        """After the switch: watch the new generation, let the old one finish, then delete it."""
        self.rolling = True
        self.requeue = 2.0
        if self._drain_failed(gen):
            return
        since = _age(self.ro.get("switchedAt", ""))
        window = parse_duration(self.spec.rollout.rollback_window)
        timeout = parse_duration(self.spec.rollout.drain_timeout)
        in_flight = self._in_flight(previous, engine_reads=since >= window)
        # The previous generation stays for the whole rollback window (a failing new generation is rolled
        # back onto it); after that it goes once idle, or at the drain timeout with requests in flight.
        if since >= window and (in_flight == 0 or since >= timeout):
            self.r.delete_generation(self.ns, self.name, previous)
            self.generations.pop(previous, None)
            fps = (self.derived.fingerprint("prefill"), self.derived.fingerprint("decode"))
            self.ro.update({"previousGeneration": "", "lastKnownGood": self._ref(gen, fps), "swap": dict(NO_SWAP)})
            how = "drained" if in_flight == 0 else f"drain timeout reached with {_in_flight_text(in_flight)}"
            self._phase("Serving", f"generation {gen} serves; previous generation {previous} {how} and deleted")
            self._event("Normal", "Drained", self.ro["message"])
            self.succeeded = True
            self.rolling = False
            self.requeue = 60.0
        else:
            counted = self.ro.get("errorRate") or {}
            errors = (f"; {counted.get('failed', 0)} of {counted.get('total', 0)} request(s) dispatched to it "
                      "failed since it took traffic") if counted.get("generation") == gen else ""
            # A time, not a countdown: a message that changes every pass would rewrite the status every pass.
            switched = self.ro.get("switchedAt", "")
            until = status.iso(_ts(switched) + datetime.timedelta(seconds=window)) if switched else "the window ends"
            after = f"for rollback until {until}" if since < window else "until it is idle"
            self._phase("Draining", f"generation {gen} serves{errors}; generation {previous} drains "
                                    f"({_in_flight_text(in_flight)}) and stays {after}")

    def _drain_failed(self, gen: str) -> bool:
        """Roll back the generation switched to when it fails while the previous one is kept: a rollback
        asked for, readiness lost, too many failed requests within the rollback window; True when it did."""
        if self._requested_rollback(gen):
            return True
        if _age(self.ro.get("switchedAt", "")) < parse_duration(self.spec.rollout.rollback_window):
            lost = self._lost_readiness(gen)
            if lost:
                self._rollback(gen, f"it lost readiness after the switch ({lost})", detected_at=time.monotonic())
                return True
            errors = self._error_rate_problem(gen)
            if errors:
                self._rollback(gen, errors, detected_at=time.monotonic())
                return True
        return False

    def guard_drain(self) -> None:
        """The spec was refused (Stalled) while a generation drains or a pairwise swap routes to its
        generation: nothing of it is applied and neither ends, but the checks that protect traffic still run
        against what serves (for a swap, the rollback annotation, which ends it as in advance_pairwise)."""
        swapped = (self.ro.get("swap") or {}).get("generation", "")
        if swapped and self._rollback_requested(swapped):
            self.rolling = True
            self.requeue = 2.0
            self._requested_rollback(swapped)
            return
        serving, previous = self.ro.get("servingGeneration", ""), self.ro.get("previousGeneration", "")
        if not serving or not previous or previous == serving or previous not in self.generations:
            return
        if (self.ro.get("lastKnownGood") or {}).get("generation") == serving:
            return  # the spec had moved on from `serving` (_lingering_previous): `previous` only drains
        self.rolling = True
        self.requeue = 2.0
        self._drain_failed(serving)

    def _lost_readiness(self, gen: str) -> str:
        """Why the serving generation counts as failed ("" when it does not): replicas it had at the switch
        are no longer Ready. A replica count changing (kubectl scale, an autoscaler, a replicas edit) is not
        a loss: replicas being added may still be starting, replicas being removed go away."""
        tiers = self.r._generations(self.ns, self.name).get(gen, {})  # as they are after this pass's apply
        missing = [t for t in ("prefill", "decode") if t not in tiers]
        if missing:
            return f"its {' and '.join(missing)} StatefulSet is gone"
        at_switch = self._replicas_at_switch(tiers)  # lowered on every pass a tier was scaled down in
        if all(status.workload_settled(tiers[t], _replicas(tiers[t], 0)) for t in ("prefill", "decode")):
            return ""
        pods = [p for p in self._pods() if (p.get("metadata", {}).get("labels") or {}).get(LABEL_GENERATION) == gen
                and (p.get("metadata", {}).get("labels") or {}).get(LABEL_TIER) in ("prefill", "decode")]
        lost = lost_ready_pods(pods, self.ro.get("switchedAt", ""), at_switch)
        # a replica there at the switch whose pod is gone and not made again (a quota, an admission webhook)
        names = {p.get("metadata", {}).get("name") for p in pods}
        at_ordinals = [f"{tiers[t]['metadata']['name']}-{i}" for t in ("prefill", "decode") for i in range((at_switch or {}).get(t, 0))]
        gone = sorted(name for name in at_ordinals if name not in names)
        why = ([f"not Ready: {', '.join(lost)}"] if lost else []) + ([f"no pod: {', '.join(gone)}"] if gone else [])
        return "; ".join(why)

    def _replicas_at_switch(self, tiers: dict[str, dict]) -> dict[str, int] | None:
        """The serving generation's replicas per tier at the switch, lowered to a tier's replicas when it is
        scaled down (a replica scaled down and then up again is a new one, still starting); None when the
        status does not say (written by an older operator)."""
        recorded = self.ro.get("replicasAtSwitch")
        if not isinstance(recorded, dict):
            return None
        counts = {t: min(int(recorded.get(t, 0) or 0), _replicas(tiers.get(t), 0)) for t in ("prefill", "decode")}
        if counts != recorded:
            self.ro["replicasAtSwitch"] = counts
        return counts

    def track_serving_replicas(self) -> None:
        """Every pass: replicasAtSwitch follows the serving generation's tiers down when they are scaled
        down (a spec edit, an autoscaler, a pairwise swap shrinking them), so that a replica added back
        later counts as one still starting."""
        serving = self.ro.get("servingGeneration", "")
        tiers = self.r._generations(self.ns, self.name).get(serving) if serving else None
        if tiers:
            self._replicas_at_switch(tiers)

    def _record_switch(self, gen: str) -> dict[str, Any]:
        """What a switch of traffic to `gen` writes besides servingGeneration (and the error-rate baseline)."""
        tiers = self.generations.get(gen) or {}
        return {"switchedAt": _now(), "replicasAtSwitch": {t: _replicas(tiers.get(t), 0) for t in ("prefill", "decode")}}

    def hold_failed(self) -> None:
        gen = self.derived.generation
        serving = self.ro.get("servingGeneration", "")
        # A generation rolled back after the switch is deleted once traffic is back (see _rollback), when the
        # requests still in flight on it have ended (FAILED_DRAIN_SECONDS at most); an older one still
        # draining goes once idle.
        keep = {serving, self.ro.get("previousGeneration", "")} - {""}
        if gen in self.generations and gen not in keep and self._finishing(gen, serving):
            keep.add(gen)
            self.rolling = True
            self.requeue = 2.0
        self._remove_leftovers(keep)
        self._lingering_previous(gen)
        if self.rollback_request:
            self.rollback_done = f"generation {gen} was already rolled back"
        self.problem = (ROLLOUT, False, "RolledBack",
                        f"generation {gen} was rolled back ({self.ro.get('message', '')}); generation {serving} serves. "
                        f"Fix the spec or set annotation {ANNOTATION_RETRY}={gen} to try again; {in_place_held_back(serving, gen)}")

    def _finishing(self, failed: str, serving: str) -> bool:
        """The rolled-back generation still has requests the schedulers dispatched to it before traffic went
        back, and may finish them: within FAILED_DRAIN_SECONDS of the switch back, while the serving
        generation has all its replicas (after a pairwise swap it grows back, and needs the GPUs now)."""
        if _age(self.ro.get("switchedAt", "")) >= FAILED_DRAIN_SECONDS or not self._settled(serving):
            return False
        return self._in_flight(failed, engine_reads=False) != 0

    def _start_deadline(self, gen: str, key: str = "startedAt") -> float:
        """Seconds since the generation (or swap step) started. When the status write that recorded the
        start was lost (an API error, an operator restart), the StatefulSets' creation time stands in,
        else now: the progress deadline is always enforced."""
        if not self.ro.get(key):
            created = sorted(((sts or {}).get("metadata") or {}).get("creationTimestamp") or ""
                             for sts in self.generations.get(gen, {}).values())
            self.ro[key] = next((c for c in created if c), "") or _now()
        return _age(self.ro[key])

    def _restarting(self, gen: str) -> None:
        """The spec went back to the generation still draining: it is old, its deadline starts now."""
        if gen in self.generations and gen == self.ro.get("previousGeneration"):
            self.ro["startedAt"] = self.ro["stepStartedAt"] = _now()

    def _resumed(self, gen: str, phases: tuple[str, ...] = ("Paused",)) -> None:
        """Time spent paused does not count against the progress deadline (nor, for an atomic rollout, time
        spent swapping pair by pair: its generation is resized to full from now)."""
        if self.ro.get("phase") in phases and gen in self.generations:
            self.ro["startedAt"] = self.ro["stepStartedAt"] = _now()

    def advance(self, rollback_requested: bool | None = None) -> None:
        """The spec asks for a new generation: capacity, start, Ready, probe, switch."""
        gen = self.derived.generation
        serving = self.ro["servingGeneration"]
        self.rolling = True
        self.requeue = 2.0
        if self.ro.get("targetGeneration") != gen:
            why = "the engine or KV format changed (image, TensorRT-LLM version, model, KV cache or transfer settings, parallelism)"
            abandoned, swap = self.ro.get("targetGeneration", ""), self.ro.get("swap") or {}
            if (abandoned and abandoned != serving and abandoned in self.generations
                    and (swap.get("generation") or _swap_sized(swap))):
                # A pairwise swap was under way (the strategy is AtomicGeneration again): its generation may
                # still be routed to and the serving one shrunk. Routing stops and the size comes back first;
                # the abandoned generation goes on the next pass.
                self._abandon(abandoned, gen)
            self.ro.update({"targetGeneration": gen, "startedAt": "", "stepStartedAt": "", "probe": dict(NO_PROBE)})
            self._restarting(gen)
            self._event("Normal", "NewGeneration", f"{why}: generation {gen} of both tiers will be created beside "
                                                   f"serving generation {serving}, probed, then switched to atomically")
        if self.deferred_delete:
            return  # the abandoned swap's generation goes on the next pass, once schedulers stop routing to it
        # An earlier target the spec moved away from never served: it goes, with its GPUs.
        self._remove_leftovers({serving, gen, self.ro.get("previousGeneration", "")} - {""})
        draining = self._lingering_previous(gen)
        if self._held(gen):
            return
        self._resumed(gen, ("Paused", "Swapping"))  # Swapping: the strategy became AtomicGeneration mid-swap
        if gen not in self.generations:
            blocked = self._capacity_problems()
            if blocked:
                self._blocked("blocked on capacity: " + "; ".join(blocked) + ". Free GPUs, add nodes, or scale the tiers down")
                return
            self.ro["startedAt"] = _now()
        failure = self.r._apply_all(generation_children(self.target, self.derived), self.ns, self.changed,
                                    prefix=f"new generation {gen}: ")
        if failure:
            self._rollback(gen, failure)
            return
        self.generations = self.r._generations(self.ns, self.name)
        if not self._settled(gen):
            deadline = parse_duration(self.spec.rollout.progress_deadline)
            if self._start_deadline(gen) > deadline:
                self._rollback(gen, f"it did not become Ready within progressDeadline {self.spec.rollout.progress_deadline}")
            else:
                self._phase("Progressing", f"generation {gen} starting beside serving generation {serving}")
            return
        if not self._probe(gen, {t: self.spec.tier(t).desired_replicas() for t in ("prefill", "decode")}):
            return
        if draining:
            self._phase("Progressing", f"generation {gen} is Ready; switching once generation "
                                       f"{self.ro['previousGeneration']} has drained")
            return
        # The switch: one field, which every scheduler watches.
        self.ro.update({"servingGeneration": gen, "previousGeneration": serving, **self._record_switch(gen),
                        "errorRate": self._error_counts(gen)})
        self._phase("Draining", f"switched traffic from generation {serving} to {gen}")
        self._event("Normal", "Switched", f"traffic switched atomically from generation {serving} to {gen} "
                                          f"(KV fingerprints prefill {self.derived.fingerprint('prefill')}, "
                                          f"decode {self.derived.fingerprint('decode')})")

    def _capacity_problems(self, counts: dict[str, int] | None = None) -> list[str]:
        """What keeps the pools from taking `counts` more replicas per tier (default: a full generation)."""
        nodes, free = rollout.cluster_capacity(self.r.kube)
        from baton.render.tiers import GPU_TOLERATION, SPOT_TOLERATIONS

        tiers = []
        for name in ("prefill", "decode"):
            t = self.spec.tier(name)
            tolerations = [GPU_TOLERATION, *(SPOT_TOLERATIONS if t.allow_spot else []), *t.pool.tolerations]
            n = t.desired_replicas() if counts is None else counts.get(name, 0)
            if n:
                tiers.append((name, n, t.gpus_per_replica, dict(t.pool.node_selector), tolerations))
        return rollout.fit_replicas(nodes, free, tiers)

    # ------------------------------------------------------------------ PairwiseSwap

    def _probe(self, gen: str, counts: dict[str, int], key: str = "") -> bool:
        """Probe the generation's current pods, `counts` replicas per tier, once (per `key`: a swap step's
        replica counts); False when the probe failed and the generation was rolled back."""
        probe = self.ro.get("probe") or {}
        if probe.get("generation") == gen and probe.get("step") == key and probe.get("passed"):
            return True
        empty = [t for t in ("prefill", "decode") if not counts[t]]
        if self.spec.engine.runtime != "trtllm-serve":
            ok, message = True, f"not probed: the {self.spec.engine.runtime} runtime has no HTTP handoff"
        elif empty:
            ok, message = True, f"not probed: the spec asks for 0 {' and '.join(empty)} replicas, so there is no pair to hand off through"
        else:
            ok, message = rollout.probe_handoffs(self._pod_addresses(gen, "prefill"), self._pod_addresses(gen, "decode"),
                                                 self.spec.model.name)
        self.ro["probe"] = {"generation": gen, "step": key, "passed": ok, "message": message, "at": _now()}
        step = f" ({key})" if key else ""
        self._event("Normal" if ok else "Warning", "ProbePassed" if ok else "ProbeFailed", f"generation {gen}{step}: {message}")
        if not ok:
            self._rollback(gen, f"the live handoff probe failed: {message}")
        return ok

    def _tier_settled(self, sts: dict | None, replicas: int) -> bool:
        return status.workload_settled(sts, replicas) if replicas else True

    def advance_pairwise(self, rollback_requested: bool | None = None) -> None:
        """PairwiseSwap: surge one replica per tier, probe, serve both, then grow new / shrink old."""
        gen = self.derived.generation
        serving = self.ro["servingGeneration"]
        tiers = ("prefill", "decode")
        self.rolling = True
        self.requeue = 2.0
        if self.ro.get("targetGeneration") != gen:
            abandoned = self.ro.get("targetGeneration", "")
            if abandoned and abandoned != serving and abandoned in self.generations:
                # The spec moved on mid-swap: give the serving generation its replicas back first.
                self._abandon(abandoned, gen)
            self.ro.update({"targetGeneration": gen, "startedAt": "", "stepStartedAt": "", "probe": dict(NO_PROBE),
                            "swap": dict(NO_SWAP), "failedGeneration": ""})
            self._restarting(gen)
            self._event("Normal", "NewGeneration",
                        f"the engine or KV format changed: generation {gen} will replace serving generation {serving} "
                        "pair by pair (strategy PairwiseSwap: one extra replica per tier at a time, each step probed)")
        if self.deferred_delete:
            return  # the abandoned swap's generation goes on the next pass, once schedulers stop routing to it
        self._remove_leftovers({serving, gen, self.ro.get("previousGeneration", "")} - {""})
        draining = self._lingering_previous(gen)
        if self._held(gen):
            return
        self._resumed(gen)
        old = self.generations.get(serving, {})
        desired = {t: self.spec.tier(t).desired_replicas() for t in tiers}
        swap = dict(self.ro.get("swap") or {})
        surge = {t: 1 if desired[t] else 0 for t in tiers}
        if gen not in self.generations:
            blocked = self._capacity_problems(surge)
            if blocked:
                self._blocked("blocked on capacity even for a pairwise swap (one extra replica per tier): "
                              + "; ".join(blocked) + ". Free GPUs or add nodes")
                return
            self.ro.update({"startedAt": _now(), "stepStartedAt": _now()})
        # A tier the spec wants has at least the surge's replica: also when its StatefulSet is missing (a pass
        # cut short between creating the two tiers) or at 0 (the tier was scaled up from 0 mid-swap).
        new_counts = {t: max(_replicas(self.generations.get(gen, {}).get(t), 0), surge[t]) for t in tiers}
        if not _swap_sized(swap):
            # The serving generation's size, recorded before it first shrinks (also when the strategy became
            # PairwiseSwap after the new generation had started): the swap's budget, and the mark that the
            # swap sizes the serving generation (a rollback gives it the spec's counts back).
            swap = {**swap, **{f"{t}Replicas": _replicas(old.get(t), desired[t]) for t in tiers}}
            self.ro["swap"] = swap
        if self._apply_new(gen, new_counts):
            return
        if swap.get("generation") == gen:
            # It takes traffic beside the serving generation: judged as after a switch, on every step.
            errors = self._error_rate_problem(gen)
            if errors:
                self._rollback(gen, errors, detected_at=time.monotonic())
                return
        new = self.generations.get(gen, {})
        old_counts = {t: _replicas(old.get(t), 0) for t in tiers}
        summary = (f"generation {gen} at {new_counts['prefill']}/{desired['prefill']} prefill, "
                   f"{new_counts['decode']}/{desired['decode']} decode; generation {serving} at "
                   f"{old_counts['prefill']} prefill, {old_counts['decode']} decode")
        # A step is done when the new replicas are Ready and the old generation's scale-down has finished
        # (its GPUs are free); an old replica that is not Ready for reasons of its own is not the step's.
        steady = (all(self._tier_settled(new.get(t), new_counts[t]) for t in tiers)
                  and all(status.scaled_to(old.get(t), old_counts[t]) for t in tiers))
        if not steady:
            deadline = parse_duration(self.spec.rollout.progress_deadline)
            if self._start_deadline(gen, "stepStartedAt") > deadline:
                self._rollback(gen, f"a swap step did not become Ready within progressDeadline {self.spec.rollout.progress_deadline}")
            else:
                self._phase("Swapping", f"pairwise swap: {summary}; waiting for the step to become Ready")
            return
        if not self._probe(gen, new_counts, f"{new_counts['prefill']}x{new_counts['decode']}"):
            return
        if swap.get("generation") != gen:
            swap["generation"] = gen  # schedulers now route to both generations
            self.ro["swap"] = swap
            self.ro["errorRate"] = self._error_counts(gen)  # judged from here, through the final switch
            self._event("Normal", "SwapStarted", f"generation {gen} passed the probe and serves beside generation {serving}")
        budget = {t: max(int(swap.get(f"{t}Replicas", 0)), desired[t]) for t in tiers}
        # Shrink the old generation where the surge is in place (never below one replica while it serves),
        # and only to make room for a new replica still to come.
        shrink = [t for t in tiers if old_counts[t] > 1 and new_counts[t] < desired[t]
                  and old_counts[t] + new_counts[t] > budget[t]]
        if shrink:
            for t in shrink:
                self.r.scale_statefulset(self.ns, old[t]["metadata"]["name"], old_counts[t] - 1)
            self.ro["stepStartedAt"] = _now()
            self._phase("Swapping", f"pairwise swap: {summary}; scaling generation {serving} {', '.join(shrink)} down by one")
            return
        grow = [t for t in tiers if new_counts[t] < desired[t]]
        if grow:
            blocked = self._capacity_problems({t: 1 for t in grow})
            if blocked:
                message = f"pairwise swap waiting for GPUs: {'; '.join(blocked)}"
                self._phase("Swapping", f"pairwise swap: {summary}; {message}")
                self.problem = (ROLLOUT, False, "BlockedOnCapacity", message)
                self.requeue = 10.0
                return
            self._apply_new(gen, {t: new_counts[t] + (1 if t in grow else 0) for t in tiers})
            self.ro["stepStartedAt"] = _now()
            self._phase("Swapping", f"pairwise swap: {summary}; adding a generation {gen} replica to {', '.join(grow)}")
            return
        # The new generation has every replica: the final switch, then the usual drain and rollback window.
        if draining:
            self._phase("Swapping", f"pairwise swap: {summary}; switching once generation "
                                    f"{self.ro['previousGeneration']} has drained")
            return
        self.ro.update({"servingGeneration": gen, "previousGeneration": serving, **self._record_switch(gen),
                        "swap": {**swap, "generation": ""}, "errorRate": self._kept_error_counts(gen)})
        self._phase("Draining", f"pairwise swap complete: traffic on generation {gen}; generation {serving} drains")
        self._event("Normal", "Switched", f"pairwise swap complete: generation {gen} serves with all replicas; "
                                          f"generation {serving} drains and is kept for rollback")

    def _apply_new(self, gen: str, counts: dict[str, int]) -> bool:
        """Apply the new generation at `counts` replicas per tier; True when that failed (rolled back)."""
        children = generation_children(self.target, self.derived)
        for child in children:
            tier = (child["metadata"].get("labels") or {}).get(LABEL_TIER)
            if child["kind"] == "StatefulSet" and tier in counts:
                child["spec"]["replicas"] = counts[tier]
        failure = self.r._apply_all(children, self.ns, self.changed, prefix=f"new generation {gen}: ")
        if failure:
            self._rollback(gen, failure)
            return True
        self.generations = self.r._generations(self.ns, self.name)
        self._pod_list = None
        return False


def _in_flight_text(in_flight: int | None) -> str:
    if in_flight is None:
        return "requests in flight unknown: a scheduler did not answer"
    return f"{in_flight} request(s) in flight"
