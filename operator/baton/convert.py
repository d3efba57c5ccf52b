"""`baton convert FILE`: a TensorRT-LLM disaggregated serving config in, a DisaggregatedModel out.

Two shapes of FILE are read.

trtllm-serve's own (`trtllm-serve disaggregated -c FILE`):

    model: Qwen/Qwen3-32B-FP8
    backend: pytorch
    hostname: 0.0.0.0
    port: 8000
    kv_cache_config: {dtype: fp8, tokens_per_block: 32}     # top-level options apply to both sections
    speculative_config: {decoding_type: Eagle3, max_draft_len: 3, speculative_model: ...}
    context_servers:
      num_instances: 2
      tensor_parallel_size: 2
      pipeline_parallel_size: 1
      max_batch_size: 16
      max_num_tokens: 8192
      cache_transceiver_config: {backend: UCX, max_tokens_in_buffer: 8192}
      urls: ["ctx-0:8001", "ctx-1:8001"]
    generation_servers:
      num_instances: 4
      tensor_parallel_size: 4
      cache_transceiver_config: {backend: UCX}
      urls: [...]

context_servers become the prefill tier and generation_servers the decode tier: num_instances sets
minReplicas and maxReplicas; tensor_parallel_size and pipeline_parallel_size the tier's sizes and its
gpusPerReplica (their product); max_batch_size, max_num_tokens and (prefill) max_input_len the tier's
limits. kv_cache_config (dtype, tokens_per_block, free_gpu_memory_fraction, enable_block_reuse),
cache_transceiver_config (backend, max_tokens_in_buffer, kv_transfer_timeout_ms) and speculative_config
become engine.*, and other LLM-API options both sections share become engine.extraOptions. A section's
value overrides the top level's. Baton renders one KV layout for both tiers, so a KV dtype, tokens per
block, speculative config or transfer backend that differs between the sections is refused; other
differing settings take one value, with a warning. urls are not used (Baton's pods get their own
addresses, which its scheduler discovers), but must agree with num_instances as trtllm-serve requires.
backend must be pytorch (the default), the backend Baton runs.

The design brief's:

    model: llama-4-70b
    backend: tensorrtllm
    tiers:
      prefill: {instance_type: h100-x8, min_instances: 2, max_instances: 8, batch_size: 64, max_prompt_tokens: 128000}
      decode:  {instance_type: l40s-x4, min_instances: 4, max_instances: 16, batch_size: 1, kv_cache_size: 128GB, max_generated_tokens: 4096}
    scheduler: {algorithm: throughput-optimized, max_queue_depth: 256}

`instance_type` is `<gpu>-x<count>`: the tier gets `count` GPUs per replica (tensor parallel; a count that
is not a power of two is split into tensor x pipeline parallel) and a node selector on NVIDIA GPU feature
discovery's labels (`nvidia.com/gpu.product`, `nvidia.com/gpu.count`).

In both shapes the scheduler's command line (`--scheduler-command "disaggregated-scheduler
--prefill-batch-size 32 ..."`) is mapped too. Everything that does not carry over is named in a warning on
stderr; the object goes to stdout. Input Baton cannot convert, or a result the API server or the operator
would refuse, exits 1 with what to change.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from baton.api.units import parse_duration
from baton.api.v1alpha1 import (
    DNS1035_LABEL,
    GROUP,
    KIND,
    NAME_MAX_LENGTH,
    ROOT_RULES,
    VERSION,
    DisaggregatedModel,
    DisaggregatedModelSpec,
    KVCacheSpec,
    SchedulerSpec,
)
from baton.operator.validation import spec_problems
from baton.render.engine_config import RESERVED_KEY_FIELDS


class ConvertError(ValueError):
    """Input Baton cannot convert; the message names the input's key (or flag) and what to change."""


# GPU short names -> the nvidia.com/gpu.product value GPU feature discovery reports.
GPU_PRODUCTS = {
    "h100": "NVIDIA-H100-80GB-HBM3",
    "h200": "NVIDIA-H200",
    "b200": "NVIDIA-B200",
    "gb200": "NVIDIA-GB200",
    "a100": "NVIDIA-A100-SXM4-80GB",
    "l40s": "NVIDIA-L40S",
    "l40": "NVIDIA-L40",
    "l4": "NVIDIA-L4",
    "a10g": "NVIDIA-A10G",
}
# GPUs without FP8 (Ampere): an fp8 KV cache cannot run on them, so converting for them defaults to bf16.
NO_FP8_PRODUCTS = {GPU_PRODUCTS["a100"], GPU_PRODUCTS["a10g"]}
TIERS = ("prefill", "decode")
KV_CACHE_DTYPES = typing.get_args(KVCacheSpec.model_fields["dtype"].annotation)
DEFAULT_KV_CACHE_DTYPE = "fp8"
DEFAULT_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"
DEFAULT_TRTLLM_VERSION = "1.2.0"
SCHEDULER_FLAGS = {  # the scheduler's flag -> the spec field it sets
    "--prefill-batch-size": "scheduler.prefillBatchSize",
    "--decode-batch-size": "scheduler.decodeBatchSize",
    "--max-concurrent-prefills": "scheduler.maxConcurrentPrefills",
    "--placement-policy": "scheduler.placementPolicy",
    "--max-queue-depth": "scheduler.maxQueueDepth",
    "--algorithm": "scheduler.algorithm",
    "--local-prefill-below-tokens": "scheduler.localPrefillBelowTokens",
    "--always-prefill-at-or-above-tokens": "scheduler.alwaysPrefillAtOrAboveTokens",
    "--kv-cache-transfer-compression": "engine.kvTransfer.compression",
}

# The design brief's shape.
BRIEF_KEYS = {"model", "backend", "tiers", "scheduler"}
BRIEF_TIER_KEYS = {"instance_type", "min_instances", "max_instances", "batch_size", "max_prompt_tokens", "kv_cache_size",
                   "max_generated_tokens"}
BRIEF_TIER_EXAMPLE = "{instance_type: h100-x8, min_instances: 2, max_instances: 8, batch_size: 64}"
BRIEF_FRONT_ENDS = {"tensorrtllm": "trtllm-serve", "trtllm": "trtllm-serve", "trtllm-serve": "trtllm-serve",
                    "pytorch": "trtllm-serve", "triton": "triton"}

# trtllm-serve's shape (tensorrt_llm/llmapi/disagg_utils.py). Each section's LLM-API options are the top
# level's, overridden by its own.
SECTIONS = {"prefill": "context_servers", "decode": "generation_servers"}
SECTION_EXAMPLE = "{num_instances: 2, tensor_parallel_size: 4, urls: [...]}"
TRTLLM_BACKEND = "pytorch"
# The router's own settings (extract_disagg_cfg's arguments): Baton's scheduler takes the router's place.
ROUTER_KEYS = {
    "hostname": " (clients reach Baton's scheduler through its Service)",
    "port": " (Baton's scheduler serves on scheduler.port, default 8000)",
    "conditional_disagg_config": " (Baton's scheduler prefills prompts shorter than scheduler.localPrefillBelowTokens "
                                 "on a decode replica)",
    **dict.fromkeys(["max_retries", "perf_metrics_max_requests", "return_perf_metrics", "perf_metrics_output_dir",
                     "otlp_config", "disagg_cluster", "node_id", "schedule_style", "allow_request_chat_template",
                     "gen_strip_message_history", "gen_tokids_ctxbytes", "num_workers", "disagg_coordinator_url"], ""),
}
NESTED_OPTIONS = ("kv_cache_config", "cache_transceiver_config")  # merged field by field
TIER_OPTIONS = {
    "tensor_parallel_size": "tensorParallelSize",
    "pipeline_parallel_size": "pipelineParallelSize",
    "max_batch_size": "maxBatchSize",
    "max_num_tokens": "maxNumTokens",
}
# How the two sections' values of an option Baton renders once for both tiers combine:
SAME = "same"  # KV layout: the values must be equal, one section leaving it unset included
SAME_WHEN_SET = "same when set"  # the value one section sets is used for both; two set values must be equal


def _transfer_backend(value: Any, where: str, m: _Model) -> str | None:
    backend = str(value).upper()
    if backend == "DEFAULT":
        m.warn(f"{where}: DEFAULT means UCX or NIXL depending on the TensorRT-LLM version and environment; Baton "
               "renders an explicit backend: the other section's, else UCX (engine.kvTransfer.backend)")
        return None
    if backend == "MPI":
        raise ConvertError(f"{where}: MPI needs every engine in one MPI world, and Baton runs each replica as its own "
                           "pod: use UCX or NIXL")
    return backend


def _milliseconds(value: Any, where: str, m: _Model) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvertError(f"{where}: {value!r} is not a whole number of milliseconds")
    return f"{value}ms"


