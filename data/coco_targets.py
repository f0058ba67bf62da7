"""Rasterise one image's COCO annotations into semantic and instance targets (at the image's own resolution).

The rules (also in ``DataInfo.overlap_rule`` and the README of the data group):

* Masks come from pycocotools: polygon parts -> ``frPyObjects`` + ``merge`` (one object may have several parts),
  uncompressed RLE (list ``counts``) -> ``frPyObjects``, compressed RLE as is; then ``decode``. This is what
  ``COCO.annToMask`` does, which the tests use as the independent reference.
* Semantic map (uint8 [H, W]): 0 background, thing id + 1 for kept classes, 255 ignore.
  - ``overlap_rule="ignore"``: a pixel covered by non-crowd instances of *two or more different classes* is 255
    (torchvision's reference ignores every overlap; overlaps within one class are unambiguous for a semantic label,
    so they keep it). ``overlap_rule="area_desc"``: instances are painted largest area first (area = decoded pixel
    count, ties by annotation id), so smaller objects stay visible on top.
  - Classes left out by ``class_subset``: ``other_classes="background"`` -> background; ``"ignore"`` -> 255 where
    no kept instance covers the pixel.
  - Crowd regions (``iscrowd=1``) of kept classes are 255 over everything else (COCOeval also treats crowd ground
    truth as ignore); crowd regions of left-out classes follow ``other_classes``.
* Instance targets: one binary mask and thing id per non-crowd annotation of a kept class, in annotation order;
  ``ignore`` (uint8 [H, W]) is the union of the kept classes' crowd regions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from data.coco_index import DROPPED, LabelMap

IGNORE = 255


@dataclass
class CocoTargets:
    semantic: np.ndarray  # uint8 [H, W]
    masks: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int64 [N], thing ids
    ignore: np.ndarray  # uint8 [H, W], crowd regions of kept classes


def ann_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Compressed RLE of a polygon list or an (un)compressed RLE, as ``COCO.annToRLE`` builds it."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_masks(anns: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W] masks of ``anns``."""
    if not anns:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = [ann_to_rle(a["segmentation"], height, width) for a in anns]
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))  # [H, W, N] -> [N, H, W]


def rasterize(
    anns: list[dict[str, Any]], height: int, width: int, label_map: LabelMap, overlap_rule: str
) -> CocoTargets:
    kept = [a for a in anns if not a["iscrowd"] and label_map.thing_of[a["category_id"]] != DROPPED]
    dropped = [a for a in anns if not a["iscrowd"] and label_map.thing_of[a["category_id"]] == DROPPED]
    crowd_kept = [a for a in anns if a["iscrowd"] and label_map.thing_of[a["category_id"]] != DROPPED]
    crowd_dropped = [a for a in anns if a["iscrowd"] and label_map.thing_of[a["category_id"]] == DROPPED]

    masks = decode_masks(kept, height, width)  # [N, H, W]
    labels = np.array([label_map.thing_of[a["category_id"]] for a in kept], dtype=np.int64)  # [N]
    semantic = np.zeros((height, width), dtype=np.uint8)
    if overlap_rule == "area_desc":
        areas = masks.sum(axis=(1, 2))  # [N] decoded pixel counts
        order = sorted(range(len(kept)), key=lambda i: (-int(areas[i]), kept[i]["id"] or 0))
        for i in order:
            semantic[masks[i] > 0] = labels[i] + 1
    else:
        classes_here = np.zeros((height, width), dtype=np.int32)  # number of distinct classes covering a pixel
        for thing in np.unique(labels):
            cover = masks[labels == thing].any(axis=0)
            semantic[cover] = thing + 1
            classes_here += cover
        semantic[classes_here > 1] = IGNORE

    if label_map.other_classes == "ignore" and dropped:
        uncovered = ~masks.any(axis=0)  # [H, W]
        semantic[decode_masks(dropped, height, width).any(axis=0) & uncovered] = IGNORE

    ignore = decode_masks(crowd_kept, height, width).any(axis=0).astype(np.uint8)
    semantic[ignore > 0] = IGNORE
    if label_map.other_classes == "ignore" and crowd_dropped:
        semantic[decode_masks(crowd_dropped, height, width).any(axis=0)] = IGNORE
    return CocoTargets(semantic, masks, labels, ignore)
