"""Health diagnostics: the metrics against numpy, and the warnings catch a collapsed encoder but not a random init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from ijepa_jax import masks, optim, sharding, train
from ijepa_jax import step as step_lib
from ijepa_jax.data import sources
from ijepa_jax.eval import health


def np_rankme(x, center=False, eps=1e-7):
    """RankMe by the paper's formula, in float64 numpy."""
    x = np.asarray(x, np.float64)
    if center:
        x = x - x.mean(0)
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + eps
    return np.exp(-(p * np.log(p)).sum())


def orthonormal(rng, n, k):
    """(n, k) with orthonormal columns (k <= n)."""
    return np.linalg.qr(rng.normal(size=(n, k)))[0]


def rank(x, **kw):
    return float(health.effective_rank(jnp.asarray(x, jnp.float32), **kw))


@pytest.mark.parametrize("n,d", [(16, 16), (64, 16), (8, 32)])
def test_orthonormal_rows_or_columns_have_full_rank(n, d):
    rng = np.random.default_rng(0)
    x = orthonormal(rng, n, d) if n >= d else orthonormal(rng, d, n).T
    assert rank(x) == pytest.approx(min(n, d), rel=1e-4)


@pytest.mark.parametrize("n,d", [(200, 16), (8, 32)])
def test_rank_one_has_rank_one(n, d):
    rng = np.random.default_rng(1)
    x = np.outer(rng.normal(size=n), rng.normal(size=d))
    assert rank(x) == pytest.approx(1.0, abs=1e-3)
    assert rank(x, center=True) == pytest.approx(1.0, abs=1e-3)  # (a_i - mean a) v: still one direction
    assert rank(np.tile(x[:1], (n, 1)), center=True) == pytest.approx(1.0, abs=1e-3)  # no variation at all


@pytest.mark.parametrize("n,d", [(12, 6), (300, 10), (5, 9)])
def test_known_singular_values_match_numpy(n, d):
    rng = np.random.default_rng(2)
    k = min(n, d)
    s = np.array([10.0, 5.0, 2.0, 1.0, 0.5] + [0.1] * (k - 5))
    x = orthonormal(rng, n, k) @ np.diag(s) @ orthonormal(rng, d, k).T
    p = s / s.sum() + 1e-7
    assert rank(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)


def test_random_matrices_match_numpy_centred_and_not():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 12)) * rng.uniform(0.1, 3.0, size=12) + 2.0  # a common offset, uneven scales
    assert rank(x) == pytest.approx(np_rankme(x), rel=1e-4)
    assert rank(x, center=True) == pytest.approx(np_rankme(x, center=True), rel=1e-4)
    assert rank(x) < rank(x, center=True)  # the offset dominates the uncentred spectrum


def test_std_and_cosine_match_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5, 7)) + 1.0
    valid = rng.uniform(size=(3, 5)) < 0.6
    assert float(health.mean_feature_std(jnp.asarray(x))) == pytest.approx(x.reshape(-1, 7).std(0).mean(), rel=1e-5)
    masked = float(health.mean_feature_std(jnp.asarray(x), jnp.asarray(valid)))
    assert masked == pytest.approx(x[valid].std(0).mean(), rel=1e-5)
    y = x.reshape(-1, 7)
    u = y / np.linalg.norm(y, axis=1, keepdims=True)
    c = u @ u.T
    expected = (c.sum() - np.trace(c)) / (len(y) * (len(y) - 1))
    assert float(health.mean_pairwise_cosine(jnp.asarray(y))) == pytest.approx(expected, rel=1e-5)
    assert float(health.mean_pairwise_cosine(jnp.ones((4, 3)))) == pytest.approx(1.0)


