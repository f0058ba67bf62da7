"""A tiny Lightning fit for the analysis tests: an MLP with 16-multiple Linear sizes on a fixed regression set."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import quant
from quant import Policy, QuantReport, Recipe


class TinyTask(L.LightningModule):
    """Wraps the model as ``self.net`` (like the real tasks) so layer names must be resolved relative to it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def tiny_net() -> nn.Sequential:
    # Dropout draws random numbers every step: a pass that consumed RNG would change the run.
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 16))


def tiny_loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=g)
    y = torch.randn(64, 16, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))


NVFP4_CPU = Policy(format="nvfp4", recipe=Recipe(disable_rht=True))  # the RHT needs bf16 compute; these fits are fp32


def make_task(policy: Policy | None = None, seed: int = 0) -> tuple[TinyTask, QuantReport | None]:
    """The tiny net (quantized in place by ``quant.apply`` when a policy is given) wrapped in a LightningModule."""
    L.seed_everything(seed, verbose=False)
    net = tiny_net()
    report = quant.apply(net, policy) if policy is not None else None
    return TinyTask(net), report


def fit(tmp: Path, task: TinyTask, callbacks: list[L.Callback], *, steps: int = 4, loggers: Any = False,
        ckpt_path: str | None = None, **trainer_kwargs: Any) -> TinyTask:
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=loggers, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp),
                        **trainer_kwargs)
    trainer.fit(task, train_dataloaders=tiny_loader(), ckpt_path=ckpt_path)
    return task


@pytest.fixture
def analysis_cfg():
    from conf.schemas.analysis import AnalysisConfig

    def make(**overrides: Any) -> AnalysisConfig:
        return AnalysisConfig(**{"every_n_steps": 2, "max_image_layers": 1, "image_max_side": 32, **overrides})

    return make
