"""``data=mvtec``: MVTec AD as supervised defect segmentation (binary or one class per defect type).

Layout (per category, as MVTec AD ships it): ``<category>/train/good/*.png`` (defect-free), ``<category>/test/<defect>/
*.png`` (``good`` plus one folder per defect type) and ``<category>/ground_truth/<defect>/<stem>_mask.png`` (0 or
255 per pixel; ``good`` images have no mask: all background).

MVTec AD only has defect masks in ``test/``, so the split is ours: within every (category, defect type) group of
``test/`` images, a ``val_fraction`` share (at least one image when the group has two or more) goes to validation,
chosen by a permutation seeded with ``split_seed`` (fixed across run seeds, so seeds are compared on the same val
set); the rest, plus ``train/good`` when ``include_train_good``, is the training split. Classes: ``binary`` ->
background, defect; ``per_defect`` -> background, then ``<category>/<defect>`` sorted. Grayscale categories (grid,
screw, zipper) are converted to RGB. A mask must match its image's size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from conf.errors import ConfigError, DataError
from conf.schemas.data import MvtecConfig
from data.base import BaseDataModule, limited, nonempty, require_root
from data.coco import collate_segmentation
from data.images import read_image
from data.info import DataInfo
from data.registry import DATAMODULES
from data.sampling import resolve_key
from data.transforms import IGNORE_INDEX, SegmentationTransform, single_threaded

LAYOUT = "<category>/train/good/*.png, <category>/test/<defect>/*.png, <category>/ground_truth/<defect>/*_mask.png"
GOOD = "good"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class MvtecSample:
    image: Path
    mask: Path | None  # None: defect-free, all background
    label: int  # semantic label of the mask's defect pixels


class MvtecDataset(Dataset):
    """Sample ``i``: ``image`` [3, S, S], ``semantic`` [S, S], ``image_id`` (the sample's position)."""

    def __init__(self, samples: list[MvtecSample], transform: SegmentationTransform, base_seed: int) -> None:
        self.samples = samples
        self.transform = transform
        self.base_seed = base_seed

    def __len__(self) -> int:
        return len(self.samples)

    @single_threaded
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, rng = resolve_key(key, self.base_seed)
        sample = self.samples[index]
        image = read_image(sample.image)  # uint8 [H, W, 3]
        semantic = np.zeros(image.shape[:2], dtype=np.uint8)
        if sample.mask is not None:
            mask = read_image(sample.mask, mode="L")[:, :, 0]  # uint8 [H, W]
            if mask.shape != semantic.shape:
                raise DataError(f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {sample.image} "
                                f"is {image.shape[1]}x{image.shape[0]}")
            semantic[mask > 127] = sample.label
        out = self.transform(image, semantic, rng)
        return {"image": out.image, "semantic": out.semantic, "image_id": torch.tensor(index, dtype=torch.int64)}


@DATAMODULES.register("mvtec")
class MvtecDataModule(BaseDataModule):
    task = "segmentation"
    config_cls = MvtecConfig

    def __init__(self, cfg: Any, *, cache_dir: Path, seed: int) -> None:
        super().__init__(cfg, cache_dir=cache_dir, seed=seed)
        self._splits: dict[str, list[MvtecSample]] | None = None

    def prepare_data(self) -> None:
        self.class_names()

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_segmentation(samples)

    def categories(self) -> list[str]:
        root = require_root(self.cfg.root, "mvtec", LAYOUT)
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
        if not found:
            raise DataError(f"no MVTec AD category folder under {root} (expected {LAYOUT})")
        if self.cfg.categories is None:
            return found
        for name in self.cfg.categories:
            if name not in found:
                raise ConfigError(f"data.categories: {name!r} is not a category folder of {root}; valid choices: "
                                  f"{', '.join(found)}")
        return list(self.cfg.categories)

    def defect_types(self) -> list[str]:
        """'<category>/<defect>' of every defect folder under test/, sorted."""
        root = require_root(self.cfg.root, "mvtec", LAYOUT)
        return sorted(f"{cat}/{d.name}" for cat in self.categories() for d in (root / cat / "test").iterdir()
                      if d.is_dir() and d.name != GOOD)

    def class_names(self) -> tuple[str, ...]:
        if self.cfg.mask_mode == "binary":
            return ("background", "defect")
        defects = self.defect_types()
        if not defects:
            raise DataError(f"no defect folder under {self.cfg.root}/<category>/test/ (expected {LAYOUT})")
        return ("background", *defects)

    def _build_info(self) -> DataInfo:
        names = self.class_names()
        return DataInfo(task="segmentation", num_classes=len(names), in_channels=3,
                        image_size=(self.cfg.image_size, self.cfg.image_size), ignore_index=IGNORE_INDEX,
                        class_names=names, instances=False)

    def _build_split(self, split: str) -> MvtecDataset:
        limit = self.cfg.train_limit if split == "train" else self.cfg.val_limit
        samples = limited(self._split_samples()[split], limit)
        nonempty(samples, f"{split} split of data=mvtec", self.cfg.root)
        transform = SegmentationTransform(
            size=self.cfg.image_size, train=split == "train", mean=tuple(self.cfg.mean), std=tuple(self.cfg.std),
            scale_range=(self.cfg.train_scale[0], self.cfg.train_scale[1]), hflip=self.cfg.hflip,
        )
        return MvtecDataset(samples, transform, self.seed)

    def _split_samples(self) -> dict[str, list[MvtecSample]]:
        if self._splits is not None:
            return self._splits
        root = require_root(self.cfg.root, "mvtec", LAYOUT)
        label_of = {name: i for i, name in enumerate(self.class_names())}
        train: list[MvtecSample] = []
        val: list[MvtecSample] = []
        rng = np.random.default_rng(self.cfg.split_seed)
        for cat in self.categories():
            if self.cfg.include_train_good:
                train += [MvtecSample(p, None, 0) for p in _images(root / cat / "train" / GOOD)]
            for defect_dir in sorted(d for d in (root / cat / "test").iterdir() if d.is_dir()):
                defect = defect_dir.name
                if defect == GOOD:
                    label = 0
                else:
                    label = 1 if self.cfg.mask_mode == "binary" else label_of[f"{cat}/{defect}"]
                group = [MvtecSample(p, None if defect == GOOD else _mask_path(root, cat, defect, p), label)
                         for p in _images(defect_dir)]
                n_val = math.floor(self.cfg.val_fraction * len(group) + 0.5)  # round half up
                if len(group) >= 2 and self.cfg.val_fraction > 0:
                    n_val = min(max(n_val, 1), len(group) - 1)
                order = rng.permutation(len(group))
                val += [group[i] for i in sorted(order[:n_val])]
                train += [group[i] for i in sorted(order[n_val:])]
        self._splits = {"train": train, "val": val}
        return self._splits


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"MVTec AD folder is missing: {folder} (expected {LAYOUT})")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_path(root: Path, category: str, defect: str, image: Path) -> Path:
    mask = root / category / "ground_truth" / defect / f"{image.stem}_mask.png"
    if not mask.is_file():
        raise DataError(f"defect mask is missing: {mask} (for {image})")
    return mask
