"""A real offline W&B run holds the analysis images, tables and histograms (read back from the run's files)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger

from analysis import build_callbacks
from tests.analysis.conftest import NVFP4_CPU, fit, make_task


def test_offline_run_holds_images_tables_and_histograms(tmp_path: Path, analysis_cfg, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    for key, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config")):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(key, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) overwrites it; monkeypatch restores it
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(name="tiny-nvfp4-seed0", save_dir=str(tmp_path), project="fp4lab-test", offline=True)
    task, report = make_task(NVFP4_CPU)
    (cb,) = build_callbacks(analysis_cfg(every_n_steps=2), output_dir=tmp_path, run_name="tiny-nvfp4-seed0",
                            report=report)
    try:
        fit(tmp_path, task, [cb], steps=3, loggers=[logger])
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    files = run_dir / "files"
    images = list((files / "media" / "images").rglob("*.png"))
    tables = list((files / "media" / "table").rglob("*.table.json"))
    # 2 analysis steps x (4 layer_stats + 2 histograms + 4 layer images) + 14 over-steps + 1 kurtosis figure
    assert len(images) == 2 * 10 + 14 + 1
    assert tables and len(tables) == 2 * 3 + 1  # layer_stats, code_histogram, scale_histogram per step + kurtosis
    # An offline run keeps its summary only in the .wandb log; W&B's own reader gives it back (ECOSYSTEM D2).
    inspect = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json",
                              str(run_dir)], capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(inspect.stdout)["summary"]
    for key in ("analysis/weights/quantized/code_histogram", "analysis/weights/dequantized/layers",
                "analysis/gradients/layer_stats", "analysis/tables/layer_stats", "analysis/kurtosis/table",
                "analysis/histograms/gradients/0", "analysis/histograms/codes/0"):
        assert key in summary, (key, sorted(summary))
    assert summary["analysis/histograms/codes/0"]["_type"] == "histogram"
    assert len(summary["analysis/histograms/codes/0"]["values"]) == 16
    assert summary["analysis/gradients/over_steps"]["captions"] == ["rms", "absmax", "kurtosis", "kurtosis_block_p99"]
    kurtosis = json.loads(next(p for p in tables if "kurtosis" in str(p)).read_text())
    assert [row[0] for row in kurtosis["data"]] == [r["layer"] for r in json.loads(
        (tmp_path / "plots/kurtosis/tiny-nvfp4-seed0/kurtosis.json").read_text())["layers"]]
    # Bounded key count, independent of the number of layers: 4 kinds x (layer_stats, layers, over_steps) + 2 quantized
    # histograms + 3 tables + 2 kurtosis keys, plus 3 histogram keys per image layer (max_image_layers=1 here).
    assert len([k for k in summary if k.startswith("analysis/")]) == 12 + 2 + 3 + 2 + 3 * 1
