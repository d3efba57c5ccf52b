"""DisaggregatedModel, serving.baton.dev/v1alpha1: the pydantic models the CRD is generated from.

Every field carries its description (it becomes `kubectl explain` text), its bounds and its default.
Rules that span fields live in `x-kubernetes-validations` (CEL) on the model that holds them, with a
message a user can act on, so the API server rejects a bad object at `kubectl apply` time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from baton import pod_volumes
from baton.api.units import DURATION_PATTERN, QUANTITY_PATTERN, parse_duration

GROUP = "serving.baton.dev"
VERSION = "v1alpha1"
KIND = "DisaggregatedModel"
PLURAL = "disaggregatedmodels"
SINGULAR = "disaggregatedmodel"
SHORT_NAMES = ["dm"]
CATEGORIES = ["baton"]

POWERS_OF_TWO = [1, 2, 4, 8, 16, 32, 64]

# metadata.name is the prefix of every child's name (baton.render.naming): the longest is a tier's
# StatefulSet, `<name>-prefill-<8-hex generation>` (name + 17). Kubernetes labels each of its pods
# `controller-revision-hash: <StatefulSet>-<revision hash of up to 10 characters>` (name + 28), a label
# value of at most 63 characters, so a longer name gives a StatefulSet that never creates a pod.
# tests/unit/test_api_and_render.py recomputes this bound from naming.py.
STATEFULSET_NAME_EXTRA = len("-prefill-") + 8  # "-<tier>-<generation>", prefill being the longer tier
CONTROLLER_REVISION_HASH_EXTRA = 1 + 10  # "-<fnv32 hash, safe-encoded: up to 10 characters>"
LABEL_VALUE_MAX = 63
NAME_MAX_LENGTH = LABEL_VALUE_MAX - CONTROLLER_REVISION_HASH_EXTRA - STATEFULSET_NAME_EXTRA  # 35
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def _cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    return {"rule": rule, "message": message, **extra}


# Rules on the whole object (the CRD's root schema), where CEL can read metadata.name.
ROOT_RULES = [
    _cel(
        f"self.metadata.name.size() <= {NAME_MAX_LENGTH}",
        f"metadata.name must be at most {NAME_MAX_LENGTH} characters: it prefixes the names of the model's "
        "StatefulSets (<name>-prefill-<generation>), and Kubernetes labels their pods with the StatefulSet's name "
        "plus an 11-character revision hash, which must fit in 63 characters",
    ),
    _cel(
        f"self.metadata.name.matches('{DNS1035_LABEL}')",
        "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and "
        "ending with a letter or digit (no dots): it names the model's Services and StatefulSets",
    ),
]


class ApiModel(BaseModel):
    """Base: camelCase on the wire, unknown fields refused (the CRD prunes them anyway)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# Free-form Kubernetes objects (affinity, env entries, volumes, ...) are passed through untouched;
# the API server validates them when the operator creates the child that carries them.
KubeObject = dict[str, Any]


def _free_form(description: str, default_factory=None, **kw: Any):
    extra = {"x-kubernetes-preserve-unknown-fields": True, "type": "object"}
    if default_factory is None:
        return Field(default=None, description=description, json_schema_extra=extra, **kw)
    return Field(default_factory=default_factory, description=description, json_schema_extra=extra, **kw)


def _nested(model: type, description: str):
    """A sub-object that defaults to its own defaults, spelled out in full in the schema: the API server
    checks a default against the CEL rules as written, before it would default nested fields."""
    default = model().model_dump(mode="json", by_alias=True, exclude_none=True)
    return Field(default_factory=model, description=description, json_schema_extra={"default": default})


def _free_form_list(description: str, properties: dict[str, Any] | None = None, **kw: Any):
    """A list of free-form objects. `properties`: fields of each object a CEL rule reads (CEL cannot read the
    fields a schema only preserves); the others are still passed through untouched."""
    items: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if properties:
        items["properties"] = properties
    return Field(default_factory=list, description=description, json_schema_extra={"items": items}, **kw)


# --------------------------------------------------------------------------------------------- model


class PVCSource(ApiModel):
    claim_name: str = Field(min_length=1, description="Name of a PersistentVolumeClaim in the model's namespace holding the checkpoint. Every replica of both tiers mounts it (read-only), on several nodes: its access mode must be ReadOnlyMany or ReadWriteMany (with ReadWriteOnce only the pods of the first node start; the others wait on a Multi-Attach error).")
    sub_path: str = Field(default="", description="Directory inside the volume that holds the checkpoint (with its config.json).")


class HostPathSource(ApiModel):
    path: str = Field(pattern=r"^/", description="Absolute path on the node holding the checkpoint (with its config.json).")


class SecretKeyRef(ApiModel):
    name: str = Field(min_length=1, description="Secret name, in the model's namespace.")
    key: str = Field(default="token", min_length=1, description="Key inside the Secret.")


class HuggingFaceSource(ApiModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$", description="Hugging Face model id, e.g. meta-llama/Llama-3.1-70B-Instruct. Each engine pod downloads it into an emptyDir (HF_HOME=/cache/huggingface) on its node's disk, again whenever the pod is recreated (a rollout, a drain, a spot reclaim); for a large checkpoint, use a pvc source, or set HF_HOME in engine.env to a path on a shared volume added through podTemplate.volumes.")
    revision: str = Field(default="", description="Git revision (branch, tag or commit) to pin; empty means the default branch.")
    token_secret: SecretKeyRef | None = Field(default=None, description="Secret holding a Hugging Face access token, exposed to the engine as HF_TOKEN.")


class ModelSource(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "[has(self.pvc), has(self.hostPath), has(self.huggingFace)].filter(x, x).size() == 1",
                    "model.source must set exactly one of pvc, hostPath or huggingFace",
                )
            ]
        }
    )
    pvc: PVCSource | None = Field(default=None, description="Load the checkpoint from a PersistentVolumeClaim.")
    host_path: HostPathSource | None = Field(default=None, description="Load the checkpoint from a directory on the node.")
    hugging_face: HuggingFaceSource | None = Field(default=None, description="Download the checkpoint from Hugging Face at start-up.")


class ModelArchitecture(ApiModel):
    num_layers: int = Field(ge=1, le=1024, description="Transformer layers that carry KV cache (config.json num_hidden_layers).")
    # What baton.render.derived.cache_state does with these, as baton.kvformat.cache_state_from_files reads a
    # config.json: for MLA the cache holds one compressed KV of kv_lora_rank + qk_rope_head_dim per layer and token.
    num_kv_heads: int = Field(ge=1, le=1024, description=(
        "Global key/value heads (config.json num_key_value_heads, else num_attention_heads). Ignored with "
        "attentionType MLA, which caches one compressed KV per layer: Baton counts 1 KV head whatever is set "
        "here (set 1)."))
    head_dim: int = Field(ge=1, le=4096, description=(
        "Width of the KV cached per KV head, layer and token. DEFAULT: the size of one attention head "
        "(config.json head_dim, else hidden_size / num_attention_heads). MLA: the compressed KV's width, "
        "config.json kv_lora_rank + qk_rope_head_dim (576 for DeepSeek-V3: 512 + 64), not head_dim."))
    attention_type: Literal["DEFAULT", "MLA"] = Field(default="DEFAULT", description="DEFAULT for MHA/GQA (K and V cached), MLA for multi-head latent attention (one compressed KV; config.json sets kv_lora_rank).")


class ModelSpec(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="Served model name: what clients put in the OpenAI `model` field and what /v1/models lists.")
    revision: str = Field(default="", description="Identity of the weights (e.g. a checkpoint digest or release tag). Part of the KV-format identity: prefill and decode must serve the same weights.")
    source: ModelSource = Field(description="Where the engines load the checkpoint from.")
    architecture: ModelArchitecture | None = Field(default=None, description="Architecture facts for KV sizing and the KV-format check. Optional when the engines can read them from the checkpoint's config.json; required for decode.kvCacheSize and status KV sizing.")


# -------------------------------------------------------------------------------------------- engine


class KVCacheSpec(ApiModel):
    dtype: Literal["fp16", "bf16", "fp8"] = Field(description=(
        "KV cache element type, set explicitly: both tiers must store the same type. fp8 is rendered as "
        "kv_cache_config.dtype fp8. bf16 and fp16 mean an unquantized KV cache in the checkpoint's own dtype and "
        "must equal the checkpoint's config.json torch_dtype: TensorRT-LLM's PyTorch backend accepts only auto or "
        "fp8 there, so Baton renders auto, which resolves from torch_dtype."))
    tokens_per_block: Literal[8, 16, 32, 64, 128] = Field(default=32, description="Tokens per KV cache block; must be equal on both tiers.")
    free_gpu_memory_fraction: float = Field(default=0.9, ge=0.05, le=0.99, description="Fraction of free GPU memory the engine may use for KV cache. Always applies: with decode.kvCacheSize set too, TensorRT-LLM takes the smaller of the two.")
    enable_block_reuse: bool = Field(default=True, description="Reuse KV blocks across requests sharing a prefix.")


class KVTransferSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "duration(self.timeout) >= duration('1ms')",
                    "engine.kvTransfer.timeout must be at least 1ms: it is rendered as kv_transfer_timeout_ms, "
                    "which TensorRT-LLM requires to be greater than 0",
                    fieldPath=".timeout",
                )
            ]
        }
    )
    backend: Literal["UCX", "NIXL"] = Field(default="UCX", description="KV transfer backend between tiers. Rendered explicitly (never DEFAULT, whose meaning changed between TensorRT-LLM versions).")
    compression: Literal["none", "fp8"] = Field(default="none", description="Declares the tiers' KV transfer lossy (fp8): Baton configures no compression in the engines; the scheduler then keeps requests flagged high-precision off the link (prefilled on the decode replica, see highPrecisionFallback). Moot with kvCache.dtype fp8 (the KV is fp8 either way). Part of the engine generation: a change rolls out a new generation, as an engine change does.")
    high_precision_fallback: bool = Field(default=True, description="With compression on, let requests flagged high-precision bypass it by prefilling on the decode tier; false: they are handed off compressed like any other. A scheduler setting: a change reloads the scheduler and never starts a new generation.")
    max_tokens_in_buffer: int | None = Field(default=None, ge=256, le=1048576, description=(
        "KV transfer staging buffer, in tokens (cache_transceiver_config.max_tokens_in_buffer), on both tiers. "
        "Every GPU allocates three (two to send, one to receive) out of the memory its KV cache would get. KV of "
        "a longer prompt goes through a buffer allocated for that transfer: slower with UCX, and a failed "
        "transfer with NIXL, so with NIXL it must be at least prefill.maxPromptTokens. A multiple of the KV "
        "tokens per block. Empty: 8192 with UCX (less when prefill.maxPromptTokens is smaller); with NIXL, "
        "prefill.maxPromptTokens, both rounded up to whole blocks."))
    timeout: str = Field(default="30s", pattern=DURATION_PATTERN, description="How long a prefill replica keeps KV waiting for its decode replica to pull it (kv_transfer_timeout_ms, in whole milliseconds): at least 1ms.")

    @field_validator("timeout")
    @classmethod
    def _timeout_at_least_1ms(cls, value: str) -> str:
        if parse_duration(value) < 0.001:
            raise ValueError("engine.kvTransfer.timeout must be at least 1ms: it is rendered as kv_transfer_timeout_ms, "
                             "which TensorRT-LLM requires to be greater than 0")
        return value


STARTUP_TIMEOUT_DEFAULT = "30m"
STARTUP_TIMEOUT_TOO_SHORT = (
    "engine.startupTimeout must be at least 1m: it is how long an engine container may take to download, load and "
    "warm up its checkpoint before the kubelet restarts it (its startupProbe)"
)


class EngineSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("!has(self.startupTimeout) || duration(self.startupTimeout) >= duration('1m')",
                     STARTUP_TIMEOUT_TOO_SHORT, fieldPath=".startupTimeout"),
            ]
        }
    )
    runtime: Literal["trtllm-serve", "triton"] = Field(default="trtllm-serve", description="Serving front end: trtllm-serve (OpenAI-compatible HTTP) or triton (KServe v2, tensorrtllm_backend's request_type and context_phase_params). With triton the engines run `tritonserver --model-repository` on the model source: the model repository's config.pbtxt, not this spec, sets parallelism, KV cache and transfer, and engine options, and rollouts are not probed. NVIDIA's Triton backend moves KV over MPI inside one server, so KV handoff between separately started Triton pods is not something it supports (as of TensorRT-LLM 1.2): prefer trtllm-serve; see docs/scheduler.md.")
    image: str = Field(min_length=1, description="Engine container image, e.g. nvcr.io/nvidia/tensorrt-llm/release:1.2.0.")
    trtllm_version: str = Field(max_length=64, pattern=r"^[0-9]+\.[0-9]+\.[0-9]+([a-z0-9.+-]*)?$", description="TensorRT-LLM version inside the image (e.g. 1.2.0). Both tiers must run the same version: the KV handle format carries no version tag.")
    kv_cache: KVCacheSpec = Field(description="KV cache layout, shared by both tiers.")
    kv_transfer: KVTransferSpec = _nested(KVTransferSpec, "How KV moves from the prefill tier to the decode tier.")
    speculative_config: KubeObject | None = _free_form("TensorRT-LLM speculative_config, rendered on both tiers (set on one side only, the KV layouts would differ).")
    extra_options: KubeObject | None = _free_form("Extra TensorRT-LLM LLM-API options (the --extra_llm_api_options YAML) merged into both tiers' config. Keys Baton renders itself cannot be overridden here; options checked against a worker's parallelism (moe_tensor_parallel_size, moe_expert_parallel_size, moe_cluster_parallel_size, pp_partition) must fit both tiers.")
    env: list[KubeObject] = _free_form_list("Extra environment variables (core/v1 EnvVar) for the engine containers of both tiers.")
    startup_timeout: str = Field(default=STARTUP_TIMEOUT_DEFAULT, pattern=DURATION_PATTERN, description="How long an engine container may take to start (download the checkpoint from a huggingFace source, load it, warm up) before the kubelet restarts it: its startupProbe, checked every 10s. At least 1m. Changing it rolls the tiers' pods in place, not a new generation. rollout.progressDeadline (15m by default) bounds a new generation's start too: for a model that takes longer to load, raise both.")

    @field_validator("startup_timeout")
    @classmethod
    def _startup_timeout_at_least_a_minute(cls, value: str) -> str:
        if parse_duration(value) < 60:
            raise ValueError(STARTUP_TIMEOUT_TOO_SHORT)
        return value


# --------------------------------------------------------------------------------------------- tiers


class PoolSpec(ApiModel):
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the tier's pods must match, e.g. {baton.dev/pool: prefill-h100}.")
    affinity: KubeObject | None = _free_form("core/v1 Affinity for the tier's pods (in addition to nodeSelector).")
    tolerations: list[KubeObject] = _free_form_list("Extra core/v1 Tolerations. Baton always tolerates the nvidia.com/gpu NoSchedule taint on GPU tiers.")


