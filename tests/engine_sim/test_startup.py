"""Startup checks (TensorRT-LLM's messages and Baton's stricter rules), command-line aliases, health states."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import pytest
from simproc import LLAMA_8B_FP16, LLAMA_70B, LLAMA_8B, worker_yaml

from baton import kvformat


@pytest.mark.parametrize(
    ("options", "args", "expected"),
    [
        pytest.param(worker_yaml(ctx=True, backend=None), (), kvformat.TRANSCEIVER_DISABLED_MESSAGE,
                     id="no-cache_transceiver_config"),
        pytest.param({**worker_yaml(ctx=True), "cache_transceiver_config": {"max_tokens_in_buffer": 8192}}, (),
                     kvformat.TRANSCEIVER_DISABLED_MESSAGE, id="transceiver-without-backend"),
        pytest.param(None, (), kvformat.TRANSCEIVER_DISABLED_MESSAGE, id="no-yaml-at-all"),
        pytest.param(worker_yaml(ctx=True, dtype="bf16"), (), kvformat.trtllm_kv_dtype_error("bf16"), id="dtype-bf16"),
        pytest.param(worker_yaml(ctx=True, dtype="fp16"), (), kvformat.trtllm_kv_dtype_error("fp16"), id="dtype-fp16"),
        pytest.param(worker_yaml(ctx=True), ("--tp_size", "3"), "TP per DP group must be a power of two",
                     id="tp-3"),
        pytest.param(worker_yaml(ctx=True, context_parallel_size=2), (),
                     "context parallelism is not currently supported", id="cp-non-mla"),
        pytest.param(worker_yaml(ctx=True, max_beam_width=2), (), "only beam width 1 is supported", id="beam-2"),
        pytest.param(worker_yaml(ctx=True), ("--backend", "trt"), "models the pytorch backend", id="trt-backend"),
        pytest.param(worker_yaml(ctx=True, cache_transceiver_config={"max_tokens_in_buffer": 1000}), (),
                     "Assertion failed: maxNumTokens.value() % tokensPerBlock == 0", id="buffer-not-whole-blocks"),
        # Llama-3-8B has 32 layers: pp_partition needs one entry per stage, summing to them
        pytest.param(worker_yaml(ctx=True, pipeline_parallel_size=2, pp_partition=[30, 1, 1]), (),
                     "pp_partition [30, 1, 1] has 3 entries, pipeline_parallel_size is 2", id="pp_partition-stages"),
        pytest.param(worker_yaml(ctx=True, pipeline_parallel_size=2, pp_partition=[30, 1]), (),
                     "pp_partition [30, 1] sums to 31 layers, the model has 32", id="pp_partition-layers"),
        pytest.param(worker_yaml(ctx=True, enable_chunked_prefill="maybe"), (),
                     "enable_chunked_prefill: Input should be a valid boolean", id="bool-chunked-prefill"),
        pytest.param(worker_yaml(ctx=True, disable_overlap_scheduler="sometimes"), (),
                     "disable_overlap_scheduler: Input should be a valid boolean", id="bool-overlap"),
        pytest.param(worker_yaml(ctx=True, enable_attention_dp="nope"), (),
                     "enable_attention_dp: Input should be a valid boolean", id="bool-attention-dp"),
        pytest.param(worker_yaml(ctx=True, model_dtype="float32"), (),
                     "dtype 'float32' is accepted by TensorRT-LLM but not simulated", id="model-dtype-float32"),
        pytest.param(worker_yaml(ctx=True, model_dtype="fp16"), (),
                     "dtype must be one of auto, float16, bfloat16, float32, got 'fp16'", id="model-dtype-fp16"),
    ],
)
def test_startup_failures(fresh_engines, options, args, expected):
    code, output = fresh_engines.run_to_exit(options, *args)
    assert code == 1
    assert expected in output


def test_explicit_bf16_kv_dtype_fails_with_trtllm_text_verbatim(fresh_engines):
    """The PyTorch backend accepts kv_cache_config.dtype auto, fp8 (and nvfp4) only; validate_and_set_kv_cache_quant
    raises this ValueError at start-up for anything else."""
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=False, dtype="bf16"))
    assert code == 1
    assert ('Overriding KV cache quantization with an invalid type "llm_args.KvCacheConfig.dtype="bf16" '
            """Accepted types are "('fp8', 'nvfp4', 'auto')".""") in output


@pytest.mark.parametrize(("model", "dtype", "expected"), [
    (LLAMA_8B, "auto", "bf16"),  # torch_dtype bfloat16
    (LLAMA_8B, None, "bf16"),  # unset: TensorRT-LLM's default is auto
    (LLAMA_8B_FP16, "auto", "fp16"),  # torch_dtype float16
    (LLAMA_8B, "fp8", "fp8"),  # explicit fp8 overrides the checkpoint
])
def test_auto_kv_dtype_resolves_from_the_checkpoint(tmp_path, model, dtype, expected):
    from baton.engine_sim import config

    cfg = load(tmp_path, model, worker_yaml(ctx=True, dtype=dtype))
    assert cfg.cache_state.kv_dtype == expected
    assert config.describe(cfg)["cache_state"]["kv_dtype"] == expected
    assert config.describe(cfg)["kv_bytes_per_token"] == (65_536 if expected == "fp8" else 131_072)


@pytest.mark.parametrize(("model", "model_dtype", "dtype", "expected"), [
    (LLAMA_8B, "float16", "auto", "fp16"),  # a bfloat16 checkpoint run in float16: its KV cache is fp16
    (LLAMA_8B, "float16", None, "fp16"),
    (LLAMA_8B_FP16, "bfloat16", "auto", "bf16"),
    (LLAMA_8B_FP16, "auto", "auto", "fp16"),  # auto: the checkpoint's
    (LLAMA_8B, "float16", "fp8", "fp8"),  # an explicit KV dtype wins
])
def test_the_model_dtype_is_the_auto_kv_dtype(tmp_path, model, model_dtype, dtype, expected):
    """kv_cache_config.dtype auto keeps an unquantized KV cache in the model dtype: the LLM-API top-level `dtype`
    when it is set, else the checkpoint's."""
    from baton.engine_sim import config

    cfg = load(tmp_path, model, worker_yaml(ctx=True, dtype=dtype, model_dtype=model_dtype))
    assert cfg.cache_state.kv_dtype == expected
    assert config.describe(cfg)["cache_state"]["kv_dtype"] == expected
    assert config.describe(cfg)["kv_bytes_per_token"] == (65_536 if expected == "fp8" else 131_072)


