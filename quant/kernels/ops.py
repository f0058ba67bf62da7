"""The kernel path's operations, with the same signatures and results as the reference functions they replace.

Why a layer between ``quant.nvfp4`` / ``quant.mxfp4`` and the raw launchers:

* Argument checks and error messages are the reference's own (``check_float_tensor``, the tile and scale-rule checks,
  ``quant.rht``'s dtype/shape rule), so a bad call fails identically on CPU and GPU.
* Each operation is a ``torch.library.custom_op`` (namespace ``fp4lab``) with a fake (meta) implementation, so
  ``torch.compile`` treats a quantization as one opaque node instead of breaking the graph at a Triton launch, a
  generator or the NaN check. In eager mode the Python function is called directly (the custom-op dispatcher costs
  tens of microseconds per call).
* Stochastic rounding takes its 64-bit Philox key from the caller's ``torch.Generator`` (one draw per tensor, on the
  device, no synchronisation; counter 0), or from a ``seed`` tensor (key, counter) that a compiled caller advances
  itself; the same generator state or seed gives the same codes.
* The NaN/Inf check is asynchronous (``quant.kernels.checks``); a name may be a ``checks.OwnedName`` (a layer handle
  tensor plus constant words), so compiled graphs of different layers carry no per-layer string.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from quant import conv_layout, im2col, mxfp4 as mxfp4_reference, nvfp4 as nvfp4_reference, rht as rht_transform
from quant.errors import check_float_tensor
from quant.kernels import checks
from quant.kernels import traced_or_eager as _call
from quant.kernels import cudnn_conv
from quant.kernels import epilogue as epilogue_kernels, mxfp4 as mxfp4_kernels, nvfp4 as nvfp4_kernels
from quant.kernels import scaled_mm as scaled_mm_kernels, unfold as unfold_kernels

_SEED_HIGH = 1 << 62
NAMESPACE = "fp4lab"


def _custom_op(name: str, fn: Callable) -> torch.library.CustomOpDef:
    """Register ``fn`` as the functional custom op ``fp4lab::<name>`` (no inputs mutated or aliased)."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())


def _sr_seed(x: Tensor, stochastic: bool, generator: torch.Generator | None, seed: Tensor | None) -> Tensor | None:
    """The Philox (key, counter) (int64 [2] on x's device): ``seed`` if given ([key] with counter 0, or [key,
    counter]), else a key drawn from ``generator`` with counter 0.

    torch.compile cannot trace a ``torch.Generator`` held by a Python object (graph break), so compiled callers that
    want SR inside the graph pass a seed tensor they advance themselves."""
    if not stochastic:
        return None
    if seed is None:
        seed = torch.randint(0, _SEED_HIGH, (1,), generator=generator, dtype=torch.int64, device=x.device)
    seed = seed.reshape(-1).to(device=x.device, dtype=torch.int64)
    return torch.cat((seed, seed.new_zeros(1))) if seed.numel() == 1 else seed


def _check_nvfp4(x: Tensor, tile: object, rht: bool, name: str | None) -> tuple[int, int]:
    check_float_tensor(x, nvfp4_reference.FORMAT, name)
    tile = nvfp4_reference._check_tile(tile, name)
    if rht:  # the reference's RHT rules (BF16 only, then last dim % 16), raised with its messages
        if x.dtype != torch.bfloat16:
            rht_transform.apply(x[..., :0], name=name)
        rht_transform._check_chunks(x, name)
    return tile


def _as_2d(x: Tensor) -> Tensor:
    """[..., K] -> [M, K] (a view when possible; float64 is rounded to float32 once, as the reference does)."""
    x2d = x.detach().reshape(-1, x.shape[-1])
    return x2d.to(torch.float32) if x2d.dtype == torch.float64 else x2d


# ---------------------------------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------------------------------
def _nvfp4_amax(x2d: Tensor, rht: bool, name: str, owner: Tensor | None) -> Tensor:
    stage = "after the RHT (BF16 overflow)" if rht else ""
    flag, ticket = checks.ticket(x2d.device, nvfp4_reference.FORMAT, name or None, stage, owner)
    amax = nvfp4_kernels.global_amax(x2d, rht, flag, ticket)
    checks.poll(x2d.device)
    return amax


