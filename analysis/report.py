"""Comparison report of finished jobs: one self-contained HTML page plus PNGs, built only from local files.

Usage: ``python -m analysis.report <sweep or run dirs>... [-o OUT_DIR] [--baseline NAME ...]``

Why only files: the study must be readable offline and without a W&B account, so the report reads what every job
leaves in its output dir: ``run.json`` (names, seed, final metrics), ``csv/metrics.csv`` (the CSV logger's curves)
and, when the analysis ran, ``plots/kurtosis/<run-name>/kurtosis.json``. A job dir is any folder holding a
``run.json``; sweep dirs are searched recursively.

Arms are the jobs' precision-policy names (``run.json`` key ``quant``), compared within each (model, data) pair.
Seeds of an arm are drawn as the mean with a min..max band; the final-metrics table gives mean +- std over seeds
and the relative gap ``(arm - baseline) / |baseline|`` to the first arm present of the baseline preference list
(default bf16, fp16, fp32).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from analysis import render
from conf.errors import DataError, UserError

log = logging.getLogger(__name__)

DEFAULT_BASELINES = ("bf16", "fp16", "fp32")
REPORT_FILE = "report.html"


@dataclass
class Job:
    folder: Path
    run_name: str
    arm: str
    seed: int
    model: str
    data: str
    metrics: dict[str, float]
    precision: str = ""
    monitor: str | None = None
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # key -> (steps, values)
    kurtosis: dict[str, Any] | None = None
    stage: str = ""  # stage of a multi-stage study (mode=ptq_vs_qat): baseline, ptq, qat, packed


def find_job_dirs(paths: Sequence[Path]) -> list[Path]:
    """Every folder under ``paths`` (or equal to one) that holds a ``run.json``, sorted, without duplicates."""
    found: dict[Path, None] = {}
    for path in paths:
        if not path.exists():
            raise DataError(f"report: {path} does not exist; give sweep dirs (multirun/...) or job dirs with run.json")
        for run_json in sorted(path.rglob("run.json")) if path.is_dir() else []:
            found[run_json.parent.resolve()] = None
    if not found:
        raise DataError(f"report: no run.json under {', '.join(map(str, paths))}; a job writes run.json when it "
                        "finishes, so give the output dir of a finished run or sweep")
    return list(found)


def read_curves(metrics_csv: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Lightning CSVLogger file -> ``{metric: (steps, values)}``; one row per log call, empty cells skipped."""
    curves: dict[str, dict[float, float]] = {}
    if not metrics_csv.is_file():
        return {}
    with metrics_csv.open(newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            step = _number(row.get("step"))
            step = float(index) if step is None else step
            for key, cell in row.items():
                value = _number(cell)
                if key in ("step", "epoch") or value is None:
                    continue
                curves.setdefault(key, {})[step] = value  # a metric logged twice at one step keeps the last value
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in curves.items()}


def _number(cell: str | None) -> float | None:
    if cell is None or cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def load_job(folder: Path) -> Job:
    try:
        meta = json.loads((folder / "run.json").read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"report: {folder / 'run.json'} is not valid JSON ({exc})") from None
    missing = [key for key in ("run_name", "quant", "seed", "model", "data") if key not in meta]
    if missing:
        raise DataError(f"report: {folder / 'run.json'} lacks {', '.join(missing)}; it was not written by fp4lab")
    kurtosis_files = sorted((folder / "plots" / "kurtosis").glob("*/kurtosis.json"))
    metrics = {k: float(v) for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))}
    return Job(folder=folder, run_name=meta["run_name"], arm=meta.get("arm", meta["quant"]), seed=int(meta["seed"]),
               model=meta["model"], data=meta["data"], metrics=metrics,
               precision=meta.get("precision_effective", meta.get("precision", "")), monitor=meta.get("monitor"),
               curves=read_curves(folder / "csv" / "metrics.csv"),
               kurtosis=json.loads(kurtosis_files[0].read_text()) if kurtosis_files else None,
               stage=str(meta.get("stage") or ""))


def pick_baseline(arms: Sequence[str], preference: Sequence[str]) -> str | None:
    return next((name for name in preference if name in arms), None)


def _arm_order(arms: Sequence[str], baseline: str | None) -> list[str]:
    return sorted(set(arms), key=lambda a: (a != baseline, a))


