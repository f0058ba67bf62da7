"""The generated ``shapes`` set: deterministic files, real COCO records, read through the COCO loader."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import data
from conf.schemas.data import ShapesConfig
from data.coco import CocoSegmentationDataset
from data.shapes import generate_shapes, generator_params, uncompressed_rle

from conftest import reference_coco, reference_masks, reference_semantic  # noqa: E402

SMALL = {"num_train": 24, "num_val": 8, "crowd_prob": 0.5, "grayscale_prob": 0.2}


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    params = generator_params(ShapesConfig(**SMALL))
    a = generate_shapes(tmp_path / "a", params)
    b = generate_shapes(tmp_path / "b", params)
    assert a.name == b.name and a.name.startswith("shapes-")
    assert tree_digest(a) == tree_digest(b)
    assert len([k for k in tree_digest(a) if k.endswith(".jpg")]) == 32
    c = generate_shapes(tmp_path / "c", generator_params(ShapesConfig(**SMALL, generator_seed=1)))
    assert c.name != a.name
    ann = "annotations/instances_train2017.json"
    assert json.loads((a / ann).read_text())["annotations"] != json.loads((c / ann).read_text())["annotations"]


def test_concurrent_generation_publishes_one_complete_folder(tmp_path):
    params = generator_params(ShapesConfig(**SMALL))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(generate_shapes(tmp_path, params))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temporary folder left behind
    assert tree_digest(results[0]) == tree_digest(generate_shapes(tmp_path / "fresh", params))


def test_records_are_real_coco_with_polygons_and_uncompressed_crowd_rle(tmp_path):
    root = generate_shapes(tmp_path, generator_params(ShapesConfig(**SMALL)))
    doc = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    crowd = [a for a in doc["annotations"] if a["iscrowd"]]
    plain = [a for a in doc["annotations"] if not a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert plain and all(isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6 for a in plain)
    assert [c["id"] for c in doc["categories"]] == [1, 3, 5]
    modes = {Image.open(root / "train2017" / img["file_name"]).mode for img in doc["images"]}
    assert modes == {"RGB", "L"}  # some images are stored as grayscale JPEGs


@pytest.mark.parametrize("first_pixel", [0, 1])
def test_uncompressed_rle_round_trips_through_pycocotools(first_pixel):
    rng = np.random.default_rng(first_pixel)
    mask = (rng.random((13, 17)) < 0.4).astype(np.uint8)
    mask[0, 0] = first_pixel
    rle = uncompressed_rle(mask)
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 13, 17))
    assert np.array_equal(decoded, mask)
    assert sum(rle["counts"]) == mask.size and (rle["counts"][0] == 0) == bool(first_pixel)


def test_loaded_through_the_coco_path_and_matching_annToMask(tmp_path):
    cfg = ShapesConfig(**SMALL, image_size=64, batch_size=4, overlap_rule="ignore")
    dm = data.build_datamodule(cfg, cache_dir=tmp_path, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert isinstance(dm.val_set, CocoSegmentationDataset)
    assert dm.info.class_names == ("background", "circle", "triangle", "rectangle")
    assert dm.info.category_ids == (1, 3, 5)
    root = dm.dataset_root()
    coco = reference_coco(root / "annotations" / "instances_val2017.json")
    thing_of = {1: 0, 3: 1, 5: 2}
    for k, img in enumerate(dm.val_set.images):
        pairs = reference_masks(coco, img["id"])
        expected = reference_semantic(pairs, thing_of, "ignore") if pairs else np.zeros((64, 64), np.int64)
        assert torch.equal(dm.val_set[k]["semantic"], torch.from_numpy(expected))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["semantic"].shape == (4, 64, 64)
    assert len(batch["instances"]) == 4


def test_default_config_classes_are_learnable_sizes(tmp_path):
    """The shipped defaults: a few hundred images whose labels cover every class and some ignore pixels."""
    dm = data.build_datamodule(ShapesConfig(), cache_dir=tmp_path, seed=0)
    dm.setup("fit")
    assert len(dm.train_set) >= 400 and len(dm.val_set) >= 100
    counts = torch.zeros(256, dtype=torch.int64)
    for k in range(0, len(dm.val_set), 4):
        counts += torch.bincount(dm.val_set[k]["semantic"].flatten(), minlength=256)
    assert (counts[:4] > 0).all() and counts[255] > 0 and counts[4:255].sum() == 0
