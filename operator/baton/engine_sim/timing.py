"""The simulator's timing model: how long a prefill, a decode step and a KV transfer take.

Measured (the table, by default `timing_h200.json`, derived from shared/calibration/h200-llama3-shapes.json):
- prefill time of one forward pass as a function of the total prompt tokens in the iteration;
- decode-step time as a function of the batch size and the context length per sequence.
Assumed (documented in docs/engine-simulator.md):
- another model scales the nearest calibrated model's times by the ratio of parameter counts;
- tensor parallelism of N divides times by N x efficiency (default 0.85); pipeline parallelism does not
  change the time of one iteration;
- a mixed iteration costs prefill + decode (no fusion discount);
- a chunk of a chunked prefill (enable_chunked_prefill) over prompt tokens [start, end) costs
  prefill(end) - prefill(start) on the batch-1 curve (its tokens attend to the `start` tokens before them),
  so the chunks of one prompt add up to one full-length prefill; an iteration never costs less than one
  pass over all of its context tokens, prefill(total) (`ModelTiming.prefill_with_chunks`);
- KV transfer time = KV bytes / link rate.
Every modelled delay is multiplied by the time scale (`--sim-speed`; 0 = no delays at all).

Interpolation is log-log between table points, clamped below the first point (small work costs what the
smallest measured shape costs: weight reads dominate there) and extrapolated above the last point with the
slope of the last segment (never decreasing).
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    """One calibrated model: prefill curve and a full decode grid, times in milliseconds on one GPU."""

    name: str
    shape: Mapping[str, object]
    prefill_tokens: tuple[float, ...]
    prefill_ms: tuple[float, ...]
    decode_batches: tuple[float, ...]
    decode_contexts: tuple[float, ...]
    decode_grid_ms: tuple[tuple[float, ...], ...]  # [batch index][context index]

    @property
    def params(self) -> float:
        return estimate_params(self.shape)

    def prefill(self, tokens: float) -> float:
        """Milliseconds for one prefill pass over `tokens` prompt tokens in total."""
        if tokens <= 0:
            return 0.0
        return interp_loglog(self.prefill_tokens, self.prefill_ms, tokens)

    def prefill_with_chunks(self, fresh_tokens: float, continued: Sequence[tuple[float, float]] = ()) -> float:
        """Milliseconds for the context part of one iteration.

        `fresh_tokens`: prompt tokens of whole prompts and of first chunks (nothing before them is cached);
        `continued`: (start, end) of each later chunk of a chunked prefill, whose tokens attend to the
        `start` prompt tokens already in the KV cache. A later chunk costs what the batch-1 curve adds from
        `start` to `end`, prefill(end) - prefill(start), so the chunks of one prompt sum to prefill(prompt).
        The iteration costs at least one pass over all its tokens, prefill(fresh + chunk tokens): where the
        curve is flat (small passes are bound by weight reads) a small chunk costs what a small pass costs.
        Without `continued` this is prefill(fresh_tokens)."""
        base = self.prefill(fresh_tokens)
        if not continued:
            return base
        marginal = sum(self.prefill(end) - self.prefill(start) for start, end in continued)
        total = fresh_tokens + sum(end - start for start, end in continued)
        return max(self.prefill(total), base + marginal)

    def decode(self, batch: float, context: float) -> float:
        """Milliseconds for one decode step of `batch` sequences with `context` cached tokens each."""
        if batch <= 0:
            return 0.0
        context = max(context, 1.0)
        rows = [interp_loglog(self.decode_contexts, row, context) for row in self.decode_grid_ms]
        return interp_loglog(self.decode_batches, rows, batch)


@dataclass(frozen=True)
class TimingTable:
    models: Mapping[str, ModelTiming]
    provenance: Mapping[str, object]

    def nearest(self, params: float) -> ModelTiming:
        """The calibrated model whose parameter count is nearest to `params` on a log scale."""
        return min(self.models.values(), key=lambda m: abs(math.log(params / m.params)))


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
        models[name] = ModelTiming(
            name=name,
            shape=dict(m["shape"]),
            prefill_tokens=_ascending(f"{name}.prefill tokens", [t for t, _ in prefill]),
            prefill_ms=tuple(ms for _, ms in prefill),
            decode_batches=batches,
            decode_contexts=contexts,
            decode_grid_ms=grid,
        )
    return TimingTable(models=models, provenance=dict(data.get("provenance") or {}))  # type: ignore[arg-type]


def load_table(path: Path | None = None) -> TimingTable:
    path = Path(path) if path is not None else DEFAULT_TABLE_PATH
    return table_from_dict(json.loads(path.read_text(encoding="utf-8")))


def table_from_calibration(raw: Mapping[str, object], *, source: str = "calibration file") -> dict:
    """Turn measure.py output into Baton's table format.

    - prefill: the batch-1 points (tokens -> ms_full_est); batched points are kept aside for reference only,
      since the model is a function of total tokens and batch-1 timings (which include one long sequence's
      attention) are the conservative choice;
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
        out_models[name] = {
            "shape": shape,
            "prefill": [[t, ms] for t, ms in prefill],
            "prefill_batched_reference": batched,
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
            "prefill = batch-1 ms_full_est by prompt tokens; decode = ms_step_full_est (CUDA graph) on the "
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

    @property
    def tp_speedup(self) -> float:
        return 1.0 if self.tp <= 1 else self.tp * self.tp_efficiency

    def _seconds(self, ms: float) -> float:
        if self.time_scale == 0.0:
            return 0.0
        return ms / 1000.0 * self.param_scale / self.tp_speedup * self.time_scale

    def prefill_seconds(self, total_tokens: int) -> float:
        return self._seconds(self.model.prefill(total_tokens))

    def decode_seconds(self, batch: int, mean_context: float) -> float:
        return self._seconds(self.model.decode(batch, mean_context))

    def iteration_seconds(self, prefill_tokens: int, decode_batch: int, mean_context: float,
                          continued_chunks: Sequence[tuple[int, int]] = ()) -> float:
        """One iteration: `prefill_tokens` fresh prompt tokens (whole prompts and first chunks), the later
        chunks `continued_chunks` ((start, end) prompt positions, `ModelTiming.prefill_with_chunks`) and one
        decode step of `decode_batch` sequences."""
        if self.time_scale == 0.0:
            return 0.0
        return (self._seconds(self.model.prefill_with_chunks(prefill_tokens, continued_chunks))
                + self.decode_seconds(decode_batch, mean_context))

    def transfer_seconds(self, num_bytes: int, link_bytes_per_s: float | None = None, streams: int = 1) -> float:
        """`num_bytes` over the slower of this worker's and the peer's per-GPU link, `streams` GPU pairs
        sending their shares at once."""
        if self.time_scale == 0.0 or num_bytes <= 0:
            return 0.0
        rate = min(self.link_bytes_per_s, link_bytes_per_s or self.link_bytes_per_s) * max(1, streams)
        return num_bytes / rate * self.time_scale


def build_timing_model(
    table: TimingTable,
    hf_config: Mapping[str, object],
    *,
    tp: int = 1,
    tp_efficiency: float = 0.85,
    time_scale: float = 1.0,
    link_bytes_per_s: float = 50e9,
    model_name: str | None = None,
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
    )
