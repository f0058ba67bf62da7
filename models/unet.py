"""UNet with GroupNorm, a semantic head and an optional query-based instance head.

Why this shape: it is the model of the original UNet FP4 study, made small enough for a CPU. Load-bearing details:

* GroupNorm (never BatchNorm): statistics do not depend on the batch, so tiny CPU batches and FP4 activations do
  not interact with running estimates; norms are never quantized.
* Every conv after the stem has ``Cin`` a multiple of 16 (the schema enforces the channel widths), because an NVFP4
  block is 16 elements along the reduction dim. The stem (``Cin`` = image channels) and the output layers are listed
  in ``high_precision_modules``: the FP4 study kept exactly those in high precision.
* ``upsample="transpose"`` uses ``ConvTranspose2d`` so the quantized transposed-conv path is exercised.
* Inputs whose size is not a multiple of ``2**(depth-1)`` are zero-padded at the bottom/right and the outputs
  cropped back, so any image size works.
* The instance head follows the mask-classification idea (MaskFormer): Q learned queries cross-attend to the
  bottleneck features, each becomes a class distribution over K thing classes + "no object" and a mask embedding
  whose dot product with per-pixel embeddings gives that query's mask logits. A fixed sine position code is added
  to keys and pixel embeddings so that two objects of one class can be told apart by location. All its GEMMs are
  ``nn.Linear``/``nn.Conv2d`` modules, so a quantization policy can reach them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from conf.errors import ConfigError
from conf.schemas.model import UNetConfig
from data.info import DataInfo


class ConvNormAct(nn.Module):
    """3x3 conv (no bias: GroupNorm follows) -> GroupNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__(ConvNormAct(in_channels, out_channels, groups), ConvNormAct(out_channels, out_channels, groups))


class Down(nn.Sequential):
    """Halve the resolution (max-pool), then two convs to the next level's width."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, groups))


class Up(nn.Module):
    """Double the resolution to the skip's width, concatenate the skip, two convs."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, mode: str) -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
            )
        self.fuse = DoubleConv(2 * out_channels, out_channels, groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([skip, self.up(x)], dim=1))  # [B, 2*Cout, H, W] -> [B, Cout, H, W]


