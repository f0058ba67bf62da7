"""The study experiments (conf/experiment/{unet_coco,resnet_cifar10,llm_text,llm_tinystories}) and their driver.

Why: the study's configs only run at full size on a GPU, so without these tests they would rot unnoticed. Each
experiment composes with every arm, trains at toy scale on the real data set through ``trainers.app.run`` (the
NVFP4 arm, the one with the most moving parts), and ``bench.study``'s bookkeeping (flagged layers, gaps, medians,
the size-capped bundle) is checked against hand-computed values. The slow test runs the driver itself: three real
``main.py -m`` processes (training arms, PTQ, kurtosis-flagged layers kept in BF16) at toy scale.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import quant
from bench import study, study_tables
from tests.conftest import CONF_DIR, REPO, SHARED_DATA, compose_config
from trainers.app import run, validate

DATA_FOR = {"unet_coco": "coco2017_tiny", "resnet_cifar10": "cifar10_jpeg", "llm_text": "tinyshakespeare",
            "llm_tinystories": "tinystories_sample"}
TRAINING_ARMS = ["bf16", "fp16", "nvfp4", "nvfp4_ste", "nvfp4_fwd"]
needs_data = {name: pytest.mark.skipif(not (SHARED_DATA / folder).is_dir(), reason=f"../shared/data/{folder} absent")
              for name, folder in DATA_FOR.items()}


def _compose(experiment: str, tmp_path, *extra: str):
    return compose_config([f"experiment={experiment}", f"paths.data_root={SHARED_DATA}", *extra], tmp_path)


def test_driver_knows_every_study_experiment():
    on_disk = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert set(study.EXPERIMENTS) <= on_disk
    assert set(study.TOY_OVERRIDES) == set(study.EXPERIMENTS) == set(DATA_FOR)


@pytest.mark.parametrize("experiment", study.EXPERIMENTS)
def test_sweep_is_three_seeds_of_the_five_training_arms_named_by_run(experiment):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.seed == "0,1,2"
    assert cfg.hydra.sweeper.params.quant.split(",") == TRAINING_ARMS
    # +arm=nvfp4_ptq finds the BF16 checkpoints by run name
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${run_name}"
    assert cfg.logger.wandb and not cfg.logger.log_checkpoints and cfg.analysis.enabled


@pytest.mark.parametrize("experiment", study.EXPERIMENTS)
def test_a_step_budget_is_not_capped_by_the_default_epoch_count(experiment, tmp_path):
    # llm_text once trained 90 of its 300 steps: the trainer default max_epochs=3 ended the run first
    trainer = validate(_compose(experiment, tmp_path, "quant=bf16")).trainer
    assert trainer.max_steps == -1 or trainer.max_epochs in (None, -1)


@pytest.mark.parametrize("experiment", study.EXPERIMENTS)
def test_every_arm_composes_and_reads_its_data_set_under_data_root(experiment, tmp_path):
    for arm in TRAINING_ARMS:
        typed = validate(_compose(experiment, tmp_path, f"quant={arm}"))
        assert typed.quant.name == arm and typed.mode == "train" and typed.experiment_name == experiment
        source = typed.data.path if typed.data.name == "text" else typed.data.root
        assert source.startswith(str(SHARED_DATA / DATA_FOR[experiment]))
    ptq = validate(_compose(experiment, tmp_path, "+arm=nvfp4_ptq"))
    model = ptq.model.name
    assert (ptq.mode, ptq.quant.format, ptq.quant.backward, ptq.run_name) == ("ptq", "nvfp4", "full",
                                                                             f"{model}-nvfp4-ptq-seed0")
    assert ptq.ckpt_path.endswith(f"/{model}-bf16-seed0/checkpoints/best.ckpt")
    keep = validate(_compose(experiment, tmp_path, "+arm=nvfp4_keep_bf16"))
    assert (keep.quant.name, keep.quant.format, keep.quant.exclude_by_kurtosis) == ("nvfp4_keep_bf16", "nvfp4",
                                                                                    keep.analysis.kurtosis_z_threshold)
    assert keep.quant.kurtosis_ckpt.endswith(f"/{model}-bf16-seed0/checkpoints/last.ckpt")


# llm_tinystories is llm_text on another file (its path is checked above): slow only.
@pytest.mark.parametrize("experiment", [
    pytest.param(name, marks=[needs_data[name], *([pytest.mark.slow] if name == "llm_tinystories" else [])])
    for name in study.EXPERIMENTS])
def test_experiment_trains_nvfp4_at_toy_scale_on_real_data(experiment, tmp_path):
    # no telemetry passes (the driver test has them): the kurtosis study at the end is what the study needs
    overrides = [*study.TOY_COMMON, *study.TOY_OVERRIDES[experiment], "quant=nvfp4", "logger=csv", "trainer=cpu",
                 "analysis.weights=false", "analysis.gradients=false"]
    run(_compose(experiment, tmp_path, *overrides))
    out = tmp_path / "out"
    summary = json.loads((out / "run.json").read_text())
    assert summary["quant"] == "nvfp4" and summary["quantized_modules"] > 0
    headline = summary["monitor"].replace("val/", "test/")
    assert math.isfinite(summary["metrics"][headline])
    (kurtosis,) = (out / "plots" / "kurtosis").glob("*/kurtosis.json")
    rows = json.loads(kurtosis.read_text())["layers"]
    assert sum(r["quantized"] for r in rows) == summary["quantized_modules"]


# ------------------------------------------------------------------------------------------- driver bookkeeping
def _job(folder, arm, seed, metrics, wall, mode="train", kurtosis=None):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_name": folder.name, "quant": arm.split("-")[0], "arm": arm,
                                                 "seed": seed, "mode": mode, "model": "m", "data": "d",
                                                 "monitor": "val/acc1", "metrics": metrics, "wall_seconds": wall}))
    if kurtosis is not None:
        (folder / "plots" / "kurtosis" / folder.name).mkdir(parents=True)
        (folder / "plots" / "kurtosis" / folder.name / "kurtosis.json").write_text(json.dumps({"layers": kurtosis}))


def _row(layer, keep=False, quantized=False):
    return {"layer": layer, "keep_high_precision": keep, "quantized": quantized, "reason": f"{layer} is heavy"}


def test_flagged_layers_are_the_union_over_bf16_seeds_restricted_to_what_nvfp4_quantizes(tmp_path):
    _job(tmp_path / "m-bf16-seed0", "bf16", 0, {}, 1.0, kurtosis=[_row("stem", keep=True), _row("b1", keep=True),
                                                                   _row("b2")])
    _job(tmp_path / "m-bf16-seed1", "bf16", 1, {}, 1.0, kurtosis=[_row("b2", keep=True), _row("b1"), _row("stem")])
    _job(tmp_path / "m-nvfp4-seed0", "nvfp4", 0, {}, 1.0,
         kurtosis=[_row("stem"), _row("b1", quantized=True), _row("b2", quantized=True)])
    flags = study.flagged_layers(tmp_path, study.read_jobs(tmp_path))
    assert flags.per_seed == {0: ["stem", "b1"], 1: ["b2"]}
    assert flags.union == ["stem", "b1", "b2"]
    assert flags.moved == ["b1", "b2"] and flags.already_high_precision == ["stem"]
    assert flags.reasons["b2"] == "b2 is heavy"


def test_kept_layers_are_read_from_a_real_quantization_report():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                torch.nn.Linear(32, 16))
    keeps = (("2", "kurtosis study on the weights of x.ckpt flags it (z 9.1; threshold z > 3.5)"),)
    policy = quant.Policy(format="nvfp4", exclude=("0",), keep_high_precision=keeps)
    table = quant.apply(model, policy).table()
    assert study.kept_layers(table) == ["2"]  # "0" is excluded by pattern, "3" quantized: neither is reported kept


def test_summary_gaps_and_wall_time_ratios_against_hand_computed_values(tmp_path):
    for seed, (acc, wall) in enumerate([(0.80, 10.0), (0.84, 30.0), (0.82, 12.0)]):
        _job(tmp_path / f"m-bf16-seed{seed}", "bf16", seed, {"test/acc1": acc, "train/loss": 1.0}, wall)
    for seed, (acc, wall) in enumerate([(0.78, 25.0), (0.76, 26.0), (0.77, 90.0)]):
        _job(tmp_path / f"m-nvfp4-seed{seed}", "nvfp4", seed, {"test/acc1": acc}, wall)
    _job(tmp_path / "m-nvfp4-ptq-seed0", "nvfp4-ptq", 0, {"test/acc1": 0.41}, 3.0, mode="ptq")
    arms, headline = study.summarize_arms(study.read_jobs(tmp_path))
    assert headline == "test/acc1" and set(arms) == {"bf16", "nvfp4", "nvfp4-ptq"}
    base, nvfp4 = arms["bf16"]["metrics"]["test/acc1"], arms["nvfp4"]["metrics"]["test/acc1"]
    assert base["mean"] == pytest.approx(0.82) and base["std"] == pytest.approx(math.sqrt(0.0008 / 3))
    assert "train/loss" not in arms["bf16"]["metrics"]
    assert nvfp4["gap_to_bf16"] == pytest.approx((0.77 - 0.82) / 0.82)
    assert arms["bf16"]["wall_seconds_median"] == 12.0 and arms["nvfp4"]["wall_seconds_median"] == 26.0
    assert arms["nvfp4"]["wall_relative_to_bf16"] == pytest.approx(26.0 / 12.0)
    line = study.wall_line("exp", "GPU", arms)
    assert "bf16 1.00x (12.0 s/job)" in line and "nvfp4 2.17x" in line and "nvfp4-ptq 0.25x (eval only)" in line


def test_results_tables_render_the_summary_numbers(tmp_path):
    for seed, acc in enumerate([0.80, 0.84]):
        _job(tmp_path / f"m-bf16-seed{seed}", "bf16", seed, {"test/acc1": acc, "test/loss": 0.5}, 10.0)
        _job(tmp_path / f"m-nvfp4-seed{seed}", "nvfp4", seed, {"test/acc1": acc - 0.04, "test/loss": 0.6}, 25.0)
    arms, headline = study.summarize_arms(study.read_jobs(tmp_path))
    summary = {"experiment": "exp", "scale": "study", "seeds": [0, 1], "headline_metric": headline, "arms": arms,
               "environment": {"gpu": "NVIDIA H100 80GB HBM3, 580.1, 81559 MiB", "date": "2026-11-25", "torch": "2.11"},
               "wall_seconds": 300.0, "phases": [{"name": "keep", "skipped": "no layer flagged", "timed_out": False,
                                                 "returncode": None}],
               "kurtosis_flags": {"union": ["b1"], "moved_to_bf16_in_keep_arm": [], "kept_per_seed": {"0": []}},
               "failed_jobs": [],
               "wall_line": study.wall_line("exp", "H100", arms)}
    text = study_tables.experiment_markdown(summary)
    assert "| arm | test/acc1 | test/loss | seeds | wall time / job vs BF16 |" in text
    assert "| BF16 (baseline) | 0.8200 ± 0.0200 | 0.5000 ± 0.0000 | 2 | 1.00x |" in text
    assert "| NVFP4 QAT, backward=full | 0.7800 ± 0.0200 (-4.88%) | 0.6000 ± 0.0000 (+20.00%) | 2 | 2.50x |" in text
    assert "`b1` (already BF16 in the nvfp4 arm)" in text and "phase keep: no layer flagged" in text
    assert "Kept in BF16 by the keep arm (its quant_report.txt): seed 0: none" in text
    # paired by seed: 0.76 vs 0.80 and 0.80 vs 0.84, i.e. -5.00% and -4.76%, in float64 by hand
    gaps = [(0.76 - 0.80) / 0.80, (0.80 - 0.84) / 0.84]
    mean, std = sum(gaps) / 2, abs(gaps[0] - gaps[1]) / 2
    assert (f"| NVFP4 QAT, backward=full | BF16 (baseline) | {100 * gaps[0]:+.2f}%, {100 * gaps[1]:+.2f}% | "
            f"{100 * mean:+.2f}% ± {100 * std:.2f}% | 0 of 2 |") in text
    assert "test/acc1 (higher is better)" in text


def test_paired_rows_compare_the_keep_arm_with_nvfp4_on_the_seeds_both_finished():
    def arm(seeds, values):
        return {"seeds": seeds, "mode": "train", "metrics": {"test/loss": {"values": values}}}
    summary = {"headline_metric": "test/loss",
               "arms": {"bf16": arm([0, 1, 2], [2.0, 2.0, 2.0]), "nvfp4": arm([0, 1, 2], [2.2, 2.1, 1.9]),
                        "nvfp4_keep_bf16": arm([1, 2], [2.0, 2.0])}}
    rows = study_tables.paired_rows(summary)
    assert "test/loss (lower is better)" in rows[0]
    assert "| NVFP4 QAT, backward=full | BF16 (baseline) | +10.00%, +5.00%, -5.00% | +3.33% ± 6.24% | 1 of 3 |" in rows
    keep = "| NVFP4 QAT (full), flagged layers BF16 |"
    assert f"{keep} BF16 (baseline) | +0.00%, +0.00% | +0.00% ± 0.00% | 0 of 2 |" in rows
    # seeds 1 and 2 only: 2.0 vs 2.1 and 2.0 vs 1.9
    assert f"{keep} NVFP4 QAT, backward=full | -4.76%, +5.26% | +0.25% ± 5.01% | 1 of 2 |" in rows


def test_bundle_leaves_out_checkpoints_and_fills_the_cap_tier_by_tier(tmp_path):
    sweep = tmp_path / "sweep"
    sizes = {"m-bf16-seed0/run.json": 10, "m-bf16-seed0/checkpoints/best.ckpt": 1000, "report/report.html": 10,
             "m-bf16-seed0/plots/heatmaps/a.png": 30_000, "m-bf16-seed1/plots/heatmaps/b.png": 30_000,
             "m-bf16-seed0/wandb/run-1/files/media/images/a.png": 20_000, "m-bf16-seed0/wandb/run-1/run-1.wandb": 10}
    for rel, size in sizes.items():
        (sweep / rel).parent.mkdir(parents=True, exist_ok=True)
        (sweep / rel).write_bytes(os.urandom(size))  # random bytes: gzip cannot shrink them
    assert [study.bundle_tier(Path(rel)) for rel in sizes] == [
        "core", None, "core", "heatmaps_seed0", "heatmaps_other_seeds", "wandb_media_seed0", "core"]
    target = tmp_path / "out.tar.gz"
    full = study.bundle(sweep, target, cap_bytes=10**6)
    with tarfile.open(target) as archive:
        names = archive.getnames()
    assert full["left_out"] == ["checkpoints"] and not full["over_cap"] and len(names) == len(sizes) - 1
    assert not any(n.endswith(".ckpt") for n in names)
    seed0 = study.bundle(sweep, target, cap_bytes=60_000)
    assert seed0["tiers"] == ["core", "heatmaps_seed0", "wandb_media_seed0"]
    assert seed0["left_out"] == ["checkpoints", "heatmaps_other_seeds"]
    bare = study.bundle(sweep, target, cap_bytes=5_000)
    assert bare["tiers"] == ["core"] and not bare["over_cap"]
    with tarfile.open(target) as archive:
        assert sorted(archive.getnames()) == ["sweep/m-bf16-seed0/run.json",
                                              "sweep/m-bf16-seed0/wandb/run-1/run-1.wandb", "sweep/report/report.html"]


# ----------------------------------------------------------------------------------------------- the driver, live
@pytest.mark.slow
@needs_data["llm_text"]
def test_study_driver_runs_the_three_phases_into_one_sweep_and_bundles_it(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bench.study", "llm_text", "--toy", "--seeds", "0", "--trainer", "cpu",
         "--data-root", str(SHARED_DATA), "--sweep-dir", str(sweep), "--out", str(out),
         "--set", "analysis.kurtosis_z_threshold=0.5", "--set", f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "llm_text.json").read_text())
    assert [p["name"] for p in summary["phases"] if p["returncode"] == 0] == ["train", "ptq", "keep"]
    arms = summary["arms"]
    assert list(arms) == ["bf16", "fp16", "nvfp4", "nvfp4_ste", "nvfp4_fwd", "nvfp4_keep_bf16", "nvfp4-ptq"]
    assert summary["headline_metric"] == "test/loss" and "test/ppl" in arms["nvfp4"]["metrics"]
    assert arms["bf16"]["wall_relative_to_bf16"] == 1.0 and arms["nvfp4-ptq"]["mode"] == "ptq"
    flags = summary["kurtosis_flags"]
    # the keep arm's policy studied BF16's final weights (last.ckpt): the layers it kept are exactly the ones the
    # BF16 job's own end-of-training study flagged among those nvfp4 quantizes
    assert flags["moved_to_bf16_in_keep_arm"]
    assert flags["kept_per_seed"] == {"0": flags["moved_to_bf16_in_keep_arm"]}
    ptq_run = json.loads((sweep / "llm-nvfp4-ptq-seed0" / "run.json").read_text())
    assert ptq_run["checkpoint"] == str(sweep / "llm-bf16-seed0" / "checkpoints" / "best.ckpt")
    assert "wall time per arm relative to bf16" in result.stdout
    with tarfile.open(out / "llm_text.tar.gz") as archive:
        names = archive.getnames()
    assert "sweep/report/report.html" in names and "sweep/study_summary.json" in names
    assert [Path(f).name for f in summary["key_figures"]] == [
        "llm_text_curve_val_loss.png", "llm_text_curve_train_loss.png", "llm_text_kurtosis_vs_error.png"]
    assert {f"sweep/{f}" for f in summary["key_figures"]} <= set(names)
    assert not any(name.endswith(".ckpt") for name in names)
    assert any("/wandb/offline-run-" in name for name in names)
    tables = subprocess.run([sys.executable, "-m", "bench.study_tables", str(out / "llm_text.json")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert tables.returncode == 0 and "| NVFP4 PTQ of the BF16 model |" in tables.stdout
