"""Every config combination composes and validates; bad configs fail with one clear message before any data is read."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conf.errors import ConfigError
from tests.conftest import CONF_DIR, REPO
from trainers.app import validate


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_model_data_quant_combination_composes_and_validates(tmp_path):
    combos = 0
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        for model in _options("model"):
            for data_name in _options("data"):
                for quant_name in _options("quant"):
                    cfg = compose("config", return_hydra_config=True, overrides=[
                        f"model={model}", f"data={data_name}", f"quant={quant_name}",
                        f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}"])
                    HydraConfig.instance().set_config(cfg)
                    with open_dict(cfg):
                        del cfg["hydra"]
                    typed = validate(cfg)
                    assert (typed.model.name, typed.data.name, typed.quant.name) == (model, data_name, quant_name)
                    combos += 1
    assert combos == len(_options("model")) * len(_options("data")) * len(_options("quant")) >= 3 * 7 * 3


@pytest.mark.parametrize("model,data_name", [("unet", "shapes"), ("resnet", "shapes_cls"), ("llm", "text")])
def test_each_model_picks_its_embedded_default_data_set(cfg_factory, model, data_name):
    assert cfg_factory(f"model={model}").data.name == data_name


def test_command_line_data_wins_over_the_model_default(cfg_factory):
    assert cfg_factory("model=resnet", "data=mnist").data.name == "mnist"


def test_run_name_comes_from_the_overrides(cfg_factory):
    assert cfg_factory("model=resnet", "quant=nvfp4", "seed=3").run_name == "resnet-nvfp4-seed3"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.name=adam", "optim.name='adam' is not valid; valid choices: adamw, sgd"),
        ("mode=fly", "mode='fly' is not valid; valid choices: train, test, analyze"),
        ("trainer.accelerator=tpu", "valid choices: auto, cpu, gpu, cuda, mps"),
        ("optim.lr=-1", "optim.lr=-1.0 is out of range"),
    ],
)
def test_out_of_range_or_unknown_values_name_the_valid_choices(cfg_factory, override, expected):
    with pytest.raises(ConfigError, match=None) as err:
        validate(cfg_factory(override))
    assert expected in str(err.value)


def _main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args, f"hydra.run.dir={cwd}/out"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["quant=int9"], "Available options in 'quant'"),
        (["trainer.max_step=2"], "trainer.max_step is not a known key; valid keys of trainer: accelerator"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["optim.name=adam"], "valid choices: adamw, sgd"),
        (["model=resnet", "data=shapes"], "valid data choices for model=resnet"),
    ],
)
def test_bad_command_lines_exit_non_zero_with_one_message(tmp_path, args, expected):
    result = _main(*args, "logger=csv", f"paths.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