# A resource quantity as a core pod spec takes it: a string (32Gi, 500m, 1.5) or an unquoted integer (cpu: 4),
# in Kubernetes' quantity syntax (Kubernetes' own pattern for resource.Quantity, without a minus sign), so a
# value the API server would refuse in the pod (32GB, 4 cores) is refused at admission instead. '' is kept
# as "not set" for a tier's nvidia.com/gpu, which always comes from gpusPerReplica: a schema cannot give one
# key of a map its own pattern, so a CEL rule on the map (_empty_quantity_rules) refuses '' for every other key.
RESOURCE_QUANTITY_PATTERN = (
    r"^$|^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _integer_quantity_as_string(value: Any) -> Any:
    """`cpu: 4` (a JSON integer) is the quantity "4": the model keeps every quantity as a string."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Bounded so that CEL rules reading resources stay within the API server's cost budget. The schema is
# Kubernetes' int-or-string (pattern and maxLength apply to strings, minimum to integers).
ResourceQuantity = Annotated[
    str,
    BeforeValidator(_integer_quantity_as_string),
    StringConstraints(max_length=64, pattern=RESOURCE_QUANTITY_PATTERN),
    WithJsonSchema({
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "minimum": 0,
        "maxLength": 64,
        "pattern": RESOURCE_QUANTITY_PATTERN,
    }),
]
ResourceQuantities = dict[str, ResourceQuantity]


class ResourcesSpec(ApiModel):
    requests: ResourceQuantities = Field(default_factory=dict, max_length=64, description="Resource requests besides GPUs (cpu, memory, ...), as in a pod spec: Kubernetes quantities such as 4, 500m or 32Gi (not 32GB). GPUs come from gpusPerReplica.")
    limits: ResourceQuantities = Field(default_factory=dict, max_length=64, description="Resource limits besides GPUs, as Kubernetes quantities (4, 500m, 32Gi). nvidia.com/gpu is always set from gpusPerReplica.")


MAX_EXTRA_VOLUMES = 128
# Baton's own volumes in every engine pod (baton.pod_volumes), by model source, in words.
_BATON_VOLUMES = (f"{pod_volumes.ENGINE_CONFIG_VOLUME}, {pod_volumes.SHM_VOLUME}, and {pod_volumes.MODEL_VOLUME} with a "
                  f"pvc or hostPath model source or {pod_volumes.HF_CACHE_VOLUME} with a huggingFace one")
_BATON_MOUNTS = (f"{pod_volumes.ENGINE_CONFIG_DIR}, {pod_volumes.SHM_MOUNT}, and {pod_volumes.MODEL_MOUNT} with a "
                 f"pvc or hostPath model source or {pod_volumes.HF_CACHE_MOUNT} with a huggingFace one")


# Kubernetes' label syntax (IsValidLabelValue for values, IsQualifiedName for keys), as RE2 and Python read
# it alike ([.], not an escape a CEL string would need doubled). A schema bounds a map's values but not its
# keys: a CEL rule on the tier checks the keys (_tier_rules), within the cost budget as the map has at most
# MAX_EXTRA_LABELS keys.
LABEL_NAME = rf"[A-Za-z0-9]([-A-Za-z0-9_.]{{0,{LABEL_VALUE_MAX - 2}}}[A-Za-z0-9])?"  # 1 to 63 characters
LABEL_VALUE_PATTERN = rf"^({LABEL_NAME})?$"
LABEL_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"  # a DNS-1123 subdomain
LABEL_PREFIX_MAX = 253
LABEL_KEY_PATTERN = rf"^({LABEL_PREFIX}/)?{LABEL_NAME}$"
MAX_EXTRA_LABELS = 64
LabelValue = Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE_PATTERN)]
LABEL_KEY_SYNTAX = (
    "a name of at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit, optionally "
    f"prefixed by a DNS subdomain (lowercase letters, digits, '-' and '.', at most {LABEL_PREFIX_MAX} characters) "
    "and '/'; use a key such as team or example.com/team"
)


class PodTemplateOverrides(ApiModel):
    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAX_EXTRA_LABELS, description=(
        f"Extra pod labels, at most {MAX_EXTRA_LABELS} (Baton's own labels win on conflict), in Kubernetes' label "
        "syntax: values of at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit "
        "(or empty); keys a name like that, optionally prefixed by a DNS subdomain and '/'."))
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")
    env: list[KubeObject] = _free_form_list("Extra environment variables (core/v1 EnvVar) for this tier's engine container.")
    # Bounded so that the CEL rules reading them (_reserved_volume_rules) stay within the API server's cost budget.
    volumes: list[KubeObject] = _free_form_list(
        f"Extra pod volumes (core/v1 Volume), at most {MAX_EXTRA_VOLUMES}, named unlike Baton's own: {_BATON_VOLUMES}.",
        {"name": {"type": "string", "description": "The volume's name."}}, max_length=MAX_EXTRA_VOLUMES)
    volume_mounts: list[KubeObject] = _free_form_list(
        f"Extra mounts (core/v1 VolumeMount) for the engine container, at most {MAX_EXTRA_VOLUMES}, at paths other "
        f"than Baton's own: {_BATON_MOUNTS}.",
        {"mountPath": {"type": "string", "description": "Where the volume is mounted in the engine container."}},
        max_length=MAX_EXTRA_VOLUMES)
    priority_class_name: str = Field(default="", description="PriorityClass for the tier's pods.")
    topology_spread_constraints: list[KubeObject] = _free_form_list("core/v1 TopologySpreadConstraints for the tier's pods.")
    service_account_name: str = Field(default="", description="ServiceAccount for the tier's pods (default: the namespace's default account).")


class TierEngineOverrides(ApiModel):
    image: str = Field(default="", description="Engine image for this tier only (default: engine.image).")
    trtllm_version: str = Field(default="", max_length=64, pattern=r"^$|^[0-9]+\.[0-9]+\.[0-9]+([a-z0-9.+-]*)?$", description="TensorRT-LLM version for this tier only (default: engine.trtllmVersion). Must equal the other tier's: the KV handle format carries no version tag.")
    kv_cache_dtype: Literal["", "fp16", "bf16", "fp8"] = Field(default="", description="KV cache dtype for this tier only (default: engine.kvCache.dtype). Must equal the other tier's.")
    tokens_per_block: Literal[0, 8, 16, 32, 64, 128] = Field(default=0, description="KV tokens per block for this tier only (0: engine.kvCache.tokensPerBlock). Must equal the other tier's.")


GPU_RESOURCE = "nvidia.com/gpu"
EMPTY_QUANTITY = "is empty (''), which Kubernetes refuses in a pod; set a quantity such as 4, 500m or 32Gi, or remove"


def _empty_quantity_rules(owner: str, gpu_may_be_empty: bool) -> list[dict[str, str]]:
    """No empty quantity in `owner`.resources, but for a tier's nvidia.com/gpu (rendered from gpusPerReplica
    whatever it holds). Also checked by the operator (baton.operator.validation.empty_quantity_problems).
    A map holds at most 64 quantities of at most 64 characters: cheap within the API server's cost budget."""
    skip = f"k == '{GPU_RESOURCE}' || " if gpu_may_be_empty else ""
    except_gpu = f" (only {GPU_RESOURCE} may be empty: it comes from gpusPerReplica)" if gpu_may_be_empty else ""
    return [
        _cel(
            f"!has(self.resources) || !has(self.resources.{kind}) || "
            f"self.resources.{kind}.all(k, {skip}string(self.resources.{kind}[k]) != '')",
            f"{owner}.resources.{kind}: a quantity {EMPTY_QUANTITY} the key{except_gpu}",
            fieldPath=f".resources.{kind}",
        )
        for kind in ("requests", "limits")
    ]


