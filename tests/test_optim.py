"""Schedules, weight-decay mask and AdamW chain (ijepa_jax/optim.py) against the reference's definitions.

The reference classes (src/utils/schedulers.py, src/helper.py:init_opt, src/train.py) are re-implemented
below in plain Python exactly as the reference writes them, stateful `step()` included.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config

from ijepa_jax import config_lib, masks, optim, step


# --------------------------------------------------------------------------- reference re-implementations


class WarmupCosineSchedule:
    """Reference: `step()` increments the counter, then computes the lr."""

    def __init__(self, warmup_steps, start_lr, ref_lr, T_max, final_lr=0.0):
        self.start_lr, self.ref_lr, self.final_lr = start_lr, ref_lr, final_lr
        self.warmup_steps = warmup_steps
        self.T_max = T_max - warmup_steps
        self._step = 0.0

    def step(self):
        self._step += 1
        if self._step < self.warmup_steps:
            progress = float(self._step) / float(max(1, self.warmup_steps))
            new_lr = self.start_lr + progress * (self.ref_lr - self.start_lr)
        else:
            progress = float(self._step - self.warmup_steps) / float(max(1, self.T_max))
            new_lr = max(
                self.final_lr,
                self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)),
            )
        return new_lr


class CosineWDSchedule:
    """Reference: `step()` increments, computes the cosine, clamps at final_wd from its side."""

    def __init__(self, ref_wd, T_max, final_wd=0.0):
        self.ref_wd, self.final_wd, self.T_max = ref_wd, final_wd, T_max
        self._step = 0.0

    def step(self):
        self._step += 1
        progress = self._step / self.T_max
        new_wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.final_wd <= self.ref_wd:
            new_wd = max(self.final_wd, new_wd)
        else:
            new_wd = min(self.final_wd, new_wd)
        return new_wd


def reference_values(o, ipe, steps):
    """{step k: (lr, wd, momentum)} as the reference training loop uses them at iteration k.

    The loop calls scheduler.step() and wd_scheduler.step() BEFORE the optimizer step and draws
    next(momentum_scheduler) after it."""
    t_max = int(o.ipe_scale * o.epochs * ipe)
    scheduler = WarmupCosineSchedule(
        warmup_steps=int(o.warmup_epochs * ipe), start_lr=o.start_lr, ref_lr=o.lr, final_lr=o.final_lr, T_max=t_max
    )
    wd_scheduler = CosineWDSchedule(ref_wd=o.weight_decay, final_wd=o.final_weight_decay, T_max=t_max)
    ema = o.ema
    momentum_scheduler = (
        ema[0] + i * (ema[1] - ema[0]) / (ipe * o.epochs * o.ipe_scale)
        for i in range(int(ipe * o.epochs * o.ipe_scale) + 1)
    )
    wanted, out = set(steps), {}
    for k in range(max(steps) + 1):
        lr, wd = scheduler.step(), wd_scheduler.step()
        m = next(momentum_scheduler)
        if k in wanted:
            out[k] = (lr, wd, m)
    return out


def sample_steps(o, ipe):
    total = int(o.ipe_scale * o.epochs * ipe)
    warmup = int(o.warmup_epochs * ipe)
    return sorted({0, 1, warmup - 1, warmup, (warmup + total) // 2, total // 3, total - 1})


def in1k_optim():
    return config_lib.reference_recipe("vit_huge", patch_size=14, crop_size=224, epochs=300).optim


def decreasing_wd_optim():
    o = small_config().optim
    o.update(epochs=7, warmup_epochs=2, start_lr=1e-4, lr=5e-3, final_lr=1e-5)
    o.update(weight_decay=0.4, final_weight_decay=0.05, ema=(0.99, 0.999))
    return o


def fractional_ipe_scale_optim():
    o = small_config().optim
    o.update(epochs=3, warmup_epochs=1, ipe_scale=1.25)
    return o


def check_against_reference(o, ipe):
    sched = optim.make_schedules(o, ipe)
    steps = sample_steps(o, ipe)
    ref = reference_values(o, ipe, steps)
    for k in steps:
        lr, wd, m = ref[k]
        np.testing.assert_allclose(float(sched.lr(k)), lr, rtol=2e-5, atol=1e-10, err_msg=f"lr at step {k}")
        np.testing.assert_allclose(float(sched.weight_decay(k)), wd, rtol=2e-5, err_msg=f"wd at step {k}")
        np.testing.assert_allclose(float(sched.momentum(k)), m, rtol=0, atol=2e-7, err_msg=f"momentum at step {k}")


# --------------------------------------------------------------------------- schedules


def test_schedules_match_reference_in1k():
    """lr / wd / EMA momentum equal the reference's at steps 0, 1, warmup-1, warmup, mid and last
    for in1k_vith14 (300 epochs, 40 warmup, ipe 625)."""
    o = in1k_optim()
    assert (o.epochs, o.warmup_epochs, o.weight_decay, o.final_weight_decay) == (300, 40, 0.04, 0.4)
    check_against_reference(o, ipe=625)


def test_schedules_match_reference_with_decreasing_weight_decay():
    """With final_weight_decay < weight_decay the wd cosine falls and is clamped from above."""
    check_against_reference(decreasing_wd_optim(), ipe=11)


def test_schedules_match_reference_with_fractional_ipe_scale():
    """With ipe * epochs * ipe_scale not an integer the reference divides the momentum ramp by the float
    product (only T_max of the lr/wd schedulers is truncated with int())."""
    check_against_reference(fractional_ipe_scale_optim(), ipe=7)


def test_schedule_shape_in1k():
    """Sanity of the in1k schedule: starts near start_lr, peaks at lr at the end of warmup, ends at
    final_lr; wd rises 0.04 -> 0.4; momentum 0.996 -> 1.0."""
    o, ipe = in1k_optim(), 625
    s = optim.make_schedules(o, ipe)
    total, warmup = 300 * ipe, 40 * ipe
    assert float(s.lr(0)) == pytest.approx(2e-4 + (1e-3 - 2e-4) / warmup, rel=1e-5)
    assert float(s.lr(warmup - 1)) == pytest.approx(1e-3, rel=1e-6)
    assert float(s.lr(total - 1)) == pytest.approx(1e-6, rel=1e-4)
    assert float(s.weight_decay(0)) == pytest.approx(0.04, rel=1e-4)
    assert float(s.weight_decay(total - 1)) == pytest.approx(0.4, rel=1e-6)
    assert float(s.momentum(0)) == pytest.approx(0.996, abs=1e-7)
    assert float(s.momentum(total)) == pytest.approx(1.0, abs=1e-7)
    lrs = np.array([float(s.lr(k)) for k in range(warmup, total, 5000)])
    assert np.all(np.diff(lrs) <= 0), "the lr must decay monotonically after warmup"


def test_schedules_are_traceable():
    """Schedules are pure jnp functions of a traced step (one compiled step serves the whole run)."""
    s = optim.make_schedules(in1k_optim(), 625)
    steps = jnp.array([0, 100, 30000])
    got = jax.jit(lambda k: (s.lr(k), s.weight_decay(k), s.momentum(k)))(steps)
    for fn, values in zip((s.lr, s.weight_decay, s.momentum), got):
        np.testing.assert_allclose(values, [float(fn(int(k))) for k in steps], rtol=1e-6)


# --------------------------------------------------------------------------- weight-decay mask


def param_shapes(scan_layers: bool):
    """Abstract {'encoder', 'predictor'} params of the small test model via step.init_state."""
    config = small_config(**{"model.scan_layers": scan_layers})
    spec = masks.resolve_spec(config)
    grid = spec.grid_h
    models = step.make_models(config, grid)
    tx = optim.make_optimizer(config.optim, optim.make_schedules(config.optim, 10))
    b = config.data.batch_size
    batch_shapes = {
        "images": jax.ShapeDtypeStruct((b, 16, 16, 3), jnp.uint8),
        "context_idx": jax.ShapeDtypeStruct((b, spec.context_tokens), jnp.int32),
        "target_idx": jax.ShapeDtypeStruct((b, spec.num_targets, spec.target_tokens), jnp.int32),
    }
    state = jax.eval_shape(lambda k: step.init_state(k, models, tx, batch_shapes), jax.random.key(0))
    return state.params


def expected_decay(path, leaf):
    """The documented rule, by leaf NAME: kernels and the mask token decay; biases and LayerNorm scales don't."""
    name = path[-1].key
    table = {"kernel": True, "mask_token": True, "bias": False, "scale": False}
    assert name in table, f"unexpected parameter {jax.tree_util.keystr(path)}"
    return table[name]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_weight_decay_mask(scan_layers):
    """Kernels (incl. the patch-embed conv) and the predictor mask token decay; biases and LayerNorm
    scales/biases do not -- also when a scanned stack makes a LayerNorm scale 2-D (depth, D)."""
    params = param_shapes(scan_layers)
    mask = optim.weight_decay_mask(params)
    expected = jax.tree_util.tree_map_with_path(expected_decay, params)
    flat_mask = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    flat_expected = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    wrong = {k: flat_mask[k] for k in flat_expected if bool(flat_mask[k]) != flat_expected[k]}
    assert not wrong, f"wrong decay decision for {wrong}"
    # Spot checks, so the test also documents the tree layout it relies on.
    assert mask["predictor"]["mask_token"] and params["predictor"]["mask_token"].shape == (1, 1, 32)
    assert mask["encoder"]["patch_embed"]["kernel"] and not mask["encoder"]["patch_embed"]["bias"]
    assert not mask["encoder"]["norm"]["scale"] and not mask["predictor"]["predictor_norm"]["scale"]
    if scan_layers:
        blocks = params["encoder"]["stack"]["blocks"]
        assert blocks["norm1"]["scale"].shape == (2, 64), "scanned LayerNorm scales carry a depth axis"
        assert not mask["encoder"]["stack"]["blocks"]["norm1"]["scale"]
        assert mask["encoder"]["stack"]["blocks"]["attn"]["qkv"]["kernel"]
    else:
        assert not mask["encoder"]["stack"]["blocks_0"]["norm1"]["scale"]


