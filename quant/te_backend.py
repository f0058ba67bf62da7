"""Transformer Engine (TE) as the backend of a precision policy: which backend runs, TE's recipe, te.Linear swaps.

Why: on Blackwell a study must run TE's real NVFP4 recipe, and on Hopper TE's FP8 recipes, from the same policy and
command line as the emulation, so an emulated arm and a native arm are provably the same recipe. Three decisions live
here, each one a plain function a CPU test can call with the hardware gate monkeypatched:

* ``resolve_backend(policy, requested, ...)``: ``emulated`` runs ``quant``'s layers (and is the only backend for
  per-role formats, ``Policy.role_overrides``: ``policy_gap`` names them); ``te`` runs TE or fails with
  TE's own reason (``is_nvfp4_available`` / ``is_fp8_available`` / ``is_fp8_block_scaling_available`` with
  ``return_reason=True``) and the hint ``backend=emulated``; ``auto`` takes TE where it can serve the policy and the
  emulation elsewhere, returning the reason for the caller to log once. Without TE installed the reason names
  ``INSTALL_COMMAND``. NVFP4 never computes in FP16 on any backend (TE's FP4 GEMM has no FP16 output).
* ``build_recipe(policy, fp8_recipe)``: TE's recipe built from the same fields as the emulation:
  ``NVFP4BlockScaling(**policy.recipe.to_te_kwargs())`` for nvfp4; ``DelayedScaling`` / ``Float8CurrentScaling`` /
  ``Float8BlockScaling`` for fp8 (``fp8_recipe`` delayed / current / block; the emulation implements current
  scaling only). Every argument that changes numerics is passed explicitly, so TE's ``NVTE_*`` environment defaults
  (read when TE is imported) never change a run.
* ``apply(model, policy, fp8_recipe)``: ``quant.apply`` selects the layers (the policy's rules, unchanged), then each
  selected ``nn.Linear`` whose shape TE's GEMM accepts becomes a ``TELinear`` (a ``te.Linear`` with the weights and
  bias copied, FP32 master weights kept). Convolutions stay emulated (TE has no convolution module), as do linears
  of shapes TE rejects; the report's ``backend`` column and reason say so per layer. Layers the policy keeps in high
  precision stay plain modules. The forward then runs under ``autocast(recipe)`` (``te.autocast``), which
  ``trainers.precision`` enters around every step, never around backward.

``TELinear``'s state_dict has exactly nn.Linear's keys (TE's ``_extra_state`` is dropped on save and not required on
load), so checkpoints move freely between the TE and the emulated backend. The cost: DelayedScaling's amax history
is not checkpointed and restarts on resume; current scaling and NVFP4 have no such state. TE is an optional import:
nothing here imports it until a function needs it.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from quant.apply import QuantReport
from quant.apply import apply as apply_policy
from quant.errors import QuantError
from quant.modules import QuantLinear
from quant.policy import NONE, Policy

TESTED_VERSION = "2.20.2"
INSTALL_COMMAND = f'pip install --no-build-isolation "transformer_engine[pytorch]=={TESTED_VERSION}"'
BACKENDS = ("auto", "emulated", "te")
FP8_RECIPES = ("delayed", "current", "block")
TE_FORMATS = ("nvfp4", "fp8")
# Alignment of in/out features for TE's GEMMs: FP8 needs dims % 16 (TE's assert_dim_for_fp8_exec); NVFP4's
# is_quantizable needs 16, but TE's optimized NVFP4 kernels and its reference GEMM need 32 (SPEC 1.5), so 32.
TE_ALIGNMENT = {"fp8": 16, "nvfp4": 32}
_TE_FP8_FORMAT = {"hybrid": "HYBRID", "e4m3": "E4M3"}  # our fp8_format option -> transformer_engine Format member
_EXTRA_STATE = "_extra_state"  # nn.Module's key for get_extra_state(), where TE keeps FP8 metadata
_te_linear_class: type[nn.Module] | None = None


@dataclass(frozen=True)
class BackendChoice:
    """Who runs a policy's quantized GEMMs: ``backend`` is ``"te"`` or ``"emulated"``; ``reason`` says why TE does
    not ("" when it does, when the emulation was asked for, or when nothing is quantized)."""

    requested: str
    backend: str
    reason: str = ""

    @property
    def uses_te(self) -> bool:
        return self.backend == "te"

    def notice(self) -> str | None:
        """The one line to log when ``auto`` fell back to the emulation (None otherwise)."""
        if self.requested == "auto" and self.backend == "emulated" and self.reason:
            return f"quant.backend=auto runs the emulation: {self.reason}"
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Import and hardware gates (CPU tests replace _import_te / _import_te_recipe and torch.cuda.is_available)
# ---------------------------------------------------------------------------------------------------------------------
def _import_te() -> ModuleType:
    """``transformer_engine.pytorch``; raises ImportError when TE is not installed."""
    return importlib.import_module("transformer_engine.pytorch")


def _import_te_recipe() -> ModuleType:
    """``transformer_engine.common.recipe`` (the recipe dataclasses and ``Format``)."""
    return importlib.import_module("transformer_engine.common.recipe")


def load_te() -> tuple[ModuleType | None, str]:
    """(``transformer_engine.pytorch``, "") or (None, why it cannot be used, naming the install command)."""
    try:
        te = _import_te()
    except ImportError as exc:
        return None, f"Transformer Engine is not installed ({exc}); install it with: {INSTALL_COMMAND}"
    except Exception as exc:  # noqa: BLE001 - a broken TE install raises OSError/RuntimeError at import time
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, (f"Transformer Engine failed to import ({type(exc).__name__}: {first_line}); reinstall it "
                      f"with: {INSTALL_COMMAND}")
    if not hasattr(te, "autocast"):
        version = getattr(te, "__version__", "unknown")
        return None, (f"Transformer Engine {version} has no te.autocast (NVFP4 recipes need TE >= 2.8; tested "
                      f"{TESTED_VERSION}); upgrade with: {INSTALL_COMMAND}")
    return te, ""


def _check_fp8_recipe(policy: Policy, fp8_recipe: str) -> None:
    if fp8_recipe not in FP8_RECIPES:
        raise QuantError(f"fp8_recipe={fp8_recipe!r} is not valid; valid choices: {', '.join(FP8_RECIPES)}")
    if fp8_recipe != "current" and policy.format != "fp8":
        raise QuantError(f"fp8_recipe={fp8_recipe} applies to format=fp8 only, not format={policy.format}; valid: "
                         "current (the default)")


def policy_gap(policy: Policy, fp8_recipe: str = "current") -> str | None:
    """What of ``policy`` no TE recipe expresses (None if TE's recipe is exactly this policy)."""
    if policy.format not in TE_FORMATS:
        return (f"Transformer Engine has no recipe for format={policy.format} (TE runs nvfp4 with NVFP4BlockScaling "
                "and fp8 with DelayedScaling, Float8CurrentScaling or Float8BlockScaling)")
    if policy.role_overrides:
        return (f"role_overrides={policy.describe_overrides()}: TE's built-in recipes (NVFP4BlockScaling, "
                "DelayedScaling, Float8CurrentScaling, Float8BlockScaling) quantize every operand of a GEMM in one "
                "format family, and this backend builds no TE CustomRecipe (TE's experimental per-role recipes)")
    if policy.amax_reduction != "none":
        return (f"amax_reduction={policy.amax_reduction}: TE's layers reduce no activation or gradient amax under data "
                "parallelism (TE does it only for sequence-parallel layers, over their tensor-parallel group)")
    backward = policy.recipe.backward
    needed = {"weight", "input"} | ({"grad"} if backward == "full" else set())
    missing = sorted(needed - policy.effective_roles)
    if missing:
        return (f"roles={sorted(policy.effective_roles)} keeps {', '.join(missing)} in high precision, which no TE "
                f"recipe does (TE quantizes the weight, the input and, with backward=full, the output gradient of "
                f"every GEMM it runs)")
    if policy.format == "fp8":
        fp8_format = dict(policy.options).get("fp8_format", "hybrid")
        if fp8_format not in _TE_FP8_FORMAT:
            return f"fp8_format={fp8_format}: TE refuses pure E5M2 training (valid with TE: hybrid, e4m3)"
        if fp8_recipe == "delayed" and backward != "full":
            return f"backward={backward} with fp8_recipe=delayed: TE's DelayedScaling supports only backward=full"
    return None


def hardware_support(te: ModuleType, policy: Policy, fp8_recipe: str = "current") -> tuple[bool, str]:
    """TE's own availability check for the recipe this policy needs: (available, TE's reason)."""
    if policy.format == "nvfp4":
        gate = te.is_nvfp4_available
    elif fp8_recipe == "block" and hasattr(te, "is_fp8_block_scaling_available"):
        gate = te.is_fp8_block_scaling_available
    else:
        gate = te.is_fp8_available
    available, reason = gate(return_reason=True)
    return bool(available), str(reason)


def te_support(policy: Policy, fp8_recipe: str = "current", device: str = "cuda") -> tuple[bool, str]:
    """Can TE run ``policy`` here? (True, "") or (False, the first reason: recipe gap, device, install, hardware)."""
    gap = policy_gap(policy, fp8_recipe)
    if gap:
        return False, gap
    if device != "cuda":
        return False, f"the run is on {device}; Transformer Engine runs on CUDA GPUs only"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False); Transformer Engine needs one"
    te, reason = load_te()
    if te is None:
        return False, reason
    return hardware_support(te, policy, fp8_recipe)


