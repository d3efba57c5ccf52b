"""Reconcile one DisaggregatedModel: read it, render its children, write only what differs, report.

Level-triggered: every pass starts from the object and the cluster as they are now, so a missed
event, a restart or a hand edit of a child all end the same way. A pass that finds everything in
place makes no write at all (no apply, no status patch, no Event).

The steps, each able to end the pass early:
1. read the DisaggregatedModel (gone or being deleted: nothing to do, ownerReferences clean up);
2. parse and check the spec beyond what the CRD schema can say; a spec Baton cannot serve is reported
   (Stalled, an Event) and the children that are already serving are left as they are, but for their
   replica counts: those still follow the spec's (an autoscaler, `kubectl scale`) when the spec parses;
3. render the children and server-side apply each one that is missing or differs (drift repaired);
4. compute status from the live children and patch it if anything changed.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from baton import __version__
from baton.api.v1alpha1 import read_model
from baton.operator import diff, events, status
from baton.operator.cache import ChildCache
from baton.operator.kube import CHILD_KINDS, Kube, PassStopped, api_error_message
from baton.operator.rollout_pass import (
    ANNOTATION_RETRY,
    ANNOTATION_ROLLBACK,
    HANDLED,
    NO_PROBE,
    ROLLOUT,
    RolloutPass,
    _fingerprints,
    _replicas,
    _swap_sized,
    generation_children,
    handled_condition,
    handled_value,
    in_place_held_back,
    rendered_generation_config,
)
from baton.operator.validation import REASON_REVISION_NOT_PINNED, spec_problems, unpinned_revision_warning
from baton.render import render_shared
from baton.render.derived import derive
from baton.render.scheduler import generation_config_of_configmap
from baton.render.naming import (
    ANNOTATION_RENDERED,
    LABEL_GENERATION,
    LABEL_MODEL,
    MANAGED_BY,
    Target,
    child_name,
    label_selector,
    revision,
    selector_labels,
)

log = logging.getLogger("baton.operator")

RESYNC_SECONDS = float(os.environ.get("BATON_RESYNC_SECONDS", "60"))
REASON_BUDGET_NOT_APPLIED = "DisruptionBudgetNotApplied"  # a Warning Event; the model is not stalled for it
# How often (on average; each model's own, jittered) a model's cached children are checked against a list:
# a deletion the watch missed (kopf lists again after a gap, and a list carries no deletions) leaves a
# child the cache still holds, which no pass would then re-create.
CHILD_LIST_SECONDS = float(os.environ.get("BATON_CHILD_LIST_SECONDS", "600"))
# A child Baton has to update again on this many passes in a row is being changed back by another writer.
DRIFT_PASSES = 3
PROGRESS_SECONDS = 5.0
UNSCHEDULABLE_CHECK_SECONDS = 15.0


@dataclass
class Outcome:
    """When to look again: soon while children converge, later once settled, backing off on errors."""

    requeue_after: float
    writes: int = 0
    failed: bool = False
    transient: bool = False  # the pass hit a transient API error and was cut short (retried with backoff)
    gone: bool = False  # the model no longer exists (or is being deleted): its loop ends


def _short(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


class TransientApiError(kopf.TemporaryError):
    """The API server could not take a write right now (overload, a timeout, a conflict): the pass ends
    without touching status, and the reconcile loop retries it with backoff. Nothing is rolled back and
    nothing is reported Stalled: the spec is fine."""


def transient(exc: ApiException) -> bool:
    """True for API errors that say "not now" rather than "never": 5xx (etcd timeouts, an unavailable
    webhook), 429 (API priority and fairness), 409 (a conflicting write) and no status at all (the
    connection failed). 400/422 (an invalid object), 403, 404 and the like are for the user to fix."""
    code = int(exc.status or 0)
    return code == 0 or code in (409, 429) or code >= 500


def raise_if_transient(exc: ApiException, what: str) -> None:
    """A transient API error (see `transient`) on `what` ends the pass as a TransientApiError."""
    if transient(exc):
        raise TransientApiError(f"{what}: {api_error_message(exc)}", delay=2) from exc


class Reconciler:
    def __init__(self, kube: Kube, cache: ChildCache | None = None):
        self.kube = kube
        self.cache = cache
        self.child_list_seconds = CHILD_LIST_SECONDS
        self._children_due: dict[tuple[str, str], float] = {}  # model -> when its cached children are listed
        # model -> (its metadata.generation, child -> passes in a row it was updated at that generation)
        self._updated: dict[tuple[str, str], tuple[Any, dict[str, int]]] = {}
        # model -> (listed at, (unschedulable pods, failing containers))
        self._unschedulable: dict[tuple[str, str], tuple[float, tuple[list[str], list[str]]]] = {}
        self._fresh = threading.local()  # .model: the pass is the first one of a model no operator has reconciled
        self._transient: dict[tuple[str, str], int] = {}  # model -> transient API errors in a row
        # model -> (its metadata.generation, when, what was refused) of its disruption budgets' last refusal
        self._budgets_refused: dict[tuple[str, str], tuple[Any, float, str]] = {}
        self._uids: dict[tuple[str, str], str] = {}  # model -> the metadata.uid the records above are of
        self._unknown_fields: dict[tuple[str, str], list[str]] = {}  # model -> fields said to be unknown

    def _apply_budgets(self, body: dict, budgets: list[dict], changed: list[str]) -> None:
        """The disruption budgets protect what serves but are not needed to serve: one the API server refuses
        (a policy, RBAC without poddisruptionbudgets) is a Warning Event, never a reason to stall the model.
        After a refusal they are tried again only when the spec changes or every child-listing period, and
        the Warning is posted when what is refused changes: a settled pass makes no write for them."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        last = self._budgets_refused.get(key)
        now = time.monotonic()
        if last is not None and last[0] == meta.get("generation") and now - last[1] < self.child_list_seconds:
            return
        refusals = []
        for budget in budgets:  # each on its own: one refused does not keep the others back
            try:
                refused = self._apply_all([budget], meta["namespace"], changed)
            except ApiException as exc:  # reading it was refused (a 403 on a cache miss)
                raise_if_transient(exc, _short(budget))
                refused = f"{_short(budget)} could not be read: {api_error_message(exc)}"
            if refused:
                refusals.append(refused)
        if not refusals:
            self._budgets_refused.pop(key, None)
            return
        message = "; ".join(refusals)
        if last is None or last[2] != message:
            events.record(self.kube, body, "Warning", REASON_BUDGET_NOT_APPLIED,
                          f"{message}; the model serves without them (with your own budgets over Baton's pods, or "
                          "without RBAC for them, install the chart with operator.disruptionBudgets: false)")
        self._budgets_refused[key] = (meta.get("generation"), now, message)

    def _new_model(self) -> bool:
        return getattr(self._fresh, "model", False)

    def _read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A child as last seen by the watch streams, else as the API server has it. A model that has never
        been reconciled (no status yet) has no children worth a GET: a miss is taken as absent, and the
        apply that follows (server-side apply: create or update) is right either way."""
        if self.cache is not None:
            cached = self.cache.get(kind, namespace, name)
            if cached is not None:
                return cached
            if self._new_model():
                return None
        return self.kube.get(kind, namespace, name)

    def reconcile(self, namespace: str, name: str, uid: str | None = None,
                  stop: threading.Event | None = None) -> Outcome:
        """One pass. A transient API error ends it early with nothing decided (no rollback, no Stalled, no
        status write) and a retry after a backoff: 1 s, 2 s, 4 s... up to 60 s.

        `uid`: the model's metadata.uid when its loop started; a model of that name with another uid (deleted
        and created again) is not this loop's, and the pass ends as for a deleted one. `stop`: set when the
        loop stops (see `Kube.stopping_on`); the pass then writes nothing more. Passes of one name never run
        at once (the loops see to it), so what passes remember of a model can be dropped here when its uid
        changes."""
        key = (namespace, name)
        if uid is not None and self._uids.get(key) != uid:
            self.forget(namespace, name)  # what passes remembered of an earlier model of that name
            self._uids[key] = uid
        try:
            with self.kube.stopping_on(stop):
                outcome = self._reconcile(namespace, name, uid)
        except PassStopped as exc:
            log.info("reconcile of %s/%s stopped before it ended, its loop stopped (%s)", namespace, name, exc)
            return Outcome(requeue_after=RESYNC_SECONDS, gone=True)
        except TransientApiError as exc:
            failures = self._transient.get(key, 0) + 1
            self._transient[key] = failures
            delay = min(60.0, float(2 ** (failures - 1)))
            log.warning("reconcile of %s/%s hit a transient API error (%s); retrying in %.0fs", namespace, name, exc, delay)
            return Outcome(requeue_after=delay, writes=0, transient=True)
        self._transient.pop(key, None)
        return outcome

    def _note_unknown_fields(self, namespace: str, name: str, unknown: list[str]) -> None:
        """Say once (per model and set of fields) that the model has fields this operator does not know."""
        key = (namespace, name)
        if not unknown:
            self._unknown_fields.pop(key, None)
            return
        if self._unknown_fields.get(key) != unknown:
            self._unknown_fields[key] = unknown
            log.warning("%s/%s has fields this operator (Baton %s) does not know, ignored: %s; the CRD installed is "
                        "newer than the operator: upgrade the operator to the CRD's version (or apply its own CRD)",
                        namespace, name, __version__, ", ".join(unknown))

    def forget(self, namespace: str, name: str) -> None:
        """Drop what passes remember of a model (its model loop ended: deleted, or stopped): a model created
        again under the name starts afresh."""
        self._unschedulable.pop((namespace, name), None)
        self._transient.pop((namespace, name), None)
        self._budgets_refused.pop((namespace, name), None)
        self._children_due.pop((namespace, name), None)
        self._updated.pop((namespace, name), None)
        self._uids.pop((namespace, name), None)
        self._unknown_fields.pop((namespace, name), None)

    def _note_updates(self, body: dict, changed: list[str]) -> None:
        """Warn (DriftNotConverging) of a child this pass updated for the DRIFT_PASSES-th pass in a row: some
        other writer (a controller, a mutating admission policy) keeps changing fields Baton sets, and each
        pass puts them back. Baton goes on applying what the spec says; the warning names the objects."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        generation = meta.get("generation")
        seen_generation, before = self._updated.get(key, (None, {}))
        if seen_generation != generation:
            before = {}  # the spec changed since (an edit, GitOps syncing): updates are expected, not drift
        now = {what: before.get(what, 0) + 1 for what in (c.rsplit("updated ", 1)[-1] for c in changed if "updated " in c)}
        if now:
            self._updated[key] = (generation, now)
        else:
            self._updated.pop(key, None)
        stuck = sorted(what for what, passes in now.items() if passes == DRIFT_PASSES)
        if stuck:
            events.record(self.kube, body, "Warning", "DriftNotConverging",
                          f"{', '.join(stuck)} had to be updated again on {DRIFT_PASSES} passes in a row: another "
                          "writer (a controller, a mutating admission policy) keeps changing fields Baton sets, and "
                          "Baton keeps setting them back. Find it in the objects' managedFields (kubectl get "
                          "--show-managed-fields -o yaml) and stop it, or express the change in the model's spec")

    def _list_cached_children(self, namespace: str, name: str) -> None:
        """Every `child_list_seconds` or so (the first time at a random point of that period, so that models
        started together do not list together), list the model's children of each kind from the API
        server's watch cache and drop the cached ones whose deletion the watch missed: the pass then reads
        them as absent and applies them again."""
        key = (namespace, name)
        now = time.monotonic()
        due = self._children_due.get(key)
        if due is None:  # this operator's first pass of the model: its children came with the watch's listing
            self._children_due[key] = now + self.child_list_seconds * random.uniform(0.5, 1.5)
            return
        if now < due:
            return
        self._children_due[key] = now + self.child_list_seconds * random.uniform(0.75, 1.25)
        assert self.cache is not None
        selector = label_selector({LABEL_MODEL: name, "app.kubernetes.io/managed-by": MANAGED_BY})
        for kind in CHILD_KINDS:
            try:
                objects, version = self.kube.list_recent(kind, namespace, selector)
            except Exception as exc:  # noqa: BLE001 - the pass goes on from the cache; tried again in a minute
                self._children_due[key] = now + min(60.0, self.child_list_seconds)
                log.warning("listing the %ss of %s/%s to check the cache failed: %s", kind, namespace, name, exc)
                return
            dropped = self.cache.resync(kind, namespace, name, objects, version)
            if dropped:
                log.warning("%s/%s: %s %s deleted while the watch was away; reading from the API server",
                            namespace, name, kind, ", ".join(dropped))

    def _reconcile(self, namespace: str, name: str, uid: str | None = None) -> Outcome:
        body = self.kube.get("DisaggregatedModel", namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            # Deleted, also while the watch was down and its DELETED event never came: the loop ends.
            self.forget(namespace, name)
            return Outcome(requeue_after=RESYNC_SECONDS, gone=True)
        if uid is not None and body["metadata"].get("uid") != uid:
            # Deleted and created again: the new model has a loop of its own (its ADDED event), which this
            # one must not act for. What passes remember is the new model's from its first pass on.
            return Outcome(requeue_after=RESYNC_SECONDS, gone=True)
        meta = body["metadata"]
        generation = int(meta.get("generation", 0))
        previous = body.get("status") or {}
        writes_before = self.kube.writes()
        self._fresh.model = "observedGeneration" not in previous
        if self.cache is not None and not self._new_model():
            self._list_cached_children(namespace, name)

        try:
            model, unknown = read_model(body)
        except ValidationError as exc:
            # The CRD schema normally stops this at admission; an older CRD may not have.
            problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
            return self._stalled(body, status.REASON_INVALID_SPEC, "; ".join(problems), previous, generation)

        self._note_unknown_fields(namespace, name, unknown)
        spec = model.spec
        target = Target(name=name, namespace=namespace, uid=meta["uid"], spec=spec)
        problems = spec_problems(spec)
        if problems:
            return self._stalled(body, status.REASON_INVALID_SPEC, "; ".join(problems), previous, generation, target=target)

        derived = derive(spec)
        mismatches = derived.kv_mismatches()
        if mismatches:
            # The static gate: TensorRT-LLM would only find out at the first KV handoff, failing
            # every disaggregated request. Refuse before touching anything that serves.
            fields = "; ".join(f"{m.field}: prefill={m.context}, decode={m.generation}" for m in mismatches)
            message = (f"prefill and decode would not be able to hand off KV cache ({fields}); "
                       "make these fields equal on both tiers (engine.* or the tiers' engineOverrides)")
            return self._stalled(body, status.REASON_KV_FORMAT_MISMATCH, message, previous, generation,
                                 extra=[(status.KV_FORMAT_COMPATIBLE, False, status.REASON_KV_FORMAT_MISMATCH, message)],
                                 target=target)
        kv_ok = [(status.KV_FORMAT_COMPATIBLE, True, status.REASON_KV_FORMAT_MATCH,
                  f"both tiers share KV format {derived.fingerprint('prefill')}")]
        if previous.get("observedGeneration") != generation:  # once per spec change, not every pass
            warning = unpinned_revision_warning(spec)
            if warning:
                events.record(self.kube, body, "Warning", REASON_REVISION_NOT_PINNED, warning)

        # Shared objects (tier Services, scheduler) and the spec's generation.
        gen = derived.generation
        ro = dict(previous.get("rollout") or {})
        serving = ro.get("servingGeneration", "")
        generations = self._generations(namespace, name)
        annotations = meta.get("annotations") or {}
        changed: list[str] = []
        # The scheduler config's generation-bound settings (served model name, runtime, KV transfer
        # compression) are those of the generation that serves; the rest follows the spec at once.
        shared = render_shared(target, self._serving_generation_config(target, gen, serving, generations))
        # First deployment, or a change that keeps the KV format and engine: the generation's children roll
        # in place, in one all-or-nothing batch with the shared objects (a refusal of any leaves all as they were).
        in_place = not serving or gen == serving
        budgets = [c for c in shared if c["kind"] == "PodDisruptionBudget"]
        shared = [c for c in shared if c["kind"] != "PodDisruptionBudget"]
        children = generation_children(target, derived, generations.get(gen)) if in_place else []
        failure = self._apply_all(shared + children, namespace, changed, prefix="in place: ")
        if failure:
            return self._stalled(body, status.REASON_APPLY_FAILED, failure, previous, generation, target=target)
        self._apply_budgets(body, budgets, changed)

        # The control annotations, each acted on once per value (see rollout_pass.HANDLED).
        conditions = previous.get("conditions") or []
        handled: list[tuple[str, bool, str, str]] = []
        forget = [HANDLED[a] for a in HANDLED if not annotations.get(a) and handled_value(conditions, a)]
        rollback_request = self._rollback_request(annotations, conditions)
        retry = annotations.get(ANNOTATION_RETRY, "")
        if retry and retry != handled_value(conditions, ANNOTATION_RETRY):
            if gen == ro.get("failedGeneration") and retry == gen and gen != serving:
                # Try the failed generation again from the start: new StatefulSets, a new probe, a new deadline.
                if gen in generations:
                    self.delete_generation(namespace, name, gen)
                    generations.pop(gen)
                ro.update({"failedGeneration": "", "targetGeneration": "", "startedAt": "", "probe": dict(NO_PROBE)})
                handled.append(handled_condition(ANNOTATION_RETRY, retry, f"generation {gen} retried"))
            else:
                handled.append(handled_condition(ANNOTATION_RETRY, retry, f"generation {retry} is not a failed generation of this spec"))

        if (gen == ro.get("failedGeneration") and gen != serving and ro.get("failedRevision")
                and ro["failedRevision"] != revision(spec)):
            # The spec changed since the generation failed, in something that shapes its pods but not its
            # generation key (env, resources, pod template): it is tried again from the start.
            if gen in generations:
                self.delete_generation(namespace, name, gen)
                generations.pop(gen)
            ro.update({"failedGeneration": "", "failedRevision": "", "targetGeneration": "", "startedAt": "",
                       "probe": dict(NO_PROBE)})
            changed.append(f"generation {gen} tried again: the spec changed since it failed")

        rollout_state = RolloutPass(self, body, target, derived, ro, generations, changed, rollback_request)
        if in_place:  # applied above
            rollout_state.steady()
        else:
            # Another generation is targeted or failed: the spec's replica counts still reach the serving one.
            rollout_state.scale_serving()
            if gen == ro.get("failedGeneration"):  # a retry (above) clears it
                rollout_state.hold_failed()
            elif spec.rollout.strategy == "PairwiseSwap" or rollout_state.keeps_swapping():
                rollout_state.advance_pairwise()
                rollout_state.tell_strategy_waits()
            else:
                rollout_state.advance()
        rollout_state.track_serving_replicas()
        if rollback_request:
            handled.append(handled_condition(ANNOTATION_ROLLBACK, rollback_request,
                                             rollout_state.rollback_done or "no rollout of that generation in progress"))
        ro = rollout_state.ro
        if ro.get("servingGeneration", "") != serving:
            # Traffic switched in this pass (to the new generation, or back): the scheduler's
            # generation-bound settings switch with it, in the same pass as the status write.
            # (The StatefulSets as listed: what the pass holds for a rescaled one may be its Scale.)
            switched_back = bool(serving) and rollout_state.deferred_delete == serving  # the generation that served failed
            serving = ro.get("servingGeneration", "")
            failure = self._apply_all(
                render_shared(target, self._serving_generation_config(target, gen, serving,
                                                                      self._generations(namespace, name))),
                namespace, changed, prefix="switch: ")
            if failure:
                # A switch forward waits (the serving generation keeps serving). A switch back is written all
                # the same: traffic leaves the failed generation now, with the scheduler config to follow once
                # it is accepted; the failed generation is deleted only after that write (by a later pass).
                if not switched_back:
                    return self._stalled(body, status.REASON_APPLY_FAILED, failure, previous, generation)
                return self._stalled(body, status.REASON_APPLY_FAILED, failure, previous, generation,
                                     extra=[*handled, *([rollout_state.problem] if rollout_state.problem else [])],
                                     rollout=ro)
        if changed:
            events.record(self.kube, body, "Normal", "Applied", "; ".join(changed))
        self._note_updates(body, changed)

        serving = ro.get("servingGeneration", "")
        observed = status.Observed()
        current = self._generations(namespace, name)  # listed again: this pass may have created or deleted some
        live = current.get(serving, {})
        observed.prefill, observed.decode = live.get("prefill"), live.get("decode")
        observed.scheduler = self._read("Deployment", namespace, child_name(target, "scheduler"))
        # What the spec asks for, whichever generation serves; during a pairwise swap, the size the swap gives it.
        swap_sized = serving != gen and rollout_state.swap_sizes_serving()
        desired_counts = (
            _replicas(observed.prefill, spec.prefill.desired_replicas()) if swap_sized else spec.prefill.desired_replicas(),
            _replicas(observed.decode, spec.decode.desired_replicas()) if swap_sized else spec.decode.desired_replicas(),
            spec.scheduler.replicas,
        )
        settled = all(
            status.workload_settled(obj, n)
            for obj, n in zip((observed.prefill, observed.decode, observed.scheduler), desired_counts)
        )
        if not settled:
            # the serving generation's StatefulSets; before any serves (a first deployment), the spec's
            tiers = live or current.get(gen, {})
            observed.unschedulable, observed.failing = self._pod_problems(namespace, name, list(tiers.values()))
        if serving == gen:
            serving_fp = (derived.fingerprint("prefill"), derived.fingerprint("decode"))
        else:
            # Another generation serves (a rollout in progress, or one rolled back): its own fingerprints,
            # as rendered on its StatefulSets.
            good = ro.get("lastKnownGood") or {}
            fallback = ((good.get("prefillFingerprint", ""), good.get("decodeFingerprint", "")) if good.get("generation") == serving
                        else ((previous.get("prefill") or {}).get("kvFingerprint", ""), (previous.get("decode") or {}).get("kvFingerprint", "")))
            serving_fp = tuple(a or b for a, b in zip(_fingerprints(live), fallback))
        extra = list(kv_ok) + handled
        if rollout_state.problem:
            extra.append(rollout_state.problem)
        elif ro.get("phase") == "Serving" and serving and (
                rollout_state.succeeded or any(c.get("type") == ROLLOUT for c in previous.get("conditions") or [])):
            # A rollout's condition: True again once a generation serves with nothing blocked or failed.
            extra.append((ROLLOUT, True, "Serving", f"generation {serving} serves"))
        rolled_back = (rollout_state.problem[3] if rollout_state.problem
                       and rollout_state.problem[2] == status.REASON_ROLLED_BACK else "")
        new_status = status.compute(
            generation=generation,
            previous=previous,
            observed=observed,
            desired_prefill=desired_counts[0],
            desired_decode=desired_counts[1],
            desired_scheduler=desired_counts[2],
            revision=serving or gen,
            fingerprints=serving_fp,
            scheduler_endpoint=f"{child_name(target, 'scheduler')}.{namespace}.svc:{spec.scheduler.port}",
            kv_bytes_per_token=derived.kv_bytes_per_token,
            decode_kv_capacity_tokens=derived.decode_kv_capacity_tokens,
            extra=extra,
            rolling=rollout_state.rolling,
            rolling_note=in_place_held_back(serving, gen) if serving and serving != gen else "",
            drop=forget,
            rolled_back=rolled_back,
            late=rollout_state.first_deploy_late,
            selectors=(label_selector(selector_labels(target, "prefill")), label_selector(selector_labels(target, "decode"))),
        )
        new_status["rollout"] = ro
        self._write_status(body, previous, new_status)
        requeue = RESYNC_SECONDS if settled and not rollout_state.rolling else PROGRESS_SECONDS
        # A rolled-back spec is Stalled (the user must act), as is a first deployment past its deadline:
        # counted so, as the Stalled alert reads it.
        stalled = any(c.get("type") == status.STALLED and c.get("status") == "True" for c in new_status["conditions"])
        return Outcome(requeue_after=min(requeue, rollout_state.requeue), writes=self.kube.writes() - writes_before,
                       failed=stalled)

    # ------------------------------------------------------------------------------------------

    def _apply_all(self, children: list[dict], namespace: str, changed: list[str], prefix: str = "") -> str:
        """Apply what differs, all or nothing (dry run first); return the API server's refusal, if any.
        `prefix` starts what `changed` says of a generation's children (objects with a generation label)."""
        live_objects: dict[str, dict[str, Any] | None] = {}
        stale = []
        for desired in map(diff.stamp, children):
            kind, obj_name = desired["kind"], desired["metadata"]["name"]
            # What was verified against an unchanged object need not be decoded and compared again (the
            # digest `stamp` put on it identifies the rendering).
            digest = int(desired["metadata"]["annotations"][ANNOTATION_RENDERED], 16)
            if self.cache is not None and self.cache.verified(kind, namespace, obj_name) == digest:
                continue
            live = self._read(kind, namespace, obj_name)
            if diff.in_sync(desired, live):
                if self.cache is not None and live is not None:
                    self.cache.mark_verified(kind, namespace, obj_name,
                                             str(live["metadata"].get("resourceVersion", "")), digest)
                continue
            live_objects[_short(desired)] = live
            stale.append(desired)
        # A change the API server would refuse leaves every serving child exactly as it was: every
        # update is dry-run first. Creations need no dry run (nothing serves from them yet), which
        # halves the requests for a new model.
        for desired in [d for d in stale if live_objects[_short(d)] is not None]:
            try:
                self.kube.apply(desired, dry_run=True)
            except ApiException as exc:
                raise_if_transient(exc, _short(desired))
                return f"{_short(desired)} would be refused by the API server: {api_error_message(exc)}"
        for desired in stale:
            action = "created " if live_objects[_short(desired)] is None else "updated "
            try:
                live = self.kube.apply(desired)
            except ApiException as exc:
                raise_if_transient(exc, _short(desired))
                return f"{_short(desired)} was refused by the API server: {api_error_message(exc)}"
            if self.cache is not None:
                self.cache.put(live)
            generation_child = LABEL_GENERATION in (desired["metadata"].get("labels") or {})
            changed.append((prefix if generation_child else "") + action + _short(desired))
        return ""

    def _serving_generation_config(self, target: Target, gen: str, serving: str,
                                   generations: dict[str, dict[str, dict]]) -> dict[str, str] | None:
        """The generation-bound scheduler settings of the serving generation; None for the spec's own (no
        generation serves yet, or the spec's generation is the one serving). Read from the annotation its
        StatefulSets were rendered with; for a generation rendered before that annotation existed, what
        the live scheduler ConfigMap says (it was rendered while that generation served)."""
        if not serving or serving == gen:
            return None
        values = rendered_generation_config(generations.get(serving, {}))
        if values:
            return values
        live = self._read("ConfigMap", target.namespace, child_name(target, "scheduler"))
        return generation_config_of_configmap(live) or None

    def _generations(self, namespace: str, name: str) -> dict[str, dict[str, dict]]:
        """generation -> tier -> StatefulSet, for every generation of this model in the cluster."""
        objects = self.cache.list_kind("StatefulSet", namespace, name) if self.cache is not None else None
        if objects is None:
            # Not known complete: an operator that just started (its watch streams may have delivered some
            # of the model's StatefulSets and not others) or no cache. Ask the API server rather than act
            # on a partial list. A new model has none yet: what it gets, the cache records as it is written.
            new = self.cache is not None and self._new_model()
            objects = [] if new else self.kube.list("StatefulSet", namespace, f"{LABEL_MODEL}={name}")
            if self.cache is not None:
                self.cache.seed("StatefulSet", namespace, name, objects)
        out: dict[str, dict[str, dict]] = {}
        for sts in objects:
            labels = sts.get("metadata", {}).get("labels") or {}
            if labels.get(LABEL_GENERATION) and labels.get("baton.dev/tier") in ("prefill", "decode"):
                out.setdefault(labels[LABEL_GENERATION], {})[labels["baton.dev/tier"]] = sts
        return out

    def delete_generation(self, namespace: str, name: str, gen: str) -> None:
        """Delete a generation's children; a transient API error ends the pass (TransientApiError), as in
        _apply_all: the next pass, reading the cluster again, deletes what is left."""
        for tier in ("prefill", "decode"):
            for kind, suffix in (("StatefulSet", ""), ("ConfigMap", "-engine")):
                obj_name = f"{name}-{tier}{suffix}-{gen}"
                try:
                    self.kube.delete(kind, namespace, obj_name)
                except ApiException as exc:
                    raise_if_transient(exc, f"{kind}/{obj_name}")
                    raise
                if self.cache is not None:
                    self.cache.forget(kind, namespace, obj_name)

    def scale_statefulset(self, namespace: str, sts_name: str, replicas: int) -> dict[str, Any]:
        """Scale a StatefulSet through its scale subresource; a transient API error ends the pass
        (TransientApiError), as in _apply_all."""
        try:
            return self.kube.scale("StatefulSet", namespace, sts_name, replicas)
        except ApiException as exc:
            raise_if_transient(exc, f"StatefulSet/{sts_name}")
            raise


    @staticmethod
    def _rollback_request(annotations: dict[str, str], conditions: list[dict]) -> str:
        """The value of the rollback annotation not acted on yet ("" when none)."""
        value = annotations.get(ANNOTATION_ROLLBACK, "")
        return "" if value == handled_value(conditions, ANNOTATION_ROLLBACK) else value

    def _guard_drain(self, body: dict, target: Target, previous: dict) -> RolloutPass | None:
        """While the spec is refused, a generation switched to keeps its rollback protection, and a pairwise
        swap's generation schedulers route to can still be rolled back: the checks run against the live
        generations (see RolloutPass.guard_drain). None when nothing drains or is swapped to."""
        meta = body["metadata"]
        ro = dict(previous.get("rollout") or {})
        if not ro.get("previousGeneration") and not (ro.get("swap") or {}).get("generation"):
            return None
        request = self._rollback_request(meta.get("annotations") or {}, previous.get("conditions") or [])
        guard = RolloutPass(self, body, target, None, ro, self._generations(target.namespace, target.name), [], request)
        guard.guard_drain()
        return guard

    def _scale_refused(self, body: dict, target: Target, previous: dict,
                       guard: RolloutPass | None) -> dict[str, dict[str, Any]]:
        """The spec is refused as a whole but parses: its replica counts (an autoscaler or `kubectl scale`
        writing spec.<tier>.replicas through the model's scale subresource) still reach the serving
        generation's StatefulSets, through their scale subresource (as RolloutPass.scale_serving does), each
        tier at desired_replicas() and never above maxReplicas. Nothing else of the spec is applied, and a
        StatefulSet already at its count is not written. Nothing is scaled before any generation serves,
        while a pairwise swap under way sizes the serving generation (as status says, whatever strategy the
        refused spec names), nor in a pass whose drain guard switched traffic back (the next pass scales
        the generation that serves then). Returns, per tier of the serving generation, the replica numbers
        for status: its StatefulSet as listed, at the count it now has."""
        ro = guard.ro if guard is not None else (previous.get("rollout") or {})
        serving = ro.get("servingGeneration", "")
        if not serving or serving != (previous.get("rollout") or {}).get("servingGeneration"):
            return {}
        generations = guard.generations if guard is not None else self._generations(target.namespace, target.name)
        tiers = generations.get(serving, {})
        swapping = _swap_sized(ro.get("swap") or {}) and ro.get("targetGeneration", "") not in ("", serving)
        changed, numbers = [], {}
        for tier in ("prefill", "decode"):
            sts = tiers.get(tier)
            if not sts:
                continue
            now = before = _replicas(sts, 0)
            spec_tier = target.spec.tier(tier)
            want = min(spec_tier.desired_replicas(), spec_tier.max_replicas)
            if not swapping and want != before:
                sts_name = sts["metadata"]["name"]
                try:
                    self.scale_statefulset(target.namespace, sts_name, want)
                    now = want
                    changed.append(f"scaled generation {serving} {tier} from {before} to {want} replicas "
                                   "(the spec is refused: only its replica counts were applied)")
                except ApiException as exc:
                    log.warning("%s/%s: scaling StatefulSet %s to %d replicas while the spec is refused failed: %s",
                                target.namespace, target.name, sts_name, want, api_error_message(exc))
            # (A scale changes what the StatefulSet reports only later: its status as listed, at its new count.)
            live = status.tier_status(sts, now, "")
            numbers[tier] = {k: live[k] for k in ("replicas", "readyReplicas", "updatedReplicas", "summary")}
        if changed:
            events.record(self.kube, body, "Normal", "Applied", "; ".join(changed))
        return numbers

    def _stalled(self, body: dict, reason: str, message: str, previous: dict, generation: int,
                 extra: list[tuple[str, bool, str, str]] = (), target: Target | None = None,
                 rollout: dict[str, Any] | None = None) -> Outcome:
        """Report a problem the user must fix; touch no child (what serves keeps serving) but for the serving
        generation's replica counts. With the refused spec's `target` (it parses), those follow the spec
        (see _scale_refused), and a drain in progress still rolls a failing generation back (traffic only:
        the failed generation is deleted once a spec is accepted). `rollout`: what the pass decided before
        it was refused (a switch back), written all the same, with its conditions in `extra`."""
        writes_before = self.kube.writes()
        guard = self._guard_drain(body, target, previous) if target is not None else None
        tier_numbers = self._scale_refused(body, target, previous, guard) if target is not None else {}
        if guard is not None and guard.rolling:
            rollout = guard.ro
            extra = [*extra, *([guard.problem] if guard.problem else [])]
            if guard.rollback_request:
                extra.append(handled_condition(ANNOTATION_ROLLBACK, guard.rollback_request,
                                               guard.rollback_done or "no rollout of that generation in progress"))
        elif rollout is None:
            # Nothing drains or is swapped to that a rollback could act on: answer the request now rather than
            # keep it pending, unseen, to abort whatever rollout comes once the spec is accepted.
            request = self._rollback_request(body["metadata"].get("annotations") or {}, previous.get("conditions") or [])
            if request:
                extra = [*extra, handled_condition(
                    ANNOTATION_ROLLBACK, request, "nothing to roll back: no generation switched or swapped to is "
                    "draining or serving, and the spec is refused (see Stalled); traffic stays where it is")]
        new_status = dict(previous)
        observed = status.Observed(problem=(reason, message))
        computed = status.compute(
            generation=generation, previous=previous, observed=observed,
            desired_prefill=previous.get("prefill", {}).get("replicas", 0),
            desired_decode=previous.get("decode", {}).get("replicas", 0),
            desired_scheduler=0,
            revision=previous.get("revision", ""),
            fingerprints=(previous.get("prefill", {}).get("kvFingerprint", ""),
                          previous.get("decode", {}).get("kvFingerprint", "")),
            scheduler_endpoint=previous.get("schedulerEndpoint", ""),
            kv_bytes_per_token=previous.get("kvBytesPerToken", 0),
            decode_kv_capacity_tokens=previous.get("decodeKvCapacityTokens", 0),
            extra=extra,
        )
        # Keep the last observed tier numbers (they still describe what is serving), but for the replica
        # numbers of the serving StatefulSets read in this pass: what the autoscaler reads back.
        for key in ("prefill", "decode"):
            if key in previous:
                computed[key] = previous[key]
            if key in tier_numbers:
                computed[key] = {**computed[key], **tier_numbers[key]}
        new_status.update(computed)
        if rollout is not None:
            new_status["rollout"] = rollout
        old_stalled = next((c for c in previous.get("conditions", []) if c.get("type") == status.STALLED), {})
        if old_stalled.get("status") != "True" or old_stalled.get("message") != message:
            events.record(self.kube, body, "Warning", reason, message)
        self._write_status(body, previous, new_status)
        requeue = guard.requeue if guard is not None and guard.rolling else RESYNC_SECONDS
        return Outcome(requeue_after=requeue, writes=self.kube.writes() - writes_before, failed=True)

    def _write_status(self, body: dict, previous: dict, new_status: dict) -> None:
        if status.same(previous, new_status):
            return
        was_ready = next((c.get("status") for c in previous.get("conditions", []) if c.get("type") == status.READY), None)
        now_ready = next(c for c in new_status["conditions"] if c["type"] == status.READY)
        meta = body["metadata"]
        try:
            # Only into the model as this pass read it: a model changed since (its next pass sees the change)
            # or deleted and created again under the name (not this pass's to write) gets a 409, which ends
            # the pass as any conflict does.
            self.kube.patch_status(meta["namespace"], meta["name"], new_status,
                                   resource_version=str(meta.get("resourceVersion") or ""))
        except ApiException as exc:
            raise_if_transient(exc, "the model's status")
            raise
        if was_ready != now_ready["status"] and now_ready["status"] == "True":
            events.record(self.kube, body, "Normal", "Ready", now_ready["message"])

    def model_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The model's pods, listed when needed (an unsettled model, a rollout step): pods are not
        watched, so a settled model costs nothing per pod."""
        return self.kube.list("Pod", namespace, f"{LABEL_MODEL}={name}")

    def _pod_problems(self, namespace: str, name: str, statefulsets: list[dict[str, Any]] = ()
                      ) -> tuple[list[str], list[str]]:
        """Pods the scheduler cannot place, and containers that cannot start (`status.failing_containers`)
        or pods a StatefulSet could not create (`_failed_creates`), for the status message; listed at most
        every UNSCHEDULABLE_CHECK_SECONDS per model (a waiting model polls every few seconds, and hundreds
        of models starting at once would otherwise turn into hundreds of pod LISTs a second)."""
        key = (namespace, name)
        listed = self._unschedulable.get(key)
        if listed and time.monotonic() - listed[0] < UNSCHEDULABLE_CHECK_SECONDS:
            return listed[1]
        pods = self.model_pods(namespace, name)
        unschedulable = sorted(
            f"{pod['metadata']['name']}: {cond.get('message', '')}"
            for pod in pods
            for cond in pod.get("status", {}).get("conditions", []) or []
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable"
        )
        failing = sorted(line for pod in pods for line in status.failing_containers(pod))
        failing += self._failed_creates(namespace, statefulsets)
        self._unschedulable[key] = (time.monotonic(), (unschedulable, failing))
        return unschedulable, failing

    def _failed_creates(self, namespace: str, statefulsets: Any) -> list[str]:
        """Why a StatefulSet that has fewer pods than it wants could not create them (a quota, an admission
        policy, a missing service account): StatefulSets have no ReplicaFailure condition, and say so only
        in their FailedCreate Events. The latest such Event of each, listed only while pods are missing."""
        out = []
        for sts in statefulsets:
            want = int((sts.get("spec") or {}).get("replicas") or 0)
            if int((sts.get("status") or {}).get("replicas") or 0) >= want:
                continue
            sts_name, uid = sts["metadata"]["name"], sts["metadata"].get("uid", "")
            selector = f"involvedObject.kind=StatefulSet,involvedObject.name={sts_name},reason=FailedCreate"
            if uid:  # not the Events of an earlier StatefulSet of that name (a generation tried again)
                selector += f",involvedObject.uid={uid}"
            try:
                found = self.kube.list("Event", namespace, field_selector=selector)
            except ApiException as exc:  # e.g. an RBAC without it: the message goes without
                log.debug("listing the events of StatefulSet %s/%s failed: %s", namespace, sts_name, exc.reason)
                continue
            if found:
                latest = max(found, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
                out.append(f"StatefulSet {sts_name} cannot create its pods: {latest.get('message', '')}"[:300])
        return out
