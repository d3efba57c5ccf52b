"""Kubernetes Events on the DisaggregatedModel: what `kubectl describe dm` shows as its story."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from kubernetes.client.rest import ApiException

from baton.operator.status import now

log = logging.getLogger("baton.operator")
REPORTING_COMPONENT = "baton-operator"


def record(kube: Any, body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    """Create a core/v1 Event about `body`; failing to record one never fails a reconcile."""
    meta = body["metadata"]
    timestamp = now()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": event_type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": REPORTING_COMPONENT},
        "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": REPORTING_COMPONENT,
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
    }
    log.log(logging.WARNING if event_type == "Warning" else logging.INFO, "%s/%s %s: %s",
            meta["namespace"], meta["name"], reason, message)
    try:
        kube.create_event(event)
    except ApiException as exc:
        log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc.reason)
