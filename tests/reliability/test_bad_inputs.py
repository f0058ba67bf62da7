"""Bad inputs of every kind end in one clear message, a non-zero exit and nothing already written lost.

Most cases run the app in-process (``trainers.app.run``: the same code path as ``main.py`` after Hydra composed the
config, which exits with status 2); two run the real ``main.py`` to check the process's exit status and that no
traceback is printed. Cases that point a job at an existing job folder check that every file in it is byte for byte
what it was (a failed attempt adds only ``failure.json``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, compose_config
from tests.data.conftest import coco_records, write_coco
from tests.quant.test_export import _layer_meta, _rewrite_header, _set_layer_meta
from tests.reliability.support import ENV, assert_unchanged, main_args, main_command, snapshot
from tests.tiny import FAMILIES, overrides
from trainers.app import run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-step LLM job: checkpoints, CSV log, run.json."""
    root = tmp_path_factory.mktemp("finished")
    cfg = compose_config(overrides("llm"), root, root / "cache")
    run(cfg)
    return Path(cfg.paths.output_dir)


def _fails(cfg, caplog, message: str) -> None:
    caplog.clear()
    with pytest.raises(SystemExit) as stopped:
        run(cfg)
    assert stopped.value.code == 2
    assert message in caplog.text, caplog.text[-2000:]


def _coco(cfg_factory, root: Path, *extra: str):
    unet = [o for o in overrides("unet") if not o.startswith("data.")]
    return cfg_factory(*unet, "data=coco", f"data.root={root}", "data.image_size=32", "data.batch_size=2",
                       "data.num_workers=0", *extra)


# -- configuration ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr=-1.0 is out of range; valid range: [0.0, inf]"),
    ("trainer.nonfinite=ignore", "trainer.nonfinite='ignore' is not valid; valid choices: stop, skip"),
    ("trainer.checkpoint_every_n_steps=-5", "trainer.checkpoint_every_n_steps=-5 is out of range"),
])
def test_out_of_range_and_invalid_values(cfg_factory, caplog, override, message):
    _fails(cfg_factory(*overrides("llm"), override), caplog, message)


