"""The KV-cache format ("CacheState") of a TensorRT-LLM worker, and whether two workers can hand off KV.

TensorRT-LLM checks the KV format of a context (prefill) and a generation (decode) worker only at the first
transfer handshake, when the context side runs `CacheFormatter::inquireSupport(self, peer)`. Baton derives the
same description from the files it renders (the model's Hugging Face `config.json` and the
`--extra_llm_api_options` / `--config` YAML) so that it can refuse an incompatible pair before any traffic.

Pure logic: the only I/O is `cache_state_from_files`, which reads `MODEL_DIR/config.json`. Used by the
operator (static gate), the scheduler (pairing tiers) and the engine simulator (the handshake itself).

Hard-equal fields (`HARD_EQUAL_FIELDS`) must be identical on both tiers: the ones TensorRT-LLM checks (KV
dtype, attention type, kv factor, tokens per block, head size, layer count, context parallelism) plus the
ones it does not check but that still have to agree (global KV heads, resolved transfer backend, TensorRT-LLM
version, speculative-decoding config, model identity, attention window). TP, PP, attention DP and beam
width are not compared between tiers; single-tier rules (`rule_violations`) cover them. PP splits the layers
as TensorRT-LLM does (`pp_layer_counts`, its `attentionLayerNumPerPP`): unevenly when PP does not divide the
layer count, or as the YAML's `pp_partition` says.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = [
    "BACKENDS",
    "HARD_EQUAL_FIELDS",
    "KV_DTYPES",
    "MODEL_DTYPE_CHOICES",
    "TRANSCEIVER_DISABLED_MESSAGE",
    "TRTLLM_KV_DTYPE_CHOICES",
    "TRTLLM_CACHESTATE_ERROR",
    "CacheState",
    "checkpoint_identity",
    "KVFormatError",
    "Mismatch",
    "cache_state_from_files",
    "checkpoint_kv_dtype",
    "compare",
    "fingerprint",
    "from_wire",
    "option_bool",
    "kv_bytes_per_token",
    "normalize_kv_dtype",
    "resolve_kv_dtype",
    "pp_layer_counts",
    "resolve_backend",
    "rule_violations",
    "speculative_string",
    "stage_kv_bytes_per_token",
    "to_wire",
    "trtllm_error",
    "trtllm_kv_dtype_error",
]

KV_DTYPES = ("fp16", "bf16", "fp8")  # resolved KV dtypes a CacheState carries
# What the PyTorch backend accepts in kv_cache_config.dtype (tensorrt_llm/_torch/pyexecutor/model_loader.py
# _VALID_KV_CACHE_DTYPES); anything else fails at start-up with `trtllm_kv_dtype_error`.
TRTLLM_KV_DTYPE_CHOICES = ("fp8", "nvfp4", "auto")
# What the LLM-API top-level `dtype` (the model dtype) may be: TensorRT-LLM's default "auto" (the checkpoint's)
# or a torch dtype name (str_dtype_to_torch); with kv_cache_config.dtype auto and no KV quantization in the
# checkpoint, the KV cache is kept in it.
MODEL_DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
BACKENDS = ("UCX", "NIXL", "MPI", "MOONCAKE")
DEFAULT_TOKENS_PER_BLOCK = 32  # PyTorch backend default of kv_cache_config.tokens_per_block

# TensorRT-LLM's own texts (tensorrt_llm/executor/worker.py, batch_manager/cacheTransceiver.cpp).
TRANSCEIVER_DISABLED_MESSAGE = (
    "kv_cache_transceiver is disabled, please set 'cache_transceiver_config: backend:<backend_type>` "
    "in config file for disaggregated serving"
)
TRTLLM_CACHESTATE_ERROR = (
    "Disagg server does not currently support these cacheState, please check the cacheState of the context "
    "and gen executors"
)

# DEFAULT backend resolution, in TensorRT-LLM's order: the first env var set to "1" wins.
_BACKEND_ENV = (
    ("TRTLLM_USE_UCX_KVCACHE", "UCX"),
    ("TRTLLM_USE_NIXL_KVCACHE", "NIXL"),
    ("TRTLLM_USE_MOONCAKE_KVCACHE", "MOONCAKE"),
    ("TRTLLM_USE_MPI_KVCACHE", "MPI"),
)

_DTYPE_ALIASES = {
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp8": "fp8",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
    "e4m3": "fp8",
}
_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp8": 1}


class KVFormatError(ValueError):
    """The configuration does not describe a usable disaggregated KV format."""


@dataclass(frozen=True)
class CacheState:
    """What TensorRT-LLM's CacheState (plus the parts it does not carry but Baton compares) says about a worker."""

    kv_dtype: str  # "fp16" | "bf16" | "fp8": resolved ("auto" resolves from the checkpoint, `resolve_kv_dtype`)
    tokens_per_block: int
    num_layers: int  # KV-carrying layers
    num_kv_heads: int  # global KV heads
    head_dim: int
    attention_type: str  # "DEFAULT" | "MLA"
    kv_factor: int  # 2 = K+V, 1 = K only (MLA)
    tp: int
    pp: int
    cp: int
    enable_attention_dp: bool
    transfer_backend: str  # resolved: "UCX" | "NIXL" | "MPI" | "MOONCAKE" (never "DEFAULT")
    trtllm_version: str
    speculative: str  # canonical string of speculative_config, "" when none
    model_identity: str  # what names the weights (e.g. hf:<id>@<revision>, `checkpoint_identity`); "" when unknown
    beam_width: int = 1
    # kv_cache_config.max_attention_window, canonical (`attention_window`): () = unset (full attention)
    attention_window: tuple[int, ...] = ()
    # KV layers of each pipeline stage when the YAML's pp_partition sets them; () = TensorRT-LLM's even split
    pp_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # tuple fields given as lists (e.g. `CacheState(**to_wire(...))`) are kept as tuples: hashable and equal
        for name in _TUPLE_FIELDS:
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def attention_layer_num_per_pp(self) -> tuple[int, ...]:
        """KV layers of each pipeline stage, as TensorRT-LLM's CacheState `attentionLayerNumPerPP` holds them:
        `pp_layers` (from pp_partition) when set, else TensorRT-LLM's split (`pp_layer_counts`)."""
        return self.pp_layers or pp_layer_counts(self.num_layers, self.pp)


