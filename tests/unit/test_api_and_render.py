"""The API models, the generated CRD and the rendered children (pure, no cluster)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from example_models import example_model
from baton.api import crd as crd_module
from baton.api.v1alpha1 import DisaggregatedModel
from baton.operator import diff
from baton.operator.validation import spec_problems
from baton.render import engine_config, render_children
from baton.render.derived import derive
from baton.render.naming import Target, revision

REPO = Path(__file__).resolve().parents[2]


def model(example: str = "llama-70b.yaml", **spec_overrides) -> DisaggregatedModel:
    return example_model(example, **spec_overrides)


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
    prefill = engine_config.engine_options(m.spec, "prefill", derived.decode_kv_capacity_tokens)
    decode = engine_config.engine_options(m.spec, "decode", derived.decode_kv_capacity_tokens)
    assert prefill["disable_overlap_scheduler"] is True and decode["disable_overlap_scheduler"] is False
    for opts in (prefill, decode):
        assert opts["cache_transceiver_config"]["backend"] in ("UCX", "NIXL")  # never DEFAULT
        assert opts["max_beam_width"] == 1
    same_layout = ("dtype", "tokens_per_block")
    assert {k: prefill["kv_cache_config"][k] for k in same_layout} == {k: decode["kv_cache_config"][k] for k in same_layout}
    assert prefill["tensor_parallel_size"] == 8 and decode["tensor_parallel_size"] == 4
    # decode.kvCacheSize 24Gi at fp8 Llama-70B (160 KiB per token) -> 157,286 tokens
    assert derived.kv_bytes_per_token == 163840
    assert decode["kv_cache_config"]["max_tokens"] == 24 * 2**30 // 163840
    # a decode replica batches as many sequences as the scheduler keeps in flight on it
    assert decode["max_batch_size"] == m.spec.scheduler.backpressure.max_active_per_decode_replica == 64


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



def _startup_probe(m: DisaggregatedModel, tier: str = "decode") -> dict:
    gen = derive(m.spec).generation
    sts = by_name(render_children(target(m)))[f"StatefulSet/{m.metadata['name']}-{tier}-{gen}"]
    return sts["spec"]["template"]["spec"]["containers"][0]["startupProbe"]


def test_the_engines_startup_budget_is_engine_startup_timeout_and_changing_it_rolls_in_place():
    """A 70B checkpoint downloaded from the Hub and loaded can take longer than 30 minutes: startupTimeout
    raises the startupProbe's budget. It shapes the pods (a new revision, rolled in place), not the KV format
    (the same generation), and a model that leaves it unset keeps every hash and its pod template."""
    from baton.render.naming import generation_key

    default = model()
    probe = _startup_probe(default)
    assert probe["periodSeconds"] * probe["failureThreshold"] == 30 * 60  # as before the field existed
    slow = model(engine__startupTimeout="90m")
    assert _startup_probe(slow)["failureThreshold"] * _startup_probe(slow)["periodSeconds"] == 90 * 60
    assert _startup_probe(slow, "prefill") == _startup_probe(slow, "decode")
    assert _startup_probe(model(engine__startupTimeout="95s"))["failureThreshold"] == 10  # rounded up
    assert generation_key(slow.spec) == generation_key(default.spec) and revision(slow.spec) != revision(default.spec)
    assert revision(model(engine__startupTimeout="30m").spec) == revision(default.spec)
    with pytest.raises(ValueError, match="engine.startupTimeout must be at least 1m"):
        model(engine__startupTimeout="30s")
    rule = next(r for r in _rules("spec", "engine") if "startupTimeout" in r["rule"])
    assert not cel_eval(rule["rule"], {"startupTimeout": "30s"}) and cel_eval(rule["rule"], {"startupTimeout": "2h"})


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
    # holdTtl 120s, but a hold never outlives the engines' KV (kvTransfer.timeout 30s, 10% kept for the transfer)
    assert parsed.degradation.hold_ttl_seconds == 27


@pytest.mark.parametrize(("hold_ttl", "timeout", "expected"), [("120s", "30s", 27.0), ("10s", "30s", 10.0),
                                                               ("120s", "300s", 120.0), ("5s", "1s", 0.9)])
def test_a_hold_never_outlives_the_kv_it_holds(hold_ttl, timeout, expected):
    """TensorRT-LLM's context worker frees a request's KV when it was not sent within kv_transfer_timeout_ms
    of the end of its prefill, which is when a hold begins: the scheduler's hold TTL is capped below it."""
    m = model(scheduler__degradation={"holdTtl": hold_ttl}, engine__kvTransfer={"timeout": timeout})
    config = yaml.safe_load(by_name(render_children(target(m)))["ConfigMap/llama-70b-scheduler"]["data"]["config.yaml"])
    assert config["degradation"]["holdTtlSeconds"] == pytest.approx(expected)


