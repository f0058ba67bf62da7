"""COCO mask AP of instance predictions through pycocotools' ``COCOeval`` (``iouType="segm"``), built in memory.

Why pycocotools and not a re-implementation: mask AP is defined by that code (101-point interpolation, IoU
thresholds 0.50:0.05:0.95, crowd handling, 100 detections per image), and the numbers must be comparable with
published ones. Load-bearing details:

* Ground truth is rebuilt from the validation batches (after the data set's transforms), so AP is measured at the
  resolution the model sees. Annotation ids start at 1: ``COCOeval`` marks a match by storing the matched id, so an
  id of 0 would read as "unmatched".
* Crowd regions arrive as one ignore map per image without a category; each becomes one ``iscrowd=1`` annotation
  per category, so a prediction lying on a crowd region is ignored (neither true nor false positive) whatever its
  class. This is slightly more lenient than COCO's per-category crowd boxes for predictions of another class.
* Masks are RLE-encoded with ``pycocotools.mask.encode`` on Fortran-ordered uint8 arrays (C order is refused).
* A split without any non-crowd instance has no AP: ``compute`` returns an empty dict.
* Predictions are kept per process; in multi-device runs each process evaluates its own shard.
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed RLE of a binary mask [H, W]."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


class CocoMaskEvaluator:
    """Accumulate per-image ground truth and predictions, then ``compute()`` {"mask_ap", "mask_ap50", "mask_ap75"}."""

    def __init__(self, category_ids: Sequence[int]) -> None:
        self.category_ids = tuple(int(c) for c in category_ids)  # contiguous thing label -> COCO category id
        self.reset()

    def reset(self) -> None:
        self._images: list[dict] = []
        self._gt: list[dict] = []
        self._dt: list[dict] = []

    def add_image(self, image_id: int, gt_masks: np.ndarray, gt_labels: np.ndarray, crowd: np.ndarray | None,
                  pred_masks: np.ndarray, pred_scores: np.ndarray, pred_labels: np.ndarray) -> None:
        """gt_masks [N, H, W] (N may be 0) and pred_masks [M, H, W] binary; labels are contiguous thing ids;
        crowd [H, W] or None."""
        height, width = gt_masks.shape[-2:]
        self._images.append({"id": int(image_id), "height": int(height), "width": int(width)})
        for mask, label in zip(gt_masks, gt_labels):
            self._add_gt(image_id, mask, self.category_ids[int(label)], iscrowd=0)
        if crowd is not None and crowd.any():
            for category_id in self.category_ids:
                self._add_gt(image_id, crowd, category_id, iscrowd=1)
        for mask, score, label in zip(pred_masks, pred_scores, pred_labels):
            self._dt.append({"image_id": int(image_id), "category_id": self.category_ids[int(label)],
                             "segmentation": encode_mask(mask), "score": float(score)})

    def _add_gt(self, image_id: int, mask: np.ndarray, category_id: int, iscrowd: int) -> None:
        area = float(mask.sum())
        if area == 0:
            return
        self._gt.append({"id": len(self._gt) + 1, "image_id": int(image_id), "category_id": category_id,
                         "segmentation": encode_mask(mask), "area": area, "iscrowd": iscrowd})

    def compute(self) -> dict[str, float]:
        if not any(ann["iscrowd"] == 0 for ann in self._gt):
            return {}
        if not self._dt:
            return {"mask_ap": 0.0, "mask_ap50": 0.0, "mask_ap75": 0.0}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            gt = COCO()
            gt.dataset = {"images": self._images, "annotations": self._gt,
                          "categories": [{"id": c, "name": str(c)} for c in self.category_ids]}
            gt.createIndex()
            dt = gt.loadRes(self._dt)
            evaluator = COCOeval(gt, dt, iouType="segm")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        ap, ap50, ap75 = (float(v) for v in evaluator.stats[:3])
        return {"mask_ap": ap, "mask_ap50": ap50, "mask_ap75": ap75}
