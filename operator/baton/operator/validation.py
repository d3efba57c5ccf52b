"""Checks on a spec that the CRD schema cannot express; each problem is a sentence a user can act on."""

from __future__ import annotations

import functools
import math
import re

from pydantic import ValidationError

from baton import kvformat
from baton.api.units import parse_quantity
from baton.api.v1alpha1 import (
    EMPTY_QUANTITY,
    GPU_RESOURCE,
    KV_CACHE_SIZE_NEEDS_ARCHITECTURE,
    TRITON_NEEDS_A_MODEL_REPOSITORY,
    TRITON_PORT_TOO_HIGH,
    LABEL_KEY_PATTERN,
    LABEL_KEY_SYNTAX,
    LABEL_PREFIX_MAX,
    PIPELINE_STAGE_WITHOUT_LAYERS,
    TRANSFER_BUFFER_BELOW_PROMPT_NIXL,
    TRANSFER_BUFFER_NOT_WHOLE_BLOCKS,
    DisaggregatedModelSpec,
)
from baton.render import engine_config, scheduler, tiers
from baton.render.derived import derive
from baton.render.naming import Target
from baton.scheduler.config import ConfigError, parse_config

# Where each setting of the scheduler's config file (baton.render.scheduler.scheduler_config) comes from in
# the spec, by its dotted path in the file: the longest matching prefix names the field. A path that is not
# here is named by its scheduler config path under spec.scheduler.
SCHEDULER_CONFIG_FIELDS = {
    "model": "model.name",
    "runtime": "engine.runtime",
    "endpoints.kubernetes.prefillPort": "prefill.port",
    "endpoints.kubernetes.decodePort": "decode.port",
    "routing": "scheduler.localPrefillBelowTokens and scheduler.alwaysPrefillAtOrAboveTokens",
    "routing.localPrefillBelowTokens": "scheduler.localPrefillBelowTokens",
    "routing.alwaysPrefillAtOrAboveTokens": "scheduler.alwaysPrefillAtOrAboveTokens",
    "routing.algorithm": "scheduler.algorithm",
    "routing.placementPolicy": "scheduler.placementPolicy",
    "routing.prefillBatchSize": "scheduler.prefillBatchSize",
    "routing.decodeBatchSize": "scheduler.decodeBatchSize",
    "routing.maxConcurrentPrefills": "scheduler.maxConcurrentPrefills",
    "routing.kvTransferCompression": "engine.kvTransfer.compression",
    "queue.maxDepth": "scheduler.maxQueueDepth",
    "admission": "scheduler.admission",
    "backpressure.maxActivePerDecodeReplica": "scheduler.backpressure.maxActivePerDecodeReplica",
    "backpressure.decodeP95LatencyThresholdMs": "scheduler.backpressure.decodeP95LatencyThreshold",
    "degradation": "scheduler.degradation",
    "degradation.holdTtlSeconds": "scheduler.degradation.holdTtl",
    "tokenizer": "scheduler.tokenizer (with model.source)",
    "heartbeatSeconds": "scheduler.heartbeatInterval",
    "server.port": "scheduler.port",
    "server.streamFlushIntervalMs": "scheduler.streamFlushIntervalMs",
}


# What to set, for the fields whose scheduler bound the CRD also states.
SCHEDULER_FIELD_HINTS = {
    "scheduler.heartbeatInterval": "set it above 0s (the default is 15s)",
    "scheduler.degradation.holdTtl": "set it above 0s (the default is 120s)",
}


def _spec_field(config_path: str) -> str:
    parts = config_path.split(".")
    for end in range(len(parts), 0, -1):
        field = SCHEDULER_CONFIG_FIELDS.get(".".join(parts[:end]))
        if field:
            if field == "scheduler.admission" and end < len(parts):
                return f"scheduler.admission.{'.'.join(parts[end:])}"
            return field
    return f"spec.scheduler (scheduler config {config_path or '<root>'})"


def scheduler_config_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """The scheduler config Baton would render for `spec`, run through the scheduler's own parser: one problem
    per setting the scheduler would refuse (a new scheduler would crash-loop on it, a running one would keep
    its old config), naming the spec field it comes from. The CRD refuses the known cases at admission; this
    catches any mismatch between the two schemas."""
    # The object's name and namespace only name Services in the config; any valid ones do here.
    target = Target(name="model", namespace="default", uid="", spec=spec)
    try:
        text = scheduler.configmap(target)["data"][scheduler.CONFIG_FILE]
    except ValueError as exc:
        return [f"cannot render the scheduler config for this spec: {exc}"]
    return list(_scheduler_config_text_problems(text))


@functools.lru_cache(maxsize=256)
def _scheduler_config_text_problems(text: str) -> tuple[str, ...]:
    """Parsing costs milliseconds (pure-Python YAML); an unchanged spec renders the same text every reconcile."""
    try:
        parse_config(text, source="scheduler config")
    except ConfigError as exc:
        cause = exc.__cause__
        if not isinstance(cause, ValidationError):
            return (f"the scheduler would refuse the config Baton renders for this spec: {exc}",)
        problems = []
        for err in cause.errors():
            path = ".".join(str(p) for p in err["loc"])
            field = _spec_field(path)
            problems.append(f"{field}: the scheduler would refuse the config Baton renders from it ({path or '<root>'}: "
                            f"{err['msg']}), so a new scheduler would not start and a running one would keep its "
                            f"old config; {SCHEDULER_FIELD_HINTS.get(field, f'change {field}')}")
        return tuple(problems)
    return ()


def _bytes(n: int) -> str:
    """A byte count as the shortest exact binary quantity, rounded up to a whole Mi."""
    mib = math.ceil(n / 2**20)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def pipeline_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """Every pipeline stage needs a layer (also a CEL rule; here for specs an older CRD let through)."""
    arch = spec.model.architecture
    if arch is None:
        return []
    return [f"{name}.{PIPELINE_STAGE_WITHOUT_LAYERS} (pipelineParallelSize={t.pipeline_parallel_size}, "
            f"numLayers={arch.num_layers})"
            for name, t in (("prefill", spec.prefill), ("decode", spec.decode)) if t.pipeline_parallel_size > arch.num_layers]


REASON_REVISION_NOT_PINNED = "ModelRevisionNotPinned"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def unpinned_revision_warning(spec: DisaggregatedModelSpec) -> str:
    """A warning ("" for none) for a Hugging Face source whose revision is not a commit: every engine pod
    downloads the weights when it starts, so pods started at different times (a rolling update, a rescheduled
    or replaced pod) can load different commits of a branch that moved, while the KV-format identity
    (hf:<id>@<revision>) takes them for the same weights. Not refused: a branch is a legitimate choice."""
    hf = spec.model.source.hugging_face
    if hf is None or _COMMIT.match(hf.revision):
        return ""
    what = f"revision {hf.revision!r}, a branch or tag" if hf.revision else "no revision (the default branch)"
    return (f"model.source.huggingFace names {hf.id} at {what}, not a commit: each engine pod downloads the "
            f"weights when it starts, so pods started at different times can load different commits if it moves, "
            f"and KV handed between different weights gives wrong answers without an error; set "
            f"model.source.huggingFace.revision to the 40-character commit hash to pin them")


# LLM-API options that TensorRT-LLM checks against a worker's tensor or pipeline parallelism at start-up.
MOE_PARALLEL_OPTIONS = ("moe_tensor_parallel_size", "moe_expert_parallel_size", "moe_cluster_parallel_size")


def extra_option_parallelism_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """engine.extraOptions go to both tiers, whose parallelism may differ: an option TensorRT-LLM checks
    against a worker's TP or PP must fit each tier, else that tier's engines fail at start-up (crash-looping)
    while the spec looks valid. MoE parallelism: tensor_parallel_size = moe_tensor_parallel_size ×
    moe_expert_parallel_size × moe_cluster_parallel_size, an unset one of the first two derived from the
    others (`Mapping`); `pp_partition`: one layer count per pipeline stage, summing to the model's layers."""
    options = spec.engine.extra_options or {}
    problems: list[str] = []
    moe: dict[str, int] = {}
    for key in MOE_PARALLEL_OPTIONS:
        value = options.get(key)
        if value is None or value == -1:  # unset (-1 is TensorRT-LLM's own "unset")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"engine.extraOptions {key} must be a positive integer, got {value!r}")
        else:
            moe[key] = value
    mtp, ep = moe.get("moe_tensor_parallel_size"), moe.get("moe_expert_parallel_size")
    cluster = moe.get("moe_cluster_parallel_size", 1)
    if not problems and (mtp is not None or ep is not None):
        for tier in ("prefill", "decode"):
            tp = spec.tier(tier).tensor_parallel_size
            tier_mtp = mtp if mtp is not None else tp // (ep * cluster)  # type: ignore[operator]
            tier_ep = ep if ep is not None else tp // (mtp * cluster)  # type: ignore[operator]
            if tier_mtp * tier_ep * cluster != tp:
                given = ", ".join(f"{k}={v}" for k, v in moe.items())
                problems.append(
                    f"engine.extraOptions {given} do not fit {tier}.tensorParallelSize {tp}: TensorRT-LLM requires "
                    f"tensor_parallel_size = moe_tensor_parallel_size × moe_expert_parallel_size × "
                    f"moe_cluster_parallel_size on every worker, and engine.extraOptions go to both tiers; choose "
                    f"values that fit both tiers' tensorParallelSize")
    partition = options.get("pp_partition")
    if partition is not None:
        layers = spec.model.architecture.num_layers if spec.model.architecture else None
        stages = partition if isinstance(partition, list) else None
        if not stages or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in stages):
            problems.append(f"engine.extraOptions pp_partition must be a list of positive layer counts, got {partition!r}")
        else:
            for tier in ("prefill", "decode"):
                pp = spec.tier(tier).pipeline_parallel_size
                if len(stages) != pp:
                    problems.append(
                        f"engine.extraOptions pp_partition {stages} has {len(stages)} entries, {tier}."
                        f"pipelineParallelSize is {pp}: TensorRT-LLM needs one layer count per pipeline stage, and "
                        f"engine.extraOptions go to both tiers (give them the same pipelineParallelSize, or drop it)")
            if layers is not None and sum(stages) != layers:
                problems.append(f"engine.extraOptions pp_partition {stages} sums to {sum(stages)} layers, "
                                f"model.architecture.numLayers is {layers}")
    return problems


def triton_source_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """tritonserver needs a model repository from the model source (a huggingFace source mounts none), and
    two ports above the tier's."""
    if spec.engine.runtime != "triton":
        return []
    problems = [TRITON_NEEDS_A_MODEL_REPOSITORY] if spec.model.source.hugging_face is not None else []
    return problems + [f"{tier}.port: {TRITON_PORT_TOO_HIGH}" for tier in ("prefill", "decode")
                       if spec.tier(tier).port > 65533]


def kv_cache_size_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """decode.kvCacheSize must be sizable (model.architecture) and hold at least one sequence."""
    size = spec.decode.kv_cache_size
    if not size:
        return []
    if spec.model.architecture is None:
        return [KV_CACHE_SIZE_NEEDS_ARCHITECTURE]
    derived = derive(spec)
    # what one token takes on all the replica's GPUs together (KV heads tensor parallelism duplicates counted)
    per_token, tokens = kvformat.replica_kv_bytes_per_token(derived.decode_state), derived.decode_kv_capacity_tokens
    prompt, generated = spec.prefill.max_prompt_tokens, spec.decode.max_generated_tokens
    sequence = prompt + generated
    if tokens >= sequence:
        return []
    size_bytes = parse_quantity(size)
    unit = ""
    if size_bytes != size_bytes.to_integral_value():
        unit = f" ({size_bytes.normalize():f} bytes: m is milli; use M or Mi, G or Gi)"
    elif size_bytes < 2**20:
        unit = f" ({int(size_bytes)} bytes: the size is in bytes; use a unit such as Gi)"
    return [
        f"decode.kvCacheSize {size}{unit} holds {tokens} tokens at {per_token} KV bytes per token on the replica's "
        f"GPUs (from model.architecture, KV dtype {spec.tier_engine('decode').kv_cache_dtype} and decode "
        f"tensorParallelSize {spec.decode.tensor_parallel_size}), fewer than one sequence: "
        f"prefill.maxPromptTokens {prompt} + decode.maxGeneratedTokens {generated} = {sequence} tokens; set "
        f"decode.kvCacheSize to at least {_bytes(sequence * per_token)}, or lower those limits"
    ]