# option (nested ones as section.field) -> (spec field, how the sections combine, reading of the input value)
SHARED_OPTIONS = {
    "kv_cache_config.dtype": ("engine.kvCache.dtype", SAME, lambda value, where, m: None if value == "auto" else value),
    "kv_cache_config.tokens_per_block": ("engine.kvCache.tokensPerBlock", SAME, None),
    "speculative_config": ("engine.speculativeConfig", SAME, None),
    "cache_transceiver_config.backend": ("engine.kvTransfer.backend", SAME_WHEN_SET, _transfer_backend),
    # Free to differ in TensorRT-LLM: the value safe for both tiers.
    "kv_cache_config.free_gpu_memory_fraction": ("engine.kvCache.freeGpuMemoryFraction", min, None),
    "kv_cache_config.enable_block_reuse": ("engine.kvCache.enableBlockReuse", max, None),
    "cache_transceiver_config.max_tokens_in_buffer": ("engine.kvTransfer.maxTokensInBuffer", max, None),
    "cache_transceiver_config.kv_transfer_timeout_ms": ("engine.kvTransfer.timeout",
                                                        functools.partial(max, key=parse_duration), _milliseconds),
    "max_input_len": ("prefill.maxPromptTokens", max, None),
}


# ------------------------------------------------------------------------------------------- plumbing


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mapping(value: Any, where: str, example: str) -> dict[str, Any]:
    """A mapping from the input (None: empty), with string keys; anything else is a ConvertError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConvertError(f"{where} must be a mapping such as {example}, not {_kind(value)} ({_short(value)})")
    return {str(key): item for key, item in value.items()}


@functools.cache
def _api_models(path: str) -> tuple[type[BaseModel], str]:
    """The API model holding spec field `path` (camelCase, dotted) and the field's Python name."""
    model: type[BaseModel] = DisaggregatedModelSpec
    *parents, leaf = path.split(".")
    for alias in parents:
        annotation = model.model_fields[_field_name(model, alias)].annotation
        model = next(t for t in (annotation, *typing.get_args(annotation))
                     if isinstance(t, type) and issubclass(t, BaseModel))
    return model, _field_name(model, leaf)


def _field_name(model: type[BaseModel], alias: str) -> str:
    return next(name for name, info in model.model_fields.items() if info.alias == alias)


class _Model:
    """The spec being built, the input key each field came from, and the warnings so far."""

    def __init__(self) -> None:
        self.spec: dict[str, Any] = {"model": {}, "engine": {}, "prefill": {}, "decode": {}, "scheduler": {}}
        self.sources: dict[str, str] = {}
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self.warnings:  # a top-level option reaches both tiers: say it once
            self.warnings.append(message)

    def check(self, path: str, value: Any, source: str) -> Any:
        """`value` as spec field `path` takes it, by the API model's own validation; a value it refuses is a
        ConvertError naming `source`, the input's key or flag."""
        model, field = _api_models(path)
        try:
            return getattr(model.__pydantic_validator__.validate_assignment(model.model_construct(), field, value), field)
        except ValidationError as exc:
            raise ConvertError(f"{source}: {exc.errors()[0]['msg']} (got {_short(value)})") from None

    def set(self, path: str, value: Any, source: str) -> Any:
        checked = self.check(path, value, source)
        *parents, leaf = path.split(".")
        node = self.spec
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value if isinstance(checked, BaseModel) else checked
        self.sources[path] = source
        return checked

    def get(self, path: str) -> Any:
        node: Any = self.spec
        for name in path.split("."):
            node = node.get(name) if isinstance(node, dict) else None
        return node


# ------------------------------------------------------------------------------- the design brief's shape


