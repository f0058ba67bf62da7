"""torchao's NVFP4 fake quantization as the peer row of ``bench/train_step.py`` (issue 6: "ahead of torchao's 1.25x on
the same run").

Why this shape and not torchao's QAT module: torchao 0.18's ``NVFP4FakeQuantizedLinear`` runs its forward through the
FP4 GEMM, which needs Blackwell. On Hopper the comparison the issue quotes is torchao's quantize/dequantize
(``NVFP4Tensor.to_nvfp4(...).dequantize()``) around a BF16 GEMM, with the dequantized operands in the backward: what
torchao's QAT backward does, what TE's ``backward_override="dequantized"`` does, and what our ``nvfp4-dequantized``
mode does. So the row differs from ours only in whose quantizer runs, not in the recipe:

* X and W fake-quantized along K with torchao's two-level scale (FP32 per-tensor scale from the amax, E4M3 block
  scales); torchao has no 16x16 weight tiles, so W is 1x16 here where ours is 16x16 (TE's default);
* the gradient passes the quantizers unchanged (straight-through), so dX = dY @ W_q and dW = dY^T @ X_q;
* Linear layers only (torchao's NVFP4 has no convolution), and exactly the layers ``quant.apply`` quantizes with the
  default NVFP4 policy; a model whose policy also quantizes convolutions is refused by name.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import quant

MODE = "torchao-nvfp4-dequantized"
NVFP4_BLOCK = 16


def _torchao():
    """torchao's NVFP4 tensor and scale helper; a clear error when torchao is absent (the row is then skipped)."""
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError as error:
        raise ImportError(f"the {MODE} row needs torchao (pip install 'torchao>=0.18,<0.19'): {error}") from error
    return NVFP4Tensor, per_tensor_amax_to_scale


class _TorchaoFakeQuantize(torch.autograd.Function):
    """torchao's NVFP4 quantize + dequantize along the last dim; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x [..., K] bf16/fp32, K % 16 == 0
        nvfp4_tensor, amax_to_scale = _torchao()
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]: torchao takes 2-D or 3-D operands
        scale = amax_to_scale(rows.abs().amax())
        return nvfp4_tensor.to_nvfp4(rows, per_tensor_scale=scale).dequantize(x.dtype).view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class TorchaoNVFP4Linear(nn.Linear):
    """``nn.Linear`` whose input and weight pass torchao's NVFP4 fake quantization in the compute dtype (the autocast
    dtype when autocast is on, as a BF16-autocast GEMM would see them)."""

    def forward(self, x: Tensor) -> Tensor:  # x [..., in_features]
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_q = _TorchaoFakeQuantize.apply(x.to(dtype))
        w_q = _TorchaoFakeQuantize.apply(self.weight.to(dtype))
        return F.linear(x_q, w_q, None if self.bias is None else self.bias.to(dtype))


def apply(model: nn.Module) -> tuple[str, ...]:
    """Swap the Linear layers that the default NVFP4 policy quantizes for ``TorchaoNVFP4Linear`` (parameters shared,
    state-dict keys unchanged); returns their names."""
    _torchao()
    report = quant.apply(copy.deepcopy(model), quant.Policy(format="nvfp4"))
    modules = dict(model.named_modules())
    names = report.quantized_names()
    not_linear = [name for name in names if type(modules[name]) is not nn.Linear]
    if not_linear:
        raise ValueError(f"{MODE} covers Linear layers only (torchao's NVFP4 has no convolution); this model's NVFP4 "
                         f"policy also quantizes {type(modules[not_linear[0]]).__name__} layers, e.g. {not_linear[0]}")
    for name in names:
        old = modules[name]
        if old.in_features % NVFP4_BLOCK:
            raise ValueError(f"{MODE}: {name} has in_features={old.in_features}, not a multiple of {NVFP4_BLOCK}")
        new = TorchaoNVFP4Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
    return tuple(names)
