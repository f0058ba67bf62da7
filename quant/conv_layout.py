"""The placeholder tensors of one-sided ``aten.convolution_backward`` calls, shared by the reference and kernel paths.

Why a module: an input-gradient-only call still takes an ``input`` and a weight-gradient-only call a ``weight``. They
are read for size, dtype and memory format only, but the memory format matters. cuDNN first converts dY to the
input's format, then to the format it convolves in (channels-last when dY or W is). A stride-0 placeholder reads as
NCHW, which cost two layout copies of a channels-last dY per call (ResNet-50 ``dequantized`` on an H200: 4 ms of a
16 ms step, 2026-11-26). On CPU the format picks the algorithm, hence the FP32 summation order, so the reference
(``quant.functional.ConvGeometry``) and the kernel path (``quant.kernels.ops``) must build the same placeholders.
Converting an NCHW dY once to channels-last before both calls was tried: it cost 1.3 ms of a compiled UNet step
(14.2 -> 15.5 ms, H200, A/B in one run), where Inductor picks dY's layout, so dY is passed as it comes.
"""
from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """Is t a 4-D tensor laid out channels-last, and not also NCHW-contiguous?"""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def unread_input(dy: Tensor, dtype: torch.dtype, input_shape: list[int] | torch.Size) -> Tensor:
    """An uninitialised ``input`` of ``input_shape`` in dY's memory format (allocated, never written: no kernel)."""
    layout = torch.channels_last if is_channels_last(dy) else torch.contiguous_format
    return torch.empty(tuple(input_shape), dtype=dtype, device=dy.device, memory_format=layout)


def unread_weight(dy: Tensor, weight_shape: list[int] | torch.Size) -> Tensor:
    """A ``weight`` of ``weight_shape`` backed by one uninitialised element (its format does not matter: the input's
    decides)."""
    return dy.new_empty(()).expand(tuple(weight_shape))
