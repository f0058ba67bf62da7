"""Training-time overhead of the analysis callbacks, measured side by side in one process.

Why: ``analysis.every_n_steps``'s default must keep the telemetry at or below 5% of training time. This script trains
the same quantized model (same seed, same batches) with analysis off and on at several cadences and prints, per
cadence, the measured overhead of the training loop (``on / off - 1``) in wall time and in CPU time of this process,
and the steady-state overhead predicted from the cost of one analysis pass, ``pass / (N * step)``: what a run of
many more than N steps pays (a short run also pays the end-of-training figures and kurtosis study once; the measured
columns include them).

CPU time counts the figure-drawing thread too, so it is an upper bound of the wall-time overhead on a machine whose
cores are all busy, and it hardly moves when other processes share the machine (wall time does).

    python bench/analysis_overhead.py [--model unet] [--quant nvfp4] [--steps 30] [--every 5 10 30]
                                      [--predict 25 50 100 200]

``--trainer cpu`` (default) or ``gpu``; W&B off, validation off; the data set is the embedded ``shapes`` one
generated into a temporary cache. On a GPU, read the wall-time column: CPU time does not see GPU work.
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
    """Wall and process CPU time from the first training batch to the end of training (placed last, so after every
    other callback's ``on_train_end``, including the wait for the figure-writing thread)."""

    def __init__(self) -> None:
        self.started: tuple[float, float] | None = None
        self.seconds = (0.0, 0.0)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.started is None:
            self.started = (time.perf_counter(), time.process_time())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = (time.perf_counter() - self.started[0], time.process_time() - self.started[1])


def compose_typed(overrides: list[str], workdir: Path) -> Any:
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf"), job_name="bench"):
        cfg = compose("config", overrides=[f"paths.output_dir={workdir / 'out'}",
                                           f"paths.cache_dir={workdir / 'cache'}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(cfg)


def train(typed: Any, workdir: Path, steps: int,
          every: int | None) -> tuple[tuple[float, float], AnalysisCallback | None]:
    """(wall, CPU) seconds of a ``steps``-step fit, analysis off (``every=None``) or on every ``every`` steps."""
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
    trainer = L.Trainer(accelerator=typed.trainer.accelerator, devices=1, precision=typed.quant.precision,
                        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*callbacks, timer],
                        default_root_dir=str(workdir))
    trainer.fit(task, datamodule=datamodule)
    return timer.seconds, (callbacks[0] if callbacks else None)


def pass_cost(typed: Any, workdir: Path, repeats: int = 3) -> tuple[float, float, float]:
    """(measure, draw, total) CPU seconds of one analysis pass, medians of ``repeats``, on a model with gradients."""
    _, callback = train(typed, workdir, steps=1, every=1)
    telemetry = callback.telemetry
    model = callback._model
    measure, draw = [], []
    for step in range(repeats):
        started = time.process_time()
        result = telemetry.collect(model, 1000 + step)
        measured = time.process_time()
        telemetry.write(result)
        measure.append(measured - started)
        draw.append(time.process_time() - measured)
    return statistics.median(measure), statistics.median(draw), statistics.median(m + d for m, d in zip(
        measure, draw, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet")
    parser.add_argument("--quant", default="nvfp4")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of every timed fit")
    parser.add_argument("--every", type=int, nargs="+", default=[5, 10, 30], help="cadences to train with")
    parser.add_argument("--predict", type=int, nargs="*", default=[25, 50, 100, 200],
                        help="further cadences to predict only, from the pass cost")
    parser.add_argument("--trainer", default="cpu", choices=("cpu", "gpu"), help="trainer config (device)")
    parser.add_argument("--override", nargs="*", default=["model.instance_head=false"],
                        help="extra Hydra overrides for the model / data")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="fp4lab-bench-") as tmp:
        workdir = Path(tmp)
        typed = compose_typed([f"model={args.model}", f"quant={args.quant}", f"trainer={args.trainer}", "logger=none",
                               *args.override], workdir)
        train(typed, workdir, steps=2, every=None)  # warm-up: data generation, allocator, kernels
        measure, draw, one_pass = pass_cost(typed, workdir)
        # Interleaved: off, on(N1), off, on(N2), off, ...; each "on" fit is compared with the mean of the two "off"
        # fits around it, so a change of load on a shared machine shifts both sides alike.
        offs = [train(typed, workdir, steps=args.steps, every=None)[0]]
        ons = []
        for every in args.every:
            ons.append(train(typed, workdir, steps=args.steps, every=every)[0])
            offs.append(train(typed, workdir, steps=args.steps, every=None)[0])
        step_cpu = statistics.fmean(cpu for _, cpu in offs) / args.steps
        print(f"model={args.model} quant={args.quant} {' '.join(args.override)}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {args.steps} steps per fit")
        print(f"analysis off: {statistics.fmean(w for w, _ in offs) / args.steps * 1000:.0f} ms wall/step, "
              f"{1000 * step_cpu:.0f} ms CPU/step; one analysis pass: {one_pass:.2f} s CPU ({measure:.2f} measuring "
              f"on the training thread, {draw:.2f} drawing on the writer thread)")
        print(f"{'every_n_steps':>13} {'passes':>6} {'wall on/off':>11} {'CPU on/off':>10} {'steady state (CPU)':>18}")
        for i, every in enumerate(args.every):
            wall, cpu = ons[i]
            base_wall = (offs[i][0] + offs[i + 1][0]) / 2
            base_cpu = (offs[i][1] + offs[i + 1][1]) / 2
            passes = -(-args.steps // every)
            print(f"{every:>13} {passes:>6} {wall / base_wall - 1:>+11.1%} {cpu / base_cpu - 1:>+10.1%} "
                  f"{one_pass / (every * step_cpu):>+18.1%}")
        for every in args.predict:
            print(f"{every:>13} {'-':>6} {'-':>11} {'-':>10} {one_pass / (every * step_cpu):>+18.1%}")


if __name__ == "__main__":
    main()
