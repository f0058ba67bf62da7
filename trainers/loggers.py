"""Experiment trackers of one job: CSV always, W&B (offline by default) and TensorBoard on request.

Why this module exists:
* W&B keeps global state per process. In a Hydra multirun every job runs in the same process, so each job must
  point W&B's directories into its own output dir *before* the run starts and must call ``wandb.finish()`` at the
  end (``finish_wandb``, called from a ``finally``), or job 2 writes into job 1's run.
* W&B failing to start (no disk space, bad settings, no network in online mode) must not kill a training run:
  ``build_loggers`` starts the W&B run eagerly, and on failure warns and carries on with CSV only.
* W&B failing mid-run must not kill it either. Two ways it fails, both seen with wandb 0.31: its service process dies
  (every later call raises ``ConnectionResetError``), or its folder stops taking writes (disk full, read-only): then
  W&B raises nothing, its service logs ``"level":"ERROR"`` records and drops the data. ``GuardedWandbLogger`` catches
  the first exception of any call (metrics, hyperparameters, media, artifacts, finish), warns once with what is lost,
  and turns itself off for the rest of the run; ``finish_wandb`` reads the run's ``logs/debug-internal.log`` and
  warns when W&B recorded write errors. CSV and checkpoints are not affected.
* A resumed job continues its own ``csv/metrics.csv``: Lightning's CSV logger deletes an existing file when it
  starts, so ``ResumableCSVLogger`` keeps the rows logged before the checkpoint's step and drops those after it
  (the resumed run logs them again). It writes every row as it comes (no batching), so a kill loses nothing that
  was logged before the checkpoint.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from lightning.fabric.loggers.logger import _DummyExperiment
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


class ResumableCSVLogger(CSVLogger):
    """``csv/metrics.csv``, written row by row; on a resume it continues the rows logged before ``resume_step``."""

    def __init__(self, save_dir: str, resume_step: int | None = None) -> None:
        super().__init__(save_dir=save_dir, name="csv", version="", flush_logs_every_n_steps=1)
        path = Path(self.log_dir) / "metrics.csv"
        kept: tuple[list[str], list[dict[str, str]]] | None = None
        if resume_step is not None and path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                rows = [row for row in reader if row.get("step", "").isdigit() and int(row["step"]) < resume_step]
                kept = (list(reader.fieldnames or []), rows)
        writer = self.experiment  # Lightning's writer deletes an existing metrics.csv here (on rank 0 only)
        if kept is not None and kept[1] and rank_zero_only.rank == 0:
            header, rows = kept
            writer.metrics_keys = sorted(header)
            with open(path, "w", newline="") as handle:
                out = csv.DictWriter(handle, fieldnames=writer.metrics_keys)
                out.writeheader()
                out.writerows(rows)


class GuardedWandbLogger(WandbLogger):
    """A ``WandbLogger`` that never raises after start-up: the first failure disables it with one warning."""

    def __init__(self, *args: Any, output_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._output_dir = Path(output_dir)
        self.failure: str | None = None

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        if self.failure is not None:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - no W&B failure may stop training
            self.failure = f"{what}: {type(exc).__name__}: {exc}"
            log.warning("W&B failed mid-run (%s). W&B logging is off for the rest of this run: the offline W&B run "
                        "stops at this point (later metrics, media and the checkpoint artifact are not in it). "
                        "Training continues; every metric is in %s and checkpoints are unaffected.",
                        self.failure, self._output_dir / "csv" / "metrics.csv")
            return None

    @property
    def experiment(self) -> Any:
        if self.failure is not None:
            return _DummyExperiment()
        experiment = self._guard("starting the run", lambda: WandbLogger.experiment.fget(self))
        return _DummyExperiment() if experiment is None else experiment

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guard("log_metrics", lambda: super(GuardedWandbLogger, self).log_metrics(metrics, step))

    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", lambda: super(GuardedWandbLogger, self).log_hyperparams(params))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("after_save_checkpoint", lambda: super(GuardedWandbLogger, self).after_save_checkpoint(
            checkpoint_callback))

    def finalize(self, status: str) -> None:
        self._guard("finalize", lambda: super(GuardedWandbLogger, self).finalize(status))

    def guarded(self, what: str, call: Callable[[], Any]) -> Any:
        """Run another W&B call (``experiment.log_artifact`` ...) under the same guard."""
        return self._guard(what, call)


def build_loggers(
    cfg: LoggerConfig,
    *,
    output_dir: Path,
    run_name: str,
    group: str,
    job_type: str,
    config: dict[str, Any],
    resume_step: int | None = None,
) -> list[Logger]:
    """CSV (+ TensorBoard, + W&B). ``resume_step``: the global step of the checkpoint a train job resumes from."""
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=str(output_dir), resume_step=resume_step)]
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
    previous = {key: os.environ.get(key) for key in (*env, "WANDB_MODE")}
    try:
        for key, value in env.items():
            os.environ[key] = value
            if key != "WANDB_DIR":
                Path(value).mkdir(parents=True, exist_ok=True)
        logger = GuardedWandbLogger(
            output_dir=output_dir,
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
        WandbLogger.experiment.fget(logger)  # start the run now, so a failure is caught here and not mid-training
    except Exception as exc:  # noqa: BLE001 - any W&B failure must degrade to CSV-only logging
        log.warning("W&B could not start (%s: %s); continuing with the CSV logger only. Nothing of the W&B run "
                    "is kept; metrics are in %s/csv/metrics.csv.", type(exc).__name__, exc, output_dir)
        finish_wandb()
        for key, value in previous.items():  # do not leave W&B (and child processes) pointed at a broken folder
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return None
    return logger


def wandb_run_dir(loggers: list[Logger]) -> Path | None:
    for logger in loggers:
        if isinstance(logger, WandbLogger) and not getattr(logger, "failure", None):
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

        def log_artifact() -> None:
            artifact = wandb.Artifact(name=f"model-{logger.experiment.id}", type="model", metadata=metadata)
            for alias, path in paths.items():
                artifact.add_reference(Path(path).resolve().as_uri(), name=f"{alias}.ckpt")
            logger.experiment.log_artifact(artifact, aliases=sorted(paths))

        if isinstance(logger, GuardedWandbLogger):
            logger.guarded("log_artifact", log_artifact)
        else:
            log_artifact()


def wandb_write_errors(run_dir: Path) -> list[str]:
    """The ERROR records W&B's service wrote to ``<run dir>/logs/debug-internal.log`` (none in a healthy run)."""
    errors = []
    try:
        lines = (Path(run_dir) / "logs" / "debug-internal.log").read_text(errors="replace").splitlines()
    except OSError:
        return errors
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a full disk
        if isinstance(record, dict) and record.get("level") == "ERROR":
            errors.append(str(record.get("msg", line)))
    return errors


def finish_wandb() -> None:
    """Close the process's W&B run, if any (safe to call when W&B never started or has died); warn about data that
    W&B reported it could not write."""
    import sys

    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
    try:
        wandb.finish()
    except Exception as exc:  # noqa: BLE001 - its service is gone; the run's own outcome is what matters
        log.warning("W&B could not close its run (%s: %s); the offline run in %s may be incomplete.",
                    type(exc).__name__, exc, run_dir)
        _drop_dead_service(wandb)
        return
    errors = wandb_write_errors(run_dir) if run_dir is not None else []
    if errors:
        log.warning("W&B reported %d write error(s), so the offline run in %s is incomplete (first: %s). The CSV log "
                    "and the checkpoints are not affected.", len(errors), run_dir, errors[0])


def _drop_dead_service(wandb: Any) -> None:
    """Forget a W&B service that has died: ``wandb.teardown`` unregisters its exit hook (which would print a
    traceback at interpreter exit) and clears the singleton, so a later job of a multirun starts a fresh service."""
    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - the teardown message cannot reach a dead service; the cleanup is done first
        pass
    from wandb.sdk.lib import module

    module.unset_globals()
