"""Triton im2col into the token-major layout of the ``full`` backward's convolution wgrad: [kh*kw*C, N*PH*PW].

Why a kernel: ``quant.im2col.unfold_tokens`` (the specification, and the CPU path) is ``F.unfold`` and a permuting
copy. On CUDA that is an NCHW copy of a channels-last input, one ATen im2col launch per sample (608 launches per
ResNet-50 step at batch 32) into ``[N, C*kh*kw, L]``, and a strided copy of the 9x larger result into
``[(kh, kw, C), (N, P)]``: on an H200 about 6 ms of a 31 ms UNet ``full`` step and 4 ms of ResNet-50's (2026-11-26
profiles). This kernel reads each tap's tile straight from the input, any strides, and writes the final layout once.

It is a copy: the output equals ``unfold_tokens`` bit for bit (zeros where a tap falls into the padding), which
``test_interp_unfold_kernel_equals_unfold_tokens`` and its GPU twin check for NCHW and channels-last inputs, strides,
padding, dilation and a token grid smaller than the sliding grid (a ConvTranspose2d's dY).

Tile orientation: a channels-last input (channel stride 1) is loaded as [tokens, channels] so that a warp's loads run
along memory, then transposed in registers; any other layout is loaded as [channels, tokens]. The store is always
along tokens, the output's contiguous dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_C, _BLOCK_T = 32, 128  # channels x tokens per program


@triton.jit
def _unfold_kernel(x_ptr, out_ptr, C, H, W, stride_n, stride_c, stride_h, stride_w, PH, PW, T,
                   KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                   DH: tl.constexpr, DW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                   BC: tl.constexpr, BT: tl.constexpr):
    pid_t = tl.program_id(0)
    tap = tl.program_id(1)  # i * KW + j
    pid_c = tl.program_id(2)
    i, j = tap // KW, tap % KW
    tokens = pid_t * BT + tl.arange(0, BT)  # (n, ph, pw) flattened
    pw = tokens % PW
    ph = (tokens // PW) % PH
    n = tokens // (PW * PH)
    ih = ph * SH - PAD_H + i * DH
    iw = pw * SW - PAD_W + j * DW
    token_ok = (tokens < T) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    token_offset = n.to(tl.int64) * stride_n + ih.to(tl.int64) * stride_h + iw.to(tl.int64) * stride_w
    channels = pid_c * BC + tl.arange(0, BC)
    channel_ok = channels < C
    channel_offset = channels.to(tl.int64) * stride_c
    if CHANNELS_LAST:  # [BT, BC]: consecutive channels are consecutive in memory
        tile = tl.load(x_ptr + token_offset[:, None] + channel_offset[None, :],
                       mask=token_ok[:, None] & channel_ok[None, :], other=0.0)
        tile = tl.trans(tile)
    else:  # [BC, BT]
        tile = tl.load(x_ptr + channel_offset[:, None] + token_offset[None, :],
                       mask=channel_ok[:, None] & token_ok[None, :], other=0.0)
    rows = tap * C + channels  # output rows (i, j, c)
    out = out_ptr + rows.to(tl.int64)[:, None] * T + tokens[None, :]
    tl.store(out, tile, mask=channel_ok[:, None] & (tokens < T)[None, :])


def unfold_tokens(t: Tensor, kernel: list[int], positions: list[int], stride: list[int], padding: list[int],
                  dilation: list[int]) -> Tensor:
    """``quant.im2col.unfold_tokens`` on the GPU: t [N, C, H, W] (any strides) -> contiguous [kh*kw*C, N*PH*PW]."""
    n, c, h, w = t.shape
    kh, kw = kernel
    ph, pw = positions
    tokens = n * ph * pw
    out = torch.empty((kh * kw * c, tokens), dtype=t.dtype, device=t.device)
    if out.numel() == 0:
        return out
    channels_last = t.stride(1) == 1 and c > 1
    grid = (triton.cdiv(tokens, _BLOCK_T), kh * kw, triton.cdiv(c, _BLOCK_C))
    _unfold_kernel[grid](t, out, c, h, w, *t.stride(), ph, pw, tokens, KW=kw, SH=stride[0], SW=stride[1],
                         PAD_H=padding[0], PAD_W=padding[1], DH=dilation[0], DW=dilation[1],
                         CHANNELS_LAST=channels_last, BC=_BLOCK_C, BT=_BLOCK_T, num_warps=4)
    return out
