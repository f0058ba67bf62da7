"""``data=coco``: COCO-format instance annotations -> semantic (and instance) segmentation batches.

Layout (split names configurable): ``root/annotations/instances_<split>.json`` and ``root/<split>/<file_name>``.
The generated ``shapes`` data set goes through this same module (it only writes files in this layout).

Load-bearing choices: labels come from the *train* file's categories (``data/coco_index.py``); the target rules
(overlap, crowd, left-out classes) are in ``data/coco_targets.py``; training images without any kept instance are
dropped (``drop_empty_train``), validation keeps every image. Each decoded image's size is checked against the
annotation's height/width (EXIF rotation is not applied, so a rotated file would misalign its masks: it is an error).
The ``.info`` property parses only the train annotation file (once; ``setup`` reuses it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from conf.errors import DataError
from conf.schemas.data import CocoConfig
from data.base import BaseDataModule, limited, nonempty, require_root
from data.coco_index import CocoSplit, LabelMap, build_label_map, check_same_categories, has_kept_instance, \
    load_coco_split
from data.coco_targets import rasterize
from data.images import read_image
from data.info import DataInfo
from data.registry import DATAMODULES
from data.sampling import resolve_key
from data.transforms import IGNORE_INDEX, SegmentationTransform, masks_to_boxes, single_threaded

LAYOUT = "annotations/instances_<split>.json and <split>/ image folders"


class CocoSegmentationDataset(Dataset):
    """Sample ``i``: ``image`` [3, S, S], ``semantic`` [S, S], ``image_id`` and, if asked, ``instances``."""

    def __init__(
        self,
        split: CocoSplit,
        images: list[dict[str, Any]],
        label_map: LabelMap,
        transform: SegmentationTransform,
        *,
        instances: bool,
        overlap_rule: str,
        base_seed: int,
    ) -> None:
        self.split = split
        self.images = images
        self.label_map = label_map
        self.transform = transform
        self.instances = instances
        self.overlap_rule = overlap_rule
        self.base_seed = base_seed

    def __len__(self) -> int:
        return len(self.images)

    @single_threaded
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, rng = resolve_key(key, self.base_seed)
        record = self.images[index]
        height, width = record["height"], record["width"]
        path = self.split.image_dir / record["file_name"]
        image = read_image(path)  # uint8 [H, W, 3]
        if image.shape[:2] != (height, width):
            raise DataError(f"image {path} is {image.shape[1]}x{image.shape[0]} but {self.split.ann_file} says "
                            f"{width}x{height} (width x height)")
        targets = rasterize(self.split.anns_by_image[record["id"]], height, width, self.label_map, self.overlap_rule)
        if self.instances:
            sample = self.transform(image, targets.semantic, rng, targets.masks, targets.labels, targets.ignore)
        else:
            sample = self.transform(image, targets.semantic, rng)
        out: dict[str, Any] = {"image": sample.image, "semantic": sample.semantic,
                               "image_id": torch.tensor(record["id"], dtype=torch.int64)}
        if self.instances:
            out["instances"] = {"masks": sample.masks, "labels": sample.labels,
                                "boxes": masks_to_boxes(sample.masks), "ignore": sample.ignore}
        return out


@single_threaded
def collate_segmentation(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and maps; instance targets stay a list (their counts differ per image)."""
    batch = {
        "image": torch.stack([s["image"] for s in samples]),  # [B, 3, H, W]
        "semantic": torch.stack([s["semantic"] for s in samples]),  # [B, H, W]
        "image_id": torch.stack([s["image_id"] for s in samples]),  # [B]
    }
    if "instances" in samples[0]:
        batch["instances"] = [s["instances"] for s in samples]
    return batch


