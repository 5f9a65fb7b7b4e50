"""The mask renderer draws what the sampler produced."""

import numpy as np

from conftest import small_config
from ijepa_jax import masks
from ijepa_jax.tools import show_masks


def _batch(n=3):
    spec = masks.resolve_spec(small_config())
    out = masks.MaskSampler(spec).sample(np.random.default_rng(0), n)
    out["images"] = np.full((n, 16, 16, 3), 100, np.uint8)
    return spec, out


def test_patch_mask_marks_exactly_the_valid_indices():
    m = show_masks.patch_mask(np.array([0, 5, 3, 0]), np.array([True, True, False, False]), grid=4)
    assert m.sum() == 2 and m[0, 0] and m[1, 1] and not m[0, 3]


def test_render_has_three_panels_per_image_and_colours_targets():
    spec, batch = _batch()
    image = np.asarray(show_masks.render(batch, spec.grid_h, num_images=3, panel=32))
    assert image.shape == (3 * 32, 3 * 32, 3)
    crop, context, targets = image[:32, :32], image[:32, 32:64], image[:32, 64:]
    assert np.all(crop == 100)
    # Target panel: some pixels carry a target colour, i.e. are not grey.
    assert np.any(targets.max(-1).astype(int) - targets.min(-1) > 30)
    # Context panel: patches outside the context are washed out, so it is not all equal to the crop.
    assert np.any(context != 100) and np.any(context == 100)


def test_render_clips_to_the_batch_size():
    spec, batch = _batch(2)
    image = show_masks.render(batch, spec.grid_h, num_images=5, panel=16)
    assert image.size == (48, 32)