def test_auto_kv_dtype_of_an_fp8_checkpoint_is_fp8(fresh_engines, tmp_path):
    """An FP8 checkpoint with kv_cache_quant_algo FP8 in hf_quant_config.json caches fp8 under auto: its handle
    carries fp8, and a generation worker with an explicit fp8 on the bf16 checkpoint has the same layout."""
    import json

    hf = json.loads((LLAMA_8B / "config.json").read_text())
    model = model_dir(tmp_path / "llama-8b-fp8", hf, hf_quant_config={
        "producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}})
    eng = fresh_engines.start(worker_yaml(ctx=True, dtype="auto"), "--sim-speed", "0", model=model)
    state = eng.state()
    assert state["cache_state"]["kv_dtype"] == "fp8" and state["kv_bytes_per_token"] == 65_536
    assert state["weight_dtype"] == "fp8"


def test_trtllm_transceiver_message_is_verbatim(fresh_engines):
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=False, backend=None))
    assert code == 1
    assert ("kv_cache_transceiver is disabled, please set 'cache_transceiver_config: backend:<backend_type>` "
            "in config file for disaggregated serving") in output


def test_model_that_does_not_fit_is_refused(fresh_engines):
    # Llama-3-70B in bf16 (~141 GB of weights) on one 80 GB GPU (an H100)
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=True), "--sim-gpu-memory-gb", "80", model=LLAMA_70B)
    assert code == 1 and "model weights (~141 GB in bf16) do not fit in 1 GPU(s) of 80 GB" in output


def test_missing_model_config(fresh_engines, tmp_path):
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=True), model=tmp_path)
    assert code == 1 and "config.json" in output


def test_usage_error_exits_2(fresh_engines):
    code, output = fresh_engines.run_to_exit(worker_yaml(ctx=True), "--sim-no-such-flag")
    assert code == 2 and "unrecognized arguments" in output


def test_extra_llm_api_options_and_default_backend_resolution(fresh_engines, tmp_path):
    import yaml

    cfg = tmp_path / "opts.yaml"
    cfg.write_text(yaml.safe_dump(worker_yaml(ctx=True, backend="DEFAULT")))
    ucx = fresh_engines.start(None, "--extra_llm_api_options", str(cfg), "--sim-speed", "0",
                              env={"TRTLLM_USE_UCX_KVCACHE": "1"})
    nixl = fresh_engines.start(None, "--extra_llm_api_options", str(cfg), "--sim-speed", "0")
    assert ucx.state()["cache_state"]["transfer_backend"] == "UCX"
    assert nixl.state()["cache_state"]["transfer_backend"] == "NIXL"  # 1.2.0's built-in default
    assert ucx.state()["fingerprint"] != nixl.state()["fingerprint"]


