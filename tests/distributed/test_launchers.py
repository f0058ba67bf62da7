"""Hydra launchers: our submitit_slurm / submitit_local / joblib configs (shadowing the plugins' configs of the same
names and validated against their schemas), the refusal of Lightning's script-launched DDP inside a basic-launcher
sweep (and of FSDP on CPU), and real submitit_local sweeps: 2 single-device jobs, and (slow) 2 DDP jobs whose ranks are submitit tasks."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from conf.errors import ConfigError
from tests.conftest import CONF_DIR
from tests.distributed.jobs import DDP_CPU, checkpoint_digest, replica_summary, run_main, tiny_llm
from trainers.app import validate
from trainers.distributed import check_launch


@pytest.fixture(autouse=True)
def keep_hydra_config():
    """The tests below set Hydra's global config (a -m job's view); put back what was there for the next tests."""
    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema with the same name")
def test_launcher_configs_size_jobs_from_the_trainer_config():
    slurm = compose_with_hydra("hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.tasks_per_node, slurm.gpus_per_node, slurm.nodes) == (4, 4, 1)  # one task per device
    assert slurm.array_parallelism == 256 and slurm.partition is None  # the plugin's schema fills the rest
    local = compose_with_hydra("hydra/launcher=submitit_local").hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.tasks_per_node == 1  # trainer=default: one device
    joblib = compose_with_hydra("hydra/launcher=joblib").hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2
    with pytest.raises(ConfigCompositionException, match="timeout_min"):  # typed by the plugin's schema (int)
        compose_with_hydra("hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=four_hours")


def test_script_launched_ddp_is_refused_inside_a_basic_sweep(monkeypatch):
    cfg = compose_with_hydra(*DDP_CPU, "hydra.mode=MULTIRUN", "paths.output_dir=unused")
    HydraConfig.instance().set_config(cfg)  # what a job of a -m sweep with the basic launcher sees
    with open_dict(cfg):
        del cfg["hydra"]
    trainer = validate(cfg).trainer
    with pytest.raises(ConfigError, match="hydra/launcher=submitit_slurm"):
        check_launch(trainer)
    trainer.strategy = "ddp_spawn"  # ranks started by multiprocessing: no command line re-run
    check_launch(trainer)
    trainer.strategy, trainer.devices = "ddp", 1
    check_launch(trainer)
    trainer.devices = 2
    monkeypatch.setenv("LOCAL_RANK", "0")  # ranks started by submitit / SLURM / torchrun
    check_launch(trainer)


def test_fsdp_without_gpus_is_refused_with_one_message():
    cfg = compose_with_hydra("trainer=fsdp", "trainer.accelerator=cpu", "paths.output_dir=unused")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        check_launch(validate(cfg).trainer)


@pytest.mark.slow
def test_submitit_local_sweep_runs_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    run_main(["-m", *tiny_llm("quant=fp32,bf16"), "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"],
             tmp_path)
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "run.json").is_file())
    assert jobs == ["0_llm-fp32-seed0", "1_llm-bf16-seed0"]
    assert len([p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]) == 2  # one job per sweep point
    assert [job["status"] for job in json.loads((sweep / "jobs.json").read_text())] == ["completed", "completed"]


@pytest.mark.slow
def test_submitit_local_sweep_of_ddp_jobs_trains_like_a_single_ddp_run(tmp_path):
    """The supported multirun + DDP combination: one job per sweep point, one submitit task per DDP rank."""
    sweep = tmp_path / "sweep"
    run_main(["-m", *tiny_llm("quant=bf16,nvfp4"), *DDP_CPU, "hydra/launcher=submitit_local",
              f"hydra.sweep.dir={sweep}"], tmp_path)
    single = tmp_path / "single"
    run_main([*tiny_llm("quant=nvfp4"), *DDP_CPU, f"hydra.run.dir={single}"], tmp_path)
    for job in ("0_llm-bf16-seed0", "1_llm-nvfp4-seed0"):
        summary = replica_summary(sweep / job)
        assert summary["world_size"] == 2 and summary["replicas_identical"]
        assert checkpoint_digest(sweep / job / "checkpoints" / "last.ckpt") == summary["parameter_sha256"][0]
    # submitit-started ranks and Lightning-started ranks train the same weights
    assert replica_summary(sweep / "1_llm-nvfp4-seed0")["parameter_sha256"] == \
        replica_summary(single)["parameter_sha256"]