HEALTHY = {
    "health/target_rank_pooled_centered": 9.0, "health/target_rank_tokens_centered": 33.0,
    "health/rank_max": 64.0, "health/rank_max_tokens": 192.0, "health/pooled_std": 0.15,
    "health/pooled_rms": 0.87, "health/target_cosine": 0.96, "health/target_std": 0.4,
    "health/online_rank_pooled_centered": 9.0, "health/online_rank_tokens_centered": 33.0,
    "health/online_pooled_std": 0.15, "health/online_pooled_rms": 0.87, "health/online_cosine": 0.96,
}


@pytest.mark.parametrize("key,value,match", [
    ("health/target_rank_pooled_centered", 1.5, "target encoder pooled features vary along ~1 direction"),
    ("health/target_rank_tokens_centered", 1.9, "target encoder tokens features vary along ~1 direction"),
    ("health/pooled_std", 0.005, "pooled target features vary across images"),
    ("health/target_cosine", 0.99995, "pooled target features 0.99995"),
    ("health/target_std", 0.05, "target std"),
    ("health/online_rank_pooled_centered", 1.5, "online encoder pooled features vary along ~1 direction"),
    ("health/online_rank_tokens_centered", 1.9, "online encoder tokens features vary along ~1 direction"),
    ("health/online_pooled_std", 0.005, "pooled online features vary across images"),
    ("health/online_cosine", 0.99995, "pooled online features 0.99995"),
])
def test_each_threshold_fires_alone(key, value, match):
    assert health.collapse_warnings(HEALTHY) == []
    (warning,) = health.collapse_warnings({**HEALTHY, key: value})
    assert match in warning
    # 1% of a wide maximum: rank 3 of 512 is collapsed too.
    assert health.collapse_warnings({**HEALTHY, "health/rank_max": 512.0, "health/target_rank_pooled_centered": 3.0})