def _gpu_resource(kind: str) -> str:
    return (f"(has(self.resources) && has(self.resources.{kind}) && 'nvidia.com/gpu' in self.resources.{kind} "
            f"&& string(self.resources.{kind}['nvidia.com/gpu']) != '')")


# The GPU count a tier's resources ask for, read as the operator does (baton.operator.validation):
# limits first, else requests, else '' (not set). A quantity is int-or-string (`nvidia.com/gpu: 2`), so
# it is read through string(), as the model keeps it.
_GPU_IN_RESOURCES = (
    f"({_gpu_resource('limits')} ? string(self.resources.limits['nvidia.com/gpu']) : "
    f"{_gpu_resource('requests')} ? string(self.resources.requests['nvidia.com/gpu']) : '')"
)


def _tier_rules(tier: str) -> list[dict[str, str]]:
    # maxReplicas and gpusPerReplica default to 1, so these fail for a spec that never set the field they
    # name: each message says so, and fieldPath points at the field to set.
    return [
        _cel(
            "self.minReplicas <= self.maxReplicas",
            f"{tier}.minReplicas must be at most {tier}.maxReplicas (maxReplicas defaults to 1): set maxReplicas "
            "to at least minReplicas, or lower minReplicas",
            fieldPath=".maxReplicas",
        ),
        _cel(
            "!has(self.replicas) || self.replicas <= self.maxReplicas",
            f"{tier}.replicas must be at most {tier}.maxReplicas (maxReplicas defaults to 1): set maxReplicas to "
            "at least replicas, or lower replicas",
            fieldPath=".maxReplicas",
        ),
        _cel(
            "self.tensorParallelSize * self.pipelineParallelSize == self.gpusPerReplica",
            f"{tier}.tensorParallelSize x pipelineParallelSize must equal {tier}.gpusPerReplica (all three default "
            "to 1): set gpusPerReplica to tensorParallelSize x pipelineParallelSize, or change the sizes",
            fieldPath=".gpusPerReplica",
        ),
        # Also checked by the operator (a second line for objects admitted before this rule existed).
        _cel(
            f"{_GPU_IN_RESOURCES} == '' || {_GPU_IN_RESOURCES} == string(self.gpusPerReplica)",
            f"{tier}.resources sets nvidia.com/gpu but it differs from gpusPerReplica; drop nvidia.com/gpu from "
            "resources (it comes from gpusPerReplica)",
            messageExpression=(
                # (no string(int) here: the API server's cost estimate for it exceeds the budget)
                f"'{tier}.resources sets nvidia.com/gpu=' + {_GPU_IN_RESOURCES} + ', which differs from "
                "gpusPerReplica; drop nvidia.com/gpu from resources (it comes from gpusPerReplica)'"
            ),
            fieldPath=".resources",
        ),
        *_empty_quantity_rules(tier, gpu_may_be_empty=True),
        # Also checked by the operator (baton.operator.validation.pod_label_problems), which names the key.
        _cel(
            "!has(self.podTemplate) || !has(self.podTemplate.labels) || self.podTemplate.labels.all(k, "
            f"k.matches('{LABEL_KEY_PATTERN}') && k.indexOf('/') <= {LABEL_PREFIX_MAX})",
            f"{tier}.podTemplate.labels: a key is not a Kubernetes label key: {LABEL_KEY_SYNTAX}",
            fieldPath=".podTemplate.labels",
        ),
    ]


class TierSpec(ApiModel):
    replicas: int | None = Field(default=None, ge=0, le=1024, description="Desired replicas, at most maxReplicas; the tier runs at least minReplicas. Defaults to minReplicas.")
    min_replicas: int = Field(default=1, ge=0, le=1024, description="Fewest replicas the tier runs.")
    max_replicas: int = Field(default=1, ge=1, le=1024, description="Most replicas the tier may scale to.")
    gpus_per_replica: int = Field(default=1, ge=1, le=64, description="GPUs per replica (nvidia.com/gpu limit); equals tensorParallelSize x pipelineParallelSize.")
    tensor_parallel_size: Literal[1, 2, 4, 8, 16, 32, 64] = Field(default=1, description="Tensor parallelism per replica; a power of two (TensorRT-LLM splits KV heads across ranks).")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64, description="Pipeline parallelism per replica.")
    pool: PoolSpec = _nested(PoolSpec, "The GPU node pool the tier runs on.")
    allow_spot: bool = Field(default=False, description="Whether the tier may run on spot/preemptible capacity (adds the usual spot tolerations). Allowed for prefill; refused for decode.")
    max_batch_size: int = Field(default=64, ge=1, le=4096, description="Most sequences batched together per replica (max_batch_size).")
    max_num_tokens: int = Field(default=8192, ge=64, le=1048576, description="Most tokens processed per engine iteration (max_num_tokens).")
    resources: ResourcesSpec = _nested(ResourcesSpec, "CPU, memory and other resources for the engine container.")
    pod_template: PodTemplateOverrides = _nested(PodTemplateOverrides, "Overrides merged into the tier's pod template.")
    port: int = Field(default=8000, ge=1024, le=65535, description="Port the engine serves HTTP on. With engine.runtime triton also port + 1 (gRPC) and port + 2 (metrics), so at most 65533.")
    engine_overrides: TierEngineOverrides = _nested(TierEngineOverrides, "Per-tier engine settings (e.g. a patched image). Baton refuses overrides that would make the two tiers' KV formats incompatible.")

    def desired_replicas(self) -> int:
        """minReplicas is a floor (as an autoscaler's minimum is); the schema refuses more than maxReplicas."""
        return max(self.min_replicas, self.min_replicas if self.replicas is None else self.replicas)


class PrefillTierSpec(TierSpec):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _tier_rules("prefill")})
    max_prompt_tokens: int = Field(default=32768, ge=16, le=2097152, description="Longest prompt the prefill tier accepts (max_input_len).")


class DecodeTierSpec(TierSpec):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                *_tier_rules("decode"),
                _cel(
                    "!self.allowSpot",
                    "decode.allowSpot must be false: decode replicas hold live KV cache and generation state, "
                    "so preempting one fails every request it serves; run spot capacity on the prefill tier only",
                    fieldPath=".allowSpot",
                ),
                _cel(
                    "!self.kvCacheSize.matches('([mun]|[eE]-[0-9]+)$')",
                    "decode.kvCacheSize is a number of bytes: m is milli (24m is 0.024 bytes); use M or Mi for "
                    "megabytes, G or Gi for gigabytes (e.g. 24Gi)",
                    fieldPath=".kvCacheSize",
                ),
            ]
        }
    )
    # Always present, like a Deployment's: the scale subresource (kubectl scale, HorizontalPodAutoscaler)
    # reads and writes this field, and the API server cannot serve a scale whose replicas are unset.
    replicas: int = Field(default=1, ge=0, le=1024, description=(
        "Desired decode replicas, the target of the scale subresource (`kubectl scale dm/NAME`, a "
        "HorizontalPodAutoscaler). At most maxReplicas; the tier runs at least minReplicas, so the default "
        "of 1 means minReplicas. Leave it out of GitOps manifests when an autoscaler drives the tier."))
    kv_cache_size: str = Field(default="", max_length=64, pattern=r"^$|^" + QUANTITY_PATTERN[1:], description=(
        "KV cache memory of one decode replica, all its GPUs together, in bytes (e.g. 24Gi): an upper bound on "
        "its KV token capacity (kv_cache_config.max_tokens: this size over what one token takes on the replica's "
        "GPUs, KV heads that tensor parallelism duplicates counted, as with MLA or more TP ranks than KV heads). "
        "engine.kvCache.freeGpuMemoryFraction still applies and TensorRT-LLM takes the smaller. Needs "
        "model.architecture, and must hold at least one sequence (prefill.maxPromptTokens + maxGeneratedTokens). "
        "Empty: only the fraction of free GPU memory."))
    max_generated_tokens: int = Field(default=4096, ge=1, le=1048576, description="Most tokens one request may generate.")


