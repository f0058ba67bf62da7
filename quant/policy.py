"""``quant.Policy``: which layers of a model are quantized, in which format, with which recipe.

Why a frozen, validated dataclass: a precision policy is the independent variable of a QAT study; it must be
hashable, loggable (``describe``) and wrong values must fail when the policy is built, naming the field, the bad
value and the valid choices, not deep inside a training step. ``quant.apply`` turns it into swapped modules and a
``QuantReport``; nothing else in the library reads configuration.

Layer selection (each rule's outcome shows up as a reason in the report; the first rule that says "no" wins):

1. Only exact ``nn.Linear``, ``nn.Conv2d`` and ``nn.ConvTranspose2d`` are GEMM layers that can be swapped;
   norms, embeddings, attention internals and other modules always stay high precision.
2. ``include_types`` / ``exclude_types``: class names among ``QUANTIZABLE_TYPES``.
3. The model's own list: a model may declare ``high_precision_modules`` (module names, e.g. the UNet stem and output
   conv, the LLM embeddings and lm_head); honoured unless ``model_defaults=False``.
4. ``include`` / ``exclude``: fnmatch patterns on qualified module names; a pattern also matches every module
   below a matching module (``"layers.0"`` covers ``"layers.0.mlp.fc1"`` but not ``"layers.01"``).
5. ``keep_first_n`` / ``keep_last_n`` blocks. A *block* is a numbered child of a block container (an ``nn.ModuleList``
   or ``nn.Sequential``): ``layers.3`` is block 3 of container ``layers``, and a module belongs to it iff its name is
   ``layers.3`` or starts with ``layers.3.`` (so ``layers.2.`` never matches ``layers.20``). Containers come from
   ``block_containers``, else the model's ``quant_block_containers`` attribute, else auto-detection: the outermost
   ModuleList/Sequential whose children are numbered and hold GEMM layers inside sub-modules (the UNet's ``downs``
   and ``ups``, ResNet's ``layer1``..``layer4``, a decoder's ``layers``). Blocks are numbered across containers in
   model order.
6. ``keep_high_precision``: (module name, reason) pairs decided outside the library, e.g. the layers a kurtosis
   study flags (``quant.exclude_by_kurtosis``); the report shows each one with its reason.
7. Shapes the format cannot block (``layer_formats.unsupported_reason``), and grouped convolutions.

Roles: ``weight``, ``input`` (the activation X), ``grad`` (the output gradient dY, quantized only with
``backward=full``). ``roles=None`` means the format's default (NVFP4, FP8: all three; MXFP4: weight and input; NF4,
INT4: weight only). ``recipe=None`` means the format's default: TE's ``NVFP4BlockScaling()`` defaults (``full``
backward) for NVFP4 and FP8, the straight-through ``dequantized`` backward for MXFP4, NF4 and INT4.

Data parallelism (``quant.distributed``): ``amax_reduction="none"`` quantizes activations and gradients with each
rank's own amax, as TE does under data parallelism; ``"world"`` reduces their amax (MAX) over all ranks (formats with
a per-tensor amax: NVFP4, FP8). Weights are identical across ranks and never reduced. SR seeds differ per rank.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from quant import layer_formats
from quant.distributed import AMAX_REDUCTIONS
from quant.errors import QuantError
from quant.functional import LayerQuantizer
from quant.layer_formats import LayerFormat
from quant.recipe import Recipe

NONE = "none"
QUANTIZABLE_TYPES = ("Linear", "Conv2d", "ConvTranspose2d")
_SEED_STRIDE = 1 << 20  # SR seed of layer i = seed * 2^20 + i: distinct streams for every (seed, layer) pair


def formats() -> tuple[str, ...]:
    """Valid values of ``Policy.format``."""
    return (NONE, *layer_formats.LAYER_FORMATS)


def default_recipe(fmt: str) -> Recipe:
    """The recipe a policy gets when none is given: TE's defaults, with the format's default backward mode."""
    if fmt == NONE or fmt not in layer_formats.LAYER_FORMATS:
        return Recipe()
    return Recipe(backward=layer_formats.LAYER_FORMATS[fmt].default_backward)


def _as_str_tuple(owner: str, name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise QuantError(f"{owner}.{name}={value!r} is not valid; expected a list of strings")
    if not all(isinstance(v, str) for v in value):
        raise QuantError(f"{owner}.{name}={value!r} is not valid; every entry must be a string")
    return tuple(value)


@dataclass(frozen=True)
class Policy:
    """A precision policy; see the module docstring for how each field selects layers."""

    format: str = NONE
    recipe: Recipe | None = None  # None = the format's default (TE's NVFP4BlockScaling(); STE for MXFP4/NF4/INT4)
    roles: tuple[str, ...] | None = None  # None = the format's default roles
    options: tuple[tuple[str, Any], ...] = ()  # format options, e.g. {"scale_rule": "rceil"} (a dict is accepted)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    include_types: tuple[str, ...] = QUANTIZABLE_TYPES
    exclude_types: tuple[str, ...] = ()
    keep_first_n: int = 0
    keep_last_n: int = 0
    block_containers: tuple[str, ...] | None = None
    model_defaults: bool = True
    seed: int = 0
    amax_reduction: str = "none"  # "world": MAX of the activation/gradient amax over all data-parallel ranks
    keep_high_precision: tuple[tuple[str, str], ...] = ()  # (module name, why) pairs chosen by the caller

    def __post_init__(self) -> None:
        if self.format not in formats():
            raise QuantError(f"Policy.format={self.format!r} is not valid; valid choices: {', '.join(formats())}")
        if self.recipe is None:
            object.__setattr__(self, "recipe", default_recipe(self.format))
        if not isinstance(self.recipe, Recipe):
            raise QuantError(f"Policy.recipe={self.recipe!r} is not valid; expected a quant.Recipe")
        for name in ("include", "exclude", "include_types", "exclude_types"):
            object.__setattr__(self, name, _as_str_tuple("Policy", name, getattr(self, name)))
        for name in ("include_types", "exclude_types"):
            bad = [t for t in getattr(self, name) if t not in QUANTIZABLE_TYPES]
            if bad:
                raise QuantError(
                    f"Policy.{name} has {bad!r}; valid choices: {', '.join(QUANTIZABLE_TYPES)}"
                )
        if self.block_containers is not None:
            object.__setattr__(
                self, "block_containers", _as_str_tuple("Policy", "block_containers", self.block_containers)
            )
        for name in ("keep_first_n", "keep_last_n", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 0):
                raise QuantError(f"Policy.{name}={value!r} is not valid; expected an integer >= 0")
        keeps = tuple(tuple(pair) for pair in self.keep_high_precision)
        if not all(len(pair) == 2 and all(isinstance(v, str) for v in pair) for pair in keeps):
            raise QuantError(f"Policy.keep_high_precision={self.keep_high_precision!r} is not valid; expected "
                             "(module name, reason) pairs of strings")
        object.__setattr__(self, "keep_high_precision", keeps)
        if self.amax_reduction not in AMAX_REDUCTIONS:
            raise QuantError(
                f"Policy.amax_reduction={self.amax_reduction!r} is not valid; valid choices: "
                f"{', '.join(AMAX_REDUCTIONS)}"
            )
        if not isinstance(self.model_defaults, bool):
            raise QuantError(f"Policy.model_defaults={self.model_defaults!r} is not valid; valid choices: True, False")
        options = dict(self.options) if isinstance(self.options, Mapping) else self.options
        if not isinstance(options, (dict, tuple, list)):
            raise QuantError(f"Policy.options={self.options!r} is not valid; expected a mapping of option -> value")
        object.__setattr__(self, "options", tuple(sorted(dict(options).items())))
        if self.format == NONE:
            if self.roles is not None or self.options:
                raise QuantError(
                    "Policy.roles and Policy.options must be empty with format='none' (nothing is quantized)"
                )
            if self.amax_reduction != "none":
                raise QuantError(
                    f"Policy.amax_reduction={self.amax_reduction!r} has no effect with format='none' (nothing is "
                    "quantized); valid choices: none"
                )
            return
        self._check_format_fields()

    def _check_format_fields(self) -> None:
        fmt = self.layer_format  # validates the options
        if self.amax_reduction != "none" and not fmt.per_tensor_amax:
            with_amax = [name for name, cls in layer_formats.LAYER_FORMATS.items() if cls.per_tensor_amax]
            raise QuantError(
                f"Policy.amax_reduction={self.amax_reduction!r} has no effect with format={self.format}: its scales "
                f"come from blocks, not from a per-tensor amax; formats with a per-tensor amax: {', '.join(with_amax)}"
            )
        object.__setattr__(self, "options", tuple(sorted(fmt.options().items())))
        if self.roles is not None:
            roles = _as_str_tuple("Policy", "roles", self.roles)
            bad = [r for r in roles if r not in fmt.roles]
            if bad or not roles:
                raise QuantError(
                    f"Policy.roles={list(roles)!r} is not valid for format={self.format}; valid: a non-empty subset "
                    f"of {', '.join(fmt.roles)}"
                )
            object.__setattr__(self, "roles", tuple(r for r in layer_formats.ROLES if r in roles))
        if self.recipe.backward not in fmt.backward_modes:
            raise QuantError(
                f"Recipe.backward={self.recipe.backward!r} is not valid for format={self.format}; valid choices: "
                f"{', '.join(fmt.backward_modes)}"
            )
        if not fmt.nvfp4_recipe_switches:
            changed = [f.name for f in fields(Recipe) if f.name != "backward" and getattr(self.recipe, f.name)]
            if changed:
                raise QuantError(
                    f"Recipe.{changed[0]}=True has no effect with format={self.format}: the RHT, stochastic-rounding "
                    "and 2D switches belong to NVFP4 (TE NVFP4BlockScaling); other formats use only Recipe.backward"
                )

    @property
    def layer_format(self) -> LayerFormat:
        """The format configured with this policy's options."""
        return layer_formats.get(self.format, dict(self.options))

    @property
    def effective_roles(self) -> frozenset[str]:
        """The roles that are quantized (empty for format='none')."""
        if self.format == NONE:
            return frozenset()
        return frozenset(self.roles if self.roles is not None else self.layer_format.default_roles)

    def quantizer(self, name: str, index: int) -> LayerQuantizer:
        """The quantization state of the ``index``-th quantized layer, called ``name`` (its SR stream is seeded from
        ``seed`` and ``index``)."""
        if self.format == NONE:
            raise QuantError("Policy.format='none' quantizes nothing; there is no layer quantizer to build")
        return LayerQuantizer(
            name=name,
            fmt=self.layer_format,
            recipe=self.recipe,
            roles=self.effective_roles,
            seed=self.seed * _SEED_STRIDE + index,
            amax_reduction=self.amax_reduction,
        )

    def describe(self) -> str:
        """One line for logs: format, recipe, roles and the selection rules that differ from the defaults."""
        if self.format == NONE:
            return "format=none (nothing quantized)"
        roles = ",".join(r for r in layer_formats.ROLES if r in self.effective_roles)
        parts = [f"format={self.format}", f"roles={roles}"]
        if self.layer_format.nvfp4_recipe_switches:
            parts.append(f"recipe={self.recipe}")
        else:
            parts.append(f"backward={self.recipe.backward}")
        parts += [f"{key}={value}" for key, value in self.options]
        defaults = Policy()
        for name in ("include", "exclude", "include_types", "exclude_types", "keep_first_n", "keep_last_n",
                     "block_containers", "model_defaults", "seed", "amax_reduction"):
            if getattr(self, name) != getattr(defaults, name):
                parts.append(f"{name}={getattr(self, name)}")
        return " ".join(parts)
