"""The user-facing error type of the `quant` library, and the input checks every quantizer shares.

`quant` is a standalone library and must not import the application's `conf.errors`, so it defines its own error.
Subclassing ValueError keeps `except ValueError` callers working. Every message names the tensor (the `name` that
callers pass, e.g. "layer3.conv1 weight"), the problem, and the valid choices where there is a finite set.

NaN and Inf are rejected instead of emulated: TE's kernel skips NaN in the amax and turns it into +6, TE's PyTorch
reference propagates it into every scale byte, and an Inf poisons the global scale (SPEC_NVFP4.md 1.5). No
implementation agrees, so a quantizer that meets one stops with an error naming the tensor.
"""

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class QuantError(ValueError):
    """Bad input to a quantizer: unsupported dtype/shape/option, or a NaN/Inf in a tensor to be quantized."""


def describe(name: str | None) -> str:
    """How an error message refers to a tensor: its given name, quoted, or "the input tensor"."""
    return f"'{name}'" if name else "the input tensor"


def check_float_tensor(x: object, fmt: str, name: str | None) -> Tensor:
    """Reject non-tensors, non-float dtypes and empty or 0-d tensors; return x unchanged."""
    if not isinstance(x, Tensor):
        raise QuantError(f"{fmt}: {describe(name)} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise QuantError(f"{fmt}: {describe(name)} has dtype {x.dtype}; valid dtypes: {valid}")
    if x.dim() == 0 or x.numel() == 0:
        raise QuantError(f"{fmt}: {describe(name)} has shape {tuple(x.shape)}; need at least one dim and one element")
    return x


def check_finite(amax: Tensor, x: Tensor, fmt: str, name: str | None, stage: str = "") -> None:
    """Raise if `amax` (max |x|, which propagates NaN) is not finite, counting the NaN and Inf elements of `x`."""
    if bool(torch.isfinite(amax)):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    where = f" {stage}" if stage else ""
    raise QuantError(
        f"{fmt}: {describe(name)}{where} contains {n_nan} NaN and {n_inf} Inf values (shape {tuple(x.shape)}); "
        "quantization of non-finite values is undefined, fix the producer of this tensor (e.g. lower the learning "
        "rate, enable gradient clipping or loss scaling)"
    )
