"""The local cluster's readiness stand-in: the kubelet's readiness prober, for pods nothing runs.

KWOK starts pods on fake nodes, but a pod whose container declares a readinessProbe comes up with
Ready "False" (reason `ReadinessProbePending`, see kwok-stages.yaml), as on a real node until its probe
passes. Two things pass that probe:
- the pod runner, for the pods it runs as local processes: Baton's tiers and scheduler in the
  namespaces it claims (see `baton.podrunner.runner`); it probes the process and writes the result;
- this stand-in, for every other such pod: no process exists to probe, so the probe passes at once
  and the pod turns Ready, the state KWOK gives a probe-less pod straight away.

A pod a pod runner claims is never touched here while the claim holds. So a Baton pod is only Ready
once the process at its IP is its own and answers its probe, even when the pod took over the IP of a
pod deleted a moment earlier whose process had not stopped yet. The pods left to a runner are looked at
again every `RECHECK_S`: once its claim has lapsed (the runner died without withdrawing it), nothing
runs them any more and the stand-in passes the probes it never did.

Runs as a devcluster component (`baton devcluster readiness`), started by `baton devcluster up`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from baton.podrunner.runner import (
    ALL_NAMESPACES_CLAIM,
    CLAIM_ANNOTATION,
    CLAIM_HOLDER_NAMESPACE,
    claim_live,
    runs_locally,
)

log = logging.getLogger("baton.devcluster.readiness")

PROBE_PENDING = "ReadinessProbePending"
PASSED_REASON = "ReadinessStandIn"
WATCH_TIMEOUT_S = 300
RECHECK_S = 5.0  # how often the pods left to a pod runner are looked at again, while there are any
_PENDING_MARK = PROBE_PENDING.encode()
# The first resourceVersion of a watch event's line is its object's (metadata comes first).
_RESOURCE_VERSION = re.compile(rb'"resourceVersion":"([0-9]+)"')


def watch_lines(resp: Any) -> Iterator[bytes]:
    """The lines of a streamed watch response (one event per line), as bytes."""
    buffer = b""
    for piece in resp.stream(amt=None, decode_content=False):
        buffer += piece
        if b"\n" in buffer:
            *lines, buffer = buffer.split(b"\n")
            yield from (line for line in lines if line)
    if buffer:
        yield buffer


def _ready_condition(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition
    return None


def probe_pending(pod: Mapping[str, Any]) -> bool:
    """A running pod with an IP whose readiness probe has not passed yet, as KWOK started it."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ready = _ready_condition(pod)
    return (
        not meta.get("deletionTimestamp")
        and status.get("phase") == "Running"
        and bool(status.get("podIP"))
        and ready is not None
        and ready.get("status") == "False"
        and ready.get("reason") == PROBE_PENDING
    )


def claimed(pod: Mapping[str, Any], namespace_annotations: Mapping[str, str],
            holder_annotations: Mapping[str, str]) -> bool:
    """Whether a pod runner runs (and so probes) `pod`: one of the pods it runs, in a namespace it
    claimed, or anywhere when a runner claimed every namespace. A claim whose lease ran out (its runner
    died without releasing it) no longer counts."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if not runs_locally(labels):
        return False
    return claim_live(namespace_annotations.get(CLAIM_ANNOTATION)) or claim_live(
        holder_annotations.get(ALL_NAMESPACES_CLAIM))


def split_claimed(batch: list[Mapping[str, Any]], claims: Mapping[str, Mapping[str, str]]
                  ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(the pods of `batch` whose probe the stand-in passes, those a live pod-runner claim covers)."""
    holder = claims.get(CLAIM_HOLDER_NAMESPACE) or {}
    mine: list[Mapping[str, Any]] = []
    runners: list[Mapping[str, Any]] = []
    for pod in batch:
        namespace = (pod.get("metadata") or {}).get("namespace", "")
        (runners if claimed(pod, claims.get(namespace) or {}, holder) else mine).append(pod)
    return mine, runners


def passed_probe_patch(pod: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status patch a kubelet writes when every readiness probe of `pod` passes. It carries the
    pod's resourceVersion: if the pod changed since it was seen (a pod runner took it over, a test
    set its readiness), the API server refuses the patch and the pod's next event decides."""
    conditions = [
        {"type": kind, "status": "True", "reason": PASSED_REASON, "message": "no local process runs this pod; "
         "its readiness probe is taken as passed", "lastTransitionTime": now}
        for kind in ("ContainersReady", "Ready")
    ]
    statuses = [{**s, "ready": True} for s in (pod.get("status") or {}).get("containerStatuses") or []]
    patch: dict[str, Any] = {"status": {"conditions": conditions}}
    version = (pod.get("metadata") or {}).get("resourceVersion")
    if version:
        patch["metadata"] = {"resourceVersion": version}
    if statuses:
        patch["status"]["containerStatuses"] = statuses
    return patch


