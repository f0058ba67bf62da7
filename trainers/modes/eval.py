"""``mode=eval ckpt_path=<file.safetensors>``: evaluate an exported model whose 4-bit weights stay packed.

The architecture and the data set come from the file's ``fp4lab.config`` (``trainers.modes.export``); the quantized
layers are ``quant.inference`` packed layers that decode their codes in forward with the same quantization code as
the QAT layers, so the metrics equal those of the fake-quantized model that was exported, up to the rounding of the
other tensors to ``export.other_dtype`` (BF16 by default; docs/export.md gives the measured difference). The weight
memory of the packed layers on the evaluation device is measured from their buffers and written to run.json.
"""
from __future__ import annotations

import time

import quant.export
from conf.errors import UserError
from quant import inference
from trainers.job import Job
from trainers.modes import MODES
from trainers.modes.export import config_from_export
from trainers.modes.ptq import evaluate, require_checkpoint


@MODES.register("eval")
def eval_export(job: Job) -> float | None:
    started = time.perf_counter()
    path = require_checkpoint(job, ".safetensors", "a .safetensors file written by mode=export")
    exported, metadata = quant.export.read(path)
    file_job = config_from_export(job, metadata["config"], f"export file {path}")
    datamodule = file_job.build_datamodule()
    info = datamodule.info
    model = file_job.build_model(info)
    try:
        quant.export.load_into(model, exported)
    except quant.QuantError as exc:
        raise UserError(f"export file {path} does not fit model={file_job.typed.model.name}: {exc}") from None
    task = file_job.build_task(model, info)
    trainer = file_job.build_trainer(task, loggers=file_job.build_loggers(job_type="eval"))
    metrics = evaluate(trainer, task, datamodule)
    memory = inference.weight_memory(task.model)
    device = next(iter(inference.packed_modules(task.model).values())).quantizer.weight_buffers()["codes"].device
    monitor = file_job.monitor(task)
    file_job.write_summary(arm=f"{file_job.typed.quant.name}-packed", metrics=metrics, monitor=monitor,
                           checkpoint=str(path), file_bytes=path.stat().st_size, packed_layers=memory.layers,
                           weight_memory={**memory.to_dict(), "device": str(device)},
                           source_checkpoint=metadata["config"].get("source_checkpoint"),
                           wall_seconds=round(time.perf_counter() - started, 2))
    print(f"[fp4lab] packed weights on {device}: {memory.packed_bytes:,} bytes for {memory.elements:,} weights "
          f"({memory.bits_per_weight:.3f} bits/weight) vs {memory.bf16_bytes:,} bytes in BF16 "
          f"({100 * memory.ratio:.1f}%)")
    return metrics.get(monitor)
