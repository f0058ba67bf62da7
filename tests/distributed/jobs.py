"""Real ``main.py`` runs in subprocesses for the distributed tests, and how to read what they leave behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO
from tests.tiny import overrides
from trainers.distributed import SUMMARY_FILE, parameter_digest

# The tiny LLM on 2 CPU ranks with gloo; NVFP4 runs emulated in bf16 autocast.
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def tiny_llm(*extra: str, logger: str = "csv") -> list[str]:
    return [*overrides("llm", logger=logger), *extra]


def run_main(args: list[str], tmp_path: Path, timeout: int = 500) -> subprocess.CompletedProcess:
    """``python main.py <args>`` from the repository root (submitit's workers import the repo from their working
    directory), with the generated data cached under ``tmp_path``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *args, f"paths.cache_dir={tmp_path / 'cache'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def replica_summary(job_dir: Path) -> dict:
    return json.loads((job_dir / SUMMARY_FILE).read_text())


def checkpoint_digest(path: Path) -> str:
    """``parameter_digest`` of a checkpoint's weights; a tied weight (one storage under two names, as the LLM's
    embedding and lm_head) counts once, as in ``named_parameters``."""
    state = torch.load(path, weights_only=False)["state_dict"]
    seen: set[int] = set()
    unique = []
    for name, tensor in state.items():
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            unique.append((name, tensor))
    return parameter_digest(unique)
