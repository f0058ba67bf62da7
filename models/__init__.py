"""Model builders behind the ``model`` registry: ``model=unet`` <-> ``MODELS.get("unet")``.

Why a registry entry carries a task: the app must know which kind of data a model trains on (``task_of``) before it
builds anything, to refuse ``model=resnet data=text`` with the valid data choices. Every built model has the attribute
``high_precision_modules`` (names of the layers the FP4 studies keep in high precision: stems with few input
channels, output layers, embeddings) for the precision policies to read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from conf.registry import Registry
from data.info import DataInfo
from models.llm import build_llm
from models.resnet import build_resnet
from models.unet import build_unet


@dataclass(frozen=True)
class ModelEntry:
    task: str  # the DataInfo.task this model trains on
    build: Callable[[Any, DataInfo], nn.Module]  # (model config dataclass, data facts) -> model


MODELS: Registry[ModelEntry] = Registry("model")
MODELS.register("unet")(ModelEntry(task="segmentation", build=build_unet))
MODELS.register("resnet")(ModelEntry(task="classification", build=build_resnet))
MODELS.register("llm")(ModelEntry(task="lm", build=build_llm))


def task_of(name: str) -> str:
    """The data task (``DataInfo.task``) that model ``name`` trains on."""
    return MODELS.get(name).task


def build_model(cfg: Any, info: DataInfo) -> nn.Module:
    """Build the model named by ``cfg.name`` from its validated config (a schema dataclass or a DictConfig)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    return MODELS.get(cfg.name).build(cfg, info)