def curve_chart(key: str, jobs: Sequence[Job], arms: Sequence[str]) -> render.LineChart:
    """One series per arm: mean over its seeds at each step, band = min..max over seeds (when > 1 seed)."""
    series = []
    for arm in arms:
        runs = [j.curves[key] for j in jobs if j.arm == arm and key in j.curves]
        if not runs:
            continue
        by_step: dict[float, list[float]] = {}
        for steps, values in runs:
            for s, v in zip(steps, values, strict=True):
                by_step.setdefault(s, []).append(v)
        steps = sorted(by_step)
        means = [statistics.fmean(by_step[s]) for s in steps]
        band = len(runs) > 1
        series.append(render.Series(
            name=f"{arm} ({len(runs)} seed{'s' if len(runs) > 1 else ''})", x=steps, y=means,
            lo=[min(by_step[s]) for s in steps] if band else None,
            hi=[max(by_step[s]) for s in steps] if band else None))
    values = [v for s in series for v in s.y]
    wide = bool(values) and min(values) > 0 and max(values) / min(values) > 10  # a log axis only helps then
    return render.LineChart(title=key, series=series, x_label="step", y_label=key,
                            log_y=wide and ("loss" in key or "ppl" in key),
                            note="mean over seeds; shaded band: min..max over seeds")


@dataclass
class MetricRow:
    metric: str
    cells: dict[str, tuple[float, float, int]]  # arm -> (mean, std, n seeds)
    gaps: dict[str, float]  # arm -> relative gap to the baseline (fraction)


def metric_rows(jobs: Sequence[Job], arms: Sequence[str], baseline: str | None) -> list[MetricRow]:
    keys = sorted({k for j in jobs for k in j.metrics if "/" in k})
    monitors = [j.monitor for j in jobs if j.monitor]
    if monitors and monitors[0] in keys:
        keys.remove(monitors[0])
        keys.insert(0, monitors[0])
    rows = []
    for key in keys:
        cells = {}
        for arm in arms:
            values = [j.metrics[key] for j in jobs if j.arm == arm and key in j.metrics]
            if values:
                cells[arm] = (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0,
                              len(values))
        gaps = {}
        if baseline in cells and cells[baseline][0] != 0:
            base = cells[baseline][0]
            gaps = {arm: (mean - base) / abs(base) for arm, (mean, _, _) in cells.items()}
        rows.append(MetricRow(metric=key, cells=cells, gaps=gaps))
    return rows


def kurtosis_chart(jobs: Sequence[Job], arms: Sequence[str]) -> render.Scatter | None:
    x, y, labels, groups = [], [], [], []
    for arm in arms:
        job = _kurtosis_job(jobs, arm)
        if job is None:
            continue
        for row in job.kurtosis["layers"]:
            x.append(row["kurtosis"])
            y.append(row["snr_db"])
            labels.append(f"{arm}: {row['layer']}")
            groups.append(arm)
    if not x:
        return None
    return render.Scatter(title="per-layer weight kurtosis vs measured weight quantization error", x=x, y=y,
                          labels=labels, groups=groups, x_label="per-tensor excess kurtosis", y_label="weight SNR (dB)",
                          note="each point a layer at the end of training (first seed of each arm)")


def _kurtosis_job(jobs: Sequence[Job], arm: str) -> Job | None:
    with_study = sorted((j for j in jobs if j.arm == arm and j.kurtosis), key=lambda j: j.seed)
    return with_study[0] if with_study else None


# ------------------------------------------------------------------------------------------- PTQ vs QAT table
STUDY_STAGES = {"baseline": "baseline", "ptq": "PTQ of the baseline (no training)",
                "qat": "QAT fine-tune from the baseline", "packed": "QAT, packed 4-bit export (mode=eval)"}


@dataclass
class StudyTable:
    """The stages of a ``mode=ptq_vs_qat`` study: one row per stage job, test metrics with gaps to the baseline."""

    metrics: list[str]
    rows: list[tuple[Job, dict[str, tuple[float, float | None]]]]  # job, metric -> (value, relative gap)
    recovered: float | None  # share of the PTQ gap on the first metric that QAT closes


