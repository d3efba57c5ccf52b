"""The local cluster's readiness stand-in: the kubelet's readiness prober, for pods nothing runs.

KWOK starts pods on fake nodes, but a pod whose container declares a readinessProbe comes up with
Ready "False" (reason `ReadinessProbePending`, see kwok-stages.yaml), as on a real node until its probe
passes. Two things pass that probe:
- the pod runner, for the pods it runs as local processes: Baton's tiers and scheduler in the
  namespaces it claims (see `baton.podrunner.runner`); it probes the process and writes the result;
- this stand-in, for every other such pod: no process exists to probe, so the probe passes at once
  and the pod turns Ready, the state KWOK gives a probe-less pod straight away.

A pod a pod runner claims is never touched here. So a Baton pod is only Ready once the process at
its IP is its own and answers its probe, even when the pod took over the IP of a pod deleted a moment
earlier whose process had not stopped yet.

Runs as a devcluster component (`baton devcluster readiness`), started by `baton devcluster up`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from baton.podrunner.runner import (
    ALL_NAMESPACES_CLAIM,
    CLAIM_ANNOTATION,
    CLAIM_HOLDER_NAMESPACE,
    runs_locally,
)

log = logging.getLogger("baton.devcluster.readiness")

PROBE_PENDING = "ReadinessProbePending"
PASSED_REASON = "ReadinessStandIn"
WATCH_TIMEOUT_S = 30


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
    claimed, or anywhere when a runner claimed every namespace."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if not runs_locally(labels):
        return False
    return CLAIM_ANNOTATION in namespace_annotations or ALL_NAMESPACES_CLAIM in holder_annotations


def passed_probe_patch(pod: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status patch a kubelet writes when every readiness probe of `pod` passes."""
    conditions = [
        {"type": kind, "status": "True", "reason": PASSED_REASON, "message": "no local process runs this pod; "
         "its readiness probe is taken as passed", "lastTransitionTime": now}
        for kind in ("ContainersReady", "Ready")
    ]
    statuses = [{**s, "ready": True} for s in (pod.get("status") or {}).get("containerStatuses") or []]
    patch: dict[str, Any] = {"status": {"conditions": conditions}}
    if statuses:
        patch["status"]["containerStatuses"] = statuses
    return patch


class ReadinessStandIn:
    """Watches every pod of the cluster and passes the readiness probe of those nothing runs."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self._stop = threading.Event()
        self.marked = 0

    def _annotations(self, namespace: str) -> dict[str, str]:
        from kubernetes.client.rest import ApiException

        try:
            return dict(self.core.read_namespace(namespace).metadata.annotations or {})
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise

    def handle(self, pod: Mapping[str, Any]) -> bool:
        """Mark `pod` Ready if its probe is pending and no pod runner claims it; True when marked."""
        if not probe_pending(pod):
            return False
        meta = pod.get("metadata") or {}
        namespace = meta.get("namespace", "")
        # Claims are read fresh for each pod: a runner claims its namespace just before the first pod
        # it runs exists, and no cached answer may be older than that.
        if runs_locally(meta.get("labels") or {}) and claimed(
                pod, self._annotations(namespace), self._annotations(CLAIM_HOLDER_NAMESPACE)):
            return False
        from kubernetes.client.rest import ApiException

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.core.patch_namespaced_pod_status(meta["name"], namespace, passed_probe_patch(pod, now))
        except ApiException as exc:
            if exc.status in (404, 409, 422):  # gone, or changed under us: the next event decides
                return False
            raise
        self.marked += 1
        log.info("event=probe_passed pod=%s/%s", namespace, meta["name"])
        return True

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False)
        body = json.loads(resp.data)
        return body.get("items") or [], (body.get("metadata") or {}).get("resourceVersion", "")

    def run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                items, version = self._list()
                for pod in items:
                    self.handle(pod)
                w = watch.Watch()
                for event in w.stream(self.core.list_pod_for_all_namespaces, resource_version=version,
                                      timeout_seconds=WATCH_TIMEOUT_S, deserialize=False):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.handle(event["raw_object"])
                    elif event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
            except Exception as exc:  # noqa: BLE001 - an API hiccup must not end the stand-in
                log.warning("event=watch_error error=%r", str(exc))
                self._stop.wait(1.0)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="readiness-stand-in", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


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
