"""Autograd functions of the QAT layers: the three GEMMs of linear, conv2d and conv_transpose2d, quantized per recipe.

Why custom autograd functions and not fake-quant + STE around ``F.linear``: TE's recipe quantizes each of the three
GEMMs' operands *differently* (dY with stochastic rounding, RHT on the wgrad operands along tokens, W^T requantized
along N without 2D tiles), which no straight-through composition reproduces. Each backward mode (``Recipe.backward``)
decides what the two backward GEMMs multiply:

* ``full``: every operand is quantized for its own GEMM (slots of ``quant.layer_formats``); with NVFP4 on both
  sides the GEMM runs on scaled codes times TE's alpha (``quant.gemm``).
* ``dequantized``: dgrad ``dX = dY W_hat`` and wgrad ``dW = dY^T X_hat`` with the forward's dequantized operands
  and an unquantized dY, in the compute dtype (TE ``backward_override="dequantized"``).
* ``high_precision``: the original X and W in the compute dtype (TE ``backward_override="high_precision"``).

Compute dtype and autocast: the layers run where autocast is enabled for the input's device (CPU or CUDA) in the
autocast dtype, else in the input's dtype. Inputs are cast to it, autocast is switched off inside forward and
backward (the emulation's float32 contractions must not be downcast), and every GEMM output (Y, dX, dW) is rounded
once to the compute dtype, as TE's GEMMs emit the activation dtype; autograd then casts dX/dW to the input and
parameter dtypes (FP32 master weights stay FP32). Weights are quantized from their own dtype (the FP32 master weight,
as TE's weight quantizer reads the parameter), activations and gradients from the compute dtype. NVFP4 refuses FP16
compute (TE's FP4 GEMM has no FP16 output, its RHT takes only BF16) and refuses FP32 compute when the wgrad RHT is on.

Convolutions (no TE counterpart; SPEC 8.5): implicit GEMM with the reduction dim K ordered (kh, kw, Cin).
``Conv2d`` (weight [Cout, Cin, kh, kw]; tokens = output pixels n, oh, ow):

* fprop ``Y = X * W``: X is quantized per input pixel in 1x16 blocks along Cin (NHWC rows ``[N*H*W, Cin]``); W as
  ``[Cout, kh*kw*Cin]`` (1x16 along Cin within each tap, or 16x16 tiles over (Cout, Cin) of one tap). With
  Cin % 16 == 0 every block of the im2col matrix is one pixel's 16-channel group (or zero padding), so quantizing X
  per pixel *is* quantizing the implicit-GEMM operand, with the same global amax.
* dgrad ``dX = dY *^T W``: reduction over (kh, kw, Cout). dY is quantized per output pixel along Cout (needs
  Cout % 16 == 0 for the same reason); W as ``[Cin, kh*kw*Cout]`` along Cout (with 16x16 tiles: the fprop tiles
  transposed, so the same codes).
* wgrad ``dW = dY^T X_col``: reduction over tokens. dY^T is ``[Cout, tokens]``; the input operand is the im2col matrix
  ``[kh*kw*Cin, tokens]`` (F.unfold), blocked (and RHT'ed) along tokens. Each input pixel appears in up to kh*kw taps
  and is quantized separately in each, as an implicit-GEMM kernel would see it; this costs kh*kw times the input's
  memory in the emulation.

``ConvTranspose2d`` (weight [Cin, Cout, kh, kw]) is the same with the roles of the GEMMs exchanged: fprop reduces over
(kh, kw, Cin) (X per pixel along Cin), dgrad is a plain convolution of dY reducing over (kh, kw, Cout) (dY per pixel
along Cout), and wgrad's tokens are the *input* pixels: X^T ``[Cin, tokens]`` and the unfolded dY
``[kh*kw*Cout, tokens]``. Supported: groups == 1 and the channel counts above (``layer_formats.unsupported_reason``);
any stride, padding, dilation, output_padding. Tokens are ordered (n, h, w) and zero-padded to a multiple of 16 for
the RHT (zero tokens add nothing to dW and the RHT cancels between the two equally padded operands).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from quant import distributed, gemm, layer_formats
from quant.errors import QuantError
from quant.gemm import Operand
from quant.layer_formats import LayerFormat, SlotRequest
from quant.recipe import Recipe

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_RHT_TOKEN_MULTIPLE = 16
_SLOT_WORDS = {
    "fprop_input": "input",
    "fprop_weight": "weight",
    "dgrad_grad": "output gradient (dgrad)",
    "dgrad_weight": "weight (dgrad)",
    "wgrad_grad": "output gradient (wgrad)",
    "wgrad_input": "input (wgrad)",
}


class LayerQuantizer:
    """The quantization state of one layer: format, recipe, quantized roles, its stochastic-rounding stream and how
    its activation and gradient amax are shared across data-parallel ranks (``quant.distributed``).

    The SR generator is created lazily on the device of the first tensor it serves, seeded with
    ``distributed.rank_seed(seed, rank)`` (``seed`` on rank 0 and without a process group); its state can be read and
    restored (``sr_state`` / ``load_sr_state``) so a resumed run continues the same stream. Checkpoints hold rank 0's
    state: a state loaded on a rank r > 0 is taken as rank 0's, and rank r continues on a stream seeded from that
    state and r, so ranks still draw different bits after a resume.
    """

    def __init__(self, name: str, fmt: LayerFormat, recipe: Recipe, roles: frozenset[str], seed: int,
                 amax_reduction: str = "none") -> None:
        self.name = name
        self.format = fmt
        self.recipe = recipe
        self.roles = frozenset(roles)
        self.seed = int(seed)
        self.amax_reduction = distributed.AmaxReduction(amax_reduction)
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    @property
    def backward(self) -> str:
        return self.recipe.backward

    @property
    def wgrad_rht(self) -> bool:
        """RHT on both wgrad operands: only when the recipe asks and both of them are quantized (else it cancels)."""
        return (
            self.format.rht_applies(self.recipe)
            and self.backward == "full"
            and {"grad", "input"} <= self.roles
        )

    def describe_roles(self) -> dict[str, str]:
        """Role -> what happens to it, e.g. {"weight": "nvfp4 16x16 RN", "input": "-", ...} (for reports)."""
        out = {}
        for role in layer_formats.ROLES:
            used = role in self.roles and (role != "grad" or self.backward == "full")
            out[role] = self.format.describe(role, self.recipe, self.wgrad_rht) if used else "-"
        return out

    def __repr__(self) -> str:
        roles = ", ".join(f"{k}={v}" for k, v in self.describe_roles().items())
        reduction = self.amax_reduction.describe()
        shared = "" if reduction == "none" else f", amax_reduction={reduction}"
        return f"LayerQuantizer({self.name!r}, backward={self.backward}, {roles}{shared})"

    # -- stochastic rounding stream -------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(distributed.rank_seed(self.seed, distributed.process_rank()))
            if self._pending_state is not None:
                self._restore(self._generator, self._pending_state)
                self._pending_state = None
        return self._generator

    @staticmethod
    def _restore(generator: torch.Generator, state: Tensor) -> None:
        rank = distributed.process_rank()
        if rank == 0:
            generator.set_state(state)
        else:  # a checkpoint's state is rank 0's: continue on a stream of this rank's own
            generator.manual_seed(distributed.rank_seed(distributed.state_seed(state), rank))

    def sr_state(self) -> Tensor:
        """The SR generator's state (a CPU uint8 tensor); the seeded initial state if it has not been used yet."""
        if self._generator is not None:
            return self._generator.get_state()
        if self._pending_state is not None:
            return self._pending_state.clone()
        fresh = torch.Generator()
        fresh.manual_seed(distributed.rank_seed(self.seed, distributed.process_rank()))
        return fresh.get_state()

    def load_sr_state(self, state: Tensor) -> None:
        """Restore a state from ``sr_state``; applied now, or on first use if the generator does not exist yet."""
        if self._generator is not None:
            self._restore(self._generator, state)
        else:
            self._pending_state = state.clone()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # A Generator does not survive pickling on every device; an unused one is re-seeded (per rank) after loading.
        state["_pending_state"] = None if self._generator is None and self._pending_state is None else self.sr_state()
        state["_generator"] = None
        return state

    # -- operands -------------------------------------------------------------------------------------------------
    def compute_dtype(self, x: Tensor, weight: Tensor) -> torch.dtype:
        """The dtype the GEMMs compute and output in; rejects what the format cannot do, naming the layer."""
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        if dtype not in COMPUTE_DTYPES:
            raise QuantError(
                f"{self.name}: compute dtype {dtype} is not supported by quantized layers; valid: float32, bfloat16, "
                "float16 (not with nvfp4)"
            )
        if self.format.name == "nvfp4" and dtype == torch.float16:
            raise QuantError(
                f"{self.name}: NVFP4 cannot compute in float16 (TE's FP4 GEMM has no FP16 output and its RHT takes "
                "only BF16 input); run the NVFP4 arm with bfloat16 autocast (precision=bf16-mixed)"
            )
        if self.wgrad_rht and dtype != torch.bfloat16 and weight.requires_grad and torch.is_grad_enabled():
            raise QuantError(
                f"{self.name}: the NVFP4 wgrad RHT needs bfloat16 operands (TE: RHT is only supported for bfloat16 "
                f"input) but this layer computes in {dtype}; run under bfloat16 autocast (precision=bf16-mixed) or "
                "set disable_rht=True"
            )
        return dtype

    def operand(self, slot: str, x: Tensor, compute_dtype: torch.dtype, rht: bool = False) -> Operand:
        """Quantize the 2-D operand ``x`` of ``slot`` if its role is quantized, else return it in the compute dtype."""
        if layer_formats.SLOT_ROLE[slot] not in self.roles:
            return x.to(compute_dtype)
        role = layer_formats.SLOT_ROLE[slot]
        generator = self.generator(x.device) if role == "grad" else None
        amax_reduce = None if role == "weight" else self.amax_reduction.reducer()  # weights agree across ranks
        request = SlotRequest(slot=slot, name=f"{self.name} {_SLOT_WORDS[slot]}", rht=rht, generator=generator,
                              amax_reduce=amax_reduce)
        return self.format.quantize(x, request, self.recipe, compute_dtype)

    def dgrad_weight(self, fprop_matrix: Tensor, to_dgrad: Callable[[Tensor], Tensor], dtype: torch.dtype) -> Operand:
        """The dgrad GEMM's weight operand. ``fprop_matrix``: W as the forward GEMM's operand ([N, K] or
        [Co, kh*kw*Ci]); ``to_dgrad`` maps that layout to the dgrad one ([K, N] or [Ci, kh*kw*Co]).

        Weight-only storage formats reuse the forward's quantized W; the others quantize W^T along the dgrad
        reduction dim (for NVFP4 16x16 tiles that gives the forward codes transposed, SPEC 1.4).
        """
        if self.format.dgrad_weight_from_fprop and "weight" in self.roles:
            return to_dgrad(gemm.dense(self.operand("fprop_weight", fprop_matrix, dtype), dtype))
        return self.operand("dgrad_weight", to_dgrad(fprop_matrix), dtype)


