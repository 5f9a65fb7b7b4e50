"""Pooled per-layer features and their cache."""

import jax
import numpy as np

from ijepa_jax.eval import features
from ijepa_jax.models import vit


def test_last_entry_is_the_pooled_encoder_output_and_depth_limits_the_layers():
    encoder = vit.Encoder(patch_size=4, embed_dim=32, depth=3, num_heads=2)
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    params = encoder.init(jax.random.key(0), images)["params"]
    f = features.pooled_layer_features(encoder, params, images)
    assert f.shape == (2, 3, 32)  # a 3-block model has 3 layers to give
    np.testing.assert_allclose(f[:, -1], encoder.apply({"params": params}, images).mean(1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(f[:, 0], f[:, -1])


def test_cache_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.ones((3, 4, 2), np.float32), np.arange(3, dtype=np.int32)

    path = str(tmp_path / "f.npz")
    a = features.cached(path, compute)
    b = features.cached(path, compute)
    assert len(calls) == 1 and not a[2] and b[2]
    np.testing.assert_array_equal(a[0], b[0])
    assert features.cache_key(a=1, b=2) == features.cache_key(b=2, a=1) != features.cache_key(a=1, b=3)
