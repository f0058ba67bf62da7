"""The training-time analysis on a tiny real Lightning fit: file layout, cadence, resume, no effect on training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import quant
from analysis import build_callbacks
from analysis.callbacks import AnalysisCallback
from tests.analysis.conftest import NVFP4_CPU, fit, make_task

LINEARS = ("0", "3", "5")  # the three Linear layers of tiny_net


def _nonempty(folder: Path, stem: str) -> None:
    for ext in (".png", ".html", ".json"):
        path = folder / f"{stem}{ext}"
        assert path.is_file() and path.stat().st_size > 0, path


def test_quantized_run_writes_every_folder(tmp_path: Path, analysis_cfg) -> None:
    task, report = make_task(NVFP4_CPU)
    assert report.quantized_names() == list(LINEARS)
    (cb,) = build_callbacks(analysis_cfg(), output_dir=tmp_path, run_name="tiny-nvfp4-seed0", policy=NVFP4_CPU,
                            report=report)
    fit(tmp_path, task, [cb], steps=4)
    root = tmp_path / "plots" / "heatmaps" / "tiny-nvfp4-seed0"
    assert sorted({r["step"] for r in cb.history}) == [0, 2]
    assert {r["layer"] for r in cb.history} == set(LINEARS)  # names relative to the wrapped model, not "net.0"
    for step in ("step0000000", "step0000002"):
        for folder in ("weights/prequantize", "weights/quantized", "weights/dequantized", "gradients"):
            _nonempty(root / folder, f"layer_stats_{step}")
            _nonempty(root / folder, f"0_{step}")  # max_image_layers=1 -> the first quantized layer
        _nonempty(root / "weights/quantized", f"code_histogram_{step}")
        _nonempty(root / "weights/quantized", f"scale_histogram_{step}")
    _nonempty(root / "weights/dequantized", "over_steps_snr_db")
    _nonempty(root / "gradients", "over_steps_kurtosis")
    stats = json.loads((root / "weights/prequantize/layer_stats_step0000002.json").read_text())
    assert stats["row_labels"] == list(LINEARS) and "kurtosis_block_p99" in stats["col_labels"]
    image = json.loads((root / "weights/dequantized/0_step0000000.json").read_text())
    assert [p["title"].split()[1] for p in image["panels"]] == ["dequantized", "error"]
    assert len(image["panels"][0]["values"]) == 32 and len(image["panels"][0]["values"][0]) == 32  # the crop
    kurtosis = tmp_path / "plots" / "kurtosis" / "tiny-nvfp4-seed0"
    for name in ("kurtosis.csv", "kurtosis.json", "kurtosis.png"):
        assert (kurtosis / name).stat().st_size > 0
    study = json.loads((kurtosis / "kurtosis.json").read_text())
    assert [row["rank"] for row in study["layers"]] == [1, 2, 3]
    assert all(row["quantized"] and row["error_format"] == "nvfp4 16x16 RN" for row in study["layers"])
    assert all(row["snr_db"] > 10 and row["grad_kurtosis"] is not None for row in study["layers"])


def test_baseline_run_logs_prequantize_weights_and_gradients_only(tmp_path: Path, analysis_cfg) -> None:
    task, _ = make_task()
    cb = AnalysisCallback(analysis_cfg(kurtosis_study=False), output_dir=tmp_path, run_name="tiny-bf16-seed0")
    fit(tmp_path, task, [cb], steps=1)
    root = tmp_path / "plots" / "heatmaps" / "tiny-bf16-seed0"
    assert sorted(p.name for p in root.iterdir()) == ["gradients", "weights"]
    assert sorted(p.name for p in (root / "weights").iterdir()) == ["prequantize"]
    # Without a report the names are those of the LightningModule; every Linear is measured.
    assert {r["layer"] for r in cb.history} == {"net.0", "net.3", "net.5"}
    assert {r["kind"] for r in cb.history} == {"prequantize", "gradients"}
    _nonempty(root / "gradients", "net.0_step0000000")


def test_analysis_does_not_change_training(tmp_path: Path, analysis_cfg) -> None:
    task, _ = make_task(NVFP4_CPU)
    plain = fit(tmp_path / "off", task, [], steps=5)
    rng_after_plain = torch.get_rng_state()
    task, report = make_task(NVFP4_CPU)
    (cb,) = build_callbacks(analysis_cfg(kurtosis_study=False), output_dir=tmp_path / "on", run_name="r",
                            report=report)
    analysed = fit(tmp_path / "on", task, [cb], steps=5)
    assert sorted({r["step"] for r in cb.history}) == [0, 2, 4]
    for (name, a), (_, b) in zip(plain.named_parameters(), analysed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # no random number drawn by the analysis


def test_each_optimizer_step_is_analysed_once_under_accumulation(tmp_path: Path, analysis_cfg) -> None:
    task, report = make_task(NVFP4_CPU)
    (cb,) = build_callbacks(analysis_cfg(every_n_steps=1, kurtosis_study=False, max_image_layers=0, weights=False),
                            output_dir=tmp_path, run_name="r", report=report)
    fit(tmp_path, task, [cb], steps=3, accumulate_grad_batches=2)
    steps = [r["step"] for r in cb.history if r["kind"] == "gradients" and r["layer"] == "0"]
    assert steps == [0, 1, 2]


def test_history_survives_resume(tmp_path: Path, analysis_cfg) -> None:
    cfg = analysis_cfg(every_n_steps=1, kurtosis_study=False, max_image_layers=0, weights=False)
    task, report = make_task()
    (first,) = build_callbacks(cfg, output_dir=tmp_path, run_name="r", report=report)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    fit(tmp_path, task, [first, ckpt], steps=2, enable_checkpointing=True)
    task, report = make_task()
    (resumed,) = build_callbacks(cfg, output_dir=tmp_path, run_name="r", report=report)
    fit(tmp_path, task, [resumed], steps=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sorted({r["step"] for r in resumed.history}) == [0, 1, 2, 3]
    assert resumed.last_step == 3


def test_disabled_config_builds_no_callback(analysis_cfg, tmp_path: Path) -> None:
    assert build_callbacks(analysis_cfg(enabled=False), output_dir=tmp_path, run_name="r") == []
    assert build_callbacks(None, output_dir=tmp_path, run_name="r") == []


def test_format_without_codes_gets_error_statistics_only(tmp_path: Path, analysis_cfg) -> None:
    """MXFP4 layers hand analysis their fake-quantized values only: dequantized/ yes, quantized/ (codes) no."""
    policy = quant.Policy(format="mxfp4")
    task, report = make_task(policy)
    assert report.quantized_names()
    (cb,) = build_callbacks(analysis_cfg(kurtosis_study=False), output_dir=tmp_path, run_name="r", report=report)
    fit(tmp_path, task, [cb], steps=1)
    root = tmp_path / "plots" / "heatmaps" / "r"
    assert sorted(p.name for p in (root / "weights").iterdir()) == ["dequantized", "prequantize"]
    rows = [r for r in cb.history if r["kind"] == "dequantized"]
    assert {r["layer"] for r in rows} == set(report.quantized_names())
    assert all(math.isfinite(r["snr_db"]) and r["snr_db"] > 5 for r in rows)


def test_gradients_cover_norm_scales_too(tmp_path: Path, analysis_cfg) -> None:
    from scipy.stats import kurtosis
    from torch import nn

    from analysis.telemetry import Telemetry

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    model(torch.randn(8, 16)).square().mean().backward()
    telemetry = Telemetry(analysis_cfg(max_image_layers=0), output_dir=tmp_path, run_name="r")
    rows = {r["layer"]: r for r in telemetry.collect(model, 0, weights=False).rows if r["kind"] == "gradients"}
    assert set(rows) == {"0", "1", "2"} and rows["1"]["type"] == "LayerNorm"
    g = model[1].weight.grad.double()  # float64 reference of the norm scale's gradient
    assert math.isclose(rows["1"]["rms"], float(g.square().mean().sqrt()), rel_tol=1e-6)
    assert math.isclose(rows["1"]["kurtosis"], float(kurtosis(g.numpy(), fisher=True, bias=True)), rel_tol=1e-6)
