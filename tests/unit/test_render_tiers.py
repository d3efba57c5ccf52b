"""The prefill/decode StatefulSets: engine env merging and default resource requests (pure, no cluster)."""

from __future__ import annotations


import pytest

from example_models import example_model
from baton.api.units import parse_quantity
from baton.api.v1alpha1 import DisaggregatedModel
from baton.render import render_children, tiers
from baton.render.naming import Target



def model(example: str = "small.yaml", **spec_overrides) -> DisaggregatedModel:
    return example_model(example, **spec_overrides)


def containers(m: DisaggregatedModel) -> dict[str, dict]:
    """The engine container of each tier's StatefulSet, by tier."""
    t = Target(name=m.metadata["name"], namespace="ns", uid="uid-1", spec=m.spec)
    found = {}
    for obj in render_children(t):
        if obj["kind"] == "StatefulSet":
            tier = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            found[tier] = obj["spec"]["template"]["spec"]["containers"][0]
    assert set(found) == {"prefill", "decode"}
    return found


def env_names(container: dict) -> list[str]:
    return [e["name"] for e in container["env"]]


def env_values(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def assert_unique_names(container: dict) -> None:
    names = env_names(container)
    assert len(names) == len(set(names)), f"duplicate env names (server-side apply refuses them): {names}"


# ------------------------------------------------------------------ env


def test_the_component_label_names_the_tier():
    # the helper above relies on it; fail loudly here rather than obscurely below
    assert set(containers(model())) == {"prefill", "decode"}


def test_without_user_env_the_baton_defaults_render_unchanged_in_order():
    for tier, container in containers(model()).items():
        assert_unique_names(container)
        names = env_names(container)
        assert names[:5] == ["POD_IP", "POD_NAME", "TRTLLM_UCX_INTERFACE", "TRTLLM_SERVER_DISABLE_GC",
                             "TRTLLM_WORKER_DISABLE_GC"], tier
        assert env_values(container)["TRTLLM_UCX_INTERFACE"] == "eth0"


def test_engine_env_overrides_the_ucx_interface_in_place_on_both_tiers():
    m = model(engine__env=[{"name": "TRTLLM_UCX_INTERFACE", "value": "net1"}])
    baseline = {tier: env_names(c) for tier, c in containers(model()).items()}
    for tier, container in containers(m).items():
        assert_unique_names(container)
        assert env_values(container)["TRTLLM_UCX_INTERFACE"] == "net1", tier
        assert env_names(container) == baseline[tier]  # one entry, where Baton's was


def test_a_tier_podtemplate_env_overrides_engine_env_and_the_defaults_for_that_tier_only():
    m = model(
        engine__env=[{"name": "FOO", "value": "engine"}, {"name": "TRTLLM_UCX_INTERFACE", "value": "net1"}],
        prefill__podTemplate={"env": [{"name": "FOO", "value": "prefill"}, {"name": "HF_HOME", "value": "/data/hf"},
                                      {"name": "TRTLLM_UCX_INTERFACE", "value": "net2"}, {"name": "BAR", "value": "1"}]},
    )
    c = containers(m)
    for container in c.values():
        assert_unique_names(container)
    prefill, decode = env_values(c["prefill"]), env_values(c["decode"])
    assert prefill["FOO"] == "prefill" and decode["FOO"] == "engine"
    assert prefill["TRTLLM_UCX_INTERFACE"] == "net2" and decode["TRTLLM_UCX_INTERFACE"] == "net1"
    assert prefill["BAR"] == "1" and "BAR" not in decode
    # order stable: the Baton defaults, then engine.env's new names, then the tier's new names
    names = env_names(c["prefill"])
    assert names.index("TRTLLM_UCX_INTERFACE") < names.index("FOO") < names.index("BAR")
    assert names[-1] == "BAR"


def test_hf_home_is_overridable_and_a_value_from_entry_replaces_a_plain_value():
    m = model(model__source={"huggingFace": {"id": "org/model"}},
              engine__env=[{"name": "HF_HOME", "value": "/mnt/hf"},
                           {"name": "TRTLLM_SERVER_DISABLE_GC",
                            "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "gc"}}}])
    for container in containers(m).values():
        assert_unique_names(container)
        values = env_values(container)
        assert values["HF_HOME"] == "/mnt/hf"
        entry = next(e for e in container["env"] if e["name"] == "TRTLLM_SERVER_DISABLE_GC")
        assert entry == {"name": "TRTLLM_SERVER_DISABLE_GC",
                         "valueFrom": {"configMapKeyRef": {"name": "tuning", "key": "gc"}}}


def test_the_same_name_twice_in_one_list_keeps_the_last():
    m = model(decode__podTemplate={"env": [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}]})
    decode = containers(m)["decode"]
    assert_unique_names(decode)
    assert env_values(decode)["X"] == "2"


def test_reserved_names_keep_batons_value_and_are_reported():
    m = model(model__source={"huggingFace": {"id": "org/model", "revision": "abc123"}},
              engine__env=[{"name": "POD_IP", "value": "0.0.0.0"}],
              decode__podTemplate={"env": [{"name": "HF_REVISION", "value": "other"}]})
    for tier, container in containers(m).items():
        assert_unique_names(container)
        values = env_values(container)
        assert values["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}, tier
        assert values["HF_REVISION"] == "abc123", tier
        assert "$(POD_IP)" in container["args"]
    problems = tiers.reserved_env_overrides(m.spec)
    assert len(problems) == 2
    assert problems[0].startswith("engine.env sets POD_IP") and "remove it from engine.env" in problems[0]
    assert problems[1].startswith("decode.podTemplate.env sets HF_REVISION")
    assert "spec.model.source.huggingFace.revision" in problems[1]
    assert tiers.reserved_env_overrides(model(engine__env=[{"name": "TRTLLM_UCX_INTERFACE", "value": "net1"}]).spec) == []


def test_hf_revision_stays_the_users_when_baton_does_not_set_it():
    # without huggingFace.revision Baton sets no HF_REVISION, so a user's is an ordinary variable
    m = model(model__source={"huggingFace": {"id": "org/model"}}, engine__env=[{"name": "HF_REVISION", "value": "v2"}])
    assert tiers.reserved_env_overrides(m.spec) == []
    for container in containers(m).values():
        assert env_values(container)["HF_REVISION"] == "v2"


def test_hf_revision_is_still_rendered_from_the_source():
    m = model(model__source={"huggingFace": {"id": "org/model", "revision": "abc123"}})
    for container in containers(m).values():
        assert env_values(container)["HF_REVISION"] == "abc123"


def test_merge_env_passes_unnamed_entries_through():
    merged = tiers.merge_env([{"name": "A", "value": "1"}], [{"value": "no name"}, {"name": "A", "value": "2"}])
    assert merged == [{"name": "A", "value": "2"}, {"value": "no name"}]


# ------------------------------------------------------------------ resources


def resources(m: DisaggregatedModel, tier: str) -> dict:
    return containers(m)[tier]["resources"]


def assert_requests_within_limits(res: dict) -> None:
    for name, limit in res["limits"].items():
        if name in res["requests"]:
            assert parse_quantity(res["requests"][name]) <= parse_quantity(limit), (name, res)


def test_default_requests_without_user_values():
    res = resources(model(), "decode")
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert res["requests"]["cpu"] == str(max(4, gpus))
    assert res["requests"]["memory"] == f"{8 * max(4, gpus)}Gi"
    assert res["requests"]["nvidia.com/gpu"] == str(gpus)


def test_default_requests_are_capped_at_the_users_limits():
    m = model(decode__resources={"limits": {"memory": "24Gi", "cpu": "2"}})
    res = resources(m, "decode")
    assert_requests_within_limits(res)
    assert res["requests"]["memory"] == "24Gi" and res["requests"]["cpu"] == "2"
    assert res["limits"]["memory"] == "24Gi" and res["limits"]["cpu"] == "2"
    # the other tier keeps the defaults
    prefill = resources(m, "prefill")
    assert prefill["requests"]["cpu"] == str(max(4, int(prefill["limits"]["nvidia.com/gpu"])))


@pytest.mark.parametrize("limits", [{"cpu": "1500m"}, {"memory": "16G"}, {"cpu": "0.5", "memory": "4096Mi"}])
def test_capping_compares_quantities_not_strings(limits):
    res = resources(model(decode__resources={"limits": limits}), "decode")
    assert_requests_within_limits(res)
    for name, limit in limits.items():
        assert res["requests"][name] == limit


def test_limits_above_the_defaults_leave_the_defaults():
    res = resources(model(decode__resources={"limits": {"memory": "512Gi", "cpu": "64"}}), "decode")
    gpus = int(res["limits"]["nvidia.com/gpu"])
    assert res["requests"]["memory"] == f"{8 * max(4, gpus)}Gi" and res["requests"]["cpu"] == str(max(4, gpus))


def test_a_user_request_is_never_replaced():
    res = resources(model(decode__resources={"requests": {"cpu": "3", "memory": "20Gi"},
                                              "limits": {"cpu": "3", "memory": "24Gi"}}), "decode")
    assert res["requests"]["cpu"] == "3" and res["requests"]["memory"] == "20Gi"
    # even one above its limit is the user's to fix (the API server will say so), not Baton's to rewrite
    res = resources(model(decode__resources={"requests": {"memory": "40Gi"}, "limits": {"memory": "24Gi"}}), "decode")
    assert res["requests"]["memory"] == "40Gi"


def test_other_user_resources_pass_through():
    res = resources(model(decode__resources={"requests": {"ephemeral-storage": "50Gi"},
                                              "limits": {"ephemeral-storage": "100Gi"}}), "decode")
    assert res["requests"]["ephemeral-storage"] == "50Gi" and res["limits"]["ephemeral-storage"] == "100Gi"


def test_a_reserved_env_override_is_reported_as_an_invalid_spec():
    from baton.operator.validation import spec_problems

    m = model(engine__env=[{"name": "POD_IP", "value": "0.0.0.0"}])
    assert [p for p in spec_problems(m.spec) if p.startswith("engine.env sets POD_IP")]
    assert spec_problems(model(engine__env=[{"name": "TRTLLM_UCX_INTERFACE", "value": "net1"}]).spec) == []
