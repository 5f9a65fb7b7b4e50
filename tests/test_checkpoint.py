"""Checkpoints: exact resume, preemption, crash safety, another topology, export, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from ijepa_jax import checkpoint, encoder_export, train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"checkpoint.every_steps": 3, "checkpoint.async_save": True}
# A failed restore leaves orbax's pending read coroutines to the garbage collector, which reports them.
damaged_restore = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def steps_logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def latest_state(workdir, config):
    exp = train.build(config)
    manager, step = checkpoint.read_only_manager(workdir)
    state, _ = checkpoint.restore(manager, step, exp.abstract_state, exp.config, workdir)
    return step, state


def subprocess_train(workdir, overrides, devices=8, wait=True):
    """train.train(small_config(**overrides), workdir) in a fresh process with `devices` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])
    code = (  # grain's worker processes read absl flags: mark them parsed, as app.run would
        "import json, sys; from absl import flags; flags.FLAGS.mark_as_parsed(); "
        "from conftest import small_config; from ijepa_jax import train; "
        "train.train(small_config(**json.loads(sys.argv[1])), sys.argv[2])"
    )
    args = [sys.executable, "-c", code, json.dumps(overrides), str(workdir)]
    if not wait:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def continuous_run(tmp_path_factory):
    """6 uninterrupted steps, checkpoints every 3."""
    workdir = str(tmp_path_factory.mktemp("continuous"))
    train.train(small_config(total_steps=6, **FAST), workdir)
    return workdir


def test_stopped_and_resumed_run_equals_the_continuous_one_bitwise(continuous_run, tmp_path):
    """3 steps, stop, re-run the same command for 6: steps 4-6 have exactly the same losses and end state."""
    workdir = str(tmp_path)
    train.train(small_config(total_steps=3, **FAST), workdir)
    train.train(small_config(total_steps=6, **FAST), workdir)
    assert steps_logged(workdir) == [1, 2, 3, 4, 5, 6]
    assert losses(workdir) == losses(continuous_run)  # bitwise on CPU
    config = small_config(total_steps=6, **FAST)
    (step_a, a), (step_b, b) = latest_state(continuous_run, config), latest_state(workdir, config)
    assert step_a == step_b == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_restores_the_data_position_so_masks_continue(continuous_run, tmp_path):
    """The saved pipeline position makes the next batch the one the continuous run used."""
    config = small_config(total_steps=6, **FAST)
    exp = train.build(config)
    manager, _ = checkpoint.read_only_manager(continuous_run)
    state, data_state = checkpoint.restore(manager, 3, exp.abstract_state, exp.config, continuous_run)
    assert data_state == {"next_batch": 3} and int(state.step) == 3
    resumed = next(train.train_batches(exp, start_batch=int(state.step)))
    straight = train.train_batches(exp)
    for _ in range(4):
        batch = next(straight)
    for key in ("images", "context_idx", "target_idx", "target_valid"):
        np.testing.assert_array_equal(np.asarray(resumed[key]), np.asarray(batch[key]))


@pytest.mark.slow  # two subprocess runs; bitwise resume runs by default in test_stopped_and_resumed_run_equals_the_continuous_one_bitwise
def test_resume_with_another_worker_count_continues_bitwise(continuous_run, tmp_path):
    """The data position is a batch index, not grain's iterator state (whose format depends on the
    worker count): a run saved with 0 workers resumes with 2 and matches the continuous run exactly."""
    workdir = str(tmp_path)
    train.train(small_config(total_steps=3, **FAST), workdir)
    proc = subprocess_train(workdir, {"total_steps": 6, **FAST, "data.num_workers": 2})
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = losses(continuous_run), losses(workdir)
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]


