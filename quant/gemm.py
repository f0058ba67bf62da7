"""The emulated GEMM of the QAT layers: TE's NVFP4 GEMM via the scaled-codes trick (SPEC 1.8), or a plain one.

Why a separate module: every quantized layer (linear, conv, transposed conv, and later the Triton kernels) must run
its three GEMMs with the same arithmetic, so the rule "when is the result exactly TE's" lives once, here.

An operand is either an ``nvfp4.NVFP4Tensor`` (codes + E4M3 block scales + FP32 amax) or an ordinary tensor (high
precision, or fake-quantized values of another format). ``prepare`` turns a pair of operands into float32 matrices
and an optional per-tensor factor; the caller contracts them with any float32 op (``mm``, ``conv2d``,
``conv_transpose2d``), and ``finish`` applies the factor, adds the bias and rounds once to the output dtype:

* both NVFP4: the operands are the *scaled codes* ``e2m1(q) * s_b`` (at most 6 significant bits, exact in float32),
  their products are exact (at most 12 bits), the float32 contraction accumulates in FP32 as cuBLASLt does, and the
  result is multiplied by TE's ``alpha = fp32(fp32(A_a * A_b) / (6*6*448*448))`` (``nvfp4.gemm_alpha``). This equals
  the Blackwell block-scaled MMA up to the FP32 summation order, and equals it bit for bit whenever the FP32
  accumulation is exact (tests build such cases). TF32 does not spoil it: scaled codes fit in TF32's 10-bit mantissa.
* otherwise (one operand high precision, or another format): each NVFP4 operand is dequantized with TE's formula to
  the compute dtype (what TE's ``backward_override="dequantized"`` multiplies), then everything is contracted in
  float32 and rounded once, which models a BF16 GEMM with FP32 accumulation.

The output dtype is the compute dtype (BF16 under bf16 autocast, FP32 in 32-true runs); TE's FP4 GEMM has no FP16
output, so NVFP4 layers never compute in FP16 (checked by ``quant.functional``).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from quant import nvfp4

Operand = Union[Tensor, nvfp4.NVFP4Tensor]


def is_nvfp4(operand: Operand) -> bool:
    return isinstance(operand, nvfp4.NVFP4Tensor)


def prepare(a: Operand, b: Operand, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """float32 2-D matrices for the contraction of a and b, plus the factor ``finish`` applies (None: no factor).

    NVFP4 operands come back as [rows, cols] of their 2-D layout (``NVFP4Tensor.shape`` flattened to [-1, K]);
    tensors come back as they are, in float32.
    """
    if is_nvfp4(a) and is_nvfp4(b):
        alpha = nvfp4.gemm_alpha(a.amax, b.amax)
        return nvfp4.scaled_codes(a, torch.float32), nvfp4.scaled_codes(b, torch.float32), alpha
    return dense(a, compute_dtype).to(torch.float32), dense(b, compute_dtype).to(torch.float32), None


def dense(operand: Operand, compute_dtype: torch.dtype) -> Tensor:
    """The operand's values as a 2-D tensor: NVFP4 dequantized with TE's formula to ``compute_dtype``, tensors as is."""
    if is_nvfp4(operand):
        return nvfp4.dequantize(operand, dtype=compute_dtype).reshape(-1, operand.shape[-1])
    return operand


def finish(acc: Tensor, alpha: Tensor | None, out_dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """Epilogue: ``out_dtype(acc * alpha + bias)`` in float32 with one final rounding (cuBLASLt's epilogue order).

    acc: float32 accumulator (any shape); bias: broadcastable to acc (already in its final layout), or None.
    """
    out = acc if alpha is None else acc * alpha
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def mm(a: Operand, b: Operand, out_dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """The TN GEMM ``a [M, K] @ b [N, K]^T -> [M, N]`` in ``out_dtype`` (bias [N] added in the epilogue)."""
    a32, b32, alpha = prepare(a, b, out_dtype)
    return finish(_contract(a32, b32.t(), _exact_in_bf16(a, b, out_dtype)), alpha, out_dtype, bias)


def _exact_in_bf16(a: Operand, b: Operand, compute_dtype: torch.dtype) -> bool:
    """True when both prepared operands hold BF16-representable values (so a BF16 GEMM reads them exactly).

    Scaled codes always are (SPEC 1.8); NVFP4 operands dequantized to a BF16 compute dtype are; plain tensors are when
    they are BF16 tensors.
    """
    if is_nvfp4(a) and is_nvfp4(b):
        return True
    return all((is_nvfp4(op) and compute_dtype == torch.bfloat16) or (not is_nvfp4(op) and op.dtype == torch.bfloat16)
               for op in (a, b))


def _contract(a32: Tensor, b32: Tensor, exact_in_bf16: bool) -> Tensor:
    """``a32 [M, K] @ b32 [K, N]`` with FP32 accumulation and an FP32 result.

    On CUDA, operands whose values are exact in BF16 go through a BF16 tensor-core GEMM with an FP32 output
    (``torch.mm(..., out_dtype=float32)``): the same products and the same FP32 accumulation as the float32 matmul,
    about 2x the speed of TF32 and 10x that of an FP32 GEMM on Hopper. Elsewhere the float32 matmul runs.
    """
    if exact_in_bf16 and a32.is_cuda:
        return torch.mm(a32.to(torch.bfloat16), b32.to(torch.bfloat16), out_dtype=torch.float32)
    return a32 @ b32