def _quantity(value: Any, where: str, m: _Model) -> str:
    """"128GB" (decimal, as the brief writes it) -> "128G" (Kubernetes' spelling)."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9.]+)\s*([KMGTP]i?)?B?", text, flags=re.IGNORECASE)
    if not match:
        m.warn(f"{where}: cannot read size {value!r}; left unset")
        return ""
    number, unit = match.groups()
    unit = (unit or "")
    unit = unit[0].upper() + unit[1:] if unit else ""
    return f"{number}{unit}"


def _instance_type(tier: str, value: Any, where: str, m: _Model) -> None:
    instance = str(value)
    match = re.fullmatch(r"([a-z0-9]+)-x([0-9]+)", instance.lower())
    if not match:
        m.set(f"{tier}.pool", {"nodeSelector": {"node.kubernetes.io/instance-type": instance}}, where)
        m.warn(f"{where}: {instance!r} is not <gpu>-x<count>; selecting nodes by instance-type and assuming 1 GPU per "
               "replica")
        return
    gpu, count = match.group(1), m.set(f"{tier}.gpusPerReplica", int(match.group(2)), where)
    tensor = count & -count  # the largest power of two dividing count: tensor parallelism must be a power of two
    m.set(f"{tier}.tensorParallelSize", tensor, where)
    m.set(f"{tier}.pipelineParallelSize", count // tensor, where)
    if tensor != count:
        m.warn(f"{where}: {count} GPUs is not a power of two, which tensor parallelism must be: split as "
               f"{tier}.tensorParallelSize {tensor} x pipelineParallelSize {count // tensor}; set both if another "
               "split suits the model")
    if gpu in GPU_PRODUCTS:
        selector = {"nvidia.com/gpu.product": GPU_PRODUCTS[gpu], "nvidia.com/gpu.count": str(count)}
        m.set(f"{tier}.pool", {"nodeSelector": selector}, where)
    else:
        m.set(f"{tier}.pool", {"nodeSelector": {"node.kubernetes.io/instance-type": instance}}, where)
        m.warn(f"{where}: unknown GPU {gpu!r}; selecting nodes by instance-type={instance}")


def _brief_tier(tier: str, value: Any, m: _Model) -> None:
    where = f"tiers.{tier}"
    if value is None:
        m.warn(f"{where}: not in the file; the {tier} tier gets Baton's defaults")
    raw = _mapping(value, where, BRIEF_TIER_EXAMPLE)
    for key in sorted(set(raw) - BRIEF_TIER_KEYS):
        m.warn(f"{where}.{key}: no DisaggregatedModel field for it; ignored")
    if "instance_type" in raw:
        _instance_type(tier, raw["instance_type"], f"{where}.instance_type", m)
    for src, dst in (("min_instances", "minReplicas"), ("max_instances", "maxReplicas"), ("batch_size", "maxBatchSize")):
        if src in raw:
            m.set(f"{tier}.{dst}", raw[src], f"{where}.{src}")
    low, high = m.get(f"{tier}.minReplicas"), m.get(f"{tier}.maxReplicas")
    if low is not None and high is None:
        m.set(f"{tier}.maxReplicas", max(low, 1), f"{where}.min_instances")  # maxReplicas would default to 1
    elif low is not None and low > high:
        raise ConvertError(f"{where}: min_instances {low} is above max_instances {high}; raise max_instances or lower "
                           "min_instances")
    only = {"max_prompt_tokens": ("prefill", "maxPromptTokens", "only the prefill tier has a prompt limit"),
            "max_generated_tokens": ("decode", "maxGeneratedTokens", "only the decode tier generates")}
    for key, (owner, field, reason) in only.items():
        if key in raw:
            if tier == owner:
                m.set(f"{tier}.{field}", raw[key], f"{where}.{key}")
            else:
                m.warn(f"{where}.{key}: {reason}; ignored")
    if "kv_cache_size" in raw:
        if tier != "decode":
            m.warn(f"{where}.kv_cache_size: only the decode tier's KV capacity is configurable; ignored")
        elif size := _quantity(raw["kv_cache_size"], f"{where}.kv_cache_size", m):
            # The size becomes the engine's KV token capacity through the architecture, which the input lacks.
            m.warn(f"{where}.kv_cache_size: {size} left out: decode.kvCacheSize needs model.architecture; add both "
                   f"(decode.kvCacheSize: {size})")


def _from_brief(config: dict[str, Any], m: _Model) -> str:
    model = _model_source(config.get("model"), m)
    for key in sorted(set(config) - BRIEF_KEYS):
        m.warn(f"{key}: no DisaggregatedModel field for it; ignored")
    backend = str(config.get("backend", "tensorrtllm"))
    if backend.lower() not in BRIEF_FRONT_ENDS:
        raise ConvertError(f"backend: {backend!r} is not a TensorRT-LLM front end Baton runs; use one of "
                           f"{', '.join(BRIEF_FRONT_ENDS)}")
    m.set("engine.runtime", BRIEF_FRONT_ENDS[backend.lower()], "backend")
    tiers = _mapping(config.get("tiers"), "tiers", f"{{prefill: {BRIEF_TIER_EXAMPLE}, decode: {{...}}}}")
    for key in sorted(set(tiers) - set(TIERS)):
        m.warn(f"tiers.{key}: Baton has exactly two tiers, prefill and decode; ignored")
    for tier in TIERS:
        _brief_tier(tier, tiers.get(tier), m)
    scheduler = _mapping(config.get("scheduler"), "scheduler", "{algorithm: throughput-optimized, max_queue_depth: 256}")
    for key, field in (("algorithm", "algorithm"), ("max_queue_depth", "maxQueueDepth")):
        if key in scheduler:
            m.set(f"scheduler.{field}", scheduler.pop(key), f"scheduler.{key}")
    for key in sorted(scheduler):
        m.warn(f"scheduler.{key}: no DisaggregatedModel field for it; ignored")
    return model


# ------------------------------------------------------------------------------------- trtllm-serve's shape


def _options(raw: dict[str, Any], prefix: str) -> dict[str, tuple[Any, str]]:
    """One level's LLM-API options, nested ones flattened: option -> (value, where the input sets it)."""
    options: dict[str, tuple[Any, str]] = {}
    for key, value in raw.items():
        if key in NESTED_OPTIONS:
            for field, item in _mapping(value, prefix + key, "{dtype: fp8, tokens_per_block: 32}").items():
                options[f"{key}.{field}"] = (item, f"{prefix}{key}.{field}")
        else:
            options[key] = (value, prefix + key)
    if "free_gpu_memory_fraction" in options:  # trtllm-serve's shorthand for kv_cache_config's
        options.setdefault("kv_cache_config.free_gpu_memory_fraction", options.pop("free_gpu_memory_fraction"))
    return options


