"""One run per work dir (ijepa_jax/workdir.py): the lock, its heartbeat and stale-lock take-over, two real
runs on one dir, and starting over after a crash before the first checkpoint."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import small_config

from ijepa_jax import train, workdir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_lock(path, host, pid, age_s=0.0):
    path.write_text(json.dumps({"host": host, "pid": pid, "started": 0, "token": "theirs"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_second_lock_on_a_held_dir_is_refused_naming_the_owner(tmp_path):
    with workdir.RunLock(str(tmp_path)) as first:
        held = json.loads((tmp_path / workdir.LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["token"] == first.owner["token"]
        with pytest.raises(workdir.WorkdirInUse, match=rf"in use by another run \(.* pid {os.getpid()}.*--workdir"):
            workdir.RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / workdir.LOCK_NAME).exists()  # released


def test_a_lock_whose_process_has_exited_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / workdir.LOCK_NAME, workdir.RunLock(str(tmp_path)).owner["host"], dead.pid)
    with workdir.RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())["token"] == lock.owner["token"]
    assert f"pid {dead.pid} (its process {dead.pid} has exited)" in capsys.readouterr().out


def test_another_hosts_lock_is_refused_while_its_heartbeat_is_fresh_and_taken_over_once_stale(tmp_path):
    path = tmp_path / workdir.LOCK_NAME
    write_lock(path, "other-host", 1, age_s=10)
    with pytest.raises(workdir.WorkdirInUse, match=r"other-host pid 1, last heartbeat 1\d s ago"):
        workdir.RunLock(str(tmp_path), stale_s=60).acquire()
    write_lock(path, "other-host", 1, age_s=120)
    with workdir.RunLock(str(tmp_path), stale_s=60):
        assert json.loads(path.read_text())["host"] != "other-host"


def test_the_heartbeat_keeps_a_long_run_from_looking_stale(tmp_path):
    with workdir.RunLock(str(tmp_path), heartbeat_s=0.05):
        path = tmp_path / workdir.LOCK_NAME
        os.utime(path, (time.time() - 100, time.time() - 100))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5
        with pytest.raises(workdir.WorkdirInUse):
            workdir.RunLock(str(tmp_path), stale_s=50).acquire()


def train_command(work, *args):
    return [sys.executable, "-m", "ijepa_jax.train", "--config", "configs/cifar100.py:vit_tiny,smoke",
            "--workdir", str(work), "--config.data.source=synthetic", "--config.optim.epochs=300",
            "--config.log_every_steps=1", "--config.checkpoint.every_steps=10",
            "--config.checkpoint.export_at_end=False", *args]


def test_a_second_run_in_a_busy_work_dir_is_refused_in_seconds_and_the_first_is_untouched(tmp_path):
    """Run A (seed 0) is training; run B (seed 1, another lr) on the same dir exits 1 within seconds of
    starting, naming the problem, with no traceback; A then finishes with every step logged once, its
    own config.json and its checkpoints."""
    work = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
    a = subprocess.Popen(train_command(work, "--config.total_steps=60"), cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not ((work / "metrics.jsonl").exists() and (work / "metrics.jsonl").read_text().strip()):
        assert a.poll() is None and time.monotonic() < deadline, "run A did not start"
        time.sleep(0.2)
    t = time.monotonic()
    b = subprocess.run(train_command(work, "--config.total_steps=60", "--config.seed=1", "--config.optim.lr=5e-4"),
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    refused_after = time.monotonic() - t
    out_a, _ = a.communicate(timeout=600)
    assert b.returncode == 1 and "in use by another run" in b.stderr and "Traceback" not in b.stderr + b.stdout
    assert refused_after < 60  # jax's import and the config parse, not a training step
    assert a.returncode == 0, out_a[-2000:]
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert json.loads((work / "config.json").read_text())["seed"] == 0
    assert sorted(os.listdir(work / "checkpoints")) == ["40", "50", "60"]  # checkpoint.keep=3
    assert not (work / workdir.LOCK_NAME).exists()


def test_a_crash_before_the_first_checkpoint_restarts_the_same_config_from_step_0(tmp_path, capsys):
    """What an early crash leaves (config.json, metrics.jsonl, tensorboard/, no checkpoint): the same config
    starts again at step 0 with its old records moved to attempts/1/; another config is refused, naming the
    entry that changed."""
    config = small_config(total_steps=3)
    train.train(config, str(tmp_path))
    for name in os.listdir(tmp_path / "checkpoints"):
        os.rename(tmp_path / "checkpoints" / name, tmp_path / f"gone_{name}")
    old_records = (tmp_path / "metrics.jsonl").read_text()

    with pytest.raises(ValueError, match=r"config differs \(optim\.lr: 0\.001 -> 0\.0005\); refusing"):
        train.train(small_config(total_steps=3, **{"optim.lr": 5e-4}), str(tmp_path))
    train.train(config, str(tmp_path))
    assert (tmp_path / "attempts" / "1" / "metrics.jsonl").read_text() == old_records
    assert (tmp_path / "attempts" / "1" / "tensorboard").is_dir()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "stopped before its first checkpoint: starting again from step 0" in capsys.readouterr().out
