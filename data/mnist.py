"""``data=mnist``: the original IDX files (gzipped or not), read with numpy into memory.

Layout: ``root/{train,t10k}-images-idx3-ubyte[.gz]`` and ``root/{train,t10k}-labels-idx1-ubyte[.gz]``; the val split
is the t10k set. The IDX header (magic: 0x00 0x00, dtype 0x08 = uint8, number of dimensions; then one big-endian
uint32 per dimension) is checked against the file length, so a truncated or re-encoded file is a clear error
rather than a reshape failure.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
import numpy as np
import torch
from torch.utils.data import Dataset

from conf.errors import DataError
from conf.schemas.data import MnistConfig
from data.base import BaseDataModule, require_root
from data.info import DataInfo
from data.registry import DATAMODULES
from data.sampling import resolve_key
from data.transforms import ClassificationTransform, single_threaded

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
LAYOUT = "{train,t10k}-images-idx3-ubyte[.gz] and {train,t10k}-labels-idx1-ubyte[.gz]"
UBYTE = 0x08


def find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file is missing: {root / stem} (or {stem}.gz); data=mnist expects {LAYOUT} in {root}")


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array stored in an IDX file, shaped by its header."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read MNIST file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != UBYTE:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its IDX header is incomplete")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path} holds {len(raw) - header} bytes of data but its header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class MnistDataset(Dataset):
    """Sample ``i``: ``image`` float32 [1, S, S] and ``label`` int64."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: ClassificationTransform,
                 base_seed: int) -> None:
        self.images = images  # uint8 [N, 28, 28]
        self.labels = torch.from_numpy(labels.astype(np.int64))  # [N]
        self.transform = transform
        self.base_seed = base_seed

    def __len__(self) -> int:
        return len(self.labels)

    @single_threaded
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, rng = resolve_key(key, self.base_seed)
        return {"image": self.transform(self.images[index][:, :, None], rng), "label": self.labels[index]}


@DATAMODULES.register("mnist")
class MnistDataModule(BaseDataModule):
    task = "classification"
    config_cls = MnistConfig

    def prepare_data(self) -> None:
        root = require_root(self.cfg.root, "mnist", LAYOUT)
        for stems in FILES.values():
            for stem in stems:
                find_idx(root, stem)

    def _build_info(self) -> DataInfo:
        return DataInfo(task="classification", num_classes=10, in_channels=1,
                        image_size=(self.cfg.image_size, self.cfg.image_size),
                        class_names=tuple(str(d) for d in range(10)))

    def _build_split(self, split: str) -> MnistDataset:
        root = require_root(self.cfg.root, "mnist", LAYOUT)
        image_file, label_file = (find_idx(root, stem) for stem in FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{image_file} {images.shape} and {label_file} {labels.shape} do not pair up as N images "
                            f"and N labels")
        if labels.size and labels.max() > 9:
            raise DataError(f"{label_file} holds label {int(labels.max())}; MNIST labels are 0..9")
        limit = self.cfg.train_limit if split == "train" else self.cfg.val_limit
        keep = len(labels) if limit is None else min(limit, len(labels))
        if keep == 0:
            raise DataError(f"the {split} split of data=mnist is empty: {image_file} holds no images")
        transform = ClassificationTransform(
            size=self.cfg.image_size, train=split == "train", mean=tuple(self.cfg.mean), std=tuple(self.cfg.std),
            crop_padding=self.cfg.crop_padding, hflip=self.cfg.hflip,
        )
        return MnistDataset(images[:keep], labels[:keep], transform, self.seed)
