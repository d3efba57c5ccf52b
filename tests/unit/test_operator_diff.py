"""Drift: what counts as already applied, and what does not (pure comparison)."""

from __future__ import annotations

import copy

from example_models import example_model

from baton.operator import diff
from baton.operator.rollout_pass import generation_children
from baton.render.derived import derive
from baton.render.naming import Target


def _decode_sts(**overrides) -> dict:
    m = example_model("small.yaml", **overrides)
    children = generation_children(Target("llama-8b", "ns", "uid", m.spec), derive(m.spec))
    return next(c for c in children if c["kind"] == "StatefulSet" and c["metadata"]["labels"]["baton.dev/tier"] == "decode")


def test_items_another_manager_added_to_merged_lists_are_not_drift():
    """A mutating webhook's sidecar or env entry, or a `kubectl edit`, stays whatever Baton applies (the
    API server merges those lists by key): re-applying every resync would change nothing and make an
    event each time."""
    sts = _decode_sts()
    pod = lambda o: o["spec"]["template"]["spec"]  # noqa: E731
    live = copy.deepcopy(sts)
    pod(live)["containers"][0]["env"].append({"name": "HTTP_PROXY", "value": "http://proxy:3128"})
    pod(live)["containers"].insert(0, {"name": "istio-proxy", "image": "proxy"})
    pod(live)["volumes"].append({"name": "istio-envoy", "emptyDir": {}})
    assert diff.in_sync(sts, live)
    # ... but an item of Baton's that is missing or changed is
    changed = copy.deepcopy(live)
    engine = next(c for c in pod(changed)["containers"] if c["name"] == "engine")
    engine["env"] = engine["env"][1:]
    assert not diff.in_sync(sts, changed)
    changed = copy.deepcopy(live)
    next(c for c in pod(changed)["containers"] if c["name"] == "engine")["image"] = "other"
    assert not diff.in_sync(sts, changed)


def test_atomic_lists_must_be_exactly_what_baton_applies():
    sts = _decode_sts()
    live = copy.deepcopy(sts)
    live["spec"]["template"]["spec"]["containers"][0]["command"].append("--extra")
    assert not diff.in_sync(sts, live)


def test_only_resource_quantities_compare_by_value():
    """"1000m" is "1" as a CPU quantity; as a label or an env value "1.10" is not "1.1"."""
    live = {"metadata": {"name": "x", "labels": {"app.version": "1.1"}},
            "spec": {"env": [{"name": "WORKERS", "value": "2"}]}}
    for labels, env in (({"app.version": "1.10"}, "2"), ({"app.version": "1.1"}, "2.0")):
        want = {"kind": "X", "metadata": {"name": "x", "labels": labels}, "spec": {"env": [{"name": "WORKERS", "value": env}]}}
        assert not diff.in_sync(want, live), want
    want = {"kind": "X", "metadata": {"name": "x"},
            "spec": {"resources": {"requests": {"cpu": "1000m", "memory": "1Gi"}}, "volume": {"sizeLimit": "1024Mi"}}}
    live = {"metadata": {"name": "x"},
            "spec": {"resources": {"requests": {"cpu": "1", "memory": "1073741824"}}, "volume": {"sizeLimit": "1Gi"}}}
    assert diff.in_sync(want, live)
    live["spec"]["resources"]["requests"]["cpu"] = "2"
    assert not diff.in_sync(want, live)


def test_a_field_baton_stopped_rendering_is_drift():
    """The live object still has a field the new rendering dropped (a nodeSelector key): only the
    rendering's digest can tell, and it does; an unchanged rendering stays in sync."""
    before = diff.stamp(_decode_sts())
    live = copy.deepcopy(before)
    live["metadata"]["resourceVersion"] = "7"
    assert diff.in_sync(diff.stamp(_decode_sts()), live)
    after = copy.deepcopy(_decode_sts())
    del after["spec"]["template"]["spec"]["nodeSelector"]
    assert diff.contains({k: v for k, v in after.items() if k != "metadata"}, live)  # a superset all the same
    assert not diff.in_sync(diff.stamp(after), live)
    assert diff.stamp(diff.stamp(after)) == diff.stamp(after)  # stamping is idempotent