# ------------------------------------------------------------------------------------------ scheduler


class AdmissionSpec(ApiModel):
    prefill_tokens_per_second: int = Field(default=0, ge=0, description="Token bucket refill rate for prompt tokens sent to the prefill pool; 0 means unlimited.")
    prefill_burst_tokens: int = Field(default=0, ge=0, description="Token bucket size for the prefill pool; 0 means one second of the rate.")
    decode_requests_per_second: int = Field(default=0, ge=0, description="Token bucket refill rate for requests admitted to the decode pool; 0 means unlimited.")
    decode_burst: int = Field(default=0, ge=0, description="Token bucket size for the decode pool; 0 means one second of the rate.")


class BackpressureSpec(ApiModel):
    max_active_per_decode_replica: int = Field(default=64, ge=1, le=65536, description="Most sequences in flight on one decode replica before the scheduler holds new work.")
    decode_p95_latency_threshold: str = Field(default="200ms", pattern=DURATION_PATTERN, description="Throttle new decode admissions (half of maxActivePerDecodeReplica per replica) while the decode tier's p95 time per output token exceeds this. 0s turns the throttle off.")


class RedisUrlSecretRef(ApiModel):
    name: str = Field(min_length=1, description="Secret name, in the model's namespace.")
    key: str = Field(default="url", min_length=1, description="Key inside the Secret whose value is the Redis URL.")


class DegradationSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.store != 'redis' || self.redisUrl != '' || has(self.redisUrlSecret)",
                     "scheduler.degradation.redisUrl or redisUrlSecret is required when store is redis"),
                _cel("self.redisUrl == '' || !has(self.redisUrlSecret)",
                     "scheduler.degradation: set redisUrl or redisUrlSecret, not both"),
                # The scheduler refuses 0 (baton.scheduler.config): a new scheduler would not start and a
                # running one would keep its old config.
                _cel("duration(self.holdTtl) > duration('0s')",
                     "scheduler.degradation.holdTtl must be greater than 0s (the default is 120s): it is how long "
                     "a finished prefill may wait for a decode slot, and the scheduler refuses 0",
                     fieldPath=".holdTtl"),
            ]
        }
    )
    hold_ttl: str = Field(default="120s", pattern=DURATION_PATTERN, description="How long a finished prefill may wait for a decode slot while decode is saturated before it is re-prefilled or failed; capped at 90% of engine.kvTransfer.timeout, after which the prefill engine frees the KV.")
    store: Literal["memory", "redis"] = Field(default="memory", description=(
        "Where held prefill results are recorded. memory: in the scheduler process. redis: also published to "
        "Redis (key baton:hold:<request id>#<random suffix>, expiring with the hold) so every scheduler "
        "replica's holds can be seen in one place; holds keep working from memory while Redis is unreachable."))
    redis_url: str = Field(default="", max_length=2048, pattern=r"^((rediss?|unix)://.+)?$", description=(
        "Redis URL (redis://, rediss:// or unix://) when store is redis. It is written into the scheduler's "
        "ConfigMap: use redisUrlSecret for a URL with a password."))
    redis_url_secret: RedisUrlSecretRef | None = Field(default=None, description=(
        "Secret holding the Redis URL when store is redis, mounted into the scheduler as a file (the URL stays "
        "out of the ConfigMap); a rotated Secret applies without a restart."))


class SchedulerSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.localPrefillBelowTokens <= self.alwaysPrefillAtOrAboveTokens",
                    "scheduler.localPrefillBelowTokens must be less than or equal to alwaysPrefillAtOrAboveTokens; "
                    "localPrefillBelowTokens defaults to 4096, so with alwaysPrefillAtOrAboveTokens below 4096 also "
                    "set localPrefillBelowTokens, to at most alwaysPrefillAtOrAboveTokens (0: no prompt is "
                    "prefilled on a decode replica)",
                    fieldPath=".localPrefillBelowTokens",
                ),
                # The scheduler refuses 0 (baton.scheduler.config): a new scheduler would not start and a
                # running one would keep its old config.
                _cel(
                    "duration(self.heartbeatInterval) > duration('0s')",
                    "scheduler.heartbeatInterval must be greater than 0s (the default is 15s): it is how often the "
                    "scheduler health-checks idle and unhealthy engine replicas, and the scheduler refuses 0",
                    fieldPath=".heartbeatInterval",
                ),
                # The scheduler's resources are rendered as written, nvidia.com/gpu included.
                *_empty_quantity_rules("scheduler", gpu_may_be_empty=False),
            ]
        }
    )
    replicas: int = Field(default=1, ge=1, le=64, description="Scheduler Deployment replicas.")
    image: str = Field(default="", description="Scheduler image; empty means the operator's own image (`baton scheduler`).")
    algorithm: Literal["throughput-optimized", "latency-optimized"] = Field(default="throughput-optimized", description="How prompts between the two routing thresholds are routed.")
    placement_policy: Literal["shortest-prefill-first", "least-loaded", "round-robin"] = Field(default="shortest-prefill-first", description="How a prefill replica is chosen: least queued prefill tokens, fewest active requests, or in turn.")
    local_prefill_below_tokens: int = Field(default=4096, ge=0, le=2097152, description="Prompts shorter than this may be prefilled on a decode replica (no KV transfer).")
    always_prefill_at_or_above_tokens: int = Field(default=16384, ge=0, le=2097152, description="Prompts at least this long always go to the prefill tier.")
    prefill_batch_size: int = Field(default=32, ge=1, le=4096, description="Most prefills the scheduler batches towards one prefill replica at a time.")
    decode_batch_size: int = Field(default=1, ge=1, le=4096, description="Most prompts one decode replica prefills itself (the local route) at a time; the sequences in flight on it are bounded by backpressure.maxActivePerDecodeReplica.")
    max_queue_depth: int = Field(default=256, ge=1, le=1000000, description="Requests that may wait; beyond it the scheduler answers 429 with Retry-After.")
    max_concurrent_prefills: int = Field(default=64, ge=1, le=100000, description="Most prefills in flight across the prefill tier.")
    admission: AdmissionSpec = _nested(AdmissionSpec, "Token-bucket admission per pool.")
    backpressure: BackpressureSpec = _nested(BackpressureSpec, "Decode-tier protection.")
    degradation: DegradationSpec = _nested(DegradationSpec, "What happens to finished prefills while decode is saturated.")
    tokenizer: Literal["estimate", "model"] = Field(default="estimate", description=(
        "How the scheduler counts text prompts for routing (token-id prompts are always exact). estimate: one "
        "token per 4 bytes of UTF-8, no tokenizer needed. model: the model's own tokenizer.json and chat "
        "template, read from spec.model.source (a PVC must allow ReadOnlyMany or ReadWriteMany, a hostPath must "
        "exist on the scheduler's nodes, a Hugging Face model is fetched at start with its tokenSecret): exact, "
        "at some CPU per text prompt."))
    heartbeat_interval: str = Field(default="15s", pattern=DURATION_PATTERN, description="Health-check interval for idle and unhealthy engine replicas (both tiers).")
    port: int = Field(default=8000, ge=1024, le=65535, description="Port the scheduler serves the OpenAI-compatible API on.")
    stream_flush_interval_ms: int = Field(default=1, ge=0, le=100, description=(
        "Streamed tokens an engine sends sooner than this many milliseconds after the scheduler's previous write to "
        "the client are gathered and written together, at most this much later; the first token and the last event "
        "([DONE]) are never held, so a stream's end is not delayed. "
        "Fewer, larger writes cost the scheduler less CPU when tokens arrive faster than the interval; at usual "
        "decode speeds nothing is held. 0 writes every token as it arrives."))
    resources: ResourcesSpec = _nested(ResourcesSpec, "Scheduler container resources.")
    pool: PoolSpec = _nested(PoolSpec, "Where scheduler pods run (typically a CPU pool).")


