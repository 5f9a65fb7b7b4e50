"""Train state, its initialisation, the I-JEPA loss, and the pure train step.

Batch layout (see ijepa_jax/masks.py for the static-shape policy):
  images        uint8 (B, H, W, 3), normalised inside the step
  context_idx   int32 (B, K)     context_valid bool (B, K)
  target_idx    int32 (B, M, T)  target_valid  bool (B, M, T)
                (with mask.sets = S > 1, an S axis after B: (B, S, K), (B, S, M, T))
  skipped       int32 (B,), optional: unreadable images replaced by the pipeline
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ijepa_jax import optim
from ijepa_jax.models import vit

SINKHORN_ITERS = 3


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'encoder': ..., 'predictor': ...}: the online (context) parameters
    target_params: Any  # EMA copy of params['encoder']
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Models:
    """The two Flax modules and the static facts the loss needs."""

    encoder: vit.Encoder
    predictor: vit.Predictor
    mean: tuple
    std: tuple
    loss: str  # 'smooth_l1' (the reference) or 'l2'
    var_cov_weight: float  # > 0: an anti-collapse term (not in the reference; see var_cov_penalty)
    sigreg_weight: float  # > 0: another one (not in the reference; see sigreg)
    target_layers: int  # > 1: data2vec 2.0's targets from the last K blocks (see target_features)
    pooled_target_weight: float  # > 0: the pooled context features regress the pooled target
    target_clusters: int  # K > 0: predict CAPI's cluster assignments of the targets (see cluster_assignments)
    cluster_temperatures: tuple  # (teacher: Sinkhorn-Knopp, student: cross-entropies)


def make_models(config, grid: int, activation_sharding=None) -> Models:
    """The modules for `config`; `activation_sharding` (FSDP meshes) pins block inputs to a batch split."""
    return Models(
        encoder=vit.make_encoder(config.model, activation_sharding=activation_sharding),
        predictor=vit.make_predictor(config.model, grid, grid, activation_sharding=activation_sharding),
        mean=tuple(config.data.mean),
        std=tuple(config.data.std),
        loss=config.optim.loss,
        var_cov_weight=config.optim.var_cov_weight,
        sigreg_weight=config.optim.sigreg_weight,
        target_layers=config.optim.target_layers,
        pooled_target_weight=config.optim.pooled_target_weight,
        target_clusters=config.optim.target_clusters,
        cluster_temperatures=tuple(config.optim.cluster_temperatures),
    )


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def init_state(rng: jax.Array, models: Models, tx: optax.GradientTransformation, batch_shapes: dict) -> TrainState:
    """Fresh state; `batch_shapes` maps batch keys to ShapeDtypeStructs (only shapes are used)."""
    k_enc, k_pred = jax.random.split(rng)
    images = jnp.zeros((1,) + batch_shapes["images"].shape[1:], jnp.float32)
    ctx_idx = jnp.zeros((1,) + batch_shapes["context_idx"].shape[-1:], jnp.int32)  # one mask set's shapes
    tgt_idx = jnp.zeros((1,) + batch_shapes["target_idx"].shape[-2:], jnp.int32)
    enc_params = models.encoder.init(k_enc, images)["params"]
    context = jnp.zeros(ctx_idx.shape + (models.encoder.embed_dim,), jnp.float32)
    pred_params = models.predictor.init(
        k_pred, context, ctx_idx, ctx_idx >= 0, tgt_idx, tgt_idx >= 0
    )["params"]
    params = {"encoder": enc_params, "predictor": pred_params}
    if models.target_clusters:  # a key of its own: the reference's initialisation is unchanged
        params["clusters"] = init_cluster_heads(jax.random.fold_in(rng, 2), models.encoder.embed_dim,
                                                models.target_clusters)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # Reference: target_encoder = copy.deepcopy(encoder).
        target_params=jax.tree.map(jnp.copy, enc_params),
        opt_state=tx.init(params),
    )


def gather_targets(h: jax.Array, target_idx: jax.Array) -> jax.Array:
    """h: (B, N, D), target_idx: (B, ...) (e.g. (B, M, T), or (B, S, M, T) with mask sets) -> (B, ..., D)."""
    b = target_idx.shape[0]
    return vit.gather_tokens(h, target_idx.reshape(b, -1)).reshape(target_idx.shape + h.shape[-1:])


def encode_context(params, images, batch, models: Models) -> jax.Array:
    """The online encoder on each image's context tokens: (B, K, D)."""
    return models.encoder.apply({"params": params["encoder"]}, images, batch["context_idx"], batch["context_valid"])


def predict(params, images, batch, models: Models) -> jax.Array:
    """The online encoder on each image's context, then the predictor: (B, M, T, D) predictions."""
    return predict_from_context(params, encode_context(params, images, batch, models), batch, models)


