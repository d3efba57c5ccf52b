"""`baton convert FILE`: a TensorRT-LLM-style `disaggregated_config.yaml` in, a DisaggregatedModel out.

Input shape (the design brief's):

    model: llama-4-70b
    backend: tensorrtllm
    tiers:
      prefill: {instance_type: h100-x8, min_instances: 2, max_instances: 8, batch_size: 64, max_prompt_tokens: 128000}
      decode:  {instance_type: l40s-x4, min_instances: 4, max_instances: 16, batch_size: 1, kv_cache_size: 128GB, max_generated_tokens: 4096}
    scheduler: {algorithm: throughput-optimized, max_queue_depth: 256}

`instance_type` is `<gpu>-x<count>`: the tier gets `count` GPUs per replica (tensor parallel) and a
node selector on NVIDIA GPU feature discovery's labels (`nvidia.com/gpu.product`, `nvidia.com/gpu.count`).
The scheduler's command line (`--scheduler-command "disaggregated-scheduler --prefill-batch-size 32 ..."`)
is mapped too. Anything that cannot be mapped is reported as a warning on stderr; the object goes to stdout.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from baton.api.v1alpha1 import GROUP, KIND, VERSION, DisaggregatedModel

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
BACKENDS = {"tensorrtllm": "trtllm-serve", "trtllm": "trtllm-serve", "trtllm-serve": "trtllm-serve", "triton": "triton"}
TIER_KEYS = {"instance_type", "min_instances", "max_instances", "batch_size", "max_prompt_tokens", "kv_cache_size", "max_generated_tokens"}
SCHEDULER_FLAGS = {
    "--prefill-batch-size": ("prefillBatchSize", int),
    "--decode-batch-size": ("decodeBatchSize", int),
    "--max-concurrent-prefills": ("maxConcurrentPrefills", int),
    "--placement-policy": ("placementPolicy", str),
    "--max-queue-depth": ("maxQueueDepth", int),
    "--algorithm": ("algorithm", str),
    "--local-prefill-below-tokens": ("localPrefillBelowTokens", int),
    "--always-prefill-at-or-above-tokens": ("alwaysPrefillAtOrAboveTokens", int),
}


def _quantity(value: Any, warnings: list[str], where: str) -> str:
    """"128GB" (decimal, as the brief writes it) -> "128G" (Kubernetes' spelling)."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9.]+)\s*([KMGTP]i?)?B?", text, flags=re.IGNORECASE)
    if not match:
        warnings.append(f"{where}: cannot read size {value!r}; left unset")
        return ""
    number, unit = match.groups()
    unit = (unit or "")
    unit = unit[0].upper() + unit[1:] if unit else ""
    return f"{number}{unit}"


def _tier(name: str, raw: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    for key in sorted(set(raw) - TIER_KEYS):
        warnings.append(f"tiers.{name}.{key}: no DisaggregatedModel field for it; ignored")
    tier: dict[str, Any] = {}
    instance = str(raw.get("instance_type", ""))
    match = re.fullmatch(r"([a-z0-9]+)-x([0-9]+)", instance.lower())
    if match:
        gpu, count = match.group(1), int(match.group(2))
        tier["gpusPerReplica"] = count
        tier["tensorParallelSize"] = count if count & (count - 1) == 0 else 1
        tier["pipelineParallelSize"] = 1 if count & (count - 1) == 0 else count
        if gpu in GPU_PRODUCTS:
            tier["pool"] = {"nodeSelector": {"nvidia.com/gpu.product": GPU_PRODUCTS[gpu], "nvidia.com/gpu.count": str(count)}}
        else:
            tier["pool"] = {"nodeSelector": {"node.kubernetes.io/instance-type": instance}}
            warnings.append(f"tiers.{name}.instance_type: unknown GPU {gpu!r}; selecting nodes by instance-type={instance}")
    elif instance:
        tier["pool"] = {"nodeSelector": {"node.kubernetes.io/instance-type": instance}}
        warnings.append(f"tiers.{name}.instance_type: {instance!r} is not <gpu>-x<count>; selecting nodes by instance-type and assuming 1 GPU per replica")
    for src, dst in (("min_instances", "minReplicas"), ("max_instances", "maxReplicas"), ("batch_size", "maxBatchSize")):
        if src in raw:
            tier[dst] = int(raw[src])
    if "max_prompt_tokens" in raw:
        if name == "prefill":
            tier["maxPromptTokens"] = int(raw["max_prompt_tokens"])
        else:
            warnings.append(f"tiers.{name}.max_prompt_tokens: only the prefill tier has a prompt limit; ignored")
    if "kv_cache_size" in raw:
        if name == "decode":
            tier["kvCacheSize"] = _quantity(raw["kv_cache_size"], warnings, f"tiers.{name}.kv_cache_size")
        else:
            warnings.append(f"tiers.{name}.kv_cache_size: only the decode tier's KV capacity is configurable; ignored")
    if "max_generated_tokens" in raw:
        if name == "decode":
            tier["maxGeneratedTokens"] = int(raw["max_generated_tokens"])
        else:
            warnings.append(f"tiers.{name}.max_generated_tokens: only the decode tier generates; ignored")
    return tier


def _scheduler_command(command: str, warnings: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    args = shlex.split(command)
    if args and not args[0].startswith("-"):
        args = args[1:]  # the program name
    i = 0
    while i < len(args):
        flag, value = args[i], args[i + 1] if i + 1 < len(args) else None
        if "=" in flag:
            flag, value = flag.split("=", 1)
            i -= 1
        if flag == "--kv-cache-transfer-compression":
            out["_compression"] = value
        elif flag in SCHEDULER_FLAGS:
            field, kind = SCHEDULER_FLAGS[flag]
            out[field] = kind(value)
        else:
            warnings.append(f"scheduler command: {flag} has no DisaggregatedModel field; ignored")
        i += 2
    return out


def convert(config: dict[str, Any], *, name: str, image: str, trtllm_version: str, kv_cache_dtype: str,
            scheduler_command: str = "") -> tuple[dict[str, Any], list[str]]:
    warnings: list[str] = []
    known = {"model", "backend", "tiers", "scheduler"}
    for key in sorted(set(config) - known):
        warnings.append(f"{key}: no DisaggregatedModel field for it; ignored")
    model_name = str(config.get("model") or name)
    backend = str(config.get("backend", "tensorrtllm")).lower()
    runtime = BACKENDS.get(backend)
    if runtime is None:
        warnings.append(f"backend: {backend!r} is not TensorRT-LLM; using trtllm-serve")
        runtime = "trtllm-serve"
    tiers = config.get("tiers") or {}
    for key in sorted(set(tiers) - {"prefill", "decode"}):
        warnings.append(f"tiers.{key}: Baton has exactly two tiers, prefill and decode; ignored")
    scheduler_raw = dict(config.get("scheduler") or {})
    scheduler: dict[str, Any] = {}
    if "algorithm" in scheduler_raw:
        scheduler["algorithm"] = scheduler_raw.pop("algorithm")
    if "max_queue_depth" in scheduler_raw:
        scheduler["maxQueueDepth"] = int(scheduler_raw.pop("max_queue_depth"))
    for key in sorted(scheduler_raw):
        warnings.append(f"scheduler.{key}: no DisaggregatedModel field for it; ignored")
    compression = "none"
    if scheduler_command:
        mapped = _scheduler_command(scheduler_command, warnings)
        compression = mapped.pop("_compression", compression)
        scheduler.update(mapped)
    warnings.append(f"model.source: set to Hugging Face id {model_name!r}; point it at your checkpoint (pvc, hostPath or huggingFace)")
    warnings.append("model.architecture: not in the input; add numLayers, numKvHeads and headDim for KV sizing in status")
    decode = _tier("decode", tiers.get("decode") or {}, warnings)
    kv_cache_size = decode.pop("kvCacheSize", None)
    if kv_cache_size:
        # The size becomes the engine's KV token capacity through the architecture, which the input lacks.
        warnings.append(f"tiers.decode.kv_cache_size: {kv_cache_size} left out: decode.kvCacheSize needs "
                        f"model.architecture; add both (decode.kvCacheSize: {kv_cache_size})")
    obj = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"name": model_name, "source": {"huggingFace": {"id": model_name}}},
            "engine": {
                "runtime": runtime,
                "image": image,
                "trtllmVersion": trtllm_version,
                "kvCache": {"dtype": kv_cache_dtype},
                "kvTransfer": {"compression": compression},
            },
            "prefill": _tier("prefill", tiers.get("prefill") or {}, warnings),
            "decode": decode,
            "scheduler": scheduler,
        },
    }
    DisaggregatedModel.model_validate(obj)  # fail here, with pydantic's message, rather than at apply
    return obj, warnings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="disaggregated_config.yaml")
    parser.add_argument("--name", help="metadata.name (default: the model name)")
    parser.add_argument("--image", default="nvcr.io/nvidia/tensorrt-llm/release:1.2.0")
    parser.add_argument("--trtllm-version", default="1.2.0")
    parser.add_argument("--kv-cache-dtype", default="fp8", choices=["fp16", "bf16", "fp8"])
    parser.add_argument("--scheduler-command", default="", help="the scheduler's command line, to map its flags")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.file).read_text()) or {}
    name = args.name or re.sub(r"[^a-z0-9-]+", "-", str(config.get("model", "model")).lower()).strip("-")
    try:
        obj, warnings = convert(config, name=name, image=args.image, trtllm_version=args.trtllm_version,
                                kv_cache_dtype=args.kv_cache_dtype, scheduler_command=args.scheduler_command)
    except ValueError as exc:
        print(f"baton convert: {exc}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(obj, sort_keys=False))
    return 0
