"""``bench/ddp_scaling.py --quick``: the GPU benchmark's own code path on CPU (1 process vs 2 gloo ranks, tiny LLM)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_ddp_scaling_quick_compares_one_and_two_processes(tmp_path):
    out = tmp_path / "ddp_scaling.json"
    result = subprocess.run([sys.executable, "-m", "bench.ddp_scaling", "--quick", "--models", "llm",
                             "--no-sr-reference", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["runs"]["2dev"]["world_size"] == 2 and row["runs"]["1dev"]["world_size"] == 1
    assert len(row["runs"]["1dev"]["losses"]) == len(row["runs"]["2dev"]["losses"]) == 4
    # same initial weights and the same global batch: the first losses differ only by per-rank numerics
    assert row["first_step_loss"]["relative_gap"] < 0.01 and row["passed"]
