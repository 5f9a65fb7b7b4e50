"""The pretraining crop on the accelerator, for datasets held in device memory (`data.augment_on='device'`).

The host still draws every random number, from the same per-image
generators as the host path (`transforms.draw_crop_and_flip`), and ships
only (index, crop box, flip) per image; this module does the pixel work,
vectorised over the batch with static shapes.

The resize is PIL's bilinear filter (what the host path runs) written as
matrices, so one batched einsum per axis does every image's crop + resize +
flip. Output pixel i of a box of length h resized to S has centre
c = (i + 0.5) h / S and filter scale f = max(h / S, 1) (antialiasing when
shrinking); source pixel j of the box gets tri((j + 0.5 - c) / f),
normalised over the box. PIL turns the weights into 22-bit fixed point and
rounds its first pass to uint8 before the second; this does the same, in
the same order, in exact integer arithmetic (the weights' numerators are integers,
and the sums are split so float32 matmuls stay exact), so its pixels equal
PIL's (tests/data/test_device_augment.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ijepa_jax import sharding

# Host batches in device mode carry these instead of 'images'.
PARAM_KEYS = ("index", "crop_box", "flip")
# Datasets larger than this stay on the host path (sources.InMemoryImages): every device holds a copy.
MAX_DEVICE_DATASET_BYTES = 8 * 2**30
PRECISION_BITS = 22  # PIL's fixed point for 8-bit resampling (32 - 8 - 2)
_LOW_BITS = 11  # weights split into high and low halves: each product sum stays exact in float32


def check_sizes(height: int, width: int, size: int) -> None:
    """Sizes this integer arithmetic covers: it shrinks by less than 15x (the float32 sums stay exact) and
    sources are at most 2048 pixels a side (the int32 weight arithmetic stays below 2**31)."""
    if max(height, width) > 2048:
        raise ValueError(
            f"data.augment_on='device' takes images of at most 2048 pixels a side, not {height}x{width}: "
            "resize the dataset once, or use --config.data.augment_on=host."
        )
    if max(height, width) >= 15 * size:
        raise ValueError(
            f"data.augment_on='device' resizes {height}x{width} images to {size}px crops, a reduction of "
            f"{max(height, width) / size:.0f}x; it supports less than 15x. Use --config.data.augment_on=host."
        )


def fixed_point_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """(B,) box starts and lengths along one axis -> int32 (B, out_size, in_size): PIL's bilinear weights in
    fixed point (sum ~ 2**22), 0 outside [start, start + length).

    With M = max(length, out_size), (j + 0.5 - c) / f = ((2j' + 1) S - (2i + 1) h) / (2M) for box pixel
    j' = j - start, so tri() = num / (2M) with an integer num; normalised, PIL's weight is
    round(num * 2**22 / sum(num)), computed here without overflow as num * q + round(num * r / sum(num))
    for 2**22 = q * sum(num) + r.
    """
    h = length.astype(jnp.int32)[:, None, None]
    jb = jnp.arange(in_size, dtype=jnp.int32)[None, None, :] - start.astype(jnp.int32)[:, None, None]
    i = jnp.arange(out_size, dtype=jnp.int32)[None, :, None]
    two_m = 2 * jnp.maximum(h, out_size)
    num = jnp.maximum(0, two_m - jnp.abs((2 * jb + 1) * out_size - (2 * i + 1) * h))
    num = jnp.where((jb >= 0) & (jb < h), num, 0)
    total = jnp.sum(num, axis=-1, keepdims=True)
    q, r = (1 << PRECISION_BITS) // total, (1 << PRECISION_BITS) % total
    return num * q + (2 * num * r + total) // (2 * total)


def _resample(weights: jax.Array, x: jax.Array, spec: str) -> jax.Array:
    """PIL's pass: sum(weight * pixel), rounded half up from fixed point, clipped to 0..255 (as float32)."""
    exact = jax.lax.Precision.HIGHEST  # true float32: every partial sum is an integer below 2**24
    hi = jnp.einsum(spec, (weights >> _LOW_BITS).astype(jnp.float32), x, precision=exact)
    lo = jnp.einsum(spec, (weights & ((1 << _LOW_BITS) - 1)).astype(jnp.float32), x, precision=exact)
    acc = (hi.astype(jnp.int32) << _LOW_BITS) + lo.astype(jnp.int32) + (1 << (PRECISION_BITS - 1))
    return jnp.clip(acc >> PRECISION_BITS, 0, 255).astype(jnp.float32)


def crop_resize_flip(images: jax.Array, crop_box: jax.Array, flip: jax.Array, size: int) -> jax.Array:
    """uint8 (B, H, W, C) sources, int (B, 4) boxes (top, left, h, w), bool (B,) flips -> uint8 (B, S, S, C)."""
    _, height, width, _ = images.shape
    check_sizes(height, width, size)
    top, left, h, w = (crop_box[:, i] for i in range(4))
    cols = fixed_point_weights(left, w, width, size)
    cols = jnp.where(flip[:, None, None], cols[:, ::-1], cols)  # a mirrored output reads columns backwards
    rows = fixed_point_weights(top, h, height, size)
    x = images.astype(jnp.float32)
    horizontal_first = _resample(rows, _resample(cols, x, "bsw,bhwc->bhsc"), "bth,bhsc->btsc")
    if height <= size:  # no box is taller than the crop (CIFAR, Tiny-ImageNet at full size): never needed
        return horizontal_first.astype(jnp.uint8)
    # Pillow 13 runs the vertical pass first when it shrinks and 2w < h + S (found by comparing both
    # orders with PIL's output over random boxes; the rounding in between makes the order visible).
    vertical_first = _resample(cols, _resample(rows, x, "bth,bhwc->btwc"), "bsw,bhwc->bhsc")
    pick_vertical = (h > size) & (2 * w < h + size) & (w != size)
    return jnp.where(pick_vertical[:, None, None, None], vertical_first, horizontal_first).astype(jnp.uint8)


def augment(dataset: jax.Array, batch: dict, size: int) -> dict:
    """A device-mode batch -> the batch the train step takes ('images' instead of PARAM_KEYS)."""
    images = crop_resize_flip(dataset[batch["index"]], batch["crop_box"], batch["flip"], size)
    return {**{k: v for k, v in batch.items() if k not in PARAM_KEYS}, "images": images}


def put_dataset(images: np.ndarray, mesh) -> jax.Array:
    """The whole uint8 dataset, replicated on every device of the mesh (every process passes the same)."""
    return jax.make_array_from_callback(images.shape, sharding.replicated(mesh), lambda index: images[index])


def make_augmenter(dataset: jax.Array, mesh, size: int):
    """batch -> augmented batch, jitted once with the batch sharding (the dataset is its first argument,
    not a constant folded into the program)."""
    batch_sharding = sharding.batch_sharding(mesh)
    fn = jax.jit(lambda data, batch: augment(data, batch, size), out_shardings=batch_sharding)
    return lambda batch: fn(dataset, batch)
