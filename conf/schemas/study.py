"""Schema of ``conf/study/*``: multi-stage studies that one job runs in order (``mode=ptq_vs_qat``).

Why one job and not a sweep: Hydra's basic sweeper runs independent jobs, but "PTQ vs QAT" is a chain (the PTQ and
QAT stages start from the baseline's checkpoint, the packed evaluation from the QAT checkpoint). The stages reuse
the registered modes with derived configs; ``baseline`` is a full quant config placed here by the study file's
defaults list (``- /quant@baseline: bf16``), the quantized arm is the job's own ``quant``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from conf.errors import ConfigError
from conf.schemas.common import check_range, store_schema
from conf.schemas.quant import QuantConfig


@dataclass
class PtqVsQatConfig:
    name: str = "ptq_vs_qat"
    baseline: Any = MISSING  # quant config of the baseline arm (conf/quant/*), e.g. bf16
    baseline_ckpt: Optional[str] = None  # a trained baseline .ckpt to start from instead of training one
    qat_max_steps: Optional[int] = None  # QAT fine-tune length; null = trainer.max_steps
    qat_lr: Optional[float] = None  # QAT fine-tune peak learning rate; null = optim.lr
    export: bool = True  # export the QAT model packed (export.*) and evaluate the file (the "packed" stage)

    def __post_init__(self) -> None:
        if not isinstance(self.baseline, QuantConfig):
            raise ConfigError(f"study.baseline={self.baseline!r} is not a quant config; pick the baseline arm with "
                              "quant@study.baseline=<bf16|fp16|fp32|...> (a conf/quant file)")
        if self.qat_max_steps is not None:
            check_range("study", "qat_max_steps", self.qat_max_steps, 1)
        if self.qat_lr is not None:
            check_range("study", "qat_lr", self.qat_lr, 0.0)


store_schema("study", "ptq_vs_qat", PtqVsQatConfig)
