"""Kubernetes Events on the DisaggregatedModel: what `kubectl describe dm` shows as its story."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from kubernetes.client.rest import ApiException

from baton.operator.status import now

log = logging.getLogger("baton.operator")
REPORTING_COMPONENT = "baton-operator"


# A repeat of an Event (same object, type, reason and message) within this long of the last one updates that
# Event (count + 1, lastTimestamp) instead of posting another, as Kubernetes' own event recorder does: a
# condition that persists (a drift some other controller keeps re-introducing, re-applied on every pass)
# then costs one Event, not one per pass.
REPEAT_WINDOW_S = 600.0
_REMEMBERED = 4096  # repeats are tracked for this many distinct events (the least recently sent go first)


class _Repeats:
    """The Events this process posted recently: key -> (Event name, count, monotonic time last sent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: OrderedDict[tuple[str, ...], tuple[str, int, float]] = OrderedDict()

    def get(self, key: tuple[str, ...], now: float) -> tuple[str, int] | None:
        with self._lock:
            entry = self._sent.get(key)
            if entry is None or now - entry[2] > REPEAT_WINDOW_S:
                return None
            return entry[0], entry[1]

    def sent(self, key: tuple[str, ...], name: str, count: int, now: float) -> None:
        with self._lock:
            self._sent[key] = (name, count, now)
            self._sent.move_to_end(key)
            while len(self._sent) > _REMEMBERED:
                self._sent.popitem(last=False)


_repeats = _Repeats()


def record(kube: Any, body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    """Post a core/v1 Event about `body`, or count a repeat of one posted within REPEAT_WINDOW_S on it;
    failing to record one never fails a reconcile."""
    meta = body["metadata"]
    timestamp = now()
    message = message[:1024]
    log.log(logging.WARNING if event_type == "Warning" else logging.INFO, "%s/%s %s: %s",
            meta["namespace"], meta["name"], reason, message)
    key = (meta["namespace"], meta["name"], meta.get("uid", ""), event_type, reason, message)
    clock = time.monotonic()
    earlier = _repeats.get(key, clock)
    if earlier is not None:
        name, count = earlier
        try:
            kube.patch_event(meta["namespace"], name, {"count": count + 1, "lastTimestamp": timestamp})
            _repeats.sent(key, name, count + 1, clock)
            return
        except Exception as exc:  # noqa: BLE001 - expired (404; kept an hour), or not allowed: post anew
            if not (isinstance(exc, ApiException) and exc.status == 404):
                log.debug("could not count a repeat of event %s on %s/%s (%s); posting it", reason,
                          meta["namespace"], meta["name"], exc)
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
        "message": message,
        "source": {"component": REPORTING_COMPONENT},
        "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": REPORTING_COMPONENT,
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
    }
    try:
        kube.create_event(event)
        _repeats.sent(key, event["metadata"]["name"], 1, clock)
    except Exception as exc:  # noqa: BLE001 - an API refusal or a transport error: the pass goes on
        log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"],
                    exc.reason if isinstance(exc, ApiException) else exc)
