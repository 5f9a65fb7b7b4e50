"""End-to-end fine-tuning: the head reads the linear probe's `last` feature, training learns the classes,
and the caller's weights are left as they were."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import small_config

from ijepa_jax import encoder_export, evaluate, sharding
from ijepa_jax.data.synthetic import SyntheticSource
from ijepa_jax.eval import features, finetune

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def micro_encoder(seed=0):
    encoder = encoder_export.unrolled_encoder("vit_micro", 4)
    return encoder, encoder.init(jax.random.key(seed), np.zeros((1, 16, 16, 3), np.float32))["params"]


def test_the_head_reads_the_mean_of_the_output_tokens_as_the_probes_last_feature():
    encoder, params = micro_encoder()
    images = features.centre_crops(SyntheticSource(8, 16, 4), 16)[0]
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(encoder.embed_dim, 4)), rng.normal(size=4)
    logits = finetune.logits_fn(encoder, {"encoder": params, "head": {"kernel": kernel, "bias": bias}}, images,
                                MEAN, STD)
    from ijepa_jax.step import normalize
    last = np.asarray(features.pooled_layer_features(encoder, params, normalize(images, MEAN, STD)))[:, -1]
    np.testing.assert_allclose(logits, last.astype(np.float64) @ kernel + bias, rtol=1e-4, atol=1e-4)


def test_fine_tuning_learns_the_classes_and_leaves_the_callers_weights_alone():
    encoder, params = micro_encoder()
    before = jax.tree.map(np.array, params)
    train = features.centre_crops(SyntheticSource(256, 16, 4, seed=0), 16)
    test = features.centre_crops(SyntheticSource(128, 16, 4, seed=1), 16)
    mesh = sharding.make_mesh()
    # No flips: a mirror turns one grating orientation (one class) into another.
    settings = finetune.FinetuneSettings(epochs=8, lr=2e-3, batch_size=32, weight_decay=0.05, warmup_epochs=1,
                                         flip=False)
    r = finetune.finetune(encoder, params, train, test, 4, MEAN, STD, mesh, settings)
    assert r["top1"] > 0.4 and r["top5"] == 1.0, r  # chance 0.25, one standard error 0.04 on 128 images
    assert r["steps"] == 8 * (256 // 32) and r["train_loss_last_epoch"] < 0.7 * np.log(4)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):  # usable and unchanged after
        np.testing.assert_array_equal(a, np.asarray(b))
    # With lr ~ 0 nothing moves: the head stays at zero and every class scores the same.
    frozen = finetune.finetune(encoder, params, train, test, 4, MEAN, STD, mesh,
                               dataclasses.replace(settings, epochs=1, lr=1e-12))
    assert frozen["train_loss_last_epoch"] == pytest.approx(np.log(4), rel=1e-4)


def test_evaluate_runs_finetune_on_the_encoder_and_the_baseline_with_the_same_settings(tmp_path):
    config = small_config(**{"data.synthetic_images": 64, "eval.finetune_epochs": 1, "eval.finetune_batch_size": 16})
    encoder = encoder_export.unrolled_encoder(config.model.name, config.model.patch_size)
    like = evaluate.EncoderUnderTest("enc", encoder, None, config.model.patch_size, config.data.crop_size)
    enc = dataclasses.replace(evaluate.random_init(like, seed=1), tag="enc")
    all_results = {e.tag: evaluate.evaluate(config, e, str(tmp_path), protocols=("finetune",))
                   for e in (enc, evaluate.random_init(enc, seed=0))}
    with open(evaluate.write_results(str(tmp_path), all_results)) as f:
        written = json.load(f)
    for tag in ("enc", "random_seed0"):
        r = written[tag]["finetune"]
        assert r["epochs"] == 1 and r["batch_size"] == 16 and r["steps"] == 64 // 16
        assert 0 <= evaluate.summary_rows(written[tag])["finetune"] <= 1
    assert "finetune" in evaluate.format_table(all_results)


@pytest.mark.parametrize("key, value", [("finetune_epochs", 0), ("finetune_lr", 0.0), ("finetune_warmup_epochs", 9.0)])
def test_bad_finetune_settings_are_refused_by_name(key, value):
    from ijepa_jax import config_lib

    config = small_config(**{f"eval.{key}": value})
    with pytest.raises(ValueError, match=f"eval.{key}="):
        config_lib.validate_eval(config)