def _autocast_off(x: Tensor):
    device_type = x.device.type
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _pad_tokens(x: Tensor) -> Tensor:
    """Zero-pad the last (token) dim of a [rows, tokens] operand to a multiple of 16 for the RHT."""
    extra = (-x.shape[-1]) % _RHT_TOKEN_MULTIPLE
    return F.pad(x, (0, extra)) if extra else x


def _wgrad_pair(q: LayerQuantizer, grad_t: Tensor, input_t: Tensor, dtype: torch.dtype) -> tuple[Operand, Operand]:
    """Quantized wgrad operands dY^T [rows_a, T] and X^T [rows_b, T], blocked (and RHT'ed) along tokens T."""
    rht = q.wgrad_rht
    if rht:
        grad_t, input_t = _pad_tokens(grad_t), _pad_tokens(input_t)
    return (q.operand("wgrad_grad", grad_t, dtype, rht=rht), q.operand("wgrad_input", input_t, dtype, rht=rht))


# ---------------------------------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------------------------------
class _QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer, dtype: torch.dtype,
                track: bool) -> Tensor:
        with _autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # [M, K]
            xq = q.operand("fprop_input", x2, dtype)
            wq = q.operand("fprop_weight", weight, dtype)  # [N, K]
            y = gemm.mm(xq, wq, dtype, None if bias is None else bias.to(dtype))  # [M, N]
            if not track:
                saved_x = saved_w = None
            elif q.backward == "full":
                saved_x, saved_w = x2, weight
            elif q.backward == "dequantized":
                saved_x, saved_w = gemm.dense(xq, dtype), gemm.dense(wq, dtype)
            else:
                saved_x, saved_w = x2, weight.to(dtype)
        ctx.save_for_backward(saved_x, saved_w)
        ctx.q, ctx.dtype, ctx.x_shape, ctx.has_bias = q, dtype, x.shape, bias is not None
        return y  # [M, N]; reshaped outside: a view created inside a Function could not be modified in place

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        saved_x, saved_w = ctx.saved_tensors  # [M, K], [N, K]
        q, dtype = ctx.q, ctx.dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _autocast_off(grad_out):
            dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # [M, N]
            full = q.backward == "full"
            if need_x:
                a = q.operand("dgrad_grad", dy, dtype) if full else dy
                b = q.dgrad_weight(saved_w, torch.t, dtype) if full else saved_w.t()  # [K, N]
                grad_x = gemm.mm(a, b, dtype).reshape(ctx.x_shape)
            if need_w:
                if full:
                    a, b = _wgrad_pair(q, dy.t(), saved_x.t(), dtype)  # [N, M], [K, M]
                else:
                    a, b = dy.t(), saved_x.t()
                grad_w = gemm.mm(a, b, dtype)  # [N, K]
            if need_b and ctx.has_bias:
                grad_b = dy.to(torch.float32).sum(0).to(dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _tracks(*tensors: Tensor | None) -> bool:
    """Will autograd record this call? (Then the operands the backward mode needs are saved.)"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def quant_linear(x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer) -> Tensor:
    """``F.linear(x, weight, bias)`` with the three GEMMs quantized by ``q``: x [..., K], weight [N, K] -> [..., N]."""
    y = _QuantLinearFunction.apply(x, weight, bias, q, q.compute_dtype(x, weight), _tracks(x, weight, bias))  # [M, N]
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    """What ``aten.convolution`` needs besides the tensors (groups is always 1 for quantized convolutions)."""

    transposed: bool
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    output_padding: tuple[int, int] = (0, 0)

    def convolution(self, x: Tensor, weight: Tensor) -> Tensor:
        return torch.ops.aten.convolution(
            x, weight, None, self.stride, self.padding, self.dilation, self.transposed, self.output_padding, 1
        )

    def input_grad(self, dy: Tensor, weight: Tensor, x_shape: torch.Size) -> Tensor:
        placeholder = dy.new_zeros(()).expand(x_shape)
        return torch.ops.aten.convolution_backward(
            dy, placeholder, weight, None, self.stride, self.padding, self.dilation, self.transposed,
            self.output_padding, 1, [True, False, False],
        )[0]

    def weight_grad(self, dy: Tensor, x: Tensor, w_shape: torch.Size) -> Tensor:
        placeholder = dy.new_zeros(()).expand(w_shape)
        return torch.ops.aten.convolution_backward(
            dy, x, placeholder, None, self.stride, self.padding, self.dilation, self.transposed,
            self.output_padding, 1, [False, True, False],
        )[1]

    def unfold(self, t: Tensor, kernel: tuple[int, int], positions: tuple[int, int]) -> Tensor:
        """Im2col of t [N, C, H, W] with this geometry's taps: -> [kh*kw*C, N*P] (rows (kh, kw, C), tokens (n, p)).

        ``positions`` (ph, pw) is the token grid: the output size of the conv (Conv2d) or the input size of the
        transposed conv, whose dY is unfolded over the *input* pixels it came from.
        """
        n, c = t.shape[:2]
        kh, kw = kernel
        cols = F.unfold(t, kernel, dilation=self.dilation, padding=self.padding, stride=self.stride)  # [N, C*kh*kw, L]
        grid_h = (t.shape[2] + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        grid_w = (t.shape[3] + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = cols.view(n, c, kh, kw, grid_h, grid_w)[..., : positions[0], : positions[1]]
        return cols.permute(2, 3, 1, 0, 4, 5).reshape(kh * kw * c, n * positions[0] * positions[1])


def _pixels(t: Tensor) -> Tensor:
    """[N, C, H, W] -> [N*H*W, C]: one row per pixel, channels last (the per-pixel quantization layout)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _unpixels(m: Tensor, like_shape: torch.Size) -> Tensor:
    n, c, h, w = like_shape
    return m.reshape(n, h, w, c).permute(0, 3, 1, 2)


def conv_weight_matrix(w_oi: Tensor) -> Tensor:
    """[Co, Ci, kh, kw] -> [Co, kh*kw*Ci]: rows = GEMM output channels, K ordered (kh, kw, Ci)."""
    return w_oi.permute(0, 2, 3, 1).reshape(w_oi.shape[0], -1)


def conv_weight_from_matrix(m: Tensor, oi_shape: torch.Size) -> Tensor:
    co, ci, kh, kw = oi_shape
    return m.reshape(co, kh, kw, ci).permute(0, 3, 1, 2)


def _dgrad_matrix(w_oi: Tensor) -> Tensor:
    """[Co, Ci, kh, kw] -> [Ci, kh*kw*Co]: the dgrad GEMM's weight operand, K ordered (kh, kw, Co)."""
    return w_oi.permute(1, 2, 3, 0).reshape(w_oi.shape[1], -1)


def _from_dgrad_matrix(m: Tensor, oi_shape: torch.Size) -> Tensor:
    co, ci, kh, kw = oi_shape
    return m.reshape(ci, kh, kw, co).permute(3, 0, 1, 2)


class _QuantConvFunction(torch.autograd.Function):
    """Conv2d / ConvTranspose2d. Internally the weight is held as w_oi [Co, Ci, kh, kw] (Co = GEMM output channels,
    Ci = reduction channels of fprop): the module weight itself for Conv2d, its transpose(0, 1) for ConvTranspose2d.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer, dtype: torch.dtype,
                geo: ConvGeometry, track: bool) -> Tensor:
        with _autocast_off(x):
            x_c = x.to(dtype)  # [N, Ci, H, W]
            w_oi = weight.transpose(0, 1) if geo.transposed else weight  # [Co, Ci, kh, kw]
            xq = q.operand("fprop_input", _pixels(x_c), dtype)  # [N*H*W, Ci]
            wq = q.operand("fprop_weight", conv_weight_matrix(w_oi), dtype)  # [Co, kh*kw*Ci]
            x32, w32, alpha = gemm.prepare(xq, wq, dtype)
            w_mod = _module_weight(conv_weight_from_matrix(w32, w_oi.shape), geo)
            acc = geo.convolution(_unpixels(x32, x_c.shape), w_mod)
            bias4 = None if bias is None else bias.to(dtype).view(1, -1, 1, 1)
            y = gemm.finish(acc, alpha, dtype, bias4)  # [N, Co, OH, OW]
            if not track:
                saved_x = saved_w = None
            elif q.backward == "full":
                saved_x, saved_w = x_c, weight
            elif q.backward == "dequantized":
                saved_x = _unpixels(gemm.dense(xq, dtype), x_c.shape)
                saved_w = _module_weight(conv_weight_from_matrix(gemm.dense(wq, dtype), w_oi.shape), geo)
            else:
                saved_x, saved_w = x_c, weight.to(dtype)
        ctx.save_for_backward(saved_x, saved_w)
        ctx.q, ctx.dtype, ctx.geo, ctx.has_bias = q, dtype, geo, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        saved_x, saved_w = ctx.saved_tensors  # x [N, Ci, H, W]; module-layout weight
        q, dtype, geo = ctx.q, ctx.dtype, ctx.geo
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _autocast_off(grad_out):
            dy = grad_out.to(dtype)  # [N, Co, OH, OW]
            if q.backward != "full":
                dy32 = dy.to(torch.float32)
                if need_x:
                    grad_x = geo.input_grad(dy32, saved_w.to(torch.float32), saved_x.shape).to(dtype)
                if need_w:
                    grad_w = geo.weight_grad(dy32, saved_x.to(torch.float32), saved_w.shape).to(dtype)
            else:
                if need_x:
                    grad_x = _full_dgrad(q, dy, saved_w, saved_x.shape, dtype, geo)
                if need_w:
                    grad_w = _full_wgrad(q, dy, saved_x, saved_w.shape, dtype, geo)
            if need_b and ctx.has_bias:
                grad_b = dy.to(torch.float32).sum((0, 2, 3)).to(dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _module_weight(w_oi: Tensor, geo: ConvGeometry) -> Tensor:
    return w_oi.transpose(0, 1) if geo.transposed else w_oi


def _full_dgrad(q: LayerQuantizer, dy: Tensor, weight: Tensor, x_shape: torch.Size, dtype: torch.dtype,
                geo: ConvGeometry) -> Tensor:
    """dX with dY quantized per output pixel along Co and W^T along Co per tap ([Ci, kh*kw*Co])."""
    w_oi = weight.transpose(0, 1) if geo.transposed else weight  # [Co, Ci, kh, kw]
    dyq = q.operand("dgrad_grad", _pixels(dy), dtype)  # [N*OH*OW, Co]
    to_dgrad = lambda m: _dgrad_matrix(conv_weight_from_matrix(m, w_oi.shape))  # noqa: E731
    wq = q.dgrad_weight(conv_weight_matrix(w_oi), to_dgrad, dtype)  # [Ci, kh*kw*Co]
    dy32, w32, alpha = gemm.prepare(dyq, wq, dtype)
    w_mod = _module_weight(_from_dgrad_matrix(w32, w_oi.shape), geo)
    return gemm.finish(geo.input_grad(_unpixels(dy32, dy.shape), w_mod, x_shape), alpha, dtype)


def _full_wgrad(q: LayerQuantizer, dy: Tensor, x: Tensor, w_shape: torch.Size, dtype: torch.dtype,
                geo: ConvGeometry) -> Tensor:
    """dW as a GEMM over tokens: Conv2d tokens = output pixels, ConvTranspose2d tokens = input pixels."""
    kernel = (w_shape[2], w_shape[3])
    if not geo.transposed:
        grad_t = _pixels(dy).t()  # [Co, T]
        input_t = geo.unfold(x, kernel, (dy.shape[2], dy.shape[3]))  # [kh*kw*Ci, T]
        a, b = _wgrad_pair(q, grad_t, input_t, dtype)
        a32, b32, alpha = gemm.prepare(a, b, dtype)
        dw = conv_weight_from_matrix(a32 @ b32.t(), (w_shape[0], w_shape[1], *kernel))  # [Co, Ci, kh, kw]
        return gemm.finish(dw, alpha, dtype)
    grad_t = geo.unfold(dy, kernel, (x.shape[2], x.shape[3]))  # [kh*kw*Co, T], T = input pixels
    input_t = _pixels(x).t()  # [Ci, T]
    a, b = _wgrad_pair(q, grad_t, input_t, dtype)
    a32, b32, alpha = gemm.prepare(a, b, dtype)
    ci, co = w_shape[0], w_shape[1]
    dw_oi = _from_dgrad_matrix(b32 @ a32.t(), (co, ci, *kernel))  # [Ci, kh*kw*Co] -> [Co, Ci, kh, kw]
    return gemm.finish(dw_oi.transpose(0, 1), alpha, dtype)  # module layout [Ci, Co, kh, kw]


def quant_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``F.conv2d`` (zero padding, groups 1) with quantized GEMMs: x [N, Ci, H, W], weight [Co, Ci, kh, kw]."""
    geo = ConvGeometry(False, tuple(stride), tuple(padding), tuple(dilation))
    return _QuantConvFunction.apply(x, weight, bias, q, q.compute_dtype(x, weight), geo, _tracks(x, weight, bias))


def quant_conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None, q: LayerQuantizer,
                           stride: tuple[int, int], padding: tuple[int, int], output_padding: tuple[int, int],
                           dilation: tuple[int, int]) -> Tensor:
    """``F.conv_transpose2d`` (groups 1) with quantized GEMMs: x [N, Ci, H, W], weight [Ci, Co, kh, kw]."""
    geo = ConvGeometry(True, tuple(stride), tuple(padding), tuple(dilation), tuple(output_padding))
    return _QuantConvFunction.apply(x, weight, bias, q, q.compute_dtype(x, weight), geo, _tracks(x, weight, bias))
