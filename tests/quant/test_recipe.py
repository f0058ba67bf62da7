"""quant.Recipe: TE NVFP4BlockScaling defaults (SPEC 3.1), validation, and the TE constructor kwargs."""
import dataclasses

import pytest

from quant import QuantError, Recipe


def test_defaults_equal_te_constructor_defaults():
    # SPEC 3.1: every switch defaults to False (env vars unset) and backward_override defaults to None.
    assert Recipe().to_te_kwargs() == {
        "disable_rht": False,
        "disable_stochastic_rounding": False,
        "disable_2d_quantization": False,
        "backward_override": None,
    }


def test_default_operand_treatment_matches_te_qparams():
    recipe = Recipe()
    assert recipe.weight_tile == (16, 16)  # fp4_quant_fwd_weight: 2D
    assert recipe.rht  # fp4_quant_fwd_inp / fp4_quant_bwd_grad: RHT on the columnwise copies
    assert recipe.stochastic_rounding  # fp4_quant_bwd_grad: SR
    assert Recipe(disable_2d_quantization=True).weight_tile == (1, 16)


@pytest.mark.parametrize(
    "backward, override", [("full", None), ("dequantized", "dequantized"), ("high_precision", "high_precision")]
)
def test_backward_maps_to_te_backward_override(backward, override):
    assert Recipe(backward=backward).to_te_kwargs()["backward_override"] == override


def test_switches_pass_through_to_te_kwargs():
    kwargs = Recipe(disable_rht=True, disable_stochastic_rounding=True, disable_2d_quantization=True).to_te_kwargs()
    assert kwargs["disable_rht"] and kwargs["disable_stochastic_rounding"] and kwargs["disable_2d_quantization"]


def test_bad_backward_names_field_value_and_choices():
    with pytest.raises(QuantError) as err:
        Recipe(backward="ste")
    message = str(err.value)
    assert "Recipe.backward='ste'" in message
    for choice in ("full", "dequantized", "high_precision"):
        assert choice in message


@pytest.mark.parametrize("field", ["disable_rht", "disable_stochastic_rounding", "disable_2d_quantization"])
def test_non_bool_switch_is_rejected(field):
    with pytest.raises(QuantError, match=f"Recipe.{field}=1 is not valid; valid choices: True, False"):
        Recipe(**{field: 1})


def test_recipe_is_frozen_and_hashable():
    recipe = Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.backward = "dequantized"  # type: ignore[misc]
    assert hash(recipe) == hash(Recipe())
