"""Host-side transforms (ijepa_jax/data/transforms.py): RandomResizedCrop (torchvision's get_params + a
bilinear resize), decode_image, flip, colour distortion, blur, center crop and the pretraining pipeline."""

import io
import math

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

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


# ---------------------------------------------------------------------------------------------------
# decode_image

YY, XX = np.mgrid[0:32, 0:48]
RGB = np.stack([XX * 5, YY * 7, 255 - XX * 5], -1).astype(np.uint8)  # smooth, so JPEG errors stay small


def encode(img, fmt, **kwargs):
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_decode_png_round_trip_is_exact_and_jpeg_is_close():
    """RGB PNG decodes bit-exactly; RGB JPEG (q95) within JPEG error, right orientation and shape."""
    np.testing.assert_array_equal(transforms.decode_image(encode(Image.fromarray(RGB), "PNG")), RGB)
    out = transforms.decode_image(encode(Image.fromarray(RGB), "JPEG", quality=95))
    assert out.shape == RGB.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - RGB).mean() < 2


GREY = Image.fromarray(RGB).convert("L")
GREY3 = np.asarray(GREY)[..., None].repeat(3, -1)
PALETTE = Image.fromarray(RGB).quantize(16)
ALPHA = Image.fromarray((XX * 5).astype(np.uint8))
GREY16 = (np.arange(32 * 48).reshape(32, 48) * 42).astype(np.uint16)  # spans 0..65478


@pytest.mark.parametrize(
    "mode,data,expected,atol",
    [
        ("L", lambda: encode(GREY, "PNG"), GREY3, 0),
        ("LA", lambda: encode(Image.merge("LA", (GREY, ALPHA)), "PNG"), GREY3, 0),
        ("P", lambda: encode(PALETTE, "PNG"), np.asarray(PALETTE.convert("RGB")), 0),
        ("P+transparency", lambda: encode(PALETTE, "PNG", transparency=0), np.asarray(PALETTE.convert("RGB")), 0),
        ("RGBA", lambda: encode(Image.fromarray(np.dstack([RGB, np.asarray(ALPHA)]), "RGBA"), "PNG"), RGB, 0),
        ("CMYK", lambda: encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95), RGB, 8),
        ("I;16", lambda: encode(Image.fromarray(GREY16), "PNG"), np.round(GREY16 / 257).astype(np.uint8)[..., None], 0),
    ],
)
def test_decode_any_mode_gives_uint8_rgb(mode, data, expected, atol):
    """Every colour mode decodes to uint8 (H, W, 3) with the right content (alpha dropped, palette looked
    up, CMYK converted, 16-bit grey rescaled rather than clipped to white)."""
    encoded = data()
    assert Image.open(io.BytesIO(encoded)).mode == mode.split("+")[0], "the test must exercise this mode"
    out = transforms.decode_image(encoded, mode)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out.astype(int), np.broadcast_to(expected, out.shape).astype(int), atol=atol)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        encode(Image.fromarray(RGB), "JPEG")[:400],  # truncated mid-scan
        np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        b"just some text, not an image\n" * 10,
    ],
    ids=["empty", "truncated-jpeg", "random-bytes", "text"],
)
def test_decode_bad_data_raises_bad_image_error_naming_the_file(data):
    """Undecodable data raises BadImageError (not a raw PIL error), with the file name in the message."""
    with pytest.raises(transforms.BadImageError, match="dir/broken.jpg"):
        transforms.decode_image(data, "dir/broken.jpg")


# ---------------------------------------------------------------------------------------------------
# horizontal_flip

IMAGE = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)


