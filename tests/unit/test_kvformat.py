"""baton.kvformat: CacheState derivation, tier rules, pair comparison, TensorRT-LLM's error text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from baton import kvformat
from baton.kvformat import CacheState, Mismatch

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
LLAMA_8B = MODELS / "llama-3-8b"
LLAMA_70B = MODELS / "llama-3-70b"
# copies with torch_dtype float16: kv_cache_config.dtype auto gives an fp16 KV cache
LLAMA_8B_FP16 = MODELS / "llama-3-8b-fp16"
LLAMA_70B_FP16 = MODELS / "llama-3-70b-fp16"


def options(dtype: str | None = "auto", backend: str | None = "UCX", **extra) -> dict:
    opts: dict = {"kv_cache_config": {}, **extra}
    if dtype is not None:
        opts["kv_cache_config"]["dtype"] = dtype
    if backend is not None:
        opts["cache_transceiver_config"] = {"backend": backend}
    return opts


def state(model: Path = LLAMA_70B_FP16, *, version: str = "1.2.0", env: dict | None = None, **kw) -> CacheState:
    tp = kw.pop("tp", None)
    pp = kw.pop("pp", None)
    return kvformat.cache_state_from_files(model, options(**kw), trtllm_version=version, env=env or {}, tp=tp, pp=pp)


# ---------------------------------------------------------------- derivation from files


def test_llama_70b_shape_from_config_json():
    s = state(LLAMA_70B)
    assert (s.num_layers, s.num_kv_heads, s.head_dim) == (80, 8, 128)
    # kv_cache_config.dtype auto: the checkpoint's torch_dtype, bfloat16
    assert (s.attention_type, s.kv_factor, s.kv_dtype, s.tokens_per_block) == ("DEFAULT", 2, "bf16", 32)
    assert (s.tp, s.pp, s.cp, s.enable_attention_dp, s.beam_width) == (1, 1, 1, False, 1)
    assert s.transfer_backend == "UCX" and s.trtllm_version == "1.2.0" and s.speculative == ""


@pytest.mark.parametrize(
    ("model", "dtype", "expected"),
    [
        (LLAMA_70B_FP16, "auto", 327_680),
        (LLAMA_70B, "auto", 327_680),
        (LLAMA_70B, "fp8", 163_840),
        (LLAMA_8B_FP16, "auto", 131_072),
        (LLAMA_8B, "fp8", 65_536),
    ],
)
def test_kv_bytes_per_token(model, dtype, expected):
    assert kvformat.kv_bytes_per_token(state(model, dtype=dtype)) == expected


def test_dtype_aliases_are_normalised():
    assert kvformat.normalize_kv_dtype("float16") == "fp16"
    assert kvformat.normalize_kv_dtype("bfloat16") == "bf16"
    assert kvformat.normalize_kv_dtype("FP8") == "fp8"
    with pytest.raises(kvformat.KVFormatError, match="resolved from the checkpoint"):
        kvformat.normalize_kv_dtype("auto")


@pytest.mark.parametrize("dtype", ["auto", None])
def test_auto_or_missing_dtype_resolves_from_the_checkpoint(dtype):
    """kv_cache_config.dtype auto (TensorRT-LLM's default, also when unset) keeps the checkpoint's KV dtype: its
    torch_dtype when it has no KV quantization."""
    assert state(LLAMA_70B, dtype=dtype).kv_dtype == "bf16"
    assert state(LLAMA_8B_FP16, dtype=dtype).kv_dtype == "fp16"


def write_config(tmp_path: Path, quant: dict | None = None, **changes) -> Path:
    config = json.loads((LLAMA_8B / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if quant is not None:
        (tmp_path / "hf_quant_config.json").write_text(json.dumps(quant))
    return tmp_path


def test_auto_reads_the_checkpoint_dtype_spellings(tmp_path):
    # newer transformers write "dtype"; a checkpoint with neither is taken as bfloat16 (ModelConfig.torch_dtype)
    assert state(write_config(tmp_path, torch_dtype=None, dtype="float16")).kv_dtype == "fp16"
    assert state(write_config(tmp_path, torch_dtype=None)).kv_dtype == "bf16"
    with pytest.raises(kvformat.KVFormatError, match="only float16 and bfloat16 checkpoints are simulated"):
        state(write_config(tmp_path, torch_dtype="float32"))


def test_auto_on_an_fp8_checkpoint_gives_fp8(tmp_path):
    """An FP8 checkpoint whose hf_quant_config.json says kv_cache_quant_algo FP8 caches fp8 under auto; one
    without KV quantization caches in its torch_dtype."""
    fp8_kv = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}
    assert state(write_config(tmp_path, fp8_kv)).kv_dtype == "fp8"
    assert kvformat.kv_bytes_per_token(state(tmp_path)) == 65_536
    weights_only = {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}}
    assert state(write_config(tmp_path, weights_only)).kv_dtype == "bf16"
    (tmp_path / "hf_quant_config.json").unlink()
    embedded = write_config(tmp_path, quantization_config={"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})
    assert state(embedded).kv_dtype == "fp8"
    nvfp4 = write_config(tmp_path, {"quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "NVFP4"}})
    with pytest.raises(kvformat.KVFormatError, match="only FP8 KV cache quantization is simulated"):
        state(nvfp4)
    # an explicit fp8 overrides whatever the checkpoint says (TensorRT-LLM warns and goes on)
    assert state(nvfp4, dtype="fp8").kv_dtype == "fp8"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "float16", "bfloat16", "int8"])
def test_explicit_dtype_other_than_fp8_fails_with_trtllm_text(dtype):
    """The PyTorch backend accepts auto, fp8 (and nvfp4); explicit bf16/fp16 fail at start-up."""
    with pytest.raises(kvformat.KVFormatError) as err:
        state(dtype=dtype)
    assert str(err.value) == (
        f'Overriding KV cache quantization with an invalid type "llm_args.KvCacheConfig.dtype="{dtype}" '
        """Accepted types are "('fp8', 'nvfp4', 'auto')".""")
    assert str(err.value) == kvformat.trtllm_kv_dtype_error(dtype)


def test_nvfp4_is_accepted_by_trtllm_but_not_simulated():
    with pytest.raises(kvformat.KVFormatError, match="nvfp4.*not simulated"):
        state(dtype="nvfp4")


def test_missing_transceiver_config_uses_trtllm_message():
    with pytest.raises(kvformat.KVFormatError) as err:
        state(backend=None)
    assert str(err.value) == kvformat.TRANSCEIVER_DISABLED_MESSAGE
    assert str(err.value).startswith("kv_cache_transceiver is disabled, please set 'cache_transceiver_config: backend:")


def test_yaml_options_are_read():
    opts = options(
        dtype="fp8",
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        enable_attention_dp=True,
        max_beam_width=1,
        speculative_config={"max_draft_len": 3, "decoding_type": "Eagle"},
    )
    opts["kv_cache_config"]["tokens_per_block"] = 64
    s = kvformat.cache_state_from_files(LLAMA_70B, opts, trtllm_version="1.1.0", env={}, model_identity="llama")
    assert (s.tp, s.pp, s.enable_attention_dp, s.tokens_per_block, s.kv_dtype) == (4, 2, True, 64, "fp8")
    assert s.speculative == '{"decoding_type":"Eagle","max_draft_len":3}'
    assert s.model_identity == "llama"


def test_command_line_tp_pp_used_unless_yaml_sets_them():
    assert (state(tp=2, pp=2).tp, state(tp=2, pp=2).pp) == (2, 2)
    s = kvformat.cache_state_from_files(
        LLAMA_70B, options(tensor_parallel_size=8), trtllm_version="1.2.0", env={}, tp=2
    )
    assert s.tp == 8  # trtllm-serve applies the YAML over the command line


def test_command_line_beam_width_used_unless_yaml_sets_it():
    def beam(cli, **yaml_opts):
        return kvformat.cache_state_from_files(
            LLAMA_8B, options(**yaml_opts), trtllm_version="1.2.0", env={}, beam_width=cli
        ).beam_width

    assert beam(None) == 1
    assert beam(4) == 4  # --max_beam_width 4 counts
    assert beam(4, max_beam_width=1) == 1  # the YAML is applied over the command line
    assert beam(None, max_beam_width=2) == 2
    s = kvformat.cache_state_from_files(LLAMA_8B, options(), trtllm_version="1.2.0", env={}, beam_width=4)
    assert any("only beam width 1" in p for p in kvformat.rule_violations(s))


def test_head_dim_and_kv_heads_fall_back(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 12, "num_attention_heads": 16, "hidden_size": 2048,
    }))
    s = kvformat.cache_state_from_files(tmp_path, options(), trtllm_version="1.2.0", env={})
    assert (s.num_kv_heads, s.head_dim) == (16, 128)


def test_mla_model_detected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "hidden_size": 7168,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64,
    }))
    s = kvformat.cache_state_from_files(tmp_path, options(dtype="fp8"), trtllm_version="1.2.0", env={})
    assert (s.attention_type, s.kv_factor, s.num_kv_heads, s.head_dim) == ("MLA", 1, 1, 576)
    assert kvformat.kv_bytes_per_token(s) == 61 * 576
    assert kvformat.rule_violations(s) == []


def test_mtp_adds_kv_layers(tmp_path):
    opts = options(speculative_config={"decoding_type": "MTP", "num_nextn_predict_layers": 2})
    assert kvformat.cache_state_from_files(LLAMA_8B, opts, trtllm_version="1.2.0", env={}).num_layers == 34


def test_missing_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(kvformat.KVFormatError, match="config.json"):
        kvformat.cache_state_from_files(tmp_path, options(), trtllm_version="1.2.0", env={})


# ---------------------------------------------------------------- backend resolution


@pytest.mark.parametrize(
    ("env", "version", "expected"),
    [
        ({}, "1.2.0", "NIXL"),
        ({}, "1.0.0rc3", "NIXL"),
        ({}, "0.21.0", "UCX"),
        ({"TRTLLM_USE_UCX_KVCACHE": "1"}, "1.2.0", "UCX"),
        ({"TRTLLM_USE_NIXL_KVCACHE": "1"}, "0.20.0", "NIXL"),
        ({"TRTLLM_USE_MOONCAKE_KVCACHE": "1"}, "1.2.0", "MOONCAKE"),
        ({"TRTLLM_USE_MPI_KVCACHE": "1"}, "1.2.0", "MPI"),
        ({"TRTLLM_USE_UCX_KVCACHE": "1", "TRTLLM_USE_NIXL_KVCACHE": "1"}, "1.2.0", "UCX"),  # UCX checked first
        ({"TRTLLM_USE_NIXL_KVCACHE": "1", "TRTLLM_USE_MPI_KVCACHE": "1"}, "0.21.0", "NIXL"),
        ({"TRTLLM_USE_UCX_KVCACHE": "0"}, "1.2.0", "NIXL"),  # only "1" switches a backend on
    ],
)
def test_default_backend_resolution(env, version, expected):
    assert kvformat.resolve_backend("DEFAULT", env, version) == expected


def test_explicit_backend_ignores_env():
    assert kvformat.resolve_backend("UCX", {"TRTLLM_USE_NIXL_KVCACHE": "1"}, "1.2.0") == "UCX"
    assert kvformat.resolve_backend("MOONCAKE", {}, "1.2.0") == "MOONCAKE"


def test_backend_errors():
    with pytest.raises(kvformat.KVFormatError, match="kv_cache_transceiver is disabled"):
        kvformat.resolve_backend(None, {}, "1.2.0")
    with pytest.raises(kvformat.KVFormatError, match="unknown cache_transceiver_config.backend"):
        kvformat.resolve_backend("TCP", {}, "1.2.0")
    with pytest.raises(kvformat.KVFormatError, match="Input should be 'DEFAULT', 'UCX', 'NIXL', 'MPI' or 'MOONCAKE'"):
        kvformat.resolve_backend("nixl", {}, "1.2.0")


def test_cache_state_resolves_default_backend_through_env():
    assert state(backend="DEFAULT", env={"TRTLLM_USE_UCX_KVCACHE": "1"}).transfer_backend == "UCX"
    assert state(backend="DEFAULT").transfer_backend == "NIXL"
    assert state(backend="DEFAULT", version="0.21.0").transfer_backend == "UCX"


# ---------------------------------------------------------------- single-tier rules


def test_valid_state_has_no_violations():
    assert kvformat.rule_violations(state(tp=4, pp=2)) == []


@pytest.mark.parametrize("tp", [3, 6, 12])
def test_tp_must_be_power_of_two(tp):
    problems = kvformat.rule_violations(state(tp=tp))
    assert any("TP per DP group must be a power of two" in p for p in problems)


def test_attention_dp_makes_tp_per_group_one():
    s = dataclasses.replace(state(), tp=6, enable_attention_dp=True)
    assert not any("power of two" in p for p in kvformat.rule_violations(s))


def test_cp_rules():
    non_mla = dataclasses.replace(state(), cp=2)
    assert any("context parallelism is not currently supported" in p for p in kvformat.rule_violations(non_mla))
    mla = dataclasses.replace(state(), attention_type="MLA", kv_factor=1, num_kv_heads=1, cp=3)
    problems = kvformat.rule_violations(mla)
    assert any("contextParallelSize must be a power of two" in p for p in problems)
    assert kvformat.rule_violations(dataclasses.replace(mla, cp=2)) == []


def test_beam_width_and_dtype_rules():
    assert any("only beam width 1" in p for p in kvformat.rule_violations(dataclasses.replace(state(), beam_width=2)))
    assert any("kvCacheDtype must be resolved" in p for p in kvformat.rule_violations(dataclasses.replace(state(), kv_dtype="auto")))


def tinyllama(tmp_path: Path) -> Path:
    """TinyLlama-1.1B's shape: 22 layers, 4 KV heads of 64, vocabulary 32,000 (TensorRT-LLM's ctxpp4_gentp4 model)."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 5632,
        "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4, "vocab_size": 32000,
    }))
    return tmp_path


