"""Optimizer and learning-rate schedule from ``OptimConfig``.

Why one place: every task trains with the same rules, so a BF16 and an NVFP4 run differ only in precision. The
load-bearing rules:

* No weight decay on parameters with fewer than 2 dims (biases, norm scales and shifts) nor on embedding tables
  (``nn.Embedding``, also when tied to an output head): decaying them shrinks scales rather than regularising.
* The schedule is stepped per optimizer step: linear warmup from ``1/warmup_steps`` of the peak to the peak, then
  cosine or linear decay to ``min_lr_ratio * peak`` at ``total_steps`` (``scheduler=none``: constant after warmup).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from conf.errors import ConfigError
from conf.schemas.root import OptimConfig


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of trainable parameters (with decay, without decay); shared parameters appear once."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embedding_ids else decay).append(name)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * progress  # linear


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: float) -> LambdaLR | None:
    """A per-step scheduler, or None when the learning rate is constant (no schedule, no warmup)."""
    if cfg.scheduler == "none" and cfg.warmup_steps == 0:
        return None
    if cfg.scheduler != "none" and not math.isfinite(total_steps):
        raise ConfigError(f"optim.scheduler={cfg.scheduler} needs the run length; set trainer.max_steps or "
                          f"trainer.max_epochs (or use optim.scheduler=none)")
    steps = int(total_steps) if math.isfinite(total_steps) else 0
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=steps,
                                                      schedule=cfg.scheduler, min_ratio=cfg.min_lr_ratio))
