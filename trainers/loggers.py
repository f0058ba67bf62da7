"""Experiment trackers of one job: CSV always, W&B (offline by default) and TensorBoard on request.

Why this module exists:
* W&B keeps global state per process. In a Hydra multirun every job runs in the same process, so each job must
  point W&B's directories into its own output dir *before* the run starts and must call ``wandb.finish()`` at the
  end (``finish_wandb``, called from a ``finally``), or job 2 writes into job 1's run.
* W&B failing to start (no disk space, bad settings, no network in online mode) must not kill a training run:
  ``build_loggers`` starts the W&B run eagerly, and on failure warns and carries on with CSV only.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from conf.schemas.logger import LoggerConfig

log = logging.getLogger(__name__)


def wandb_env(output_dir: Path) -> dict[str, str]:
    """W&B's directories inside the job's output dir, so artifacts and caches travel with the run."""
    root = output_dir / "wandb"
    return {
        "WANDB_DIR": str(output_dir),
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_ARTIFACT_DIR": str(root / "artifacts"),
        "WANDB_CONFIG_DIR": str(root / "config"),
    }


def build_loggers(
    cfg: LoggerConfig,
    *,
    output_dir: Path,
    run_name: str,
    group: str,
    job_type: str,
    config: dict[str, Any],
) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(output_dir), name="csv", version="")]
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version=""))
    if cfg.wandb and cfg.wandb_mode != "disabled" and rank_zero_only.rank == 0:  # one W&B run per job: rank 0's
        wandb_logger = _start_wandb(cfg, output_dir=output_dir, run_name=run_name, group=group, job_type=job_type,
                                    config=config)
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    return loggers


def _start_wandb(cfg: LoggerConfig, *, output_dir: Path, run_name: str, group: str, job_type: str,
                 config: dict[str, Any]) -> WandbLogger | None:
    env = wandb_env(output_dir)
    try:
        for key, value in env.items():
            os.environ[key] = value
            if key != "WANDB_DIR":
                Path(value).mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(
            name=run_name,
            save_dir=str(output_dir),
            project=cfg.project,
            entity=cfg.entity,
            offline=cfg.wandb_mode == "offline",
            group=group,
            job_type=job_type,
            tags=list(cfg.tags),
            config=config,
            reinit="finish_previous",
        )
        logger.experiment  # start the run now, so a failure is caught here and not mid-training
    except Exception as exc:  # noqa: BLE001 - any W&B failure must degrade to CSV-only logging
        log.warning("W&B could not start (%s: %s); continuing with the CSV logger only. Nothing of the W&B run "
                    "is kept; metrics are in %s/csv/metrics.csv.", type(exc).__name__, exc, output_dir)
        finish_wandb()
        return None
    return logger


def wandb_run_dir(loggers: list[Logger]) -> Path | None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return Path(logger.experiment.dir).parent
    return None


def log_checkpoint_artifact(loggers: list[Logger], checkpoints: dict[str, str], metadata: dict[str, Any]) -> None:
    """Record the job's checkpoints as a W&B model artifact (by reference: the files stay in the job dir)."""
    import wandb

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        paths = {alias: path for alias, path in checkpoints.items() if path and Path(path).is_file()}
        if not paths:
            return
        artifact = wandb.Artifact(name=f"model-{logger.experiment.id}", type="model", metadata=metadata)
        for alias, path in paths.items():
            artifact.add_reference(Path(path).resolve().as_uri(), name=f"{alias}.ckpt")
        logger.experiment.log_artifact(artifact, aliases=sorted(paths))


def finish_wandb() -> None:
    """Close the process's W&B run, if any (safe to call when W&B never started)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