def test_weight_decay_mask_on_toy_tree():
    """The rule on hand-made leaves: kernels (any rank, stacked or not) and the mask token; nothing else."""
    tree = {
        "dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))},
        "ln": {"scale": jnp.zeros((4,)), "bias": jnp.zeros((4,))},
        "stack": {"blocks": {"ln": {"scale": jnp.zeros((2, 4))}, "fc": {"kernel": jnp.zeros((2, 4, 4))}}},
        "mask_token": jnp.zeros((1, 1, 4)),
    }
    mask = optim.weight_decay_mask(tree)
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "ln": {"scale": False, "bias": False},
        "stack": {"blocks": {"ln": {"scale": False}, "fc": {"kernel": True}}},
        "mask_token": True,
    }


# --------------------------------------------------------------------------- the optax chain


def toy_params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
        "norm": {"scale": jnp.asarray(1 + rng.normal(size=4), jnp.float32)},
        "mask_token": jnp.asarray(rng.normal(size=(1, 1, 4)), jnp.float32),
    }


def toy_decays():
    return {"dense": {"kernel": 1.0, "bias": 0.0}, "norm": {"scale": 0.0}, "mask_token": 1.0}


def test_first_adamw_update_by_hand():
    """One make_optimizer update equals -lr(0) * (g / (|g| + eps) + wd(0) * p) on decayed leaves, and
    -lr(0) * g / (|g| + eps) elsewhere (the first bias-corrected Adam step is m/(sqrt(v)+eps) = g/(|g|+eps))."""
    o = decreasing_wd_optim()
    sched = optim.make_schedules(o, 11)
    tx = optim.make_optimizer(o, sched)
    params = toy_params()
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).normal(size=p.shape), jnp.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr0, wd0 = float(sched.lr(0)), float(sched.weight_decay(0))
    assert lr0 > 0 and wd0 > 0.1

    def expected(g, p, decay):
        g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
        return -lr0 * (g / (np.abs(g) + o.eps) + decay * wd0 * p)

    want = jax.tree.map(expected, grads, params, toy_decays())
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-9), updates, want)