def test_tp_size_and_capacity_reported(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=False, kv_cache_config={"max_tokens": 4096}), "--tp_size", "2",
                              "--sim-speed", "0", model=LLAMA_70B)
    state = eng.state()
    assert state["cache_state"]["tp"] == 2 and state["tp_speedup"] == pytest.approx(1.7)
    assert state["max_blocks"] == 4096 // 32
    assert state["kv_bytes_per_token"] == 327_680 and state["timing_model"] == "llama3-70b"


def test_a_disaggregated_workers_cluster_flags_are_accepted(fresh_engines):
    """trtllm-serve worker command lines that join TensorRT-LLM's own router carry these flags; the same
    command line starts the simulator."""
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", "--disagg_cluster_uri", "http://127.0.0.1:9",
                              "--server_role", "context", "--metadata_server_config_file", "/nonexistent.yaml")
    assert eng.get("/health")[0] == 200


def test_loading_then_ready(fresh_engines):
    proc, port, _ = fresh_engines.launch(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-load-seconds", "1.5")
    url = f"http://127.0.0.1:{port}/health"
    saw_loading = False
    end = time.monotonic() + 20
    while time.monotonic() < end:
        assert proc.poll() is None
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
        except urllib.error.HTTPError as err:
            assert err.code == 503
            saw_loading = True
        except OSError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("worker never became ready")
    assert saw_loading


def test_fatal_state_and_fault_injection(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-fail-after", "2")
    assert eng.post("/v1/completions", {"prompt": "one", "max_tokens": 2})[0] == 200
    assert eng.post("/v1/completions", {"prompt": "two", "max_tokens": 2})[0] == 200
    eng.wait_for(lambda: eng.get("/health")[0] == 503, "the injected fatal state")
    # as trtllm-serve once its executor is gone (LLM.generate_async's error, answered like any failed generation)
    status, err = eng.post("/v1/completions", {"prompt": "three", "max_tokens": 2})
    assert status == 400 and err["type"] == "BadRequestError" and err["message"] == "LLM is shutting down"

    other = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0")
    assert other.post("/_sim/fatal", {"reason": "GPU fell off the bus"})[0] == 200
    status, body = other.get("/health")
    assert status == 503 and "GPU fell off the bus" in body
    # trtllm-serve's /health_generate runs a one-token request and answers any failure of it 500
    assert other.get("/health_generate") == (500, "Generation health check failed")
    assert "health_generate_failed" in other.log() and "LLM is shutting down" in other.log()


def test_error_ratio_fails_that_share_of_requests_while_health_stays_ok(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-error-ratio", "0.25")
    statuses = [eng.post("/v1/completions", {"prompt": f"p{i}", "max_tokens": 2}) for i in range(8)]
    failed = [body for status, body in statuses if status == 500]
    assert [status for status, _ in statuses].count(200) == 6 and len(failed) == 2
    assert all(b["type"] == "InternalServerError" and "--sim-error-ratio" in b["message"] for b in failed)
    assert eng.get("/health")[0] == 200


def test_sigterm_exits_cleanly(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0")
    assert re.search(r"listening on http://127\.0\.0\.1:\d+", eng.log())
    eng.proc.send_signal(signal.SIGTERM)
    assert eng.proc.wait(timeout=15) == 0


def test_port_zero_picks_a_free_port(fresh_engines):
    proc, _, log_path = fresh_engines.launch(worker_yaml(ctx=True), "--sim-speed", "0", port=0)
    end = time.monotonic() + 20
    match = None
    while time.monotonic() < end and match is None:
        assert proc.poll() is None, log_path.read_text()
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        time.sleep(0.05)
    assert match and int(match.group(1)) > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/version", timeout=5) as resp:
        assert resp.status == 200


def test_served_model_id_is_the_model_directory_name(fresh_engines, tmp_path, monkeypatch):
    """trtllm-serve serves an existing MODEL directory under its name (`self.model = model_dir.name`), not the
    path it was given; --sim-model-name overrides it."""
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0")
    assert [m["id"] for m in eng.get("/v1/models")[1]["data"]] == ["llama-3-8b"]
    assert eng.complete({"prompt": "hi", "max_tokens": 1})["model"] == "llama-3-8b"
    monkeypatch.chdir(LLAMA_8B.parent)
    for spelling in ("llama-3-8b", "llama-3-8b/", "./llama-3-8b", str(LLAMA_8B) + "/"):
        assert load(tmp_path, spelling, worker_yaml(ctx=True)).model_name == "llama-3-8b"
    assert load(tmp_path, LLAMA_8B, worker_yaml(ctx=True), "--sim-model-name", "/models").model_name == "/models"


def test_model_identity_and_name_options(fresh_engines):
    eng = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", "--sim-model-name", "llama",
                              "--sim-model-identity", "hf:meta-llama/Meta-Llama-3-8B@main")
    assert [m["id"] for m in eng.get("/v1/models")[1]["data"]] == ["llama"]
    state = eng.state()
    assert state["cache_state"]["model_identity"] == "hf:meta-llama/Meta-Llama-3-8B@main"
    expected = kvformat.cache_state_from_files(LLAMA_8B, worker_yaml(ctx=True), trtllm_version="1.2.0", env={},
                                               model_identity="hf:meta-llama/Meta-Llama-3-8B@main")
    assert state["fingerprint"] == kvformat.fingerprint(expected)


# ---------------------------------------------------------------- configuration (in process, no worker started)

TINYLLAMA = {  # TinyLlama-1.1B: 22 layers, 4 KV heads of 64, vocabulary 32,000; no tokenizer.json
    "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
    "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False,
}


def model_dir(path, config: dict, **files: dict):
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (path / f"{name}.json").write_text(json.dumps(content))
    return path


def load(tmp_path, model, options: dict, *args: str):
    import yaml

    from baton.engine_sim import config

    cfg_file = tmp_path / f"opts-{abs(hash((str(model), repr(options), args)))}.yaml"
    cfg_file.write_text(yaml.safe_dump(options))
    return config.load_config([str(model), "--config", str(cfg_file), *args], env={})


# TensorRT-LLM's default KV transfer buffers: 512 MiB each, two send buffers and one receive buffer per GPU.
DEFAULT_TRANSFER_BUFFERS_BYTES_PER_GPU = 3 * 512 * 2**20


# One H200 as nvidia-smi reports it: 143,771 MiB.
H200_BYTES = 143_771 * 2**20


def memory_tokens(cfg_state, hf_config: dict, *, bytes_per_param: float = 2.0, gpus: int = 1,
                  fraction: float = 0.9, gpu_gb: float = H200_BYTES / 1e9, skew: float = 1.0,
                  transfer_bytes: float | None = None) -> int:
    from baton.engine_sim import timing

    weights = timing.estimate_params(timing.shape_from_hf_config(hf_config)) * bytes_per_param
    per_token = kvformat.kv_bytes_per_token(cfg_state) * max(1.0, cfg_state.tp / cfg_state.num_kv_heads)
    if transfer_bytes is None:
        transfer_bytes = DEFAULT_TRANSFER_BUFFERS_BYTES_PER_GPU * gpus
    return int((gpu_gb * 1e9 * gpus - weights * skew - transfer_bytes) * fraction / (per_token * skew))


def test_kv_transfer_buffers_are_allocated_before_the_kv_cache(tmp_path):
    """Every GPU pre-allocates two send buffers and one receive buffer of max_tokens_in_buffer tokens plus one
    block (TensorRT-LLM's CacheTransBufferManager), or of TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE (512MB) when it is
    unset; the KV cache is sized from the memory left."""
    import yaml

    from baton.engine_sim import config

    kv_token = 128 * 1024  # Llama-3-8B, bf16: 2 x 32 layers x 8 KV heads x 128 x 2 bytes
    base = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True))
    assert base.transfer_buffer_tokens == 512 * 2**20 // kv_token == 4096
    assert base.transfer_buffers_bytes == DEFAULT_TRANSFER_BUFFERS_BYTES_PER_GPU
    sized = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, cache_transceiver_config={"max_tokens_in_buffer": 32768}))
    assert sized.transfer_buffer_tokens == 32768 + 32
    assert sized.transfer_buffers_bytes == 3 * (32768 + 32) * kv_token
    assert sized.max_blocks == memory_tokens(sized.cache_state, sized.hf_config,
                                             transfer_bytes=3 * (32768 + 32) * kv_token) // 32
    assert sized.max_blocks < base.max_blocks  # 12.9 GB of buffers instead of 1.6 GB
    assert "GB KV transfer buffers" in sized.kv_capacity_source
    described = config.describe(sized)
    assert described["transfer_buffer_tokens"] == 32800
    assert "max_tokens_in_buffer=32768" in described["transfer_buffer_source"]
    # TP 2: each GPU holds half of every token's KV, so the same 512 MiB holds twice the tokens
    tp2 = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, tensor_parallel_size=2))
    assert tp2.transfer_buffer_tokens == 8192 and tp2.transfer_buffers_bytes == 2 * DEFAULT_TRANSFER_BUFFERS_BYTES_PER_GPU
    # the environment sizes the default buffer and the number of send buffers
    cfg_file = tmp_path / "env.yaml"
    cfg_file.write_text(yaml.safe_dump(worker_yaml(ctx=True)))
    env_cfg = config.load_config([str(LLAMA_8B), "--config", str(cfg_file)], env={
        "TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE": "1GB", "TRTLLM_KVCACHE_SEND_MAX_CONCURRENCY_NUM": "1"})
    assert env_cfg.transfer_buffer_tokens == 8192 and env_cfg.transfer_buffers_bytes == 2 * 2**30
    with pytest.raises(config.StartupError, match="TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE: not a memory size"):
        config.load_config([str(LLAMA_8B), "--config", str(cfg_file)],
                           env={"TRTLLM_KVCACHE_TRANSFER_BUFFER_SIZE": "lots"})


