"""Hydra callback: say at once when a sweep job fails, and list every job's outcome when the sweep ends.

Registered in ``conf/config.yaml`` *before* the comparison report: Hydra calls ``on_multirun_end`` callbacks in
reverse order, and this one ends the process, so the report must run first::

    hydra:
      callbacks:
        jobs_summary:
          _target_: trainers.reliability.multirun.JobsSummary
        comparison_report: ...

What Hydra 1.3.8 does by itself when a job raises (``BasicSweeper.sweep``): the launcher runs every job of the batch
(all jobs, unless ``hydra.sweeper.max_batch_size`` is set), then the sweeper reads each job's return value, which
re-raises the first failure; the sweep stops there (later batches never start), ``on_multirun_end`` callbacks do
not run and the process exits with status 1. ``trainers.app.run`` therefore does not raise in a multirun: a failed
job writes ``failure.json`` into its folder and returns None. ``JobsSummary`` then

* ``on_job_end``: prints one line per finished job (``[fp4lab] job 3 failed: <message>``), in the job's process;
* ``on_multirun_end``: reads every job folder of the sweep (``run.json`` = completed, ``failure.json`` = failed,
  neither = did not finish), writes ``<sweep dir>/jobs.json``, prints the failed jobs and exits with status 1 if
  any job failed. Job folders are only read, so every job's outputs stay as they are.

Reading the folders (rather than remembering what ``on_job_end`` saw) also works for launchers that run jobs in
other processes (joblib, submitit).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainers.reliability.failures import FAILURE_FILE
from trainers.reliability.files import atomic_write_bytes

log = logging.getLogger(__name__)

SUMMARY_FILE = "jobs.json"


def _job_number(folder: Path) -> int:
    match = re.match(r"(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def job_record(folder: Path) -> dict[str, Any]:
    """What one sweep job folder says about its outcome."""
    overrides = OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "overrides.yaml")) if (
        folder / ".hydra" / "overrides.yaml").is_file() else []
    failure = _read_json(folder / FAILURE_FILE)
    summary = _read_json(folder / "run.json")
    if failure is not None:
        status, error = "failed", failure.get("message")
    elif summary is not None:
        status, error = "completed", None
    else:
        status, error = "unfinished", "no run.json and no failure.json: the job was killed or is still running"
    monitor = (summary or {}).get("monitor")
    return {"job": _job_number(folder), "folder": str(folder), "status": status, "error": error,
            "overrides": overrides, "run_name": (summary or {}).get("run_name"),
            "monitor": monitor, "value": (summary or {}).get("metrics", {}).get(monitor) if monitor else None}


def sweep_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    folders = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return [job_record(folder) for folder in sorted(folders, key=_job_number)]


class JobsSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        folder = Path(config.hydra.runtime.output_dir)
        record = job_record(folder)
        if record["status"] == "failed":
            print(f"[fp4lab] job {record['job']} ({folder.name}) failed: {record['error']}")
        else:
            print(f"[fp4lab] job {record['job']} ({folder.name}) {record['status']}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(sweep_dir)
        try:
            atomic_write_bytes(sweep_dir / SUMMARY_FILE, (json.dumps(jobs, indent=2) + "\n").encode(), "job summary")
        except Exception as exc:  # noqa: BLE001 - the summary is printed below anyway
            log.warning("Could not write %s: %s", sweep_dir / SUMMARY_FILE, exc)
        failed = [job for job in jobs if job["status"] != "completed"]
        print(f"[fp4lab] sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs completed "
              f"(summary: {sweep_dir / SUMMARY_FILE})")
        shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if jobs else set()
        for job in failed:
            swept = " ".join(o for o in job["overrides"] if o not in shared) or "(same overrides as the others)"
            print(f"[fp4lab]   job {job['job']} {job['status']}: {swept}\n[fp4lab]     {job['error']}")
        if failed:
            raise SystemExit(1)
