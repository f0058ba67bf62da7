"""The kurtosis study: ranking, robust-z recommendation, measured error beside it, Spearman, files."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import quant
from analysis import kurtosis_study, layers_to_keep_high_precision, stats
from quant import nvfp4


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)], *[nn.Embedding(100, 64) for _ in range(3)])
    with torch.no_grad():
        model[2].weight[5, 9] = 3.0  # heavy tail: far above the other Linear layers
        model[4].weight[:, :2] *= 4.0  # mild: per-channel scale change
        model[6].weight[0, 0] = 80.0  # an embedding outlier: flagged within its type, never recommended
    return model


def test_ranking_and_robust_z_within_module_type() -> None:
    result = kurtosis_study.study(_model(), z_threshold=3.5)
    ranked = [row.kurtosis for row in result.layers]
    assert ranked == sorted(ranked, reverse=True) and [r.rank for r in result.layers] == list(range(1, 10))
    linear = {row.layer: row for row in result.layers if row.module_type == "Linear"}
    k = np.array([scipy.stats.kurtosis(_model()[i].weight.detach().double().numpy().ravel()) for i in range(6)])
    med, mad = np.median(k), np.median(np.abs(k - np.median(k)))
    n = 64 * 64
    noise = np.sqrt(24 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5)))  # se of g2, Gaussian, n samples
    z = (k - med) / max(1.4826 * mad, noise)
    for i in range(6):
        assert linear[str(i)].kurtosis == pytest.approx(k[i], rel=1e-9)
        assert linear[str(i)].robust_z == pytest.approx(z[i], rel=1e-9)
    expected = [str(i) for i in np.argsort(-k) if z[i] > 3.5]
    assert "2" in expected and "0" not in expected
    flagged = [row.layer for row in result.layers if row.keep_high_precision]
    assert flagged == ["6", *expected]  # ranked: the embedding outlier's kurtosis is the highest
    assert "robust z above the median" in linear["2"].reason and "6 Linear layers" in linear["2"].reason
    assert layers_to_keep_high_precision(_model(), 3.5) == [(name, linear[name].reason) for name in expected]
    assert layers_to_keep_high_precision(_model(), 1e9) == []


def test_small_layers_are_not_flagged_for_sampling_noise() -> None:
    """At initialisation every layer's kurtosis is alike (tiny MAD); a small layer differs by noise alone."""
    torch.manual_seed(0)  # this seed draws the 64-weight layer's kurtosis above the others
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(5)], nn.Linear(16, 4))
    result = kurtosis_study.study(model, z_threshold=3.5)
    small = next(r for r in result.layers if r.layer == "5")
    k = [r.kurtosis for r in result.layers if r.layer != "5"]
    mad_only = (small.kurtosis - np.median(k + [small.kurtosis])) / (1.4826 * scipy.stats.median_abs_deviation(
        k + [small.kurtosis]))
    assert mad_only > 3.5  # the MAD alone would flag it
    assert not any(r.keep_high_precision for r in result.layers)


def test_error_column_is_the_layers_own_quantization_or_the_nvfp4_reference() -> None:
    model = _model()
    report = quant.apply(model, quant.Policy(format="nvfp4", exclude=("0",)))
    assert "0" not in report.quantized_names() and "1" in report.quantized_names()
    rows = {row.layer: row for row in kurtosis_study.study(model, z_threshold=3.5).layers}
    # Kept layer: NVFP4 reference with TE's weight recipe, checked through quant's fake_quantize (another path).
    w0 = model[0].weight.detach()
    expected = stats.snr_db(w0, nvfp4.fake_quantize(w0, tile=(16, 16)))
    assert rows["0"].error_format == "nvfp4 16x16 RN (reference)" and not rows["0"].quantized
    assert rows["0"].snr_db == pytest.approx(expected, rel=1e-12)
    # Quantized layer: what its forward multiplies, in the module's own layout.
    w1 = model[1].weight.detach()
    assert rows["1"].quantized and rows["1"].error_format == "nvfp4 16x16 RN"
    assert rows["1"].snr_db == pytest.approx(stats.snr_db(w1, model[1].dequantized_weight()), rel=1e-12)
    assert rows["1"].rel_mse == pytest.approx(10 ** (-rows["1"].snr_db / 10), rel=1e-12)
    assert math.isnan(rows["1"].grad_kurtosis)  # no gradient yet


def test_spearman_and_written_files(tmp_path: Path) -> None:
    model = _model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    result = kurtosis_study.study(model, z_threshold=3.5)
    for stat in kurtosis_study.CORRELATED:
        expected = scipy.stats.spearmanr([getattr(r, stat) for r in result.layers],
                                         [r.rel_mse for r in result.layers]).statistic
        assert result.spearman[f"{stat}_vs_rel_mse"] == pytest.approx(expected, rel=1e-12)
    assert all(not math.isnan(r.grad_kurtosis) for r in result.layers)  # read from .grad when no telemetry
    paths = result.write(tmp_path)
    with paths[".csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["layer"] for row in table] == [r.layer for r in result.layers]
    data = json.loads(paths[".json"].read_text())
    assert data["z_threshold"] == 3.5
    assert [r["layer"] for r in data["layers"] if r["keep_high_precision"]] == [r.layer for r in result.layers
                                                                                 if r.keep_high_precision]
    assert "robust z" in data["definitions"]
    assert paths[".png"].stat().st_size > 0 and paths[".html"].stat().st_size > 0
