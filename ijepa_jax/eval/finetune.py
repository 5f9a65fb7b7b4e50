"""Short end-to-end fine-tuning: the whole encoder and a linear head trained on the labelled images.

What the frozen-feature probes cannot show: whether the pretrained weights are a better starting point
than random ones for the same labelled budget. `evaluate` runs it with the same settings on the
pretrained and on the random-init encoder (opt-in: `--protocols=...,finetune`).

The head reads the mean over the encoder's output tokens (after its final LayerNorm, the linear
probe's `last` feature) and starts at zero. AdamW on every parameter (weight decay on matrices only),
a linear warmup then cosine lr, one shuffle per epoch (the remainder dropped), random horizontal flips
of the centre-cropped images (eval.finetune_flip). One lr, no sweep: the protocol compares two starting points, it does not
tune either (MAE's recipe adds layer-wise lr decay, mixup and RandAugment; none of that here).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ijepa_jax import sharding
from ijepa_jax.eval.knn import topk_accuracy
from ijepa_jax.step import normalize


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 5
    lr: float = 5e-4  # at batch_size 256
    batch_size: int = 256
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    flip: bool = True  # random horizontal flips (off for data whose label a mirror changes)
    seed: int = 0

    @classmethod
    def from_config(cls, eval_config) -> "FinetuneSettings":
        e = eval_config
        return cls(epochs=e.finetune_epochs, lr=e.finetune_lr, batch_size=e.finetune_batch_size,
                   weight_decay=e.finetune_weight_decay, warmup_epochs=e.finetune_warmup_epochs,
                   flip=e.finetune_flip)


def logits_fn(encoder, params: dict, images, mean, std):
    """(B, H, W, 3) uint8 images -> (B, C): the head on the mean of the encoder's output tokens."""
    tokens = encoder.apply({"params": params["encoder"]}, normalize(images, mean, std))
    return tokens.mean(axis=1) @ params["head"]["kernel"] + params["head"]["bias"]


def _optimizer(settings: FinetuneSettings, total_steps: int):
    warmup = min(int(settings.warmup_epochs * total_steps / settings.epochs), total_steps - 1)
    lr = optax.warmup_cosine_decay_schedule(0.0, settings.lr, warmup, total_steps)
    return optax.adamw(lr, weight_decay=settings.weight_decay, mask=_matrices)


def _matrices(params):
    """Weight decay on matrices only, not on biases or LayerNorm scales (1-D)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def finetune(encoder, encoder_params, train: tuple, test: tuple, num_classes: int, mean, std, mesh,
             settings: FinetuneSettings) -> dict:
    """Fine-tunes a copy of `encoder_params` with a new head on train = (uint8 images (N, S, S, 3), labels)
    and scores it on test; returns top-1 / top-5 on test, the last epoch's mean train loss and the
    settings."""
    (train_x, train_y), (test_x, test_y) = train, test
    batch = min(settings.batch_size, len(train_x))
    batch -= batch % jax.device_count()
    if batch < jax.device_count():
        raise ValueError(f"fine-tuning needs at least {jax.device_count()} training images (one per device), "
                         f"got {len(train_x)}.")
    steps_per_epoch = len(train_x) // batch
    total = settings.epochs * steps_per_epoch
    dim = jax.eval_shape(lambda p: encoder.apply({"params": p}, jnp.zeros((1,) + train_x.shape[1:])),
                         encoder_params).shape[-1]
    params = {"encoder": encoder_params,
              "head": {"kernel": jnp.zeros((dim, num_classes)), "bias": jnp.zeros((num_classes,))}}
    # A copy: the step donates its buffers, and device_put may hand back the caller's own arrays.
    params = jax.tree.map(jnp.copy, jax.device_put(params, sharding.replicated(mesh)))
    opt = _optimizer(settings, total)
    state = opt.init(params)
    mean, std = tuple(mean), tuple(std)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state, images, labels, key):
        if settings.flip:
            flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
            images = jnp.where(flip, images[:, :, ::-1], images)

        def loss_fn(p):
            logits = logits_fn(encoder, p, images, mean, std)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    key = jax.random.key(settings.seed)
    start = time.time()
    for epoch in range(settings.epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), len(train_x)))
        losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            images = sharding.put_shared_batch(train_x[idx], mesh)
            labels = sharding.put_shared_batch(train_y[idx].astype(np.int32), mesh)
            params, state, loss = train_step(params, state, images, labels,
                                             jax.random.fold_in(key, settings.epochs + epoch * steps_per_epoch + i))
            losses.append(loss)
        epoch_loss = float(np.mean(jax.device_get(losses)))  # one sync an epoch, for the progress line
        rate = (epoch + 1) * steps_per_epoch * batch / (time.time() - start)
        print(f"finetune epoch {epoch + 1}/{settings.epochs}: train loss {epoch_loss:.4f}, {rate:.0f} img/s",
              flush=True)
    logits = predict(encoder, params, test_x, mean, std, mesh, batch)
    top1, top5 = (topk_accuracy(logits, test_y, k) for k in (1, 5))
    return {"top1": top1, "top5": top5, "train_loss_last_epoch": epoch_loss, "steps": total,
            **dataclasses.asdict(settings)}


def predict(encoder, params, images: np.ndarray, mean, std, mesh, batch: int) -> np.ndarray:
    """(N, C) logits, `batch` images at a time (the last batch padded)."""
    fn = jax.jit(lambda p, x: logits_fn(encoder, p, x, mean, std), out_shardings=sharding.replicated(mesh))
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(params, sharding.put_shared_batch(padded, mesh)))[: len(chunk)])
    return np.concatenate(out)