def ptq_vs_qat_table(jobs: Sequence[Job]) -> StudyTable | None:
    """Rows of the jobs tagged with a study stage (``run.json`` key ``stage``); None if there are none.

    Metrics: the ``test/`` keys every stage logged, the test counterpart of the monitor first. Gap:
    (stage - baseline) / |baseline|. Recovered: (QAT - PTQ) / (baseline - PTQ) on the first metric.
    """
    staged = sorted((j for j in jobs if j.stage in STUDY_STAGES),
                    key=lambda j: (list(STUDY_STAGES).index(j.stage), j.seed))
    if not staged:
        return None
    common = set.intersection(*(set(k for k in j.metrics if k.startswith("test/")) for j in staged))
    monitors = [j.monitor.replace("val/", "test/") for j in staged if j.monitor]
    first = [monitors[0]] if monitors and monitors[0] in common else []
    metrics = first + sorted(common - set(first))
    base = next((j for j in staged if j.stage == "baseline"), None)
    rows = []
    for job in staged:
        cells = {}
        for key in metrics:
            ref = base.metrics[key] if base else None
            gap = (job.metrics[key] - ref) / abs(ref) if ref else None
            cells[key] = (job.metrics[key], gap)
        rows.append((job, cells))
    by_stage = {job.stage: cells for job, cells in rows}
    recovered = None
    if metrics and {"baseline", "ptq", "qat"} <= set(by_stage):
        b, p, q = (by_stage[s][metrics[0]][0] for s in ("baseline", "ptq", "qat"))
        recovered = (q - p) / (b - p) if b != p else None
    return StudyTable(metrics=metrics, rows=rows, recovered=recovered)


def _gap_text(gap: float | None) -> str:
    return "" if gap is None else f" ({100 * gap:+.2f}%)"


def ptq_vs_qat_markdown(jobs: Sequence[Job]) -> str:
    """The study table as Markdown (what ``mode=ptq_vs_qat`` prints and writes to ``ptq_vs_qat.md``)."""
    table = ptq_vs_qat_table(jobs)
    if table is None:
        return "no study stages (run.json key 'stage') in these jobs"
    lines = ["| stage | arm | " + " | ".join(table.metrics) + " |", "|---|---|" + "---|" * len(table.metrics)]
    for job, cells in table.rows:
        values = " | ".join(f"{cells[k][0]:.4f}{_gap_text(cells[k][1]) if job.stage != 'baseline' else ''}"
                            for k in table.metrics)
        lines.append(f"| {STUDY_STAGES[job.stage]} | {job.arm} | {values} |")
    if table.recovered is not None:
        lines.append(f"\nQAT recovers {100 * table.recovered:.1f}% of the PTQ gap on {table.metrics[0]} "
                     "(gap in parentheses: (stage - baseline) / |baseline|).")
    return "\n".join(lines)


def _ptq_vs_qat_html(jobs: Sequence[Job]) -> str:
    table = ptq_vs_qat_table(jobs)
    if table is None:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in table.metrics)
    body = []
    for job, cells in table.rows:
        tds = []
        for key in table.metrics:
            value, gap = cells[key]
            worse = gap is not None and gap != 0 and ((gap > 0) == _lower_is_better(key))
            cls = "" if job.stage == "baseline" else ("bad" if worse else "good")
            tds.append(f"<td class='{cls}'>{_fmt(value)}{'' if job.stage == 'baseline' else _gap_text(gap)}</td>")
        body.append(f"<tr><td class='l'>{html.escape(STUDY_STAGES[job.stage])}</td><td class='l'>"
                    f"{html.escape(job.arm)}</td>{''.join(tds)}</tr>")
    note = (f"QAT recovers {100 * table.recovered:.1f}% of the PTQ gap on {html.escape(table.metrics[0])}. "
            if table.recovered is not None else "")
    return (f"<h3>PTQ vs QAT</h3><table class='study'><tr><th class='l'>stage</th><th class='l'>arm</th>{head}</tr>"
            + "\n".join(body) + f"</table><p class='muted'>{note}Gap in parentheses: (stage - baseline) / "
            "|baseline|, red where the stage is worse.</p>")


