"""Classification data: imagefolder (folder and zip), cifar10 (the shared zip), mnist (IDX), shapes_cls."""
from __future__ import annotations

import gzip
import hashlib
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conf.schemas.data import Cifar10Config, ImageFolderConfig, MnistConfig, ShapesClsConfig
from data.imagefolder import ImageClassificationDataset
from data.shapes_cls import CLASSES, generate_shapes_cls, generator_params

from conftest import SHARED_DATA  # noqa: E402

CIFAR_ZIP = SHARED_DATA / "cifar10_jpeg" / "cifar10_jpeg_train20k_test10k.zip"
MNIST = SHARED_DATA / "mnist"


def make_tree(root, sizes=((20, 30), (16, 16), (40, 24))):
    """train/val with classes ant, bee; mixed sizes; one grayscale file. Returns {relative path: pixels}."""
    rng = np.random.default_rng(0)
    files = {}
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for k, (h, w) in enumerate(sizes):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if k == 1:
                    image = image.convert("L")
                image.save(root / split / cls / f"{k}.png")
                files[f"{split}/{cls}/{k}.png"] = image
    return files


def loaded(cfg, tmp_path, stage="fit"):
    dm = data.build_datamodule(cfg, cache_dir=tmp_path / "cache", seed=0)
    dm.prepare_data()
    dm.setup(stage)
    return dm


@pytest.mark.parametrize("as_zip", [False, True])
def test_imagefolder_folder_and_zip(tmp_path, as_zip):
    files = make_tree(tmp_path / "tree")
    root = tmp_path / "tree"
    if as_zip:
        root = tmp_path / "tree.zip"
        with zipfile.ZipFile(root, "w") as z:
            for name in files:
                z.write(tmp_path / "tree" / name, name)
    dm = loaded(ImageFolderConfig(root=str(root), image_size=16, batch_size=4, mean=[0.0] * 3, std=[1.0] * 3),
                tmp_path)
    assert dm.info.class_names == ("ant", "bee") and dm.info.num_classes == 2 and dm.info.in_channels == 3
    assert [label for _, label in dm.val_set.samples] == [0, 1, 0, 1, 0, 1]  # round robin over classes
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 0, 1]
    # the 16x16 file is read without resampling: pixels equal the file's (grayscale replicated to RGB)
    k = [name for name, _ in dm.val_set.samples].index("val/ant/1.png")
    expected = torch.from_numpy(np.array(files["val/ant/1.png"].convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.allclose(dm.val_set[k]["image"], expected)
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (4, 3, 16, 16)


def test_imagefolder_one_channel(tmp_path):
    make_tree(tmp_path / "tree")
    dm = loaded(ImageFolderConfig(root=str(tmp_path / "tree"), image_size=16, channels=1, mean=[0.5], std=[0.5]),
                tmp_path)
    assert dm.info.in_channels == 1
    assert next(iter(dm.val_dataloader()))["image"].shape == (6, 1, 16, 16)


@pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason=f"{CIFAR_ZIP} is absent")
def test_cifar10_shared_zip(tmp_path):
    cfg = Cifar10Config(root=str(CIFAR_ZIP.parent), batch_size=20, train_limit=40, val_limit=20)
    dm = loaded(cfg, tmp_path)
    assert dm.info.class_names[0] == "airplane" and dm.info.num_classes == 10 and dm.info.image_size == (32, 32)
    assert len(dm.train_set) == 40 and len(dm.val_set) == 20
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (20, 3, 32, 32) and batch["label"].tolist() == list(range(10)) * 2
    with zipfile.ZipFile(CIFAR_ZIP) as z:  # the first val sample is test/airplane/0000.jpg, read in place
        pixels = np.array(Image.open(z.open("test/airplane/0000.jpg")).convert("RGB"))
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(batch["image"][0], expected, atol=1e-5)
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (20, 3, 32, 32) and set(train["label"].tolist()) <= set(range(10))


def write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_mnist_generated_idx_gzipped_and_raw(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 12), ("t10k", 6))}
    labels = {s: rng.integers(0, 10, len(images[s]), dtype=np.uint8) for s in images}
    for s in images:
        write_idx(tmp_path / f"{s}-images-idx3-ubyte.gz", images[s], compress=True)
        write_idx(tmp_path / f"{s}-labels-idx1-ubyte", labels[s], compress=False)
    dm = loaded(MnistConfig(root=str(tmp_path), batch_size=6, crop_padding=0), tmp_path)
    assert dm.info.in_channels == 1 and dm.info.num_classes == 10
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (6, 1, 28, 28) and batch["label"].tolist() == labels["t10k"].tolist()
    expected = (torch.from_numpy(images["t10k"]).float()[:, None] / 255 - 0.1307) / 0.3081
    assert torch.allclose(batch["image"], expected, atol=1e-5)
    assert next(iter(dm.train_dataloader()))["image"].shape == (6, 1, 28, 28)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"{MNIST} is absent")
def test_mnist_shared_files(tmp_path):
    dm = loaded(MnistConfig(root=str(MNIST), batch_size=64, val_limit=64), tmp_path, stage="validate")
    assert len(dm.val_set) == 64 and len(dm.val_set.images) == 64
    raw = dm.val_set.images.astype(np.float64) / 255  # the official test set's mean pixel is about 0.1325
    assert abs(raw.mean() - 0.13) < 0.02
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (64, 1, 28, 28) and batch["label"][:5].tolist() == [7, 2, 1, 0, 4]


def test_shapes_cls_generated_through_imagefolder(tmp_path):
    cfg = ShapesClsConfig(num_train=16, num_val=8, batch_size=8)
    a = generate_shapes_cls(tmp_path / "a", generator_params(cfg))
    b = generate_shapes_cls(tmp_path / "b", generator_params(cfg))
    digest = {p.relative_to(a).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in a.rglob("*.png")}
    assert digest == {p.relative_to(b).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in b.rglob("*.png")}
    assert len(digest) == 24
    dm = loaded(cfg, tmp_path / "a")
    assert isinstance(dm.train_set, ImageClassificationDataset)
    assert dm.info.class_names == CLASSES and dm.info.image_size == (32, 32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and sorted(set(batch["label"].tolist())) == [0, 1, 2, 3]
