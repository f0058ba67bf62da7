"""``data=shapes``: the embedded segmentation data set, generated as real COCO files and loaded by ``data=coco``.

Why generate files instead of yielding tensors: the default run then exercises the whole COCO path (JSON parsing,
polygon and crowd-RLE decoding through pycocotools, image decoding, size checks, grayscale -> RGB), so what the
smoke test trains on is what a COCO user trains on. The generator only writes; ``ShapesDataModule`` is
``CocoDataModule`` with the root pointed at the generated folder.

What is generated, deterministically from ``generator_seed`` (the run's ``seed`` only shuffles and augments):
``cache_dir/shapes-<hash of the parameters>/`` with ``annotations/instances_{train,val}2017.json`` and JPEG images
in ``train2017/``, ``val2017/``. Each image: a noisy background gradient and 1..max_shapes circles, triangles and
rectangles (polygon annotations; category ids 1, 3, 5 so the contiguous mapping is exercised as with COCO's gaps),
painted largest first so that smaller shapes occlude larger ones, which is exactly the ``area_desc`` overlap rule.
Each class's colour is drawn around its own hue with a jitter that makes neighbouring hues overlap, so colour
helps but shape is needed too. With probability ``crowd_prob`` an image also holds a crowd: a cluster of tiny
shapes of one class, annotated as one ``iscrowd=1`` region in uncompressed RLE (counts in column-major order, as
pycocotools reads it). Pixels are painted from the pycocotools rasterisation of the very annotation, so image and
masks agree exactly. A few images are stored as grayscale JPEGs. The folder is written atomically (``data/cache.py``).
"""
from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from conf.schemas.data import ShapesConfig
from data.cache import params_digest, publish_dir
from data.coco import CocoDataModule
from data.registry import DATAMODULES

GENERATOR_VERSION = 1  # bump when the generator's output changes for the same parameters
CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "round"},
    {"id": 3, "name": "triangle", "supercategory": "polygon"},
    {"id": 5, "name": "rectangle", "supercategory": "polygon"},
)
HUES = (0.0, 0.33, 0.62)  # base hue per category (red, green, blue); jitter +-HUE_JITTER
HUE_JITTER = 0.2
CIRCLE_VERTICES = 20
SPLITS = ("train2017", "val2017")


def generator_params(cfg: ShapesConfig) -> dict[str, Any]:
    return {
        "version": GENERATOR_VERSION,
        "seed": cfg.generator_seed,
        "num_train": cfg.num_train,
        "num_val": cfg.num_val,
        "canvas_size": cfg.canvas_size,
        "min_shapes": cfg.min_shapes,
        "max_shapes": cfg.max_shapes,
        "crowd_prob": cfg.crowd_prob,
        "grayscale_prob": cfg.grayscale_prob,
        "noise": cfg.noise,
    }


def generate_shapes(cache_dir: Path, params: dict[str, Any]) -> Path:
    """The generated data set's root (created on first use): ``cache_dir/shapes-<digest>``."""
    return publish_dir(cache_dir / f"shapes-{params_digest(params)}", lambda tmp: _write_dataset(tmp, params))


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a binary mask [H, W]: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _write_dataset(root: Path, params: dict[str, Any]) -> None:
    (root / "annotations").mkdir()
    next_image_id, next_ann_id = 1, 1
    for split_index, (split, count) in enumerate(zip(SPLITS, (params["num_train"], params["num_val"]))):
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([params["seed"], split_index, i])
            pixels, anns = _draw_image(rng, params)
            file_name = f"{next_image_id:012d}.jpg"
            gray = rng.random() < params["grayscale_prob"]
            Image.fromarray(pixels).convert("L" if gray else "RGB").save(root / split / file_name, quality=92)
            size = params["canvas_size"]
            images.append({"id": next_image_id, "file_name": file_name, "height": size, "width": size})
            for ann in anns:
                annotations.append({"id": next_ann_id, "image_id": next_image_id, **ann})
                next_ann_id += 1
            next_image_id += 1
        document = {"info": {"description": "fp4lab generated shapes", "params": params}, "licenses": [],
                    "images": images, "annotations": annotations, "categories": list(CATEGORIES)}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))


