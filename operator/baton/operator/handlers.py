"""kopf wiring: one reconcile loop per DisaggregatedModel, woken by changes to it or its children.

Each DisaggregatedModel gets an asyncio task that runs `Reconciler.reconcile` in a worker thread, then
sleeps until something relevant changes (the object's generation or annotations, or one of its
children) or its resync interval passes. One loop per object means passes for one model never
overlap, and a burst of events collapses into a single pass. A loop is for one object (its
metadata.uid), not a name: a model deleted and created again gets a new loop, whose first pass waits
for the old loop's pass still running in its thread (a thread cannot be cancelled), and that pass
writes nothing more once its loop stopped (`Kube.stopping_on`).

kopf's own bookkeeping (progress, finalizer) is kept in annotations under Baton's prefix: the CRD's
structural schema would prune anything kopf wrote into an undeclared status field. With only event
handlers there is no diff base to keep, and no per-object record for children (bookkeeping.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf
import prometheus_client

from baton.api.v1alpha1 import GROUP, PLURAL, VERSION
from baton.operator import memory, metrics, watchguard
from baton.operator.bookkeeping import NoDiffBase
from baton.operator.cache import ChildCache
from baton.operator.kube import CHILD_KINDS, Kube, api_resource
from baton.operator.pausing import gate as pause_gate
from baton.operator.reconciler import CHILD_LIST_SECONDS, Reconciler
from baton.render.naming import LABEL_MODEL, MANAGED_BY, label_selector

PREFIX = GROUP
log = logging.getLogger("baton.operator")
_CHILD_FILTER = {"app.kubernetes.io/managed-by": MANAGED_BY}


@dataclass
class ModelLoop:
    """A model's reconcile loop: its task, the metadata.uid of the model it is for (a model deleted and created
    again under the name is another), and the event set when it is stopped (its pass writes no more)."""

    task: asyncio.Task
    uid: str
    stop: threading.Event = field(default_factory=threading.Event)


class _Runtime:
    """Process-wide state, built at start-up (so importing this module has no side effects)."""

    kube: Kube | None = None
    reconciler: Reconciler | None = None
    cache: ChildCache = ChildCache()
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    triggers: dict[tuple[str, str], asyncio.Event] = {}
    loops: dict[tuple[str, str], ModelLoop] = {}
    passes: set[concurrent.futures.Future] = set()  # reconcile passes submitted to the executor, not ended
    running: dict[tuple[str, str], concurrent.futures.Future] = {}  # the latest pass of each name
    stalled: set[tuple[str, str]] = set()  # models whose last pass found them Stalled
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    pause_follower: asyncio.Task | None = None
    trimmer: asyncio.Task | None = None


runtime = _Runtime()
# kopf builds its pause state when the operator starts, after this module is imported: hook in first.
pause_gate.install()
# A namespace being deleted refuses the watch (its Role goes first): that must not stop the operator.
watchguard.install()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    memory.tune_allocator()  # before the reconcile threads start
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    # Only event handlers here: no diff base to build (a deep copy per event) or store (bookkeeping.py).
    settings.persistence.diffbase_storage = NoDiffBase()
    watch_only_batons_objects(settings)
    # Baton posts its own Events (reasons users can search for); kopf's are for warnings only.
    settings.posting.level = logging.WARNING
    server_timeout = int(os.environ.get("BATON_WATCH_SERVER_TIMEOUT", "300"))  # an integer: timeoutSeconds
    settings.watching.server_timeout = server_timeout
    settings.watching.client_timeout = server_timeout + 30
    settings.watching.connect_timeout = 10
    # The initial listing in pages: a restart among a thousand models lists 12,000 children, and one
    # unpaged answer per kind is parsed whole (tens of MB of dicts at once) before any is handled.
    # Measured on such a restart, peak RSS: unpaged 317 MiB, pages of 250 163 MiB, of 50 137 MiB.
    settings.watching.chunk_size = 50
    settings.networking.request_timeout = 60
    # kopf's backstop for a stop that hangs: SIGKILL this long after stopping began (kopf's default is ten
    # minutes). A watch stream that fails for good stops the operator but leaves kopf's other watchers
    # running until its hung-task sweep cancels them, and that sweep can cancel a watcher's job-cleaning
    # task before the watcher waits on it, which never ends. A clean stop takes 5 to 7 s. 0: never killed.
    exit_timeout = float(os.environ.get("BATON_EXIT_TIMEOUT_SECONDS", "30"))
    settings.process.ultimate_exiting_timeout = exit_timeout if exit_timeout > 0 else None
    # kopf keeps a worker task per object for this long after its last event; thousands of children
    # change at once when many models start (or are listed at a restart), and idle workers are pure
    # memory (1.0 s -> 0.1 s: 8 MiB less peak RSS on a restart among 1,000 models).
    settings.queueing.idle_timeout = 0.1
    workers = int(os.environ.get("BATON_RECONCILE_WORKERS", "8"))
    runtime.kube = Kube()
    runtime.cache = ChildCache(gone_seconds=CHILD_LIST_SECONDS)
    if os.environ.get("BATON_METRICS_ADDRESS"):
        host, _, port = os.environ["BATON_METRICS_ADDRESS"].rpartition(":")
        metrics.watch_client(runtime.kube)
        metrics.watch_cache(runtime.cache)
        prometheus_client.start_http_server(int(port), addr=host, registry=metrics.REGISTRY)
    runtime.reconciler = Reconciler(runtime.kube, runtime.cache)
    runtime.executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")


@kopf.on.startup()
async def start_pause_follower(**_: Any) -> None:
    runtime.pause_follower = asyncio.create_task(follow_pauses(), name="baton pause follower")
    runtime.trimmer = asyncio.create_task(trim_memory(), name="baton memory trimmer")


async def trim_memory(interval: float = 15.0) -> None:
    """Hand memory freed after bursts of events (many models starting at once) back to the system."""
    while True:
        await asyncio.sleep(interval)
        memory.trim()


# A pass reads and applies with a 10 s connect and 60 s answer limit per call: this covers one stuck call.
PASS_DRAIN_SECONDS = 90.0


async def _passes_ended() -> None:
    """Wait for the passes already under way in reconcile threads (a thread cannot be cancelled): each writes
    what it reads and applies into the cache, and a write landing after the cache was emptied for a pause
    would outlive a deletion made while paused, which brings no event."""
    running = [asyncio.wrap_future(f) for f in list(runtime.passes)]
    if not running:
        return
    done, pending = await asyncio.wait(running, timeout=PASS_DRAIN_SECONDS)
    for ended in done:
        if not ended.cancelled():
            ended.exception()  # retrieved (the loop that started the pass logs it)
    if pending:
        log.warning("%d reconcile passes still running %.0fs after pausing; emptying the cache anyway",
                    len(pending), PASS_DRAIN_SECONDS)


async def follow_pauses() -> None:
    """Stop every model loop while kopf pauses this replica for a peer; kopf restarts them on resume.

    On resume kopf lists every watched object again, so `model_event` starts the loops afresh and
    the child cache fills again. The cache is emptied while paused, once the passes under way have
    ended: deletions that happened in the meantime produce no event, and a cold cache only costs reads.
    """
    while True:
        await pause_gate.wait(True)
        log.info("paused in favour of a peer: stopping %d model loops", len(runtime.loops))
        for key in list(runtime.loops):
            _stop_loop(key)
        await _passes_ended()
        runtime.cache.clear()
        await pause_gate.wait(False)
        log.info("resumed: model loops restart as kopf lists the models again")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the ServiceAccount. Elsewhere: $KUBECONFIG (or ~/.kube/config), read at login time."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    for task in (runtime.pause_follower, runtime.trimmer):
        if task:
            task.cancel()
    for key in list(runtime.loops):
        _stop_loop(key)
    if runtime.executor:
        runtime.executor.shutdown(wait=False, cancel_futures=True)


WAKE_COALESCE_SECONDS = 0.2
# The longest wait before retrying a pass that failed (then +-10%, as every wait of a loop); the
# BatonReconcileErrors alert's window is sized on it.
ERROR_BACKOFF_MAX_SECONDS = 300.0


def _wake(namespace: str | None, name: str | None) -> None:
    if namespace and name and (namespace, name) in runtime.triggers:
        runtime.triggers[(namespace, name)].set()


async def reconcile_loop(namespace: str, name: str, uid: str | None = None,
                         stop: threading.Event | None = None) -> None:
    """Reconcile one model (the object of metadata.uid `uid`) until it is deleted or the operator stops;
    sleep between passes. `stop` is set when the loop is stopped (`_stop_loop`)."""
    key = (namespace, name)
    trigger = runtime.triggers[key] = asyncio.Event()
    loop = asyncio.get_running_loop()
    failures = 0
    try:
        while not pause_gate.paused:
            trigger.clear()
            try:
                with metrics.RECONCILE_SECONDS.time():
                    outcome = await _run_pass(loop, namespace, name, uid, stop)
                metrics.RECONCILES.labels("stalled" if outcome.failed else "transient" if outcome.transient
                                          else "ok").inc()
                if not outcome.transient:
                    _note_stalled(key, bool(outcome.failed) and not outcome.gone)
                if outcome.gone:
                    break
                delay = outcome.requeue_after
                failures = 0
            except Exception:  # an API outage or a bug must not kill the loop: back off and retry
                metrics.RECONCILES.labels("error").inc()
                failures += 1
                delay = min(ERROR_BACKOFF_MAX_SECONDS, 2.0**failures)
                log.exception("reconcile of %s/%s failed; retrying in %.0fs", namespace, name, delay)
            try:
                await asyncio.wait_for(trigger.wait(), timeout=delay * random.uniform(0.9, 1.1))
                # Woken by an event: let the rest of its burst land (creating a model's children brings a
                # dozen watch events back within milliseconds), so one pass serves them all.
                await asyncio.sleep(WAKE_COALESCE_SECONDS)
            except asyncio.TimeoutError:
                pass
    finally:
        # A model deleted and created again at once can have its next loop by now (a cancelled loop may end
        # after the next one started): what is registered for the model is then that loop's, and stays.
        if runtime.triggers.get(key) is trigger:
            runtime.triggers.pop(key)
        own = runtime.loops.get(key)
        if own is not None and own.task is asyncio.current_task():
            runtime.loops.pop(key)  # ended by itself (the model is gone): a new one starts if it comes back
            _forget_model(key)


def _note_stalled(key: tuple[str, str], stalled: bool) -> None:
    """Keep `baton_operator_models_stalled` (what the BatonModelStalled alert reads) current: a gauge, not a
    rate of stalled passes, which a stalled model makes only once per resync period."""
    if stalled:
        runtime.stalled.add(key)
    else:
        runtime.stalled.discard(key)
    metrics.STALLED_MODELS.set(len(runtime.stalled))


def _forget_model(key: tuple[str, str]) -> None:
    """Drop what the operator keeps about a model whose loop ends."""
    _note_stalled(key, False)
    runtime.seen.pop(key, None)
    runtime.cache.forget_model(*key)
    if runtime.reconciler is not None:
        runtime.reconciler.forget(*key)


def _forget_unless_looped(key: tuple[str, str]) -> None:
    """After a pass that outlived its loop: forget what it wrote, unless a new loop (the model created again)
    owns the model now."""
    if key not in runtime.loops:
        _forget_model(key)


# While a new loop waits for the pass of an earlier loop of the same name, it says so this often.
PASS_WAIT_NOTE_SECONDS = 30.0


async def _after_earlier_pass(key: tuple[str, str]) -> None:
    """Wait for the pass an earlier loop of this name (its model deleted, or the operator paused) left running
    in its thread: two passes of one name must never run at once. Its writes stop once its loop stopped; the
    reads it is in the middle of end within their timeouts."""
    earlier = runtime.running.get(key)
    if earlier is None or earlier.done():
        return
    waiting = asyncio.wrap_future(earlier)
    while True:
        done, _ = await asyncio.wait([waiting], timeout=PASS_WAIT_NOTE_SECONDS)
        if done:
            if not waiting.cancelled():
                waiting.exception()  # retrieved (the loop that started the pass logged it)
            return
        log.warning("reconcile of %s/%s waits for a pass of its previous loop to end", *key)


async def _run_pass(loop: asyncio.AbstractEventLoop, namespace: str, name: str, uid: str | None = None,
                    stop: threading.Event | None = None) -> Any:
    """One reconcile pass in the executor, known to `runtime.passes` until it ends (even if its loop is
    cancelled first: the thread goes on), and to `runtime.running` as its name's latest pass."""
    assert runtime.executor is not None and runtime.reconciler is not None
    key = (namespace, name)
    await _after_earlier_pass(key)
    running = runtime.executor.submit(runtime.reconciler.reconcile, namespace, name, uid=uid, stop=stop)
    runtime.passes.add(running)
    runtime.running[key] = running

    def ended(f: concurrent.futures.Future) -> None:
        runtime.passes.discard(f)
        if runtime.running.get(key) is f:
            runtime.running.pop(key)

    def tell(callback: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first (the operator stopped): nothing to tell
            loop.call_soon_threadsafe(callback, *args)

    running.add_done_callback(lambda f: tell(ended, f))
    try:
        return await asyncio.wrap_future(running)
    except asyncio.CancelledError:
        # The loop is stopping (its model deleted) while the thread goes on: what the pass writes when it ends
        # (the reconciler's per-model records, the cache entries of its applies) comes after the loop forgot
        # the model, and would stay for good.
        running.add_done_callback(lambda f: tell(_forget_unless_looped, (namespace, name)))
        raise


def _loop_uid(key: tuple[str, str]) -> str | None:
    """The metadata.uid of the model a name's loop is for (None: no loop)."""
    loop = runtime.loops.get(key)
    return loop.uid if loop is not None else None


def _stop_loop(key: tuple[str, str]) -> None:
    """Stop a model's loop and forget the model at once: a loop started for it from now on (the model created
    again) starts afresh, whenever this one gets to end. The pass it may have running writes nothing more."""
    loop = runtime.loops.pop(key, None)
    if loop is not None:
        loop.stop.set()
        loop.task.cancel()
        _forget_model(key)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def model_event(body: kopf.Body, name: str, namespace: str, type: str, **_: Any) -> None:
    """Start a model's loop when it appears, wake it on changes that matter, stop it when it goes.

    No finalizer is needed: children carry ownerReferences and the garbage collector removes them,
    so deleting a model never waits for the operator (or hangs while it is down).
    """
    meta = body.get("metadata", {})
    key = (namespace, name)
    uid = meta.get("uid") or ""
    if type == "DELETED" or meta.get("deletionTimestamp"):
        if not uid or _loop_uid(key) in (None, "", uid):  # not a later model's of that name
            _stop_loop(key)
        return
    if pause_gate.paused:  # an event kopf delivered as it paused: the replica in charge handles it
        return
    if uid and _loop_uid(key) not in (None, "", uid):
        # Another object of that name than the loop's: the model was deleted and created again, and its
        # DELETED event never came (a watch that was down, re-listing).
        log.info("%s/%s was created again (uid %s): its reconcile loop starts afresh", namespace, name, uid)
        _stop_loop(key)
    if key not in runtime.loops or runtime.loops[key].task.done():
        stop = threading.Event()
        task = asyncio.create_task(reconcile_loop(namespace, name, uid or None, stop), name=f"reconcile {namespace}/{name}")
        runtime.loops[key] = ModelLoop(task, uid, stop)
    # Status writes (Baton's own) change neither generation nor annotations: they need no new pass.
    # Hashed: annotations can hold a whole manifest (kubectl's last-applied-configuration).
    fingerprint = (meta.get("generation"), hash(frozenset((meta.get("annotations") or {}).items())))
    if runtime.seen.get(key) != fingerprint:
        runtime.seen[key] = fingerprint
        _wake(namespace, name)


async def _child_event(body: kopf.Body, namespace: str, type: str, **_: Any) -> None:
    obj = dict(body)
    meta = obj.get("metadata", {})
    if type == "DELETED":
        runtime.cache.forget(obj.get("kind", ""), namespace, meta.get("name", ""), meta.get("resourceVersion"))
    else:
        runtime.cache.put(obj)
    _wake(namespace, (meta.get("labels") or {}).get(LABEL_MODEL))


# Every kind Baton renders is watched: changes wake the owner's loop and keep the cache current.
CHILD_RESOURCES = tuple(api_resource(kind) for kind in CHILD_KINDS)
for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=_CHILD_FILTER, id=f"child-{_plural}")(_child_event)
# Pods are not watched: they grow with replicas, not models, and the operator needs them only while a
# model is unsettled or rolling out; it lists a model's pods then (Reconciler.model_pods). Pod
# readiness still wakes a model through its StatefulSets' and Deployment's status.


def watch_only_batons_objects(settings: kopf.OperatorSettings) -> None:
    """Filter the child watch streams on the server, not only in the handlers.

    Without this kopf streams every ConfigMap and Service in the watched namespaces (the whole
    cluster for a cluster-wide operator) and keeps a record of each; with it the operator's memory
    and CPU follow the number of models, not the size of the cluster.
    """
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = label_selector(_CHILD_FILTER)
