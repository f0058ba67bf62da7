"""``python main.py trainer=ddp`` on 2 CPU processes (gloo) with emulated NVFP4: Lightning's subprocess launcher
re-runs main.py for rank 1, both ranks train, the replicas end identical (rank 1's weights are gathered and compared
with rank 0's and with the checkpoint), only rank 0 writes the job's files and its W&B run, and the analysis callbacks
run on rank 0 every step while rank 1 trains on (no collective inside rank-0-only code: the amax reduction is on)."""
from __future__ import annotations

import json

from tests.distributed.jobs import DDP_CPU, checkpoint_digest, replica_summary, run_main, tiny_llm


def test_ddp_nvfp4_with_reduced_amax_keeps_replicas_identical_and_logs_once(tmp_path):
    out = tmp_path / "run"
    run_main([*tiny_llm("quant=nvfp4", "quant.amax_reduction=world", "analysis=default", "analysis.every_n_steps=1",
                        logger="wandb"), *DDP_CPU, f"hydra.run.dir={out}"], tmp_path)
    summary = replica_summary(out)
    assert summary["world_size"] == 2 and summary["strategy"] == "DDPStrategy"
    rank0, rank1 = summary["parameter_sha256"]
    assert summary["replicas_identical"] and rank0 == rank1
    assert checkpoint_digest(out / "checkpoints" / "last.ckpt") == rank1  # rank 1 holds what rank 0 saved
    run = json.loads((out / "run.json").read_text())
    assert run["quant"] == "nvfp4" and run["quant_backend"] == "emulated" and "test/loss" in run["metrics"]
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # rank 1 starts no W&B run
    assert (out / "quant_report.txt").is_file() and (out / "csv" / "metrics.csv").is_file()
    assert list((out / "plots").rglob("*.png")) and list((out / "plots" / "kurtosis").rglob("kurtosis.csv"))
