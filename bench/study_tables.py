"""Markdown tables of study summaries (``bench/study.py``'s ``<experiment>.json``), for docs/results.md.

Why a script: the numbers in the results page must be the ones the runs produced, so they are rendered from the
summary files kept under ``docs/results/`` instead of being copied by hand.

Usage: ``python -m bench.study_tables docs/results/unet_coco.json [more.json ...]`` prints, per experiment, the run
line (GPU, date, versions, seeds), one table row per arm (every test/ metric as mean +- std over seeds with the
relative gap to BF16, wall time per job relative to BF16), the paired comparison of the headline metric (each arm
against BF16 of the same seed, and the keep arm against the nvfp4 arm of the same seed: same data order and initial
weights, so the seed-to-seed spread cancels), the layers the kurtosis study flagged, the bench line, and any failed or
skipped phase.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

ARM_TEXT = {
    "bf16": "BF16 (baseline)",
    "fp16": "FP16 AMP",
    "nvfp4": "NVFP4 QAT, backward=full",
    "nvfp4_ste": "NVFP4 QAT, backward=dequantized (STE)",
    "nvfp4_fwd": "NVFP4 QAT, backward=high_precision",
    "nvfp4_keep_bf16": "NVFP4 QAT (full), flagged layers BF16",
    "nvfp4-ptq": "NVFP4 PTQ of the BF16 model",
}


def _cell(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    gap = stat.get("gap_to_bf16")
    return text if gap is None or gap == 0 else f"{text} ({100 * gap:+.2f}%)"


def metric_columns(summary: dict[str, Any]) -> list[str]:
    """The headline test metric first, then the other test/ metrics every arm has."""
    arms = summary["arms"].values()
    common = set.intersection(*(set(k for k in a["metrics"] if k.startswith("test/")) for a in arms)) if arms else set()
    headline = summary.get("headline_metric")
    rest = sorted(common - {headline})
    return ([headline] if headline in common else []) + rest


LOWER_IS_BETTER = ("loss", "ppl")  # headline metrics whose name ends so; the others (mIoU, accuracy) are higher-better
PAIRED_AGAINST = {"nvfp4_keep_bf16": "nvfp4"}  # arms also compared with another arm than BF16, seed by seed


def paired_rows(summary: dict[str, Any]) -> list[str]:
    """Table rows: per arm and reference arm, the relative differences of the headline metric over the seeds both
    arms finished, ``(arm - ref) / |ref|`` per seed, their mean and population std, and in how many seeds the arm
    was better. Pairing removes what the seeds share across arms (data order, initial weights)."""
    metric = summary.get("headline_metric")
    lower_better = any(metric.endswith(suffix) for suffix in LOWER_IS_BETTER) if metric else False
    arms = summary["arms"]

    def per_seed(arm: str) -> dict[int, float]:
        entry = arms.get(arm) or {}
        values = (entry.get("metrics", {}).get(metric) or {}).get("values", [])
        return dict(zip(entry.get("seeds", []), values))

    rows = []
    for arm in arms:
        for ref in ("bf16", PAIRED_AGAINST.get(arm)):
            if ref is None or ref == arm or ref not in arms:
                continue
            mine, theirs = per_seed(arm), per_seed(ref)
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                continue
            gaps = [(mine[s] - theirs[s]) / abs(theirs[s]) for s in seeds]
            better = sum((g < 0) if lower_better else (g > 0) for g in gaps)
            per = ", ".join(f"{100 * g:+.2f}%" for g in gaps)
            rows.append(f"| {ARM_TEXT.get(arm, arm)} | {ARM_TEXT.get(ref, ref)} | {per} | "
                        f"{100 * statistics.fmean(gaps):+.2f}% ± {100 * statistics.pstdev(gaps):.2f}% | "
                        f"{better} of {len(seeds)} |")
    if not rows:
        return []
    header = [f"Paired by seed, {metric} ({'lower' if lower_better else 'higher'} is better): (arm - reference) / "
              "|reference| of the same seed.", "",
              "| arm | reference | per seed | mean ± std | arm better in |", "|---|---|---|---|---|"]
    return header + rows


NOT_REQUESTED = "not requested"  # bench.study's reason for a phase left out by --phases


def gpu_text(env: dict[str, Any]) -> str:
    """``nvidia-smi``'s GPU lines as one: ``2 x NVIDIA H100 80GB HBM3, ...`` for a host of identical GPUs."""
    gpus = [line.strip() for line in (env.get("gpu") or "").splitlines() if line.strip()]
    if not gpus:
        return "CPU"
    return gpus[0] if len(gpus) == 1 else (f"{len(gpus)} x {gpus[0]}" if len(set(gpus)) == 1 else "; ".join(gpus))