@pytest.mark.slow  # the same handler runs by default in tests/test_train.py (Ctrl-C) and tests/test_multiprocess.py (SIGTERM)
def test_sigterm_saves_at_the_next_step_and_the_rerun_resumes(tmp_path):
    """A real training process gets SIGTERM: it saves, exits 0, and the same command resumes after it."""
    overrides = {"optim.epochs": 1000, "checkpoint.every_steps": 0, "log_every_steps": 1}
    proc = subprocess_train(tmp_path, overrides, wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: saved step" in out
    assert "Logging error" not in err and "Traceback" not in err, err[-3000:]
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert checkpoint.read_only_manager(str(tmp_path))[1] == saved
    assert steps_logged(str(tmp_path)) == list(range(1, saved + 1))

    rerun = subprocess_train(tmp_path, {**overrides, "total_steps": saved + 2})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints'} step {saved}" in rerun.stdout
    assert steps_logged(str(tmp_path)) == list(range(1, saved + 3))


def test_the_sigterm_handler_only_sets_a_flag_and_the_loop_logs_once(monkeypatch):
    """Logging from the handler re-enters the logging lock the interrupted code may hold ('--- Logging error
    --- reentrant call'): the handler sets a flag; requested() logs the line, once."""
    logged = []
    monkeypatch.setattr(checkpoint.logging, "warning", lambda *a: logged.append(a[0] % a[1:]))
    with checkpoint.PreemptionWatcher(manager=None) as watcher:
        assert not watcher.requested(1)
        signal.raise_signal(signal.SIGTERM)
        assert logged == []
        assert watcher.requested(2) and watcher.requested(3)
    assert logged == ["SIGTERM: saving at step 2, then stopping"]
    assert signal.getsignal(signal.SIGTERM) is not watcher._on_signal
    with checkpoint.PreemptionWatcher(manager=None) as watcher:  # Ctrl-C: the same, a second one interrupts
        signal.raise_signal(signal.SIGINT)
        assert watcher.requested(7)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert logged[-1] == "SIGINT: saving at step 7, then stopping"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A process killed while step 4 is being written leaves step 2 intact; resuming ignores the partial 4."""
    code = (
        "import os, signal, time; from conftest import small_config; from ijepa_jax import checkpoint, train\n"
        "c = small_config(total_steps=2, **{'checkpoint.every_steps': 2})\n"
        "train.train(c, WORKDIR)\n"
        "exp = train.build(c); m = checkpoint.make_manager(WORKDIR, exp.config.checkpoint, exp.steps_per_epoch)\n"
        "state = train.initial_state(exp, m, WORKDIR)\n"
        "checkpoint.save(m, 4, state, exp.config)\n"
        "time.sleep(0.05); os.kill(os.getpid(), signal.SIGKILL)\n"
    ).replace("WORKDIR", repr(str(tmp_path)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("4")]
    assert leftovers and all("tmp" in d for d in leftovers), leftovers  # killed mid-save: only a partial 4
    manager, latest = checkpoint.read_only_manager(str(tmp_path))
    assert latest == 2
    train.train(small_config(total_steps=4, **{"checkpoint.every_steps": 2}), str(tmp_path))
    assert steps_logged(str(tmp_path)) == [1, 2, 3, 4]
    assert checkpoint.read_only_manager(str(tmp_path))[1] == 4


@pytest.mark.slow  # the default run reshards in test_checkpoint_saved_on_8x1_resumes_fsdp_sharded_on_2x4
def test_checkpoint_saved_on_8_devices_resumes_on_2(continuous_run, tmp_path):
    """Restore reshards onto the new mesh: the 2-device continuation matches the 8-device run closely."""
    workdir = str(tmp_path)
    train.train(small_config(total_steps=3, **FAST), workdir)
    proc = subprocess_train(workdir, {"total_steps": 6, **FAST}, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "devices: 2" in proc.stdout and "step 3" in proc.stdout
    expected, got = losses(continuous_run), losses(workdir)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4)


def test_checkpoint_saved_on_8x1_resumes_fsdp_sharded_on_2x4(continuous_run, tmp_path):
    """A data-parallel (8 x 1) checkpoint resumes on a 2 x 4 data x fsdp mesh: the state is restored
    sharded by the FSDP rules and the run continues like the 8 x 1 one. The resumed run also logs the
    representation-health diagnostics."""
    workdir = str(tmp_path)
    train.train(small_config(total_steps=3, **FAST), workdir)
    config = small_config(total_steps=6, **FAST, **{"mesh.data": 2, "mesh.fsdp": -1, "eval.health_every_steps": 2})
    train.train(config, workdir)
    expected, got = losses(continuous_run), losses(workdir)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4)
    step, state = latest_state(workdir, config)
    kernel = state.params["encoder"]["stack"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert step == 6 and "fsdp" in kernel.sharding.spec
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        health = [r for r in map(json.loads, f) if "health/target_rank_pooled" in r]
    assert [r["step"] for r in health] == [4, 6] and all(r["health/target_rank_pooled"] > 1 for r in health)


def test_exported_target_encoder_loads_back_and_matches_the_checkpoint(tmp_path):
    """target_encoder.msgpack (unrolled blocks) gives the same features as the scanned target encoder."""
    config = small_config(total_steps=2, **{"model.scan_layers": True})
    train.train(config, str(tmp_path))
    encoder, params, info = encoder_export.load_encoder(str(tmp_path / "target_encoder.msgpack"))
    assert info == {"name": "vit_micro", "patch_size": 4, "crop_size": 16, "mean": list(config.data.mean),
                    "std": list(config.data.std)}
    assert "blocks_0" in params["stack"] and "blocks" not in params["stack"]
    exp = train.build(config)
    _, state = latest_state(str(tmp_path), config)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    ours = encoder.apply({"params": params}, images)
    from ijepa_jax.step import make_models

    theirs = make_models(exp.config, 4).encoder.apply({"params": state.target_params}, images)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_init_from_takes_weights_but_starts_a_fresh_optimizer(continuous_run, tmp_path):
    """checkpoint.init_from copies online and target weights; the step and Adam moments start at zero."""
    config = small_config(total_steps=1, **{"checkpoint.init_from": continuous_run})
    exp = train.build(config)
    manager = checkpoint.make_manager(str(tmp_path), exp.config.checkpoint, exp.steps_per_epoch)
    state = train.initial_state(exp, manager, str(tmp_path))
    _, source = latest_state(continuous_run, small_config(total_steps=6))
    assert int(state.step) == 0
    for x, y in zip(jax.tree.leaves(state.target_params), jax.tree.leaves(source.target_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert all(float(np.abs(np.asarray(m)).max()) == 0 for m in jax.tree.leaves(state.opt_state[0].mu))


def test_restore_weights_reads_the_parameters_only(continuous_run, monkeypatch):
    """restore_weights equals a full restore's params and target_params, bitwise and with the run's
    shardings, and orbax restores only those two subtrees: no optimizer moments, no step."""
    config = small_config(total_steps=6)
    exp = train.build(config)
    restored_trees = []
    original = checkpoint.ocp.PyTreeCheckpointHandler.restore

    def spy(self, *args, **kwargs):
        tree = original(self, *args, **kwargs)
        restored_trees.append(tree)
        return tree

    monkeypatch.setattr(checkpoint.ocp.PyTreeCheckpointHandler, "restore", spy)
    params, target_params = checkpoint.restore_weights(continuous_run, exp.abstract_state, exp.config)
    assert [sorted(t) for t in restored_trees] == [["params", "target_params"]]
    monkeypatch.undo()
    _, full = latest_state(continuous_run, config)
    for ours, theirs, abstract in ((params, full.params, exp.abstract_state.params),
                                   (target_params, full.target_params, exp.abstract_state.target_params)):
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        for x, y, a in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(abstract)):
            assert x.dtype == y.dtype and x.sharding == a.sharding
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keeps_the_last_k_and_every_kept_epoch(tmp_path):
    """every_steps=1, keep=2, keep_every_epochs=1 (8 steps/epoch): steps 8, 11 and 12 remain."""
    config = small_config(
        total_steps=12, **{"checkpoint.every_steps": 1, "checkpoint.keep": 2, "checkpoint.keep_every_epochs": 1}
    )
    train.train(config, str(tmp_path))
    manager, _ = checkpoint.read_only_manager(str(tmp_path))
    assert sorted(manager.all_steps()) == [8, 11, 12]


# ----------------------------------------------------------------------------
# bad input: clear errors, never a silent fresh start


def test_a_different_model_is_refused_naming_what_differs(continuous_run):
    config = small_config(total_steps=6, **{"model.pred_depth": 2})
    with pytest.raises(ValueError, match=r"model\.pred_depth: checkpoint 1, this run 2"):
        train.train(config, continuous_run)


def test_a_state_of_another_objective_is_a_config_error_not_a_damaged_checkpoint(continuous_run):
    """CAPI's clustering head adds parameters that the saved run never had: the error names them and the
    config entry, and the good checkpoints stay where they are (no 'move the damaged steps out')."""
    steps_before = sorted(os.listdir(os.path.join(continuous_run, "checkpoints")))
    clusters = small_config(total_steps=6, **{"optim.target_clusters": 16, "optim.var_cov_weight": 1.0})
    with pytest.raises(ValueError, match=r"params/clusters/.*not in the checkpoint.*optim\.target_clusters: 0 -> 16"):
        train.train(clusters, continuous_run)
    exp = train.build(clusters)
    with pytest.raises(ValueError, match=r"params/clusters/.*not in the checkpoint"):
        checkpoint.restore_weights(continuous_run, exp.abstract_state, exp.config)
    assert sorted(os.listdir(os.path.join(continuous_run, "checkpoints"))) == steps_before
    assert not os.path.exists(os.path.join(continuous_run, "damaged_checkpoints"))


@damaged_restore
def test_a_corrupt_only_checkpoint_is_an_error_that_says_what_to_do(tmp_path):
    train.train(small_config(total_steps=2), str(tmp_path))
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            if not name.endswith(".json") and "metadata" not in name:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(ValueError, match=r"No checkpoint in .* can be restored: checkpoint step 2 cannot be read.*Move"):
        train.train(small_config(total_steps=4), str(tmp_path))


# ----------------------------------------------------------------------------
# damage on disk: detected at restore, the newest good checkpoint used instead


def largest_array_file(step_dir):
    """The biggest data file of a checkpoint's state (where most of the parameters' bytes are)."""
    paths = [os.path.join(r, n) for r, _, names in os.walk(step_dir / "state") for n in names]
    return max((p for p in paths if os.sep + "d" + os.sep in p), key=os.path.getsize)


def truncate(step_dir):
    path = largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_4_kib(step_dir):
    path = largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(4096)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in block))


def empty_config_metadata(step_dir):
    (step_dir / "config" / "metadata").write_text("")


@pytest.fixture(scope="module")
def run_to_6(tmp_path_factory):
    """6 steps saving every 2 (checkpoints 2, 4, 6), copied fresh for each test."""
    workdir = tmp_path_factory.mktemp("run_to_6")
    train.train(small_config(total_steps=6, **{"checkpoint.every_steps": 2}), str(workdir))
    return workdir


@damaged_restore
@pytest.mark.parametrize(
    "damage,reason",
    [
        (truncate, "cannot be read"),
        (flip_4_kib, "does not match the checksums written when it was saved|cannot be read"),
        (empty_config_metadata, "has an unreadable config"),
    ],
)
def test_a_damaged_latest_checkpoint_is_skipped_in_one_line_and_the_run_resumes_from_the_one_before(
    run_to_6, tmp_path, capsys, damage, reason
):
    """Step 6 damaged: one line names it and why, it moves to damaged_checkpoints/6 (kept, not deleted), the
    run resumes from step 4 and ends with the same losses as an undamaged resume from 4 would give."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(run_to_6, workdir)
    damage(workdir / "checkpoints" / "6")
    capsys.readouterr()
    train.train(small_config(total_steps=8, **{"checkpoint.every_steps": 2}), str(workdir))
    out = capsys.readouterr().out
    skip_lines = [line for line in out.splitlines() if line.startswith("skipping checkpoint step 6")]
    assert len(skip_lines) == 1 and re.search(reason, skip_lines[0]) and len(skip_lines[0]) < 400, out
    assert "resumed from" in out and "step 4" in out
    assert (workdir / "damaged_checkpoints" / "6").is_dir()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6", "8"]  # 6 saved again by this run
    assert steps_logged(str(workdir)) == list(range(1, 9))
    assert losses(str(workdir))[5] == losses(str(run_to_6))[5]  # resumed exactly from step 4


