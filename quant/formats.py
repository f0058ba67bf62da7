"""Registry of numeric formats: one name -> one implementation with the same quantize/dequantize/fake_quantize API.

Layers, analysis and benchmarks look formats up here by the names the Hydra configs use, so adding a format is one
module plus one entry. A `Format` binds a module to fixed options (e.g. fp8's `fmt`), and its methods forward the
remaining keyword options (tile, rht, blocksize, ...) to the module, whose own validation reports bad values.

`bits_per_element` is the storage cost at the default options, scales included (e.g. NVFP4: 4 + 8/16 + a 32-bit
amax per tensor, which rounds away): it is what a memory or "same bit budget" comparison needs.
"""

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from quant import fp8, int4, mxfp4, nf4, nvfp4
from quant.errors import QuantError


@dataclass(frozen=True)
class Format:
    """A registered format: `module` implements it; `options` are keyword arguments fixed by this entry."""

    name: str
    module: ModuleType
    options: tuple[tuple[str, Any], ...]
    bits_per_element: float
    summary: str

    def quantize(self, x: Tensor, **options: Any) -> Any:
        return self.module.quantize(x, **dict(self.options), **options)

    def dequantize(self, q: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.module.dequantize(q, dtype=dtype)

    def fake_quantize(self, x: Tensor, **options: Any) -> Tensor:
        return self.module.fake_quantize(x, **dict(self.options), **options)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("nvfp4", nvfp4, (), 4 + 8 / 16, "E2M1, E4M3 scale per 16, FP32 per-tensor amax (TE-exact)"),
        Format("mxfp4", mxfp4, (), 4 + 8 / 32, "E2M1, E8M0 power-of-two scale per 32 (OCP MX)"),
        Format("nf4", nf4, (), 4 + 32 / 64, "NormalFloat codebook, FP32 absmax per 64 (bitsandbytes)"),
        Format("int4", int4, (), 4 + 32 / 32, "symmetric integers in [-7, 7], FP32 scale per 32"),
        Format("fp8_e4m3", fp8, (("fmt", "e4m3"),), 8, "E4M3, per-tensor current scaling (TE Float8CurrentScaling)"),
        Format("fp8_e5m2", fp8, (("fmt", "e5m2"),), 8, "E5M2, per-tensor current scaling (TE Float8CurrentScaling)"),
    )
}


def get(name: str) -> Format:
    """The registered format called `name`; QuantError listing the valid names otherwise."""
    if name not in FORMATS:
        raise QuantError(f"unknown quantization format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[name]
