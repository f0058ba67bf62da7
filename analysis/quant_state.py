"""The one place where analysis reads quantization state from ``quant``.

Why a single adapter: analysis must never carry a second implementation of a numeric rule. Everything below calls
``quant``'s functions (``quant.nvfp4.quantize``/``dequantize``/``unpack_codes``/``e2m1_values``/``scale_values``);
when ``quant`` grows accessors for "the exact weight operand a quantized layer uses in fprop" and "the quantized
modules with their specs", only this file changes.

Analysis quantizes with round-to-nearest only (never stochastic rounding, never a generator): reading the state
must not consume random numbers or change a tensor, so a run with analysis on trains exactly like one with it off.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quant import numerics, nvfp4

# E4M3 (float8_e4m3fn) has exponent bias 7, so its smallest normal value is 2^(1-7); scales below it (and above 0)
# are subnormal. Needed from quant as a named constant or an is_subnormal helper (see the analysis report).
_E4M3_MIN_NORMAL = 2.0 ** -6

WEIGHT_TILE = (16, 16)  # TE's NVFP4 recipe scales weights per 16x16 tile (2D quantization), SPEC 1.4

# Module classes whose weight is a GEMM operand; the first of these in a module's MRO names its "module type".
_BASE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.Embedding)


@dataclass(frozen=True)
class ReportLayers:
    """What analysis needs from a ``quant.QuantReport``: layer names, which are quantized, their weight tiles."""

    names: tuple[str, ...] = ()
    quantized: frozenset[str] = frozenset()
    weight_tiles: dict[str, tuple[int, int]] = field(default_factory=dict)


def report_layers(report: object | None) -> ReportLayers:
    """Read the report of ``quant.apply`` (None: nothing is quantized, e.g. an unquantized model)."""
    if report is None:
        return ReportLayers()
    rows = list(report.rows)
    quantized = frozenset(row.name for row in rows if row.quantized)
    return ReportLayers(names=tuple(row.name for row in rows), quantized=quantized,
                        weight_tiles={name: WEIGHT_TILE for name in quantized})


@dataclass(frozen=True)
class QuantizedOperand:
    """A 2-D operand [M, K] and what NVFP4 makes of it (all tensors on CPU unless the input was elsewhere)."""

    format: str
    tile: tuple[int, int]
    raw: torch.Tensor  # float32 [M, K]
    codes: torch.Tensor  # uint8 [M, K], one 4-bit code per element
    grid_values: torch.Tensor  # float32 [M, K], E2M1 value of each code (code 8 is -0.0)
    max_grid_magnitude: float  # largest |grid value| of the format (6 for E2M1)
    scale_bytes: torch.Tensor  # uint8 [n_scales], one per block (a 16x16 tile counted once)
    scale_values: torch.Tensor  # float32 [n_scales]
    scale_subnormal: torch.Tensor  # bool [n_scales]
    dequantized: torch.Tensor  # float32 [M, K]


def base_type(module: nn.Module) -> str:
    """The torch.nn class a (possibly quantized) layer stands for: ``QuantLinear`` -> ``"Linear"``."""
    for cls in type(module).__mro__:
        if cls in _BASE_TYPES:
            return cls.__name__
    return type(module).__name__


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers with a weight of 2 or more dims (Linear, Conv*, Embedding, ...), in model order, shared weights once."""
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2 and id(weight) not in seen:
            seen.add(id(weight))
            layers.append((name, module))
    return layers


def weight_operand(module: nn.Module) -> torch.Tensor:
    """The weight as the 2-D GEMM operand [out, in * kernel] the quantizer blocks along its last dim (float32)."""
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1).to(torch.float32)


def quantize_operand(x2d: torch.Tensor, tile: tuple[int, int] = WEIGHT_TILE) -> QuantizedOperand:
    """NVFP4-quantize a 2-D operand with round-to-nearest through ``quant.nvfp4`` and decode everything analysis needs."""
    raw = x2d.detach().to(torch.float32)
    q = nvfp4.quantize(raw, tile=tile)
    codes = nvfp4.unpack_codes(q)  # [M, K]
    grid = nvfp4.e2m1_values(codes)
    scale_bytes = q.scales[:: tile[0]] if tile[0] > 1 else q.scales  # a 16x16 tile's byte is repeated on its rows
    scale_values = numerics.e4m3_decode(scale_bytes)
    return QuantizedOperand(
        format="nvfp4",
        tile=tuple(tile),
        raw=raw,
        codes=codes,
        grid_values=grid,
        max_grid_magnitude=max(abs(v) for v in code_grid_values()),
        scale_bytes=scale_bytes.reshape(-1),
        scale_values=scale_values.reshape(-1),
        scale_subnormal=((scale_values > 0) & (scale_values < _E4M3_MIN_NORMAL)).reshape(-1),
        dequantized=nvfp4.dequantize(q, torch.float32),
    )


def code_grid_values() -> list[float]:
    """E2M1 grid value of each 4-bit code 0..15 (code 8 is -0.0)."""
    return nvfp4.e2m1_values(torch.arange(16, dtype=torch.uint8)).tolist()


def scale_byte_values() -> torch.Tensor:
    """Decoded value of every E4M3 byte 0..255 (float32 [256]; NaN bytes are NaN), for histogram labels."""
    return numerics.e4m3_decode(torch.arange(256, dtype=torch.uint8))
