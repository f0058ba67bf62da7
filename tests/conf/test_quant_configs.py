"""conf/quant/*: every policy file composes into the quant.Policy it documents; bad values fail with the reason."""
import pytest

import quant
from conf.errors import ConfigError
from trainers.app import validate

EXPECTED = {
    # name: (precision, format, backward, roles, options)
    "fp32": ("32-true", "none", "full", set(), ()),
    "fp16": ("16-mixed", "none", "full", set(), ()),
    "bf16": ("bf16-mixed", "none", "full", set(), ()),
    "nvfp4": ("bf16-mixed", "nvfp4", "full", {"weight", "input", "grad"}, ()),
    "nvfp4_ste": ("bf16-mixed", "nvfp4", "dequantized", {"weight", "input", "grad"}, ()),
    "nvfp4_fwd": ("bf16-mixed", "nvfp4", "high_precision", {"weight", "input", "grad"}, ()),
    "mxfp4": ("bf16-mixed", "mxfp4", "dequantized", {"weight", "input"}, (("scale_rule", "floor"),)),
    "nf4": ("bf16-mixed", "nf4", "dequantized", {"weight"}, (("blocksize", 64), ("double_quant", True))),
    "int4": ("bf16-mixed", "int4", "dequantized", {"weight"}, (("blocksize", 32),)),
    "fp8": ("bf16-mixed", "fp8", "full", {"weight", "input", "grad"}, (("fp8_format", "hybrid"),)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_quant_config_builds_its_policy(cfg_factory, name):
    typed = validate(cfg_factory(f"quant={name}", "seed=5"))
    precision, fmt, backward, roles, options = EXPECTED[name]
    assert (typed.quant.name, typed.quant.precision) == (name, precision)
    policy = typed.quant.to_policy()
    assert isinstance(policy, quant.Policy)
    assert (policy.format, policy.recipe.backward, policy.effective_roles, policy.options) == (
        fmt, backward, roles, options
    )
    assert policy.seed == 5  # the SR seed follows the run's seed
    assert typed.quant.backend == "auto"


def test_nvfp4_recipe_matches_te_defaults(cfg_factory):
    policy = validate(cfg_factory("quant=nvfp4")).quant.to_policy()
    assert policy.recipe == quant.Recipe()
    assert policy.recipe.to_te_kwargs()["backward_override"] is None


def test_command_line_overrides_reach_the_policy(cfg_factory):
    cfg = cfg_factory("quant=nvfp4", "quant.disable_rht=true", "quant.keep_last_n=1", "quant.exclude=[head]",
                      "quant.roles=[weight,input]")
    policy = validate(cfg).quant.to_policy()
    assert policy.recipe.disable_rht and policy.keep_last_n == 1 and policy.exclude == ("head",)
    assert policy.effective_roles == {"weight", "input"}
    cfg = cfg_factory("quant=mxfp4", "quant.options.scale_rule=rceil")
    assert validate(cfg).quant.to_policy().options == (("scale_rule", "rceil"),)


@pytest.mark.parametrize("overrides, message", [
    (["quant=nvfp4", "quant.precision=16-mixed"],
     "quant.precision=16-mixed is not valid with quant.format=nvfp4: TE's FP4 GEMM has no FP16 output"),
    (["quant=nvfp4", "quant.precision=32-true"], "the wgrad RHT needs BF16 operands"),
    (["quant=nvfp4", "quant.backward=ste"], "quant.backward='ste' is not valid; valid choices: full, dequantized, "
                                            "high_precision"),
    (["quant=nvfp4", "quant.backend=cuda"], "quant.backend='cuda' is not valid; valid choices: auto, emulated, te"),
    (["quant=bf16", "quant.format=fp4"], "quant.format='fp4' is not valid; valid choices: none, nvfp4"),
    (["quant=mxfp4", "quant.options.scale_rule=ceil"], "scale_rule='ceil' is not valid; valid choices: floor, rceil"),
    (["quant=fp8", "quant.disable_rht=true"], "Recipe.disable_rht=True has no effect with format=fp8"),
    (["quant=nf4", "quant.roles=[input]"], "Policy.roles=['input'] is not valid for format=nf4"),
    (["quant=nvfp4", "quant.include_types=[Embedding]"], "valid choices: Linear, Conv2d, ConvTranspose2d"),
])
def test_bad_quant_values_fail_with_one_clear_message(cfg_factory, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(cfg_factory(*overrides))
    assert message in str(err.value)


def test_backward_null_means_the_format_default(cfg_factory):
    assert validate(cfg_factory("quant=int4", "quant.backward=null")).quant.to_policy().recipe.backward == "dequantized"
    assert validate(cfg_factory("quant=fp8", "quant.backward=null")).quant.to_policy().recipe.backward == "full"


def test_nvfp4_in_fp32_is_allowed_without_rht(cfg_factory):
    typed = validate(cfg_factory("quant=nvfp4", "quant.precision=32-true", "quant.disable_rht=true"))
    assert typed.quant.to_policy().recipe.disable_rht
