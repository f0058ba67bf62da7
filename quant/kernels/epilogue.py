"""Triton kernel for the epilogue of the emulated GEMMs: ``out = out_dtype(fp32(fp32(acc * alpha) + bias))``.

Why a kernel: on the GPU the QAT GEMM accumulates into an FP32 tensor (``torch.mm(..., out_dtype=float32)`` or an FP32
convolution), and ``quant.gemm.finish`` then scales it by TE's per-GEMM alpha, adds the bias and rounds once to the
compute dtype. As PyTorch ops that is three passes over an FP32 tensor (``*``, ``+``, ``.to``) plus the small ops that
form alpha; here it is one read of the accumulator and one write of the output, with alpha formed from the two
operands' amax in the kernel (``quant.nvfp4.gemm_alpha``: ``fp32(fp32(A_a * A_b) * fp32(1/(6*6*448*448)))``).
Under ``torch.compile`` the same kernel runs as a custom op (``fp4lab::gemm_epilogue``), because Inductor would
otherwise fuse the three ops into one Triton kernel of its own, where the multiply and add may contract into an FMA
(one rounding instead of two) and a BF16 output that the next op upcasts again may never be rounded (Inductor elides
such downcast/upcast pairs): both change bits.

What is load-bearing: the multiply and the add are separate IEEE float32 operations (``enable_fp_fusion=False``), the
bias is read in its own dtype and widened exactly, and the rounding to BF16 is RNE (``rounding.bf16_bits``: NaN stays
NaN). The kernel walks the accumulator in memory order, so any non-overlapping dense
layout (row-major GEMM output, NCHW or channels-last convolution output, a permuted weight gradient) is one flat pass;
the output gets the accumulator's strides, and the bias index of flat position p is ``(p // stride_c) % C`` for the
bias dim c. Any other layout is copied row-major first (``flat_layout``).

The layout is decided here, on the accumulator the op receives (real or fake), and never by the caller: the epilogue
runs inside the QAT layers' backward, which torch.compile's Dynamo speculates while tracing the forward, with the
gradients' strides unknown. Reading a stride there makes Dynamo abandon the backward's trace and retrace it, and the
abandoned trace never leaves the backward's ``torch.autocast(enabled=False)`` block: the rest of the frame was traced
with autocast off (``quant.functional._autocast_off`` explains the consequence).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quant.kernels.nvfp4 import _storage_view, launch_options
from quant.kernels.rounding import store_values
from quant.nvfp4 import INV_GEMM

_BLOCK = 2048  # elements per program (a memory-bound pass)


@triton.jit  # numel is specialised on divisibility by 16: that lets the masked loads and stores be vectorised
def _epilogue_kernel(acc_ptr, out_ptr, amax_a_ptr, amax_b_ptr, bias_ptr, numel, inner, channels,
                     HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16_BITS: tl.constexpr,
                     NATIVE_BF16: tl.constexpr, INV_GEMM: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    value = tl.load(acc_ptr + offsets, mask=mask, other=0.0)  # float32, flat memory order
    if HAS_ALPHA:
        alpha = (tl.load(amax_a_ptr) * tl.load(amax_b_ptr)) * INV_GEMM  # nvfp4.gemm_alpha
        value = value * alpha
    if HAS_BIAS:
        bias = tl.load(bias_ptr + (offsets // inner) % channels, mask=mask, other=0.0)
        value = value + bias.to(tl.float32)
    store_values(out_ptr + offsets, value, mask, OUT_BF16_BITS, NATIVE_BF16)


def flat_layout(acc: Tensor) -> Tensor:
    """``acc`` itself if it is non-overlapping and dense in some dim order (one flat walk covers it), else a row-major
    copy. The output of the epilogue has the strides of this tensor (also on fake tensors, for the custom op)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(acc.stride(), acc.shape) if n != 1):
        if stride != expected:
            return acc.contiguous()
        expected *= size
    return acc


def epilogue(acc: Tensor, amax_a: Tensor | None, amax_b: Tensor | None, bias: Tensor | None, bias_dim: int,
             out_dtype: torch.dtype) -> Tensor:
    """``out_dtype(fp32(fp32(acc * alpha) + bias))`` with acc's strides, alpha = ``nvfp4.gemm_alpha(amax_a, amax_b)``.

    acc: float32, any layout (``flat_layout``); amax_a, amax_b: float32 scalar tensors (both or neither: no alpha);
    bias: 1-D [acc.shape[bias_dim]] or None."""
    acc = flat_layout(acc)
    out = torch.empty_like(acc, dtype=out_dtype)  # preserves the strides of a dense tensor
    numel = acc.numel()
    if numel == 0:
        return out
    inner = acc.stride(bias_dim) if bias is not None else 1
    channels = acc.shape[bias_dim] if bias is not None else 1
    has_alpha = amax_a is not None
    grid = (triton.cdiv(numel, _BLOCK),)
    _epilogue_kernel[grid](acc, _storage_view(out), amax_a if has_alpha else acc, amax_b if has_alpha else acc,
                           acc if bias is None else bias, numel, inner, channels, HAS_ALPHA=has_alpha,
                           HAS_BIAS=bias is not None, OUT_BF16_BITS=out_dtype == torch.bfloat16, INV_GEMM=INV_GEMM,
                           BLOCK=_BLOCK, **launch_options(acc))
    return out