# -------------------------------------------------------------------------------------------- rollout


PROGRESS_DEADLINE_TOO_SHORT = (
    "rollout.progressDeadline must be longer than rollout.minReadySeconds: a new generation's pods count as "
    "available only after minReadySeconds Ready, so every rollout would miss its deadline and be rolled back"
)


class RolloutSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("duration(self.progressDeadline).getSeconds() > self.minReadySeconds",
                     PROGRESS_DEADLINE_TOO_SHORT, fieldPath=".progressDeadline"),
            ]
        }
    )

    @model_validator(mode="after")
    def _deadline_after_min_ready(self) -> RolloutSpec:
        if parse_duration(self.progress_deadline) <= self.min_ready_seconds:
            raise ValueError(PROGRESS_DEADLINE_TOO_SHORT)
        return self

    strategy: Literal["AtomicGeneration", "PairwiseSwap"] = Field(default="AtomicGeneration", description=(
        "AtomicGeneration: a change to the engine or KV format starts a full new generation of both tiers beside the "
        "serving one, probes a real KV handoff through it, and switches traffic in one step; it needs GPUs for a "
        "second full generation. PairwiseSwap, for GPU-tight clusters: the new generation starts with one replica "
        "per tier (a surge of one), is probed, serves beside the old one (schedulers pair only equal KV formats), "
        "then grows one replica per tier as the old generation shrinks, each step probed, until it has all replicas."))
    progress_deadline: str = Field(default="15m", pattern=DURATION_PATTERN, description="How long a new generation may take to become Ready and pass its handoff probe before it is rolled back. Include the time the engines take to download (huggingFace source) and load the checkpoint: an engine container gets engine.startupTimeout (30m) to start before it is restarted, so a model that loads in more than 15 minutes needs a longer deadline.")
    drain_timeout: str = Field(default="5m", pattern=DURATION_PATTERN, description="How long after the switch the old generation may finish in-flight KV transfers and decodes; it is kept for rollbackWindow in any case, and deleted after that once idle or at this timeout.")
    rollback_window: str = Field(default="60s", pattern=DURATION_PATTERN, description="How long the previous generation is kept after the switch, so a new generation that fails can be rolled back in one step.")
    error_rate_threshold_percent: int = Field(default=5, ge=1, le=100, description="After the switch and until rollbackWindow ends, roll back when more than this percentage of the requests the schedulers dispatched to the new generation failed (100 turns the check off).")
    error_rate_min_requests: int = Field(default=20, ge=1, le=1000000, description="Requests the new generation must have served before its error rate is judged.")
    min_ready_seconds: int = Field(default=5, ge=0, le=3600, description="How long an engine pod must stay Ready before it counts as available (StatefulSet minReadySeconds): a generation is probed and switched to only when every replica is available.")
    paused: bool = Field(default=False, description="Pause an ongoing rollout where it is.")


class TierEngine(BaseModel):
    """Resolved per-tier engine settings (not part of the API schema)."""

    image: str
    trtllm_version: str
    kv_cache_dtype: str
    tokens_per_block: int


def _tier_engine(tier: str, override: str, unset: str, base: str) -> str:
    """CEL for one tier's effective engine setting: its engineOverrides value, else engine.* (as tier_engine())."""
    o = f"self.{tier}.engineOverrides"
    return f"((has({o}) && has({o}.{override}) && {o}.{override} != {unset}) ? {o}.{override} : self.engine.{base})"


def _kv_format_rule(override: str, unset: str, base: str, numeric: bool = False) -> dict[str, str]:
    """Both tiers' effective value of a KV-format field must be equal, with the operator's KV-gate message
    (baton.operator.reconciler; kvformat labels the fields by their engineOverrides names)."""
    prefill, decode = (_tier_engine(t, override, unset, base) for t in ("prefill", "decode"))
    # A numeric field gets the static message: the API server's cost estimate for string(int) in a
    # messageExpression exceeds its budget.
    extra = {} if numeric else {"messageExpression": (
        f'"prefill and decode would not be able to hand off KV cache ({override}: prefill=" + {prefill} '
        f'+ ", decode=" + {decode} + "); make these fields equal on both tiers (engine.* or the '
        "tiers' engineOverrides)\""
    )}
    return _cel(
        f"{prefill} == {decode}",
        f"prefill and decode would not be able to hand off KV cache ({override} differs); make these fields equal "
        "on both tiers (engine.* or the tiers' engineOverrides)",
        **extra,
    )


TRITON_NEEDS_A_MODEL_REPOSITORY = (
    "engine.runtime triton needs model.source.pvc or hostPath: tritonserver runs on a model repository (its "
    "config.pbtxt files and engines) mounted from the model source, and a huggingFace source gives the pod "
    "none; use a pvc or hostPath source holding the repository, or runtime trtllm-serve"
)
TRITON_PORT_TOO_HIGH = (
    "with engine.runtime triton a tier's port must be at most 65533: tritonserver serves gRPC on port + 1 and "
    "metrics on port + 2"
)
KV_CACHE_SIZE_NEEDS_ARCHITECTURE = (
    "decode.kvCacheSize needs model.architecture (numLayers, numKvHeads, headDim): Baton turns the size into the "
    "engine's KV token capacity with it, and would otherwise ignore decode.kvCacheSize; set model.architecture, or "
    "drop decode.kvCacheSize to size the KV cache by engine.kvCache.freeGpuMemoryFraction"
)


TRANSFER_BUFFER_NOT_WHOLE_BLOCKS = (
    "engine.kvTransfer.maxTokensInBuffer must be a multiple of the KV tokens per block (engine.kvCache.tokensPerBlock, "
    "or the tiers' engineOverrides.tokensPerBlock): TensorRT-LLM refuses to start otherwise; round it to whole "
    "blocks, or leave it out for Baton's default"
)
TRANSFER_BUFFER_BELOW_PROMPT_NIXL = (
    "engine.kvTransfer.maxTokensInBuffer is below prefill.maxPromptTokens with the NIXL backend, which cannot "
    "transfer KV that does not fit the buffer: the KV transfer of every longer prompt would fail; raise "
    "maxTokensInBuffer to at least prefill.maxPromptTokens, or leave it out to size it from maxPromptTokens"
)


