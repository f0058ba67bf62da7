"""The NVFP4 training recipe: a frozen mirror of Transformer Engine's ``NVFP4BlockScaling``.

Why a mirror and not TE's class: the emulation must run where TE cannot (CPU, Hopper), and the same object must
later build TE's recipe for the native backend (``to_te_kwargs``), so a study's emulated and native arms are
provably the same recipe. Defaults equal TE's constructor defaults (SPEC 3.1) with the ``NVTE_NVFP4_*`` environment
variables unset; we deliberately do not read those variables (TE reads them at import time, which silently changes
numerics between processes).

What each field turns on (SPEC 3.1, the three GEMMs of a linear layer ``Y = X W^T``):

=============  =====================================  ===========================================
GEMM           operand A                              operand B
=============  =====================================  ===========================================
fprop          X rowwise, 1x16, RN                    W, 16x16 (1x16 if ``disable_2d_quantization``)
dgrad          dY rowwise, 1x16, SR                   W columnwise (the same 16x16 scales)
wgrad          dY^T along tokens, RHT + 1x16 + SR     X^T along tokens, RHT + 1x16, RN
=============  =====================================  ===========================================

``backward`` picks what the two backward GEMMs use (TE ``backward_override``):
``full`` the table above; ``dequantized`` dgrad/wgrad in high precision with the *dequantized forward operands* and an
unquantized dY (classic straight-through QAT, what torchao's NVFP4 QAT does); ``high_precision`` the original X and W
(forward-only quantization).
"""
from __future__ import annotations

from dataclasses import dataclass

from quant.errors import QuantError

BACKWARD_MODES = ("full", "dequantized", "high_precision")
_TE_BACKWARD_OVERRIDE = {"full": None, "dequantized": "dequantized", "high_precision": "high_precision"}


@dataclass(frozen=True)
class Recipe:
    """How the three GEMMs of a quantized layer are quantized (TE ``NVFP4BlockScaling`` semantics)."""

    disable_rht: bool = False  # RHT on the wgrad operands (dY^T, X^T along tokens)
    disable_stochastic_rounding: bool = False  # SR on dY (dgrad and wgrad copies)
    disable_2d_quantization: bool = False  # 16x16 weight tiles (else 1x16, and W^T is requantized for dgrad)
    backward: str = "full"

    def __post_init__(self) -> None:
        for name in ("disable_rht", "disable_stochastic_rounding", "disable_2d_quantization"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise QuantError(f"Recipe.{name}={value!r} is not valid; valid choices: True, False")
        if self.backward not in BACKWARD_MODES:
            raise QuantError(
                f"Recipe.backward={self.backward!r} is not valid; valid choices: {', '.join(BACKWARD_MODES)}"
            )

    @property
    def weight_tile(self) -> tuple[int, int]:
        """Tile of the weight's block scales: (16, 16) with 2D quantization (TE default), else (1, 16)."""
        return (1, 16) if self.disable_2d_quantization else (16, 16)

    @property
    def rht(self) -> bool:
        return not self.disable_rht

    @property
    def stochastic_rounding(self) -> bool:
        return not self.disable_stochastic_rounding

    def to_te_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``transformer_engine.common.recipe.NVFP4BlockScaling`` for this recipe."""
        return {
            "disable_rht": self.disable_rht,
            "disable_stochastic_rounding": self.disable_stochastic_rounding,
            "disable_2d_quantization": self.disable_2d_quantization,
            "backward_override": _TE_BACKWARD_OVERRIDE[self.backward],
        }
