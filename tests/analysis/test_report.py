"""The comparison report from a synthetic sweep of job dirs (CSV logs + run.json + one kurtosis study)."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from analysis import kurtosis_study, report
from analysis.hydra_callbacks import ComparisonReport
from conf.errors import DataError

# arm -> seed -> final val/acc1; the report must average seeds and compute the gap to bf16.
FINAL_ACC = {"bf16": {0: 0.80, 1: 0.84}, "nvfp4": {0: 0.78, 1: 0.79}, "nvfp4_nohad": {0: 0.70}}


def _write_job(folder: Path, arm: str, seed: int, acc: float) -> None:
    (folder / "csv").mkdir(parents=True)
    rows = []
    for step in range(0, 41, 5):
        rows.append({"epoch": step // 20, "step": step, "train/loss": 2.0 / (1 + step / 10) + 0.01 * seed,
                     "val/loss": "", "val/acc1": ""})
        if step and step % 20 == 0:
            rows.append({"epoch": step // 20, "step": step, "train/loss": "", "val/loss": 1.5 - step / 100,
                         "val/acc1": acc * step / 40})
    with (folder / "csv" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "step", "train/loss", "val/loss", "val/acc1"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "run.json").write_text(json.dumps({
        "run_name": f"resnet-{arm}-seed{seed}", "experiment": "synthetic", "mode": "train", "seed": seed,
        "model": "resnet", "data": "cifar10", "quant": arm, "precision": "bf16-mixed",
        "precision_effective": "bf16-mixed", "monitor": "val/acc1",
        "metrics": {"val/acc1": acc, "val/loss": 1.1, "epoch": 1.0}}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "synthetic" / "2026-01-01_00-00-00"
    n = 0
    for arm, seeds in FINAL_ACC.items():
        for seed, acc in seeds.items():
            _write_job(root / f"{n}_resnet-{arm}-seed{seed}", arm, seed, acc)
            n += 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 16))
    with torch.no_grad():
        model[1].weight[3, 7] = 2.0  # one outlier: the highest kurtosis
    study = kurtosis_study.study(model, z_threshold=3.5)
    study.write(root / "1_resnet-bf16-seed1" / "plots" / "kurtosis" / "resnet-bf16-seed1")
    study.write(root / "2_resnet-nvfp4-seed0" / "plots" / "kurtosis" / "resnet-nvfp4-seed0")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    analyze = root / "5_resnet-nvfp4-analyze"  # mode=analyze writes a run.json too, without metrics: skipped
    analyze.mkdir()
    (analyze / "run.json").write_text(json.dumps({"run_name": "x", "mode": "analyze", "seed": 0, "model": "resnet",
                                                  "data": "cifar10", "quant": "nvfp4"}))
    return root


def test_report_content(sweep: Path, tmp_path: Path) -> None:
    page = report.build_report([sweep], tmp_path / "out")
    text = page.read_text()
    assert len(report.find_job_dirs([sweep])) == 6
    jobs = report.result_jobs([sweep])
    assert len(jobs) == 5
    rows = report.metric_rows(jobs, ["bf16", "nvfp4", "nvfp4_nohad"], "bf16")
    assert [r.metric for r in rows] == ["val/acc1", "val/loss"]  # monitor first, "epoch" (no split) left out
    acc = rows[0]
    assert acc.cells["bf16"][0] == pytest.approx(0.82) and acc.cells["bf16"][2] == 2
    assert acc.cells["nvfp4"][1] == pytest.approx(np.std([0.78, 0.79]))
    assert acc.gaps["nvfp4"] == pytest.approx((0.785 - 0.82) / 0.82)
    assert acc.gaps["nvfp4_nohad"] == pytest.approx((0.70 - 0.82) / 0.82)
    assert f"{100 * (0.785 - 0.82) / 0.82:+.2f}%" in text and "bf16 (baseline)" in text
    # Curves: mean over seeds with a min..max band; one figure per logged metric.
    chart = report.curve_chart("train/loss", jobs, ["bf16", "nvfp4", "nvfp4_nohad"])
    bf16 = chart.series[0]
    assert bf16.name == "bf16 (2 seeds)" and bf16.x[:2] == [0.0, 5.0]
    assert bf16.y[0] == pytest.approx(2.005) and bf16.lo[0] == pytest.approx(2.0) and bf16.hi[0] == pytest.approx(2.01)
    assert chart.series[2].lo is None  # one seed: no band
    figures = tmp_path / "out" / "figures"
    for stem in ("curve_train_loss", "curve_val_acc1", "kurtosis_vs_error"):
        assert (figures / f"resnet_cifar10_{stem}.png").stat().st_size > 0
    assert text.count("data:image/png;base64,") == 4  # 3 curves + the kurtosis scatter, embedded
    # Per-layer kurtosis side by side: the outlier layer is flagged in both arms that ran the study.
    assert "<td class='l'>1</td><td class='l'>Linear</td>" in text
    assert len(re.findall(r"<td class='keep'", text)) == 2
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained: nothing to fetch


def test_report_without_baseline_and_cli(sweep: Path, tmp_path: Path, capsys) -> None:
    for folder in sweep.glob("*-bf16-*"):
        shutil.rmtree(folder)
    assert report.main([str(sweep), "-o", str(tmp_path / "cli")]) == 0
    text = (tmp_path / "cli" / "report.html").read_text()
    assert "no baseline arm (bf16, fp16, fp32)" in text
    assert report.main([str(sweep), "-o", str(tmp_path / "cli2"), "--baseline", "nvfp4"]) == 0
    assert "nvfp4 (baseline)" in (tmp_path / "cli2" / "report.html").read_text()
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(DataError, match="no run.json"):
        report.find_job_dirs([tmp_path / "cli"])


def test_hydra_callback_builds_report_in_sweep_dir(sweep: Path) -> None:
    from omegaconf import OmegaConf

    ComparisonReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "report" / "report.html").stat().st_size > 0


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(sweep: Path, tmp_path: Path) -> None:
    page = report.build_report([sweep], tmp_path / "out")
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # The inline script ran: every interactive chart drew its SVG/canvas.
    assert dom.count("<svg") >= 4 and "<polygon" in dom and "<circle" in dom
    assert dom.count("<tr>") == (1 + 2) + (2 + 3)  # metrics: header + 2 metrics; kurtosis: 2 headers + 3 layers
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (2000, 1200)
    # matplotlib's first two series colours (tab:blue, tab:orange) appear only inside the embedded PNG figures (the
    # interactive charts are folded away in <details>).
    for rgb in ((31, 119, 180), (255, 127, 14)):
        near = (np.abs(pixels - np.array(rgb)).max(axis=2) < 40).sum()
        assert near > 200, f"no {rgb} pixels: the embedded PNG figures did not render"
    shutil.copy(shot, Path("/tmp/fp4lab_report_screenshot.png"))
