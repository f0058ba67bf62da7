"""What quantization does to each layer: telemetry during training, kurtosis studies, run comparison reports.

Public API (used by ``trainers/app.py`` and ``quant.exclude_by_kurtosis``):

* ``build_callbacks(cfg, *, output_dir, run_name, policy, report)`` -> Lightning callbacks for a training run;
* ``run_study(model, cfg, *, output_dir, run_name, ...)`` -> the kurtosis study and weight heatmaps of a model as it
  is now (``mode=analyze`` on a checkpoint);
* ``layers_to_keep_high_precision(model, z_threshold)`` -> ``[(layer, reason)]``;
* ``python -m analysis.report <sweep or run dirs> [-o out_dir]`` and ``analysis.hydra_callbacks.ComparisonReport``.

Analysis only reads: quantization state comes through ``analysis.quant_state`` (``quant``'s API), never from a
second implementation of a numeric rule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import lightning as L
from lightning.pytorch.loggers import Logger
from torch import nn

from analysis import quant_state
from analysis.callbacks import AnalysisCallback
from analysis.kurtosis_study import KurtosisStudy, layers_to_keep_high_precision, study
from analysis.telemetry import Telemetry
from analysis.wandb_log import find_wandb_logger
from conf.schemas.analysis import AnalysisConfig

__all__ = ["AnalysisCallback", "KurtosisStudy", "build_callbacks", "layers_to_keep_high_precision", "run_study"]


def build_callbacks(cfg: AnalysisConfig | None, *, output_dir: Path, run_name: str, policy: Any = None,
                    report: Any = None) -> list[L.Callback]:
    """The analysis callbacks of one training job (none when ``cfg`` is None or ``cfg.enabled`` is false).

    ``report`` is the ``quant.QuantReport`` of ``quant.apply``: its module names are how analysis finds the model
    inside the LightningModule and names layers as the report does. ``policy`` is accepted for symmetry and not
    needed: each quantized layer carries its own quantizer, which analysis reads.
    """
    if cfg is None or not cfg.enabled:
        return []
    return [AnalysisCallback(cfg, output_dir=output_dir, run_name=run_name,
                             layer_names=quant_state.report_layer_names(report))]


def run_study(model: nn.Module, cfg: AnalysisConfig, *, output_dir: Path, run_name: str,
              loggers: Iterable[Logger] = (), step: int = 0) -> KurtosisStudy:
    """Analyse ``model`` as it is (e.g. loaded from a checkpoint) without training.

    Writes the kurtosis study to ``plots/kurtosis/<run_name>/`` and the weight heatmaps of ``step`` (gradients too,
    if the parameters hold ``.grad`` from a backward pass the caller ran) to ``plots/heatmaps/<run_name>/``, and logs
    both to the W&B run among ``loggers``, if any.
    """
    telemetry = Telemetry(cfg, output_dir=output_dir, run_name=run_name)
    result = telemetry.collect(model, step)
    payload = telemetry.write(result)
    gradient_stats = {r["layer"]: r for r in result.rows if r["kind"] == "gradients"}
    outcome = study(model, z_threshold=cfg.kurtosis_z_threshold, gradient_stats=gradient_stats)
    study_payload = outcome.write_and_payload(Path(output_dir) / "plots" / "kurtosis" / run_name)
    logger = find_wandb_logger(loggers) if cfg.wandb else None
    if logger is not None:
        payload.log(logger, step)
        study_payload.log(logger, step)
    return outcome