def kv_transfer_streams(state: CacheState) -> int:
    """How many GPUs of a worker hold a share of one request's KV cache, and so send (or receive) it in
    parallel, each over its own NIC: TP ranks (at most one per KV head, beyond which heads are replicated
    rather than split; one with attention DP, where a request's KV lives on its own DP rank) x PP stages
    x CP ranks."""
    tp = 1 if state.enable_attention_dp else min(state.tp, max(1, state.num_kv_heads))
    return tp * state.pp * state.cp


def pp_layer_counts(num_layers: int, pp: int) -> tuple[int, ...]:
    """How many layers each of `pp` pipeline stages holds, the way TensorRT-LLM splits them.

    `tensorrt_llm.mapping.Mapping.pp_layers` uses `torch.tensor_split(range(num_layers), pp_size)`: when
    `num_layers % pp = n != 0`, the first n stages get one extra layer (TinyLlama's 22 layers over PP=4 are
    6, 6, 5, 5). The CacheState's `attentionLayerNumPerPP` is built from it. Stages beyond the layer count
    get 0 layers (`rule_violations` refuses that)."""
    if pp < 1 or num_layers < 0:
        return ()
    base, extra = divmod(num_layers, pp)
    return tuple(base + 1 if stage < extra else base for stage in range(pp))


@dataclass(frozen=True)
class Mismatch:
    """One hard-equal field that differs between the context and the generation worker."""

    field: str  # camelCase name users see, e.g. "kvCacheDtype"
    context: object  # prefill/ctx value
    generation: object  # decode/gen value


# Hard-equal CacheState attribute -> the camelCase name shown to users. Order = report order.
HARD_EQUAL_FIELDS: dict[str, str] = {
    "kv_dtype": "kvCacheDtype",
    "attention_type": "attentionType",
    "kv_factor": "kvFactor",
    "cp": "contextParallelSize",
    "tokens_per_block": "tokensPerBlock",
    "head_dim": "headDim",
    "num_layers": "numLayers",
    "num_kv_heads": "numKvHeads",
    "transfer_backend": "transferBackend",
    "trtllm_version": "trtllmVersion",
    "speculative": "speculativeConfig",
    "model_identity": "modelIdentity",
    "attention_window": "maxAttentionWindow",
}
# Hard-equal fields added after fingerprints were first published: left out of `fingerprint` at this default,
# so the fingerprint of a layout that does not set them stays what it was.
_FINGERPRINT_OMITTED_AT = {"attention_window": ()}

# camelCase field -> the failing check named in the error. TensorRT-LLM's own fragments (cacheFormatter.cpp)
# where it checks the field; Baton's wording, marked "(Baton)", where TensorRT-LLM does not check it and a real
# pair would fail some other way (or silently corrupt output).
_CHECK_TEXT = {
    "kvCacheDtype": "selfConfig.getDataType() != destConfig.getDataType(): only support same kv cache dtype",
    "attentionType": "only support same attention type",
    "kvFactor": "only support same kv factor",
    "contextParallelSize": "context parallelism is not currently supported",
    "tokensPerBlock": "only support same tokens per block and size per head",
    "headDim": "only support same tokens per block and size per head",
    "numLayers": "only support same number of layers",
    "numKvHeads": "only support same number of kv heads (Baton)",
    "transferBackend": "only support same cache transceiver backend (Baton)",
    "trtllmVersion": "only support same TensorRT-LLM version: the serialized state is positional (Baton)",
    "speculativeConfig": "only support same speculative_config (Baton)",
    "modelIdentity": "only support same model (Baton)",
    "maxAttentionWindow": "only support same max_attention_window: it sets the KV pool layout (Baton)",
}