def sine_position_code(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2D sine/cosine position code [dim, H, W]: dim/2 channels for y, dim/2 for x (dim % 4 == 0)."""
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys = torch.linspace(0, 2 * math.pi, height, device=device)[:, None] * freqs  # [H, dim/4]
    xs = torch.linspace(0, 2 * math.pi, width, device=device)[:, None] * freqs  # [W, dim/4]
    code_y = torch.cat([ys.sin(), ys.cos()], dim=1).t()[:, :, None].expand(-1, height, width)  # [dim/2, H, W]
    code_x = torch.cat([xs.sin(), xs.cos()], dim=1).t()[:, None, :].expand(-1, height, width)  # [dim/2, H, W]
    return torch.cat([code_y, code_x], dim=0).to(dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of queries to a memory, with every projection an ``nn.Linear``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        batch, num_q, dim = queries.shape
        q = self._split_heads(self.q_proj(queries))  # [B, h, Q, D/h]
        k = self._split_heads(self.k_proj(keys))  # [B, h, S, D/h]
        v = self._split_heads(self.v_proj(values))  # [B, h, S, D/h]
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, h, Q, D/h]
        return self.out_proj(attended.transpose(1, 2).reshape(batch, num_q, dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)  # [B, h, L, D/h]


class QueryMaskHead(nn.Module):
    """Q queries -> mask logits [B, Q, H, W] and class logits [B, Q, K+1] (last class = no object)."""

    def __init__(self, pixel_channels: int, memory_channels: int, num_things: int, num_queries: int, dim: int,
                 heads: int) -> None:
        super().__init__()
        self.queries = nn.Embedding(num_queries, dim)
        self.memory_proj = nn.Linear(memory_channels, dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_things + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.pixel_embed = nn.Conv2d(pixel_channels, dim, 1)
        self.dim = dim

    def forward(self, pixels: torch.Tensor, memory: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, _, mem_h, mem_w = memory.shape
        mem_pos = sine_position_code(mem_h, mem_w, self.dim, memory.device, memory.dtype)  # [D, h, w]
        values = self.memory_proj(memory.flatten(2).transpose(1, 2))  # [B, h*w, D]
        keys = values + mem_pos.flatten(1).t().to(values.dtype)  # [B, h*w, D]
        queries = self.queries.weight.unsqueeze(0).expand(batch, -1, -1)  # [B, Q, D]
        queries = self.attn_norm(queries + self.cross_attn(queries, keys, values))
        queries = self.ffn_norm(queries + self.ffn(queries))  # [B, Q, D]
        pixel_emb = self.pixel_embed(pixels)  # [B, D, H, W]
        pixel_emb = pixel_emb + sine_position_code(*pixel_emb.shape[-2:], self.dim, pixels.device, pixel_emb.dtype)
        mask_emb = self.mask_embed(queries)  # [B, Q, D]
        mask_logits = torch.einsum("bqd,bdhw->bqhw", mask_emb, pixel_emb) / math.sqrt(self.dim)
        return {"mask_logits": mask_logits, "class_logits": self.class_head(queries)}


class UNet(nn.Module):
    """Forward: image [B, Cin, H, W] -> {"semantic": [B, C, H, W], "instance": {...}} (instance only with the head)."""

    def __init__(self, in_channels: int, num_classes: int, channels: list[int], groups: int, upsample: str,
                 instance_head: bool, num_queries: int, query_dim: int, query_heads: int) -> None:
        super().__init__()
        self.stem = ConvNormAct(in_channels, channels[0], groups)  # the only conv whose Cin is not a multiple of 16
        self.inc = ConvNormAct(channels[0], channels[0], groups)
        self.downs = nn.ModuleList(Down(channels[i - 1], channels[i], groups) for i in range(1, len(channels)))
        self.ups = nn.ModuleList(
            Up(channels[i], channels[i - 1], groups, upsample) for i in reversed(range(1, len(channels)))
        )
        self.semantic_head = nn.Conv2d(channels[0], num_classes, 1)
        self.instance_head = (
            QueryMaskHead(channels[0], channels[-1], num_classes - 1, num_queries, query_dim, query_heads)
            if instance_head else None
        )
        self.stride = 2 ** (len(channels) - 1)
        high = ["stem.conv", "semantic_head"]
        if instance_head:
            high.append("instance_head.class_head")
        self.high_precision_modules: tuple[str, ...] = tuple(high)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        x = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image  # [B, Cin, H', W']
        x = self.inc(self.stem(x))  # [B, c0, H', W']
        skips = [x]
        for down in self.downs:
            skips.append(down(skips[-1]))  # level i: [B, c_i, H'/2^i, W'/2^i]
        x = skips.pop()  # bottleneck [B, c_last, H'/s, W'/s]
        bottleneck = x
        for up in self.ups:
            x = up(x, skips.pop())
        out: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {
            "semantic": self.semantic_head(x)[..., :height, :width]  # [B, C, H, W]
        }
        if self.instance_head is not None:
            inst = self.instance_head(x, bottleneck)
            out["instance"] = {"mask_logits": inst["mask_logits"][..., :height, :width], "class_logits":
                               inst["class_logits"]}
        return out


def build_unet(cfg: UNetConfig, info: DataInfo) -> UNet:
    if info.num_classes < 2:
        raise ConfigError(f"model=unet needs a data set with >= 2 classes (background + things); the data set has "
                          f"num_classes={info.num_classes}")
    return UNet(
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        channels=cfg.channels(),
        groups=cfg.norm_groups,
        upsample=cfg.upsample,
        instance_head=cfg.instance_head,
        num_queries=cfg.num_queries,
        query_dim=cfg.query_dim,
        query_heads=cfg.query_heads,
    )
