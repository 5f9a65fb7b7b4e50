"""The real train command on two JAX processes (localhost, CPU, gloo collectives, 2 devices each).

Each process runs `python -m ijepa_jax.train` with --coordinator_address /
--num_processes / --process_id, through a thin wrapper that also writes a
digest of every crop its input pipeline hands to the devices. Checked: finite,
falling losses; the hosts see disjoint slices that together are the
one-process stream; checkpoints move between 2 and 1 processes both ways;
SIGTERM to one process makes both save at the same step and exit 0; an FSDP
state split over both processes is monitored and exported.
"""

import glob
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from ijepa_jax import masks
from ijepa_jax.data import pipeline, sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900  # a loaded 2-core machine compiles two processes at once

# Runs the train module as __main__ (its flags, its error handling), recording this process's crops
# (host path) and, with PLANT_NAN_AT=k, turning optimizer step k's gradient into NaN.
WORKER = """
import hashlib, os, runpy, sys
import jax, jax.numpy as jnp, optax
from ijepa_jax import optim
from ijepa_jax.data import pipeline

def recording(iterator, mesh, size, on_device=None):
    path = os.path.join(os.environ["SEEN_DIR"], f"seen_{jax.process_index()}.txt")
    def tee():
        with open(path, "a") as f:
            for batch in iterator:
                images = batch.get("images", ())  # device-path batches carry crop boxes, not pixels
                f.writelines(hashlib.sha1(image.tobytes()).hexdigest() + "\\n" for image in images)
                f.flush()
                yield batch
    return original(tee(), mesh, size, on_device)

def plant_nan(at_step):
    def update(grads, count, params=None):
        count = count + 1
        return jax.tree.map(lambda g: jnp.where(count == at_step, jnp.nan, g), grads), count
    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)

original, pipeline.prefetch_to_device = pipeline.prefetch_to_device, recording
if os.environ.get("PLANT_NAN_AT"):
    make_optimizer = optim.make_optimizer
    optim.make_optimizer = lambda *a: optax.chain(plant_nan(int(os.environ["PLANT_NAN_AT"])), make_optimizer(*a))
sys.argv = ["ijepa_jax.train"] + sys.argv[1:]
runpy.run_module("ijepa_jax.train", run_name="__main__", alter_sys=True)
"""

# The smoke config on synthetic data (16px images, ViT-micro/4, global batch 8, 8 steps per epoch).
SMALL = [
    "--config", "configs/cifar100.py:vit_tiny,smoke", "--config.data.source=synthetic",
    "--config.optim.epochs=300", "--config.log_every_steps=1", "--config.checkpoint.every_steps=1000",
    "--config.checkpoint.export_at_end=False", "--config.data.augment_on=host",
]
DEVICES_PER_PROCESS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(workdir, devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), SEEN_DIR=str(workdir), **extra)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(workdir, num_processes: int, *args, env=None) -> list[subprocess.Popen]:
    """`num_processes` train processes over 4 devices in all, logging to workdir/../log_<i>.txt; `env`:
    extra environment variables."""
    os.makedirs(workdir, exist_ok=True)
    command = [sys.executable, "-c", WORKER, "--workdir", str(workdir), *SMALL, *args]
    if num_processes == 1:
        return [_popen(command, workdir, 0, 2 * DEVICES_PER_PROCESS, env or {})]
    cluster = [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={num_processes}"]
    return [
        _popen(command + cluster + [f"--process_id={i}"], workdir, i, DEVICES_PER_PROCESS, env or {})
        for i in range(num_processes)
    ]


def _popen(command, workdir, index, devices, env):
    log_path = os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}_log_{index}.txt")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=_env(workdir, devices, **env), stdout=log, stderr=subprocess.STDOUT
        )
    process.log_path = log_path
    return process


def finish(processes, expect_code: int = 0) -> list[str]:
    """Waits for every process; returns their logs; fails with the logs if one did not exit `expect_code`."""
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            codes.append("timeout")
    logs = []
    for p in processes:
        with open(p.log_path) as f:
            logs.append(f.read())
    assert codes == [expect_code] * len(processes), "\n\n".join(f"exit {c}:\n{log[-3000:]}" for c, log in zip(codes, logs))
    return logs


def run(workdir, num_processes: int, *args) -> list[str]:
    return finish(start(workdir, num_processes, *args))


