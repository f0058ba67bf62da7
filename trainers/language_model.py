"""Causal language-modelling task: next-token cross-entropy; validation loss and perplexity.

Why token-weighted: the validation loss is the mean over *tokens* of the split (positions labelled -100 excluded),
not a mean of per-batch means, so perplexity = exp(val loss) is the split's true per-token perplexity even when the
last batch is short.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from conf.schemas.model import LLMConfig
from conf.schemas.root import OptimConfig
from data.info import DataInfo
from trainers.base import TaskModule

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean CE over labelled tokens, number of labelled tokens) for logits [B, T, V], labels [B, T]."""
    tokens = int((labels != IGNORE_INDEX).sum())
    if tokens == 0:
        return logits.float().sum() * 0.0, 0  # nothing to predict: no signal, but keep the graph
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return loss, tokens


class LanguageModelTask(TaskModule):
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(self, model: nn.Module, info: DataInfo, model_cfg: LLMConfig, optim_cfg: OptimConfig) -> None:
        super().__init__(model, info, model_cfg, optim_cfg)
        self.eval_loss = nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        batch_size = batch["input_ids"].shape[0]
        loss, _ = token_cross_entropy(self(batch["input_ids"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_lr(batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        loss, tokens = token_cross_entropy(self(batch["input_ids"]), batch["labels"])
        if tokens:
            self.eval_loss[split].update(loss.detach(), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_epoch_metrics(self, split: str) -> None:
        loss = float(self.eval_loss[split].compute())
        self.eval_loss[split].reset()
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        self.log(f"{split}/ppl", float(torch.tensor(loss, dtype=torch.float64).exp()), prog_bar=split == "val")
