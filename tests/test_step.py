"""The I-JEPA loss and train step: sharding invariance, EMA, stop-gradient, loss masking, learning.

State and step are built exactly as ijepa_jax/train.py builds them.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from ijepa_jax import masks, optim, sharding, train
from ijepa_jax import step as step_lib
from ijepa_jax.data import pipeline, sources


def build(config, mesh):
    """models, schedules, optimizer, initial state and the jitted train step, built as train.build
    does, but on a given `mesh` (train.build always uses every device)."""
    spec = masks.resolve_spec(config)
    grid = config.data.crop_size // config.model.patch_size
    source = sources.make_source(config.data)
    steps_per_epoch = pipeline.steps_per_epoch(len(source), config.data.batch_size)
    schedules = optim.make_schedules(config.optim, steps_per_epoch)
    tx = optim.make_optimizer(config.optim, schedules)
    models = step_lib.make_models(config, grid)
    shapes = train.batch_shapes(config, spec)
    init = lambda rng: step_lib.init_state(rng, models, tx, shapes)  # noqa: E731
    rng = jax.random.key(config.seed)
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(init, rng))
    state = jax.jit(init, out_shardings=state_sharding)(rng)
    step = step_lib.jit_train_step(
        models, tx, schedules, state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)
    )
    return types.SimpleNamespace(
        spec=spec, source=source, schedules=schedules, tx=tx, models=models, state=state, step=step, mesh=mesh
    )


def host_batch(config, spec, seed=0):
    """One global batch as numpy: synthetic images + masks from the real sampler."""
    b = config.data.batch_size
    src = sources.SyntheticSource(64, config.data.crop_size)
    images = np.stack([src[(seed * b + i) % len(src)]["image"] for i in range(b)])
    return {"images": images, **masks.MaskSampler(spec).sample(np.random.default_rng(seed), b)}


def tree_allclose(a, b, rtol=1e-5, atol_frac=1e-6):
    """Leafwise allclose; the absolute tolerance scales with each leaf's magnitude."""
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x, y in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)],
        jax.tree.leaves(a),
        jax.tree.leaves(b),
    ):
        scale = max(np.abs(x).max(), np.abs(y).max(), 1e-30)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_frac * scale, err_msg=path)


def fresh_state(b):
    """A copy of the fixture's initial state (the jitted step donates, i.e. consumes, its input)."""
    return jax.tree.map(jnp.copy, b.state)


@pytest.fixture(scope="module")
def setup8():
    """The small config's model/state/step on the 8-device mesh and one host batch."""
    config = small_config()
    b = build(config, sharding.make_mesh())
    b.config = config
    b.batch = host_batch(config, b.spec)
    b.params0 = jax.device_get(b.state.params)
    b.target0 = jax.device_get(b.state.target_params)
    b.loss = jax.jit(functools.partial(step_lib.loss_fn, models=b.models))
    return b


# ----------------------------------------------------------------------------
# 1 device vs 8 devices


def test_loss_and_grads_same_on_1_and_8_devices(setup8):
    """Splitting the batch over 8 devices gives the loss and gradients of the single-device run."""
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        assert mesh.size == len(devices)
        rep = sharding.replicated(mesh)
        f = jax.jit(
            jax.value_and_grad(functools.partial(step_lib.loss_fn, models=setup8.models)),
            in_shardings=(rep, rep, sharding.batch_sharding(mesh)),
        )
        results.append(jax.device_get(f(setup8.params0, setup8.target0, setup8.batch)))
    (loss1, grads1), (loss8, grads8) = results
    assert np.isfinite(loss1) and loss1 > 0
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    tree_allclose(grads8, grads1, rtol=1e-5)
    assert max(np.abs(g).max() for g in jax.tree.leaves(grads1)) > 0


