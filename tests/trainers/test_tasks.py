"""Task modules: losses and metrics against independent references (numpy, brute force, invariants), COCO mask AP
on hand-made cases, the optimizer rules, and a real 2-step Lightning fit of every task on in-memory data."""
from __future__ import annotations

import itertools
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import models
import trainers
from conf.errors import ConfigError
from conf.schemas.model import LLMConfig, ResNetConfig, SegmentationLossConfig, UNetConfig
from conf.schemas.root import OptimConfig
from data.info import DataInfo
from trainers.coco_eval import CocoMaskEvaluator
from trainers.optim import build_optimizer, build_scheduler, lr_factor, split_decay
from trainers.seg_losses import (hungarian_match, instance_losses, matching_cost, semantic_losses,
                                 soft_dice_loss)
from trainers.segmentation import SegmentationTask, query_detections

IGNORE = 255
LOSS_CFG = SegmentationLossConfig()


# ----------------------------------------------------------------------------------------------- semantic metrics
def _numpy_miou_dice(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Split-level IoU and Dice per class from pixel counts, averaged over classes seen in target or prediction."""
    valid = target != IGNORE
    ious, dices = [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        if tp + fp + fn == 0:
            continue
        ious.append(tp / (tp + fp + fn))
        dices.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(ious)), float(np.mean(dices))


def test_miou_and_dice_match_numpy_on_a_hand_made_pair():
    # 5 classes: class 4 appears nowhere (excluded), class 3 is predicted but absent from the target (IoU 0),
    # ignored pixels carry wrong predictions that must not count.
    target = np.array([[[0, 0, 1, 1], [0, 2, 2, 255], [255, 1, 1, 2]],
                       [[0, 0, 0, 0], [1, 1, 2, 2], [2, 2, 255, 255]]])
    pred = np.array([[[0, 1, 1, 1], [0, 2, 0, 3], [3, 1, 1, 2]],
                     [[0, 0, 3, 0], [1, 2, 2, 2], [2, 0, 1, 1]]])
    info = DataInfo(task="segmentation", num_classes=5)
    metrics = SegmentationTask._metrics("val", info)
    for b in range(2):  # two updates: the metric accumulates over the split
        metrics.update(torch.as_tensor(pred[b : b + 1]), torch.as_tensor(target[b : b + 1]))
    values = metrics.compute()
    miou, dice = _numpy_miou_dice(pred, target, 5)
    assert float(values["val/miou"]) == pytest.approx(miou, abs=1e-6)
    assert float(values["val/dice"]) == pytest.approx(dice, abs=1e-6)
    assert 0 < miou < dice < 1


def test_soft_dice_and_ce_match_float64_numpy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=gen)
    target = torch.randint(0, 3, (2, 5, 6), generator=gen)
    target[0, 0, :4] = IGNORE
    z = logits.double().numpy()
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    t = target.numpy()
    valid = t != IGNORE
    dices = []
    for c in range(3):
        p_c, t_c = probs[:, c] * valid, ((t == c) & valid).astype(float)
        dices.append((2 * (p_c * t_c).sum() + 1) / (p_c.sum() + t_c.sum() + 1))
    expected_dice = 1 - np.mean(dices)
    log_probs = np.log(probs)
    b, h, w = np.nonzero(valid)
    expected_ce = -log_probs[b, t[b, h, w], h, w].mean()
    assert float(soft_dice_loss(logits, target, IGNORE)) == pytest.approx(expected_dice, abs=1e-6)
    losses = semantic_losses(logits, target, IGNORE, SegmentationLossConfig(ce_weight=0.5, dice_weight=2.0))
    assert float(losses["ce"]) == pytest.approx(expected_ce, abs=1e-5)
    assert float(losses["semantic"]) == pytest.approx(0.5 * expected_ce + 2.0 * expected_dice, abs=1e-5)


# ------------------------------------------------------------------------------------ Hungarian matching, losses
def test_hungarian_match_equals_brute_force():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        cost = torch.rand(5, 3, generator=gen)
        rows, cols = hungarian_match(cost)
        best = min(sum(float(cost[q, n]) for n, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
        assert len(rows) == 3 and sorted(cols.tolist()) == [0, 1, 2]
        assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-6)


def _instance_scene(num_queries: int = 6, perm: tuple[int, ...] = (4, 0, 2)):
    """Three ground-truth rectangles; query perm[n] predicts instance n exactly, the other queries predict noise."""
    height, width = 12, 12
    boxes = [(0, 0, 5, 5), (6, 6, 12, 12), (0, 7, 4, 12)]
    labels = torch.tensor([1, 0, 1])
    gt = torch.zeros(3, height, width, dtype=torch.uint8)
    for n, (y0, x0, y1, x1) in enumerate(boxes):
        gt[n, y0:y1, x0:x1] = 1
    gen = torch.Generator().manual_seed(1)
    mask_logits = torch.randn(num_queries, height, width, generator=gen)
    class_logits = torch.zeros(num_queries, 3)
    class_logits[:, 2] = 4.0  # "no object" by default
    for n, q in enumerate(perm):
        mask_logits[q] = torch.where(gt[n].bool(), 12.0, -12.0)
        class_logits[q] = torch.tensor([-4.0, -4.0, -4.0])
        class_logits[q, labels[n]] = 6.0
    ignore = torch.zeros(height, width, dtype=torch.uint8)
    ignore[10:, :4] = 1
    return class_logits, mask_logits, {"masks": gt, "labels": labels, "ignore": ignore}


def test_matching_recovers_the_planted_assignment():
    class_logits, mask_logits, inst = _instance_scene()
    cost = matching_cost(class_logits, mask_logits.flatten(1), inst["labels"], inst["masks"].flatten(1).float(),
                         LOSS_CFG)
    queries, targets = hungarian_match(cost)
    assert dict(zip(targets.tolist(), queries.tolist())) == {0: 4, 1: 0, 2: 2}


def test_instance_losses_are_small_for_perfect_queries_and_invariant_to_query_order():
    class_logits, mask_logits, inst = _instance_scene()
    losses = instance_losses(class_logits[None], mask_logits[None], [inst], LOSS_CFG)
    assert float(losses["mask_bce"]) < 1e-4 and float(losses["mask_dice"]) < 0.05
    assert float(losses["query_class"]) < 0.05
    order = torch.tensor([3, 5, 1, 0, 2, 4])
    shuffled = instance_losses(class_logits[order][None], mask_logits[order][None], [inst], LOSS_CFG)
    for key in losses:
        assert float(shuffled[key]) == pytest.approx(float(losses[key]), rel=1e-5, abs=1e-7)
    noisy = mask_logits.clone()
    noisy[:, inst["ignore"].bool()] = 30.0  # crowd pixels count in neither cost nor loss
    assert float(instance_losses(class_logits[None], noisy[None], [inst], LOSS_CFG)["instance"]) == pytest.approx(
        float(losses["instance"]), rel=1e-6)
    worse = mask_logits.clone()
    worse[4] = -worse[4]  # the query matched to instance 0 now predicts its complement
    assert float(instance_losses(class_logits[None], worse[None], [inst], LOSS_CFG)["instance"]) > float(
        losses["instance"]) + 1.0


# ------------------------------------------------------------------------------------------------- COCO mask AP
def _ap(gt_sets, pred_sets, crowds=None) -> float:
    evaluator = CocoMaskEvaluator(category_ids=(3, 8))
    for image_id, ((gt_masks, gt_labels), (pred_masks, scores, labels)) in enumerate(zip(gt_sets, pred_sets)):
        crowd = crowds[image_id] if crowds else None
        evaluator.add_image(image_id + 10, gt_masks, gt_labels, crowd, pred_masks, scores, labels)
    return evaluator.compute()["mask_ap"]


def _ap_scene():
    _, _, inst = _instance_scene()
    masks, labels = inst["masks"].numpy(), inst["labels"].numpy()
    second = np.zeros((1, 12, 12), np.uint8)
    second[0, 3:9, 3:9] = 1
    gt_sets = [(masks, labels), (second, np.array([0]))]
    perfect = [(masks.astype(bool), np.array([0.9, 0.8, 0.7]), labels),
               (second.astype(bool), np.array([0.95]), np.array([0]))]
    return gt_sets, perfect


def test_mask_ap_is_one_for_perfect_predictions_and_lower_when_perturbed():
    gt_sets, perfect = _ap_scene()
    assert _ap(gt_sets, perfect) == pytest.approx(1.0)
    eroded = perfect[0][0].copy()
    eroded[1, 6:9, :] = False  # instance 1 keeps half its pixels: IoU 0.5, a hit at only one of ten thresholds
    perturbed = [(eroded, perfect[0][1], perfect[0][2]), perfect[1]]
    ap = _ap(gt_sets, perturbed)
    assert 0.5 < ap < 1.0
    wrong_class = [(perfect[0][0], perfect[0][1], 1 - perfect[0][2]), perfect[1]]
    assert _ap(gt_sets, wrong_class) < 0.5


def test_prediction_on_a_crowd_region_is_ignored():
    gt_sets, perfect = _ap_scene()
    crowd = np.zeros((12, 12), np.uint8)
    crowd[9:, :5] = 1
    on_crowd = crowd.astype(bool)[None]
    extra = [(np.concatenate([perfect[0][0], on_crowd]), np.append(perfect[0][1], 0.99), np.append(perfect[0][2], 0)),
             perfect[1]]
    assert _ap(gt_sets, extra, crowds=[crowd, None]) == pytest.approx(1.0)
    assert _ap(gt_sets, extra) < 1.0  # without the crowd annotation the same prediction is a false positive


def test_query_detections_of_perfect_outputs_are_the_ground_truth():
    class_logits, mask_logits, inst = _instance_scene()
    masks, scores, labels = query_detections(class_logits, mask_logits)
    top = {(int(label), m.numpy().tobytes()) for m, label, s in zip(masks, labels, scores) if s > 0.5}
    expected = {(int(label), m.numpy().astype(bool).tobytes()) for m, label in zip(inst["masks"], inst["labels"])}
    assert top == expected
    assert bool((scores[:-1] >= scores[1:]).all())


def test_no_ground_truth_instances_gives_no_ap():
    evaluator = CocoMaskEvaluator(category_ids=(1,))
    evaluator.add_image(1, np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.int64), None,
                        np.ones((1, 4, 4), bool), np.array([0.5]), np.array([0]))
    assert evaluator.compute() == {}


# ---------------------------------------------------------------------------------------------------- optimizer
def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "proj": nn.Linear(8, 8), "norm": nn.LayerNorm(8),
                           "gn": nn.GroupNorm(2, 8), "conv": nn.Conv2d(8, 8, 3)})
    model["head"] = nn.Linear(8, 10, bias=False)
    model["head"].weight = model["emb"].weight  # tied output head
    decay, no_decay = split_decay(model)
    assert decay == ["proj.weight", "conv.weight"]
    assert no_decay == ["emb.weight", "proj.bias", "norm.weight", "norm.bias", "gn.weight", "gn.bias", "conv.bias"]
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert isinstance(build_optimizer(model, OptimConfig(name="sgd", momentum=0.8)), torch.optim.SGD)


def test_lr_schedules_against_hand_computed_values():
    kw = {"warmup_steps": 2, "total_steps": 12, "min_ratio": 0.1}
    assert [lr_factor(s, schedule="cosine", **kw) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(7, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(12, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(7, schedule="linear", **kw) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(50, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="none", **kw) == 1.0
    model = nn.Linear(4, 4)
    optimizer = build_optimizer(model, OptimConfig(lr=0.2))
    scheduler = build_scheduler(optimizer, OptimConfig(lr=0.2, scheduler="linear", warmup_steps=2), total_steps=12)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1, 0.2, 0.2, 0.2 * (1 - 0.9 * 0.1)])
    assert build_scheduler(optimizer, OptimConfig(scheduler="none"), total_steps=float("inf")) is None
    with pytest.raises(ConfigError, match="optim.scheduler=cosine needs the run length"):
        build_scheduler(optimizer, OptimConfig(scheduler="cosine"), total_steps=float("inf"))


# ------------------------------------------------------------------------------------------ 2-step Lightning fits
class InMemoryData(L.LightningDataModule):
    """The same small list of samples for train, val and test, batched following data/info.py's contract."""

    def __init__(self, samples: list[dict], batch_size: int) -> None:
        super().__init__()
        self.samples, self.batch_size = samples, batch_size

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "instances"}
        if "instances" in samples[0]:
            batch["instances"] = [s["instances"] for s in samples]
        return batch

    def _loader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size, collate_fn=self.collate)

    train_dataloader = val_dataloader = test_dataloader = _loader


