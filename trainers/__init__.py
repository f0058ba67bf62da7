"""One LightningModule per task behind the ``task`` registry, keyed by ``DataInfo.task``.

Why keyed by the data task and not by the model: the task defines the batch contract, the loss and the metrics
(``data/info.py``); any model whose output fits the task can be trained by it. ``trainers/app.py`` (the run
orchestration) is deliberately not imported here.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from conf.registry import Registry
from conf.schemas.root import OptimConfig
from data.info import DataInfo
from trainers.base import TaskModule
from trainers.classification import ClassificationTask
from trainers.language_model import LanguageModelTask
from trainers.segmentation import SegmentationTask

TASKS: Registry[type[TaskModule]] = Registry("task")
TASKS.register("segmentation")(SegmentationTask)
TASKS.register("classification")(ClassificationTask)
TASKS.register("lm")(LanguageModelTask)


def build_task(model: nn.Module, info: DataInfo, model_cfg: Any, optim_cfg: OptimConfig) -> TaskModule:
    """Wrap ``model`` in the LightningModule of ``info.task``; configs may be schema dataclasses or DictConfigs."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_object(model_cfg)
    if isinstance(optim_cfg, DictConfig):
        optim_cfg = OmegaConf.to_object(optim_cfg)
    return TASKS.get(info.task)(model, info, model_cfg, optim_cfg)
