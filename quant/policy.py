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

Per-role formats (``role_overrides``, ModelOpt's separate ``*weight_quantizer`` / ``*input_quantizer`` configs): a
mapping role -> ``{"format": <layer format>, "options": {...}}`` (a bare format name is accepted for no options) gives
that role its own format; the other quantized roles keep ``format``. Examples: W4A8 ``format="nvfp4",
role_overrides={"input": {"format": "fp8", "options": {"fp8_format": "e4m3"}}}``; NVFP4 with FP8 E5M2 gradients
``{"grad": {"format": "fp8", "options": {"fp8_format": "e5m2"}}}``; NF4 weights with FP8 activations ``format="nf4",
role_overrides={"input": "fp8"}``. Rules:

* A role with an override is quantized even if the base format would not quantize it (``roles=None`` means the base
  format's default roles plus the overridden ones); an explicit ``roles`` must list every overridden role.
* The override's format must be able to quantize that role and run the recipe's backward mode; its options are
  validated by the format. A grad override needs ``backward=full`` (dY is quantized only there). An override equal to
  the base format and options is dropped (the policy is the plain one).
* The recipe's RHT / SR / 2D switches act on the NVFP4 roles only (2D: an NVFP4 weight; SR: an NVFP4 dY; RHT: the
  wgrad GEMM when dY^T and X^T are both NVFP4, else it would not cancel). Setting one needs at least one NVFP4 role.
* A GEMM with operands of two formats multiplies them dequantized with FP32 accumulation (``quant.gemm``); each
  format's block constraints apply to its own operands (``layer_formats.unsupported_reason``).
* Transformer Engine's built-in recipes cannot express per-role formats: ``quant.te_backend`` refuses them by name
  (``auto`` runs the emulation). ``quant.export`` packs the weight in its own format and records the other roles'.

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


def _override_entries(value: object) -> list[tuple[str, str, dict[str, Any]]]:
    """(role, format, options) of each entry of ``Policy.role_overrides`` in any accepted spelling: a mapping role ->
    {"format", "options"} or role -> format name, or the canonical (role, format, options) triples."""
    expected = ("Policy.role_overrides={!r} is not valid; expected a mapping role -> {{format, options}}, e.g. "
                "{{'input': {{'format': 'fp8', 'options': {{'fp8_format': 'e4m3'}}}}}}")
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (tuple, list)) and all(isinstance(v, (tuple, list)) and len(v) == 3 for v in value):
        items = [(role, {"format": name, "options": options}) for role, name, options in value]
    else:
        raise QuantError(expected.format(value))
    entries = []
    for role, spec in items:
        where = f"Policy.role_overrides.{role}"
        if isinstance(spec, str):
            spec = {"format": spec}
        if not isinstance(spec, Mapping):
            raise QuantError(expected.format(value))
        unknown = sorted(set(spec) - {"format", "options"})
        if unknown:
            raise QuantError(f"{where} has key {unknown[0]!r}; valid keys: format, options")
        if not isinstance(spec.get("format"), str):
            raise QuantError(f"{where}.format={spec.get('format')!r} is not valid; valid choices: "
                             f"{', '.join(layer_formats.LAYER_FORMATS)}")
        options = spec.get("options") or {}
        if isinstance(options, (tuple, list)):
            options = dict(options)
        if not isinstance(options, Mapping):
            raise QuantError(f"{where}.options={options!r} is not valid; expected a mapping of option -> value")
        entries.append((str(role), spec["format"], dict(options)))
    return entries


