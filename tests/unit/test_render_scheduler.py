"""The rendered scheduler: its config's per-tier engine ports and its container's resources (pure, no cluster)."""

from __future__ import annotations


import pytest
import yaml

from example_models import example_model
from baton.api.units import parse_quantity
from baton.render import render_children
from baton.render.naming import Target
from baton.scheduler.config import SchedulerConfig
from baton.scheduler.endpoints import endpoints_from_slices



def target(example: str = "llama-70b.yaml", **spec_overrides) -> Target:
    m = example_model(example, **spec_overrides)
    return Target(name=m.metadata["name"], namespace="ns", uid="uid-1", spec=m.spec)


def rendered(t: Target) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in render_children(t)}


def scheduler_config(t: Target) -> SchedulerConfig:
    text = rendered(t)[f"ConfigMap/{t.name}-scheduler"]["data"]["config.yaml"]
    return SchedulerConfig.model_validate(yaml.safe_load(text))  # the scheduler accepts what the operator renders


def container_resources(t: Target) -> dict[str, dict[str, str]]:
    deployment = rendered(t)[f"Deployment/{t.name}-scheduler"]
    return deployment["spec"]["template"]["spec"]["containers"][0]["resources"]


@pytest.mark.parametrize("example", ["llama-70b.yaml", "small.yaml"])
def test_each_tier_is_dialled_on_its_own_port(example):
    t = target(example, prefill__port=8001, decode__port=8000)
    k8s = scheduler_config(t).endpoints.kubernetes
    assert (k8s.prefill_port, k8s.decode_port) == (8001, 8000)
    assert (k8s.tier_port("prefill"), k8s.tier_port("decode")) == (8001, 8000)
    # and the prefill pods are reached on the port their engine listens on, not the decode one
    objects = rendered(t)
    engine_ports = {
        tier: objects[name]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        for name in objects
        if name.startswith("StatefulSet/") and (tier := name.split("-")[-2]) in ("prefill", "decode")
    }
    assert engine_ports == {"prefill": 8001, "decode": 8000}
    slice_ = {"addressType": "IPv4", "endpoints": [{"addresses": ["127.64.1.3"], "conditions": {"ready": True}}]}
    for tier in ("prefill", "decode"):
        [endpoint] = endpoints_from_slices([slice_], k8s.tier_port(tier), tier)
        assert endpoint.address == f"127.64.1.3:{engine_ports[tier]}"


def test_equal_tier_ports_render_both():
    t = target(prefill__port=9000, decode__port=9000)
    k8s = scheduler_config(t).endpoints.kubernetes
    assert (k8s.tier_port("prefill"), k8s.tier_port("decode")) == (9000, 9000)


def _valid(resources: dict[str, dict[str, str]]) -> None:
    """What the API server checks: no request above its limit."""
    for name, limit in resources["limits"].items():
        if name in resources["requests"]:
            assert parse_quantity(resources["requests"][name]) <= parse_quantity(limit), (name, resources)


def test_default_resources_without_user_settings():
    res = container_resources(target())
    assert res == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}


@pytest.mark.parametrize(
    "user, expected",
    [
        # a request above the default limit: the limit is raised to it
        ({"requests": {"memory": "4Gi"}}, {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}),
        # a request below the default limit keeps the default limit
        ({"requests": {"memory": "1Gi"}}, {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}),
        # a limit below the default request: no default request (Kubernetes requests the limit)
        ({"limits": {"memory": "256Mi"}}, {"requests": {"cpu": "1"}, "limits": {"memory": "256Mi"}}),
        ({"limits": {"cpu": "500m"}}, {"requests": {"memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "2Gi"}}),
        # a limit at or above the default request keeps it
        ({"limits": {"memory": "512Mi", "cpu": "2"}},
         {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}}),
        ({"limits": {"memory": "8Gi"}}, {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "8Gi"}}),
        # the user's own pair is kept as written
        ({"requests": {"memory": "3Gi", "cpu": "250m"}, "limits": {"memory": "6Gi"}},
         {"requests": {"cpu": "250m", "memory": "3Gi"}, "limits": {"memory": "6Gi"}}),
    ],
)
def test_defaults_never_conflict_with_the_users_resources(user, expected):
    res = container_resources(target(scheduler__resources=user))
    assert res == expected
    _valid(res)
    for kind in ("requests", "limits"):  # whatever the user set is kept
        for name, value in user.get(kind, {}).items():
            assert res[kind][name] == value


def test_the_generation_bound_settings_come_from_the_serving_generation():
    """Served model name, runtime and KV transfer compression follow the generation that serves; every
    other setting follows the spec at once."""
    from baton.render import render_shared
    from baton.render.scheduler import generation_config, generation_config_of_configmap

    t = target("small.yaml", model__name="llama-3.1-8b", scheduler__localPrefillBelowTokens=512,
               engine__kvTransfer={"compression": "fp8"})
    assert generation_config(t.spec) == {"model": "llama-3.1-8b", "runtime": "trtllm-serve", "kvTransferCompression": "fp8"}
    serving = {"model": "llama-3-8b", "runtime": "trtllm-serve", "kvTransferCompression": "none"}
    cm = next(o for o in render_shared(t, serving) if o["kind"] == "ConfigMap")
    config = SchedulerConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert (config.model, config.runtime, config.routing.kv_transfer_compression) == ("llama-3-8b", "trtllm-serve", "none")
    assert config.routing.local_prefill_below_tokens == 512
    assert generation_config_of_configmap(cm) == serving
    assert scheduler_config(t).model == "llama-3.1-8b"  # no serving generation given: the spec's
    assert generation_config_of_configmap({"data": {"config.yaml": ": not yaml :"}}) == {}


def test_the_scheduler_pod_gets_the_operators_image_pull_secrets(monkeypatch):
    """The scheduler runs the operator's image by default, so it needs the secrets the chart pulls that
    image with (BATON_IMAGE_PULL_SECRETS, comma-separated names); none set, none rendered."""
    def pod(t: Target) -> dict:
        return rendered(t)[f"Deployment/{t.name}-scheduler"]["spec"]["template"]["spec"]

    monkeypatch.delenv("BATON_IMAGE_PULL_SECRETS", raising=False)
    assert "imagePullSecrets" not in pod(target())
    monkeypatch.setenv("BATON_IMAGE_PULL_SECRETS", "")
    assert "imagePullSecrets" not in pod(target())
    monkeypatch.setenv("BATON_IMAGE_PULL_SECRETS", "regcred, mirror,,regcred")
    assert pod(target())["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    # a model's own scheduler image too (typically from the same private registry)
    assert pod(target(scheduler__image="registry.example/baton:dev"))["imagePullSecrets"] == [
        {"name": "regcred"}, {"name": "mirror"}]
