"""Representation-health diagnostics: are the encoders collapsing?

Cheap enough to run every few hundred steps on one fixed held-out batch.
With an EMA target, a training loss that falls fast can mean the targets are
becoming easy to predict (constant, or confined to a few directions) rather
than informative; these numbers tell the two apart:

  effective rank (RankMe, Garrido et al. 2023) of the target encoder's pooled
    features and of its patch tokens: how many directions the features use
    (also centred: how many directions they vary along);
  mean per-dimension std of the loss's LayerNorm-ed targets, of the
    predictor's outputs and of the raw pooled features: how much they vary;
  mean cosine similarity between different images' pooled features.

The online (context) encoder's centred ranks, pooled std and cosine come
beside the target's as `health/online_...`, on the same full images: with a
slow or frozen EMA (`optim.ema=(1.0, 1.0)`) the target says little (frozen:
nothing) about what the online encoder learns.

`health_metrics` computes them in one jitted call; `collapse_warnings` turns
them into console warnings (thresholds and their rationale are documented there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ijepa_jax import step as step_lib

RANKME_EPS = 1e-7  # the epsilon of the RankMe paper's p_k = sigma_k / ||sigma||_1 + eps
RANK_RTOL = 1e-5  # float32 rounding is ~1e-7 per entry: 100x above it

# collapse_warnings thresholds (rationale in its docstring).
RANK_MIN = 2.0
RANK_MIN_FRACTION = 0.01
POOLED_STD_REL_MIN = 1e-2
COSINE_MAX = 0.9999
TARGET_STD_MIN = 0.1


def effective_rank(x: jax.Array, center: bool = False, eps: float = RANKME_EPS, rtol: float = RANK_RTOL) -> jax.Array:
    """RankMe of the rows of `x` (n, d): exp(entropy of p), p_k = s_k / sum(s) + eps, s its singular values.

    As in the paper, the features are not centred by default, so a dominant
    mean vector counts as one direction and identical rows have rank ~1.
    `center=True` subtracts the row mean first: the rank of the variation
    between rows. Singular values below `rtol` x the Frobenius norm of the
    uncentred `x` are float32 rounding and are dropped, so rows that do not
    vary at all have centred rank ~1 (rounding noise alone would look full-rank).
    Lies in about [1, min(n, d)].
    """
    x = x.astype(jnp.float32)
    scale = jnp.linalg.norm(x)
    if center:
        x = x - x.mean(0)
    # A direct SVD, even of a tall (B*N, D) token matrix: an eigensolve of the
    # (D, D) Gram matrix would be cheaper, but its float32 rounding gives a
    # rank-1 matrix D spurious singular values of ~3e-4 * s_max, inflating its rank.
    s = jnp.linalg.svd(x, compute_uv=False)
    s = jnp.where(s > rtol * scale, s, 0.0)
    p = s / jnp.maximum(s.sum(), jnp.finfo(jnp.float32).tiny) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def mean_feature_std(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Std (ddof 0) of each feature over all rows of `x` (..., d), averaged over features.

    `valid` (x.shape[:-1], bool) leaves out padded rows.
    """
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    w = jnp.ones(x.shape[0], jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    w = w / jnp.maximum(w.sum(), 1.0)
    mean = w @ x
    var = w @ jnp.square(x - mean)
    return jnp.sqrt(jnp.maximum(var, 0.0)).mean()


def mean_pairwise_cosine(x: jax.Array) -> jax.Array:
    """Mean cosine similarity between different rows of `x` (n, d), n >= 2 (the off-diagonal mean)."""
    x = x.astype(jnp.float32)
    n = x.shape[0]
    u = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    # The sum over all pairs is |sum of unit rows|^2; the diagonal contributes |u_i|^2.
    total = jnp.sum(jnp.square(u.sum(0)))
    return (total - jnp.sum(jnp.square(u))) / (n * (n - 1))


def compute_health(params, target_params, batch: dict, models: step_lib.Models) -> dict:
    """The 'health/...' scalars of one batch (pure, traceable); the forward passes are step.loss_fn's."""
    images = step_lib.normalize(batch["images"], models.mean, models.std)
    h = models.encoder.apply({"params": target_params}, images).astype(jnp.float32)  # (B, N, D), after its LayerNorm
    b, n, d = h.shape
    pooled = h.mean(1)
    h_online = models.encoder.apply({"params": params["encoder"]}, images).astype(jnp.float32)
    pooled_online = h_online.mean(1)
    # The loss's targets, gathered at the target blocks of every mask set.
    targets = step_lib.gather_targets(step_lib.target_features(target_params, images, models), batch["target_idx"])
    targets = targets.reshape((-1,) + targets.shape[-3:])
    images, batch, _ = step_lib.per_mask_set(images, batch)
    pred = step_lib.predict(params, images, batch, models)
    valid = batch["target_valid"]
    return {
        "health/target_rank_pooled": effective_rank(pooled),
        "health/target_rank_tokens": effective_rank(h.reshape(b * n, d)),
        "health/target_rank_pooled_centered": effective_rank(pooled, center=True),
        "health/target_rank_tokens_centered": effective_rank(h.reshape(b * n, d), center=True),
        "health/rank_max": jnp.float32(min(b, d)),
        "health/rank_max_tokens": jnp.float32(min(b * n, d)),
        "health/target_std": mean_feature_std(targets, valid),
        "health/pred_std": mean_feature_std(pred, valid),
        "health/pooled_std": mean_feature_std(pooled),
        "health/pooled_rms": jnp.sqrt(jnp.mean(jnp.square(pooled))),
        "health/target_cosine": mean_pairwise_cosine(pooled),
        "health/online_rank_pooled_centered": effective_rank(pooled_online, center=True),
        "health/online_rank_tokens_centered": effective_rank(h_online.reshape(b * n, d), center=True),
        "health/online_pooled_std": mean_feature_std(pooled_online),
        "health/online_pooled_rms": jnp.sqrt(jnp.mean(jnp.square(pooled_online))),
        "health/online_cosine": mean_pairwise_cosine(pooled_online),
    }


@functools.partial(jax.jit, static_argnames=("models", "out_sharding"))
def _compute_health_jit(params, target_params, batch, models, out_sharding):
    out = compute_health(params, target_params, batch, models)
    return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


def health_metrics(params, target_params, batch: dict, models: step_lib.Models) -> dict:
    """`compute_health` in one jitted call, fetched as Python floats.

    params: the online {'encoder', 'predictor'} parameters; target_params: the
    EMA encoder's; batch: a step.py batch (images, context/target indices and
    validity) of at least 2 images, numpy or sharded over a mesh as the train
    step's; models: step.make_models(...). Compiles once per batch shape.
    """
    batch = {k: batch[k] for k in ("images", "context_idx", "context_valid", "target_idx", "target_valid")}
    # On a mesh, replicate the scalars so that every process can read them.
    mesh_sharding = getattr(batch["images"], "sharding", None)
    out_sharding = (
        jax.sharding.NamedSharding(mesh_sharding.mesh, jax.sharding.PartitionSpec())
        if isinstance(mesh_sharding, jax.sharding.NamedSharding)
        else None
    )
    values = jax.device_get(_compute_health_jit(params, target_params, batch, models, out_sharding))
    return {k: float(v) for k, v in values.items()}


def collapse_warnings(metrics: dict) -> list[str]:
    """Human-readable warnings for the 'health/...' values that show collapse (none when healthy).

    Thresholds, set so that only a degenerate encoder trips them (a random
    init, far from informative, does not: on CIFAR-100, ViT-Tiny/4 gives
    centred ranks 9 (pooled, B=64) and 33 (tokens), pooled std 0.17 x RMS,
    cosine 0.965, target std 0.41; the tests' generated noise-like images,
    all alike in their statistics, come closer: pooled std 0.015 x RMS and
    cosine 0.9998 with ViT-Tiny, 0.07 and 0.99 with ViT-micro):
      * centred effective rank < max(2, 1% of its maximum) (pooled: min(B, D);
        tokens: min(B*N, D)): the features vary along about one direction
        (dimensional collapse; a rank-1 or constant output gives ~1; the 1%
        scales the floor to wide encoders). The centred rank is judged, not
        RankMe's uncentred one: final-LayerNorm ViT features share a large
        mean vector, so the uncentred pooled rank of a random init is already
        only ~2-3 and says little beyond the cosine below.
      * pooled std < 1% of the pooled features' RMS, or mean cosine between
        images' pooled features > 0.9999 (the same condition: for features
        c + e_i with a common c, 1 - cos ~ (std / RMS)^2): images differ by
        under 1% of the feature magnitude, so the encoder barely depends on its
        input (a position-only or constant encoder gives ~1e-7).
      * target std < 0.1: the loss's LayerNorm-ed targets have unit RMS per
        token, so their per-dimension std is at most 1; below 0.1, 99% of each
        target's energy is one vector common to all tokens, which a predictor
        can output without looking at the context (the trivial solution).
    The online encoder's ranks, pooled std and cosine are judged as the target's.
    The predictor's std is not judged: its output layer starts small (init std
    0.02), so a low value early on is normal; compare it with the target std.
    """
    warnings = []
    # (encoder, the prefix of its rank and cosine keys, its pooled std and RMS keys)
    encoders = (("target", "health/target_", "health/pooled_std", "health/pooled_rms"),
                ("online", "health/online_", "health/online_pooled_std", "health/online_pooled_rms"))
    for encoder, prefix, std_key, rms_key in encoders:
        for kind, max_key in (("pooled", "health/rank_max"), ("tokens", "health/rank_max_tokens")):
            rank, top = metrics.get(f"{prefix}rank_{kind}_centered"), metrics.get(max_key)
            if rank is None or top is None:
                continue
            floor = max(RANK_MIN, RANK_MIN_FRACTION * top)
            if rank < floor:
                warnings.append(
                    f"collapse: {encoder} encoder {kind} features vary along ~1 direction: centred effective "
                    f"rank {rank:.2f} < {floor:.2f} (max {top:.0f})"
                )
        std, rms = metrics.get(std_key), metrics.get(rms_key)
        if std is not None and rms is not None and std < POOLED_STD_REL_MIN * rms:
            warnings.append(
                f"collapse: pooled {encoder} features vary across images by std {std:.3g} < "
                f"{POOLED_STD_REL_MIN:g} x their RMS {rms:.3g}: the encoder ignores its input"
            )
        cos = metrics.get(f"{prefix}cosine")
        if cos is not None and cos > COSINE_MAX:
            warnings.append(
                f"collapse: mean cosine similarity between images' pooled {encoder} features {cos:.5f} > {COSINE_MAX}"
            )
    std = metrics.get("health/target_std")
    if std is not None and std < TARGET_STD_MIN:
        warnings.append(
            f"collapse: LayerNorm-ed target std {std:.3g} < {TARGET_STD_MIN}: every target token is "
            "nearly the same vector, so the loss can be met without the context"
        )
    return warnings
