"""Shared pieces of the reliability tests: tiny command lines, real ``main.py`` processes, folder snapshots."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import REPO
from tests.tiny import overrides

# One thread per process: bit-exact comparisons between processes must not depend on how many cores are free.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
HYDRA_FILES = (".hydra", "main.log")  # Hydra rewrites these on every attempt (docs/failures.md)


def main_args(family: str, *extra: str, cache: Path, logger: str = "csv") -> list[str]:
    return [*overrides(family, logger=logger), f"paths.cache_dir={cache}", *extra]


def main_command(args: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), *args, f"hydra.run.dir={run_dir}"]


def run_main(args: list[str], run_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(args, run_dir), cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def start_main(args: list[str], run_dir: Path, log: Path) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        return subprocess.Popen(main_command(args, run_dir), cwd=run_dir.parent, stdout=handle,
                                stderr=subprocess.STDOUT, env=ENV)


def checkpoint_step(path: Path) -> int:
    """The global step of a checkpoint (it is replaced atomically, so a reader sees a whole file or the old one)."""
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def wait_for(condition, process: subprocess.Popen, timeout: float = 240.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (except Hydra's own) as bytes, keyed by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not str(p.relative_to(folder)).startswith(HYDRA_FILES)}


def assert_unchanged(folder: Path, before: dict[str, bytes], allowed_new: tuple[str, ...] = ("failure.json",)) -> None:
    after = snapshot(folder)
    changed = [name for name in before if after.get(name) != before[name]]
    added = [name for name in after if name not in before and name not in allowed_new]
    assert not changed and not added, f"changed: {changed}, added: {added}"


def same_tensors(a: dict, b: dict) -> list[str]:
    """Keys of two state dicts whose tensors differ (bitwise), or that only one of them has."""
    keys = set(a) | set(b)
    return sorted(k for k in keys if k not in a or k not in b or not torch.equal(a[k], b[k]))


def flat_tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure (optimizer states ...), keyed by its path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            out.update(flat_tensors(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            out.update(flat_tensors(item, f"{prefix}/{index}"))
    return out
