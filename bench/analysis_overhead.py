"""Training-time overhead of the analysis callbacks, measured side by side in one process.

Why: ``analysis.every_n_steps``'s default must keep the telemetry at or below 5% of training time. This script trains
the same quantized model (same seed, same batches) with analysis off and on at several cadences and prints, per
cadence, the measured wall-time ratio of the training loop and the steady-state overhead predicted from the cost of
one analysis pass: ``pass / (N * step)``, which is what a run of many more than N steps pays (a short run also pays
the end-of-training figures and kurtosis study once; the measured column includes them).

    python bench/analysis_overhead.py [--model unet] [--quant nvfp4] [--steps 40] [--every 5 10 20 50 100 200]

CPU only (``trainer=cpu``), W&B off, validation off; the data set is the embedded ``shapes`` one generated into a
temporary cache. Timings are wall clock on a shared machine: run it on an idle one for stable numbers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import analysis  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import quant  # noqa: E402
import trainers  # noqa: E402
from analysis.callbacks import AnalysisCallback  # noqa: E402
from trainers.app import validate  # noqa: E402


class LoopTimer(L.Callback):
    """Wall time from the first training batch to the end of training (after every other callback's on_train_end)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.started


def compose_typed(overrides: list[str], workdir: Path) -> Any:
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf"), job_name="bench"):
        cfg = compose("config", overrides=[f"paths.output_dir={workdir / 'out'}",
                                           f"paths.cache_dir={workdir / 'cache'}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(cfg)


def train(typed: Any, workdir: Path, steps: int, every: int | None) -> tuple[float, AnalysisCallback | None]:
    """Seconds of a ``steps``-step fit, analysis off (``every=None``) or on every ``every`` steps."""
    L.seed_everything(typed.seed, verbose=False)
    datamodule = data.build_datamodule(typed.data, cache_dir=workdir / "cache", seed=typed.seed)
    model = models.build_model(typed.model, datamodule.info)
    report = quant.apply(model, typed.quant.to_policy())
    task = trainers.build_task(model, datamodule.info, typed.model, typed.optim)
    callbacks: list[L.Callback] = []
    if every is not None:
        typed.analysis.every_n_steps = every
        callbacks += analysis.build_callbacks(typed.analysis, output_dir=workdir / f"out-every{every}",
                                              run_name="bench", policy=None, report=report)
    timer = LoopTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=typed.quant.precision, max_steps=steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
                        default_root_dir=str(workdir))
    trainer.fit(task, datamodule=datamodule)
    return timer.seconds, (callbacks[0] if callbacks else None)


def pass_cost(typed: Any, workdir: Path, repeats: int = 3) -> float:
    """Seconds of one analysis pass (collect + write), median of ``repeats``, on a model with gradients."""
    _, callback = train(typed, workdir, steps=1, every=1)
    telemetry = callback.telemetry
    model = callback._model
    timings = []
    for step in range(repeats):
        started = time.perf_counter()
        telemetry.write(telemetry.collect(model, 1000 + step))
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet")
    parser.add_argument("--quant", default="nvfp4")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every timed fit")
    parser.add_argument("--every", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200])
    parser.add_argument("--override", nargs="*", default=["model.instance_head=false"],
                        help="extra Hydra overrides for the model / data")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="fp4lab-bench-") as tmp:
        workdir = Path(tmp)
        typed = compose_typed([f"model={args.model}", f"quant={args.quant}", "trainer=cpu", "logger=none",
                               *args.override], workdir)
        train(typed, workdir, steps=2, every=None)  # warm-up: data generation, allocator, kernels
        base, _ = train(typed, workdir, steps=args.steps, every=None)
        step = base / args.steps
        one_pass = pass_cost(typed, workdir)
        print(f"model={args.model} quant={args.quant} {' '.join(args.override)}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {args.steps} steps per fit")
        print(f"analysis off: {base:.2f} s ({1000 * step:.0f} ms/step); one analysis pass: {one_pass:.2f} s")
        print(f"{'every_n_steps':>13} {'passes':>6} {'fit on (s)':>10} {'measured':>9} {'steady state':>12}")
        for every in args.every:
            seconds, _ = train(typed, workdir, steps=args.steps, every=every)
            passes = -(-args.steps // every)
            print(f"{every:>13} {passes:>6} {seconds:>10.2f} {seconds / base - 1:>+9.1%} "
                  f"{one_pass / (every * step):>+12.1%}")


if __name__ == "__main__":
    main()
