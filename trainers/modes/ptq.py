"""``mode=ptq``: post-training quantization: a trained checkpoint under the job's precision policy, evaluated.

Why no calibration stage: every format in ``quant`` uses *current* scaling, i.e. the global amax (NVFP4, FP8) and the
block scales (all formats) are computed from the tensor being quantized, in every forward, as TE's recipes do.
There is no static activation scale to calibrate, so PTQ is: load the baseline's weights, ``quant.apply`` the policy
(weights quantized; activations quantized per call exactly as the policy's roles say), evaluate on val and test.

The helpers here (reading a checkpoint's weights, evaluating a task on val and test) are shared by the export, eval
and ptq_vs_qat modes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

from conf.errors import ConfigError, UserError
from trainers.job import Job, scalar_metrics
from trainers.modes import MODES

log = logging.getLogger(__name__)


def require_checkpoint(job: Job, suffix: str, what: str) -> Path:
    """``ckpt_path`` as a Path, which must exist and end in ``suffix``; ConfigError saying what the mode needs."""
    mode = job.typed.mode
    if not job.typed.ckpt_path:
        raise ConfigError(f"mode={mode} needs ckpt_path=<{what}>")
    path = Path(job.typed.ckpt_path)
    if path.suffix != suffix:
        raise ConfigError(f"mode={mode}: ckpt_path={path} is not a {suffix} file; it needs {what}")
    if not path.is_file():
        raise ConfigError(f"mode={mode}: ckpt_path={path} does not exist")
    return path


def load_weights(model: nn.Module, ckpt_path: str | Path) -> int:
    """Copy the weights of a training checkpoint (``model.*`` entries of its state dict) into ``model``.

    The checkpoint is read with ``weights_only=True`` (tensors and plain containers only, no code). Returns the
    checkpoint's global step. A checkpoint of another architecture raises ``UserError`` naming the first mismatch.
    """
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's checkpoint problem
        raise UserError(f"ckpt_path={ckpt_path} cannot be read as a training checkpoint: "
                        f"{str(exc).splitlines()[0]}") from None
    weights = {key.removeprefix("model."): value for key, value in state.get("state_dict", {}).items()
               if key.startswith("model.")}
    if not weights:
        raise UserError(f"ckpt_path={ckpt_path} holds no model weights (no 'model.*' entries in its state_dict); "
                        "give a .ckpt written by mode=train")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())  # PyTorch's multi-line list of missing / unexpected / mismatched keys
        raise UserError(f"ckpt_path={ckpt_path} does not hold weights of this model: {detail[:300]}") from None
    return int(state.get("global_step", 0))


def evaluate(trainer: L.Trainer, task: L.LightningModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """The task's val and test metrics of the weights it holds now (no checkpoint is loaded)."""
    trainer.validate(task, datamodule=datamodule)
    metrics = scalar_metrics(trainer.callback_metrics)
    trainer.test(task, datamodule=datamodule)
    return {**metrics, **scalar_metrics(trainer.callback_metrics)}


@MODES.register("ptq")
def ptq(job: Job) -> float | None:
    started = time.perf_counter()
    ckpt = require_checkpoint(job, ".ckpt", "a .ckpt of the model to quantize, written by mode=train")
    if job.typed.quant.format == "none":
        raise ConfigError(f"mode=ptq quantizes a trained model, but quant={job.typed.quant.name} has format=none; "
                          "pick a quantized policy, e.g. quant=nvfp4, quant=nf4, quant=mxfp4")
    datamodule = job.build_datamodule()
    info = datamodule.info
    model = job.build_model(info)
    step = load_weights(model, ckpt)
    report = job.apply_policy(model)
    task = job.build_task(model, info)
    trainer = job.build_trainer(task, loggers=job.build_loggers(job_type="ptq"))
    metrics = evaluate(trainer, task, datamodule)
    monitor = job.monitor(task)
    job.write_summary(arm=f"{job.typed.quant.name}-ptq", metrics=metrics, monitor=monitor, checkpoint=str(ckpt),
                      checkpoint_step=step, calibration="none (current scaling: scales come from each tensor)",
                      quantized_modules=report.num_quantized, modules=len(report.rows),
                      wall_seconds=round(time.perf_counter() - started, 2))
    if monitor not in metrics:
        log.warning("monitor=%r was not logged; logged metrics: %s", monitor, ", ".join(sorted(metrics)))
    return metrics.get(monitor)
