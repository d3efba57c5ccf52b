"""The timing model (unit) and its effect on a running worker (relative durations only, never thresholds)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import statistics
import time

import pytest
import yaml
from simproc import LLAMA_70B, LLAMA_8B, handoff, worker_yaml

from baton.engine_sim import timing
from baton.engine_sim.config import load_config
from baton.engine_sim.engine import CTX_AND_GEN, Engine, Prompt, token_at, token_text
from baton.idlists import cut_id_list

# ---------------------------------------------------------------- interpolation


def test_interp_hits_table_points():
    xs, ys = [1.0, 10.0, 100.0], [2.0, 20.0, 400.0]
    for x, y in zip(xs, ys):
        assert timing.interp_loglog(xs, ys, x) == pytest.approx(y)


def test_interp_is_loglog_between_points():
    # a power law y = 2 x is reproduced exactly between points
    assert timing.interp_loglog([1.0, 10.0], [2.0, 20.0], 3.0) == pytest.approx(6.0)
    # y = x^2 between 10 and 100: log-log interpolation of a power law is exact
    assert timing.interp_loglog([10.0, 100.0], [100.0, 10000.0], 30.0) == pytest.approx(900.0)


def test_interp_clamps_below_and_extrapolates_above():
    xs, ys = [10.0, 100.0], [5.0, 50.0]
    assert timing.interp_loglog(xs, ys, 1.0) == 5.0
    assert timing.interp_loglog(xs, ys, 1000.0) == pytest.approx(500.0)  # slope 1 continues
    # extrapolation never decreases, even if the last segment does
    assert timing.interp_loglog([1.0, 2.0], [10.0, 9.0], 8.0) == pytest.approx(9.0)


def test_interp_is_monotone_on_the_shipped_prefill_curve():
    model = timing.load_table().models["llama3-8b"]
    values = [model.prefill(t) for t in range(100, 20000, 97)]
    assert all(b >= a for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------- the shipped table


def test_shipped_table_reproduces_measured_points():
    table = timing.load_table()
    assert set(table.models) == {"llama3-8b", "llama3-70b"}
    assert "h200" in json.dumps(table.provenance).lower()
    m8, m70 = table.models["llama3-8b"], table.models["llama3-70b"]
    assert m8.prefill(16384) == pytest.approx(513.4776, rel=1e-6)
    assert m70.prefill(1024) == pytest.approx(229.1018, rel=1e-6)
    assert m8.decode(1, 1024) == pytest.approx(4.8717, rel=1e-4)
    assert m70.decode(128, 4096) == pytest.approx(95.959, rel=1e-4)


def test_decode_interpolates_between_batches_and_contexts():
    m = timing.load_table().models["llama3-8b"]
    mid = m.decode(16, 2048)
    assert m.decode(8, 1024) < mid < m.decode(32, 4096)
    assert m.decode(64, 16384) > m.decode(64, 4096)  # filled cell grows with context
    assert m.decode(512, 1024) > m.decode(256, 1024)  # extrapolated beyond the table


# One H200: HBM3e peak bandwidth 4.8 TB/s (NVIDIA's H200 datasheet).
H200_HBM_BYTES_PER_S = 4.8e12


def _implied_bandwidth(model: timing.ModelTiming, batch: int, context: int) -> float:
    """Bytes a decode step must read from HBM (bf16 weights once, every sequence's KV) over its modelled time."""
    shape = model.shape
    weights = 2 * timing.estimate_params(shape)
    kv_per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2  # K and V, bf16
    return (weights + kv_per_token * batch * context) / (model.decode(batch, context) / 1000)


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b"])
def test_decode_beyond_the_table_never_reads_faster_than_the_gpu_can(name):
    """Past the longest measured context (16K) and the largest measured batch (256) decode grows linearly, as
    its KV reads do: the HBM bandwidth a step implies stays within an H200's 4.8 TB/s at any context and batch
    (a log-log extrapolation of the last segment had 8B decode B=4 at 128K context in 11.5 ms: 7.4 TB/s), and
    the measured grid is still reproduced exactly."""
    model = timing.load_table().models[name]
    for b, row in zip(model.decode_batches, model.decode_grid_ms):
        for c, ms in zip(model.decode_contexts, row):
            assert model.decode(b, c) == pytest.approx(ms, rel=1e-12)
    for batch in (1, 2, 4, 8, 16, 64, 256, 512, 1024, 2048, 4096):
        for context in (1024, 16384, 32768, 65536, 131072, 262144, 1 << 20):
            bandwidth = _implied_bandwidth(model, batch, context)
            assert bandwidth <= H200_HBM_BYTES_PER_S, (batch, context, bandwidth / 1e12)
    # beyond the table each cached token of each sequence of a measured batch costs the measured kv_slope
    far, farther = model.decode(8, 65536), model.decode(8, 131072)
    assert farther - far == pytest.approx(model.kv_slope * 8 * 65536)
    assert model.kv_slope == pytest.approx(json.loads(timing.DEFAULT_TABLE_PATH.read_text())["models"][name][
        "kv_slope_ms_per_token"])
    if name == "llama3-8b":
        assert 20 < model.decode(4, 131072) < 30  # ~22 ms; the log-log extrapolation said 11.5


def test_a_table_without_kv_slope_extrapolates_decode_with_the_grids_own():
    """A table written before kv_slope_ms_per_token was read still loads; beyond its grid decode grows by the
    median ms per cached token its cells measure, and past its last batch by at least the last segment's cost
    per sequence."""
    grid = {"batches": [1, 10], "contexts": [100, 1000], "ms": [[1.0, 1.9], [2.0, 11.0]]}  # 0.001 ms per token
    m = timing.table_from_dict(_table(decode=grid)).models["x"]
    assert m.kv_slope_ms_per_token is None and m.kv_slope == pytest.approx(0.001)
    assert m.decode(1, 2000) == pytest.approx(1.9 + 0.001 * 1000)
    assert m.decode(10, 3000) == pytest.approx(11.0 + 0.001 * 10 * 2000)
    assert m.decode(20, 1000) == pytest.approx(11.0 + (11.0 - 1.9) / 9 * 10)  # the last segment: 1.01 ms per sequence
    # a table that gives it is taken at its word; an added sequence costs at least reading its KV (here 2 ms)
    given = timing.table_from_dict(_table(decode=grid, kv_slope_ms_per_token=0.002)).models["x"]
    assert given.decode(1, 2000) == pytest.approx(1.9 + 0.002 * 1000)
    assert given.decode(20, 1000) == pytest.approx(11.0 + 0.002 * 1000 * 10)
    with pytest.raises(ValueError, match="kv_slope_ms_per_token must be a number >= 0"):
        timing.table_from_dict(_table(decode=grid, kv_slope_ms_per_token=-1))


def test_table_from_raw_calibration_fills_missing_cells():
    raw = {
        "device": "test",
        "models": {
            "tiny": {
                "hidden": 64, "intermediate": 256, "layers_full": 2, "heads": 4, "kv_heads": 2, "head_dim": 16,
                "prefill": [{"batch": 1, "tokens": 128, "ms_full_est": 1.0},
                            {"batch": 1, "tokens": 1024, "ms_full_est": 8.0},
                            {"batch": 8, "tokens": 128, "ms_full_est": 6.0}],
                "decode": [{"batch": 1, "context": 100, "ms_step_full_est": 1.0},
                           {"batch": 1, "context": 1000, "ms_step_full_est": 1.9},
                           {"batch": 10, "context": 100, "ms_step_full_est": 2.0}],
            }
        },
    }
    table = timing.table_from_dict(raw)
    m = table.models["tiny"]
    # slope from the measured pair: (1.9 - 1.0) / (1 x 900) = 0.001 ms per cached token
    assert m.decode(10, 1000) == pytest.approx(2.0 + 0.001 * 10 * 900)
    assert m.prefill_tokens == (128.0, 1024.0)  # the prefill curve is the batch-1 points
    # the batched point gives the attention coefficient: one 1024-token prompt minus 8 x 128 tokens in
    # one pass = c x 8 x 7 x 128^2; the model then reproduces the batched point
    assert m.attention_ms_per_token2 == pytest.approx((8.0 - 6.0) / (8 * 7 * 128**2), rel=1e-5)
    assert m.prefill_pass([(0, 128)] * 8) == pytest.approx(6.0, rel=1e-4)
    assert m.prefill(1024) == pytest.approx(8.0) and m.prefill(128) == pytest.approx(1.0)


def _table(**model) -> dict:
    base = {"shape": {"hidden": 64, "layers": 2}, "prefill": [[128, 1.0], [1024, 8.0]],
            "decode": {"batches": [1], "contexts": [1], "ms": [[1.0]]}}
    return {"models": {"x": {**base, **model}}}


@pytest.mark.parametrize("bad, says", [
    ({"models": {}}, "no 'models'"),
    (_table(decode={"batches": [2, 1], "contexts": [1], "ms": [[1], [1]]}), "strictly ascending"),
    (_table(attention_ms_per_token2=-1e-9), "must be a number >= 0"),
    (_table(attention_ms_per_token2="1e-6"), "must be a number >= 0"),
    # attention alone would take 1024^2 x 1e-5 = 10.5 ms of the 8 ms measured at 1024 tokens
    (_table(attention_ms_per_token2=1e-5), "attention alone would take 10.49 ms of the 8 ms measured for a 1024-token prefill"),
])
def test_bad_tables_are_refused(bad, says):
    with pytest.raises(ValueError, match=says):
        timing.table_from_dict(bad)


def test_a_table_without_an_attention_coefficient_takes_it_from_its_curve():
    """A user's table with batch-1 points only: the growth of ms per token between the last two points."""
    m = timing.table_from_dict(_table(prefill=[[1024, 25.0], [2048, 52.0], [4096, 110.0]])).models["x"]
    assert m.attention_ms_per_token2 == pytest.approx((110.0 / 4096 - 52.0 / 2048) / 2048)
    assert [m.prefill(t) for t in (1024, 2048, 4096)] == pytest.approx([25.0, 52.0, 110.0])
    # a flat or sublinear curve has no attention term
    flat = timing.table_from_dict(_table(prefill=[[128, 5.0], [1024, 5.0]])).models["x"]
    assert flat.attention_ms_per_token2 == 0.0


# ---------------------------------------------------------------- model selection and scaling


def _config(path):
    return json.loads((path / "config.json").read_text())


def test_param_estimates_and_nearest_model():
    table = timing.load_table()
    p8 = timing.estimate_params(timing.shape_from_hf_config(_config(LLAMA_8B)))
    p70 = timing.estimate_params(timing.shape_from_hf_config(_config(LLAMA_70B)))
    assert p8 == pytest.approx(8.03e9, rel=0.01) and p70 == pytest.approx(70.6e9, rel=0.01)
    assert table.nearest(p8).name == "llama3-8b" and table.nearest(p70).name == "llama3-70b"
    assert table.nearest(13e9).name == "llama3-8b" and table.nearest(34e9).name == "llama3-70b"


def test_exact_shapes_scale_by_one_and_others_by_params():
    table = timing.load_table()
    assert timing.build_timing_model(table, _config(LLAMA_8B)).param_scale == pytest.approx(1.0)
    assert timing.build_timing_model(table, _config(LLAMA_70B)).param_scale == pytest.approx(1.0)
    bigger = {**_config(LLAMA_8B), "num_hidden_layers": 48}
    tm = timing.build_timing_model(table, bigger)
    assert tm.model.name == "llama3-8b" and 1.4 < tm.param_scale < 1.5


def test_tp_speed_scale_and_transfer():
    table = timing.load_table()
    cfg = _config(LLAMA_70B)
    one = timing.build_timing_model(table, cfg)
    four = timing.build_timing_model(table, cfg, tp=4, tp_efficiency=0.85)
    assert four.prefill_seconds(2048) == pytest.approx(one.prefill_seconds(2048) / (4 * 0.85))
    half = timing.build_timing_model(table, cfg, time_scale=0.5)
    assert half.decode_seconds(8, 1024) == pytest.approx(one.decode_seconds(8, 1024) / 2)
    zero = timing.build_timing_model(table, cfg, time_scale=0.0)
    assert zero.iteration_seconds([(0, 8192)], 64, 4096) == 0.0 and zero.transfer_seconds(10**9) == 0.0
    assert one.transfer_seconds(50 * 10**9) == pytest.approx(1.0)  # 50 GB at the default 50 GB/s
    assert one.transfer_seconds(50 * 10**9, link_bytes_per_s=25e9) == pytest.approx(2.0)  # slower end wins
    assert one.iteration_seconds([(0, 1024)], 8, 1024) == pytest.approx(
        one.prefill_seconds(1024) + one.decode_seconds(8, 1024))


# ---------------------------------------------------------------- deterministic output


def test_tokens_are_deterministic_and_in_vocab():
    seed = Prompt.of([1, 2, 3]).seed
    # a prompt read as JSON text (cut out of a body, whatever its spacing) and one given as ints have the same seed
    _, raw, count = cut_id_list(b'{"prompt": [1, 2,\n3]}', b'"prompt"', "prompt")
    assert seed == Prompt(raw[1:-1], count).seed != Prompt.of([1, 2, 4]).seed
    assert json.loads(Prompt.of([1, 2, 3]).ids_json) == [1, 2, 3] and Prompt.of([1, 2, 3]).length == 3
    ids = [token_at(seed, i, 128_256) for i in range(50)]
    assert ids == [token_at(seed, i, 128_256) for i in range(50)]
    assert all(0 <= t < 128_256 for t in ids) and len(set(ids)) > 40
    assert token_text(ids[0]).startswith(" ") and token_text(ids[0]) == token_text(ids[0])


# ---------------------------------------------------------------- on a running worker


def _median_duration(engine, body, runs=3) -> float:
    durations = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.complete(body)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


@pytest.fixture(scope="module")
def realtime(engines):
    return engines.start(worker_yaml(ctx=True), "--sim-speed", "2")


def test_longer_prompt_prefills_longer(realtime):
    # modelled: ~7.6 ms vs ~104 ms (x2 time scale); compare, never threshold
    short = _median_duration(realtime, {"prompt": list(range(1, 129)), "max_tokens": 1})
    long = _median_duration(realtime, {"prompt": list(range(1, 4097)), "max_tokens": 1})
    assert long > short


def test_more_tokens_decode_longer(realtime):
    few = _median_duration(realtime, {"prompt": [5, 6, 7], "max_tokens": 2})
    many = _median_duration(realtime, {"prompt": [5, 6, 7], "max_tokens": 40})
    assert many > few


def test_kv_transfer_time_grows_with_prompt(engines):
    slow_link = ("--sim-link-gbps", "1", "--sim-speed", "1")  # 1 Gbit/s = 125 MB/s
    ctx = engines.start(worker_yaml(ctx=True), *slow_link)
    gen = engines.start(worker_yaml(ctx=False), *slow_link)

    def transfer_time(prompt_len: int) -> float:
        gen.get("/perf_metrics")
        _, (status, _) = handoff(ctx, gen, {"prompt": list(range(1, prompt_len + 1)), "max_tokens": 2})
        assert status == 200
        (rec,) = [r for r in gen.get("/perf_metrics")[1] if r["request_type"] == "generation_only"]
        t = rec["perf_metrics"]["timing_metrics"]
        assert t["kv_cache_size"] == -(-prompt_len // 32) * 32 * 131_072  # whole blocks of 32 tokens
        return t["kv_cache_transfer_end"] - t["kv_cache_transfer_start"]

    small, large = transfer_time(16), transfer_time(256)  # modelled: ~34 ms (one block) vs ~268 ms
    assert large > small
    assert not math.isclose(large, small, rel_tol=0.5)


def test_kv_transfer_runs_over_as_many_nics_as_the_side_with_fewer_kv_ranks_has(engines):
    """One NIC per GPU: the KV of a prompt moves twice as fast between TP 2 workers as between TP 1 ones
    (each rank sends its half of the KV heads), and from TP 2 to TP 1 no faster than TP 1 to TP 1."""
    # 0.25 Gbit/s = 31 MB/s per GPU: transfers of about a second, which a busy machine stretches by little
    slow_link = ("--sim-link-gbps", "0.25", "--sim-speed", "1")

    def transfer_time(ctx_tp: str, gen_tp: str) -> float:
        ctx = engines.start(worker_yaml(ctx=True), *slow_link, "--tp_size", ctx_tp)
        gen = engines.start(worker_yaml(ctx=False), *slow_link, "--tp_size", gen_tp)
        gen.get("/perf_metrics")
        _, (status, _) = handoff(ctx, gen, {"prompt": list(range(1, 257)), "max_tokens": 2})
        assert status == 200
        (rec,) = [r for r in gen.get("/perf_metrics")[1] if r["request_type"] == "generation_only"]
        t = rec["perf_metrics"]["timing_metrics"]
        return t["kv_cache_transfer_end"] - t["kv_cache_transfer_start"]

    one, two, mixed = transfer_time("1", "1"), transfer_time("2", "2"), transfer_time("2", "1")  # ~1.07/0.54/1.07 s
    assert 0.35 < two / one < 0.65
    assert 0.8 < mixed / one < 1.25


# ---------------------------------------------------------------- chunked prefill


def chunks_of(prompt: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, prompt)) for start in range(0, prompt, size)]