@damaged_restore
def test_every_checkpoint_damaged_is_one_error_naming_each(run_to_6, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(run_to_6, workdir)
    for step in ("2", "4", "6"):
        truncate(workdir / "checkpoints" / step)
    with pytest.raises(ValueError, match=r"can be restored: checkpoint step 6 cannot be read.*step 4.*step 2"):
        train.train(small_config(total_steps=8), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]  # nothing moved or deleted


@damaged_restore
def test_an_explicit_restore_step_that_is_damaged_is_an_error_not_a_fallback(run_to_6, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(run_to_6, workdir)
    flip_4_kib(workdir / "checkpoints" / "6")
    with pytest.raises(ValueError, match=r"checkpoint step 6 .*restore_step asks for exactly this one"):
        train.train(small_config(total_steps=8, **{"checkpoint.restore_step": 6}), str(workdir))


def test_checksums_change_with_any_changed_or_moved_value():
    """The oracle is the definition: sums of raw bits, plain and position-weighted, in numpy."""
    tree = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False]),
            "c": np.array([1.5, -2.0], dtype=jnp.bfloat16), "d": np.int32(7)}
    sums = checkpoint.checksums(jax.tree.map(jnp.asarray, tree))
    bits = tree["a"].view(np.uint32).ravel().astype(np.uint64)
    weights = np.arange(1, bits.size + 1, dtype=np.uint64)
    assert sums["a"] == [int(bits.sum() % 2**32), int((bits * weights).sum() % 2**32)]
    swapped = {**tree, "a": tree["a"].ravel()[[1, 0] + list(range(2, 12))].reshape(3, 4)}
    assert checkpoint.checksums(jax.tree.map(jnp.asarray, swapped))["a"][0] == sums["a"][0]  # same plain sum
    assert checkpoint.checksums(jax.tree.map(jnp.asarray, swapped))["a"][1] != sums["a"][1]  # not weighted
    assert set(sums) == {"a", "b", "c", "d"}