def normalize_kv_dtype(dtype: object) -> str:
    """Canonical name ("fp16" | "bf16" | "fp8") of a resolved KV dtype, e.g. "bfloat16" -> "bf16".

    For what a CacheState carries, not for reading kv_cache_config.dtype (`resolve_kv_dtype` does that):
    "auto" and a missing value have no dtype until the checkpoint resolves them, and are refused here."""
    if dtype is None or str(dtype).strip().lower() in ("", "auto"):
        raise KVFormatError(
            f"KV dtype is {'unset' if dtype is None else repr(dtype)}: 'auto' is resolved from the checkpoint "
            "(kvformat.resolve_kv_dtype), it is not a KV dtype"
        )
    key = str(dtype).strip().lower()
    if key not in _DTYPE_ALIASES:
        raise KVFormatError(f"unsupported KV dtype {dtype!r}; use one of {', '.join(KV_DTYPES)}")
    return _DTYPE_ALIASES[key]


def trtllm_kv_dtype_error(dtype: object) -> str:
    """TensorRT-LLM's start-up error for a kv_cache_config.dtype the PyTorch backend does not accept
    (`validate_and_set_kv_cache_quant` in tensorrt_llm/_torch/pyexecutor/model_loader.py, raised as a
    ValueError; its quotes are unbalanced in the original too)."""
    return (
        "Overriding KV cache quantization with an invalid type "
        f'"llm_args.KvCacheConfig.dtype="{dtype}" '
        f'Accepted types are "{TRTLLM_KV_DTYPE_CHOICES}".'
    )


# torch dtype names in config.json -> KV dtype; float32 checkpoints are not simulated.
_TORCH_DTYPES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
_MODEL_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}  # simulated values of the top-level `dtype`


def _read_json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise KVFormatError(f"{path}: cannot read {path.name}: {exc}") from exc
    return data if isinstance(data, dict) else None


def _kv_quant_algo(model_dir: Path, config: Mapping) -> tuple[str, str] | None:
    """(kv_cache_quant_algo, where it was read) of a quantized checkpoint, None when it has none."""
    quant_file = Path(model_dir) / "hf_quant_config.json"
    data = _read_json_object(quant_file)
    if data is not None:
        quant = data.get("quantization") if isinstance(data.get("quantization"), dict) else data
        algo = quant.get("kv_cache_quant_algo")
        if algo:
            return str(algo), f"{quant_file.name} kv_cache_quant_algo"
    for where in (config, _text_config(dict(config))):
        qc = where.get("quantization_config")
        if isinstance(qc, dict) and qc.get("kv_cache_quant_algo"):
            return str(qc["kv_cache_quant_algo"]), "config.json quantization_config.kv_cache_quant_algo"
    return None


def _model_kv_dtype(model_dtype: object) -> str | None:
    """The KV dtype an unquantized KV cache gets from the LLM-API top-level `dtype` (the model dtype), None when
    it is "auto" or unset (the checkpoint's dtype then). "float16" -> "fp16", "bfloat16" -> "bf16"; "float32"
    is valid in TensorRT-LLM but not simulated; anything else is refused (MODEL_DTYPE_CHOICES)."""
    if model_dtype is None or model_dtype == "auto":
        return None
    if model_dtype == "float32":
        raise KVFormatError("dtype 'float32' is accepted by TensorRT-LLM but not simulated (only float16 and "
                            "bfloat16 models are)")
    if not isinstance(model_dtype, str) or model_dtype not in _MODEL_DTYPES:
        raise KVFormatError(f"dtype must be one of {', '.join(MODEL_DTYPE_CHOICES)}, got {model_dtype!r}")
    return _MODEL_DTYPES[model_dtype]


def checkpoint_kv_dtype(model_dir: Path, config: Mapping | None = None, *, model_dtype: object = None) -> str:
    """The KV dtype `kv_cache_config.dtype: auto` (TensorRT-LLM's default) gives on the PyTorch backend.

    "auto" keeps the checkpoint's KV quantization: a checkpoint whose `hf_quant_config.json`
    (`quantization.kv_cache_quant_algo`, or config.json `quantization_config.kv_cache_quant_algo`) says FP8
    caches fp8 (NVFP4 and INT8 KV are not simulated). Otherwise the KV cache is in the model's dtype: the
    LLM-API top-level `dtype` (`model_dtype`) unless it is "auto" or unset, else config.json
    `torch_dtype` (newer transformers write `dtype`; `text_config` for multimodal checkpoints), bfloat16 when
    it has none (TensorRT-LLM's `ModelConfig.torch_dtype` assumes bfloat16)."""
    from_option = _model_kv_dtype(model_dtype)
    if config is None:
        config = _read_json_object(Path(model_dir) / "config.json")
        if config is None:
            raise KVFormatError(f"{Path(model_dir) / 'config.json'}: no such file or not a JSON object")
    found = _kv_quant_algo(model_dir, config)
    if found is not None:
        algo, where = found
        if algo.strip().upper() == "FP8":
            return "fp8"
        raise KVFormatError(
            f"{where} is {algo!r}: only FP8 KV cache quantization is simulated (kv_cache_config.dtype auto keeps "
            "the checkpoint's KV quantization)"
        )
    if from_option is not None:
        return from_option
    for where in (_text_config(dict(config)), config):
        value = where.get("torch_dtype") or where.get("dtype")
        if value:
            name = str(value).strip().lower().removeprefix("torch.")
            if name not in _TORCH_DTYPES:
                raise KVFormatError(
                    f"config.json torch_dtype is {value!r}: kv_cache_config.dtype auto would cache KV in it, and "
                    "only float16 and bfloat16 checkpoints are simulated"
                )
            return _TORCH_DTYPES[name]
    return "bf16"


