"""quant.Policy: validation (field, bad value, valid choices), format defaults, options, SR seeds."""
import dataclasses

import pytest

from quant import Policy, QuantError, Recipe
from quant.policy import formats


def test_formats_are_none_plus_every_layer_format():
    assert formats() == ("none", "nvfp4", "mxfp4", "nf4", "int4", "fp8")


@pytest.mark.parametrize("fmt, roles", [
    ("nvfp4", {"weight", "input", "grad"}),
    ("fp8", {"weight", "input", "grad"}),
    ("mxfp4", {"weight", "input"}),
    ("nf4", {"weight"}),
    ("int4", {"weight"}),
    ("none", set()),
])
def test_default_roles_per_format(fmt, roles):
    assert Policy(format=fmt).effective_roles == roles


@pytest.mark.parametrize("fmt, backward", [
    ("nvfp4", "full"), ("fp8", "full"), ("mxfp4", "dequantized"), ("nf4", "dequantized"), ("int4", "dequantized"),
])
def test_default_recipe_per_format(fmt, backward):
    assert Policy(format=fmt).recipe == Recipe(backward=backward)


def test_roles_override_is_canonicalised_and_validated():
    assert Policy(format="nvfp4", roles=["grad", "weight"]).roles == ("weight", "grad")
    with pytest.raises(QuantError, match=r"Policy.roles=\['grad'\] is not valid for format=nf4; valid: .*weight"):
        Policy(format="nf4", roles=("grad",))
    with pytest.raises(QuantError, match="non-empty subset"):
        Policy(format="nvfp4", roles=())


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "fp4"}, "Policy.format='fp4' is not valid; valid choices: none, nvfp4, mxfp4, nf4, int4, fp8"),
    ({"format": "nvfp4", "include_types": ("Conv1d",)}, "valid choices: Linear, Conv2d, ConvTranspose2d"),
    ({"format": "nvfp4", "exclude": "lm_head"}, "Policy.exclude='lm_head' is not valid; expected a list"),
    ({"format": "nvfp4", "keep_last_n": -1}, "Policy.keep_last_n=-1 is not valid; expected an integer >= 0"),
    ({"format": "nvfp4", "keep_first_n": True}, "Policy.keep_first_n=True is not valid"),
    ({"format": "nvfp4", "model_defaults": "yes"}, "Policy.model_defaults='yes' is not valid; valid choices: True"),
    ({"format": "nvfp4", "recipe": "te"}, "Policy.recipe='te' is not valid; expected a quant.Recipe"),
    ({"format": "mxfp4", "options": {"blocksize": 32}}, "format=mxfp4 has no option 'blocksize'; valid options: "
                                                         "scale_rule"),
    ({"format": "mxfp4", "options": {"scale_rule": "ceil"}}, "scale_rule='ceil' is not valid; valid choices: floor, "
                                                             "rceil"),
    ({"format": "nf4", "options": {"double_quant": 1}}, "double_quant=1 is not valid"),
    ({"format": "int4", "options": {"blocksize": 48}}, "blocksize=48 is not valid; valid choices: 16, 32, 64"),
    ({"format": "fp8", "options": {"fp8_format": "e3m4"}}, "valid choices: hybrid, e4m3, e5m2"),
    ({"format": "none", "roles": ("weight",)}, "must be empty with format='none'"),
    ({"format": "fp8", "recipe": Recipe(disable_rht=True)}, "Recipe.disable_rht=True has no effect with format=fp8"),
])
def test_bad_values_name_field_value_and_choices(kwargs, message):
    with pytest.raises(QuantError) as err:
        Policy(**kwargs)
    assert message in str(err.value)


def test_options_are_filled_with_defaults_and_policy_is_hashable():
    policy = Policy(format="nf4", options={"double_quant": True})
    assert policy.options == (("blocksize", 64), ("double_quant", True))
    assert policy.layer_format.options() == {"blocksize": 64, "double_quant": True}
    assert hash(policy) == hash(Policy(format="nf4", options={"double_quant": True, "blocksize": 64}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.format = "nvfp4"  # type: ignore[misc]


def test_lists_from_configs_become_tuples():
    policy = Policy(format="nvfp4", include=["layers.*"], exclude=["lm_head"], block_containers=["layers"])
    assert policy.include == ("layers.*",) and policy.exclude == ("lm_head",)
    assert policy.block_containers == ("layers",)


def test_layer_quantizers_get_distinct_sr_seeds_per_layer_and_policy_seed():
    seeds = {Policy(format="nvfp4", seed=s).quantizer(f"l{i}", i).seed for s in range(3) for i in range(50)}
    assert len(seeds) == 150
    policy = Policy(format="nvfp4", seed=1)
    assert policy.quantizer("a", 0).seed == policy.quantizer("b", 0).seed  # the seed depends on (seed, index) only


def test_quantizer_of_format_none_is_an_error():
    with pytest.raises(QuantError, match="quantizes nothing"):
        Policy().quantizer("x", 0)


def test_describe_names_format_recipe_and_non_default_selection():
    text = Policy(format="nvfp4", keep_last_n=2, exclude=("head",)).describe()
    assert "format=nvfp4" in text and "backward='full'" in text and "keep_last_n=2" in text and "exclude" in text
    assert "disable_rht" not in Policy(format="fp8").describe()  # NVFP4 switches are not shown for other formats
    assert Policy().describe() == "format=none (nothing quantized)"