def test_chunks_of_a_prompt_add_up_to_about_one_full_prefill():
    """A later chunk [start, end) is charged the attention its tokens add over the prefix, c x (end^2 -
    start^2), so the chunks of one prompt cost about one full-length prefill (the linear part is linear to
    a few percent above 1K tokens)."""
    model = timing.load_table().models["llama3-8b"]
    for prompt, size in [(8192, 2048), (16384, 4096), (12000, 3000), (65536, 8192)]:
        total = sum(model.prefill_pass([chunk]) for chunk in chunks_of(prompt, size))
        assert 0.97 * model.prefill(prompt) < total < 1.03 * model.prefill(prompt)
    # a chunk at the end of a long prompt costs more than the same number of fresh tokens (its attention
    # covers the whole prefix), and more than a chunk at the start
    assert model.prefill_pass([(14336, 16384)]) > model.prefill_pass([(2048, 4096)]) > model.prefill(2048)
    assert model.prefill_pass([(0, 3000)]) == model.prefill(3000)


def test_small_chunks_cost_a_little_more_than_one_pass():
    """Where the curve is flat (a small pass is bound by weight reads) a chunk costs at least a pass over its
    tokens, so small chunks add up to a little more than one full prefill."""
    model = timing.load_table().models["llama3-8b"]
    chunks = chunks_of(2048, 512)
    assert all(model.prefill_pass([chunk]) >= model.prefill(512) for chunk in chunks)
    total = sum(model.prefill_pass([chunk]) for chunk in chunks)
    assert model.prefill(2048) < total < 1.1 * model.prefill(2048)


