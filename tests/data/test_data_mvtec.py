"""MVTec AD loader on a small tree written here in MVTec's exact layout (no MVTec data is available offline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conf.errors import ConfigError, DataError
from conf.schemas.data import MvtecConfig

SIZE = 32
LAYOUT = {"bottle": {"good": 3, "broken": 4, "contamination": 2}, "grid": {"good": 2, "bent": 3}}


def write_mvtec(root):
    """<category>/train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png; grid is grayscale like MVTec's."""
    rng = np.random.default_rng(0)
    masks = {}
    for cat, groups in LAYOUT.items():
        (root / cat / "train" / "good").mkdir(parents=True)
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                root / cat / "train" / "good" / f"{k:03d}.png")
        for defect, count in groups.items():
            (root / cat / "test" / defect).mkdir(parents=True)
            if defect != "good":
                (root / cat / "ground_truth" / defect).mkdir(parents=True)
            for k in range(count):
                image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
                (image.convert("L") if cat == "grid" else image).save(root / cat / "test" / defect / f"{k:03d}.png")
                if defect != "good":
                    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
                    y, x = rng.integers(0, SIZE - 8, 2)
                    mask[y : y + 8, x : x + 6] = 255
                    Image.fromarray(mask).save(root / cat / "ground_truth" / defect / f"{k:03d}_mask.png")
                    masks[root / cat / "test" / defect / f"{k:03d}.png"] = mask > 127
    return masks


def loaded(root, tmp_path, **kw):
    dm = data.build_datamodule(MvtecConfig(root=str(root), image_size=SIZE, batch_size=4, **kw),
                               cache_dir=tmp_path / "cache", seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("mode", ["binary", "per_defect"])
def test_masks_and_splits(tmp_path, mode):
    masks = write_mvtec(tmp_path / "mvtec")
    dm = loaded(tmp_path / "mvtec", tmp_path, mask_mode=mode, val_fraction=0.5)
    names = dm.info.class_names
    if mode == "binary":
        assert names == ("background", "defect")
    else:
        assert names == ("background", "bottle/broken", "bottle/contamination", "grid/bent")
    assert dm.info.task == "segmentation" and not dm.info.instances
    # each (category, defect) group of test/ is split half/half (rounding half up); train/good is all training
    test_images = sum(sum(g.values()) for g in LAYOUT.values())
    assert len(dm.val_set) == 2 + 2 + 1 + 1 + 2
    assert len(dm.train_set) == 8 + test_images - len(dm.val_set)
    assert not {s.image for s in dm.val_set.samples} & {s.image for s in dm.train_set.samples}
    for k, sample in enumerate(dm.val_set.samples):
        expected = torch.zeros(SIZE, SIZE, dtype=torch.int64)
        if sample.image in masks:
            defect = f"{sample.image.parts[-4]}/{sample.image.parts[-2]}"
            expected[torch.from_numpy(masks[sample.image])] = 1 if mode == "binary" else names.index(defect)
        assert torch.equal(dm.val_set[k]["semantic"], expected), sample.image
    assert sum(s.image in masks for s in dm.val_set.samples) == 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["semantic"].dtype == torch.int64


def test_split_is_fixed_by_split_seed_not_run_seed(tmp_path):
    write_mvtec(tmp_path / "mvtec")
    a = loaded(tmp_path / "mvtec", tmp_path)
    b = data.build_datamodule(a.cfg, cache_dir=tmp_path, seed=123)
    b.setup("fit")
    assert [s.image for s in a.val_set.samples] == [s.image for s in b.val_set.samples]
    c = loaded(tmp_path / "mvtec", tmp_path, split_seed=5)
    assert [s.image for s in a.val_set.samples] != [s.image for s in c.val_set.samples]


def test_categories_and_missing_mask(tmp_path):
    write_mvtec(tmp_path / "mvtec")
    only = loaded(tmp_path / "mvtec", tmp_path, categories=["grid"], mask_mode="per_defect")
    assert only.info.class_names == ("background", "grid/bent")
    with pytest.raises(ConfigError, match="'wood' is not a category folder of .*; valid choices: bottle, grid"):
        loaded(tmp_path / "mvtec", tmp_path, categories=["wood"])
    (tmp_path / "mvtec" / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="defect mask is missing: .*bottle/ground_truth/broken/001_mask.png"):
        loaded(tmp_path / "mvtec", tmp_path)
