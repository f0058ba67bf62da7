"""Run one study experiment end to end and summarise it: arms x seeds, comparison report, timings, one bundle.

Why a driver around ``main.py`` and not one sweep: two arms depend on the BF16 arm's results. PTQ quantizes each
seed's trained BF16 checkpoint, and the "kurtosis-flagged layers kept in BF16" arm needs the layers that the BF16
runs' kurtosis studies flag. So the driver runs three ``python main.py -m`` processes into one sweep dir, in order,
each running all of its jobs in that one process (Hydra's basic launcher runs them one after the other, so torch,
CUDA and the Triton kernels are loaded once per phase, not once per job):

    train  experiment=<name>                         bf16, fp16, nvfp4, nvfp4_ste, nvfp4_fwd x seeds (seed-major)
    ptq    experiment=<name> +arm=nvfp4_ptq           each seed's best BF16 checkpoint under NVFP4, evaluated
    keep   experiment=<name> +arm=nvfp4_keep_bf16     NVFP4 keeping in BF16 what the kurtosis study flags on the
                                                      same seed's final BF16 weights (quant.exclude_by_kurtosis)

Flagged layers: the BF16 jobs' end-of-training kurtosis studies (``keep_high_precision``) say which layers the keep
arm will keep; when none of them is a layer the nvfp4 arm quantizes (a flagged stem that the model keeps in BF16
anyway changes nothing), the keep phase is skipped and the summary says why. What each keep job really kept is read
back from its quantization report.

Afterwards: the comparison report over the sweep dir (``analysis.report``), ``study_summary.json`` (final metrics per
arm and seed, mean +- std, relative gap to BF16, wall time per arm relative to BF16), one printed line
``[study] <experiment> ...: wall time per arm relative to bf16 ...``, and with ``--out`` a copy of the summary as
``<out>/<experiment>.json`` plus ``<out>/<experiment>.tar.gz``: the sweep dir without checkpoints, capped in size
(the device tool returns at most 16 MiB per file): everything but the per-layer heatmaps and the W&B media first,
then those of seed 0, then the rest, as far as they fit; what was left out is listed in the summary.

Wall time of an arm = the median over its seeds of the jobs' ``wall_seconds`` (run.json: data set-up, model, fit with
its validations, test of the best checkpoint). The median, because the first job of a process also pays CUDA
initialisation and cuDNN autotuning (the bf16 arm, seed 0) and the first NVFP4 job compiles the Triton kernels.
A PTQ job only evaluates; its ratio is listed apart.

``--deadline-s`` bounds the whole run: the train phase may use 72% of it, and a phase still running at its limit
(the deadline less a reserve for the report and the bundle) is stopped; the PTQ and keep phases then run for the seeds
whose BF16 job finished, as far as the time left allows, and everything finished is summarised and bundled.

Usage (from the repository root):
    python -m bench.study unet_coco --data-root .data --out /tmp/study            # study scale (GPU)
    python -m bench.study llm_text --toy --seeds 0                                 # CPU smoke: a few steps per job
    python -m bench.study resnet_cifar10 --set trainer.max_epochs=2 --deadline-s 500
  seeds on two GPUs: one driver per GPU, then one summary over both (job folders are found at any depth)
    CUDA_VISIBLE_DEVICES=0 python -m bench.study unet_coco --seeds 0 --sweep-dir S &
    CUDA_VISIBLE_DEVICES=1 python -m bench.study unet_coco --seeds 1 --sweep-dir S1; wait
    mv S1 S/gpu1 && python -m bench.study unet_coco --seeds 0,1 --phases none --sweep-dir S --out /tmp/study
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("unet_coco", "resnet_cifar10", "llm_text", "llm_tinystories")
PHASES = ("train", "ptq", "keep")
BASELINE = "bf16"
PTQ_ARM = "nvfp4-ptq"
KEEP_ARM = "nvfp4_keep_bf16"
QUANTIZED_ARM = "nvfp4"  # the arm whose kurtosis study says which flagged layers it quantizes
KEPT_BY_KURTOSIS = "kept in high precision: kurtosis study"  # quant_report.txt reason of quant.exclude_by_kurtosis
SUMMARY_FILE = "study_summary.json"
REPORT_RESERVE_S = 45.0  # kept back from the deadline for the report, the summary and the bundle
MIN_PHASE_S = 20.0  # a phase that would get less than this is skipped
TRAIN_SHARE = 0.72  # the train phase may use this share of the budget: PTQ and the keep arm need the rest
LOG_TAIL_LINES = 25  # lines of a failed phase's log printed by the driver
BUNDLE_SKIP = ("checkpoints", ".submitit")  # folders never bundled (checkpoints are tens of MB per job)
BUNDLE_SKIP_SUFFIXES = (".ckpt", ".safetensors", ".pt")

# CPU smoke scale: every job trains 2 optimizer steps (ResNet-18: 1; its emulated NVFP4 step costs ~7 s on one CPU
# core) on a few samples and validates once. Same configs, phases and files; only the sizes shrink
# (tests/test_experiments.py runs these).
TOY_COMMON = ["trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
              "trainer.limit_test_batches=1", "analysis.max_image_layers=1"]
TOY_OVERRIDES: dict[str, list[str]] = {
    "unet_coco": ["model.depth=2", "data.image_size=32", "data.batch_size=4", "data.train_limit=8",
                  "data.val_limit=4", "data.num_workers=0", "trainer.max_epochs=1",
                  "trainer.check_val_every_n_epoch=1"],
    "resnet_cifar10": ["data.batch_size=8", "data.train_limit=8", "data.val_limit=8", "data.num_workers=0",
                       "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1"],
    "llm_text": ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                 "model.intermediate_size=64", "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=2",
                 "trainer.val_check_interval=2", "trainer.limit_val_batches=2"],
}
TOY_OVERRIDES["llm_tinystories"] = TOY_OVERRIDES["llm_text"]


@dataclass
class PhaseResult:
    name: str
    command: list[str]
    returncode: int | None = None  # None: not run
    wall_seconds: float = 0.0
    timed_out: bool = False
    skipped: str = ""  # why the phase did not run
    log: str = ""  # the phase's stdout+stderr, relative to the sweep dir

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "command": " ".join(self.command), "returncode": self.returncode,
                "wall_seconds": round(self.wall_seconds, 2), "timed_out": self.timed_out, "skipped": self.skipped,
                "log": self.log}


@dataclass
class Flags:
    """Layers the BF16 kurtosis studies flag, the part of them that the keep arm moves to BF16, and what it kept."""

    per_seed: dict[int, list[str]] = field(default_factory=dict)
    union: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # flagged and quantized by the nvfp4 arm
    already_high_precision: list[str] = field(default_factory=list)  # flagged, but nvfp4 keeps them anyway
    reasons: dict[str, str] = field(default_factory=dict)  # layer -> the study's reason (first seed that flagged it)
    kept_per_seed: dict[int, list[str]] = field(default_factory=dict)  # read from the keep jobs' quant reports

    def to_json(self) -> dict[str, Any]:
        return {"per_seed": self.per_seed, "union": self.union, "moved_to_bf16_in_keep_arm": self.moved,
                "already_high_precision_in_nvfp4": self.already_high_precision, "reasons": self.reasons,
                "kept_per_seed": self.kept_per_seed}


# ------------------------------------------------------------------------------------------------------- commands
PHASE_ARGS = {"train": [], "ptq": ["+arm=nvfp4_ptq"], "keep": ["+arm=nvfp4_keep_bf16"]}


def phase_command(phase: str, experiment: str, sweep_dir: Path, common: Sequence[str]) -> list[str]:
    """The ``python main.py -m ...`` command of one phase (the report is built once, by the driver, at the end)."""
    return [sys.executable, str(REPO / "main.py"), "-m", f"experiment={experiment}", f"hydra.sweep.dir={sweep_dir}",
            "~hydra.callbacks.comparison_report", *common, *PHASE_ARGS[phase]]


def run_phase(result: PhaseResult, sweep_dir: Path, timeout_s: float) -> None:
    """Run the phase's command, output in ``<sweep>/logs/<phase>.log``; stop its process group at the timeout."""
    logs = sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{result.name}.log"
    result.log = str(log_path.relative_to(sweep_dir))
    print(f"[study] phase {result.name}: {' '.join(result.command)}", flush=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(result.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            result.returncode = process.wait(timeout=None if math.isinf(timeout_s) else timeout_s)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            _stop(process)
            result.returncode = process.returncode
    result.wall_seconds = time.perf_counter() - started
    status = "timed out" if result.timed_out else f"exit {result.returncode}"
    print(f"[study] phase {result.name}: {status} after {result.wall_seconds:.1f} s (log: {log_path})", flush=True)
    if result.returncode != 0:  # the log's end says which job failed and why (it is also in the bundle)
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(f"[study]   | {line}" for line in tail), flush=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the phase's process group (main.py and its data workers), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------------------ job files
def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job folder (one holding run.json) under the sweep dir, in name order."""
    return sorted(p.parent for p in sweep_dir.rglob("run.json") if "report" not in p.parts)


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for folder in job_dirs(sweep_dir):
        meta = json.loads((folder / "run.json").read_text())
        meta["folder"] = str(folder.relative_to(sweep_dir))
        meta["arm"] = meta.get("arm", meta.get("quant"))
        jobs.append(meta)
    return jobs


def failed_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(sweep_dir.rglob("failure.json")):
        try:
            failure = json.loads(path.read_text())
        except json.JSONDecodeError:
            failure = {}
        out.append({"folder": str(path.parent.relative_to(sweep_dir)),
                    "message": failure.get("message") or failure.get("error") or "see failure.json"})
    return out


def kurtosis_rows(job_folder: Path) -> list[dict[str, Any]]:
    files = sorted((job_folder / "plots" / "kurtosis").glob("*/kurtosis.json"))
    return json.loads(files[0].read_text())["layers"] if files else []


def kept_layers(quant_report: str) -> list[str]:
    """Module names that a ``quant_report.txt`` (``QuantReport.table()``) lists as kept by the kurtosis study."""
    rows = quant_report.splitlines()
    start = next((i + 1 for i, row in enumerate(rows) if row.startswith("------")), len(rows))
    return [row.split()[0] for row in rows[start:] if KEPT_BY_KURTOSIS in row]


def flagged_layers(sweep_dir: Path, jobs: Sequence[dict[str, Any]]) -> Flags:
    """The BF16 seeds' flagged layers, those of them the nvfp4 arm quantizes, and what the keep jobs kept."""
    flags = Flags()
    for job in sorted((j for j in jobs if j["arm"] == BASELINE and j.get("mode", "train") == "train"),
                      key=lambda j: j["seed"]):
        rows = [r for r in kurtosis_rows(sweep_dir / job["folder"]) if r.get("keep_high_precision")]
        flags.per_seed[int(job["seed"])] = [r["layer"] for r in rows]
        for row in rows:
            if row["layer"] not in flags.reasons:
                flags.union.append(row["layer"])
                flags.reasons[row["layer"]] = row.get("reason", "")
    quantized: set[str] = set()
    for job in (j for j in jobs if j["arm"] == QUANTIZED_ARM):
        quantized |= {r["layer"] for r in kurtosis_rows(sweep_dir / job["folder"]) if r.get("quantized")}
    if not quantized:  # no nvfp4 study to tell which layers it quantizes: assume every flagged layer would move
        quantized = set(flags.union)
    flags.moved = [name for name in flags.union if name in quantized]
    flags.already_high_precision = [name for name in flags.union if name not in quantized]
    for job in (j for j in jobs if j["arm"] == KEEP_ARM):
        report = sweep_dir / job["folder"] / "quant_report.txt"
        if report.is_file():
            flags.kept_per_seed[int(job["seed"])] = kept_layers(report.read_text())
    return flags


# -------------------------------------------------------------------------------------------------------- summary
def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    return {"values": values, "mean": statistics.fmean(finite) if finite else None,
            "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0 if finite else None, "n": len(finite)}


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("loss", "ppl", "err"))


def summarize_arms(jobs: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """Per arm: seeds, every val/ and test/ metric (values, mean, std, relative gap to bf16), median wall time."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        arms.setdefault(job["arm"], []).append(job)
    monitor = next((j.get("monitor") for j in jobs if j.get("monitor")), None)
    headline = monitor.replace("val/", "test/") if monitor else None
    out: dict[str, Any] = {}
    for arm, members in arms.items():
        members.sort(key=lambda j: j["seed"])
        keys = sorted({k for j in members for k in j.get("metrics", {}) if k.split("/")[0] in ("val", "test")})
        metrics = {k: _stats([float(j["metrics"][k]) if k in j.get("metrics", {}) else math.nan for j in members])
                   for k in keys}
        walls = [float(j["wall_seconds"]) for j in members if j.get("wall_seconds") is not None]
        out[arm] = {"seeds": [j["seed"] for j in members], "mode": members[0].get("mode", "train"),
                    "precision": members[0].get("precision_effective"), "metrics": metrics,
                    "wall_seconds": walls, "wall_seconds_median": statistics.median(walls) if walls else None,
                    "folders": [j["folder"] for j in members]}
    base = out.get(BASELINE)
    for arm, entry in out.items():
        for key, stat in entry["metrics"].items():
            ref = base["metrics"].get(key, {}).get("mean") if base else None
            stat["gap_to_bf16"] = ((stat["mean"] - ref) / abs(ref) if ref not in (None, 0) and stat["mean"] is not None
                                   else None)
        ref_wall = base["wall_seconds_median"] if base else None
        entry["wall_relative_to_bf16"] = (entry["wall_seconds_median"] / ref_wall
                                          if ref_wall and entry["wall_seconds_median"] is not None else None)
    return out, headline


def arm_order(arms: Sequence[str]) -> list[str]:
    known = [BASELINE, "fp16", "nvfp4", "nvfp4_ste", "nvfp4_fwd", KEEP_ARM, PTQ_ARM]
    return [a for a in known if a in arms] + sorted(a for a in arms if a not in known)


def wall_line(experiment: str, device: str, arms: dict[str, Any]) -> str:
    parts = []
    for arm in arm_order(list(arms)):
        entry = arms[arm]
        ratio = entry["wall_relative_to_bf16"]
        text = f"{arm} {'n/a' if ratio is None else f'{ratio:.2f}x'}"
        if arm == BASELINE and entry["wall_seconds_median"] is not None:
            text += f" ({entry['wall_seconds_median']:.1f} s/job)"
        if entry["mode"] != "train":
            text += " (eval only)"
        parts.append(text)
    seeds = max((len(a["seeds"]) for a in arms.values()), default=0)
    return (f"[study] {experiment} on {device}: wall time per arm relative to bf16 (median of {seeds} seeds, "
            f"same run): " + ", ".join(parts))


def headline_lines(headline: str | None, arms: dict[str, Any]) -> list[str]:
    if headline is None:
        return []
    lines = []
    for arm in arm_order(list(arms)):
        stat = arms[arm]["metrics"].get(headline)
        if stat and stat["mean"] is not None:
            gap = stat.get("gap_to_bf16")
            lines.append(f"[study]   {arm:16s} {headline} {stat['mean']:.4f} +- {stat['std']:.4f} (n={stat['n']})"
                         + ("" if gap is None or arm == BASELINE else f"  gap {100 * gap:+.2f}%"))
    return lines


def key_figures(sweep_dir: Path, jobs: Sequence[dict[str, Any]]) -> list[str]:
    """The report's PNGs worth committing under docs/: the monitored metric's and the training loss's curves and the
    per-layer kurtosis-vs-error scatter (paths relative to the sweep dir, as they are in the bundle)."""
    monitor = next((j.get("monitor") for j in jobs if j.get("monitor")), None)
    wanted = [f"_curve_{key.replace('/', '_')}.png" for key in (monitor, "train/loss") if key]
    wanted.append("_kurtosis_vs_error.png")
    figures = sorted((sweep_dir / "report" / "figures").glob("*.png"))
    return [str(p.relative_to(sweep_dir)) for suffix in wanted for p in figures if p.name.endswith(suffix)]


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "host": platform.node(), "python": platform.python_version()}
    for package in ("torch", "triton", "lightning", "hydra-core", "wandb", "transformers", "pycocotools"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpu"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


# --------------------------------------------------------------------------------------------------------- bundle
def bundle_tier(rel: Path) -> str | None:
    """Which tier of the bundle a file of the sweep dir belongs to (None: never bundled).

    ``core``: run.json, CSV logs, Hydra configs, quantization reports, job logs, kurtosis studies, the report, the
    summary, and the W&B runs without their media; then the per-layer heatmaps and the W&B media (copies of the PNGs
    under plots/) of seed 0, then those of the other seeds."""
    parts = rel.parts
    if any(part in BUNDLE_SKIP for part in parts) or rel.suffix in BUNDLE_SKIP_SUFFIXES:
        return None
    seed = parts[0].rsplit("-seed", 1)[-1] if "-seed" in parts[0] else ""
    later = "" if seed == "0" else "_other_seeds"
    if "wandb" in parts and "media" in parts:
        return f"wandb_media{'_seed0' if not later else later}"
    if "heatmaps" in parts:
        return f"heatmaps{'_seed0' if not later else later}"
    return "core"


BUNDLE_TIERS = ("core", "heatmaps_seed0", "wandb_media_seed0", "heatmaps_other_seeds", "wandb_media_other_seeds")


def bundle(sweep_dir: Path, target: Path, cap_bytes: int) -> dict[str, Any]:
    """``target`` = tar.gz of the sweep dir without checkpoints, with as many tiers (``BUNDLE_TIERS``, in order) as
    fit in ``cap_bytes``. PNGs do not compress, so the size of a tier set is estimated first (PNG bytes plus a third
    of the rest), and the archive is rebuilt with one tier fewer if it still comes out over the cap."""
    tiers: dict[str, list[Path]] = {tier: [] for tier in BUNDLE_TIERS}
    for path in sorted(p for p in sweep_dir.rglob("*") if p.is_file()):
        tier = bundle_tier(path.relative_to(sweep_dir))
        if tier is not None:
            tiers[tier].append(path)

    def estimate(paths: list[Path]) -> float:
        return sum(p.stat().st_size * (1.0 if p.suffix == ".png" else 0.35) for p in paths)

    count = 1
    while count < len(BUNDLE_TIERS) and sum(estimate(tiers[t]) for t in BUNDLE_TIERS[:count + 1]) <= cap_bytes:
        count += 1
    while True:
        with tarfile.open(target, "w:gz", compresslevel=6) as archive:
            for tier in BUNDLE_TIERS[:count]:
                for path in tiers[tier]:
                    archive.add(path, arcname=str(Path(sweep_dir.name) / path.relative_to(sweep_dir)))
        size = target.stat().st_size
        if size <= cap_bytes or count == 1:
            break
        count -= 1
    left_out = ["checkpoints"] + [t for t in BUNDLE_TIERS[count:] if tiers[t]]
    return {"file": target.name, "bytes": size, "tiers": list(BUNDLE_TIERS[:count]), "left_out": left_out,
            "over_cap": size > cap_bytes}


# ----------------------------------------------------------------------------------------------------------- main
def default_data_root() -> Path:
    env = os.environ.get("FP4LAB_DATA_ROOT")
    for candidate in (env, REPO / ".data", REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return REPO / ".data"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder holding the data sets as ../shared/data does (default: $FP4LAB_DATA_ROOT, "
                             ".data, ../shared/data)")
    parser.add_argument("--sweep-dir", type=Path, default=None,
                        help="default: multirun/<experiment>/study-<UTC time>")
    parser.add_argument("--out", type=Path, default=None, help="copy <experiment>.json and <experiment>.tar.gz here")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"subset of {','.join(PHASES)}, or 'none': run nothing, only rebuild the report, summary "
                             "and bundle from the job folders already under the sweep dir (also those of another "
                             "driver's sweep dir moved inside it, e.g. seeds run on a second GPU)")
    parser.add_argument("--trainer", choices=("auto", "gpu", "cpu"), default="auto",
                        help="trainer config (auto: gpu when CUDA is available)")
    parser.add_argument("--toy", action="store_true", help="CPU smoke scale: 2 steps per job, a few samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every phase (repeatable), e.g. trainer.max_epochs=20")
    parser.add_argument("--deadline-s", type=float, default=None, help="wall-clock budget of the whole study")
    parser.add_argument("--bundle-mib", type=float, default=15.0, help="size cap of the tar.gz (device: 16 MiB)")
    args = parser.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if args.phases != "none" and unknown:
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))}; valid: {', '.join(PHASES)} or none")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    sweep_dir = (args.sweep_dir or REPO / "multirun" / args.experiment / f"study-{stamp}").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    data_root = (args.data_root or default_data_root()).resolve()
    trainer = args.trainer if args.trainer != "auto" else ("gpu" if cuda_available() else "cpu")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    common = [f"paths.data_root={data_root}", f"trainer={trainer}",
              *(TOY_COMMON + TOY_OVERRIDES[args.experiment] if args.toy else []), *args.set]
    wanted = args.phases.split(",")
    deadline = args.deadline_s

    def time_left() -> float:
        return math.inf if deadline is None else deadline - (time.perf_counter() - started) - REPORT_RESERVE_S

    phases: list[PhaseResult] = []
    for name in PHASES:
        jobs = read_jobs(sweep_dir)
        bf16_seeds = sorted({int(j["seed"]) for j in jobs if j["arm"] == BASELINE and j.get("mode") == "train"})
        skipped = "" if name in wanted else "not requested (--phases)"
        if not skipped and name in ("ptq", "keep") and not set(seeds) & set(bf16_seeds):
            skipped = "no finished bf16 job of the requested seeds in the sweep dir"
        if not skipped and name == "keep":
            predicted = flagged_layers(sweep_dir, jobs)
            if not predicted.per_seed:
                skipped = "the bf16 jobs wrote no kurtosis study (analysis off?)"
            elif not predicted.moved:
                skipped = ("the BF16 kurtosis studies flag no layer that nvfp4 quantizes (flagged: "
                           f"{', '.join(predicted.union) or 'none'}): the arm would be the nvfp4 arm")
        limit = time_left() if name != "train" or deadline is None else min(time_left(), TRAIN_SHARE * deadline)
        if not skipped and limit < MIN_PHASE_S:
            skipped = f"deadline: {max(limit, 0):.0f} s left"
        # PTQ and the keep arm run the seeds whose BF16 job finished (all of them unless the train phase was cut short)
        phase_seeds = seeds if name == "train" else [s for s in seeds if s in bf16_seeds]
        phase_common = [*common, "seed=" + ",".join(map(str, phase_seeds))]
        result = PhaseResult(name, phase_command(name, args.experiment, sweep_dir, phase_common), skipped=skipped)
        phases.append(result)
        if skipped:
            print(f"[study] phase {name}: skipped ({skipped})", flush=True)
            continue
        run_phase(result, sweep_dir, limit)

    jobs = read_jobs(sweep_dir)
    flags = flagged_layers(sweep_dir, jobs)
    report_page = None
    if jobs:
        from analysis.report import build_report  # imports torch/lightning: only once there is something to show

        report_page = build_report([sweep_dir], sweep_dir / "report")
    arms, headline = summarize_arms(jobs)
    env = environment()
    device = (env["gpu"] or "CPU").split(",")[0] if trainer == "gpu" else "CPU"
    line = wall_line(args.experiment, device, arms)
    summary = {
        "experiment": args.experiment, "scale": "toy" if args.toy else "study", "trainer": trainer,
        "seeds": seeds, "headline_metric": headline, "baseline": BASELINE,
        "sweep_dir": str(sweep_dir), "data_root": str(data_root), "overrides": common,
        "environment": env, "phases": [p.to_json() for p in phases],
        "kurtosis_flags": flags.to_json(),
        "arms": {arm: arms[arm] for arm in arm_order(list(arms))},
        "failed_jobs": failed_jobs(sweep_dir), "wall_line": line,
        "report": str(report_page.relative_to(sweep_dir)) if report_page else None,
        "key_figures": key_figures(sweep_dir, jobs),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary["bundle"] = bundle(sweep_dir, args.out / f"{args.experiment}.tar.gz", int(args.bundle_mib * 2**20))
        (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        shutil.copyfile(sweep_dir / SUMMARY_FILE, args.out / f"{args.experiment}.json")
    for text in headline_lines(headline, arms):
        print(text)
    print(line, flush=True)
    print(f"[study] summary: {sweep_dir / SUMMARY_FILE}" + (f"; report: {report_page}" if report_page else ""))
    ok = bool(jobs) and not summary["failed_jobs"] and all(p.returncode in (0, None) and not p.timed_out
                                                          for p in phases)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