def resolve_kv_dtype(dtype: object, model_dir: Path, config: Mapping | None = None, *,
                     model_dtype: object = None) -> str:
    """The KV dtype a PyTorch-backend worker ends up with for `kv_cache_config.dtype` = `dtype`.

    Unset or "auto" (the default): the checkpoint's KV quantization, else the model dtype (the top-level
    `dtype` = `model_dtype` when set, else the checkpoint's; `checkpoint_kv_dtype`). "fp8": fp8, overriding the
    checkpoint's KV quantization (TensorRT-LLM warns and goes on). "nvfp4" is accepted by TensorRT-LLM but
    not simulated. Anything else, "bf16" and "fp16" included, fails at start-up in TensorRT-LLM, with the
    text of `trtllm_kv_dtype_error` (raised here as KVFormatError). An invalid `model_dtype` is refused
    whatever `dtype` says (TensorRT-LLM validates both)."""
    if dtype is None or dtype == "auto":
        return checkpoint_kv_dtype(model_dir, config, model_dtype=model_dtype)
    _model_kv_dtype(model_dtype)
    if dtype == "fp8":
        return "fp8"
    if dtype == "nvfp4":
        raise KVFormatError("kv_cache_config.dtype 'nvfp4' is accepted by TensorRT-LLM but not simulated")
    raise KVFormatError(trtllm_kv_dtype_error(dtype))


def _major_version(version: str) -> int:
    match = re.match(r"\s*v?(\d+)", version or "")
    if not match:
        raise KVFormatError(f"cannot parse TensorRT-LLM version {version!r}")
    return int(match.group(1))


def resolve_backend(backend: str | None, env: Mapping[str, str], trtllm_version: str) -> str:
    """The transfer backend a worker really uses.

    `None`/empty means the transceiver is disabled (TensorRT-LLM's message is raised). `DEFAULT` checks
    TRTLLM_USE_UCX_KVCACHE, TRTLLM_USE_NIXL_KVCACHE, TRTLLM_USE_MOONCAKE_KVCACHE, TRTLLM_USE_MPI_KVCACHE in that
    order (the first one set to "1" wins, as in cacheTransceiver.cpp), else the version's built-in default:
    NIXL for TensorRT-LLM >= 1.0, UCX before (Baton's reading of the history; never rely on it, render an
    explicit backend).

    From 1.0 the name is spelt as TensorRT-LLM's `CacheTransceiverConfig.backend` Literal spells it, in
    capitals: pydantic refuses "ucx" at start-up. (Earlier releases spelt the Literal in lower case; for
    them either spelling is taken.)
    """
    if backend is None or str(backend).strip() == "":
        raise KVFormatError(TRANSCEIVER_DISABLED_MESSAGE)
    choices = ("DEFAULT", *BACKENDS)
    name = str(backend).strip().upper()
    if name not in choices or (backend != name and _major_version(trtllm_version) >= 1):
        raise KVFormatError(
            f"unknown cache_transceiver_config.backend {backend!r}: Input should be "
            f"{', '.join(repr(c) for c in choices[:-1])} or {choices[-1]!r} (in capitals)"
        )
    if name in BACKENDS:
        return name
    for var, resolved in _BACKEND_ENV:
        if str(env.get(var, "")).strip() == "1":
            return resolved
    return "NIXL" if _major_version(trtllm_version) >= 1 else "UCX"


def _canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def speculative_string(speculative_config: object) -> str:
    """The canonical `CacheState.speculative` of a speculative_config: compact sorted JSON, "" when none.

    Anything that builds a CacheState by hand must use this, or fingerprints will not match."""
    return _canonical_json(speculative_config) if speculative_config else ""


def _text_config(config: dict) -> dict:
    # Multimodal checkpoints nest the language model's shape under text_config.
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


# layer_types / layers_block_type entries of a layer that holds attention KV (the others: mamba, linear
# attention, convolution, hold none).
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention"})


def _unequal_layers(shape: dict) -> str | None:
    """What in a checkpoint's config makes its layers hold unequal KV, None when every layer holds
    `num_key_value_heads` heads: per-layer head counts (DeciLM / Nemotron-NAS `block_configs`) or layers
    without attention (hybrid Mamba, linear-attention and convolution checkpoints)."""
    if shape.get("block_configs"):
        return "block_configs (per-layer attention, as in DeciLM / Nemotron-NAS checkpoints)"
    if shape.get("hybrid_override_pattern"):
        return "hybrid_override_pattern (Mamba layers, which hold no attention KV)"
    for key in ("layer_types", "layers_block_type"):
        kinds = shape.get(key)
        if isinstance(kinds, list):
            others = sorted({str(kind) for kind in kinds} - _ATTENTION_LAYER_TYPES)
            if others:
                return f"{key} with {', '.join(others)} layers, which hold no attention KV"
    return None


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVFormatError(f"{what} must be a positive integer, got {value!r}")
    return value