def _section_options(config: dict[str, Any], tier: str, m: _Model) -> dict[str, tuple[Any, str]]:
    section = SECTIONS[tier]
    if section not in config:
        m.warn(f"{section}: not in the file; the {tier} tier gets Baton's defaults and the top-level options")
    top = _options({k: v for k, v in config.items() if k not in ROUTER_KEYS and k not in SECTIONS.values()}, "")
    own = _options(_mapping(config.get(section), section, SECTION_EXAMPLE), f"{section}.")
    for key in top.keys() & own.keys():
        if top[key][0] != own[key][0]:
            m.warn(f"{own[key][1]}: {own[key][0]!r} overrides the top level's {top[key][0]!r} for the {tier} tier "
                   "(trtllm-serve disaggregated itself refuses a section that contradicts the top level)")
    return {**top, **own}


def _replicas(tier: str, options: dict[str, tuple[Any, str]], m: _Model) -> None:
    section = SECTIONS[tier]
    urls, urls_where = options.get("urls", (None, f"{section}.urls"))
    if urls is not None and not isinstance(urls, list):
        raise ConvertError(f"{urls_where} must be a list of host:port addresses, not {_kind(urls)} ({_short(urls)})")
    count, where = options.get("num_instances", (len(urls) if urls else 1, f"{section}.num_instances"))
    count = m.set(f"{tier}.minReplicas", count, where)
    m.set(f"{tier}.maxReplicas", count, where)
    if urls and len(urls) != count:
        addresses = f"{len(urls)} address{'es' if len(urls) != 1 else ''}"
        raise ConvertError(f"{where} is {count} but {urls_where} lists {addresses}, which trtllm-serve refuses too; set "
                           f"num_instances to the replicas the {tier} tier should run (Baton does not use the urls: its "
                           "pods get their own addresses)")
    if urls:
        m.warn(f"{urls_where}: not used: Baton's {tier} pods get their own addresses, which its scheduler discovers")
    if "router" in options:
        m.warn(f"{options['router'][1]}: Baton's scheduler picks the replica (scheduler.placementPolicy); not "
               "carried over")


def _said(tier: str, entries: dict[str, tuple[Any, Any, str]]) -> str:
    if tier not in entries:
        return f"{SECTIONS[tier]} leaves it unset"
    _, raw, where = entries[tier]
    return f"{where} is {raw!r}"


def _shared(option: str, path: str, rule: Any, entries: dict[str, tuple[Any, Any, str]], m: _Model) -> None:
    """Set spec field `path` from the sections' values of `option` (entries: tier -> (value, input, where);
    a value of None: left to the default)."""
    values = {tier: entries[tier][0] if tier in entries else None for tier in TIERS}
    set_tiers = [tier for tier in TIERS if values[tier] is not None]
    if not set_tiers:
        return
    both = " and ".join(_said(tier, entries) for tier in TIERS)
    if values["prefill"] != values["decode"]:
        if rule == SAME or (rule == SAME_WHEN_SET and len(set_tiers) == 2):
            raise ConvertError(f"{option} differs between the tiers: {both}. Baton renders one {path} for both tiers, "
                               "and TensorRT-LLM refuses a KV handoff between tiers that differ in it: set one value for "
                               "both sections (e.g. at the top level)")
        if len(set_tiers) == 1 and rule != SAME_WHEN_SET:
            m.warn(f"{entries[set_tiers[0]][2]}: set for the {set_tiers[0]} tier only; Baton renders one {path} for "
                   f"both tiers: {values[set_tiers[0]]!r} on both")
        elif len(set_tiers) == 2:
            chosen = rule(values["prefill"], values["decode"])
            m.warn(f"{option}: {both}; Baton renders one {path} for both tiers: {chosen!r} on both")
            set_tiers = [tier for tier in TIERS if values[tier] == chosen]
    m.set(path, values[set_tiers[0]], entries[set_tiers[0]][2])


