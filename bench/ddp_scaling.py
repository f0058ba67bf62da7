"""DDP on 2 devices against 1 device at the same global batch: loss curves and samples/s for the LLM and the UNet.

Per model, three training runs of the same config, seed and global batch B (each a worker process, so Lightning's
``ddp`` launcher can re-run it for rank 1):

* ``1dev``: ``trainer=gpu``, batch B on one device;
* ``2dev``: ``trainer=ddp``, B/2 per rank on two devices. ``data.sampling.SeededSampler`` gives the two ranks the two
  halves of the very global batch ``1dev`` sees at that step, with the same augmentation seeds, and DDP broadcasts
  rank 0's initial weights, so the runs differ only in numerics: per-rank activation/gradient amax (TE's data-parallel
  behaviour), per-rank SR streams, reduction order;
* ``1dev-sr``: ``1dev`` with another SR seed (``quant.seed``): the spread that SR noise alone causes, the yardstick
  for the 2-device deviation.

Recorded per optimizer step: the global batch's loss (the ranks' losses all-reduced to their mean, which is the mean
over the B samples) and the step's wall time from batch start to batch end (CUDA-synchronised; data loading excluded).

Stated before running: the 2-device curve passes if (a) its first-step loss is within 1% of ``1dev``'s (same weights,
same batch), and (b) over windows of steps/10 steps, the largest relative difference of window means to ``1dev`` is
at most max(3%, 2 x the same measure for ``1dev-sr``). Throughput: samples/s = B / median step time after warm-up;
scaling = samples/s on 2 devices / on 1 device (2.0 is perfect).

    python -m bench.ddp_scaling --out ddp_scaling.json          # 2 GPUs: LLM and UNet, NVFP4 emulated, 100 steps
    python -m bench.ddp_scaling --quick                         # CPU smoke: 2 gloo processes, tiny models, 4 steps
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODELS = ("llm", "unet")
DEFAULT_OVERRIDES = {
    "llm": "model.d_model=256 model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 model.intermediate_size=768 "
           "data.seq_len=256",
    "unet": "model.width=0.5",
}
QUICK_OVERRIDES = {
    "llm": "model.d_model=32 model.n_layers=1 model.n_heads=2 model.n_kv_heads=1 model.intermediate_size=64 "
           "data.corpus_chars=20000 data.seq_len=32",
    "unet": "model.depth=2 model.num_queries=4 data.num_train=16 data.num_val=8 data.image_size=32 data.canvas_size=32",
}
FIRST_STEP_TOLERANCE = 0.01
WINDOW_TOLERANCE = 0.03


# ----------------------------------------------------------------------------------------------------------------------
# worker: one training run (every rank of it)
# ----------------------------------------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.callbacks import Callback
    from omegaconf import OmegaConf, open_dict

    import conf.schemas  # noqa: F401  (registers the schemas)
    from trainers.app import validate
    from trainers.job import Job

    class StepRecorder(Callback):
        """Global-batch loss and wall time of every optimizer step."""

        def __init__(self) -> None:
            self.losses: list[float] = []
            self.step_seconds: list[float] = []
            self._started = 0.0

        def _sync(self, trainer: L.Trainer) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._sync(trainer)
            self._started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync(trainer)
            self.step_seconds.append(time.perf_counter() - self._started)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")))

    overrides = shlex.split(args.overrides) + [f"paths.output_dir={args.run_dir}", f"paths.cache_dir={args.cache_dir}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf"), job_name="ddp_scaling"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    HydraConfig.instance().cfg = None  # no Hydra run: Lightning re-runs this command line unchanged for rank 1
    job = Job(cfg=cfg, typed=validate(cfg))
    L.seed_everything(job.typed.seed, workers=True)
    datamodule = job.build_datamodule()
    model = job.build_model(datamodule.info)
    report = job.apply_policy(model, write_report=False)
    task = job.build_task(model, datamodule.info)
    recorder = StepRecorder()
    trainer = job.build_trainer(task, loggers=[], callbacks=[recorder])
    trainer.fit(task, datamodule=datamodule)
    if trainer.is_global_zero:
        device = trainer.strategy.root_device
        result = {"losses": recorder.losses, "step_seconds": recorder.step_seconds, "world_size": trainer.world_size,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "quantized_layers": report.num_quantized, "backend": job.backend.backend if job.backend else None}
        Path(args.result).write_text(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# orchestrator
# ----------------------------------------------------------------------------------------------------------------------
def run_config(name: str, overrides: list[str], work: Path) -> dict[str, Any]:
    result = work / f"{name}.json"
    command = [sys.executable, "-m", "bench.ddp_scaling", "--worker", "--overrides", shlex.join(overrides),
               "--run-dir", str(work / name), "--cache-dir", str(work / "cache"), "--result", str(result)]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**json.loads(result.read_text()), "wall_seconds": round(time.perf_counter() - started, 1)}


def window_means(values: list[float], windows: int) -> list[float]:
    size = max(1, len(values) // windows)
    return [statistics.fmean(values[i:i + size]) for i in range(0, len(values) - size + 1, size)]


def max_relative_gap(curve: list[float], reference: list[float], windows: int) -> float:
    ours, theirs = window_means(curve, windows), window_means(reference, windows)
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))


def samples_per_second(run: dict[str, Any], global_batch: int, warmup: int) -> float:
    return global_batch / statistics.median(run["step_seconds"][warmup:])


def compare(model: str, runs: dict[str, dict[str, Any]], global_batch: int, windows: int) -> dict[str, Any]:
    single, double = runs["1dev"], runs["2dev"]
    steps = min(len(single["losses"]), len(double["losses"]))
    warmup = min(10, steps // 5)
    first = abs(double["losses"][0] - single["losses"][0]) / abs(single["losses"][0])
    gap = max_relative_gap(double["losses"][:steps], single["losses"][:steps], windows)
    seed_gap = max_relative_gap(runs["1dev-sr"]["losses"][:steps], single["losses"][:steps], windows) \
        if "1dev-sr" in runs else 0.0
    allowed = max(WINDOW_TOLERANCE, 2 * seed_gap)
    sps1, sps2 = samples_per_second(single, global_batch, warmup), samples_per_second(double, global_batch, warmup)
    return {
        "model": model, "steps": steps, "global_batch": global_batch, "device": single["device"],
        "first_step_loss": {"1dev": single["losses"][0], "2dev": double["losses"][0], "relative_gap": first},
        "final_window_loss": {key: window_means(run["losses"][:steps], windows)[-1] for key, run in runs.items()},
        "window_gap_2dev": gap, "window_gap_sr_seed": seed_gap, "window_gap_allowed": allowed,
        "passed": first <= FIRST_STEP_TOLERANCE and gap <= allowed,
        "samples_per_s": {"1dev": sps1, "2dev": sps2}, "scaling": sps2 / sps1,
        "runs": runs,
    }


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['model']:5s} steps={row['steps']} B={row['global_batch']} ({row['device']}): first-step loss "
          f"{row['first_step_loss']['1dev']:.4f} vs {row['first_step_loss']['2dev']:.4f} "
          f"(gap {100 * row['first_step_loss']['relative_gap']:.2f}%), window gap 2dev "
          f"{100 * row['window_gap_2dev']:.2f}% / SR-seed {100 * row['window_gap_sr_seed']:.2f}% "
          f"(allowed {100 * row['window_gap_allowed']:.1f}%) -> {'PASS' if row['passed'] else 'FAIL'}; samples/s "
          f"{row['samples_per_s']['1dev']:.1f} -> {row['samples_per_s']['2dev']:.1f} = x{row['scaling']:.2f}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--quant", default="nvfp4", help="quant config of all runs (default: nvfp4, emulated)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--no-sr-reference", action="store_true", help="skip the 1-device run with another SR seed")
    for model in MODELS:
        parser.add_argument(f"--{model}-overrides", default=None, help=f"model/data overrides of the {model} runs")
    parser.add_argument("--work-dir", default=None, help="where the runs write (default: a folder next to --out)")
    parser.add_argument("--out", default=None, help="JSON with every curve and the verdicts (rewritten per model)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: gloo, tiny models, 4 steps, batch 8")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    steps = 4 if args.quick else args.steps
    global_batch = 8 if args.quick else args.global_batch
    windows = 2 if args.quick else args.windows
    accelerator = "cpu" if args.quick else "gpu"
    work = Path(args.work_dir or (Path(args.out).parent if args.out else Path("outputs")) / "ddp_scaling_runs")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        extra = getattr(args, f"{model}_overrides") or (QUICK_OVERRIDES if args.quick else DEFAULT_OVERRIDES)[model]
        common = [f"model={model}", f"quant={args.quant}", *shlex.split(extra), f"trainer.max_steps={steps}",
                  "trainer.max_epochs=-1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                  "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                  "trainer.log_every_n_steps=1000", "trainer.benchmark=true", "logger=none", "analysis=off"]
        configs = {
            "1dev": ["trainer=gpu", f"trainer.accelerator={accelerator}", f"data.batch_size={global_batch}"],
            "2dev": ["trainer=ddp", f"trainer.accelerator={accelerator}", "trainer.devices=2",
                     f"data.batch_size={global_batch // 2}"],
        }
        if not args.no_sr_reference:
            configs["1dev-sr"] = [*configs["1dev"], "quant.seed=1"]
        runs = {}
        for name, specific in configs.items():
            runs[name] = run_config(f"{model}-{name}", [*common, *specific], work)
            print(f"{model}-{name}: {len(runs[name]['losses'])} steps, {runs[name]['wall_seconds']} s", flush=True)
        rows.append(compare(model, runs, global_batch, windows))
        print_row(rows[-1])
        if args.out:
            Path(args.out).write_text(json.dumps({"quant": args.quant, "rows": rows}, indent=1) + "\n")
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
