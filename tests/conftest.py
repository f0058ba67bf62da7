"""Shared fixtures: compose the real Hydra config with the compose API, outputs under tmp_path.

Hydra's compose API leaves ``hydra.runtime.output_dir`` unset and ``${hydra:...}`` unresolvable unless the Hydra
config is registered, so ``compose_config`` registers it and points every output path at the test's tmp dir.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import conf.schemas  # noqa: F401  (registers the schemas)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"

# One intra-op thread: the suite runs many tiny ops, where more threads only add contention on 2-core CI.
torch.set_num_threads(1)


def compose_config(overrides: list[str], tmp_path: Path, cache_dir: Path | None = None) -> DictConfig:
    """The config a ``python main.py <overrides>`` run would see, with outputs under ``tmp_path``.

    ``cache_dir`` (generated data sets) defaults to ``tmp_path/cache``; tests share one per session to generate the
    embedded data sets once.
    """
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        cfg = compose(
            "config",
            overrides=[
                f"paths.output_dir={tmp_path / 'out'}",
                f"paths.cache_dir={cache_dir or tmp_path / 'cache'}",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fp4lab-cache")


@pytest.fixture
def cfg_factory(tmp_path, shared_cache):
    def make(*overrides: str) -> DictConfig:
        return compose_config(list(overrides), tmp_path, shared_cache)

    return make
