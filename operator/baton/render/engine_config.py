"""The TensorRT-LLM LLM-API options (`--extra_llm_api_options` YAML) for each tier.

Targets TensorRT-LLM 1.2 (PyTorch backend). Rules from TensorRT-LLM's disaggregated serving that
this module enforces by construction:
- the KV layout (kv_cache_config dtype and tokens_per_block, speculative_config) is rendered from one
  place for both tiers, so the tiers cannot drift apart;
- the transceiver backend is always explicit (never DEFAULT, whose meaning changed across versions);
- the prefill (context) tier runs with the overlap scheduler disabled, which context-only requests need;
- beam width is 1, the only width KV transfer supports.
"""

from __future__ import annotations

from typing import Any

from baton.api.units import parse_duration, parse_quantity
from baton.api.v1alpha1 import DisaggregatedModelSpec
from baton.render.naming import Tier

CONFIG_FILE = "config.yaml"
ENGINE_CONFIG_DIR = "/etc/baton/engine"

# Keys Baton renders itself: engine.extraOptions cannot override them (they decide the KV layout,
# the parallelism the pod's GPU count was sized for, or the tier's role).
RESERVED_KEYS = frozenset(
    {
        "kv_cache_config",
        "cache_transceiver_config",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "disable_overlap_scheduler",
        "speculative_config",
        "max_beam_width",
        "backend",
    }
)


def reserved_overrides(spec: DisaggregatedModelSpec) -> list[str]:
    return sorted(RESERVED_KEYS.intersection((spec.engine.extra_options or {}).keys()))


def decode_kv_capacity_tokens(spec: DisaggregatedModelSpec, kv_bytes_per_token: int) -> int:
    """KV tokens one decode replica can hold, from decode.kvCacheSize (0 when not set or not sizable)."""
    if not spec.decode.kv_cache_size or kv_bytes_per_token <= 0:
        return 0
    return int(parse_quantity(spec.decode.kv_cache_size)) // kv_bytes_per_token


def engine_options(spec: DisaggregatedModelSpec, tier: Tier, kv_bytes_per_token: int = 0) -> dict[str, Any]:
    """The LLM-API options for one tier, as a dict ready to dump to YAML."""
    engine = spec.engine
    tier_spec = spec.prefill if tier == "prefill" else spec.decode
    kv_cache: dict[str, Any] = {
        "dtype": spec.tier_engine(tier).kv_cache_dtype,
        "tokens_per_block": spec.tier_engine(tier).tokens_per_block,
        "enable_block_reuse": engine.kv_cache.enable_block_reuse,
        "free_gpu_memory_fraction": engine.kv_cache.free_gpu_memory_fraction,
    }
    max_input = spec.prefill.max_prompt_tokens
    options: dict[str, Any] = {**{k: v for k, v in (engine.extra_options or {}).items() if k not in RESERVED_KEYS}}
    options.update(
        {
            "tensor_parallel_size": tier_spec.tensor_parallel_size,
            "pipeline_parallel_size": tier_spec.pipeline_parallel_size,
            "max_batch_size": tier_spec.max_batch_size,
            "max_num_tokens": tier_spec.max_num_tokens,
            "max_input_len": max_input,
            "max_seq_len": max_input + (1 if tier == "prefill" else spec.decode.max_generated_tokens),
            "max_beam_width": 1,
            "disable_overlap_scheduler": tier == "prefill",
            "kv_cache_config": kv_cache,
            "cache_transceiver_config": {
                "backend": engine.kv_transfer.backend,
                "max_tokens_in_buffer": engine.kv_transfer.max_tokens_in_buffer,
                "kv_transfer_timeout_ms": int(parse_duration(engine.kv_transfer.timeout) * 1000),
            },
            "enable_iter_perf_stats": True,
            "return_perf_metrics": True,
            "perf_metrics_max_requests": 1000,
        }
    )
    if tier == "decode":
        capacity = decode_kv_capacity_tokens(spec, kv_bytes_per_token)
        if capacity:
            kv_cache["max_tokens"] = capacity
    if engine.speculative_config:
        options["speculative_config"] = engine.speculative_config
    return dict(sorted(options.items()))
