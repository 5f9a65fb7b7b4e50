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
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedules:
    lr: Schedule
    weight_decay: Schedule
    momentum: Schedule


def make_schedules(optim_config, steps_per_epoch: int) -> Schedules:
    o = optim_config
    total = int(o.ipe_scale * o.epochs * steps_per_epoch)
    warmup = int(o.warmup_epochs * steps_per_epoch)

    def lr(step):
        s = jnp.asarray(step, jnp.float32) + 1.0
        warm = o.start_lr + s / max(warmup, 1) * (o.lr - o.start_lr)
        progress = (s - warmup) / max(1, total - warmup)
        cosine = o.final_lr + (o.lr - o.final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(s < warmup, warm, jnp.maximum(o.final_lr, cosine))

    def weight_decay(step):
        progress = (jnp.asarray(step, jnp.float32) + 1.0) / total
        v = o.final_weight_decay + (o.weight_decay - o.final_weight_decay) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        # The reference clamps at the final value from whichever side it approaches.
        if o.final_weight_decay <= o.weight_decay:
            return jnp.maximum(o.final_weight_decay, v)
        return jnp.minimum(o.final_weight_decay, v)

    def momentum(step):
        # The reference divides by the un-truncated ipe * epochs * ipe_scale here.
        s = jnp.asarray(step, jnp.float32)
        return o.ema[0] + s * (o.ema[1] - o.ema[0]) / (o.ipe_scale * o.epochs * steps_per_epoch)

    return Schedules(lr=lr, weight_decay=weight_decay, momentum=momentum)


def weight_decay_mask(params):
    """The reference rule: decay every parameter that is not a bias and not 1-D.

    (So LayerNorm scales and biases are excluded; the predictor's mask token,
    shaped (1, 1, D) as in the reference, is decayed, as the reference code does.)
    """

    def decays(path, x):
        name = jax.tree_util.keystr(path)
        return x.ndim > 1 and "bias" not in name and not _is_stacked_1d(path, x)

    return jax.tree_util.tree_map_with_path(decays, params)


def _is_stacked_1d(path, x) -> bool:
    # Scanned block stacks add a leading depth axis: a LayerNorm scale is then 2-D.
    in_scan = any(getattr(k, "key", None) == "blocks" for k in path)
    return in_scan and x.ndim == 2


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
