"""Triton kernels for TE-exact NVFP4: global amax, quantize (codes + scales), fused fake-quantize, decode.

Why: the PyTorch reference (``quant.nvfp4``) materialises a float32 copy of the tensor and a dozen intermediates, so
a fake-quantize of an 8192x4096 BF16 tensor moves many times the bytes it must. Here every output comes from one read
of the input after a separate global-amax reduction (the amax must be known before any block scale, SPEC 1.2 step 1):

* ``_amax_kernel``: max |x| (of the RHT'ed tensor when ``RHT``) into a float32 cell with ``atomic_max``. NaN counts as
  +inf, so the amax is +inf iff the tensor holds a non-finite value ("poisoned"); such a tensor also leaves its
  ticket in the device's check flag (``quant.kernels.checks``).
* ``_quantize_kernel``: per tile [BM, BK] the SPEC 1.2 chain in float32, one operation at a time (same order and
  constants as ``quant.nvfp4``); writes the packed codes and E4M3 scale bytes and/or the dequantized values
  (TE's dequant formula, SPEC 1.8) in the output dtype. 16x16 tiles take the block max over 16 rows (BM % 16 == 0).
  Stochastic rounding draws 8 bits per element from Philox-4x32 (one call per 16-element block: key = the 64-bit
  seed, counter = (the block's global index, the 64-bit call counter)), so results are reproducible given (seed,
  counter) but are not the reference's bits (SR is tested statistically, SPEC 1.7). Counter 0 is exactly
  ``tl.randint4x(seed, block_index)``; a layer keeps one seed and advances the counter (``quant.functional``).
* ``_decode_kernel``: packed codes + scale bytes -> dequantized values or the GEMM's scaled codes.

A poisoned tensor (amax = +inf) gets scale byte 0x7F (E4M3 NaN) and NaN dequantized values, so it cannot pass
silently into a GEMM; the error itself is raised by the caller (``quant.kernels.checks``).
Inputs are 2-D views with arbitrary strides (a transposed view is read in place); outputs are contiguous.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant import numerics, rht as rht_transform
from quant.kernels.rounding import (
    e2m1_code_value,
    e2m1_rne,
    e2m1_sr,
    e4m3_round,
    e4m3_value,
    join_halves,
    rht_halves,
    rht_tile,
    sign_bit,
    store_values,
    with_sign_bit,
)
from quant.nvfp4 import BLOCK, E2M1_X_E4M3, INV_2688, INV_6

FLT_MAX = numerics.FLT_MAX
SIGN_MASK = sum(1 << i for i, s in enumerate(rht_transform.SIGN_VECTOR) if s < 0)  # bit i <=> s_i = -1


@dataclass(frozen=True)
class LaunchConfig:
    """Program tile and warps of every kernel in ``quant.kernels`` (memory-bound: ~4096 elements per program).

    ``bench/kernel_throughput.py --sweep`` times alternatives; ``set_launch_config`` applies one process-wide."""

    elements: int = 4096  # target BM * BK per program
    max_bk: int = 128  # widest tile along the blocked dim (a power of two >= 32)
    num_warps: int = 4
    # largest tile [rows, cols] of the rowwise + columnwise pair kernels (powers of two, rows >= 16): each tile is read
    # along one dim and written along both (``bench/kernel_throughput.py --sweep`` times the alternatives)
    pair_amax_tile: tuple[int, int] = (64, 128)
    pair_quantize_tile: tuple[int, int] = (32, 64)
    # the fused quantize pass (``quantize_2d``): 16 x 128 tiles on 2 warps, the same 32 elements per thread as 4096 on
    # 4 warps but twice the programs; its RN, SR and RHT variants gained up to 5 points of copy bandwidth on an H200 and
    # lost none beyond the spread on an H100 (the sweep in docs/kernels.md, "Latest")
    quantize_elements: int = 2048
    quantize_warps: int = 2
    # the one-pass MXFP4 kernel: 16 x 128 tiles on 4 warps (16 elements per thread); its floor rule on BF16 went from
    # 83% to 99% of copy bandwidth on an H100 against 4096 elements on 4 warps (docs/kernels.md, "Latest")
    mx_elements: int = 2048
    mx_warps: int = 4


_config = LaunchConfig()


def set_launch_config(config: LaunchConfig) -> LaunchConfig:
    """Use ``config`` for later launches; returns the previous one."""
    global _config
    previous, _config = _config, config
    return previous


def launch_options(on: Tensor) -> dict[str, object]:
    """What every kernel launch on tensor ``on`` passes: the configured warps, no FMA contraction (each SPEC step is
    one rounding), and the kernels' ``NATIVE_BF16``: compiled for a GPU (the hardware BF16 conversion, the SR rule's
    rounding-mode addition) rather than run by Triton's CPU interpreter (the only place CPU tensors reach a kernel),
    whose BF16 cast truncates and which has no rounding-mode addition."""
    return {"num_warps": _config.num_warps, "enable_fp_fusion": False, "NATIVE_BF16": on.is_cuda}


@triton.jit
def tile_index(cols, BK: tl.constexpr, REVERSE: tl.constexpr):
    """(pid_m, pid_k) of this program in a 1-D grid over [M, cols] tiles, row strip after row strip (memory order);
    backwards with REVERSE, so a pass that follows another over the same tensor starts on the tiles still in L2."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    tiles_k = tl.cdiv(cols, BK)
    return pid // tiles_k, pid % tiles_k