def _not_carried(option: str, where: str) -> str:
    instead = RESERVED_KEY_FIELDS.get(option)
    if instead is None:  # a field of kv_cache_config or cache_transceiver_config Baton has none for
        section = option.split(".")[0]
        return (f"{where}: no DisaggregatedModel field for it, and Baton renders {section} itself (engine.extraOptions "
                "cannot set it); not carried over")
    if instead.startswith("nothing: "):
        return f"{where}: not carried over: {instead.removeprefix('nothing: ')}"
    return f"{where}: not carried over; use {instead}"


def _from_trtllm_serve(config: dict[str, Any], m: _Model) -> str:
    for key in sorted(ROUTER_KEYS.keys() & config.keys()):
        m.warn(f"{key}: a trtllm-serve disaggregated router setting; Baton's scheduler takes the router's place"
               f"{ROUTER_KEYS[key]}; not carried over")
    options = {tier: _section_options(config, tier, m) for tier in TIERS}
    models = {str(options[tier]["model"][0]) for tier in TIERS if "model" in options[tier]}
    if len(models) > 1:
        raise ConvertError(f"model: the sections name different models ({', '.join(sorted(models))}); both tiers must "
                           "serve the same weights")
    model = _model_source(next(iter(models), None), m)
    shared: dict[str, dict[str, tuple[Any, Any, str]]] = {}
    extra: dict[str, dict[str, tuple[Any, str]]] = {}
    for tier in TIERS:
        for option, (value, where) in options[tier].items():
            if option == "backend":
                if str(value).lower() != TRTLLM_BACKEND:
                    raise ConvertError(f"{where}: {value!r}: Baton runs TensorRT-LLM's PyTorch backend (trtllm-serve), "
                                       "and a config for another backend does not carry over: use backend: "
                                       f"{TRTLLM_BACKEND}")
            elif option in TIER_OPTIONS:
                m.set(f"{tier}.{TIER_OPTIONS[option]}", value, where)
            elif option in SHARED_OPTIONS:
                path, _, read = SHARED_OPTIONS[option]
                read_value = read(value, where, m) if read else value
                checked = None if read_value is None else m.check(path, read_value, where)
                shared.setdefault(option, {})[tier] = (checked, value, where)
            elif option in RESERVED_KEY_FIELDS or option.split(".")[0] in NESTED_OPTIONS:
                m.warn(_not_carried(option, where))
            elif option not in ("model", "num_instances", "urls", "router"):
                extra.setdefault(option, {})[tier] = (value, where)
        _replicas(tier, options[tier], m)
        tensor, pipeline = m.get(f"{tier}.tensorParallelSize") or 1, m.get(f"{tier}.pipelineParallelSize") or 1
        m.set(f"{tier}.gpusPerReplica", tensor * pipeline,
              f"{SECTIONS[tier]}: tensor_parallel_size x pipeline_parallel_size")
    for option, (path, rule, _) in SHARED_OPTIONS.items():
        _shared(option, path, rule, shared.get(option, {}), m)
    extra_options = {}
    for option, entries in sorted(extra.items()):
        (prefill, prefill_where), (decode, decode_where) = (entries.get(tier, (None, None)) for tier in TIERS)
        if prefill_where and decode_where and prefill == decode:
            extra_options[option] = prefill
        else:
            tier = next(t for t in TIERS if t in entries)
            only = (f"set for the {tier} tier only" if len(entries) == 1
                    else f"differs between the tiers ({prefill!r} and {decode!r})")
            m.warn(f"{entries[tier][1]}: {only}, and Baton's engine.extraOptions apply to both tiers; not carried over")
    if extra_options:
        m.set("engine.extraOptions", extra_options, "the top level's options")
        m.warn(f"engine.extraOptions: {', '.join(extra_options)} carried over as TensorRT-LLM options of both tiers; "
               "Baton does not check them")
    m.warn("prefill.pool, decode.pool: a trtllm-serve config names no GPU type; add a nodeSelector for each tier's GPU "
           "nodes (e.g. nvidia.com/gpu.product)")
    return model


# ------------------------------------------------------------------------------------------ both shapes


