"""Schema of ``conf/export/*``: what ``mode=export`` writes (the packed safetensors file of ``quant.export``).

Why a separate group: the storage format of an exported model is a choice made after training. By default
(``format: null``) the export uses the job's own precision policy (``quant=...``), so the packed model runs exactly
the forward the QAT model was trained with (same weight format and tile, same activation quantization). Setting
``export.format`` exports in another format: the layer selection stays the quant config's, the format, ``options``
and ``roles`` come from here (the job's ``role_overrides`` are dropped) and the recipe is that format's default
(e.g. ``quant=bf16 export.format=nf4`` is weight-only NF4 post-training quantization of a BF16 model).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import quant
from conf.errors import ConfigError
from conf.schemas.common import check_choice, store_schema
from quant.export import OTHER_DTYPES
from quant.inference import CODECS


@dataclass
class ExportConfig:
    format: Optional[str] = None  # null = the job's quant policy; else nvfp4 | nf4 | mxfp4
    options: dict[str, Any] = field(default_factory=dict)  # with format: its options (blocksize, double_quant, ...)
    roles: Optional[list[str]] = None  # with format: quantized roles; null = the format's default (input = W4A4)
    other_dtype: str = "bfloat16"  # every tensor that is not a packed weight: bfloat16 | float32
    path: Optional[str] = None  # null = <output_dir>/model.safetensors

    def __post_init__(self) -> None:
        if self.format is not None:
            check_choice("export", "format", self.format, CODECS)
        elif self.options or self.roles is not None:
            raise ConfigError("export.options and export.roles apply only with export.format=<nvfp4|nf4|mxfp4>; "
                              "to change the job's own policy, set quant.options / quant.roles")
        check_choice("export", "other_dtype", self.other_dtype, OTHER_DTYPES)

    def policy(self, job_policy: quant.Policy) -> quant.Policy:
        """The policy whose layers get packed: the job's, or the job's layer selection in ``format``."""
        if self.format is None or (self.format == job_policy.format and not self.options and self.roles is None
                                   and not job_policy.role_overrides):
            weight_format = "none" if job_policy.format == "none" else job_policy.role_format("weight").name
            if weight_format not in CODECS or "weight" not in job_policy.effective_roles:
                raise ConfigError(
                    f"mode=export packs {', '.join(CODECS)} weights but the job's policy quantizes the weight with "
                    f"format={weight_format if 'weight' in job_policy.effective_roles else 'none'}; pick a quantized "
                    f"policy (quant=nvfp4) or export.format=<{'|'.join(CODECS)}>")
            return job_policy
        try:
            return dataclasses.replace(job_policy, format=self.format, recipe=None, options=dict(self.options),
                                       roles=None if self.roles is None else tuple(self.roles), role_overrides=())
        except quant.QuantError as exc:
            raise ConfigError(f"export: {exc}") from None


store_schema("export", "export", ExportConfig)
