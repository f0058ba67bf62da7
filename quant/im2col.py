"""Im2col into the token-major layout of a convolution's weight-gradient GEMM: [kh*kw*C, N*P].

Why a module: the ``full`` backward quantizes the wgrad operands along tokens (with RHT), so a quantized convolution
forms dW as a GEMM over unfolded tensors (``quant.functional._full_wgrad``). The reference path calls this function
directly; on the kernel path it runs as the custom op ``fp4lab::conv_unfold`` (``quant.kernels.ops``), because under
torch.compile Inductor otherwise lowers ``F.unfold`` + permute + copy into one gather kernel that took 25 ms of a 51 ms
compiled UNet step on an H200 (the eager ATen im2col and copy: 9.5 ms). One function serves both, so the two layouts
cannot drift apart.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def sliding_grid(size: tuple[int, int], kernel: tuple[int, int], stride: list[int], padding: list[int],
                 dilation: list[int]) -> tuple[int, int]:
    """(rows, cols) of the positions a kernel takes over an input of ``size`` (H, W): a convolution's output size."""
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1))


def transposed_grid(size: tuple[int, int], kernel: tuple[int, int], stride: list[int], padding: list[int],
                    dilation: list[int], output_padding: list[int]) -> tuple[int, int]:
    """(rows, cols) of a transposed convolution's output for an input of ``size``: the smallest input size whose
    ``sliding_grid`` is ``size``, plus ``output_padding`` (a stride above 1 maps several input sizes to one grid)."""
    return tuple((size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + output_padding[i] + 1
                 for i in (0, 1))


def unfold_tokens(t: Tensor, kernel: list[int], positions: list[int], stride: list[int], padding: list[int],
                  dilation: list[int]) -> Tensor:
    """Im2col of t [N, C, H, W] with the given taps: -> contiguous [kh*kw*C, N*P] (rows (kh, kw, C), tokens (n, p)).

    ``positions`` (ph, pw) is the token grid: the output size of the conv (Conv2d) or the input size of the transposed
    conv, whose dY is unfolded over the *input* pixels it came from."""
    n, c = t.shape[:2]
    kh, kw = kernel
    cols = F.unfold(t, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
    grid_h, grid_w = sliding_grid((t.shape[2], t.shape[3]), (kh, kw), stride, padding, dilation)
    cols = cols.view(n, c, kh, kw, grid_h, grid_w)[..., : positions[0], : positions[1]]
    return cols.permute(2, 3, 1, 0, 4, 5).reshape(kh * kw * c, n * positions[0] * positions[1]).contiguous()
