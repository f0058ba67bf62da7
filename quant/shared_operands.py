"""One quantized operand for all the layers that read the same tensor (a decoder's q/k/v, gate/up projections).

Why: three projections of one attention input quantize the same X in the same format three times in the forward, and
in the ``full`` backward rotate and quantize the same X^T three times again; each is an amax read plus a quantize
pass, and on a GPU two kernel launches with their host cost. The operand is a pure function of the tensor and of the
quantization settings, so the second and third layer can take the first one's result, bit for bit.

When a result is reused: the same tensor object (identity, not equal values), not modified in place since
(``Tensor._version``), and the same key (the operand's slot and every setting it depends on; the caller builds it).
One result is kept per key: the layers that share an input run one after the other, so the next input of the same
kind replaces the entry, and at most one operand per key outlives its forward or backward pass. An entry must hold no
autograd history (callers store detached tensors), or it would keep its step's graph alive into the next step. Not used
while torch.compile traces (identity is not traceable): there the layers' identical quantize calls are merged by the
graph's common-subexpression pass instead, which needs their arguments equal, so compiled input operands are named by
a handle shared by sibling layers (``quant.kernels.checks.register_sibling``). Switched off by
``FP4LAB_SHARE_OPERANDS=0`` or ``sharing(False)`` (eager only). A NaN in a shared input is reported under the name of
the first layer that quantized it (eager) or of the sibling group (compiled).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Hashable
from typing import Callable, Iterator, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
_enabled = os.environ.get("FP4LAB_SHARE_OPERANDS", "1") != "0"


def active() -> bool:
    """Are operands shared here? Not while torch.compile traces (identity is not traceable) or when switched off."""
    return _enabled and not torch.compiler.is_compiling()


class OperandShare:
    """The last result made from a source tensor, per key (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[weakref.ref, int, object]] = {}

    def get(self, source: Tensor, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, or the result an earlier call with this ``source`` (same object, same version) and ``key``
        made."""
        if not active() or source.is_inference():  # inference tensors have no version counter
            return make()
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is source and entry[1] == source._version:
            return entry[2]  # type: ignore[return-value]
        value = make()
        self._entries[key] = (weakref.ref(source), source._version, value)
        return value


@contextlib.contextmanager
def sharing(enabled: bool) -> Iterator[None]:
    """Operands are shared (default) or made per layer inside this block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous
