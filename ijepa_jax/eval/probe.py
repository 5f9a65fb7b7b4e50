"""Linear probes on cached features, a whole hyper-parameter sweep trained at once.

Every (lr, weight decay) pair is one head; all heads train together (SGD,
momentum 0.9, cosine lr, L2 weight decay, cross-entropy), so a sweep costs
about as much as one probe. Features stay in host memory and reach the
device in blocks of steps, so ImageNet-scale feature sets need not fit on it. The protocol: choose the pair on
a held-out 10% of the training features, retrain it on all of them, report
top-1 / top-5 on the test split. The optional BatchNorm without affine
parameters before the head is applied with the training set's statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ijepa_jax.data.sources import select_indices
from ijepa_jax.eval.knn import topk_accuracy

VARIANTS = ("last", "last_bn", "last4", "last4_bn")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    lrs: tuple = (0.01, 0.1, 1.0)
    weight_decays: tuple = (0.0, 5e-4)
    epochs: int = 50
    batch_size: int = 1024
    val_fraction: float = 0.1
    seed: int = 0
    block_mib: float = 256  # features sent to the device at a time (see train_heads)

    @classmethod
    def from_config(cls, eval_config) -> "ProbeSettings":
        e = eval_config
        return cls(tuple(e.probe_lrs), tuple(e.probe_weight_decays), e.probe_epochs, e.probe_batch_size)


def select_variant(features: np.ndarray, variant: str) -> np.ndarray:
    """(N, L, D) per-layer features -> (N, F) for one probe variant ('_bn' is applied separately)."""
    base = variant.removesuffix("_bn")
    if base == "last":
        return features[:, -1]
    if base == "last4":
        return features[:, -4:].reshape(len(features), -1)
    raise ValueError(f"unknown probe variant {variant!r}; choose from {VARIANTS}")


class Standardize:
    """BatchNorm without affine, with statistics fixed from the training features."""

    def __init__(self, train_x: np.ndarray, enabled: bool):
        self.mean = train_x.mean(0) if enabled else 0.0
        self.std = np.sqrt(train_x.var(0) + 1e-6) if enabled else 1.0

    def __call__(self, x):
        return ((x - self.mean) / self.std).astype(np.float32)


def _loss(params, xb, yb):
    logits = jnp.einsum("bf,hfc->hbc", xb, params[0]) + params[1][:, None]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[None, :, None], axis=-1).mean(axis=(1, 2))
    return ce.sum()  # heads are independent: the sum's gradient is each head's own


@functools.partial(jax.jit, static_argnames=("batch",))
def _train_block(carry, xs, ys, lrs, wds, first_step, total_steps, *, batch: int):
    """SGD steps on consecutive `batch`-sized slices of (xs, ys), from global step `first_step` on."""

    def step(carry, i):
        p, v = carry
        xb = jax.lax.dynamic_slice_in_dim(xs, i * batch, batch)
        yb = jax.lax.dynamic_slice_in_dim(ys, i * batch, batch)
        g = jax.grad(_loss)(p, xb, yb)
        scale = 0.5 * (1 + jnp.cos(jnp.pi * (first_step + i) / total_steps))
        g = (g[0] + wds[:, None, None] * p[0], g[1])
        v = jax.tree.map(lambda vv, gg: 0.9 * vv + gg, v, g)
        p = (p[0] - (lrs * scale)[:, None, None] * v[0], p[1] - (lrs * scale)[:, None] * v[1])
        return (p, v), None

    return jax.lax.scan(step, carry, jnp.arange(len(xs) // batch))[0]


def train_heads(x, y, lrs, wds, key, *, num_classes: int, epochs: int, batch_size: int, block_mib: float = 256):
    """Heads (H, F, C), (H, C) trained jointly; lrs / wds: (H,).

    SGD with momentum 0.9, a cosine lr over all steps and L2 weight decay; one
    shuffle per epoch (the epoch's `batch_size`-sized steps, the remainder
    dropped). The features stay on the host: each epoch goes to the device in
    blocks of at most `block_mib` MiB of consecutive steps, so neither the
    features nor an epoch of them has to fit in device memory.
    """
    n, f = x.shape
    h = len(lrs)
    batch = min(batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    total = epochs * steps_per_epoch
    steps_per_block = max(1, min(steps_per_epoch, int(block_mib * 2**20) // (batch * f * 4)))
    params = (jnp.zeros((h, f, num_classes)), jnp.zeros((h, num_classes)))
    carry = (params, jax.tree.map(jnp.zeros_like, params))
    lrs, wds = jnp.asarray(lrs, jnp.float32), jnp.asarray(wds, jnp.float32)
    for e in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
        for first in range(0, steps_per_epoch, steps_per_block):
            count = min(steps_per_block, steps_per_epoch - first)
            idx = perm[first * batch : (first + count) * batch]
            carry = _train_block(carry, jnp.asarray(x[idx], jnp.float32), jnp.asarray(y[idx], jnp.int32), lrs, wds,
                                 e * steps_per_epoch + first, total, batch=batch)
    return carry[0]


def _predict(params, x, chunk: int = 8192) -> np.ndarray:
    """(H, N, C) logits, the features going to the device `chunk` at a time."""
    logits = lambda xb: jnp.einsum("bf,hfc->hbc", xb, params[0]) + params[1][:, None]  # noqa: E731
    return np.concatenate([np.asarray(logits(jnp.asarray(x[i : i + chunk]))) for i in range(0, len(x), chunk)], axis=1)


def train_and_score(train_x, train_y, test_x, test_y, num_classes, grid, settings: ProbeSettings) -> list[dict]:
    """One head per (lr, wd) in `grid`, trained on train, scored on test."""
    params = train_heads(
        train_x, np.asarray(train_y), [g[0] for g in grid], [g[1] for g in grid], jax.random.key(settings.seed),
        num_classes=num_classes, epochs=settings.epochs, batch_size=settings.batch_size,
        block_mib=settings.block_mib,
    )
    scores = _predict(params, test_x)
    return [
        {"lr": float(lr), "weight_decay": float(wd), "top1": topk_accuracy(s, test_y, 1),
         "top5": topk_accuracy(s, test_y, 5)}
        for (lr, wd), s in zip(grid, scores)
    ]


def lr_at_sweep_edge(lr: float, lrs, what: str, key: str) -> bool:
    """Whether the chosen `lr` is an end of the swept `lrs` (`key`): the best probe may then lie beyond
    it (and the accuracy understate the features), so it is said in a warning rather than silently."""
    at_edge = len(set(lrs)) > 1 and lr in (min(lrs), max(lrs))
    if at_edge:
        direction = "above" if lr == max(lrs) else "below"
        logging.warning("%s: the chosen lr %g is the end of %s=%s, so a better one may lie beyond it; add values "
                        "%s %g to %s.", what, lr, key, tuple(lrs), direction, lr, key)
    return at_edge


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int, variant: str, settings: ProbeSettings) -> dict:
    """The sweep for one variant: choose (lr, wd) on held-out train features, retrain on all, test."""
    bn = variant.endswith("_bn")
    x, xt = select_variant(train_f, variant), select_variant(test_f, variant)
    perm = np.random.default_rng(settings.seed).permutation(len(x))
    n_val = max(int(len(x) * settings.val_fraction), 1)
    val, fit = perm[:n_val], perm[n_val:]
    norm = Standardize(x[fit], bn)
    grid = list(itertools.product(settings.lrs, settings.weight_decays))
    sweep = train_and_score(norm(x[fit]), train_y[fit], norm(x[val]), train_y[val], num_classes, grid, settings)
    best = max(sweep, key=lambda r: r["top1"])
    at_edge = lr_at_sweep_edge(best["lr"], settings.lrs, f"linear probe {variant}", "eval.probe_lrs")
    norm = Standardize(x, bn)
    final = train_and_score(norm(x), train_y, norm(xt), test_y, num_classes,
                            [(best["lr"], best["weight_decay"])], settings)[0]
    return {**final, "val_top1": best["top1"], "lr_at_sweep_edge": at_edge, "sweep": sweep}


def low_shot(train_f, train_y, test_f, test_y, num_classes: int, per_class: int, seeds: int, variant: str,
             lr: float, weight_decay: float, settings: ProbeSettings) -> dict:
    """The probe on `per_class` labelled images of each class, averaged over `seeds` balanced draws."""
    x, xt = select_variant(train_f, variant), select_variant(test_f, variant)
    top1 = []
    for seed in range(seeds):
        idx = select_indices(train_y, per_class, seed=seed)
        norm = Standardize(x[idx], variant.endswith("_bn"))
        run = dataclasses.replace(settings, seed=seed, batch_size=min(settings.batch_size, len(idx)))
        top1.append(train_and_score(norm(x[idx]), train_y[idx], norm(xt), test_y, num_classes,
                                    [(lr, weight_decay)], run)[0]["top1"])
    return {"per_class": per_class, "top1_mean": float(np.mean(top1)), "top1_std": float(np.std(top1)),
            "top1_per_seed": top1, "variant": variant, "lr": lr, "weight_decay": weight_decay}