def predict_from_context(params, z, batch, models: Models) -> jax.Array:
    """The predictor on context features `z` (B, K, D): (B, M, T, D) predictions."""
    return models.predictor.apply(
        {"params": params["predictor"]},
        z,
        batch["context_idx"],
        batch["context_valid"],
        batch["target_idx"],
        batch["target_valid"],
    )


def loss_fn(params, target_params, batch, models: Models, step=0) -> jax.Array:
    """The training objective: I-JEPA's prediction loss, plus each anti-collapse term x its weight when set."""
    return total_loss(loss_terms(params, target_params, batch, models, step), models)


def total_loss(terms: dict, models: Models) -> jax.Array:
    loss = terms["prediction_loss"]
    # The clustering loss trains only the teacher's prototypes (disjoint parameters): its weight is 1, as CAPI's.
    weights = (("var_cov_penalty", models.var_cov_weight), ("sigreg", models.sigreg_weight),
               ("pooled_target_loss", models.pooled_target_weight), ("cluster_loss", 1.0))
    for name, weight in weights:
        if name in terms:
            loss = loss + weight * terms[name]
    return loss


def loss_terms(params, target_params, batch, models: Models, step=0) -> dict:
    """{'prediction_loss': I-JEPA's loss, plus 'var_cov_penalty' / 'sigreg' / 'pooled_target_loss' when their
    weights are > 0 and 'cluster_loss' with clustering targets}, unweighted. `step` seeds SIGReg's random
    directions."""
    images = normalize(batch["images"], models.mean, models.std)
    h = jax.lax.stop_gradient(target_features(target_params, images, models))
    terms = {}
    if models.target_clusters:
        h_or_q, terms["cluster_loss"] = cluster_assignments(params["clusters"]["teacher"], h,
                                                            models.cluster_temperatures)
    else:
        h_or_q = h
    # Gathered before the mask sets are flattened: every set's targets come from one pass, h unrepeated.
    targets = gather_targets(h_or_q, batch["target_idx"])  # (B, [S,] M, T, D or K)
    images, batch, sets = per_mask_set(images, batch)
    targets = targets.reshape((-1,) + targets.shape[-3:])

    z = encode_context(params, images, batch, models)
    pred = predict_from_context(params, z, batch, models).astype(jnp.float32)

    valid = batch["target_valid"].astype(jnp.float32)
    if models.target_clusters:
        logits = student_cluster_logits(params["clusters"]["student"], pred, models.cluster_temperatures[1])
        per_token = optax.softmax_cross_entropy(logits, targets)
    else:
        per_token = regression_loss(pred, targets, models.loss)
    terms["prediction_loss"] = (per_token * valid).sum() / jnp.maximum(valid.sum(), 1.0)
    z = z.astype(jnp.float32)
    if models.pooled_target_weight > 0:
        # The probe reads pooled features: train them directly, the context's mean predicting the image's.
        terms["pooled_target_loss"] = regression_loss(
            pool_valid(z, batch["context_valid"]), jnp.repeat(h.mean(1), sets, axis=0), models.loss
        ).mean()
    if models.var_cov_weight > 0:
        terms["var_cov_penalty"] = var_cov_penalty(z, batch["context_valid"])
    if models.sigreg_weight > 0:
        pooled = pool_valid(z, batch["context_valid"])
        directions = sigreg_directions(jax.random.fold_in(jax.random.key(0), step), pooled.shape[-1])
        terms["sigreg"] = sigreg(pooled, directions)
    return terms


MASK_KEYS = ("context_idx", "context_valid", "target_idx", "target_valid")


def per_mask_set(images, batch: dict) -> tuple:
    """(images, batch, S): with S mask sets per image (context (B, S, K)) each (image, set) becomes one
    example of the context encoder and predictor, the images repeated S times and the masks flattened to
    B * S; the target encoder ran once per image. With one set, unchanged (S = 1)."""
    if batch["context_idx"].ndim == 2:
        return images, batch, 1
    sets = batch["context_idx"].shape[1]
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k in MASK_KEYS}
    return jnp.repeat(images, sets, axis=0), {**batch, **flat}, sets


