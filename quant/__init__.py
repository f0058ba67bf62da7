"""fp4lab's quantization library: TE-exact NVFP4 and other 4/8-bit formats, QAT layers and precision policies.

Imports torch only (no Hydra, no Lightning). The path of a tensor through it:
``Policy`` -> ``apply(model, policy)`` -> ``QuantLinear`` / ``QuantConv2d`` / ``QuantConvTranspose2d`` -> the
autograd functions of ``quant.functional`` -> the format modules (``nvfp4``, ``mxfp4``, ``nf4``, ``int4``, ``fp8``;
registry ``quant.formats``) and the GEMM of ``quant.gemm``. ``docs/qat.md`` describes the layers and policies,
``docs/formats.md`` the formats.
"""
from quant import formats, fp8, int4, layer_formats, mxfp4, nf4, numerics, nvfp4, rht
from quant.apply import LayerDecision, QuantReport, apply, find_blocks
from quant.errors import QuantError
from quant.functional import LayerQuantizer, quant_conv2d, quant_conv_transpose2d, quant_linear
from quant.modules import (
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    load_sr_states,
    quantized_modules,
    sr_states,
)
from quant.policy import Policy
from quant.recipe import Recipe
from quant import export, inference  # packed inference layers and the safetensors export

__all__ = [
    "LayerDecision",
    "LayerQuantizer",
    "Policy",
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantError",
    "QuantLinear",
    "QuantReport",
    "Recipe",
    "apply",
    "export",
    "find_blocks",
    "formats",
    "fp8",
    "inference",
    "int4",
    "layer_formats",
    "load_sr_states",
    "mxfp4",
    "nf4",
    "numerics",
    "nvfp4",
    "quant_conv2d",
    "quant_conv_transpose2d",
    "quant_linear",
    "quantized_modules",
    "rht",
    "sr_states",
]