def test_concurrent_kv_receives_have_their_own_receive_buffers(tmp_path):
    """With TRTLLM_REQUEST_KV_CACHE_CONCURRENT=1 each GPU allocates TRTLLM_KVCACHE_RECV_BUFFER_COUNT receive
    buffers (default 2) instead of one (BaseTransBufferManager's mRecvBufferCount), before the KV cache."""
    import yaml

    from baton.engine_sim import config

    cfg_file = tmp_path / "concurrent.yaml"
    cfg_file.write_text(yaml.safe_dump(worker_yaml(ctx=False)))

    def with_env(**env):
        return config.load_config([str(LLAMA_8B), "--config", str(cfg_file)], env=env)

    buffer = 512 * 2**20
    base = with_env()
    assert base.transfer_buffers_bytes == 3 * buffer  # two send buffers, one receive buffer
    concurrent = with_env(TRTLLM_REQUEST_KV_CACHE_CONCURRENT="1")
    assert concurrent.transfer_buffers_bytes == 4 * buffer and concurrent.kv_receive_per_context_worker
    assert concurrent.max_blocks == memory_tokens(concurrent.cache_state, concurrent.hf_config,
                                                  transfer_bytes=4 * buffer) // 32 < base.max_blocks
    assert with_env(TRTLLM_REQUEST_KV_CACHE_CONCURRENT="1",
                    TRTLLM_KVCACHE_RECV_BUFFER_COUNT="3").transfer_buffers_bytes == 5 * buffer
    # the count only applies to concurrent receives
    assert with_env(TRTLLM_KVCACHE_RECV_BUFFER_COUNT="3").transfer_buffers_bytes == 3 * buffer
    with pytest.raises(config.StartupError, match="TRTLLM_KVCACHE_RECV_BUFFER_COUNT must be a whole number"):
        with_env(TRTLLM_REQUEST_KV_CACHE_CONCURRENT="1", TRTLLM_KVCACHE_RECV_BUFFER_COUNT="two")