def target_features(target_params, images, models: Models) -> jax.Array:
    """What the predictor regresses, at every patch: (B, N, D) float32.

    Reference (target_layers=1): the EMA encoder's output LayerNorm-ed without affine (torch's default
    eps 1e-5). data2vec 2.0 (K = target_layers > 1): each of the last K blocks' outputs instance-normalised
    (per channel, over the tokens), their mean, then LayerNorm-ed without affine (fairseq data2vec2.py
    make_targets with instance_norm_target_layer and layer_norm_targets).
    """
    if models.target_layers <= 1:
        h = models.encoder.apply({"params": target_params}, images)
        return jax.nn.standardize(h.astype(jnp.float32), axis=-1, epsilon=1e-5)
    _, layers = models.encoder.apply({"params": target_params}, images, keep_layers=models.target_layers)
    layers = jax.nn.standardize(layers.astype(jnp.float32), axis=2, epsilon=1e-5)  # (K, B, N, D): over N
    return jax.nn.standardize(layers.mean(0), axis=-1, epsilon=1e-5)


def init_cluster_heads(rng: jax.Array, dim: int, k: int) -> dict:
    """CAPI's two heads over K clusters (capi model.py): the teacher's online clustering, prototypes ~ N(0, 1)
    and a zero bias; the student's weight-normalised linear layer, directions ~ truncated normal (std 0.02),
    gains 1, no bias."""
    k_teacher, k_student = jax.random.split(rng)
    return {
        "teacher": {"prototypes": jax.random.normal(k_teacher, (dim, k)), "bias": jnp.zeros((k,))},
        "student": {"kernel": 0.02 * jax.random.truncated_normal(k_student, -2.0, 2.0, (dim, k)),
                    "scale": jnp.ones((k,))},
    }


def l2_normalize(x: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def sinkhorn_knopp(scores: jax.Array, iters: int = SINKHORN_ITERS) -> jax.Array:
    """Balanced soft assignments of N tokens to K clusters, (N, K) scores -> (N, K), each row a distribution:
    alternately every cluster's mass over the tokens, then every token's over the clusters, normalised (capi
    model.py sinkhorn_knopp). In the log domain, where CAPI shifts exp's argument and adds 1e-8 to each
    sum: at a few thousand tokens a token far from every prototype has column-normalised masses below
    that 1e-8, and its row would not sum to 1."""
    log_q = scores
    for _ in range(iters):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True)
        log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
    return jnp.exp(log_q)


def cluster_assignments(teacher: dict, h: jax.Array, temperatures: tuple) -> tuple[jax.Array, jax.Array]:
    """CAPI's targets from the target features h (B, N, D) at `temperatures` (teacher, student):
    (assignments (B, N, K), clustering loss).

    The L2-normalised tokens score against K prototypes (a linear layer with bias). Sinkhorn-Knopp over all
    B x N tokens of the (global) batch at the teacher temperature (CAPI: 0.06) turns the scores into balanced
    assignments, which the predictor's tokens learn to predict. The prototypes learn online to predict the
    assignments of their own scores at the student temperature (CAPI: 0.12; the clustering loss, a gradient
    into the prototypes only).
    CAPI balances each patch position separately over its 16,384 images; at small batches there are too
    few images per position, so all tokens are balanced together (its positionwise_sk=False)."""
    b, n, _ = h.shape
    scores = l2_normalize(jax.lax.stop_gradient(h), 1e-7) @ teacher["prototypes"] + teacher["bias"]
    teacher_temp, student_temp = temperatures
    q = sinkhorn_knopp(jax.lax.stop_gradient(scores).reshape(b * n, -1) / teacher_temp).reshape(b, n, -1)
    return q, optax.softmax_cross_entropy(scores / student_temp, q).mean()


def student_cluster_logits(student: dict, pred: jax.Array, temperature: float) -> jax.Array:
    """The predictor's tokens (..., D) as CAPI's student scores over the K clusters (..., K): gain x cosine to
    each weight-normalised direction, over the student temperature."""
    directions = student["kernel"] / (jnp.linalg.norm(student["kernel"], axis=0, keepdims=True) + 1e-8)
    return student["scale"] * (l2_normalize(pred, 1e-12) @ directions) / temperature


