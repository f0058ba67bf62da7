"""Checkpoints are replaced atomically; a full disk ends the run with one clear message and the last checkpoint intact.

Disk limits are real: a small tmpfs mounted over the job's folder (needs root: ``mount -t tmpfs -o size=...``; skipped
otherwise) gives ENOSPC, and ``RLIMIT_FSIZE`` set in a child process (any user, any Linux) makes writes past the limit
fail with EFBIG. Nothing is mocked.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.reliability.support import (ENV, assert_unchanged, checkpoint_step, main_args, main_command, snapshot,
                                       wait_for)
from tests.tiny import overrides
from trainers.app import run
from trainers.reliability.files import StorageError, remove_stale_temporaries
from trainers.reliability.storage import AtomicCheckpointIO


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(folder, size)``: a tmpfs of ``size`` bytes on ``folder``; unmounted at the end of the test."""
    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    if not _can_mount():
        pytest.skip("mounting a size-limited tmpfs needs root")
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system is full."""
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


# The child writes checkpoints in a loop through ``atomic_write`` (what AtomicCheckpointIO.save_checkpoint calls),
# loaded by path so that the child does not import Lightning: it starts writing in about a second.
_WRITER = textwrap.dedent("""
    import importlib.util, sys, torch
    spec = importlib.util.spec_from_file_location("files", "trainers/reliability/files.py")
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    path = sys.argv[1]
    for i in range(1_000_000):
        state = {"i": i, "w": torch.full((4_000_000,), float(i))}
        files.atomic_write(path, lambda handle: torch.save(state, handle), "checkpoint")
""")


def test_kill_9_while_a_checkpoint_is_written_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=Path(__file__).parents[2], env=ENV)
    wait_for(lambda: path.is_file() and any(tmp_path.glob("last.ckpt.tmp-*")), writer, what="a write in progress")
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    state = torch.load(path, weights_only=True)  # a torn file would not load
    assert torch.equal(state["w"], torch.full((4_000_000,), float(state["i"])))
    assert remove_stale_temporaries(tmp_path) == [tmp_path / f"last.ckpt.tmp-{writer.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_full_disk_while_checkpointing_stops_with_one_message_and_keeps_the_last_checkpoint(
        cfg_factory, tmp_path, tmpfs, caplog):
    probe = cfg_factory(*overrides("resnet"), "trainer.max_steps=1", f"paths.output_dir={tmp_path / 'probe'}")
    run(probe)
    size = (tmp_path / "probe" / "checkpoints" / "last.ckpt").stat().st_size
    out = tmp_path / "job"
    tmpfs(out / "checkpoints", int(size * 1.5))  # room for one checkpoint, not for its replacement next to it
    cfg = cfg_factory(*overrides("resnet"), "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1",
                      f"paths.output_dir={out}")
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 2
    assert "could not write checkpoint" in caplog.text and "No space left on device" in caplog.text
    assert "the previous file is unchanged" in caplog.text
    assert checkpoint_step(out / "checkpoints" / "last.ckpt") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_full_disk_while_writing_plots_stops_with_one_message(cfg_factory, tmp_path, tmpfs, caplog):
    out = tmp_path / "job"
    _fill(tmpfs(out / "plots", 256 * 1024))
    cfg = cfg_factory(*overrides("resnet"), "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1",
                      "analysis=default", "analysis.every_n_steps=1", "analysis.kurtosis_study=false",
                      f"paths.output_dir={out}")
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 2
    assert "No space left on device" in caplog.text and "an analysis figure could not be written" in caplog.text
    # The figures are written on a background thread, so the error stops the run after the first step or after a later
    # one, and a checkpoint may or may not have been written by then (CI saw both); whatever was written is intact.
    for checkpoint in (out / "checkpoints").glob("*.ckpt"):
        torch.load(checkpoint, weights_only=True)


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG
    return apply


def test_a_file_size_limit_hit_by_a_resumed_run_leaves_the_job_folder_as_it_was(tmp_path, cfg_factory):
    first = cfg_factory(*overrides("resnet"), f"paths.output_dir={tmp_path / 'job'}")
    run(first)
    job = tmp_path / "job"
    checkpoints = job / "checkpoints"
    before = snapshot(checkpoints)
    limit = (checkpoints / "last.ckpt").stat().st_size // 2
    args = main_args("resnet", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1", "ckpt_path=last",
                     cache=Path(first.paths.cache_dir))
    result = subprocess.run(main_command(args, job), cwd=tmp_path, capture_output=True, text=True, env=ENV,
                            timeout=300, preexec_fn=_limit_file_size(limit))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "could not write checkpoint" in output and "File too large" in output and "Traceback" not in output
    assert_unchanged(checkpoints, before)


def test_storage_error_names_the_file_and_keeps_the_old_content(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    blocker = tmp_path / "sub"
    blocker.write_text("a file where a folder is needed")
    with pytest.raises(StorageError, match=f"could not write checkpoint {blocker / 'x.ckpt'}"):
        io.save_checkpoint({"step": 2}, blocker / "x.ckpt")
    assert torch.load(path, weights_only=True) == {"step": 1}