def test_train_step_same_on_1_and_8_devices(setup8):
    """One full train_step (loss, AdamW update, EMA) gives the same new state on both meshes."""
    b = setup8
    mesh1 = sharding.make_mesh(jax.devices()[:1])
    state_sharding1 = jax.tree.map(lambda _: sharding.replicated(mesh1), b.state)
    step1 = step_lib.jit_train_step(
        b.models, b.tx, b.schedules, state_sharding1, sharding.batch_sharding(mesh1), sharding.replicated(mesh1)
    )
    state1 = jax.device_put(jax.device_get(b.state), state_sharding1)
    assert state1.params["encoder"]["norm"]["scale"].sharding.mesh.size == 1
    new1, m1 = step1(state1, b.batch)
    new8, m8 = b.step(fresh_state(b), b.batch)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    # Adam's first step is lr * g / (|g| + eps): for gradients near eps (1e-8) it amplifies the
    # reduction-order noise of the gradient, so the new parameters are compared to within 0.1% of
    # one step (lr), not to a relative tolerance.
    lr = float(b.schedules.lr(0))
    p1, p8 = jax.device_get((new1.params, new8.params))
    for x, y in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-3 * lr)
    t1, t8 = jax.device_get((new1.target_params, new8.target_params))
    for x, y in zip(jax.tree.leaves(t8), jax.tree.leaves(t1)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-3 * lr)
    # The step really moved the parameters.
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(jax.device_get(new8.params)), jax.tree.leaves(setup8.params0))]
    assert max(moved) > 0


# ----------------------------------------------------------------------------
# EMA and stop-gradient


def test_ema_update_uses_momentum_of_the_step(setup8):
    """After each step: target = m * old_target + (1 - m) * new_online_encoder, with m = momentum(step)
    (0.996 at step 0: the config's ema[0]), applied after the optimizer update."""
    b, config = setup8, setup8.config
    assert float(b.schedules.momentum(0)) == pytest.approx(config.optim.ema[0])
    state = fresh_state(b)
    for k in range(2):
        old_target = jax.device_get(state.target_params)
        state, metrics = b.step(state, host_batch(config, b.spec, seed=k))
        m = float(b.schedules.momentum(k))
        assert float(metrics["momentum"]) == pytest.approx(m, rel=1e-7)
        new_online = jax.device_get(state.params["encoder"])
        expected = jax.tree.map(lambda t, o: m * t + (1 - m) * o, old_target, new_online)
        tree_allclose(state.target_params, expected, rtol=1e-6, atol_frac=1e-6)
        # The target moved, but only by a (1 - m) fraction: it is not the online encoder.
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.target_params), old_target))
        assert max(diffs) > 0
        online_gap = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.target_params), new_online))
        assert max(online_gap) > 0
    assert int(state.step) == 2
    assert m == pytest.approx(config.optim.ema[0] + (config.optim.ema[1] - config.optim.ema[0]) / 16)  # 2 epochs x 8 steps


def test_target_encoder_gets_no_gradient(setup8):
    """The targets are stop-gradient-ed: d loss / d target_params is exactly zero, while the online
    encoder and the predictor do get gradients."""
    grad = jax.jit(jax.grad(functools.partial(step_lib.loss_fn, models=setup8.models), argnums=(0, 1)))
    g_online, g_target = jax.device_get(grad(setup8.params0, setup8.target0, setup8.batch))
    for leaf in jax.tree.leaves(g_target):
        np.testing.assert_array_equal(leaf, 0)
    assert max(np.abs(x).max() for x in jax.tree.leaves(g_online["encoder"])) > 0
    assert max(np.abs(x).max() for x in jax.tree.leaves(g_online["predictor"])) > 0


# ----------------------------------------------------------------------------
# loss masking


def test_loss_ignores_invalid_target_and_context_positions(setup8):
    """Changing the indices at positions marked invalid (targets or context) leaves the loss as it
    is; changing a valid target index does change it."""
    batch = {k: np.array(v) for k, v in setup8.batch.items()}
    batch["target_valid"][:, :, -1] = False
    batch["context_valid"][:, -2:] = False
    loss = lambda b: float(setup8.loss(setup8.params0, setup8.target0, b))  # noqa: E731
    base = loss(batch)

    other = {k: v.copy() for k, v in batch.items()}
    other["target_idx"][:, :, -1] = (batch["target_idx"][:, :, -1] + 7) % 16
    other["context_idx"][:, -2:] = (batch["context_idx"][:, -2:] + 5) % 16
    assert loss(other) == pytest.approx(base, rel=1e-6)

    changed = {k: v.copy() for k, v in batch.items()}
    changed["target_idx"][:, :, 0] = (batch["target_idx"][:, :, 0] + 7) % 16
    assert abs(loss(changed) - base) > 1e-4


