"""RandomResizedCrop (ijepa_jax/data/transforms.py): torchvision's get_params + a bilinear resize."""

import math

import numpy as np
import pytest
from PIL import Image

from ijepa_jax.data import transforms

RATIO = (3 / 4, 4 / 3)


def coordinate_image(height, width):
    """uint8 image whose channel 0 encodes the row and channel 1 the column (a gradient, so bilinear
    resampling keeps values within the sampled rows/columns)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows * 255 // max(height - 1, 1), cols * 255 // max(width - 1, 1), np.zeros_like(rows)], -1).astype(np.uint8)


@pytest.mark.parametrize("shape,size", [((32, 32), 32), ((40, 56), 16), ((64, 48), 24), ((20, 20), 48)])
def test_output_shape_and_dtype(shape, size):
    """Any input (H, W, 3) uint8 gives (size, size, 3) uint8, for down- and up-scaling."""
    image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    for seed in range(5):
        out = transforms.random_resized_crop(image, np.random.default_rng(seed), size, (0.3, 1.0))
        assert out.shape == (size, size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("shape", [(32, 32), (48, 80), (90, 60)])
def test_box_inside_image_with_scale_and_aspect_in_range(shape):
    """The box lies inside the image; its area fraction is within `scale` and w/h within (3/4, 4/3),
    up to the rounding of h and w to integers. scale <= 0.5 so the fallback can never be taken."""
    height, width = shape
    area = height * width
    scale = (0.2, 0.5)
    for seed in range(300):
        top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(seed), height, width, scale)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert h > 0 and w > 0
        # h, w are sqrt(area * s / a) and sqrt(area * s * a) rounded: allow half a pixel each way.
        assert (h - 0.5) * (w - 0.5) <= scale[1] * area + 1e-9
        assert (h + 0.5) * (w + 0.5) >= scale[0] * area - 1e-9
        assert (w - 0.5) / (h + 0.5) <= RATIO[1] and (w + 0.5) / (h - 0.5) >= RATIO[0]


def test_boxes_cover_the_scale_range():
    """Over many draws the area fraction spans the scale range and positions vary (not a fixed crop)."""
    boxes = [transforms.random_resized_crop_box(np.random.default_rng(s), 100, 100, (0.3, 1.0)) for s in range(400)]
    fractions = np.array([h * w / 1e4 for _, _, h, w in boxes])
    assert fractions.min() < 0.33 and fractions.max() > 0.9
    assert len({(t, l) for t, l, _, _ in boxes}) > 50


def test_deterministic_given_rng_seed():
    """Same seed -> same crop; another seed -> another crop."""
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    a = transforms.random_resized_crop(image, np.random.default_rng(7), 16, (0.3, 1.0))
    b = transforms.random_resized_crop(image, np.random.default_rng(7), 16, (0.3, 1.0))
    c = transforms.random_resized_crop(image, np.random.default_rng(8), 16, (0.3, 1.0))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (10, 200, (0, 93, 10, 13)),  # very wide: full height, widest 4:3 box, centred
        (200, 10, (93, 0, 13, 10)),  # very tall: full width, tallest 3:4 box, centred
    ],
)
def test_fallback_is_the_central_crop(height, width, expected):
    """When no draw fits (scale >= 0.5 on a 20:1 image) the box is torchvision's fallback: the largest
    centred crop with aspect ratio clipped to (3/4, 4/3)."""
    for seed in range(5):
        assert transforms.random_resized_crop_box(np.random.default_rng(seed), height, width, (0.5, 1.0)) == expected


def test_fallback_image_comes_from_the_centre():
    """The fallback crop's pixels come from the central columns 93..105 of a 10x200 image."""
    image = np.zeros((10, 200, 3), np.uint8)
    image[..., 0] = np.arange(200)[None, :]
    out = transforms.random_resized_crop(image, np.random.default_rng(0), 8, (0.5, 1.0))
    assert out.shape == (8, 8, 3)
    cols = out[..., 0].astype(int)
    assert 92 <= cols.min() and cols.max() <= 106
    assert np.all(np.diff(cols, axis=1) >= 0), "column order must be preserved (no flip)"


def test_crop_follows_the_box():
    """The output shows the box's rows and columns (not transposed): the coordinate-coded image's row and
    column values after the crop lie in the box's range."""
    image = coordinate_image(64, 96)
    for seed in range(10):
        top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(seed), 64, 96, (0.3, 1.0))
        out = transforms.random_resized_crop(image, np.random.default_rng(seed), 16, (0.3, 1.0)).astype(int)
        row_code, col_code = image[..., 0].astype(int), image[..., 1].astype(int)
        step_r, step_c = 255 / 63, 255 / 95
        assert row_code[top, 0] - 2 * step_r <= out[..., 0].min() and out[..., 0].max() <= row_code[top + h - 1, 0] + 2 * step_r
        assert col_code[0, left] - 2 * step_c <= out[..., 1].min() and out[..., 1].max() <= col_code[0, left + w - 1] + 2 * step_c


def test_matches_torchvision_crop_then_resize():
    """Parity with torchvision's RandomResizedCrop on PIL images, i.e. F.resized_crop = crop(box) then a
    bilinear resize of the crop alone: pixels OUTSIDE the box must not leak into the output.

    Image: black box region inside a white frame; the box is the one the rng draws."""
    height, width, size = 60, 60, 16
    for seed in range(5):
        top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(seed), height, width, (0.3, 0.6))
        assert top > 0 or left > 0 or top + h < height or left + w < width, "the box must leave a frame outside"
        image = np.full((height, width, 3), 255, np.uint8)
        image[top : top + h, left : left + w] = np.random.default_rng(seed).integers(0, 100, (h, w, 3))
        out = transforms.random_resized_crop(image, np.random.default_rng(seed), size, (0.3, 0.6))
        torchvision_like = np.asarray(
            Image.fromarray(np.ascontiguousarray(image[top : top + h, left : left + w])).resize((size, size), Image.BILINEAR)
        )
        np.testing.assert_array_equal(out, torchvision_like, err_msg=f"box {(top, left, h, w)}: outside pixels leak in")


def test_scale_one_is_the_whole_square_image():
    """scale (1, 1) on a square image: only aspect ~1 draws fit, else the fallback is the full image;
    either way the box is the whole image and a same-size resize returns the image unchanged."""
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    for seed in range(20):
        assert transforms.random_resized_crop_box(np.random.default_rng(seed), 24, 24, (1.0, 1.0)) == (0, 0, 24, 24)
        out = transforms.random_resized_crop(image, np.random.default_rng(seed), 24, (1.0, 1.0))
        np.testing.assert_array_equal(out, image)


def test_aspect_is_log_uniform():
    """The aspect ratio is drawn log-uniformly (torchvision): about half the boxes are wider than tall."""
    boxes = [transforms.random_resized_crop_box(np.random.default_rng(s), 400, 400, (0.2, 0.3)) for s in range(600)]
    log_ratios = np.array([math.log(w / h) for _, _, h, w in boxes])
    assert abs(np.mean(log_ratios > 0) - 0.5) < 0.08
    assert abs(np.mean(log_ratios)) < 0.03
