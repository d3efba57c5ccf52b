"""The rollout's GPU capacity check reads every pod in the cluster: it must do so a page at a time, or a big
cluster's pod list (10,000 pods are 40 MB of JSON, five times that parsed) can take the operator past its
memory limit, once per blocked model."""

from __future__ import annotations

import json
import tracemalloc
import urllib.parse

from baton.operator import kube as kube_module
from baton.operator import rollout


def pod(i: int, node: str | None, phase: str, gpus: int) -> dict:
    """A pod about the size of a real one (a few KiB: labels, env, managedFields)."""
    return {"metadata": {"name": f"web-{i}", "namespace": f"team-{i % 7}", "labels": {"app": "web", "hash": "x" * 10},
                         "managedFields": [{"manager": m, "fieldsV1": {f"f:{k}": {} for k in range(40)}}
                                           for m in ("kube-controller-manager", "kubelet")]},
            "spec": {"containers": [{"name": "app", "image": "registry.example.com/team/web:1.2.3",
                                     "env": [{"name": f"VAR_{e}", "value": "x" * 20} for e in range(10)],
                                     "resources": {"requests": {"cpu": "100m", "nvidia.com/gpu": str(gpus)}}}],
                     **({"nodeName": node} if node else {})},
            "status": {"phase": phase, "conditions": [{"type": t, "status": "True"} for t in ("Ready", "Initialized")]}}


def _selected(obj: dict, field_selector: str) -> bool:
    """A field selector of `path!=value` terms, as the API server applies it."""
    for term in filter(None, field_selector.split(",")):
        path, value = term.split("!=")
        found: object = obj
        for part in path.split("."):
            found = found.get(part, "") if isinstance(found, dict) else ""
        if found == value:
            return False
    return True


class _Response:
    def __init__(self, data: bytes) -> None:
        self.status, self._data = 200, data

    def read(self) -> bytes:
        return self._data


class PagingApiClient:
    """Serves cluster-wide lists as the API server does: `limit` and `continue` pages, field selectors;
    everything at once when no limit is asked for. Records how many pods it sent."""

    user_agent = ""

    def __init__(self, nodes: list[dict], pods: int) -> None:
        self.nodes, self.pods, self.sent = nodes, pods, 0

    def make_pod(self, i: int) -> dict:
        if i % 10 == 9:
            return pod(i, f"gpu-{i % 4}", "Succeeded", 8)  # finished: holds nothing
        if i % 10 == 8:
            return pod(i, None, "Pending", 8)  # not scheduled: holds nothing
        return pod(i, f"gpu-{i % 4}" if i < 8 else f"cpu-{i % 50}", "Running", 1 if i < 8 else 0)

    def param_serialize(self, method: str, resource_path: str, query_params: list, **_: object) -> tuple:
        return method, resource_path + "?" + urllib.parse.urlencode(query_params), {}, None, []

    def call_api(self, verb: str, url: str, **_: object) -> _Response:
        path, _, query = url.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        if path == "/api/v1/nodes":
            return _Response(json.dumps({"items": self.nodes}).encode())
        assert path == "/api/v1/pods"
        start = int(params.get("continue") or 0)
        end = min(self.pods, start + int(params["limit"])) if "limit" in params else self.pods
        items = [p for p in map(self.make_pod, range(start, end)) if _selected(p, params.get("fieldSelector", ""))]
        self.sent += len(items)
        return _Response(json.dumps({"metadata": {"continue": str(end) if end < self.pods else ""},
                                     "items": items}).encode())


def node(name: str, gpus: int) -> dict:
    return {"metadata": {"name": name, "labels": {"baton.dev/pool": "gpu"}}, "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}, "images": [{"names": ["x" * 100]}] * 50}}


def test_the_capacity_check_of_a_big_cluster_reads_its_pods_a_page_at_a_time():
    nodes = [node(f"gpu-{i}", 8) for i in range(4)] + [node(f"cpu-{i}", 0) for i in range(50)]
    api = PagingApiClient(nodes, pods=3000)
    kube = kube_module.Kube(api)  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        found, free = rollout.cluster_capacity(kube)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Right: the 8 running GPU pods on gpu-0..3 (2 each) count, finished and unscheduled pods do not.
    assert {n: free[n] for n in ("gpu-0", "gpu-1", "gpu-2", "gpu-3")} == {f"gpu-{i}": 6 for i in range(4)}
    assert rollout.fit_replicas(found, free, [("decode", 4, 6, {"baton.dev/pool": "gpu"}, [])]) == []
    # Finished and unscheduled pods are not even sent, and what is held at once is about a page of pods
    # (all 3,000 at once: some 60 MB).
    assert api.sent == 2400
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert kube.requests["LIST"] == 1 + 3000 // kube_module.LIST_PAGE
