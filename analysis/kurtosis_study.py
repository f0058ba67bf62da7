"""Kurtosis study: which layers have heavy-tailed weights, and does that predict their NVFP4 error?

Why it exists: heavy tails are the usual argument for keeping a layer in high precision, but per-tensor kurtosis also
grows when channels merely have different scales (a 50/50 mix of sigma 1 and 4 gives Pearson 5.34), while NVFP4
scales every 16-element block (16x16 tile for weights). So each layer gets its kurtosis at three granularities next
to its *measured* weight quantization error (the layer's own format as its forward GEMM uses it; for a layer kept in
high precision, NVFP4 with TE's weight recipe: 16x16 tiles, round-to-nearest), and the study reports the Spearman
correlation between them across layers instead of assuming kurtosis predicts sensitivity.

Recommendation rule: within each module type (Linear, Conv2d, ...), a layer is flagged to stay in high precision when
the robust z-score of its per-tensor weight kurtosis, ``(k - median) / max(1.4826 * MAD, se(n))``, exceeds
``z_threshold``. ``se(n)`` is the sampling noise of the kurtosis of the layer's n weights (the standard error of the
excess kurtosis of n Gaussian samples, ~ sqrt(24 / n)): without it, layers whose kurtosis is alike (all of them at
initialisation) give a tiny MAD, and a small layer would be flagged for a difference that is sampling noise alone.
Relative, not absolute: practice has no universal kurtosis cut (ECOSYSTEM F2-F3).
Kurtosis here is always excess (Fisher) kurtosis with the biased moment estimator (``analysis.stats``).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from analysis import quant_state, render, stats
from analysis.wandb_log import WandbPayload
from quant.policy import QUANTIZABLE_TYPES

CORRELATED = ("kurtosis", "kurtosis_channel_max", "kurtosis_block_p99")  # each vs the weight's relative MSE


@dataclass
class LayerKurtosis:
    layer: str
    module_type: str
    shape: str
    numel: int
    quantized: bool  # the layer's weight is quantized (a quant module whose policy quantizes the weight role)
    kurtosis: float
    kurtosis_channel_median: float
    kurtosis_channel_max: float
    kurtosis_block_median: float
    kurtosis_block_p99: float
    kurtosis_block_max: float
    grad_kurtosis: float  # NaN when no gradient was available
    grad_kurtosis_block_p99: float
    error_format: str  # the layer's own weight quantization, or the NVFP4 reference for a layer kept in high precision
    snr_db: float  # of the weight under error_format
    rel_mse: float
    clip_rate: float  # NaN for formats without codes
    robust_z: float = math.nan
    rank: int = 0  # 1 = highest per-tensor kurtosis
    keep_high_precision: bool = False
    reason: str = ""


@dataclass
class KurtosisStudy:
    layers: list[LayerKurtosis]  # ranked by per-tensor weight kurtosis, highest first
    z_threshold: float
    spearman: dict[str, float] = field(default_factory=dict)  # "<stat>_vs_rel_mse" -> rho

    def recommended(self) -> list[tuple[str, str]]:
        return [(row.layer, row.reason) for row in self.layers if row.keep_high_precision]

    def to_json(self) -> dict[str, Any]:
        return render.json_safe({"z_threshold": self.z_threshold, "spearman": self.spearman,
                              "definitions": __doc__.split("Recommendation rule:")[1].strip(),
                              "layers": [asdict(row) for row in self.layers]})

    def write(self, folder: Path) -> dict[str, Path]:
        """``kurtosis.csv`` / ``.json`` / ``.png`` / ``.html`` in ``folder``; returns the paths by suffix."""
        folder.mkdir(parents=True, exist_ok=True)
        columns = list(LayerKurtosis.__dataclass_fields__)
        with (folder / "kurtosis.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in self.layers:
                writer.writerow([getattr(row, c) for c in columns])
        (folder / "kurtosis.json").write_text(json.dumps(self.to_json(), indent=1) + "\n")
        png, page, _ = render.save(self.figure(), folder / "kurtosis_figure")
        (folder / "kurtosis.png").write_bytes(png.read_bytes())
        png.unlink()
        return {".csv": folder / "kurtosis.csv", ".json": folder / "kurtosis.json", ".png": folder / "kurtosis.png",
                ".html": page}

    def figure(self) -> render.Grid:
        names = [row.layer or "model" for row in self.layers]
        bars = render.BarChart(
            title="weight excess kurtosis per layer (ranked)", labels=names,
            values={"per tensor": [row.kurtosis for row in self.layers],
                    "16-block p99": [row.kurtosis_block_p99 for row in self.layers]},
            y_label="excess kurtosis")
        scatter = render.Scatter(
            title="kurtosis vs measured weight quantization error", x=[row.kurtosis for row in self.layers],
            y=[row.snr_db for row in self.layers],
            labels=[f"{n} (z={row.robust_z:.2f}{', keep' if row.keep_high_precision else ''})"
                    for n, row in zip(names, self.layers, strict=True)],
            groups=[row.module_type for row in self.layers], x_label="per-tensor excess kurtosis",
            y_label="weight SNR (dB)")
        rho = ", ".join(f"{k}: {v:.2f}" for k, v in self.spearman.items())
        keep = ", ".join(n for n, _ in self.recommended()) or "none"
        return render.Grid(title=f"Kurtosis study (robust z > {self.z_threshold} within module type -> keep)",
                           panels=[bars, scatter],
                           note=f"Spearman rho vs the weight's relative MSE: {rho}. Keep in high precision: {keep}. "
                                "Excess (Fisher) kurtosis, biased moments. Error: the layer's own weight format, "
                                "or NVFP4 (16x16, RN) for layers kept in high precision.")

    def write_and_payload(self, folder: Path) -> WandbPayload:
        """``write(folder)``, then the W&B payload showing the written table and figure."""
        return self.wandb_payload(self.write(folder)[".png"])

    def wandb_payload(self, png: Path) -> WandbPayload:
        payload = WandbPayload()
        columns = list(LayerKurtosis.__dataclass_fields__)
        payload.table("analysis/kurtosis/table", columns,
                      [[_json_value(getattr(row, c)) for c in columns] for row in self.layers])
        payload.image("analysis/kurtosis/figure", png, "kurtosis study")
        return payload


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def study(model: nn.Module, *, z_threshold: float,
          gradient_stats: Mapping[str, Mapping[str, float]] | None = None) -> KurtosisStudy:
    """Measure every layer with a >= 2-D weight and rank it.

    ``gradient_stats``: per layer ``analysis.stats.tensor_stats`` of its last gradient (from the training
    telemetry); when absent, ``weight.grad`` is used if present.
    """
    rows = []
    with torch.no_grad():
        for name, module in quant_state.weight_layers(model):
            w = quant_state.weight_operand(module)  # float32 [out, K]
            s = stats.tensor_stats(w)
            q = quant_state.layer_quantization(module) or quant_state.nvfp4_reference(w)
            err = stats.error_stats(q.raw, q.dequantized)
            g = (gradient_stats or {}).get(name)
            if g is None and module.weight.grad is not None:
                g = stats.tensor_stats(quant_state.gemm_matrix(module, module.weight.grad.detach()))
            rows.append(LayerKurtosis(
                layer=name, module_type=quant_state.base_type(module), shape="x".join(map(str, module.weight.shape)),
                numel=module.weight.numel(), quantized=quant_state.is_weight_quantized(module),
                kurtosis=s["kurtosis"], kurtosis_channel_median=s["kurtosis_channel_median"],
                kurtosis_channel_max=s["kurtosis_channel_max"], kurtosis_block_median=s["kurtosis_block_median"],
                kurtosis_block_p99=s["kurtosis_block_p99"], kurtosis_block_max=s["kurtosis_block_max"],
                grad_kurtosis=g["kurtosis"] if g else math.nan,
                grad_kurtosis_block_p99=g["kurtosis_block_p99"] if g else math.nan,
                error_format=q.description, snr_db=err["snr_db"], rel_mse=err["rel_mse"],
                clip_rate=stats.clip_rate(q.raw, q.dequantized, q.grid_values.abs(), q.max_grid_magnitude)
                if q.has_codes else math.nan,
            ))
    _flag(rows, z_threshold)
    rows.sort(key=lambda r: -r.kurtosis if math.isfinite(r.kurtosis) else math.inf)
    for rank, row in enumerate(rows, start=1):
        row.rank = rank
    rel_mse = torch.tensor([r.rel_mse for r in rows], dtype=torch.float64)
    spearman = {f"{stat}_vs_rel_mse": stats.spearman(
        torch.tensor([getattr(r, stat) for r in rows], dtype=torch.float64), rel_mse) for stat in CORRELATED}
    return KurtosisStudy(layers=rows, z_threshold=z_threshold, spearman=spearman)


def _flag(rows: list[LayerKurtosis], z_threshold: float) -> None:
    """Robust z of per-tensor kurtosis within each module type; flag those above the threshold, with the reason."""
    by_type: dict[str, list[LayerKurtosis]] = {}
    for row in rows:
        by_type.setdefault(row.module_type, []).append(row)
    for module_type, group in by_type.items():
        values = torch.tensor([r.kurtosis for r in group], dtype=torch.float64)
        noise = torch.tensor([stats.kurtosis_standard_error(r.numel) for r in group], dtype=torch.float64)
        z = stats.robust_z(values, min_scale=noise)
        median = stats.quantile(values, 0.5)
        for row, z_value in zip(group, z.tolist(), strict=True):
            row.robust_z = z_value
            if z_value > z_threshold:
                row.keep_high_precision = True
                row.reason = (f"weight excess kurtosis {row.kurtosis:.2f} is {z_value:.1f} robust z above the median "
                              f"{median:.2f} of {len(group)} {module_type} layers (threshold {z_threshold:g})")


def layers_to_keep_high_precision(model: nn.Module, z_threshold: float) -> list[tuple[str, str]]:
    """``[(layer name, reason)]`` of the layers the kurtosis study flags, for ``quant.exclude_by_kurtosis=<z>``.

    Names are relative to ``model`` (as ``model.named_modules()``), in rank order (highest kurtosis first). Only
    layer types a policy can quantize are listed (``quant.policy.QUANTIZABLE_TYPES``); an embedding, say, is
    never a candidate.
    """
    rows = study(model, z_threshold=z_threshold).layers
    return [(r.layer, r.reason) for r in rows if r.keep_high_precision and r.module_type in QUANTIZABLE_TYPES]
