"""Triton kernels for OCP MXFP4 (``quant.mxfp4``): quantize / fake-quantize in one pass, and decode.

MX has no per-tensor scale, so one read of the input produces everything: per 32-element block the float32 max |x|,
the shared exponent from its bits (floor: floor(log2 amax) - 2; rceil: ceil(log2 fp32(amax / 6)), both clamped to
[-127, 127], -127 for an all-zero block), y = x * 2^-e (exact), E2M1 RNE with saturation, and e2m1 * 2^e in float32 for
the dequantized values. The exponents are read from the float32 bit pattern, with float32 subnormals first scaled by
2^64 (exact), so no ``log2`` rounding enters; ``amax / 6`` is a correctly rounded ``tl.div_rn``.
A program that meets NaN/Inf leaves the call's ticket in the device's check flag (``quant.kernels.checks``); such a
block gets the E8M0 NaN byte 0xFF and NaN values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant.kernels.nvfp4 import _storage_view, launch_options, quantize_launch, tile_index, tile_shape
from quant.kernels.rounding import e2m1_code_value, e2m1_rne, exp2i, sign_bit, store_values, with_sign_bit
from quant.mxfp4 import BLOCK, SCALE_RULES



@triton.jit
def _max_keeping_nan(a, b):
    """Combine function of a block max that a NaN wins (``tl.max`` would drop it): one max per element finds both the
    block's amax and whether the block is poisoned."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _floor_log2(a):
    """Exact floor(log2 a) (int32) for finite float32 a > 0, subnormals included."""
    small = a < 1.1754943508222875e-38  # 2^-126: scale float32 subnormals into the normal range first
    scaled = tl.where(small, a * 18446744073709551616.0, a)  # * 2^64, exact
    return ((scaled.to(tl.int32, bitcast=True) >> 23) & 0xFF) - tl.where(small, 127 + 64, 127)


@triton.jit
def _is_power_of_two(a):
    """a (finite float32 > 0) is an exact power of two."""
    small = a < 1.1754943508222875e-38
    scaled = tl.where(small, a * 18446744073709551616.0, a)
    return (scaled.to(tl.int32, bitcast=True) & 0x7FFFFF) == 0


