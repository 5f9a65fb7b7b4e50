"""The evaluate command: a run's target encoder vs a random one, every protocol, cached features."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import small_config
from ijepa_jax import checkpoint, encoder_export, evaluate, train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = {"data.synthetic_images": 120, "eval.probe_epochs": 5, "eval.probe_batch_size": 32,
        "eval.lowshot_per_class": (1, 2), "eval.lowshot_seeds": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    train.train(small_config(total_steps=4), workdir)
    return workdir


def test_every_protocol_runs_and_features_are_reused(run, tmp_path, monkeypatch):
    config = small_config(**EVAL)
    enc = evaluate.from_workdir(run)
    assert enc.tag == "step4"
    first = evaluate.evaluate(config, enc, str(tmp_path))
    assert set(first) == {"knn", "linear", "lowshot", "features"}
    assert set(first["linear"]) == {"last", "last_bn", "last4", "last4_bn"}
    assert set(first["lowshot"]) == {"1_per_class", "2_per_class"}
    assert first["features"]["train_images"] == 120 and not first["features"]["from_cache"]
    assert all(0 <= v <= 1 for v in evaluate.summary_rows(first).values())

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(evaluate.features_lib, "extract_features", no_extraction)
    again = evaluate.evaluate(config, enc, str(tmp_path))
    assert again["features"]["from_cache"] and again["knn"]["top1"] == first["knn"]["top1"]


def test_the_online_encoder_can_be_evaluated_instead_of_the_target(run):
    """which='online' restores the run's online (context) encoder: its parameters are the checkpoint's
    params['encoder'], not the EMA target's (which differ after 4 steps)."""
    online, target = evaluate.from_workdir(run, which="online"), evaluate.from_workdir(run)
    assert online.tag == "step4_online" and target.tag == "step4"
    exp = train.build(small_config(total_steps=4))
    manager, step = checkpoint.read_only_manager(run)
    state, _ = checkpoint.restore(manager, step, exp.abstract_state, exp.config, run)
    for a, b in zip(jax.tree.leaves(online.params), jax.tree.leaves(state.params["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    differ = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(online.params), jax.tree.leaves(target.params))]
    assert any(differ)
    with pytest.raises(ValueError, match="'target' \\(EMA\\) and 'online'"):
        evaluate.from_workdir(run, which="student")


def test_the_feature_cache_tells_encoders_with_the_same_tag_apart(run, tmp_path):
    """Two runs evaluated into one --out at the same step share a tag ('step4'), not their features."""
    import dataclasses

    import jax

    config = small_config(**EVAL)
    enc = evaluate.from_workdir(run)
    other = dataclasses.replace(enc, params=jax.tree.map(lambda x: x * 1.01, enc.params))
    assert other.tag == enc.tag
    first = evaluate.evaluate(config, enc, str(tmp_path), protocols=("knn",))
    second = evaluate.evaluate(config, other, str(tmp_path), protocols=("knn",))
    assert not first["features"]["from_cache"] and not second["features"]["from_cache"]
    assert evaluate.evaluate(config, enc, str(tmp_path), protocols=("knn",))["features"]["from_cache"]


def test_an_exported_encoder_brings_its_normalisation(run, tmp_path):
    """The export records mean/std; evaluating it uses them, whatever --config's data section says."""
    path = encoder_export.export_from_workdir(run, str(tmp_path / "enc.msgpack"))
    _, _, info = encoder_export.load_encoder(path)
    config = small_config(**EVAL)
    assert info["mean"] == list(config.data.mean) and info["std"] == list(config.data.std)
    enc = evaluate.from_export(path)
    odd = small_config(**{**EVAL, "data.mean": (0.0, 0.0, 0.0), "data.std": (1.0, 1.0, 1.0)})
    assert evaluate.normalization_of(odd, enc) == (tuple(info["mean"]), tuple(info["std"]))


def test_the_random_baseline_has_the_same_architecture_and_other_features(run, tmp_path):
    config = small_config(**EVAL)
    enc = evaluate.from_workdir(run)
    rnd = evaluate.random_init(enc, seed=0)
    assert rnd.tag == "random_seed0" and rnd.patch_size == enc.patch_size
    train_src, _ = evaluate.eval_sources(config)
    mesh = evaluate.sharding.make_mesh()
    a = evaluate.features_of(config, enc, train_src, "train", None, mesh)
    b = evaluate.features_of(config, rnd, train_src, "train", None, mesh)
    assert a[0].shape == b[0].shape and not (a[0] == b[0]).all()


def test_image_size_not_divisible_by_the_patch_is_a_clear_error(run):
    enc = evaluate.from_workdir(run)
    with pytest.raises(ValueError, match=r"eval\.image_size=18.*multiple of 4"):
        evaluate.image_size_for(small_config(**{"eval.image_size": 18}), enc)


def test_monitor_during_pretraining_logs_eval_records(tmp_path):
    config = small_config(total_steps=8, **{"eval.every_epochs": 1, "eval.monitor_protocols": "knn,linear",
                                            "eval.probe_epochs": 2})
    train.train(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "eval/knn_k20" in r]
    assert [r["step"] for r in evals] == [8] and "eval/linear_last4_bn" in evals[0]


def run_cli(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = REPO_ROOT
    overrides = ["--config.data.source=synthetic", "--config.data.crop_size=16", "--config.data.synthetic_images=80",
                 "--config.eval.probe_epochs=2", "--config.eval.lowshot_seeds=1", "--config.eval.lowshot_per_class=(1,)"]
    cmd = [sys.executable, "-m", "ijepa_jax.evaluate", "--config", "configs/cifar100.py:vit_tiny"] + overrides + args
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_results_for_the_encoder_and_the_baseline(run, tmp_path):
    proc = run_cli(["--workdir", run, "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert set(results) == {"step4", "random_seed0"}
    assert "linear_last4_bn" in proc.stdout and os.path.isdir(tmp_path / "tensorboard")


def test_cli_without_a_checkpoint_says_so(tmp_path):
    proc = run_cli(["--workdir", str(tmp_path)])
    assert proc.returncode != 0 and "No checkpoints" in proc.stderr and "Traceback" not in proc.stderr
