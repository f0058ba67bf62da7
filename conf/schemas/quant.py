"""Schema of ``conf/quant/*``: one precision policy per file.

Every file sets fields of this one dataclass only. ``precision`` is the Lightning precision of the compute
(``32-true``, ``16-mixed``, ``bf16-mixed``); the fields below it describe what gets quantized and are turned into a
frozen ``quant.Policy`` by ``to_policy()``. This mirror is mutable because Hydra needs mutable nodes; all the
validation of the policy itself lives in ``quant`` (``quant.Recipe``, ``quant.Policy``), and ``__post_init__`` builds
the policy once so a bad value fails at composition time with ``ConfigError`` naming the ``quant.<field>``.

``backend`` picks who runs the quantized GEMMs: ``emulated`` is ``quant``'s own layers, ``te`` Transformer Engine's
modules (or a clear error with TE's reason), ``auto`` TE where it can serve the policy and the emulation elsewhere
(``quant.te_backend.resolve_backend``, called by ``trainers.job``; see docs/te.md). ``fp8_recipe`` picks TE's FP8
recipe for ``format=fp8``: ``current`` (Float8CurrentScaling, what the emulation implements), ``delayed``
(DelayedScaling) or ``block`` (Float8BlockScaling); the last two run on TE only.

``role_overrides`` gives a role its own format (``quant.Policy.role_overrides``): role -> ``{format, options}``, e.g.
W4A8 ``quant=nvfp4 +quant.role_overrides.input.format=fp8 +quant.role_overrides.input.options.fp8_format=e4m3``, or
FP8 E5M2 gradients ``+quant.role_overrides.grad.format=fp8`` (fp8's default ``hybrid`` gives dY E5M2). The precision
checks below follow the roles that are NVFP4, whichever field made them so.

``amax_reduction`` is for data-parallel runs (``trainer=ddp|fsdp``, docs/distributed.md): ``none`` quantizes
activations and gradients with each rank's own amax, as TE does; ``world`` takes the MAX over all ranks (nvfp4 and fp8,
emulated backend only: TE has no such option for data parallelism, so ``auto`` then runs the emulation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

import quant
from conf.errors import ConfigError
from conf.schemas.common import check_choice, store_schema
from quant.distributed import AMAX_REDUCTIONS
from quant.policy import QUANTIZABLE_TYPES, default_recipe, formats
from quant.recipe import BACKWARD_MODES
from quant.te_backend import BACKENDS, FP8_RECIPES

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


@dataclass
class QuantConfig:
    name: str = MISSING  # short policy name used in run names and as the W&B job_type
    precision: str = "32-true"
    format: str = "none"  # none | nvfp4 | mxfp4 | nf4 | int4 | fp8
    backend: str = "auto"
    fp8_recipe: str = "current"  # format=fp8 on TE: delayed | current | block (the emulation implements current)
    # quant.Recipe (TE NVFP4BlockScaling); the three switches apply to nvfp4 only
    # full | dequantized | high_precision (TE backward_override None/"dequantized"/"high_precision");
    # null = the format's default (full for nvfp4 and fp8, dequantized for mxfp4, nf4, int4)
    backward: Optional[str] = None
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    roles: Optional[list[str]] = None  # subset of weight, input, grad; null = the format's default
    options: dict[str, Any] = field(default_factory=dict)  # format options (scale_rule, blocksize, fp8_format, ...)
    # role -> {format: <layer format>, options: {...}}: that role in its own format (W4A8, FP8 gradients, ...)
    role_overrides: dict[str, Any] = field(default_factory=dict)
    # layer selection (quant.policy): fnmatch patterns on module names, GEMM types, first/last blocks
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    include_types: list[str] = field(default_factory=lambda: list(QUANTIZABLE_TYPES))
    exclude_types: list[str] = field(default_factory=list)
    keep_first_n: int = 0
    keep_last_n: int = 0
    block_containers: Optional[list[str]] = None  # null = the model's quant_block_containers or auto-detection
    model_defaults: bool = True  # honour the model's high_precision_modules (UNet stem/head, LLM embeddings/head)
    seed: int = 0  # stochastic-rounding seed; the YAML files set ${seed} so it follows the run's seed
    amax_reduction: str = "none"  # none | world: activation/gradient amax per rank, or the MAX over all ranks
    # keep in BF16 the layers the kurtosis study flags (robust z-score above this value within their module type),
    # measured on the initial weights or on the weights of kurtosis_ckpt (a training checkpoint); null = off
    exclude_by_kurtosis: Optional[float] = None
    kurtosis_ckpt: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("quant", "precision", self.precision, PRECISIONS)
        check_choice("quant", "format", self.format, formats())
        check_choice("quant", "backend", self.backend, BACKENDS)
        check_choice("quant", "fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        if self.fp8_recipe != "current" and self.format != "fp8":
            raise ConfigError(f"quant.fp8_recipe={self.fp8_recipe} applies to quant.format=fp8 only (format="
                              f"{self.format}); valid: current (the default)")
        if self.fp8_recipe != "current" and self.backend == "emulated":
            raise ConfigError(f"quant.fp8_recipe={self.fp8_recipe} runs on Transformer Engine only: the emulation "
                              "implements per-tensor current scaling; valid: quant.fp8_recipe=current, or "
                              "quant.backend=te|auto on a GPU with TE")
        if self.backward is not None:
            check_choice("quant", "backward", self.backward, BACKWARD_MODES)
        check_choice("quant", "amax_reduction", self.amax_reduction, AMAX_REDUCTIONS)
        if self.exclude_by_kurtosis is not None and self.format == "none":
            raise ConfigError("quant.exclude_by_kurtosis has no effect with quant.format=none (nothing is quantized); "
                              "valid: null, or a quantized policy such as quant=nvfp4")
        if self.exclude_by_kurtosis is not None and self.exclude_by_kurtosis <= 0:
            raise ConfigError(f"quant.exclude_by_kurtosis={self.exclude_by_kurtosis} is out of range; valid range: "
                              "(0, inf) (a robust z-score, e.g. 3.5)")
        if self.kurtosis_ckpt is not None and self.exclude_by_kurtosis is None:
            raise ConfigError("quant.kurtosis_ckpt is set but quant.exclude_by_kurtosis is null; set a z threshold "
                              "such as quant.exclude_by_kurtosis=3.5")
        policy = self.to_policy()
        nvfp4_roles = [] if policy.format == "none" else [
            role for role, fmt in policy.quantized_formats().items() if fmt.name == "nvfp4"]
        if nvfp4_roles and self.precision == "16-mixed":
            raise ConfigError(
                f"quant.precision=16-mixed is not valid with {self._nvfp4_source(nvfp4_roles)}: TE's FP4 GEMM has no "
                "FP16 output and its RHT takes only BF16 input, so the NVFP4 arm computes in BF16; valid choices: "
                "bf16-mixed, 32-true (an FP16 baseline is compared with an NVFP4 arm that runs bf16-mixed)"
            )
        if self.precision == "32-true" and policy.wgrad_rht:
            raise ConfigError(
                f"quant.precision=32-true is not valid with {self._nvfp4_source(nvfp4_roles)} and backward=full: the "
                "wgrad RHT needs BF16 operands (TE: RHT is only supported for bfloat16 input); valid: "
                "precision=bf16-mixed, or quant.disable_rht=true"
            )

    def _nvfp4_source(self, nvfp4_roles: list[str]) -> str:
        """Which field makes these roles NVFP4: ``quant.format=nvfp4`` or ``quant.role_overrides.<role>.format``."""
        overridden = [role for role in nvfp4_roles if role in self.role_overrides]
        if self.format == "nvfp4" and len(overridden) < len(nvfp4_roles):
            return "quant.format=nvfp4"
        return f"quant.role_overrides.{overridden[0]}.format=nvfp4"

    def _backward(self) -> str:
        return self.backward if self.backward is not None else default_recipe(self.format).backward

    def to_policy(self) -> quant.Policy:
        """The frozen ``quant.Policy`` of this config (``ConfigError`` for a value ``quant`` rejects)."""
        try:
            recipe = quant.Recipe(
                disable_rht=self.disable_rht,
                disable_stochastic_rounding=self.disable_stochastic_rounding,
                disable_2d_quantization=self.disable_2d_quantization,
                backward=self._backward(),
            )
            return quant.Policy(
                format=self.format,
                recipe=recipe,
                roles=None if self.roles is None else tuple(self.roles),
                options=dict(self.options),
                include=tuple(self.include),
                exclude=tuple(self.exclude),
                include_types=tuple(self.include_types),
                exclude_types=tuple(self.exclude_types),
                keep_first_n=self.keep_first_n,
                keep_last_n=self.keep_last_n,
                block_containers=None if self.block_containers is None else tuple(self.block_containers),
                model_defaults=self.model_defaults,
                seed=self.seed,
                amax_reduction=self.amax_reduction,
                role_overrides=_plain(self.role_overrides),
            )
        except quant.QuantError as exc:
            raise ConfigError(f"quant (policy {self.name!r}): {exc}") from None


def _plain(value: Any) -> Any:
    """A Hydra/OmegaConf container as plain dicts and lists (a typed dict field may still hold DictConfig nodes)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


store_schema("quant", "quant", QuantConfig)