@pytest.fixture(scope="module")
def tiny():
    """ViT-micro/4 at 16px, its random-init state and a 16-image batch of generated images."""
    config = small_config()
    config.data.batch_size = 16
    spec = masks.resolve_spec(config)
    models = step_lib.make_models(config, config.data.crop_size // config.model.patch_size)
    schedules = optim.make_schedules(config.optim, 10)
    state = step_lib.init_state(
        jax.random.key(0), models, optim.make_optimizer(config.optim, schedules), train.batch_shapes(config, spec)
    )
    src = sources.SyntheticSource(64, config.data.crop_size)
    images = np.stack([src[i]["image"] for i in range(16)])
    batch = {"images": images, **masks.MaskSampler(spec).sample(np.random.default_rng(0), 16)}
    return models, state, batch


def with_params(params, **leaves):
    """`params` with the leaves whose path contains a key of `leaves` (e.g. 'patch_embed/kernel') replaced."""
    def replace(path, x):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        for key, fn in leaves.items():
            if key.replace("__", "/") in name:
                return fn(x)
        return x

    return jax.tree_util.tree_map_with_path(replace, params)


def test_random_init_is_healthy(tiny):
    models, state, batch = tiny
    m = health.health_metrics(state.params, state.target_params, batch, models)
    assert set(m) >= {"health/target_rank_pooled", "health/target_rank_tokens", "health/target_std",
                      "health/pred_std", "health/target_cosine", "health/rank_max"}
    assert m["health/rank_max"] == 16 and m["health/rank_max_tokens"] == 64  # min(B, D), min(B*N, D)
    assert health.collapse_warnings(m) == [], m


def test_the_online_encoder_is_read_on_the_same_images(tiny):
    """At init the target is a copy of the online encoder, so their numbers agree; an online encoder
    made image-independent (no patch embedding, no block outputs) is flagged, and the target is not."""
    models, state, batch = tiny
    m = health.health_metrics(state.params, state.target_params, batch, models)
    for online, target in (("online_rank_pooled_centered", "target_rank_pooled_centered"),
                           ("online_rank_tokens_centered", "target_rank_tokens_centered"),
                           ("online_pooled_std", "pooled_std"), ("online_pooled_rms", "pooled_rms"),
                           ("online_cosine", "target_cosine")):
        assert m[f"health/{online}"] == pytest.approx(m[f"health/{target}"], rel=1e-5), online
    zero = jnp.zeros_like
    online = {**state.params, "encoder": with_params(state.params["encoder"], patch_embed__kernel=zero,
                                                     proj__kernel=zero, fc2__kernel=zero)}
    m = health.health_metrics(online, state.target_params, batch, models)
    assert m["health/online_rank_pooled_centered"] == pytest.approx(1.0, abs=1e-3)
    assert m["health/online_cosine"] == pytest.approx(1.0, abs=1e-5)
    text = "\n".join(health.collapse_warnings(m))
    assert "online encoder pooled features vary along ~1 direction" in text and "online features" in text
    assert "target" not in text


def test_sharded_batch_gives_the_same_values(tiny):
    """As the train loop calls it: the batch split over a mesh, the parameters replicated. (Two of the
    fake devices: on eight, their LAPACK threads contend for this machine's cores and one call takes ~10 s.)"""
    models, state, batch = tiny
    mesh = sharding.make_mesh(jax.devices()[:2])
    put = lambda tree, s: jax.device_put(tree, s)  # noqa: E731
    sharded = health.health_metrics(
        put(state.params, sharding.replicated(mesh)), put(state.target_params, sharding.replicated(mesh)),
        put(batch, sharding.batch_sharding(mesh)), models,
    )
    plain = health.health_metrics(state.params, state.target_params, batch, models)
    assert sharded.keys() == plain.keys()
    for k in plain:
        assert sharded[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-6), k


def test_image_independent_encoder_is_flagged(tiny):
    """No patch embedding and no block outputs: every image gets the position embeddings' features."""
    models, state, batch = tiny
    zero = jnp.zeros_like
    target = with_params(state.target_params, patch_embed__kernel=zero, proj__kernel=zero, fc2__kernel=zero)
    m = health.health_metrics(state.params, target, batch, models)
    assert m["health/target_rank_pooled"] == pytest.approx(1.0, abs=1e-3)
    assert m["health/target_rank_pooled_centered"] == pytest.approx(1.0, abs=1e-3)
    assert m["health/target_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert m["health/pooled_std"] < 1e-5
    text = "\n".join(health.collapse_warnings(m))
    assert "pooled features vary along ~1 direction" in text and "ignores its input" in text and "cosine" in text
    assert "online" not in text  # the online encoder, untouched, is not flagged


def test_rank_one_encoder_is_flagged(tiny):
    """A final LayerNorm that keeps one channel: every token is a multiple of one vector."""
    models, state, batch = tiny
    one_hot = lambda x: jnp.zeros_like(x).at[0].set(1.0)  # noqa: E731
    target = with_params(state.target_params, norm__scale=one_hot, norm__bias=jnp.zeros_like)
    m = health.health_metrics(state.params, target, batch, models)
    assert m["health/target_rank_pooled"] == pytest.approx(1.0, abs=1e-3)
    assert m["health/target_rank_tokens"] == pytest.approx(1.0, abs=1e-3)
    text = "\n".join(health.collapse_warnings(m))
    assert "pooled features vary along ~1 direction" in text and "tokens features vary along ~1 direction" in text


def test_constant_encoder_is_flagged(tiny):
    """A final LayerNorm with zero scale outputs its bias for every token of every image."""
    models, state, batch = tiny
    bias = jax.random.normal(jax.random.key(1), state.target_params["norm"]["bias"].shape)
    target = with_params(state.target_params, norm__scale=jnp.zeros_like, norm__bias=lambda _: bias)
    m = health.health_metrics(state.params, target, batch, models)
    assert m["health/target_std"] < 1e-3
    assert m["health/target_rank_tokens"] == pytest.approx(1.0, abs=1e-3)
    assert len(health.collapse_warnings(m)) == 5  # both ranks, pooled std, cosine, target std
