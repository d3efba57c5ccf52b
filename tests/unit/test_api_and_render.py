"""The API models, the generated CRD and the rendered children (pure, no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from baton.api import crd as crd_module
from baton.api.v1alpha1 import DisaggregatedModel
from baton.operator import diff
from baton.operator.validation import spec_problems
from baton.render import engine_config, render_children
from baton.render.derived import derive
from baton.render.naming import Target, revision

REPO = Path(__file__).resolve().parents[2]


def model(example: str = "llama-70b.yaml", **spec_overrides) -> DisaggregatedModel:
    data = yaml.safe_load((REPO / "examples" / example).read_text())
    for path, value in spec_overrides.items():
        node = data["spec"]
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return DisaggregatedModel.model_validate(data)


def target(m: DisaggregatedModel) -> Target:
    return Target(name=m.metadata["name"], namespace="ns", uid="uid-1", spec=m.spec)


def by_name(objs):
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def test_committed_crd_is_the_generated_one():
    committed = (REPO / "crds" / crd_module.CRD_FILE).read_text()
    assert committed == crd_module.render(), "crds/ is stale: run `make crds`"


def test_every_schema_field_has_a_description():
    schema = crd_module.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing = []

    def walk(node, path):
        for name, child in node.get("properties", {}).items():
            if name != "metadata" and not child.get("description"):
                missing.append(f"{path}.{name}")
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")

    walk(schema, "")
    assert missing == []


def test_crd_names_printer_columns_and_subresources():
    spec = crd_module.crd()["spec"]
    assert spec["names"]["shortNames"] == ["dm"] and spec["names"]["categories"] == ["baton"]
    version = spec["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Ready", "Prefill", "Decode", "Revision", "Age"]
    assert "status" in version["subresources"]


def test_prefill_and_decode_engine_configs_follow_the_disaggregation_rules():
    m = model()
    derived = derive(m.spec)
    prefill = engine_config.engine_options(m.spec, "prefill", derived.kv_bytes_per_token)
    decode = engine_config.engine_options(m.spec, "decode", derived.kv_bytes_per_token)
    assert prefill["disable_overlap_scheduler"] is True and decode["disable_overlap_scheduler"] is False
    for opts in (prefill, decode):
        assert opts["cache_transceiver_config"]["backend"] in ("UCX", "NIXL")  # never DEFAULT
        assert opts["max_beam_width"] == 1
    same_layout = ("dtype", "tokens_per_block")
    assert {k: prefill["kv_cache_config"][k] for k in same_layout} == {k: decode["kv_cache_config"][k] for k in same_layout}
    assert prefill["tensor_parallel_size"] == 8 and decode["tensor_parallel_size"] == 4
    # decode.kvCacheSize 128G at fp8 Llama-70B (160 KiB per token) -> 781,250 tokens
    assert derived.kv_bytes_per_token == 163840
    assert decode["kv_cache_config"]["max_tokens"] == 128_000_000_000 // 163840


def test_children_are_pinned_to_their_pools_with_gpus_probes_and_shm():
    m = model()
    gen = derive(m.spec).generation
    objs = by_name(render_children(target(m)))
    sts = objs[f"StatefulSet/llama-70b-prefill-{gen}"]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["command"] == ["trtllm-serve"]
    assert "--extra_llm_api_options" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert sts["spec"]["replicas"] == 2 and objs[f"StatefulSet/llama-70b-decode-{gen}"]["spec"]["replicas"] == 4
    assert sts["spec"]["selector"]["matchLabels"]["baton.dev/generation"] == gen
    for obj in objs.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert obj["metadata"]["labels"]["baton.dev/model"] == "llama-70b"
    assert sts["spec"]["template"]["metadata"]["annotations"]["baton.dev/kv-fingerprint"]


def test_scheduler_config_carries_discovery_and_every_routing_setting():
    from baton.scheduler.config import SchedulerConfig

    m = model()
    objs = by_name(render_children(target(m)))
    config = yaml.safe_load(objs["ConfigMap/llama-70b-scheduler"]["data"]["config.yaml"])
    parsed = SchedulerConfig.model_validate(config)  # the scheduler accepts what the operator renders
    assert parsed.endpoints.kubernetes.prefill_service == "llama-70b-prefill"
    assert parsed.routing.local_prefill_below_tokens == 4096
    assert parsed.routing.always_prefill_at_or_above_tokens == 16384
    assert parsed.queue.max_depth == 256
    assert parsed.routing.kv_transfer_compression == "fp8"
    assert parsed.backpressure.decode_p95_latency_threshold_ms == 200
    assert parsed.degradation.hold_ttl_seconds == 120


def test_a_redis_url_from_a_secret_reaches_the_scheduler_as_an_env_var_and_never_the_configmap():
    from baton.scheduler.config import SchedulerConfig

    m = model(scheduler__degradation={"store": "redis", "redisUrlSecret": {"name": "hold-store"}})
    objs = by_name(render_children(target(m)))
    text = objs["ConfigMap/llama-70b-scheduler"]["data"]["config.yaml"]
    parsed = SchedulerConfig.model_validate(yaml.safe_load(text))
    assert parsed.degradation.store == "redis" and parsed.degradation.redis_url_env == "BATON_REDIS_URL"
    assert "redisUrl:" not in text
    container = objs["Deployment/llama-70b-scheduler"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert env["BATON_REDIS_URL"] == {"secretKeyRef": {"name": "hold-store", "key": "url"}}
    assert parsed.degradation.resolved_redis_url({"BATON_REDIS_URL": "redis://:pw@redis:6379/0"})

    plain = model(scheduler__degradation={"store": "redis", "redisUrl": "redis://redis.infra:6379/2"})
    objs = by_name(render_children(target(plain)))
    parsed = SchedulerConfig.model_validate(yaml.safe_load(objs["ConfigMap/llama-70b-scheduler"]["data"]["config.yaml"]))
    assert parsed.degradation.redis_url == "redis://redis.infra:6379/2" and not parsed.degradation.redis_url_env
    container = objs["Deployment/llama-70b-scheduler"]["spec"]["template"]["spec"]["containers"][0]
    assert [e["name"] for e in container["env"]] == ["POD_IP"]


def _scheduler_parts(m: DisaggregatedModel):
    from baton.scheduler.config import SchedulerConfig

    objs = by_name(render_children(target(m)))
    config = SchedulerConfig.model_validate(yaml.safe_load(objs["ConfigMap/llama-70b-scheduler"]["data"]["config.yaml"]))
    pod = objs["Deployment/llama-70b-scheduler"]["spec"]["template"]["spec"]
    return config, pod, pod["containers"][0]


def test_the_scheduler_counts_text_prompts_with_the_models_own_tokenizer_when_asked():
    # default: the estimate, nothing mounted
    config, pod, container = _scheduler_parts(model())
    assert config.tokenizer.path == "" and config.tokenizer.hugging_face_id == ""
    assert [v["name"] for v in pod["volumes"]] == ["config"]
    # Hugging Face source: fetched at start with the model's token, nothing mounted
    config, pod, container = _scheduler_parts(model(scheduler__tokenizer="model"))
    assert config.tokenizer.hugging_face_id == "meta-llama/Llama-3.1-70B-Instruct" and not config.tokenizer.path
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert [v["name"] for v in pod["volumes"]] == ["config"]
    # a PVC: mounted read-only as the engines mount it, the tokenizer read from the checkpoint directory
    pvc = {"pvc": {"claimName": "weights", "subPath": "llama-70b"}}
    config, pod, container = _scheduler_parts(model(model__source=pvc, scheduler__tokenizer="model"))
    assert config.tokenizer.path == "/models/llama-70b"
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}
    assert "HF_TOKEN" not in {e["name"] for e in container["env"]}
    # a hostPath
    config, pod, _ = _scheduler_parts(model(model__source={"hostPath": {"path": "/data/llama"}},
                                            scheduler__tokenizer="model"))
    assert config.tokenizer.path == "/models"
    assert next(v for v in pod["volumes"] if v["name"] == "model")["hostPath"]["path"] == "/data/llama"


def test_generation_changes_with_the_engine_but_not_with_in_place_fields():
    from baton.render.naming import generation_key

    base = generation_key(model().spec)
    for in_place in (dict(decode__minReplicas=6), dict(prefill__maxBatchSize=8),
                     dict(decode__resources={"requests": {"cpu": "8"}}), dict(scheduler__maxQueueDepth=10),
                     dict(prefill__pool={"nodeSelector": {"baton.dev/pool": "prefill-h100"}})):
        assert generation_key(model(**in_place).spec) == base, in_place
    for new_generation in (dict(engine__kvCache={"dtype": "bf16"}), dict(engine__image="trtllm:1.3.0"),
                           dict(engine__trtllmVersion="1.3.0"), dict(decode__tensorParallelSize=2, decode__gpusPerReplica=2),
                           dict(decode__engineOverrides={"image": "patched:1"})):
        assert generation_key(model(**new_generation).spec) != base, new_generation


def test_rendering_is_deterministic_and_revision_ignores_replicas():
    m = model()
    assert render_children(target(m)) == render_children(target(model()))
    scaled = model(decode__minReplicas=6)
    assert revision(scaled.spec) == revision(m.spec)
    assert revision(model(engine__kvCache={"dtype": "bf16"}).spec) != revision(m.spec)


def test_reserved_extra_options_are_refused_with_a_clear_message():
    m = model(engine__extraOptions={"kv_cache_config": {"dtype": "fp16"}, "enable_chunked_prefill": True})
    problems = spec_problems(m.spec)
    assert len(problems) == 1 and "kv_cache_config" in problems[0] and "engine.kvCache" in problems[0]
    assert "enable_chunked_prefill" in engine_config.engine_options(m.spec, "decode")


def test_drift_comparison_tolerates_server_defaults_and_canonical_quantities():
    want = {"metadata": {"name": "x", "labels": {"a": "1"}}, "spec": {"cpu": "1000m", "list": [{"k": 1}], "empty": {}}}
    live = {"metadata": {"name": "x", "labels": {"a": "1"}, "uid": "u"},
            "spec": {"cpu": "1", "list": [{"k": 1, "default": True}], "extra": 2}}
    assert diff.in_sync({"kind": "X", **want}, live)
    live["spec"]["list"][0]["k"] = 2
    assert not diff.in_sync({"kind": "X", **want}, live)
    assert not diff.in_sync({"kind": "X", **want}, None)


@pytest.mark.parametrize("example", ["llama-70b.yaml", "small.yaml"])
def test_examples_parse(example):
    assert model(example).spec.model.name


def test_minreplicas_is_a_floor_and_decode_replicas_is_always_present_for_the_scale_subresource():
    version = crd_module.crd()["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert scale == {"specReplicasPath": ".spec.decode.replicas", "statusReplicasPath": ".status.decode.replicas",
                     "labelSelectorPath": ".status.decode.selector"}
    decode = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["decode"]["properties"]
    assert decode["replicas"]["default"] == 1  # GET .../scale fails while the field is absent

    m = model("small.yaml", decode__minReplicas=3, decode__maxReplicas=6)
    assert m.spec.decode.replicas == 1 and m.spec.decode.desired_replicas() == 3
    assert model("small.yaml", decode__minReplicas=3, decode__maxReplicas=6, decode__replicas=5).spec.decode.desired_replicas() == 5
    assert model("small.yaml", prefill__minReplicas=2, prefill__maxReplicas=2).spec.prefill.desired_replicas() == 2
    assert model("small.yaml", decode__minReplicas=0, decode__replicas=0).spec.decode.desired_replicas() == 0