@pytest.mark.parametrize(
    ("layers", "pp", "expected"),
    [
        (22, 4, (6, 6, 5, 5)),  # TinyLlama, TensorRT-LLM's tested ctxpp4_gentp4 pair
        (80, 3, (27, 27, 26)),
        (61, 4, (16, 15, 15, 15)),
        (32, 2, (16, 16)),
        (32, 1, (32,)),
        (2, 4, (1, 1, 0, 0)),
    ],
)
def test_pp_layer_counts_give_the_first_stages_the_extra_layers(layers, pp, expected):
    # tensorrt_llm.mapping.Mapping.pp_layers: torch.tensor_split, "first n ranks get one extra layer"
    assert kvformat.pp_layer_counts(layers, pp) == expected
    assert sum(expected) == layers


def test_uneven_pipeline_split_is_valid():
    s = state(LLAMA_70B, pp=3)
    assert kvformat.rule_violations(s) == []
    assert s.attention_layer_num_per_pp == (27, 27, 26)
    assert state(LLAMA_70B, pp=4).attention_layer_num_per_pp == (20, 20, 20, 20)


def test_tinyllama_ctxpp4_gentp4_pair_is_compatible(tmp_path):
    model = tinyllama(tmp_path)
    ctx = kvformat.cache_state_from_files(model, options(pipeline_parallel_size=4), trtllm_version="1.2.0", env={})
    gen = kvformat.cache_state_from_files(model, options(tensor_parallel_size=4), trtllm_version="1.2.0", env={})
    assert kvformat.rule_violations(ctx) == [] and kvformat.rule_violations(gen) == []
    assert (ctx.attention_layer_num_per_pp, gen.attention_layer_num_per_pp) == ((6, 6, 5, 5), (22,))
    assert kvformat.compare(ctx, gen) == [] and kvformat.fingerprint(ctx) == kvformat.fingerprint(gen)
    # per stage: 2 (K+V) x 4 heads x 64 x 2 bytes = 1 KiB per layer
    assert kvformat.stage_kv_bytes_per_token(ctx) == (6144, 6144, 5120, 5120)
    assert kvformat.stage_kv_bytes_per_token(gen) == (22528,)
    assert sum(kvformat.stage_kv_bytes_per_token(ctx)) == kvformat.kv_bytes_per_token(ctx) == 22528