def _overrides_text(overrides: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...]) -> str:
    """``input:fp8(fp8_format=e4m3),grad:...``: the canonical overrides in one token."""
    def one(role: str, name: str, options: tuple[tuple[str, Any], ...]) -> str:
        spelled = ",".join(f"{key}={value}" for key, value in options)
        return f"{role}:{name}" + (f"({spelled})" if spelled else "")
    return ",".join(one(*entry) for entry in overrides)


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
    # role -> {"format": name, "options": {...}} (a dict is accepted); stored as (role, format, options) triples in
    # ROLES order with every option of the format, like ``options``
    role_overrides: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()

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
            if self.roles is not None or self.options or self.role_overrides:
                raise QuantError(
                    "Policy.roles, Policy.options and Policy.role_overrides must be empty with format='none' (nothing "
                    "is quantized); give a base format, e.g. format='nvfp4'"
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
        object.__setattr__(self, "options", tuple(sorted(fmt.options().items())))
        object.__setattr__(self, "role_overrides", self._checked_overrides())
        overridden = {role for role, _, _ in self.role_overrides}
        if self.roles is not None:
            roles = _as_str_tuple("Policy", "roles", self.roles)
            bad = [r for r in roles if r not in self.role_format(r).roles]
            if bad or not roles:
                own = f" (roles with an override: {', '.join(sorted(overridden))})" if overridden else ""
                raise QuantError(
                    f"Policy.roles={list(roles)!r} is not valid for format={self.format}{own}; valid: a non-empty "
                    f"subset of {', '.join(fmt.roles)}, or give a role its own format in role_overrides"
                )
            missing = sorted(overridden - set(roles))
            if missing:
                raise QuantError(
                    f"Policy.role_overrides.{missing[0]} is set but Policy.roles={list(roles)!r} leaves {missing[0]} "
                    f"unquantized; add {missing[0]} to roles, or drop the override"
                )
            object.__setattr__(self, "roles", tuple(r for r in layer_formats.ROLES if r in roles))
        if self.recipe.backward not in fmt.backward_modes:
            raise QuantError(
                f"Recipe.backward={self.recipe.backward!r} is not valid for format={self.format}; valid choices: "
                f"{', '.join(fmt.backward_modes)}"
            )
        quantized = self.quantized_formats()
        if self.amax_reduction != "none" and not any(f.per_tensor_amax for f in quantized.values()):
            with_amax = [name for name, cls in layer_formats.LAYER_FORMATS.items() if cls.per_tensor_amax]
            raise QuantError(
                f"Policy.amax_reduction={self.amax_reduction!r} has no effect with {self._formats_phrase()}: its "
                f"scales come from blocks, not from a per-tensor amax; formats with a per-tensor amax: "
                f"{', '.join(with_amax)}"
            )
        if not any(f.nvfp4_recipe_switches for f in quantized.values()):
            changed = [f.name for f in fields(Recipe) if f.name != "backward" and getattr(self.recipe, f.name)]
            if changed:
                raise QuantError(
                    f"Recipe.{changed[0]}=True has no effect with {self._formats_phrase()}: the RHT, "
                    "stochastic-rounding and 2D switches belong to NVFP4 (TE NVFP4BlockScaling); other formats use "
                    "only Recipe.backward"
                )

    def _checked_overrides(self) -> tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...]:
        """``role_overrides`` validated and in canonical form (see the module docstring for the rules)."""
        checked: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {}
        for role, name, options in _override_entries(self.role_overrides):
            where = f"Policy.role_overrides.{role}"
            if role not in layer_formats.ROLES:
                raise QuantError(f"Policy.role_overrides has role {role!r}; valid roles: "
                                 f"{', '.join(layer_formats.ROLES)}")
            if name not in layer_formats.LAYER_FORMATS:
                raise QuantError(f"{where}.format={name!r} is not valid; valid choices: "
                                 f"{', '.join(layer_formats.LAYER_FORMATS)}")
            try:
                fmt = layer_formats.get(name, options)
            except QuantError as exc:
                raise QuantError(f"{where}: {exc}") from None
            if role not in fmt.roles:
                able = [n for n, cls in layer_formats.LAYER_FORMATS.items() if role in cls.roles]
                raise QuantError(f"{where}.format={name} cannot quantize the {role} role (it quantizes "
                                 f"{', '.join(fmt.roles)}); formats for {role}: {', '.join(able)}")
            if self.recipe.backward not in fmt.backward_modes:
                raise QuantError(f"{where}.format={name} cannot run Recipe.backward={self.recipe.backward!r}; valid "
                                 f"choices with {name}: {', '.join(fmt.backward_modes)}")
            if role == "grad" and self.recipe.backward != "full":
                raise QuantError(f"{where} has no effect with Recipe.backward={self.recipe.backward!r}: the output "
                                 "gradient is quantized only with backward=full; valid: backward=full, or drop it")
            canonical = (name, tuple(sorted(fmt.options().items())))
            if canonical != (self.format, self.options):
                checked[role] = canonical
        return tuple((role, *checked[role]) for role in layer_formats.ROLES if role in checked)

    def _formats_phrase(self) -> str:
        """``format=<base>`` plus the overrides, for error messages."""
        if not self.role_overrides:
            return f"format={self.format}"
        return f"format={self.format} and role_overrides {self.describe_overrides()}"

    def describe_overrides(self) -> str:
        """The overrides in one token, ``input:fp8(fp8_format=e4m3),grad:...`` ("" without overrides)."""
        return _overrides_text(self.role_overrides)

    @property
    def layer_format(self) -> LayerFormat:
        """The format configured with this policy's options."""
        return layer_formats.get(self.format, dict(self.options))

    def role_format(self, role: str) -> LayerFormat:
        """The format that quantizes ``role``: its override in ``role_overrides``, else ``layer_format``."""
        if self.format == NONE:
            raise QuantError("Policy.format='none' quantizes nothing; no role has a format")
        for overridden, name, options in self.role_overrides:
            if overridden == role:
                return layer_formats.get(name, dict(options))
        return self.layer_format

    def quantized_formats(self) -> dict[str, LayerFormat]:
        """Each quantized role -> its format, in ROLES order (empty for format='none')."""
        return {role: self.role_format(role) for role in layer_formats.ROLES if role in self.effective_roles}

    @property
    def wgrad_rht(self) -> bool:
        """Do the layers rotate the wgrad operands with the RHT (``layer_formats.wgrad_rht``; needs BF16 compute)?"""
        return self.format != NONE and layer_formats.wgrad_rht(self.quantized_formats(), self.recipe)

    @property
    def effective_roles(self) -> frozenset[str]:
        """The roles that are quantized (empty for format='none'): ``roles``, else the base format's default roles
        plus every role with an override."""
        if self.format == NONE:
            return frozenset()
        if self.roles is not None:
            return frozenset(self.roles)
        return frozenset(self.layer_format.default_roles) | {role for role, _, _ in self.role_overrides}

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
            role_formats={role: self.role_format(role) for role, _, _ in self.role_overrides},
        )

    def describe(self) -> str:
        """One line for logs: format, recipe, roles and the selection rules that differ from the defaults."""
        if self.format == NONE:
            return "format=none (nothing quantized)"
        roles = ",".join(r for r in layer_formats.ROLES if r in self.effective_roles)
        parts = [f"format={self.format}", f"roles={roles}"]
        if self.role_overrides:
            parts.append(f"role_overrides={self.describe_overrides()}")
        if any(f.nvfp4_recipe_switches for f in self.quantized_formats().values()):
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
