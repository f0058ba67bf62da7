"""``mode=train`` (fit, then test the best checkpoint) and ``mode=test`` (evaluate a checkpoint).

A train job resumes with ``ckpt_path=last|auto|<file>`` (``trainers.reliability.resume``): the checkpoint is
resolved and checked against the built model *before* the job writes anything, so a refused resume leaves the
job's folder byte for byte as it was. The callbacks that make the run exact on resume and safe on failure
(``ResumeState``, ``NonFiniteGuard``, ``LastCheckpoint``) are added here; docs/failures.md lists the behaviour.
"""
from __future__ import annotations

import logging
import time

import analysis
from conf.errors import ConfigError
from trainers.distributed import ReplicaCheck
from trainers.job import Job, scalar_metrics
from trainers.loggers import log_checkpoint_artifact
from trainers.modes import MODES
from trainers.reliability.files import remove_stale_temporaries
from trainers.reliability.nonfinite import NonFiniteGuard
from trainers.reliability.resume import (CHECKPOINT_DIR, ResumeState, check_resume_checkpoint, last_checkpoint,
                                         resolve_resume)

log = logging.getLogger(__name__)


@MODES.register("train")
def train(job: Job) -> float | None:
    started = time.perf_counter()
    resume = resolve_resume(job.typed.ckpt_path, job.output_dir)
    datamodule = job.build_datamodule()
    info = datamodule.info
    model = job.build_model(info)
    report = job.apply_policy(model, write_report=False)
    task = job.build_task(model, info)
    identity = job.identity()
    resume_step = check_resume_checkpoint(resume, task, identity) if resume else None
    if resume:
        log.info("Resuming from %s (step %d)", resume, resume_step)
    job.write_quant_report(report)
    for stale in remove_stale_temporaries(job.output_dir / CHECKPOINT_DIR):
        log.info("Removed %s, left by a run killed while writing a checkpoint", stale)
    monitor = job.monitor(task)
    loggers = job.build_loggers(resume_step=resume_step)
    best, last = job.checkpoint_callbacks(task)
    trainer_cfg = job.typed.trainer
    callbacks = [*analysis.build_callbacks(job.typed.analysis, output_dir=job.output_dir,
                                           run_name=job.typed.run_name, report=report),
                 ResumeState(identity),
                 NonFiniteGuard(trainer_cfg.nonfinite, trainer_cfg.max_skipped_steps, last_checkpoint(job.output_dir)),
                 ReplicaCheck(job.output_dir)]
    trainer = job.build_trainer(task, loggers=loggers, callbacks=callbacks, checkpoints=[best, last])
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume, weights_only=False)
    fit_metrics = scalar_metrics(trainer.callback_metrics)
    trainer.test(task, datamodule=datamodule, ckpt_path=best.best_model_path or None, weights_only=False)
    metrics = {**fit_metrics, **scalar_metrics(trainer.callback_metrics)}

    checkpoints = {"last": last.best_model_path, "best": best.best_model_path}
    job.write_summary(metrics=metrics, monitor=monitor, checkpoints=checkpoints, resumed_from=resume and str(resume),
                      quantized_modules=report.num_quantized, modules=len(report.rows),
                      wall_seconds=round(time.perf_counter() - started, 2))
    if job.typed.logger.log_checkpoints:
        log_checkpoint_artifact(loggers, checkpoints, metadata={"quant": job.typed.quant.name, "monitor": monitor,
                                                               monitor: metrics.get(monitor)})
    return _monitored(metrics, monitor)


@MODES.register("test")
def test(job: Job) -> float | None:
    if not job.typed.ckpt_path:
        raise ConfigError("mode=test needs ckpt_path=<a .ckpt written by a training run>")
    datamodule = job.build_datamodule()
    model = job.build_model(datamodule.info)
    report = job.apply_policy(model)
    task = job.build_task(model, datamodule.info)
    trainer = job.build_trainer(task, loggers=job.build_loggers())
    trainer.test(task, datamodule=datamodule, ckpt_path=job.typed.ckpt_path, weights_only=False)
    metrics = scalar_metrics(trainer.callback_metrics)
    job.write_summary(metrics=metrics, checkpoint=job.typed.ckpt_path, quantized_modules=report.num_quantized,
                      modules=len(report.rows))
    return _monitored(metrics, job.monitor(task).replace("val/", "test/"))


def _monitored(metrics: dict[str, float], monitor: str) -> float | None:
    if monitor not in metrics:
        log.warning("monitor=%r was never logged (did validation run?); logged metrics: %s. Returning None to the "
                    "sweeper.", monitor, ", ".join(sorted(metrics)))
        return None
    return metrics[monitor]
