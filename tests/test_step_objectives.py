"""Optional I-JEPA objectives (off in the reference configs), each against an independent float64 numpy
oracle built on test_step_golden.py's: data2vec 2.0 targets from the last K blocks
(optim.target_layers), the pooled-target term (optim.pooled_target_weight), several mask sets per image
(mask.sets) and CAPI's clustering targets (optim.target_clusters)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_step_golden as golden

from ijepa_jax import encoder_export, optim
from ijepa_jax import step as step_lib


def instance_norm(x, eps=1e-5):
    """torch.nn.functional.instance_norm on (tokens, channels): per channel, over the tokens, biased var."""
    mu = x.mean(0, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(0, keepdims=True) + eps)


def numpy_block_outputs(image, p):
    """Every block's output of the encoder on one uint8 image (no final norm): a list of (N, D)."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = (image.astype(np.float64) / 255.0 - mean) / std
    kernel = p["patch_embed"]["kernel"]
    g, s = golden.GRID, golden.PATCH
    patches = x.reshape(g, s, g, s, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)
    x = patches @ kernel.reshape(-1, kernel.shape[-1]) + p["patch_embed"]["bias"]
    x = x + golden.sincos_table(x.shape[-1], g, g)
    outputs = []
    for i in range(golden.ENC_DEPTH):
        x = golden.block(x, p["stack"][f"blocks_{i}"], golden.HEADS)
        outputs.append(x)
    return outputs


def numpy_targets(image, p, k):
    """data2vec 2.0: the last k blocks' outputs instance-normalised, averaged, then layer-normed (no affine)."""
    if k == 1:
        return golden.layer_norm(golden.encode(image, p), eps=1e-5)
    layers = numpy_block_outputs(image, p)[-k:]
    return golden.layer_norm(np.mean([instance_norm(x) for x in layers], axis=0), eps=1e-5)


def numpy_loss(params, target_params, batch, k=1, pooled_weight=0.0):
    """The objective in float64, image by image: golden.oracle_loss's token loss with `k`-layer targets,
    plus pooled_weight x smooth-L1(mean of the context features, mean of all N targets)."""
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    enc, pred, tgt_enc = f64(params["encoder"]), f64(params["predictor"]), f64(target_params)
    total, count, pooled = 0.0, 0, []
    for b in range(batch["images"].shape[0]):
        image = batch["images"][b]
        ctx = batch["context_idx"][b][batch["context_valid"][b]]
        h = numpy_targets(image, tgt_enc, k)
        z = golden.encode(image, enc, keep=ctx)
        for m in range(batch["target_idx"].shape[1]):
            tgt = batch["target_idx"][b, m][batch["target_valid"][b, m]]
            total += golden.smooth_l1(golden.predict(z, ctx, tgt, pred) - h[tgt]).mean(-1).sum()
            count += len(tgt)
        pooled.append(golden.smooth_l1(z.mean(0) - h.mean(0)).mean())
    return total / count + pooled_weight * np.mean(pooled)


@pytest.fixture(scope="module")
def problem():
    config = golden.make_config()
    models = step_lib.make_models(config, golden.GRID)
    tx = optim.make_optimizer(config.optim, optim.make_schedules(config.optim, golden.STEPS_PER_EPOCH))
    params = golden.numpy_params(golden.param_shapes(models, tx), seed=1)
    target = golden.perturbed_copy(params["encoder"], seed=2)
    return models, params, target, golden.make_batch(0)


def test_data2vec_targets_match_numpy(problem):
    models, params, target, batch = problem
    images = step_lib.normalize(batch["images"], models.mean, models.std)
    got = step_lib.target_features(target, images, dataclasses.replace(models, target_layers=2))
    f64 = jax.tree.map(lambda x: np.asarray(x, np.float64), target)
    want = np.stack([numpy_targets(image, f64, 2) for image in batch["images"]])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # Not the reference targets: the option changes what is predicted.
    reference = np.asarray(step_lib.target_features(target, images, models))
    assert np.abs(reference - want).max() > 0.1


