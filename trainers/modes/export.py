"""``mode=export``: write a trained checkpoint as one safetensors file of packed 4-bit weights (``quant.export``).

The file also carries, in its header, the validated model / data / quant configs of the job (``fp4lab.config``), so
``mode=eval ckpt_path=<file>`` rebuilds the architecture and the data set without the original command line. Those
configs are data: ``config_from_export`` puts them back into the registered schemas (``schema/<group>/<name>``), which
validate every value; nothing in the file names code to import.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

import quant
import quant.export
from conf.errors import ConfigError, UserError
from conf.schemas.quant import QuantConfig
from data.info import DataInfo
from models import build_model
from trainers.job import Job
from trainers.modes import MODES
from trainers.modes.ptq import load_weights, require_checkpoint

log = logging.getLogger(__name__)

EXPORT_FILE = "model.safetensors"
ARCHITECTURE = "fp4lab"  # the quant.export.register_architecture name of this application's models
_GROUPS = ("model", "data")


def schema_name(group: str, typed: Any) -> str:
    """The ConfigStore name (``schema/<group>/<name>``) whose dataclass is ``type(typed)``."""
    store = ConfigStore.instance()
    for entry in store.list(f"schema/{group}"):
        if OmegaConf.get_type(store.load(f"schema/{group}/{entry}").node) is type(typed):
            return entry.removesuffix(".yaml")
    raise ConfigError(f"{group} config of type {type(typed).__name__} is not a registered schema")


def export_config(job: Job, quant_cfg: QuantConfig, source: Path, info: DataInfo) -> dict[str, Any]:
    """What ``mode=eval`` and ``quant.export.load`` need to rebuild (and evaluate) the exported model (JSON)."""
    typed = job.typed
    groups = {group: {"schema": schema_name(group, getattr(typed, group)),
                      "values": dataclasses.asdict(getattr(typed, group))} for group in _GROUPS}
    return {"run_name": typed.run_name, "experiment": typed.experiment_name, "seed": typed.seed,
            "monitor": typed.monitor, "source_checkpoint": str(source), **groups,
            "quant": {"schema": "quant", "values": dataclasses.asdict(quant_cfg)},
            "architecture": {"name": ARCHITECTURE, "register_with": "import trainers.modes"},
            "data_info": dataclasses.asdict(info)}


def rebuild_model(config: dict[str, Any]) -> nn.Module:
    """The unquantized model an fp4lab export was made from, built from its ``model`` config and ``data_info`` (the
    data set's facts at export time), without reading the data set: ``quant.export.load``'s builder for fp4lab."""
    where = "fp4lab export config"
    model_cfg = _typed_group("model", config.get("model"), where)
    facts = config.get("data_info")
    if not isinstance(facts, dict):
        raise UserError(f"{where}: no 'data_info' (exported by an older version?); use mode=eval, which rebuilds the "
                        "data set to learn its facts")
    names = {f.name for f in dataclasses.fields(DataInfo)}
    unknown = sorted(set(facts) - names)
    if unknown:
        raise UserError(f"{where}: data_info has unknown field {unknown[0]!r}; valid: {', '.join(sorted(names))}")
    info = DataInfo(**{key: tuple(value) if isinstance(value, list) else value for key, value in facts.items()})
    return build_model(model_cfg, info)


quant.export.register_architecture(ARCHITECTURE, rebuild_model)


def _typed_group(group: str, entry: object, where: str) -> Any:
    if not isinstance(entry, dict) or not isinstance(entry.get("schema"), str) or not isinstance(
            entry.get("values"), dict):
        raise UserError(f"{where}: fp4lab.config['{group}'] must be {{'schema': <name>, 'values': {{...}}}}")
    store = ConfigStore.instance()
    names = [name.removesuffix(".yaml") for name in store.list(f"schema/{group}")]
    if entry["schema"] not in names:
        raise UserError(f"{where}: fp4lab.config['{group}'] names schema {entry['schema']!r}; valid: "
                        f"{', '.join(names)}")
    node = store.load(f"schema/{group}/{entry['schema']}.yaml").node
    try:
        return OmegaConf.to_object(OmegaConf.merge(node, entry["values"]))
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        detail = str(cause) if isinstance(cause, (UserError, quant.QuantError)) else str(exc).splitlines()[0]
        raise UserError(f"{where}: its {group} config does not fit this version's schema: {detail}") from None


def config_from_export(job: Job, config: dict[str, Any], where: str) -> Job:
    """A Job whose model, data and quant configs are the ones stored in an export (paths and trainer stay the job's)."""
    typed = job.typed
    model, data, quant_cfg = (_typed_group(group, config.get(group), where) for group in ("model", "data", "quant"))
    run_name = config.get("run_name")
    run_name = f"{run_name}-packed" if isinstance(run_name, str) and run_name else typed.run_name
    monitor = typed.monitor or (config.get("monitor") if isinstance(config.get("monitor"), str) else None)
    new_typed = dataclasses.replace(typed, model=model, data=data, quant=quant_cfg, run_name=run_name,
                                    monitor=monitor)
    plain = OmegaConf.to_container(job.cfg, resolve=True)
    plain.update(model=dataclasses.asdict(model), data=dataclasses.asdict(data), quant=dataclasses.asdict(quant_cfg),
                 run_name=run_name, monitor=monitor)
    return dataclasses.replace(job, cfg=OmegaConf.create(plain), typed=new_typed)


def export_checkpoint(job: Job, ckpt: Path, path: Path) -> quant.export.ExportSummary:
    """Build the job's model, load ``ckpt``, quantize it with the export policy and write ``path``."""
    export_cfg, quant_cfg = job.typed.export, job.typed.quant
    job_policy = quant_cfg.to_policy()
    policy = export_cfg.policy(job_policy)
    if policy is not job_policy:
        quant_cfg = dataclasses.replace(quant_cfg, name=f"{quant_cfg.name}-as-{export_cfg.format}")
    datamodule = job.build_datamodule()
    model = job.build_model(datamodule.info)
    load_weights(model, ckpt)
    job.apply_policy(model, policy)
    return quant.export.save(model, path, config=export_config(job, quant_cfg, ckpt, datamodule.info),
                             other_dtype=quant.export.OTHER_DTYPES[export_cfg.other_dtype])


@MODES.register("export")
def export(job: Job) -> None:
    started = time.perf_counter()
    ckpt = require_checkpoint(job, ".ckpt", "a .ckpt written by mode=train")
    path = Path(job.typed.export.path) if job.typed.export.path else job.output_dir / EXPORT_FILE
    summary = export_checkpoint(job, ckpt, path)
    print(f"[fp4lab] {summary.text()}")
    job.write_summary(checkpoint=str(ckpt), export=summary.to_dict(),
                      wall_seconds=round(time.perf_counter() - started, 2))
    return None