def test_a_batch_of_prompts_costs_what_the_calibration_measured():
    """Tokens attend only to their own prompt: a pass over B prompts of T tokens costs less than one prompt
    of B x T tokens, by the attention between prompts. The calibration's batched points, which the batch-1
    curve alone overestimated by 6-20%, are reproduced to within 2%."""
    table = timing.load_table()
    for model in table.models.values():
        points = _shipped_batched(model.name)
        assert sorted((p["batch"], p["tokens"]) for p in points) == [(4, 4096), (8, 1024), (16, 512)]
        for p in points:
            B, T, measured = p["batch"], p["tokens"], p["ms"]
            assert model.prefill(B * T) > 1.05 * measured  # one long prompt of the same tokens
            assert model.prefill_pass([(0, T)] * B) == pytest.approx(measured, rel=0.02)
        # a mixed pass: fresh prompts and a later chunk are each charged their own attention
        mixed = model.prefill_pass([(0, 256), (4096, 4352)])
        assert model.prefill_pass([(0, 512)]) < mixed < model.prefill_pass([(0, 256)]) + model.prefill_pass([(4096, 4352)])


def _shipped_batched(name: str) -> list[dict]:
    return json.loads(timing.DEFAULT_TABLE_PATH.read_text())["models"][name]["prefill_batched"]


