"""``quant.exclude_by_kurtosis``: the study's flagged layers stay high precision, and the report says why."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import quant
from analysis import layers_to_keep_high_precision
from conf.errors import ConfigError
from tests.tiny import overrides
from trainers.app import run, validate
from trainers.kurtosis_keep import kurtosis_keeps


def _spiky_mlp() -> nn.Sequential:
    """Four same-shaped Linears; one gets a few huge weights, so its kurtosis stands out among its peers."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    with torch.no_grad():
        net[2].weight[0, :4] = 40.0
    return net


def test_flagged_layers_are_kept_with_the_reason_in_the_report():
    net = _spiky_mlp()
    keeps = kurtosis_keeps(net, 3.5)
    assert [name for name, _ in keeps] == ["2"] == [n for n, _ in layers_to_keep_high_precision(net, 3.5)]
    report = quant.apply(net, quant.Policy(format="nvfp4", keep_high_precision=keeps))
    row = report.row("2")
    assert not row.quantized and "kurtosis study on the initial weights flags it" in row.reason
    assert all(report.row(n).quantized for n in ("0", "1", "3"))


def test_policy_rejects_malformed_keep_pairs():
    with pytest.raises(quant.QuantError, match="keep_high_precision"):
        quant.Policy(format="nvfp4", keep_high_precision=(("layer",),))


def test_exclude_by_kurtosis_needs_a_quantized_policy(cfg_factory):
    with pytest.raises(ConfigError, match="no effect with quant.format=none"):
        validate(cfg_factory("quant=bf16", "quant.exclude_by_kurtosis=3.5"))


def test_app_applies_the_study_of_a_checkpoint(cfg_factory, tmp_path):
    trained = cfg_factory(*overrides("llm"))
    run(trained)
    ckpt = Path(trained.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = cfg_factory(*overrides("llm"), "quant=nvfp4", "quant.exclude_by_kurtosis=0.5", f"quant.kurtosis_ckpt={ckpt}",
                      f"paths.output_dir={tmp_path / 'qat'}")
    run(cfg)
    table = (tmp_path / "qat" / "quant_report.txt").read_text()
    assert f"kurtosis study on the weights of {ckpt}" in table