class ReadinessStandIn:
    """Watches every pod of the cluster and passes the readiness probe of those nothing runs.

    The watch only queues candidates; a worker takes everything queued at once, reads the namespaces'
    claims with one list made after those pods arrived (a runner claims its namespace before the first
    pod it runs exists, so that read cannot miss the claim of any pod in the batch), and writes the
    Ready conditions with a few requests in parallel. So a burst of pods (hundreds of models at once)
    costs one status write each and one namespace list per batch, not a read per pod.

    The pods a live claim covers are kept (`_deferred`, the latest version seen of each) and go back
    into a batch every `recheck_s`: their claim may have lapsed since. Each patch carries the version
    it was made from, so a pod that changed meanwhile (the runner made it Ready, it was deleted) is
    refused by the API server and dropped; a newer pending version comes back through the watch.
    """

    PATCH_WORKERS = 8

    def __init__(self, api_client: Any, recheck_s: float = RECHECK_S) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.recheck_s = recheck_s
        self._pending: dict[tuple[str, str], Mapping[str, Any]] = {}  # (namespace, name) -> latest pod seen
        self._deferred: dict[tuple[str, str], Mapping[str, Any]] = {}  # pods a live claim covered (worker's own)
        self._recheck_at = 0.0
        self._wake = threading.Condition()

    @staticmethod
    def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
        meta = pod.get("metadata") or {}
        return meta.get("namespace", ""), meta.get("name", "")

    def offer(self, pod: Mapping[str, Any]) -> None:
        """A pod event: queue the pod if its probe is pending."""
        if not probe_pending(pod):
            return
        with self._wake:
            self._pending[self._key(pod)] = pod
            self._wake.notify()

    def _take(self) -> list[Mapping[str, Any]]:
        """Everything queued, once something is; and the deferred pods as well when their recheck is due."""
        with self._wake:
            while not self._pending:
                if not self._deferred:
                    self._wake.wait()
                    continue
                left = self._recheck_at - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            fresh, self._pending = self._pending, {}
        if self._deferred and time.monotonic() >= self._recheck_at:
            fresh = {**self._deferred, **fresh}  # a newer event of a deferred pod wins
            self._deferred = {}
        return list(fresh.values())

    def _defer(self, pods: list[Mapping[str, Any]]) -> None:
        if pods and not self._deferred:
            self._recheck_at = time.monotonic() + self.recheck_s
        for pod in pods:
            self._deferred[self._key(pod)] = pod

    def _claims(self) -> dict[str, dict[str, str]]:
        resp = self.core.list_namespace(_preload_content=False)
        return {(n.get("metadata") or {}).get("name", ""): (n.get("metadata") or {}).get("annotations") or {}
                for n in json.loads(resp.data).get("items") or []}

    def _mark(self, pod: Mapping[str, Any]) -> None:
        from kubernetes.client.rest import ApiException

        meta = pod.get("metadata") or {}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], passed_probe_patch(pod, now))
        except ApiException as exc:
            if exc.status not in (404, 409, 422):  # gone, or changed under us: the next event decides
                log.warning("event=mark_failed pod=%s/%s status=%s", meta.get("namespace"), meta.get("name"), exc.status)
            return
        log.info("event=probe_passed pod=%s/%s", meta["namespace"], meta["name"])

    def _work(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.PATCH_WORKERS, thread_name_prefix="readiness-mark") as pool:
            while True:
                batch = self._take()
                try:
                    claims = self._claims()
                except Exception as exc:  # noqa: BLE001 - retried with the next batch
                    log.warning("event=namespace_list_failed error=%r", str(exc))
                    with self._wake:
                        for pod in batch:  # back in the queue, unless a newer event queued the pod again
                            self._pending.setdefault(self._key(pod), pod)
                    time.sleep(1.0)
                    continue
                mine, runners = split_claimed(batch, claims)
                self._defer(runners)
                list(pool.map(self._mark, mine))  # all written before the next batch

    def _list(self) -> str:
        """Offer every pod of the cluster; the list's resourceVersion, to watch from."""
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False)
        body = json.loads(resp.data)
        for pod in body.get("items") or []:
            self.offer(pod)
        return (body.get("metadata") or {}).get("resourceVersion", "")

    def _watch(self) -> None:
        """Watch every pod from one list, resuming from the last resourceVersion seen. Only the events
        that mention ReadinessProbePending are decoded: the rest (most of them) cost a substring search
        and a regex for their resourceVersion, not a JSON parse of the whole pod."""
        from kubernetes.client.rest import ApiException

        version = ""
        while True:
            try:
                if not version:
                    version = self._list()
                resp = self.core.list_pod_for_all_namespaces(
                    watch=True, resource_version=version, allow_watch_bookmarks=True,
                    timeout_seconds=WATCH_TIMEOUT_S, _preload_content=False)
                try:
                    for line in watch_lines(resp):
                        if line.startswith(b'{"type":"ERROR"'):
                            version = ""  # e.g. 410 Gone: list again
                            break
                        found = _RESOURCE_VERSION.search(line)
                        if found:
                            version = found.group(1).decode()
                        if _PENDING_MARK in line:
                            event = json.loads(line)
                            if event.get("type") in ("ADDED", "MODIFIED"):
                                self.offer(event["object"])
                finally:
                    resp.close()  # a watch left mid-stream must not go back to the pool half-read
                    resp.release_conn()
            except Exception as exc:  # noqa: BLE001 - an API hiccup must not end the stand-in
                if not (isinstance(exc, ApiException) and exc.status == 410):
                    log.warning("event=watch_error error=%r", str(exc))
                    time.sleep(1.0)
                version = ""

    def run(self) -> None:
        worker = threading.Thread(target=self._work, name="readiness-worker", daemon=True)
        worker.start()
        self._watch()


def main(kubeconfig: str) -> int:
    import signal
    import sys

    from kubernetes import config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stand_in = ReadinessStandIn(config.new_client_from_config(config_file=kubeconfig))
    # The watch blocks for up to WATCH_TIMEOUT_S: leave at once on TERM, there is nothing to flush.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        stand_in.run()
    except KeyboardInterrupt:
        pass
    return 0
