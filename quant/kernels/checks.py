"""The NaN/Inf check of the kernel path, without a host synchronisation per quantized tensor.

Why: the reference raises ``QuantError`` when a tensor to be quantized holds NaN or Inf (``quant.errors``), which
needs the amax on the host: one ``cudaStreamSynchronize`` per quantized operand. A training step quantizes hundreds of
operands, and every synchronisation drains the launch queue (measured by ``bench/train_step.py``), so the kernel path
checks asynchronously instead:

* the amax kernel turns NaN into +inf, so a tensor is poisoned iff its amax is +inf; the quantize kernels then write
  NaN values and 0x7F (NaN) scale bytes, so nothing downstream can look valid;
* ``watch`` queues a non-blocking copy of the amax into pinned host memory and a CUDA event behind it;
* every later ``watch`` (and ``raise_pending``) looks at the copies whose events have completed and raises
  ``QuantError`` naming the first poisoned tensor. The error arrives a few quantizations late (the tensor's name and
  format are in the message), never silently.

``raise_pending(wait=True)`` synchronises and checks everything queued (tests, end of a run). Set the environment
variable ``FP4LAB_SYNC_CHECKS=1`` (or call ``set_synchronous(True)``) to check each tensor immediately, as the
reference does. CPU tensors (the Triton interpreter) are always checked immediately.
"""
from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from quant.errors import QuantError, describe

_synchronous = os.environ.get("FP4LAB_SYNC_CHECKS", "0") == "1"


@dataclass
class _Pending:
    amax_host: Tensor  # pinned float32 [1], filled by a non-blocking copy
    done: torch.cuda.Event
    fmt: str
    name: str | None
    stage: str


_pending: deque[_Pending] = deque()


def set_synchronous(enabled: bool) -> None:
    """Check every tensor immediately (one synchronisation per tensor, the reference's behaviour) or asynchronously."""
    global _synchronous
    _synchronous = bool(enabled)


def _error(amax: float, fmt: str, name: str | None, stage: str, late: bool) -> QuantError:
    where = f" {stage}" if stage else ""
    when = " (found by the asynchronous check of the GPU kernels, after later launches)" if late else ""
    return QuantError(
        f"{fmt}: {describe(name)}{where} contains NaN or Inf values (amax = {amax}){when}; quantization of "
        "non-finite values is undefined, fix the producer of this tensor (e.g. lower the learning rate, enable "
        "gradient clipping or loss scaling)"
    )


def watch(amax: Tensor, fmt: str, name: str | None, stage: str = "") -> None:
    """Queue the check of one tensor's kernel amax (float32 [1], +inf when poisoned); raise for completed ones."""
    if not amax.is_cuda or _synchronous:
        value = float(amax.reshape(-1)[0])
        if not math.isfinite(value):
            raise _error(value, fmt, name, stage, late=False)
        return
    host = torch.empty(1, dtype=torch.float32, pin_memory=True)
    host.copy_(amax.reshape(1), non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    _pending.append(_Pending(host, done, fmt, name, stage))
    raise_pending(wait=False)


def raise_pending(wait: bool = True) -> None:
    """Check queued tensors: those already computed (``wait=False``) or all of them after a synchronisation."""
    while _pending:
        item = _pending[0]
        if wait:
            item.done.synchronize()
        elif not item.done.query():
            return
        _pending.popleft()
        value = float(item.amax_host[0])
        if not math.isfinite(value):
            _pending.clear()
            raise _error(value, item.fmt, item.name, item.stage, late=True)
