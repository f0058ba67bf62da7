"""Triton GEMM with the QAT epilogue fused: ``out = out_dtype(fp32(fp32(acc * alpha) + bias))``, acc = a @ b in FP32.

Why: the emulated NVFP4 GEMM (``quant.gemm``) multiplies BF16 scaled codes with FP32 accumulation and must apply
TE's alpha to the FP32 accumulator before the one rounding to BF16. cuBLAS through PyTorch takes alpha only as a host
number, so the GEMM used to write its accumulator as an FP32 tensor (``torch.mm(..., out_dtype=float32)``) and the
epilogue ran as a second pass (``quant.kernels.epilogue``): per output element a 4-byte write and a 4-byte read that
a BF16 GEMM does not have (on an H200, 1.26x to 1.66x the BF16 GEMM's time for the decoder's shapes). Here the
epilogue runs on the accumulator while it is still in registers and the GEMM writes the output dtype (1.10x to
1.17x; ``bench/gemm_epilogue.py``).

The arithmetic is the epilogue kernel's, operation by operation: alpha from the two amaxes (``nvfp4.gemm_alpha``),
``acc * alpha`` and ``+ bias`` as two separate IEEE float32 operations (``enable_fp_fusion=False``; the tensor-core
MMA is not affected by that flag), the bias widened exactly from its dtype, RNE to BF16 with NaN as 0x7FC0. The
result equals the two-pass path wherever the FP32 accumulation is order-independent (exact sums); otherwise the two
differ by the FP32 summation order, as cuBLAS algorithms do among themselves (``quant.gemm``).

Operands are read with TMA tensor descriptors (Hopper and later; Triton's interpreter emulates them), which needs
16-byte aligned rows and a unit inner stride: a row-major a [M, K], b as a view [K, N] of a row-major [N, K] (a
weight) or itself row-major, and N a multiple of 8; and the output must have at least two tiles per multiprocessor
(``_fills_the_device``). Anything else takes the two-pass path inside the same operation (``scaled_mm`` decides on
the tensors it receives, so callers never read strides; see ``quant.kernels.epilogue`` for why that matters under
torch.compile).

Tiles: one fixed configuration (``GemmConfig``), chosen by timing candidates on an H200 for the decoder's shapes
rather than by Triton's autotuner: autotuning times candidates on first use, which cannot happen inside a CUDA-graph
capture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from quant.kernels.epilogue import epilogue
from quant.kernels.nvfp4 import launch_options
from quant.kernels.rounding import bf16_bits
from quant.nvfp4 import INV_GEMM


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration: output tile [block_m, block_n], reduction step block_k, pipeline depth, warps, and
    how many tile rows one column sweep covers (``group_m``: reuse of the b tiles in L2)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 3
    warps: int = 4
    group_m: int = 8


_config = GemmConfig()


def set_config(config: GemmConfig) -> GemmConfig:
    """Use ``config`` for later launches (``bench/gemm_epilogue.py --sweep`` times candidates); returns the
    previous one."""
    global _config
    previous, _config = _config, config
    return previous


@triton.jit
def _tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``: GROUP_M tile rows are swept column by column, so the b tiles they share are
    read from L2."""
    tiles_n = tl.cdiv(N, BN)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def _scaled_mm_kernel(a_desc, b_desc, out_desc, amax_a_ptr, amax_b_ptr, bias_ptr, M, N, K,
                      B_ROWS_ARE_N: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BIAS: tl.constexpr,
                      NATIVE_BF16: tl.constexpr, INV_GEMM: tl.constexpr, STAGES: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):  # the descriptors zero-fill past M, N and K
        a = a_desc.load([pid_m * BM, k])
        if B_ROWS_ARE_N:
            b = b_desc.load([pid_n * BN, k]).T
        else:
            b = b_desc.load([k, pid_n * BN])
        if NATIVE_BF16:
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        else:  # Triton's CPU interpreter misreads BF16 dot operands: the same exact products from FP32 operands
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)

    if HAS_ALPHA:
        alpha = (tl.load(amax_a_ptr) * tl.load(amax_b_ptr)) * INV_GEMM  # nvfp4.gemm_alpha
        acc = acc * alpha
    if HAS_BIAS:
        cols = pid_n * BN + tl.arange(0, BN)
        acc = acc + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_desc.store([pid_m * BM, pid_n * BN], bf16_bits(acc, NATIVE_BF16))  # rows and columns past M, N are dropped


