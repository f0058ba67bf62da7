"""Schema of ``conf/config.yaml``: the run-level keys (mode, seed, paths, optimiser) and the group slots.

Group nodes (``model``, ``data``, ``quant``, ``trainer``, ``logger``, ``analysis``) are typed by their own
schemas through each YAML's defaults list; here they are ``Any`` so that each group can pick its own dataclass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from conf.schemas.common import check_choice, check_range, store_schema

MODES = ("train", "test", "analyze", "ptq", "export", "eval", "ptq_vs_qat")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("none", "cosine", "linear")


@dataclass
class PathsConfig:
    output_dir: str = MISSING  # the job's output dir (Hydra's runtime.output_dir)
    cache_dir: str = MISSING  # generated data sets, tokenizer caches
    data_root: Optional[str] = None  # base folder for real data sets (data.root defaults under it)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and linear decay

    def __post_init__(self) -> None:
        check_choice("optim", "name", self.name, OPTIMIZERS)
        check_choice("optim", "scheduler", self.scheduler, SCHEDULERS)
        check_range("optim", "lr", self.lr, 0.0)
        check_range("optim", "weight_decay", self.weight_decay, 0.0)
        check_range("optim", "warmup_steps", self.warmup_steps, 0)
        check_range("optim", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclass
class RootConfig:
    mode: str = "train"
    seed: int = 0
    run_name: str = MISSING
    experiment_name: str = "default"
    ckpt_path: Optional[str] = None  # a .ckpt to resume (train) or to evaluate (test/analyze/ptq/export/eval)
    monitor: Optional[str] = None  # metric returned to sweepers; None = the task's default (e.g. val/miou)
    paths: PathsConfig = field(default_factory=PathsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: Any = MISSING
    data: Any = MISSING
    quant: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    analysis: Any = None
    export: Any = None
    study: Any = None  # multi-stage study settings (conf/study/*), read by mode=ptq_vs_qat

    def __post_init__(self) -> None:
        check_choice("", "mode", self.mode, MODES)


store_schema("root", "root", RootConfig)