def _positive_ints(value: object, what: str) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise KVFormatError(f"{what} must be a list of positive integers, got {value!r}")
    return tuple(value)


# How pydantic (TensorRT-LLM's LLM-API models) reads a `bool` field from a string, case-insensitively.
_TRUE_WORDS = ("1", "on", "t", "true", "y", "yes")
_FALSE_WORDS = ("0", "off", "f", "false", "n", "no")


def option_bool(options: Mapping, key: str, default: bool = False) -> bool:
    """The boolean LLM-API option `key` (`default` when absent), read as TensorRT-LLM's pydantic models read it:
    true/false, 0/1 (integers or floats), or the strings "true"/"false", "yes"/"no", "on"/"off", "t"/"f",
    "y"/"n", "1"/"0" in any case; anything else (null included) raises KVFormatError, as pydantic refuses it
    at start-up. `bool("false")` would be True."""
    if key not in options:
        return default
    value = options[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise KVFormatError(f"{key}: Input should be a valid boolean, unable to interpret input {value!r}")


def _attention_window(max_attention_window: object, num_layers: int) -> tuple[int, ...]:
    """The canonical `CacheState.attention_window` of kv_cache_config.max_attention_window: () when unset.

    TensorRT-LLM repeats the list over the layers (layer i gets entry i % len) and ignores entries beyond the
    layer count; the canonical form is the shortest list that repeats to the same per-layer windows, so [512]
    and [512, 512] are the same window, and [4096, 512] over 32 layers equals [4096, 512, 4096, 512]."""
    if max_attention_window is None:
        return ()
    windows = _positive_ints(max_attention_window, "kv_cache_config.max_attention_window")
    per_layer = [windows[i % len(windows)] for i in range(max(1, num_layers))]
    for period in range(1, len(per_layer) + 1):
        if all(per_layer[i] == per_layer[i % period] for i in range(len(per_layer))):
            return tuple(per_layer[:period])
    return tuple(per_layer)  # not reached: the whole list is a period


def _pp_partition_layers(pp_partition: object, num_hidden_layers: int, pp: int, extra_layers: int = 0) -> tuple[int, ...]:
    """KV layers of each pipeline stage from the LLM-API `pp_partition` (layers per stage), () when unset.

    As TensorRT-LLM's `Mapping.pp_layers` checks it: one entry per stage (`pp`) summing to the model's
    `num_hidden_layers`, else the worker fails at start-up. KV layers that speculative decoding adds (MTP,
    `extra_layers`) go on the last stage, where the draft layers run (Baton's reading)."""
    if pp_partition is None:
        return ()
    stages = _positive_ints(pp_partition, "pp_partition")
    if len(stages) != pp:
        raise KVFormatError(f"pp_partition {list(stages)} has {len(stages)} entries, pipeline_parallel_size is {pp}: "
                            "it needs one layer count per pipeline stage")
    if sum(stages) != num_hidden_layers:
        raise KVFormatError(f"pp_partition {list(stages)} sums to {sum(stages)} layers, the model has "
                            f"{num_hidden_layers} (config.json num_hidden_layers)")
    return (*stages[:-1], stages[-1] + extra_layers)


# config.json keys that name where or by what a checkpoint was saved, not what it is.
_VOLATILE_CONFIG_KEYS = ("transformers_version",)
_IDENTITY_FILES = ("config.json", "hf_quant_config.json")


def checkpoint_identity(model_dir: Path) -> str:
    """A model identity that does not depend on the path the checkpoint is read from.

    TensorRT-LLM never compares model paths (CacheState carries none); Baton compares a model identity
    because weights that differ behind an equal KV layout silently corrupt output. Without an explicit
    identity (the operator's `hf:<id>@<revision>`, the simulator's `--sim-model-identity`), this names the
    checkpoint by its content: sha256 over config.json (and hf_quant_config.json when present), parsed and
    re-serialised canonically, without keys starting with "_" (`_name_or_path` is often a local path) or
    `transformers_version`. `dir`, `dir/` and its absolute path, or the same files mounted elsewhere, get the
    same identity. Raises KVFormatError when config.json cannot be read."""
    parts: dict[str, object] = {}
    for name in _IDENTITY_FILES:
        path = Path(model_dir) / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            if name == "config.json":
                raise KVFormatError(f"{path}: no such file (MODEL_DIR must hold a Hugging Face config.json)") from exc
            continue
        except (OSError, json.JSONDecodeError) as exc:
            raise KVFormatError(f"{path}: cannot read {name}: {exc}") from exc
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        parts[name] = data
    return "checkpoint-sha256:" + hashlib.sha256(_canonical_json(parts).encode("utf-8")).hexdigest()[:16]


def cache_state_from_files(
    model_dir: Path,
    llm_api_options: dict,
    *,
    trtllm_version: str,
    env: Mapping[str, str] | None = None,
    tp: int | None = None,
    pp: int | None = None,
    model_identity: str | None = None,
    beam_width: int | None = None,
) -> CacheState:
    """Derive a worker's CacheState the way trtllm-serve would from MODEL_DIR/config.json and its YAML.

    - Shape: `num_hidden_layers`, `num_key_value_heads` (default `num_attention_heads`), `head_dim` (else
      `hidden_size // num_attention_heads`). MLA (`kv_lora_rank` set): kv_factor 1, one KV head, head size
      `kv_lora_rank + qk_rope_head_dim`. MTP speculative decoding adds `num_nextn_predict_layers` KV layers.
    - YAML (`llm_api_options`, the parsed --extra_llm_api_options/--config): `kv_cache_config.dtype` ("auto",
      the default, or "fp8"; resolved by `resolve_kv_dtype`: "auto" gives the checkpoint's KV quantization,
      else the top-level `dtype` (the model dtype) when set, else the checkpoint's dtype; explicit
      "bf16"/"fp16" fail with TensorRT-LLM's start-up error), `kv_cache_config.tokens_per_block` (default
      32), `kv_cache_config.max_attention_window` (`_attention_window`), `cache_transceiver_config.backend`
      (required; DEFAULT resolved by `resolve_backend`), `tensor_parallel_size`, `pipeline_parallel_size`,
      `pp_partition` (`_pp_partition_layers`), `context_parallel_size`, `enable_attention_dp` (read by
      `option_bool`), `speculative_config`, `max_beam_width`.
    - `tp`/`pp`/`beam_width` are the command-line `--tp_size`/`--pp_size`/`--max_beam_width`; as in
      trtllm-serve (the extra LLM-API options are applied over the command-line arguments) the YAML's
      `tensor_parallel_size`/`pipeline_parallel_size`/`max_beam_width` win when they are set.
    - `model_identity` names the weights (see `checkpoint_identity`); "" when not given.

    Raises KVFormatError (a ValueError) with a readable message when something is missing or unsupported.
    """
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise KVFormatError(f"{config_path}: no such file (MODEL_DIR must hold a Hugging Face config.json)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise KVFormatError(f"{config_path}: cannot read config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise KVFormatError(f"{config_path}: expected a JSON object")
    options = llm_api_options or {}
    if not isinstance(options, dict):
        raise KVFormatError("the LLM-API options must be a mapping (YAML object)")
    shape = _text_config(config)
    unequal = _unequal_layers(shape)
    if unequal:
        raise KVFormatError(
            f"{config_path}: {unequal}: models whose layers hold unequal KV are not simulated (the layout "
            "assumes num_hidden_layers layers of num_key_value_heads KV heads each)"
        )

    num_layers = _positive_int(shape.get("num_hidden_layers"), "config.json num_hidden_layers")
    num_heads = shape.get("num_attention_heads")
    if shape.get("kv_lora_rank") is not None:
        attention_type, kv_factor, num_kv_heads = "MLA", 1, 1
        head_dim = int(shape["kv_lora_rank"]) + int(shape.get("qk_rope_head_dim") or 0)
    else:
        attention_type, kv_factor = "DEFAULT", 2
        num_kv_heads = shape.get("num_key_value_heads") or num_heads
        num_kv_heads = _positive_int(num_kv_heads, "config.json num_key_value_heads/num_attention_heads")
        head_dim = shape.get("head_dim")
        if head_dim is None:
            hidden = _positive_int(shape.get("hidden_size"), "config.json hidden_size")
            head_dim = hidden // _positive_int(num_heads, "config.json num_attention_heads")
        head_dim = _positive_int(head_dim, "config.json head_dim")

    ctc = options.get("cache_transceiver_config")
    if not isinstance(ctc, dict) or not ctc.get("backend"):
        raise KVFormatError(TRANSCEIVER_DISABLED_MESSAGE)
    backend = resolve_backend(ctc.get("backend"), env if env is not None else {}, trtllm_version)

    kv_cfg = options.get("kv_cache_config") or {}
    if not isinstance(kv_cfg, dict):
        raise KVFormatError("kv_cache_config must be a mapping")
    kv_dtype = resolve_kv_dtype(kv_cfg.get("dtype"), Path(model_dir), config, model_dtype=options.get("dtype"))
    tokens_per_block = _positive_int(
        kv_cfg.get("tokens_per_block", DEFAULT_TOKENS_PER_BLOCK), "kv_cache_config.tokens_per_block"
    )

    spec = options.get("speculative_config") or None
    speculative = speculative_string(spec)
    hidden_layers, extra_layers = num_layers, 0
    if isinstance(spec, dict) and str(spec.get("decoding_type", "")).upper() == "MTP":
        extra_layers = int(spec.get("num_nextn_predict_layers") or 1)
        num_layers += extra_layers

    tp_size = options.get("tensor_parallel_size", tp if tp is not None else 1)
    pp_size = _positive_int(options.get("pipeline_parallel_size", pp if pp is not None else 1),
                            "pipeline_parallel_size")
    return CacheState(
        kv_dtype=kv_dtype,
        tokens_per_block=tokens_per_block,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        attention_type=attention_type,
        kv_factor=kv_factor,
        tp=_positive_int(tp_size, "tensor_parallel_size"),
        pp=pp_size,
        cp=_positive_int(options.get("context_parallel_size", 1), "context_parallel_size"),
        enable_attention_dp=option_bool(options, "enable_attention_dp"),
        transfer_backend=backend,
        trtllm_version=str(trtllm_version),
        speculative=speculative,
        model_identity=model_identity or "",
        beam_width=_positive_int(
            options.get("max_beam_width", beam_width if beam_width is not None else 1), "max_beam_width"
        ),
        attention_window=_attention_window(kv_cfg.get("max_attention_window"), num_layers),
        pp_layers=_pp_partition_layers(options.get("pp_partition"), hidden_layers, pp_size, extra_layers),
    )


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def rule_violations(state: CacheState) -> list[str]:
    """Single-tier rules a worker must satisfy to take part in disaggregated serving; [] when it does."""
    problems: list[str] = []
    if state.kv_dtype not in KV_DTYPES:
        problems.append(
            f"kvCacheDtype must be resolved (one of {', '.join(KV_DTYPES)}), got {state.kv_dtype!r}"
        )
    if state.transfer_backend not in BACKENDS:
        problems.append(
            f"transferBackend must be resolved to one of {', '.join(BACKENDS)}, got {state.transfer_backend!r}"
        )
    for name, value in (("tensorParallelSize", state.tp), ("pipelineParallelSize", state.pp),
                        ("contextParallelSize", state.cp), ("tokensPerBlock", state.tokens_per_block),
                        ("numLayers", state.num_layers), ("numKvHeads", state.num_kv_heads),
                        ("headDim", state.head_dim)):
        if value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    # With attention DP every rank is its own DP group (TP per DP group = 1); otherwise the group is all of TP.
    tp_per_dp = 1 if state.enable_attention_dp else state.tp
    if state.tp >= 1 and not _is_power_of_two(tp_per_dp):
        problems.append(f"TP per DP group must be a power of two, got {tp_per_dp} (tensorParallelSize={state.tp})")
    if state.cp >= 1 and not _is_power_of_two(state.cp):
        problems.append(f"contextParallelSize must be a power of two, got {state.cp}")
    if state.attention_type != "MLA" and state.cp != 1:
        problems.append(
            f"context parallelism is not currently supported for non-MLA models: contextParallelSize must be 1, "
            f"got {state.cp}"
        )
    # TensorRT-LLM splits uneven layer counts (pp_layer_counts); a stage needs at least one layer (Baton).
    if state.pp >= 1 and state.num_layers >= 1 and state.pp > state.num_layers:
        problems.append(
            f"every pipeline stage needs at least one layer: numLayers={state.num_layers}, "
            f"pipelineParallelSize={state.pp}"
        )
    if state.pp_layers and (len(state.pp_layers) != state.pp or sum(state.pp_layers) != state.num_layers
                            or min(state.pp_layers) < 1):
        problems.append(
            f"layers per pipeline stage {list(state.pp_layers)} must be {state.pp} stages of at least one layer "
            f"summing to numLayers={state.num_layers}"
        )
    if any(w < 1 for w in state.attention_window):
        problems.append(f"maxAttentionWindow must hold positive windows, got {list(state.attention_window)}")
    if state.beam_width != 1:
        problems.append(f"Currently, only beam width 1 is supported (maxBeamWidth={state.beam_width})")
    if state.attention_type not in ("DEFAULT", "MLA"):
        problems.append(f"attentionType must be DEFAULT or MLA, got {state.attention_type!r}")
    expected_factor = 1 if state.attention_type == "MLA" else 2
    if state.kv_factor != expected_factor:
        problems.append(f"kvFactor must be {expected_factor} for {state.attention_type} attention, got {state.kv_factor}")
    if state.attention_type == "MLA" and state.num_kv_heads != 1:
        problems.append(f"MLA caches one KV head per layer, got numKvHeads={state.num_kv_heads}")
    return problems


def compare(ctx: CacheState, gen: CacheState) -> list[Mismatch]:
    """Hard-equal fields that differ between a context and a generation worker ([] = compatible).

    TP, PP, attention DP and beam width are not compared (TensorRT-LLM maps TP/PP; the rest are tier rules).
    The layer count compared is the total, as TensorRT-LLM's "only support same number of layers" check
    compares `nbKvHeadsPerLayer.size()`; each side's `attentionLayerNumPerPP` is split from it
    (`pp_layer_counts`), so different PP sizes, even or not, map onto each other.
    """
    return [
        Mismatch(label, getattr(ctx, attr), getattr(gen, attr))
        for attr, label in HARD_EQUAL_FIELDS.items()
        if getattr(ctx, attr) != getattr(gen, attr)
    ]


def trtllm_error(mismatches: list[Mismatch]) -> str:
    """The error a handoff between such workers fails with: TensorRT-LLM's text, then each failing check.

    Starts with "Disagg server does not currently support these cacheState" (TensorRT-LLM's TLLM_CHECK text),
    then "; "-separated checks, each with the field and both values, e.g.
    "only support same number of layers (numLayers: context=80, generation=32)".
    """
    if not mismatches:
        return ""
    checks = []
    for m in mismatches:
        check = _CHECK_TEXT.get(m.field, f"only support same {m.field} (Baton)")
        checks.append(f"{check} ({m.field}: context={_shown(m.context)}, generation={_shown(m.generation)})")
    return f"{TRTLLM_CACHESTATE_ERROR}: " + "; ".join(checks)


def _shown(value: object) -> object:
    # tuple fields (the attention window) as the YAML writes them; () is an unset option
    if isinstance(value, tuple):
        return list(value) if value else "unset"
    return value


def _kv_bytes_per_layer_token(state: CacheState) -> int:
    if state.kv_dtype not in _DTYPE_BYTES:
        raise KVFormatError(f"unknown kv dtype {state.kv_dtype!r}")
    return state.kv_factor * state.num_kv_heads * state.head_dim * _DTYPE_BYTES[state.kv_dtype]


def kv_bytes_per_token(state: CacheState) -> int:
    """KV bytes one token occupies across the whole model: kv_factor x layers x KV heads x head_dim x bytes."""
    return _kv_bytes_per_layer_token(state) * state.num_layers


def replica_kv_bytes_per_token(state: CacheState) -> int:
    """KV bytes one token occupies on all the GPUs of one replica together: `kv_bytes_per_token`, times the
    copies tensor parallelism makes of KV heads it cannot split (each of `tp` ranks holds ceil(heads / tp)
    of them: more ranks than KV heads duplicate them, and MLA's single latent head is on every rank)."""
    heads = max(1, state.num_kv_heads)
    tp = max(1, state.tp)
    return kv_bytes_per_token(state) * tp * -(-heads // tp) // heads


def stage_kv_bytes_per_token(state: CacheState) -> tuple[int, ...]:
    """KV bytes one token occupies on each pipeline stage (global heads, before TP sharding): the stage's
    layers (`attention_layer_num_per_pp`) x kv_factor x KV heads x head_dim x bytes. Sums to
    `kv_bytes_per_token`; with uneven PP the first stages hold more and fill first."""
    per_layer = _kv_bytes_per_layer_token(state)
    return tuple(per_layer * layers for layers in state.attention_layer_num_per_pp)


def fingerprint(state: CacheState) -> str:
    """First 12 hex digits of sha256 over the hard-equal fields: equal fingerprints <=> compare() == [].

    A field of `_FINGERPRINT_OMITTED_AT` at that default value is left out, so adding such a field did not
    change the fingerprint of any layout that does not set it."""
    payload = _canonical_json({
        label: getattr(state, attr) for attr, label in HARD_EQUAL_FIELDS.items()
        if attr not in _FINGERPRINT_OMITTED_AT or getattr(state, attr) != _FINGERPRINT_OMITTED_AT[attr]
    })
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


_FIELD_TYPES = {f.name: f.type for f in fields(CacheState)}
_TUPLE_FIELDS = tuple(name for name, kind in _FIELD_TYPES.items() if kind.startswith("tuple"))


# Fields a peer of an older Baton does not send: their defaults stand in.
_WIRE_OPTIONAL = ("beam_width", "attention_window", "pp_layers")


def to_wire(state: CacheState) -> dict:
    """A JSON-able dict of every field (snake_case keys, as in the dataclass; tuples of integers become JSON
    lists). The fields are scalars or tuples of integers, so a flat copy is enough (dataclasses.asdict's deep
    copy was a few percent of a generation request's CPU: every handoff sends a cache state twice)."""
    wire = {name: getattr(state, name) for name in _FIELD_TYPES}
    for name in _TUPLE_FIELDS:
        wire[name] = list(wire[name])
    return wire


_last_read: tuple[dict[str, object], CacheState] | None = None


def from_wire(d: Mapping[str, object]) -> CacheState:
    """The inverse of `to_wire`; unknown keys are ignored, missing or mistyped ones raise KVFormatError.

    A worker reads the same few cache states over and over (every handoff carries one, every KV pull
    another), so the last one read is kept: a cache state equal to it, with values of the same types
    (`True == 1` in Python, and a boolean is not an integer here), is the same CacheState."""
    global _last_read
    last = _last_read
    if last is not None and d == last[0] and all(type(d[k]) is type(v) for k, v in last[0].items()):
        return last[1]
    if not isinstance(d, Mapping):
        raise KVFormatError("cache state must be a JSON object")
    values: dict[str, object] = {}
    for f in fields(CacheState):
        if f.name not in d:
            if f.name in _WIRE_OPTIONAL:
                continue
            raise KVFormatError(f"cache state is missing {f.name!r}")
        value = d[f.name]
        if f.name in _TUPLE_FIELDS:
            if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int)
                                                           for v in value):
                raise KVFormatError(f"cache state field {f.name!r} must be a list of integers, got {value!r}")
            value = tuple(value)
        if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise KVFormatError(f"cache state field {f.name!r} must be an integer, got {value!r}")
        if f.type == "str" and not isinstance(value, str):
            raise KVFormatError(f"cache state field {f.name!r} must be a string, got {value!r}")
        if f.type == "bool" and not isinstance(value, bool):
            raise KVFormatError(f"cache state field {f.name!r} must be a boolean, got {value!r}")
        values[f.name] = value
    state = CacheState(**values)  # type: ignore[arg-type]
    _last_read = dict(d), state
    return state

