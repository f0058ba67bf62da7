"""``data=imagefolder``: folder-per-class classification, read from a folder tree or straight from a zip.

Layout: ``<root>/<train_split>/<class>/<image>`` and ``<root>/<val_split>/<class>/<image>``; ``root`` may also be a
``.zip`` with that layout inside, or a folder holding exactly one such zip (how ``shared/data/cifar10_jpeg`` ships).
Zip members are decoded from memory, never extracted; each worker process opens its own handle, because a
``ZipFile`` shared across a fork would interleave seeks on one file descriptor.

Classes are the sorted folder names of the train split (torchvision's ImageFolder order); the val split may lack a
class but may not add one. Samples are listed round-robin over classes (the i-th file of every class, then the
(i+1)-th, ...), so ``train_limit``/``val_limit`` keep a class-balanced prefix. ``cifar10`` and ``shapes_cls`` are this
module with their own root and checks.
"""
from __future__ import annotations

import os
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from conf.errors import DataError
from conf.schemas.data import ImageFolderConfig
from data.base import BaseDataModule, limited, nonempty, require_root
from data.images import decode_image, read_bytes
from data.info import DataInfo
from data.registry import DATAMODULES
from data.sampling import resolve_key
from data.transforms import ClassificationTransform, single_threaded

LAYOUT = "<split>/<class>/<image> folders, a .zip with that layout, or a folder holding one such .zip"


class ImageSource:
    """Image files addressed by '<split>/<class>/<name>' keys, in a folder tree or a zip archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_zip = path.is_file()
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1

    def list_split(self, split: str, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
        """(key, class name) of every image of ``split``, sorted by key."""
        if self.is_zip:
            names = [n for n in self._archive().namelist() if n.startswith(f"{split}/") and not n.endswith("/")]
        else:
            split_dir = self.path / split
            if not split_dir.is_dir():
                return []
            names = [p.relative_to(self.path).as_posix() for p in split_dir.rglob("*") if p.is_file()]
        out = []
        for name in sorted(names):
            parts = name.split("/")
            if len(parts) >= 3 and name.lower().endswith(extensions):
                out.append((name, parts[1]))
        return out

    def read(self, key: str) -> bytes:
        if not self.is_zip:
            return read_bytes(self.path / key)
        try:
            return self._archive().read(key)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"cannot read {key} from {self.path}: {exc}") from None

    def describe(self, key: str) -> str:
        return f"{self.path}:{key}" if self.is_zip else str(self.path / key)

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"cannot open zip archive {self.path}: {exc}") from None
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None, "_zip_pid": -1}  # spawned workers reopen the archive


def open_source(root: Path) -> ImageSource:
    """A folder tree, a zip, or the only zip inside ``root``."""
    if root.is_file():
        if not zipfile.is_zipfile(root):
            raise DataError(f"data.root={root} is a file but not a zip archive (expected {LAYOUT})")
        return ImageSource(root)
    zips = sorted(root.glob("*.zip"))
    if not any(p.is_dir() for p in root.iterdir()) and len(zips) == 1:
        return ImageSource(zips[0])
    return ImageSource(root)


def round_robin(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Reorder (key, label) pairs: the 1st sample of every class, then the 2nd, ... (classes ascending)."""
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    ordered = []
    for rank in range(max(map(len, by_class.values()), default=0)):
        for label in sorted(by_class):
            if rank < len(by_class[label]):
                ordered.append(by_class[label][rank])
    return ordered


class ImageClassificationDataset(Dataset):
    """Sample ``i``: ``image`` float32 [C, S, S] and ``label`` int64."""

    def __init__(self, source: ImageSource, samples: list[tuple[str, int]], transform: ClassificationTransform,
                 mode: str, base_seed: int) -> None:
        self.source = source
        self.samples = samples
        self.transform = transform
        self.mode = mode
        self.base_seed = base_seed

    def __len__(self) -> int:
        return len(self.samples)

    @single_threaded
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, rng = resolve_key(key, self.base_seed)
        name, label = self.samples[index]
        pixels = decode_image(self.source.read(name), self.source.describe(name), self.mode)  # uint8 [H, W, C]
        return {"image": self.transform(pixels, rng), "label": torch.tensor(label, dtype=torch.int64)}


@DATAMODULES.register("imagefolder")
class ImageFolderDataModule(BaseDataModule):
    task = "classification"
    config_cls = ImageFolderConfig

    def __init__(self, cfg: Any, *, cache_dir: Path, seed: int) -> None:
        super().__init__(cfg, cache_dir=cache_dir, seed=seed)
        self._source: ImageSource | None = None
        self._listing: dict[str, list[tuple[str, str]]] = {}

    # What subclasses with generated or fixed layouts override.
    def source_root(self) -> Path:
        return require_root(self.cfg.root, self.cfg.name, LAYOUT)

    def split_names(self) -> dict[str, str]:
        return {"train": self.cfg.train_split, "val": self.cfg.val_split}

    def channels(self) -> int:
        return self.cfg.channels

    def extensions(self) -> tuple[str, ...]:
        return tuple(e.lower() for e in self.cfg.extensions)

    def check_classes(self, classes: list[str]) -> None:
        """Hook for data sets with a known class list."""

    def prepare_data(self) -> None:
        self.classes()

    def classes(self) -> list[str]:
        names = sorted({cls for _, cls in self._list("train")})
        self.check_classes(names)
        return names

    def _build_info(self) -> DataInfo:
        names = self.classes()
        return DataInfo(task="classification", num_classes=len(names), in_channels=self.channels(),
                        image_size=(self.cfg.image_size, self.cfg.image_size), class_names=tuple(names))

    def _build_split(self, split: str) -> ImageClassificationDataset:
        classes = self.classes()
        label_of = {name: i for i, name in enumerate(classes)}
        listing = self._list(split)
        extra = sorted({cls for _, cls in listing} - set(classes))
        if extra:
            raise DataError(f"the {split} split of {self._source_or_open().path} has class folder(s) {extra} that the "
                            f"train split lacks; train classes: {', '.join(classes)}")
        samples = round_robin([(key, label_of[cls]) for key, cls in listing])
        samples = limited(samples, self.cfg.train_limit if split == "train" else self.cfg.val_limit)
        transform = ClassificationTransform(
            size=self.cfg.image_size, train=split == "train", mean=tuple(self.cfg.mean), std=tuple(self.cfg.std),
            crop_padding=self.cfg.crop_padding, hflip=self.cfg.hflip,
        )
        mode = "RGB" if self.channels() == 3 else "L"
        return ImageClassificationDataset(self._source_or_open(), samples, transform, mode, self.seed)

    def _list(self, split: str) -> list[tuple[str, str]]:
        if split not in self._listing:
            source = self._source_or_open()
            name = self.split_names()[split]
            listing = source.list_split(name, self.extensions())
            where = f"{source.path}:{name}/" if source.is_zip else str(source.path / name)
            nonempty(listing, f"{split} split of data={self.cfg.name}",
                     f"{where} (expected <class>/<image> with one of {', '.join(self.extensions())})")
            self._listing[split] = listing
        return self._listing[split]

    def _source_or_open(self) -> ImageSource:
        if self._source is None:
            self._source = open_source(self.source_root())
        return self._source
