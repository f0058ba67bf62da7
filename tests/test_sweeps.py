"""A real Hydra multirun in a subprocess: one output dir, checkpoint, CSV log and W&B run per job."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.test_app import wandb_summary
from tests.tiny import overrides


def test_multirun_gives_each_job_its_own_outputs_and_wandb_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [a for a in overrides("llm", logger="wandb") if not a.startswith("model=")]
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "-m", "model=llm", "quant=fp32,bf16", *args,
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "run.json").exists())
    assert [j.name for j in jobs] == ["0_llm-fp32-seed0", "1_llm-bf16-seed0"]
    run_ids = set()
    for job, quant_name in zip(jobs, ["fp32", "bf16"]):
        assert json.loads((job / "run.json").read_text())["quant"] == quant_name
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "csv" / "metrics.csv").is_file()
        (wandb_run,) = (job / "wandb").glob("offline-run-*")
        summary = wandb_summary(wandb_run)
        assert summary["config"]["quant"]["name"] == quant_name and summary["state"] == "finished"
        assert "train/loss" in summary["summary"]
        run_ids.add(summary["run_id"])
    assert len(run_ids) == 2
    report = (sweep_dir / "report" / "report.html").read_text()
    assert "fp32" in report and "bf16" in report