def rebuilt(summary: dict[str, Any]) -> bool:
    """True for a summary rebuilt with ``--phases none`` over job folders that other driver runs wrote."""
    return all(p["skipped"].startswith(NOT_REQUESTED) for p in summary["phases"])


def experiment_markdown(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    seeds = ", ".join(map(str, summary["seeds"]))
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton", "lightning", "transformers")
                         if env.get(name))
    span = ("summary rebuilt over the job folders of several driver runs (--phases none)" if rebuilt(summary)
            else f"study wall time {summary['wall_seconds']:.0f} s")
    lines = [f"### {summary['experiment']}", "",
             f"{gpu_text(env)}; {env['date']}; {versions}; seeds {seeds}; {span}"
             + ("" if summary["scale"] == "study" else f" (scale: {summary['scale']})"), ""]
    columns = metric_columns(summary)
    lines.append("| arm | " + " | ".join(columns) + " | seeds | wall time / job vs BF16 |")
    lines.append("|---|" + "---|" * (len(columns) + 2))
    for arm, entry in summary["arms"].items():
        ratio = entry.get("wall_relative_to_bf16")
        wall = "n/a" if ratio is None else f"{ratio:.2f}x" + (" (eval only)" if entry["mode"] != "train" else "")
        cells = " | ".join(_cell(entry["metrics"].get(key)) for key in columns)
        lines.append(f"| {ARM_TEXT.get(arm, arm)} | {cells} | {len(entry['seeds'])} | {wall} |")
    lines += ["", "Mean ± std over seeds (population std); in parentheses the relative gap (arm - BF16) / |BF16|. "
              "test/ metrics: the best checkpoint by the validation monitor, evaluated on the held-out split."]
    paired = paired_rows(summary)
    if paired:
        lines += [""] + paired
    flags = summary["kurtosis_flags"]
    if flags["union"]:
        lines += ["", "Layers the BF16 kurtosis studies flag (union over seeds): " + ", ".join(
            f"`{name}`" + ("" if name in flags["moved_to_bf16_in_keep_arm"] else " (already BF16 in the nvfp4 arm)")
            for name in flags["union"])]
        if flags.get("kept_per_seed"):
            lines.append("Kept in BF16 by the keep arm (its quant_report.txt): " + "; ".join(
                f"seed {seed}: " + (", ".join(f"`{n}`" for n in names) or "none")
                for seed, names in sorted(flags["kept_per_seed"].items(), key=lambda item: int(item[0]))))
    else:
        lines += ["", "The BF16 kurtosis studies flag no layer (robust z of the per-tensor weight kurtosis above the "
                  "threshold within a module type)."]
    problems = [f"phase {p['name']}: " + (p["skipped"] or ("timed out" if p["timed_out"] else
                                                            f"exit {p['returncode']}"))
                for p in summary["phases"] if (p["skipped"] and not p["skipped"].startswith(NOT_REQUESTED))
                or p["timed_out"] or p["returncode"] not in (0, None)]
    # with no layer flagged, the keep arm is never run (it would be the nvfp4 arm): not a gap of the study
    missing = [arm for arm in ARM_TEXT if arm not in summary["arms"]
               and not (arm == "nvfp4_keep_bf16" and not flags["union"])]
    if missing:
        problems.append("no finished job of " + ", ".join(f"`{arm}`" for arm in missing))
    problems += [f"failed job {job['folder']}: {job['message']}" for job in summary.get("failed_jobs", [])]
    if problems:
        lines += ["", "Not complete: " + "; ".join(problems) + "."]
    lines += ["", "```", summary["wall_line"], "```"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.study_tables", description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="<experiment>.json files written by bench/study.py")
    args = parser.parse_args(argv)
    blocks = []
    for path in args.summaries:
        try:
            blocks.append(experiment_markdown(json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            print(f"error: {path} is not a bench/study.py summary ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
    print("\n\n".join(blocks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
