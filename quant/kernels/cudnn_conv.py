"""Convolutions of two NVFP4 operands with TE's alpha applied to the FP32 accumulator, on cuDNN's graph API.

Why: a convolution's NVFP4 GEMM is ``out = bf16(fp32(fp32(acc * alpha) + bias))`` with ``acc`` the FP32 sum of the
scaled codes' exact products (``quant.gemm``). PyTorch's convolutions write their input dtype, so a BF16 convolution
would round ``acc`` before alpha; the fallback therefore contracts FP32 copies in TF32 into an FP32 accumulator and
applies the epilogue in a second pass (``quant.kernels.epilogue``): on an H200 that costs 2.3x to 3.6x the BF16
convolution of the same shape (ResNet-50 and UNet 3x3 layers, measured 2026-11-26). cuDNN's graph API runs the
convolution on the BF16 scaled codes with FP32 accumulation and applies ``* alpha`` (and ``+ bias``) to the FP32
result inside the same kernel before the one rounding to BF16: 0.8x to 1.2x the BF16 convolution's time on those
shapes (1.7x on UNet's 32-channel 256 px layer), and on data whose FP32 sums are exact, the same bits as the
fallback (``test_gpu_scaled_convolution_equals_the_fp32_path``).

Two directions, one graph each: ``conv_fprop`` (a Conv2d forward, a ConvTranspose2d's input gradient) and
``conv_dgrad``, the transposed convolution (a ConvTranspose2d forward, a Conv2d's input gradient of the ``full``
backward, where dY's and W^T's NVFP4 scaled codes meet).

Optional: needs the ``nvidia-cudnn-frontend`` package (its Python graph API over the cuDNN that PyTorch ships; README,
GPU section). Without it ``available()`` is False and the layers take the TF32 path. One graph is built per
convolution geometry (shapes, strides, padding, bias or not) on first use, then cached: build outside a CUDA-graph
capture (the bench's first step and warm-up do). The graph runs on the caller's current stream and takes its
workspace from PyTorch's allocator, so CUDA-graph capture works.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from quant import im2col

try:  # the package's import fails without its compiled module or a loadable cuDNN
    import cudnn
except Exception as error:  # noqa: BLE001 - any import failure means: not available
    cudnn = None
    _import_error: str | None = f"{type(error).__name__}: {error}"
else:
    _import_error = None


def available() -> bool:
    """Can forward convolutions of NVFP4 operands run on cuDNN's graph API here?"""
    return cudnn is not None


def unavailable_reason() -> str | None:
    return _import_error


@dataclass(frozen=True)
class _Geometry:
    transposed: bool  # conv_dgrad (the transposed convolution of x by w) instead of conv_fprop
    x_shape: tuple[int, ...]
    x_stride: tuple[int, ...]
    w_shape: tuple[int, ...]
    w_stride: tuple[int, ...]
    out_shape: tuple[int, int, int, int]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    has_bias: bool
    device: int


@dataclass(frozen=True)
class _Plan:
    graph: object
    tensors: tuple  # graph tensors (X, W, alpha, bias or None, Y)
    out_shape: tuple[int, int, int, int]
    workspace_bytes: int


_plans: dict[_Geometry, _Plan | None] = {}  # None: cuDNN has no engine for this geometry
# The transposed direction reducing fewer channels than this takes the FP32 path: on an H200 (cuDNN 9.19) the fused
# engine for dY [16, 16, 256, 256] took 0.50 ms, the TF32 convolution + epilogue 0.27 ms, BF16 0.13 ms; from 32
# reduced channels on it was 0.97x to 1.22x the BF16 input gradient (UNet and ResNet-50 3x3 shapes, 2026-11-26).
_MIN_TRANSPOSED_CHANNELS = 32
_handles: dict[int, object] = {}


def output_shape(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: list[int], padding: list[int],
                 dilation: list[int], transposed: bool = False, output_padding: list[int] = (0, 0)
                 ) -> tuple[int, int, int, int]:
    """[N, Co, OH, OW] of the convolution of x [N, Ci, H, W] by w [Co, Ci, kh, kw], or (``transposed``) of the
    transposed convolution of x by w [Ci, Co, kh, kw]."""
    if transposed:
        grid = im2col.transposed_grid(x_shape[2:], w_shape[2:], stride, padding, dilation, output_padding)
        return (x_shape[0], w_shape[1], *grid)
    return (x_shape[0], w_shape[0], *im2col.sliding_grid(x_shape[2:], w_shape[2:], stride, padding, dilation))