def _scheduler_command(command: str, m: _Model) -> None:
    try:
        args = shlex.split(command)
    except ValueError as exc:
        raise ConvertError(f"--scheduler-command: cannot split it into arguments: {exc}") from None
    if args and not args[0].startswith("-"):
        args = args[1:]  # the program name
    i = 0
    while i < len(args):
        flag, has_value, value = args[i].partition("=")
        i += 1
        if not flag.startswith("--"):
            m.warn(f"scheduler command: {args[i - 1]!r} is not a --flag; ignored")
            continue
        if not has_value and i < len(args) and not args[i].startswith("--"):
            value, has_value = args[i], "="
            i += 1
        if flag not in SCHEDULER_FLAGS:
            m.warn(f"scheduler command: {flag} has no DisaggregatedModel field; ignored")
        elif not has_value or value == "":
            raise ConvertError(f"{flag}: needs a value ({flag} VALUE or {flag}=VALUE)")
        else:
            m.set(SCHEDULER_FLAGS[flag], value, flag)


def _routing_thresholds(m: _Model) -> None:
    """localPrefillBelowTokens <= alwaysPrefillAtOrAboveTokens, as the API server requires: when one is given
    past the other's default, the other follows it."""
    local_path, always_path = "scheduler.localPrefillBelowTokens", "scheduler.alwaysPrefillAtOrAboveTokens"
    local, always = m.get(local_path), m.get(always_path)
    defaults = SchedulerSpec()
    if local is not None and always is not None:
        if local > always:
            raise ConvertError(f"{m.sources[local_path]} {local} is above {m.sources[always_path]} {always}: prompts "
                               "shorter than the first may prefill on a decode replica, prompts at least as long as the "
                               "second always go to the prefill tier; lower the first or raise the second")
    elif always is not None and always < defaults.local_prefill_below_tokens:
        m.set(local_path, always, m.sources[always_path])
        m.warn(f"{local_path}: {always}, as {m.sources[always_path]} is below its default "
               f"({defaults.local_prefill_below_tokens})")
    elif local is not None and local > defaults.always_prefill_at_or_above_tokens:
        m.set(always_path, local, m.sources[local_path])
        m.warn(f"{always_path}: {local}, as {m.sources[local_path]} is above its default "
               f"({defaults.always_prefill_at_or_above_tokens})")


def _model_source(value: Any, m: _Model) -> str:
    if value is None or value == "":
        raise ConvertError("model: missing: set it to the model's Hugging Face id (e.g. "
                           "meta-llama/Llama-3.1-8B-Instruct) or the checkpoint's absolute path")
    model = str(value)
    m.set("model.name", model, "model")
    if model.startswith("/"):
        m.set("model.source.hostPath.path", model, "model")
        m.warn(f"model.source: set to hostPath {model!r}, which must hold the checkpoint on every GPU node; a pvc "
               "source is often better")
        return model
    try:
        m.set("model.source.huggingFace.id", model, "model")
    except ConvertError:
        raise ConvertError(f"model: {model!r} is neither a Hugging Face id (owner/name) nor an absolute path") from None
    m.warn(f"model.source: set to Hugging Face id {model!r}; point it at your checkpoint (pvc, hostPath or huggingFace)")
    return model


# The API server's rules on metadata.name (ROOT_RULES, in that order), checked here as Python.
NAME_CHECKS = (lambda name: len(name) <= NAME_MAX_LENGTH, lambda name: re.search(DNS1035_LABEL, name) is not None)