def _aligned(t: Tensor, rows_stride: int) -> bool:
    return t.data_ptr() % 16 == 0 and (rows_stride * t.element_size()) % 16 == 0


def _b_rows_are_n(b: Tensor) -> bool | None:
    """How the TMA reads b [K, N]: True for a view of a row-major [N, K] (a weight), False for row-major [K, N], None
    when neither layout fits the descriptor rules."""
    if b.stride(0) == 1 and _aligned(b, b.stride(1)):
        return True
    if b.stride(1) == 1 and _aligned(b, b.stride(0)):
        return False
    return None


_multiprocessors: dict[torch.device, int] = {}


def _fills_the_device(m: int, n: int, device: torch.device) -> bool:
    """At least two output tiles per multiprocessor. The kernel has no split-K: a GEMM with few output tiles and a long
    reduction (a weight gradient over the tokens) runs on too few multiprocessors, while cuBLAS splits K; its FP32
    output is small in exactly those cases, so the two-pass path costs little there. Measured on an H200 (132
    multiprocessors; time over the BF16 GEMM): [1024, 1024] x 8192 tokens fused 2.31x, two-pass 1.07x; [2816, 1024]
    fused 1.41x, two-pass 1.08x; [2048, 2048] (256 tiles) 1.07x both; a decoder forward [8192, 1024] x 1024 (512
    tiles) fused 1.14x, two-pass 1.54x."""
    if device.type != "cuda":  # Triton's interpreter: no multiprocessors to fill
        return True
    if device not in _multiprocessors:
        _multiprocessors[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return triton.cdiv(m, _config.block_m) * triton.cdiv(n, _config.block_n) >= 2 * _multiprocessors[device]


def fused(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> bool:
    """Does ``scaled_mm`` run the fused kernel for these operands (else the two-pass path)?"""
    m, n = a.shape[0], b.shape[1]
    return (a.dtype == b.dtype == out_dtype == torch.bfloat16 and m > 0 and n > 0 and a.shape[1] > 0
            and a.stride(1) == 1 and _aligned(a, a.stride(0)) and n % 8 == 0 and _b_rows_are_n(b) is not None
            and _fills_the_device(m, n, a.device))


def scaled_mm(a: Tensor, b: Tensor, amax_a: Tensor | None, amax_b: Tensor | None, bias: Tensor | None,
              out_dtype: torch.dtype) -> Tensor:
    """``out_dtype(fp32(fp32((a @ b) * alpha) + bias))`` as a row-major [M, N] tensor, alpha =
    ``nvfp4.gemm_alpha(amax_a, amax_b)`` (no alpha when the amaxes are None).

    a [M, K], b [K, N]: BF16 or FP16 (the same), any strides (the fused kernel when ``fused``, else an FP32-output
    GEMM and the epilogue kernel); amax_a, amax_b: float32 scalar tensors (both or neither); bias [N] or None."""
    if not fused(a, b, out_dtype):
        acc = torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else a.to(torch.float32) @ b.to(torch.float32)
        return epilogue(acc, amax_a, amax_b, bias, 1, out_dtype)  # row-major, as acc
    m, k = a.shape
    n = b.shape[1]
    c = _config
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    rows_are_n = _b_rows_are_n(b)
    b_desc = (TensorDescriptor.from_tensor(b.t(), [c.block_n, c.block_k]) if rows_are_n
              else TensorDescriptor.from_tensor(b, [c.block_k, c.block_n]))
    has_alpha = amax_a is not None
    options = launch_options(a)
    options["num_warps"] = c.warps
    grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
    _scaled_mm_kernel[grid](
        TensorDescriptor.from_tensor(a, [c.block_m, c.block_k]), b_desc,
        TensorDescriptor.from_tensor(out.view(torch.int16), [c.block_m, c.block_n]),
        amax_a if has_alpha else out, amax_b if has_alpha else out, out if bias is None else bias, m, n, k,
        B_ROWS_ARE_N=rows_are_n, HAS_ALPHA=has_alpha, HAS_BIAS=bias is not None, INV_GEMM=INV_GEMM,
        STAGES=c.stages, BM=c.block_m, BN=c.block_n, BK=c.block_k, GROUP_M=c.group_m, **options,
    )
    return out
