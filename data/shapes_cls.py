"""``data=shapes_cls``: the embedded classification data set, generated as an ImageFolder tree of PNG files.

Why files: like ``shapes`` for segmentation, the default ``model=resnet`` run then exercises the real
``data=imagefolder`` path (listing, decoding, transforms) rather than a tensor shortcut. The generator only writes.

Each image (``canvas_size`` square, default 32x32) holds one shape (circle, cross, square or triangle; the label)
of random size, position and rotation on a noisy, weakly coloured gradient background. The shape's brightness
contrasts with the background; its hue is drawn around a per-class hue with a jitter that makes neighbouring
classes' ranges overlap, so colour gives a fast first cue (a small model learns visibly within ~100 steps on CPU)
while the outline is needed for the rest. Edges are antialiased by drawing at 4x and box-downsampling. Classes
are balanced (image i has class i mod 4). Written to
``cache_dir/shapes_cls-<hash of the parameters>/{train,val}/<class>/<index>.png`` atomically (``data/cache.py``);
``generator_seed`` fixes the data set, the run's ``seed`` only shuffles and augments.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from conf.schemas.data import ShapesClsConfig
from data.cache import params_digest, publish_dir
from data.imagefolder import ImageFolderDataModule
from data.registry import DATAMODULES

GENERATOR_VERSION = 2
CLASSES = ("circle", "cross", "square", "triangle")  # sorted: ImageFolder's label order
HUES = (0.0, 0.25, 0.5, 0.75)  # base hue per class; jitter +-HUE_JITTER makes neighbouring ranges overlap
HUE_JITTER = 0.15
SUPERSAMPLE = 4


def generator_params(cfg: ShapesClsConfig) -> dict[str, Any]:
    return {"version": GENERATOR_VERSION, "seed": cfg.generator_seed, "num_train": cfg.num_train,
            "num_val": cfg.num_val, "canvas_size": cfg.canvas_size, "noise": cfg.noise}


def generate_shapes_cls(cache_dir: Path, params: dict[str, Any]) -> Path:
    return publish_dir(cache_dir / f"shapes_cls-{params_digest(params)}", lambda tmp: _write_dataset(tmp, params))


def _write_dataset(root: Path, params: dict[str, Any]) -> None:
    for split_index, (split, count) in enumerate((("train", params["num_train"]), ("val", params["num_val"]))):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng([params["seed"], split_index, i])
            cls = i % len(CLASSES)
            pixels = _draw(rng, cls, params["canvas_size"], params["noise"])
            Image.fromarray(pixels).save(root / split / CLASSES[cls] / f"{i:05d}.png")


def _draw(rng: np.random.Generator, cls: int, size: int, noise: float) -> np.ndarray:
    """uint8 [S, S, 3] holding one shape of class ``cls``."""
    bg_value = rng.uniform(0.1, 0.9)
    background = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), bg_value))
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5  # [S, S] each
    ramp = (rng.normal() * yy + rng.normal() * xx) * 0.15  # [S, S]
    canvas = np.clip(background[None, None, :] + ramp[:, :, None], 0.0, 1.0)  # [S, S, 3]
    shape_value = rng.uniform(0.05, max(0.1, bg_value - 0.35)) if bg_value > 0.5 else rng.uniform(
        min(0.95, bg_value + 0.35), 1.0)
    hue = (HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    color = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), shape_value))
    alpha = _shape_alpha(rng, CLASSES[cls], size)[:, :, None]  # [S, S, 1] coverage in [0, 1]
    canvas = canvas * (1.0 - alpha) + color[None, None, :] * alpha
    canvas += rng.normal(0.0, noise, canvas.shape)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _shape_alpha(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """Antialiased coverage float [S, S] of one shape."""
    big = size * SUPERSAMPLE
    radius = rng.uniform(0.22, 0.42) * big
    center = rng.uniform(radius, big - radius, 2)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    if name == "circle":
        offsets = [(np.cos(t), np.sin(t)) for t in np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)]
    elif name == "triangle":
        offsets = [(np.cos(t), np.sin(t)) for t in np.arange(3) * 2.0 * np.pi / 3.0]
    elif name == "square":
        offsets = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    else:  # cross: two bars of half-width 0.3
        a, b = 0.3, 0.95
        offsets = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                   (-a, -a)]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = np.asarray(offsets) @ rot.T * radius + center  # [V, 2] (x, y)
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255.0


@DATAMODULES.register("shapes_cls")
class ShapesClsDataModule(ImageFolderDataModule):
    config_cls = ShapesClsConfig

    def source_root(self) -> Path:
        return generate_shapes_cls(self.cache_dir, generator_params(self.cfg))

    def split_names(self) -> dict[str, str]:
        return {"train": "train", "val": "val"}

    def channels(self) -> int:
        return 3

    def extensions(self) -> tuple[str, ...]:
        return (".png",)
