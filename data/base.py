"""What every fp4lab data module shares: the builder contract, split handling and DataLoader construction.

Contract (docs/ARCHITECTURE.md): ``Module(cfg, cache_dir=..., seed=...)``; ``.info`` is cheap (metadata only, never
image decoding); ``prepare_data`` checks paths and never downloads; ``setup(stage)`` builds the datasets;
dataloaders yield the dicts documented in ``data/info.py``. There are two splits, train and val; the test loader
serves the val split (COCO, CIFAR-10 and MNIST publish no labelled third split; say ``trainer.limit_test_batches``
to shorten it). Training order and augmentation are a pure function of (seed, epoch): ``data/sampling.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from conf.errors import ConfigError, DataError
from data.info import DataInfo
from data.sampling import ResumableDataLoader, SeededSampler


class BaseDataModule(L.LightningDataModule):
    task: ClassVar[str]  # a data.info.TASKS entry
    config_cls: ClassVar[type]

    def __init__(self, cfg: Any, *, cache_dir: Path, seed: int) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_cls):
            raise ConfigError(f"data={cfg.name} needs a {self.config_cls.__name__} config, got {type(cfg).__name__}")
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._info: DataInfo | None = None

    @property
    def info(self) -> DataInfo:
        if self._info is None:
            self._info = self._build_info()
        return self._info

    def _build_info(self) -> DataInfo:
        raise NotImplementedError

    def _build_split(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train" or "val"), with its limit applied."""
        raise NotImplementedError

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return torch.utils.data.default_collate(samples)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build_split("train")
        if self.val_set is None:
            self.val_set = self._build_split("val")

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_set, "train")
        sampler = SeededSampler(len(dataset), self.seed)  # this rank's share under data parallelism
        return self._loader(
            dataset,
            resumable=True,
            sampler=sampler,
            drop_last=len(sampler) >= self.cfg.batch_size,  # constant batch shape while there is a full batch
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_set, "val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_set, "val"))

    def _loader(self, dataset: Dataset, resumable: bool = False, **kwargs: Any) -> DataLoader:
        """``resumable``: the loader's position in the epoch goes into checkpoints (``data/sampling.py``). Every loader
        draws its iterator seed from its own generator, not the global torch RNG, so that creating one (for
        validation, say) does not shift the random numbers training draws next: a resumed run skips the validation
        that ran after its checkpoint was written."""
        pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
        loader_cls = ResumableDataLoader if resumable else DataLoader
        return loader_cls(
            dataset,
            generator=torch.Generator().manual_seed(self.seed),
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            pin_memory=pin,
            collate_fn=self.collate,
            **kwargs,
        )

    def _require(self, dataset: Dataset | None, split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"the {split} split is not built: call setup() first")
        return dataset


def require_root(root: str | None, name: str, expected: str) -> Path:
    """``data.root`` as a Path that exists; DataError saying what to pass otherwise."""
    if root is None:
        raise DataError(f"data.root is not set for data={name}; pass data.root=/path/to/{name} (expected {expected})")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root={root} does not exist (data={name} expects {expected})")
    return path


def limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def nonempty(items: list, what: str, source: Path | str) -> list:
    if not items:
        raise DataError(f"the {what} is empty: no samples found in {source}")
    return items

