"""Per-image transforms on the host (numpy / PIL), deterministic given a Generator."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

RRC_ASPECT = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default, used by the reference


class BadImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image)."""


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image (JPEG, PNG, ...) -> uint8 (H, W, 3) RGB; any colour mode is converted."""
    if not data:
        raise BadImageError(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL's advice for palettes with transparency
            return np.asarray(img.convert("RGB"), np.uint8)
    except Exception as e:  # PIL raises many types for damaged files
        raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int, scale, ratio=RRC_ASPECT
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback: the largest central crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int, scale) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), bilinear (PIL, as torchvision on PIL images)."""
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale)
    # Crop first, then resize: resize(box=...) would let the filter read pixels outside the box.
    crop = Image.fromarray(image[top : top + h, left : left + w])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.uint8)
