"""One analysis pass over a model: statistics, figures and the W&B payload of one optimizer step.

Why separate from the Lightning callback: the same pass runs during training (``analysis.callbacks``, weights and
gradients every ``every_n_steps``) and once on a checkpoint (``mode=analyze``, ``analysis.run_study``). It only
reads: weights and gradients are copied (``detach``, float32/float64 copies), and a quantized layer's weight operand
is the one its forward GEMM multiplies (``analysis.quant_state``, round-to-nearest as the weight recipe says); no
tensor of the model is modified and no random number is drawn.

Four kinds of tensors, each with its own folder under ``plots/heatmaps/<run-name>/``:

=============  ============================  =================================================================
kind           folder                        what
=============  ============================  =================================================================
prequantize    weights/prequantize/          the weight as trained (every layer with a >= 2-D weight)
quantized      weights/quantized/            its NVFP4 codes and E4M3 block scales (NVFP4-quantized weights)
dequantized    weights/dequantized/          the decoded weight and its error (every quantized weight)
gradients      gradients/                    the weight gradient after AMP unscaling (every layer; norm scales too)
=============  ============================  =================================================================

Per step each folder gets ``layer_stats_step<N>`` (layers x statistics; colours scaled per column, values in the
tooltips and JSON) and one image per selected layer ``<layer>_step<N>`` (top-left crop of the 2-D operand); the
quantized folder also gets the code and scale histograms. ``over_steps_<stat>`` (layers x steps) is written from the
accumulated history at the end of training.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from analysis import quant_state, render, stats
from analysis.wandb_log import WandbPayload
from conf.schemas.analysis import AnalysisConfig

KIND_DIRS = {
    "prequantize": "weights/prequantize",
    "quantized": "weights/quantized",
    "dequantized": "weights/dequantized",
    "gradients": "gradients",
}
STATS_OF_KIND: dict[str, tuple[str, ...]] = {
    "prequantize": stats.TENSOR_STATS,
    "quantized": (*stats.CODE_STATS, "clip_rate"),
    "dequantized": (*stats.ERROR_STATS[:3], *stats.TENSOR_STATS),
    "gradients": stats.TENSOR_STATS,
}
# The statistics drawn as layers x steps heatmaps at the end of training.
OVER_STEPS: dict[str, tuple[str, ...]] = {
    "prequantize": ("absmax", "std", "kurtosis", "kurtosis_block_p99"),
    "quantized": ("code_entropy_bits", "scale_zero_rate", "scale_subnormal_rate", "clip_rate"),
    "dequantized": ("snr_db", "kurtosis"),
    "gradients": ("rms", "absmax", "kurtosis", "kurtosis_block_p99"),
}
DEFINITIONS = ("kurtosis = excess (Fisher) kurtosis m4/m2^2 - 3, biased moments (scipy fisher=True, bias=True); "
               "per tensor, per output channel (median/max), per 16-element block along the reduction dim "
               "(median/p99/max). SNR = 10 log10(sum x^2 / sum (x - x_hat)^2).")
ROW_COLUMNS = ("step", "kind", "layer", "type")
ALL_STATS = tuple(dict.fromkeys(s for kind in STATS_OF_KIND.values() for s in kind))


def file_stem(layer: str) -> str:
    """A file-name-safe layer name ("" -> "model")."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", layer) or "model"


def select_layers(names: Sequence[str], patterns: Sequence[str], limit: int) -> list[str]:
    """Names matching any fnmatch pattern; at most ``limit`` of them, evenly spaced (first and last kept)."""
    matches = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if limit <= 0 or not matches:
        return []
    if len(matches) <= limit:
        return matches
    picks = np.unique(np.round(np.linspace(0, len(matches) - 1, limit)).astype(int))
    return [matches[i] for i in picks]


