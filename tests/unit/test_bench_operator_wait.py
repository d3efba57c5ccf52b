"""The operator benchmark's wait: one LIST, then a watch, until enough objects are ready (pure logic)."""

from __future__ import annotations

import json
import time

import pytest
from baton.bench.operator import model_ready, wait_ready, workload_available


def model(name: str, ready: bool, rv: int) -> dict:
    status = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return {"metadata": {"name": name, "resourceVersion": str(rv)}, "status": status}


class Listed:
    def __init__(self, items: list[dict], rv: int) -> None:
        self.data = json.dumps({"metadata": {"resourceVersion": str(rv)}, "items": items}).encode()


class Watched:
    """A streamed watch response; records how far it was read and that it was closed."""

    def __init__(self, events: list[dict]) -> None:
        self.lines = [json.dumps(e).encode() + b"\n" for e in events]
        self.read = 0
        self.closed = False

    def stream(self, amt=None, decode_content=False):
        for line in self.lines:
            self.read += 1
            yield line

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


class Api:
    """Answers a LIST, then each watch in turn; records the resourceVersion each request started from."""

    def __init__(self, lists: list[Listed], watches: list[Watched]) -> None:
        self.lists, self.watches = lists, watches
        self.calls: list[tuple[str, str]] = []

    def __call__(self, namespace: str, **kwargs):
        assert kwargs["_preload_content"] is False
        if kwargs.get("watch"):
            self.calls.append(("watch", kwargs["resource_version"]))
            return self.watches.pop(0)
        self.calls.append(("list", ""))
        return self.lists.pop(0)


def test_it_returns_the_moment_the_last_object_turns_ready_and_follows_the_lists_version():
    last = Watched([
        {"type": "MODIFIED", "object": model("b", True, 11)},
        {"type": "ADDED", "object": model("c", False, 12)},
        {"type": "MODIFIED", "object": model("c", True, 13)},
        {"type": "MODIFIED", "object": model("a", False, 14)},  # after the count was reached: not read
    ])
    api = Api([Listed([model("a", True, 9), model("b", False, 9)], rv=10)], [last])
    assert wait_ready(api, "ns", 3, model_ready, time.monotonic() + 5) == 3
    assert api.calls == [("list", ""), ("watch", "10")]
    assert last.read == 3 and last.closed


def test_an_object_that_stops_being_ready_or_goes_away_no_longer_counts():
    first = Watched([
        {"type": "MODIFIED", "object": model("a", False, 11)},  # no longer ready
        {"type": "DELETED", "object": model("b", True, 12)},
        {"type": "ADDED", "object": model("c", True, 13)},
    ])
    second = Watched([{"type": "ADDED", "object": model("d", True, 14)},
                      {"type": "MODIFIED", "object": model("a", True, 15)}])
    api = Api([Listed([model("a", True, 9), model("b", True, 9)], rv=10)], [first, second])
    assert wait_ready(api, "ns", 3, model_ready, time.monotonic() + 5) == 3
    assert api.calls == [("list", ""), ("watch", "10"), ("watch", "13")]  # the second watch resumes


def test_an_expired_watch_lists_again():
    gone = Watched([{"type": "ERROR", "object": {"kind": "Status", "code": 410}}])
    api = Api([Listed([model("a", False, 9)], rv=10), Listed([model("a", True, 20)], rv=21)], [gone])
    assert wait_ready(api, "ns", 1, model_ready, time.monotonic() + 5) == 1
    assert api.calls == [("list", ""), ("watch", "10"), ("list", "")]


def test_at_the_deadline_it_raises_or_reports_how_many_were_ready():
    def api_once():
        return Api([Listed([model("a", True, 9), model("b", False, 9)], rv=10)], [])

    with pytest.raises(TimeoutError, match="1 of 2 ready in ns"):
        wait_ready(api_once(), "ns", 2, model_ready, time.monotonic() - 1)
    assert wait_ready(api_once(), "ns", 2, model_ready, time.monotonic() - 1, strict=False) == 1


def test_the_alive_check_runs_between_watches_and_its_error_ends_the_wait():
    def dead() -> None:
        raise RuntimeError("operator exited")

    api = Api([Listed([model("a", False, 9)], rv=10)], [])
    with pytest.raises(RuntimeError, match="operator exited"):
        wait_ready(api, "ns", 1, model_ready, time.monotonic() + 5, dead)


def test_a_workload_is_available_when_all_its_replicas_are():
    assert workload_available({"spec": {"replicas": 2}, "status": {"availableReplicas": 2}})
    assert not workload_available({"spec": {"replicas": 2}, "status": {"availableReplicas": 1}})
    assert not workload_available({"spec": {}, "status": {}})  # replicas default to 1
    assert workload_available({"spec": {"replicas": 0}, "status": {}})