def test_uneven_pipeline_split_starts_and_its_largest_stage_bounds_capacity(tmp_path):
    from baton.engine_sim import config

    model = model_dir(tmp_path / "tinyllama", TINYLLAMA)
    ctx = load(tmp_path, model, worker_yaml(ctx=True, pipeline_parallel_size=4))
    gen = load(tmp_path, model, worker_yaml(ctx=False, tensor_parallel_size=4))
    assert ctx.cache_state.attention_layer_num_per_pp == (6, 6, 5, 5)
    assert config.describe(ctx)["attention_layer_num_per_pp"] == [6, 6, 5, 5]
    assert kvformat.compare(ctx.cache_state, gen.cache_state) == []
    # the first stages hold 6 of 22 layers (not 5.5): they fill first
    expected = memory_tokens(ctx.cache_state, TINYLLAMA, gpus=4, skew=4 * 6 / 22)
    assert ctx.max_blocks == expected // 32
    assert gen.max_blocks == memory_tokens(gen.cache_state, TINYLLAMA, gpus=4) // 32
    assert ctx.max_blocks < gen.max_blocks
    # an even split is sized as before
    even = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, pipeline_parallel_size=2))
    assert even.max_blocks == memory_tokens(even.cache_state, even.hf_config, gpus=2) // 32


