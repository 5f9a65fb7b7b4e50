"""The attentive probe: cross-attention pooling of frozen tokens, against mean pooling and a numpy oracle."""

import dataclasses

import jax
import numpy as np
import pytest

from ijepa_jax.eval import attentive, probe

SETTINGS = attentive.AttentiveSettings(lrs=(1e-3, 1e-2), epochs=15, batch_size=64)


def one_token_carries_the_class(n, seed, classes=4, tokens=16, dim=16):
    """(n, tokens, dim) float16 tokens: every token is a random class's centre plus noise, except one,
    at a position drawn per example, which is its own class's centre and carries a marker (dim 0).
    Mean pooling sees mostly the other classes' centres; attending to the marker finds the class."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(classes, dim)) * 2
    centres[:, 0] = 0
    y = rng.integers(0, classes, n)
    x = centres[rng.integers(0, classes, (n, tokens))] + 0.3 * rng.normal(size=(n, tokens, dim))
    where = rng.integers(0, tokens, n)
    x[np.arange(n), where] = centres[y] + 0.3 * rng.normal(size=(n, dim))
    x[np.arange(n), where, 0] = 4.0
    return x.astype(np.float16), y.astype(np.int32)


def test_attention_finds_the_one_token_that_mean_pooling_dilutes():
    train, test = one_token_carries_the_class(800, seed=0), one_token_carries_the_class(400, seed=1)
    r = attentive.attentive_probe(*train, *test, num_classes=4, num_heads=2, settings=SETTINGS)
    linear = probe.linear_probe(train[0].astype(np.float32).mean(1)[:, None], train[1],
                                test[0].astype(np.float32).mean(1)[:, None], test[1], 4, "last_bn",
                                probe.ProbeSettings(epochs=30, batch_size=64))
    assert r["top1"] > 0.9 and r["top1"] > linear["top1"] + 0.3, (r["top1"], linear["top1"])
    assert len(r["sweep"]) == 2 and r["lr"] in SETTINGS.lrs and 0 <= r["val_top1"] <= 1


def numpy_head(params, x, num_heads):
    """Cross-attention pooling as written: projected keys and values of every token, softmax over the
    tokens of each head's query . key / sqrt(dh), the heads concatenated, averaged over the queries,
    then LayerNorm and the classifier. float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = x.astype(np.float64)
    b, t, d = x.shape
    dh = d // num_heads
    k, v = x @ p["wk"], x @ p["wv"] + p["bv"]  # (B, T, D)
    outs = []
    for q in p["query"]:
        heads = []
        for h in range(num_heads):
            s = slice(h * dh, (h + 1) * dh)
            logits = k[:, :, s] @ q[s] / np.sqrt(dh)  # (B, T)
            a = np.exp(logits - logits.max(1, keepdims=True))
            a /= a.sum(1, keepdims=True)
            heads.append(np.einsum("bt,bte->be", a, v[:, :, s]))
        outs.append(np.concatenate(heads, axis=1))
    z = np.mean(outs, axis=0)
    z = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-6) * p["ln_scale"] + p["ln_bias"]
    return z @ p["w_cls"] + p["b_cls"]


