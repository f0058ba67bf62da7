"""The COCO loader against pycocotools' ``annToMask`` on a hand-written COCO set (see conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import data
from conf.errors import ConfigError
from conf.schemas.data import CocoConfig
from data.transforms import IGNORE_INDEX

from conftest import CATEGORIES, PALETTE, reference_coco, reference_masks, reference_semantic  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build(root, tmp_path, **overrides):
    cfg = CocoConfig(root=str(root), **{"image_size": 50, "batch_size": 2, **overrides})
    dm = data.build_datamodule(cfg, cache_dir=tmp_path / "cache", seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def val_sample(dm, image_id):
    ids = [img["id"] for img in dm.val_set.images]
    return dm.val_set[ids.index(image_id)]


@pytest.mark.parametrize("rule", ["ignore", "area_desc"])
def test_semantic_and_instances_match_annToMask(coco_root, tmp_path, rule):
    dm = build(coco_root, tmp_path, overlap_rule=rule)
    coco = reference_coco(coco_root / "annotations" / "instances_val2017.json")
    thing_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    assert dm.info.class_names == ("background", "person", "car", "dog")
    assert dm.info.category_ids == (1, 3, 7)
    assert dm.info.num_classes == 4 and dm.info.overlap_rule == rule and dm.info.instances
    for image_id, (h, w) in {11: (40, 50), 7: (30, 20), 30: (24, 24)}.items():
        pairs = reference_masks(coco, image_id)
        sample = val_sample(dm, image_id)
        # eval transform: long side -> 50, so image 11 keeps its pixel grid; the others are resized
        if image_id == 11:
            expected = reference_semantic(pairs, thing_of, rule)
            assert torch.equal(sample["semantic"][:h, :w], torch.from_numpy(expected))
            assert (sample["semantic"][h:] == IGNORE_INDEX).all()  # padding
            kept = [(a, m) for a, m in pairs if not a["iscrowd"]]
            inst = sample["instances"]
            assert [int(x) for x in inst["labels"]] == [thing_of[a["category_id"]] for a, _ in kept]
            for k, (_, m) in enumerate(kept):
                assert torch.equal(inst["masks"][k, :h, :w], torch.from_numpy(m))
                ys, xs = np.nonzero(m)
                assert inst["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            crowd = sum(m for a, m in pairs if a["iscrowd"])
            assert torch.equal(inst["ignore"][:h, :w], torch.from_numpy(crowd.astype(np.uint8)))
            assert inst["masks"].dtype == torch.uint8 and inst["boxes"].dtype == torch.float32
        assert sample["image"].shape == (3, 50, 50) and sample["image"].dtype == torch.float32
        assert sample["semantic"].dtype == torch.int64 and int(sample["image_id"]) == image_id


def test_rules_are_visible_in_the_labels(coco_root, tmp_path):
    """The fixture's overlaps really exercise the rules: person/car overlap, dog inside car, crowd, dropped polygon."""
    ignore = val_sample(build(coco_root, tmp_path, overlap_rule="ignore"), 11)["semantic"]
    area = val_sample(build(coco_root, tmp_path, overlap_rule="area_desc"), 11)["semantic"]
    assert ignore[18, 23] == IGNORE_INDEX and area[18, 23] == 2  # person square (larger) vs car: the car on top
    assert ignore[23, 30] == IGNORE_INDEX and area[23, 30] == 3  # dog inside the car triangle: the smaller on top
    assert ignore[34, 44] == IGNORE_INDEX and area[34, 44] == IGNORE_INDEX  # crowd
    assert ignore[24, 12] == 1  # two person instances overlap: same class, label kept
    assert ignore[1, 1] == 0 and ignore[5, 45] == 2  # dropped degenerate annotation; second part of the car


