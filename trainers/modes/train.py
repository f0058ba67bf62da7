"""``mode=train`` (fit, then test the best checkpoint) and ``mode=test`` (evaluate a checkpoint)."""
from __future__ import annotations

import logging
import time

import analysis
from conf.errors import ConfigError
from trainers.distributed import ReplicaCheck
from trainers.job import Job, scalar_metrics
from trainers.loggers import log_checkpoint_artifact
from trainers.modes import MODES

log = logging.getLogger(__name__)


@MODES.register("train")
def train(job: Job) -> float | None:
    started = time.perf_counter()
    datamodule = job.build_datamodule()
    info = datamodule.info
    model = job.build_model(info)
    report = job.apply_policy(model)
    task = job.build_task(model, info)
    monitor = job.monitor(task)
    loggers = job.build_loggers()
    checkpoint = job.checkpoint_callback(task)
    callbacks = [*analysis.build_callbacks(job.typed.analysis, output_dir=job.output_dir,
                                           run_name=job.typed.run_name, report=report),
                 ReplicaCheck(job.output_dir)]
    trainer = job.build_trainer(task, loggers=loggers, callbacks=callbacks, checkpoint=checkpoint)
    trainer.fit(task, datamodule=datamodule, ckpt_path=job.typed.ckpt_path)
    fit_metrics = scalar_metrics(trainer.callback_metrics)
    trainer.test(task, datamodule=datamodule, ckpt_path=checkpoint.best_model_path or None, weights_only=False)
    metrics = {**fit_metrics, **scalar_metrics(trainer.callback_metrics)}

    checkpoints = {"last": checkpoint.last_model_path, "best": checkpoint.best_model_path}
    job.write_summary(metrics=metrics, monitor=monitor, checkpoints=checkpoints,
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
