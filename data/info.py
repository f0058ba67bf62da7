"""What a data set tells the model and the task about itself.

Why: models and LightningModules are built from the data set's facts (number of classes, vocabulary, image size)
instead of repeating them in configs, so ``model=unet data=coco`` cannot silently disagree about the class count.

Batch contract (what every DataLoader of a task yields, a dict):

* ``segmentation``: ``image`` float32 [B, 3, H, W] (normalised), ``semantic`` int64 [B, H, W] with 0 = background,
  1..C-1 = classes, ``ignore_index`` (255) = crowd/overlap/padding; ``image_id`` int64 [B]; and, when instance
  targets are requested, ``instances``: a list of B dicts with ``masks`` uint8 [N, H, W], ``labels`` int64 [N]
  (0-based contiguous thing ids), ``boxes`` float32 [N, 4] (x1, y1, x2, y2 in pixels), ``ignore`` uint8 [H, W]
  (crowd regions).
* ``classification``: ``image`` float32 [B, C, H, W], ``label`` int64 [B].
* ``lm``: ``input_ids`` int64 [B, T], ``labels`` int64 [B, T] (inputs shifted by one; ``ignore_index`` -100
  where there is no next token).
"""
from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("segmentation", "classification", "lm")


@dataclass(frozen=True)
class DataInfo:
    task: str  # one of TASKS
    num_classes: int = 0  # segmentation: classes incl. background; classification: classes; lm: 0
    in_channels: int = 3
    image_size: tuple[int, int] | None = None  # (H, W) after transforms
    vocab_size: int = 0  # lm only
    seq_len: int = 0  # lm only
    ignore_index: int = 255  # segmentation 255, lm -100
    class_names: tuple[str, ...] = field(default_factory=tuple)
    # segmentation: contiguous thing-class id (0-based) -> COCO category id, for COCOeval
    category_ids: tuple[int, ...] = field(default_factory=tuple)
    instances: bool = False  # segmentation: batches carry ``instances`` (instance targets were requested)
    # segmentation: how a pixel covered by several instances is labelled (see data/coco_targets.py), e.g. "ignore"
    overlap_rule: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DataInfo.task={self.task!r}; valid choices: {', '.join(TASKS)}")
