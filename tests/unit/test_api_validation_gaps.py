"""Spec values that used to pass admission and the operator's checks but broke a child later: refused at
`kubectl apply` (CEL and schema, evaluated here in Python) and by the operator (InvalidSpec), with messages
that say what to set."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from baton import pod_volumes
from baton.api import v1alpha1 as api
from baton.operator import validation
from baton.operator.validation import spec_problems
from baton.render import engine_config, render_children, scheduler
from baton.render.derived import derive
from baton.render.naming import Target
from test_api_and_render import _refused, _rules, _schema, _wire, cel_eval, model, target

# ----------------------------------------------------------- 1. scheduler settings the scheduler refuses


@pytest.mark.parametrize("value,refused", [("0s", True), ("0ms", True), ("0h0m", True), ("0.0s", True),
                                           ("1ms", False), ("15s", False), ("1h", False)])
def test_heartbeat_interval_must_be_above_zero_at_admission(value, refused):
    m = model("small.yaml", scheduler__heartbeatInterval=value)
    messages = _refused(_rules("spec", "scheduler"), _wire(m)["scheduler"])
    if refused:
        assert messages == ["scheduler.heartbeatInterval must be greater than 0s (the default is 15s): it is how often "
                            "the scheduler health-checks idle and unhealthy engine replicas, and the scheduler refuses 0"]
    else:
        assert messages == []


@pytest.mark.parametrize("value,refused", [("0s", True), ("0ms", True), ("0.0ms", True), ("1ms", False),
                                           ("120s", False)])
def test_hold_ttl_must_be_above_zero_at_admission(value, refused):
    m = model("small.yaml", scheduler__degradation={"holdTtl": value})
    messages = _refused(_rules("spec", "scheduler", "degradation"), _wire(m)["scheduler"]["degradation"])
    if refused:
        assert len(messages) == 1 and messages[0].startswith("scheduler.degradation.holdTtl must be greater than 0s")
    else:
        assert messages == []


@pytest.mark.parametrize("fields,field,hint", [
    ({"scheduler__heartbeatInterval": "0s"}, "scheduler.heartbeatInterval", "set it above 0s (the default is 15s)"),
    ({"scheduler__degradation": {"holdTtl": "0ms"}}, "scheduler.degradation.holdTtl",
     "set it above 0s (the default is 120s)"),
])
def test_the_operator_refuses_what_the_scheduler_would_refuse_naming_the_spec_field(fields, field, hint):
    problems = spec_problems(model("small.yaml", **fields).spec)
    assert len(problems) == 1
    assert problems[0].startswith(f"{field}: the scheduler would refuse the config Baton renders from it")
    assert problems[0].endswith(hint)
    assert spec_problems(model("small.yaml").spec) == spec_problems(model("llama-70b.yaml").spec) == []


def test_any_setting_the_scheduler_refuses_becomes_an_invalid_spec_problem():
    """A spec value the API models allow but the scheduler's config does not (a future mismatch; here made
    by skipping the models' own bounds) is caught by running the scheduler's parser on the rendered config."""
    spec = model("small.yaml").spec
    loose = spec.model_copy(update={"scheduler": spec.scheduler.model_copy(update={"max_queue_depth": -1})})
    [problem] = spec_problems(loose)
    assert problem.startswith("scheduler.maxQueueDepth: the scheduler would refuse the config Baton renders from it "
                              "(queue.maxDepth: Input should be greater than or equal to 0)")
    crossed = spec.model_copy(update={"scheduler": spec.scheduler.model_copy(
        update={"local_prefill_below_tokens": 9000, "always_prefill_at_or_above_tokens": 100})})
    [problem] = spec_problems(crossed)
    assert problem.startswith("scheduler.localPrefillBelowTokens and scheduler.alwaysPrefillAtOrAboveTokens:")
    assert "(9000) must not exceed" in problem


def test_every_scheduler_config_setting_from_the_spec_is_named_by_its_spec_field():
    spec = model("small.yaml", scheduler__tokenizer="model").spec
    config = scheduler.scheduler_config(Target(name="m", namespace="ns", uid="u", spec=spec))
    operator_made = {"endpoints.discovery", "endpoints.kubernetes.namespace", "endpoints.kubernetes.prefillService",
                     "endpoints.kubernetes.decodeService", "endpoints.kubernetes.model", "server.host"}

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield from leaves(value, path + ".") if isinstance(value, dict) else [path]

    unnamed = [p for p in leaves(config) if p not in operator_made and validation._spec_field(p).startswith("spec.")]
    assert unnamed == []



def test_a_triton_model_needs_a_model_repository_source_at_admission_and_by_the_operator():
    """tritonserver runs --model-repository on the model source's mount: a huggingFace source mounts none, so
    the pods would crash-loop behind a 30-minute startup budget."""
    hf = model("small.yaml", engine__runtime="triton")
    assert hf.spec.model.source.hugging_face is not None
    assert _refused(_rules("spec"), _wire(hf)) == [api.TRITON_NEEDS_A_MODEL_REPOSITORY]
    assert spec_problems(hf.spec) == [api.TRITON_NEEDS_A_MODEL_REPOSITORY]
    repository = model("small.yaml", engine__runtime="triton",
                       model__source={"pvc": {"claimName": "triton-repo"}})
    assert _refused(_rules("spec"), _wire(repository)) == [] and spec_problems(repository.spec) == []
    served = model("small.yaml")  # trtllm-serve downloads from the Hub itself
    assert _refused(_rules("spec"), _wire(served)) == [] and spec_problems(served.spec) == []


@pytest.mark.parametrize("runtime,port,refused", [("triton", 65534, True), ("triton", 65535, True),
                                                  ("triton", 65533, False), ("trtllm-serve", 65535, False)])
def test_a_triton_tier_port_leaves_room_for_its_grpc_and_metrics_ports(runtime, port, refused):
    """tritonserver is rendered with --grpc-port=port+1 and --metrics-port=port+2: above 65533 it cannot start."""
    m = model("small.yaml", engine__runtime=runtime, model__source={"pvc": {"claimName": "repo"}}, decode__port=port)
    expected = [f"decode.port: {api.TRITON_PORT_TOO_HIGH}"] if refused else []
    assert _refused(_rules("spec"), _wire(m)) == expected and spec_problems(m.spec) == expected


# ------------------------------------------------------------------------------ 2. decode.kvCacheSize


def test_kv_cache_size_without_architecture_is_refused_at_admission_and_by_the_operator():
    m = model("small.yaml", model__architecture=None)
    assert m.spec.decode.kv_cache_size == "24Gi"
    refused = _refused(_rules("spec"), _wire(m))
    assert refused == [api.KV_CACHE_SIZE_NEEDS_ARCHITECTURE]
    assert "decode.kvCacheSize needs model.architecture" in refused[0]
    assert spec_problems(m.spec) == [api.KV_CACHE_SIZE_NEEDS_ARCHITECTURE]
    unsized = model("small.yaml", model__architecture=None, decode__kvCacheSize="")
    assert _refused(_rules("spec"), _wire(unsized)) == [] and spec_problems(unsized.spec) == []


@pytest.mark.parametrize("size,refused", [("24m", True), ("500u", True), ("1e-3", True), ("24M", False),
                                          ("24Mi", False), ("24Gi", False), ("1e9", False), ("", False)])
def test_kv_cache_size_in_milli_bytes_is_refused_at_admission(size, refused):
    m = model("small.yaml", decode__kvCacheSize=size)
    messages = [msg for msg in _refused(_rules("spec", "decode"), _wire(m)["decode"]) if "kvCacheSize" in msg]
    assert bool(messages) == refused
    if refused:
        assert messages[0].startswith("decode.kvCacheSize is a number of bytes: m is milli")


@pytest.mark.parametrize("size,expected", [
    ("1Gi", "decode.kvCacheSize 1Gi holds 8192 tokens at 131072 KV bytes per token on the replica's GPUs (from "
            "model.architecture, KV dtype bf16 and decode tensorParallelSize 1), fewer than one sequence: "
            "prefill.maxPromptTokens 16384 + decode.maxGeneratedTokens 2048 = "
            "18432 tokens; set decode.kvCacheSize to at least 2304Mi, or lower those limits"),
    ("24000", "decode.kvCacheSize 24000 (24000 bytes: the size is in bytes; use a unit such as Gi) holds 0 tokens"),
    ("24m", "decode.kvCacheSize 24m (0.024 bytes: m is milli; use M or Mi, G or Gi) holds 0 tokens"),
    ("24Gi", None), ("2304Mi", None),
])
def test_kv_cache_size_below_one_sequence_is_an_invalid_spec_with_the_numbers(size, expected):
    m = model("small.yaml", decode__kvCacheSize=size)
    problems = spec_problems(m.spec)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(expected)


def test_kv_cache_size_is_judged_with_the_decode_kv_dtype_and_the_token_limits():
    fp8 = model("small.yaml", decode__kvCacheSize="1Gi", engine__kvCache={"dtype": "fp8"})
    [problem] = spec_problems(fp8.spec)
    assert "holds 16384 tokens at 65536 KV bytes per token on the replica's GPUs" in problem
    assert "at least 1152Mi" in problem
    fits = model("small.yaml", decode__kvCacheSize="1Gi", prefill__maxPromptTokens=6144, decode__maxGeneratedTokens=2048)
    assert spec_problems(fits.spec) == []
    assert render_children(target(fits))  # and it renders, with its capacity
    capacity = derive(fits.spec).decode_kv_capacity_tokens
    assert capacity == 8192 and engine_config.engine_options(fits.spec, "decode", capacity)["kv_cache_config"]["max_tokens"] == 8192


@pytest.mark.parametrize("architecture,tp,tokens", [
    ({"numLayers": 80, "numKvHeads": 8, "headDim": 128}, 4, 24 * 2**30 // 163840),  # heads split: no copies
    ({"numLayers": 80, "numKvHeads": 8, "headDim": 128}, 16, 24 * 2**30 // (163840 * 2)),  # 2 ranks per head
    ({"numLayers": 61, "numKvHeads": 1, "headDim": 576, "attentionType": "MLA"}, 8, 24 * 2**30 // (61 * 576 * 8)),
])
def test_kv_cache_size_counts_the_kv_heads_tensor_parallelism_duplicates(architecture, tp, tokens):
    """decode.kvCacheSize is the KV memory of one decode replica: with more TP ranks than KV heads each rank holds
    a copy of its head, and MLA's one latent KV is on every rank, so the replica holds fewer tokens than the
    size over the model's bytes per token (TensorRT-LLM's max_tokens counts tokens, each rank its own copy)."""
    m = model("llama-70b.yaml", model__architecture=architecture, decode__kvCacheSize="24Gi",
              decode__tensorParallelSize=tp, decode__gpusPerReplica=tp, engine__kvCache={"dtype": "fp8"})
    assert derive(m.spec).decode_kv_capacity_tokens == tokens


# ------------------------------------------------------------------- 3. extraOptions Baton renders itself


def test_every_key_baton_renders_into_the_engine_config_is_reserved():
    m = model("small.yaml", engine__speculativeConfig={"decoding_type": "MTP", "num_nextn_predict_layers": 1},
              model__source={"huggingFace": {"id": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f"}})
    rendered = set()
    for tier in ("prefill", "decode"):
        rendered |= set(engine_config.engine_options(m.spec, tier, 131072))
    assert "enable_chunked_prefill" in rendered and "speculative_config" in rendered and "revision" in rendered
    assert rendered - engine_config.RESERVED_KEYS == set()


@pytest.mark.parametrize("key,value,says", [
    ("max_seq_len", 131072, "use prefill.maxPromptTokens and decode.maxGeneratedTokens"),
    ("max_input_len", 4096, "use prefill.maxPromptTokens"),
    ("max_num_tokens", 16384, "use the tiers' maxNumTokens"),
    ("max_batch_size", 256, "use the tiers' maxBatchSize"),
    ("enable_chunked_prefill", False, "Baton turns chunked prefill on"),
    ("enable_iter_perf_stats", False, "its metrics need it"),
    ("return_perf_metrics", False, "its metrics need it"),
    ("perf_metrics_max_requests", 10, "its metrics need it"),
])
def test_extra_options_that_baton_would_overwrite_are_refused_naming_what_to_use(key, value, says):
    m = model("small.yaml", engine__extraOptions={key: value})
    problems = spec_problems(m.spec)
    assert len(problems) == 1
    assert problems[0].startswith(f"engine.extraOptions cannot set {key}: ") and says in problems[0]
    assert "nothing" not in problems[0]


# ---------------------------------------------------------------------------- 4. routing thresholds


def test_the_routing_threshold_message_says_local_prefill_defaults_to_4096_and_what_to_set():
    m = model("small.yaml", scheduler__alwaysPrefillAtOrAboveTokens=1000)
    [message] = _refused(_rules("spec", "scheduler"), _wire(m)["scheduler"])
    assert "localPrefillBelowTokens defaults to 4096" in message
    assert "also set localPrefillBelowTokens, to at most alwaysPrefillAtOrAboveTokens" in message
    rule = next(r for r in _rules("spec", "scheduler") if "alwaysPrefillAtOrAboveTokens" in r["rule"])
    assert rule["fieldPath"] == ".localPrefillBelowTokens"
    fixed = model("small.yaml", scheduler__alwaysPrefillAtOrAboveTokens=1000, scheduler__localPrefillBelowTokens=1000)
    assert _refused(_rules("spec", "scheduler"), _wire(fixed)["scheduler"]) == []


# ------------------------------------------------------------------------------ 5. resource quantities


def _quantity_schema(*path: str) -> dict:
    node = _schema()["properties"]["spec"]
    for key in path:
        node = node["properties"][key]
    return node


@pytest.mark.parametrize("path", [("prefill", "resources", "limits"), ("decode", "resources", "requests"),
                                  ("scheduler", "resources", "limits")])
def test_resource_quantities_are_int_or_string_in_kubernetes_quantity_syntax(path):
    values = _quantity_schema(*path)["additionalProperties"]
    assert values["x-kubernetes-int-or-string"] is True and "type" not in values
    assert values["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert values["minimum"] == 0 and values["maxLength"] == 64
    pattern = re.compile(values["pattern"])
    for ok in ("4", "500m", "0.5", "32Gi", "32G", "1e3", "1.5Ti", "100k", ""):
        assert pattern.search(ok), ok
    for bad in ("32GB", "4 cores", "32gi", "1K", "-1", "Gi"):
        assert not pattern.search(bad), bad


def test_an_unquoted_integer_quantity_is_accepted_and_kept_as_its_string():
    m = model("small.yaml", decode__resources={"limits": {"cpu": 4, "memory": "32Gi"}, "requests": {"cpu": 2}})
    assert m.spec.decode.resources.limits == {"cpu": "4", "memory": "32Gi"}
    assert m.spec.decode.resources.requests == {"cpu": "2"}
    assert _refused(_rules("spec", "decode"), {**_wire(m)["decode"],
                                               "resources": {"limits": {"cpu": 4}, "requests": {"cpu": 2}}}) == []
    for bad in ("32GB", "4 cores"):
        with pytest.raises(ValidationError, match="should match pattern"):
            model("small.yaml", decode__resources={"limits": {"memory": bad}})
    with pytest.raises(ValidationError):
        model("small.yaml", scheduler__resources={"limits": {"cpu": -1}})


@pytest.mark.parametrize("gpu,gpus,refused", [(2, 1, True), (1, 1, False), (2, 2, False), ("2", 1, True)])
def test_an_integer_gpu_quantity_is_compared_as_the_operator_compares_it(gpu, gpus, refused):
    m = model("small.yaml", decode__resources={"limits": {"nvidia.com/gpu": gpu}}, decode__gpusPerReplica=gpus,
              decode__tensorParallelSize=gpus)
    wire = _wire(m)["decode"]
    wire["resources"] = {"limits": {"nvidia.com/gpu": gpu}}  # as the API server holds it: int or string
    messages = [msg for msg in _refused(_rules("spec", "decode"), wire) if "nvidia.com/gpu" in msg]
    operator = [p for p in spec_problems(m.spec) if "nvidia.com/gpu" in p]
    assert bool(messages) == bool(operator) == refused
    if refused:
        rule = next(r for r in _rules("spec", "decode") if "nvidia.com/gpu" in r["message"])
        assert cel_eval(rule["messageExpression"], wire).startswith(f"decode.resources sets nvidia.com/gpu={gpu}, ")


# ----------------------------------------------------------- the KV transfer buffer (max_tokens_in_buffer)


@pytest.mark.parametrize("backend,tokens,prompt,expected", [
    ("UCX", None, 32768, 8192),  # longer prompts go through a per-transfer buffer: slower, but they work
    ("UCX", None, 2000, 2016),  # no bigger than the longest prompt, in whole blocks of 32
    ("NIXL", None, 32768, 32768),  # NIXL cannot do that: room for the longest prompt
    ("NIXL", None, 16390, 16416),  # in whole blocks of 32, as TensorRT-LLM requires
    ("UCX", 4096, 32768, 4096),
    ("NIXL", 65536, 32768, 65536),
])
def test_the_transfer_buffer_is_rendered_alike_on_both_tiers(backend, tokens, prompt, expected):
    transfer = {"backend": backend, **({"maxTokensInBuffer": tokens} if tokens else {})}
    m = model("small.yaml", engine__kvTransfer=transfer, prefill__maxPromptTokens=prompt)
    for tier in ("prefill", "decode"):
        assert engine_config.engine_options(m.spec, tier)["cache_transceiver_config"]["max_tokens_in_buffer"] == expected
    assert spec_problems(m.spec) == []


def test_a_nixl_buffer_is_rounded_up_with_the_tiers_own_block_size():
    m = model("small.yaml", engine__kvTransfer={"backend": "NIXL"}, prefill__maxPromptTokens=1000,
              engine__kvCache__tokensPerBlock=16, prefill__engineOverrides={"tokensPerBlock": 128},
              decode__engineOverrides={"tokensPerBlock": 128})
    assert {engine_config.engine_options(m.spec, tier)["cache_transceiver_config"]["max_tokens_in_buffer"]
            for tier in ("prefill", "decode")} == {1024}


@pytest.mark.parametrize("transfer,prompt,overrides,refused", [
    ({"maxTokensInBuffer": 1000}, 32768, {}, [api.TRANSFER_BUFFER_NOT_WHOLE_BLOCKS]),
    ({"maxTokensInBuffer": 8192}, 32768, {}, []),
    ({"maxTokensInBuffer": 8192}, 32768, {"tokensPerBlock": 128}, []),
    ({"maxTokensInBuffer": 8224}, 32768, {"tokensPerBlock": 64}, [api.TRANSFER_BUFFER_NOT_WHOLE_BLOCKS]),
    ({"backend": "NIXL", "maxTokensInBuffer": 8192}, 32768, {}, [api.TRANSFER_BUFFER_BELOW_PROMPT_NIXL]),
    ({"backend": "NIXL", "maxTokensInBuffer": 32768}, 32768, {}, []),
    ({"backend": "NIXL", "maxTokensInBuffer": 1000}, 32768, {},
     [api.TRANSFER_BUFFER_NOT_WHOLE_BLOCKS, api.TRANSFER_BUFFER_BELOW_PROMPT_NIXL]),
    ({"backend": "NIXL"}, 32768, {}, []),  # left out: sized from maxPromptTokens
    ({"backend": "UCX", "maxTokensInBuffer": 8192}, 131072, {}, []),  # UCX: slower for longer prompts, not refused
])
def test_transfer_buffer_rules_at_admission_and_in_the_operator(transfer, prompt, overrides, refused):
    """Refused at `kubectl apply` (the CRD's CEL) and, for objects admitted before the rules, by the operator
    (InvalidSpec) with the same sentence plus the values."""
    fields = {"engine__kvTransfer": transfer, "prefill__maxPromptTokens": prompt}
    if overrides:
        fields.update(prefill__engineOverrides=overrides, decode__engineOverrides=overrides)
    m = model("small.yaml", **fields)
    assert _refused(_rules("spec"), _wire(m)) == refused
    problems = spec_problems(m.spec)
    assert [p.split(" (maxTokensInBuffer")[0] for p in problems] == refused
    if api.TRANSFER_BUFFER_NOT_WHOLE_BLOCKS in refused:
        block = overrides.get("tokensPerBlock", 32)
        assert f"(maxTokensInBuffer {transfer['maxTokensInBuffer']}, prefill tokens per block {block})" in problems[0]
    if api.TRANSFER_BUFFER_BELOW_PROMPT_NIXL in refused:
        assert f"(maxTokensInBuffer {transfer['maxTokensInBuffer']}, maxPromptTokens {prompt};" in problems[-1]
        # the way out for a model that got 8192 from the old default without asking for it
        assert "kubectl patch dm NAME --type=json" in problems[-1]
        assert '"path":"/spec/engine/kvTransfer/maxTokensInBuffer"' in problems[-1]


# ----------------------------------------------------------- pipeline stages without layers

@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_a_pipeline_stage_without_layers_is_refused_at_admission_and_by_the_operator(tier):
    """PP 4 over a 2-layer model: TensorRT-LLM would refuse to start the engines, so a new generation would
    only be rolled back at its progress deadline (and a first deployment would never become Ready)."""
    m = model("small.yaml", model__architecture={"numLayers": 2, "numKvHeads": 8, "headDim": 128},
              **{f"{tier}__pipelineParallelSize": 4, f"{tier}__gpusPerReplica": 4})
    messages = _refused(_rules("spec"), _wire(m))
    assert messages == [f"{tier}.{api.PIPELINE_STAGE_WITHOUT_LAYERS}"]
    problems = spec_problems(m.spec)
    assert len(problems) == 1 and problems[0].startswith(f"{tier}.pipelineParallelSize is above model.architecture.numLayers")
    assert "(pipelineParallelSize=4, numLayers=2)" in problems[0]
    ok = model("small.yaml", model__architecture={"numLayers": 4, "numKvHeads": 8, "headDim": 128},
               **{f"{tier}__pipelineParallelSize": 4, f"{tier}__gpusPerReplica": 4})
    assert _refused(_rules("spec"), _wire(ok)) == [] and spec_problems(ok.spec) == []


# ------------------------------------------------------------- tier rules a default makes fail


def _tier_as_stored(tier: str, **fields) -> dict:
    """A tier the user wrote with only `fields`, as the API server stores it (every default filled in)."""
    model_class = api.PrefillTierSpec if tier == "prefill" else api.DecodeTierSpec
    return model_class.model_validate(fields).model_dump(mode="json", by_alias=True, exclude_none=True)


@pytest.mark.parametrize("tier", ["prefill", "decode"])
@pytest.mark.parametrize("fields,field_path,message", [
    ({"tensorParallelSize": 8}, ".gpusPerReplica",
     "{t}.tensorParallelSize x pipelineParallelSize must equal {t}.gpusPerReplica (all three default to 1): set "
     "gpusPerReplica to tensorParallelSize x pipelineParallelSize, or change the sizes"),
    ({"minReplicas": 2}, ".maxReplicas",
     "{t}.minReplicas must be at most {t}.maxReplicas (maxReplicas defaults to 1): set maxReplicas to at least "
     "minReplicas, or lower minReplicas"),
    ({"replicas": 3}, ".maxReplicas",
     "{t}.replicas must be at most {t}.maxReplicas (maxReplicas defaults to 1): set maxReplicas to at least "
     "replicas, or lower replicas"),
])
def test_a_tier_rule_failed_by_a_default_says_which_default_and_points_at_the_field_to_set(
        tier, fields, field_path, message):
    """`prefill: {tensorParallelSize: 8}` fails on gpusPerReplica, which the user never set."""
    rules = _rules("spec", tier)
    [refused] = _refused(rules, _tier_as_stored(tier, **fields))
    assert refused == message.format(t=tier)
    assert next(r for r in rules if r["message"] == refused)["fieldPath"] == field_path
    fixed = {**fields, field_path[1:]: 8}
    assert _refused(rules, _tier_as_stored(tier, **fixed)) == []


# ------------------------------------------------------------------------- empty resource quantities


@pytest.mark.parametrize("owner,kind,key,refused", [
    ("prefill", "requests", "cpu", True), ("decode", "limits", "memory", True),
    ("decode", "requests", "ephemeral-storage", True),
    ("prefill", "limits", "nvidia.com/gpu", False), ("decode", "requests", "nvidia.com/gpu", False),
    ("scheduler", "requests", "cpu", True), ("scheduler", "limits", "nvidia.com/gpu", True),
])
def test_an_empty_quantity_is_refused_at_admission_and_by_the_operator_but_for_a_tiers_gpu(owner, kind, key, refused):
    """'' passes the quantity pattern (it stands for "not set" in a tier's nvidia.com/gpu, which gpusPerReplica
    always overwrites), but Kubernetes refuses it in a pod: the StatefulSet or Deployment would fail to apply."""
    m = model("small.yaml", **{f"{owner}__resources": {kind: {key: "", "cpu" if key != "cpu" else "memory": "1"}}})
    messages = [msg for msg in _refused(_rules("spec", owner), _wire(m)[owner]) if "is empty" in msg]
    problems = [p for p in spec_problems(m.spec) if "is empty" in p]
    if not refused:
        assert messages == problems == []
        return
    gpu = " (only nvidia.com/gpu may be empty: it comes from gpusPerReplica)" if owner != "scheduler" else ""
    assert messages == [f"{owner}.resources.{kind}: a quantity is empty (''), which Kubernetes refuses in a pod; set "
                        f"a quantity such as 4, 500m or 32Gi, or remove the key{gpu}"]
    rule = next(r for r in _rules("spec", owner) if r["message"] == messages[0])
    assert rule["fieldPath"] == f".resources.{kind}"
    assert problems == [f"{owner}.resources.{kind}[{key}] is empty (''), which Kubernetes refuses in a pod; set a "
                        f"quantity such as 4, 500m or 32Gi, or remove {key}"]
    # the same quantity as an unquoted integer, as the API server may hold it, passes
    wire = _wire(model("small.yaml"))[owner]
    wire["resources"] = {kind: {key: 2}}
    assert [msg for msg in _refused(_rules("spec", owner), wire) if "is empty" in msg] == []


# ----------------------------------------------------------- podTemplate volumes and mounts Baton uses


SOURCES = {"pvc": {"pvc": {"claimName": "weights"}}, "hostPath": {"hostPath": {"path": "/data/llama"}},
           "huggingFace": {"huggingFace": {"id": "meta-llama/Llama-3.1-8B-Instruct"}}}


def _batons_volumes_and_mounts(source: dict) -> tuple[set[str], set[str]]:
    """The volume names and engine mount paths the renderer gives a tier's pod of this source, user's aside."""
    objs = render_children(target(model("small.yaml", model__source=source)))
    pod = next(o for o in objs if o["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    return {v["name"] for v in pod["volumes"]}, {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("tier", ["prefill", "decode"])
def test_a_volume_or_mount_colliding_with_batons_own_is_refused_at_admission_and_by_the_operator(source, tier):
    """Kubernetes refuses a pod with two volumes of one name and a container with two mounts at one path
    (ApplyFailed): what collides is whatever the renderer gives this model source, and nothing else."""
    names, paths = _batons_volumes_and_mounts(SOURCES[source])
    assert {"dshm", "engine-config"} < names and {"/dev/shm", "/etc/baton/engine"} < paths
    others = {"model", "hf-cache", "scratch"} - names, {"/models", "/cache", "/scratch", "/dev/shm/x"} - paths
    assert len(others[0]) == 2 and len(others[1]) == 3  # one of model and hf-cache is free, so is its path
    for name in names:
        m = model("small.yaml", model__source=SOURCES[source],
                  **{f"{tier}__podTemplate": {"volumes": [{"name": "ok", "emptyDir": {}}, {"name": name, "emptyDir": {}}]}})
        [refused] = _refused(_rules("spec"), _wire(m))
        assert refused.startswith(f"{tier}.podTemplate.volumes: a volume is named like one of Baton's own (")
        assert [p for p in spec_problems(m.spec) if "podTemplate" in p] == [
            f"{tier}.podTemplate.volumes[1].name is {name}, the name of Baton's own {pod_volumes.PURPOSE[name]} volume, "
            "and Kubernetes refuses two volumes of one name; give the volume another name (and its volumeMounts too)"]
    for path in paths:
        m = model("small.yaml", model__source=SOURCES[source],
                  **{f"{tier}__podTemplate": {"volumeMounts": [{"name": "ok", "mountPath": path}]}})
        [refused] = _refused(_rules("spec"), _wire(m))
        assert refused.startswith(f"{tier}.podTemplate.volumeMounts: a mount is at one of Baton's own mount paths (")
        [problem] = [p for p in spec_problems(m.spec) if "podTemplate" in p]
        assert problem.startswith(f"{tier}.podTemplate.volumeMounts[0].mountPath is {path}, where Baton mounts its own ")
        assert problem.endswith("; mount it at another path")
    free = model("small.yaml", model__source=SOURCES[source], **{f"{tier}__podTemplate": {
        "volumes": [{"name": n, "emptyDir": {}} for n in sorted(others[0])],
        "volumeMounts": [{"name": "scratch", "mountPath": p} for p in sorted(others[1])] + [{"name": "no-path"}]}})
    assert _refused(_rules("spec"), _wire(free)) == [] and spec_problems(free.spec) == []


def test_the_volume_rules_read_fields_the_schema_declares_and_stay_within_the_cost_budget():
    """CEL cannot read a field a schema only preserves, and iterating a list needs a bound on its length."""
    template = _quantity_schema("decode", "podTemplate")["properties"]
    assert template["volumes"]["items"]["properties"]["name"]["type"] == "string"
    assert template["volumeMounts"]["items"]["properties"]["mountPath"]["type"] == "string"
    for field in ("volumes", "volumeMounts"):
        assert template[field]["items"]["x-kubernetes-preserve-unknown-fields"] is True  # the rest passes through
        assert template[field]["maxItems"] == api.MAX_EXTRA_VOLUMES
    assert template["labels"]["maxProperties"] == api.MAX_EXTRA_LABELS


# ----------------------------------------------------------------------------------- podTemplate labels


@pytest.mark.parametrize("key,valid", [
    ("team", True), ("example.com/team", True), ("app.kubernetes.io/part-of", True), ("a", True),
    ("a_b.c-d", True), ("x" * 63, True), ("p" * 253 + "/n", True),
    ("bad key", False), ("-team", False), ("team-", False), ("x" * 64, False), ("Example.com/team", False),
    ("example.com/", False), ("/team", False), ("a/b/c", False), ("p" * 254 + "/n", False), ("", False),
    ("ex_ample.com/team", False),
])
def test_pod_label_keys_are_checked_at_admission_and_by_the_operator(key, valid):
    m = model("small.yaml", decode__podTemplate={"labels": {key: "v"}})
    refused = _refused(_rules("spec", "decode"), _wire(m)["decode"])
    problems = spec_problems(m.spec)
    if valid:
        assert refused == problems == []
        return
    assert refused == ["decode.podTemplate.labels: a key is not a Kubernetes label key: a name of at most 63 letters, "
                       "digits, '-', '_' and '.' starting and ending with a letter or digit, optionally prefixed by a "
                       "DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters) and '/'; use a "
                       "key such as team or example.com/team"]
    assert problems == [f"decode.podTemplate.labels key {key!r} is not a Kubernetes label key: "
                        + refused[0].split("a Kubernetes label key: ", 1)[1]]


@pytest.mark.parametrize("value,valid", [("v1", True), ("", True), ("a.b_c-d", True), ("x" * 63, True),
                                         ("x" * 64, False), ("a b", False), ("-v", False), ("v-", False),
                                         ("a/b", False)])
def test_pod_label_values_are_refused_by_the_schema_and_the_models(value, valid):
    values = _quantity_schema("prefill", "podTemplate", "labels")["additionalProperties"]
    assert values["maxLength"] == 63
    assert (re.search(values["pattern"], value) is not None and len(value) <= values["maxLength"]) == valid
    if valid:
        assert model("small.yaml", prefill__podTemplate={"labels": {"team": value}}).spec.prefill.pod_template.labels
    else:
        with pytest.raises(ValidationError):
            model("small.yaml", prefill__podTemplate={"labels": {"team": value}})


@pytest.mark.parametrize("deadline,min_ready,refused", [("5s", 5, True), ("0s", 0, True), ("1m", 60, True),
                                                        ("6s", 5, False), ("10s", 5, False), ("15m", 5, False)])
def test_a_progress_deadline_no_rollout_can_meet_is_refused_at_admission_and_by_the_operator(deadline, min_ready, refused):
    """Pods count as available only after minReadySeconds Ready: a progressDeadline no longer than that rolls
    every rollout (and every PairwiseSwap step) back, whatever the engines do."""
    rollout = {**_wire(model("small.yaml"))["rollout"], "progressDeadline": deadline, "minReadySeconds": min_ready}
    messages = _refused(_rules("spec", "rollout"), rollout)
    assert messages == ([api.PROGRESS_DEADLINE_TOO_SHORT] if refused else [])
    if refused:
        with pytest.raises(ValidationError, match="progressDeadline must be longer than rollout.minReadySeconds"):
            api.RolloutSpec.model_validate(rollout)
    else:
        api.RolloutSpec.model_validate(rollout)


def test_moe_parallelism_in_extra_options_must_fit_both_tiers_tensor_parallelism():
    """engine.extraOptions go to both tiers: MoE parallelism TensorRT-LLM checks against a worker's TP at
    start-up (tp = moe_tp × moe_ep × moe_cluster) is refused when it fits only one tier (prefill TP 8, decode
    TP 4 here), naming the tier, instead of one tier crash-looping behind a valid-looking spec."""
    def problems(**options):
        return [p for p in spec_problems(model(engine__extraOptions=options).spec) if "moe_" in p]

    assert problems() == []
    assert problems(moe_expert_parallel_size=4) == []  # moe_tp 2 on prefill, 1 on decode
    assert problems(moe_expert_parallel_size=2, moe_tensor_parallel_size=-1) == []  # -1: TensorRT-LLM's unset
    refused = problems(moe_expert_parallel_size=8)
    assert len(refused) == 1 and "decode.tensorParallelSize 4" in refused[0], refused
    refused = problems(moe_expert_parallel_size=2, moe_tensor_parallel_size=2)
    assert len(refused) == 1 and "prefill.tensorParallelSize 8" in refused[0], refused
    refused = problems(moe_expert_parallel_size=2, moe_cluster_parallel_size=4)
    assert len(refused) == 1 and "decode.tensorParallelSize 4" in refused[0], refused
    for bad in (0, "4", True, 2.0):
        refused = problems(moe_expert_parallel_size=bad)
        assert refused == [f"engine.extraOptions moe_expert_parallel_size must be a positive integer, got {bad!r}"]


def test_pp_partition_in_extra_options_must_have_a_stage_count_of_each_tier_and_the_models_layers():
    def problems(options, **tiers):
        return [p for p in spec_problems(model(engine__extraOptions=options, **tiers).spec) if "pp_partition" in p]

    two_stage_prefill = dict(prefill__tensorParallelSize=4, prefill__pipelineParallelSize=2)
    refused = problems({"pp_partition": [44, 36]}, **two_stage_prefill)
    assert len(refused) == 1 and "decode.pipelineParallelSize is 1" in refused[0], refused
    both = dict(two_stage_prefill, decode__tensorParallelSize=2, decode__pipelineParallelSize=2)
    assert problems({"pp_partition": [44, 36]}, **both) == []
    refused = problems({"pp_partition": [40, 36]}, **both)
    assert refused == ["engine.extraOptions pp_partition [40, 36] sums to 76 layers, model.architecture.numLayers is 80"]
    assert problems({"pp_partition": "44,36"}, **both) == [
        "engine.extraOptions pp_partition must be a list of positive layer counts, got '44,36'"]


def test_a_hugging_face_source_not_pinned_to_a_commit_is_warned_of():
    def warning(source):
        return validation.unpinned_revision_warning(model("small.yaml", model__source=source).spec)

    hf = {"id": "meta-llama/Llama-3.1-8B-Instruct"}
    assert "no revision (the default branch)" in warning({"huggingFace": hf})
    assert "revision 'main', a branch or tag" in warning({"huggingFace": {**hf, "revision": "main"}})
    assert "revision '0e9e39f'" in warning({"huggingFace": {**hf, "revision": "0e9e39f"}})  # abbreviated: a ref
    assert warning({"huggingFace": {**hf, "revision": "0e9e39f249a16976918f6564b8830bc894c89659"}}) == ""
    assert warning({"hostPath": {"path": "/data/llama"}}) == warning({"pvc": {"claimName": "w"}}) == ""
