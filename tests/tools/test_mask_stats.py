"""Mask statistics: counts are consistent with the spec."""

import dataclasses

from ijepa_jax import masks
from ijepa_jax.tools import mask_stats


def test_statistics_are_bounded_by_the_static_shapes():
    spec = masks.MaskSpec(8, 8, min_keep=4, mode="corrected", context_tokens=20)
    s = mask_stats.mask_statistics(spec, batch_size=64, num_batches=5)
    assert s["context_kept"] <= spec.context_tokens
    assert s["context_reference_cut"] <= s["context_full"]
    assert 0 < s["target_per_block"] <= s["target_tokens_T"] == spec.target_tokens
    assert s["grid"] == "8x8" and s["mode"] == "corrected"


def test_reference_mode_keeps_its_batch_minimum_on_average():
    """With K = the auto value, the fixed cut keeps about what the reference keeps."""
    spec = masks.MaskSpec(14, 14, min_keep=10, mode="reference")
    spec = dataclasses.replace(spec, context_tokens=masks.auto_context_tokens(spec, batch_size=128))
    s = mask_stats.mask_statistics(spec, batch_size=128, num_batches=20, seed=1)
    assert abs(s["context_kept"] - s["context_reference_cut"]) < 3
