"""What every task's LightningModule shares: the wrapped model, saved configs, optimizer/schedule, lr logging.

Why a base class: the three tasks must agree on how they optimise and what they record, so that runs of different
model families are compared on the same terms. Tasks never know about quantization: the app quantizes the
``nn.Module`` before wrapping it, and the module is kept as ``self.model``.
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conf.schemas.root import OptimConfig
from data.info import DataInfo
from trainers.optim import build_optimizer, build_scheduler


def plain(cfg: Any) -> dict[str, Any]:
    """A config (schema dataclass or DictConfig) as plain containers, for hparams files and W&B."""
    if is_dataclass(cfg):
        return asdict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


class TaskModule(L.LightningModule):
    monitor: str  # the metric a checkpoint callback and a sweeper watch, e.g. "val/miou"
    monitor_mode: str  # "max" or "min"

    def __init__(self, model: nn.Module, info: DataInfo, model_cfg: Any, optim_cfg: OptimConfig) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.optim_cfg = optim_cfg
        self.save_hyperparameters({"model": plain(model_cfg), "optim": plain(optim_cfg), "data_info": asdict(info)})

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model, self.optim_cfg)
        total_steps = self.trainer.estimated_stepping_batches
        max_steps = self.trainer.max_steps
        if 0 < total_steps < max_steps:  # e.g. the trainer default max_epochs=3 silently capping max_steps=300
            rank_zero_warn(f"trainer.max_epochs={self.trainer.max_epochs} ends training after {int(total_steps)} "
                           f"optimizer steps, before trainer.max_steps={max_steps}; set trainer.max_epochs=null "
                           "to train for max_steps")
        scheduler = build_scheduler(optimizer, self.optim_cfg, total_steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_lr(self, batch_size: int) -> None:
        """``train/lr``: the learning rate this step used (first parameter group)."""
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=batch_size)