def test_a_pipeline_stage_without_layers_is_a_violation():
    s = dataclasses.replace(state(LLAMA_8B), pp=64)
    assert any("every pipeline stage needs at least one layer" in p for p in kvformat.rule_violations(s))
    assert kvformat.rule_violations(dataclasses.replace(s, pp=32)) == []


def test_unresolved_backend_is_a_violation():
    assert any("transferBackend" in p for p in kvformat.rule_violations(dataclasses.replace(state(), transfer_backend="DEFAULT")))


# ---------------------------------------------------------------- pair comparison

HARD = {
    "kv_dtype": ("fp8", "kvCacheDtype"),
    "tokens_per_block": (64, "tokensPerBlock"),
    "num_layers": (32, "numLayers"),
    "num_kv_heads": (4, "numKvHeads"),
    "head_dim": (64, "headDim"),
    "attention_type": ("MLA", "attentionType"),
    "kv_factor": (1, "kvFactor"),
    "cp": (2, "contextParallelSize"),
    "transfer_backend": ("NIXL", "transferBackend"),
    "trtllm_version": ("1.1.0", "trtllmVersion"),
    "speculative": ('{"decoding_type":"Eagle"}', "speculativeConfig"),
    "model_identity": ("other-model", "modelIdentity"),
    "attention_window": ((512,), "maxAttentionWindow"),
}


