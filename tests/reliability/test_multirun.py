"""A multirun with a failing job: the others finish and keep their outputs, the failure is reported as it happens
and listed at the end (``<sweep dir>/jobs.json``), and the sweep exits non-zero. A real ``main.py -m`` process."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.reliability.support import ENV
from tests.tiny import overrides


def test_a_failing_job_is_reported_and_the_other_jobs_keep_their_outputs(tmp_path, shared_cache):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "-m", *overrides("llm"), "optim.lr=-1,1e-3",
         f"paths.cache_dir={shared_cache}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "[fp4lab] job 0 (0_llm-bf16-seed0) failed: optim.lr=-1.0 is out of range" in output
    assert "[fp4lab] job 1 (1_llm-bf16-seed0) completed" in output  # the sweep went on after the failure
    assert "[fp4lab] sweep" in output and "1 of 2 jobs completed" in output
    assert "[fp4lab]   job 0 failed: optim.lr=-1" in output  # the end-of-sweep list names the swept value
    assert "Traceback" not in output

    jobs = json.loads((sweep / "jobs.json").read_text())
    assert [(job["job"], job["status"]) for job in jobs] == [(0, "failed"), (1, "completed")]
    assert "optim.lr=-1.0 is out of range" in jobs[0]["error"] and jobs[1]["error"] is None
    failed, done = sweep / "0_llm-bf16-seed0", sweep / "1_llm-bf16-seed0"
    assert json.loads((failed / "failure.json").read_text())["error"] == "ConfigError"
    assert (done / "run.json").is_file() and (done / "checkpoints" / "last.ckpt").is_file()
    assert "val/loss" in (done / "csv" / "metrics.csv").read_text()
    assert (sweep / "report" / "report.html").is_file()  # on_multirun_end callbacks still ran
