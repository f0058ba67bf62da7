"""MXFP4 (OCP Microscaling v1.0): E2M1 elements with one power-of-two E8M0 scale per 32 elements (SPEC 7.1).

MXFP4 is NVFP4's sibling without the per-tensor FP32 scale and with a coarser scale: blocks of 32 instead of 16 and a
power of two instead of an E4M3 value, so up to one binade of resolution is lost per block. It is the format of
Quartet and of AMD's MI355X; comparing it with NVFP4 isolates what the finer scale buys.

Scale rules (choose one explicitly; they differ in whether the block max can clip):
* "floor" (OCP spec, torchao's default `ScaleCalculationMode.FLOOR`): X = 2^(floor(log2(amax)) - 2), where 2 is the
  exponent of E2M1's largest power of two (4). The block max lands in [4, 8) after scaling, so values in (6, 8)
  saturate to 6 (clipping up to 25%).
* "rceil" (cuBLAS, and TE's reference `pow_2_scales`): X = 2^ceil(log2(fp32(amax / 6))), never clips.
Both exponents are computed exactly from the float32 exponent bits (no log2 rounding), and clamped to [-127, 127].
An all-zero block gets X = 2^-127 (byte 0x00). Elements: y = x * 2^-e (exact), then E2M1 RNE with saturation
(quant.numerics). Dequantize: e2m1 * 2^e in float32, then the output dtype.
CUDA tensors go to the Triton kernels of `quant.kernels` when Triton is installed (same bytes, one pass).

Layout: like NVFP4, the input is viewed as [-1, K] and blocked along K (zero-padded to a multiple of 32); codes are
packed two per byte with element 2k in the low nibble; `scales` holds the raw E8M0 bytes [M, ceil(K/32)].
Known divergence: torchao's RCEIL maps a biased exponent of 0 to a multiplier of 1.0 instead of 2^127; this only
matters for blocks whose amax is below 6 * 2^-127 (about 3.5e-38).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from quant import kernels, numerics
from quant.errors import QuantError, check_finite, check_float_tensor, describe

FORMAT = "MXFP4"
BLOCK = 32
SCALE_RULES = ("floor", "rceil")
E2M1_MAX_EXPONENT = 2  # 4 = 2^2 is the largest power of two in E2M1


@dataclass(frozen=True, eq=False)
class MXFP4Tensor:
    """codes uint8 [M, ceil(K/32) * 16] (low nibble first); scales uint8 [M, ceil(K/32)] raw E8M0 bytes."""

    codes: Tensor
    scales: Tensor
    shape: torch.Size
    dtype: torch.dtype
    scale_rule: str


def _check_scale_rule(scale_rule: str, name: str | None) -> str:
    if scale_rule not in SCALE_RULES:
        raise QuantError(
            f"{FORMAT}: scale_rule={scale_rule!r} for {describe(name)} is not supported; valid: {SCALE_RULES}"
        )
    return scale_rule


def block_exponent(amax: Tensor, scale_rule: str) -> Tensor:
    """Unbiased shared exponent e (int32, in [-127, 127]) of blocks with float32 max |x| = amax."""
    if scale_rule == "floor":
        exponent = numerics.floor_log2(amax) - E2M1_MAX_EXPONENT
    else:
        descale = amax / torch.tensor(numerics.E2M1_MAX, dtype=torch.float32, device=amax.device)
        mantissa, frexp_exponent = torch.frexp(descale)  # descale = mantissa * 2^frexp_exponent, mantissa in [0.5, 1)
        exponent = frexp_exponent - (mantissa == 0.5).to(torch.int32)  # ceil(log2): exact powers of two stay
    exponent = torch.where(amax > 0, exponent, -127)
    return exponent.clamp(-127, 127)


def _quantize_unpacked(x: Tensor, scale_rule: str, name: str | None) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (codes uint8 [M, Kp] unpacked, E8M0 bytes [M, Kp/32])."""
    check_float_tensor(x, FORMAT, name)
    _check_scale_rule(scale_rule, name)
    xf = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    xp = torch.nn.functional.pad(xf, (0, (-xf.shape[1]) % BLOCK))  # [M, Kp]
    blocks = xp.view(xp.shape[0], -1, BLOCK)  # [M, Kp/32, 32]
    amax = blocks.abs().amax(dim=-1)  # [M, Kp/32]
    check_finite(amax.max(), xf, FORMAT, name)
    exponent = block_exponent(amax, scale_rule)
    y = blocks * numerics.exp2i(-exponent)[..., None]  # exact: multiplication by a power of two
    return numerics.e2m1_encode_rne(y).view(xp.shape), numerics.e8m0_encode(exponent)


def quantize(x: Tensor, scale_rule: str = "floor", name: str | None = None) -> MXFP4Tensor:
    """MXFP4-quantize x (viewed as [-1, x.shape[-1]]) in 1x32 blocks along the last dim."""
    if kernels.enabled_for(x):
        return kernels.load().mxfp4_quantize(x, scale_rule, name)
    codes, scales = _quantize_unpacked(x, scale_rule, name)
    return MXFP4Tensor(
        codes=numerics.pack_nibbles(codes), scales=scales, shape=x.shape, dtype=x.dtype, scale_rule=scale_rule
    )


def unpack_codes(q: MXFP4Tensor, padded: bool = False) -> Tensor:
    """The 4-bit codes as uint8 [M, K] (or [M, ceil(K/32) * 32] with the zero padding if `padded`)."""
    codes = numerics.unpack_nibbles(q.codes)
    return codes if padded else codes[:, : q.shape[-1]]


def _decode(codes: Tensor, scales: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """codes uint8 [M, Kp], E8M0 bytes [M, Kp/32] -> `shape` in `dtype`."""
    values = numerics.e2m1_values(codes).view(codes.shape[0], -1, BLOCK)  # [M, Kp/32, 32]
    decoded = (values * numerics.e8m0_decode(scales)[..., None]).view(codes.shape)
    return decoded[:, : shape[-1]].reshape(shape).to(dtype)


def dequantize(q: MXFP4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """e2m1(code) * 2^(scale - 127) in float32, reshaped to q.shape and cast to `dtype`."""
    if kernels.enabled_for(q.codes):
        return kernels.load().mxfp4_dequantize(q, dtype)
    return _decode(unpack_codes(q, padded=True), q.scales, q.shape, dtype)


def fake_quantize(x: Tensor, scale_rule: str = "floor", name: str | None = None) -> Tensor:
    """dequantize(quantize(x, ...)) in x.dtype, without the packing round trip. Not differentiable (no autograd)."""
    if kernels.enabled_for(x):
        return kernels.load().mxfp4_fake_quantize(x, scale_rule, name)
    codes, scales = _quantize_unpacked(x, scale_rule, name)
    return _decode(codes, scales, x.shape, x.dtype)
