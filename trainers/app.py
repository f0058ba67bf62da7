"""One job of fp4lab: validate the config, build data -> model -> precision policy -> trainer, run the mode.

Why here and not in ``main.py``: ``main.py`` stays a thin Hydra entry point, and tests call ``run(cfg)`` on a
config composed with Hydra's compose API. Everything a job writes goes under ``cfg.paths.output_dir``:

    csv/metrics.csv            every logged metric (always on; the comparison report is built from it)
    checkpoints/{last,best}.ckpt
    wandb/offline-run-*/       the W&B run (offline by default; `wandb sync` it later)
    quant_report.txt           which module is quantized, with which format, and why not
    run.json                   what ran (names, versions, effective precision) and the final metrics
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import data
import models
import quant
import trainers
from conf.errors import ConfigError, UserError
from conf.schemas.root import RootConfig
from trainers.loggers import build_loggers, finish_wandb, log_checkpoint_artifact

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Run one job; return the monitored metric for sweepers (None in modes without one)."""
    try:
        return _run(cfg)
    except (UserError, quant.QuantError) as exc:
        log.error("%s", exc)
        if _in_single_run():
            raise SystemExit(2) from None  # one clear message, no traceback
        raise
    finally:
        finish_wandb()


def validate(cfg: DictConfig) -> RootConfig:
    """Turn the composed config into typed dataclasses, running every schema's ``__post_init__`` check."""
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, UserError):
            raise cause from None
        raise ConfigError(str(exc).splitlines()[0]) from None
    assert isinstance(typed, RootConfig)
    return typed


def _run(cfg: DictConfig) -> float | None:
    typed = validate(cfg)
    output_dir = Path(typed.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(typed.seed, workers=True)

    datamodule = data.build_datamodule(typed.data, cache_dir=Path(typed.paths.cache_dir), seed=typed.seed)
    info = datamodule.info
    model_task = models.task_of(typed.model.name)
    if model_task != info.task:
        raise ConfigError(
            f"model={typed.model.name} trains a {model_task} task but data={typed.data.name} provides {info.task} "
            f"data; valid data choices for model={typed.model.name}: {', '.join(data.names_for_task(model_task))}"
        )
    model = models.build_model(typed.model, info)
    policy = typed.quant.to_policy()
    report = quant.apply(model, policy)
    (output_dir / "quant_report.txt").write_text(report.table() + "\n")
    log.info("Precision policy %s:\n%s", typed.quant.name, report.table())
    task = trainers.build_task(model, info, typed.model, typed.optim)
    monitor = typed.monitor or task.monitor

    precision = _effective_precision(typed)
    loggers = build_loggers(
        typed.logger,
        output_dir=output_dir,
        run_name=typed.run_name,
        group=typed.experiment_name,
        job_type=typed.quant.name,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode=task.monitor_mode,
        save_last=True,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        **typed.trainer.kwargs(),
        precision=precision,
        logger=loggers,
        callbacks=[checkpoint],
        default_root_dir=str(output_dir),
    )
    started = time.perf_counter()
    if typed.mode == "train":
        trainer.fit(task, datamodule=datamodule, ckpt_path=typed.ckpt_path)
        fit_metrics = _scalars(trainer.callback_metrics)
        best = checkpoint.best_model_path or None
        trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=False)
    elif typed.mode == "test":
        if not typed.ckpt_path:
            raise ConfigError("mode=test needs ckpt_path=<a .ckpt written by a training run>")
        fit_metrics = {}
        trainer.test(task, datamodule=datamodule, ckpt_path=typed.ckpt_path, weights_only=False)
    else:
        raise ConfigError(f"mode={typed.mode} is not available yet; valid choices now: train, test")
    metrics = {**fit_metrics, **_scalars(trainer.callback_metrics)}

    checkpoints = {"last": checkpoint.last_model_path, "best": checkpoint.best_model_path}
    summary = _summary(typed, precision, report, metrics, checkpoints, time.perf_counter() - started)
    (output_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    log_checkpoint_artifact(loggers, checkpoints, metadata={"quant": typed.quant.name, "monitor": monitor,
                                                           monitor: metrics.get(monitor)})
    log.info("Outputs of %s are in %s", typed.run_name, output_dir)
    print(f"[fp4lab] outputs: {output_dir}")
    if monitor not in metrics:
        if typed.mode == "train":
            raise ConfigError(f"monitor={monitor!r} was never logged; logged metrics: {', '.join(sorted(metrics))}")
        return None
    return metrics[monitor]


def _effective_precision(typed: RootConfig) -> str:
    """The Lightning precision that will really run (FP16 AMP needs CUDA; on CPU it becomes BF16, with a notice)."""
    precision = typed.quant.precision
    uses_gpu = typed.trainer.accelerator in ("gpu", "cuda") or (
        typed.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    if precision == "16-mixed" and not uses_gpu:
        log.warning("quant=%s asks for FP16 mixed precision, which Lightning supports only on CUDA; this CPU run "
                    "uses bf16-mixed instead (recorded as precision_effective in run.json).", typed.quant.name)
        return "bf16-mixed"
    return precision


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or getattr(v, "numel", lambda: 0)() == 1}


def _summary(typed: RootConfig, precision: str, report: Any, metrics: dict[str, float],
             checkpoints: dict[str, str], seconds: float) -> dict[str, Any]:
    import lightning

    return {
        "run_name": typed.run_name,
        "experiment": typed.experiment_name,
        "mode": typed.mode,
        "seed": typed.seed,
        "model": typed.model.name,
        "data": typed.data.name,
        "quant": typed.quant.name,
        "precision": typed.quant.precision,
        "precision_effective": precision,
        "quantized_modules": report.num_quantized,
        "modules": len(report.rows),
        "metrics": metrics,
        "checkpoints": checkpoints,
        "wall_seconds": round(seconds, 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning": lightning.__version__},
        "optim": asdict(typed.optim),
    }


def _in_single_run() -> bool:
    return not HydraConfig.initialized() or HydraConfig.get().mode == RunMode.RUN
