"""The TensorRT-LLM LLM-API options (`--extra_llm_api_options` YAML) for each tier.

Targets TensorRT-LLM 1.2 (PyTorch backend). Rules from TensorRT-LLM's disaggregated serving that
this module enforces by construction:
- the KV layout (kv_cache_config dtype and tokens_per_block, speculative_config) is rendered from one
  place for both tiers, so the tiers cannot drift apart;
- the transceiver backend is always explicit (never DEFAULT, whose meaning changed across versions);
- the prefill (context) tier runs with the overlap scheduler disabled, which context-only requests need;
- beam width is 1, the only width KV transfer supports;
- kv_cache_config.dtype is what the PyTorch backend accepts: fp8, or auto for the API's bf16/fp16 (an
  unquantized KV cache in the checkpoint's dtype; trtllm-serve refuses an explicit bf16/fp16 at start);
- prompts longer than max_num_tokens are chunked (enable_chunked_prefill), which the PyTorch backend
  otherwise refuses ("The sum of prompt length ... should not exceed max_num_tokens").
"""

from __future__ import annotations

from typing import Any

from baton import pod_volumes
from baton.api.units import parse_duration, parse_quantity
from baton.api.v1alpha1 import DisaggregatedModelSpec
from baton.render.naming import Tier

CONFIG_FILE = "config.yaml"
ENGINE_CONFIG_DIR = pod_volumes.ENGINE_CONFIG_DIR

# Keys engine.extraOptions cannot set, each with what to use instead: every key engine_options renders
# (they decide the KV layout, the parallelism the pod's GPU count was sized for, the tier's role, the
# sequence and batch limits the scheduler routes by, or the perf stats Baton's metrics read; a value set
# here would be overwritten without a word) and the ones Baton does not support (they change the GPU count
# or the KV CacheState, which Baton derives with context parallelism 1 and attention data parallelism off).
# tests/unit/test_api_validation_gaps.py checks that every key engine_options renders is here.
RESERVED_KEY_FIELDS = {
    "kv_cache_config": "engine.kvCache (and decode.kvCacheSize)",
    "cache_transceiver_config": "engine.kvTransfer",
    "tensor_parallel_size": "the tiers' tensorParallelSize",
    "pipeline_parallel_size": "the tiers' pipelineParallelSize",
    "max_batch_size": "the tiers' maxBatchSize",
    "max_num_tokens": "the tiers' maxNumTokens",
    "max_input_len": "prefill.maxPromptTokens",
    "max_seq_len": "prefill.maxPromptTokens and decode.maxGeneratedTokens (max_seq_len is their sum)",
    "enable_chunked_prefill": "nothing: Baton turns chunked prefill on for a tier whose maxNumTokens is below "
                              "prefill.maxPromptTokens, as the PyTorch backend requires",
    "enable_iter_perf_stats": "nothing: Baton sets it, as its metrics need it",
    "return_perf_metrics": "nothing: Baton sets it, as its metrics need it",
    "perf_metrics_max_requests": "nothing: Baton sets it, as its metrics need it",
    "disable_overlap_scheduler": "nothing: Baton disables the overlap scheduler on the prefill tier, as TensorRT-LLM requires",
    "speculative_config": "engine.speculativeConfig",
    "max_beam_width": "nothing: KV transfer supports beam width 1 only",
    "backend": "nothing: Baton runs the PyTorch backend",
    "revision": "model.source.huggingFace.revision",
    "context_parallel_size": "nothing: context parallelism is not supported by Baton (its GPU count and KV format assume 1)",
    "enable_attention_dp": "nothing: attention data parallelism is not supported by Baton (its KV format assumes it off)",
}
RESERVED_KEYS = frozenset(RESERVED_KEY_FIELDS)


def reserved_overrides(spec: DisaggregatedModelSpec) -> list[str]:
    return sorted(RESERVED_KEYS.intersection((spec.engine.extra_options or {}).keys()))


def reserved_override_problems(spec: DisaggregatedModelSpec) -> list[str]:
    """One sentence per reserved key engine.extraOptions sets, naming what to use instead."""
    return [f"engine.extraOptions cannot set {key}: use {RESERVED_KEY_FIELDS[key]}" if not
            RESERVED_KEY_FIELDS[key].startswith("nothing")
            else f"engine.extraOptions cannot set {key}: {RESERVED_KEY_FIELDS[key].removeprefix('nothing: ')}"
            for key in reserved_overrides(spec)]