@pytest.mark.parametrize("k,pooled_weight", [(1, 0.0), (2, 0.0), (1, 0.5), (2, 0.01)])
def test_loss_with_each_option_matches_numpy(problem, k, pooled_weight):
    models, params, target, batch = problem
    models = dataclasses.replace(models, target_layers=k, pooled_target_weight=pooled_weight)
    got = float(step_lib.loss_fn(params, target, batch, models))
    assert got == pytest.approx(numpy_loss(params, target, batch, k, pooled_weight), rel=golden.LOSS_RTOL * 5)


def test_the_pooled_term_is_logged_and_has_a_gradient_only_into_the_online_encoder(problem):
    models, params, target, batch = problem
    models = dataclasses.replace(models, pooled_target_weight=1.0)
    terms = step_lib.loss_terms(params, target, batch, models)
    assert set(terms) == {"prediction_loss", "pooled_target_loss"}
    only_pooled = lambda p, t: step_lib.loss_terms(p, t, batch, models)["pooled_target_loss"]  # noqa: E731
    grad_params, grad_target = jax.grad(only_pooled, argnums=(0, 1))(params, target)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_target))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_params["predictor"]))
    assert float(jnp.abs(grad_params["encoder"]["patch_embed"]["kernel"]).max()) > 0


def test_scanned_encoder_keeps_the_same_last_layers(problem):
    """keep_layers through nn.scan equals the unrolled stack's (the reference configs scan)."""
    models, _, target, batch = problem
    config = golden.make_config()
    config.model.scan_layers = True
    scanned = step_lib.make_models(config, golden.GRID).encoder
    stacked = {**target, "stack": {"blocks": jax.tree.map(lambda *x: jnp.stack(x), *[
        target["stack"][f"blocks_{i}"] for i in range(golden.ENC_DEPTH)])}}
    assert jax.tree.structure(encoder_export.unstack_blocks(stacked)) == jax.tree.structure(target)
    images = step_lib.normalize(batch["images"], models.mean, models.std)
    _, unrolled_layers = models.encoder.apply({"params": target}, images, keep_layers=2)
    _, scanned_layers = scanned.apply({"params": stacked}, images, keep_layers=2)
    np.testing.assert_allclose(np.asarray(scanned_layers), np.asarray(unrolled_layers), rtol=1e-5, atol=1e-5)


def test_a_train_step_with_both_options_logs_each_term():
    """Through train.build: the config keys reach the step, which logs the parts of the sum."""
    from conftest import small_config

    from ijepa_jax import train

    exp = train.build(small_config(**{"optim.target_layers": 2, "optim.pooled_target_weight": 0.1}))
    with train.train_batches(exp) as batches:
        _, metrics = exp.train_step(exp.init(), next(batches))
    parts = float(metrics["prediction_loss"]) + 0.1 * float(metrics["pooled_target_loss"])
    assert float(metrics["loss"]) == pytest.approx(parts, rel=1e-6) and np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("overrides,match", [
    ({"optim.target_layers": 0}, "give 1 \\(the reference\\) to 2"),
    ({"optim.target_layers": 3}, "last K of vit_micro's 2 blocks"),
    ({"optim.pooled_target_weight": -1.0}, "pooled_target_weight=-1.0 must be >= 0"),
])
def test_out_of_range_settings_are_refused(overrides, match):
    from conftest import small_config

    from ijepa_jax import config_lib

    with pytest.raises(ValueError, match=match):
        config_lib.validate(small_config(**overrides), jax.device_count())


# mask.sets: several mask sets per image sharing one target-encoder pass (data2vec 2.0's clone_batch)


