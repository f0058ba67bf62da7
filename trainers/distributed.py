"""Multi-process jobs (``trainer=ddp|fsdp``): who is rank 0 before the Trainer exists, and a check that DDP kept every
rank's weights identical.

Why this exists:
* A job writes its files (``quant_report.txt``, ``run.json``, the W&B run) from global rank 0 only. Lightning's
  ``ddp`` strategy re-runs ``main.py`` for ranks 1..N-1 (its subprocess launcher sets ``LOCAL_RANK``), and a
  submitit job with ``tasks_per_node > 1`` runs the Hydra job once per task, so every rank executes the whole job
  function: the rank must be known before ``trainer.fit`` sets it up. Lightning reads it from the environment when it
  is imported (``rank_zero_only.rank``); ``is_global_zero`` reads that.
* SLURM tasks carry ``SLURM_PROCID`` and friends, which Lightning's ``SLURMEnvironment`` understands. The tasks of
  submitit's *local* executor (``hydra/launcher=submitit_local``) carry only ``SUBMITIT_LOCAL_*`` variables, so
  ``adopt_submitit_local_tasks`` exports the ``torch.distributed`` ones (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``) from submitit's job environment: Lightning then treats the processes as created
  externally instead of launching children of its own (which would re-run submitit's worker command line).
* ``check_launch``: Lightning's ``ddp`` and ``fsdp`` strategies start ranks 1..N-1 by re-running the command line
  with ``hydra.run.dir=...`` appended. Inside a ``-m`` sweep run by the basic or joblib launcher that command line is
  the whole sweep (Hydra #2070, Lightning #18175), so such a job is refused with the supported alternatives instead of
  starting sweeps inside sweeps. Jobs whose ranks are started by SLURM, submitit or torchrun are fine. Lightning's
  FSDP runs on CUDA only; ``trainer=fsdp`` on CPU gets the same kind of one-line refusal.
* ``ReplicaCheck``: DDP keeps replicas equal only if every rank applies the same update. A rank-dependent step (an
  optimizer reading a per-rank statistic, a parameter changed outside the gradient path) makes them drift without any
  error. At the end of training each rank hashes its parameters and rank 0 writes ``distributed.json`` with all the
  hashes; a mismatch is logged as an error. Every rank takes part in the gather (a collective), never rank 0 alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from conf.errors import ConfigError
from conf.schemas.trainer import TrainerConfig

log = logging.getLogger(__name__)
SUMMARY_FILE = "distributed.json"
# Strategy names Lightning serves with its subprocess launcher (re-running the command line); *_spawn / *_fork /
# *_notebook start ranks with multiprocessing instead.
_SCRIPT_LAUNCHED = ("ddp", "fsdp", "deepspeed")
_IN_PROCESS = ("spawn", "fork", "notebook")


def is_global_zero() -> bool:
    """Whether this process is global rank 0 (the launcher's environment before the Trainer exists; the strategy's
    rank after it has set up)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


def adopt_submitit_local_tasks() -> None:
    """Inside a task of a multi-task job of submitit's local executor, export the ``torch.distributed`` environment
    of that task and tell Lightning's rank-zero helpers the rank. A no-op anywhere else, and when ``LOCAL_RANK`` is
    already set (torchrun, or a child that Lightning launched)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or "LOCAL_RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size < 2:
        return
    env.export(set_cuda_visible_devices=False)  # Lightning picks the device of each local rank itself
    os.environ.setdefault("NODE_RANK", "0")
    rank_zero_only.rank = utils_rank_zero_only.rank = env.rank
    log.info("submitit local task %d of %d: torch.distributed at %s:%d", env.rank, env.world_size, env.master_addr,
             env.master_port)


def ranks_started_externally() -> bool:
    """The ranks of this job are processes started by a launcher (SLURM tasks, submitit tasks, torchrun), not by
    Lightning."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _several_devices(devices: Any, num_nodes: int) -> bool:
    if num_nodes > 1:
        return True
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    return not isinstance(devices, int) or devices == -1 or devices > 1  # "auto" may mean several GPUs


def check_launch(trainer: TrainerConfig) -> None:
    """ConfigError for FSDP without GPUs, and for a multi-process strategy that Lightning would launch by re-running
    the command line of a ``-m`` sweep (module docstring)."""
    strategy = str(trainer.strategy)
    if strategy.startswith("fsdp") and trainer.accelerator in ("cpu", "mps"):
        raise ConfigError(f"trainer.strategy={strategy} needs CUDA GPUs (Lightning's FSDPStrategy refuses "
                          f"accelerator={trainer.accelerator}); valid choices: trainer.accelerator=gpu, or "
                          "trainer=ddp for data parallelism on CPU")
    script_launched = strategy.startswith(_SCRIPT_LAUNCHED) and not any(word in strategy for word in _IN_PROCESS)
    if not script_launched or not _several_devices(trainer.devices, trainer.num_nodes):
        return
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN or ranks_started_externally():
        return
    raise ConfigError(
        f"trainer.strategy={strategy} with trainer.devices={trainer.devices} cannot run inside this -m sweep: "
        "Lightning would start the other ranks by re-running the sweep's command line. Valid choices: run the sweep "
        "with hydra/launcher=submitit_slurm (cluster) or hydra/launcher=submitit_local (this machine), which start "
        "one task per device for each sweep point; run the data-parallel job on its own (no -m); or sweep "
        "single-device jobs (trainer=default|gpu). See docs/distributed.md."
    )


def parameter_digest(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of the parameters' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_parameters, key=lambda item: item[0]):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class ReplicaCheck(Callback):
    """At the end of ``fit`` under DDP (``ddp``, ``ddp_spawn``) with more than one rank: gather each
    rank's ``parameter_digest`` and write ``<output_dir>/distributed.json`` from rank 0. Sharded strategies (FSDP)
    hold different shards per rank by design and are recorded without digests."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        summary: dict[str, Any] = {"world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                                   "strategy": type(trainer.strategy).__name__}
        if type(trainer.strategy) is DDPStrategy:  # ddp, ddp_spawn; not sharded subclasses (DeepSpeed ZeRO)
            digests: list[str | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(digests, parameter_digest(pl_module.named_parameters()))
            summary["parameter_sha256"] = digests
            summary["replicas_identical"] = len(set(digests)) == 1
            if not summary["replicas_identical"] and trainer.is_global_zero:
                log.error("The ranks' parameters differ at the end of training (DDP replicas drifted apart): %s. "
                          "Something updates parameters per rank outside the all-reduced gradients.", digests)
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