PIPELINE_STAGE_WITHOUT_LAYERS = (
    "pipelineParallelSize is above model.architecture.numLayers: TensorRT-LLM gives every pipeline stage at "
    "least one layer and refuses to start otherwise; lower the tier's pipelineParallelSize (and gpusPerReplica), "
    "or check numLayers"
)


def _reserved_volume_rules(tier: str) -> list[dict[str, str]]:
    """No podTemplate volume named like Baton's own, no mount at their paths: Kubernetes would refuse the pod.
    Rules on the spec, where the model source (which volume holds the checkpoint) can be read. Also checked by
    the operator (baton.render.tiers.reserved_volume_overrides), which names the entry."""
    t = f"self.{tier}.podTemplate"
    hf = "has(self.model.source.huggingFace)"
    pv = pod_volumes
    names = f"['{pv.ENGINE_CONFIG_VOLUME}', '{pv.SHM_VOLUME}', {hf} ? '{pv.HF_CACHE_VOLUME}' : '{pv.MODEL_VOLUME}']"
    paths = f"['{pv.ENGINE_CONFIG_DIR}', '{pv.SHM_MOUNT}', {hf} ? '{pv.HF_CACHE_MOUNT}' : '{pv.MODEL_MOUNT}']"
    return [
        _cel(
            f"!has({t}) || !has({t}.volumes) || {t}.volumes.all(v, !has(v.name) || !(v.name in {names}))",
            f"{tier}.podTemplate.volumes: a volume is named like one of Baton's own ({_BATON_VOLUMES}), and "
            "Kubernetes refuses two volumes of one name; give it another name (and its volumeMounts too)",
            fieldPath=f".{tier}.podTemplate.volumes",
        ),
        _cel(
            f"!has({t}) || !has({t}.volumeMounts) || "
            f"{t}.volumeMounts.all(m, !has(m.mountPath) || !(m.mountPath in {paths}))",
            f"{tier}.podTemplate.volumeMounts: a mount is at one of Baton's own mount paths ({_BATON_MOUNTS}), "
            "and Kubernetes refuses two mounts at one path; mount it at another path",
            fieldPath=f".{tier}.podTemplate.volumeMounts",
        ),
    ]


class DisaggregatedModelSpec(ApiModel):
    # The KV-format fields a tier can override: the operator refuses a spec whose tiers differ on them
    # (KVFormatMismatch); the API server refuses it first. The operator check stays as a second line.
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _kv_format_rule("kvCacheDtype", "''", "kvCache.dtype"),
                _kv_format_rule("tokensPerBlock", "0", "kvCache.tokensPerBlock", numeric=True),
                _kv_format_rule("trtllmVersion", "''", "trtllmVersion"),
                # Also checked by the operator (baton.operator.validation.kv_transfer_buffer_problems).
                _cel(
                    f"!has(self.engine.kvTransfer) || !has(self.engine.kvTransfer.maxTokensInBuffer) || "
                    f"self.engine.kvTransfer.maxTokensInBuffer % "
                    f"{_tier_engine('prefill', 'tokensPerBlock', '0', 'kvCache.tokensPerBlock')} == 0",
                    TRANSFER_BUFFER_NOT_WHOLE_BLOCKS,
                    fieldPath=".engine.kvTransfer.maxTokensInBuffer",
                ),
                _cel(
                    "!has(self.engine.kvTransfer) || !has(self.engine.kvTransfer.maxTokensInBuffer) || "
                    "!has(self.engine.kvTransfer.backend) || self.engine.kvTransfer.backend != 'NIXL' || "
                    "self.engine.kvTransfer.maxTokensInBuffer >= self.prefill.maxPromptTokens",
                    TRANSFER_BUFFER_BELOW_PROMPT_NIXL,
                    fieldPath=".engine.kvTransfer.maxTokensInBuffer",
                ),
                # Also checked by the operator (baton.operator.validation.pipeline_problems).
                *(_cel(f"!has(self.model.architecture) || self.{tier}.pipelineParallelSize <= "
                       "self.model.architecture.numLayers",
                       f"{tier}.{PIPELINE_STAGE_WITHOUT_LAYERS}", fieldPath=f".{tier}.pipelineParallelSize")
                  for tier in ("prefill", "decode")),
                # Also checked by the operator (baton.operator.validation.triton_source_problems).
                _cel(
                    "!has(self.engine.runtime) || self.engine.runtime != 'triton' || "
                    "!has(self.model.source.huggingFace)",
                    TRITON_NEEDS_A_MODEL_REPOSITORY,
                    fieldPath=".model.source",
                ),
                *(_cel(f"!has(self.engine.runtime) || self.engine.runtime != 'triton' || self.{tier}.port <= 65533",
                       f"{tier}.port: {TRITON_PORT_TOO_HIGH}", fieldPath=f".{tier}.port")
                  for tier in ("prefill", "decode")),
                # Also checked by the operator (baton.operator.validation), with the capacity check.
                _cel(
                    "self.decode.kvCacheSize == '' || has(self.model.architecture)",
                    KV_CACHE_SIZE_NEEDS_ARCHITECTURE,
                    fieldPath=".decode.kvCacheSize",
                ),
                *_reserved_volume_rules("prefill"),
                *_reserved_volume_rules("decode"),
            ]
        }
    )
    model: ModelSpec = Field(description="The model served.")
    engine: EngineSpec = Field(description="TensorRT-LLM engine settings shared by both tiers.")
    prefill: PrefillTierSpec = Field(description="The prefill (context) tier: compute-bound prompt processing.")
    decode: DecodeTierSpec = Field(description="The decode (generation) tier: memory-bound token generation.")
    scheduler: SchedulerSpec = _nested(SchedulerSpec, "Baton's request scheduler in front of both tiers.")
    rollout: RolloutSpec = _nested(RolloutSpec, "How engine changes roll out across both tiers.")

    def tier(self, name: str) -> PrefillTierSpec | DecodeTierSpec:
        return self.prefill if name == "prefill" else self.decode

    def tier_engine(self, name: str) -> TierEngine:
        """The engine settings one tier really runs with: engine.* with the tier's overrides applied."""
        o = self.tier(name).engine_overrides
        return TierEngine(
            image=o.image or self.engine.image,
            trtllm_version=o.trtllm_version or self.engine.trtllm_version,
            kv_cache_dtype=o.kv_cache_dtype or self.engine.kv_cache.dtype,
            tokens_per_block=o.tokens_per_block or self.engine.kv_cache.tokens_per_block,
        )


# --------------------------------------------------------------------------------------------- status