def records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def seen(workdir, process: int) -> list[str]:
    with open(os.path.join(workdir, f"seen_{process}.txt")) as f:
        return f.read().split()


def checkpoint_steps(workdir) -> list[int]:
    """Complete checkpoints only: orbax writes each into N.orbax-checkpoint-tmp first."""
    names = (os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
    return sorted(int(name) for name in names if name.isdigit())


def one_process_stream(workdir, num_batches: int) -> list[str]:
    """Digests of the first global batches as one process draws them for the run's resolved config."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    source = sources.make_source(config.data, seed=config.seed)
    spec = masks.resolve_spec(config)
    it = iter(pipeline.pretrain_dataset(source, config.data, spec, config.seed))
    return [hashlib.sha1(image.tobytes()).hexdigest() for _ in range(num_batches) for image in next(it)["images"]]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """4 steps on 2 processes, saving at the end."""
    workdir = tmp_path_factory.mktemp("mp") / "two"
    logs = run(workdir, 2, "--config.total_steps=4")
    return workdir, logs


def test_two_processes_train_with_finite_falling_losses(two_process_run):
    workdir, logs = two_process_run
    losses = [r["loss"] for r in records(workdir)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert "devices: 4 (cpu), processes: 2" in logs[0]
    for i, log in enumerate(logs):  # each process announces its rank and its devices once
        assert log.count(f"process {i}/2: local devices") == 1
    assert checkpoint_steps(workdir) == [4]


def test_each_host_sees_its_own_half_of_every_global_batch(two_process_run):
    """Per step each host gets 4 crops; the hosts' crops are disjoint and together equal the one-process stream."""
    workdir, _ = two_process_run
    host0, host1 = seen(workdir, 0), seen(workdir, 1)
    batches = min(len(host0), len(host1)) // 4
    assert batches >= 4  # the reader runs ahead of the steps
    assert not set(host0) & set(host1)
    expected = one_process_stream(workdir, batches)
    for k in range(batches):
        together = host0[4 * k : 4 * k + 4] + host1[4 * k : 4 * k + 4]
        assert sorted(together) == sorted(expected[8 * k : 8 * k + 8]), f"global batch {k}"


def test_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    workdir, _ = two_process_run
    logs = run(workdir, 1, "--config.total_steps=6")
    steps = [r["step"] for r in records(workdir)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resumed from" in logs[0] and "step 4" in logs[0]
    assert "resuming on 1 processes a checkpoint saved by 2" in logs[0]
    assert all(math.isfinite(r["loss"]) for r in records(workdir))
    assert checkpoint_steps(workdir) == [4, 6]


@pytest.mark.slow  # one process on 8 devices runs by default (tests/data/test_device_augment.py)
def test_device_augmentation_on_two_processes_trains_to_the_host_paths_losses(two_process_run, tmp_path):
    """data.augment_on=device: each process holds the whole dataset on its devices and crops its half of
    each batch there; the pixels equal the host path's, so the losses equal two_process_run's."""
    workdir, _ = two_process_run
    run(tmp_path / "device", 2, "--config.total_steps=4", "--config.data.augment_on=device")
    assert [r["loss"] for r in records(tmp_path / "device")] == [r["loss"] for r in records(workdir)][:4]


@pytest.mark.slow  # the flag is one global value; the one-process test runs by default (tests/test_train.py)
def test_a_nan_gradient_on_two_processes_stops_both_before_saving_it(tmp_path):
    """Step 3's gradient is NaN on both processes: both stop at step 3 with one clear line, exit 1, and the
    checkpoint of step 2 (saved every 2 steps) is the only one."""
    workdir = tmp_path / "nan"
    processes = start(workdir, 2, "--config.total_steps=6", "--config.checkpoint.every_steps=2",
                      env={"PLANT_NAN_AT": "3"})
    logs = finish(processes, expect_code=1)
    for log in logs:
        assert "error: At step 3 the updated parameters or optimizer moments became non-finite" in log
        assert "Traceback" not in log
    assert checkpoint_steps(workdir) == [2]


@pytest.mark.slow  # the other direction (2 -> 1) runs by default
def test_one_process_checkpoint_resumes_in_two_processes(tmp_path):
    workdir = tmp_path / "one"
    run(workdir, 1, "--config.total_steps=2")
    logs = run(workdir, 2, "--config.total_steps=4")
    assert [r["step"] for r in records(workdir)] == [1, 2, 3, 4]
    assert "resuming on 2 processes a checkpoint saved by 1" in logs[0]
    assert checkpoint_steps(workdir) == [2, 4]


def test_sigterm_to_one_process_saves_both_at_the_same_step_and_exits_0(tmp_path):
    workdir = tmp_path / "preempt"
    processes = start(workdir, 2, "--config.total_steps=2000")
    deadline = time.monotonic() + TIMEOUT_S
    while not (os.path.exists(workdir / "metrics.jsonl") and len(records(workdir)) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "no progress"
        time.sleep(0.5)
    processes[1].send_signal(signal.SIGTERM)
    logs = finish(processes)
    saved = int(logs[0].split("preempted: saved step ")[1].split(";")[0])
    assert saved >= 3
    assert "preempted: saved step" not in logs[1]  # only process 0 prints the run's console lines
    assert checkpoint_steps(workdir) == [saved]  # one step, written by both: not a periodic save (every 1000)
    assert records(workdir)[-1]["step"] <= saved


@pytest.mark.slow  # waits for jax's distributed runtime to notice the dead process
def test_sigkill_of_one_process_leaves_the_other_one_line_naming_the_saved_step_and_a_rerun_resumes(tmp_path):
    """Process 1 is killed (no handler can run) after the checkpoint of step 4: process 0 ends with a
    non-zero exit and one project line naming the saved step; no Python traceback. The same command on
    two fresh processes resumes from that checkpoint."""
    workdir = tmp_path / "killed"
    processes = start(workdir, 2, "--config.total_steps=2000", "--config.checkpoint.every_steps=4")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (4 in checkpoint_steps(workdir) and len(records(workdir)) >= 6):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "no progress"
            time.sleep(0.5)
        processes[1].kill()
        code = processes[0].wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = "timeout"
    finally:
        for p in processes:
            p.kill()
    with open(processes[0].log_path) as f:
        log = f.read()
    assert code not in (0, "timeout"), log[-3000:]
    saved = max(checkpoint_steps(workdir))
    assert "error: process 0 of 2: process 1 stopped responding (no heartbeat for 45 s); " in log, log[-3000:]
    assert f"saved state is at step {saved} in" in log, log[-3000:]
    assert "Traceback" not in log and "Check failure stack trace" not in log, log[-3000:]  # no C++ abort
    logs = run(workdir, 2, f"--config.total_steps={saved + 2}", "--config.checkpoint.every_steps=4")
    assert f"checkpoints step {saved}" in logs[0], logs[0][-3000:]
    assert records(workdir)[-1]["step"] == saved + 2


@pytest.mark.slow  # FSDP resharding and export run by default in one process (tests/test_checkpoint.py)
def test_fsdp_over_two_processes_monitors_and_exports_the_sharded_state(tmp_path):
    """mesh.fsdp=4 splits ViT-Tiny's kernels over both processes' devices. The k-NN monitor and the
    end-of-run export work on the sharded state and agree with a one-process restore of its checkpoint."""
    from flax import serialization

    from ijepa_jax import encoder_export, sharding
    from ijepa_jax.eval import monitor as monitor_lib

    workdir = tmp_path / "fsdp"
    fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.model.name=vit_tiny",
            "--config.model.pred_width=48", "--config.model.scan_layers=True"]
    run(workdir, 2, "--config.total_steps=8", "--config.eval.every_epochs=1",
        "--config.checkpoint.export_at_end=True", *fsdp)
    knn_logged = [r for r in records(workdir) if "eval/knn_k20" in r]
    assert [r["step"] for r in knn_logged] == [8]

    params, config, step = encoder_export.restore_target_encoder(str(workdir))
    assert step == 8
    with open(workdir / "target_encoder.msgpack", "rb") as f:
        exported = serialization.msgpack_restore(f.read())["params"]
    assert jax.tree.structure(exported) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))

    mesh = sharding.make_mesh()
    monitor = monitor_lib.Monitor(config, mesh, config.model.name, config.model.patch_size, config.data.crop_size)
    assert monitor(params)["eval/knn_k20"] == pytest.approx(knn_logged[0]["eval/knn_k20"], abs=1e-6)