def test_flip_extremes():
    """p=0 never flips; p=1 always gives the exact left-right mirror."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        np.testing.assert_array_equal(transforms.horizontal_flip(IMAGE, rng, p=0.0), IMAGE)
        np.testing.assert_array_equal(transforms.horizontal_flip(IMAGE, rng, p=1.0), IMAGE[:, ::-1])


def test_flip_exactly_when_drawn():
    """The image is mirrored iff the uniform draw is below p (torchvision's rule), about half the time."""
    flips = []
    for seed in range(400):
        out = transforms.horizontal_flip(IMAGE, np.random.default_rng(seed))
        drawn = np.random.default_rng(seed).random() < 0.5
        np.testing.assert_array_equal(out, IMAGE[:, ::-1] if drawn else IMAGE)
        flips.append(drawn)
    assert abs(np.mean(flips) - 0.5) < 0.08


# ---------------------------------------------------------------------------------------------------
# color_distortion / color_jitter


def test_color_distortion_strength_zero_is_identity_or_grayscale():
    """Strength 0: ColorJitter(0, 0, 0, 0) is the identity, so the output is the image, or its grayscale
    (RandomGrayscale still applies) with probability ~0.2."""
    grey = transforms.grayscale(IMAGE)
    is_grey = []
    for seed in range(1000):
        out = transforms.color_distortion(IMAGE, np.random.default_rng(seed), 0.0)
        assert out.shape == IMAGE.shape and out.dtype == np.uint8
        is_grey.append(np.array_equal(out, grey))
        assert is_grey[-1] or np.array_equal(out, IMAGE)
    assert abs(np.mean(is_grey) - 0.2) < 0.04


def test_color_distortion_applies_jitter_with_probability_point_eight():
    """Strength 1: jitter ~0.8 and grayscale ~0.2, independently: unchanged ~0.16, only greyed ~0.04,
    jittered (changed, and not the plain grayscale) ~0.8; any grey output ~0.2."""
    grey = transforms.grayscale(IMAGE)
    same, only_grey, grey_output, n = 0, 0, 0, 1000
    for seed in range(n):
        out = transforms.color_distortion(IMAGE, np.random.default_rng(seed), 1.0)
        same += np.array_equal(out, IMAGE)
        only_grey += np.array_equal(out, grey)
        grey_output += np.array_equal(out, out[..., :1].repeat(3, -1))
    assert abs(same / n - 0.16) < 0.04 and abs(only_grey / n - 0.04) < 0.02
    assert abs((n - same - only_grey) / n - 0.8) < 0.04
    assert abs(grey_output / n - 0.2) < 0.04


def test_grayscale_keeps_three_equal_channels_with_pil_luma():
    """Grayscale is PIL's 'L' luma copied into 3 channels."""
    out = transforms.grayscale(IMAGE)
    assert out.shape == IMAGE.shape and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], np.asarray(Image.fromarray(IMAGE).convert("L")))


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_jitter_factor_ranges(strength):
    """Brightness/contrast/saturation factors are uniform in [max(0, 1 - 0.8s), 1 + 0.8s] (clipped at 0 for
    s > 1.25), hue in [-0.2s, 0.2s]; they span the range and the order is a random permutation."""
    x, h = 0.8 * strength, 0.2 * strength
    lo = max(0.0, 1 - x)
    draws = [transforms.color_jitter_params(np.random.default_rng(s), x, x, x, h) for s in range(500)]
    factors = np.array([f for _, f in draws])
    assert np.all(factors[:, :3] >= lo) and np.all(factors[:, :3] <= 1 + x)
    assert np.all(np.abs(factors[:, 3]) <= h)
    span = 2 * x if lo > 0 else 1 + x
    assert np.all(factors[:, :3].min(0) < lo + 0.05 * span) and np.all(factors[:, :3].max(0) > 1 + x - 0.05 * span)
    assert factors[:, 3].min() < -0.9 * h and factors[:, 3].max() > 0.9 * h
    assert all(sorted(order) == [0, 1, 2, 3] for order, _ in draws)
    assert {order[0] for order, _ in draws} == {0, 1, 2, 3}


@pytest.mark.parametrize("op", [0, 1, 2, 3])
def test_each_jitter_op_is_the_pil_adjustment(op):
    """Alone, brightness / contrast / saturation are PIL ImageEnhance Brightness / Contrast / Color and hue
    is adjust_hue, each with the factor color_jitter_params draws from the same seed."""
    strengths = [0.0, 0.0, 0.0, 0.0]
    strengths[op] = 0.4 if op == 3 else 0.8
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for seed in range(5):
        factor = transforms.color_jitter_params(np.random.default_rng(seed), *strengths)[1][op]
        if op == 3:
            expected = transforms.adjust_hue(IMAGE, factor)
        else:
            expected = np.asarray(enhancers[op](Image.fromarray(IMAGE)).enhance(factor))
        out = transforms.color_jitter(IMAGE, np.random.default_rng(seed), *strengths)
        np.testing.assert_array_equal(out, expected)


