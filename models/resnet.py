"""torchvision ResNet-18/34/50 for classification, randomly initialised, with a small-image stem option.

Why torchvision's and not our own: the ResNet a reader knows, module names included (``conv1``, ``layer1.0.conv1``,
``fc``), so quantization reports read like the literature. Load-bearing details:

* ``weights=None`` always: nothing is ever downloaded.
* ``small_stem``: the ImageNet stem (7x7 stride-2 conv + max-pool) turns a 32x32 image into 8x8 before the first
  block; the CIFAR-style stem (3x3 stride-1 conv, no max-pool) keeps 32x32. The replaced stem is initialised like
  torchvision's own convs (Kaiming normal, fan-out).
* The stem conv (``Cin`` = 1 or 3, not a multiple of 16) and ``fc`` (the output layer) are listed in
  ``high_precision_modules``.
"""
from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models import ResNet

from conf.schemas.model import ResNetConfig
from data.info import DataInfo

STEM_WIDTH = 64  # torchvision ResNets start at 64 channels


def build_resnet(cfg: ResNetConfig, info: DataInfo) -> ResNet:
    net: ResNet = getattr(torchvision.models, cfg.arch)(
        weights=None, num_classes=info.num_classes, zero_init_residual=cfg.zero_init_residual
    )
    if cfg.small_stem:
        net.conv1 = nn.Conv2d(info.in_channels, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif info.in_channels != 3:
        net.conv1 = nn.Conv2d(info.in_channels, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.high_precision_modules = ("conv1", "fc")
    return net
