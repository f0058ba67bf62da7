"""Read a COCO instances JSON once, check it, and map its categories to contiguous training labels.

Why our own reader around pycocotools' format instead of ``COCO(path)``: ``COCO`` raises a bare ``JSONDecodeError``
for a corrupt file, accepts records that crash later (a 4-number polygon is taken for a bbox by ``frPyObjects``
and fails with ``TypeError``), and does not say which file or record is wrong. Here the file is parsed exactly once
(DataLoader workers inherit the parsed index), every problem raises ``DataError`` naming the file and the record, and
degenerate polygon parts (fewer than 6 numbers, i.e. < 3 points, or an odd count) are dropped as detectron2 does.

Category mapping (never hard-coded): categories sorted by id; thing ids 0..K-1 follow that order, or the order of
``class_subset`` when given; semantic labels are thing id + 1 with 0 = background. With ``group_by_supercategory``
the classes are the supercategories, ordered by their smallest category id; a group has no single COCO id, so
``category_ids`` is then 1..K. Categories left out by ``class_subset`` map to ``DROPPED`` and become background or
ignore (``other_classes``, see ``data/coco_targets.py``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conf.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DROPPED = -1
MAX_CLASSES = 254  # semantic maps are uint8 with 255 = ignore, so background + 254 classes at most


@dataclass(frozen=True)
class LabelMap:
    class_names: tuple[str, ...]  # [K] thing class names; index = contiguous thing id
    category_ids: tuple[int, ...]  # [K] COCO category id of each thing id (1..K when grouped)
    thing_of: dict[int, int]  # COCO category id -> thing id, or DROPPED
    other_classes: str  # "background" | "ignore": what DROPPED categories become


@dataclass
class CocoSplit:
    """One parsed annotation file: images sorted by id, their usable annotations, the categories sorted by id."""

    ann_file: Path
    image_dir: Path
    images: list[dict[str, Any]]
    anns_by_image: dict[int, list[dict[str, Any]]]
    categories: list[dict[str, Any]]


def load_coco_split(ann_file: Path, image_dir: Path) -> CocoSplit:
    data = _read_json(ann_file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file} is not a COCO instances file: it has no '{key}' list")
    categories = sorted((_check_category(c, ann_file) for c in data["categories"]), key=lambda c: c["id"])
    if not categories:
        raise DataError(f"{ann_file} lists no categories")
    category_ids = {c["id"] for c in categories}
    if len(category_ids) != len(categories):
        raise DataError(f"{ann_file} lists a category id twice")
    images = sorted((_check_image(i, ann_file) for i in data["images"]), key=lambda i: i["id"])
    sizes = {img["id"]: (img["height"], img["width"]) for img in images}
    if len(sizes) != len(images):
        raise DataError(f"{ann_file} lists an image id twice")
    anns_by_image: dict[int, list[dict[str, Any]]] = {img_id: [] for img_id in sizes}
    dropped = 0
    for ann in data["annotations"]:
        checked = _check_annotation(ann, ann_file, sizes, category_ids)
        if checked is None:
            dropped += 1
        else:
            anns_by_image[checked["image_id"]].append(checked)
    if dropped:
        log.warning("%s: dropped %d annotations whose polygons have fewer than 3 points", ann_file, dropped)
    return CocoSplit(ann_file, image_dir, images, anns_by_image, categories)


def build_label_map(
    categories: list[dict[str, Any]],
    *,
    class_subset: list[str] | None,
    group_by_supercategory: bool,
    other_classes: str,
    source: Path,
) -> LabelMap:
    """Contiguous thing ids for ``categories`` (sorted by id) under the subset/grouping options."""
    class_of = {c["id"]: (c.get("supercategory") or c["name"]) if group_by_supercategory else c["name"]
                for c in categories}
    available: list[str] = []
    for c in categories:  # sorted by id: groups come in the order of their smallest category id
        if class_of[c["id"]] not in available:
            available.append(class_of[c["id"]])
    if not group_by_supercategory and len(available) != len(categories):
        raise DataError(f"{source} gives two categories the same name; class names must be unique")
    if class_subset is None:
        names = available
    else:
        unknown = [n for n in class_subset if n not in available]
        if unknown:
            kind = "supercategory" if group_by_supercategory else "category"
            raise ConfigError(
                f"data.class_subset: {unknown[0]!r} is not a {kind} of {source}; valid choices: {', '.join(available)}"
            )
        names = list(class_subset)
    if len(names) > MAX_CLASSES:
        raise DataError(f"{source} has {len(names)} classes; at most {MAX_CLASSES} fit a uint8 label map")
    thing_id = {name: i for i, name in enumerate(names)}
    thing_of = {cat_id: thing_id.get(name, DROPPED) for cat_id, name in class_of.items()}
    if group_by_supercategory:
        category_ids = tuple(range(1, len(names) + 1))
    else:
        id_of_name = {c["name"]: c["id"] for c in categories}
        category_ids = tuple(id_of_name[n] for n in names)
    return LabelMap(tuple(names), category_ids, thing_of, other_classes)


def check_same_categories(train: CocoSplit, other: CocoSplit) -> None:
    """Every category of ``other`` must exist in ``train`` with the same name (labels come from the train file)."""
    train_names = {c["id"]: c["name"] for c in train.categories}
    for c in other.categories:
        if train_names.get(c["id"]) != c["name"]:
            raise DataError(
                f"category {c['id']} ({c['name']!r}) of {other.ann_file} is not category {c['id']} of "
                f"{train.ann_file} ({train_names.get(c['id'])!r}); both files must share one category list"
            )


def has_kept_instance(anns: list[dict[str, Any]], label_map: LabelMap) -> bool:
    return any(not a["iscrowd"] and label_map.thing_of[a["category_id"]] != DROPPED for a in anns)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file is missing: {path} (expected a COCO instances JSON)") from None
    except IsADirectoryError:
        raise DataError(f"annotation file {path} is a folder; expected a COCO instances JSON file") from None
    except OSError as exc:
        raise DataError(f"cannot read annotation file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"annotation file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"annotation file {path} is not valid JSON text: {exc.reason}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a COCO instances file: the top level is not an object")
    return data


def _check_category(cat: Any, ann_file: Path) -> dict[str, Any]:
    if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
        raise DataError(f"{ann_file}: category {cat!r} needs an integer 'id' and a string 'name'")
    return cat


def _check_image(img: Any, ann_file: Path) -> dict[str, Any]:
    if not isinstance(img, dict) or any(not isinstance(img.get(k), int) for k in ("id", "height", "width")) \
            or not isinstance(img.get("file_name"), str):
        raise DataError(f"{ann_file}: image record {img!r} needs integer 'id', 'height', 'width' and a 'file_name'")
    if img["height"] <= 0 or img["width"] <= 0:
        raise DataError(f"{ann_file}: image {img['file_name']} (id {img['id']}) has zero size "
                        f"{img['width']}x{img['height']}")
    return img


def _check_annotation(
    ann: Any, ann_file: Path, sizes: dict[int, tuple[int, int]], category_ids: set[int]
) -> dict[str, Any] | None:
    """The annotation with its usable polygon parts, or None if no polygon part has 3 points."""
    if not isinstance(ann, dict) or "segmentation" not in ann:
        raise DataError(f"{ann_file}: annotation {_ann_name(ann)} has no 'segmentation'")
    name = _ann_name(ann)
    if ann.get("image_id") not in sizes:
        raise DataError(f"{ann_file}: annotation {name} refers to image_id {ann.get('image_id')!r}, "
                        f"which is not in 'images'")
    if ann.get("category_id") not in category_ids:
        raise DataError(f"{ann_file}: annotation {name} has category_id {ann.get('category_id')!r}, "
                        f"which is not in 'categories'")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise DataError(f"{ann_file}: annotation {name} has iscrowd={iscrowd!r}; valid choices: 0, 1")
    segm = ann["segmentation"]
    height, width = sizes[ann["image_id"]]
    if isinstance(segm, list):
        parts = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            return None
        segm = parts
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise DataError(f"{ann_file}: annotation {name} has an RLE of size {segm['size']} but its image is "
                            f"{height}x{width} (height x width)")
    else:
        raise DataError(f"{ann_file}: annotation {name} has a segmentation that is neither a polygon list nor an RLE")
    return {"id": ann.get("id"), "image_id": ann["image_id"], "category_id": ann["category_id"],
            "iscrowd": iscrowd, "segmentation": segm}


def _ann_name(ann: Any) -> str:
    return f"id {ann.get('id')!r}" if isinstance(ann, dict) else repr(ann)[:60]
