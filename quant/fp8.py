"""Per-tensor FP8 (E4M3 or E5M2) with current scaling: the emulated counterpart of TE's Float8CurrentScaling.

Why it is here: FP8 is the precision NVFP4 is usually compared with (the NVFP4 pretraining paper's baseline), and an
emulated FP8 arm lets one study run BF16 / FP8 / NVFP4 side by side on any hardware.

TE's rule (`compute_scale_from_amax`, transformer_engine/common/recipe/recipe_common.cuh), default options
(amax_epsilon = 0, no power-of-two scales), one float32 operation per step:
* amax = max |x| of the whole tensor, computed now (not from a history, unlike DelayedScaling);
* scale = fp32(fmt_max / amax) (448 for E4M3, 57344 for E5M2); Inf becomes FLT_MAX; amax == 0 gives scale 1;
* data = FP8(fp32(x * scale)), RNE and saturating (quant.numerics encoders, never Inf/NaN);
* scale_inv = fp32(1 / scale); dequantize: fp32(fp8_value * scale_inv), then the output dtype.
TE's FP8 recipes use E4M3 for forward tensors and E5M2 for gradients (Format.HYBRID); the format is chosen per call.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from quant import distributed, numerics
from quant.errors import QuantError, check_finite, check_float_tensor, describe

FORMAT = "FP8"
# fmt -> (largest finite value, encoder, decoder)
FMTS = {
    "e4m3": (numerics.E4M3_MAX, numerics.e4m3_encode, numerics.e4m3_decode),
    "e5m2": (numerics.E5M2_MAX, numerics.e5m2_encode, numerics.e5m2_decode),
}


@dataclass(frozen=True, eq=False)
class FP8Tensor:
    """data: uint8 raw FP8 bytes in x's shape; scale_inv, amax: float32 scalars; fmt: "e4m3" or "e5m2"."""

    data: Tensor
    scale_inv: Tensor
    amax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    fmt: str


def _check_fmt(fmt: str, name: str | None) -> str:
    if fmt not in FMTS:
        raise QuantError(f"{FORMAT}: fmt={fmt!r} for {describe(name)} is not supported; valid: {tuple(FMTS)}")
    return fmt


def current_scale(amax: Tensor, fmt: str) -> Tensor:
    """TE's scale = fp32(fmt_max / amax), FLT_MAX if that overflows, 1 for amax == 0 (float32 scalar)."""
    fmt_max = torch.tensor(FMTS[fmt][0], dtype=torch.float32, device=amax.device)
    scale = torch.clamp_max(fmt_max / amax, numerics.FLT_MAX)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize(x: Tensor, fmt: str = "e4m3", name: str | None = None,
             amax_reduce: distributed.AmaxReducer | None = None) -> FP8Tensor:
    """Per-tensor current-scaled FP8 of x (any shape). ``amax_reduce`` replaces the amax before the scale is derived
    (TE's ``with_amax_reduction``; it runs before the finiteness check so a collective is reached on every rank)."""
    check_float_tensor(x, FORMAT, name)
    _check_fmt(fmt, name)
    xf = x.detach().to(torch.float32)
    amax = xf.abs().amax()
    group_amax = amax_reduce(amax) if amax_reduce is not None else None
    check_finite(amax, xf, FORMAT, name)
    if group_amax is not None:
        amax = distributed.checked_group_amax(amax, group_amax, FORMAT, name)
    scale = current_scale(amax, fmt)
    data = FMTS[fmt][1](xf * scale)
    return FP8Tensor(
        data=data, scale_inv=torch.ones_like(scale) / scale, amax=amax, shape=x.shape, dtype=x.dtype, fmt=fmt
    )


def dequantize(q: FP8Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """fp32(fp8_value * scale_inv) in `dtype`."""
    return (FMTS[q.fmt][2](q.data) * q.scale_inv).to(dtype)


def fake_quantize(x: Tensor, fmt: str = "e4m3", name: str | None = None,
                  amax_reduce: distributed.AmaxReducer | None = None) -> Tensor:
    """dequantize(quantize(x, fmt)) in x.dtype. Not differentiable (no autograd)."""
    return dequantize(quantize(x, fmt=fmt, name=name, amax_reduce=amax_reduce), dtype=x.dtype)