def test_pp_partition_sets_the_layers_of_each_stage_and_the_largest_bounds_capacity(tmp_path):
    from baton.engine_sim import config

    cfg = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, pipeline_parallel_size=2, pp_partition=[30, 2]))
    assert cfg.cache_state.attention_layer_num_per_pp == (30, 2)
    assert config.describe(cfg)["attention_layer_num_per_pp"] == [30, 2]
    # the first stage holds 30 of 32 layers (not 16): it fills first, with its share of the weights
    assert cfg.max_blocks == memory_tokens(cfg.cache_state, cfg.hf_config, gpus=2, skew=2 * 30 / 32) // 32
    even = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, pipeline_parallel_size=2))
    assert even.cache_state.attention_layer_num_per_pp == (16, 16) and cfg.max_blocks < even.max_blocks
    # one GPU of the first stage holds 30 layers of a token's KV: its 512 MiB buffer holds fewer tokens
    assert cfg.transfer_buffer_tokens == 512 * 2**20 // (30 * 4096) < even.transfer_buffer_tokens
    # the split is not part of the KV format
    assert kvformat.compare(cfg.cache_state, even.cache_state) == []


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), ("true", True), ("false", False), ("False", False), ("yes", True), ("no", False),
    ("on", True), ("off", False), ("1", True), ("0", False), (1, True), (0, False),
])
def test_boolean_options_are_read_as_trtllm_reads_them(tmp_path, value, expected):
    """enable_chunked_prefill, disable_overlap_scheduler and enable_attention_dp are pydantic booleans in
    TensorRT-LLM: "false" (a quoted string) is false, not a truthy string."""
    cfg = load(tmp_path, LLAMA_8B, worker_yaml(ctx=False, enable_chunked_prefill=value, disable_overlap_scheduler=value,
                                               enable_attention_dp=value, tensor_parallel_size=2))
    assert cfg.chunked_prefill is expected
    assert cfg.overlap_enabled is not expected
    assert cfg.cache_state.enable_attention_dp is expected


def test_kv_max_tokens_is_capped_by_the_memory_fraction(tmp_path):
    base = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True))
    memory = memory_tokens(base.cache_state, base.hf_config)
    assert base.max_blocks == memory // 32
    huge = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, kv_cache_config={"max_tokens": 100_000_000}))
    assert huge.max_blocks == memory // 32
    assert "below kv_cache_config.max_tokens=100000000" in huge.kv_capacity_source
    small = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, kv_cache_config={"max_tokens": 4096}))
    assert small.max_blocks == 4096 // 32
    assert small.kv_capacity_source.startswith("kv_cache_config.max_tokens=4096")
    half = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, kv_cache_config={
        "max_tokens": 100_000_000, "free_gpu_memory_fraction": 0.45}))
    assert half.max_blocks == memory_tokens(base.cache_state, base.hf_config, fraction=0.45) // 32


def test_max_tokens_does_not_make_weights_fit(tmp_path):
    from baton.engine_sim import config

    with pytest.raises(config.StartupError, match="do not fit"):  # 70B bf16 on one 80 GB GPU
        load(tmp_path, LLAMA_70B, worker_yaml(ctx=True, kv_cache_config={"max_tokens": 4096}),
             "--sim-gpu-memory-gb", "80")


def test_the_default_gpu_is_an_h200_as_nvidia_smi_reports_it(tmp_path):
    """An H200 reports 143,771 MiB (150.75e9 bytes; NVIDIA's "141 GB" is about that in GiB). Llama-3-70B in
    bf16 (~141.1e9 bytes of weights) fits one, leaving a small KV cache, as it does on the real GPU; read as
    141e9 bytes, the GPU could not even hold the weights."""
    from baton.engine_sim import config

    assert config.DEFAULT_GPU_MEMORY_GB * 1e9 == H200_BYTES
    cfg = load(tmp_path, LLAMA_70B, worker_yaml(ctx=True))
    assert cfg.max_blocks == memory_tokens(cfg.cache_state, cfg.hf_config) // 32
    assert 20_000 < cfg.max_blocks * 32 < 25_000  # ~7 GB of KV at 320 KiB per token
    assert "1 x 150.755 GB" in cfg.kv_capacity_source


def test_command_line_max_beam_width_counts(tmp_path):
    from baton.engine_sim import config

    with pytest.raises(config.StartupError, match="only beam width 1 is supported"):
        load(tmp_path, LLAMA_8B, worker_yaml(ctx=True), "--max_beam_width", "4")
    # the YAML is applied over the command line, as for every other CLI/YAML pair
    assert load(tmp_path, LLAMA_8B, worker_yaml(ctx=True, max_beam_width=1), "--max_beam_width", "4") \
        .cache_state.beam_width == 1
    assert load(tmp_path, LLAMA_8B, worker_yaml(ctx=True), "--max_beam_width", "1").cache_state.beam_width == 1