def test_unknown_option_and_wrong_type_exit_non_zero_without_a_traceback(tmp_path):
    for arg, status, message in [
        ("trainer.max_step=5", 2, "trainer.max_step is not a known key; valid keys of trainer: accelerator, "),
        ("trainer.max_steps=abc", 1, "Value 'abc' of type 'str' could not be converted to Integer"),
    ]:
        result = subprocess.run([sys.executable, str(REPO / "main.py"), arg, f"hydra.run.dir={tmp_path / 'out'}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ENV)
        assert result.returncode == status and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


# -- data -------------------------------------------------------------------------------------------------------------
def test_missing_data_path(cfg_factory, caplog, tmp_path):
    _fails(_coco(cfg_factory, tmp_path / "nowhere"), caplog, f"data.root={tmp_path / 'nowhere'} does not exist")


def test_unreadable_data_path(cfg_factory, caplog, tmp_path):
    not_a_folder = tmp_path / "coco.txt"
    not_a_folder.write_text("not a data set")
    _fails(_coco(cfg_factory, not_a_folder), caplog,
           f"cannot read annotation file {not_a_folder / 'annotations' / 'instances_train2017.json'}: Not a directory")


def test_corrupt_annotation_json(cfg_factory, caplog, tmp_path):
    root = write_coco(tmp_path / "coco", coco_records())
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    _fails(_coco(cfg_factory, root), caplog, "instances_train2017.json is not valid JSON")


def test_image_missing(cfg_factory, caplog, tmp_path):
    root = write_coco(tmp_path / "coco", coco_records())
    (root / "train2017" / "a.png").unlink()
    _fails(_coco(cfg_factory, root), caplog, "1 image file(s) listed in")


def test_zero_size_image(cfg_factory, caplog, tmp_path):
    root = write_coco(tmp_path / "coco", coco_records())
    (root / "val2017" / "b.png").write_bytes(b"")
    _fails(_coco(cfg_factory, root), caplog, "are empty (0 bytes), e.g.")


def test_empty_data_set(cfg_factory, caplog, tmp_path):
    root = tmp_path / "folders"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
    resnet = [o for o in FAMILIES["resnet"] if not o.startswith("data.")]
    cfg = cfg_factory(*resnet, *overrides("resnet")[len(FAMILIES["resnet"]):], "data=imagefolder",
                      f"data.root={root}")
    _fails(cfg, caplog, "is empty: no samples found in")


def test_tokenizer_files_missing(cfg_factory, caplog, tmp_path):
    (tmp_path / "tok").mkdir()
    cfg = cfg_factory(*overrides("llm"), "data.tokenizer=gpt2", f"data.tokenizer_dir={tmp_path / 'tok'}")
    _fails(cfg, caplog, f"tokenizer file is missing: {tmp_path / 'tok' / 'r50k_base.tiktoken'}")


# -- checkpoints: a bad resume leaves the job folder as it was --------------------------------------------------------
def _resume(cfg_factory, job: Path, *extra: str):
    return cfg_factory(*overrides("llm"), "trainer.max_steps=4", f"paths.output_dir={job}", *extra)


def test_truncated_checkpoint(finished, cfg_factory, caplog, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(finished, job)
    data = (job / "checkpoints" / "last.ckpt").read_bytes()
    (job / "checkpoints" / "last.ckpt").write_bytes(data[:1000])  # e.g. copied by hand and cut short
    before = snapshot(job)
    _fails(_resume(cfg_factory, job, "ckpt_path=last"), caplog,
           f"ckpt_path={job / 'checkpoints' / 'last.ckpt'} cannot be read as a checkpoint (1000 bytes; truncated")
    assert_unchanged(job, before)


@pytest.mark.slow
def test_truncated_checkpoint_exits_2_and_leaves_the_job_folder_untouched(finished, tmp_path, shared_cache):
    job = tmp_path / "job"
    shutil.copytree(finished, job)
    broken = tmp_path / "broken.ckpt"
    data = (job / "checkpoints" / "last.ckpt").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    before = snapshot(job)
    result = subprocess.run(main_command(main_args("llm", "trainer.max_steps=4", f"ckpt_path={broken}",
                                                   cache=shared_cache), job),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"ckpt_path={broken} cannot be read as a checkpoint ({len(data) // 2} bytes; truncated" in output
    assert "Traceback" not in output
    assert_unchanged(job, before)


def test_checkpoint_of_another_model(finished, cfg_factory, caplog, tmp_path):
    other = cfg_factory(*overrides("resnet"), f"paths.output_dir={tmp_path / 'resnet'}")
    run(other)
    job = tmp_path / "job"
    shutil.copytree(finished, job)
    before = snapshot(job)
    _fails(_resume(cfg_factory, job, f"ckpt_path={tmp_path / 'resnet' / 'checkpoints' / 'last.ckpt'}"), caplog,
           "does not fit this job (model=llm data=text quant=bf16 (run llm-bf16-seed0)): ")
    assert "It was written by model=resnet data=shapes_cls quant=bf16" in caplog.text
    assert_unchanged(job, before)


def test_checkpoint_of_another_precision_policy(finished, cfg_factory, caplog, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(finished, job)
    before = snapshot(job)
    _fails(_resume(cfg_factory, job, "quant=nvfp4", "ckpt_path=last"), caplog,
           "was trained with quant=bf16 but this job runs quant=nvfp4")
    assert_unchanged(job, before)


def test_resume_without_a_checkpoint(cfg_factory, caplog, tmp_path):
    _fails(_resume(cfg_factory, tmp_path / "fresh", "ckpt_path=last"), caplog,
           f"ckpt_path=last: there is no {tmp_path / 'fresh' / 'checkpoints' / 'last.ckpt'}")


def test_mismatched_export_metadata(finished, cfg_factory, caplog, tmp_path):
    export = cfg_factory(*overrides("llm"), "quant=nvfp4", "mode=export",
                         f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}", f"paths.output_dir={tmp_path / 'x'}")
    run(export)
    path = tmp_path / "x" / "model.safetensors"
    raw = path.read_bytes()
    metadata = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    layer = sorted(key.removeprefix("fp4lab.layer.") for key in metadata if key.startswith("fp4lab.layer."))[0]
    shape = json.loads(metadata[f"fp4lab.layer.{layer}"])["weight_shape"]
    _rewrite_header(path, lambda h: _set_layer_meta(h, layer, {**_layer_meta(h, layer), "matrix_shape": [8, 8]}))
    before = snapshot(tmp_path / "x")
    _fails(cfg_factory("mode=eval", f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'eval'}"), caplog,
           f"export file {path}: layer '{layer}': weight_shape {shape} and matrix_shape [8, 8] hold different "
           "numbers of elements")
    assert_unchanged(tmp_path / "x", before)
