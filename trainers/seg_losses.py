"""Segmentation losses: semantic CE + soft Dice, and Hungarian-matched losses for the query mask head.

Why these: CE alone under-weights small classes, Dice alone is noisy early; their sum is the usual UNet recipe.
The instance head predicts an unordered set of Q (class, mask) pairs, so each ground-truth instance is first
assigned to one query by minimum total cost (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``), as in
DETR/MaskFormer. Load-bearing details:

* Pixels labelled ``ignore_index`` (crowd, overlaps, padding) count in neither semantic loss; crowd pixels
  (``instances[b]["ignore"]``) count in neither the matching cost nor the mask losses.
* Soft Dice is averaged over all classes with smoothing 1: a class absent from target and prediction scores 1.
* Matching cost = ``class_weight * (-p(class))`` + ``mask_bce_weight * BCE`` + ``mask_dice_weight * Dice``, the
  same weights as the losses. Unmatched queries learn the "no object" class (index K) with ``no_object_weight``.
* Mask losses are summed over matched pairs and divided by the number of matched pairs in the batch.
* Losses are computed in float32 whatever the autocast dtype.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from conf.schemas.model import SegmentationLossConfig


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of (2 |P*T| + s) / (|P| + |T| + s); logits [B, C, H, W], target [B, H, W]."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # [B, 1, H, W]
    probs = logits.float().softmax(dim=1) * valid  # [B, C, H, W]
    onehot = F.one_hot(torch.where(valid.squeeze(1), target, 0), num_classes).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)  # [C]
    dice = (2 * intersection + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)  # [C]
    return 1.0 - dice.mean()


def semantic_losses(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                    cfg: SegmentationLossConfig) -> dict[str, torch.Tensor]:
    """{"ce", "dice", "semantic"}: logits [B, C, H, W], target [B, H, W]; "semantic" is the weighted sum."""
    logits = logits.float()
    if bool((target != ignore_index).any()):
        ce = F.cross_entropy(logits, target, ignore_index=ignore_index)
    else:
        ce = logits.sum() * 0.0  # every pixel ignored: no signal, but keep the graph
    dice = soft_dice_loss(logits, target, ignore_index)
    return {"ce": ce, "dice": dice, "semantic": cfg.ce_weight * ce + cfg.dice_weight * dice}


@torch.no_grad()
def matching_cost(class_logits: torch.Tensor, mask_logits: torch.Tensor, gt_labels: torch.Tensor,
                  gt_masks: torch.Tensor, cfg: SegmentationLossConfig) -> torch.Tensor:
    """Cost [Q, N] of assigning query q to instance n.

    class_logits [Q, K+1], mask_logits [Q, P] and gt_masks [N, P] over the P valid pixels, gt_labels [N].
    """
    class_cost = -class_logits.float().softmax(-1)[:, gt_labels]  # [Q, N]
    logits = mask_logits.float()
    targets = gt_masks.float()
    pixels = max(logits.shape[1], 1)
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), averaged over pixels, for every (q, n) pair at once
    bce_cost = (F.softplus(-logits) @ targets.t() + F.softplus(logits) @ (1 - targets).t()) / pixels  # [Q, N]
    probs = logits.sigmoid()
    dice_cost = 1 - (2 * probs @ targets.t() + 1) / (probs.sum(-1, keepdim=True) + targets.sum(-1)[None] + 1)
    return cfg.class_weight * class_cost + cfg.mask_bce_weight * bce_cost + cfg.mask_dice_weight * dice_cost


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of cost [Q, N]: (query indices, instance indices), min(Q, N) pairs."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy().astype(np.float64))
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def _mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed per-pair BCE (mean over pixels) and Dice losses; logits, targets [M, P]."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)  # [M]
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)  # [M]
    return bce.sum(), dice.sum()


def instance_losses(class_logits: torch.Tensor, mask_logits: torch.Tensor, instances: list[dict[str, torch.Tensor]],
                    cfg: SegmentationLossConfig) -> dict[str, torch.Tensor]:
    """{"query_class", "mask_bce", "mask_dice", "instance"} for class_logits [B, Q, K+1], mask_logits [B, Q, H, W].

    ``instances`` follows the batch contract (``data/info.py``): per image ``masks`` [N, H, W], ``labels`` [N],
    ``ignore`` [H, W].
    """
    batch, num_queries, num_outcomes = class_logits.shape
    no_object = num_outcomes - 1
    target_classes = torch.full((batch, num_queries), no_object, dtype=torch.long, device=class_logits.device)
    bce_sum = dice_sum = mask_logits.new_zeros((), dtype=torch.float32)
    matched = 0
    for b, inst in enumerate(instances):
        labels = inst["labels"].to(class_logits.device)
        if labels.numel() == 0:
            continue
        valid = ~inst["ignore"].to(mask_logits.device).bool().flatten()  # [H*W]
        pred = mask_logits[b].flatten(1)[:, valid].float()  # [Q, P]
        gt = inst["masks"].to(mask_logits.device).flatten(1)[:, valid].float()  # [N, P]
        queries, targets = hungarian_match(matching_cost(class_logits[b], pred, labels, gt, cfg))
        queries, targets = queries.to(labels.device), targets.to(labels.device)
        target_classes[b, queries] = labels[targets]
        bce, dice = _mask_losses(pred[queries], gt[targets])
        bce_sum, dice_sum = bce_sum + bce, dice_sum + dice
        matched += len(queries)
    weights = torch.ones(num_outcomes, device=class_logits.device)
    weights[no_object] = cfg.no_object_weight
    class_loss = F.cross_entropy(class_logits.float().flatten(0, 1), target_classes.flatten(), weight=weights)
    if matched == 0:
        bce_sum = dice_sum = mask_logits.float().sum() * 0.0  # no instances in the batch: keep the graph
    bce_loss, dice_loss = bce_sum / max(matched, 1), dice_sum / max(matched, 1)
    total = cfg.class_weight * class_loss + cfg.mask_bce_weight * bce_loss + cfg.mask_dice_weight * dice_loss
    return {"query_class": class_loss, "mask_bce": bce_loss, "mask_dice": dice_loss, "instance": total}
