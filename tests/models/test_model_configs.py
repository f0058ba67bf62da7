"""Model schemas reject bad values with one message naming field, value and valid choices; the YAML files compose
through the real root config and pick their documented default data sets."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conf.errors import ConfigError
from conf.schemas.model import LLMConfig, ResNetConfig, SegmentationLossConfig, UNetConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: UNetConfig(width=0.3), r"model.width=0.3 .* 19.2 channels at level 0; valid: .*multiple of 16"),
        (lambda: UNetConfig(width=0.0), r"model.width=0.0 .* gives 0 channels at level 0"),
        (lambda: UNetConfig(upsample="nearest"), r"model.upsample='nearest' is not valid; valid choices: transpose, "
                                                 r"interp"),
        (lambda: UNetConfig(depth=9), r"model.depth=9 is out of range; valid range: \[2, 6\]"),
        (lambda: UNetConfig(norm_groups=3), r"model.norm_groups=3 does not divide 16 channels"),
        (lambda: UNetConfig(query_dim=18, query_heads=2), r"model.query_dim=18 .* valid: a positive multiple of 4"),
        (lambda: SegmentationLossConfig(dice_weight=-1.0), r"model.loss.dice_weight=-1.0 is out of range"),
        (lambda: ResNetConfig(arch="resnet101"), r"model.arch='resnet101' is not valid; valid choices: resnet18, "
                                                 r"resnet34, resnet50"),
        (lambda: LLMConfig(n_heads=5), r"model.d_model=128 is not a multiple of model.n_heads=5"),
        (lambda: LLMConfig(n_kv_heads=3), r"model.n_kv_heads=3 does not divide model.n_heads=4"),
        (lambda: LLMConfig(d_model=12, n_heads=4), r"head dim"),
        (lambda: LLMConfig(attn_implementation="flash"), r"valid choices: sdpa, eager"),
    ],
)
def test_bad_values_fail_with_field_value_and_choices(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("name, default_data", [("unet", "shapes"), ("resnet", "shapes_cls"), ("llm", "text")])
def test_model_yaml_composes_with_its_default_data(name, default_data, cfg_factory):
    if not (CONF_DIR / "data" / f"{default_data}.yaml").is_file():
        pytest.skip(f"conf/data/{default_data}.yaml is not written yet")
    cfg = cfg_factory(f"model={name}")
    assert cfg.data.name == default_data
    typed = OmegaConf.to_object(cfg.model)
    assert type(typed).__name__ == {"unet": "UNetConfig", "resnet": "ResNetConfig", "llm": "LLMConfig"}[name]
    assert typed == type(typed)()  # the YAML restates the schema defaults


def test_command_line_data_wins_over_the_model_default(cfg_factory):
    if not (CONF_DIR / "data" / "cifar10.yaml").is_file():
        pytest.skip("conf/data/cifar10.yaml is not written yet")
    assert cfg_factory("model=resnet", "data=cifar10").data.name == "cifar10"
