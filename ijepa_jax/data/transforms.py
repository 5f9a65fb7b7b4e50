"""Per-image transforms on the host (numpy / PIL), deterministic given a Generator."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

RRC_ASPECT = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default, used by the reference


class BadImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image)."""


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image (JPEG, PNG, ...) -> uint8 (H, W, 3) RGB; any colour mode is converted."""
    if not data:
        raise BadImageError(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode.startswith("I"):
                # 16-bit grey (PNG 'I;16', 'I' in older PIL): PIL's convert("RGB") clips at 255, which
                # turns almost every pixel white; rescale the 16-bit range instead.
                grey = np.clip(np.round(np.asarray(img, np.float64) / 257.0), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
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
    return resize_box(image, random_resized_crop_box(rng, image.shape[0], image.shape[1], scale), size)


def resize_box(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The (top, left, h, w) box of `image` resized to (size, size), bilinear (PIL)."""
    top, left, h, w = box
    # Crop first, then resize: resize(box=...) would let the filter read pixels outside the box.
    crop = Image.fromarray(image[top : top + h, left : left + w])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.uint8)


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Evaluation view: torchvision Resize(round(size / crop_fraction)) (bilinear, PIL) + CenterCrop(size)."""
    short = round(size / crop_fraction)
    if short < size:
        raise ValueError(f"crop_fraction={crop_fraction} must be <= 1 (the crop must fit in the resized image).")
    h, w = image.shape[:2]
    # torchvision Resize(int): the shorter side becomes `short`, the longer one is truncated, not rounded.
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR), np.uint8)
    top, left = round((nh - size) / 2.0), round((nw - size) / 2.0)  # CenterCrop's rounding
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """torchvision RandomHorizontalFlip: mirror left-right with probability p."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < p else image


def grayscale(image: np.ndarray) -> np.ndarray:
    """PIL 'L' luma repeated over 3 channels (torchvision rgb_to_grayscale with 3 output channels)."""
    return np.repeat(np.asarray(Image.fromarray(image).convert("L"), np.uint8)[..., None], 3, axis=-1)


def adjust_hue(image: np.ndarray, hue_factor: float) -> np.ndarray:
    """torchvision adjust_hue on PIL: shift PIL's uint8 HSV hue by hue_factor * 255, wrapping around."""
    h, s, v = Image.fromarray(image).convert("HSV").split()
    # torchvision adds np.uint8(hue_factor * 255): the float -> int cast truncates toward zero, then wraps.
    shift = int(hue_factor * 255) % 256
    h = Image.fromarray(((np.asarray(h, np.int32) + shift) % 256).astype(np.uint8), "L")
    return np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"), np.uint8)


def color_jitter_params(rng: np.random.Generator, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """torchvision ColorJitter.get_params: (order of ops 0..3, [b, c, s, h] factors, None where disabled)."""
    if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
        raise ValueError(f"ColorJitter strengths {(brightness, contrast, saturation, hue)}: need >= 0, hue <= 0.5")
    order = [int(i) for i in rng.permutation(4)]
    # A zero strength disables its op (torchvision draws no factor); the lower bound is clipped at 0 as there.
    ranges = [(max(0.0, 1 - x), 1 + x) if x > 0 else None for x in (brightness, contrast, saturation)]
    ranges.append((-hue, hue) if hue > 0 else None)
    return order, [None if r is None else float(rng.uniform(*r)) for r in ranges]


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)  # as torchvision on PIL


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """torchvision ColorJitter on a PIL image: the enabled adjustments, in a random order."""
    order, factors = color_jitter_params(rng, brightness, contrast, saturation, hue)
    for i in order:
        if factors[i] is None:
            continue
        if i == 3:
            image = adjust_hue(image, factors[i])
        else:
            image = np.asarray(_ENHANCERS[i](Image.fromarray(image)).enhance(factors[i]), np.uint8)
    return image


def color_distortion(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """The reference's get_color_distortion(s): ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, then
    RandomGrayscale(p=0.2)."""
    if rng.random() < 0.8:
        s = strength
        image = color_jitter(image, rng, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    return grayscale(image) if rng.random() < 0.2 else image


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, p: float = 0.5, radius=(0.1, 2.0)) -> np.ndarray:
    """The reference's GaussianBlur: with probability p, PIL GaussianBlur with radius ~ U(radius)."""
    if rng.random() >= p:
        return image
    r = float(rng.uniform(radius[0], radius[1]))
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(r)), np.uint8)


def draw_crop_and_flip(rng: np.random.Generator, height: int, width: int, data_config):
    """The training view's geometry, drawn in the reference's order: (top, left, h, w) and whether to
    mirror. Both augmentation paths draw it here, so they see the same boxes for the same seed."""
    box = random_resized_crop_box(rng, height, width, data_config.crop_scale)
    # torchvision's RandomHorizontalFlip (horizontal_flip) draws one number only when it is enabled.
    return box, bool(data_config.use_horizontal_flip and rng.random() < 0.5)


def pretrain_transform(image: np.ndarray, rng: np.random.Generator, data_config) -> np.ndarray:
    """The reference make_transforms training view, minus ToTensor/Normalize (done on device)."""
    d = data_config
    box, flip = draw_crop_and_flip(rng, image.shape[0], image.shape[1], d)
    image = resize_box(image, box, d.crop_size)
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
    if d.use_color_distortion:
        image = color_distortion(image, rng, d.color_jitter_strength)
    if d.use_gaussian_blur:
        image = gaussian_blur(image, rng)
    return image