def _seg_sample(gen: torch.Generator, image_id: int, size: int = 16, instances: bool = True) -> dict:
    semantic = torch.zeros(size, size, dtype=torch.long)
    owners = torch.zeros(size, size, dtype=torch.long)
    masks, labels = [], []
    for _ in range(2):
        y0, x0 = (int(v) for v in torch.randint(0, size - 6, (2,), generator=gen))
        label = int(torch.randint(0, 2, (1,), generator=gen))
        mask = torch.zeros(size, size, dtype=torch.uint8)
        mask[y0 : y0 + 6, x0 : x0 + 6] = 1
        masks.append(mask)
        labels.append(label)
        semantic[mask.bool()] = label + 1
        owners += mask
    ignore = torch.zeros(size, size, dtype=torch.uint8)
    ignore[-2:, -3:] = 1  # a crowd region
    semantic[(owners > 1) | ignore.bool()] = IGNORE
    image = torch.randn(3, size, size, generator=gen) + semantic.clamp(max=3).float()[None]
    sample = {"image": image, "semantic": semantic, "image_id": torch.tensor(image_id)}
    if instances:
        boxes = torch.tensor([[0.0, 0.0, 6.0, 6.0]] * 2)
        sample["instances"] = {"masks": torch.stack(masks), "labels": torch.tensor(labels), "boxes": boxes,
                               "ignore": ignore}
    return sample


def _fit(task: L.LightningModule, data: L.LightningDataModule, precision: str = "32-true") -> dict[str, float]:
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        accelerator="cpu", precision=precision, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(task, datamodule=data, verbose=False)
    return {**metrics, **{k: float(v) for k, v in trainer.callback_metrics.items()}}


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_trained(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "two optimizer steps should move most tensors"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_segmentation_fit_with_instance_head(precision):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    info = DataInfo(task="segmentation", num_classes=3, image_size=(16, 16), category_ids=(4, 9))
    cfg = UNetConfig(depth=2, num_queries=4, query_dim=16, query_heads=2)
    model = models.build_model(cfg, info)
    task = trainers.build_task(model, info, cfg, OptimConfig(warmup_steps=1))
    before = _snapshot(model)
    metrics = _fit(task, InMemoryData([_seg_sample(gen, i) for i in range(4)], batch_size=2), precision)
    assert (task.monitor, task.monitor_mode) == ("val/miou", "max")
    for key in ("train/loss", "train/loss_ce", "train/loss_dice", "train/loss_mask_bce", "train/lr", "val/loss",
                "val/miou", "val/dice", "val/mask_ap", "val/mask_ap50", "test/miou", "test/mask_ap"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0 <= metrics["val/miou"] <= 1 and 0 <= metrics["val/mask_ap"] <= 1
    _assert_trained(before, model)
    assert task.hparams["model"]["loss"]["dice_weight"] == 1.0 and task.hparams["optim"]["warmup_steps"] == 1
    assert task.hparams["data_info"]["num_classes"] == 3


def test_segmentation_fit_without_instance_targets_warns_and_skips_ap():
    gen = torch.Generator().manual_seed(1)
    info = DataInfo(task="segmentation", num_classes=3, image_size=(16, 16))
    cfg = UNetConfig(depth=2, num_queries=4, query_dim=16, query_heads=2)
    task = trainers.build_task(models.build_model(cfg, info), info, cfg, OptimConfig(scheduler="none"))
    data = InMemoryData([_seg_sample(gen, i, instances=False) for i in range(4)], batch_size=2)
    with pytest.warns(UserWarning, match="no `instances`"):
        metrics = _fit(task, data)
    assert "val/miou" in metrics and "val/mask_ap" not in metrics and "train/loss_mask_bce" not in metrics


def test_classification_fit_logs_top1_and_top5():
    gen = torch.Generator().manual_seed(2)
    info = DataInfo(task="classification", num_classes=6, in_channels=1, image_size=(8, 8))
    samples = [{"image": torch.randn(1, 8, 8, generator=gen), "label": torch.tensor(i % 6)} for i in range(8)]
    cfg = ResNetConfig()
    model = models.build_model(cfg, info)
    task = trainers.build_task(model, info, cfg, OptimConfig(name="sgd", lr=0.05))
    before = _snapshot(model)
    metrics = _fit(task, InMemoryData(samples, batch_size=4))
    assert (task.monitor, task.monitor_mode) == ("val/acc1", "max")
    for key in ("train/loss", "train/acc1", "train/lr", "val/loss", "val/acc1", "val/acc5", "test/acc1", "test/acc5"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["val/acc1"] <= metrics["val/acc5"]
    _assert_trained(before, model)
    few = DataInfo(task="classification", num_classes=3, in_channels=1, image_size=(8, 8))
    assert set(trainers.build_task(models.build_model(cfg, few), few, cfg, OptimConfig()).metrics["val"]) == {
        "val/acc1"}


def test_language_model_fit_logs_token_weighted_loss_and_perplexity():
    gen = torch.Generator().manual_seed(3)
    info = DataInfo(task="lm", vocab_size=32, seq_len=8, ignore_index=-100)
    samples = []
    for _ in range(4):
        tokens = torch.randint(0, 32, (9,), generator=gen)
        samples.append({"input_ids": tokens[:-1], "labels": tokens[1:].clone()})
    samples[1]["labels"][-3:] = -100  # fewer labelled tokens in one sequence
    cfg = LLMConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64, max_seq_len=16)
    model = models.build_model(cfg, info)
    task = trainers.build_task(model, info, cfg, OptimConfig(lr=3e-3, warmup_steps=1, scheduler="linear"))
    before = _snapshot(model)
    metrics = _fit(task, InMemoryData(samples, batch_size=2))
    assert (task.monitor, task.monitor_mode) == ("val/loss", "min")
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    _assert_trained(before, model)
    # test/loss is the token-weighted mean over the split: recompute it from the trained model
    task.eval()
    with torch.no_grad():
        logits = torch.cat([task(InMemoryData.collate(samples[i : i + 2])["input_ids"]) for i in (0, 2)])
    labels = torch.stack([s["labels"] for s in samples])
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert metrics["test/loss"] == pytest.approx(float(expected), rel=1e-5)


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="task='detection'.*valid choices: classification, lm, segmentation"):
        trainers.TASKS.get("detection")
