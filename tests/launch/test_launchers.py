"""The cluster launchers run against stand-ins for `gcloud` and `srun` that record what they are asked.

What reaches a worker must be exactly the arguments given (quoting), the run
must be detached with a log per worker, and SLURM tasks must get their CPUs
and a decode-worker count that fits them.
"""

import json
import os
import stat
import subprocess
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRICKY = ["--config.mask.target_scale=(0.15, 0.2)", "--config.data.root=/data/my images", "--config.x=$HOME;'q'"]

# Records its arguments as JSON; with FAKE_EXEC=1 runs an ssh --command locally, as a worker would.
FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, subprocess, sys
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_EXEC") == "1" and "--command" in sys.argv:
    command = sys.argv[sys.argv.index("--command") + 1]
    sys.exit(subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": os.environ["FAKE_HOME"]}).returncode)
"""
# Stands in for python / srun on a worker: writes its argv as JSON to $ARGV_OUT.
RECORD_ARGV = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["ARGV_OUT"], "w") as f:
    json.dump(sys.argv[1:], f)
"""


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_tpu(tmp_path):
    """PATH with a fake gcloud; a worker home with ~/ijepa_jax/.venv whose `python` records its argv."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    executable(bin_dir / "gcloud", FAKE_GCLOUD)
    executable(home / "venv_bin" / "python", RECORD_ARGV)
    activate = home / "ijepa_jax" / ".venv" / "bin" / "activate"
    activate.parent.mkdir(parents=True)
    activate.write_text(f'export PATH="{home / "venv_bin"}:$PATH"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls.jsonl"),
           "FAKE_HOME": str(home), "ARGV_OUT": str(tmp_path / "argv.json")}
    return tmp_path, env


def calls(tmp_path):
    with open(tmp_path / "calls.jsonl") as f:
        return [json.loads(line) for line in f]


def test_tpu_start_runs_detached_on_every_worker_with_arguments_intact(fake_tpu):
    tmp_path, env = fake_tpu
    proc = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "start", "my-tpu", "us-central2-b", "configs/in1k_vith14.py", "gs://b/run 1",
         *TRICKY], cwd=REPO_ROOT, env={**env, "FAKE_EXEC": "1"}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    (call,) = calls(tmp_path)
    assert call[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b"]
    assert "--worker=all" in call
    deadline = time.time() + 30
    while not (tmp_path / "argv.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    with open(tmp_path / "argv.json") as f:
        argv = json.load(f)
    assert argv == ["-m", "ijepa_jax.train", "--config", "configs/in1k_vith14.py", "--workdir", "gs://b/run 1",
                    "--distributed", *TRICKY]
    assert (tmp_path / "home" / "ijepa_logs" / "run_1.log").exists()  # one log per worker, named by the run
    assert "setsid nohup" in call[-1]  # survives the ssh session


def test_tpu_setup_from_a_git_url_and_stop(fake_tpu):
    tmp_path, env = fake_tpu
    for args in (["setup", "my-tpu", "zone-a", "https://example.org/ijepa_jax.git"], ["stop", "my-tpu", "zone-a"]):
        proc = subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    setup, stop = (c[-1] for c in calls(tmp_path))
    assert "git clone --depth 1 https://example.org/ijepa_jax.git" in setup and "'jax[tpu]'" in setup
    assert "pkill -TERM -f 'python -m ijepa_jax.train'" in stop


def test_tpu_usage_errors_show_the_commands(fake_tpu):
    _, env = fake_tpu
    proc = subprocess.run(["bash", "launch/tpu_pod.sh", "start", "my-tpu"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "tpu_pod.sh start TPU ZONE CONFIG WORKDIR" in proc.stderr


def run_sbatch(tmp_path, *args, cpus="8"):
    """launch/slurm.sbatch run as the batch step would be, with `srun` recording its argv."""
    bin_dir, repo = tmp_path / "bin", tmp_path / "repo"
    executable(bin_dir / "srun", RECORD_ARGV)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(repo),
           "SLURM_CPUS_PER_TASK": cpus, "ARGV_OUT": str(tmp_path / "argv.json")}
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "launch", "slurm.sbatch"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "argv.json") as f:
        return json.load(f)


def test_slurm_tasks_get_their_cpus_and_a_worker_count_that_fits(tmp_path):
    argv = run_sbatch(tmp_path, "configs/in1k_vith14.py", "/shared/run", *TRICKY)
    assert "--cpus-per-task=8" in argv  # srun does not inherit it since Slurm 22.05
    assert argv[argv.index("python"):] == [
        "python", "-m", "ijepa_jax.train", "--config", "configs/in1k_vith14.py", "--workdir", "/shared/run",
        "--distributed", "--config.data.num_workers=7", *TRICKY,
    ]


def test_slurm_keeps_a_worker_count_given_on_the_command_line(tmp_path):
    argv = run_sbatch(tmp_path, "configs/in1k_vith14.py", "/shared/run", "--config.data.num_workers=2")
    assert [a for a in argv if "num_workers" in a] == ["--config.data.num_workers=2"]