def _draw_image(rng: np.random.Generator, params: dict[str, Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """uint8 [S, S, 3] pixels and the image's annotations (without ids)."""
    size = params["canvas_size"]
    canvas = _background(rng, size)  # float [S, S, 3] in [0, 1]
    shapes = []
    for _ in range(int(rng.integers(params["min_shapes"], params["max_shapes"] + 1))):
        cls = int(rng.integers(len(CATEGORIES)))
        radius = rng.uniform(0.1, 0.28) * size
        if shapes and rng.random() < 0.5:  # next to an earlier shape, so that they overlap
            center = shapes[-1]["center"] + rng.uniform(-1.0, 1.0, 2) * radius
        else:
            center = rng.uniform(radius, size - radius, 2)
        center = np.clip(center, radius, size - radius)
        polygon = _polygon(cls, center, radius, rng, size)
        mask = _polygon_mask(polygon, size)
        if mask.sum() >= 8:
            shapes.append({"cls": cls, "center": center, "polygon": polygon, "mask": mask})
    annotations = []
    for shape in sorted(shapes, key=lambda s: -int(s["mask"].sum())):  # largest first: smaller ones stay on top
        _paint(canvas, shape["mask"], _class_color(rng, shape["cls"]), rng)
        rle = mask_utils.encode(np.asfortranarray(shape["mask"]))
        annotations.append(_annotation(shape["cls"], [shape["polygon"]], rle, iscrowd=0))
    if rng.random() < params["crowd_prob"]:
        cls = int(rng.integers(len(CATEGORIES)))
        crowd = _crowd_mask(rng, cls, size)
        if crowd.any():
            _paint(canvas, crowd, _class_color(rng, cls), rng)
            annotations.append(_annotation(cls, uncompressed_rle(crowd), mask_utils.encode(np.asfortranarray(crowd)),
                                           iscrowd=1))
    canvas += rng.normal(0.0, params["noise"], canvas.shape)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), annotations


def _annotation(cls: int, segmentation: Any, rle: dict, iscrowd: int) -> dict[str, Any]:
    return {"category_id": CATEGORIES[cls]["id"], "segmentation": segmentation, "area": float(mask_utils.area(rle)),
            "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)], "iscrowd": iscrowd}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation colour with a linear gradient: float [S, S, 3]."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.85)))
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5  # [S, S] each
    ramp = (direction[0] * yy + direction[1] * xx) * rng.uniform(0.0, 0.3)  # [S, S]
    return np.clip(base[None, None, :] + ramp[:, :, None], 0.0, 1.0)


def _polygon(cls: int, center: np.ndarray, radius: float, rng: np.random.Generator, size: int) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] of a circle (20-gon), triangle or rotated rectangle, clipped to the canvas."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    name = CATEGORIES[cls]["name"]
    if name == "circle":
        thetas = angle + np.arange(CIRCLE_VERTICES) * 2.0 * np.pi / CIRCLE_VERTICES
        radii = np.full(CIRCLE_VERTICES, radius)
    elif name == "triangle":
        thetas = angle + np.arange(3) * 2.0 * np.pi / 3.0 + rng.uniform(-0.25, 0.25, 3)
        radii = radius * rng.uniform(0.85, 1.15, 3)
    else:
        half_w, half_h = radius, radius * rng.uniform(0.45, 1.0)
        corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = corners @ rot.T + center
        return [round(float(v), 2) for v in np.clip(points, 0.0, size).reshape(-1)]
    points = np.stack([center[0] + radii * np.cos(thetas), center[1] + radii * np.sin(thetas)], axis=1)
    return [round(float(v), 2) for v in np.clip(points, 0.0, size).reshape(-1)]


def _polygon_mask(polygon: list[float], size: int) -> np.ndarray:
    """uint8 [S, S] rasterisation of one polygon by pycocotools (the loader decodes the same way)."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], size, size)))


def _crowd_mask(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """Union of 5..9 tiny shapes of one class in a small cluster: uint8 [S, S]."""
    center = rng.uniform(0.2 * size, 0.8 * size, 2)
    crowd = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(5, 10))):
        radius = rng.uniform(0.03, 0.06) * size
        member = np.clip(center + rng.uniform(-0.15, 0.15, 2) * size, radius, size - radius)
        crowd |= _polygon_mask(_polygon(cls, member, radius, rng, size), size)
    return crowd


def _class_color(rng: np.random.Generator, cls: int) -> np.ndarray:
    hue = (HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)))


def _paint(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``mask`` [S, S] with ``color`` [3] plus a faint shading, in place on ``canvas`` [S, S, 3]."""
    shade = 1.0 + rng.uniform(-0.15, 0.15) * np.linspace(-1.0, 1.0, mask.shape[0])[:, None]  # [S, 1]
    canvas[mask > 0] = np.clip(color[None, :] * shade[np.nonzero(mask)[0]], 0.0, 1.0)


@DATAMODULES.register("shapes")
class ShapesDataModule(CocoDataModule):
    config_cls = ShapesConfig

    def dataset_root(self) -> Path:
        return generate_shapes(self.cache_dir, generator_params(self.cfg))

    def split_names(self) -> dict[str, str]:
        return {"train": SPLITS[0], "val": SPLITS[1]}