def _name(name: str | None, model: str) -> str:
    derived = name is None
    if derived:
        name = re.sub(r"[^a-z0-9-]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    broken = [rule["message"] for rule, check in zip(ROOT_RULES, NAME_CHECKS, strict=True) if not check(name)]
    if broken:
        origin, fix = (f" (from model {model!r})", "pass --name NAME") if derived else ("", "choose another --name")
        raise ConvertError(f"metadata.name {name!r}{origin}: {'; '.join(broken)}; {fix}")
    return name


SPEC_PATH = re.compile(r"\b(?:model|engine|prefill|decode|scheduler)(?:\.[A-Za-z]+)+")


def _refusals(model: DisaggregatedModel, m: _Model) -> list[str]:
    """What the operator would refuse in the result (baton.operator.validation), with where each spec field a
    problem names came from."""
    problems = []
    for problem in spec_problems(model.spec):
        origins = [f"{path} comes from {m.sources[path]}" if path in m.sources else f"{path} is Baton's default"
                   for path in dict.fromkeys(SPEC_PATH.findall(problem))]
        problems.append(problem + (f" ({'; '.join(origins)})" if origins else ""))
    return problems


def convert(config: dict[str, Any], *, name: str | None = None, image: str = DEFAULT_IMAGE,
            trtllm_version: str = DEFAULT_TRTLLM_VERSION, kv_cache_dtype: str | None = None,
            scheduler_command: str = "") -> tuple[dict[str, Any], list[str]]:
    """The DisaggregatedModel for a parsed config, and the warnings; a ConvertError when it cannot be converted
    into an object the API server and the operator accept."""
    m = _Model()
    trtllm_serve = bool(SECTIONS.values() & config.keys())
    if trtllm_serve and "tiers" in config:
        raise ConvertError("the file mixes both shapes: tiers (the design brief's) and "
                           "context_servers/generation_servers (trtllm-serve's); keep one")
    if not trtllm_serve and "tiers" not in config:
        raise ConvertError("nothing to convert: the file has neither context_servers and generation_servers "
                           "(trtllm-serve disaggregated's config) nor tiers (the design brief's)")
    m.set("engine.runtime", "trtllm-serve", "backend")
    m.set("engine.image", image, "--image")
    m.set("engine.trtllmVersion", trtllm_version, "--trtllm-version")
    model = (_from_trtllm_serve if trtllm_serve else _from_brief)(config, m)
    in_file = m.get("engine.kvCache.dtype")
    if kv_cache_dtype is not None:
        if in_file not in (None, kv_cache_dtype):
            m.warn(f"engine.kvCache.dtype: --kv-cache-dtype {kv_cache_dtype} overrides "
                   f"{m.sources['engine.kvCache.dtype']} {in_file}")
        m.set("engine.kvCache.dtype", kv_cache_dtype, "--kv-cache-dtype")
    elif in_file is None:
        unset = ("kv_cache_config.dtype is unset or auto (the checkpoint's dtype)" if trtllm_serve
                 else "the file does not say")
        ampere = sorted({(m.get(f"{t}.pool.nodeSelector") or {}).get("nvidia.com/gpu.product") for t in TIERS}
                        & NO_FP8_PRODUCTS)
        if ampere:
            m.set("engine.kvCache.dtype", "bf16", "--kv-cache-dtype")
            m.warn(f"engine.kvCache.dtype: bf16, as {unset} and {', '.join(ampere)} has no FP8 (Ampere); it must "
                   "equal the checkpoint's torch_dtype: pass --kv-cache-dtype fp16 for an fp16 checkpoint")
        else:
            m.set("engine.kvCache.dtype", DEFAULT_KV_CACHE_DTYPE, "--kv-cache-dtype")
            m.warn(f"engine.kvCache.dtype: {DEFAULT_KV_CACHE_DTYPE}, as {unset} and Baton sets it explicitly; pass "
                   "--kv-cache-dtype bf16 or fp16 for an unquantized KV cache")
    if scheduler_command:
        _scheduler_command(scheduler_command, m)
    _routing_thresholds(m)
    m.warn("model.architecture: not in the input; add numLayers, numKvHeads and headDim for KV sizing in status")
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": _name(name, model)}, "spec": m.spec}
    try:
        validated = DisaggregatedModel.model_validate(obj)
    except ValidationError as exc:  # a field checked on its own passes, but not in the whole object
        raise ConvertError("; ".join(f"{'.'.join(map(str, err['loc'][1:]))}: {err['msg']}"
                                     for err in exc.errors())) from None
    if problems := _refusals(validated, m):
        raise ConvertError("the operator would refuse the result: " + "; ".join(problems))
    return obj, m.warnings


def load(path: str) -> dict[str, Any]:
    """The config in file `path`; a ConvertError when it cannot be read or is not a YAML mapping."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConvertError(f"{path} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if config is None:
        raise ConvertError(f"{path} is empty")
    return _mapping(config, f"{path}: the top level", "{model: ..., context_servers: {...}, generation_servers: {...}}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the config: trtllm-serve disaggregated's, or the design brief's")
    parser.add_argument("--name", help=f"metadata.name: a DNS-1035 label of at most {NAME_MAX_LENGTH} characters "
                                        "(default: from the model name)")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--trtllm-version", default=DEFAULT_TRTLLM_VERSION)
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                        help="engine.kvCache.dtype (default: the file's kv_cache_config.dtype, else "
                             f"{DEFAULT_KV_CACHE_DTYPE})")
    parser.add_argument("--scheduler-command", default="", help="the scheduler's command line, to map its flags")
    args = parser.parse_args(argv)
    try:
        obj, warnings = convert(load(args.file), name=args.name, image=args.image, trtllm_version=args.trtllm_version,
                                kv_cache_dtype=args.kv_cache_dtype, scheduler_command=args.scheduler_command)
    except ConvertError as exc:
        print(f"baton convert: {exc}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(obj, sort_keys=False))
    return 0
