"""One job of fp4lab: validate the config, then run the requested ``mode`` (train, test, analyze, ...).

Why here and not in ``main.py``: ``main.py`` stays a thin Hydra entry point, and tests call ``run(cfg)`` on a
config composed with Hydra's compose API. Everything a job writes goes under ``cfg.paths.output_dir``:

    csv/metrics.csv            every logged metric (always on; the comparison report is built from it)
    checkpoints/{last,best}.ckpt
    wandb/offline-run-*/       the W&B run (offline by default; `wandb sync` it later)
    plots/                     heatmaps and kurtosis studies (analysis)
    quant_report.txt           which module is quantized, with which format, and why not
    run.json                   what ran (names, versions, effective precision) and the final metrics
    failure.json               why the job failed (only after a failure; removed by the next successful attempt)

Failures (docs/failures.md): a failure the user can act on (``UserError``, ``quant.QuantError``, a disk that is full
or read-only anywhere in the exception chain) ends a single run with one logged message and exit status 2, no
traceback; a bug keeps its traceback. In a multirun the job records its failure and returns None instead of
raising: Hydra 1.3's basic sweeper would run the rest of the batch and then re-raise the first failure, which skips
the ``on_multirun_end`` callbacks (the comparison report, ``trainers.reliability.multirun.JobsSummary``); the summary
callback lists the failed jobs and makes the sweep exit non-zero instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import quant
from conf.errors import ConfigError, UserError
from conf.schemas.root import RootConfig
from trainers import distributed
from trainers.job import Job
from trainers.loggers import finish_wandb
from trainers.modes import MODES
from trainers.reliability.failures import clear_failure, record_failure, user_message

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Run one job; return the monitored metric for sweepers (None in modes without one)."""
    output_dir = Path(OmegaConf.select(cfg, "paths.output_dir", default=".", throw_on_resolution_failure=False) or ".")
    try:
        distributed.adopt_submitit_local_tasks()  # DDP ranks that are submitit tasks (trainers/distributed.py)
        job = Job(cfg=cfg, typed=validate(cfg))
        distributed.check_launch(job.typed.trainer)
        job.output_dir.mkdir(parents=True, exist_ok=True)
        L.seed_everything(job.typed.seed, workers=True)
        result = MODES.get(job.typed.mode)(job)
        clear_failure(job.output_dir)
        print(f"[fp4lab] outputs: {job.output_dir}")
        return result
    except Exception as exc:
        message = user_message(exc, output_dir)
        record_failure(output_dir, exc, message)
        if not _in_single_run():
            if message:
                log.error("%s", message)
            else:
                log.exception("job failed with an unexpected error (a bug; traceback above)")
            return None  # the sweep goes on; JobsSummary reports this job and fails the sweep at its end
        if message is None:
            raise
        log.error("%s", message)
        raise SystemExit(2) from None  # one clear message, no traceback
    finally:
        finish_wandb()


def validate(cfg: DictConfig) -> RootConfig:
    """Turn the composed config into typed dataclasses, running every schema's ``__post_init__`` check."""
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (UserError, quant.QuantError)):
            raise cause from None
        raise ConfigError(str(exc).splitlines()[0]) from None
    assert isinstance(typed, RootConfig)
    return typed


def _in_single_run() -> bool:
    """True unless Hydra runs a multirun (``mode`` is None under the compose API, as in tests: a single job)."""
    return not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN
