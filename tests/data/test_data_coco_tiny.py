"""The COCO loader on the shared real slice (``shared/data/coco2017_tiny``): counts, categories, masks, crowd."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import data
from conf.schemas.data import CocoConfig
from data.transforms import IGNORE_INDEX

from conftest import SHARED_DATA, reference_coco, reference_masks, reference_semantic  # noqa: E402

TINY = SHARED_DATA / "coco2017_tiny"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} is absent")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = CocoConfig(root=str(TINY), image_size=640, batch_size=2)
    dm = data.build_datamodule(cfg, cache_dir=tmp_path_factory.mktemp("cache"), seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_counts_and_category_mapping(tiny):
    raw = json.loads((TINY / "annotations" / "instances_train2017.json").read_text())
    ids = sorted(c["id"] for c in raw["categories"])
    assert tiny.info.category_ids == tuple(ids) and len(ids) == 80 and ids[-1] == 90
    assert tiny.info.class_names[:3] == ("background", "person", "bicycle") and tiny.info.num_classes == 81
    with_instance = {a["image_id"] for a in raw["annotations"] if not a["iscrowd"]}
    assert len(tiny.train_set) == len(with_instance) == 286  # 288 images, 2 without annotations
    assert len(tiny.val_set) == 158


def test_masks_and_crowd_match_annToMask(tiny):
    coco = reference_coco(TINY / "annotations" / "instances_val2017.json")
    thing_of = {cat_id: i for i, cat_id in enumerate(tiny.info.category_ids)}
    crowd_images = sorted({a["image_id"] for a in coco.anns.values() if a["iscrowd"]})
    plain_images = sorted({a["image_id"] for a in coco.anns.values()} - set(crowd_images))
    candidates = [i for i in crowd_images[:6] + plain_images[:3] if max(coco.imgs[i]["height"], coco.imgs[i]["width"])
                  == 640]
    assert len(candidates) >= 4
    positions = {img["id"]: k for k, img in enumerate(tiny.val_set.images)}
    crowd_pixels = 0
    for image_id in candidates:
        h, w = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        pairs = reference_masks(coco, image_id)
        sample = tiny.val_set[positions[image_id]]
        expected = reference_semantic(pairs, thing_of, "ignore")
        assert torch.equal(sample["semantic"][:h, :w], torch.from_numpy(expected)), image_id
        crowd = np.zeros((h, w), dtype=bool)
        for a, m in pairs:
            crowd |= bool(a["iscrowd"]) & (m > 0)
        assert (sample["semantic"][:h, :w][torch.from_numpy(crowd)] == IGNORE_INDEX).all()
        assert torch.equal(sample["instances"]["ignore"][:h, :w].bool(), torch.from_numpy(crowd))
        kept = [m for a, m in pairs if not a["iscrowd"]]
        assert len(sample["instances"]["masks"]) == len(kept)
        for got, m in zip(sample["instances"]["masks"], kept):
            assert torch.equal(got[:h, :w], torch.from_numpy(m))
        crowd_pixels += int(crowd.sum())
    assert crowd_pixels > 0
