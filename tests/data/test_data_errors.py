"""Bad data gives one DataError (or ConfigError) that names the file, folder or field and what was expected."""
from __future__ import annotations

import gzip
import json
import shutil

import pytest

import data
from conf.errors import ConfigError, DataError
from conf.schemas.data import Cifar10Config, CocoConfig, ImageFolderConfig, MnistConfig, ShapesConfig, TextConfig


def coco(root, tmp_path, **kw):
    dm = data.build_datamodule(CocoConfig(root=str(root), image_size=32, **kw), cache_dir=tmp_path / "c", seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"data.root={missing} does not exist"):
        coco(missing, tmp_path)
    with pytest.raises(DataError, match="data.root is not set for data=coco; pass data.root="):
        data.build_datamodule(CocoConfig(), cache_dir=tmp_path, seed=0).prepare_data()


def test_missing_annotation_file(coco_root, tmp_path):
    (coco_root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DataError, match="annotation file is missing: .*instances_val2017.json"):
        coco(coco_root, tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"images": [', r"is not valid JSON \(line 1, column 13"),
    ("[1, 2]", "the top level is not an object"),
    ('{"images": [], "annotations": []}', "it has no 'categories' list"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
])
def test_corrupt_annotation_json(coco_root, tmp_path, content, message):
    path = coco_root / "annotations" / "instances_train2017.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as caught:
        coco(coco_root, tmp_path)
    assert str(path) in str(caught.value)


def test_missing_image(coco_root, tmp_path):
    (coco_root / "train2017" / "a.png").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) listed in .*instances_train2017.json are missing, e.g. "
                                        r".*train2017/a.png"):
        coco(coco_root, tmp_path)


def test_zero_byte_image(coco_root, tmp_path):
    (coco_root / "val2017" / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"are empty \(0 bytes\), e.g. .*val2017/b.png"):
        coco(coco_root, tmp_path)


def test_zero_size_image_record(coco_root, tmp_path):
    path = coco_root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    doc["images"][0]["width"] = 0
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"image c.png \(id 30\) has zero size 0x24"):
        coco(coco_root, tmp_path)


def test_undecodable_and_mismatched_images(coco_root, tmp_path):
    (coco_root / "val2017" / "a.png").write_bytes(b"not a png")
    dm = coco(coco_root, tmp_path)
    with pytest.raises(DataError, match="cannot decode image .*val2017/a.png"):
        dm.val_set[[img["id"] for img in dm.val_set.images].index(11)]
    shutil.copy(coco_root / "val2017" / "c.png", coco_root / "val2017" / "b.png")
    with pytest.raises(DataError, match=r"image .*val2017/b.png is 24x24 but .*instances_val2017.json says 20x30"):
        dm.val_set[[img["id"] for img in dm.val_set.images].index(7)]


def test_empty_dataset_after_filtering(coco_root, tmp_path):
    path = coco_root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] != 7]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"the train split of data=coco is empty: no samples found in "
                                        r".*instances_train2017.json"):
        coco(coco_root, tmp_path, class_subset=["dog"])


def test_annotation_record_errors(coco_root, tmp_path):
    path = coco_root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="annotation id 100 has category_id 99, which is not in 'categories'"):
        coco(coco_root, tmp_path)


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot create the cache folder"):
        data.build_datamodule(ShapesConfig(num_train=2, num_val=2), cache_dir=blocker / "sub", seed=0).info


def test_missing_tokenizer_files(tmp_path):
    dm = data.build_datamodule(TextConfig(tokenizer="gpt2", tokenizer_dir=str(tmp_path)), cache_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match=f"tokenizer file is missing: {tmp_path}/r50k_base.tiktoken"):
        dm.info
    (tmp_path / "r50k_base.tiktoken").write_text("aGVsbG8= 0\n")
    with pytest.raises(DataError, match="is not tiktoken's r50k_base file"):
        data.build_datamodule(TextConfig(tokenizer="gpt2", tokenizer_dir=str(tmp_path)), cache_dir=tmp_path,
                              seed=0).info
    with pytest.raises(DataError, match="data.tokenizer=gpt2 needs data.tokenizer_dir"):
        data.build_datamodule(TextConfig(tokenizer="gpt2"), cache_dir=tmp_path, seed=0).info