def _fake_nvfp4(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fake (meta) packed codes [M, KP/2], scale bytes [M, KP/16] and amax [] of an NVFP4 quantization of x [..., K]."""
    rows, cols = x.numel() // x.shape[-1], -(-x.shape[-1] // nvfp4_reference.BLOCK) * nvfp4_reference.BLOCK
    return (x.new_empty(rows, cols // 2, dtype=torch.uint8), x.new_empty(rows, cols // 16, dtype=torch.uint8),
            x.new_empty((), dtype=torch.float32))


def _fake_values(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Fake values [M, K] in ``dtype`` of x [..., K] as a 2-D operand."""
    return x.new_empty(x.numel() // x.shape[-1], x.shape[-1], dtype=dtype)


def _nvfp4_quantize_eager(x: Tensor, tile_rows: int, rht: bool, seed: Tensor | None, name: str,
                          owner: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    x2d = _as_2d(x)
    amax = _nvfp4_amax(x2d, rht, name, owner)
    codes, scales, _, _ = nvfp4_kernels.quantize_2d(x2d, amax, tile_rows, rht, seed, True, None)
    return codes, scales, amax.reshape(())


_nvfp4_quantize_op = _custom_op("nvfp4_quantize", _nvfp4_quantize_eager)


@_nvfp4_quantize_op.register_fake
def _(x: Tensor, tile_rows: int, rht: bool, seed: Tensor | None, name: str, owner: Tensor | None = None
      ) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_nvfp4(x)


def _nvfp4_fake_quantize_eager(x: Tensor, tile_rows: int, rht: bool, seed: Tensor | None, name: str,
                               owner: Tensor | None = None) -> Tensor:
    x2d = _as_2d(x)
    amax = _nvfp4_amax(x2d, rht, name, owner)
    _, _, values, _ = nvfp4_kernels.quantize_2d(x2d, amax, tile_rows, rht, seed, False, x.dtype)
    return values.view(x.shape)


_nvfp4_fake_quantize_op = _custom_op("nvfp4_fake_quantize", _nvfp4_fake_quantize_eager)


@_nvfp4_fake_quantize_op.register_fake
def _(x: Tensor, tile_rows: int, rht: bool, seed: Tensor | None, name: str, owner: Tensor | None = None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _nvfp4_quantize_scaled_eager(x: Tensor, tile_rows: int, rht: bool, seed: Tensor | None, name: str,
                                 owner: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x2d = _as_2d(x)
    amax = _nvfp4_amax(x2d, rht, name, owner)
    codes, scales, values, _ = nvfp4_kernels.quantize_2d(x2d, amax, tile_rows, rht, seed, True, dtype,
                                                         scaled_values=True)
    return codes, scales, amax.reshape(()), values


_nvfp4_quantize_scaled_op = _custom_op("nvfp4_quantize_scaled", _nvfp4_quantize_scaled_eager)


@_nvfp4_quantize_scaled_op.register_fake
def _(x: Tensor, tile_rows: int, rht: bool, seed: Tensor | None, name: str, owner: Tensor | None,
      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (*_fake_nvfp4(x), _fake_values(x, dtype))


def _nvfp4_quantize_both_eager(x: Tensor, tile_rows: int, name: str, owner: Tensor | None, dtype: torch.dtype,
                               dequantized_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x2d = _as_2d(x)
    amax = _nvfp4_amax(x2d, False, name, owner)
    codes, scales, values, dequantized = nvfp4_kernels.quantize_2d(
        x2d, amax, tile_rows, False, None, True, dtype, scaled_values=True, dequantized_dtype=dequantized_dtype)
    return codes, scales, amax.reshape(()), values, dequantized


_nvfp4_quantize_both_op = _custom_op("nvfp4_quantize_both", _nvfp4_quantize_both_eager)


@_nvfp4_quantize_both_op.register_fake
def _(x: Tensor, tile_rows: int, name: str, owner: Tensor | None, dtype: torch.dtype, dequantized_dtype: torch.dtype
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (*_fake_nvfp4(x), _fake_values(x, dtype), _fake_values(x, dequantized_dtype))


def _nvfp4_quantize_pair_eager(x: Tensor, seeds: Tensor | None, name: str, name_t: str, owner: Tensor | None,
                               dtype: torch.dtype, dtype_t: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x2d = _as_2d(x)
    flag, ticket = checks.ticket(x2d.device, nvfp4_reference.FORMAT, name or None, "", owner)
    _, ticket_t = checks.ticket(x2d.device, nvfp4_reference.FORMAT, name_t or None, "after the RHT (BF16 overflow)",
                                owner)
    pair_seeds = None if seeds is None else (seeds[0], seeds[1])
    amax, values, amax_t, values_t = nvfp4_kernels.quantize_pair_2d(x2d, flag, (ticket, ticket_t), pair_seeds, dtype,
                                                                    dtype_t)
    checks.poll(x2d.device)
    return amax.reshape(()), values, amax_t.reshape(()), values_t


_nvfp4_quantize_pair_op = _custom_op("nvfp4_quantize_pair", _nvfp4_quantize_pair_eager)


@_nvfp4_quantize_pair_op.register_fake
def _(x: Tensor, seeds: Tensor | None, name: str, name_t: str, owner: Tensor | None, dtype: torch.dtype,
      dtype_t: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    values = _fake_values(x, dtype)
    amax = x.new_empty((), dtype=torch.float32)
    return amax, values, torch.empty_like(amax), x.new_empty(values.shape[1], values.shape[0], dtype=dtype_t)


def _nvfp4_decode_eager(codes: Tensor, scales: Tensor, amax: Tensor, cols: int, dtype: torch.dtype,
                     scaled_codes: bool) -> Tensor:
    return nvfp4_kernels.decode_2d(codes, scales, amax, cols, dtype, scaled_codes)


_nvfp4_decode_op = _custom_op("nvfp4_decode", _nvfp4_decode_eager)


@_nvfp4_decode_op.register_fake
def _(codes: Tensor, scales: Tensor, amax: Tensor, cols: int, dtype: torch.dtype, scaled_codes: bool) -> Tensor:
    return codes.new_empty(codes.shape[0], cols, dtype=dtype)


def nvfp4_quantize(x: Tensor, tile: tuple[int, int] = (1, 16), rht: bool = False, stochastic: bool = False,
                   generator: torch.Generator | None = None, name: str | checks.OwnedName | None = None,
                   seed: Tensor | None = None) -> nvfp4_reference.NVFP4Tensor:
    """``quant.nvfp4.quantize`` on the kernels: the same ``NVFP4Tensor`` bytes (SR: same distribution; ``seed``
    replaces ``generator``, see ``_sr_seed``)."""
    tile = _check_nvfp4(x, tile, rht, name)
    seed = _sr_seed(x, stochastic, generator, seed)
    words, owner = checks.split_name(name)
    codes, scales, amax = _call(_nvfp4_quantize_op, _nvfp4_quantize_eager, x.detach(), tile[0], rht, seed, words,
                                owner)
    return nvfp4_reference.NVFP4Tensor(codes=codes, scales=scales, amax=amax, shape=x.shape, dtype=x.dtype,
                                       tile=tile, rht=rht, stochastic=stochastic)


def nvfp4_quantize_scaled(x: Tensor, tile: tuple[int, int] = (1, 16), rht: bool = False, stochastic: bool = False,
                          generator: torch.Generator | None = None, name: str | checks.OwnedName | None = None,
                          seed: Tensor | None = None, dtype: torch.dtype = torch.bfloat16
                          ) -> tuple[nvfp4_reference.NVFP4Tensor, Tensor]:
    """``nvfp4_quantize`` plus the GEMM operand ``nvfp4.scaled_codes(q, dtype)`` [M, K] from the same pass (no decode
    pass over the codes it has just written)."""
    tile = _check_nvfp4(x, tile, rht, name)
    seed = _sr_seed(x, stochastic, generator, seed)
    words, owner = checks.split_name(name)
    codes, scales, amax, values = _call(_nvfp4_quantize_scaled_op, _nvfp4_quantize_scaled_eager, x.detach(), tile[0],
                                        rht, seed, words, owner, dtype)
    q = nvfp4_reference.NVFP4Tensor(codes=codes, scales=scales, amax=amax, shape=x.shape, dtype=x.dtype, tile=tile,
                                    rht=rht, stochastic=stochastic)
    return q, values


def nvfp4_quantize_both(x: Tensor, tile: tuple[int, int] = (1, 16), name: str | checks.OwnedName | None = None,
                        dtype: torch.dtype = torch.bfloat16, dequantized_dtype: torch.dtype = torch.bfloat16
                        ) -> tuple[nvfp4_reference.NVFP4Tensor, Tensor, Tensor]:
    """``nvfp4_quantize_scaled`` (round to nearest, no RHT) that also writes TE's dequantized values [M, K] in
    ``dequantized_dtype`` from the same pass: the forward GEMM's operand and the ``dequantized`` backward's operand
    at once, so the backward needs no decode pass."""
    tile = _check_nvfp4(x, tile, False, name)
    words, owner = checks.split_name(name)
    codes, scales, amax, values, dequantized = _call(_nvfp4_quantize_both_op, _nvfp4_quantize_both_eager, x.detach(),
                                                     tile[0], words, owner, dtype, dequantized_dtype)
    q = nvfp4_reference.NVFP4Tensor(codes=codes, scales=scales, amax=amax, shape=x.shape, dtype=x.dtype, tile=tile,
                                    rht=False, stochastic=False)
    return q, values, dequantized


def nvfp4_quantize_pair(x: Tensor, stochastic: bool = False, seeds: Tensor | None = None,
                        generator: torch.Generator | None = None, name: str | checks.OwnedName | None = None,
                        name_t: str | checks.OwnedName | None = None, dtype: torch.dtype = torch.bfloat16,
                        dtype_t: torch.dtype = torch.bfloat16) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The two operands a ``full`` training step takes from one BF16 matrix x [M, K] (M a multiple of 16), from
    one amax read and one quantize read: ((amax, scaled codes [M, K]) of ``nvfp4_quantize_scaled(x)``, (amax, scaled
    codes [K, M]) of ``nvfp4_quantize_scaled(x^T, rht=True)``), 1x16 blocks, the same bytes as those two calls (SR:
    the same bits for the same seeds). ``seeds``: int64 [2, 2], the Philox (key, counter) of the rowwise and the
    columnwise operand (``stochastic`` without seeds draws two keys from ``generator``); ``name`` / ``name_t``: the
    two operands' names (one layer: ``OwnedName`` of the same owner, or strings); ``dtype`` / ``dtype_t``: the
    dtypes of the two scaled-codes outputs (BF16 for a GEMM, float32 for a convolution)."""
    if x.dim() != 2:
        raise ValueError(f"nvfp4_quantize_pair takes a 2-D tensor; got shape {tuple(x.shape)}")
    _check_nvfp4(x.t(), (1, 16), True, name_t)  # x^T: BF16, rows in 16-element chunks (the RHT's rules)
    if stochastic and seeds is None:
        seeds = torch.stack([_sr_seed(x, True, generator, None) for _ in range(2)])
    words, owner = checks.split_name(name)
    words_t, _ = checks.split_name(name_t)
    amax, values, amax_t, values_t = _call(_nvfp4_quantize_pair_op, _nvfp4_quantize_pair_eager, x.detach(),
                                           seeds if stochastic else None, words, words_t, owner, dtype, dtype_t)
    return (amax, values), (amax_t, values_t)


def nvfp4_fake_quantize(x: Tensor, tile: tuple[int, int] = (1, 16), rht: bool = False, stochastic: bool = False,
                        generator: torch.Generator | None = None, name: str | checks.OwnedName | None = None,
                        seed: Tensor | None = None) -> Tensor:
    """``quant.nvfp4.fake_quantize`` in one pass after the amax reduction; output in x.dtype, x's shape."""
    tile = _check_nvfp4(x, tile, rht, name)
    seed = _sr_seed(x, stochastic, generator, seed)
    words, owner = checks.split_name(name)
    return _call(_nvfp4_fake_quantize_op, _nvfp4_fake_quantize_eager, x.detach(), tile[0], rht, seed, words, owner)


def nvfp4_decode(q: nvfp4_reference.NVFP4Tensor, dtype: torch.dtype, scaled_codes: bool) -> Tensor:
    """[M, K] values of q in ``dtype``: TE's dequant formula, or the scaled codes e2m1 * s_b (GEMM operand)."""
    return _call(_nvfp4_decode_op, _nvfp4_decode_eager, q.codes, q.scales, q.amax, q.cols, dtype, scaled_codes)


def nvfp4_dequantize(q: nvfp4_reference.NVFP4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``quant.nvfp4.dequantize`` (rotated basis if q.rht) on the kernel. A 2-D q comes back as the custom op's own
    output, not a view of it: torch.compile cannot save views of intermediates inside an autograd.Function."""
    values = nvfp4_decode(q, dtype, scaled_codes=False)  # [M, K]
    return values if values.shape == q.shape else values.view(q.shape)


def nvfp4_rht(x: Tensor) -> Tensor:
    """``quant.rht.apply`` on the kernel (BF16 [..., K], K % 16 == 0): the RHT'ed tensor the quantizer sees."""
    if x.dtype != torch.bfloat16:
        rht_transform.apply(x[..., :0])  # raises the reference's dtype error
    rht_transform._check_chunks(x, None)
    return nvfp4_kernels.rht_2d(x.detach().reshape(-1, x.shape[-1])).view(x.shape)


# ---------------------------------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------------------------------
def _mxfp4_quantize_eager(x: Tensor, scale_rule: str, name: str, owner: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    x2d = _as_2d(x)
    flag, ticket = checks.ticket(x2d.device, mxfp4_reference.FORMAT, name or None, "", owner)
    codes, scales, _ = mxfp4_kernels.quantize_2d(x2d, scale_rule, True, None, flag, ticket)
    checks.poll(x2d.device)
    return codes, scales


_mxfp4_quantize_op = _custom_op("mxfp4_quantize", _mxfp4_quantize_eager)


@_mxfp4_quantize_op.register_fake
def _(x: Tensor, scale_rule: str, name: str, owner: Tensor | None = None) -> tuple[Tensor, Tensor]:
    rows, cols = x.numel() // x.shape[-1], -(-x.shape[-1] // mxfp4_reference.BLOCK) * mxfp4_reference.BLOCK
    return x.new_empty(rows, cols // 2, dtype=torch.uint8), x.new_empty(rows, cols // 32, dtype=torch.uint8)


def _mxfp4_fake_quantize_eager(x: Tensor, scale_rule: str, name: str, owner: Tensor | None = None) -> Tensor:
    x2d = _as_2d(x)
    flag, ticket = checks.ticket(x2d.device, mxfp4_reference.FORMAT, name or None, "", owner)
    _, _, values = mxfp4_kernels.quantize_2d(x2d, scale_rule, False, x.dtype, flag, ticket)
    checks.poll(x2d.device)
    return values.view(x.shape)


_mxfp4_fake_quantize_op = _custom_op("mxfp4_fake_quantize", _mxfp4_fake_quantize_eager)


@_mxfp4_fake_quantize_op.register_fake
def _(x: Tensor, scale_rule: str, name: str, owner: Tensor | None = None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _mxfp4_decode_eager(codes: Tensor, scales: Tensor, cols: int, dtype: torch.dtype) -> Tensor:
    return mxfp4_kernels.decode_2d(codes, scales, cols, dtype)


_mxfp4_decode_op = _custom_op("mxfp4_decode", _mxfp4_decode_eager)


@_mxfp4_decode_op.register_fake
def _(codes: Tensor, scales: Tensor, cols: int, dtype: torch.dtype) -> Tensor:
    return codes.new_empty(codes.shape[0], cols, dtype=dtype)


def mxfp4_quantize(x: Tensor, scale_rule: str = "floor", name: str | checks.OwnedName | None = None
                   ) -> mxfp4_reference.MXFP4Tensor:
    """``quant.mxfp4.quantize`` on the kernel: the same ``MXFP4Tensor`` bytes."""
    check_float_tensor(x, mxfp4_reference.FORMAT, name)
    mxfp4_reference._check_scale_rule(scale_rule, name)
    words, owner = checks.split_name(name)
    codes, scales = _call(_mxfp4_quantize_op, _mxfp4_quantize_eager, x.detach(), scale_rule, words, owner)
    return mxfp4_reference.MXFP4Tensor(codes=codes, scales=scales, shape=x.shape, dtype=x.dtype,
                                       scale_rule=scale_rule)


def mxfp4_fake_quantize(x: Tensor, scale_rule: str = "floor", name: str | checks.OwnedName | None = None) -> Tensor:
    """``quant.mxfp4.fake_quantize`` in one pass (MX needs no global amax); output in x.dtype, x's shape."""
    check_float_tensor(x, mxfp4_reference.FORMAT, name)
    mxfp4_reference._check_scale_rule(scale_rule, name)
    words, owner = checks.split_name(name)
    return _call(_mxfp4_fake_quantize_op, _mxfp4_fake_quantize_eager, x.detach(), scale_rule, words, owner)


def mxfp4_dequantize(q: mxfp4_reference.MXFP4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``quant.mxfp4.dequantize`` on the kernel."""
    values = _call(_mxfp4_decode_op, _mxfp4_decode_eager, q.codes, q.scales, q.shape[-1], dtype)
    return values.reshape(q.shape)


# ---------------------------------------------------------------------------------------------------------------------
# The QAT GEMM's epilogue and FP32-accumulating convolutions (quant.gemm, quant.functional)
# ---------------------------------------------------------------------------------------------------------------------
def _gemm_epilogue_eager(acc: Tensor, amax_a: Tensor | None, amax_b: Tensor | None, bias: Tensor | None,
                         bias_dim: int, out_dtype: torch.dtype) -> Tensor:
    return epilogue_kernels.epilogue(acc, amax_a, amax_b, bias, bias_dim, out_dtype)


_gemm_epilogue_op = _custom_op("gemm_epilogue", _gemm_epilogue_eager)


@_gemm_epilogue_op.register_fake
def _(acc: Tensor, amax_a: Tensor | None, amax_b: Tensor | None, bias: Tensor | None, bias_dim: int,
      out_dtype: torch.dtype) -> Tensor:
    return torch.empty_like(epilogue_kernels.flat_layout(acc), dtype=out_dtype)


def gemm_epilogue(acc: Tensor, amax_a: Tensor | None, amax_b: Tensor | None, bias: Tensor | None, bias_dim: int,
                  out_dtype: torch.dtype) -> Tensor:
    """``out_dtype(fp32(fp32(acc * alpha) + bias))`` in one pass (``quant.kernels.epilogue``), alpha =
    ``nvfp4.gemm_alpha(amax_a, amax_b)`` (no alpha when the amaxes are None); acc float32, any layout (the op, not
    the caller, reads its strides: ``quant.kernels.epilogue``)."""
    return _call(_gemm_epilogue_op, _gemm_epilogue_eager, acc, amax_a, amax_b, bias, bias_dim, out_dtype)


_scaled_gemm_op = _custom_op("scaled_gemm", scaled_mm_kernels.scaled_mm)


@_scaled_gemm_op.register_fake
def _(a: Tensor, b: Tensor, amax_a: Tensor | None, amax_b: Tensor | None, bias: Tensor | None,
      out_dtype: torch.dtype) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


def scaled_gemm(a: Tensor, b: Tensor, amax_a: Tensor | None, amax_b: Tensor | None, bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
    """``out_dtype(fp32(fp32((a @ b) * alpha) + bias))`` for BF16 (or FP16) a [M, K], b [K, N] with FP32 accumulation,
    the epilogue fused into the GEMM where the layout allows (``quant.kernels.scaled_mm``); alpha =
    ``nvfp4.gemm_alpha(amax_a, amax_b)`` (no alpha when the amaxes are None)."""
    return _call(_scaled_gemm_op, scaled_mm_kernels.scaled_mm, a, b, amax_a, amax_b, bias, out_dtype)


@contextlib.contextmanager
def fp32_reductions() -> Iterator[None]:
    """cuBLAS BF16/FP16 GEMMs inside this block reduce split-K partial sums in FP32 (the compute type), whatever the
    user's ``allow_{bf16,fp16}_reduced_precision_reduction``; restored after. With FP32 reductions a BF16-output GEMM is
    FP32 accumulation rounded once to BF16 (cuBLAS: CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = previous


def _rounded_mm_eager(a: Tensor, b: Tensor) -> Tensor:
    with fp32_reductions():
        return torch.mm(a, b)


_rounded_mm_op = _custom_op("rounded_mm", _rounded_mm_eager)


@_rounded_mm_op.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def rounded_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, K] @ b [K, N]`` (both BF16 or both FP16) with FP32 accumulation, rounded once to their dtype: the
    epilogue-free GEMM of the backward passes that multiply dense operands (no alpha, no bias)."""
    return _call(_rounded_mm_op, _rounded_mm_eager, a, b)


@contextlib.contextmanager
def cudnn_tf32() -> Iterator[None]:
    """cuDNN convolutions with TF32 tensor cores inside this block, whatever the user's setting, restored after.

    Why: the emulated convolutions contract BF16-representable values (scaled codes, dequantized operands, BF16 dY) in
    FP32. TF32 keeps 10 mantissa bits, so it reads such values exactly; their products are exact in FP32 and the sums
    accumulate in FP32: the same arithmetic as an FP32 convolution, at tensor-core speed."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the per-operation precision setting
        previous, conv.fp32_precision = conv.fp32_precision, "tf32"
        try:
            yield
        finally:
            conv.fp32_precision = previous
        return
    previous_flag, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous_flag


def _convolution(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                 transposed: bool, output_padding: list[int]) -> Tensor:
    return torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, transposed, output_padding, 1)


def _convolution_eager(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                       transposed: bool, output_padding: list[int]) -> Tensor:
    with cudnn_tf32():
        return _convolution(x, weight, stride, padding, dilation, transposed, output_padding)


_convolution_op = _custom_op("tf32_convolution", _convolution_eager)
_convolution_op.register_fake(_convolution)


def _conv_input_grad(dy: Tensor, weight: Tensor, input_shape: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    unread_x = conv_layout.unread_input(dy, weight.dtype, input_shape)
    return torch.ops.aten.convolution_backward(dy, unread_x, weight, None, stride, padding, dilation, transposed,
                                               output_padding, 1, [True, False, False])[0]


def _conv_input_grad_eager(dy: Tensor, weight: Tensor, input_shape: list[int], stride: list[int], padding: list[int],
                           dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    with cudnn_tf32():
        return _conv_input_grad(dy, weight, input_shape, stride, padding, dilation, transposed, output_padding)


_conv_input_grad_op = _custom_op("tf32_conv_input_grad", _conv_input_grad_eager)
_conv_input_grad_op.register_fake(_conv_input_grad)


def _conv_weight_grad(dy: Tensor, x: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    unread_w = conv_layout.unread_weight(dy, weight_shape)
    return torch.ops.aten.convolution_backward(dy, x, unread_w, None, stride, padding, dilation, transposed,
                                               output_padding, 1, [False, True, False])[1]


def _conv_weight_grad_eager(dy: Tensor, x: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
                            dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    with cudnn_tf32():
        return _conv_weight_grad(dy, x, weight_shape, stride, padding, dilation, transposed, output_padding)


_conv_weight_grad_op = _custom_op("tf32_conv_weight_grad", _conv_weight_grad_eager)
_conv_weight_grad_op.register_fake(_conv_weight_grad)


_rounded_conv_input_grad_op = _custom_op("rounded_conv_input_grad", _conv_input_grad)
_rounded_conv_input_grad_op.register_fake(_conv_input_grad)
_rounded_conv_weight_grad_op = _custom_op("rounded_conv_weight_grad", _conv_weight_grad)
_rounded_conv_weight_grad_op.register_fake(_conv_weight_grad)


def rounded_conv_input_grad(dy: Tensor, weight: Tensor, input_shape: list[int], stride: list[int],
                            padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int]
                            ) -> Tensor:
    """The input gradient of a convolution of two BF16 tensors in BF16: cuDNN's tensor-core kernels accumulate in FP32
    and round once to the output (the conv counterpart of ``rounded_mm``)."""
    return _call(_rounded_conv_input_grad_op, _conv_input_grad, dy, weight, input_shape, stride, padding, dilation,
                 transposed, output_padding)


def rounded_conv_weight_grad(dy: Tensor, x: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
                             dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    """The weight gradient of a convolution of two BF16 tensors in BF16 (FP32 accumulation, one rounding; see
    ``rounded_conv_input_grad``)."""
    return _call(_rounded_conv_weight_grad_op, _conv_weight_grad, dy, x, weight_shape, stride, padding, dilation,
                 transposed, output_padding)


_conv_unfold_op = _custom_op("conv_unfold", unfold_kernels.unfold_tokens)
_conv_unfold_op.register_fake(im2col.unfold_tokens)


def conv_unfold(t: Tensor, kernel: list[int], positions: list[int], stride: list[int], padding: list[int],
                dilation: list[int]) -> Tensor:
    """``quant.im2col.unfold_tokens`` by the Triton kernel (``quant.kernels.unfold``: one pass into the final
    layout), as one opaque node under torch.compile (Inductor's own lowering of unfold + permute + copy is a slow
    gather kernel)."""
    return _call(_conv_unfold_op, unfold_kernels.unfold_tokens, t, kernel, positions, stride, padding, dilation)


def tf32_convolution(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                     transposed: bool, output_padding: list[int]) -> Tensor:
    """``aten.convolution`` (groups 1, no bias) of float32 tensors with TF32 tensor cores (``cudnn_tf32``)."""
    return _call(_convolution_op, _convolution_eager, x, weight, stride, padding, dilation, transposed, output_padding)


def tf32_conv_input_grad(dy: Tensor, weight: Tensor, input_shape: list[int], stride: list[int], padding: list[int],
                         dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    """The input gradient of ``tf32_convolution`` for the output gradient ``dy`` (float32, TF32 tensor cores)."""
    return _call(_conv_input_grad_op, _conv_input_grad_eager, dy, weight, input_shape, stride, padding, dilation,
                 transposed, output_padding)


def tf32_conv_weight_grad(dy: Tensor, x: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
                          dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    """The weight gradient of ``tf32_convolution`` for the output gradient ``dy`` (float32, TF32 tensor cores)."""
    return _call(_conv_weight_grad_op, _conv_weight_grad_eager, dy, x, weight_shape, stride, padding, dilation,
                 transposed, output_padding)


def _scaled_convolution_eager(x: Tensor, weight: Tensor, amax_a: Tensor, amax_b: Tensor, bias: Tensor | None,
                              stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                              output_padding: list[int]) -> Tensor:
    alpha = nvfp4_reference.gemm_alpha(amax_a, amax_b)
    window = (stride, padding, dilation, transposed, output_padding)
    out = cudnn_conv.scaled_convolution(x, weight, alpha, bias, *window)
    if out is None:  # no cuDNN engine, or a shape its fused kernel serves slower: FP32 convolution + epilogue
        acc = _convolution_eager(x.float(), weight.float(), *window)
        out = epilogue_kernels.epilogue(acc, amax_a, amax_b, bias, 1, torch.bfloat16)
        out = out.contiguous(memory_format=torch.channels_last)
    return out


_scaled_convolution_op = _custom_op("scaled_convolution", _scaled_convolution_eager)


@_scaled_convolution_op.register_fake
def _(x: Tensor, weight: Tensor, amax_a: Tensor, amax_b: Tensor, bias: Tensor | None, stride: list[int],
      padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int]) -> Tensor:
    shape = cudnn_conv.output_shape(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, transposed,
                                    output_padding)
    return torch.empty(shape, dtype=torch.bfloat16, device=x.device, memory_format=torch.channels_last)


def scaled_convolution_available() -> bool:
    """Does ``scaled_convolution`` run here (the optional cuDNN graph API, ``cudnn_conv``)?"""
    return cudnn_conv.available()


def scaled_convolution(x: Tensor, weight: Tensor, amax_a: Tensor, amax_b: Tensor, bias: Tensor | None,
                       stride: list[int], padding: list[int], dilation: list[int], transposed: bool = False,
                       output_padding: list[int] = (0, 0)) -> Tensor:
    """The convolution of two NVFP4 operands' BF16 scaled codes (x [N, Ci, H, W], weight [Co, Ci, kh, kw]; groups 1)
    with TE's epilogue in the kernel: ``bf16(fp32(fp32(acc * alpha) + bias))``, alpha =
    ``nvfp4.gemm_alpha(amax_a, amax_b)``; channels-last BF16 output (``quant.kernels.cudnn_conv``). ``transposed``:
    the transposed convolution of x by weight [Ci, Co, kh, kw] (``F.conv_transpose2d``'s arithmetic)."""
    return _call(_scaled_convolution_op, _scaled_convolution_eager, x, weight, amax_a, amax_b, bias, stride, padding,
                 dilation, transposed, list(output_padding))
