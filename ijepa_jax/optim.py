"""Schedules (lr, weight decay, EMA momentum) and the optax chain.

All schedules are pure functions of the 0-based optimizer step and equal the
reference's formulas: the reference advances its lr/wd schedulers *before*
the optimizer step (so step k uses the value at k + 1) and draws the EMA
momentum after it (so step k uses the value at k).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import optax

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedules:
    lr: Schedule
    weight_decay: Schedule
    momentum: Schedule


def make_schedules(optim_config, steps_per_epoch: int) -> Schedules:
    """optax's schedules, shifted as the reference steps them (see the module docstring)."""
    o = optim_config
    total = int(o.ipe_scale * o.epochs * steps_per_epoch)
    warmup = int(o.warmup_epochs * steps_per_epoch)
    lr = optax.warmup_cosine_decay_schedule(
        init_value=o.start_lr, peak_value=o.lr, warmup_steps=warmup, decay_steps=total, end_value=o.final_lr
    )
    # Weight decay goes from weight_decay to final_weight_decay along a cosine (the reference raises
    # it, 0.04 -> 0.4): an affine map of optax's unit cosine, valid in either direction and from 0.
    cosine = optax.cosine_decay_schedule(init_value=1.0, decay_steps=total)
    # The reference spreads the momentum over the un-truncated ipe_scale * epochs * steps_per_epoch.
    momentum = optax.linear_schedule(
        init_value=o.ema[0], end_value=o.ema[1], transition_steps=o.ipe_scale * o.epochs * steps_per_epoch
    )
    return Schedules(
        lr=lambda step: lr(step + 1),
        weight_decay=lambda step: o.final_weight_decay + (o.weight_decay - o.final_weight_decay) * cosine(step + 1),
        momentum=momentum,
    )


# The reference decays every parameter that is not a bias and not 1-D: here, every matmul kernel and
# the predictor's mask token, shaped (1, 1, D) as in the reference (so it IS decayed, as there).
# LayerNorm scales and biases are not. By name, the rule holds for unrolled and scanned stacks alike.
DECAYED = ("kernel", "mask_token")


def weight_decay_mask(params):
    """True for the parameters AdamW's weight decay applies to (`DECAYED`, by leaf name)."""

    def decays(path, _):
        return getattr(path[-1], "key", None) in DECAYED

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config, schedules: Schedules) -> optax.GradientTransformation:
    o = optim_config
    return optax.adamw(
        learning_rate=schedules.lr,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=schedules.weight_decay,
        mask=weight_decay_mask,
    )
