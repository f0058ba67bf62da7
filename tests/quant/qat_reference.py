"""Independent float64 references for the QAT layer tests (imported by test_gemm/test_functional/test_modules).

Nothing here calls ``quant.gemm`` or ``quant.functional``: NVFP4 bytes are decoded from the SPEC tables (section 2:
low nibble first, E2M1 values, E4M3 bit layout), TE's GEMM alpha is computed from SPEC 1.8 with numpy float32
scalars, and GEMMs are float64 sums.

What "bit equality" means for an emulated GEMM: the emulation sums exact products (at most 12 significant bits each,
SPEC 1.8) in float32, in whatever order the BLAS or convolution kernel picks. Every partial sum is exact, whatever the
order, when all products are multiples of a common quantum Q and the sum of their magnitudes is at most 2^24 Q
(``exact_fp32_sum``). On those outputs the emulation must equal ``round(fp32(S * alpha))`` bit for bit, S being the
float64 sum; elsewhere it may differ from it by the summation-order rounding only.
"""
from __future__ import annotations

import numpy as np
import torch

F32 = np.float32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e4m3_value(byte: int) -> float:
    """SPEC 2: sign 0, 4 exponent bits (bias 7), 3 mantissa bits; subnormal m * 2^-9; 0x7F NaN."""
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if byte & 0x7F == 0x7F:
        return float("nan")
    if exponent == 0:
        return mantissa * 2.0**-9
    return (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def decode_scaled_codes(q) -> np.ndarray:
    """e2m1(code) * s_b per element of an ``NVFP4Tensor``, float64 [M, K], decoded from the raw bytes."""
    packed = q.codes.cpu().numpy().astype(np.int64)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)  # low nibble first
    magnitude = np.array(E2M1)[codes & 7]
    values = np.where(codes & 8, -magnitude, magnitude)
    scales = np.vectorize(e4m3_value)(q.scales.cpu().numpy().astype(np.int64))  # [M, K/16]
    scaled = values * np.repeat(scales, 16, axis=1)[:, : values.shape[1]]
    return scaled[:, : q.shape[-1]]


def te_alpha(amax_a: torch.Tensor, amax_b: torch.Tensor) -> np.float32:
    """SPEC 1.8: alpha = fp32(fp32(A_a * A_b) * fp32(1 / (6*6*448*448))), as float32 scalar ops."""
    factor = F32(1) / F32(6 * 6 * 448 * 448)
    return F32(F32(F32(float(amax_a)) * F32(float(amax_b))) * factor)


def exact_fp32_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask [M, N]: is sum_k a[m, k] * b[n, k] exact in float32 for any summation order? (see module docstring)."""
    products = a[:, None, :] * b[None, :, :]  # [M, N, K], exact in float64
    magnitude = np.abs(products)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1)))
        quantum = np.where(magnitude > 0, 2.0 ** (exponent - 11), np.inf)
    q_min = quantum.min(axis=-1)
    return (magnitude.sum(axis=-1) <= 2.0**24 * q_min) | np.isinf(q_min)


def round_like_epilogue(sums: np.ndarray, alpha: np.float32, out_dtype: torch.dtype,
                        bias: np.ndarray | None = None) -> torch.Tensor:
    """out_dtype(fp32(fp32(S * alpha) + bias)): the GEMM epilogue on exact float64 sums S."""
    out = F32(sums.astype(np.float32)) * alpha  # S is exact in float32 where the mask holds
    if bias is not None:
        out = (out + bias.astype(np.float32)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(out_dtype)


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the last place of b in a's dtype (0 for empty tensors)."""
    spacing = torch.finfo(a.dtype).eps * b.double().abs().clamp_min(torch.finfo(a.dtype).tiny)
    diff = (a.double() - b.double()).abs() / spacing
    return float(diff.max()) if diff.numel() else 0.0
