"""Fixtures for the data tests: a small COCO-format set written by hand, and its pycocotools reference masks.

The synthetic set covers what the loader must get right: a plain polygon, a multi-part polygon whose first part is
degenerate (4 numbers: pycocotools would read it as a bbox and crash), a compressed-RLE object, an uncompressed-RLE
crowd region, overlaps of the same class and of different classes, an annotation made only of a degenerate polygon
(must be dropped), a grayscale image, an image without annotations, category ids with gaps and image ids that are
neither contiguous nor sorted in the file.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 7, "name": "dog", "supercategory": "animal"},
]
# Colours used when an image is painted from its labels (alignment test): background, person, car, dog, crowd.
PALETTE = np.array([[128, 128, 128], [220, 40, 40], [40, 200, 60], [40, 60, 220], [230, 220, 40]], dtype=np.uint8)


def _disk(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def coco_records() -> dict:
    """The synthetic annotation document (same for train and val)."""
    crowd = np.zeros((40, 50), dtype=np.uint8)
    crowd[30:39, 38:50] = 1
    compressed = mask_utils.encode(np.asfortranarray(_disk(40, 50, 30, 12, 6)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    images = [
        {"id": 30, "file_name": "c.png", "height": 24, "width": 24},
        {"id": 11, "file_name": "a.png", "height": 40, "width": 50},
        {"id": 7, "file_name": "b.png", "height": 30, "width": 20},
    ]
    annotations = [
        {"id": 100, "image_id": 11, "category_id": 1, "iscrowd": 0,
         "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]]},
        {"id": 101, "image_id": 11, "category_id": 3, "iscrowd": 0,
         "segmentation": [[30, 30, 31, 31], [20, 15, 40, 15, 30, 35], [42, 2, 48, 2, 48, 10, 42, 10]]},
        {"id": 102, "image_id": 11, "category_id": 1, "iscrowd": 0, "segmentation": compressed},
        {"id": 103, "image_id": 11, "category_id": 7, "iscrowd": 0,
         "segmentation": [[27, 20, 33, 20, 33, 26, 27, 26]]},
        {"id": 104, "image_id": 11, "category_id": 1, "iscrowd": 1, "segmentation": _uncompressed(crowd)},
        {"id": 105, "image_id": 11, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 3, 3]]},
        {"id": 106, "image_id": 7, "category_id": 3, "iscrowd": 0,
         "segmentation": [[2, 3, 17, 3, 17, 20, 2, 26]]},
    ]
    for ann in annotations:
        ann["area"], ann["bbox"] = 0.0, [0, 0, 0, 0]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def reference_coco(ann_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def reference_masks(coco: COCO, image_id: int) -> list[tuple[dict, np.ndarray]]:
    """(annotation, annToMask) for every annotation with a usable polygon (parts < 6 numbers removed first)."""
    out = []
    for ann in coco.imgToAnns[image_id]:
        ann = dict(ann)
        if isinstance(ann["segmentation"], list):
            ann["segmentation"] = [p for p in ann["segmentation"] if len(p) >= 6]
            if not ann["segmentation"]:
                continue
        out.append((ann, coco.annToMask(ann)))
    return out


def reference_semantic(pairs: list[tuple[dict, np.ndarray]], thing_of: dict[int, int], rule: str,
                       other: str = "background") -> np.ndarray:
    """The documented label rule from per-class coverage (independent of data/coco_targets.py's painting)."""
    h, w = pairs[0][1].shape
    kept = [(a, m) for a, m in pairs if not a["iscrowd"] and a["category_id"] in thing_of]
    present = np.zeros((max(thing_of.values()) + 1, h, w), dtype=bool)  # [K, H, W]: class k covers the pixel
    for a, m in kept:
        present[thing_of[a["category_id"]]] |= m > 0
    if rule == "ignore":
        count = present.sum(axis=0)
        out = np.where(count == 1, present.argmax(axis=0) + 1, np.where(count > 1, 255, 0)).astype(np.int64)
    else:
        out = np.zeros((h, w), dtype=np.int64)
        for a, m in sorted(kept, key=lambda am: (-int(am[1].sum()), am[0]["id"])):
            out[m > 0] = thing_of[a["category_id"]] + 1
    covered = present.any(axis=0)
    for a, m in pairs:
        left_out = a["category_id"] not in thing_of
        if other == "ignore" and left_out and not a["iscrowd"]:
            out[(m > 0) & ~covered] = 255
        if a["iscrowd"] and (not left_out or other == "ignore"):
            out[m > 0] = 255
    return out


def write_coco(root: Path, records: dict, painted: bool = False, seed: int = 0) -> Path:
    """Write ``records`` as train2017 and val2017 under ``root``; images are noise, or painted from their labels."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        ann_file = root / "annotations" / f"instances_{split}.json"
        ann_file.write_text(json.dumps(records))
    coco = reference_coco(root / "annotations" / "instances_train2017.json")
    thing_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    for img in records["images"]:
        h, w = img["height"], img["width"]
        if painted:
            pairs = reference_masks(coco, img["id"])
            labels = reference_semantic(pairs, thing_of, "area_desc") if pairs else np.zeros((h, w), np.int64)
            labels[labels == 255] = len(PALETTE) - 1
            pixels = PALETTE[labels]
        else:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if img["file_name"] == "b.png" and not painted:
            image = image.convert("L")
        for split in ("train2017", "val2017"):
            image.save(root / split / img["file_name"])
    return root


@pytest.fixture
def coco_root(tmp_path) -> Path:
    return write_coco(tmp_path / "coco", coco_records())


@pytest.fixture
def painted_coco_root(tmp_path) -> Path:
    return write_coco(tmp_path / "painted", coco_records(), painted=True)
