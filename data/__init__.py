"""Data sets behind the ``data`` config group: ``build_datamodule(cfg, cache_dir=..., seed=...)``.

Each module registers one LightningDataModule under its config name (``data=coco`` <-> ``conf/data/coco.yaml`` <->
``@DATAMODULES.register("coco")``); ``data/info.py`` documents what the batches hold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import OmegaConf

from data import cifar10, coco, imagefolder, mnist, mvtec, shapes, shapes_cls, text  # noqa: F401  (registration)
from data.info import DataInfo
from data.registry import DATAMODULES

__all__ = ["DATAMODULES", "DataInfo", "build_datamodule", "names_for_task", "task_of"]


def build_datamodule(cfg: Any, *, cache_dir: Path, seed: int) -> L.LightningDataModule:
    """The data module named by ``cfg.name``; ``cfg`` is the data group's schema dataclass (or its DictConfig)."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(cfg)
    return DATAMODULES.get(cfg.name)(cfg, cache_dir=Path(cache_dir), seed=seed)


def task_of(name: str) -> str:
    """The ``DataInfo.task`` of data set ``name``, without reading any file."""
    return DATAMODULES.get(name).task


def names_for_task(task: str) -> list[str]:
    return [name for name in DATAMODULES.names() if DATAMODULES.get(name).task == task]
