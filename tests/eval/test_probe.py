"""Linear probes on cached features: the sweep, BN without affine, low-shot splits."""

import dataclasses

import numpy as np

from ijepa_jax.eval import probe

SETTINGS = probe.ProbeSettings(lrs=(0.01, 0.1, 1.0), weight_decays=(0.0, 1e-4), epochs=30, batch_size=64)


def separable(n_per_class=40, classes=5, dim=12, seed=0, scale=1.0):
    """Per-layer features (N, 4, dim) whose classes are linearly separable, with a large offset."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + 0.3 * rng.normal(size=(len(y), dim))
    layers = np.stack([x * scale + 50.0] * 4, axis=1).astype(np.float32)
    return layers, y.astype(np.int32)


def test_probe_learns_separable_classes_in_every_variant():
    train_f, train_y = separable(seed=0)
    test_f, test_y = separable(n_per_class=10, seed=0)
    for variant in ("last_bn", "last4_bn"):
        r = probe.linear_probe(train_f, train_y, test_f, test_y, 5, variant, SETTINGS)
        assert r["top1"] > 0.95 and r["top5"] == 1.0, (variant, r)
        assert len(r["sweep"]) == 6 and (r["lr"], r["weight_decay"]) in [(s["lr"], s["weight_decay"]) for s in r["sweep"]]


def shared_nuisance(n, seed):
    """Two classes told apart by x1 - x2 only: a class-mean direction (all a tiny lr learns) gets ~60 %."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x2 = 3 * rng.normal(size=n)
    features = np.stack([x2 + (2 * y - 1), x2], axis=1)
    return np.stack([features] * 4, axis=1).astype(np.float32), y.astype(np.int32)


def test_a_chosen_lr_at_the_end_of_the_sweep_is_flagged_and_one_inside_is_not():
    train, test = shared_nuisance(400, seed=0), shared_nuisance(200, seed=1)
    # 1e-9 stays at the class-mean direction; 1e4 diverges under weight decay: only 0.1 can win.
    inside = dataclasses.replace(SETTINGS, lrs=(1e-9, 0.1, 1e4), weight_decays=(1e-2,))
    r = probe.linear_probe(*train, *test, 2, "last_bn", inside)
    by_lr = {s["lr"]: s["top1"] for s in r["sweep"]}
    assert by_lr[0.1] > 0.95 and max(by_lr[1e-9], by_lr[1e4]) < 0.75, by_lr
    assert r["lr"] == 0.1 and not r["lr_at_sweep_edge"]
    edge = probe.linear_probe(*train, *test, 2, "last_bn", dataclasses.replace(inside, lrs=(1e-9, 0.1)))
    assert edge["lr"] == 0.1 and edge["lr_at_sweep_edge"]
    single = dataclasses.replace(inside, lrs=(0.1,))  # no sweep, nothing to extend
    assert not probe.linear_probe(*train, *test, 2, "last_bn", single)["lr_at_sweep_edge"]


def test_batchnorm_without_affine_standardizes_with_train_statistics():
    x = np.random.default_rng(0).normal(3.0, 5.0, size=(1000, 4))
    norm = probe.Standardize(x, enabled=True)
    z = norm(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    assert np.array_equal(probe.Standardize(x, enabled=False)(x), x.astype(np.float32))


def test_variants_select_the_last_layer_or_the_last_four_concatenated():
    f = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    assert probe.select_variant(f, "last").shape == (2, 3)
    np.testing.assert_array_equal(probe.select_variant(f, "last_bn"), f[:, -1])
    np.testing.assert_array_equal(probe.select_variant(f, "last4"), f.reshape(2, 12))


def test_low_shot_uses_balanced_deterministic_splits(monkeypatch):
    """n per class for every class, a different draw per seed, the same draws on a rerun."""
    train_f, train_y = separable(n_per_class=20, seed=1)
    test_f, test_y = separable(n_per_class=5, seed=1)
    seen = []
    real = probe.train_and_score

    def spy(x, y, *args, **kwargs):
        seen.append(np.asarray(x).copy())
        assert np.all(np.bincount(y, minlength=5) == 3)
        return real(x, y, *args, **kwargs)

    monkeypatch.setattr(probe, "train_and_score", spy)
    a = probe.low_shot(train_f, train_y, test_f, test_y, 5, 3, 2, "last_bn", 0.1, 0.0, SETTINGS)
    first = list(seen)
    b = probe.low_shot(train_f, train_y, test_f, test_y, 5, 3, 2, "last_bn", 0.1, 0.0, SETTINGS)
    assert a == b and len(a["top1_per_seed"]) == 2
    assert not np.array_equal(first[0], first[1])  # seeds draw different images
    assert all(np.array_equal(p, q) for p, q in zip(first, seen[2:]))


def numpy_heads(x, y, lrs, wds, perms, num_classes, batch):
    """The probe's SGD in float64 numpy: momentum 0.9, cosine lr over all steps, L2 decay on the weights."""
    n, f = x.shape
    steps = n // batch
    total = len(perms) * steps
    w, b = np.zeros((len(lrs), f, num_classes)), np.zeros((len(lrs), num_classes))
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for e, perm in enumerate(perms):
        for s in range(steps):
            idx = perm[s * batch : (s + 1) * batch]
            logits = np.einsum("bf,hfc->hbc", x[idx], w) + b[:, None]
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            p[:, np.arange(batch), y[idx]] -= 1  # d(mean cross-entropy)/d(logits) * batch
            gw = np.einsum("bf,hbc->hfc", x[idx], p) / batch + np.asarray(wds)[:, None, None] * w
            gb = p.sum(1) / batch
            vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
            lr = np.asarray(lrs) * 0.5 * (1 + np.cos(np.pi * (e * steps + s) / total))
            w, b = w - lr[:, None, None] * vw, b - lr[:, None] * vb
    return w, b


def test_heads_equal_a_numpy_sgd_however_the_features_are_streamed():
    """Blocks of one step, of a few steps, or a whole epoch on the device give the numpy oracle's heads."""
    import jax

    x, y = separable(n_per_class=20, classes=3, dim=6, seed=2)
    x = probe.select_variant(x, "last") - 50.0
    lrs, wds, epochs, batch = [0.05, 0.5], [0.0, 1e-3], 3, 16
    key = jax.random.key(7)
    perms = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), len(x))) for e in range(epochs)]
    w, b = numpy_heads(x.astype(np.float64), y, lrs, wds, perms, 3, batch)
    step_mib = batch * x.shape[1] * 4 / 2**20
    for block_mib in (step_mib, 2.5 * step_mib, 256):
        ours = probe.train_heads(x, y, lrs, wds, key, num_classes=3, epochs=epochs, batch_size=batch,
                                 block_mib=block_mib)
        np.testing.assert_allclose(np.asarray(ours[0]), w, rtol=1e-4, atol=1e-5, err_msg=f"block {block_mib} MiB")
        np.testing.assert_allclose(np.asarray(ours[1]), b, rtol=1e-4, atol=1e-5)
