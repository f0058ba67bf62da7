"""The ptq, export, eval and ptq_vs_qat modes through the real app on a tiny UNet (``tests/tiny.py``).

What must hold: PTQ evaluates a trained baseline under the quant policy without training and logs to the study's
W&B group with job_type "ptq"; export writes one safetensors file whose quantized weights cost about 4.5 bits each
(NVFP4); eval rebuilds the model from the file alone and, with the other tensors stored in FP32, reproduces the
metrics of the fake-quantized model exactly; ptq_vs_qat chains the stages and writes the table and the report.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quant.export

from conf.errors import ConfigError, UserError
from quant import inference
from quant.errors import QuantError
from tests.conftest import REPO, compose_config
from tests.tiny import overrides
from trainers.app import run, validate
from trainers.job import Job
from trainers.modes import MODES
from trainers.modes.ptq import load_weights


def _summary(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, shared_cache) -> Path:
    """A tiny UNet trained 2 steps in BF16; returns its last checkpoint."""
    tmp = tmp_path_factory.mktemp("baseline")
    run(compose_config([*overrides("unet"), "quant=bf16"], tmp, shared_cache))
    return tmp / "out" / "checkpoints" / "last.ckpt"


def _wandb_run_record(job_dir: Path) -> dict:
    (run_dir,) = (job_dir / "wandb").glob("offline-run-*")
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                            capture_output=True, text=True, check=True, timeout=60)
    return next(json.loads(line)["run"] for line in result.stdout.splitlines() if '"type":"run"' in line)


def test_ptq_export_eval_chain(cfg_factory, baseline, tmp_path):
    ptq_cfg = cfg_factory(*overrides("unet", logger="wandb"), "quant=nvfp4", "mode=ptq", f"ckpt_path={baseline}",
                          "experiment_name=unet_study", f"paths.output_dir={tmp_path / 'ptq'}")
    run(ptq_cfg)
    ptq = _summary(tmp_path / "ptq")
    assert (ptq["mode"], ptq["arm"], ptq["quant"]) == ("ptq", "nvfp4-ptq", "nvfp4")
    assert {"val/miou", "test/miou", "test/dice"} <= set(ptq["metrics"]) and ptq["quantized_modules"] > 0
    assert not (tmp_path / "ptq" / "checkpoints").exists()  # nothing was trained
    record = _wandb_run_record(tmp_path / "ptq")
    assert (record["job_type"], record["run_group"]) == ("ptq", "unet_study")

    for dtype in ("float32", "bfloat16"):
        run(cfg_factory(*overrides("unet"), "quant=nvfp4", "mode=export", f"ckpt_path={baseline}",
                        f"export.other_dtype={dtype}", f"paths.output_dir={tmp_path / f'export_{dtype}'}"))
        exported = _summary(tmp_path / f"export_{dtype}")["export"]
        assert 4.5 <= exported["bits_per_weight"] < 4.52 and exported["file_vs_bf16"] < 0.6
        path = tmp_path / f"export_{dtype}" / "model.safetensors"
        assert exported["file_bytes"] == path.stat().st_size
        assert load_file(path)["inc.conv.weight.codes"].dtype.itemsize == 1
        # The command line of eval names nothing but the file: model, data and policy come from its header.
        run(cfg_factory("mode=eval", f"ckpt_path={path}", "logger=csv", "trainer.limit_val_batches=1",
                        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
                        f"paths.output_dir={tmp_path / f'eval_{dtype}'}"))
        evaluated = _summary(tmp_path / f"eval_{dtype}")
        assert (evaluated["arm"], evaluated["model"], evaluated["quant"]) == ("nvfp4-packed", "unet", "nvfp4")
        memory = evaluated["weight_memory"]
        assert 4.5 <= memory["bits_per_weight"] < 4.52 and memory["packed_bytes"] < 0.3 * memory["bf16_bytes"]
        if dtype == "float32":  # same weights, same policy, same compute: identical metrics
            assert evaluated["metrics"] == ptq["metrics"]
        else:
            assert evaluated["metrics"]["test/miou"] == pytest.approx(ptq["metrics"]["test/miou"], abs=0.02)


def test_quant_export_load_rebuilds_the_packed_model_from_the_file_alone(cfg_factory, baseline, tmp_path):
    cfg = cfg_factory(*overrides("unet"), "quant=nvfp4", "mode=export", f"ckpt_path={baseline}",
                      "export.other_dtype=float32", f"paths.output_dir={tmp_path / 'export'}")
    run(cfg)
    path = tmp_path / "export" / "model.safetensors"
    rebuilt = quant.export.load(path)  # architecture from the file's config, through the builder fp4lab registered
    assert set(inference.packed_modules(rebuilt)) and not rebuilt.training
    # the reference: the same checkpoint built by the app and fake-quantized with the same policy (FP32 elsewhere)
    job = _job(cfg)
    datamodule = job.build_datamodule()
    fake_quantized = job.build_model(datamodule.info)
    load_weights(fake_quantized, baseline)
    job.apply_policy(fake_quantized)
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(image)["semantic"], fake_quantized.eval()(image)["semantic"])


def test_quant_export_load_names_what_it_cannot_rebuild(cfg_factory, baseline, tmp_path, monkeypatch):
    run(cfg_factory(*overrides("unet"), "quant=nvfp4", "mode=export", f"ckpt_path={baseline}",
                    f"paths.output_dir={tmp_path / 'export'}"))
    path = tmp_path / "export" / "model.safetensors"
    monkeypatch.setattr(quant.export, "ARCHITECTURES", {})
    with pytest.raises(QuantError, match=r"no builder is registered for architecture 'fp4lab' \(registered: none\); "
                                         r"register one with quant.export.register_architecture\('fp4lab', build\) "
                                         r"\(fp4lab: import trainers.modes\)"):
        quant.export.load(path)


def test_export_in_another_format_is_weight_only_ptq_of_a_bf16_model(cfg_factory, baseline, tmp_path):
    run(cfg_factory(*overrides("unet"), "quant=bf16", "mode=export", "export.format=nf4", "export.roles=[weight]",
                    "+export.options.blocksize=64", "+export.options.double_quant=true", f"ckpt_path={baseline}",
                    f"paths.output_dir={tmp_path / 'export'}"))
    path = tmp_path / "export" / "model.safetensors"
    assert "inc.conv.weight.nested_absmax" in load_file(path)
    run(cfg_factory("mode=eval", f"ckpt_path={path}", "logger=csv", "trainer.limit_val_batches=1",
                    "trainer.limit_test_batches=1", f"paths.output_dir={tmp_path / 'eval'}"))
    evaluated = _summary(tmp_path / "eval")
    assert evaluated["arm"] == "bf16-as-nf4-packed" and evaluated["precision_effective"] == "bf16-mixed"
    assert 4.1 < evaluated["weight_memory"]["bits_per_weight"] < 4.2  # NF4 with double-quantized absmax


def test_ptq_vs_qat_runs_the_chain_and_writes_the_table(cfg_factory, tmp_path):
    cfg = cfg_factory(*overrides("unet"), "experiment=unet_ptq_vs_qat", "study.qat_max_steps=2", "study.qat_lr=1e-4",
                      "export.other_dtype=float32")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    stages = {stage: _summary(out / stage) for stage in ("baseline", "ptq", "qat", "packed")}
    assert {s: (v["stage"], v["mode"], v["quant"]) for s, v in stages.items()} == {
        "baseline": ("baseline", "train", "bf16"), "ptq": ("ptq", "ptq", "nvfp4"), "qat": ("qat", "train", "nvfp4"),
        "packed": ("packed", "eval", "nvfp4")}
    baseline_ckpt = stages["baseline"]["checkpoints"]["best"]
    assert stages["ptq"]["checkpoint"] == baseline_ckpt and stages["qat"]["init_checkpoint"] == baseline_ckpt
    assert stages["qat"]["optim"]["lr"] == 1e-4
    # the packed model (other tensors FP32) reproduces the QAT model's test metrics exactly
    qat_test = {k: v for k, v in stages["qat"]["metrics"].items() if k.startswith("test/")}
    assert {k: v for k, v in stages["packed"]["metrics"].items() if k.startswith("test/")} == qat_test
    table = (out / "ptq_vs_qat.md").read_text()
    assert table.startswith("| stage | arm | test/miou |")
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:6]] == [
        "bf16", "nvfp4-ptq", "nvfp4", "nvfp4-packed"]
    report = (out / "report" / "report.html").read_text()
    assert "PTQ vs QAT" in report and "nvfp4-ptq" in report


def _job(cfg) -> Job:
    job = Job(cfg=cfg, typed=validate(cfg))
    job.output_dir.mkdir(parents=True, exist_ok=True)
    return job


@pytest.mark.parametrize(("args", "error", "message"), [
    (["mode=ptq"], ConfigError, "mode=ptq needs ckpt_path=<a .ckpt"),
    (["mode=ptq", "quant=bf16", "ckpt_path=BASELINE"], ConfigError, "quant=bf16 has format=none; pick a quantized"),
    (["mode=export", "quant=bf16", "ckpt_path=BASELINE"], ConfigError, "export.format=<nvfp4|nf4|mxfp4>"),
    (["mode=eval", "ckpt_path=BASELINE"], ConfigError, "is not a .safetensors file"),
    (["mode=eval", "ckpt_path=/nonexistent/m.safetensors"], ConfigError, "does not exist"),
    (["mode=ptq_vs_qat", "quant=nvfp4"], ConfigError, "needs the study settings: add +study=ptq_vs_qat"),
    (["mode=ptq", "quant=nvfp4", "model=resnet", "ckpt_path=BASELINE"], UserError,
     "does not hold weights of this model"),
])
def test_bad_requests_name_the_problem(cfg_factory, baseline, args, error, message):
    args = [a.replace("BASELINE", str(baseline)) for a in args]
    model = next((a.split("=")[1] for a in args if a.startswith("model=")), "unet")
    cfg = cfg_factory(*overrides(model), *args)
    with pytest.raises(error, match=None) as caught:
        job = _job(cfg)
        MODES.get(job.typed.mode)(job)
    assert message in str(caught.value)


def test_export_and_study_settings_are_validated_at_composition(cfg_factory):
    with pytest.raises(ConfigError, match="export.options and export.roles apply only with export.format"):
        validate(cfg_factory("export.roles=[weight]"))
    with pytest.raises(ConfigError, match="export.format='int4' is not valid; valid choices: nvfp4, nf4, mxfp4"):
        validate(cfg_factory("export.format=int4"))
    with pytest.raises(ConfigError, match="pick the baseline arm with quant@study.baseline=<"):
        validate(cfg_factory("experiment=unet_ptq_vs_qat", "study.baseline=fp16"))
    typed = validate(cfg_factory("experiment=unet_ptq_vs_qat", "quant@study.baseline=fp16"))
    assert typed.study.baseline.name == "fp16"


def test_eval_of_a_corrupted_export_names_the_tensor(cfg_factory, baseline, tmp_path):
    job = _job(cfg_factory(*overrides("unet"), "quant=nvfp4", "mode=export", f"ckpt_path={baseline}"))
    MODES.get("export")(job)
    path = job.output_dir / "model.safetensors"
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8:8 + length])["inc.conv.weight.codes"]["data_offsets"]
    raw[8 + length + begin] ^= 0xFF
    path.write_bytes(bytes(raw))
    cfg = cfg_factory("mode=eval", f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'eval'}")
    with pytest.raises(QuantError, match="tensor 'inc.conv.weight.codes' does not match its SHA-256"):
        eval_job = _job(cfg)
        MODES.get("eval")(eval_job)


def test_command_line_eval_of_a_truncated_file_exits_with_one_message(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b'{"__metadata__": {}}')
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "mode=eval", f"ckpt_path={path}", "logger=csv",
                             f"hydra.run.dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "the header claims 1000 bytes but the file has 20" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