def test_hard_field_table_covers_every_compared_field():
    assert set(HARD) == set(kvformat.HARD_EQUAL_FIELDS)


@pytest.mark.parametrize("attr", sorted(HARD))
def test_each_hard_field_mismatch_reports_both_values(attr):
    ctx = state()
    value, label = HARD[attr]
    gen = dataclasses.replace(ctx, **{attr: value})
    assert kvformat.compare(ctx, gen) == [Mismatch(label, getattr(ctx, attr), value)]
    assert kvformat.compare(gen, ctx) == [Mismatch(label, value, getattr(ctx, attr))]
    assert kvformat.fingerprint(ctx) != kvformat.fingerprint(gen)


@pytest.mark.parametrize(
    "change", [{"tp": 4}, {"pp": 2}, {"tp": 8, "pp": 2}, {"enable_attention_dp": True}, {"beam_width": 2}]
)
def test_tp_pp_and_tier_settings_may_differ(change):
    ctx = state()
    gen = dataclasses.replace(ctx, **change)
    assert kvformat.compare(ctx, gen) == []
    assert kvformat.fingerprint(ctx) == kvformat.fingerprint(gen)


def test_compare_lists_every_difference_in_order():
    ctx = state()
    gen = dataclasses.replace(ctx, kv_dtype="fp8", tokens_per_block=64, trtllm_version="1.1.0")
    assert [m.field for m in kvformat.compare(ctx, gen)] == ["kvCacheDtype", "tokensPerBlock", "trtllmVersion"]