def test_metrics_without_a_checkpoint_refuse_a_fresh_start(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="refusing to start over"):
        train.train(small_config(total_steps=2), str(tmp_path))


def test_an_empty_metrics_file_from_a_crash_before_step_1_does_not_block_the_rerun(tmp_path):
    """A run that died before its first step (e.g. out of memory while compiling) leaves an empty
    metrics.jsonl; the re-run starts instead of refusing."""
    (tmp_path / "metrics.jsonl").write_text("")
    train.train(small_config(total_steps=1), str(tmp_path))
    assert steps_logged(str(tmp_path)) == [1]


def test_missing_init_from_and_unknown_restore_step_are_errors(continuous_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
        train.train(small_config(total_steps=1, **{"checkpoint.init_from": str(tmp_path / "nope")}), str(tmp_path))
    with pytest.raises(ValueError, match=r"restore_step=5.*\[3, 6\]"):
        train.train(small_config(total_steps=6, **{"checkpoint.restore_step": 5}), continuous_run)


def test_export_from_a_workdir_equals_the_end_of_run_export(continuous_run, tmp_path):
    """tools/export_encoder's path: the latest checkpoint's target encoder, restored on any topology."""
    out = encoder_export.export_from_workdir(continuous_run, str(tmp_path / "enc.msgpack"))
    _, a, _ = encoder_export.load_encoder(out)
    _, b, _ = encoder_export.load_encoder(os.path.join(continuous_run, "target_encoder.msgpack"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="No checkpoint step 4"):
        encoder_export.export_from_workdir(continuous_run, str(tmp_path / "x.msgpack"), step=4)


def test_load_encoder_rejects_files_that_are_not_exports(tmp_path):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not"):
        encoder_export.load_encoder(str(bad))
    with pytest.raises(FileNotFoundError):
        encoder_export.load_encoder(str(tmp_path / "missing.msgpack"))


def test_restoring_an_older_step_with_newer_ones_present_is_refused(continuous_run):
    """Nothing is deleted for the user: newer steps must be moved away before resuming from step 3."""
    with pytest.raises(ValueError, match=r"restore_step=3 is older than steps \[6\]"):
        train.train(small_config(total_steps=6, **{"checkpoint.restore_step": 3}), continuous_run)


def test_resuming_on_another_process_count_is_announced(caplog):
    """A checkpoint records how many processes saved it; resuming on another count warns that the
    continuation is not exact (mask draws depend on the process index and per-process batch)."""
    config = small_config()
    saved = {**json.loads(config.to_json_best_effort()), checkpoint.PROCESSES_KEY: 2}
    with caplog.at_level("WARNING"):
        checkpoint.warn_inexact_resume(saved, config)
    assert "saved by 2" in caplog.text
    caplog.clear()
    saved[checkpoint.PROCESSES_KEY] = 1
    with caplog.at_level("WARNING"):
        checkpoint.warn_inexact_resume(saved, config)
    assert caplog.text == ""


def test_a_resume_warns_about_every_changed_entry_but_the_free_ones(caplog):
    """Any config change between save and resume is announced as inexact (mask.sets, a later option,
    included), except entries that touch neither the state nor the stream: paths, checkpoint and eval
    settings. An entry the checkpoint's config lacks (it predates the option) is not a change."""
    config = small_config()
    saved = json.loads(config.to_json_best_effort())
    saved["mask"]["sets"] = 2
    saved["data"]["crop_scale"] = [0.5, 1.0]
    saved["data"]["root"] = "/elsewhere"
    saved["checkpoint"]["every_steps"] += 7
    saved["eval"]["knn_k"] = 5
    del saved["optim"]["cluster_temperatures"]
    with caplog.at_level("WARNING"):
        checkpoint.warn_inexact_resume(saved, config)
    assert "mask.sets: 2 -> 1" in caplog.text and "data.crop_scale: [0.5, 1.0] -> [0.3, 1.0]" in caplog.text
    for quiet in ("data.root", "checkpoint.every_steps", "eval.knn_k", "cluster_temperatures"):
        assert quiet not in caplog.text


def test_closing_waits_for_orbaxs_cleanup_of_an_earlier_runs_partial_save(tmp_path, monkeypatch):
    """A manager made and closed at once (a refused start) still finishes removing an earlier run's
    temporary folder before it closes, however slow that is: nothing is left scheduling on closed executors."""
    import asyncio

    from orbax.checkpoint._src.path import temporary_paths

    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
    partial.mkdir(parents=True)
    real_cleanup = temporary_paths.cleanup_temporary_paths

    async def slow_cleanup(*args, **kwargs):
        await asyncio.sleep(1.0)
        return await real_cleanup(*args, **kwargs)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
    config = small_config()
    with checkpoint.closing(checkpoint.make_manager(str(tmp_path), config.checkpoint, 8)):
        assert partial.exists()
    assert not partial.exists()
