"""Exact resume: what a checkpoint must hold beyond Lightning's own state, and which checkpoint a job resumes.

A Lightning checkpoint holds weights, optimizer and scheduler state, loop counters, callback states and, for train
loaders that have a ``state_dict``, their position in the epoch (``data.sampling.ResumableDataLoader``). It holds no
random-number state. ``ResumeState`` adds:

* the global RNGs (python ``random``, numpy's legacy global generator, torch CPU and every initialised CUDA device),
  captured when the checkpoint is written (end of an optimizer step) and put back in ``on_train_start``, i.e. after
  the sanity check and after the train loader's iterator exists, right before the next training batch;
* every quantized layer's stochastic-rounding generator (``quant.sr_states``), restored at the same point;
* the train loader's position, which Lightning saves but does not restore when ``configure_optimizers`` reads
  ``trainer.estimated_stepping_batches`` (our schedulers do): that builds the loader before the checkpoint is loaded.
  ``on_train_start`` applies the saved position, before the loader's lazily started iterator draws a batch;
* ``checkpoint["fp4lab"]``: the job's run name and model / data / quant names, so a resume can tell a checkpoint of
  another job from a truncated one and say which.

Everything is stored as tensors, ints and strings, so the checkpoint also loads with ``torch.load(weights_only=True)``.

Which checkpoint (``resolve_resume``): ``ckpt_path=last`` is ``<output_dir>/checkpoints/last.ckpt`` and must exist;
``ckpt_path=auto`` resumes from it when it exists and starts fresh otherwise; any other value is a file. A fresh
start in an output dir that already holds checkpoints is refused, so a rerun never overwrites a job's results.
``check_resume_checkpoint`` reads the checkpoint before anything of the new attempt is written and turns the usual
failures (truncated file, another model, another precision policy) into one ``UserError``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import quant
from conf.errors import ConfigError, UserError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
RESUME_KEYWORDS = ("last", "auto")


# -- random-number state ----------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The process's global RNG states as tensors / plain Python values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),  # [624] MT19937 words
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class JobIdentity:
    """What a checkpoint says about the job that wrote it (``checkpoint["fp4lab"]``)."""

    run_name: str
    model: str
    data: str
    quant: str

    def describe(self) -> str:
        return f"model={self.model} data={self.data} quant={self.quant} (run {self.run_name})"


class ResumeState(Callback):
    """Saves and restores the RNG streams and the job identity (see the module docstring)."""

    def __init__(self, identity: JobIdentity) -> None:
        self.identity = identity
        self._model: torch.nn.Module | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._model = pl_module

    def state_dict(self) -> dict[str, Any]:
        sr = quant.sr_states(self._model) if self._model is not None else {}
        return {"rng": capture_rng(), "sr": sr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The tasks' configure_optimizers reads trainer.estimated_stepping_batches, which makes Lightning build the
        # train loader before the checkpoint is restored; the loader's saved position then stays unapplied. The
        # loader's iterator has not drawn a batch yet (ResumableDataLoader starts lazily), so apply it now; this is a
        # no-op when Lightning already did (the pending list is emptied) or when not resuming.
        trainer.fit_loop._load_combined_loader_states()
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        quant.load_sr_states(pl_module, pending["sr"])
        restore_rng(pending["rng"])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["fp4lab"] = dict(vars(self.identity))


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: the newest training state, every ``every_n_steps`` optimizer steps (0: at every
    validation) and when training ends.

    Why not ``ModelCheckpoint(save_last=True)`` on the monitored callback: Lightning 2.6 then refreshes ``last.ckpt``
    only in steps where it also wrote a top-k file, i.e. when the monitored metric improved, so a resume would
    restart from the best step rather than the newest. Here ``last`` is its own top-1 file without a monitor (so it
    is replaced at every trigger), never versioned (``last-v1.ckpt``), and written through the trainer's
    ``AtomicCheckpointIO`` like every checkpoint.
    """

    def __init__(self, dirpath: Path, every_n_steps: int) -> None:
        super().__init__(dirpath=dirpath, filename=Path(LAST).stem, monitor=None, save_top_k=1,
                         enable_version_counter=False, every_n_train_steps=every_n_steps or None,
                         every_n_epochs=None if every_n_steps else 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # False when this step is already saved
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


# -- which checkpoint to resume ---------------------------------------------------------------------------------------
def last_checkpoint(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / LAST


def resolve_resume(ckpt_path: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``mode=train`` resumes from (None: a fresh start); ConfigError when that cannot be right."""
    last = last_checkpoint(output_dir)
    if ckpt_path == "auto":
        return last if last.is_file() else _fresh(output_dir)
    if ckpt_path == "last":
        if last.is_file():
            return last
        raise ConfigError(f"ckpt_path=last: there is no {last}. {_where_runs_are(output_dir)}")
    if ckpt_path is None:
        return _fresh(output_dir)
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist (valid: a .ckpt file, 'last' = {last}, or 'auto')")
    return path


def _fresh(output_dir: Path) -> None:
    existing = sorted((Path(output_dir) / CHECKPOINT_DIR).glob("*.ckpt"))
    if existing:
        names = ", ".join(p.name for p in existing)
        raise ConfigError(f"{output_dir} already holds the checkpoints of a run ({names}); "
                          "a fresh start would overwrite them. Resume it with ckpt_path=last (or ckpt_path=auto), "
                          "or give this run another output dir (hydra.run.dir=...)")
    return None


def _where_runs_are(output_dir: Path) -> str:
    """A hint for ``ckpt_path=last`` in a fresh, time-stamped output dir: the newest runs of the same name."""
    hint = ("To resume a run in place, rerun with hydra.run.dir=<that run's folder> ckpt_path=last, "
            "or pass ckpt_path=<file>.")
    siblings = sorted(Path(output_dir).parent.glob(f"*/{CHECKPOINT_DIR}/{LAST}"), key=lambda p: p.stat().st_mtime)
    if siblings:
        hint += " Runs of this name with a last.ckpt (newest last): " + ", ".join(str(p.parent.parent)
                                                                                for p in siblings[-3:])
    return hint


# -- reading a checkpoint before anything is written ------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint on CPU; UserError if it cannot be read (truncated, not a checkpoint)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - whatever torch reports, the file is unusable as a checkpoint
        size = path.stat().st_size if path.exists() else 0
        raise UserError(f"ckpt_path={path} cannot be read as a checkpoint ({size} bytes; truncated or not a "
                        f"checkpoint?): {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"ckpt_path={path} is not a Lightning checkpoint (no 'state_dict'); resume needs a .ckpt "
                        "written by mode=train")
    return state


def check_resume_checkpoint(path: Path, task: L.LightningModule, identity: JobIdentity) -> int:
    """Check that ``path`` can resume this job; return its global step. Raises UserError naming the mismatch."""
    state = read_checkpoint(path)
    if "loops" not in state or "optimizer_states" not in state:
        raise UserError(f"ckpt_path={path} holds weights only (no optimizer or loop state), so training cannot resume "
                        "from it; evaluate it with mode=test")
    written_by = state.get("fp4lab")
    origin = JobIdentity(**written_by).describe() if isinstance(written_by, dict) else "an unknown job"
    expected = {key: tuple(value.shape) for key, value in task.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state["state_dict"].items()}
    problem = _first_mismatch(expected, found)
    if problem:
        raise UserError(f"ckpt_path={path} does not fit this job ({identity.describe()}): {problem}. It was written "
                        f"by {origin}.")
    if isinstance(written_by, dict) and written_by.get("quant") != identity.quant:
        raise UserError(f"ckpt_path={path} was trained with quant={written_by.get('quant')} but this job runs "
                        f"quant={identity.quant}; a resume continues the same run, so use the same quant (to start "
                        "another policy from these weights, train a new run from them instead)")
    sr_saved = set(state.get("callbacks", {}).get(ResumeState.__qualname__, {}).get("sr", {}))
    sr_here = set(quant.sr_states(task))
    if sr_saved and sr_saved != sr_here:
        raise UserError(f"ckpt_path={path} quantized other layers than this job's quant={identity.quant} policy "
                        f"(only in the checkpoint: {sorted(sr_saved - sr_here)[:3]}, only here: "
                        f"{sorted(sr_here - sr_saved)[:3]})")
    return int(state.get("global_step", 0))


def _first_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    missing = [key for key in expected if key not in found]
    if missing:
        return f"{len(missing)} weights are missing, e.g. {missing[0]}"
    unexpected = [key for key in found if key not in expected]
    if unexpected:
        return f"{len(unexpected)} weights are not in this model, e.g. {unexpected[0]}"
    for key, shape in expected.items():
        if found[key] != shape:
            return f"{key} has shape {list(found[key])} in the checkpoint, {list(shape)} in this model"
    return None