def test_trtllm_error_text():
    ctx = state()
    gen = dataclasses.replace(ctx, kv_dtype="fp8", num_layers=32, tokens_per_block=64)
    text = kvformat.trtllm_error(kvformat.compare(ctx, gen))
    assert text.startswith("Disagg server does not currently support these cacheState")
    assert "please check the cacheState of the context and gen executors" in text
    assert "only support same kv cache dtype (kvCacheDtype: context=fp16, generation=fp8)" in text
    assert "only support same number of layers (numLayers: context=80, generation=32)" in text
    assert "only support same tokens per block and size per head (tokensPerBlock: context=32, generation=64)" in text
    assert kvformat.trtllm_error([]) == ""


@pytest.mark.parametrize(
    ("attr", "fragment"),
    [
        ("kv_factor", "only support same kv factor"),
        ("attention_type", "only support same attention type"),
        ("head_dim", "only support same tokens per block and size per head"),
        ("cp", "context parallelism is not currently supported"),
        ("trtllm_version", "TensorRT-LLM version"),
    ],
)
def test_trtllm_error_names_the_failing_check(attr, fragment):
    ctx = state()
    gen = dataclasses.replace(ctx, **{attr: HARD[attr][0]})
    assert fragment in kvformat.trtllm_error(kvformat.compare(ctx, gen))


# ---------------------------------------------------------------- fingerprint and wire form


def test_fingerprint_is_short_and_stable():
    fp = kvformat.fingerprint(state())
    assert len(fp) == 12 and int(fp, 16) >= 0
    assert fp == kvformat.fingerprint(state())


def test_fingerprint_of_an_unchanged_layout_is_unchanged():
    # pinned: operators and schedulers pair tiers by fingerprint, so a release must not move it
    assert kvformat.fingerprint(state()) == "1e0936b4d985"
    assert kvformat.fingerprint(state(LLAMA_8B_FP16, pp=2)) == "ee2eac5c0e8a"
    assert kvformat.fingerprint(state(LLAMA_70B_FP16, pp=3)) == kvformat.fingerprint(state(LLAMA_70B_FP16))
    # kv_cache_config.dtype auto on a bfloat16 checkpoint: the same layout as an explicit bf16 had
    assert kvformat.fingerprint(state(LLAMA_70B)) == kvformat.fingerprint(dataclasses.replace(state(), kv_dtype="bf16"))


