"""``mode=ptq_vs_qat``: baseline -> PTQ -> QAT fine-tune from the baseline -> packed evaluation, in one job.

Why one job: the stages depend on each other's checkpoints, which Hydra's basic sweeper cannot express. Each stage
is a registered mode (``train``, ``ptq``, ``train`` again, ``eval``) run on a derived config, in its own folder
with its own ``run.json`` (tagged ``stage``), CSV log and W&B run (same group, the experiment):

    <output_dir>/baseline/   mode=train with quant=<study.baseline> (or mode=test of study.baseline_ckpt)
    <output_dir>/ptq/        mode=ptq: the baseline's best checkpoint under the job's quant policy, no training
    <output_dir>/qat/        mode=train with the job's quant policy, initialised from the baseline's weights (fresh
                             optimizer and schedule, study.qat_max_steps steps at study.qat_lr)
    <output_dir>/packed/     the QAT checkpoint exported (model.safetensors, export.*) and evaluated with mode=eval
    <output_dir>/ptq_vs_qat.md, <output_dir>/report/report.html   the table (analysis.report)
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import OmegaConf
from torch import nn

from analysis.report import build_report, load_job, ptq_vs_qat_markdown
from conf.errors import ConfigError, UserError
from conf.schemas.quant import QuantConfig
from conf.schemas.study import PtqVsQatConfig
from data import DataInfo
from trainers.job import Job
from trainers.loggers import finish_wandb
from trainers.modes import MODES
from trainers.modes.export import EXPORT_FILE, export_checkpoint
from trainers.modes.ptq import load_weights

log = logging.getLogger(__name__)


@dataclass
class StageJob(Job):
    """A Job of one study stage: tags its run.json with the stage and may start from another run's weights."""

    stage: str = ""
    init_checkpoint: str | None = None  # weights (not optimizer state or step) to start training from

    def build_model(self, info: DataInfo) -> nn.Module:
        model = super().build_model(info)
        if self.init_checkpoint:
            load_weights(model, self.init_checkpoint)
        return model

    def write_summary(self, **fields: Any) -> dict[str, Any]:
        return super().write_summary(stage=self.stage, init_checkpoint=self.init_checkpoint, **fields)


def _stage_job(job: Job, stage: str, *, mode: str, quant: QuantConfig, arm: str, ckpt_path: str | None = None,
               init_checkpoint: str | None = None, max_steps: int | None = None, lr: float | None = None) -> StageJob:
    typed = job.typed
    trainer = typed.trainer if max_steps is None else dataclasses.replace(typed.trainer, max_steps=max_steps)
    optim = typed.optim if lr is None else dataclasses.replace(typed.optim, lr=lr)
    output_dir = job.output_dir / stage
    output_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"{typed.model.name}-{arm}-seed{typed.seed}"
    paths = dataclasses.replace(typed.paths, output_dir=str(output_dir))
    new_typed = dataclasses.replace(typed, mode=mode, quant=quant, ckpt_path=ckpt_path, run_name=run_name,
                                    paths=paths, trainer=trainer, optim=optim)
    plain = OmegaConf.to_container(job.cfg, resolve=True)
    plain.update(mode=mode, quant=dataclasses.asdict(quant), ckpt_path=ckpt_path, run_name=run_name,
                 paths=dataclasses.asdict(paths), trainer=dataclasses.asdict(trainer),
                 optim=dataclasses.asdict(optim))
    return StageJob(cfg=OmegaConf.create(plain), typed=new_typed, stage=stage, init_checkpoint=init_checkpoint)


def _run(stage_job: Job) -> dict[str, Any]:
    """Run one stage through its registered mode; return its run.json."""
    log.info("ptq_vs_qat: stage %s (mode=%s, quant=%s) -> %s", getattr(stage_job, "stage", "?"),
             stage_job.typed.mode, stage_job.typed.quant.name, stage_job.output_dir)
    L.seed_everything(stage_job.typed.seed, workers=True)
    try:
        MODES.get(stage_job.typed.mode)(stage_job)
    finally:
        finish_wandb()
    return json.loads((stage_job.output_dir / "run.json").read_text())


def _best_checkpoint(summary: dict[str, Any], stage: str) -> str:
    checkpoints = summary.get("checkpoints", {})
    path = checkpoints.get("best") or checkpoints.get("last")
    if not path or not Path(path).is_file():
        raise UserError(f"ptq_vs_qat: the {stage} stage wrote no checkpoint (trainer.enable_checkpointing=false?); "
                        "the next stages start from it")
    return path


@MODES.register("ptq_vs_qat")
def ptq_vs_qat(job: Job) -> float | None:
    study = job.typed.study
    if not isinstance(study, PtqVsQatConfig):
        raise ConfigError("mode=ptq_vs_qat needs the study settings: add +study=ptq_vs_qat to the command line, or "
                          "run an experiment that sets them (experiment=unet_ptq_vs_qat)")
    arm = job.typed.quant
    if arm.format == "none":
        raise ConfigError(f"mode=ptq_vs_qat compares quantized arms with a baseline, but quant={arm.name} has "
                          "format=none; pick the quantized arm, e.g. quant=nvfp4")
    if study.baseline.format != "none":
        log.warning("ptq_vs_qat: the baseline arm quant=%s quantizes (format=%s)", study.baseline.name,
                    study.baseline.format)

    if study.baseline_ckpt:
        base = _stage_job(job, "baseline", mode="test", quant=study.baseline, arm=study.baseline.name,
                          ckpt_path=study.baseline_ckpt)
        _run(base)
        baseline_ckpt = study.baseline_ckpt
    else:
        base = _stage_job(job, "baseline", mode="train", quant=study.baseline, arm=study.baseline.name)
        baseline_ckpt = _best_checkpoint(_run(base), "baseline")

    _run(_stage_job(job, "ptq", mode="ptq", quant=arm, arm=f"{arm.name}-ptq", ckpt_path=baseline_ckpt))
    qat = _stage_job(job, "qat", mode="train", quant=arm, arm=arm.name, init_checkpoint=baseline_ckpt,
                     max_steps=study.qat_max_steps, lr=study.qat_lr)
    qat_summary = _run(qat)
    monitored = qat_summary.get("metrics", {}).get(qat_summary.get("monitor", ""))

    if study.export:
        packed_dir = job.output_dir / "packed"
        exported = packed_dir / EXPORT_FILE
        summary = export_checkpoint(qat, Path(_best_checkpoint(qat_summary, "qat")), exported)
        print(f"[fp4lab] {summary.text()}")
        _run(_stage_job(job, "packed", mode="eval", quant=arm, arm=f"{arm.name}-packed", ckpt_path=str(exported)))

    stage_dirs = [job.output_dir / stage for stage in ("baseline", "ptq", "qat", "packed")]
    table = ptq_vs_qat_markdown([load_job(folder) for folder in stage_dirs if (folder / "run.json").is_file()])
    (job.output_dir / "ptq_vs_qat.md").write_text(table + "\n")
    page = build_report([job.output_dir], job.output_dir / "report", baselines=(study.baseline.name,))
    print(f"[fp4lab] PTQ vs QAT ({job.typed.model.name}, {job.typed.data.name}):\n{table}\n[fp4lab] report: {page}")
    return monitored
