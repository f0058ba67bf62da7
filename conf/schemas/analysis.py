"""Schema of ``conf/analysis/*``: what the analysis callbacks record during training and how often.

Why a schema: the analysis runs inside the training loop, so a bad value (a zero cadence, a threshold that can
never fire) must fail before any data is read, with the field, the bad value and the valid range.
Defaults: ``every_n_steps`` comes from ``bench/analysis_overhead.py`` (overhead at most 5% of training time,
``docs/analysis.md``); ``kurtosis_z_threshold`` 3.5 is the usual robust-z outlier cut (Iglewicz and Hoaglin).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from conf.errors import ConfigError
from conf.schemas.common import check_range, store_schema


@dataclass
class AnalysisConfig:
    enabled: bool = True
    every_n_steps: int = 50  # optimizer steps between two analysis passes (step 0 included)
    weights: bool = True  # weight, code, scale and error statistics of each quantized layer
    gradients: bool = True  # gradient statistics of every layer, after AMP unscaling
    histograms: bool = True  # W&B histograms of weights / codes / gradients of the image layers
    # fnmatch patterns of layer names that get per-layer images (raw / codes / dequantized / error); among the
    # matches at most max_image_layers, evenly spaced in model order (first and last included).
    image_layers: list[str] = field(default_factory=lambda: ["*"])
    max_image_layers: int = 3
    image_max_side: int = 128  # per-layer images show the top-left crop of at most this many rows and columns
    wandb: bool = True  # log figures and tables to the W&B run when a WandbLogger is present
    background_writer: bool = True  # draw and write figures on a worker thread (measuring stays on the training thread)
    kurtosis_study: bool = True  # ranked kurtosis table at the end of training
    kurtosis_z_threshold: float = 3.5  # robust z within a module type above which a layer is flagged
    baselines: list[str] = field(default_factory=lambda: ["bf16", "fp16", "fp32"])  # report baseline preference

    def __post_init__(self) -> None:
        check_range("analysis", "every_n_steps", self.every_n_steps, 1)
        check_range("analysis", "max_image_layers", self.max_image_layers, 0)
        check_range("analysis", "image_max_side", self.image_max_side, 16)
        check_range("analysis", "kurtosis_z_threshold", self.kurtosis_z_threshold, 0.0)
        for name in ("image_layers", "baselines"):
            values = getattr(self, name)
            if not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"analysis.{name}={list(values)!r} is not valid; valid values: a list of "
                                  "non-empty strings")


store_schema("analysis", "analysis", AnalysisConfig)
