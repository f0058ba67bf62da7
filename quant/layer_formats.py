"""How each number format quantizes the six operands of a layer's three GEMMs (the "slots").

Why this exists: the autograd functions (``quant.functional``) are format-agnostic; they reshape their tensors into
2-D GEMM operands whose *last dim is the reduction dim of that GEMM* and ask the layer's format for each operand.
The numeric rules themselves live in the format modules (``quant.nvfp4``, ``quant.mxfp4``, ...); this file only
says which rule each slot uses, which roles a format can quantize, and which shapes it needs.

The slots of a linear layer ``Y[M, N] = X[M, K] W[N, K]^T`` (tokens M; convolutions map onto the same slots,
see ``quant.functional``):

==============  =====  =============  =====================
slot            role   2-D operand    blocks along
==============  =====  =============  =====================
fprop_input     input  X   [M, K]     K (in features)
fprop_weight    weight W   [N, K]     K
dgrad_grad      grad   dY  [M, N]     N (out features)
dgrad_weight    weight W^T [K, N]     N
wgrad_grad      grad   dY^T [N, M]    M (tokens)
wgrad_input     input  X^T [K, M]     M (tokens)
==============  =====  =============  =====================

A format returns either an ``nvfp4.NVFP4Tensor`` (NVFP4: the GEMM then runs on scaled codes, ``quant.gemm``) or a
tensor of fake-quantized values in the compute dtype (every other format: a BF16/FP32 GEMM on dequantized values).

Each role may have a format of its own (``Policy.role_overrides``, e.g. W4A8: NVFP4 weights, FP8 E4M3 activations):
every slot asks the format of its role, so each numeric rule still runs from its one format module. A GEMM whose two
operands come from different formats multiplies them dequantized (an NVFP4 operand decoded with TE's formula), with
one FP32 contraction and one rounding (``quant.gemm``); the scaled-codes GEMM and TE's alpha need NVFP4 on both sides.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from quant import distributed, fp8, int4, kernels, mxfp4, nf4, nvfp4
from quant.errors import QuantError
from quant.kernels.checks import OwnedName
from quant import gemm
from quant.gemm import Operand
from quant.recipe import Recipe

ROLES = ("weight", "input", "grad")
SLOT_ROLE = {
    "fprop_input": "input",
    "fprop_weight": "weight",
    "dgrad_grad": "grad",
    "dgrad_weight": "weight",
    "wgrad_grad": "grad",
    "wgrad_input": "input",
}


@dataclass(frozen=True)
class SlotRequest:
    """One operand to quantize: its slot, its name for error messages, and the per-call randomness/transform."""

    slot: str
    name: str | OwnedName  # e.g. "layers.0.mlp.fc1 output gradient (wgrad)", resolved only in error messages
    rht: bool = False  # apply the RHT along the last dim (NVFP4 wgrad operands only)
    generator: torch.Generator | None = None  # stochastic rounding stream (grad slots, reference path)
    amax_reduce: distributed.AmaxReducer | None = None  # global-amax reduction across ranks (per_tensor_amax formats)
    seed: Tensor | None = None  # SR Philox (key, counter), int64 [2], instead of ``generator`` (kernel path)
    # NVFP4 on the kernel path: also write the GEMM operand (scaled codes) in this dtype, in the quantize pass
    scaled_dtype: torch.dtype | None = None
    # ... and with it TE's dequantized values in this dtype (a forward operand the ``dequantized`` backward multiplies)
    dequantized_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class LayerFormat:
    """What a format does inside a GEMM layer; instances carry the format's options (validated on construction).

    Class attributes describe capabilities; ``OPTION_CHOICES`` maps each option field to its valid values.
    """

    name: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ROLES  # roles this format can quantize
    default_roles: ClassVar[tuple[str, ...]] = ROLES
    backward_modes: ClassVar[tuple[str, ...]] = ("full", "dequantized", "high_precision")
    default_backward: ClassVar[str] = "full"  # TE's default for NVFP4 and FP8; straight-through for the others
    nvfp4_recipe_switches: ClassVar[bool] = False  # honours Recipe's RHT / SR / 2D switches (NVFP4 only)
    per_tensor_amax: ClassVar[bool] = False  # scales derive from one amax per tensor (can be reduced across ranks)
    # slots whose blocked (last) dim must be a multiple of ``block``; wgrad slots are blocked along padded tokens
    blocked_slots: ClassVar[tuple[str, ...]] = ("fprop_input", "fprop_weight", "dgrad_grad", "dgrad_weight")
    # True for weight-storage formats (NF4, INT4): every GEMM dequantizes the one stored weight, so the dgrad GEMM
    # reuses the forward's quantized W instead of requantizing W^T along N.
    dgrad_weight_from_fprop: ClassVar[bool] = False
    OPTION_CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __post_init__(self) -> None:
        for option, choices in self.OPTION_CHOICES.items():
            value = getattr(self, option)
            if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
                raise QuantError(
                    f"{self.name} option {option}={value!r} is not valid; valid choices: "
                    f"{', '.join(map(str, choices))}"
                )

    @property
    def block(self) -> int:
        """Elements per scale block along the GEMM reduction dim (1: per tensor or not along K, no constraint)."""
        return 1

    def options(self) -> dict[str, Any]:
        return {option: getattr(self, option) for option in self.OPTION_CHOICES}

    def quantize(self, x: Tensor, request: SlotRequest, recipe: Recipe, compute_dtype: torch.dtype) -> Operand:
        """x: the 2-D operand of ``request.slot`` (reduction dim last) -> quantized operand of the same shape."""
        raise NotImplementedError

    def quantize_pair(self, x: Tensor, request: SlotRequest, request_t: SlotRequest, recipe: Recipe
                      ) -> tuple[Operand, Operand] | None:
        """The operands of ``request``'s slot (x [M, K]) and ``request_t``'s (x^T [K, M]) from one pass over x, or
        None where this format has no such pass (the caller then quantizes each with ``quantize``)."""
        return None

    def describe(self, role: str, recipe: Recipe, wgrad_rht: bool) -> str:
        """One short phrase for the report, e.g. ``"nvfp4 16x16 RN"``."""
        raise NotImplementedError

    def rht_applies(self, recipe: Recipe) -> bool:
        return False

    def uses_sr(self, recipe: Recipe) -> bool:
        """Does the grad role draw random bits (stochastic rounding)?"""
        return False

    def dgrad_weight_is_fprop_weight(self, recipe: Recipe) -> bool:
        """Is the dgrad GEMM's W^T operand the forward's quantized W in another layout (so the backward reuses it
        instead of quantizing W^T)? Weight-storage formats by definition; NVFP4 with 16x16 tiles because a tile
        blocks the same elements in both layouts (SPEC 1.4)."""
        return self.dgrad_weight_from_fprop


@dataclass(frozen=True)
class NVFP4Layer(LayerFormat):
    """TE's NVFP4 recipe (SPEC 3.1): X 1x16 RN; W 16x16 RN (1x16 without 2D); dY 1x16 SR; RHT on wgrad operands.

    With 2D weight tiles the dgrad operand W^T is quantized with the same 16x16 tiles, so its codes are exactly the
    transpose of the fprop codes (SPEC 1.4); with 1x16 weights it is requantized along N, as TE does.
    """

    name: ClassVar[str] = "nvfp4"
    nvfp4_recipe_switches: ClassVar[bool] = True
    per_tensor_amax: ClassVar[bool] = True

    @property
    def block(self) -> int:
        return nvfp4.BLOCK

    def quantize(self, x: Tensor, request: SlotRequest, recipe: Recipe, compute_dtype: torch.dtype) -> Operand:
        role = SLOT_ROLE[request.slot]
        tile = recipe.weight_tile if role == "weight" else (1, nvfp4.BLOCK)
        stochastic = role == "grad" and recipe.stochastic_rounding
        both = request.dequantized_dtype is not None and not (request.rht or stochastic or request.seed is not None)
        if request.scaled_dtype is not None and request.amax_reduce is None and kernels.enabled_for(x) and both:
            q, values, dequantized = kernels.load().nvfp4_quantize_both(
                x, tile=tile, name=request.name, dtype=request.scaled_dtype,
                dequantized_dtype=request.dequantized_dtype)
            return gemm.Prescaled(q, values, dequantized)
        if request.scaled_dtype is not None and request.amax_reduce is None and kernels.enabled_for(x):
            q, values = kernels.load().nvfp4_quantize_scaled(
                x, tile=tile, rht=request.rht, stochastic=stochastic, generator=request.generator, name=request.name,
                seed=request.seed, dtype=request.scaled_dtype)
            return gemm.Prescaled(q, values)
        if request.seed is not None:  # kernel path, SR from the layer's own Philox counter (torch.compile-friendly)
            return kernels.load().nvfp4_quantize(x, tile=tile, rht=request.rht, stochastic=stochastic,
                                                 name=request.name, seed=request.seed)
        return nvfp4.quantize(
            x, tile=tile, rht=request.rht, stochastic=stochastic, generator=request.generator, name=request.name,
            amax_reduce=request.amax_reduce,
        )

    def quantize_pair(self, x: Tensor, request: SlotRequest, request_t: SlotRequest, recipe: Recipe
                      ) -> tuple[Operand, Operand] | None:
        """X and X^T (or dY and dY^T) of a ``full`` step as ``gemm.ScaledCodes`` from one amax read and one quantize
        read (``kernels.ops.nvfp4_quantize_pair``): 1x16 blocks, x^T RHT'ed, the bytes of two ``quantize`` calls.
        Only on the kernel path, for BF16 x with rows in 16-token chunks, scaled codes for a GEMM (BF16) or a
        convolution (float32, x only), no amax reduction, and SR (grads) drawn from Philox seeds; None otherwise."""
        role = SLOT_ROLE[request.slot]
        stochastic = role == "grad" and recipe.stochastic_rounding
        seeds = (request.seed, request_t.seed)
        eligible = (kernels.enabled_for(x) and role != "weight" and request_t.rht and not request.rht
                    and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] % nvfp4.BLOCK == 0
                    and request.scaled_dtype in (torch.bfloat16, torch.float32)
                    and request_t.scaled_dtype == torch.bfloat16
                    and request.dequantized_dtype is None and request_t.dequantized_dtype is None
                    and request.amax_reduce is None and request_t.amax_reduce is None
                    and (not stochastic or all(seed is not None for seed in seeds)))
        if not eligible:
            return None
        (amax, values), (amax_t, values_t) = kernels.load().nvfp4_quantize_pair(
            x, stochastic=stochastic, seeds=torch.stack(seeds) if stochastic else None, name=request.name,
            name_t=request_t.name, dtype=request.scaled_dtype, dtype_t=request_t.scaled_dtype)
        return gemm.ScaledCodes(values, amax), gemm.ScaledCodes(values_t, amax_t)

    def rht_applies(self, recipe: Recipe) -> bool:
        return recipe.rht

    def uses_sr(self, recipe: Recipe) -> bool:
        return recipe.stochastic_rounding

    def dgrad_weight_is_fprop_weight(self, recipe: Recipe) -> bool:
        return recipe.weight_tile == (nvfp4.BLOCK, nvfp4.BLOCK)

    def describe(self, role: str, recipe: Recipe, wgrad_rht: bool) -> str:
        if role == "weight":
            return "nvfp4 16x16 RN" if recipe.weight_tile == (16, 16) else "nvfp4 1x16 RN"
        rounding = "SR" if role == "grad" and recipe.stochastic_rounding else "RN"
        return f"nvfp4 1x16 {rounding}" + (" +RHT(wgrad)" if wgrad_rht else "")


@dataclass(frozen=True)
class MXFP4Layer(LayerFormat):
    """OCP MXFP4 fake quantization, 1x32 blocks along each GEMM's reduction dim (RN; no SR or RHT).

    With ``backward=full`` every operand is requantized along its own GEMM's reduction dim (W^T along N, dY^T and X^T
    along tokens), as an MX training recipe does; the dequantized backward is the classic STE.
    """

    name: ClassVar[str] = "mxfp4"
    default_backward: ClassVar[str] = "dequantized"
    default_roles: ClassVar[tuple[str, ...]] = ("weight", "input")
    OPTION_CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {"scale_rule": mxfp4.SCALE_RULES}
    scale_rule: str = "floor"

    @property
    def block(self) -> int:
        return mxfp4.BLOCK

    def quantize(self, x: Tensor, request: SlotRequest, recipe: Recipe, compute_dtype: torch.dtype) -> Operand:
        return mxfp4.fake_quantize(x, scale_rule=self.scale_rule, name=request.name).to(compute_dtype)

    def describe(self, role: str, recipe: Recipe, wgrad_rht: bool) -> str:
        return f"mxfp4 1x32 {self.scale_rule}"


@dataclass(frozen=True)
class NF4Layer(LayerFormat):
    """bitsandbytes NF4, weight only: blocks of ``blocksize`` over the flattened forward weight matrix ([N, K] for a
    linear, which is bitsandbytes' own layout; [Co, kh*kw*Ci] for a convolution). Every GEMM uses the same stored
    weight, so ``full`` and ``dequantized`` backward coincide."""

    name: ClassVar[str] = "nf4"
    default_backward: ClassVar[str] = "dequantized"
    roles: ClassVar[tuple[str, ...]] = ("weight",)
    default_roles: ClassVar[tuple[str, ...]] = ("weight",)
    blocked_slots: ClassVar[tuple[str, ...]] = ()
    dgrad_weight_from_fprop: ClassVar[bool] = True
    OPTION_CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "blocksize": nf4.BLOCKSIZES, "double_quant": (False, True)
    }
    blocksize: int = 64
    double_quant: bool = False

    def quantize(self, x: Tensor, request: SlotRequest, recipe: Recipe, compute_dtype: torch.dtype) -> Operand:
        values = nf4.fake_quantize(x, blocksize=self.blocksize, double_quant=self.double_quant, name=request.name)
        return values.to(compute_dtype)

    def describe(self, role: str, recipe: Recipe, wgrad_rht: bool) -> str:
        return f"nf4 /{self.blocksize}" + (" +DQ" if self.double_quant else "")


@dataclass(frozen=True)
class INT4Layer(LayerFormat):
    """Symmetric INT4 per block of ``blocksize`` along each GEMM's reduction dim; weights, optionally activations.

    The weight is stored once (the dgrad GEMM reuses the forward's quantized W); with ``backward=full`` and the input
    role, X^T is requantized along tokens for the wgrad GEMM.
    """

    name: ClassVar[str] = "int4"
    default_backward: ClassVar[str] = "dequantized"
    roles: ClassVar[tuple[str, ...]] = ("weight", "input")
    default_roles: ClassVar[tuple[str, ...]] = ("weight",)
    dgrad_weight_from_fprop: ClassVar[bool] = True
    OPTION_CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {"blocksize": int4.BLOCKSIZES}
    blocksize: int = 32

    @property
    def block(self) -> int:
        return self.blocksize

    def quantize(self, x: Tensor, request: SlotRequest, recipe: Recipe, compute_dtype: torch.dtype) -> Operand:
        return int4.fake_quantize(x, blocksize=self.blocksize, name=request.name).to(compute_dtype)

    def describe(self, role: str, recipe: Recipe, wgrad_rht: bool) -> str:
        return f"int4 1x{self.blocksize}"


@dataclass(frozen=True)
class FP8Layer(LayerFormat):
    """Per-tensor current-scaled FP8 (TE ``Float8CurrentScaling``): ``hybrid`` (TE's default) is E4M3 for X and W
    and E5M2 for dY; ``e4m3`` / ``e5m2`` use one format for all. Per-tensor scales make W^T, X^T and dY^T the same
    values as W, X and dY, so ``full`` is TE's FP8 backward (dgrad and wgrad with the FP8 forward operands and an FP8
    dY)."""

    name: ClassVar[str] = "fp8"
    per_tensor_amax: ClassVar[bool] = True
    OPTION_CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {"fp8_format": ("hybrid", "e4m3", "e5m2")}
    fp8_format: str = "hybrid"

    def element_format(self, role: str) -> str:
        if self.fp8_format == "hybrid":
            return "e5m2" if role == "grad" else "e4m3"
        return self.fp8_format

    def quantize(self, x: Tensor, request: SlotRequest, recipe: Recipe, compute_dtype: torch.dtype) -> Operand:
        fmt = self.element_format(SLOT_ROLE[request.slot])
        return fp8.fake_quantize(x, fmt=fmt, name=request.name, amax_reduce=request.amax_reduce).to(compute_dtype)

    def describe(self, role: str, recipe: Recipe, wgrad_rht: bool) -> str:
        return f"fp8 {self.element_format(role)} per-tensor"


def wgrad_rht(role_formats: Mapping[str, LayerFormat], recipe: Recipe) -> bool:
    """Does the wgrad GEMM rotate both of its operands (dY^T and X^T) with the RHT? ``role_formats``: each quantized
    role -> its format. Only with ``backward=full`` and when *both* wgrad roles are quantized in a format that applies
    the recipe's RHT (NVFP4): the RHT cancels only between two rotated operands, so an NVFP4 dY^T next to an FP8 X^T
    (or an unquantized one) is not rotated."""
    return recipe.backward == "full" and all(
        role in role_formats and role_formats[role].rht_applies(recipe) for role in ("grad", "input")
    )


def unsupported_reason(
    role_formats: Mapping[str, LayerFormat], backward: str, in_channels: int, out_channels: int, groups: int,
    in_name: str = "in_features", out_name: str = "out_features",
) -> str | None:
    """Why a layer of this shape cannot be quantized this way (None if it can). Tokens never matter: they are padded.

    ``role_formats``: each quantized role -> its format (one format for every role, or per-role formats from
    ``Policy.role_overrides``); every slot is checked against the blocks of its own role's format. in_channels is the
    fprop reduction dim (K of a linear, Cin of a conv or transposed conv), out_channels the dgrad reduction dim (N,
    Cout). Blocks must not straddle rows of the implicit GEMM (SPEC 8.5), and TE itself asserts K % 16 == 0 for NVFP4
    GEMM operands (SPEC 1.5), so the blocked dims must be multiples of the block length.
    """
    if groups != 1:
        return f"groups={groups}: a grouped or depthwise convolution is not one GEMM; quantized convs need groups=1"
    weight = role_formats.get("weight")
    dgrad_slots = ["dgrad_grad"] + ([] if weight is not None and weight.dgrad_weight_from_fprop else ["dgrad_weight"])
    for slot in ("fprop_input", "fprop_weight", *(dgrad_slots if backward == "full" else ())):
        fmt = role_formats.get(SLOT_ROLE[slot])
        if fmt is None or fmt.block <= 1 or slot not in fmt.blocked_slots:
            continue
        if slot.startswith("fprop") and in_channels % fmt.block:
            return (
                f"{in_name}={in_channels} is not a multiple of {fmt.block}: {fmt.name} blocks of {fmt.block} run "
                f"along the forward GEMM's reduction dim ({in_name})"
            )
        if slot.startswith("dgrad") and out_channels % fmt.block:
            operand = "dY" if slot == "dgrad_grad" else "W^T"
            return (
                f"{out_name}={out_channels} is not a multiple of {fmt.block}: with backward=full the dgrad GEMM blocks "
                f"{operand} ({fmt.name}) along {out_name}"
            )
    return None


LAYER_FORMATS: dict[str, type[LayerFormat]] = {
    cls.name: cls for cls in (NVFP4Layer, MXFP4Layer, NF4Layer, INT4Layer, FP8Layer)
}


def get(name: str, options: dict[str, Any] | None = None) -> LayerFormat:
    """The layer format ``name`` configured with ``options``; QuantError naming valid formats or options."""
    if name not in LAYER_FORMATS:
        raise QuantError(f"format={name!r} is not a layer format; valid choices: none, {', '.join(LAYER_FORMATS)}")
    cls = LAYER_FORMATS[name]
    unknown = sorted(set(options or {}) - set(cls.OPTION_CHOICES))
    if unknown:
        valid = ", ".join(cls.OPTION_CHOICES) or "none"
        raise QuantError(f"format={name} has no option {unknown[0]!r}; valid options: {valid}")
    return cls(**(options or {}))
