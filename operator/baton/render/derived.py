"""Facts derived from a spec that several objects and the status share: the revision, each tier's
KV layout (TensorRT-LLM's CacheState, as `baton.kvformat` models it), its fingerprint, and KV sizing."""

from __future__ import annotations

import json
from dataclasses import dataclass

from baton import kvformat
from baton.api.v1alpha1 import DisaggregatedModelSpec
from baton.render import engine_config
from baton.render.naming import Tier, revision


@dataclass(frozen=True)
class Derived:
    revision: str
    prefill_state: kvformat.CacheState | None
    decode_state: kvformat.CacheState | None
    kv_bytes_per_token: int
    decode_kv_capacity_tokens: int

    def fingerprint(self, tier: Tier) -> str:
        state = self.prefill_state if tier == "prefill" else self.decode_state
        return kvformat.fingerprint(state) if state else ""


def model_identity(spec: DisaggregatedModelSpec) -> str:
    """What names the weights: an explicit revision wins, else the source (and its pinned revision)."""
    source = spec.model.source
    if spec.model.revision:
        return spec.model.revision
    if source.hugging_face:
        return f"hf:{source.hugging_face.id}@{source.hugging_face.revision or 'main'}"
    if source.pvc:
        return f"pvc:{source.pvc.claim_name}/{source.pvc.sub_path}"
    if source.host_path:
        return f"hostPath:{source.host_path.path}"
    return spec.model.name


def cache_state(spec: DisaggregatedModelSpec, tier: Tier) -> kvformat.CacheState | None:
    """The tier's KV layout, or None when the spec lacks the architecture facts to derive it."""
    arch = spec.model.architecture
    if arch is None:
        return None
    t = spec.prefill if tier == "prefill" else spec.decode
    mla = arch.attention_type == "MLA"
    return kvformat.CacheState(
        kv_dtype=spec.engine.kv_cache.dtype,
        tokens_per_block=spec.engine.kv_cache.tokens_per_block,
        num_layers=arch.num_layers,
        num_kv_heads=1 if mla else arch.num_kv_heads,
        head_dim=arch.head_dim,
        attention_type=arch.attention_type,
        kv_factor=1 if mla else 2,
        tp=t.tensor_parallel_size,
        pp=t.pipeline_parallel_size,
        cp=1,
        enable_attention_dp=False,
        transfer_backend=spec.engine.kv_transfer.backend,
        trtllm_version=spec.engine.trtllm_version,
        speculative=kvformat.speculative_string(spec.engine.speculative_config),
        model_identity=model_identity(spec),
    )


def derive(spec: DisaggregatedModelSpec) -> Derived:
    prefill, decode = cache_state(spec, "prefill"), cache_state(spec, "decode")
    per_token = kvformat.kv_bytes_per_token(decode) if decode else 0
    return Derived(
        revision=revision(spec),
        prefill_state=prefill,
        decode_state=decode,
        kv_bytes_per_token=per_token,
        decode_kv_capacity_tokens=engine_config.decode_kv_capacity_tokens(spec, per_token),
    )
