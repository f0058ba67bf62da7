"""``quant.exclude_by_kurtosis=<z>``: keep in BF16 the layers the kurtosis study flags, decided before quantizing.

Why outside ``quant``: the study (``analysis.kurtosis_study``) is analysis code and may need a training checkpoint;
the library only receives the outcome as ``Policy.keep_high_precision`` (module name, reason) pairs, so the policy
report names every kept layer with the statistic that flagged it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import analysis
from conf.errors import UserError


def kurtosis_keeps(model: nn.Module, z_threshold: float, ckpt_path: str | None = None) -> tuple[tuple[str, str], ...]:
    """(layer, reason) pairs the study flags on ``model``'s initial weights, or on the weights of ``ckpt_path``."""
    subject, source = model, "initial weights"
    if ckpt_path:
        subject, source = copy.deepcopy(model), f"weights of {ckpt_path}"
        _load_model_weights(subject, Path(ckpt_path))
    return tuple((name, f"kurtosis study on the {source} flags it ({reason}; threshold z > {z_threshold})")
                 for name, reason in analysis.layers_to_keep_high_precision(subject, z_threshold))


def _load_model_weights(model: nn.Module, ckpt: Path) -> None:
    """Load the ``model.*`` weights of a Lightning checkpoint (the task module wraps the network as ``model``)."""
    if not ckpt.is_file():
        raise UserError(f"quant.kurtosis_ckpt={ckpt} does not exist; pass a .ckpt written by a training run")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"quant.kurtosis_ckpt={ckpt} does not hold weights of this model: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
