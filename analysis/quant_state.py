"""The one place where analysis reads quantization state from ``quant``.

Why a single adapter: analysis must never carry a second implementation of a numeric rule. A quantized layer's
state comes from the layer itself (``QuantLinear.quantized_weight()``: the forward GEMM's weight operand, exactly as
the training step multiplies it, and ``weight_matrix()``: the GEMM layout, reduction dim last); decoding goes through
``quant.nvfp4`` (``unpack_codes``, ``e2m1_values``, ``dequantize``) and ``quant.numerics.e4m3_decode``. Layers that
are not quantized are laid out with the same GEMM view (``quant.functional.conv_weight_matrix``), so block statistics
of a baseline run and of an NVFP4 run cover the same 16 elements.

Nothing here draws a random number or writes to a tensor: the weight role is never stochastically rounded, and the
reference quantization of unquantized layers uses round-to-nearest with TE's default weight recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from quant import Recipe, numerics, nvfp4
from quant.functional import conv_weight_matrix
from quant.modules import QUANTIZED_TYPES

REFERENCE_WEIGHT_TILE = Recipe().weight_tile  # TE's default NVFP4 weight recipe: 16x16 tiles, round-to-nearest

# Module classes whose weight is a GEMM operand; the first of these in a module's MRO names its "module type".
_BASE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.Embedding)


def report_layer_names(report: object | None) -> tuple[str, ...]:
    """Module names of a ``quant.QuantReport`` (names relative to the model ``quant.apply`` saw); () for None."""
    return () if report is None else tuple(row.name for row in report.rows)


@dataclass(frozen=True)
class QuantizedOperand:
    """A layer's 2-D weight operand [M, K] and what its format makes of it.

    ``codes`` and the scale fields exist for formats with 4-bit codes and E4M3 block scales (NVFP4); other formats
    hand analysis only their fake-quantized values, so only ``dequantized`` is set.
    """

    description: str  # e.g. "nvfp4 16x16 RN"
    raw: torch.Tensor  # float32 [M, K]
    dequantized: torch.Tensor  # float32 [M, K]
    codes: torch.Tensor | None = None  # uint8 [M, K], one 4-bit code per element
    grid_values: torch.Tensor | None = None  # float32 [M, K], E2M1 value of each code (code 8 is -0.0)
    max_grid_magnitude: float = float("nan")  # largest |grid value| of the format (6 for E2M1)
    scale_bytes: torch.Tensor | None = None  # uint8 [n_scales], one per block (a 16x16 tile counted once)
    scale_values: torch.Tensor | None = None  # float32 [n_scales]
    scale_subnormal: torch.Tensor | None = None  # bool [n_scales]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def has_codes(self) -> bool:
        return self.codes is not None


def base_type(module: nn.Module) -> str:
    """The torch.nn class a (possibly quantized) layer stands for: ``QuantLinear`` -> ``"Linear"``."""
    for cls in type(module).__mro__:
        if cls in _BASE_TYPES:
            return cls.__name__
    return type(module).__name__


def _layers_by_weight_rank(model: nn.Module, keep: Callable[[int], bool]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules whose ``weight`` Parameter has a dim count ``keep`` accepts, in model order, each
    shared weight once."""
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and keep(weight.dim()) and id(weight) not in seen:
            seen.add(id(weight))
            layers.append((name, module))
    return layers


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers with a weight of 2 or more dims (Linear, Conv*, Embedding, ...), in model order, shared weights once."""
    return _layers_by_weight_rank(model, lambda dims: dims >= 2)


def vector_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers whose weight is a vector (GroupNorm, LayerNorm, RMSNorm scales), in model order, shared weights once:
    never quantized, but their gradients belong to the gradient telemetry of every layer."""
    return _layers_by_weight_rank(model, lambda dims: dims == 1)


def gemm_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the weight or its gradient, in the weight's layout) as the forward GEMM operand [out, K].

    The layouts of ``quant.modules``' ``weight_matrix``: Linear as is, Conv2d ``[Co, kh*kw*Ci]``, ConvTranspose2d
    the same of its [Co, Ci, kh, kw] transpose; any other layer flattened per output row.
    """
    if isinstance(module, nn.ConvTranspose2d):
        return conv_weight_matrix(tensor.transpose(0, 1))
    if isinstance(module, nn.Conv2d):
        return conv_weight_matrix(tensor)
    return tensor.reshape(tensor.shape[0], -1)


def weight_operand(module: nn.Module) -> torch.Tensor:
    """The weight as the forward GEMM's operand [out, K], reduction dim last, float32 copy."""
    if isinstance(module, QUANTIZED_TYPES):
        return module.weight_matrix().detach().to(torch.float32)
    return gemm_matrix(module, module.weight.detach()).to(torch.float32)


def is_weight_quantized(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZED_TYPES) and "weight" in module.quantizer.roles


def layer_quantization(module: nn.Module) -> QuantizedOperand | None:
    """The quantized weight operand the layer's forward GEMM multiplies; None if its weight is not quantized."""
    if not is_weight_quantized(module):
        return None
    raw = weight_operand(module)
    operand = module.quantized_weight()
    description = module.quantizer.describe_roles()["weight"]
    if isinstance(operand, nvfp4.NVFP4Tensor):
        return _decode_nvfp4(raw, operand, description)
    return QuantizedOperand(description=description, raw=raw, dequantized=operand.detach().to(torch.float32))


def nvfp4_reference(x2d: torch.Tensor) -> QuantizedOperand:
    """NVFP4 of a 2-D operand with TE's default weight recipe (16x16 tiles, round-to-nearest): the error a layer
    would get if quantized, for layers that are not (kurtosis study on a baseline run or before ``quant.apply``)."""
    raw = x2d.detach().to(torch.float32)
    tile = REFERENCE_WEIGHT_TILE
    return _decode_nvfp4(raw, nvfp4.quantize(raw, tile=tile), f"nvfp4 {tile[0]}x{tile[1]} RN (reference)")


def _decode_nvfp4(raw: torch.Tensor, q: nvfp4.NVFP4Tensor, description: str) -> QuantizedOperand:
    codes = nvfp4.unpack_codes(q)  # [M, K]
    scale_bytes = q.scales[:: q.tile[0]] if q.tile[0] > 1 else q.scales  # a 16x16 tile's byte is repeated per row
    scale_values = numerics.e4m3_decode(scale_bytes)
    return QuantizedOperand(
        description=description,
        raw=raw,
        dequantized=nvfp4.dequantize(q, torch.float32),
        codes=codes,
        grid_values=nvfp4.e2m1_values(codes),
        max_grid_magnitude=max(abs(v) for v in code_grid_values()),
        scale_bytes=scale_bytes.reshape(-1),
        scale_values=scale_values.reshape(-1),
        scale_subnormal=((scale_values > 0) & (scale_values < numerics.E4M3_MIN_NORMAL)).reshape(-1),
    )


def code_grid_values() -> list[float]:
    """E2M1 grid value of each 4-bit code 0..15 (code 8 is -0.0)."""
    return nvfp4.e2m1_values(torch.arange(16, dtype=torch.uint8)).tolist()


def scale_byte_values() -> torch.Tensor:
    """Decoded value of every E4M3 byte 0..255 (float32 [256]; NaN bytes are NaN), for histogram labels."""
    return numerics.e4m3_decode(torch.arange(256, dtype=torch.uint8))
