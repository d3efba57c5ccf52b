"""Facts derived from a spec that several objects and the status share: the revision, each tier's
KV layout (TensorRT-LLM's CacheState, as `baton.kvformat` models it), its fingerprint, and KV sizing."""

from __future__ import annotations

from dataclasses import dataclass

from baton import kvformat
from baton.api.v1alpha1 import DisaggregatedModelSpec
from baton.render import engine_config
from baton.render.naming import Tier, generation_key, revision, tier_revision


@dataclass(frozen=True)
class Derived:
    revision: str  # of both tiers (naming.revision)
    tier_revisions: dict[str, str]  # tier -> naming.tier_revision, its pods' label
    generation: str
    prefill_state: kvformat.CacheState
    decode_state: kvformat.CacheState
    kv_bytes_per_token: int
    decode_kv_capacity_tokens: int

    def fingerprint(self, tier: Tier) -> str:
        return kvformat.fingerprint(self.prefill_state if tier == "prefill" else self.decode_state)

    def kv_mismatches(self) -> list[kvformat.Mismatch]:
        """Hard-equal KV-format fields on which the two tiers differ (empty: they can hand off)."""
        return kvformat.compare(self.prefill_state, self.decode_state)


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


def cache_state(spec: DisaggregatedModelSpec, tier: Tier) -> kvformat.CacheState:
    """The tier's KV layout. Without spec.model.architecture the shape fields are 0 (the engines read
    them from the checkpoint, which both tiers share); everything else still compares."""
    arch = spec.model.architecture
    t = spec.prefill if tier == "prefill" else spec.decode
    mla = bool(arch) and arch.attention_type == "MLA"
    return kvformat.CacheState(
        kv_dtype=spec.tier_engine(tier).kv_cache_dtype,
        tokens_per_block=spec.tier_engine(tier).tokens_per_block,
        num_layers=arch.num_layers if arch else 0,
        num_kv_heads=(1 if mla else arch.num_kv_heads) if arch else 0,
        head_dim=arch.head_dim if arch else 0,
        attention_type=arch.attention_type if arch else "DEFAULT",
        kv_factor=1 if mla else 2,
        tp=t.tensor_parallel_size,
        pp=t.pipeline_parallel_size,
        cp=1,
        enable_attention_dp=False,
        transfer_backend=spec.engine.kv_transfer.backend,
        trtllm_version=spec.tier_engine(tier).trtllm_version,
        speculative=kvformat.speculative_string(spec.engine.speculative_config),
        model_identity=model_identity(spec),
    )


def derive(spec: DisaggregatedModelSpec) -> Derived:
    prefill, decode = cache_state(spec, "prefill"), cache_state(spec, "decode")
    per_token = kvformat.kv_bytes_per_token(decode) if spec.model.architecture else 0
    return Derived(
        revision=revision(spec),
        tier_revisions={tier: tier_revision(spec, tier) for tier in ("prefill", "decode")},
        generation=generation_key(spec),
        prefill_state=prefill,
        decode_state=decode,
        kv_bytes_per_token=per_token,
        decode_kv_capacity_tokens=engine_config.decode_kv_capacity_tokens(
            spec, kvformat.replica_kv_bytes_per_token(decode) if spec.model.architecture else 0),
    )