def test_jitter_disabled_ops_and_bad_hue():
    """A zero strength disables that op (no factor); hue > 0.5 is rejected, as torchvision does."""
    _, factors = transforms.color_jitter_params(np.random.default_rng(0), 0.4, 0.0, 0.0, 0.0)
    assert factors[0] is not None and factors[1:] == [None, None, None]
    with pytest.raises(ValueError):
        transforms.color_jitter_params(np.random.default_rng(0), 0.0, 0.0, 0.0, 0.6)


def test_brightness_range_on_a_uniform_grey_image():
    """On a uniform grey image only brightness acts (contrast, saturation, hue are no-ops there): the value
    is scaled by a factor within [0.2, 1.8] for strength 1, spanning most of it."""
    image = np.full((4, 4, 3), 100, np.uint8)
    values = []
    for seed in range(300):
        out = transforms.color_jitter(image, np.random.default_rng(seed), 0.8, 0.8, 0.8, 0.2)
        assert np.all(out == out[0, 0, 0]), "a uniform grey image must stay uniform grey"
        values.append(int(out[0, 0, 0]))
    assert 19 <= min(values) and max(values) <= 181
    assert min(values) < 30 and max(values) > 170


def test_hue_shift_wraps_around():
    """Hue adds int(factor * 255) (truncated toward zero) to PIL's uint8 H, modulo 256: red (H 0) goes to
    231 for -0.1 (magenta side: blue > green) and 25 for +0.1 (orange: green > blue); grey stays grey."""
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    down, up = transforms.adjust_hue(red, -0.1), transforms.adjust_hue(red, 0.1)
    assert down[0, 0, 2] > down[0, 0, 1] and up[0, 0, 1] > up[0, 0, 2]
    grey = np.full((2, 2, 3), 90, np.uint8)
    np.testing.assert_array_equal(transforms.adjust_hue(grey, 0.3), grey)

    def shifted(image, shift):  # PIL HSV with H + shift (mod 256), back to RGB
        h, s, v = Image.fromarray(image).convert("HSV").split()
        h = Image.fromarray(((np.asarray(h, int) + shift) % 256).astype(np.uint8), "L")
        return np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"))

    # int(-127.5) = -127 -> +129 (floor would give +128); int(-25.5) = -25 -> +231; int(25.5) = 25.
    for factor, shift in [(-0.5, 129), (-0.1, 231), (0.1, 25), (0.5, 127)]:
        np.testing.assert_array_equal(transforms.adjust_hue(IMAGE, factor), shifted(IMAGE, shift), err_msg=str(factor))


# ---------------------------------------------------------------------------------------------------
# gaussian_blur

EDGE = np.zeros((8, 16, 3), np.uint8)
EDGE[:, 8:] = 255


def test_blur_probability():
    """The sharp edge is blurred with probability p (p=0 never, p=1 always, p=0.5 about half)."""
    def changed(p, seed):
        return not np.array_equal(transforms.gaussian_blur(EDGE, np.random.default_rng(seed), p, (0.5, 2.0)), EDGE)

    assert not any(changed(0.0, s) for s in range(50))
    assert all(changed(1.0, s) for s in range(50))
    assert abs(np.mean([changed(0.5, s) for s in range(400)]) - 0.5) < 0.08


def test_blur_radius_bounds():
    """A fixed radius is exactly PIL's GaussianBlur(radius); a drawn one stays within the bounds: the pixel
    next to the edge lies between its radius-0.1 and radius-2 values, and draws reach both ends."""
    def blur(r):
        return np.asarray(Image.fromarray(EDGE).filter(ImageFilter.GaussianBlur(r)))

    np.testing.assert_array_equal(transforms.gaussian_blur(EDGE, np.random.default_rng(0), 1.0, (1.3, 1.3)), blur(1.3))
    lo, hi = int(blur(0.1)[4, 7, 0]), int(blur(2.0)[4, 7, 0])
    values = [int(transforms.gaussian_blur(EDGE, np.random.default_rng(s), 1.0)[4, 7, 0]) for s in range(300)]
    assert lo <= min(values) and max(values) <= hi
    assert min(values) < lo + 5 and max(values) > hi - 10