def kv_transfer_buffer_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """The CRD's rules on engine.kvTransfer.maxTokensInBuffer, for objects admitted before them: whole KV blocks
    (TensorRT-LLM asserts it at start) and, with NIXL, room for the longest prompt (NIXL cannot transfer KV
    that does not fit the buffer)."""
    transfer = spec.engine.kv_transfer
    tokens = transfer.max_tokens_in_buffer
    if tokens is None:
        return []
    problems = []
    for tier in ("prefill", "decode"):
        block = spec.tier_engine(tier).tokens_per_block
        if tokens % block:
            problems.append(f"{TRANSFER_BUFFER_NOT_WHOLE_BLOCKS} (maxTokensInBuffer {tokens}, {tier} tokens per "
                            f"block {block})")
            break
    if transfer.backend == "NIXL" and tokens < spec.prefill.max_prompt_tokens:
        # An object created while the default was 8192 holds that value without its author having set it:
        # say how to take it out (an apply that leaves the field out does not remove it).
        problems.append(
            f"{TRANSFER_BUFFER_BELOW_PROMPT_NIXL} (maxTokensInBuffer {tokens}, maxPromptTokens "
            f"{spec.prefill.max_prompt_tokens}; a model created with Baton's earlier default holds 8192 unasked: "
            "set the field in its manifest, or remove it with kubectl patch dm NAME --type=json "
            "-p '[{\"op\":\"remove\",\"path\":\"/spec/engine/kvTransfer/maxTokensInBuffer\"}]')")
    return problems


def empty_quantity_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """The CRD's rule against empty resource quantities, for objects admitted before it: the API server would
    refuse the pod template (ApplyFailed). A tier's nvidia.com/gpu may be empty: it is rendered from
    gpusPerReplica whatever it holds."""
    owners = (("prefill", spec.prefill.resources, True), ("decode", spec.decode.resources, True),
              ("scheduler", spec.scheduler.resources, False))
    return [f"{owner}.resources.{kind}[{key}] {EMPTY_QUANTITY} {key}"
            for owner, resources, gpu_may_be_empty in owners
            for kind, quantities in (("requests", resources.requests), ("limits", resources.limits))
            for key, value in quantities.items()
            if str(value) == "" and not (gpu_may_be_empty and key == GPU_RESOURCE)]


def _is_label_key(key: str) -> bool:
    """Kubernetes' label key syntax (IsQualifiedName), as the CRD's rule checks it."""
    return re.search(LABEL_KEY_PATTERN, key) is not None and key.find("/") <= LABEL_PREFIX_MAX


def pod_label_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """The CRD's rule on podTemplate label keys, for objects admitted before it, naming the key: Kubernetes
    would refuse the StatefulSet (ApplyFailed). The models check the values (their pattern)."""
    return [f"{tier}.podTemplate.labels key {key!r} is not a Kubernetes label key: {LABEL_KEY_SYNTAX}"
            for tier in ("prefill", "decode") for key in spec.tier(tier).pod_template.labels if not _is_label_key(key)]


def spec_problems(spec: DisaggregatedModelSpec) -> list[str]:
    problems = engine_config.reserved_override_problems(spec)
    for tier_name, tier in (("prefill", spec.prefill), ("decode", spec.decode)):
        gpu_limit = tier.resources.limits.get("nvidia.com/gpu") or tier.resources.requests.get("nvidia.com/gpu")
        if gpu_limit and str(gpu_limit) != str(tier.gpus_per_replica):
            problems.append(
                f"{tier_name}.resources sets nvidia.com/gpu={gpu_limit} but gpusPerReplica is "
                f"{tier.gpus_per_replica}; drop nvidia.com/gpu from resources (it comes from gpusPerReplica)"
            )
    problems.extend(empty_quantity_problems(spec))
    problems.extend(tiers.reserved_env_overrides(spec))
    problems.extend(tiers.reserved_volume_overrides(spec))
    problems.extend(pod_label_problems(spec))
    problems.extend(kv_transfer_buffer_problems(spec))
    problems.extend(triton_source_problems(spec))
    problems.extend(kv_cache_size_problems(spec))
    problems.extend(pipeline_problems(spec))
    problems.extend(extra_option_parallelism_problems(spec))
    problems.extend(scheduler_config_problems(spec))
    return problems
