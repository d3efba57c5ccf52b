"""Command line and configuration of `baton engine-sim`: trtllm-serve's arguments plus `--sim-*` options.

`load_config(argv, env)` parses the arguments, reads MODEL_DIR/config.json and the LLM-API YAML, applies
trtllm-serve's precedence (YAML over command line), derives the worker's CacheState and capacity, and
raises `StartupError` with the same message TensorRT-LLM would print when the worker cannot serve
disaggregated traffic (plus Baton's deliberately stricter rules).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from baton import kvformat, tokens
from baton.engine_sim import timing
from baton.model_tokenizer import TOKENIZER_FILE, ModelTokenizer, TokenizerError, load_tokenizer

GIB = 1024**3
DEFAULT_TRTLLM_VERSION = "1.2.0"
# trtllm-serve / LLM-API defaults the simulator copies.
DEFAULT_MAX_BATCH_SIZE = 2048
DEFAULT_MAX_NUM_TOKENS = 8192
DEFAULT_FREE_GPU_MEMORY_FRACTION = 0.9
DEFAULT_MAX_SEQ_LEN = 8192  # when config.json has no max_position_embeddings
# Simulator assumptions.
# One H200 as nvidia-smi reports it (memory.total 143771 MiB = 150.75e9 bytes = 140.4 GiB), the memory
# TensorRT-LLM's free-memory sizing starts from. NVIDIA's "141 GB" is that in GiB, rounded: read as 10^9 bytes
# it would leave out 9.75 GB.
H200_MEMORY_MIB = 143_771
DEFAULT_GPU_MEMORY_GB = H200_MEMORY_MIB * 2**20 / 1e9  # 150.754820096
DEFAULT_LINK_GBPS = 400.0  # gigabits/s, NDR400 InfiniBand = 50 GB/s
DEFAULT_TP_EFFICIENCY = 0.85
DEFAULT_STATS_MAX = 1000
# TensorRT-LLM's KV transfer staging buffers (CacheTransBufferManager; their counts in BaseTransBufferManager).
# Every GPU of a worker allocates them before its KV cache is sized: TRTLLM_KVCACHE_SEND_MAX_CONCURRENCY_NUM
# send buffers (default 2) and one receive buffer, or TRTLLM_KVCACHE_RECV_BUFFER_COUNT (default 2) with
# TRTLLM_REQUEST_KV_CACHE_CONCURRENT=1; each holds cache_transceiver_config.max_tokens_in_buffer tokens plus
# one block of KV, or TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE bytes (default 512MB) when max_tokens_in_buffer is
# unset. A transfer whose KV does not fit one buffer goes through a buffer allocated for it: slower with UCX, a
# failure with NIXL.
DEFAULT_TRANSFER_BUFFER_SIZE = "512MB"
DEFAULT_SEND_BUFFERS = 2
RECV_BUFFERS = 1
DEFAULT_CONCURRENT_RECV_BUFFERS = 2
DEFAULT_DYNAMIC_BUFFER_MS = 2.0


class StartupError(Exception):
    """The worker cannot start; the message is what trtllm-serve would fail with (or Baton's stricter rule)."""


@dataclass
class SimConfig:
    model_dir: Path
    model_name: str
    host: str
    port: int
    kv_port: int
    advertise_host: str
    options: dict
    hf_config: dict
    trtllm_version: str
    cache_state: kvformat.CacheState
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_input_len: int | None
    overlap_enabled: bool
    chunked_prefill: bool  # enable_chunked_prefill: a prompt longer than max_num_tokens is prefilled in chunks
    tokens_per_block: int
    max_blocks: int
    kv_capacity_source: str
    kv_transfer_timeout_s: float | None
    timing: timing.TimingModel
    time_scale: float
    link_bytes_per_s: float
    load_seconds: float = 0.0
    fail_after: int | None = None
    error_ratio: float = 0.0
    log_level: str = "INFO"
    vocab_size: int = timing.LLAMA3_VOCAB
    iter_stats_max: int = DEFAULT_STATS_MAX
    # MODEL_DIR/tokenizer.json, as trtllm-serve would load it (text prompts counted exactly); else the
    # documented estimate of baton.tokens with ids inside the model's vocab_size (`tokens.EstimateTokenizer`);
    # None: the module-level estimate (Llama-3 vocabulary)
    tokenizer: ModelTokenizer | tokens.EstimateTokenizer | None = None
    perf_metrics_max: int = DEFAULT_STATS_MAX
    # max_tokens of a request that sets none: None = what max_seq_len leaves after the prompt (trtllm-serve 1.x
    # passes None to the worker's _deduce_max_tokens); a number fixes it (lowered as any max_tokens is)
    default_max_tokens: int | None = None
    weight_dtype: str = "bf16"  # what the weight-memory estimate assumes (`weight_format`)
    # Tokens whose KV fits one pre-allocated transfer buffer (per GPU, as TensorRT-LLM sizes it); a transfer of
    # more goes through a dynamically allocated buffer (`Engine.transfer_buffer_check`).
    transfer_buffer_tokens: int = 1 << 62
    transfer_buffer_source: str = ""
    transfer_buffers_bytes: int = 0  # all pre-allocated transfer buffers of the replica (every GPU's)
    # How a generation worker receives KV: one request at a time (TensorRT-LLM's default), or, with
    # TRTLLM_REQUEST_KV_CACHE_CONCURRENT=1, one at a time per context worker, different ones side by side.
    kv_receive_per_context_worker: bool = False
    notes: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton engine-sim",
        description=(
            "A stand-in for `trtllm-serve MODEL --host --port --extra_llm_api_options FILE`: the same command "
            "line, HTTP surface, disaggregated handoff and startup failures, with simulated timing from a "
            "calibration table. Options starting with --sim- are the simulator's own."
        ),
        epilog=(
            "--sim-frontend http|triton (default http): triton serves the same engine behind a real Triton "
            "server (PyTriton, KServe v2 over HTTP and gRPC) instead of the OpenAI endpoints; "
            "`baton engine-sim --sim-frontend triton --help` lists its own options."
        ),
    )
    p.add_argument("model", help="MODEL_DIR holding a Hugging Face config.json; also the served model id")
    p.add_argument("--host", default="localhost", help="address to bind (default: localhost)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    p.add_argument(
        "--extra_llm_api_options", "--config", dest="config_file", metavar="FILE",
        help="LLM-API options YAML (trtllm-serve's --extra_llm_api_options, newer name --config)",
    )
    p.add_argument("--tp_size", type=int, default=1, help="tensor parallel size (YAML tensor_parallel_size wins)")
    p.add_argument("--pp_size", type=int, default=1, help="pipeline parallel size (YAML pipeline_parallel_size wins)")
    p.add_argument("--ep_size", type=int, default=None, help="accepted and ignored (MoE expert parallelism)")
    p.add_argument("--backend", default="pytorch", help="only 'pytorch' is simulated (default: pytorch)")
    p.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    p.add_argument("--max_num_tokens", type=int, default=DEFAULT_MAX_NUM_TOKENS)
    p.add_argument("--max_seq_len", type=int, default=None)
    p.add_argument("--max_beam_width", type=int, default=1)
    p.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=DEFAULT_FREE_GPU_MEMORY_FRACTION)
    p.add_argument("--log_level", default=None, help="trtllm-serve log level (maps onto --sim-log-level)")
    p.add_argument("--tokenizer", default=None, help="accepted and ignored (the simulator tokenizes with baton.tokens)")
    p.add_argument("--trust_remote_code", action="store_true", help="accepted and ignored")
    p.add_argument("--num_postprocess_workers", type=int, default=0, help="accepted and ignored")
    p.add_argument("--gpus_per_node", type=int, default=None, help="accepted and ignored")
    # A disaggregated worker's cluster membership (TensorRT-LLM's own router finds workers through it;
    # Baton's scheduler finds them from Kubernetes): accepted so a worker command line runs unchanged.
    p.add_argument("--disagg_cluster_uri", default=None,
                   help="accepted and ignored (the simulator joins no disaggregated cluster)")
    p.add_argument("--server_role", default=None, type=str.upper, choices=["CONTEXT", "GENERATION"],
                   help="accepted and ignored (the older etcd membership's role)")
    p.add_argument("--metadata_server_config_file", default=None, help="accepted and ignored")

    s = p.add_argument_group("simulator options")
    s.add_argument("--sim-timing", metavar="FILE", type=Path, default=None,
                   help="timing table (Baton format or raw calibration/measure.py output); default: the shipped H200 table")
    s.add_argument("--sim-timing-model", metavar="NAME", default=None,
                   help="use this table model instead of the nearest one by parameter count")
    s.add_argument("--sim-speed", metavar="X", type=float, default=1.0,
                   help="time scale: every modelled delay is multiplied by X (1 = calibrated, 0 = no delays)")
    s.add_argument("--sim-trtllm-version", metavar="V", default=DEFAULT_TRTLLM_VERSION,
                   help=f"TensorRT-LLM version to report and carry in the CacheState (default {DEFAULT_TRTLLM_VERSION})")
    s.add_argument("--sim-link-gbps", metavar="GBIT", type=float, default=DEFAULT_LINK_GBPS,
                   help="KV link rate in gigaBITS per second (default 400 = NDR400 = 50 GB/s)")
    s.add_argument("--sim-dynamic-buffer-ms", metavar="MS", type=float, default=DEFAULT_DYNAMIC_BUFFER_MS,
                   help="extra time a KV transfer takes, on each side, when its KV does not fit the pre-allocated "
                        "transfer buffer and UCX sends it through a buffer allocated for it (an estimate, not "
                        f"measured; default {DEFAULT_DYNAMIC_BUFFER_MS:g})")
    s.add_argument("--sim-tp-efficiency", metavar="E", type=float, default=DEFAULT_TP_EFFICIENCY,
                   help="TP of N divides compute time by N x E (default 0.85)")
    s.add_argument("--sim-gpu-memory-gb", metavar="GB", type=float, default=DEFAULT_GPU_MEMORY_GB,
                   help="memory of one GPU in GB (10^9 bytes; default 150.75 = an H200's 143,771 MiB as "
                        "nvidia-smi reports it)")
    s.add_argument("--sim-kv-cache-gib", metavar="GIB", type=float, default=None,
                   help="KV cache size of the replica, overriding the memory-fraction derivation")
    s.add_argument("--sim-load-seconds", metavar="S", type=float, default=0.0,
                   help="report 503 on /health for S seconds after binding (model loading)")
    s.add_argument("--sim-fail-after", metavar="N", type=int, default=None,
                   help="fault injection: after N finished requests enter the fatal state (/health 503)")
    s.add_argument("--sim-error-ratio", metavar="R", type=float, default=0.0,
                   help="fault injection: answer this fraction (0-1) of completion requests with HTTP 500, "
                        "evenly spread, while /health stays 200 (a bad engine build that still looks healthy)")
    s.add_argument("--sim-kv-port", metavar="PORT", type=int, default=0,
                   help="port of the KV transfer listener, the one handles name (default 0: any free port, as "
                        "UCX and NIXL pick theirs)")
    s.add_argument("--sim-advertise-host", metavar="HOST", default=None,
                   help="host put in the handoff CommState (default: --host, or 127.0.0.1 for a wildcard bind)")
    s.add_argument("--sim-model-name", metavar="NAME", default=None,
                   help="served model id (default: MODEL_DIR's directory name, as trtllm-serve does)")
    s.add_argument("--sim-model-identity", metavar="ID", default=None,
                   help="model identity carried in the CacheState (default: a digest of MODEL_DIR's config.json, "
                        "kvformat.checkpoint_identity; never the path)")
    s.add_argument("--sim-default-max-tokens", metavar="N", type=int, default=None,
                   help="max_tokens when a request does not set it (default: what max_seq_len leaves after the "
                        "prompt, as trtllm-serve)")
    s.add_argument("--sim-log-level", metavar="LEVEL", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    return p


def _read_yaml(path: str | None) -> dict:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise StartupError(f"cannot read LLM-API options file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise StartupError(f"LLM-API options file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StartupError(f"LLM-API options file {path} must hold a YAML mapping")
    return data


def _read_hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StartupError(f"{path}: no such file (MODEL_DIR must hold a Hugging Face config.json)") from exc
    except (OSError, ValueError) as exc:
        raise StartupError(f"{path}: cannot read config.json: {exc}") from exc
    if not isinstance(data, dict):
        raise StartupError(f"{path}: expected a JSON object")
    return data


# Bytes per parameter of quantized checkpoints, by TensorRT-LLM / ModelOpt quant_algo prefix (checked in order).
_QUANT_ALGO_BYTES = (
    ("NO_QUANT", 2.0, "bf16"),
    ("FP8", 1.0, "fp8"),
    ("W8A8", 1.0, "int8"),
    ("W8A16", 1.0, "int8"),
    ("INT8", 1.0, "int8"),
    ("NVFP4", 0.5, "fp4"),
    ("MXFP4", 0.5, "fp4"),
    ("W4A", 0.5, "int4"),
    ("INT4", 0.5, "int4"),
)


def _quant_algo_format(algo: object) -> tuple[float, str] | None:
    if not isinstance(algo, str) or not algo.strip():
        return None
    name = algo.strip().upper()
    for prefix, size, label in _QUANT_ALGO_BYTES:
        if name.startswith(prefix):
            return size, label
    return None


def weight_format(model_dir: Path, hf_config: Mapping) -> tuple[float, str]:
    """(bytes per parameter, label) of the checkpoint's weights, for the memory estimate.

    Quantized checkpoints say so in MODEL_DIR/hf_quant_config.json (ModelOpt: `quantization.quant_algo`, e.g.
    FP8, NVFP4, W4A16_AWQ) or in config.json `quantization_config` (`quant_algo`; `quant_method` fp8 /
    fbgemm_fp8; awq/gptq `bits`; compressed-tensors `config_groups.*.weights.num_bits`). FP8 and INT8 count
    1 byte per parameter, 4-bit formats 0.5; anything else (unquantized) 2 bytes (bf16/fp16). Embeddings and
    norms kept in higher precision are not modelled."""
    quant_file = Path(model_dir) / "hf_quant_config.json"
    if quant_file.is_file():
        try:
            data = json.loads(quant_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StartupError(f"{quant_file}: cannot read hf_quant_config.json: {exc}") from exc
        if isinstance(data, dict):
            quant = data.get("quantization") if isinstance(data.get("quantization"), dict) else data
            found = _quant_algo_format(quant.get("quant_algo"))
            if found:
                return found
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict):
        text = hf_config.get("text_config")
        qc = text.get("quantization_config") if isinstance(text, dict) else None
    if isinstance(qc, dict):
        found = _quant_algo_format(qc.get("quant_algo"))
        if found:
            return found
        method = str(qc.get("quant_method") or "").lower()
        if method in ("fp8", "fbgemm_fp8"):
            return 1.0, "fp8"
        bits, kind = qc.get("bits"), "int"  # awq, gptq
        groups = qc.get("config_groups")
        if bits is None and isinstance(groups, dict):  # compressed-tensors
            weights = next((g["weights"] for g in groups.values()
                            if isinstance(g, dict) and isinstance(g.get("weights"), dict)), {})
            bits, kind = weights.get("num_bits"), "fp" if weights.get("type") == "float" else "int"
        if bits in (8, 4):
            return bits / 8, f"{kind}{bits}"
    return 2.0, "bf16"


def _int_option(options: Mapping, key: str, fallback: int | None) -> int | None:
    value = options.get(key)
    if value is None:
        return fallback
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StartupError(f"{key} must be a positive integer, got {value!r}")
    return value


def load_config(argv: list[str], env: Mapping[str, str] | None = None) -> SimConfig:
    """Parse argv (SystemExit on usage errors) and build the worker's configuration (StartupError)."""
    args = build_parser().parse_args(argv)
    env = dict(os.environ if env is None else env)
    if str(args.backend).lower() != "pytorch":
        raise StartupError(f"--backend {args.backend!r} is not simulated; the engine simulator models the pytorch backend")
    if args.sim_speed < 0:
        raise StartupError("--sim-speed must be >= 0")
    if not 0 <= args.sim_kv_port <= 65535:
        raise StartupError("--sim-kv-port must be a port number (0 = any free port)")
    if args.sim_link_gbps <= 0:
        raise StartupError("--sim-link-gbps must be > 0")
    if not 0 < args.sim_tp_efficiency <= 1:
        raise StartupError("--sim-tp-efficiency must be in (0, 1]")
    if args.sim_dynamic_buffer_ms < 0:
        raise StartupError("--sim-dynamic-buffer-ms must be >= 0")

    model_dir = Path(args.model)
    model_name = args.sim_model_name or served_model_id(args.model)
    options = _read_yaml(args.config_file)
    hf_config = _read_hf_config(model_dir)
    version = args.sim_trtllm_version

    try:
        # TensorRT-LLM compares no model path; Baton's identity names the checkpoint by content unless given.
        identity = args.sim_model_identity or kvformat.checkpoint_identity(model_dir)
        state = kvformat.cache_state_from_files(
            model_dir, options, trtllm_version=version, env=env, tp=args.tp_size, pp=args.pp_size,
            model_identity=identity, beam_width=args.max_beam_width,
        )
    except kvformat.KVFormatError as exc:
        raise StartupError(str(exc)) from exc
    problems = kvformat.rule_violations(state)
    if problems:
        raise StartupError("invalid configuration for disaggregated serving: " + "; ".join(problems))

    max_batch_size = _int_option(options, "max_batch_size", args.max_batch_size)
    max_num_tokens = _int_option(options, "max_num_tokens", args.max_num_tokens)
    text_cfg = hf_config.get("text_config") if "num_hidden_layers" not in hf_config else hf_config
    text_cfg = text_cfg if isinstance(text_cfg, dict) else hf_config
    model_max_len = text_cfg.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN
    max_seq_len = _int_option(options, "max_seq_len", args.max_seq_len or int(model_max_len))
    max_input_len = _int_option(options, "max_input_len", None)
    try:
        overlap_enabled = not kvformat.option_bool(options, "disable_overlap_scheduler")
        chunked_prefill = kvformat.option_bool(options, "enable_chunked_prefill")
    except kvformat.KVFormatError as exc:
        raise StartupError(str(exc)) from exc

    # Timing.
    try:
        table = timing.load_table(args.sim_timing)
        timing_model = timing.build_timing_model(
            table, hf_config, tp=state.tp, tp_efficiency=args.sim_tp_efficiency, time_scale=args.sim_speed,
            link_bytes_per_s=args.sim_link_gbps * 1e9 / 8, model_name=args.sim_timing_model,
            dynamic_buffer_ms=args.sim_dynamic_buffer_ms,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"cannot load the timing table: {type(exc).__name__}: {exc}") from exc

    # KV capacity, in blocks of tokens_per_block.
    kv_cfg = options.get("kv_cache_config") or {}
    tpb = state.tokens_per_block
    bytes_per_token = kvformat.kv_bytes_per_token(state)
    # Beyond one KV head per rank, heads are duplicated on every rank that needs them; with attention data
    # parallelism each rank keeps all heads of its own requests, and no token's KV is held twice.
    if state.enable_attention_dp:
        dup = 1.0
    else:
        dup = max(1.0, state.tp / state.num_kv_heads) if state.attention_type != "MLA" else float(state.tp)
    replica_bytes_per_token = bytes_per_token * dup
    gpus = state.tp * state.pp * state.cp
    # Each pipeline stage has its own GPUs and KV pool; with an uneven split (TensorRT-LLM's
    # attentionLayerNumPerPP) the stage with the most layers fills first and bounds the replica. `skew` is
    # that stage's share of the layers relative to an even split (exactly 1 when PP divides the layers).
    stage_layers = state.attention_layer_num_per_pp
    skew = state.pp * max(stage_layers) / state.num_layers if stage_layers and state.num_layers else 1.0
    bytes_per_param, weight_dtype = weight_format(model_dir, hf_config)
    ctc = options.get("cache_transceiver_config") or {}
    # One GPU's share of a token's KV, what its buffers are sized in: its stage's layers, its TP rank's heads
    # (all of them with attention DP, where each rank serves its own requests); CP ranks each hold whole tokens.
    gpu_bytes_per_token = replica_bytes_per_token * skew / (state.pp * (1 if state.enable_attention_dp else state.tp))
    buffer = transfer_buffers(ctc, tpb, gpu_bytes_per_token, gpus, env)
    if args.sim_kv_cache_gib is not None:
        memory_tokens = int(args.sim_kv_cache_gib * GIB / (replica_bytes_per_token * skew))
        memory_source = f"--sim-kv-cache-gib {args.sim_kv_cache_gib:g}"
    else:
        fraction = kv_cfg.get("free_gpu_memory_fraction", args.kv_cache_free_gpu_memory_fraction)
        weights = timing.estimate_params(timing.shape_from_hf_config(hf_config)) * bytes_per_param
        total = args.sim_gpu_memory_gb * 1e9 * gpus
        # The transfer buffers are allocated before the KV cache is sized (TensorRT-LLM subtracts their
        # pre-allocated size from the memory the KV cache may take).
        free = total - weights * skew
        if free <= 0:
            raise StartupError(
                f"model weights (~{weights / 1e9:.0f} GB in {weight_dtype}) do not fit in {gpus} GPU(s) of "
                f"{args.sim_gpu_memory_gb:g} GB; raise --tp_size/--pp_size or set --sim-kv-cache-gib"
            )
        free -= buffer.total_bytes
        if free <= 0:
            raise StartupError(
                f"model weights (~{weights / 1e9:.0f} GB in {weight_dtype}) and KV transfer buffers "
                f"({buffer.total_bytes / 1e9:.1f} GB, {buffer.source}) do not fit in {gpus} GPU(s) of "
                f"{args.sim_gpu_memory_gb:g} GB; lower cache_transceiver_config.max_tokens_in_buffer, raise "
                "--tp_size/--pp_size or set --sim-kv-cache-gib"
            )
        memory_tokens = int(free * float(fraction) / (replica_bytes_per_token * skew))
        memory_source = (
            f"free_gpu_memory_fraction {float(fraction):g} x ({gpus} x {args.sim_gpu_memory_gb:g} GB - "
            f"{weights / 1e9:.1f} GB {weight_dtype} weights - {buffer.total_bytes / 1e9:.1f} GB KV transfer buffers)"
        )
        if skew != 1.0:
            memory_source += (
                f", largest of {state.pp} pipeline stages {max(stage_layers)}/{state.num_layers} layers"
            )
    if kv_cfg.get("max_tokens") is not None:
        # KvCacheConfig: with max_tokens and free_gpu_memory_fraction both in play, the smaller one wins.
        max_tokens = _int_option(kv_cfg, "max_tokens", None) or 0
        capacity_tokens = min(max_tokens, memory_tokens)
        if max_tokens <= memory_tokens:
            source = f"kv_cache_config.max_tokens={max_tokens} (memory allows {memory_tokens}: {memory_source})"
        else:
            source = f"{memory_source}, below kv_cache_config.max_tokens={max_tokens}"
    else:
        capacity_tokens = memory_tokens
        source = memory_source
    max_blocks = capacity_tokens // tpb
    if max_blocks < 1:
        raise StartupError(f"KV cache holds no block of {tpb} tokens ({source})")

    timeout_ms = ctc.get("kv_transfer_timeout_ms")
    # CacheTransceiverConfig.kv_transfer_timeout_ms: Optional[int], gt=0 (pydantic takes 1500.0, not 1500.5).
    if timeout_ms is not None and (isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float))
                                   or not float(timeout_ms).is_integer() or timeout_ms <= 0):
        raise StartupError(
            f"cache_transceiver_config.kv_transfer_timeout_ms must be a positive whole number of milliseconds, "
            f"got {timeout_ms!r}"
        )

    advertise = args.sim_advertise_host or args.host
    if advertise in ("0.0.0.0", "::", ""):
        advertise = "127.0.0.1"
    log_level = (args.sim_log_level or args.log_level or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        log_level = "INFO"
    perf_max = options.get("perf_metrics_max_requests") or DEFAULT_STATS_MAX
    iter_max = options.get("iter_stats_max_iterations") or DEFAULT_STATS_MAX
    if args.sim_default_max_tokens is not None and args.sim_default_max_tokens < 1:
        raise StartupError("--sim-default-max-tokens must be >= 1")
    vocab = text_cfg.get("vocab_size") or timing.LLAMA3_VOCAB
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise StartupError(f"{model_dir / 'config.json'}: vocab_size must be a positive integer, got {vocab!r}")
    tokenizer: ModelTokenizer | tokens.EstimateTokenizer
    if (model_dir / TOKENIZER_FILE).is_file():
        try:
            tokenizer = load_tokenizer(model_dir)
        except TokenizerError as exc:
            raise StartupError(f"cannot load the model's tokenizer: {exc}") from exc
    else:
        # The estimate's ids must lie in this model's vocabulary: a context worker's prompt_token_ids are the
        # generation worker's input, checked against [0, vocab_size).
        tokenizer = tokens.EstimateTokenizer(vocab)
    return SimConfig(
        model_dir=model_dir,
        model_name=model_name,
        host=args.host,
        port=args.port,
        kv_port=args.sim_kv_port,
        advertise_host=advertise,
        options=options,
        hf_config=hf_config,
        trtllm_version=version,
        cache_state=state,
        max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        max_num_tokens=max_num_tokens or DEFAULT_MAX_NUM_TOKENS,
        max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN,
        max_input_len=max_input_len,
        overlap_enabled=overlap_enabled,
        chunked_prefill=chunked_prefill,
        tokens_per_block=tpb,
        max_blocks=max_blocks,
        kv_capacity_source=source,
        kv_transfer_timeout_s=(float(timeout_ms) / 1000.0) if timeout_ms is not None else None,
        timing=timing_model,
        time_scale=args.sim_speed,
        link_bytes_per_s=args.sim_link_gbps * 1e9 / 8,
        load_seconds=max(0.0, args.sim_load_seconds),
        fail_after=args.sim_fail_after,
        error_ratio=min(1.0, max(0.0, args.sim_error_ratio)),
        log_level=log_level,
        vocab_size=vocab,
        iter_stats_max=int(iter_max),
        perf_metrics_max=int(perf_max),
        default_max_tokens=args.sim_default_max_tokens,
        tokenizer=tokenizer,
        weight_dtype=weight_dtype,
        transfer_buffer_tokens=buffer.tokens,
        transfer_buffer_source=buffer.source,
        transfer_buffers_bytes=int(buffer.total_bytes),
        kv_receive_per_context_worker=request_kv_cache_concurrent(env),
    )


def served_model_id(model: str) -> str:
    """The model id trtllm-serve serves for its MODEL argument: the directory's name when MODEL is an existing
    directory (`self.model = model_dir.name` in OpenAIServer), else MODEL as given (a Hugging Face id)."""
    path = Path(model)
    return path.name if path.is_dir() else model


def request_kv_cache_concurrent(env: Mapping[str, str]) -> bool:
    """TRTLLM_REQUEST_KV_CACHE_CONCURRENT=1: a generation worker receives KV from different context workers
    side by side, into TRTLLM_KVCACHE_RECV_BUFFER_COUNT receive buffers."""
    return env.get("TRTLLM_REQUEST_KV_CACHE_CONCURRENT", "").strip() == "1"


def _count_env(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "")
    if text and not text.strip().isdigit():
        raise StartupError(f"{name} must be a whole number, got {text!r}")
    return int(text) if text else default


def describe(cfg: SimConfig) -> dict:
    """A JSON-able summary for the startup log line and GET /_sim/state."""
    return {
        "model": cfg.model_name,
        "trtllm_version": cfg.trtllm_version,
        "cache_state": kvformat.to_wire(cfg.cache_state),
        "fingerprint": kvformat.fingerprint(cfg.cache_state),
        "kv_bytes_per_token": kvformat.kv_bytes_per_token(cfg.cache_state),
        "attention_layer_num_per_pp": list(cfg.cache_state.attention_layer_num_per_pp),
        "weight_dtype": cfg.weight_dtype,
        "overlap_scheduler": cfg.overlap_enabled,
        "max_batch_size": cfg.max_batch_size,
        "max_num_tokens": cfg.max_num_tokens,
        "max_seq_len": cfg.max_seq_len,
        "max_input_len": cfg.max_input_len,
        "tokens_per_block": cfg.tokens_per_block,
        "max_blocks": cfg.max_blocks,
        "kv_capacity_tokens": cfg.max_blocks * cfg.tokens_per_block,
        "kv_capacity_source": cfg.kv_capacity_source,
        "kv_transfer_timeout_ms": None if cfg.kv_transfer_timeout_s is None else cfg.kv_transfer_timeout_s * 1000,
        "transfer_buffer_tokens": cfg.transfer_buffer_tokens,
        "transfer_buffer_source": cfg.transfer_buffer_source,
        "transfer_buffers_bytes": cfg.transfer_buffers_bytes,
        "kv_receive": ("unordered (no modelled time)" if cfg.time_scale <= 0 else "one at a time per context worker"
                       if cfg.kv_receive_per_context_worker else "one at a time"),
        "timing_model": cfg.timing.model.name,
        "timing_param_scale": round(cfg.timing.param_scale, 4),
        "time_scale": cfg.time_scale,
        "link_bytes_per_s": cfg.link_bytes_per_s,
        "tp_speedup": cfg.timing.tp_speedup,
        "tokenizer": cfg.tokenizer.source if cfg.tokenizer is not None else tokens.ESTIMATE_SOURCE,
    }


_MEMORY_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def memory_size(text: str) -> int:
    """A TensorRT-LLM memory size ("512MB", "1GB", "4096"; binary units, as its parseMemorySize reads them)."""
    raw = text.strip().upper()
    number = raw.rstrip("KMGB")
    unit = raw[len(number):]
    if not number.isdigit() or unit not in _MEMORY_UNITS:
        raise ValueError(f"not a memory size: {text!r} (use a number of bytes, or KB, MB, GB)")
    return int(number) * _MEMORY_UNITS[unit]


@dataclass(frozen=True)
class TransferBuffers:
    tokens: int  # tokens whose KV fits one buffer
    total_bytes: float  # every buffer of every GPU of the replica
    source: str


def transfer_buffers(ctc: Mapping, tokens_per_block: int, gpu_bytes_per_token: float, gpus: int,
                     env: Mapping[str, str]) -> TransferBuffers:
    """The KV transfer staging buffers one worker pre-allocates (see DEFAULT_TRANSFER_BUFFER_SIZE), from its
    cache_transceiver_config and environment; `gpu_bytes_per_token` is the KV one GPU holds per token."""
    sends = _count_env(env, "TRTLLM_KVCACHE_SEND_MAX_CONCURRENCY_NUM", DEFAULT_SEND_BUFFERS)
    receives = (_count_env(env, "TRTLLM_KVCACHE_RECV_BUFFER_COUNT", DEFAULT_CONCURRENT_RECV_BUFFERS)
                if request_kv_cache_concurrent(env) else RECV_BUFFERS)
    buffers = sends + receives
    max_tokens = ctc.get("max_tokens_in_buffer")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise StartupError(f"cache_transceiver_config.max_tokens_in_buffer must be a positive integer, "
                               f"got {max_tokens!r}")
        if max_tokens % tokens_per_block:
            # CacheTransBufferManager's TLLM_CHECK, at worker start
            raise StartupError(
                "[TensorRT-LLM][ERROR] Assertion failed: maxNumTokens.value() % tokensPerBlock == 0 "
                f"(cache_transceiver_config.max_tokens_in_buffer {max_tokens} is not a multiple of "
                f"kv_cache_config.tokens_per_block {tokens_per_block})")
        tokens = max_tokens + tokens_per_block  # the buffer holds one block more
        return TransferBuffers(tokens, tokens * gpu_bytes_per_token * buffers * gpus,
                               f"cache_transceiver_config.max_tokens_in_buffer={max_tokens} (+ one block)")
    size_text = env.get("TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE") or DEFAULT_TRANSFER_BUFFER_SIZE
    try:
        size = memory_size(size_text)
    except ValueError as exc:
        raise StartupError(f"TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE: {exc}") from exc
    return TransferBuffers(int(size // gpu_bytes_per_token) if gpu_bytes_per_token > 0 else 0, size * buffers * gpus,
                           f"TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE={size_text} (max_tokens_in_buffer unset)")


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    return math.ceil(tokens / tokens_per_block) if tokens > 0 else 0
