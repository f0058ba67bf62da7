"""Fused Triton kernels for NVFP4 and MXFP4 emulation on CUDA GPUs (optional; ``quant`` works without Triton).

Why: the PyTorch reference (``quant.nvfp4``, ``quant.mxfp4``) is the specification, written for clarity and for CPU
tests; on a GPU its many intermediate tensors make a fake-quantize cost several times a copy of the tensor. The kernels
compute the same bytes (codes, scale bytes, amax, dequantized values) in one pass after the global-amax reduction.

Dispatch rule (used by ``quant.nvfp4`` and ``quant.mxfp4``): a CUDA tensor goes to the kernels when Triton imports,
a CPU tensor to the reference; same functions, same results. ``disabled()`` (or ``FP4LAB_DISABLE_KERNELS=1``) sends CUDA
tensors to the reference too, for benchmarks and cross-checks. Nothing here imports Triton until a CUDA tensor asks.

Differences from the reference, by design:
* stochastic rounding draws its 8 bits per element from Philox seeded by the caller's generator, not from
  ``torch.randint``: the same distribution (SPEC 1.7), different bits;
* NaN/Inf inputs raise ``QuantError`` asynchronously, a few kernel launches late (``quant.kernels.checks``);
* the RHT sums its 16 products on the tensor cores (BF16 MMA with FP32 accumulation, as TE's Hadamard kernel does);
  results equal the reference wherever the FP32 sums are exact, which is every chunk spanning less than about 2^12 in
  magnitude (SPEC 1.6).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

_disabled = os.environ.get("FP4LAB_DISABLE_KERNELS", "0") == "1"
# Looked up once (finding the package does not import it): ``enabled_for`` runs inside torch.compile-traced code,
# where it must be a plain read of module state.
_import_error: str | None = None if importlib.util.find_spec("triton") else "the triton package is not installed"
_ops = None


def traced_or_eager(op: Callable[..., Any], eager: Callable[..., Any], *args: Any) -> Any:
    """``op(*args)`` (a registered custom op: one opaque graph node) while torch.compile traces, else ``eager(*args)``
    (the plain function: the dispatcher costs host time on every eager call)."""
    return op(*args) if torch.compiler.is_compiling() else eager(*args)


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None if they can): Triton missing or failing to import."""
    return _import_error


def load():
    """The kernel operations module ``quant.kernels.ops`` (imports Triton on first use)."""
    global _ops, _import_error
    if _ops is None:
        try:
            from quant.kernels import ops as module
        except ImportError as error:
            _import_error = f"importing the Triton kernels failed: {error}"
            raise
        _ops = module
    return _ops


def enabled_for(x: object) -> bool:
    """True if ``x`` should go to the kernels: a CUDA tensor, Triton importable, kernels not disabled."""
    if _disabled or _import_error is not None or not isinstance(x, Tensor) or not x.is_cuda:
        return False
    if _ops is None:
        try:
            load()
        except ImportError:
            return False
    return True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block CUDA tensors use the PyTorch reference (for benchmarks and cross-checks)."""
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous
