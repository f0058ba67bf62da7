"""Schema of ``conf/trainer/*``: the arguments handed straight to ``lightning.Trainer``.

Why a schema instead of ``**kwargs``: a misspelt Trainer argument must fail at composition time with the list of
valid keys, not deep inside Lightning after the data has been loaded. The keys in ``FP4LAB_KEYS`` are fp4lab's own
(periodic checkpoints, what to do on a NaN/Inf); ``trainers/reliability`` reads them, Lightning never sees them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from conf.schemas.common import check_choice, check_range, store_schema

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
NONFINITE_ACTIONS = ("stop", "skip")
FP4LAB_KEYS = ("checkpoint_every_n_steps", "nonfinite", "max_skipped_steps")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"  # int, list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    max_epochs: Optional[int] = None
    max_steps: int = -1
    min_steps: Optional[int] = None
    max_time: Optional[str] = None  # "DD:HH:MM:SS"
    # int = number of batches, float = fraction (Lightning's convention), so these stay untyped: 1 != 1.0
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: Optional[str] = None
    deterministic: Any = None  # bool or "warn"
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    enable_checkpointing: bool = True
    fast_dev_run: Any = False
    overfit_batches: Any = 0.0
    detect_anomaly: bool = False
    sync_batchnorm: bool = False
    use_distributed_sampler: bool = True
    reload_dataloaders_every_n_epochs: int = 0
    # fp4lab's own keys (not Lightning's), see docs/failures.md
    checkpoint_every_n_steps: int = 0  # checkpoints/last.ckpt every N optimizer steps (0: at every validation)
    nonfinite: str = "stop"  # a NaN/Inf loss or gradient: stop the run, or skip that optimizer step
    max_skipped_steps: int = 10  # nonfinite=skip: stop anyway after this many skipped steps in a row

    def __post_init__(self) -> None:
        check_choice("trainer", "accelerator", self.accelerator, ACCELERATORS)
        check_choice("trainer", "nonfinite", self.nonfinite, NONFINITE_ACTIONS)
        check_range("trainer", "checkpoint_every_n_steps", self.checkpoint_every_n_steps, 0)
        check_range("trainer", "max_skipped_steps", self.max_skipped_steps, 1)
        check_range("trainer", "accumulate_grad_batches", self.accumulate_grad_batches, 1)
        check_range("trainer", "log_every_n_steps", self.log_every_n_steps, 1)
        if self.max_epochs is None and self.max_steps == -1 and not self.fast_dev_run and self.max_time is None:
            # Lightning would default to 1000 epochs: make the budget explicit instead.
            self.max_epochs = 1

    def kwargs(self) -> dict[str, Any]:
        """The dict passed to ``lightning.Trainer(**kwargs)``."""
        return {key: value for key, value in asdict(self).items() if key not in FP4LAB_KEYS}


store_schema("trainer", "trainer", TrainerConfig)