def _build(key: _Geometry) -> _Plan:
    if key.device not in _handles:
        _handles[key.device] = cudnn.create_handle()
    bf16, fp32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=fp32, compute_data_type=fp32,
                          handle=_handles[key.device])
    x = graph.tensor(name="x", dim=list(key.x_shape), stride=list(key.x_stride), data_type=bf16)
    w = graph.tensor(name="w", dim=list(key.w_shape), stride=list(key.w_stride), data_type=bf16)
    alpha = graph.tensor(name="alpha", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
    window = {"padding": list(key.padding), "stride": list(key.stride), "dilation": list(key.dilation)}
    if key.transposed:
        acc = graph.conv_dgrad(loss=x, filter=w, compute_data_type=fp32, **window)
        acc.set_dim(list(key.out_shape))  # output_padding: the one size a transposed convolution cannot infer
    else:
        acc = graph.conv_fprop(image=x, weight=w, compute_data_type=fp32, **window)
    acc.set_data_type(fp32)
    out = graph.mul(a=acc, b=alpha, compute_data_type=fp32)  # fp32(acc * alpha)
    bias = None
    n, co, oh, ow = key.out_shape
    if key.has_bias:
        bias = graph.tensor(name="bias", dim=[1, co, 1, 1], stride=[co, 1, 1, 1], data_type=bf16)
        out.set_data_type(fp32)
        out = graph.add(a=out, b=bias, compute_data_type=fp32)  # fp32(... + bias), a second rounding
    out.set_output(True).set_data_type(bf16).set_stride([co * oh * ow, 1, ow * co, co])  # channels-last
    graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    return _Plan(graph, (x, w, alpha, bias, out), key.out_shape, max(int(graph.get_workspace_size()), 1))


def scaled_convolution(x: Tensor, w: Tensor, alpha: Tensor, bias: Tensor | None, stride: list[int],
                       padding: list[int], dilation: list[int], transposed: bool = False,
                       output_padding: list[int] = (0, 0)) -> Tensor | None:
    """``bf16(fp32(fp32(conv(x, w) * alpha) + bias))`` with the convolution accumulated in FP32: x [N, Ci, H, W] and
    w [Co, Ci, kh, kw] BF16 (any strides; the layers pass channels-last), alpha float32 [1] on the device, bias BF16
    [Co] or None; the output is BF16 [N, Co, OH, OW] in channels-last order. ``transposed``: the transposed
    convolution (``F.conv_transpose2d``'s arithmetic) of x by w [Ci, Co, kh, kw] instead. None when cuDNN has no
    engine for this geometry (warned once per geometry) or for a transposed convolution reducing fewer than
    ``_MIN_TRANSPOSED_CHANNELS`` channels (slower fused); the caller then takes the FP32 path."""
    if transposed and x.shape[1] < _MIN_TRANSPOSED_CHANNELS:
        return None
    w = w.contiguous(memory_format=torch.channels_last)  # KRSC: engines decline some other filter layouts (dgrad)
    out_shape = output_shape(tuple(x.shape), tuple(w.shape), stride, padding, dilation, transposed, output_padding)
    key = _Geometry(transposed, tuple(x.shape), tuple(x.stride()), tuple(w.shape), tuple(w.stride()), out_shape,
                    tuple(stride), tuple(padding), tuple(dilation), bias is not None, x.device.index or 0)
    if key not in _plans:
        try:
            _plans[key] = _build(key)
        except (cudnn.cudnnGraphNotSupportedError, RuntimeError) as error:
            warnings.warn(f"cuDNN's graph API cannot run the NVFP4 convolution {key}: {error}; it takes the FP32 "
                          "convolution and the epilogue pass instead", RuntimeWarning, stacklevel=2)
            _plans[key] = None
    plan = _plans[key]
    if plan is None:
        return None
    out = torch.empty(plan.out_shape, dtype=torch.bfloat16, device=x.device, memory_format=torch.channels_last)
    workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=x.device)
    x_t, w_t, alpha_t, bias_t, out_t = plan.tensors
    feeds = {x_t: x, w_t: w, alpha_t: alpha.reshape(1, 1, 1, 1), out_t: out}
    if bias_t is not None:
        feeds[bias_t] = bias.reshape(1, -1, 1, 1)
    handle = _handles[key.device]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(x.device).cuda_stream)
    plan.graph.execute(feeds, workspace, handle=handle)
    return out
