"""Kill -9 and resume: the resumed run equals an uninterrupted one bit for bit (weights, optimizer, SR, metrics).

The end-to-end test runs real ``main.py`` processes: an uninterrupted run and a twin that is killed with SIGKILL right
after a mid-epoch checkpoint lands (the harshest moment: the rows of that step may not be in the CSV yet), then the
same command again with ``ckpt_path=last``. ``quant=nvfp4`` makes the stochastic-rounding generators matter and an
epoch of 4 batches makes the data position matter: without either restore the weights differ after one step.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from conf.errors import ConfigError
from data.sampling import ResumableDataLoader, SeededSampler
from tests.reliability.support import (assert_unchanged, checkpoint_step, flat_tensors, main_args, run_main,
                                       same_tensors, snapshot, start_main, wait_for)
from tests.tiny import overrides
from trainers.app import run
from trainers.reliability.resume import ResumeState, JobIdentity, capture_rng, resolve_resume, restore_rng


def _rows(path: Path) -> dict[tuple[str, ...], dict[str, str]]:
    """CSV rows keyed by (step, the names of the columns that are set): one train row and one val row per step."""
    rows = csv.DictReader(io.StringIO(path.read_text()))
    return {(row["step"], *sorted(k for k, v in row.items() if v and k not in ("step", "epoch"))): row for row in rows}


def _kill_and_resume(tmp_path: Path, args: list[str], max_steps: int, kill_at: int) -> None:
    """Run ``args`` straight and, next to it, a twin killed with SIGKILL once its last.ckpt reaches ``kill_at``, then
    rerun the twin's command with ``ckpt_path=last``; both folders must end bit-identical."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start_main(args, straight, tmp_path / "straight.log")
    victim = start_main(args, killed, tmp_path / "killed.log")
    last = killed / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.is_file() and checkpoint_step(last) >= kill_at, victim, what=f"a checkpoint at {kill_at}")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = checkpoint_step(last)
    assert victim.returncode == -signal.SIGKILL and killed_at < max_steps
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    resumed = run_main([*args, "ckpt_path=last"], killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {last} (step {killed_at})" in resumed.stdout + resumed.stderr

    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == max_steps
    assert same_tensors(a["state_dict"], b["state_dict"]) == []
    assert same_tensors(flat_tensors(a["optimizer_states"]), flat_tensors(b["optimizer_states"])) == []
    assert same_tensors(a["callbacks"]["ResumeState"]["sr"], b["callbacks"]["ResumeState"]["sr"]) == []
    summary_a, summary_b = (json.loads((d / "run.json").read_text()) for d in (straight, killed))
    assert summary_a["metrics"] == summary_b["metrics"] and summary_b["resumed_from"] == str(last)

    rows_a, rows_b = _rows(straight / "csv" / "metrics.csv"), _rows(killed / "csv" / "metrics.csv")
    assert all(rows_a[key] == row for key, row in rows_b.items())  # every row the resumed job has is exact
    missing = {key[0] for key in rows_a if key not in rows_b}
    assert missing <= {str(killed_at - 1)}  # at most the rows of the checkpoint's own step (docs/failures.md)
    assert not list((killed / "checkpoints").glob("*.tmp-*"))


def test_kill_9_mid_epoch_then_rerun_with_ckpt_path_last_equals_the_uninterrupted_run(tmp_path, shared_cache):
    """NVFP4 LLM (stochastic rounding in the backward), epochs of 4 batches, killed after step 2."""
    args = main_args("llm", "quant=nvfp4", "trainer.max_steps=7", "trainer.limit_train_batches=4",
                     "trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=1", "trainer.deterministic=true",
                     cache=shared_cache)
    _kill_and_resume(tmp_path, args, max_steps=7, kill_at=2)
    sr = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["ResumeState"]
    assert len(sr["sr"]) > 0  # the policy's layers have SR streams, and they were compared above


@pytest.mark.slow
def test_kill_9_of_a_unet_with_data_workers_and_augmentation_resumes_exactly(tmp_path, shared_cache):
    """UNet + instance head (GroupNorm, Hungarian matching), NVFP4, shapes data with per-sample augmentation read by
    two worker processes that prefetch ahead of training (the loader counts batches handed out, not fetched),
    killed in its second epoch."""
    args = main_args("unet", "quant=nvfp4", "data.num_workers=2", "trainer.max_steps=9", "trainer.val_check_interval=4",
                     "trainer.checkpoint_every_n_steps=1", "trainer.deterministic=true", cache=shared_cache)
    _kill_and_resume(tmp_path, args, max_steps=9, kill_at=5)


class _Noisy(Dataset):
    def __init__(self) -> None:
        self.x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        index, _ = key
        return self.x[index]


class _Dropout(L.LightningModule):
    """Training draws from the global torch RNG (dropout) and from numpy / python's RNG (a noise scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        scale = 1.0 + float(np.random.rand()) + random.random()
        return self.net(batch * scale).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return ResumableDataLoader(_Noisy(), batch_size=4, sampler=SeededSampler(40, seed=3))


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None) -> dict:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, limit_val_batches=0,
                        callbacks=[ResumeState(JobIdentity("t", "m", "d", "q")),
                                   L.pytorch.callbacks.ModelCheckpoint(dirpath=root, filename="last",
                                                                       every_n_train_steps=1, save_top_k=1,
                                                                       enable_version_counter=False)])
    module = _Dropout()
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=False)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_resume_state_continues_the_global_rng_streams_and_the_epoch_position(tmp_path):
    straight = _fit(tmp_path / "a", max_steps=14)  # 10 batches per epoch: the resume lands mid-epoch 0
    _fit(tmp_path / "b", max_steps=6)
    resumed = _fit(tmp_path / "c", max_steps=14, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert same_tensors(straight, resumed) == []


class _Indices(Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, key):
        return torch.tensor(key[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_continues_after_the_batches_it_handed_out(workers):
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(_Indices(), batch_size=3, sampler=SeededSampler(20, seed=5), drop_last=True,
                                   num_workers=workers, persistent_workers=workers > 0)

    reference = loader()
    reference.sampler.set_epoch(1)
    epoch = [b.tolist() for b in reference]  # 6 batches of 3
    first = loader()
    first.sampler.set_epoch(1)
    batches = iter(first)
    seen = [next(batches).tolist() for _ in range(2)]
    assert first.state_dict() == {"epoch": 1, "batches": 2}  # what left the loader, not what workers prefetched
    second = loader()
    second.load_state_dict(first.state_dict())
    assert seen + [b.tolist() for b in second] == epoch
    second.sampler.set_epoch(2)
    assert len(list(second)) == len(epoch)  # the next pass is a whole epoch again


def test_rng_capture_round_trips_every_generator():
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_which_checkpoint_a_job_resumes(tmp_path):
    out = tmp_path / "run"
    assert resolve_resume(None, out) is None and resolve_resume("auto", out) is None
    with pytest.raises(ConfigError, match=r"ckpt_path=last: there is no .*run/checkpoints/last.ckpt.*hydra.run.dir"):
        resolve_resume("last", out)
    with pytest.raises(ConfigError, match="ckpt_path=.*nope.ckpt does not exist"):
        resolve_resume(str(tmp_path / "nope.ckpt"), out)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_resume("last", out) == resolve_resume("auto", out) == out / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="already holds the checkpoints of a run .*last.ckpt.*ckpt_path=last"):
        resolve_resume(None, out)
    sibling = tmp_path / "run2"
    with pytest.raises(ConfigError, match=f"Runs of this name with a last.ckpt .*{out}"):
        resolve_resume("last", sibling)


def test_auto_resume_continues_a_finished_run_in_place_and_refuses_a_fresh_start(cfg_factory, caplog):
    cfg = cfg_factory(*overrides("resnet"), "trainer.max_steps=2")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    before = snapshot(out)
    with pytest.raises(SystemExit) as stopped:  # same output dir, no ckpt_path: refused, nothing touched
        run(cfg_factory(*overrides("resnet"), "trainer.max_steps=4"))
    assert stopped.value.code == 2 and "a fresh start would overwrite them" in caplog.text
    assert_unchanged(out, before)
    run(cfg_factory(*overrides("resnet"), "trainer.max_steps=4", "ckpt_path=auto"))
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == 4
    assert not (out / "failure.json").exists()  # the successful attempt removed the failed one's record
    steps = [row["step"] for row in csv.DictReader(io.StringIO((out / "csv" / "metrics.csv").read_text()))
             if row["train/loss"]]
    assert steps == ["0", "1", "2", "3"]  # the CSV log continues across the resume