def snapshot(t: torch.Tensor) -> np.ndarray:
    """A private CPU copy: a view of a float32 weight would change under the optimizer while a figure is drawn."""
    return t.detach().to("cpu", copy=True).numpy()


def _short(values: np.ndarray) -> list[list[float]]:
    """Image values with 6 significant digits (display data: keeps the JSON and HTML small)."""
    return [[float(f"{v:.6g}") for v in row] for row in values.tolist()]


@dataclass
class StepResult:
    """What one pass measured. ``rows``: one dict per (kind, layer) with ``ROW_COLUMNS`` and that kind's stats."""

    step: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    code_histograms: dict[str, list[int]] = field(default_factory=dict)  # layer -> counts of codes 0..15
    scale_histograms: dict[str, list[int]] = field(default_factory=dict)  # layer -> counts of E4M3 bytes 0..255
    crops: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)  # (kind, layer) -> images
    histogram_values: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (kind, layer) -> values


class Telemetry:
    """Measures a model and writes/logs the results of one step (see the module docstring for the layout)."""

    def __init__(self, cfg: AnalysisConfig, *, output_dir: Path, run_name: str) -> None:
        self.cfg = cfg
        self.root = Path(output_dir) / "plots" / "heatmaps" / run_name
        self._image_layers: list[str] | None = None

    def image_layers(self, model: nn.Module) -> list[str]:
        """Layers that get per-layer images: chosen among the quantized layers if any, else among all layers."""
        if self._image_layers is None:
            layers = quant_state.weight_layers(model)
            pool = [n for n, m in layers if quant_state.is_weight_quantized(m)] or [n for n, _ in layers]
            self._image_layers = select_layers(pool, self.cfg.image_layers, self.cfg.max_image_layers)
        return self._image_layers

    def collect(self, model: nn.Module, step: int, *, weights: bool = True, gradients: bool = True) -> StepResult:
        result = StepResult(step=step)
        chosen = set(self.image_layers(model))
        side = self.cfg.image_max_side
        with torch.no_grad():
            for name, module in quant_state.weight_layers(model):
                kind_type = quant_state.base_type(module)
                crop = name in chosen
                if weights:
                    self._collect_weight(result, name, kind_type, module, crop, side)
                grad = module.weight.grad
                if gradients and grad is not None:
                    g = quant_state.gemm_matrix(module, grad.detach()).to(torch.float32)  # [out, K]
                    result.rows.append(self._row(step, "gradients", name, kind_type, stats.tensor_stats(g)))
                    if crop:
                        result.crops[("gradients", name)] = {"gradient": snapshot(g[:side, :side])}
                        result.histogram_values[("gradients", name)] = snapshot(g.reshape(-1))
            for name, module in quant_state.vector_weight_layers(model) if gradients else ():
                grad = module.weight.grad
                if grad is not None:  # a norm's scale vector [C], as one row [1, C]
                    g = grad.detach().to(torch.float32).reshape(1, -1)
                    result.rows.append(self._row(step, "gradients", name, type(module).__name__,
                                                 stats.tensor_stats(g)))
        return result

    def _collect_weight(self, result: StepResult, name: str, kind_type: str, module: nn.Module, crop: bool,
                        side: int) -> None:
        step = result.step
        w = quant_state.weight_operand(module)  # float32 [M, K]
        result.rows.append(self._row(step, "prequantize", name, kind_type, stats.tensor_stats(w)))
        if crop:
            result.crops[("prequantize", name)] = {"raw": snapshot(w[:side, :side])}
            result.histogram_values[("prequantize", name)] = snapshot(w.reshape(-1))
        q = quant_state.layer_quantization(module)
        if q is None:
            return
        deq_row = {**stats.error_stats(q.raw, q.dequantized), **stats.tensor_stats(q.dequantized)}
        result.rows.append(self._row(step, "dequantized", name, kind_type, deq_row))
        raw, deq = q.raw[:side, :side], q.dequantized[:side, :side]
        if crop:
            result.crops[("dequantized", name)] = {"dequantized": snapshot(deq), "error": snapshot(deq - raw)}
        if not q.has_codes:
            return
        code_row = stats.code_stats(q.codes, q.scale_values, q.scale_subnormal)
        code_row["clip_rate"] = stats.clip_rate(q.raw, q.dequantized, q.grid_values.abs(), q.max_grid_magnitude)
        result.rows.append(self._row(step, "quantized", name, kind_type, code_row))
        result.code_histograms[name] = stats.code_histogram(q.codes).tolist()
        result.scale_histograms[name] = stats.byte_histogram(q.scale_bytes).tolist()
        if crop:
            result.crops[("quantized", name)] = {"codes": snapshot(q.grid_values[:side, :side])}

    @staticmethod
    def _row(step: int, kind: str, layer: str, kind_type: str, values: dict[str, float]) -> dict[str, Any]:
        return {"step": step, "kind": kind, "layer": layer, "type": kind_type, **values}

    # ----------------------------------------------------------------------------------------------- writing
    def write(self, result: StepResult) -> WandbPayload:
        """Write the step's figures (png/html/json) and return the W&B payload that shows them."""
        payload = WandbPayload()
        tag = f"step{result.step:07d}"
        for kind, folder in KIND_DIRS.items():
            rows = [r for r in result.rows if r["kind"] == kind]
            if not rows:
                continue
            columns = STATS_OF_KIND[kind]
            figure = render.Heatmap(
                title=f"{kind}: layers x statistics, step {result.step}",
                values=[[r.get(c, math.nan) for c in columns] for r in rows],
                row_labels=[r["layer"] or "model" for r in rows],
                col_labels=list(columns),
                normalize="column",
                note=DEFINITIONS,
            )
            png = render.save(figure, self.root / folder / f"layer_stats_{tag}")[0]
            payload.image(f"analysis/{folder}/layer_stats", png, f"step {result.step}")
        if result.code_histograms:
            payload.image("analysis/weights/quantized/code_histogram", self._write_code_histogram(result, tag),
                          f"step {result.step}")
            payload.image("analysis/weights/quantized/scale_histogram", self._write_scale_histogram(result, tag),
                          f"step {result.step}")
        for (kind, layer), images in result.crops.items():
            png = render.save(self._layer_figure(kind, layer, result.step, images),
                              self.root / KIND_DIRS[kind] / f"{file_stem(layer)}_{tag}")[0]
            payload.image(f"analysis/{KIND_DIRS[kind]}/layers", png, f"{layer or 'model'} step {result.step}")
        self._add_tables(payload, result)
        return payload

    def _write_code_histogram(self, result: StepResult, tag: str) -> Path:
        grid = quant_state.code_grid_values()
        labels = [f"{c:X}:{'-' if c >= 8 else '+'}{abs(v):g}" for c, v in enumerate(grid)]
        layers = list(result.code_histograms)
        fractions = [[c / max(sum(h), 1) for c in h] for h in result.code_histograms.values()]
        figure = render.Heatmap(title=f"NVFP4 code histogram (fraction of elements), step {result.step}",
                                values=fractions, row_labels=layers, col_labels=labels, value_label="fraction",
                                note="code = sign bit | E2M1 magnitude index; label = hex code : grid value")
        return render.save(figure, self.root / KIND_DIRS["quantized"] / f"code_histogram_{tag}")[0]

    def _write_scale_histogram(self, result: StepResult, tag: str) -> Path:
        values = quant_state.scale_byte_values()
        counts = np.array(list(result.scale_histograms.values()), dtype=np.float64)  # [layers, 256]
        used = [b for b in np.argsort(values.nan_to_num(nan=np.inf).numpy(), kind="stable") if counts[:, b].sum() > 0]
        fractions = counts[:, used] / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        figure = render.Heatmap(
            title=f"E4M3 block-scale histogram (fraction of blocks), step {result.step}",
            values=fractions.tolist(), row_labels=list(result.scale_histograms),
            col_labels=[f"{float(values[b]):.4g}" for b in used], value_label="fraction",
            note="columns: decoded E4M3 scale values in use, ascending; 0 = zero scale (block flushed to zero); "
                 "values below 2^-6 are subnormal")
        return render.save(figure, self.root / KIND_DIRS["quantized"] / f"scale_histogram_{tag}")[0]

    @staticmethod
    def _layer_figure(kind: str, layer: str, step: int, images: dict[str, np.ndarray]) -> render.Figure:
        label = layer or "model"
        panels = []
        for what, array in images.items():
            rows, cols = array.shape
            panels.append(render.Heatmap(
                title=f"{label} {what} [{rows}x{cols} crop], step {step}",
                values=_short(array),
                row_labels=[str(i) for i in range(rows)],
                col_labels=[str(j) for j in range(cols)],
                value_label="E2M1 grid value" if what == "codes" else what,
                colormap="diverging",
            ))
        if len(panels) == 1:
            return panels[0]
        return render.Grid(title=f"{label} {kind}, step {step}", panels=panels,
                           note="error = dequantized - raw (top-left crop of the [out, in*kernel] operand)")

    def _add_tables(self, payload: WandbPayload, result: StepResult) -> None:
        columns = [*ROW_COLUMNS, *ALL_STATS]
        payload.table("analysis/tables/layer_stats", columns,
                      [[_finite(r.get(c)) for c in columns] for r in result.rows])
        if result.code_histograms:
            grid = quant_state.code_grid_values()
            payload.table("analysis/tables/code_histogram", ["step", "layer", "code", "grid_value", "count"],
                          [[result.step, layer, code, grid[code], count]
                           for layer, hist in result.code_histograms.items() for code, count in enumerate(hist)])
            values = quant_state.scale_byte_values().tolist()
            payload.table("analysis/tables/scale_histogram", ["step", "layer", "scale_byte", "scale_value", "count"],
                          [[result.step, layer, byte, values[byte], count]
                           for layer, hist in result.scale_histograms.items()
                           for byte, count in enumerate(hist) if count])
        if not self.cfg.histograms:
            return
        for (kind, layer), values in result.histogram_values.items():
            payload.histogram(f"analysis/histograms/{kind}/{layer or 'model'}", values)
        for layer in result.code_histograms:
            if ("quantized", layer) in result.crops:
                payload.histogram(f"analysis/histograms/codes/{layer or 'model'}",
                                  counts=result.code_histograms[layer], edges=[c - 0.5 for c in range(17)])

    def write_over_steps(self, history: Sequence[dict[str, Any]]) -> WandbPayload:
        """Layers x steps heatmaps of ``OVER_STEPS`` from the accumulated rows of every analysed step."""
        payload = WandbPayload()
        for kind, folder in KIND_DIRS.items():
            rows = [r for r in history if r["kind"] == kind]
            if not rows:
                continue
            steps = sorted({r["step"] for r in rows})
            layers = list(dict.fromkeys(r["layer"] for r in rows))
            index = {(r["layer"], r["step"]): r for r in rows}
            for stat in OVER_STEPS[kind]:
                values = [[index.get((layer, s), {}).get(stat, math.nan) for s in steps] for layer in layers]
                figure = render.Heatmap(title=f"{kind}: {stat} per layer over training steps", values=values,
                                        row_labels=[n or "model" for n in layers], col_labels=[str(s) for s in steps],
                                        value_label=stat, note=DEFINITIONS)
                png = render.save(figure, self.root / folder / f"over_steps_{stat}")[0]
                payload.image(f"analysis/{folder}/over_steps", png, stat)
        return payload


def _finite(value: Any) -> Any:
    """NaN/inf as None: the table is stored as JSON, which has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
