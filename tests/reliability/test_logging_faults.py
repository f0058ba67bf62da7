"""W&B failing mid-run never stops training: CSV and checkpoints go on, a warning says what was lost.

Both failures are real: the W&B service process (``wandb-core``, a child of the training process) is killed with
SIGKILL while the job trains, or the disk under the W&B run folder fills up (a tmpfs, root only).
"""
from __future__ import annotations

import csv
import io
import os
import signal
import threading
from pathlib import Path


from tests.reliability.support import checkpoint_step
from tests.reliability.test_storage import _fill, tmpfs  # noqa: F401  (fixture)
from tests.tiny import overrides
from trainers.app import run

STEPS = ("trainer.max_steps=12", "trainer.checkpoint_every_n_steps=1", "trainer.val_check_interval=6")


def _wandb_services() -> list[int]:
    """Pids of this process's ``wandb-core`` children."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and name.startswith("wandb-core"):
            pids.append(int(stat.parent.name))
    return pids


def _when_checkpointed(out: Path, action) -> threading.Thread:
    """Run ``action()`` on a thread as soon as the job's first checkpoint exists."""
    def wait() -> None:
        last = out / "checkpoints" / "last.ckpt"
        for _ in range(6000):
            if last.is_file():
                action()
                return
            threading.Event().wait(0.01)
    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _train_steps(out: Path) -> list[str]:
    rows = csv.DictReader(io.StringIO((out / "csv" / "metrics.csv").read_text()))
    return [row["step"] for row in rows if row.get("train/loss")]


def test_wandb_service_killed_mid_run_does_not_stop_training(cfg_factory, caplog):
    cfg = cfg_factory(*overrides("llm", logger="wandb"), *STEPS)
    out = Path(cfg.paths.output_dir)
    killed: list[int] = []

    def kill_service() -> None:
        for pid in _wandb_services():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = _when_checkpointed(out, kill_service)
    run(cfg)
    thread.join()
    assert killed, "no wandb-core child process was found"
    assert "W&B failed mid-run" in caplog.text and "Training continues" in caplog.text
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == 12
    assert _train_steps(out) == [str(step) for step in range(12)]  # the CSV log is complete
    assert (out / "run.json").is_file()

    caplog.clear()  # the next job of this process (as in a multirun) gets a fresh W&B service and run
    after = cfg_factory(*overrides("llm", logger="wandb"), f"paths.output_dir={out.parent / 'next'}")
    run(after)
    assert "W&B could not start" not in caplog.text and "W&B failed" not in caplog.text
    assert len(list((out.parent / "next" / "wandb").glob("offline-run-*"))) == 1


def test_wandb_folder_filling_up_mid_run_is_reported_and_training_finishes(cfg_factory, caplog, tmpfs):  # noqa: F811
    cfg = cfg_factory(*overrides("llm", logger="wandb"), *STEPS)
    out = Path(cfg.paths.output_dir)
    wandb_disk = tmpfs(out / "wandb", 2 * 1024 * 1024)
    thread = _when_checkpointed(out, lambda: _fill(wandb_disk))
    run(cfg)
    thread.join()
    assert "W&B reported" in caplog.text and "write error(s)" in caplog.text and "no space left" in caplog.text
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == 12
    assert _train_steps(out) == [str(step) for step in range(12)]
