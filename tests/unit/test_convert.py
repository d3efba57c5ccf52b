"""`baton convert`: a TensorRT-LLM disaggregated config in, a DisaggregatedModel the API server and the operator
accept out, or a clear error (exit 1) naming what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from baton import cli
from baton.api.v1alpha1 import NAME_MAX_LENGTH, DisaggregatedModel
from baton.operator.validation import spec_problems
from baton.render.engine_config import engine_options
from test_api_and_render import _refused, _schema

REPO = Path(__file__).resolve().parents[2]

# A trtllm-serve disaggregated config as TensorRT-LLM's own examples write them (top-level options are
# inherited by both sections).
TRTLLM_SERVE = {
    "hostname": "0.0.0.0",
    "port": 8000,
    "model": "meta-llama/Llama-3.1-70B-Instruct",
    "backend": "pytorch",
    "kv_cache_config": {"dtype": "fp8", "tokens_per_block": 64, "free_gpu_memory_fraction": 0.85},
    "speculative_config": {"decoding_type": "Eagle3", "max_draft_len": 3, "speculative_model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-70B"},
    "print_iter_log": True,
    "context_servers": {
        "num_instances": 2,
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "max_batch_size": 8,
        "max_num_tokens": 16384,
        "max_input_len": 16000,
        "disable_overlap_scheduler": True,
        "kv_cache_config": {"enable_block_reuse": False},
        "cache_transceiver_config": {"backend": "NIXL", "max_tokens_in_buffer": 16384, "kv_transfer_timeout_ms": 20000},
        "urls": ["ctx-0:8001", "ctx-1:8001"],
    },
    "generation_servers": {
        "num_instances": 3,
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "max_batch_size": 256,
        "max_num_tokens": 512,
        "kv_cache_config": {"enable_block_reuse": False, "event_buffer_max_size": 1024},
        "cache_transceiver_config": {"backend": "NIXL", "max_tokens_in_buffer": 16384, "kv_transfer_timeout_ms": 20000},
        "urls": ["gen-0:8001", "gen-1:8001", "gen-2:8001"],
    },
}
BRIEF_SCHEDULER_COMMAND = ("disaggregated-scheduler --prefill-batch-size 32 --decode-batch-size 1 "
                           "--kv-cache-transfer-compression fp8 --max-concurrent-prefills 64 "
                           "--placement-policy shortest-prefill-first")


class Result(NamedTuple):
    code: int
    obj: dict[str, Any] | None
    err: str

    @property
    def warnings(self) -> str:
        return "\n".join(line for line in self.err.splitlines() if line.startswith("warning: "))


@pytest.fixture
def convert(tmp_path, capsys):
    """`baton convert FILE ARGS...` through the CLI, FILE holding `config` (YAML text or an object)."""
    def run(config: Any, *args: str) -> Result:
        path = tmp_path / "disaggregated_config.yaml"
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        code = cli.main(["convert", str(path), *args])
        out, err = capsys.readouterr()
        return Result(code, yaml.safe_load(out) if code == 0 else None, err)
    return run


def api_server_refusals(obj: dict[str, Any]) -> list[str]:
    """The messages of every CEL rule of the CRD the object fails, evaluated on the object as the API server
    stores it (defaults filled in), as `kubectl apply` would report them."""
    stored = DisaggregatedModel.model_validate(obj)
    wire = {"metadata": obj["metadata"], "spec": stored.spec.model_dump(mode="json", by_alias=True, exclude_none=True)}

    def walk(schema: dict[str, Any], value: Any) -> list[str]:
        rules = schema.get("x-kubernetes-validations", [])
        refused = _refused([rule for rule in rules if ".filter(" not in rule["rule"]], value)
        for rule in rules:  # cel_eval has no filter(); the one rule using it, checked as Python
            if ".filter(" in rule["rule"]:
                assert rule["message"] == "model.source must set exactly one of pvc, hostPath or huggingFace"
                refused += [rule["message"]] if len(value) != 1 else []
        for key, sub in schema.get("properties", {}).items():
            if isinstance(value, dict) and isinstance(value.get(key), dict):
                refused += walk(sub, value[key])
        return refused

    return walk(_schema(), wire)


def accepted(result: Result) -> dict[str, Any]:
    """The converted object, once the API server's rules and the operator's checks both accept it."""
    assert result.code == 0, result.err
    assert api_server_refusals(result.obj) == []
    assert spec_problems(DisaggregatedModel.model_validate(result.obj).spec) == []
    return result.obj


def refused(result: Result) -> str:
    """The one-line error of a refused conversion (exit 1, no traceback, nothing on stdout)."""
    assert result.code == 1 and result.obj is None, result.err
    assert "Traceback" not in result.err
    assert result.err.startswith("baton convert: ")
    return result.err


def with_section(section: str, **options: Any) -> dict[str, Any]:
    config = yaml.safe_load(yaml.safe_dump(TRTLLM_SERVE))  # a deep copy
    config[section].update(options)
    return config


# --------------------------------------------------------------------------- trtllm-serve's own config


def test_a_trtllm_serve_config_becomes_the_model_it_describes(convert):
    obj = accepted(convert(TRTLLM_SERVE))
    spec = obj["spec"]
    assert obj["metadata"]["name"] == "llama-3-1-70b-instruct"
    assert spec["model"] == {"name": "meta-llama/Llama-3.1-70B-Instruct",
                             "source": {"huggingFace": {"id": "meta-llama/Llama-3.1-70B-Instruct"}}}
    assert spec["engine"]["runtime"] == "trtllm-serve"
    prefill, decode = spec["prefill"], spec["decode"]
    assert (prefill["minReplicas"], prefill["maxReplicas"], decode["minReplicas"], decode["maxReplicas"]) == (2, 2, 3, 3)
    assert (prefill["tensorParallelSize"], prefill["pipelineParallelSize"], prefill["gpusPerReplica"]) == (4, 2, 8)
    assert (decode["tensorParallelSize"], decode["pipelineParallelSize"], decode["gpusPerReplica"]) == (2, 1, 2)
    assert (prefill["maxBatchSize"], prefill["maxNumTokens"], prefill["maxPromptTokens"]) == (8, 16384, 16000)
    assert (decode["maxBatchSize"], decode["maxNumTokens"]) == (256, 512)
    assert spec["engine"]["kvCache"] == {"dtype": "fp8", "tokensPerBlock": 64, "freeGpuMemoryFraction": 0.85,
                                         "enableBlockReuse": False}
    assert spec["engine"]["kvTransfer"] == {"backend": "NIXL", "maxTokensInBuffer": 16384, "timeout": "20000ms"}
    assert spec["engine"]["speculativeConfig"] == TRTLLM_SERVE["speculative_config"]
    assert spec["engine"]["extraOptions"] == {"print_iter_log": True}

    # What each tier's engine is started with carries the input's settings.
    model = DisaggregatedModel.model_validate(obj).spec
    for tier, section in (("prefill", "context_servers"), ("decode", "generation_servers")):
        options = engine_options(model, tier)
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "max_batch_size", "max_num_tokens"):
            assert options[key] == TRTLLM_SERVE[section][key], (tier, key)
        assert options["kv_cache_config"] == {"dtype": "fp8", "tokens_per_block": 64, "free_gpu_memory_fraction": 0.85,
                                              "enable_block_reuse": False}
        assert options["cache_transceiver_config"] == TRTLLM_SERVE[section]["cache_transceiver_config"]
        assert options["speculative_config"] == TRTLLM_SERVE["speculative_config"]
        assert options["print_iter_log"] is True


def test_what_does_not_carry_over_from_a_trtllm_serve_config_is_named(convert):
    warnings = convert(TRTLLM_SERVE).warnings
    for named in ("warning: hostname: a trtllm-serve disaggregated router setting",
                  "warning: port: a trtllm-serve disaggregated router setting",
                  "warning: context_servers.urls: not used: Baton's prefill pods get their own addresses",
                  "warning: generation_servers.urls: not used",
                  "warning: context_servers.disable_overlap_scheduler: not carried over: Baton disables the overlap "
                  "scheduler on the prefill tier",
                  "warning: generation_servers.kv_cache_config.event_buffer_max_size: no DisaggregatedModel field",
                  "warning: engine.extraOptions: print_iter_log carried over"):
        assert named in warnings
    assert "backend" not in warnings  # pytorch is the backend Baton runs


def test_a_sections_value_overrides_the_top_levels(convert):
    config = with_section("context_servers", kv_cache_config={"free_gpu_memory_fraction": 0.5})
    config["generation_servers"]["kv_cache_config"] = {"free_gpu_memory_fraction": 0.5}
    result = convert(config)
    assert accepted(result)["spec"]["engine"]["kvCache"]["freeGpuMemoryFraction"] == 0.5
    assert ("warning: context_servers.kv_cache_config.free_gpu_memory_fraction: 0.5 overrides the top level's 0.85"
            in result.warnings)


def test_trtllm_serves_top_level_free_gpu_memory_fraction_is_the_kv_caches(convert):
    config = with_section("context_servers")
    del config["kv_cache_config"]["free_gpu_memory_fraction"]
    config["free_gpu_memory_fraction"] = 0.25
    assert accepted(convert(config))["spec"]["engine"]["kvCache"]["freeGpuMemoryFraction"] == 0.25


@pytest.mark.parametrize("section_options,both_values", [
    ({"kv_cache_config": {"dtype": "auto"}}, ("context_servers.kv_cache_config.dtype is 'auto'",
                                              "kv_cache_config.dtype is 'fp8'")),
    ({"kv_cache_config": {"tokens_per_block": 32}}, ("context_servers.kv_cache_config.tokens_per_block is 32",
                                                     "kv_cache_config.tokens_per_block is 64")),
    ({"cache_transceiver_config": {"backend": "UCX"}}, ("context_servers.cache_transceiver_config.backend is 'UCX'",
                                                        "generation_servers.cache_transceiver_config.backend is 'NIXL'")),
    ({"speculative_config": {"decoding_type": "MTP", "num_nextn_predict_layers": 1}},
     ("context_servers.speculative_config is {'decoding_type': 'MTP'", "speculative_config is {'decoding_type': 'Eagle3'")),
])
def test_a_kv_layout_the_sections_disagree_on_is_refused_naming_both_values(convert, section_options, both_values):
    err = refused(convert(with_section("context_servers", **section_options)))
    assert "differs between the tiers" in err and "TensorRT-LLM refuses a KV handoff" in err
    for value in both_values:
        assert value in err


def test_speculation_on_one_section_only_is_refused(convert):
    config = with_section("generation_servers", speculative_config={"decoding_type": "MTP"})
    del config["speculative_config"]
    err = refused(convert(config))
    assert "speculative_config differs between the tiers: context_servers leaves it unset and" in err


def test_settings_free_to_differ_take_the_value_safe_for_both_tiers_with_a_warning(convert):
    config = with_section("context_servers", kv_cache_config={"free_gpu_memory_fraction": 0.6},
                          cache_transceiver_config={"backend": "NIXL", "max_tokens_in_buffer": 16384,
                                                    "kv_transfer_timeout_ms": 60000})
    config["generation_servers"]["kv_cache_config"] = {"free_gpu_memory_fraction": 0.9}
    result = convert(config)
    engine = accepted(result)["spec"]["engine"]
    assert engine["kvCache"]["freeGpuMemoryFraction"] == 0.6 and engine["kvTransfer"]["timeout"] == "60000ms"
    assert ("warning: kv_cache_config.free_gpu_memory_fraction: context_servers.kv_cache_config.free_gpu_memory_fraction "
            "is 0.6 and generation_servers.kv_cache_config.free_gpu_memory_fraction is 0.9; Baton renders one "
            "engine.kvCache.freeGpuMemoryFraction for both tiers: 0.6 on both") in result.warnings


def test_a_default_transfer_backend_becomes_the_other_sections_explicit_one(convert):
    result = convert(with_section("context_servers", cache_transceiver_config={"backend": "DEFAULT"}))
    assert accepted(result)["spec"]["engine"]["kvTransfer"]["backend"] == "NIXL"
    assert "warning: context_servers.cache_transceiver_config.backend: DEFAULT means UCX or NIXL" in result.warnings


def test_an_mpi_transfer_backend_is_refused(convert):
    err = refused(convert(with_section("context_servers", cache_transceiver_config={"backend": "MPI"})))
    assert "context_servers.cache_transceiver_config.backend: MPI needs every engine in one MPI world" in err


def test_num_instances_must_match_the_urls_and_defaults_to_their_count(convert):
    err = refused(convert(with_section("context_servers", num_instances=3)))
    assert "context_servers.num_instances is 3 but context_servers.urls lists 2 addresses" in err
    config = with_section("context_servers")
    del config["context_servers"]["num_instances"]
    assert accepted(convert(config))["spec"]["prefill"]["maxReplicas"] == 2


def test_without_a_kv_dtype_the_flag_or_fp8_is_used_and_said(convert):
    config = with_section("context_servers")
    del config["kv_cache_config"]["dtype"]
    result = convert(config)
    assert accepted(result)["spec"]["engine"]["kvCache"]["dtype"] == "fp8"
    assert "warning: engine.kvCache.dtype: fp8, as kv_cache_config.dtype is unset or auto" in result.warnings
    assert accepted(convert(config, "--kv-cache-dtype", "bf16"))["spec"]["engine"]["kvCache"]["dtype"] == "bf16"
    overridden = convert(TRTLLM_SERVE, "--kv-cache-dtype", "bf16")
    assert accepted(overridden)["spec"]["engine"]["kvCache"]["dtype"] == "bf16"
    assert "warning: engine.kvCache.dtype: --kv-cache-dtype bf16 overrides kv_cache_config.dtype fp8" in overridden.warnings


@pytest.mark.parametrize("gpu,dtype", [("h100", "fp8"), ("l40s", "fp8"), ("a100", "bf16"), ("a10g", "bf16")])
def test_a_brief_without_a_kv_dtype_gets_one_its_gpus_can_run_and_says_so(convert, gpu, dtype):
    """The design brief's format says nothing of the KV cache dtype: fp8 where the GPUs have FP8, bf16 on
    Ampere (A100, A10G), which has none; either way a warning says what was chosen."""
    result = convert({"model": "m", "tiers": {"prefill": {"instance_type": f"{gpu}-x8"},
                                              "decode": {"instance_type": f"{gpu}-x4"}}})
    assert accepted(result)["spec"]["engine"]["kvCache"]["dtype"] == dtype
    assert f"warning: engine.kvCache.dtype: {dtype}, as the file does not say" in result.warnings, result.warnings


@pytest.mark.parametrize("backend", ["pytorch", "PyTorch"])
def test_the_pytorch_backend_is_the_one_baton_runs(convert, backend):
    assert accepted(convert({**TRTLLM_SERVE, "backend": backend}))["spec"]["engine"]["runtime"] == "trtllm-serve"


@pytest.mark.parametrize("backend", ["trt", "_autodeploy"])
def test_another_trtllm_serve_backend_is_refused(convert, backend):
    err = refused(convert({**TRTLLM_SERVE, "backend": backend}))
    assert f"backend: {backend!r}: Baton runs TensorRT-LLM's PyTorch backend" in err and "use backend: pytorch" in err


def test_a_config_the_operator_would_refuse_is_refused_naming_the_input(convert):
    # NIXL cannot transfer a prompt's KV that does not fit the buffer: prompts up to 32768 tokens, 8192 in the buffer.
    config = with_section("context_servers", cache_transceiver_config={"backend": "NIXL", "max_tokens_in_buffer": 8192})
    config["generation_servers"]["cache_transceiver_config"] = {"backend": "NIXL", "max_tokens_in_buffer": 8192}
    del config["context_servers"]["max_input_len"]
    err = refused(convert(config))
    assert "the operator would refuse the result: engine.kvTransfer.maxTokensInBuffer is below prefill.maxPromptTokens" in err
    assert "engine.kvTransfer.maxTokensInBuffer comes from context_servers.cache_transceiver_config.max_tokens_in_buffer" in err
    assert "prefill.maxPromptTokens is Baton's default" in err


def test_a_value_the_api_refuses_names_the_input_key(convert):
    err = refused(convert(with_section("generation_servers", tensor_parallel_size=3, urls=None)))
    assert err.strip() == "baton convert: generation_servers.tensor_parallel_size: Input should be 1, 2, 4, 8, 16, 32 or 64 (got 3)"


# ------------------------------------------------------------------------------- the design brief's shape


def test_the_design_briefs_config_round_trips(convert):
    result = convert((REPO / "tests/data/disaggregated_config.yaml").read_text(), "--scheduler-command",
                     BRIEF_SCHEDULER_COMMAND)
    spec = accepted(result)["spec"]
    assert spec["model"]["name"] == "llama-4-70b" and spec["engine"]["kvTransfer"]["compression"] == "fp8"
    assert {k: spec["prefill"][k] for k in ("gpusPerReplica", "tensorParallelSize", "minReplicas", "maxReplicas",
                                            "maxBatchSize", "maxPromptTokens")} == {
        "gpusPerReplica": 8, "tensorParallelSize": 8, "minReplicas": 2, "maxReplicas": 8, "maxBatchSize": 64,
        "maxPromptTokens": 128000}
    assert spec["prefill"]["pool"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                                                       "nvidia.com/gpu.count": "8"}
    assert {k: spec["decode"][k] for k in ("gpusPerReplica", "minReplicas", "maxReplicas", "maxBatchSize",
                                           "maxGeneratedTokens")} == {
        "gpusPerReplica": 4, "minReplicas": 4, "maxReplicas": 16, "maxBatchSize": 1, "maxGeneratedTokens": 4096}
    assert spec["scheduler"] == {"algorithm": "throughput-optimized", "maxQueueDepth": 256, "prefillBatchSize": 32,
                                 "decodeBatchSize": 1, "maxConcurrentPrefills": 64,
                                 "placementPolicy": "shortest-prefill-first"}
    assert "decode.kvCacheSize: 128G" in result.warnings  # left out: it needs model.architecture


def test_min_instances_alone_fixes_the_tier_at_that_size(convert):
    spec = accepted(convert({"model": "m", "tiers": {"prefill": {"min_instances": 2}}}))["spec"]
    assert spec["prefill"]["minReplicas"] == spec["prefill"]["maxReplicas"] == 2


def test_min_instances_above_max_instances_is_refused(convert):
    err = refused(convert({"model": "m", "tiers": {"decode": {"min_instances": 4, "max_instances": 2}}}))
    assert "tiers.decode: min_instances 4 is above max_instances 2" in err


def test_a_gpu_count_that_is_not_a_power_of_two_is_split_and_said(convert):
    result = convert({"model": "m", "tiers": {"prefill": {"instance_type": "h100-x6"}}})
    prefill = accepted(result)["spec"]["prefill"]
    assert (prefill["tensorParallelSize"], prefill["pipelineParallelSize"], prefill["gpusPerReplica"]) == (2, 3, 6)
    assert ("warning: tiers.prefill.instance_type: 6 GPUs is not a power of two, which tensor parallelism must be: "
            "split as prefill.tensorParallelSize 2 x pipelineParallelSize 3") in result.warnings


def test_an_unknown_front_end_is_refused(convert):
    err = refused(convert({"model": "m", "backend": "vllm", "tiers": {}}))
    assert "backend: 'vllm' is not a TensorRT-LLM front end Baton runs" in err


# ---------------------------------------------------------------------------------- metadata.name


@pytest.mark.parametrize("model,name", [
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "deepseek-r1-distill-llama-70b"),
    ("01-ai/Yi-34B", "yi-34b"),
    ("/models/Llama-3.1-8B", "llama-3-1-8b"),
])
def test_the_name_from_the_model_is_one_the_api_server_accepts(convert, model, name):
    assert accepted(convert({**TRTLLM_SERVE, "model": model}))["metadata"]["name"] == name


@pytest.mark.parametrize("model,rule", [
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B-Instruct-FP8-Dynamic", f"must be at most {NAME_MAX_LENGTH} characters"),
    ("acme/3B-chat", "must be a DNS-1035 label"),
])
def test_a_model_name_that_makes_no_valid_name_asks_for_name(convert, model, rule):
    err = refused(convert({**TRTLLM_SERVE, "model": model}))
    assert rule in err and err.strip().endswith("pass --name NAME")
    assert accepted(convert({**TRTLLM_SERVE, "model": model}, "--name", "my-model"))["metadata"]["name"] == "my-model"


def test_an_invalid_name_flag_is_refused(convert):
    err = refused(convert(TRTLLM_SERVE, "--name", "Llama.70b"))
    assert "metadata.name 'Llama.70b': metadata.name must be a DNS-1035 label" in err


# ------------------------------------------------------------------------------- --scheduler-command


@pytest.mark.parametrize("command,ignored", [
    ("disaggregated-scheduler --verbose --prefill-batch-size 16", "--verbose"),
    ("disaggregated-scheduler --prefill-batch-size=16 --verbose", "--verbose"),
    ("disaggregated-scheduler --log-level debug --prefill-batch-size 16", "--log-level"),
])
def test_scheduler_flags_are_read_whatever_surrounds_them(convert, command, ignored):
    result = convert(TRTLLM_SERVE, "--scheduler-command", command)
    assert accepted(result)["spec"]["scheduler"]["prefillBatchSize"] == 16
    assert f"warning: scheduler command: {ignored} has no DisaggregatedModel field; ignored" in result.warnings


@pytest.mark.parametrize("command,error", [
    ("s --decode-batch-size 1 --prefill-batch-size", "--prefill-batch-size: needs a value"),
    ("s --prefill-batch-size --decode-batch-size 1", "--prefill-batch-size: needs a value"),
    ("s --prefill-batch-size=", "--prefill-batch-size: needs a value"),
    ("s --prefill-batch-size many", "--prefill-batch-size: Input should be a valid integer"),
    ("s --prefill-batch-size 0", "--prefill-batch-size: Input should be greater than or equal to 1"),
    ("s --placement-policy fastest", "--placement-policy: Input should be 'shortest-prefill-first'"),
    ("s --kv-cache-transfer-compression int4", "--kv-cache-transfer-compression: Input should be 'none' or 'fp8'"),
])
def test_a_scheduler_flag_without_a_good_value_is_refused(convert, command, error):
    assert refused(convert(TRTLLM_SERVE, "--scheduler-command", command)).startswith(f"baton convert: {error}")


def test_a_threshold_below_the_others_default_moves_it_along(convert):
    result = convert(TRTLLM_SERVE, "--scheduler-command", "s --always-prefill-at-or-above-tokens 2048")
    scheduler = accepted(result)["spec"]["scheduler"]
    assert scheduler["alwaysPrefillAtOrAboveTokens"] == scheduler["localPrefillBelowTokens"] == 2048
    assert "warning: scheduler.localPrefillBelowTokens: 2048" in result.warnings
    err = refused(convert(TRTLLM_SERVE, "--scheduler-command",
                          "s --always-prefill-at-or-above-tokens 2048 --local-prefill-below-tokens 3000"))
    assert "--local-prefill-below-tokens 3000 is above --always-prefill-at-or-above-tokens 2048" in err


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text,error", [
    ("model: [llama\n", "is not valid YAML at line 2, column 1"),
    ("", "is empty"),
    ("- model: llama\n", "the top level must be a mapping such as"),
    ("model: llama\ntiers: {prefill: h100-x8}\n", "tiers.prefill must be a mapping such as {instance_type: h100-x8"),
    ("model: llama\ntiers: [prefill, decode]\n", "tiers must be a mapping"),
    ("model: llama\ncontext_servers: 2\n", "context_servers must be a mapping"),
    ("model: llama\ncontext_servers: {kv_cache_config: fp8}\n", "context_servers.kv_cache_config must be a mapping"),
    ("model: llama\ncontext_servers: {urls: ctx-0:8001}\n", "context_servers.urls must be a list of host:port addresses"),
    ("model: llama\n", "nothing to convert"),
    ("tiers: {}\n", "model: missing"),
    ("model: llama\ntiers: {}\ncontext_servers: {}\n", "the file mixes both shapes"),
])
def test_a_file_that_is_not_a_config_is_refused_with_what_is_wrong(convert, text, error):
    assert error in refused(convert(text))


def test_a_missing_file_is_refused(capsys, tmp_path):
    assert cli.main(["convert", str(tmp_path / "absent.yaml")]) == 1
    assert capsys.readouterr().err == f"baton convert: cannot read {tmp_path / 'absent.yaml'}: No such file or directory\n"