def test_loss_is_mean_over_valid_target_tokens(setup8):
    """Padding is fully ignored, the normaliser included: a batch whose last target token is marked
    invalid has the loss of the same batch with that token removed (T - 1, all valid)."""
    batch = {k: np.array(v) for k, v in setup8.batch.items()}
    assert batch["target_valid"].all()  # 2x2 target blocks on the small config: T = 4, no padding
    padded = {**batch, "target_valid": batch["target_valid"].copy()}
    padded["target_valid"][:, :, -1] = False
    cut = {**batch, "target_idx": batch["target_idx"][:, :, :-1], "target_valid": batch["target_valid"][:, :, :-1]}
    loss = lambda b: float(setup8.loss(setup8.params0, setup8.target0, b))  # noqa: E731
    assert loss(padded) == pytest.approx(loss(cut), rel=1e-5)
    assert loss(padded) != pytest.approx(loss(batch), rel=1e-4)


def test_l2_loss_option(setup8):
    """optim.loss='l2' runs and is finite; since smooth_l1(x) = x^2/2 for |x| <= 1 and less than
    x^2/2 beyond, the squared error is at least twice the smooth-L1 loss."""
    l2_models = dataclasses.replace(setup8.models, loss="l2")
    l2 = float(jax.jit(functools.partial(step_lib.loss_fn, models=l2_models))(setup8.params0, setup8.target0, setup8.batch))
    smooth = float(setup8.loss(setup8.params0, setup8.target0, setup8.batch))
    assert np.isfinite(l2) and l2 > 0
    assert l2 >= 2 * smooth * (1 - 1e-6)
    assert step_lib.make_models(small_config(**{"optim.loss": "l2"}), 4).loss == "l2"


# ----------------------------------------------------------------------------
# learning


def test_loss_falls_on_synthetic_data():
    """30 steps (of a 4-epoch, 32-step schedule with 1 warmup epoch, lr 1e-3) on the synthetic
    gratings through the real grain pipeline: the mean loss of the last 5 steps is well below
    (< 60% of) the first step's loss."""
    config = small_config(**{"optim.epochs": 4, "optim.warmup_epochs": 1, "optim.lr": 1e-3})
    b = build(config, sharding.make_mesh())
    dataset = pipeline.pretrain_dataset(b.source, config.data, b.spec, config.seed)
    batches = iter(dataset)
    state, losses = b.state, []
    for _ in range(30):
        state, metrics = b.step(state, sharding.put_batch(next(batches), b.mesh))
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.6 * losses[0], losses


# ----------------------------------------------------------------------------
# the optional anti-collapse term (optim.var_cov_weight; off in the reference)


def numpy_var_cov(z, valid):
    """VICReg's variance + covariance/25 on per-image mean-pooled valid tokens, in float64."""
    z, w = np.asarray(z, np.float64), np.asarray(valid, np.float64)[..., None]
    pooled = (z * w).sum(1) / w.sum(1)
    n, d = pooled.shape
    c = pooled - pooled.mean(0)
    std = np.sqrt(c.var(0, ddof=1) + 1e-4)
    cov = c.T @ c / (n - 1)
    off = cov - np.diag(np.diag(cov))
    return np.maximum(0, 1 - std).mean() + (off**2).sum() / d / 25


def small_experiment_and_first_batch():
    exp = train.build(small_config())
    with train.train_batches(exp) as batches:
        return exp, exp.init(), next(batches)


def test_var_cov_penalty_matches_numpy_and_flags_collapse():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 5, 8)).astype(np.float32) * 0.3
    valid = rng.random((6, 5)) > 0.3
    valid[:, 0] = True
    np.testing.assert_allclose(float(step_lib.var_cov_penalty(jnp.asarray(z), jnp.asarray(valid))),
                               numpy_var_cov(z, valid), rtol=1e-5)
    collapsed = np.ones((6, 5, 8), np.float32)  # every image the same feature: std 0 in every dim
    assert float(step_lib.var_cov_penalty(jnp.asarray(collapsed), jnp.asarray(valid))) == pytest.approx(0.99, abs=1e-6)


