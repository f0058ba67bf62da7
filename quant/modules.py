"""QAT modules: ``nn.Linear``, ``nn.Conv2d`` and ``nn.ConvTranspose2d`` whose GEMMs are quantized.

Why subclasses that keep the parent's parameters: a checkpoint of a quantized model must load into the plain model
and vice versa (PTQ, resume, comparison runs), and optimizers built before ``quant.apply`` must keep working. So each
class adds no parameter or buffer: ``from_module`` adopts the original module's ``__dict__`` (the same ``Parameter``
objects, hooks and flags) and only attaches a ``LayerQuantizer`` (``self.quantizer``), which holds the format (or one
per role), recipe, roles and the stochastic-rounding generator. The SR generator's state is not in ``state_dict``
(keys stay those of the nn module); ``sr_states`` / ``load_sr_states`` save and restore it for exact resumes.

Analysis code reads a layer's quantization through ``quantized_weight`` (the forward GEMM's weight operand) and
``dequantized_weight`` (the values the forward multiplies, in the module's weight layout).
"""
from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quant import gemm
from quant.errors import QuantError
from quant.functional import (
    LayerQuantizer,
    conv_weight_from_matrix,
    conv_weight_matrix,
    quant_conv2d,
    quant_conv_transpose2d,
    quant_linear,
)
from quant.gemm import Operand
from quant.layer_formats import unsupported_reason

M = TypeVar("M", bound=nn.Module)


def shape_problem(module: nn.Module, quantizer: LayerQuantizer) -> str | None:
    """Why ``module`` cannot be quantized by ``quantizer`` (None if it can): block alignment of each role's format
    and groups."""
    formats = quantizer.quantized_formats()
    if isinstance(module, nn.Linear):
        return unsupported_reason(formats, quantizer.backward, module.in_features, module.out_features, 1)
    assert isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
    return unsupported_reason(
        formats, quantizer.backward, module.in_channels, module.out_channels, module.groups,
        in_name="in_channels", out_name="out_channels",
    )


class _QuantMixin:
    _base: type[nn.Module]  # the nn module this class quantizes
    quantizer: LayerQuantizer
    weight: Tensor

    def _attach(self, quantizer: LayerQuantizer) -> None:
        problem = shape_problem(self, quantizer)  # type: ignore[arg-type]
        if problem:
            raise QuantError(f"{quantizer.name}: cannot quantize this {self._base.__name__}: {problem}")
        self.quantizer = quantizer

    @classmethod
    def from_module(cls: type[M], module: nn.Module, quantizer: LayerQuantizer) -> M:
        """A quantized twin of ``module`` sharing its parameters, hooks and training flag (no copy)."""
        if type(module) is not cls._base:
            raise QuantError(
                f"{cls.__name__}.from_module needs an exact {cls._base.__name__}, got {type(module).__name__}"
            )
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._attach(quantizer)
        return new

    def weight_matrix(self) -> Tensor:
        """The weight as the forward GEMM's operand, reduction dim last: [N, K] for a linear, [Co, kh*kw*Ci] (K
        ordered (kh, kw, Ci)) for a convolution, Co = out_channels also for a transposed convolution."""
        raise NotImplementedError

    def from_weight_matrix(self, m: Tensor) -> Tensor:
        """Inverse of ``weight_matrix``: a tensor in the GEMM layout -> the module's weight layout."""
        raise NotImplementedError

    @torch.no_grad()
    def quantized_weight(self) -> Operand:
        """The forward GEMM's weight operand: an ``NVFP4Tensor`` for NVFP4 (codes, scales, amax over the GEMM
        layout), fake-quantized values for other formats, the weight itself if the weight role is not quantized."""
        return self.quantizer.operand("fprop_weight", self.weight_matrix(), self.weight.dtype)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight values the forward GEMM multiplies, in the module's weight layout and ``dtype``."""
        values = gemm.dense(self.quantized_weight(), dtype).to(dtype)
        return self.from_weight_matrix(values)

    def sr_state(self) -> Tensor:
        return self.quantizer.sr_state()

    def load_sr_state(self, state: Tensor) -> None:
        self.quantizer.load_sr_state(state)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with quantized fprop/dgrad/wgrad GEMMs (``quant.functional.quant_linear``)."""

    _base = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 quantizer: LayerQuantizer) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._attach(quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return quant_linear(x, self.weight, self.bias, self.quantizer)

    def weight_matrix(self) -> Tensor:
        return self.weight

    def from_weight_matrix(self, m: Tensor) -> Tensor:
        return m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quantizer!r}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` (groups 1) with quantized implicit-GEMM fprop/dgrad/wgrad (``quant.functional.quant_conv2d``).

    Non-zero padding modes and string paddings are applied with ``F.pad`` first (a padded pixel is a copy of a real
    one, so per-pixel quantization and the global amax are unchanged), then the quantized conv runs unpadded.
    """

    _base = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 quantizer: LayerQuantizer) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._attach(quantizer)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        padding = self.padding
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        y = quant_conv2d(x, self.weight, self.bias, self.quantizer, self.stride, padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    def weight_matrix(self) -> Tensor:
        return conv_weight_matrix(self.weight)

    def from_weight_matrix(self, m: Tensor) -> Tensor:
        return conv_weight_from_matrix(m, self.weight.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quantizer!r}"


class QuantConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (groups 1) with quantized GEMMs (``quant.functional.quant_conv_transpose2d``)."""

    _base = nn.ConvTranspose2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None, *, quantizer: LayerQuantizer) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._attach(quantizer)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        output_padding = self._output_padding(
            x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2, list(self.dilation)
        )
        y = quant_conv_transpose2d(x, self.weight, self.bias, self.quantizer, self.stride, self.padding,
                                   tuple(output_padding), self.dilation)
        return y.squeeze(0) if unbatched else y

    def weight_matrix(self) -> Tensor:
        return conv_weight_matrix(self.weight.transpose(0, 1))  # [Co, kh*kw*Ci], Co = out_channels

    def from_weight_matrix(self, m: Tensor) -> Tensor:
        return conv_weight_from_matrix(m, self.weight.transpose(0, 1).shape).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quantizer!r}"


QUANT_MODULES: dict[type[nn.Module], type[_QuantMixin]] = {
    cls._base: cls for cls in (QuantLinear, QuantConv2d, QuantConvTranspose2d)
}
QUANTIZED_TYPES = tuple(QUANT_MODULES.values())


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> quantized module, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def sr_states(model: nn.Module) -> dict[str, Tensor]:
    """Stochastic-rounding generator state of every quantized layer (name -> CPU uint8 tensor), for checkpoints."""
    return {name: m.sr_state() for name, m in quantized_modules(model).items()}


def load_sr_states(model: nn.Module, states: dict[str, Tensor]) -> None:
    """Restore ``sr_states`` output; the layer names must match exactly (same model, same policy)."""
    layers = quantized_modules(model)
    if set(states) != set(layers):
        missing, extra = sorted(set(layers) - set(states)), sorted(set(states) - set(layers))
        raise QuantError(
            f"SR states do not match the quantized layers: missing {missing}, unexpected {extra}; "
            "restore them into a model quantized with the same policy"
        )
    for name, state in states.items():
        layers[name].load_sr_state(state)
