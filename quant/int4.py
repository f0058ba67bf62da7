"""Symmetric INT4 with one FP32 scale per block of the last dim: the integer baseline for the 4-bit float formats.

The rule, in float32 (one IEEE operation per step):
* scale = fp32(absmax / 7) per block of `blocksize` consecutive elements of the last dim (zero-padded);
* q = clamp(round_half_even(fp32(x / scale)), -7, 7), and q = 0 for an all-zero block (scale 0);
* dequantize: fp32(q * scale), then the output dtype.

Why [-7, 7] and not [-8, 7]: with scale = absmax / 7 the block max maps to +-7, so -8 could only be reached by a value
beyond the block max; clamping to the symmetric range makes quantize(-x) == -quantize(x) and keeps the grid (and the
rounding error of a symmetric distribution) centred on zero, at the cost of one of 16 codes. Round-half-even matches
torch.round and the float formats' RNE. The same choice as the common symmetric weight-only INT4 recipes that use
absmax / 7; it is not the GPTQ/AWQ asymmetric (zero-point) variant.

Layout: the input is viewed as [-1, K]; codes are 4-bit two's complement nibbles packed two per byte with element 2k
in the low nibble, [M, ceil(K / blocksize) * blocksize / 2]; scales are float32 [M, ceil(K / blocksize)].
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from quant import numerics
from quant.errors import QuantError, check_finite, check_float_tensor, describe

FORMAT = "INT4"
QMAX = 7
BLOCKSIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True, eq=False)
class INT4Tensor:
    """codes uint8 [M, Kp / 2] two's complement nibbles (low first); scales float32 [M, Kp / blocksize]."""

    codes: Tensor
    scales: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int


def _check_blocksize(blocksize: int, name: str | None) -> int:
    if blocksize not in BLOCKSIZES:
        raise QuantError(
            f"{FORMAT}: blocksize={blocksize!r} for {describe(name)} is not supported; valid: {BLOCKSIZES}"
        )
    return blocksize


def _quantize_ints(x: Tensor, blocksize: int, name: str | None) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (integers int8 in [-7, 7] [M, Kp], scales float32 [M, Kp / blocksize])."""
    check_float_tensor(x, FORMAT, name)
    _check_blocksize(blocksize, name)
    xf = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    xp = torch.nn.functional.pad(xf, (0, (-xf.shape[1]) % blocksize))  # [M, Kp]
    blocks = xp.view(xp.shape[0], -1, blocksize)  # [M, Kp/bs, bs]
    absmax = blocks.abs().amax(dim=-1)
    check_finite(absmax.max(), xf, FORMAT, name)
    scales = absmax / torch.tensor(float(QMAX), device=x.device)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    ints = torch.round(blocks / safe[..., None]).clamp(-QMAX, QMAX)
    return ints.to(torch.int8).view(xp.shape), scales


def quantize(x: Tensor, blocksize: int = 32, name: str | None = None) -> INT4Tensor:
    """Symmetric per-block INT4 of x (viewed as [-1, x.shape[-1]]) along the last dim."""
    ints, scales = _quantize_ints(x, blocksize, name)
    nibbles = ints.view(torch.uint8) & 0x0F  # 4-bit two's complement
    return INT4Tensor(
        codes=numerics.pack_nibbles(nibbles), scales=scales, shape=x.shape, dtype=x.dtype, blocksize=blocksize
    )


def unpack_ints(q: INT4Tensor, padded: bool = False) -> Tensor:
    """The integers in [-7, 7] as int8 [M, K] (or [M, Kp] with the padding if `padded`)."""
    nibbles = numerics.unpack_nibbles(q.codes).to(torch.int8)
    ints = torch.where(nibbles > 7, nibbles - 16, nibbles)
    return ints if padded else ints[:, : q.shape[-1]]


def _decode(ints: Tensor, scales: Tensor, blocksize: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """int8 [M, Kp], float32 [M, Kp / blocksize] -> `shape` in `dtype`."""
    blocks = ints.to(torch.float32).view(ints.shape[0], -1, blocksize)
    return (blocks * scales[..., None]).view(ints.shape)[:, : shape[-1]].reshape(shape).to(dtype)


def dequantize(q: INT4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """fp32(q * scale), reshaped to q.shape and cast to `dtype`."""
    return _decode(unpack_ints(q, padded=True), q.scales, q.blocksize, q.shape, dtype)


def fake_quantize(x: Tensor, blocksize: int = 32, name: str | None = None) -> Tensor:
    """dequantize(quantize(x, ...)) in x.dtype, without the packing round trip. Not differentiable (no autograd)."""
    ints, scales = _quantize_ints(x, blocksize, name)
    return _decode(ints, scales, blocksize, x.shape, x.dtype)