def two_set_batch():
    """golden.make_batch(0)'s images with two mask sets: its own masks and make_batch(1)'s."""
    a, b = golden.make_batch(0), golden.make_batch(1)
    multi = {"images": a["images"]}
    multi.update({k: np.stack([a[k], b[k]], axis=1) for k in step_lib.MASK_KEYS})
    expanded = {"images": np.repeat(a["images"], 2, axis=0)}
    expanded.update({k: multi[k].reshape((-1,) + multi[k].shape[2:]) for k in step_lib.MASK_KEYS})
    return multi, expanded


@pytest.mark.parametrize("k,pooled_weight", [(1, 0.0), (2, 0.1)])
def test_two_mask_sets_give_the_loss_of_each_image_repeated_with_each_set(problem, k, pooled_weight):
    """The oracle sees a batch of B x S examples (each image once per set): the same mean over every valid
    target token, and the same pooled term."""
    models, params, target, _ = problem
    models = dataclasses.replace(models, target_layers=k, pooled_target_weight=pooled_weight)
    multi, expanded = two_set_batch()
    got = float(step_lib.loss_fn(params, target, multi, models))
    assert got == pytest.approx(numpy_loss(params, target, expanded, k, pooled_weight), rel=golden.LOSS_RTOL * 5)


def test_mask_sets_share_one_target_encoder_pass(problem):
    """XLA's FLOP count: B images with 2 sets cost less than 2B images with 1 set, by the target pass."""
    models, params, target, _ = problem
    multi, expanded = two_set_batch()
    flops = lambda batch: jax.jit(step_lib.loss_fn, static_argnums=3).lower(  # noqa: E731
        params, target, batch, models).compile().cost_analysis()["flops"]
    shared, separate = flops(multi), flops(expanded)
    assert shared < 0.9 * separate, (shared, separate)


def test_the_sampler_draws_independent_sets_on_a_new_axis():
    from ijepa_jax import masks

    spec = masks.MaskSpec(grid_h=8, grid_w=8, num_targets=2, min_keep=4, mode="corrected", context_tokens=12, sets=3)
    out = masks.MaskSampler(spec).sample_sets(np.random.default_rng(0), 5)
    assert out["context_idx"].shape == (5, 3, 12) and out["target_idx"].shape[:3] == (5, 3, 2)
    assert not np.array_equal(out["target_idx"][:, 0], out["target_idx"][:, 1])
    one = masks.MaskSampler(dataclasses.replace(spec, sets=1))
    for key, value in one.sample_sets(np.random.default_rng(0), 5).items():
        np.testing.assert_array_equal(value, one.sample(np.random.default_rng(0), 5)[key])


# optim.target_clusters: CAPI's online Sinkhorn-Knopp cluster assignments as the targets

CLUSTERS = 8


def numpy_sinkhorn(scores, iters):
    """Sinkhorn-Knopp as matrix scaling in float64: Q = diag(r) exp(S) diag(c), the cluster scalings c
    making every column sum to 1, then the token scalings r every row (no shift: float64 has the range)."""
    e = np.exp(scores.astype(np.float64))
    r = np.ones(e.shape[0])
    for _ in range(iters):
        c = 1.0 / (r @ e)
        r = 1.0 / (e @ c)
    return r[:, None] * e * c[None, :]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_cluster_terms(params, target_params, batch, teacher_temp=0.06, student_temp=0.12):
    """(prediction loss, clustering loss) of CAPI's objective in float64 (capi model.py, train_capi.py): the
    teacher's L2-normalised target tokens score against prototypes + bias; SK at the teacher temperature
    (CAPI: 0.06) over all tokens of the batch gives Q; the student's gain x cosine to the normalised
    directions at the student temperature (CAPI: 0.12) predicts Q at the target tokens; the teacher's own
    scores at the student temperature predict Q at every token."""
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    enc, pred, tgt_enc, heads = (f64(params["encoder"]), f64(params["predictor"]), f64(target_params),
                                 f64(params["clusters"]))
    teacher, student = heads["teacher"], heads["student"]
    h = np.stack([numpy_targets(image, tgt_enc, 1) for image in batch["images"]])  # (B, N, D)
    scores = h / np.linalg.norm(h, axis=-1, keepdims=True) @ teacher["prototypes"] + teacher["bias"]
    q = numpy_sinkhorn(scores.reshape(-1, CLUSTERS) / teacher_temp, 3).reshape(scores.shape)
    clustering = -(q * log_softmax(scores / student_temp)).sum(-1).mean()
    directions = student["kernel"] / np.linalg.norm(student["kernel"], axis=0)
    total, count = 0.0, 0
    for b in range(batch["images"].shape[0]):
        ctx = batch["context_idx"][b][batch["context_valid"][b]]
        z = golden.encode(batch["images"][b], enc, keep=ctx)
        for m in range(batch["target_idx"].shape[1]):
            tgt = batch["target_idx"][b, m][batch["target_valid"][b, m]]
            p = golden.predict(z, ctx, tgt, pred)
            s = student["scale"] * (p / np.linalg.norm(p, axis=-1, keepdims=True) @ directions) / student_temp
            total += -(q[b, tgt] * log_softmax(s)).sum()
            count += len(tgt)
    return total / count, clustering


