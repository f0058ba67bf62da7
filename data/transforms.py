"""Geometric and photometric transforms that keep images and their masks aligned.

Why hand-written instead of torchvision.transforms: segmentation needs the *same* random scale, crop and flip on
the image (bilinear, antialiased), the semantic map and every instance mask (nearest-exact, so label values are never
blended), and the randomness must come from the per-sample generator of ``data/sampling.py`` so that a run is a pure
function of its seed. Padding is explicit: padded pixels get 0 in the normalised image (the mean colour), the ignore
index in the semantic map, and 0 in instance masks.

Train: resize so the long side is ``size * s`` with ``s ~ U(scale_range)``, crop a ``size x size`` window at a
random offset (padding where the window leaves the image), flip horizontally with p = 0.5.
Eval: resize so the long side is ``size`` (aspect kept), pad bottom/right to ``size x size``; deterministic.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
F_ = TypeVar("F_", bound=Callable)


def single_threaded(fn: F_) -> F_:
    """Run ``fn`` (per-sample loading, collation) on one intra-op thread, restoring the count afterwards.

    Why: ops on one image are too small to gain from several threads, and with ``num_workers=0`` they run in the
    training process, whose OpenMP pool waits on every thread at each op; on a busy machine a descheduled thread
    stalls every small op (measured on the shared 2-core box: ``torch.full((3, 256, 256))`` 11.6 ms with 2 threads,
    7 us with 1; a COCO sample at 256 px 330 ms vs 16 ms). DataLoader workers already run single-threaded.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        if previous == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper  # type: ignore[return-value]


def to_float_image(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] -> float32 [C, H, W] in [0, 1]."""
    return torch.from_numpy(array.astype(np.float32).transpose(2, 0, 1)).div_(255.0)  # astype copies: writable


def normalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(image [C, H, W] - mean) / std, per channel."""
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - m) / s


def resize_image(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """float [C, H, W] -> [C, h, w], bilinear with antialiasing (downscaling does not alias)."""
    if tuple(image.shape[-2:]) == hw:
        return image
    return F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


def resize_labels(labels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Integer maps [..., H, W] -> [..., h, w] by nearest-exact sampling (values are copied, never blended)."""
    if tuple(labels.shape[-2:]) == hw:
        return labels
    lead = labels.shape[:-2]
    if labels.numel() == 0:  # e.g. [0, H, W]: an image without instances
        return labels.new_zeros((*lead, *hw))
    flat = labels.reshape(1, -1, *labels.shape[-2:]).float()  # [1, prod(lead), H, W]
    out = F.interpolate(flat, size=hw, mode="nearest-exact")
    return out.reshape(*lead, *hw).to(labels.dtype)


def crop_pad(t: torch.Tensor, top: int, left: int, size: int, fill: float) -> torch.Tensor:
    """The ``size x size`` window of ``t [..., H, W]`` starting at (top, left); outside the tensor -> ``fill``."""
    h, w = t.shape[-2:]
    out = torch.full((*t.shape[:-2], size, size), fill, dtype=t.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = t[..., y0:y1, x0:x1]
    return out


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of non-empty masks [N, H, W] -> float32 [N, 4] (x1, y1, x2, y2), x2/y2 exclusive pixel edges."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    h, w = masks.shape[-2:]
    cols = masks.any(dim=1)  # [N, W]
    rows = masks.any(dim=2)  # [N, H]
    x1 = cols.int().argmax(dim=1)
    x2 = w - cols.flip(1).int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    y2 = h - rows.flip(1).int().argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


@dataclass
class SegmentationSample:
    image: torch.Tensor  # float32 [3, H, W], normalised
    semantic: torch.Tensor  # int64 [H, W], 0 = background, IGNORE_INDEX = ignore
    masks: torch.Tensor | None = None  # uint8 [N, H, W]
    labels: torch.Tensor | None = None  # int64 [N]
    ignore: torch.Tensor | None = None  # uint8 [H, W]


@dataclass(frozen=True)
class SegmentationTransform:
    size: int
    train: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True

    def __call__(
        self,
        image: np.ndarray,  # uint8 [H, W, 3]
        semantic: np.ndarray,  # uint8 [H, W]
        rng: np.random.Generator,
        masks: np.ndarray | None = None,  # uint8 [N, H, W]
        labels: np.ndarray | None = None,  # int64 [N]
        ignore: np.ndarray | None = None,  # uint8 [H, W]
    ) -> SegmentationSample:
        h, w = semantic.shape
        scale = self.size / max(h, w)
        if self.train:
            scale *= float(rng.uniform(*self.scale_range))
        hw = (max(1, round(h * scale)), max(1, round(w * scale)))
        img = normalize(resize_image(to_float_image(image), hw), self.mean, self.std)
        sem = resize_labels(torch.from_numpy(semantic), hw)
        inst = None if masks is None else resize_labels(torch.from_numpy(masks), hw)
        ign = None if ignore is None else resize_labels(torch.from_numpy(ignore), hw)
        if self.train:
            top = int(rng.integers(min(0, hw[0] - self.size), max(0, hw[0] - self.size) + 1))
            left = int(rng.integers(min(0, hw[1] - self.size), max(0, hw[1] - self.size) + 1))
            flip = self.hflip and bool(rng.random() < 0.5)
        else:
            top, left, flip = 0, 0, False
        img = crop_pad(img, top, left, self.size, 0.0)
        sem = crop_pad(sem, top, left, self.size, IGNORE_INDEX)
        if inst is not None:
            inst = crop_pad(inst, top, left, self.size, 0)
            ign = crop_pad(ign, top, left, self.size, 0)
        if flip:
            img, sem = img.flip(-1), sem.flip(-1)
            if inst is not None:
                inst, ign = inst.flip(-1), ign.flip(-1)
        sample = SegmentationSample(image=img.contiguous(), semantic=sem.long().contiguous())
        if inst is not None:
            keep = inst.flatten(1).amax(dim=1) > 0  # [N]; instances cropped away entirely are dropped
            sample.masks = inst[keep].contiguous()
            sample.labels = torch.from_numpy(labels)[keep]
            sample.ignore = ign.contiguous()
        return sample


@dataclass(frozen=True)
class ClassificationTransform:
    """Resize the short side to ``size`` and centre-crop; train adds a padded random crop and a horizontal flip."""

    size: int
    train: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """uint8 [H, W, C] -> float32 [C, size, size], normalised."""
        img = to_float_image(image)
        h, w = img.shape[-2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            hw = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
            img = resize_image(img, hw)
            img = crop_pad(img, (hw[0] - self.size) // 2, (hw[1] - self.size) // 2, self.size, 0.0)
        img = normalize(img, self.mean, self.std)
        if self.train and self.crop_padding > 0:
            p = self.crop_padding
            img = crop_pad(img, int(rng.integers(-p, p + 1)), int(rng.integers(-p, p + 1)), self.size, 0.0)
        if self.train and self.hflip and rng.random() < 0.5:
            img = img.flip(-1)
        return img.contiguous()
