"""``mode=analyze``: the kurtosis study and weight heatmaps of a checkpoint, without training."""
from __future__ import annotations

import torch

import analysis
from conf.errors import ConfigError, UserError
from trainers.job import Job
from trainers.modes import MODES


@MODES.register("analyze")
def analyze(job: Job) -> None:
    if not job.typed.ckpt_path:
        raise ConfigError("mode=analyze needs ckpt_path=<a .ckpt written by a training run>")
    datamodule = job.build_datamodule()
    model = job.build_model(datamodule.info)
    report = job.apply_policy(model)
    task = job.build_task(model, datamodule.info)
    state = torch.load(job.typed.ckpt_path, map_location="cpu", weights_only=False)
    try:
        task.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"ckpt_path={job.typed.ckpt_path} does not hold weights of model={job.typed.model.name} "
                        f"with this config: {str(exc).splitlines()[0]}") from None
    outcome = analysis.run_study(model, job.typed.analysis, output_dir=job.output_dir, run_name=job.typed.run_name,
                                 loggers=job.build_loggers(job_type="analysis"), step=int(state.get("global_step", 0)))
    job.write_summary(checkpoint=job.typed.ckpt_path, quantized_modules=report.num_quantized,
                      keep_high_precision=[name for name, _ in outcome.recommended()])
    return None