@pytest.fixture(scope="module")
def cluster_problem(problem):
    """The golden problem with CAPI's heads over 8 clusters (gains away from 1, biases away from 0)."""
    models, params, target, batch = problem
    heads = step_lib.init_cluster_heads(jax.random.key(3), models.encoder.embed_dim, CLUSTERS)
    rng = np.random.default_rng(4)
    heads["teacher"]["bias"] = jnp.asarray(rng.normal(0, 0.3, CLUSTERS), jnp.float32)
    heads["student"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, CLUSTERS), jnp.float32)
    return dataclasses.replace(models, target_clusters=CLUSTERS), {**params, "clusters": heads}, target, batch


def test_sinkhorn_matches_matrix_scaling_and_balances_the_clusters():
    scores = np.random.default_rng(0).normal(0, 20.0, (48, 6))  # logits / 0.06: wide, as in training
    got = np.asarray(step_lib.sinkhorn_knopp(jnp.asarray(scores, jnp.float32), iters=3))
    np.testing.assert_allclose(got, numpy_sinkhorn(scores, 3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)  # each token: a distribution over clusters
    # Iterated, every cluster gets an equal share of the tokens, where a softmax gives most of them to few.
    balanced = np.asarray(step_lib.sinkhorn_knopp(jnp.asarray(scores, jnp.float32), iters=200))
    np.testing.assert_allclose(balanced.sum(0), 48 / 6, rtol=1e-2)
    softmax = np.exp(log_softmax(scores))
    assert np.abs(softmax.sum(0) - 8).max() > 2


def test_clustering_targets_match_numpy(cluster_problem):
    models, params, target, batch = cluster_problem
    terms = step_lib.loss_terms(params, target, batch, models)
    assert set(terms) == {"prediction_loss", "cluster_loss"}
    want_prediction, want_clustering = numpy_cluster_terms(params, target, batch)
    assert float(terms["prediction_loss"]) == pytest.approx(want_prediction, rel=1e-5)
    assert float(terms["cluster_loss"]) == pytest.approx(want_clustering, rel=1e-5)
    total = float(step_lib.loss_fn(params, target, batch, models))
    assert total == pytest.approx(want_prediction + want_clustering, rel=1e-5)


def test_other_cluster_temperatures_match_numpy_at_those_temperatures(cluster_problem):
    """optim.cluster_temperatures = (teacher, student) replaces CAPI's (0.06, 0.12) in all three places:
    the Sinkhorn-Knopp assignments, the prototypes' cross-entropy and the predictor's."""
    models, params, target, batch = cluster_problem
    warmer = dataclasses.replace(models, cluster_temperatures=(0.1, 0.2))
    terms = step_lib.loss_terms(params, target, batch, warmer)
    want_prediction, want_clustering = numpy_cluster_terms(params, target, batch, 0.1, 0.2)
    assert float(terms["prediction_loss"]) == pytest.approx(want_prediction, rel=1e-5)
    assert float(terms["cluster_loss"]) == pytest.approx(want_clustering, rel=1e-5)
    capi = numpy_cluster_terms(params, target, batch)
    assert abs(want_prediction - capi[0]) > 1e-2 and abs(want_clustering - capi[1]) > 1e-2
    from conftest import small_config

    config = small_config(**{"optim.target_clusters": 16, "optim.cluster_temperatures": (0.1, 0.2)})
    assert step_lib.make_models(config, grid=4).cluster_temperatures == (0.1, 0.2)
    assert step_lib.make_models(small_config(), grid=4).cluster_temperatures == (0.06, 0.12)  # CAPI's


def test_the_clustering_loss_trains_only_the_prototypes_and_the_prediction_not_them(cluster_problem):
    models, params, target, batch = cluster_problem
    term = lambda name: lambda p, t: step_lib.loss_terms(p, t, batch, models)[name]  # noqa: E731
    peak = lambda tree: max(float(jnp.abs(g).max()) for g in jax.tree.leaves(tree))  # noqa: E731
    grads, grads_target = jax.grad(term("cluster_loss"), argnums=(0, 1))(params, target)
    assert peak(grads["clusters"]["teacher"]) > 0 and peak(grads_target) == 0
    assert peak({k: v for k, v in grads.items() if k != "clusters"}) == 0 and peak(grads["clusters"]["student"]) == 0
    grads, grads_target = jax.grad(term("prediction_loss"), argnums=(0, 1))(params, target)
    assert peak(grads["clusters"]["teacher"]) == 0 and peak(grads_target) == 0  # the assignments are targets
    assert min(peak(grads[k]) for k in ("encoder", "predictor")) > 0 and peak(grads["clusters"]["student"]) > 0


def test_a_train_step_with_clustering_targets_keeps_the_reference_initialisation():
    """Through train.build: the heads are a key of their own, the encoder and predictor initialised as
    without them; the step logs both parts, and AdamW decays the student's kernel only."""
    from conftest import small_config

    from ijepa_jax import train

    plain, clustered = train.build(small_config()), train.build(small_config(**{"optim.target_clusters": 16}))
    state, reference = clustered.init(), plain.init()
    assert set(state.params) == {"encoder", "predictor", "clusters"}
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves({k: state.params[k] for k in reference.params})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert state.params["clusters"]["teacher"]["prototypes"].shape == (state.params["encoder"]["norm"]["scale"].size, 16)
    decays = optim.weight_decay_mask(state.params)["clusters"]
    assert decays["student"] == {"kernel": True, "scale": False} and not any(jax.tree.leaves(decays["teacher"]))
    with train.train_batches(clustered) as batches:
        _, metrics = clustered.train_step(state, next(batches))
    parts = float(metrics["prediction_loss"]) + float(metrics["cluster_loss"])
    assert float(metrics["loss"]) == pytest.approx(parts, rel=1e-6) and np.isfinite(parts)
    # A cross-entropy over 16 clusters starts near log 16, not near a regression loss's ~1.
    assert 1.5 < float(metrics["prediction_loss"]) < 4.0


@pytest.mark.parametrize("temperatures", [(0.0, 0.12), (0.06, -0.1)])
def test_cluster_temperatures_at_or_below_zero_are_refused(temperatures):
    from conftest import small_config

    from ijepa_jax import config_lib

    with pytest.raises(ValueError, match=r"optim.cluster_temperatures=.*give \(teacher, student\) temperatures > 0"):
        config_lib.validate(small_config(**{"optim.cluster_temperatures": temperatures}), jax.device_count())


@pytest.mark.parametrize("value", [1, -2])
def test_one_or_negative_clusters_are_refused(value):
    from conftest import small_config

    from ijepa_jax import config_lib

    with pytest.raises(ValueError, match=f"optim.target_clusters={value}: give a number of clusters K >= 2"):
        config_lib.validate(small_config(**{"optim.target_clusters": value}), jax.device_count())
