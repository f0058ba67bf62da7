"""NVFP4 fake-quantized UNet, ResNet and LLM train for a few hundred steps on CPU, and their loss falls.

Why: the bit-exactness tests prove each operand is quantized as TE does, but not that a whole model still learns
through the emulated recipe (SR on dY, RHT on the wgrad operands, 2-D weight tiles) end to end through the app. Each
family runs the real Lightning job with `quant=nvfp4` (backward=full) on its embedded data set, shrunk to a CPU size,
for 200-300 optimizer steps; the check compares the mean training loss of the first and the last 25 logged steps.
The ResNet run (ResNet-18, 11M parameters, emulated on every step) is the slow one and carries the `slow` mark.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.tiny import overrides
from trainers.app import run

WINDOW = 25  # logged steps averaged at each end of the curve
REQUIRED_DROP = 0.10  # the last window's mean loss must sit at least 10% below the first's

FAMILIES = [
    pytest.param("unet", 200, id="unet"),
    pytest.param("llm", 300, id="llm"),
    pytest.param("resnet", 200, id="resnet", marks=pytest.mark.slow),
]


def train_losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.parametrize(("family", "steps"), FAMILIES)
def test_nvfp4_fake_quantized_model_trains_with_falling_loss(cfg_factory, family, steps):
    cfg = cfg_factory(*overrides(family, "quant=nvfp4", f"trainer.max_steps={steps}", "trainer.max_epochs=null",
                                 "trainer.check_val_every_n_epoch=null", f"trainer.val_check_interval={steps}"))
    run(cfg)
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "run.json").read_text())["quant"] == "nvfp4"
    report = (out / "quant_report.txt").read_text()
    assert "nvfp4 1x16" in report  # the emulated NVFP4 layers were in the loop, not a high-precision fallback
    losses = train_losses(out)
    assert len(losses) >= steps - 1  # log_every_n_steps=1: one value per optimizer step
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    print(f"\n{family}: mean train loss of the first {WINDOW} steps {first:.4f}, of the last {WINDOW} {last:.4f}")
    assert last < (1 - REQUIRED_DROP) * first, f"{family}: loss {first:.4f} -> {last:.4f} over {steps} steps"
