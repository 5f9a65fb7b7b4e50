"""The attentive probe (V-JEPA; Psomas et al., efficient probing): cross-attention pooling of frozen tokens.

On the frozen patch tokens of the last layer (after the final LayerNorm,
features.last_layer_tokens), a small head is trained: `num_queries` learned
queries attend over the tokens with multi-head attention (key and value
projections of the tokens, the encoder's width and head count), the
queries' outputs are averaged, then LayerNorm and a linear classifier.
Unlike the linear probe on mean-pooled tokens it can pick out the tokens that
carry the class wherever they lie.

Cost. Because a head's attention weights sum to one, the value projection
commutes with the pooling (sum_t a_t (x_t Wv + bv) = (sum_t a_t x_t) Wv + bv)
and a learned query's logits against projected keys are the tokens against
one effective vector per head (q_h . (x_t Wk_h + bk_h) = x_t . (Wk_h q_h) +
const, the constant cancelling in the softmax, so the key bias is left out):
the head costs O(T D heads) per image instead of O(T D^2), exactly the same
function. The lr sweep's heads (AdamW, cosine lr, one head per lr) train
together on each batch; the lr is chosen on a held-out 10% of the training
tokens, retrained on all of them, scored top-1 / top-5 on the test split.
The tokens stay in host memory (float16) and reach the device in blocks of
steps, as probe.train_heads does with pooled features.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ijepa_jax.eval import probe
from ijepa_jax.eval.knn import topk_accuracy


@dataclasses.dataclass(frozen=True)
class AttentiveSettings:
    """The sweep's settings; lrs, epochs and batch_size come from the config (`from_config`), where
    their defaults live (config_lib: eval.attentive_lrs, eval.attentive_epochs, eval.attentive_batch_size)."""
    lrs: tuple
    epochs: int
    batch_size: int
    weight_decay: float = 0.01  # AdamW's, on the projection and classifier matrices
    num_queries: int = 1
    val_fraction: float = 0.1
    seed: int = 0
    block_mib: float = 256  # tokens sent to the device at a time (float16 bytes)

    @classmethod
    def from_config(cls, eval_config) -> "AttentiveSettings":
        e = eval_config
        return cls(lrs=tuple(e.attentive_lrs), epochs=e.attentive_epochs, batch_size=e.attentive_batch_size)


def init_head(key, dim: int, num_classes: int, num_queries: int = 1) -> dict:
    """One head's parameters. Projections (D, D) as x @ W; the query starts small and random, so that
    the heads' attention starts near uniform (mean pooling) but not exactly symmetric."""
    kq, kk, kv, kc = jax.random.split(key, 4)
    lim = 1 / np.sqrt(dim)
    return {
        "query": 0.02 * jax.random.normal(kq, (num_queries, dim)),
        "wk": jax.random.uniform(kk, (dim, dim), minval=-lim, maxval=lim),
        "wv": jax.random.uniform(kv, (dim, dim), minval=-lim, maxval=lim),
        "bv": jnp.zeros((dim,)),
        "ln_scale": jnp.ones((dim,)),
        "ln_bias": jnp.zeros((dim,)),
        "w_cls": jax.random.uniform(kc, (dim, num_classes), minval=-lim, maxval=lim),
        "b_cls": jnp.zeros((num_classes,)),
    }


def pool(params: dict, tokens, num_heads: int):
    """(B, T, D) tokens -> (B, D): multi-head cross-attention of the learned queries over the tokens,
    averaged over the queries (before the LayerNorm). Computed in the O(T D heads) form (module doc)."""
    x = tokens.astype(jnp.float32)
    b, t, d = x.shape
    dh = d // num_heads
    q = params["query"].reshape(-1, num_heads, dh)  # (Q, h, dh)
    u = jnp.einsum("dhe,qhe->dqh", params["wk"].reshape(d, num_heads, dh), q) / np.sqrt(dh)  # effective queries
    logits = jnp.einsum("btd,dqh->bqht", x, u)
    attn = jax.nn.softmax(logits, axis=-1)
    pooled = jnp.einsum("bqht,btd->bqhd", attn, x)  # each head's weighted mean of the raw tokens
    wv = params["wv"].reshape(d, num_heads, dh)
    out = jnp.einsum("bqhd,dhe->bqhe", pooled, wv).reshape(b, -1, d) + params["bv"]
    return out.mean(axis=1)


def head_logits(params: dict, tokens, num_heads: int):
    """(B, T, D) tokens -> (B, C) class logits: pool, LayerNorm (affine), linear classifier."""
    z = pool(params, tokens, num_heads)
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    z = (z - mu) / jnp.sqrt(var + 1e-6) * params["ln_scale"] + params["ln_bias"]
    return z @ params["w_cls"] + params["b_cls"]


def _decay_mask(params):
    return {k: k in ("wk", "wv", "w_cls") for k in params}


def _optimizer(weight_decay: float):
    # lr 1: the update is -(adam direction + wd * param); train_heads scales it by each head's lr(t).
    return optax.adamw(learning_rate=1.0, weight_decay=weight_decay, mask=_decay_mask)


def _head_loss(params, xb, yb, num_heads):
    logits = head_logits(params, xb, num_heads)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=-1).mean()