def regression_loss(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    """Per-vector loss, the mean over the last axis: smooth L1 (beta 1, the reference code) or squared error."""
    if kind == "smooth_l1":
        return optax.huber_loss(pred, target, delta=1.0).mean(-1)  # == smooth L1 with beta 1
    return optax.squared_error(pred, target).mean(-1)


def pool_valid(z: jax.Array, valid: jax.Array) -> jax.Array:
    """The mean of each image's valid tokens: (B, K, D), (B, K) -> (B, D)."""
    w = valid.astype(z.dtype)[..., None]
    return (z * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def var_cov_penalty(z: jax.Array, valid: jax.Array) -> jax.Array:
    """VICReg's variance and covariance terms (Bardes et al., 2022) on the online encoder's context
    features mean-pooled per image, (B, K, D) -> scalar: mean over dims of relu(1 - std) across the
    batch, plus the squared off-diagonal covariances / D at VICReg's 1:25 ratio to the variance term.
    Not part of I-JEPA: an optional guard against the encoder collapsing (`optim.var_cov_weight`)."""
    pooled = pool_valid(z, valid)
    centred = pooled - pooled.mean(0)
    n, d = pooled.shape
    std = jnp.sqrt(centred.var(0) * n / max(n - 1, 1) + 1e-4)
    variance = jax.nn.relu(1.0 - std).mean()
    cov = centred.T @ centred / max(n - 1, 1)
    covariance = (jnp.sum(cov**2) - jnp.sum(jnp.diag(cov) ** 2)) / d
    return variance + covariance / 25.0


# LeJEPA's settings (Balestriero & LeCun, 2025): 1024 random directions per step (the paper's advice,
# section 6.1), the Epps-Pulley integral on 17 knots over t in [0, 3] (its code's defaults,
# lejepa/univariate/epps_pulley.py).
SIGREG_SLICES = 1024
SIGREG_T_MAX = 3.0
SIGREG_KNOTS = 17


def sigreg_directions(key: jax.Array, dim: int, num: int = SIGREG_SLICES) -> jax.Array:
    """`num` random unit vectors in R^dim, as columns: (dim, num)."""
    a = jax.random.normal(key, (dim, num), jnp.float32)
    return a / jnp.linalg.norm(a, axis=0, keepdims=True)


def sigreg(x: jax.Array, directions: jax.Array) -> jax.Array:
    """LeJEPA's SIGReg: how far the batch `x` (N, D) is from an isotropic standard normal, seen along
    `directions` (D, S). For each projection, the Epps-Pulley statistic
    N * integral over t of |empirical characteristic function(t) - exp(-t^2/2)|^2 * exp(-t^2/2),
    by the trapezoid rule on [-t_max, t_max] (the integrand is even: computed on [0, t_max]); then the
    mean over directions. About 1 for standard-normal features (its expectation is the integral of
    (1 - exp(-t^2)) exp(-t^2/2), 1.05, whatever N), and growing with N for any other distribution.
    Not part of I-JEPA: an optional guard against collapse (`optim.sigreg_weight`)."""
    t = jnp.linspace(0.0, SIGREG_T_MAX, SIGREG_KNOTS)
    gauss_cf = jnp.exp(-0.5 * t**2)
    xt = (x @ directions)[..., None] * t  # (N, S, knots)
    error = (jnp.cos(xt).mean(0) - gauss_cf) ** 2 + jnp.sin(xt).mean(0) ** 2
    dt = SIGREG_T_MAX / (SIGREG_KNOTS - 1)
    trapezoid = jnp.full((SIGREG_KNOTS,), 2 * dt).at[jnp.array([0, -1])].set(dt)  # both halves of [-t, t]
    return x.shape[0] * (error * gauss_cf * trapezoid).sum(-1).mean()


def all_finite(tree) -> jax.Array:
    """One bool: every float in `tree` is finite (a fused reduction, no host round trip)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def train_step(state: TrainState, batch: dict, *, models: Models, tx, schedules: optim.Schedules):
    """One optimizer step + EMA update. Pure: (state, batch) -> (state, metrics)."""
    def objective(params):
        terms = loss_terms(params, state.target_params, batch, models, state.step)
        return total_loss(terms, models), terms

    (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The momentum is a traced function of the step, so one compiled step
    # serves the whole schedule.
    m = schedules.momentum(state.step)
    target_params = jax.tree.map(lambda t, o: m * t + (1.0 - m) * o, state.target_params, params["encoder"])
    metrics = {
        "loss": loss,
        "lr": schedules.lr(state.step),
        "wd": schedules.weight_decay(state.step),
        "momentum": m,
        "grad_norm": optax.tree.norm(grads),
        "context_tokens": batch["context_valid"].sum(-1).mean(dtype=jnp.float32),
        "target_tokens": batch["target_valid"].sum(-1).mean(dtype=jnp.float32),
        # The loss is computed before the update: this is what says the state to be saved is usable.
        "state_finite": all_finite((params, target_params, opt_state)),
    }
    if len(terms) > 1:  # the loss is a sum: log its parts too
        metrics.update(terms)
    if "skipped" in batch:  # unreadable images the input pipeline replaced
        metrics["skipped_images"] = batch["skipped"].sum()
    new_state = state.replace(
        step=state.step + 1, params=params, target_params=target_params, opt_state=opt_state
    )
    return new_state, metrics


def jit_train_step(models: Models, tx, schedules: optim.Schedules, state_sharding, batch_sharding, metrics_sharding):
    """The train step, jit-compiled with explicit shardings and the state donated."""
    return jax.jit(
        functools.partial(train_step, models=models, tx=tx, schedules=schedules),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=(0,),
    )