@triton.jit
def _exp2i_wide(k):
    """Exact 2^k as float32 for int32 k in [-149, 127] (subnormal powers of two from the mantissa bits)."""
    subnormal = (1 << tl.minimum(tl.maximum(k + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, exp2i(tl.maximum(k, -126)), subnormal)


@triton.jit(do_not_specialize=["M", "ticket"])
def _mxfp4_kernel(
    x_ptr, stride_m, stride_k, M, K, KP,  # input [M, K]; KP = K rounded up to 32
    out_ptr, codes_ptr, scales_ptr,  # values [M, K]; uint8 [M, KP/2]; uint8 [M, KP/32]
    flag_ptr, ticket,  # int64 [1] check flag and this call's ticket (quant.kernels.checks)
    RCEIL: tl.constexpr, WRITE_CODES: tl.constexpr, WRITE_VALUES: tl.constexpr, OUT_BF16_BITS: tl.constexpr,
    NATIVE_BF16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    NB: tl.constexpr = BK // 32
    pid_m, pid_k = tile_index(KP, BK, False)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    row_ok = rows < M
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k,
                mask=row_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    blocks = tl.reshape(x, (BM, NB, 32))
    block_amax = tl.reduce(tl.abs(blocks), 2, _max_keeping_nan)  # [BM, NB]; NaN iff a NaN is in the block
    poisoned = (block_amax != block_amax) | (block_amax > 3.4028234663852886e38)  # NaN or Inf in the block
    tile_poisoned = tl.max(tl.max(poisoned.to(tl.int32), axis=1), axis=0) > 0
    tl.atomic_min(flag_ptr, ticket.to(tl.int64), mask=tile_poisoned)

    positive = block_amax > 0.0
    safe_amax = tl.where(positive & ~poisoned, block_amax, 1.0)
    if RCEIL:
        descale = tl.div_rn(safe_amax, 6.0 + tl.zeros_like(safe_amax))
        exponent = _floor_log2(descale) + tl.where(_is_power_of_two(descale), 0, 1)
    else:
        exponent = _floor_log2(safe_amax) - 2
    exponent = tl.minimum(tl.maximum(tl.where(positive, exponent, -127), -127), 127)  # [BM, NB]

    y = blocks * exp2i(-exponent)[:, :, None]  # exact; -exponent <= 126 for finite data
    magnitude, index = e2m1_rne(tl.abs(y))
    sign = sign_bit(y)  # uint32: 1 << 31 where y < 0
    if WRITE_CODES:
        code = tl.reshape(index | (sign >> 28).to(tl.int32), (BM, BK // 2, 2))
        low, high = tl.split(code)
        pairs = (pid_k * (BK // 2) + tl.arange(0, BK // 2)).to(tl.int64)
        tl.store(codes_ptr + rows[:, None] * (KP // 2) + pairs[None, :], (low | (high << 4)).to(tl.uint8),
                 mask=row_ok[:, None] & (pairs < KP // 2)[None, :])
        scale_cols = (pid_k * NB + tl.arange(0, NB)).to(tl.int64)
        tl.store(scales_ptr + rows[:, None] * (KP // 32) + scale_cols[None, :],
                 tl.where(poisoned, 0xFF, exponent + 127).to(tl.uint8),
                 mask=row_ok[:, None] & (scale_cols < KP // 32)[None, :])
    if WRITE_VALUES:
        factor = tl.where(poisoned, float("nan"), _exp2i_wide(exponent))  # [BM, NB]
        values = tl.reshape(with_sign_bit(magnitude, sign) * factor[:, :, None], (BM, BK))
        ptrs = out_ptr + rows[:, None] * K + cols[None, :]
        mask = row_ok[:, None] & (cols < K)[None, :]
        if tile_poisoned:  # NaN values: stored as PyTorch's BF16 NaN
            store_values(ptrs, values, mask, OUT_BF16_BITS, NATIVE_BF16)
        else:  # finite values: no per-element NaN select
            store_values(ptrs, values, mask, OUT_BF16_BITS, NATIVE_BF16, True)


@triton.jit(do_not_specialize=["M"])
def _mxfp4_decode_kernel(codes_ptr, scales_ptr, out_ptr, M, K, KP, OUT_BF16_BITS: tl.constexpr,
                         NATIVE_BF16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    NB: tl.constexpr = BK // 32
    pid_m, pid_k = tile_index(KP, BK, False)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < M
    pairs = (pid_k * (BK // 2) + tl.arange(0, BK // 2)).to(tl.int64)
    packed = tl.load(codes_ptr + rows[:, None] * (KP // 2) + pairs[None, :],
                     mask=row_ok[:, None] & (pairs < KP // 2)[None, :], other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BM, NB, 32))
    scale_cols = (pid_k * NB + tl.arange(0, NB)).to(tl.int64)
    scale_bytes = tl.load(scales_ptr + rows[:, None] * (KP // 32) + scale_cols[None, :],
                          mask=row_ok[:, None] & (scale_cols < KP // 32)[None, :], other=127).to(tl.int32)
    scale = tl.where(scale_bytes == 0xFF, float("nan"), _exp2i_wide(scale_bytes - 127))
    values = tl.reshape(e2m1_code_value(codes) * scale[:, :, None], (BM, BK))
    cols = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    store_values(out_ptr + rows[:, None] * K + cols[None, :], values, row_ok[:, None] & (cols < K)[None, :],
                 OUT_BF16_BITS, NATIVE_BF16)


def quantize_2d(x2d: Tensor, scale_rule: str, write_codes: bool, values_dtype: torch.dtype | None, flag: Tensor,
                ticket: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """x2d [M, K] -> (codes uint8 [M, KP/2], E8M0 bytes [M, KP/32]) if ``write_codes``, values [M, K] in
    ``values_dtype`` if given; a NaN/Inf in x leaves ``ticket`` in the int64 ``flag`` (``quant.kernels.checks``)."""
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule={scale_rule!r}; valid: {SCALE_RULES}")
    m, k = x2d.shape
    kp = triton.cdiv(k, BLOCK) * BLOCK
    bm, bk, options = quantize_launch(m, kp, x2d, mx=True)
    device = x2d.device
    codes = scales = values = None
    if write_codes:
        codes = torch.empty(m, kp // 2, dtype=torch.uint8, device=device)
        scales = torch.empty(m, kp // BLOCK, dtype=torch.uint8, device=device)
    if values_dtype is not None:
        values = torch.empty(m, k, dtype=values_dtype, device=device)
    placeholder = flag  # pointers of outputs that are not written are never dereferenced
    grid = (triton.cdiv(m, bm) * triton.cdiv(kp, bk),)
    _mxfp4_kernel[grid](
        x2d, x2d.stride(0), x2d.stride(1), m, k, kp, placeholder if values is None else _storage_view(values),
        placeholder if codes is None else codes, placeholder if scales is None else scales, flag, ticket,
        RCEIL=scale_rule == "rceil", WRITE_CODES=write_codes, WRITE_VALUES=values is not None,
        OUT_BF16_BITS=values_dtype == torch.bfloat16, BM=bm, BK=bk, **options,
    )
    return codes, scales, values


def decode_2d(codes: Tensor, scales: Tensor, cols: int, dtype: torch.dtype) -> Tensor:
    """Packed codes [M, KP/2] + E8M0 bytes [M, KP/32] -> [M, cols] in ``dtype``."""
    m = codes.shape[0]
    kp = codes.shape[1] * 2
    bm, bk = tile_shape(m, kp)
    bk = max(bk, BLOCK)
    out = torch.empty(m, cols, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(kp, bk),)
    _mxfp4_decode_kernel[grid](codes, scales, _storage_view(out), m, cols, kp, OUT_BF16_BITS=dtype == torch.bfloat16,
                               BM=bm, BK=bk, **launch_options(codes))
    return out