def resolve_backend(policy: Policy, requested: str = "auto", *, precision: str = "bf16-mixed",
                    fp8_recipe: str = "current", device: str = "cuda") -> BackendChoice:
    """Pick the backend for ``policy``. ``precision`` is the Lightning precision string of the run, ``device`` the
    accelerator's device type. Raises ``QuantError`` when the requested backend cannot run the policy."""
    if requested not in BACKENDS:
        raise QuantError(f"backend={requested!r} is not valid; valid choices: {', '.join(BACKENDS)}")
    _check_fp8_recipe(policy, fp8_recipe)
    nvfp4_roles = [] if policy.format == NONE else [
        role for role, fmt in policy.quantized_formats().items() if fmt.name == "nvfp4"]
    if nvfp4_roles and precision == "16-mixed":
        raise QuantError(
            f"NVFP4 cannot compute in float16 on any backend (backend={requested}): the NVFP4 roles "
            f"({', '.join(nvfp4_roles)}) need TE's FP4 GEMM, which has no FP16 output, and its RHT takes only BF16 "
            "input; run the NVFP4 arm with precision=bf16-mixed"
        )
    if policy.format == NONE:
        return BackendChoice(requested, "emulated")  # nothing is quantized: plain modules under any backend
    if requested == "emulated":
        if fp8_recipe != "current":
            raise QuantError(_emulated_fp8_only_current(fp8_recipe))
        return BackendChoice(requested, "emulated")
    available, reason = te_support(policy, fp8_recipe, device)
    if available:
        return BackendChoice(requested, "te")
    if requested == "te":
        raise QuantError(
            f"quant.backend=te cannot run format={policy.format}: {reason}. Run the emulation instead: "
            "quant.backend=emulated (or quant.backend=auto, which falls back to it)"
        )
    if fp8_recipe != "current":
        raise QuantError(f"quant.backend=auto: Transformer Engine cannot run this policy ({reason}), and "
                         f"{_emulated_fp8_only_current(fp8_recipe)}")
    return BackendChoice(requested, "emulated", reason)