def test_image_pixels_are_read_exactly(coco_root, tmp_path):
    from PIL import Image

    dm = build(coco_root, tmp_path)
    sample = val_sample(dm, 11)
    pixels = np.array(Image.open(coco_root / "val2017" / "a.png").convert("RGB"))
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    assert torch.allclose(sample["image"][:, :40, :50], expected, atol=1e-6)
    gray = val_sample(dm, 7)["image"][:, :, :33]  # grayscale 20x30 -> 33x50, three equal channels before normalising
    raw = gray * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_train_transforms_keep_masks_aligned(painted_coco_root, tmp_path):
    """Images painted from their labels: after random scale/crop/flip, pixel colour still says the label."""
    dm = build(painted_coco_root, tmp_path, overlap_rule="area_desc", train_scale=[0.6, 1.6], image_size=32)
    palette = torch.tensor(PALETTE[:4], dtype=torch.float32) / 255  # [4, 3]
    agree = total = 0
    for epoch in range(6):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            rgb = batch["image"] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
            nearest = torch.cdist(rgb.permute(0, 2, 3, 1).reshape(-1, 3), palette).argmin(1)  # [B*H*W]
            labels = batch["semantic"].reshape(-1)
            valid = labels != IGNORE_INDEX
            agree += int((nearest[valid] == labels[valid]).sum())
            total += int(valid.sum())
            for inst, sem in zip(batch["instances"], batch["semantic"]):
                for mask in inst["masks"]:
                    assert (sem[mask.bool()] != 0).all()  # an instance pixel is never background
    assert total > 2000 and agree / total > 0.95


def test_train_split_drops_empty_images_and_order_is_seeded(coco_root, tmp_path):
    dm = build(coco_root, tmp_path)
    assert sorted(img["id"] for img in dm.train_set.images) == [7, 11]  # 30 has no annotation
    assert [img["id"] for img in dm.val_set.images] == [7, 11, 30]  # sorted by id

    def order(seed, epoch):
        other = data.build_datamodule(dm.cfg, cache_dir=tmp_path / "cache", seed=seed)
        other.setup("fit")
        loader = other.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [(b["image_id"].tolist(), b["image"].sum().item()) for b in loader]

    assert order(0, 0) == order(0, 0)
    assert any(order(0, 0) != order(0, e) for e in range(1, 6))


def test_class_subset_and_other_classes(coco_root, tmp_path):
    coco = reference_coco(coco_root / "annotations" / "instances_val2017.json")
    pairs = reference_masks(coco, 11)
    for other in ("background", "ignore"):
        dm = build(coco_root, tmp_path, class_subset=["dog", "car"], other_classes=other)
        assert dm.info.class_names == ("background", "dog", "car") and dm.info.category_ids == (7, 3)
        expected = reference_semantic(pairs, {7: 0, 3: 1}, "ignore", other=other)
        sample = val_sample(dm, 11)
        assert torch.equal(sample["semantic"][:40, :50], torch.from_numpy(expected))
        assert sorted(sample["instances"]["labels"].tolist()) == [0, 1]
        assert not sample["instances"]["ignore"].any()  # the crowd is a person crowd: not a kept class
    with pytest.raises(ConfigError, match="'truck' is not a category.*valid choices: person, car, dog"):
        build(coco_root, tmp_path, class_subset=["truck"]).info


def test_group_by_supercategory(coco_root, tmp_path):
    dm = build(coco_root, tmp_path, group_by_supercategory=True, class_subset=["vehicle", "animal"])
    assert dm.info.class_names == ("background", "vehicle", "animal") and dm.info.category_ids == (1, 2)
    all_groups = build(coco_root, tmp_path, group_by_supercategory=True)
    assert all_groups.info.class_names == ("background", "person", "vehicle", "animal")


def test_batches_follow_the_contract(coco_root, tmp_path):
    dm = build(coco_root, tmp_path)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 50, 50) and batch["semantic"].shape == (2, 50, 50)
    assert batch["image_id"].dtype == torch.int64 and len(batch["instances"]) == 2
    no_inst = build(coco_root, tmp_path, instances=False)
    assert "instances" not in next(iter(no_inst.val_dataloader())) and not no_inst.info.instances
