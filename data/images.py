"""Reading image files into arrays, with one clear ``DataError`` per kind of bad file.

Why one place: the COCO, ImageFolder, CIFAR-10 zip and MVTec loaders all read images, and each bad file (missing,
empty, undecodable) must be reported the same way, naming the file. EXIF orientation is deliberately *not* applied:
COCO annotations refer to the stored pixel grid, so rotating the image would misalign every mask.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from conf.errors import DataError


def read_bytes(path: Path) -> bytes:
    """The file's bytes; DataError naming the file if it is missing, unreadable or empty."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image file is missing: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read image file {path}: {exc.strerror}") from None
    if not raw:
        raise DataError(f"image file is empty (0 bytes): {path}")
    return raw


def decode_image(raw: bytes, name: str, mode: str = "RGB") -> np.ndarray:
    """Decode encoded image bytes to uint8 [H, W, C] (``mode`` "RGB": C = 3, grayscale is replicated; "L": C = 1)."""
    if not raw:
        raise DataError(f"image file is empty (0 bytes): {name}")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            converted = img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode image {name}: {exc}") from None
    array = np.asarray(converted, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"image {name} has zero size ({array.shape[1]}x{array.shape[0]})")
    return array


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """``decode_image(read_bytes(path))``: uint8 [H, W, C]."""
    return decode_image(read_bytes(path), str(path), mode)