# ---------------------------------------------------------------------------------------------------
# center_crop


@pytest.mark.parametrize("shape", [(256, 256), (300, 500), (500, 300), (100, 150), (50, 50), (224, 224)])
def test_center_crop_shape_and_determinism(shape):
    """Any image, larger or smaller than the crop, square or not, gives (size, size, 3) uint8, deterministically."""
    image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    out = transforms.center_crop(image, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, transforms.center_crop(image, 224))


def test_center_crop_of_256_is_the_exact_central_224():
    """256x256 at size 224: resizing to 256 is the identity, so the output is image[16:240, 16:240]."""
    image = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(transforms.center_crop(image, 224), image[16:240, 16:240])


def test_center_crop_non_square_follows_torchvision_sizes():
    """300x500 at 224: shorter side -> 256, longer side int(500 * 256 / 300) = 426 (truncated, not 427),
    then left = round((426 - 224) / 2) = 101."""
    image = np.random.default_rng(2).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((426, 256), Image.BILINEAR))[16:240, 101:325]
    np.testing.assert_array_equal(transforms.center_crop(image, 224), expected)


def test_center_crop_of_a_2x_upscaled_image_matches():
    """A smooth image and its 2x nearest-neighbour upscale give (nearly) the same evaluation crop."""
    yy, xx = np.mgrid[0:256, 0:256]
    image = np.stack([127 + 120 * np.sin(xx / 20), 127 + 120 * np.cos(yy / 25), (xx + yy) / 2], -1).astype(np.uint8)
    big = np.asarray(Image.fromarray(image).resize((512, 512), Image.NEAREST))
    diff = np.abs(transforms.center_crop(big, 224).astype(int) - transforms.center_crop(image, 224).astype(int))
    assert diff.max() <= 3 and diff.mean() < 1


def test_center_crop_rejects_crop_fraction_above_one():
    """crop_fraction > 1 would need padding (the crop exceeds the resized image): rejected."""
    with pytest.raises(ValueError):
        transforms.center_crop(IMAGE, 8, crop_fraction=1.5)


# ---------------------------------------------------------------------------------------------------
# pretrain_transform


def data_config(flip=False, color=False, blur=False, strength=1.0):
    return ml_collections.ConfigDict(
        {
            "crop_size": 16,
            "crop_scale": (0.3, 1.0),
            "use_horizontal_flip": flip,
            "use_color_distortion": color,
            "color_jitter_strength": strength,
            "use_gaussian_blur": blur,
        }
    )


PHOTO = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_pretrain_transform_all_off_is_random_resized_crop():
    """With every switch off (the reference default) it is exactly random_resized_crop for the same seed."""
    for seed in range(10):
        out = transforms.pretrain_transform(PHOTO, np.random.default_rng(seed), data_config())
        expected = transforms.random_resized_crop(PHOTO, np.random.default_rng(seed), 16, (0.3, 1.0))
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "flip,color,blur", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]
)
def test_pretrain_transform_applies_only_enabled_steps_in_reference_order(flip, color, blur):
    """The output is crop -> [flip] -> [color distortion] -> [blur] on one rng stream, only enabled steps."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        expected = transforms.random_resized_crop(PHOTO, rng, 16, (0.3, 1.0))
        if flip:
            expected = transforms.horizontal_flip(expected, rng)
        if color:
            expected = transforms.color_distortion(expected, rng, 1.0)
        if blur:
            expected = transforms.gaussian_blur(expected, rng)
        out = transforms.pretrain_transform(PHOTO, np.random.default_rng(seed), data_config(flip, color, blur))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)


def test_pretrain_transform_deterministic_per_seed():
    """Same seed -> same output with everything on; different seeds -> different outputs."""
    config = data_config(True, True, True)
    outs = [transforms.pretrain_transform(PHOTO, np.random.default_rng(s), config) for s in (5, 5, 6)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
