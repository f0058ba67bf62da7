"""The pieces of one job, built from the validated config: data, model, precision policy, loggers, trainer.

Why separate from the modes: ``train``, ``test``, ``analyze``, ``ptq``, ``export`` and ``eval`` each need a different
subset of these pieces, and each piece must be built the same way in all of them (same seed handling, same output
layout, same checks), so the modes compose these builders instead of repeating them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

import data
import models
import quant
import trainers
from conf.errors import ConfigError
from conf.schemas.root import RootConfig
from quant import te_backend
from trainers.distributed import is_global_zero
from trainers.kurtosis_keep import kurtosis_keeps
from trainers.loggers import build_loggers
from trainers.precision import build_precision_plugin
from trainers.reliability.files import atomic_write_bytes
from trainers.reliability.resume import CHECKPOINT_DIR, JobIdentity, LastCheckpoint
from trainers.reliability.storage import AtomicCheckpointIO

log = logging.getLogger(__name__)


@dataclass
class Job:
    """The validated config of one job and where it writes."""

    cfg: DictConfig  # as composed (logged as the run's config)
    typed: RootConfig  # the same, validated into dataclasses
    backend: te_backend.BackendChoice | None = field(default=None, init=False)  # set by apply_policy
    te_recipe: object | None = field(default=None, init=False)  # TE's recipe when the TE backend runs the policy

    @property
    def output_dir(self) -> Path:
        return Path(self.typed.paths.output_dir)

    def build_datamodule(self) -> L.LightningDataModule:
        typed = self.typed
        datamodule = data.build_datamodule(typed.data, cache_dir=Path(typed.paths.cache_dir), seed=typed.seed)
        model_task = models.task_of(typed.model.name)
        if model_task != datamodule.info.task:
            raise ConfigError(
                f"model={typed.model.name} trains a {model_task} task but data={typed.data.name} provides "
                f"{datamodule.info.task} data; valid data choices for model={typed.model.name}: "
                f"{', '.join(data.names_for_task(model_task))}"
            )
        return datamodule

    def build_model(self, info: data.DataInfo) -> nn.Module:
        return models.build_model(self.typed.model, info)

    def identity(self) -> JobIdentity:
        typed = self.typed
        return JobIdentity(run_name=typed.run_name, model=typed.model.name, data=typed.data.name,
                           quant=typed.quant.name)

    def apply_policy(self, model: nn.Module, policy: quant.Policy | None = None, *,
                     write_report: bool = True) -> quant.QuantReport:
        """Quantize ``model`` in place with the job's policy (or ``policy``) on the backend ``quant.backend`` resolves
        to (``quant.te_backend``; one logged line when ``auto`` falls back to the emulation), and keep the report
        next to the run (``write_report=False``: the caller writes it with ``write_quant_report`` once it knows the
        job will run, so a refused resume leaves the folder as it was)."""
        qcfg = self.typed.quant
        policy = policy or qcfg.to_policy()
        if qcfg.exclude_by_kurtosis is not None:
            keeps = kurtosis_keeps(model, qcfg.exclude_by_kurtosis, qcfg.kurtosis_ckpt)
            policy = dataclasses.replace(policy, keep_high_precision=keeps)
        self.backend = te_backend.resolve_backend(policy, qcfg.backend, precision=self.effective_precision(),
                                                  fp8_recipe=qcfg.fp8_recipe,
                                                  device="cuda" if self._uses_gpu() else "cpu")
        if self.backend.notice():
            log.info("%s", self.backend.notice())
        if self.backend.uses_te:
            report = te_backend.apply(model, policy, qcfg.fp8_recipe)
            self.te_recipe = te_backend.build_recipe(policy, qcfg.fp8_recipe)
            log.info("Transformer Engine runs the TE rows of the policy with recipe %r", self.te_recipe)
        else:
            report = quant.apply(model, policy)
        if write_report:
            self.write_quant_report(report)
        log.info("Precision policy %s:\n%s", self.typed.quant.name, report.table())
        return report

    def write_quant_report(self, report: quant.QuantReport) -> None:
        if is_global_zero():  # every rank of a data-parallel job builds the same report; rank 0 writes it
            atomic_write_bytes(self.output_dir / "quant_report.txt", (report.table() + "\n").encode(), "quant report")

    def build_task(self, model: nn.Module, info: data.DataInfo) -> L.LightningModule:
        return trainers.build_task(model, info, self.typed.model, self.typed.optim)

    def build_loggers(self, *, job_type: str | None = None, resume_step: int | None = None) -> list:
        """``resume_step``: the global step of the checkpoint a train job resumes from (its CSV log continues)."""
        typed = self.typed
        return build_loggers(
            typed.logger,
            output_dir=self.output_dir,
            run_name=typed.run_name,
            group=typed.experiment_name,
            job_type=job_type or typed.quant.name,
            config=OmegaConf.to_container(self.cfg, resolve=True),
            resume_step=resume_step,
        )

    def build_trainer(self, task: L.LightningModule, *, loggers: list, callbacks: list | None = None,
                      checkpoints: list[ModelCheckpoint] | None = None) -> L.Trainer:
        """The Lightning Trainer; checkpoints are written atomically (``trainers.reliability.storage``)."""
        callbacks = [*(callbacks or []), *(checkpoints or [])]
        kwargs = self.typed.trainer.kwargs()
        kwargs["enable_checkpointing"] = kwargs["enable_checkpointing"] and bool(checkpoints)
        plugins: list[Any] = [AtomicCheckpointIO()]
        if self.te_recipe is None:
            kwargs["precision"] = self.effective_precision()
        else:  # TE backend: torch autocast + te.autocast(recipe) per step, FP32 masters (trainers/precision.py)
            plugins.append(build_precision_plugin(self.te_recipe, self.effective_precision()))
            kwargs["inference_mode"] = False  # quantizer state TE creates lazily must not become inference tensors
        return L.Trainer(**kwargs, logger=loggers, callbacks=callbacks, plugins=plugins,
                         default_root_dir=str(self.output_dir))

    def checkpoint_callbacks(self, task: L.LightningModule) -> list[ModelCheckpoint]:
        """``best.ckpt`` (the monitored metric, at validation) and ``last.ckpt`` (every
        ``trainer.checkpoint_every_n_steps`` optimizer steps, or at every validation when that is 0; and when
        training ends)."""
        folder = self.output_dir / CHECKPOINT_DIR
        best = ModelCheckpoint(dirpath=folder, filename="best", monitor=self.monitor(task), mode=task.monitor_mode,
                               save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
        return [best, LastCheckpoint(folder, self.typed.trainer.checkpoint_every_n_steps)]

    def monitor(self, task: L.LightningModule) -> str:
        return self.typed.monitor or task.monitor

    def effective_precision(self) -> str:
        """The Lightning precision that really runs (FP16 AMP needs CUDA; on CPU it becomes BF16, with a notice)."""
        typed = self.typed
        precision = typed.quant.precision
        if precision == "16-mixed" and not self._uses_gpu():
            log.warning("quant=%s asks for FP16 mixed precision, which Lightning supports only on CUDA; this CPU run "
                        "uses bf16-mixed instead (recorded as precision_effective in run.json).", typed.quant.name)
            return "bf16-mixed"
        return precision

    def _uses_gpu(self) -> bool:
        accelerator = self.typed.trainer.accelerator
        return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())

    def write_summary(self, **fields: Any) -> dict[str, Any]:
        """``run.json``: what ran (names, versions, effective precision) and its final metrics."""
        import lightning

        typed = self.typed
        summary = {
            "run_name": typed.run_name,
            "experiment": typed.experiment_name,
            "mode": typed.mode,
            "seed": typed.seed,
            "model": typed.model.name,
            "data": typed.data.name,
            "quant": typed.quant.name,
            "precision": typed.quant.precision,
            "precision_effective": self.effective_precision(),
            "quant_backend": self.backend.backend if self.backend else None,
            "te_recipe": None if self.te_recipe is None else repr(self.te_recipe),
            **fields,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "lightning": lightning.__version__},
            "optim": asdict(typed.optim),
        }
        if is_global_zero():  # one run.json per job, also when every rank of a data-parallel job gets here
            atomic_write_bytes(self.output_dir / "run.json",
                               (json.dumps(summary, indent=2, default=str) + "\n").encode(), "run summary")
        return summary


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Lightning's ``callback_metrics`` as plain floats (scalar tensors only)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
    return out
