"""The Lightning callback that runs ``analysis.telemetry`` during training and the kurtosis study at its end.

Load-bearing choices:

* The pass runs in ``on_before_optimizer_step``: gradients are complete and, under ``16-mixed``, already unscaled by
  the GradScaler (``on_after_backward`` would see scaled ones); the weights are those that produced the gradients.
  The step is ``trainer.global_step`` (optimizer steps done so far, so step 0 is the initial model). Steps are
  de-duplicated: with several optimizers the hook fires once per optimizer, with gradient accumulation once per
  optimizer step, and each step is analysed once.
* Rank zero only; analysis never writes to the model, never draws random numbers and runs under ``no_grad``, so the
  training run is bit-identical with analysis on or off (tested).
* Layer names are those of the model handed to ``quant.apply`` (as in the quantization report and the model's
  ``high_precision_modules``), not of the LightningModule that wraps it: the wrapped model is found as the
  sub-module that contains every name of the report.
* Measuring happens on the training thread; drawing and writing the figures on one background thread
  (``analysis.writer``), whose W&B payloads are logged back on the training thread. ``on_train_end`` waits for it,
  so every file exists when ``fit`` returns.
* ``state_dict`` holds the analysed-step history, so after a resume the over-steps heatmaps still cover the whole run.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterable

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from analysis import kurtosis_study
from analysis.telemetry import Telemetry
from analysis.wandb_log import WandbPayload, find_wandb_logger
from analysis.writer import BackgroundWriter
from conf.schemas.analysis import AnalysisConfig


def find_wrapped_model(module: nn.Module, layer_names: Iterable[str]) -> nn.Module:
    """The outermost sub-module of ``module`` whose ``named_modules()`` contains every name in ``layer_names``."""
    wanted = {n for n in layer_names if n}
    if not wanted:
        return module
    for _, candidate in module.named_modules():
        names = {n for n, _ in candidate.named_modules()}
        if wanted <= names:
            return candidate
    return module


class AnalysisCallback(Callback):
    """Weight / code / gradient telemetry every ``cfg.every_n_steps`` optimizer steps; kurtosis study at the end."""

    def __init__(self, cfg: AnalysisConfig, *, output_dir: Path, run_name: str,
                 layer_names: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self.layer_names = list(layer_names)  # names of the model's modules, e.g. the rows of the QuantReport
        self.telemetry = Telemetry(cfg, output_dir=self.output_dir, run_name=run_name)
        self.writer = BackgroundWriter(background=cfg.background_writer)
        self.last_step = -1
        self.history: list[dict[str, Any]] = []
        self.last_gradient_stats: dict[str, dict[str, float]] = {}
        self._model: nn.Module | None = None

    def _wrapped(self, pl_module: L.LightningModule) -> nn.Module:
        if self._model is None:
            self._model = find_wrapped_model(pl_module, self.layer_names)
        return self._model

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_step or step % self.cfg.every_n_steps:
            return
        self.last_step = step
        result = self.telemetry.collect(self._wrapped(pl_module), step, weights=self.cfg.weights,
                                        gradients=self.cfg.gradients)
        self.history.extend(result.rows)
        gradients = {r["layer"]: r for r in result.rows if r["kind"] == "gradients"}
        if gradients:
            self.last_gradient_stats = gradients
        self.writer.submit(step, partial(self.telemetry.write, result))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.is_global_zero:
            self._log(trainer, self.writer.ready())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if self.history:
            self.writer.submit(step, partial(self.telemetry.write_over_steps, list(self.history)))
        if self.cfg.kurtosis_study:
            result = kurtosis_study.study(self._wrapped(pl_module), z_threshold=self.cfg.kurtosis_z_threshold,
                                          gradient_stats=self.last_gradient_stats)
            self.writer.submit(step, partial(result.write_and_payload,
                                             self.output_dir / "plots" / "kurtosis" / self.run_name))
        try:
            self._log(trainer, self.writer.drain())
        finally:
            self.writer.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.writer.close()  # finish the figures already measured; the run's own exception is what matters

    def _log(self, trainer: L.Trainer, payloads: list[tuple[int, WandbPayload]]) -> None:
        logger = find_wandb_logger(trainer.loggers) if self.cfg.wandb else None
        if logger is not None:
            for step, payload in payloads:
                payload.log(logger, step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": self.history,
                "last_gradient_stats": self.last_gradient_stats}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self.history = list(state_dict["history"])
        self.last_gradient_stats = dict(state_dict["last_gradient_stats"])