@DATAMODULES.register("coco")
class CocoDataModule(BaseDataModule):
    task = "segmentation"
    config_cls = CocoConfig

    def __init__(self, cfg: Any, *, cache_dir: Path, seed: int) -> None:
        super().__init__(cfg, cache_dir=cache_dir, seed=seed)
        self._splits: dict[str, CocoSplit] = {}
        self._label_map: LabelMap | None = None

    def dataset_root(self) -> Path:
        return require_root(self.cfg.root, self.cfg.name, LAYOUT)

    def split_names(self) -> dict[str, str]:
        return {"train": self.cfg.train_split, "val": self.cfg.val_split}

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            ann_file, image_dir = self._paths(split)
            if not ann_file.is_file():
                raise DataError(f"annotation file is missing: {ann_file} (data={self.cfg.name} expects {LAYOUT})")
            if not image_dir.is_dir():
                raise DataError(f"image folder is missing: {image_dir} (data={self.cfg.name} expects {LAYOUT})")

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_segmentation(samples)

    def label_map(self) -> LabelMap:
        if self._label_map is None:
            train = self._split("train")
            self._label_map = build_label_map(
                train.categories,
                class_subset=None if self.cfg.class_subset is None else list(self.cfg.class_subset),
                group_by_supercategory=self.cfg.group_by_supercategory,
                other_classes=self.cfg.other_classes,
                source=train.ann_file,
            )
        return self._label_map

    def _build_info(self) -> DataInfo:
        label_map = self.label_map()
        return DataInfo(
            task="segmentation",
            num_classes=len(label_map.class_names) + 1,
            in_channels=3,
            image_size=(self.cfg.image_size, self.cfg.image_size),
            ignore_index=IGNORE_INDEX,
            class_names=("background", *label_map.class_names),
            category_ids=label_map.category_ids,
            instances=self.cfg.instances,
            overlap_rule=self.cfg.overlap_rule,
        )

    def _build_split(self, split: str) -> CocoSegmentationDataset:
        self.prepare_data()
        coco_split = self._split(split)
        label_map = self.label_map()
        images = coco_split.images
        if split == "train" and self.cfg.drop_empty_train:
            images = [img for img in images if has_kept_instance(coco_split.anns_by_image[img["id"]], label_map)]
        images = limited(images, self.cfg.train_limit if split == "train" else self.cfg.val_limit)
        nonempty(images, f"{split} split of data={self.cfg.name}", coco_split.ann_file)
        _check_image_files(coco_split, images)
        transform = SegmentationTransform(
            size=self.cfg.image_size,
            train=split == "train",
            mean=tuple(self.cfg.mean),
            std=tuple(self.cfg.std),
            scale_range=(self.cfg.train_scale[0], self.cfg.train_scale[1]),
            hflip=self.cfg.hflip,
        )
        return CocoSegmentationDataset(coco_split, images, label_map, transform, instances=self.cfg.instances,
                                       overlap_rule=self.cfg.overlap_rule, base_seed=self.seed)

    def _paths(self, split: str) -> tuple[Path, Path]:
        root = self.dataset_root()
        name = self.split_names()[split]
        return root / "annotations" / f"instances_{name}.json", root / name

    def _split(self, split: str) -> CocoSplit:
        if split not in self._splits:
            ann_file, image_dir = self._paths(split)
            self._splits[split] = load_coco_split(ann_file, image_dir)
            if split != "train":
                check_same_categories(self._split("train"), self._splits[split])
        return self._splits[split]


def _check_image_files(split: CocoSplit, images: list[dict[str, Any]]) -> None:
    """Every listed image file exists and is not empty (one ``stat`` each, no decoding)."""
    missing, empty = [], []
    for img in images:
        path = split.image_dir / img["file_name"]
        try:
            if path.stat().st_size == 0:
                empty.append(path)
        except OSError:
            missing.append(path)
    if missing:
        raise DataError(f"{len(missing)} image file(s) listed in {split.ann_file} are missing, e.g. {missing[0]}")
    if empty:
        raise DataError(f"{len(empty)} image file(s) listed in {split.ann_file} are empty (0 bytes), e.g. {empty[0]}")
