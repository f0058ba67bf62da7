"""Schema of ``conf/logger/*``: which experiment trackers a run writes to.

The CSV logger is always on (the comparison report is built from it), so ``logger=none`` still leaves
``csv/metrics.csv`` in the job's output dir; W&B runs offline unless ``logger.wandb_mode=online``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from conf.schemas.common import check_choice, store_schema

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    wandb: bool = False
    tensorboard: bool = False
    wandb_mode: str = "offline"
    project: str = "fp4lab"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_checkpoints: bool = True  # offline W&B artifact of last/best checkpoint at the end of fit

    def __post_init__(self) -> None:
        check_choice("logger", "wandb_mode", self.wandb_mode, WANDB_MODES)


store_schema("logger", "logger", LoggerConfig)
