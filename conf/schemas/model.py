"""Schemas of ``conf/model/*``: one dataclass per model family, registered as ``schema/model/<name>``.

Why: a model config is validated before any data is read, so ``model.width=0.3`` (channels that are not multiples
of 16, which NVFP4 convolutions cannot take) or ``model.n_heads=5`` with ``d_model=128`` fails with one message
naming the field, the value and what would be valid. The loss weights of a task live with the model family that
defines the outputs they weigh (``build_task`` receives the model config).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from conf.errors import ConfigError
from conf.schemas.common import check_choice, check_range, store_schema

UPSAMPLE_MODES = ("transpose", "interp")
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
CHANNEL_MULTIPLE = 16  # NVFP4 blocks are 16 elements along the GEMM's reduction dim (Cin * kh * kw, Cin % 16 == 0)


@dataclass
class SegmentationLossConfig:
    """Weights of the segmentation losses (semantic CE + soft Dice; Hungarian-matched instance losses)."""

    ce_weight: float = 1.0
    dice_weight: float = 1.0
    instance_weight: float = 1.0  # multiplies the whole instance loss (class + mask BCE + mask Dice)
    class_weight: float = 2.0  # matched-query classification, also the class term of the matching cost
    mask_bce_weight: float = 5.0
    mask_dice_weight: float = 5.0
    no_object_weight: float = 0.1  # CE weight of the "no object" class for unmatched queries

    def __post_init__(self) -> None:
        for name in ("ce_weight", "dice_weight", "instance_weight", "class_weight", "mask_bce_weight",
                     "mask_dice_weight", "no_object_weight"):
            check_range("model.loss", name, getattr(self, name), 0.0)


@dataclass
class UNetConfig:
    name: str = "unet"
    base_channels: int = 64  # channels of the first level at width 1.0; level i has base * width * 2**i
    width: float = 0.25  # channel width factor: 0.25 -> 16, 32, 64, 128
    depth: int = 4  # resolution levels (depth - 1 downsamplings)
    norm_groups: int = 8  # GroupNorm groups; must divide every level's channels
    upsample: str = "transpose"  # transpose: ConvTranspose2d(k=2, s=2); interp: bilinear x2 then 3x3 conv
    instance_head: bool = True  # query-based mask head next to the semantic head
    num_queries: int = 16  # Q learned object queries
    query_dim: int = 64  # D of queries and per-pixel mask embeddings
    query_heads: int = 4  # heads of the queries' cross-attention to the bottleneck features
    loss: SegmentationLossConfig = field(default_factory=SegmentationLossConfig)

    def __post_init__(self) -> None:
        check_choice("model", "name", self.name, ("unet",))
        check_choice("model", "upsample", self.upsample, UPSAMPLE_MODES)
        check_range("model", "depth", self.depth, 2, 6)
        check_range("model", "width", self.width, 0.0)
        check_range("model", "base_channels", self.base_channels, 1)
        check_range("model", "norm_groups", self.norm_groups, 1)
        for level, channels in enumerate(self.channels_raw()):
            if channels != int(channels) or channels < CHANNEL_MULTIPLE or int(channels) % CHANNEL_MULTIPLE:
                raise ConfigError(
                    f"model.width={self.width!r} with model.base_channels={self.base_channels} gives {channels:g} "
                    f"channels at level {level}; valid: base_channels * width a multiple of {CHANNEL_MULTIPLE} "
                    f"(e.g. width=0.25 or 0.5 with base_channels=64), because NVFP4 convs need Cin % 16 == 0"
                )
            if int(channels) % self.norm_groups:
                raise ConfigError(
                    f"model.norm_groups={self.norm_groups} does not divide {int(channels)} channels at level {level}; "
                    f"valid: a divisor of {CHANNEL_MULTIPLE} (1, 2, 4, 8, 16)"
                )
        check_range("model", "num_queries", self.num_queries, 1)
        check_range("model", "query_heads", self.query_heads, 1)
        multiple = math.lcm(4, self.query_heads)  # heads split the dim; the 2D sine position code needs dim % 4 == 0
        if self.query_dim < multiple or self.query_dim % multiple:
            raise ConfigError(
                f"model.query_dim={self.query_dim} is not valid with model.query_heads={self.query_heads}; valid: a "
                f"positive multiple of {multiple}"
            )

    def channels_raw(self) -> list[float]:
        return [self.base_channels * self.width * 2**level for level in range(self.depth)]

    def channels(self) -> list[int]:
        """Channels per resolution level, e.g. [16, 32, 64, 128] for the defaults."""
        return [int(c) for c in self.channels_raw()]


@dataclass
class ResNetConfig:
    name: str = "resnet"
    arch: str = "resnet18"  # torchvision architecture, randomly initialised (weights are never downloaded)
    small_stem: bool = True  # 3x3 stride-1 stem conv and no max-pool, for 32x32-class inputs (CIFAR, MNIST)
    zero_init_residual: bool = False  # zero the last BN of each residual branch (torchvision option)
    label_smoothing: float = 0.0  # of the classification CE

    def __post_init__(self) -> None:
        check_choice("model", "name", self.name, ("resnet",))
        check_choice("model", "arch", self.arch, RESNET_ARCHS)
        check_range("model", "label_smoothing", self.label_smoothing, 0.0, 1.0)


@dataclass
class LLMConfig:
    name: str = "llm"
    pretrained: Optional[str] = None  # a local Hugging Face model dir (config.json + weights); None = random init
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention when < n_heads
    intermediate_size: int = 384  # SwiGLU hidden size
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # rotary position limit; must cover the data set's sequence length
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    attn_implementation: str = "sdpa"  # both run on CPU; eager materialises the attention matrix

    def __post_init__(self) -> None:
        check_choice("model", "name", self.name, ("llm",))
        check_choice("model", "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            check_range("model", name, getattr(self, name), 1)
        check_range("model", "rope_theta", self.rope_theta, 1.0)
        check_range("model", "init_std", self.init_std, 0.0)
        check_range("model", "rms_norm_eps", self.rms_norm_eps, 0.0)
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not a multiple of model.n_heads={self.n_heads}; "
                              f"valid: n_heads dividing d_model")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model.d_model / model.n_heads = {self.d_model // self.n_heads} is odd; rotary "
                              f"embeddings need an even head dim")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}; "
                              f"valid: a divisor of n_heads")


store_schema("model", "unet", UNetConfig)
store_schema("model", "resnet", ResNetConfig)
store_schema("model", "llm", LLMConfig)