@triton.jit
def _load_tile(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, BM: tl.constexpr, BK: tl.constexpr):
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    return tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=mask, other=0.0)


@triton.jit
def _load_halves(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, BM: tl.constexpr, BK: tl.constexpr):
    """Tile (pid_m, pid_k) [BM, BK] of x [M, K] as the halves [BM, BK/16, 8] of its 16-blocks (``join_halves``),
    zeros outside x: two loads of one shape, so each 16-block lands in one thread."""
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_k * BK + tl.arange(0, BK // 16) * 16).to(tl.int64)[:, None] + tl.arange(0, 8)[None, :]  # [NB, 8]
    ptrs = x_ptr + rows[:, None, None] * stride_m + cols[None, :, :] * stride_k
    row_ok = (rows < M)[:, None, None]
    low = tl.load(ptrs, mask=row_ok & (cols < K)[None, :, :], other=0.0)
    high = tl.load(ptrs + 8 * stride_k, mask=row_ok & (cols + 8 < K)[None, :, :], other=0.0)
    return low, high


@triton.jit
def _load_blocks(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, RHT: tl.constexpr, SIGN_MASK: tl.constexpr,
                 NATIVE_BF16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Tile (pid_m, pid_k) of x as float32 16-blocks [BM, BK/16, 16], RHT'ed if RHT.

    The RHT loads the tile by halves (``_load_halves``), so its butterflies (``rounding.rht_halves``) and then the
    block max, the scale and the SR bits of each block stay in one thread; the RHT+SR pass gained 5 points of copy
    bandwidth from this over the tensor-core RHT on an H100. Each half-load uses half of every 32-byte sector it
    touches: with halves loads and stores for every variant, the round-to-nearest pass fell from 99% to 74% of a copy
    (docs/kernels.md, "Latest"), so the passes without RHT, bound by memory rather than by instructions, keep the plain
    [BM, BK] load (a block over two threads), and the stores stay [BM, BK] for all."""
    if RHT:
        low, high = _load_halves(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, BM, BK)
        return join_halves(*rht_halves(low, high, SIGN_MASK, NATIVE_BF16))
    x = _load_tile(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, BM, BK)
    return tl.reshape(x, (BM, BK // 16, 16)).to(tl.float32)


@triton.jit(do_not_specialize=["M", "ticket"])
def _amax_kernel(x_ptr, stride_m, stride_k, M, K, amax_ptr, flag_ptr, ticket,
                 RHT: tl.constexpr, SIGN_MASK: tl.constexpr, FLT_MAX: tl.constexpr, NATIVE_BF16: tl.constexpr,
                 BM: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_k = tile_index(K, BK, False)
    blocks = _load_blocks(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, RHT, SIGN_MASK, NATIVE_BF16, BM, BK)
    _record_amax(tl.reshape(blocks, (BM, BK)), amax_ptr, flag_ptr, ticket, FLT_MAX)


@triton.jit
def _record_amax(x, amax_ptr, flag_ptr, ticket, FLT_MAX: tl.constexpr):
    """max |x| of a float32 tile into the amax cell (``atomic_max``); NaN counts as +inf, so the amax is +inf iff a
    value is not finite, and such a tile leaves ``ticket`` in the check flag (``quant.kernels.checks``)."""
    a = tl.where(x != x, float("inf"), tl.abs(x))
    tile_max = tl.max(tl.max(a, axis=1), axis=0)
    tl.atomic_max(amax_ptr, tile_max)
    tl.atomic_min(flag_ptr, ticket.to(tl.int64), mask=tile_max > FLT_MAX)


@triton.jit
def _philox_block_bits(key, counter, block_index):
    """Four uint32 words per element of ``block_index`` (int64): Philox-4x32-10 with the 64-bit ``key`` and the counter
    (block_index low, high, counter low, high); with counter 0 this is ``tl.randint4x(key, block_index)``."""
    low = block_index.to(tl.uint32)
    zero = low * 0
    high = (block_index >> 32).to(tl.uint32)
    key = key.to(tl.uint64)
    return _philox(low, high, zero + counter.to(tl.uint32), zero + (counter >> 32).to(tl.uint32),
                   (key & 0xFFFFFFFF).to(tl.uint32), (key >> 32).to(tl.uint32))


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1), all uint32: ``tl.philox``'s constants,
    rounds and word order, with each round's two 32 x 32-bit products formed as 64-bit products, one multiply giving
    both the high and the low word (``mul.wide.u32``) where ``tl.philox`` issues a high and a low multiply. The
    stochastic-rounding passes are bound by instruction issue, and this is 40 of their instructions per thread."""
    for _ in tl.static_range(10):
        product_2 = c2.to(tl.uint64) * 0xCD9E8D57  # PHILOX_ROUND_B * c2
        product_0 = c0.to(tl.uint64) * 0xD2511F53  # PHILOX_ROUND_A * c0
        c0 = (product_2 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (product_0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = product_2.to(tl.uint32)
        c3 = product_0.to(tl.uint32)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit(do_not_specialize=["M"])
def _quantize_kernel(
    x_ptr, stride_m, stride_k, M, K, KP,  # input [M, K] (any strides); KP = K rounded up to 16
    amax_ptr, seed_ptr,  # float32 [1] global amax; int64 [2] SR Philox (key, counter) (read only if STOCHASTIC)
    out_ptr,  # values [M, K] contiguous, output dtype (if WRITE_VALUES): dequantized, or the scaled codes
    codes_ptr, scales_ptr,  # uint8 [M, KP/2] packed codes, uint8 [M, KP/16] scale bytes (if WRITE_CODES)
    dequantized_ptr,  # a second values output [M, K] (if WRITE_DEQUANTIZED): dequantized, next to scaled codes
    TILE_ROWS: tl.constexpr, RHT: tl.constexpr, STOCHASTIC: tl.constexpr,
    WRITE_CODES: tl.constexpr, WRITE_VALUES: tl.constexpr, SCALED_VALUES: tl.constexpr, WRITE_DEQUANTIZED: tl.constexpr,
    SIGN_MASK: tl.constexpr, INV_6: tl.constexpr, INV_2688: tl.constexpr, E2M1_X_E4M3: tl.constexpr,
    FLT_MAX: tl.constexpr, OUT_BF16_BITS: tl.constexpr, DEQUANTIZED_BF16_BITS: tl.constexpr, NATIVE_BF16: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    pid_m, pid_k = tile_index(KP, BK, True)  # backwards: the amax pass just read the last tiles
    blocks = _load_blocks(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, RHT, SIGN_MASK, NATIVE_BF16, BM, BK)
    _quantize_tile(blocks, pid_m, pid_k, M, K, KP, amax_ptr, seed_ptr, out_ptr, codes_ptr, scales_ptr, dequantized_ptr,
                   TILE_ROWS, STOCHASTIC, WRITE_CODES, WRITE_VALUES, SCALED_VALUES, WRITE_DEQUANTIZED, INV_6, INV_2688,
                   E2M1_X_E4M3, FLT_MAX, OUT_BF16_BITS, DEQUANTIZED_BF16_BITS, NATIVE_BF16, BM, BK)


@triton.jit
def _quantize_tile(
    blocks, pid_m, pid_k, M, K, KP, amax_ptr, seed_ptr, out_ptr, codes_ptr, scales_ptr, dequantized_ptr,
    TILE_ROWS: tl.constexpr, STOCHASTIC: tl.constexpr, WRITE_CODES: tl.constexpr, WRITE_VALUES: tl.constexpr,
    SCALED_VALUES: tl.constexpr, WRITE_DEQUANTIZED: tl.constexpr, INV_6: tl.constexpr, INV_2688: tl.constexpr,
    E2M1_X_E4M3: tl.constexpr, FLT_MAX: tl.constexpr, OUT_BF16_BITS: tl.constexpr,
    DEQUANTIZED_BF16_BITS: tl.constexpr, NATIVE_BF16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """SPEC 1.2 steps 2-9 on the float32 16-blocks [BM, BK/16, 16] of tile (pid_m, pid_k) of an [M, K] operand blocked
    along K (KP = K rounded up to 16), and its stores (the outputs as in ``_quantize_kernel``)."""
    NB: tl.constexpr = BK // 16
    # SPEC 1.2 steps 2-4 (per program; a handful of scalar operations)
    amax = tl.load(amax_ptr)
    poisoned = (amax != amax) | (amax > FLT_MAX)
    s_enc = tl.minimum(tl.div_rn(E2M1_X_E4M3 + tl.zeros_like(amax), amax), FLT_MAX)
    s_enc = tl.where((amax == 0.0) | (s_enc == 0.0), 1.0, s_enc)
    s_dec = tl.div_rn(1.0 + tl.zeros_like(s_enc), s_enc)
    multiplier = s_enc * INV_6

    # steps 5-7: block max, one rounding to E4M3, encode factor = 1 / (s_b * S_dec)
    if TILE_ROWS == 16:
        tiles = tl.max(tl.max(tl.reshape(tl.abs(blocks), (BM // 16, 16, NB, 16)), axis=3), axis=1)  # [BM/16, NB]
        block_amax = tl.reshape(tl.broadcast_to(tiles[:, None, :], (BM // 16, 16, NB)), (BM, NB))
    else:
        block_amax = tl.max(tl.abs(blocks), axis=2)  # [BM, NB]
    scale_byte, scale = e4m3_round(tl.minimum(block_amax * multiplier, 448.0))  # [BM, NB]
    encode = tl.minimum(tl.div_rn(1.0 + tl.zeros_like(scale), scale * s_dec), FLT_MAX)

    # steps 8-9: scale and round to E2M1 (magnitude on the grid, sign of y)
    y = blocks * encode[:, :, None]  # [BM, NB, 16]
    if STOCHASTIC:
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        block_index = rows[:, None] * (KP // 16) + (pid_k * NB + tl.arange(0, NB))[None, :]  # [BM, NB]
        r0, r1, r2, r3 = _philox_block_bits(tl.load(seed_ptr), tl.load(seed_ptr + 1), block_index)
        words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BM, NB, 4))  # 16 random bytes per block
        shifts = (tl.arange(0, 4) * 8).to(tl.uint32)
        random_bytes = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xFF  # [BM, NB, 4, 4]
        magnitude, index = e2m1_sr(tl.abs(y), tl.reshape(random_bytes, (BM, NB, 16)), NATIVE_BF16)
    else:
        magnitude, index = e2m1_rne(tl.abs(y))
    sign = sign_bit(y)  # uint32: 1 << 31 where y < 0
    signed = with_sign_bit(magnitude, sign)  # the signed grid value, [BM, NB, 16]

    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < M
    if WRITE_CODES:
        code = tl.reshape(index | (sign >> 28).to(tl.int32), (BM, BK // 2, 2))
        low, high = tl.split(code)
        pairs = (pid_k * (BK // 2) + tl.arange(0, BK // 2)).to(tl.int64)
        tl.store(codes_ptr + rows[:, None] * (KP // 2) + pairs[None, :], (low | (high << 4)).to(tl.uint8),
                 mask=row_ok[:, None] & (pairs < KP // 2)[None, :])
        scale_cols = (pid_k * NB + tl.arange(0, NB)).to(tl.int64)
        tl.store(scales_ptr + rows[:, None] * (KP // 16) + scale_cols[None, :],
                 tl.where(poisoned, 0x7F, scale_byte).to(tl.uint8),
                 mask=row_ok[:, None] & (scale_cols < KP // 16)[None, :])
    cols = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    value_mask = row_ok[:, None] & (cols < K)[None, :]
    offsets = rows[:, None] * K + cols[None, :]
    dequant_factor = (scale * amax) * INV_2688  # TE's dequant: fp32(fp32(s_b * A) * fp32(1/2688)), [BM, NB]
    if WRITE_VALUES:
        if SCALED_VALUES:  # the GEMM operand e2m1 * s_b, as _decode_kernel computes it from the codes
            factor = scale
        else:
            factor = dequant_factor
        _store_blocks(out_ptr + offsets, value_mask, signed, factor, poisoned, OUT_BF16_BITS, NATIVE_BF16, BM, BK)
    if WRITE_DEQUANTIZED:  # TE's dequant as well (the scaled codes went to out_ptr)
        _store_blocks(dequantized_ptr + offsets, value_mask, signed, dequant_factor, poisoned, DEQUANTIZED_BF16_BITS,
                      NATIVE_BF16, BM, BK)


@triton.jit
def _store_blocks(ptrs, mask, signed, factor, poisoned, OUT_BF16_BITS: tl.constexpr, NATIVE_BF16: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr):
    """Store signed E2M1 grid values [BM, NB, 16] times their block's factor [BM, NB] as values [BM, BK];
    every value of a poisoned tensor is NaN. The poisoned case is a branch of its own, so the values of a clean tensor
    (finite: a grid value times a finite factor) are stored without a per-element NaN select."""
    if poisoned:
        store_values(ptrs, tl.full((BM, BK), float("nan"), tl.float32), mask, OUT_BF16_BITS, NATIVE_BF16)
    else:
        store_values(ptrs, tl.reshape(signed * factor[:, :, None], (BM, BK)), mask, OUT_BF16_BITS, NATIVE_BF16, True)


@triton.jit(do_not_specialize=["M", "ticket", "ticket_t"])
def _amax_pair_kernel(x_ptr, stride_m, stride_k, M, K, amax_ptr, amax_t_ptr, flag_ptr, ticket, ticket_t,
                      FLT_MAX: tl.constexpr, SIGN_MASK: tl.constexpr, NATIVE_BF16: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):
    """The amaxes of ``_quantize_pair_kernel``'s two operands from one read of x [M, K]: max |x| and max |RHT(x^T)|
    (the RHT along M), each with its own ticket (``_amax_kernel``)."""
    pid_m, pid_k = tile_index(K, BK, False)
    x = _load_tile(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, BM, BK)
    _record_amax(x.to(tl.float32), amax_ptr, flag_ptr, ticket, FLT_MAX)
    _record_amax(rht_tile(tl.trans(x), BK, BM, SIGN_MASK, NATIVE_BF16), amax_t_ptr, flag_ptr, ticket_t, FLT_MAX)


@triton.jit(do_not_specialize=["M"])
def _quantize_pair_kernel(
    x_ptr, stride_m, stride_k, M, K, KP,  # input [M, K] (any strides), M % 16 == 0; KP = K rounded up to 16
    amax_ptr, seed_ptr, out_ptr,  # rowwise operand: amax, SR (key, counter), scaled codes [M, K]
    amax_t_ptr, seed_t_ptr, out_t_ptr,  # columnwise operand of x^T [K, M], RHT'ed along M: the same three
    STOCHASTIC: tl.constexpr, SIGN_MASK: tl.constexpr, INV_6: tl.constexpr, INV_2688: tl.constexpr,
    E2M1_X_E4M3: tl.constexpr, FLT_MAX: tl.constexpr, OUT_BF16_BITS: tl.constexpr, OUT_T_BF16_BITS: tl.constexpr,
    NATIVE_BF16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """x's two NVFP4 operands of a ``full`` training step from one read: x 1x16-blocked along K (the forward's X, the
    dgrad's dY) and RHT(x^T) 1x16-blocked along M (the wgrad's X^T and dY^T), each written as its scaled codes in the
    ``_quantize_kernel`` tile chain, so each equals that kernel's output bit for bit (SR: the same Philox bits). The
    RHT of x^T runs along the tile's rows, spread over threads, so here it is the tensor-core product
    (``rounding.rht_tile``), not ``_quantize_kernel``'s butterflies: the same bits wherever the FP32 sums of the
    chunks are exact (``rounding.rht_halves``); the GPU tests find no difference on their hard tensors either."""
    pid_m, pid_k = tile_index(KP, BK, True)
    x = _load_tile(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, BM, BK)
    _quantize_tile(tl.reshape(x.to(tl.float32), (BM, BK // 16, 16)), pid_m, pid_k, M, K, KP, amax_ptr, seed_ptr,
                   out_ptr, out_ptr, out_ptr, out_ptr, 1, STOCHASTIC, False, True, True, False, INV_6, INV_2688,
                   E2M1_X_E4M3, FLT_MAX, OUT_BF16_BITS, False, NATIVE_BF16, BM, BK)
    rotated = rht_tile(tl.trans(x), BK, BM, SIGN_MASK, NATIVE_BF16)  # [BK, BM]: x^T's tile, RHT'ed along M
    _quantize_tile(tl.reshape(rotated, (BK, BM // 16, 16)), pid_k, pid_m, K, M, M, amax_t_ptr, seed_t_ptr, out_t_ptr,
                   out_t_ptr, out_t_ptr, out_t_ptr, 1, STOCHASTIC, False, True, True, False, INV_6, INV_2688,
                   E2M1_X_E4M3, FLT_MAX, OUT_T_BF16_BITS, False, NATIVE_BF16, BK, BM)


@triton.jit(do_not_specialize=["M"])
def _decode_kernel(codes_ptr, scales_ptr, amax_ptr, out_ptr, M, K, KP,
                   SCALED_CODES: tl.constexpr, INV_2688: tl.constexpr, OUT_BF16_BITS: tl.constexpr,
                   NATIVE_BF16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Packed codes [M, KP/2] + scale bytes [M, KP/16] -> [M, K] values: TE's dequant, or e2m1 * s_b (GEMM operand)."""
    NB: tl.constexpr = BK // 16
    pid_m, pid_k = tile_index(KP, BK, False)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < M
    pairs = (pid_k * (BK // 2) + tl.arange(0, BK // 2)).to(tl.int64)
    packed = tl.load(codes_ptr + rows[:, None] * (KP // 2) + pairs[None, :],
                     mask=row_ok[:, None] & (pairs < KP // 2)[None, :], other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BM, NB, 16))  # element 2k from the low nibble
    scale_cols = (pid_k * NB + tl.arange(0, NB)).to(tl.int64)
    scale_bytes = tl.load(scales_ptr + rows[:, None] * (KP // 16) + scale_cols[None, :],
                          mask=row_ok[:, None] & (scale_cols < KP // 16)[None, :], other=0).to(tl.int32)
    scale = e4m3_value(scale_bytes)  # [BM, NB]
    if SCALED_CODES:
        factor = scale
    else:
        factor = (scale * tl.load(amax_ptr)) * INV_2688
    values = tl.reshape(e2m1_code_value(codes) * factor[:, :, None], (BM, BK))
    cols = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    store_values(out_ptr + rows[:, None] * K + cols[None, :], values, row_ok[:, None] & (cols < K)[None, :],
                 OUT_BF16_BITS, NATIVE_BF16)


@triton.jit
def _rht_kernel(x_ptr, stride_m, stride_k, M, K, out_ptr, SIGN_MASK: tl.constexpr, NATIVE_BF16: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_k = tile_index(K, BK, False)
    y = _load_blocks(x_ptr, stride_m, stride_k, M, K, pid_m, pid_k, True, SIGN_MASK, NATIVE_BF16, BM, BK)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (pid_k * BK + tl.arange(0, BK)).to(tl.int64)
    store_values(out_ptr + rows[:, None] * K + cols[None, :], tl.reshape(y, (BM, BK)),
                 (rows < M)[:, None] & (cols < K)[None, :], True, NATIVE_BF16)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers. x2d is a 2-D view [M, K] of the input; K is the blocked (last) dim.
# ---------------------------------------------------------------------------------------------------------------------
def _storage_view(out: Tensor) -> Tensor:
    """What a kernel writes into: bfloat16 outputs as int16 bit patterns (see ``rounding.store_values``)."""
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def tile_shape(rows: int, padded_cols: int, elements: int | None = None) -> tuple[int, int]:
    """Program tile (BM, BK): BK a power of two in [16, max_bk] covering short rows, BM >= 16 (16x16 tiles), about
    ``elements`` (default: the configured ``elements``) per program."""
    bk = min(_config.max_bk, triton.next_power_of_2(padded_cols))
    bm = max(16, min((elements or _config.elements) // bk, 256, triton.next_power_of_2(rows)))
    return bm, bk


def quantize_launch(rows: int, padded_cols: int, on: Tensor, mx: bool = False) -> tuple[int, int, dict[str, object]]:
    """(BM, BK, launch options) of the fused NVFP4 quantize pass (``LaunchConfig.quantize_elements`` /
    ``quantize_warps``), or with ``mx`` of the one-pass MXFP4 kernel (``mx_elements`` / ``mx_warps``)."""
    elements, warps = (_config.mx_elements, _config.mx_warps) if mx else (_config.quantize_elements,
                                                                         _config.quantize_warps)
    bm, bk = tile_shape(rows, padded_cols, elements)
    return bm, bk, {**launch_options(on), "num_warps": warps}


def global_amax(x2d: Tensor, rht: bool, flag: Tensor, ticket: int) -> Tensor:
    """max |x| (of RHT(x) if ``rht``) as float32 [1]; +inf if x holds NaN or Inf (or the RHT overflows BF16), in which
    case ``ticket`` is atomic-min'ed into the int64 ``flag`` (``quant.kernels.checks``)."""
    m, k = x2d.shape
    bm, bk = tile_shape(m, triton.cdiv(k, BLOCK) * BLOCK)  # whole 16-blocks (``_load_halves``)
    amax = torch.zeros(1, dtype=torch.float32, device=x2d.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
    _amax_kernel[grid](x2d, x2d.stride(0), x2d.stride(1), m, k, amax, flag, ticket, RHT=rht, SIGN_MASK=SIGN_MASK,
                       FLT_MAX=FLT_MAX, BM=bm, BK=bk, **launch_options(x2d))
    return amax


def quantize_2d(x2d: Tensor, amax: Tensor, tile_rows: int, rht: bool, seed: Tensor | None, write_codes: bool,
                values_dtype: torch.dtype | None, scaled_values: bool = False,
                dequantized_dtype: torch.dtype | None = None
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """One pass of SPEC 1.2 steps 2-9 over x2d [M, K] with the given global amax (float32 [1]).

    Returns (codes uint8 [M, KP/2], scale bytes uint8 [M, KP/16]) if ``write_codes``, the values [M, K] in
    ``values_dtype`` if it is not None: TE's dequantized values, or with ``scaled_values`` the scaled codes e2m1 * s_b
    (the bytes ``decode_2d(..., scaled_codes=True)`` would produce), and TE's dequantized values in
    ``dequantized_dtype`` if it is not None (next to the scaled codes: the forward GEMM's operand and the
    ``dequantized`` backward's from one pass); None for what was not asked. ``seed`` (int64 [2]: Philox key and
    counter; or [1]: the key, counter 0) turns on SR.
    """
    m, k = x2d.shape
    kp = triton.cdiv(k, BLOCK) * BLOCK
    bm, bk, options = quantize_launch(m, kp, x2d)
    device = x2d.device
    if seed is not None and seed.numel() == 1:  # a bare key: counter 0
        seed = torch.cat((seed.reshape(1), seed.new_zeros(1)))
    codes = scales = values = None
    if write_codes:
        codes = torch.empty(m, kp // 2, dtype=torch.uint8, device=device)
        scales = torch.empty(m, kp // BLOCK, dtype=torch.uint8, device=device)
    if values_dtype is not None:
        values = torch.empty(m, k, dtype=values_dtype, device=device)
    dequantized = None if dequantized_dtype is None else torch.empty(m, k, dtype=dequantized_dtype, device=device)
    placeholder = amax  # any tensor: pointers of outputs that are not written are never dereferenced
    out = placeholder if values is None else _storage_view(values)
    grid = (triton.cdiv(m, bm) * triton.cdiv(kp, bk),)
    _quantize_kernel[grid](
        x2d, x2d.stride(0), x2d.stride(1), m, k, kp, amax, placeholder if seed is None else seed,
        out, placeholder if codes is None else codes,
        placeholder if scales is None else scales, placeholder if dequantized is None else _storage_view(dequantized),
        TILE_ROWS=tile_rows, RHT=rht, STOCHASTIC=seed is not None, WRITE_CODES=write_codes,
        WRITE_VALUES=values is not None, SCALED_VALUES=scaled_values, WRITE_DEQUANTIZED=dequantized is not None,
        SIGN_MASK=SIGN_MASK, INV_6=INV_6, INV_2688=INV_2688, E2M1_X_E4M3=E2M1_X_E4M3, FLT_MAX=FLT_MAX,
        OUT_BF16_BITS=values_dtype == torch.bfloat16, DEQUANTIZED_BF16_BITS=dequantized_dtype == torch.bfloat16,
        BM=bm, BK=bk, **options,
    )
    return codes, scales, values, dequantized


def quantize_pair_2d(x2d: Tensor, flag: Tensor, tickets: tuple[int, int], seeds: tuple[Tensor, Tensor] | None,
                     dtype: torch.dtype, dtype_t: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x2d [M, K] (BF16, M % 16 == 0) -> (amax, scaled codes [M, K] in ``dtype``) of x blocked 1x16 along K and
    (amax, scaled codes [K, M] in ``dtype_t``) of RHT(x^T) blocked 1x16 along M, from one amax read and one quantize
    read of x (``_quantize_pair_kernel``). ``tickets``: the NaN-check tickets of the two operands; ``seeds``: their SR
    Philox (key, counter) int64 [2] each, or None (round to nearest)."""
    m, k = x2d.shape
    kp = triton.cdiv(k, BLOCK) * BLOCK
    device = x2d.device
    amax = torch.zeros(1, dtype=torch.float32, device=device)
    amax_t = torch.zeros(1, dtype=torch.float32, device=device)
    options = launch_options(x2d)
    bm, bk = pair_tile_shape(m, kp, _config.pair_amax_tile)
    _amax_pair_kernel[(triton.cdiv(m, bm) * triton.cdiv(k, bk),)](
        x2d, x2d.stride(0), x2d.stride(1), m, k, amax, amax_t, flag, tickets[0], tickets[1], FLT_MAX=FLT_MAX,
        SIGN_MASK=SIGN_MASK, BM=bm, BK=bk, **options)
    values = torch.empty(m, k, dtype=dtype, device=device)
    values_t = torch.empty(k, m, dtype=dtype_t, device=device)
    seed, seed_t = (amax, amax) if seeds is None else seeds  # placeholders are never read without SR
    bm, bk = pair_tile_shape(m, kp, _config.pair_quantize_tile)
    _quantize_pair_kernel[(triton.cdiv(m, bm) * triton.cdiv(kp, bk),)](
        x2d, x2d.stride(0), x2d.stride(1), m, k, kp, amax, seed, _storage_view(values), amax_t, seed_t,
        _storage_view(values_t), STOCHASTIC=seeds is not None, SIGN_MASK=SIGN_MASK, INV_6=INV_6, INV_2688=INV_2688,
        E2M1_X_E4M3=E2M1_X_E4M3, FLT_MAX=FLT_MAX, OUT_BF16_BITS=dtype == torch.bfloat16,
        OUT_T_BF16_BITS=dtype_t == torch.bfloat16, BM=bm, BK=bk, **options)
    return amax, values, amax_t, values_t


def pair_tile_shape(rows: int, padded_cols: int, largest: tuple[int, int]) -> tuple[int, int]:
    """Program tile (BM, BK) of a pair kernel: ``largest`` (a ``LaunchConfig`` pair tile), less for small tensors;
    BM >= 16 (whole RHT chunks of x^T)."""
    return max(16, min(largest[0], triton.next_power_of_2(rows))), min(largest[1], triton.next_power_of_2(padded_cols))


def decode_2d(codes: Tensor, scales: Tensor, amax: Tensor, cols: int, dtype: torch.dtype, scaled_codes: bool) -> Tensor:
    """Packed codes [M, KP/2] + scale bytes [M, KP/16] (+ amax) -> [M, cols] in ``dtype``."""
    m = codes.shape[0]
    kp = codes.shape[1] * 2
    bm, bk = tile_shape(m, kp)
    out = torch.empty(m, cols, dtype=dtype, device=codes.device)
    amax = amax.reshape(1).to(torch.float32)
    grid = (triton.cdiv(m, bm) * triton.cdiv(kp, bk),)
    _decode_kernel[grid](codes, scales, amax, _storage_view(out), m, cols, kp, SCALED_CODES=scaled_codes,
                         INV_2688=INV_2688, OUT_BF16_BITS=dtype == torch.bfloat16, BM=bm, BK=bk,
                         **launch_options(codes))
    return out


def rht_2d(x2d: Tensor) -> Tensor:
    """TE's RHT of each 16-chunk of the rows of a BF16 [M, K] view (K % 16 == 0) -> contiguous BF16 [M, K]."""
    m, k = x2d.shape
    bm, bk = tile_shape(m, k)
    out = torch.empty(m, k, dtype=torch.bfloat16, device=x2d.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
    _rht_kernel[grid](x2d, x2d.stride(0), x2d.stride(1), m, k, out.view(torch.int16), SIGN_MASK=SIGN_MASK,
                      BM=bm, BK=bk, **launch_options(x2d))
    return out