def test_var_cov_weight_adds_the_penalty_and_zero_leaves_the_reference_loss():
    exp, state, batch = small_experiment_and_first_batch()
    base = float(step_lib.loss_fn(state.params, state.target_params, batch, exp.models))
    weighted = dataclasses.replace(exp.models, var_cov_weight=0.5)
    images = step_lib.normalize(batch["images"], exp.models.mean, exp.models.std)
    z = step_lib.encode_context(state.params, images, batch, exp.models)
    expected = base + 0.5 * numpy_var_cov(np.asarray(z), np.asarray(batch["context_valid"]))
    assert float(step_lib.loss_fn(state.params, state.target_params, batch, weighted)) == pytest.approx(expected, rel=1e-5)
    # The train step logs the sum's parts: I-JEPA's loss (the unweighted one above) and the penalty.
    _, metrics = train.build(small_config(**{"optim.var_cov_weight": 0.5})).train_step(state, batch)
    assert float(metrics["prediction_loss"]) == pytest.approx(base, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["var_cov_penalty"]) == pytest.approx((expected - base) / 0.5, rel=1e-4)
    _, reference_metrics = exp.train_step(exp.init(), batch)  # the step donates its state: a fresh one
    assert "prediction_loss" not in reference_metrics  # off: one term, logged as 'loss' as before


# the other optional anti-collapse term (optim.sigreg_weight; off in the reference)


def numpy_sigreg(x, directions, t_max=3.0, knots=33):
    """LeJEPA's SIGReg in float64 from its definition: per direction, N x the integral over [-t_max, t_max]
    of |ECF(t) - exp(-t^2/2)|^2 exp(-t^2/2) (complex ECF, trapezoid on the symmetric grid), mean over
    directions."""
    proj = np.asarray(x, np.float64) @ np.asarray(directions, np.float64)  # (N, S)
    t = np.linspace(-t_max, t_max, knots)
    ecf = np.exp(1j * proj[..., None] * t).mean(0)  # (S, knots)
    integrand = np.abs(ecf - np.exp(-t**2 / 2)) ** 2 * np.exp(-t**2 / 2)
    return len(proj) * np.trapezoid(integrand, t, axis=-1).mean()


def test_sigreg_matches_the_epps_pulley_integral_and_is_small_only_for_standard_normal_features():
    rng = np.random.default_rng(0)
    directions = np.asarray(step_lib.sigreg_directions(jax.random.key(1), 16, 64))
    np.testing.assert_allclose(np.linalg.norm(directions, axis=0), 1.0, rtol=1e-6)
    gaussian = rng.normal(size=(512, 16)).astype(np.float32)
    anisotropic = gaussian * np.r_[np.full(8, 0.2), np.full(8, 2.0)].astype(np.float32)
    collapsed = np.tile(rng.normal(size=(1, 16)), (512, 1)).astype(np.float32)  # every image one feature
    value = {}
    for name, x in [("gaussian", gaussian), ("anisotropic", anisotropic), ("collapsed", collapsed)]:
        value[name] = float(step_lib.sigreg(jnp.asarray(x), jnp.asarray(directions)))
        np.testing.assert_allclose(value[name], numpy_sigreg(x, directions), rtol=1e-4)
    # For standard-normal features its expectation is 1.05 (the integral of (1 - e^-t^2) e^-t^2/2) whatever
    # N; for any other distribution it grows with N (here 512).
    assert value["gaussian"] < 2.0
    assert value["anisotropic"] > 10 * value["gaussian"]
    assert value["collapsed"] > 50.0


def test_sigreg_weight_adds_the_term_with_directions_seeded_by_the_step():
    exp, state, batch = small_experiment_and_first_batch()
    base = float(step_lib.loss_fn(state.params, state.target_params, batch, exp.models))
    images = step_lib.normalize(batch["images"], exp.models.mean, exp.models.std)
    z = np.asarray(step_lib.encode_context(state.params, images, batch, exp.models), np.float64)
    valid = np.asarray(batch["context_valid"], np.float64)[..., None]
    pooled = (z * valid).sum(1) / valid.sum(1)
    weighted = dataclasses.replace(exp.models, sigreg_weight=0.05)
    for step in (0, 7):
        directions = step_lib.sigreg_directions(jax.random.fold_in(jax.random.key(0), step), pooled.shape[1])
        expected = base + 0.05 * numpy_sigreg(pooled, directions)
        got = float(step_lib.loss_fn(state.params, state.target_params, batch, weighted, step))
        assert got == pytest.approx(expected, rel=1e-5)
    _, metrics = train.build(small_config(**{"optim.sigreg_weight": 0.05})).train_step(state, batch)
    assert float(metrics["prediction_loss"]) == pytest.approx(base, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(base + 0.05 * float(metrics["sigreg"]), rel=1e-5)