def test_a_redis_url_from_a_secret_reaches_the_scheduler_as_a_mounted_file_and_never_the_configmap(tmp_path):
    from baton.scheduler.config import SchedulerConfig

    m = model(scheduler__degradation={"store": "redis", "redisUrlSecret": {"name": "hold-store", "key": "dsn"}})
    objs = by_name(render_children(target(m)))
    text = objs["ConfigMap/llama-70b-scheduler"]["data"]["config.yaml"]
    parsed = SchedulerConfig.model_validate(yaml.safe_load(text))
    assert parsed.degradation.store == "redis" and not parsed.degradation.redis_url_env
    assert "redisUrl:" not in text
    pod = objs["Deployment/llama-70b-scheduler"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert [e["name"] for e in container["env"]] == ["POD_IP"]  # an env var would never see a rotation
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": "hold-store", "items": [{"key": "dsn", "path": "url"}]}
    mount = next(mt for mt in container["volumeMounts"] if mt["name"] == volume["name"])
    assert mount["readOnly"] is True
    assert parsed.degradation.redis_url_file == f"{mount['mountPath']}/url"
    assert parsed.watched_files() == [Path(mount["mountPath"]) / "url"]
    # what the kubelet writes there is what the scheduler uses
    local = tmp_path / "url"
    local.write_text("redis://:pw@redis:6379/0\n")
    assert parsed.degradation.model_copy(update={"redis_url_file": str(local)}).resolved_redis_url({}) == \
        "redis://:pw@redis:6379/0"

    plain = model(scheduler__degradation={"store": "redis", "redisUrl": "redis://redis.infra:6379/2"})
    objs = by_name(render_children(target(plain)))
    parsed = SchedulerConfig.model_validate(yaml.safe_load(objs["ConfigMap/llama-70b-scheduler"]["data"]["config.yaml"]))
    assert parsed.degradation.redis_url == "redis://redis.infra:6379/2" and not parsed.degradation.redis_url_file
    assert parsed.watched_files() == []
    pod = objs["Deployment/llama-70b-scheduler"]["spec"]["template"]["spec"]
    assert [e["name"] for e in pod["containers"][0]["env"]] == ["POD_IP"]
    assert not any("secret" in v for v in pod["volumes"])


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


def test_high_precision_fallback_reaches_the_scheduler_and_starts_no_generation():
    """A routing setting of the scheduler: it is in the scheduler's config, and toggling it changes neither
    the generation (no second set of GPUs for a rollout that changes nothing) nor the engines' revision."""
    from baton.render.naming import generation_key

    m = model(engine__kvTransfer={"compression": "fp8"})
    off = model(engine__kvTransfer={"compression": "fp8", "highPrecisionFallback": False})
    assert generation_key(off.spec) == generation_key(m.spec) and revision(off.spec) == revision(m.spec)
    config, _, _ = _scheduler_parts(off)
    assert config.routing.high_precision_fallback is False and config.routing.kv_transfer_compression == "fp8"
    assert _scheduler_parts(m)[0].routing.high_precision_fallback is True


def test_rendering_is_deterministic_and_revision_ignores_replicas():
    m = model()
    assert render_children(target(m)) == render_children(target(model()))
    scaled = model(decode__minReplicas=6)
    assert revision(scaled.spec) == revision(m.spec)
    assert revision(model(engine__kvCache={"dtype": "bf16"}).spec) != revision(m.spec)


def test_reserved_extra_options_are_refused_with_a_clear_message():
    m = model(engine__extraOptions={"kv_cache_config": {"dtype": "fp16"}, "print_iter_log": True})
    problems = spec_problems(m.spec)
    assert len(problems) == 1 and "kv_cache_config" in problems[0] and "engine.kvCache" in problems[0]
    assert engine_config.engine_options(m.spec, "decode")["print_iter_log"] is True  # not reserved: passed through


def test_drift_comparison_tolerates_server_defaults_and_canonical_quantities():
    # (quantities compare by value where they are quantities: under resources' requests and limits)
    want = {"metadata": {"name": "x", "labels": {"a": "1"}},
            "spec": {"requests": {"cpu": "1000m"}, "list": [{"k": 1}], "empty": {}}}
    live = {"metadata": {"name": "x", "labels": {"a": "1"}, "uid": "u"},
            "spec": {"requests": {"cpu": "1"}, "list": [{"k": 1, "default": True}], "extra": 2}}
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


# ------------------------------------------------------------------ CEL rules, evaluated in Python
# A minimal evaluator of the CEL subset the generated rules use, so their logic is checked here without an
# API server (a throwaway kube-apiserver was used to check that the API server compiles and enforces them).
_TOKEN = re.compile(r"\s*(?:(\d+)|('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|(&&|\|\||==|!=|<=|>=|[!<>?:()\[\].,+*%])|([A-Za-z_]\w*))")


def _tokens(text):
    pos, out = 0, []
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        assert m, f"cannot tokenize at {text[pos:pos + 20]!r}"
        num, string, op, ident = m.groups()
        out.append(("num", int(num)) if num else ("str", string[1:-1].replace("\\'", "'")) if string
                   else ("op", op) if op else ("id", ident))
        pos = m.end()
    return out + [("end", None)]


class _Missing(Exception):
    pass


def cel_eval(rule, self_value):
    """Evaluate the CEL subset Baton's rules use: literals and list literals, self paths, has(), ! && || ?: ==
    != < <= > >= in + * %, indexing, size(), string(), matches(), indexOf(), duration() of ms|s|m|h with getSeconds(), and the
    all() macro over a list's items or a map's keys. A missing field raises."""
    toks, i = _tokens(rule), [0]
    env = {}  # the variables all() binds

    def bind(var, item, body):
        env[var] = item
        return body()

    def peek():
        return toks[i[0]]

    def take(kind=None, value=None):
        tok = toks[i[0]]
        assert (kind is None or tok[0] == kind) and (value is None or tok[1] == value), (tok, kind, value)
        i[0] += 1
        return tok

    def ternary():
        cond = lor()
        if peek() == ("op", "?"):
            take()
            a = ternary()
            take("op", ":")
            b = ternary()
            return lambda: a() if cond() else b()
        return cond

    def binary(sub, ops):
        def parse():
            left = sub()
            while peek()[0] == "op" and peek()[1] in ops or (peek() == ("id", "in") and "in" in ops):
                op = take()[1]
                right = sub()
                left = (lambda l, r, o: lambda: _apply(o, l, r))(left, right, op)
            return left
        return parse

    def unary():
        if peek() == ("op", "!"):
            take()
            inner = unary()
            return lambda: not inner()
        return postfix()

    def postfix():
        node = primary()
        while True:
            if peek() == ("op", "."):
                take()
                name = take("id")[1]
                if peek() == ("op", "(") and name == "all":
                    take()
                    var = take("id")[1]
                    take("op", ",")
                    body = ternary()
                    take("op", ")")
                    node = (lambda n, var, body: lambda: all(bind(var, item, body) for item in n()))(node, var, body)
                elif peek() == ("op", "("):
                    take()
                    args = [] if peek() == ("op", ")") else [ternary()]
                    take("op", ")")
                    node = (lambda n, name, args: lambda: _method(n(), name, [a() for a in args]))(node, name, args)
                else:
                    node = (lambda n, name: lambda: _field(n(), name))(node, name)
            elif peek() == ("op", "["):
                take()
                key = ternary()
                take("op", "]")
                node = (lambda n, k: lambda: _index(n(), k()))(node, key)
            else:
                return node

    def primary():
        kind, value = take()
        if kind == "num":
            return lambda: value
        if kind == "str":
            return lambda: value
        if (kind, value) == ("op", "("):
            inner = ternary()
            take("op", ")")
            return inner
        if (kind, value) == ("op", "["):
            items = []
            while peek() != ("op", "]"):
                items.append(ternary())
                if peek() == ("op", ","):
                    take()
            take("op", "]")
            return lambda: [item() for item in items]
        if kind == "id" and value == "self":
            return lambda: self_value
        if kind == "id" and value in ("true", "false"):
            return lambda: value == "true"
        if kind == "id" and value in ("has", "string", "duration"):
            take("op", "(")
            arg = ternary()
            take("op", ")")
            if value == "has":
                def has():
                    try:
                        arg()
                        return True
                    except _Missing:
                        return False
                return has
            if value == "string":
                return lambda: str(arg())
            return lambda: _duration(arg())
        if kind == "id":
            return lambda: env[value]
        raise AssertionError(f"unsupported token {kind} {value}")

    rel = binary(binary(binary(unary, {"*", "%"}), {"+"}), {"==", "!=", "<", "<=", ">", ">=", "in"})
    land = binary(rel, {"&&"})
    lor = binary(land, {"||"})
    tree = ternary()
    take("end")
    return tree()


def _apply(op, left, right):
    if op == "&&":
        return left() and right()
    if op == "||":
        return left() or right()
    a, b = left(), right()
    return {"==": lambda: a == b, "!=": lambda: a != b, "<": lambda: a < b, "<=": lambda: a <= b,
            ">": lambda: a > b, ">=": lambda: a >= b, "in": lambda: a in b, "+": lambda: a + b,
            "*": lambda: a * b, "%": lambda: a % b}[op]()


def _field(value, name):
    if not isinstance(value, dict) or name not in value:
        raise _Missing(name)
    return value[name]


def _index(value, key):
    if key not in value:
        raise _Missing(key)
    return value[key]


def _method(value, name, args):
    if name == "size":
        return len(value)
    if name == "matches":
        return re.search(args[0], value) is not None
    if name == "indexOf":
        return value.find(args[0])
    if name == "getSeconds":  # a duration (here: seconds as a float), in whole seconds as CEL truncates it
        return int(value)
    raise AssertionError(name)


def _duration(text):
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"([0-9.]+)(ms|s|m|h)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def _schema():
    return crd_module.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _rules(*path: str) -> list[dict]:
    node = _schema()
    for key in path:
        node = node["properties"][key]
    return node.get("x-kubernetes-validations", [])


def _refused(rules: list[dict], obj: dict) -> list[str]:
    """Messages of the rules `obj` fails, as the API server would report them (an evaluation error fails too)."""
    out = []
    for rule in rules:
        try:
            ok = cel_eval(rule["rule"], obj)
        except _Missing:
            ok = False
        if not ok:
            out.append(rule["message"])
    return out


def _wire(m: DisaggregatedModel) -> dict:
    """The spec as the API server stores it after defaulting (every default filled in)."""
    return m.spec.model_dump(mode="json", by_alias=True, exclude_none=True)


# 1. metadata.name


def test_the_name_bound_keeps_every_child_name_valid_as_naming_builds_them():
    from baton.api import v1alpha1 as api
    from baton.render.naming import child_name, generation_child_name

    def longest_label(name: str) -> int:
        spec = model("small.yaml").spec
        t = Target(name=name, namespace="ns", uid="u", spec=spec)
        gen = derive(spec).generation
        sts = [generation_child_name(t, tier, gen) for tier in ("prefill", "decode")]
        # controller-revision-hash = <StatefulSet>-<hash of up to 10 characters>; pod = <StatefulSet>-<ordinal>
        return max([len(s) + 11 for s in sts] + [len(s) + 1 + len(str(1024 - 1)) for s in sts]
                   + [len(child_name(t, c)) for c in ("prefill", "decode", "scheduler")])

    assert api.NAME_MAX_LENGTH == 35
    assert longest_label("a" * api.NAME_MAX_LENGTH) == 63
    assert longest_label("a" * (api.NAME_MAX_LENGTH + 1)) > 63


@pytest.mark.parametrize("name,refused", [
    ("llama-8b", None), ("a" * 35, None), ("a" * 36, "at most 35 characters"),
    ("meta-llama-3-1-8b-instruct-bf16-production-eu-west-1-canary-00001", "at most 35 characters"),
    ("70b.llama", "DNS-1035 label"), ("70b-llama", "DNS-1035 label"), ("Llama", "DNS-1035 label"),
    ("llama-", "DNS-1035 label"),
])
def test_the_crd_root_refuses_names_whose_children_kubernetes_would_refuse(name, refused):
    rules = _schema()["x-kubernetes-validations"]
    assert all("self.metadata.name" in r["rule"] for r in rules)
    messages = _refused(rules, {"metadata": {"name": name}})
    if refused is None:
        assert messages == []
    else:
        assert len(messages) == 1 and refused in messages[0]


# 2. engine.kvTransfer.timeout


@pytest.mark.parametrize("timeout,ms", [("0s", None), ("0.5ms", None), ("0ms", None), ("1ms", 1), ("1.5ms", 2),
                                        ("30s", 30000), ("1h30m", 5400000)])
def test_kv_transfer_timeout_is_at_least_1ms_at_admission_and_in_the_model(timeout, ms):
    from pydantic import ValidationError

    rules = _rules("spec", "engine", "kvTransfer")
    messages = _refused(rules, {"timeout": timeout})
    if ms is None:
        assert messages and "at least 1ms" in messages[0]
        with pytest.raises(ValidationError, match="at least 1ms"):
            model("small.yaml", engine__kvTransfer={"timeout": timeout})
    else:
        assert messages == []
        m = model("small.yaml", engine__kvTransfer={"timeout": timeout})
        for tier in ("prefill", "decode"):
            assert engine_config.engine_options(m.spec, tier)["cache_transceiver_config"]["kv_transfer_timeout_ms"] == ms


# 3. Hugging Face revision


def test_the_hugging_face_revision_pin_is_rendered_as_the_llm_api_revision_option():
    pinned = model("small.yaml", model__source={"huggingFace": {"id": "meta-llama/Llama-3.1-8B-Instruct",
                                                                "revision": "0e9e39f"}})
    for tier in ("prefill", "decode"):
        assert engine_config.engine_options(pinned.spec, tier)["revision"] == "0e9e39f"
        assert "revision" not in engine_config.engine_options(model("small.yaml").spec, tier)
        pvc = model("small.yaml", model__source={"pvc": {"claimName": "weights"}}, model__revision="v1")
        assert "revision" not in engine_config.engine_options(pvc.spec, tier)
    # extraOptions cannot pin a different revision than the one the KV-format identity names
    assert spec_problems(model("small.yaml", engine__extraOptions={"revision": "main"}).spec)


# 4. extraOptions that change the GPU count or the KV CacheState


@pytest.mark.parametrize("key,value", [("context_parallel_size", 2), ("enable_attention_dp", True)])
def test_extra_options_cannot_enable_context_parallelism_or_attention_dp(key, value):
    m = model("small.yaml", engine__extraOptions={key: value, "print_iter_log": True})
    assert engine_config.reserved_overrides(m.spec) == [key]
    problems = spec_problems(m.spec)
    assert len(problems) == 1 and key in problems[0]
    [why] = engine_config.reserved_override_problems(m.spec)
    assert key in why and "not supported" in why
    for tier in ("prefill", "decode"):
        assert key not in engine_config.engine_options(m.spec, tier)
    state = derive(m.spec).prefill_state
    assert state.cp == 1 and state.enable_attention_dp is False


def test_reserved_override_problems_name_the_field_to_use():
    m = model("small.yaml", engine__extraOptions={"kv_cache_config": {}, "tensor_parallel_size": 2})
    assert engine_config.reserved_override_problems(m.spec) == [
        "engine.extraOptions cannot set kv_cache_config: use engine.kvCache (and decode.kvCacheSize)",
        "engine.extraOptions cannot set tensor_parallel_size: use the tiers' tensorParallelSize",
    ]


# 5. checks the operator makes, at admission


KV_OVERRIDES = [
    {}, {"kvCacheDtype": "fp8"}, {"kvCacheDtype": "bf16"}, {"tokensPerBlock": 64}, {"tokensPerBlock": 32},
    {"trtllmVersion": "1.2.1"}, {"trtllmVersion": "1.2.0"}, {"image": "registry/trtllm:patched"},
    {"kvCacheDtype": "fp8", "tokensPerBlock": 64},
]
KV_FIELDS = {"kvCacheDtype", "tokensPerBlock", "trtllmVersion"}


@pytest.mark.parametrize("prefill", KV_OVERRIDES)
@pytest.mark.parametrize("decode", KV_OVERRIDES)
def test_kv_format_rules_at_admission_refuse_exactly_what_the_operator_refuses(prefill, decode):
    m = model("small.yaml", prefill__engineOverrides=prefill, decode__engineOverrides=decode)
    operator = {mm.field for mm in derive(m.spec).kv_mismatches()}
    assert operator <= KV_FIELDS  # the other hard-equal fields cannot differ between the tiers of one spec
    kv_rules = [r for r in _rules("spec") if any(f"self.prefill.engineOverrides.{f}" in r["rule"] for f in KV_FIELDS)
                and "maxTokensInBuffer" not in r["rule"]]  # that one reads the block size, compares no tiers
    assert len(kv_rules) == len(KV_FIELDS)
    refused = _refused(kv_rules, _wire(m))
    assert {f for f in KV_FIELDS if any(f"({f} " in msg for msg in refused)} == operator
    for rule in kv_rules:
        assert "prefill and decode would not be able to hand off KV cache" in rule["message"]
        assert "make these fields equal on both tiers (engine.* or the tiers' engineOverrides)" in rule["message"]


@pytest.mark.parametrize("resources,gpus", [
    ({}, 1), ({"limits": {"nvidia.com/gpu": "1"}}, 1), ({"limits": {"nvidia.com/gpu": "2"}}, 1),
    ({"requests": {"nvidia.com/gpu": "2"}}, 1), ({"requests": {"nvidia.com/gpu": "2"}}, 2),
    ({"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "2"}}, 1),
    ({"limits": {"nvidia.com/gpu": ""}, "requests": {"nvidia.com/gpu": "2"}}, 1),
    ({"limits": {"memory": "24Gi"}}, 1), ({"limits": {"nvidia.com/gpu": "01"}}, 1),
])
@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_tier_gpu_resources_are_refused_at_admission_exactly_when_the_operator_refuses_them(tier, resources, gpus):
    m = model("small.yaml", **{f"{tier}__resources": resources, f"{tier}__gpusPerReplica": gpus,
                               f"{tier}__tensorParallelSize": gpus})
    operator = [p for p in spec_problems(m.spec) if "nvidia.com/gpu" in p]
    refused = [msg for msg in _refused(_rules("spec", tier), _wire(m)[tier]) if "nvidia.com/gpu" in msg]
    assert len(refused) == len(operator)
    if operator:
        assert refused[0].startswith(f"{tier}.resources sets nvidia.com/gpu")
        rule = next(r for r in _rules("spec", tier) if "nvidia.com/gpu" in r["message"])
        gpu = operator[0].split("nvidia.com/gpu=")[1].split(" ")[0]
        # the API server's message (messageExpression) names the value, as the operator's does
        assert cel_eval(rule["messageExpression"], _wire(m)[tier]).startswith(
            f"{tier}.resources sets nvidia.com/gpu={gpu}, which differs from gpusPerReplica; drop nvidia.com/gpu")


def test_kv_format_message_expression_names_both_values_like_the_operator():
    m = model("small.yaml", prefill__engineOverrides={"kvCacheDtype": "fp8"})
    rule = next(r for r in _rules("spec") if "kvCacheDtype" in r["rule"])
    assert cel_eval(rule["messageExpression"], _wire(m)) == (
        "prefill and decode would not be able to hand off KV cache (kvCacheDtype: prefill=fp8, decode=bf16); "
        "make these fields equal on both tiers (engine.* or the tiers' engineOverrides)")


# 6. chunked prefill


def test_chunked_prefill_is_rendered_when_prompts_can_exceed_max_num_tokens():
    m = model("small.yaml")  # maxPromptTokens 16384, maxNumTokens 8192 (default)
    for tier in ("prefill", "decode"):
        assert engine_config.engine_options(m.spec, tier)["enable_chunked_prefill"] is True
    fits = model("small.yaml", prefill__maxPromptTokens=8192)
    for tier in ("prefill", "decode"):
        assert "enable_chunked_prefill" not in engine_config.engine_options(fits.spec, tier)
    # per tier: the decode tier (local prefills) chunks when its own maxNumTokens is the smaller
    mixed = model("small.yaml", prefill__maxNumTokens=16384)
    assert "enable_chunked_prefill" not in engine_config.engine_options(mixed.spec, "prefill")
    assert engine_config.engine_options(mixed.spec, "decode")["enable_chunked_prefill"] is True


# 7. KV cache dtype


@pytest.mark.parametrize("dtype,rendered", [("bf16", "auto"), ("fp16", "auto"), ("fp8", "fp8")])
def test_kv_dtype_renders_what_the_pytorch_backend_accepts_and_the_gate_keeps_the_declared_one(dtype, rendered):
    m = model("small.yaml", engine__kvCache={"dtype": dtype})
    for tier in ("prefill", "decode"):
        assert engine_config.engine_options(m.spec, tier)["kv_cache_config"]["dtype"] == rendered
    d = derive(m.spec)
    assert d.prefill_state.kv_dtype == dtype and d.decode_state.kv_dtype == dtype
    # bf16 on one tier and fp16 on the other both render auto, but the static gate still refuses them
    mixed = model("small.yaml", engine__kvCache={"dtype": "bf16"}, decode__engineOverrides={"kvCacheDtype": "fp16"})
    assert [mm.field for mm in derive(mixed.spec).kv_mismatches()] == ["kvCacheDtype"]


# 8. MLA architecture


def test_an_mla_architecture_set_as_documented_sizes_kv_as_the_checkpoint_does(tmp_path):
    """DeepSeek-V3 caches one compressed KV per layer and token, kv_lora_rank + qk_rope_head_dim wide: what
    headDim documents for MLA, and what kvformat reads from the checkpoint's config.json. numKvHeads is
    documented as ignored for MLA, and is."""
    import json

    from baton import kvformat
    from baton.api.v1alpha1 import ModelArchitecture

    config = {"num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "hidden_size": 7168,
              "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    options = {"kv_cache_config": {"dtype": "fp8"}, "cache_transceiver_config": {"backend": "UCX"}}
    checkpoint = kvformat.cache_state_from_files(tmp_path, options, trtllm_version="1.2.0", env={})

    docs = ModelArchitecture.model_fields
    assert "MLA: the compressed KV's width, config.json kv_lora_rank + qk_rope_head_dim" in docs["head_dim"].description
    assert "Ignored with attentionType MLA" in docs["num_kv_heads"].description
    documented_head_dim = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    for num_kv_heads in (1, config["num_key_value_heads"]):
        m = model("small.yaml", engine__kvCache={"dtype": "fp8"}, model__architecture={
            "numLayers": config["num_hidden_layers"], "numKvHeads": num_kv_heads, "headDim": documented_head_dim,
            "attentionType": "MLA"})
        derived = derive(m.spec)
        assert derived.kv_bytes_per_token == kvformat.kv_bytes_per_token(checkpoint) == 61 * 576
        shape = ("attention_type", "kv_factor", "num_layers", "num_kv_heads", "head_dim", "kv_dtype")
        for state in (derived.prefill_state, derived.decode_state):
            assert [getattr(state, f) for f in shape] == [getattr(checkpoint, f) for f in shape]


def test_each_tier_and_the_scheduler_has_a_disruption_budget_over_its_pods_of_every_generation():
    """A drain evicts at most one pod of a tier (or of the scheduler) at a time. The budget selects by model
    and tier, not generation, so the pods of both generations of a rollout count under it."""
    model = example_model("llama-70b.yaml")
    children = render_children(Target(name="m", namespace="ns", uid="u", spec=model.spec))
    budgets = {c["metadata"]["name"]: c for c in children if c["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"m-prefill", "m-decode", "m-scheduler"}
    workloads = [c for c in children if c["kind"] in ("StatefulSet", "Deployment")]
    for budget in budgets.values():
        spec = budget["spec"]
        assert spec["maxUnavailable"] == 1 and spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert "baton.dev/generation" not in spec["selector"]["matchLabels"]
        covered = [w for w in workloads
                   if spec["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(covered) == 1, budget["metadata"]["name"]  # exactly its own component's pods
        assert budget["metadata"]["ownerReferences"][0]["kind"] == "DisaggregatedModel"


def test_a_triton_engine_is_restarted_only_when_the_server_is_not_live_not_when_a_model_is_not_ready():
    """With --strict-readiness /v2/health/ready fails while a model is not ready: that takes the pod out of
    rotation (readiness); only /v2/health/live failing restarts the server (liveness), as NVIDIA's chart has it."""
    children = render_children(target(model("small.yaml", engine__runtime="triton")))
    for sts in (c for c in children if c["kind"] == "StatefulSet"):
        engine = sts["spec"]["template"]["spec"]["containers"][0]
        # each tier loads only its own model from the shared repository (a second executor: a second copy
        # of the weights and of the KV cache on the same GPUs)
        tier = sts["metadata"]["labels"]["baton.dev/tier"]
        served = {"prefill": "context", "decode": "generation"}[tier]
        assert "--model-control-mode=explicit" in engine["args"] and f"--load-model={served}" in engine["args"]
        assert engine["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert engine["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    served = render_children(target(model("small.yaml")))  # trtllm-serve: /health for both
    engine = next(c for c in served if c["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert engine["readinessProbe"]["httpGet"]["path"] == engine["livenessProbe"]["httpGet"]["path"] == "/health"


def test_tritonserver_lets_in_flight_requests_finish_within_the_pods_grace_period():
    """tritonserver gives in-flight requests --exit-timeout-secs (30 s by default) after SIGTERM: the operator
    renders it a little under terminationGracePeriodSeconds, so decode replicas finish their generations."""
    children = render_children(target(model("small.yaml", engine__runtime="triton")))
    pods = [c["spec"]["template"]["spec"] for c in children if c["kind"] == "StatefulSet"]
    assert [p["containers"][0]["command"] for p in pods] == [["tritonserver"]] * 2  # prefill, decode
    for pod in pods:
        args = pod["containers"][0]["args"]
        timeouts = [int(a.split("=", 1)[1]) for a in args if a.startswith("--exit-timeout-secs=")]
        assert len(timeouts) == 1 and 30 < timeouts[0] < pod["terminationGracePeriodSeconds"], args


def test_tritonserver_serves_the_model_repository_at_the_sources_sub_path():
    """A PVC source's subPath is the repository (two models on one PVC each serve their own directory), as it is
    trtllm-serve's model argument; a hostPath is mounted whole."""
    for source, repository in (({"pvc": {"claimName": "weights", "subPath": "/llama-70b/triton-repo/"}},
                                "/models/llama-70b/triton-repo"),
                               ({"pvc": {"claimName": "weights"}}, "/models"),
                               ({"hostPath": {"path": "/data/repo"}}, "/models")):
        children = render_children(target(model("small.yaml", engine__runtime="triton", model__source=source)))
        pods = [c["spec"]["template"]["spec"] for c in children if c["kind"] == "StatefulSet"]
        assert len(pods) == 2
        for pod in pods:
            args = pod["containers"][0]["args"]
            assert [a for a in args if a.startswith("--model-repository")] == [f"--model-repository={repository}"]
            mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
            assert mount["mountPath"] == "/models"


def _tier_objects(m: DisaggregatedModel) -> dict[str, tuple[dict, dict]]:
    """tier -> (its StatefulSet's pod template, its engine ConfigMap's data): what its pods run."""
    out: dict[str, list] = {"prefill": [None, None], "decode": [None, None]}
    for child in render_children(target(m)):
        tier = child["metadata"]["labels"].get("baton.dev/tier")
        if child["kind"] == "StatefulSet":
            out[tier][0] = child["spec"]["template"]
        elif child["kind"] == "ConfigMap" and child["metadata"]["name"].endswith(f"-{tier}-engine-" + derive(m.spec).generation):
            out[tier][1] = child["data"]
    assert all(t and c for t, c in out.values()), out
    return {tier: (t, c) for tier, (t, c) in out.items()}


def _without_revision(template: dict) -> dict:
    labels = {k: v for k, v in template["metadata"]["labels"].items() if k != "baton.dev/revision"}
    return {**template, "metadata": {**template["metadata"], "labels": labels}}


@pytest.mark.parametrize("change", [
    dict(decode__maxBatchSize=32), dict(decode__kvCacheSize="20Gi"), dict(decode__maxGeneratedTokens=2048),
    dict(decode__resources={"requests": {"cpu": "8"}}), dict(decode__podTemplate={"labels": {"team": "a"}}),
    dict(prefill__maxBatchSize=8), dict(prefill__pool={"nodeSelector": {"baton.dev/pool": "other"}}),
    dict(prefill__podTemplate={"env": [{"name": "X", "value": "1"}]}), dict(prefill__maxPromptTokens=4096),
    dict(engine__env=[{"name": "Y", "value": "2"}]), dict(decode__minReplicas=6),
])
def test_a_change_rolls_exactly_the_tiers_whose_pods_it_changes(change):
    """Each tier's pods carry a revision of their own: a change restarts a tier's engines (a new revision
    label, so new pods) exactly when what those pods run changed (pod template or engine config); a decode
    batch limit does not restart the prefill engines."""
    base = model()
    changed = model(**change)
    before, after = _tier_objects(base), _tier_objects(changed)
    rolled = set()
    for tier in ("prefill", "decode"):
        (t0, c0), (t1, c1) = before[tier], after[tier]
        runs_otherwise = _without_revision(t0) != _without_revision(t1) or c0 != c1
        relabelled = t0["metadata"]["labels"]["baton.dev/revision"] != t1["metadata"]["labels"]["baton.dev/revision"]
        assert relabelled == runs_otherwise, (tier, change)
        if relabelled:
            rolled.add(tier)
    key = next(iter(change))
    expected = {"prefill__maxPromptTokens": {"prefill", "decode"}, "engine__env": {"prefill", "decode"},
                "decode__minReplicas": set()}.get(key, {key.split("__")[0]})
    assert rolled == expected, (change, rolled)


def test_pods_labelled_with_the_whole_spec_revision_keep_it_until_the_spec_changes():
    """An operator before per-tier revisions labelled both tiers' pods with the whole spec's revision:
    upgrading the operator must not restart every engine, so that label is kept while it is still the spec's;
    the next change moves each tier to its own."""
    from baton.operator.rollout_pass import generation_children

    m = model()
    derived = derive(m.spec)

    def live_with(label):
        return {tier: {"spec": {"template": {"metadata": {"labels": {"baton.dev/revision": label}}}}}
                for tier in ("prefill", "decode")}

    def labels_of(children):
        return {c["metadata"]["labels"]["baton.dev/tier"]: (c["metadata"]["labels"]["baton.dev/revision"],
                                                           c["spec"]["template"]["metadata"]["labels"]["baton.dev/revision"])
                for c in children if c["kind"] == "StatefulSet"}

    kept = labels_of(generation_children(target(m), derived, live_with(revision(m.spec))))
    assert kept == {t: (revision(m.spec), revision(m.spec)) for t in ("prefill", "decode")}
    own = {t: (derived.tier_revisions[t],) * 2 for t in ("prefill", "decode")}
    assert derived.tier_revisions["prefill"] != derived.tier_revisions["decode"] != revision(m.spec)
    assert labels_of(generation_children(target(m), derived, live_with("an-older-spec"))) == own
    assert labels_of(generation_children(target(m), derived)) == own