def test_adamw_matches_reference_torch_adamw_over_steps():
    """Three steps of the chain equal torch.optim.AdamW's algorithm with the reference's per-step
    lr / wd (scheduler stepped before each optimizer step; WD_exclude groups get no decay)."""
    o = decreasing_wd_optim()
    ipe = 11
    sched = optim.make_schedules(o, ipe)
    tx = optim.make_optimizer(o, sched)
    ref = reference_values(o, ipe, [0, 1, 2])
    params = toy_params()
    state = tx.init(params)
    p_ref = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    m_ref = jax.tree.map(np.zeros_like, p_ref)
    v_ref = jax.tree.map(np.zeros_like, p_ref)
    decays = toy_decays()
    rng = np.random.default_rng(2)
    for k in range(3):
        grads = jax.tree.map(lambda p: np.asarray(rng.normal(size=p.shape), np.float32), params)
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
        lr, wd, _ = ref[k]
        t = k + 1

        def torch_adamw(p, g, m, v, decay):
            g = np.asarray(g, np.float64)
            p = p * (1 - lr * wd * decay)  # decoupled decay first, as torch does
            m = o.b1 * m + (1 - o.b1) * g
            v = o.b2 * v + (1 - o.b2) * g * g
            denom = np.sqrt(v) / math.sqrt(1 - o.b2**t) + o.eps
            return p - lr / (1 - o.b1**t) * m / denom, m, v

        new = jax.tree.map(torch_adamw, p_ref, grads, m_ref, v_ref, decays)
        is_triple = lambda x: isinstance(x, tuple)  # noqa: E731
        p_ref = jax.tree.map(lambda x: x[0], new, is_leaf=is_triple)
        m_ref = jax.tree.map(lambda x: x[1], new, is_leaf=is_triple)
        v_ref = jax.tree.map(lambda x: x[2], new, is_leaf=is_triple)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, p_ref)