def _emulated_fp8_only_current(fp8_recipe: str) -> str:
    return (f"the emulation implements per-tensor current scaling only (TE Float8CurrentScaling), not "
            f"fp8_recipe={fp8_recipe}; valid: fp8_recipe=current, or backend=te on a GPU where TE runs it")


# ---------------------------------------------------------------------------------------------------------------------
# TE recipe
# ---------------------------------------------------------------------------------------------------------------------
def _supported_fields(cls: type, values: dict[str, object]) -> dict[str, object]:
    """The entries of ``values`` that are constructor fields of the (pydantic) dataclass ``cls``."""
    names = set(getattr(cls, "__dataclass_fields__", {}))
    return {name: value for name, value in values.items() if name in names}


def build_recipe(policy: Policy, fp8_recipe: str = "current") -> object:
    """TE's recipe object for ``policy`` (see the module docstring); QuantError if no TE recipe expresses it."""
    _check_fp8_recipe(policy, fp8_recipe)
    gap = policy_gap(policy, fp8_recipe)
    if gap:
        raise QuantError(f"no Transformer Engine recipe for this policy: {gap}")
    recipe = _import_te_recipe()
    backward_override = policy.recipe.to_te_kwargs()["backward_override"]
    if policy.format == "nvfp4":
        cls = recipe.NVFP4BlockScaling
        # TE 2.17+ options that are off by default but read NVTE_* environment variables: pin them off.
        pinned = _supported_fields(cls, {"row_scaled_activation": False, "nvfp4_4over6": "none"})
        return cls(**policy.recipe.to_te_kwargs(), **pinned)
    fp8_format = getattr(recipe.Format, _TE_FP8_FORMAT[dict(policy.options).get("fp8_format", "hybrid")])
    if fp8_recipe == "delayed":
        return recipe.DelayedScaling(fp8_format=fp8_format, backward_override=None)
    cls = recipe.Float8CurrentScaling if fp8_recipe == "current" else recipe.Float8BlockScaling
    return cls(fp8_format=fp8_format, backward_override=backward_override)


def autocast(recipe: object):
    """``te.autocast(enabled=True, recipe=recipe)``: the context the forward of TE layers must run in."""
    te, reason = load_te()
    if te is None:
        raise QuantError(reason)
    return te.autocast(enabled=True, recipe=recipe)


# ---------------------------------------------------------------------------------------------------------------------
# Which layers TE runs, and the swap
# ---------------------------------------------------------------------------------------------------------------------
def te_layer_problem(fmt: str, module: nn.Module) -> str | None:
    """Why the quantized ``module`` stays on the emulation under the TE backend (None: TE runs it)."""
    if type(module) is not QuantLinear:
        kind = type(module).__name__.removeprefix("Quant")
        return f"Transformer Engine has no {kind} module: this layer runs on the emulation"
    align = TE_ALIGNMENT[fmt]
    for name, size in (("in_features", module.in_features), ("out_features", module.out_features)):
        if size % align:
            return (f"{name}={size} is not a multiple of {align}, which TE's {fmt.upper()} GEMM needs: this layer "
                    "runs on the emulation")
    return None


def _te_role_words(policy: Policy, fp8_recipe: str, emulated: dict[str, str]) -> dict[str, str]:
    """What TE's recipe does to each role, for the report (NVFP4 and FP8 current scaling: as the emulation)."""
    if policy.format == "nvfp4" or fp8_recipe == "current":
        return emulated
    fmt = policy.layer_format
    words = {}
    for role, word in emulated.items():
        if word == "-":
            words[role] = word
        elif fp8_recipe == "delayed":
            words[role] = f"fp8 {fmt.element_format(role)} per-tensor delayed"
        else:
            words[role] = f"fp8 {fmt.element_format(role)} {'128x128' if role == 'weight' else '1x128'}"
    return words


def te_report(model: nn.Module, report: QuantReport, fp8_recipe: str = "current") -> QuantReport:
    """``report`` (of ``quant.apply`` on ``model``) with each quantized row's backend: ``te`` where TE can run the
    layer, else ``emulated`` with the reason. Pure: reads the model, changes nothing."""
    modules = dict(model.named_modules())
    rows = []
    for row in report.rows:
        if not row.quantized:
            rows.append(row)
            continue
        problem = te_layer_problem(report.policy.format, modules[row.name])
        if problem:
            rows.append(dataclasses.replace(row, backend="emulated", reason=problem))
            continue
        roles = _te_role_words(report.policy, fp8_recipe, {"weight": row.weight, "input": row.input, "grad": row.grad})
        rows.append(dataclasses.replace(row, backend="te", **roles))
    return dataclasses.replace(report, rows=tuple(rows))


def te_linear_class() -> type[nn.Module]:
    """``TELinear``: a ``te.Linear`` whose state_dict holds nn.Linear's keys only (built once, on first use)."""
    global _te_linear_class
    if _te_linear_class is None:
        te, reason = load_te()
        if te is None:
            raise QuantError(reason)

        class TELinear(te.Linear):
            """``te.Linear`` without ``_extra_state`` in its state_dict, so checkpoints load into ``nn.Linear`` /
            ``QuantLinear`` and back (TE keeps FP8 metadata there; see the module docstring for what is lost)."""

            def _save_to_state_dict(self, destination, prefix, keep_vars):
                super()._save_to_state_dict(destination, prefix, keep_vars)
                destination.pop(prefix + _EXTRA_STATE, None)

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
                if prefix + _EXTRA_STATE in missing_keys:
                    missing_keys.remove(prefix + _EXTRA_STATE)

        TELinear.__module__ = __name__
        TELinear.__qualname__ = "TELinear"
        _te_linear_class = TELinear
    return _te_linear_class


def __getattr__(name: str) -> object:
    """``quant.te_backend.TELinear`` resolves lazily (pickle finds the class by this name)."""
    if name == "TELinear":
        return te_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_te_linear(module: nn.Linear) -> nn.Module:
    """A ``TELinear`` on CUDA with ``module``'s weight and bias copied, in the weight's dtype (FP32 masters stay FP32),
    the same requires_grad flags and training mode."""
    cls = te_linear_class()
    layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                params_dtype=module.weight.dtype, device="cuda")
    with torch.no_grad():
        layer.weight.copy_(module.weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    layer.weight.requires_grad_(module.weight.requires_grad)
    if module.bias is not None:
        layer.bias.requires_grad_(module.bias.requires_grad)
    return layer.train(module.training)


def apply(model: nn.Module, policy: Policy, fp8_recipe: str = "current") -> QuantReport:
    """Quantize ``model`` in place for the TE backend: ``quant.apply`` selects and swaps (emulated layers), then every
    row ``te_report`` gives to TE becomes a ``TELinear``. Returns the report with its ``backend`` column."""
    _check_fp8_recipe(policy, fp8_recipe)
    gap = policy_gap(policy, fp8_recipe)
    if gap:
        raise QuantError(f"the Transformer Engine backend cannot run this policy: {gap}")
    report = te_report(model, apply_policy(model, policy), fp8_recipe)
    modules = dict(model.named_modules())
    for row in report.rows:
        if row.backend == "te":
            parent_name, _, child = row.name.rpartition(".")
            setattr(modules[parent_name], child, to_te_linear(modules[row.name]))
    return report
