"""End-to-end jobs through ``trainers.app.run`` on the real config: each model family fits, resumes, logs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.tiny import overrides
from trainers.app import run


@pytest.mark.parametrize("family", ["unet", "resnet", "llm"])
def test_two_step_fit_of_each_model_family_writes_the_job_outputs(cfg_factory, family):
    cfg = cfg_factory(*overrides(family))
    run(cfg)
    out = Path(cfg.paths.output_dir)
    summary = json.loads((out / "run.json").read_text())
    assert summary["model"] == family and summary["quant"] == "bf16"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "train/loss" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "quantized" in (out / "quant_report.txt").read_text() or "policy" in (out / "quant_report.txt").read_text()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_resume_from_a_checkpoint_continues_the_step_count(cfg_factory, tmp_path):
    first = cfg_factory(*overrides("resnet"))
    run(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = cfg_factory(*overrides("resnet", "trainer.max_steps=4", f"ckpt_path={ckpt}",
                                     f"paths.output_dir={tmp_path / 'resumed'}"))
    run(resumed)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 4


def test_max_epochs_that_stops_before_max_steps_is_warned_about(cfg_factory):
    # limit_train_batches=2: an epoch is 2 steps, so max_epochs=1 ends the run at step 2 of 50
    cfg = cfg_factory(*overrides("resnet", "trainer.max_steps=50", "trainer.max_epochs=1",
                                 "trainer.limit_train_batches=2"))
    with pytest.warns(UserWarning, match=r"trainer.max_epochs=1 ends training after 2 optimizer steps, before "
                                         r"trainer.max_steps=50"):
        run(cfg)
    assert torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def wandb_summary(run_dir: Path) -> dict:
    """Read an offline W&B run back with W&B's own reader (``wandb leet inspect``), no mocks."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                            capture_output=True, text=True, check=True, timeout=60)
    return json.loads(result.stdout)


def test_wandb_offline_run_holds_config_and_metrics(cfg_factory):
    cfg = cfg_factory(*overrides("llm", logger="wandb"), "quant=fp32")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = wandb_summary(runs[0])
    assert summary["name"] == "llm-fp32-seed0" and summary["state"] == "finished"
    assert summary["config"]["quant"]["name"] == "fp32"
    assert {"train/loss", "val/loss", "test/ppl"} <= set(summary["summary"])
    assert os.environ["WANDB_DIR"] == str(out)  # W&B's files stay inside the job's output dir


def test_wandb_failing_to_start_degrades_to_csv(cfg_factory, caplog):
    cfg = cfg_factory(*overrides("llm", logger="wandb"))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True)
    (out / "wandb").write_text("not a directory")  # W&B cannot create its run folder here
    run(cfg)
    assert "W&B could not start" in caplog.text
    assert (out / "csv" / "metrics.csv").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.skipif(not (SHARED_DATA / "coco2017_tiny").is_dir(), reason="shared COCO slice not present")
def test_real_coco_slice_trains_through_the_app(cfg_factory):
    cfg = cfg_factory(*[o for o in overrides("unet") if not o.startswith("data.")], "data=coco", f"data.root={SHARED_DATA / 'coco2017_tiny'}",
                      "data.image_size=64", "data.batch_size=2", "data.num_workers=0")
    run(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())
    assert summary["data"] == "coco" and "test/miou" in summary["metrics"]


def test_analyze_mode_studies_a_checkpoint_without_training(cfg_factory, tmp_path):
    trained = cfg_factory(*overrides("llm"), "quant=nvfp4")
    run(trained)
    ckpt = Path(trained.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = cfg_factory(*overrides("llm"), "quant=nvfp4", "mode=analyze", "analysis=default", f"ckpt_path={ckpt}",
                      f"paths.output_dir={tmp_path / 'analyze'}")
    run(cfg)
    study = tmp_path / "analyze" / "plots" / "kurtosis" / "llm-nvfp4-seed0"
    assert (study / "kurtosis.csv").stat().st_size > 0 and (study / "kurtosis.png").stat().st_size > 0
    assert not (tmp_path / "analyze" / "checkpoints").exists()  # nothing was trained