def test_long_prompts_beyond_the_table_grow_quadratically():
    """Above the longest measured prompt the attention term keeps its T^2 growth instead of the last
    segment's slope: a 64K prompt costs more than 4x a 16K one, and less than 16x."""
    model = timing.load_table().models["llama3-8b"]
    ratio = model.prefill(65536) / model.prefill(16384)
    assert 5.0 < ratio < 16.0
    values = [model.prefill(t) for t in range(100, 140_000, 97)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_iteration_seconds_with_chunks_scales_like_the_rest():
    table = timing.load_table()
    tm = timing.build_timing_model(table, _config(LLAMA_8B), time_scale=2.0)
    assert tm.iteration_seconds([(2048, 4096)], 4, 1024) == pytest.approx(
        tm.model.prefill_pass([(2048, 4096)]) * 2 / 1000 + tm.decode_seconds(4, 1024))
    assert tm.iteration_seconds([(0, 1024)], 0, 0.0) == pytest.approx(tm.prefill_seconds(1024))
    assert tm.iteration_seconds([], 0, 0.0) == 0.0


def _ttft(engine, prompt_len: int) -> tuple[float, dict]:
    engine.get("/perf_metrics")
    engine.complete({"prompt": list(range(1, prompt_len + 1)), "max_tokens": 1})
    (rec,) = [r for r in engine.get("/perf_metrics")[1] if r["status"] == "ok"]
    t = rec["perf_metrics"]["timing_metrics"]
    return t["first_token_time"] - t["first_scheduled_time"], rec["perf_metrics"]


def test_chunked_prefill_ttft_grows_with_the_chunks(engines):
    """TTFT of a chunked prompt = its chunks' iterations, one after the other; each chunk is timed on the
    calibrated curve, so a prompt of twice the chunks takes longer, and never less than the modelled sum."""
    speed = 2.0
    engine = engines.start(worker_yaml(ctx=True, max_num_tokens=2048, max_seq_len=16384, enable_chunked_prefill=True),
                           "--sim-speed", str(speed))
    model = timing.load_table().models["llama3-8b"]

    def modelled(prompt: int) -> float:
        return sum(model.prefill_pass([chunk]) for chunk in chunks_of(prompt, 2048)) / 1000 * speed

    short, short_perf = _ttft(engine, 4096)  # 2 chunks, modelled ~208 ms at x2
    long, long_perf = _ttft(engine, 8192)  # 4 chunks, modelled ~456 ms at x2
    assert long_perf["last_iter"] - long_perf["first_iter"] == 3 and short_perf["last_iter"] - short_perf["first_iter"] == 1
    assert long > short
    assert short >= 0.95 * modelled(4096) and long >= 0.95 * modelled(8192)
    assert modelled(8192) == pytest.approx(model.prefill(8192) / 1000 * speed, rel=0.03)  # ~ one full-length prefill


class _RecordingTiming:
    """Wraps a TimingModel: records the prefill spans of each iteration the engine loop asks the time of."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.spans: list[list[tuple[int, int]]] = []

    def iteration_seconds(self, spans, decode_batch, mean_context):
        if spans:
            self.spans.append(list(spans))
        return self.inner.iteration_seconds(spans, decode_batch, mean_context)


def _engine_with_recorder(tmp_path, **options):
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(worker_yaml(ctx=False, **options)))
    cfg = load_config([str(LLAMA_8B), "--host", "127.0.0.1", "--port", "0", "--extra_llm_api_options", str(path),
                       "--sim-speed", "0"])
    recorder = _RecordingTiming(cfg.timing)
    return Engine(dataclasses.replace(cfg, timing=recorder)), recorder


def test_the_engine_times_each_prompt_of_a_pass_by_its_own_positions(tmp_path):
    """The engine loop hands the timing model one (start, end) span per sequence it prefills in an
    iteration: a batch of whole prompts as separate spans, and a chunked prompt's later chunks from where
    the prefix ends, so each is charged its own attention."""
    async def go(options, prompts):
        engine, recorder = _engine_with_recorder(tmp_path, **options)
        seqs = [engine.submit(kind=CTX_AND_GEN, prompt=Prompt.of(list(range(1, n + 1))), max_tokens=2, stream=True)
                for n in prompts]
        engine.start()
        try:
            for seq in seqs:
                while not seq.finished:
                    seq.changed.clear()
                    await asyncio.wait_for(seq.changed.wait(), 10)
        finally:
            await engine.stop()
        return recorder.spans

    batch = asyncio.run(go({"max_num_tokens": 8192}, [1024] * 4 + [512]))
    assert batch[0] == [(0, 1024)] * 4 + [(0, 512)]
    chunked = asyncio.run(go({"max_num_tokens": 2048, "max_seq_len": 8192, "enable_chunked_prefill": True}, [5000]))
    assert chunked == [[(0, 2048)], [(2048, 4096)], [(4096, 5000)]]


def test_chunked_prefill_fills_what_a_cut_chunk_leaves_with_later_prompts(tmp_path):
    """TensorRT-LLM's FIRST_COME_FIRST_SERVED chunking (MicroBatchScheduler::setCtxRequestsChunkSize) gives each
    prompt in turn what is left of the iteration's budget, not only the first: after a chunk cut to whole units
    of tokens_per_block (500 -> 480), a later prompt that fits the 20 tokens left is prefilled in the same
    pass; one that does not waits, and the one after it still gets its turn."""
    async def go(prompts):
        engine, recorder = _engine_with_recorder(tmp_path, max_num_tokens=500, max_seq_len=8192,
                                                 enable_chunked_prefill=True)
        seqs = [engine.submit(kind=CTX_AND_GEN, prompt=Prompt.of(list(range(1, n + 1))), max_tokens=1)
                for n in prompts]
        engine.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(s.done for s in seqs)), 10)
        finally:
            await engine.stop()
        return recorder.spans

    spans = asyncio.run(go([1000, 30, 12]))
    # 30 tokens do not fit the 20 left, and 20 is no whole unit: that prompt gets nothing; the 12 after it fit
    assert spans == [[(0, 480), (0, 12)], [(480, 960)], [(960, 1000), (0, 30)]]