# --------------------------------------------------------------------------------------------------------- HTML
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0;text-align:center}
td.l,th.l{text-align:left}
td.good{color:#17692e}td.bad{color:#a4161a}td.keep{font-weight:bold;color:#a4161a}
.figs{display:flex;flex-wrap:wrap;gap:16px}.fig{border:1px solid #ddd;padding:6px;max-width:520px}
.fig img{width:100%}
details{margin-top:4px}.muted{color:#666;font-size:12px}
"""


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("loss", "ppl", "err"))


def _metrics_table(rows: Sequence[MetricRow], arms: Sequence[str], baseline: str | None) -> str:
    head = "".join(f"<th>{html.escape(a)}{' (baseline)' if a == baseline else ''}</th>" for a in arms)
    gap_head = "".join(f"<th>gap {html.escape(a)}</th>" for a in arms if a != baseline) if baseline else ""
    body = []
    for row in rows:
        cells = []
        for arm in arms:
            if arm in row.cells:
                mean, std, n = row.cells[arm]
                cells.append(f"<td>{_fmt(mean)}{f' &plusmn; {_fmt(std, 2)}' if n > 1 else ''}"
                             f" <span class='muted'>n={n}</span></td>")
            else:
                cells.append("<td>n/a</td>")
        gaps = []
        if baseline:
            for arm in arms:
                if arm == baseline:
                    continue
                gap = row.gaps.get(arm)
                worse = gap is not None and ((gap > 0) == _lower_is_better(row.metric)) and gap != 0
                cls = "bad" if worse else "good"
                gaps.append(f"<td class='{cls}'>{'n/a' if gap is None else f'{100 * gap:+.2f}%'}</td>")
        body.append(f"<tr><td class='l'>{html.escape(row.metric)}</td>{''.join(cells)}{''.join(gaps)}</tr>")
    return (f"<table class='metrics'><tr><th class='l'>metric</th>{head}{gap_head}</tr>\n" + "\n".join(body)
            + "</table>")


def _kurtosis_table(jobs: Sequence[Job], arms: Sequence[str]) -> str:
    studies = {arm: _kurtosis_job(jobs, arm) for arm in arms}
    studies = {arm: job for arm, job in studies.items() if job is not None}
    if not studies:
        return "<p class='muted'>No kurtosis study in these jobs (analysis off).</p>"
    layers: dict[str, str] = {}
    for job in studies.values():
        for row in job.kurtosis["layers"]:
            layers.setdefault(row["layer"], row["module_type"])
    columns = ("kurtosis", "kurtosis_block_p99", "snr_db", "robust_z")
    head = "".join(f"<th colspan='{len(columns) + 1}'>{html.escape(arm)}</th>" for arm in studies)
    sub = "".join("".join(f"<th>{c}</th>" for c in (*columns, "keep")) for _ in studies)
    body = []
    for layer, module_type in layers.items():
        cells = []
        for job in studies.values():
            row = next((r for r in job.kurtosis["layers"] if r["layer"] == layer), None)
            if row is None:
                cells.append(f"<td colspan='{len(columns) + 1}'>n/a</td>")
                continue
            cells.extend(f"<td>{_fmt(row[c], 3)}</td>" for c in columns)
            keep = row["keep_high_precision"]
            cells.append(f"<td class='{'keep' if keep else ''}' title='{html.escape(row['reason'])}'>"
                         f"{'keep' if keep else ''}</td>")
        body.append(f"<tr><td class='l'>{html.escape(layer or 'model')}</td><td class='l'>{module_type}</td>"
                    f"{''.join(cells)}</tr>")
    rho = "; ".join(f"{arm}: " + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in job.kurtosis["spearman"].items())
                    for arm, job in studies.items())
    return (f"<table class='kurtosis'><tr><th class='l' rowspan='2'>layer</th><th class='l' rowspan='2'>type</th>"
            f"{head}</tr><tr>{sub}</tr>\n" + "\n".join(body) + "</table>"
            f"<p class='muted'>Excess (Fisher) kurtosis of the final weights, biased moments; block = 16 elements "
            f"along the reduction dim; SNR of the weight in the arm's own format (NVFP4 16x16 round-to-nearest for "
            f"layers in high precision); keep = robust z above the threshold within the module type. Spearman rho "
            f"vs the weight's relative MSE: {rho}</p>")


def _figure_block(figure: render.Figure, folder: Path, stem: str, element_id: str) -> str:
    png = render.save(figure, folder / stem)[0]
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f"<div class='fig'><img alt='{html.escape(figure.title)}' src='data:image/png;base64,{data}'>"
            f"<details><summary>interactive</summary>{render.fragment(figure, element_id)}</details></div>")


def result_jobs(paths: Sequence[Path]) -> list[Job]:
    """The jobs under ``paths`` that have results (final metrics or logged curves); a ``mode=analyze`` job also
    writes a run.json, without metrics, and is skipped."""
    jobs = []
    for folder in find_job_dirs(paths):
        job = load_job(folder)
        if job.metrics or job.curves:
            jobs.append(job)
        else:
            log.info("report: skipping %s (no metrics: not a training or evaluation run)", folder)
    if not jobs:
        raise DataError(f"report: no job with metrics under {', '.join(map(str, paths))} (only mode=analyze jobs?)")
    return jobs


def build_report(paths: Sequence[Path], out_dir: Path, baselines: Sequence[str] = DEFAULT_BASELINES) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/figures/*.{png,html,json}``; return the page."""
    jobs = result_jobs(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = out_dir / "figures"
    sections = []
    pairs = sorted({(j.model, j.data) for j in jobs})
    for index, (model, data) in enumerate(pairs):
        group = [j for j in jobs if (j.model, j.data) == (model, data)]
        baseline = pick_baseline([j.arm for j in group], baselines)
        arms = _arm_order([j.arm for j in group], baseline)
        prefix = f"{model}_{data}"
        # test/* metrics are one point each: they are in the table, not drawn as curves.
        keys = sorted({k for j in group for k in j.curves if not k.startswith("test/")})
        curves = "".join(_figure_block(curve_chart(key, group, arms), figures,
                                       f"{prefix}_curve_{key.replace('/', '_')}", f"c{index}_{n}")
                         for n, key in enumerate(keys))
        scatter = kurtosis_chart(group, arms)
        scatter_html = _figure_block(scatter, figures, f"{prefix}_kurtosis_vs_error", f"k{index}") if scatter else ""
        job_list = "".join(f"<li>{html.escape(j.run_name)} <span class='muted'>({html.escape(j.arm)}, seed "
                           f"{j.seed}, {html.escape(j.precision)}) {html.escape(str(j.folder))}</span></li>"
                           for j in sorted(group, key=lambda j: (j.arm, j.seed)))
        base_text = (f"baseline: <b>{html.escape(baseline)}</b>" if baseline else
                     f"no baseline arm ({', '.join(baselines)}) in these jobs: gaps omitted")
        sections.append(
            f"<h2>model={html.escape(model)} data={html.escape(data)}</h2><p>{base_text}; arms: "
            f"{', '.join(html.escape(a) for a in arms)}</p>"
            f"{_ptq_vs_qat_html(group)}"
            f"<h3>Final metrics</h3>{_metrics_table(metric_rows(group, arms, baseline), arms, baseline)}"
            f"<p class='muted'>mean &plusmn; std over seeds; gap = (arm - baseline) / |baseline|, red where the arm "
            f"is worse</p><h3>Training and validation curves</h3><div class='figs'>{curves}</div>"
            f"<h3>Per-layer kurtosis and quantization error</h3><div class='figs'>{scatter_html}</div>"
            f"{_kurtosis_table(group, arms)}<details><summary>jobs ({len(group)})</summary><ul>{job_list}</ul>"
            f"</details>")
    page = out_dir / REPORT_FILE
    page.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fp4lab comparison report</title>"
        f"<style>{CSS}</style><script>{render.SCRIPT}</script></head><body>\n"
        f"<h1>fp4lab comparison report</h1><p class='muted'>{len(jobs)} jobs from "
        f"{html.escape(', '.join(map(str, paths)))}; generated {datetime.now().isoformat(timespec='seconds')}</p>\n"
        + "\n".join(sections) + "\n</body></html>\n")
    return page


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dirs or job dirs (folders holding run.json)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output folder (default: <first path>/report)")
    parser.add_argument("--baseline", action="append", default=None,
                        help=f"baseline arm preference, repeatable (default: {' '.join(DEFAULT_BASELINES)})")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0] / "report"
    try:
        page = build_report(args.paths, out, args.baseline or DEFAULT_BASELINES)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[fp4lab] report: {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
