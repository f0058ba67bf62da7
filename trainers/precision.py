"""Lightning precision plugins for the Transformer Engine backend: torch autocast plus ``te.autocast(recipe)``.

Why our own plugin and not Lightning's ``TransformerEnginePrecision`` (ECOSYSTEM C3): that one casts the whole
module to its weights dtype (BF16 master weights with the ``"transformer-engine"`` string), accepts only
``DelayedScaling`` by type and speaks TE's deprecated ``fp8_autocast``. A QAT study needs FP32 master weights, any
TE recipe (``NVFP4BlockScaling`` included) and the policy, not the plugin, deciding which layers are TE layers
(``quant.te_backend.apply`` did that before the trainer exists). So this plugin:

* never touches the module (``convert_module`` stays the identity: FP32 masters, plain and emulated layers as built);
* wraps every training/validation/test/predict step's forward in ``torch.autocast`` of the run's precision (BF16 or
  FP16 with Lightning's GradScaler, or none for ``32-true``) and, inside it, ``te.autocast(enabled=True,
  recipe=...)``; backward and the optimizer step run outside both, which is what TE wants (the recipe's backward
  quantizers are fixed in the forward).
"""
from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from conf.errors import ConfigError
from quant import te_backend

PRECISIONS = ("bf16-mixed", "16-mixed", "32-true")


class _TEAutocast:
    """Adds ``te.autocast(recipe)`` inside the forward context of a Lightning precision plugin."""

    te_recipe: object

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with super().forward_context(), te_backend.autocast(self.te_recipe):  # type: ignore[misc]
            yield

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={getattr(self, 'precision', None)!r}, recipe={self.te_recipe!r})"


class TEMixedPrecision(_TEAutocast, MixedPrecision):
    """``bf16-mixed`` / ``16-mixed`` (``torch.autocast`` on ``device``) with TE's recipe inside."""

    def __init__(self, recipe: object, precision: str = "bf16-mixed", device: str = "cuda") -> None:
        super().__init__(precision, device)  # type: ignore[arg-type]
        self.te_recipe = recipe


class TETruePrecision(_TEAutocast, Precision):
    """``32-true`` (no torch autocast: TE layers compute in FP32) with TE's recipe."""

    precision = "32-true"

    def __init__(self, recipe: object) -> None:
        self.te_recipe = recipe


def build_precision_plugin(recipe: object, precision: str, device: str = "cuda") -> Precision:
    """The plugin for a TE-backend run at Lightning ``precision`` (pass it as ``plugins=[...]``, ``precision=None``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"quant.precision={precision!r} is not valid with quant.backend=te; valid choices: "
                          f"{', '.join(PRECISIONS)}")
    if precision == "32-true":
        return TETruePrecision(recipe)
    return TEMixedPrecision(recipe, precision, device)