def test_model_path_spelling_is_not_a_different_model(tmp_path, monkeypatch):
    monkeypatch.chdir(LLAMA_8B.parents[3])  # the repository
    spellings = ["tests/data/models/llama-3-8b", "tests/data/models/llama-3-8b/", str(LLAMA_8B)]
    states = [load(tmp_path, p, worker_yaml(ctx=True)).cache_state for p in spellings]
    assert all(kvformat.compare(states[0], s) == [] for s in states)
    assert len({kvformat.fingerprint(s) for s in states}) == 1
    assert states[0].model_identity == kvformat.checkpoint_identity(LLAMA_8B)
    # another checkpoint, or an explicit identity, still differs
    other = load(tmp_path, LLAMA_70B, worker_yaml(ctx=True), "--tp_size", "2").cache_state
    assert [m.field for m in kvformat.compare(states[0], other)] == ["numLayers", "modelIdentity"]
    named = load(tmp_path, LLAMA_8B, worker_yaml(ctx=True), "--sim-model-identity", "other-weights").cache_state
    assert [m.field for m in kvformat.compare(states[0], named)] == ["modelIdentity"]


@pytest.mark.parametrize(
    ("quant", "dtype"),
    [
        ({"config": {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}}, "fp8"),
        ({"config": {"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}}, "fp8"),
        ({"hf_quant_config": {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}}, "fp8"),
        ({"config": {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
            "group_0": {"weights": {"num_bits": 8, "type": "float"}}}}}}, "fp8"),
        ({"hf_quant_config": {"quantization": {"quant_algo": "NVFP4"}}}, "fp4"),
    ],
)
def test_quantized_checkpoint_weights_count_their_bytes(tmp_path, quant, dtype):
    import json

    from baton.engine_sim import config

    hf = {**json.loads((LLAMA_70B / "config.json").read_text()), **quant.get("config", {})}
    files = {"hf_quant_config": quant["hf_quant_config"]} if "hf_quant_config" in quant else {}
    model = model_dir(tmp_path / "llama-70b-quant", hf, **files)
    # 70B in fp8 (~71 GB) or fp4 (~35 GB) leaves most of an H200 to the KV cache (bf16, ~141 GB, leaves ~8 GB)
    cfg = load(tmp_path, model, worker_yaml(ctx=True, dtype="fp8"))
    assert cfg.weight_dtype == dtype and config.describe(cfg)["weight_dtype"] == dtype
    per_param = {"fp8": 1.0, "fp4": 0.5}[dtype]
    assert cfg.max_blocks == memory_tokens(cfg.cache_state, hf, bytes_per_param=per_param) // 32
    assert f"GB {dtype} weights" in cfg.kv_capacity_source


def test_unquantized_weights_stay_bf16(tmp_path):
    from baton.engine_sim import config

    with pytest.raises(config.StartupError, match=r"~141 GB in bf16\) do not fit in 1 GPU\(s\) of 80 GB"):
        load(tmp_path, LLAMA_70B, worker_yaml(ctx=True, dtype="fp8"), "--sim-gpu-memory-gb", "80")
    assert load(tmp_path, LLAMA_8B, worker_yaml(ctx=True)).weight_dtype == "bf16"


def test_estimated_ids_use_the_model_vocabulary(tmp_path):
    from baton import tokens

    model = model_dir(tmp_path / "tinyllama", TINYLLAMA)
    cfg = load(tmp_path, model, worker_yaml(ctx=True))
    assert cfg.vocab_size == 32000
    assert isinstance(cfg.tokenizer, tokens.EstimateTokenizer) and cfg.tokenizer.vocab_size == 32000
    text = "Hello there, how are you doing today?" * 20
    ids = cfg.tokenizer.encode_text(text)
    assert all(0 <= t < 32000 for t in ids) and len(ids) == tokens.count_text_tokens(text)


def test_context_worker_ids_are_valid_for_the_generation_worker(fresh_engines, tmp_path):
    from simproc import handoff

    model = model_dir(tmp_path / "tinyllama", TINYLLAMA)
    ctx = fresh_engines.start(worker_yaml(ctx=True), "--sim-speed", "0", model=model)
    gen = fresh_engines.start(worker_yaml(ctx=False), "--sim-speed", "0", model=model)
    prompt = "Hello there, how are you doing today?"
    ctx_resp, (status, body) = handoff(ctx, gen, {"prompt": prompt, "max_tokens": 8})
    assert status == 200, body
    ids = ctx_resp["prompt_token_ids"]
    assert all(0 <= t < 32000 for t in ids) and len(ids) == ctx_resp["usage"]["prompt_tokens"] == 10
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert ctx.state()["counters"]["heldKvBlocks"] == 0


def test_attention_dp_keeps_each_token_once_so_tp_does_not_shrink_the_cache(tmp_path):
    """With attention data parallelism each TP rank keeps every KV head of its own requests (TensorRT-LLM's
    KV tp_size is 1): a token's KV is held once, not once per rank. TinyLlama's 4 KV heads on TP 8 would
    otherwise be counted twice over."""
    model = model_dir(tmp_path / "tinyllama", TINYLLAMA)
    split = load(tmp_path, model, worker_yaml(ctx=False, tensor_parallel_size=8), "--sim-kv-cache-gib", "8")
    adp = load(tmp_path, model, worker_yaml(ctx=False, tensor_parallel_size=8, enable_attention_dp=True),
               "--sim-kv-cache-gib", "8")
    per_token = kvformat.kv_bytes_per_token(adp.cache_state)  # 22 layers x 4 heads x 64 x 2 (K, V) x 2 bytes
    assert per_token == 22 * 4 * 64 * 2 * 2
    assert adp.max_blocks == int(8 * 2**30 / per_token) // 32
    assert split.max_blocks == int(8 * 2**30 / (per_token * 2)) // 32  # heads duplicated on 8 ranks of 4 heads


@pytest.mark.parametrize(("extra", "named"), [
    ({"block_configs": [{"attention": {"n_heads_in_group": 8}}, {"attention": {"no_op": True}}]}, "block_configs"),
    ({"hybrid_override_pattern": "M-M*-"}, "hybrid_override_pattern"),
    ({"layer_types": ["linear_attention", "full_attention"]}, "layer_types with linear_attention layers"),
    ({"layers_block_type": ["mamba", "attention"]}, "layers_block_type with mamba layers"),
])
def test_models_whose_layers_hold_unequal_kv_are_refused_at_start(tmp_path, extra, named):
    """The layout (and so the handoff check and the KV sizing) assumes every layer holds num_key_value_heads
    heads: a checkpoint with per-layer heads or layers without attention is refused by name, not mis-sized."""
    from baton.engine_sim import config

    model = model_dir(tmp_path / "mixed", {**TINYLLAMA, **extra})
    with pytest.raises(config.StartupError, match=f"{named}.*layers hold unequal KV are not simulated"):
        load(tmp_path, model, worker_yaml(ctx=True))


def test_sliding_window_layers_still_hold_attention_kv(tmp_path):
    model = model_dir(tmp_path / "windowed", {**TINYLLAMA, "layer_types": ["sliding_attention", "full_attention"] * 11})
    assert load(tmp_path, model, worker_yaml(ctx=True)).cache_state.num_layers == 22


@pytest.mark.parametrize(("backend", "version", "accepted"), [
    ("UCX", "1.2.0", True), ("ucx", "1.2.0", False), ("Nixl", "1.0.0", False), ("DEFAULT", "1.2.0", True),
    ("default", "1.2.0", False), ("ucx", "0.20.0", True),
])
def test_backend_is_spelt_as_trtllm_spells_it(tmp_path, backend, version, accepted):
    """TensorRT-LLM 1.x's CacheTransceiverConfig.backend is a Literal in capitals: "ucx" fails at start."""
    from baton.engine_sim import config

    options = worker_yaml(ctx=True, backend=backend)
    if accepted:
        assert load(tmp_path, LLAMA_8B, options, "--sim-trtllm-version", version).cache_state.transfer_backend
    else:
        with pytest.raises(config.StartupError, match=f"backend '{backend}': Input should be 'DEFAULT', 'UCX'"):
            load(tmp_path, LLAMA_8B, options, "--sim-trtllm-version", version)


@pytest.mark.parametrize(("timeout", "accepted"), [(1500, True), (1500.0, True), (1500.5, False), (0, False),
                                                   ("1500", False), (float("inf"), False)])
def test_kv_transfer_timeout_is_a_whole_number_of_milliseconds(tmp_path, timeout, accepted):
    from baton.engine_sim import config

    options = worker_yaml(ctx=True, cache_transceiver_config={"kv_transfer_timeout_ms": timeout})
    if accepted:
        assert load(tmp_path, LLAMA_8B, options).kv_transfer_timeout_s == 1.5
    else:
        with pytest.raises(config.StartupError, match="must be a positive whole number of milliseconds"):
            load(tmp_path, LLAMA_8B, options)