def kv_cache_dtype_option(dtype: str) -> str:
    """kv_cache_config.dtype for the API's KV dtype. TensorRT-LLM's PyTorch backend accepts auto or fp8
    (newer versions nvfp4) and fails at start on bf16/fp16 ("Overriding KV cache quantization with an
    invalid type"): bf16/fp16 mean the checkpoint's own dtype, which auto resolves from config.json
    torch_dtype. The KV-format gate (derived.py) keeps the declared dtype."""
    return "fp8" if dtype == "fp8" else "auto"


def kv_transfer_timeout_ms(spec: DisaggregatedModelSpec) -> int:
    """engine.kvTransfer.timeout in whole milliseconds, at least 1 (TensorRT-LLM requires > 0; the schema
    refuses less than 1ms)."""
    return max(1, round(parse_duration(spec.engine.kv_transfer.timeout) * 1000))


# engine.kvTransfer.maxTokensInBuffer when it is left out, with UCX: longer prompts go through a buffer
# allocated for their transfer (slower), and 8192 tokens keep the three pre-allocated buffers per GPU small.
UCX_TRANSFER_BUFFER_TOKENS = 8192


def transfer_buffer_tokens(spec: DisaggregatedModelSpec, tier: Tier) -> int:
    """cache_transceiver_config.max_tokens_in_buffer for one tier: engine.kvTransfer.maxTokensInBuffer, else
    prefill.maxPromptTokens (the longest prompt) in whole blocks of the tier's tokens per block (TensorRT-LLM
    requires whole blocks), at most 8192 with UCX. NIXL cannot transfer KV that does not fit the buffer."""
    transfer = spec.engine.kv_transfer
    if transfer.max_tokens_in_buffer is not None:
        return transfer.max_tokens_in_buffer
    block = spec.tier_engine(tier).tokens_per_block
    longest = -(-spec.prefill.max_prompt_tokens // block) * block
    return longest if transfer.backend == "NIXL" else min(longest, UCX_TRANSFER_BUFFER_TOKENS)


def decode_kv_capacity_tokens(spec: DisaggregatedModelSpec, replica_kv_bytes_per_token: int) -> int:
    """KV tokens one decode replica can hold, from decode.kvCacheSize (0 when not set or not sizable):
    the size over what one token occupies on all the replica's GPUs together
    (`kvformat.replica_kv_bytes_per_token`: KV heads duplicated by tensor parallelism counted)."""
    if not spec.decode.kv_cache_size or replica_kv_bytes_per_token <= 0:
        return 0
    return int(parse_quantity(spec.decode.kv_cache_size)) // replica_kv_bytes_per_token


def engine_options(spec: DisaggregatedModelSpec, tier: Tier, decode_capacity_tokens: int = 0) -> dict[str, Any]:
    """The LLM-API options for one tier, as a dict ready to dump to YAML; `decode_capacity_tokens`: the decode
    replica's KV token capacity (`Derived.decode_kv_capacity_tokens`; 0: not sized)."""
    engine = spec.engine
    tier_spec = spec.prefill if tier == "prefill" else spec.decode
    kv_cache: dict[str, Any] = {
        "dtype": kv_cache_dtype_option(spec.tier_engine(tier).kv_cache_dtype),
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
                "max_tokens_in_buffer": transfer_buffer_tokens(spec, tier),
                "kv_transfer_timeout_ms": kv_transfer_timeout_ms(spec),
            },
            "enable_iter_perf_stats": True,
            "return_perf_metrics": True,
            "perf_metrics_max_requests": 1000,
        }
    )
    if tier == "decode" and decode_capacity_tokens:
        kv_cache["max_tokens"] = decode_capacity_tokens
    if engine.speculative_config:
        options["speculative_config"] = engine.speculative_config
    if max_input > tier_spec.max_num_tokens:
        # Without chunking the PyTorch backend refuses a prompt longer than max_num_tokens.
        options["enable_chunked_prefill"] = True
    hf = spec.model.source.hugging_face
    if hf and hf.revision:
        options["revision"] = hf.revision  # LLM-API `revision`: the Hugging Face revision to download
    return dict(sorted(options.items()))
