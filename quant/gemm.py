"""The emulated GEMM of the QAT layers: TE's NVFP4 GEMM via the scaled-codes trick (SPEC 1.8), or a plain one.

Why a separate module: every quantized layer (linear, conv, transposed conv) must run its three GEMMs with the same
arithmetic, so the rule "when is the result exactly TE's" lives once, here.

An operand is an ``nvfp4.NVFP4Tensor`` (codes + E4M3 block scales + FP32 amax), a ``Relaid`` NVFP4 tensor (the same
codes used in another GEMM's layout, e.g. the forward's 16x16-tiled W as the dgrad operand W^T), a ``Prescaled`` NVFP4
tensor (with its scaled codes already written by the quantize kernel), ``ScaledCodes`` (scaled codes and amax only,
from the paired quantize pass of the ``full`` step), or an ordinary tensor (high precision, or fake-quantized values
of another format). The arithmetic, for every device:

* both NVFP4: the operands are the *scaled codes* ``e2m1(q) * s_b`` (at most 6 significant bits, exact in BF16 and
  FP32), their products are exact (at most 12 bits), the contraction accumulates in FP32 as cuBLASLt does, and the
  result is multiplied by TE's ``alpha = fp32(fp32(A_a * A_b) / (6*6*448*448))`` (``nvfp4.gemm_alpha``). This equals
  the Blackwell block-scaled MMA up to the FP32 summation order, and equals it bit for bit whenever the FP32
  accumulation is exact (tests build such cases).
* otherwise (one operand high precision, or another format): each NVFP4 operand is dequantized with TE's formula to
  the compute dtype (what TE's ``backward_override="dequantized"`` multiplies), and the contraction accumulates the
  exact products in FP32, which models a BF16 GEMM with FP32 accumulation.
* epilogue (``finish``): ``out_dtype(fp32(fp32(acc * alpha) + bias))``: the FP32 accumulator times alpha, plus the
  bias (in the compute dtype, widened exactly), rounded once (cuBLASLt's epilogue order).

Two implementations of that arithmetic, selected per call by the device of the operands:

* reference (CPU, or CUDA with ``quant.kernels`` disabled): ``prepare`` materialises float32 matrices and the caller
  contracts them with any float32 op (``a @ b``, ``conv2d``); ``finish`` is three PyTorch ops. The CPU tests compare
  this path bit for bit with float64 references.
* fast (``fast_path``: CUDA with the Triton kernels): no dtype round trips. Scaled codes come in BF16 from the
  quantize pass itself (``Prescaled``) or from the decode kernel, dequantized operands stay in the compute dtype, and
  BF16 (or FP16) operands go straight into a tensor-core GEMM with FP32 accumulation (the products of two 8- or
  11-bit significands are exact in FP32). A GEMM with an epilogue (alpha, bias) runs it on the accumulator inside a
  Triton GEMM (``fused_gemm``, ``quant.kernels.scaled_mm``: a custom op under torch.compile, so Inductor can neither
  contract ``acc * alpha + bias`` into an FMA nor elide the final rounding). A GEMM with nothing to apply between
  accumulator and rounding (the dense backward GEMMs) is cuBLAS writing BF16 directly, with its split-K partial sums
  kept in FP32 (``rounded_gemm``). FP32 operands (32-true runs) go to the float32 matmul and ``finish``.
  Convolutions take float32 operands and run on cuDNN with TF32 switched on locally (``kernels.ops.cudnn_tf32``):
  TF32 reads BF16-representable values exactly, so this is the FP32 convolution's arithmetic at tensor-core speed;
  their epilogue is the ``quant.kernels.epilogue`` pass. Convolutions of two NVFP4 operands (Conv2d and
  ConvTranspose2d forwards, the ``full`` input gradients) instead run on cuDNN's graph API when it is installed, BF16
  scaled codes in and the epilogue inside the kernel (``quant.functional.scaled_conv``, ``quant.kernels.cudnn_conv``).
  The two paths differ only in the FP32 summation order chosen by the GEMM / convolution implementation.

The output dtype is the compute dtype (BF16 under bf16 autocast, FP32 in 32-true runs); TE's FP4 GEMM has no FP16
output, so NVFP4 layers never compute in FP16 (checked by ``quant.functional``). FP32 operands (32-true runs) are
contracted by an FP32 GEMM, which follows ``torch.backends.cuda.matmul.allow_tf32`` (off by default) on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from quant import kernels, nvfp4


@dataclass(frozen=True, eq=False)
class Relaid:
    """An NVFP4 tensor used as the operand of another GEMM, in that GEMM's 2-D layout, without requantizing.

    Valid when every scale block of the new layout is a scale block of ``source`` (or all zeros) and the amax is
    unchanged: the 16x16 weight tiles, which cover the same 16x16 elements whether W or W^T (or, for a convolution,
    one tap's [Co, Ci] or [Ci, Co]) is blocked, so the codes, scales and amax are those TE's columnwise quantization
    produces (SPEC 1.4); and dY^T's token blocks moved by whole rows with zero blocks between them
    (``quant.functional._row_shared_wgrad``). ``source`` may also be a ``Prescaled`` operand or the forward's
    ``ScaledCodes`` (fast path: the saved GEMM operand itself, no decode pass)."""

    source: nvfp4.NVFP4Tensor | Prescaled | ScaledCodes
    layout: Callable[[Tensor], Tensor]  # source's [rows, cols] values -> this GEMM's 2-D operand (a view or a copy)

    @property
    def amax(self) -> Tensor:
        return self.source.amax


@dataclass(frozen=True, eq=False)
class Prescaled:
    """An NVFP4 tensor together with its scaled codes ``nvfp4.scaled_codes(source, values.dtype)``, written by the
    quantize kernel in the same pass as the codes (fast path), so the GEMM needs no decode; and, for a layer whose
    backward multiplies the forward's dequantized operands, those values (``dense``) from the same pass."""

    source: nvfp4.NVFP4Tensor
    values: Tensor  # [rows, cols] scaled codes e2m1 * s_b, BF16 or float32 (exact either way)
    dequantized: Tensor | None = None  # [rows, cols] TE's dequantized values in the compute dtype, or None

    @property
    def amax(self) -> Tensor:
        return self.source.amax


@dataclass(frozen=True, eq=False)
class ScaledCodes:
    """An NVFP4 operand held only as its GEMM form: scaled codes ``e2m1 * s_b`` [rows, cols] and the global amax,
    written by the paired rowwise + columnwise quantize pass of the ``full`` step (``quant.kernels.ops
    .nvfp4_quantize_pair``), which writes no packed codes. Only an NVFP4 x NVFP4 GEMM takes it: TE's dequantized
    values are not recoverable bit for bit from the scaled codes (``dense`` refuses)."""

    values: Tensor  # [rows, cols] scaled codes: BF16 (GEMM operand) or float32 (a convolution's dgrad operand)
    amax: Tensor  # float32 scalar


Operand = Union[Tensor, nvfp4.NVFP4Tensor, Relaid, Prescaled, ScaledCodes]


@dataclass(frozen=True, eq=False)
class Alpha:
    """TE's per-GEMM factor for two NVFP4 operands, kept as their global amaxes (float32 scalars): formed by
    ``nvfp4.gemm_alpha`` on the reference path, inside the fused epilogue kernel on the fast path (no extra ops)."""

    amax_a: Tensor
    amax_b: Tensor

    def value(self) -> Tensor:
        """``fp32(fp32(A_a * A_b) * fp32(1/(6*6*448*448)))``, a float32 scalar tensor."""
        return nvfp4.gemm_alpha(self.amax_a, self.amax_b)


def is_nvfp4(operand: Operand) -> bool:
    return isinstance(operand, (nvfp4.NVFP4Tensor, Relaid, Prescaled, ScaledCodes))


def packed(operand: Operand) -> Operand:
    """The operand without materialised scaled codes (what is worth saving for the backward)."""
    return operand.source if isinstance(operand, Prescaled) else operand


def fast_path(t: Tensor) -> bool:
    """Does ``t``'s device run the fast implementation (CUDA with the Triton kernels)? (Else the reference.)"""
    return kernels.enabled_for(t)


def _device_tensor(operand: Operand) -> Tensor:
    if isinstance(operand, ScaledCodes):
        return operand.values
    if isinstance(operand, (Relaid, Prescaled)):
        return _device_tensor(operand.source)
    return operand.codes if isinstance(operand, nvfp4.NVFP4Tensor) else operand


def _scaled_codes(operand: nvfp4.NVFP4Tensor | Relaid | Prescaled | ScaledCodes, dtype: torch.dtype,
                  materialize: bool) -> Tensor:
    if isinstance(operand, (Prescaled, ScaledCodes)):
        return operand.values if operand.values.dtype == dtype else operand.values.to(dtype)  # exact in both
    if isinstance(operand, nvfp4.NVFP4Tensor):
        return nvfp4.scaled_codes(operand, dtype)
    values = operand.layout(_scaled_codes(operand.source, dtype, False))
    return values.contiguous() if materialize else values


def prepare(a: Operand, b: Operand, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Alpha | None]:
    """float32 2-D matrices for the contraction of a and b, plus the factor ``finish`` applies (None: no factor).

    NVFP4 operands come back as [rows, cols] of their 2-D layout (``NVFP4Tensor.shape`` flattened to [-1, K]);
    tensors come back as they are, in float32. On the reference path a ``Relaid`` operand is materialised contiguous
    (the layout the requantized operand had), so the float32 contraction sees the same memory layout as before reuse.
    """
    materialize = not fast_path(_device_tensor(a))
    if is_nvfp4(a) and is_nvfp4(b):
        alpha = Alpha(a.amax, b.amax)
        return _scaled_codes(a, torch.float32, materialize), _scaled_codes(b, torch.float32, materialize), alpha
    return dense(a, compute_dtype).to(torch.float32), dense(b, compute_dtype).to(torch.float32), None


def dense(operand: Operand, compute_dtype: torch.dtype) -> Tensor:
    """The operand's values as a 2-D tensor: NVFP4 dequantized with TE's formula to ``compute_dtype``, tensors as is.

    An NVFP4 operand's values come back as the decode's own output (2-D already, no reshape view): autograd
    Functions under torch.compile cannot save views of intermediates."""
    if isinstance(operand, Relaid):
        values = operand.layout(dense(operand.source, compute_dtype))
        return values if fast_path(values) else values.contiguous()
    if isinstance(operand, Prescaled):
        if operand.dequantized is not None and operand.dequantized.dtype == compute_dtype:
            return operand.dequantized
        return dense(operand.source, compute_dtype)
    if isinstance(operand, ScaledCodes):
        raise TypeError("a ScaledCodes operand has no TE-dequantized values; it only enters NVFP4 x NVFP4 GEMMs")
    if isinstance(operand, nvfp4.NVFP4Tensor):
        values = nvfp4.dequantize(operand, dtype=compute_dtype)
        return values if values.dim() == 2 else values.reshape(-1, operand.shape[-1])
    return operand


def finish(acc: Tensor, alpha: Alpha | None, out_dtype: torch.dtype, bias: Tensor | None = None,
           bias_dim: int = -1) -> Tensor:
    """Epilogue: ``out_dtype(acc * alpha + bias)`` in float32 with one final rounding (cuBLASLt's epilogue order).

    acc: float32 accumulator (any shape); bias: 1-D along ``acc``'s dim ``bias_dim`` (the output features or
    channels), or None."""
    if fast_path(acc):
        if alpha is None and bias is None and out_dtype == torch.float32:
            return acc
        amax_a, amax_b = (None, None) if alpha is None else (alpha.amax_a, alpha.amax_b)
        return kernels.load().gemm_epilogue(acc, amax_a, amax_b, bias, bias_dim % acc.dim(), out_dtype)
    out = acc if alpha is None else acc * alpha.value()
    if bias is not None:
        shape = [-1 if dim == bias_dim % acc.dim() else 1 for dim in range(acc.dim())]
        out = out + bias.to(torch.float32).view(shape)
    return out.to(out_dtype)


def mm(a: Operand, b: Operand, out_dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """The TN GEMM ``a [M, K] @ b [N, K]^T -> [M, N]`` in ``out_dtype`` (bias [N] added in the epilogue)."""
    if fast_path(_device_tensor(a)):
        a2, b2, alpha = fast_operands(a, b, out_dtype)
        if a2.dtype == b2.dtype and a2.dtype in _LOW_PRECISION:
            if alpha is None and bias is None and out_dtype == a2.dtype:
                return rounded_gemm(a2, b2.t())  # nothing between the FP32 accumulator and the one rounding
            return fused_gemm(a2, b2.t(), alpha, bias, out_dtype)
        return finish(a2.to(torch.float32) @ b2.t().to(torch.float32), alpha, out_dtype, bias)  # FP32 operands
    a32, b32, alpha = prepare(a, b, out_dtype)
    return finish(_contract(a32, b32.t(), _exact_in_bf16(a, b, out_dtype)), alpha, out_dtype, bias)


def fast_operands(a: Operand, b: Operand, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Alpha | None]:
    """The fast path's GEMM operands: BF16 scaled codes (exact, SPEC 1.8) and alpha, or the values in their own dtype
    and None."""
    if is_nvfp4(a) and is_nvfp4(b):
        alpha = Alpha(a.amax, b.amax)
        return _scaled_codes(a, torch.bfloat16, False), _scaled_codes(b, torch.bfloat16, False), alpha
    return dense(a, compute_dtype), dense(b, compute_dtype), None


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def fused_gemm(a: Tensor, b: Tensor, alpha: Alpha | None, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``finish(a @ b, alpha, out_dtype, bias)`` for two BF16 (or FP16) matrices, with the epilogue applied inside the
    GEMM (``quant.kernels.scaled_mm``: no FP32 accumulator tensor). CPU tests of the fast path replace this
    function."""
    amax_a, amax_b = (None, None) if alpha is None else (alpha.amax_a, alpha.amax_b)
    return kernels.load().scaled_gemm(a, b, amax_a, amax_b, bias, out_dtype)


def rounded_gemm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of two BF16 (or FP16) matrices accumulated in FP32 and rounded once to their dtype: the GEMM writes
    the output dtype itself, with split-K reductions forced to FP32 (``kernels.ops.fp32_reductions``). CPU tests of
    the fast path replace this function."""
    return kernels.load().rounded_mm(a, b)


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
    """The reference contraction ``a32 [M, K] @ b32 [K, N]`` with FP32 accumulation and an FP32 result.

    On CUDA (kernels disabled), operands whose values are exact in BF16 go through a BF16 tensor-core GEMM with an
    FP32 output: the same products and the same FP32 accumulation as the float32 matmul. Elsewhere the float32 matmul
    runs.
    """
    if exact_in_bf16 and a32.is_cuda:
        return torch.mm(a32.to(torch.bfloat16), b32.to(torch.bfloat16), out_dtype=torch.float32)
    return a32 @ b32
