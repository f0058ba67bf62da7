"""Segmentation task: semantic CE + Dice, optional Hungarian-matched instance losses; mIoU, Dice and COCO mask AP.

Why these metrics: mIoU and Dice are what the UNet FP4 study reports; mask AP (COCO definition) tells whether FP4
hurts the instance head's ranking and boundaries, which mIoU does not see. Load-bearing details:

* mIoU and Dice are accumulated over the whole split (confusion-matrix style, not per image) with
  ``ignore_index`` pixels left out, macro-averaged over the classes present in target or prediction, background
  included: ``MulticlassJaccardIndex`` and ``MulticlassF1Score`` (per-class F1 over pixels is the Dice score).
* The instance branch runs only when the model has the instance head *and* the batch carries ``instances``;
  otherwise a one-time warning says what is skipped.
* Instance predictions for AP: every (query, thing class) pair is a candidate scored by
  p(class) * mean mask probability inside its binarised mask (sigmoid > 0.5); the top ``min(100, Q*K)``
  non-empty candidates per image go to ``COCOeval``.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from conf.schemas.model import UNetConfig
from conf.schemas.root import OptimConfig
from data.info import DataInfo
from trainers.base import TaskModule
from trainers.coco_eval import CocoMaskEvaluator
from trainers.seg_losses import instance_losses, semantic_losses

MAX_DETECTIONS = 100  # COCOeval's largest maxDets


def query_detections(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                     max_detections: int = MAX_DETECTIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks bool [M, H, W], scores [M], thing labels [M]) from one image's class_logits [Q, K+1], mask_logits [Q, H, W]."""
    class_probs = class_logits.float().softmax(-1)[:, :-1]  # [Q, K], "no object" dropped
    mask_probs = mask_logits.float().sigmoid()  # [Q, H, W]
    masks = mask_probs > 0.5
    mask_scores = (mask_probs * masks).flatten(1).sum(-1) / masks.flatten(1).sum(-1).clamp(min=1)  # [Q]
    scores = (class_probs * mask_scores[:, None]).flatten()  # [Q*K], query-major
    num_things = class_probs.shape[1]
    top = scores.topk(min(max_detections, scores.numel())).indices
    queries, labels = top // num_things, top % num_things
    keep = masks[queries].flatten(1).any(-1)
    return masks[queries][keep], scores[top][keep], labels[keep]


class SegmentationTask(TaskModule):
    monitor = "val/miou"
    monitor_mode = "max"

    def __init__(self, model: nn.Module, info: DataInfo, model_cfg: UNetConfig, optim_cfg: OptimConfig) -> None:
        super().__init__(model, info, model_cfg, optim_cfg)
        self.loss_cfg = model_cfg.loss
        self.ignore_index = info.ignore_index
        self.metrics = nn.ModuleDict({split: self._metrics(split, info) for split in ("val", "test")})
        num_things = info.num_classes - 1
        self.coco = CocoMaskEvaluator(info.category_ids or range(1, num_things + 1))
        self._warned_no_instances = False

    @staticmethod
    def _metrics(split: str, info: DataInfo) -> MetricCollection:
        kwargs = {"num_classes": info.num_classes, "ignore_index": info.ignore_index, "average": "macro"}
        return MetricCollection(
            {"miou": MulticlassJaccardIndex(**kwargs), "dice": MulticlassF1Score(multidim_average="global", **kwargs)},
            prefix=f"{split}/",
        )

    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        return self.model(image)

    def _losses(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        losses = semantic_losses(outputs["semantic"], batch["semantic"], self.ignore_index, self.loss_cfg)
        loss = losses["semantic"]
        if self._instance_branch(outputs, batch):
            inst = instance_losses(outputs["instance"]["class_logits"], outputs["instance"]["mask_logits"],
                                   batch["instances"], self.loss_cfg)
            losses.update(inst)
            loss = loss + self.loss_cfg.instance_weight * inst["instance"]
        losses["loss"] = loss
        return losses

    def _instance_branch(self, outputs: dict[str, Any], batch: dict[str, Any]) -> bool:
        if "instance" not in outputs:
            return False
        if "instances" in batch:
            return True
        if not self._warned_no_instances:
            rank_zero_warn("the model has an instance head but the batches carry no `instances`: the instance loss "
                           "and mask AP are skipped (ask the data set for instance targets)")
            self._warned_no_instances = True
        return False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        batch_size = batch["image"].shape[0]
        losses = self._losses(self(batch["image"]), batch)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items() if k != "loss"}, batch_size=batch_size)
        self.log_lr(batch_size)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        batch_size = batch["image"].shape[0]
        outputs = self(batch["image"])
        losses = self._losses(outputs, batch)
        self.log(f"{split}/loss", losses["loss"], prog_bar=split == "val", batch_size=batch_size)
        self.metrics[split].update(outputs["semantic"].argmax(1), batch["semantic"])
        if self._instance_branch(outputs, batch):
            self._add_detections(outputs["instance"], batch)

    def _add_detections(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        for b, inst in enumerate(batch["instances"]):
            masks, scores, labels = query_detections(outputs["class_logits"][b], outputs["mask_logits"][b])
            self.coco.add_image(
                int(batch["image_id"][b]), inst["masks"].cpu().numpy(), inst["labels"].cpu().numpy(),
                inst["ignore"].cpu().numpy(), masks.cpu().numpy(), scores.cpu().numpy(), labels.cpu().numpy(),
            )

    def on_validation_epoch_start(self) -> None:
        self.coco.reset()

    def on_test_epoch_start(self) -> None:
        self.coco.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_epoch_metrics(self, split: str) -> None:
        semantic = self.metrics[split].compute()
        self.metrics[split].reset()
        self.log_dict(semantic, prog_bar=split == "val")
        mask_ap = self.coco.compute()
        self.coco.reset()
        if mask_ap:
            self.log(f"{split}/mask_ap", mask_ap.pop("mask_ap"), prog_bar=split == "val")
            self.log_dict({f"{split}/{k}": v for k, v in mask_ap.items()})
