"""Schemas of ``conf/data/*``: one dataclass per data set, registered as ``schema/data/<name>``.

Why: ``data.batch_size=0``, ``data.overlap_rule=paint`` or ``data.tokenizer=bpe`` must fail when the config is
composed, naming the field, the bad value and the valid choices, before any file is opened. Checks that need the data
(a ``class_subset`` name that is not in the annotation file, a missing folder) happen when the data module reads the
files and raise ``ConfigError`` / ``DataError`` naming the valid names or the path.

Roots of real data sets default to ``<paths.data_root>/<conventional folder>`` through the ``fp4lab.data_path``
resolver (``None`` when ``paths.data_root`` is unset; the data module then says which path to pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from conf.errors import ConfigError
from conf.schemas.common import check_choice, check_range, store_schema

OVERLAP_RULES = ("ignore", "area_desc")
OTHER_CLASSES = ("background", "ignore")
MASK_MODES = ("binary", "per_defect")
TOKENIZERS = ("char", "gpt2")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _data_path(subdir: str, *, _root_: Any) -> Optional[str]:
    base = OmegaConf.select(_root_, "paths.data_root", default=None)
    return None if base in (None, "") else str(Path(base) / subdir)


if not OmegaConf.has_resolver("fp4lab.data_path"):
    OmegaConf.register_new_resolver("fp4lab.data_path", _data_path)


@dataclass
class DataConfig:
    """Fields every data set has."""

    name: str = ""
    batch_size: int = 16
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)
    pin_memory: Optional[bool] = None  # None: pin when CUDA is available
    train_limit: Optional[int] = None  # keep only the first N training samples (after filtering)
    val_limit: Optional[int] = None  # keep only the first N validation samples

    def __post_init__(self) -> None:
        check_range("data", "batch_size", self.batch_size, 1)
        check_range("data", "num_workers", self.num_workers, 0)
        for name in ("train_limit", "val_limit"):
            if getattr(self, name) is not None:
                check_range("data", name, getattr(self, name), 1)


@dataclass
class ImageDataConfig(DataConfig):
    image_size: int = 64  # side of the square images a batch holds
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    hflip: bool = True  # random horizontal flip when training

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("data", "image_size", self.image_size, 8)
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ConfigError(
                f"data.mean={self.mean} and data.std={self.std} must both have one value per image channel (1 or 3)"
            )
        for s in self.std:
            check_range("data", "std", s, 1e-6)


@dataclass
class SegmentationConfig(ImageDataConfig):
    train_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [min, max] random scale when training

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.train_scale) != 2 or not 0.0 < self.train_scale[0] <= self.train_scale[1]:
            raise ConfigError(
                f"data.train_scale={self.train_scale} is not valid; expected [min, max] with 0 < min <= max"
            )


@dataclass
class CocoTargetsConfig(SegmentationConfig):
    """How COCO annotations become targets (shared by ``coco`` and the generated ``shapes``)."""

    instances: bool = True  # also yield per-instance masks, labels, boxes and the crowd ignore map
    class_subset: Optional[list[str]] = None  # keep these classes (names from the file, in this order)
    group_by_supercategory: bool = False  # classes become the categories' supercategories
    other_classes: str = "background"  # what classes left out by class_subset become: background | ignore
    overlap_rule: str = "ignore"  # pixels of several instances: ignore (different classes -> 255) | area_desc
    drop_empty_train: bool = True  # drop training images without any kept instance

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("data", "other_classes", self.other_classes, OTHER_CLASSES)
        check_choice("data", "overlap_rule", self.overlap_rule, OVERLAP_RULES)
        if self.class_subset is not None:
            if not self.class_subset:
                raise ConfigError("data.class_subset=[] is not valid; give at least one class name or null (all)")
            if len(set(self.class_subset)) != len(self.class_subset):
                raise ConfigError(f"data.class_subset={self.class_subset} lists a class twice")


@dataclass
class CocoConfig(CocoTargetsConfig):
    name: str = "coco"
    root: Optional[str] = None  # holds annotations/instances_<split>.json and <split>/ image folders
    batch_size: int = 8
    image_size: int = 256
    train_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    train_split: str = "train2017"
    val_split: str = "val2017"


@dataclass
class ShapesConfig(CocoTargetsConfig):
    name: str = "shapes"
    train_scale: list[float] = field(default_factory=lambda: [0.8, 1.25])
    overlap_rule: str = "area_desc"  # the generator paints largest first: area_desc labels exactly what is visible
    generator_seed: int = 0  # the data set's identity; the run's seed only shuffles and augments
    num_train: int = 512
    num_val: int = 128
    canvas_size: int = 64  # side of the generated images
    min_shapes: int = 1
    max_shapes: int = 4
    crowd_prob: float = 0.2  # chance that an image also holds a crowd (a cluster of tiny shapes, iscrowd=1 RLE)
    grayscale_prob: float = 0.05  # chance that an image is stored as grayscale JPEG (the loader converts to RGB)
    noise: float = 0.06  # std of the per-pixel Gaussian noise, in [0, 1] intensity units

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("data", "num_train", self.num_train, 1)
        check_range("data", "num_val", self.num_val, 1)
        check_range("data", "canvas_size", self.canvas_size, 24, 1024)
        check_range("data", "min_shapes", self.min_shapes, 0)
        check_range("data", "max_shapes", self.max_shapes, max(1, self.min_shapes))
        check_range("data", "crowd_prob", self.crowd_prob, 0.0, 1.0)
        check_range("data", "grayscale_prob", self.grayscale_prob, 0.0, 1.0)
        check_range("data", "noise", self.noise, 0.0, 1.0)


@dataclass
class MvtecConfig(SegmentationConfig):
    name: str = "mvtec"
    root: Optional[str] = None  # holds <category>/{train,test,ground_truth}/
    batch_size: int = 8
    image_size: int = 256
    categories: Optional[list[str]] = None  # None: every category folder under root
    mask_mode: str = "binary"  # binary: defect vs background | per_defect: one class per defect type
    val_fraction: float = 0.3  # share of each (category, defect type) group of test/ images used for validation
    split_seed: int = 0  # fixes the train/val split of test/ (independent of the run's seed)
    include_train_good: bool = True  # add train/good (all background) to the training split

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("data", "mask_mode", self.mask_mode, MASK_MODES)
        check_range("data", "val_fraction", self.val_fraction, 0.0, 1.0)


@dataclass
class ClassificationConfig(ImageDataConfig):
    crop_padding: int = 0  # train: random crop of image_size after padding this many pixels on each side

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("data", "crop_padding", self.crop_padding, 0)


@dataclass
class ImageFolderConfig(ClassificationConfig):
    name: str = "imagefolder"
    root: Optional[str] = None  # a folder or a .zip holding <train_split>/<class>/* and <val_split>/<class>/*
    train_split: str = "train"
    val_split: str = "val"
    channels: int = 3  # 3: RGB (grayscale replicated) | 1: grayscale
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"])

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("data", "channels", self.channels, (1, 3))
        if len(self.mean) != self.channels:
            raise ConfigError(f"data.mean={self.mean} has {len(self.mean)} values; data.channels={self.channels}")


@dataclass
class Cifar10Config(ImageFolderConfig):
    name: str = "cifar10"
    val_split: str = "test"
    batch_size: int = 128
    image_size: int = 32
    crop_padding: int = 4
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])


@dataclass
class ShapesClsConfig(ClassificationConfig):
    name: str = "shapes_cls"
    batch_size: int = 32
    image_size: int = 32
    crop_padding: int = 2
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    generator_seed: int = 0
    num_train: int = 1200
    num_val: int = 300
    canvas_size: int = 32
    noise: float = 0.08

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("data", "num_train", self.num_train, 1)
        check_range("data", "num_val", self.num_val, 1)
        check_range("data", "canvas_size", self.canvas_size, 16, 512)
        check_range("data", "noise", self.noise, 0.0, 1.0)


@dataclass
class MnistConfig(ClassificationConfig):
    name: str = "mnist"
    root: Optional[str] = None  # holds {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    batch_size: int = 128
    image_size: int = 28
    hflip: bool = False  # digits are not mirror-symmetric
    crop_padding: int = 2
    mean: list[float] = field(default_factory=lambda: [0.1307])
    std: list[float] = field(default_factory=lambda: [0.3081])

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.mean) != 1:
            raise ConfigError(f"data.mean={self.mean} must have 1 value: MNIST images have 1 channel")


@dataclass
class TextConfig(DataConfig):
    name: str = "text"
    batch_size: int = 32
    path: Optional[str] = None  # a UTF-8 text file; None: the embedded procedurally generated story corpus
    tokenizer: str = "char"  # char: one token per character of the corpus | gpt2: GPT-2 BPE via tiktoken
    tokenizer_dir: Optional[str] = None  # gpt2: folder holding r50k_base.tiktoken (nothing is downloaded)
    seq_len: int = 128
    val_fraction: float = 0.1  # the last fraction of the token stream is the validation split
    train_stride: Optional[int] = None  # distance between training windows; None: seq_len (no overlap)
    corpus_seed: int = 0  # embedded corpus only
    corpus_chars: int = 300_000  # embedded corpus only: approximate length in characters

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("data", "tokenizer", self.tokenizer, TOKENIZERS)
        check_range("data", "seq_len", self.seq_len, 1)
        check_range("data", "val_fraction", self.val_fraction, 0.0, 0.9)
        if self.val_fraction == 0.0:
            raise ConfigError("data.val_fraction=0.0 is out of range; valid range: (0, 0.9]")
        if self.train_stride is not None:
            check_range("data", "train_stride", self.train_stride, 1)
        check_range("data", "corpus_chars", self.corpus_chars, 1000)


for _name, _cls in {
    "coco": CocoConfig,
    "shapes": ShapesConfig,
    "mvtec": MvtecConfig,
    "imagefolder": ImageFolderConfig,
    "cifar10": Cifar10Config,
    "shapes_cls": ShapesClsConfig,
    "mnist": MnistConfig,
    "text": TextConfig,
}.items():
    store_schema("data", _name, _cls)