@functools.partial(jax.jit, static_argnames=("batch", "num_heads", "weight_decay"))
def _train_block(carry, xs, ys, lrs, first_step, total_steps, *, batch: int, num_heads: int, weight_decay: float):
    """AdamW steps (every head at once, its own lr) on consecutive `batch`-sized slices of (xs, ys)."""
    opt = _optimizer(weight_decay)
    grad_fn = jax.vmap(jax.grad(_head_loss), in_axes=(0, None, None, None))

    def step(carry, i):
        params, state = carry
        xb = jax.lax.dynamic_slice_in_dim(xs, i * batch, batch)
        yb = jax.lax.dynamic_slice_in_dim(ys, i * batch, batch)
        grads = grad_fn(params, xb, yb, num_heads)
        updates, state = jax.vmap(opt.update)(grads, state, params)
        scale = lrs * 0.5 * (1 + jnp.cos(jnp.pi * (first_step + i) / total_steps))  # (H,)
        updates = jax.tree.map(lambda u: u * scale.reshape((-1,) + (1,) * (u.ndim - 1)), updates)
        return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, carry, jnp.arange(len(xs) // batch))[0]


def train_heads(tokens, y, lrs, key, *, num_classes: int, num_heads: int, epochs: int, batch_size: int,
                weight_decay: float = 0.01, num_queries: int = 1, block_mib: float = 256, rows=None) -> dict:
    """One head per lr (parameters stacked on a leading axis), trained jointly on (N, T, D) tokens
    (only `rows` of them, and of `y`, if given: the sweep's subset without a copy of the tokens).

    AdamW, a cosine lr over all steps, one shuffle per epoch (the remainder dropped); the tokens stay
    on the host and go to the device in blocks of at most `block_mib` MiB of consecutive steps.
    """
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    n, (_, t, d) = len(rows), tokens.shape
    if d % num_heads:
        raise ValueError(f"token width {d} is not divisible by {num_heads} heads")
    h = len(lrs)
    batch = min(batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    total = epochs * steps_per_epoch
    step_bytes = batch * t * d * tokens.dtype.itemsize
    steps_per_block = max(1, min(steps_per_epoch, int(block_mib * 2**20) // step_bytes))
    init_key, shuffle_key = jax.random.split(key)
    # The same initialisation for every lr: the sweep compares learning rates, not draws.
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (h,) + p.shape),
                          init_head(init_key, d, num_classes, num_queries))
    state = jax.vmap(_optimizer(weight_decay).init)(params)
    carry = (params, state)
    lrs = jnp.asarray(lrs, jnp.float32)
    for e in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, e), n))
        for first in range(0, steps_per_epoch, steps_per_block):
            count = min(steps_per_block, steps_per_epoch - first)
            idx = rows[perm[first * batch : (first + count) * batch]]
            idx = np.sort(idx.reshape(count, batch), axis=1).reshape(-1)  # the order within a step is moot
            carry = _train_block(carry, jnp.asarray(tokens[idx]), jnp.asarray(y[idx], jnp.int32), lrs,
                                 e * steps_per_epoch + first, total, batch=batch, num_heads=num_heads,
                                 weight_decay=float(weight_decay))
    return carry[0]


@functools.partial(jax.jit, static_argnames=("num_heads",))
def _logits(params, xb, num_heads):
    return jax.vmap(head_logits, in_axes=(0, None, None))(params, xb, num_heads)


def predict(params, tokens, num_heads: int, chunk: int = 1024, rows=None) -> np.ndarray:
    """(H, N, C) logits of every head for `rows` of the tokens (default all), `chunk` at a time."""
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    out = []
    for i in range(0, len(rows), chunk):
        xb = tokens[rows[i : i + chunk]]
        pad = chunk - len(xb) if len(rows) > chunk else 0  # one compiled shape for every chunk
        xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)]) if pad else xb
        out.append(np.asarray(_logits(params, jnp.asarray(xb), num_heads))[:, : chunk - pad])
    return np.concatenate(out, axis=1)


def train_and_score(train_x, train_y, test_x, test_y, num_classes, lrs, num_heads, settings, train_rows=None,
                    test_rows=None) -> list[dict]:
    """One head per lr trained on train_x (its `train_rows`), scored on test_x (its `test_rows`) against
    test_y (already those rows' labels)."""
    params = train_heads(train_x, np.asarray(train_y), list(lrs), jax.random.key(settings.seed),
                         num_classes=num_classes, num_heads=num_heads, epochs=settings.epochs,
                         batch_size=settings.batch_size, weight_decay=settings.weight_decay,
                         num_queries=settings.num_queries, block_mib=settings.block_mib, rows=train_rows)
    scores = predict(params, test_x, num_heads, rows=test_rows)
    return [{"lr": float(lr), "top1": topk_accuracy(s, test_y, 1), "top5": topk_accuracy(s, test_y, 5)}
            for lr, s in zip(lrs, scores)]


def attentive_probe(train_tokens, train_y, test_tokens, test_y, num_classes: int, num_heads: int,
                    settings: AttentiveSettings) -> dict:
    """The sweep: choose the lr on a held-out `val_fraction` of the training tokens, retrain on all, test."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    perm = np.random.default_rng(settings.seed).permutation(len(train_tokens))
    n_val = max(int(len(train_tokens) * settings.val_fraction), 1)
    val, fit = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    sweep = train_and_score(train_tokens, train_y, train_tokens, train_y[val], num_classes, settings.lrs, num_heads,
                            settings, train_rows=fit, test_rows=val)
    best = max(sweep, key=lambda r: r["top1"])
    at_edge = probe.lr_at_sweep_edge(best["lr"], settings.lrs, "attentive probe", "eval.attentive_lrs")
    final = train_and_score(train_tokens, train_y, test_tokens, test_y, num_classes, [best["lr"]], num_heads,
                            settings)[0]
    return {**final, "val_top1": best["top1"], "lr_at_sweep_edge": at_edge, "sweep": sweep,
            "epochs": settings.epochs, "num_heads": num_heads, "num_queries": settings.num_queries}