@pytest.mark.parametrize("num_queries", [1, 3])
def test_the_head_equals_cross_attention_pooling_written_out(num_queries):
    d, heads = 12, 3
    params = attentive.init_head(jax.random.key(0), d, 5, num_queries)
    rng = np.random.default_rng(0)
    # Large random queries and biases, so that attention is far from uniform and every term matters.
    params = {k: np.asarray(v) + rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    x = rng.normal(size=(4, 7, d)).astype(np.float32)
    ours = np.asarray(attentive.head_logits(params, x, heads))
    np.testing.assert_allclose(ours, numpy_head(params, x, heads), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the same streaming as probe.train_heads, tested by default in tests/eval/test_probe.py
def test_tokens_are_streamed_in_blocks_or_taken_by_rows_without_changing_the_heads():
    x, y = one_token_carries_the_class(96, seed=2, dim=8)
    kw = dict(num_classes=4, num_heads=2, epochs=2, batch_size=16)
    whole = attentive.train_heads(x, y, [1e-3, 1e-2], jax.random.key(0), **kw)
    step_mib = 16 * x.shape[1] * x.shape[2] * 2 / 2**20
    blocks = attentive.train_heads(x, y, [1e-3, 1e-2], jax.random.key(0), block_mib=2.5 * step_mib, **kw)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(blocks)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(whole)[0].shape[0] == 2  # one head per lr
    rows = np.arange(0, 96, 2)  # the sweep's subset by index equals training on a copy of it
    subset = attentive.train_heads(x, y, [1e-3, 1e-2], jax.random.key(0), rows=rows, **kw)
    copy = attentive.train_heads(x[rows], y[rows], [1e-3, 1e-2], jax.random.key(0), **kw)
    for a, b in zip(jax.tree.leaves(subset), jax.tree.leaves(copy)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(attentive.predict(subset, x, 2, chunk=16, rows=rows),
                                  attentive.predict(subset, x[rows], 2, chunk=16))


def test_settings_come_from_the_config_and_bad_values_are_rejected():
    from conftest import small_config

    from ijepa_jax import config_lib

    c = small_config(**{"eval.attentive_lrs": (1e-3,), "eval.attentive_epochs": 3, "eval.attentive_batch_size": 8})
    assert attentive.AttentiveSettings.from_config(c.eval) == attentive.AttentiveSettings(
        lrs=(1e-3,), epochs=3, batch_size=8)
    for overrides, words in [({"eval.attentive_epochs": 0}, "attentive_epochs"),
                             ({"eval.attentive_batch_size": 0}, "attentive_batch_size"),
                             ({"eval.attentive_lrs": ()}, "attentive_lrs"),
                             ({"eval.attentive_lrs": (0.0,)}, "attentive_lrs")]:
        with pytest.raises(ValueError, match=words):
            config_lib.validate_eval(small_config(**overrides))


def test_the_tokens_are_the_encoders_output_from_the_pooled_features_pass():
    from ijepa_jax.eval import features
    from ijepa_jax.models import vit

    encoder = vit.Encoder(patch_size=4, embed_dim=32, depth=3, num_heads=2)
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    params = encoder.init(jax.random.key(0), images)["params"]
    pooled, tokens = features.pooled_features_and_tokens(encoder, params, images)
    assert tokens.dtype == np.float16 and tokens.shape == (2, 4, 32)
    np.testing.assert_allclose(np.asarray(tokens, np.float32), encoder.apply({"params": params}, images),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(pooled, features.pooled_layer_features(encoder, params, images))


def test_evaluate_writes_an_attentive_row_for_the_encoder_and_the_baseline(tmp_path, monkeypatch):
    import json

    from conftest import small_config

    from ijepa_jax import encoder_export, evaluate

    passes = []
    real = evaluate.features_lib.extract_features
    monkeypatch.setattr(evaluate.features_lib, "extract_features",
                        lambda *a, **k: passes.append(k["name"]) or real(*a, **k))

    config = small_config(**{"data.synthetic_images": 120, "eval.attentive_epochs": 2, "eval.attentive_lrs": (1e-3,),
                             "eval.attentive_batch_size": 32})
    encoder = encoder_export.unrolled_encoder(config.model.name, config.model.patch_size)
    like = evaluate.EncoderUnderTest("enc", encoder, None, config.model.patch_size, config.data.crop_size)
    enc = dataclasses.replace(evaluate.random_init(like, seed=1), tag="enc")
    baseline = evaluate.random_init(enc, seed=0)
    all_results = {e.tag: evaluate.evaluate(config, e, str(tmp_path), protocols=("knn", "attentive"))
                   for e in (enc, baseline)}
    path = evaluate.write_results(str(tmp_path), all_results)
    with open(path) as f:
        written = json.load(f)
    for tag in ("enc", "random_seed0"):
        r = written[tag]["attentive"]
        assert r["num_heads"] == encoder.num_heads and len(r["sweep"]) == len(config.eval.attentive_lrs)
        assert 0 <= evaluate.summary_rows(written[tag])["attentive"] <= 1
    assert "attentive" in evaluate.format_table(all_results)
    assert len(passes) == 4  # one pass per split and encoder gives the features and the tokens
    again = evaluate.evaluate(config, enc, str(tmp_path), protocols=("attentive",))
    assert again["features"]["from_cache"] and passes[4:] == ["enc train tokens", "enc test tokens"]
    assert again["attentive"]["sweep"] == written["enc"]["attentive"]["sweep"]