def test_text_file_errors(tmp_path):
    def info(path, **kw):
        return data.build_datamodule(TextConfig(path=str(path), **kw), cache_dir=tmp_path, seed=0)

    with pytest.raises(DataError, match=f"text file is missing: {tmp_path / 'none.txt'}"):
        info(tmp_path / "none.txt").info
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="text file is empty"):
        info(tmp_path / "empty.txt").info
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8 \(byte 3"):
        info(tmp_path / "latin.txt").info
    (tmp_path / "short.txt").write_text("hello world")
    dm = info(tmp_path / "short.txt", seq_len=64)
    with pytest.raises(DataError, match="the train split of .*short.txt is empty: it has 10 tokens but a window needs"):
        dm.setup("fit")


def test_mnist_file_errors(tmp_path):
    with pytest.raises(DataError, match=f"MNIST file is missing: {tmp_path}/train-images-idx3-ubyte"):
        data.build_datamodule(MnistConfig(root=str(tmp_path)), cache_dir=tmp_path, seed=0).prepare_data()
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"x"))
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(5))
    dm = data.build_datamodule(MnistConfig(root=str(tmp_path)), cache_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz holds 1 bytes of data but its header says "
                                        r"\(5, 5, 5\)"):
        dm.setup("fit")


def test_imagefolder_layout_errors(tmp_path):
    from PIL import Image

    for split, cls in (("train", "a"), ("val", "a"), ("val", "b")):
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    dm = data.build_datamodule(ImageFolderConfig(root=str(tmp_path)), cache_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match=r"class folder\(s\) \['b'\] that the train split lacks; train classes: a"):
        dm.setup("fit")
    dm = data.build_datamodule(ImageFolderConfig(root=str(tmp_path), val_split="test"), cache_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match=r"the val split of data=imagefolder is empty: no samples found in .*test"):
        dm.setup("fit")
    wrong = data.build_datamodule(Cifar10Config(root=str(tmp_path), val_split="val"), cache_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match="has class folders \\['a'\\]; CIFAR-10 has airplane"):
        wrong.info


@pytest.mark.parametrize("make, message", [
    (lambda: CocoConfig(overlap_rule="paint"), "data.overlap_rule='paint' is not valid; valid choices: ignore, "
                                               "area_desc"),
    (lambda: CocoConfig(other_classes="drop"), "valid choices: background, ignore"),
    (lambda: CocoConfig(batch_size=0), r"data.batch_size=0 is out of range; valid range: \[1, inf\]"),
    (lambda: CocoConfig(class_subset=["car", "car"]), "lists a class twice"),
    (lambda: CocoConfig(train_scale=[1.5, 1.0]), r"data.train_scale=\[1.5, 1.0\] is not valid"),
    (lambda: TextConfig(tokenizer="bpe"), "data.tokenizer='bpe' is not valid; valid choices: char, gpt2"),
    (lambda: ImageFolderConfig(channels=2), "valid choices: 1, 3"),
    (lambda: MnistConfig(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]), "MNIST images have 1 channel"),
])
def test_schema_errors_name_field_and_choices(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_unknown_data_name(tmp_path):
    cfg = CocoConfig()
    cfg.name = "cocoa"
    with pytest.raises(ConfigError, match="data='cocoa' is not a known option; valid choices: cifar10, coco, "):
        data.build_datamodule(cfg, cache_dir=tmp_path, seed=0)
    assert data.task_of("shapes") == "segmentation" and data.names_for_task("lm") == ["text"]
