"""The simulator's timing model: how long a prefill, a decode step and a KV transfer take.

Measured (the table, by default `timing_h200.json`, derived from shared/calibration/h200-llama3-shapes.json):
- prefill time of one forward pass over one prompt, by its length (the batch-1 curve), and the attention
  coefficient that splits it into a part linear in the tokens of the pass and a part quadratic in each
  sequence's own length (fitted to the batched prefill points: `ModelTiming.prefill_pass`);
- decode-step time as a function of the batch size and the context length per sequence.
Assumed (documented in docs/engine-simulator.md):
- another model scales the nearest calibrated model's times by the ratio of parameter counts;
- tensor parallelism of N divides times by N x efficiency (default 0.85); pipeline parallelism does not
  change the time of one iteration;
- a mixed iteration costs prefill + decode (no fusion discount);
- a pass's tokens attend only to their own sequence: a batch of prompts costs the pass over all their
  tokens plus each prompt's own attention, and a chunk of a chunked prefill (enable_chunked_prefill) over
  prompt positions [start, end) is charged the attention it adds, c x (end^2 - start^2);
- KV transfer time = KV bytes / link rate (a context worker's transfers share its link, one after
  another: `Engine.pull_seconds`; a generation worker receives one request's KV at a time: `KVPuller`),
  plus `--sim-dynamic-buffer-ms` (default 2 ms, an estimate) on each side whose pre-allocated transfer
  buffer the KV does not fit (UCX then sends through a buffer allocated for that transfer; NIXL cannot,
  and the transfer fails).
Every modelled delay is multiplied by the time scale (`--sim-speed`; 0 = no delays at all).

Interpolation is log-log between table points, clamped below the first point (small work costs what the
smallest measured shape costs: weight reads dominate there) and extrapolated above the last point with the
slope of the last segment (never decreasing), except decode time, which is extrapolated linearly: beyond
the longest measured context each sequence reads `kv_slope` ms more per cached token (the median rate the
decode grid measures, `ModelTiming.kv_slope_ms_per_token`), and beyond the largest measured batch each
added sequence costs what the last batch segment measured per sequence, never less than reading its KV.
A log-log extrapolation of a segment still partly bound by weight reads grows too slowly: it had Llama-3-8B
decode 4 sequences of 128K context in 11.5 ms, 7.4 TB/s of HBM reads on an H200 that peaks at 4.8 TB/s.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEFAULT_TABLE_PATH = Path(__file__).with_name("timing_h200.json")
LLAMA3_VOCAB = 128_256


def interp_loglog(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """y at x from ascending points (xs, ys), log-log; clamped below xs[0], edge-slope extrapolation above."""
    if not xs:
        raise ValueError("empty table")
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        if len(xs) < 2:
            return ys[-1]
        slope = math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])
        return ys[-1] * (x / xs[-1]) ** max(slope, 0.0)
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    t = math.log(x / x0) / math.log(x1 / x0)
    return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))


def estimate_params(shape: Mapping[str, object]) -> float:
    """Dense decoder parameter count from a shape: embeddings (+ untied LM head) and per-layer attention + MLP."""
    hidden = float(shape["hidden"])  # type: ignore[arg-type]
    layers = float(shape["layers"])  # type: ignore[arg-type]
    heads = float(shape.get("heads") or 1)  # type: ignore[arg-type]
    head_dim = float(shape.get("head_dim") or hidden / heads)  # type: ignore[arg-type]
    kv_heads = float(shape.get("kv_heads") or heads)  # type: ignore[arg-type]
    intermediate = float(shape.get("intermediate") or 4 * hidden)  # type: ignore[arg-type]
    vocab = float(shape.get("vocab") or LLAMA3_VOCAB)  # type: ignore[arg-type]
    embeddings = vocab * hidden * (1 if shape.get("tie_embeddings") else 2)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    return embeddings + layers * (attention + mlp)


def shape_from_hf_config(config: Mapping[str, object]) -> dict:
    """The estimate_params shape of a Hugging Face config.json (text_config for multimodal checkpoints)."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]  # type: ignore[assignment]
    hidden = int(config["hidden_size"])  # type: ignore[arg-type]
    heads = int(config.get("num_attention_heads") or 1)  # type: ignore[arg-type]
    return {
        "hidden": hidden,
        "layers": int(config["num_hidden_layers"]),  # type: ignore[arg-type]
        "heads": heads,
        "kv_heads": int(config.get("num_key_value_heads") or heads),  # type: ignore[arg-type]
        "head_dim": int(config.get("head_dim") or hidden // heads),  # type: ignore[arg-type]
        "intermediate": int(config.get("intermediate_size") or 4 * hidden),  # type: ignore[arg-type]
        "vocab": int(config.get("vocab_size") or LLAMA3_VOCAB),  # type: ignore[arg-type]
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


@dataclass(frozen=True)
class ModelTiming:
    """One calibrated model: prefill curve and a full decode grid, times in milliseconds on one GPU.

    A prefill pass splits into a part linear in its tokens (weights, projections, MLP: `linear_ms` by pass
    size, interpolated) and attention, which is quadratic in each sequence's own length: a sequence whose
    pass covers prompt positions [start, end) adds `attention_ms_per_token2` x (end^2 - start^2). The
    linear points are the batch-1 curve minus its attention, so one whole prompt costs what the batch-1
    curve says at every measured length."""

    name: str
    shape: Mapping[str, object]
    prefill_tokens: tuple[float, ...]
    prefill_ms: tuple[float, ...]
    decode_batches: tuple[float, ...]
    decode_contexts: tuple[float, ...]
    decode_grid_ms: tuple[tuple[float, ...], ...]  # [batch index][context index]
    attention_ms_per_token2: float = 0.0
    # ms one decode step spends per cached token of one sequence once KV reads dominate (table_from_calibration's
    # kv_slope): what decode grows by beyond the table (`decode`). None: estimated from the grid (`grid_kv_slope`).
    kv_slope_ms_per_token: float | None = None

    @property
    def params(self) -> float:
        return estimate_params(self.shape)

    @cached_property
    def linear_ms(self) -> tuple[float, ...]:
        """The batch-1 curve without its attention term, at the same token counts."""
        c = self.attention_ms_per_token2
        return tuple(ms - c * t * t for t, ms in zip(self.prefill_tokens, self.prefill_ms))

    def prefill(self, tokens: float) -> float:
        """Milliseconds for one prefill pass over one prompt of `tokens` tokens (nothing cached before it)."""
        if tokens <= 0:
            return 0.0
        return self.prefill_pass(((0.0, tokens),))

    def prefill_pass(self, spans: Sequence[tuple[float, float]]) -> float:
        """Milliseconds for the context part of one iteration.

        `spans`: for each sequence prefilled in the pass, the prompt positions (start, end) it covers; start
        is 0 for a whole prompt or a first chunk, and the number of tokens already in the KV cache for a
        later chunk of a chunked prefill. The pass costs the linear part over all its tokens plus each
        sequence's attention, c x (end^2 - start^2): tokens attend to their own sequence only, so a batch of
        short prompts costs less than one prompt of the same total, and a chunk late in a long prompt more
        than the same number of fresh tokens. The chunks of one prompt add up to about one full-length
        prefill (a little more where the linear part is flat: small passes are bound by weight reads)."""
        tokens = sum(end - start for start, end in spans)
        if tokens <= 0:
            return 0.0
        c = self.attention_ms_per_token2
        attention = c * sum(end * end - start * start for start, end in spans)
        return interp_loglog(self.prefill_tokens, self.linear_ms, tokens) + attention

    @cached_property
    def kv_slope(self) -> float:
        """ms per cached token read by one sequence in a decode step: the table's, else the grid's estimate."""
        if self.kv_slope_ms_per_token is not None:
            return self.kv_slope_ms_per_token
        return grid_kv_slope(self.decode_batches, self.decode_contexts, self.decode_grid_ms)

    def decode(self, batch: float, context: float) -> float:
        """Milliseconds for one decode step of `batch` sequences with `context` cached tokens each.

        Inside the grid: log-log interpolation along the context axis in each batch row, then along the batch
        axis (the measured points exactly). Beyond it, linear growth, as KV reads make it:
        - past the longest measured context C_last, a row of batch b grows by kv_slope x b x (C - C_last), the
          KV the longer contexts add (the rule table_from_calibration fills unmeasured cells with);
        - past the largest measured batch, each added sequence costs what the last batch segment measured per
          sequence at this context, and at least kv_slope x C (reading its own KV).
        Both keep the HBM bandwidth a step implies at about what the table measures at its edge."""
        if batch <= 0:
            return 0.0
        context = max(context, 1.0)
        contexts, batches = self.decode_contexts, self.decode_batches
        slope = self.kv_slope
        if context > contexts[-1]:
            extra = slope * (context - contexts[-1])
            rows = [row[-1] + extra * b for b, row in zip(batches, self.decode_grid_ms)]
        else:
            rows = [interp_loglog(contexts, row, context) for row in self.decode_grid_ms]
        if batch <= batches[-1]:
            return interp_loglog(batches, rows, batch)
        per_sequence = slope * context
        if len(batches) >= 2:
            per_sequence = max(per_sequence, (rows[-1] - rows[-2]) / (batches[-1] - batches[-2]))
        return rows[-1] + per_sequence * (batch - batches[-1])


@dataclass(frozen=True)
class TimingTable:
    models: Mapping[str, ModelTiming]
    provenance: Mapping[str, object]

    def nearest(self, params: float) -> ModelTiming:
        """The calibrated model whose parameter count is nearest to `params` on a log scale."""
        return min(self.models.values(), key=lambda m: abs(math.log(params / m.params)))


def attention_from_batched(prefill: Sequence[tuple[float, float]], batched: Sequence[Mapping[str, float]]) -> float | None:
    """The attention coefficient (ms per token^2) the batched prefill points measure, or None without any.

    B prompts of T tokens in one pass cost the linear part over B x T tokens plus B x c x T^2, while one
    prompt of B x T tokens costs the same linear part plus c x (B x T)^2: the batch-1 curve at B x T minus
    the batched time is c x B x (B - 1) x T^2. The median over the batched points is taken."""
    tokens = [t for t, _ in prefill]
    ms = [m for _, m in prefill]
    estimates = [
        (interp_loglog(tokens, ms, p["batch"] * p["tokens"]) - p["ms"]) / (p["batch"] * (p["batch"] - 1) * p["tokens"] ** 2)
        for p in batched
        if p["batch"] > 1 and p["tokens"] > 0
    ]
    return max(statistics.median(estimates), 0.0) if estimates else None


def attention_from_curve(tokens: Sequence[float], ms: Sequence[float]) -> float:
    """The attention coefficient the batch-1 curve implies when no batched point says otherwise: the growth
    of the time per token between its last two points (the linear part's time per token being constant
    there), kept small enough that the linear part stays at least a tenth of every measured point."""
    if len(tokens) < 2:
        return 0.0
    (t1, t2), (m1, m2) = tokens[-2:], ms[-2:]
    return _within_curve(max((m2 / t2 - m1 / t1) / (t2 - t1), 0.0), tokens, ms)


def _within_curve(attention: float, tokens: Sequence[float], ms: Sequence[float]) -> float:
    """`attention`, lowered where needed so that the linear part stays at least a tenth of every measured
    point of the batch-1 curve."""
    return min(attention, 0.9 * min(m / (t * t) for t, m in zip(tokens, ms)))


def grid_kv_slope(batches: Sequence[float], contexts: Sequence[float], grid: Sequence[Sequence[float]]) -> float:
    """The median over neighbouring cells of a decode grid of ms per cached token read, (t1 - t0) / (b x (c1 -
    c0)); 0 without two contexts. The estimate for a table that does not give `kv_slope_ms_per_token`."""
    slopes = [(t1 - t0) / (b * (c1 - c0))
              for b, row in zip(batches, grid)
              for (c0, t0), (c1, t1) in zip(zip(contexts, row), zip(contexts[1:], row[1:]))]
    return max(statistics.median(slopes), 0.0) if slopes else 0.0


def _ascending(name: str, values: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out or any(v <= 0 for v in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be positive and strictly ascending, got {list(values)}")
    return out


def table_from_dict(data: Mapping[str, object]) -> TimingTable:
    """Parse either Baton's table format or a raw calibration file written by calibration/measure.py."""
    models_in = data.get("models")
    if not isinstance(models_in, Mapping) or not models_in:
        raise ValueError("timing table has no 'models'")
    first = next(iter(models_in.values()))
    if isinstance(first, Mapping) and isinstance(first.get("prefill"), list) and first["prefill"] and isinstance(
        first["prefill"][0], Mapping
    ):
        data = table_from_calibration(data)
        models_in = data["models"]  # type: ignore[assignment]
    models: dict[str, ModelTiming] = {}
    for name, m in models_in.items():  # type: ignore[union-attr]
        prefill = sorted((float(t), float(ms)) for t, ms in m["prefill"])
        decode = m["decode"]
        batches = _ascending(f"{name}.decode.batches", decode["batches"])
        contexts = _ascending(f"{name}.decode.contexts", decode["contexts"])
        grid = tuple(tuple(float(v) for v in row) for row in decode["ms"])
        if len(grid) != len(batches) or any(len(row) != len(contexts) for row in grid):
            raise ValueError(f"{name}.decode.ms must be a {len(batches)}x{len(contexts)} grid")
        if any(v <= 0 for row in grid for v in row) or any(ms <= 0 for _, ms in prefill):
            raise ValueError(f"{name}: times must be positive")
        prefill_tokens = _ascending(f"{name}.prefill tokens", [t for t, _ in prefill])
        prefill_ms = tuple(ms for _, ms in prefill)
        attention = m.get("attention_ms_per_token2")
        if attention is None:
            attention = attention_from_curve(prefill_tokens, prefill_ms)
        elif isinstance(attention, bool) or not isinstance(attention, (int, float)) or attention < 0:
            raise ValueError(f"{name}.attention_ms_per_token2 must be a number >= 0, got {attention!r}")
        for t, ms in zip(prefill_tokens, prefill_ms):
            if attention * t * t >= ms:
                raise ValueError(
                    f"{name}.attention_ms_per_token2={attention} is too large: attention alone would take "
                    f"{attention * t * t:.4g} ms of the {ms:.4g} ms measured for a {t:.0f}-token prefill")
        kv_slope = m.get("kv_slope_ms_per_token")
        if kv_slope is not None and (isinstance(kv_slope, bool) or not isinstance(kv_slope, (int, float))
                                     or kv_slope < 0):
            raise ValueError(f"{name}.kv_slope_ms_per_token must be a number >= 0, got {kv_slope!r}")
        models[name] = ModelTiming(
            name=name,
            shape=dict(m["shape"]),
            prefill_tokens=prefill_tokens,
            prefill_ms=prefill_ms,
            decode_batches=batches,
            decode_contexts=contexts,
            decode_grid_ms=grid,
            attention_ms_per_token2=float(attention),
            kv_slope_ms_per_token=None if kv_slope is None else float(kv_slope),
        )
    return TimingTable(models=models, provenance=dict(data.get("provenance") or {}))  # type: ignore[arg-type]


def load_table(path: Path | None = None) -> TimingTable:
    path = Path(path) if path is not None else DEFAULT_TABLE_PATH
    return table_from_dict(json.loads(path.read_text(encoding="utf-8")))


def table_from_calibration(raw: Mapping[str, object], *, source: str = "calibration file") -> dict:
    """Turn measure.py output into Baton's table format.

    - prefill: the batch-1 points (tokens -> ms_full_est), and the attention coefficient the batched points
      measure (`attention_from_batched`); each batched point is kept with what the model gives for it;
    - decode: the (batch, context) points (ms_step_full_est, CUDA-graph replay) on the full grid of measured
      batches x contexts; a missing cell is filled from the nearest measured context in the same batch row
      plus `kv_slope x batch x (context difference)`, where kv_slope is the median over measured neighbours
      of ms per cached token read (decode time grows with batch x context once KV reads dominate).
    """
    out_models: dict[str, dict] = {}
    filled_notes: dict[str, list] = {}
    for name, m in raw["models"].items():  # type: ignore[union-attr]
        shape = {
            "hidden": m["hidden"],
            "layers": m.get("layers_full", m.get("layers")),
            "heads": m["heads"],
            "kv_heads": m["kv_heads"],
            "head_dim": m["head_dim"],
            "intermediate": m["intermediate"],
            "vocab": m.get("vocab", LLAMA3_VOCAB),
            "tie_embeddings": False,
        }
        prefill = sorted((p["tokens"], round(p["ms_full_est"], 4)) for p in m["prefill"] if p["batch"] == 1)
        batched = [
            {"batch": p["batch"], "tokens": p["tokens"], "ms": round(p["ms_full_est"], 4)}
            for p in m["prefill"]
            if p["batch"] != 1
        ]
        measured = {(d["batch"], d["context"]): d["ms_step_full_est"] for d in m["decode"]}
        batches = sorted({b for b, _ in measured})
        contexts = sorted({c for _, c in measured})
        slopes = []
        for b in batches:
            row = [(c, measured[(b, c)]) for c in contexts if (b, c) in measured]
            for (c0, t0), (c1, t1) in zip(row, row[1:]):
                slopes.append((t1 - t0) / (b * (c1 - c0)))
        kv_slope = max(statistics.median(slopes), 0.0) if slopes else 0.0
        grid = []
        filled = []
        for b in batches:
            row_measured = [c for c in contexts if (b, c) in measured]
            row = []
            for c in contexts:
                if (b, c) in measured:
                    row.append(round(measured[(b, c)], 4))
                    continue
                c0 = min(row_measured, key=lambda cm: abs(math.log(c / cm)))
                row.append(round(measured[(b, c0)] + kv_slope * b * (c - c0), 4))
                filled.append([b, c])
            grid.append(row)
        curve_tokens, curve_ms = [t for t, _ in prefill], [ms for _, ms in prefill]
        attention = attention_from_batched(prefill, batched)
        if attention is None:
            attention = attention_from_curve(curve_tokens, curve_ms)
        attention = float(f"{_within_curve(attention, curve_tokens, curve_ms):.6g}")
        linear = [ms - attention * t * t for t, ms in prefill]
        for p in batched:
            total = p["batch"] * p["tokens"]
            p["modelled_ms"] = round(interp_loglog(curve_tokens, linear, total)
                                     + attention * p["batch"] * p["tokens"] ** 2, 4)
        out_models[name] = {
            "shape": shape,
            "prefill": [[t, ms] for t, ms in prefill],
            "attention_ms_per_token2": attention,
            "prefill_batched": batched,
            "decode": {"batches": batches, "contexts": contexts, "ms": grid, "filled_cells": filled},
            "kv_slope_ms_per_token": kv_slope,
        }
        filled_notes[name] = filled
    provenance = {
        "source": source,
        "device": raw.get("device"),
        "torch": raw.get("torch"),
        "dtype": raw.get("dtype"),
        "note": raw.get("note"),
        "method": (
            "prefill = batch-1 ms_full_est by prompt tokens; attention_ms_per_token2 = median over the batched "
            "prefill points of (batch-1 ms at batch x tokens - batched ms) / (batch x (batch - 1) x tokens^2), "
            "each batched point kept with the model's modelled_ms; decode = ms_step_full_est (CUDA graph) on the "
            "batch x context grid; cells listed in decode.filled_cells were not measured and are filled from "
            "the nearest measured context in the same batch row + kv_slope_ms_per_token x batch x delta context"
        ),
    }
    return {"provenance": provenance, "models": out_models}


@dataclass(frozen=True)
class TimingModel:
    """Seconds for the engine's work, for one replica of one model, already multiplied by the time scale."""

    model: ModelTiming
    param_scale: float  # this model's parameters / the calibrated model's
    tp: int = 1
    tp_efficiency: float = 0.85
    time_scale: float = 1.0  # --sim-speed: 1 = calibrated real time, 0 = no delays
    link_bytes_per_s: float = 50e9
    dynamic_buffer_ms: float = 2.0  # --sim-dynamic-buffer-ms

    @property
    def tp_speedup(self) -> float:
        return 1.0 if self.tp <= 1 else self.tp * self.tp_efficiency

    def _seconds(self, ms: float) -> float:
        if self.time_scale == 0.0:
            return 0.0
        return ms / 1000.0 * self.param_scale / self.tp_speedup * self.time_scale

    def prefill_seconds(self, tokens: int) -> float:
        """One prefill pass over one prompt of `tokens` tokens."""
        return self._seconds(self.model.prefill(tokens))

    def decode_seconds(self, batch: int, mean_context: float) -> float:
        return self._seconds(self.model.decode(batch, mean_context))

    def iteration_seconds(self, prefill_spans: Sequence[tuple[int, int]], decode_batch: int,
                          mean_context: float) -> float:
        """One iteration: the prefill pass over `prefill_spans` ((start, end) prompt positions of each
        sequence prefilled, `ModelTiming.prefill_pass`) and one decode step of `decode_batch` sequences."""
        if self.time_scale == 0.0:
            return 0.0
        return self._seconds(self.model.prefill_pass(prefill_spans)) + self.decode_seconds(decode_batch, mean_context)

    def transfer_seconds(self, num_bytes: int, link_bytes_per_s: float | None = None, streams: int = 1) -> float:
        """`num_bytes` over the slower of this worker's and the peer's per-GPU link, `streams` GPU pairs
        sending their shares at once."""
        if self.time_scale == 0.0 or num_bytes <= 0:
            return 0.0
        rate = min(self.link_bytes_per_s, link_bytes_per_s or self.link_bytes_per_s) * max(1, streams)
        return num_bytes / rate * self.time_scale

    def dynamic_buffer_seconds(self) -> float:
        """What one side of a KV transfer adds when its KV does not fit the pre-allocated buffer and UCX sends
        it through a buffer allocated (and registered) for it."""
        return self.dynamic_buffer_ms / 1000.0 * self.time_scale


def build_timing_model(
    table: TimingTable,
    hf_config: Mapping[str, object],
    *,
    tp: int = 1,
    tp_efficiency: float = 0.85,
    time_scale: float = 1.0,
    link_bytes_per_s: float = 50e9,
    model_name: str | None = None,
    dynamic_buffer_ms: float = 2.0,
) -> TimingModel:
    """Pick the calibrated model (by name, else nearest by parameter count) and scale it to `hf_config`."""
    params = estimate_params(shape_from_hf_config(hf_config))
    if model_name:
        if model_name not in table.models:
            raise ValueError(f"timing table has no model {model_name!r} (it has {', '.join(table.models)})")
        model = table.models[model_name]
    else:
        model = table.nearest(params)
    return TimingModel(
        model=model,
        param_scale=params / model.params,
        tp=tp,
        tp_efficiency=tp_efficiency,
        time_scale=time_scale,
        link_bytes_per_s=link_bytes_per_s,
        dynamic_buffer_ms=dynamic_buffer_ms,
    )