def test_checkpoint_identity_does_not_depend_on_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(LLAMA_8B.parent)
    spellings = ["llama-3-8b", "llama-3-8b/", "./llama-3-8b", str(LLAMA_8B), str(LLAMA_8B) + "/"]
    identities = {kvformat.checkpoint_identity(Path(p)) for p in spellings}
    assert len(identities) == 1
    # the same checkpoint mounted elsewhere, even re-saved from another path or transformers version
    config = json.loads((LLAMA_8B / "config.json").read_text())
    copy = tmp_path / "mounted" / "elsewhere"
    copy.mkdir(parents=True)
    (copy / "config.json").write_text(json.dumps(
        {**config, "_name_or_path": "/some/local/dir", "transformers_version": "9.9.9"}, indent=4
    ))
    assert kvformat.checkpoint_identity(copy) in identities
    # a different checkpoint is a different model
    assert kvformat.checkpoint_identity(LLAMA_70B) not in identities
    (copy / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    assert kvformat.checkpoint_identity(copy) not in identities
    with pytest.raises(kvformat.KVFormatError, match="config.json"):
        kvformat.checkpoint_identity(tmp_path)


def test_fingerprint_equality_iff_compatible():
    base = state()
    variants = [base] + [dataclasses.replace(base, **{a: v}) for a, (v, _) in HARD.items()]
    variants += [dataclasses.replace(base, tp=4), dataclasses.replace(base, pp=2, enable_attention_dp=True)]
    for a in variants:
        for b in variants:
            assert (kvformat.fingerprint(a) == kvformat.fingerprint(b)) == (kvformat.compare(a, b) == [])


def test_wire_round_trip():
    s = state(dtype="fp8", tp=2)
    wire = kvformat.to_wire(s)
    assert json.loads(json.dumps(wire)) == wire
    assert kvformat.from_wire(json.loads(json.dumps(wire))) == s


def test_from_wire_rejects_bad_input_and_ignores_unknown_keys():
    wire = kvformat.to_wire(state())
    assert kvformat.from_wire({**wire, "future_field": 1}) == state()
    with pytest.raises(kvformat.KVFormatError, match="missing"):
        kvformat.from_wire({k: v for k, v in wire.items() if k != "kv_dtype"})
    with pytest.raises(kvformat.KVFormatError, match="integer"):
        kvformat.from_wire({**wire, "tp": "2"})
    with pytest.raises(kvformat.KVFormatError):
        kvformat.from_wire([])  # type: ignore[arg-type]


def test_from_wire_keeps_the_last_state_read_but_checks_every_type():
    wire = kvformat.to_wire(state(tp=2))
    first = kvformat.from_wire(dict(wire))
    assert kvformat.from_wire(dict(wire)) is first  # the same cache state again: the same CacheState
    # equal in Python but not the same JSON: a boolean for an integer field, a float for an integer
    with pytest.raises(kvformat.KVFormatError, match="integer"):
        kvformat.from_wire({**wire, "pp": True})
    with pytest.raises(kvformat.KVFormatError, match="integer"):
        kvformat.from_wire({**wire, "tp": 2.0})
    other = kvformat.from_wire({**wire, "tp": 4})
    assert other.tp == 4 and kvformat.from_wire(dict(wire)) == first


def test_speculative_string_is_canonical():
    cfg = {"max_draft_len": 3, "decoding_type": "Eagle"}
    assert kvformat.speculative_string(cfg) == '{"decoding_type":"Eagle","max_draft_len":3}'
    assert kvformat.speculative_string(None) == "" and kvformat.speculative_string({}) == ""
    s = kvformat.cache_state_from_files(LLAMA_8B, options(speculative_config=cfg), trtllm_version="1.2.0", env={})
    assert s.speculative == kvformat.speculative_string(dict(reversed(list(cfg.items()))))


def test_kv_transfer_streams_count_the_gpus_that_hold_a_share_of_a_requests_kv():
    from dataclasses import replace

    from baton.kvformat import CacheState, kv_transfer_streams

    base = CacheState(kv_dtype="fp8", tokens_per_block=32, num_layers=80, num_kv_heads=8, head_dim=128,
                      attention_type="DEFAULT", kv_factor=2, tp=1, pp=1, cp=1, enable_attention_dp=False,
                      transfer_backend="UCX", trtllm_version="1.2.0", speculative="", model_identity="")
    assert kv_transfer_streams(base) == 1
    assert kv_transfer_streams(replace(base, tp=4)) == 4
    assert kv_transfer_streams(replace(base, tp=4, pp=2)) == 8
    assert kv_transfer_streams(replace(base, tp=16)) == 8  # 8 KV heads: beyond that they are replicated
    assert kv_transfer_streams(replace(base, tp=8, enable_attention_dp=True)) == 1  # a request's KV on one rank


# ---------------------------------------------------------------- options that change the KV format


def with_options(model: Path, opts: dict, **kw) -> CacheState:
    return kvformat.cache_state_from_files(model, opts, trtllm_version="1.2.0", env={}, **kw)


@pytest.mark.parametrize(
    ("model", "model_dtype", "expected"),
    [
        (LLAMA_70B, "float16", "fp16"),  # bfloat16 checkpoint, model run in float16: the KV cache follows
        (LLAMA_70B_FP16, "bfloat16", "bf16"),
        (LLAMA_70B, "auto", "bf16"),  # auto: the checkpoint's torch_dtype
        (LLAMA_70B_FP16, None, "fp16"),
    ],
)
def test_top_level_dtype_is_the_kv_dtype_of_kv_cache_config_auto(model, model_dtype, expected):
    """kv_cache_config.dtype auto keeps an unquantized KV cache in the model dtype: the top-level `dtype` when it
    is set, else the checkpoint's."""
    opts = options()
    if model_dtype is not None:
        opts["dtype"] = model_dtype
    assert with_options(model, opts).kv_dtype == expected


def test_top_level_dtype_makes_a_kv_mismatch_with_a_default_tier():
    ctx = with_options(LLAMA_70B, {**options(), "dtype": "float16"})
    gen = with_options(LLAMA_70B, options())
    assert kvformat.compare(ctx, gen) == [Mismatch("kvCacheDtype", "fp16", "bf16")]
    assert kvformat.fingerprint(ctx) != kvformat.fingerprint(gen)


def test_top_level_dtype_does_not_override_kv_quantization(tmp_path):
    fp8_checkpoint = write_config(tmp_path, quant={"quantization": {"kv_cache_quant_algo": "FP8"}})
    assert with_options(fp8_checkpoint, {**options(), "dtype": "bfloat16"}).kv_dtype == "fp8"
    assert with_options(LLAMA_70B, {**options(dtype="fp8"), "dtype": "float16"}).kv_dtype == "fp8"


@pytest.mark.parametrize(("model_dtype", "message"), [
    ("float32", "accepted by TensorRT-LLM but not simulated"),
    ("fp16", "dtype must be one of auto, float16, bfloat16, float32"),
    ("half", "dtype must be one of"),
    (["float16"], "dtype must be one of"),
])
def test_top_level_dtype_other_values_are_refused(model_dtype, message):
    with pytest.raises(kvformat.KVFormatError, match=message):
        with_options(LLAMA_70B, {**options(), "dtype": model_dtype})
    with pytest.raises(kvformat.KVFormatError, match=message):  # also beside an explicit KV dtype
        with_options(LLAMA_70B, {**options(dtype="fp8"), "dtype": model_dtype})


def test_max_attention_window_is_a_hard_equal_field():
    windowed = with_options(LLAMA_8B, options(kv_cache_config={"max_attention_window": [512]}))
    full = with_options(LLAMA_8B, options())
    assert (windowed.attention_window, full.attention_window) == ((512,), ())
    assert kvformat.compare(windowed, full) == [Mismatch("maxAttentionWindow", (512,), ())]
    assert kvformat.fingerprint(windowed) != kvformat.fingerprint(full)
    text = kvformat.trtllm_error(kvformat.compare(windowed, full))
    assert "only support same max_attention_window" in text
    assert "(maxAttentionWindow: context=[512], generation=unset)" in text


@pytest.mark.parametrize(("windows", "expected"), [
    ([512], (512,)),
    ([512, 512, 512], (512,)),  # repeated over the layers: the same window
    ([4096, 512], (4096, 512)),
    ([4096, 512, 4096, 512], (4096, 512)),  # 32 layers: the same alternation
    ([4096, 512, 512], (4096, 512, 512)),
])
def test_max_attention_window_is_compared_per_layer(windows, expected):
    s = with_options(LLAMA_8B, options(kv_cache_config={"max_attention_window": windows}))
    assert s.attention_window == expected
    assert kvformat.rule_violations(s) == []


@pytest.mark.parametrize("windows", [512, [], [0], [512, True], "512"])
def test_max_attention_window_must_be_a_list_of_positive_integers(windows):
    with pytest.raises(kvformat.KVFormatError, match="max_attention_window must be a list of positive integers"):
        with_options(LLAMA_8B, options(kv_cache_config={"max_attention_window": windows}))


def test_pp_partition_sets_the_layers_of_each_stage(tmp_path):
    model = tinyllama(tmp_path)
    ctx = with_options(model, options(pipeline_parallel_size=2, pp_partition=[20, 2]))
    assert ctx.attention_layer_num_per_pp == (20, 2)
    assert kvformat.stage_kv_bytes_per_token(ctx) == (20480, 2048)
    assert kvformat.rule_violations(ctx) == []
    # the stage split is not compared: a TP-only or evenly split peer takes the same KV
    even = with_options(model, options(pipeline_parallel_size=2))
    assert even.attention_layer_num_per_pp == (11, 11)
    assert kvformat.compare(ctx, even) == [] and kvformat.fingerprint(ctx) == kvformat.fingerprint(even)
    assert kvformat.from_wire(json.loads(json.dumps(kvformat.to_wire(ctx)))) == ctx


def test_pp_partition_takes_the_command_line_pp_size(tmp_path):
    s = with_options(tinyllama(tmp_path), options(pp_partition=[2, 20]), pp=2)
    assert s.attention_layer_num_per_pp == (2, 20)


@pytest.mark.parametrize(("partition", "pp", "message"), [
    ([20, 2], 1, "has 2 entries, pipeline_parallel_size is 1"),
    ([12, 12], 2, "sums to 24 layers, the model has 22"),
    ([22, 0], 2, "pp_partition must be a list of positive integers"),
    (22, 1, "pp_partition must be a list of positive integers"),
])
def test_pp_partition_must_match_pp_and_the_layer_count(tmp_path, partition, pp, message):
    with pytest.raises(kvformat.KVFormatError, match=message):
        with_options(tinyllama(tmp_path), options(pipeline_parallel_size=pp, pp_partition=partition))


def test_pp_partition_puts_mtp_layers_on_the_last_stage(tmp_path):
    spec = {"decoding_type": "MTP", "num_nextn_predict_layers": 1}
    s = with_options(tinyllama(tmp_path), options(pipeline_parallel_size=2, pp_partition=[20, 2],
                                                  speculative_config=spec))
    assert s.num_layers == 23 and s.attention_layer_num_per_pp == (20, 3)


def test_a_peer_without_the_newer_fields_reads_as_unset():
    wire = kvformat.to_wire(state())
    old = {k: v for k, v in wire.items() if k not in ("attention_window", "pp_layers")}
    assert kvformat.from_wire(old) == state()
    with pytest.raises(kvformat.KVFormatError, match="list of integers"):
        kvformat.from_wire({**wire, "attention_window": [512, "x"]})


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), (1, True), (0, False), (1.0, True),
    ("true", True), ("false", False), ("False", False), ("TRUE", True), ("yes", True), ("no", False),
    ("on", True), ("off", False), ("1", True), ("0", False), ("y", True), ("n", False), ("t", True), ("f", False),
])
def test_option_bool_reads_booleans_as_pydantic_does(value, expected):
    assert kvformat.option_bool({"enable_attention_dp": value}, "enable_attention_dp") is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, None, [True]])
def test_option_bool_refuses_what_pydantic_refuses(value):
    with pytest.raises(kvformat.KVFormatError, match="enable_chunked_prefill: Input should be a valid boolean"):
        kvformat.option_bool({"enable_chunked_prefill": value}, "enable_chunked_prefill")
    assert kvformat.option_bool({}, "enable_chunked_prefill") is False
    assert kvformat.option_bool({}, "enable_chunked_prefill", True) is True


def test_quoted_false_attention_dp_is_off():
    s = with_options(LLAMA_8B, options(enable_attention_dp="false", tensor_parallel_size=2))
    assert s.enable_attention_dp is False
    with pytest.raises(kvformat.KVFormatError, match="valid boolean"):
        with_options(LLAMA_8B, options(enable_attention_dp="nope"))