class Condition(ApiModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(description="Condition type: Ready, Reconciling, Stalled, KVFormatCompatible, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason for the condition's last transition.")
    message: str = Field(default="", description="What happened and what to do, for humans.")
    last_transition_time: str = Field(default="", description="When the status last changed (RFC 3339).")
    observed_generation: int = Field(default=0, description="metadata.generation the condition was computed from.")


class TierStatus(ApiModel):
    model_config = ConfigDict(extra="ignore")
    replicas: int = Field(default=0, description="Desired replicas.")
    ready_replicas: int = Field(default=0, description="Replicas whose engine is ready.")
    updated_replicas: int = Field(default=0, description="Replicas running the current revision.")
    summary: str = Field(default="", description="ready/desired, for printer columns.")
    selector: str = Field(default="", description="Label selector of the tier's pods (all generations), for the scale subresource: a HorizontalPodAutoscaler reads pod metrics through it.")
    kv_fingerprint: str = Field(default="", description="Fingerprint of the tier's KV-cache layout.")


class ErrorRateStatus(ApiModel):
    model_config = ConfigDict(extra="ignore")
    generation: str = Field(default="", description="The generation judged (the one switched to).")
    failed: int = Field(default=0, description="Requests dispatched to it since it took traffic that failed, summed over the schedulers.")
    total: int = Field(default=0, description="Requests dispatched to it since it took traffic that completed or failed.")
    failed_at_switch: int = Field(default=0, description="The schedulers' failed-request counters for it when it took traffic (they never reset): failed counts from there.")
    total_at_switch: int = Field(default=0, description="The schedulers' completed and failed counters for it when it took traffic: total counts from there.")


class SwapStatus(ApiModel):
    model_config = ConfigDict(extra="ignore")
    generation: str = Field(default="", description="The incoming generation of a PairwiseSwap once its first pair passed the probe: schedulers route to it beside servingGeneration, pairing only equal KV fingerprints.")
    prefill_replicas: int = Field(default=0, description="The serving generation's prefill replicas before the swap first shrank it: the swap's budget (a rollback gives the serving generation the spec's counts).")
    decode_replicas: int = Field(default=0, description="The serving generation's decode replicas before the swap first shrank it: the swap's budget (a rollback gives the serving generation the spec's counts).")


class ReplicasAtSwitch(ApiModel):
    model_config = ConfigDict(extra="ignore")
    prefill: int = Field(default=0, description="Prefill replicas the serving generation had when traffic switched to it, lowered when the tier is scaled down.")
    decode: int = Field(default=0, description="Decode replicas the serving generation had when traffic switched to it, lowered when the tier is scaled down.")


class GenerationRef(ApiModel):
    model_config = ConfigDict(extra="ignore")
    generation: str = Field(default="", description="Generation key (hash of the engine and KV-format settings).")
    prefill_fingerprint: str = Field(default="", description="KV-format fingerprint of the generation's prefill tier.")
    decode_fingerprint: str = Field(default="", description="KV-format fingerprint of the generation's decode tier.")


class ProbeStatus(ApiModel):
    model_config = ConfigDict(extra="ignore")
    generation: str = Field(default="", description="Generation the probe ran against.")
    passed: bool = Field(default=False, description="Whether every probed prefill->decode handoff succeeded.")
    message: str = Field(default="", description="What the probe did, or why it failed.")
    at: str = Field(default="", description="When the probe ran (RFC 3339).")
    step: str = Field(default="", description="PairwiseSwap: the new generation's prefill x decode replicas when it was probed.")


class RolloutStatus(ApiModel):
    model_config = ConfigDict(extra="ignore")
    phase: str = Field(default="", description="Serving, BlockedOnCapacity, Progressing (the handoff probe included), Swapping (PairwiseSwap), Draining, Paused, RolledBack.")
    serving_generation: str = Field(default="", description="The generation the scheduler routes to. Switching traffic is writing this one field.")
    target_generation: str = Field(default="", description="The generation the spec asks for.")
    previous_generation: str = Field(default="", description="The generation being drained after a switch (kept for instant rollback).")
    failed_generation: str = Field(default="", description="A generation that was rolled back; it is not retried until the spec changes (or the retry annotation is set).")
    failed_revision: str = Field(default="", description="The spec's revision (a hash of everything that shapes the engines' pods) when failedGeneration failed: an edit that changes it (an env entry, resources, the pod template) tries that generation again.")
    last_known_good: GenerationRef = Field(default_factory=GenerationRef, description="The last generation that served successfully.")
    started_at: str = Field(default="", description="When the current rollout started.")
    switched_at: str = Field(default="", description="When traffic last switched generations.")
    replicas_at_switch: ReplicasAtSwitch | None = Field(default=None, description="The serving generation's replicas per tier at the switch (every one of them Ready then): within the rollback window, a pod below that ordinal that is not Ready, even one recreated since (an eviction), is lost readiness; one above it is a scale-up still starting.")
    step_started_at: str = Field(default="", description="PairwiseSwap: when the current step began (each step must become Ready within progressDeadline).")
    probe: ProbeStatus = Field(default_factory=ProbeStatus, description="The live handoff probe of the updating generation.")
    message: str = Field(default="", description="What the rollout is doing, in words.")
    swap: SwapStatus = Field(default_factory=SwapStatus, description="The state of a PairwiseSwap rollout.")
    error_rate: ErrorRateStatus = Field(default_factory=ErrorRateStatus, description="What the schedulers saw the new generation do since it took traffic: the switch, or a PairwiseSwap's first routed pair (rollout.errorRateThresholdPercent); a retried or reverted-to generation starts from zero.")
    last_rollback_millis: int = Field(default=0, description="Time from detecting a failed generation to switching traffic back, in milliseconds.")


class DisaggregatedModelStatus(ApiModel):
    model_config = ConfigDict(extra="ignore")
    observed_generation: int = Field(default=0, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Reconciling, Stalled (kstatus) and Baton's own conditions.")
    revision: str = Field(default="", description="The generation serving traffic (rollout.servingGeneration; the spec's generation until a first one serves): a hash of the engine and KV-format settings, not of the whole pod template. Its pods carry it as label baton.dev/generation (kubectl get pods -l baton.dev/generation=<it>); their baton.dev/revision label is another hash, per tier, of everything that shapes that tier's pods (a change to one tier restarts only its pods).")
    prefill: TierStatus = Field(default_factory=TierStatus, description="Prefill tier replicas.")
    decode: TierStatus = Field(default_factory=TierStatus, description="Decode tier replicas.")
    scheduler_endpoint: str = Field(default="", description="Service address clients send requests to (host:port).")
    kv_bytes_per_token: int = Field(default=0, description="KV cache bytes per token of context across the model (layers x KV heads x head size x K/V x dtype), from the architecture and KV dtype; KV heads duplicated by tensor parallelism not counted.")
    decode_kv_capacity_tokens: int = Field(default=0, description="KV cache capacity in tokens per decode replica from decode.kvCacheSize (an upper bound: the engine's freeGpuMemoryFraction may allow fewer); 0 when it is not set.")
    rollout: RolloutStatus = Field(default_factory=RolloutStatus, description="Generations and the state of the current rollout.")


class DisaggregatedModel(ApiModel):
    """The full object as the operator reads it (metadata kept loose)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: str = Field(default=f"{GROUP}/{VERSION}")
    kind: str = Field(default=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: DisaggregatedModelSpec
    status: DisaggregatedModelStatus = Field(default_factory=DisaggregatedModelStatus)


def read_model(obj: dict[str, Any]) -> tuple[DisaggregatedModel, list[str]]:
    """The object as the operator reads it, and the fields this version of Baton does not know (dotted paths),
    which are left out. The API server serves an object with every default of the CRD it has filled in, so a
    CRD newer than the operator (applied before the operator's upgrade, or kept through a `helm rollback` of
    the operator, which leaves CRDs alone) adds fields this code has never heard of: no reason to stop
    serving every model. Anything else wrong raises pydantic's ValidationError as validation does."""
    from pydantic import ValidationError

    try:
        return DisaggregatedModel.model_validate(obj), []
    except ValidationError as exc:
        unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
    import copy

    data = copy.deepcopy(obj)
    for loc in unknown:
        _drop(data, loc)
    return DisaggregatedModel.model_validate(data), [".".join(map(str, loc)) for loc in unknown]


def _drop(data: Any, loc: tuple[Any, ...]) -> None:
    """Remove the value at `loc` (keys and list indices) from `data`, if it is there."""
    for step in loc[:-1]:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(data, dict):
        data.pop(loc[-1], None)
