"""The training loop's bookkeeping (ijepa_jax/loop.py): metrics fetched as Python numbers, the stop at the
first non-finite step, the device-side running totals. The loop itself runs in tests/test_train.py."""

import jax
import numpy as np
import pytest

from ijepa_jax import loop


def totals(first_bad_step=-1, bad_loss=0.0, skipped_images=0):
    return {"step": np.int32(9), "skipped_images": np.int32(skipped_images),
            "first_bad_step": np.int32(first_bad_step), "bad_loss": np.float32(bad_loss)}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fetch_raises_naming_the_first_bad_step(bad):
    """A non-finite loss stops the run with FloatingPointError naming the first step it happened at,
    whichever (later) step's metrics are being fetched."""
    metrics = {"loss": np.float32(bad), "lr": np.float32(1e-3)}
    with pytest.raises(FloatingPointError, match=rf"At step 7 the loss became {bad}\."):
        loop.fetch(9, metrics, totals(first_bad_step=7, bad_loss=bad), steps_per_epoch=8)


def test_fetch_passes_finite_metrics_as_python_numbers():
    """Finite metrics come back as plain Python numbers (what the JSON writer needs), with the
    summed skipped images and the epoch."""
    metrics = {"loss": np.float32(0.5), "context_tokens": np.float32(6), "skipped_images": np.int32(1)}
    values = loop.fetch(4, metrics, totals(skipped_images=3), steps_per_epoch=8)
    assert values == {"loss": 0.5, "context_tokens": 6.0, "bad_images_skipped": 3, "epoch": 0.5}
    assert type(values["loss"]) is float and type(values["bad_images_skipped"]) is int


def test_fetch_raises_when_only_the_updated_state_is_non_finite():
    """The loss is computed before the update, so a finite loss can come with a NaN state: still a stop."""
    metrics = {"loss": np.float32(0.5)}
    with pytest.raises(FloatingPointError, match=r"At step 7 the updated parameters or optimizer moments"):
        loop.fetch(9, metrics, totals(first_bad_step=7, bad_loss=0.5), steps_per_epoch=8)


def test_device_totals_keep_the_first_bad_step_and_an_exact_skip_count():
    """The on-device running totals: skipped images summed over every step (not only fetched ones),
    the first non-finite step and its loss kept when later steps are bad too."""
    acc = loop.zero_totals(5)
    losses = [0.3, float("nan"), 0.2, float("inf"), float("nan")]
    for i, loss in enumerate(losses):
        acc = loop.accumulate(acc, {"loss": np.float32(loss), "skipped_images": np.int32(i)})
    acc = jax.device_get(acc)
    assert int(acc["step"]) == 10 and int(acc["skipped_images"]) == 0 + 1 + 2 + 3 + 4
    assert int(acc["first_bad_step"]) == 7 and np.isnan(acc["bad_loss"])  # steps 6..10: the 2nd is step 7
