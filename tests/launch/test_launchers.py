"""The cluster launchers run against stand-ins for `gcloud` and `srun` that record what they are asked.

What reaches a worker must be exactly the arguments given (quoting), the run
must be detached with a log per worker, and SLURM tasks must get their CPUs
and a decode-worker count that fits them. The one-call GPU sweep runs here on
the CPU (smoke config, generated images), its budget on a fake clock; the
CIFAR-100 parts make a round trip through split, status and join.
"""

import hashlib
import importlib.util
import json
import os
import runpy
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile

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


# --- launch/gpu_sweep.sh, launch/budget_sweep.py, launch/cifar_parts.sh ---------------------------------------

SMOKE = ["--sweep", "configs/sweeps/smoke.py", "--config", "configs/cifar100.py:vit_tiny,smoke", "--data", "synthetic",
         "--workers", "0", "--protocols", "knn"]


def gpu_sweep(tmp_path, *args, timeout=600):
    """launch/gpu_sweep.sh on this CPU (one device, this interpreter), work and out folders in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT")}
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    return subprocess.run(["bash", "launch/gpu_sweep.sh", "--work", str(tmp_path / "work"), "--out",
                           str(tmp_path / "out"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """The two points of configs/sweeps/smoke.py through launch/gpu_sweep.sh (about 45 s here)."""
    tmp_path = tmp_path_factory.mktemp("gpu_sweep")
    return tmp_path, gpu_sweep(tmp_path, *SMOKE, "--budget_s", "500", "--first_point_s", "1")


@pytest.mark.slow  # a whole sweep through the launcher; tests/tools/test_sweep.py runs the runner by default
def test_gpu_sweep_runs_a_smoke_sweep_into_out(smoke_sweep):
    tmp_path, proc = smoke_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads(proc.stdout.splitlines()[0])  # the environment comes first
    assert first["check"] == "environment" and first["devices"] == ["cpu"] and first["jax"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["environment.json", "gpu_sweep.log", "points.tar.gz",
                                                     "summary.jsonl", "summary.md", "summary.png"]
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [r["point"] for r in rows] == ["random_init", "ema996", "ema98"]
    assert all(r["step"] == 16 and "knn_k20" in r["top1"] for r in rows[1:])
    assert "| ema98 |" in (out / "summary.md").read_text()
    with tarfile.open(out / "points.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"ema996/metrics.jsonl", "ema98/metrics.jsonl", "ema98/sweep_row.json", "ema98/eval/results.json"} <= names
    assert not any("checkpoints" in n or n.endswith(".npz") for n in names)
    assert (out / "gpu_sweep.log").read_text() == proc.stdout  # stdout and stderr, both in the log
    assert "every point finished" in proc.stdout


@pytest.mark.slow  # the sweep runner's own rerun test runs by default
def test_gpu_sweep_run_again_skips_every_finished_point(smoke_sweep):
    """The second call of a finished sweep (the machine kept --work): nothing trained, the same table."""
    tmp_path, proc = smoke_sweep
    assert proc.returncode == 0
    again = gpu_sweep(tmp_path, *SMOKE, "--budget_s", "500", "--first_point_s", "1")
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("finished already, skipped") >= 2 and "step 1/" not in again.stdout
    assert (tmp_path / "out" / "summary.jsonl").read_text().count("\n") == 3


def test_gpu_sweep_starts_no_point_that_cannot_finish_in_the_budget(tmp_path):
    proc = gpu_sweep(tmp_path, *SMOKE, "--budget_s", "300", "--first_point_s", "100000")
    assert proc.returncode == 3, proc.stdout[-3000:]
    stop = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"gpu_sweep": "stop"')]
    assert stop == [{"gpu_sweep": "stop", "reason": "budget", "before": "ema996", "left_s": stop[0]["left_s"],
                     "estimate_s": 100000, "todo": ["ema996", "ema98"]}]
    assert "run the same command again" in proc.stdout
    assert not (tmp_path / "work" / "sweep_cifar100_vit_tiny_smoke_synthetic" / "ema996").exists()


def test_gpu_sweep_only_plans_the_named_points(tmp_path):
    """--only reaches the runner: the plan holds the named point alone (stopped by the budget before
    training anything), and a name the sweep file lacks is one line naming the choices."""
    proc = gpu_sweep(tmp_path, *SMOKE, "--only", "ema98", "--budget_s", "300", "--first_point_s", "100000")
    assert proc.returncode == 3, proc.stdout[-3000:]
    (stop,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"gpu_sweep": "stop"')]
    assert stop["before"] == "ema98" and stop["todo"] == ["ema98"]
    proc = gpu_sweep(tmp_path, *SMOKE, "--only", "ema97")
    assert proc.returncode == 1 and "--only: no point 'ema97'; choose from ema996, ema98" in proc.stdout


def test_gpu_sweep_refuses_bad_arguments_and_missing_data(tmp_path):
    proc = gpu_sweep(tmp_path, "--budget", "5")
    assert proc.returncode == 2 and "unknown argument: --budget" in proc.stderr
    proc = gpu_sweep(tmp_path, "--data", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "no CIFAR-100 in --data" in proc.stdout and "cifar_parts.sh join" in proc.stdout
    proc = gpu_sweep(tmp_path, "--config", "configs/tiny_imagenet.py:vit_tiny", "--data", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "no Tiny-ImageNet in --data" in proc.stdout and "train/ and val/" in proc.stdout


def test_gpu_sweep_extracts_a_tiny_imagenet_archive_once_and_trains_from_it(tmp_path):
    """--data holding tiny-imagenet-100cls.tar.gz (the shared data's name): extracted into WORK, and every
    point of the sweep is built from the extracted train/ and val/ folders (the runner's pre-check)."""
    from PIL import Image

    top = tmp_path / "src" / "tiny-imagenet-100cls"
    for split, per_class in (("train", 16), ("val", 4)):
        for c in range(4):  # 64 training images: the smoke sweep's 16 steps are its 2 epochs at batch 8
            for i in range(per_class):
                path = top / split / f"n0{c}" / f"{split}_{c}_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20), (60 * c, 10 * i, 90)).save(path, "JPEG")
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "tiny-imagenet-100cls.tar.gz", "w:gz") as tar:
        tar.add(top, arcname="tiny-imagenet-100cls")
    args = ["--sweep", "configs/sweeps/smoke.py", "--config", "configs/tiny_imagenet.py:vit_tiny,smoke", "--data",
            str(data), "--workers", "0", "--protocols", "knn", "--budget_s", "300", "--first_point_s", "100000"]
    proc = gpu_sweep(tmp_path, *args)
    # Pre-checked (each point built on the extracted folders), then stopped before training by the budget.
    assert proc.returncode == 3, proc.stdout[-3000:]
    assert proc.stdout.count("extracting") == 1
    root = tmp_path / "work" / "tiny_imagenet" / "tiny-imagenet-100cls"
    assert len(list((root / "val").glob("*/*.JPEG"))) == 16
    again = gpu_sweep(tmp_path, *args)
    assert again.returncode == 3 and "extracting" not in again.stdout, again.stdout[-3000:]


def test_gpu_sweep_installs_the_wheels_it_is_given_into_work_site(tmp_path):
    """A hand-made wheel (a one-line package) lands in WORK/site before anything else can fail."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = "gswheel-1.0.dist-info"
    files = {"gswheel/__init__.py": "VALUE = 7\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gswheel\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(wheels / "gswheel-1.0-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    proc = gpu_sweep(tmp_path, "--wheels", str(wheels), "--data", str(tmp_path / "no_data"))
    assert proc.returncode == 1 and "no CIFAR-100 in --data" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "work" / "site" / "gswheel" / "__init__.py").read_text() == "VALUE = 7\n"
    proc = gpu_sweep(tmp_path, "--wheels", str(tmp_path / "empty"))
    assert proc.returncode == 1 and "no wheels in --wheels" in proc.stdout


def load_budget_sweep():
    spec = importlib.util.spec_from_file_location("budget_sweep", os.path.join(REPO_ROOT, "launch", "budget_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_sweep_stops_before_a_point_that_does_not_fit_and_continues_on_the_next_call(tmp_path, monkeypatch):
    """Points that take 100 s on a fake clock, a 250 s budget: two run, the third would end past the deadline;
    the next call (a new budget) runs the rest, skipping what is finished."""
    budget_sweep = load_budget_sweep()
    from conftest import small_config

    from ijepa_jax.tools import sweep

    planned = sweep.point_configs(small_config(), {}, {"a": {}, "b": {"seed": 1}, "c": {"seed": 2}})
    now, ran = [1000.0], []

    def fake_run_sweep(points, workdir, protocols, header=""):
        for name, point in points.items():
            row_file = tmp_path / name / sweep.ROW_FILE
            if not row_file.exists():
                now[0] += 100
                ran.append(name)
                row_file.parent.mkdir()
                key = sweep.baseline_key(point.config, protocols)
                row_file.write_text(json.dumps({"wall_s": 100, "baseline": key}))
        return []

    monkeypatch.setattr(budget_sweep.time, "time", lambda: now[0])
    monkeypatch.setattr(budget_sweep.sweep, "run_sweep", fake_run_sweep)
    status = budget_sweep.run(planned, str(tmp_path), ("knn",), "", deadline=1250, first_point_s=50, out="")
    assert (status, ran) == (budget_sweep.STOPPED, ["a", "b"])  # c: 50 s left, 120 s estimated
    status = budget_sweep.run(planned, str(tmp_path), ("knn",), "", deadline=now[0] + 150, first_point_s=50, out="")
    assert (status, ran) == (0, ["a", "b", "c"])


def precheck_sweep_and_halves(full: str, halves: tuple) -> dict:
    """The planned configs of configs/sweeps/FULL.py, every point validated and built (on generated
    images, 2 steps); its halves FULL_<half>.py must be its own points, together all of them, the
    control in each."""
    from ijepa_jax.tools import sweep

    base = config_flags_file("configs/cifar100.py:vit_tiny,reference")  # the files' base
    base.update_from_flattened_dict({"data.source": "synthetic", "data.augment_on": "device", "total_steps": 2})
    shared, points = sweep.load_sweep(os.path.join(REPO_ROOT, f"configs/sweeps/{full}.py"))
    planned = sweep.point_configs(base, shared, points)
    loaded = [sweep.load_sweep(os.path.join(REPO_ROOT, f"configs/sweeps/{full}_{h}.py")) for h in halves]
    assert all(s == shared for s, _ in loaded)
    assert all(p[name] == points[name] for _, p in loaded for name in p)
    assert set().union(*(p for _, p in loaded)) == set(points)
    assert all("control" in p for _, p in loaded)
    return planned


@pytest.mark.slow  # the sweep files change rarely
def test_the_gpu_recipe_sweep_and_its_halves_pass_the_sweeps_own_precheck():
    planned = precheck_sweep_and_halves("cifar100_gpu_recipe", ("ema", "shape"))
    assert list(planned) == ["control", "reference", "ema99", "ema996", "targets2", "context28", "pred4", "pred8"]
    assert planned["pred8"].config.model.pred_depth == 8 and planned["context28"].config.mask.context_tokens == 28


@pytest.mark.slow  # the sweep files change rarely
def test_the_objectives_sweep_and_its_gpu_halves_pass_the_sweeps_own_precheck():
    planned = precheck_sweep_and_halves("cifar100_objectives", ("targets", "sets", "capi"))
    assert planned["sets4"].config.mask.sets == 4 and planned["frozen_target"].config.optim.var_cov_weight == 1.0


@pytest.mark.parametrize("spec", ["configs/cifar100.py:vit_tiny", "configs/tiny_imagenet.py:vit_small"])
def test_the_default_seeds_sweep_is_the_shipped_default_at_three_seeds(spec):
    """configs/sweeps/default_seeds.py passes the runner's pre-check on either shipped config and changes
    nothing of it but the seed (and what is logged): the seed spread of the headline."""
    from ijepa_jax.tools import sweep

    base = config_flags_file(spec)
    base.update_from_flattened_dict({"data.source": "synthetic", "total_steps": 2})
    shared, points = sweep.load_sweep(os.path.join(REPO_ROOT, "configs/sweeps/default_seeds.py"))
    planned = sweep.point_configs(base, shared, points)
    assert [(name, p.config.seed) for name, p in planned.items()] == [
        ("default", 0), ("default_seed1", 1), ("default_seed2", 2)]
    for point in planned.values():
        assert point.config.optim.to_dict() == base.optim.to_dict() and point.config.data.batch_size == base.data.batch_size
        assert point.config.model.to_dict() == base.model.to_dict()


def config_flags_file(spec):
    path, _, arg = spec.partition(":")
    return runpy.run_path(os.path.join(REPO_ROOT, path))["get_config"](arg)


def cifar_parts(*args, cwd):
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "launch", "cifar_parts.sh"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cifar_parts_round_trip_refusing_missing_and_damaged_parts(tmp_path):
    """split in a git checkout (the parts folder ignored through .git/info/exclude), join elsewhere, one call
    at a time; missing, damaged and absent parts refused by name."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    data = tmp_path / "data"
    data.mkdir()
    blob = os.urandom(3 * 2**20 + 12345)
    (data / "cifar-100-python.tar.gz").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    (data / "SHA256SUMS").write_text(f"{digest}  cifar-100-python.tar.gz\n")
    proc = cifar_parts("split", "--archive", str(data / "cifar-100-python.tar.gz"), "--max_mib", "1", cwd=repo)
    assert proc.returncode == 0, proc.stderr
    parts = repo / ".cifar_parts"
    names = [f"cifar-100-python.tar.gz.part-{k}-of-4" for k in (1, 2, 3, 4)]
    assert sorted(p.name for p in parts.iterdir()) == ["MANIFEST.sha256", *names]
    assert all((parts / n).stat().st_size <= 2**20 for n in names)
    assert f'call 4: carry [".cifar_parts/MANIFEST.sha256", ".cifar_parts/{names[3]}"]' in proc.stdout
    assert "/.cifar_parts/" in (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""

    # The device machine: each call brings the manifest and one part into its checkout's .cifar_parts, which the
    # next copy of the tree may or may not keep; status keeps them in a store outside the checkout.
    there, store, root = tmp_path / "there", str(tmp_path / "store"), tmp_path / "root"
    arrived = there / ".cifar_parts"

    def call(k, *args):
        shutil.rmtree(arrived, ignore_errors=True)  # the worst case: nothing of the last call is left there
        arrived.mkdir(parents=True)
        shutil.copy(parts / "MANIFEST.sha256", arrived)
        if k:
            shutil.copy(parts / names[k - 1], arrived)
        return cifar_parts(*args, "--store", store, "--to", str(root), cwd=there)

    assert call(1, "status").stdout.strip() == "cifar-100-python.tar.gz: parts here: 1 of 4; missing: 2 3 4"
    assert call(2, "status").stdout.strip() == "cifar-100-python.tar.gz: parts here: 1 2 of 4; missing: 3 4"
    proc = call(4, "join")  # part 3 was never sent
    assert proc.returncode == 1 and "missing: 3" in proc.stderr and names[2] in proc.stderr
    assert not root.exists() or not list(root.iterdir())

    arrived_damaged = call(3, "status")
    assert arrived_damaged.returncode == 0
    damaged = bytearray((arrived / names[2]).read_bytes())
    damaged[100] ^= 1
    shutil.rmtree(store)  # start over from the damaged copy: it is not kept
    (arrived / names[2]).write_bytes(bytes(damaged))
    proc = cifar_parts("status", "--store", store, cwd=there)
    assert "parts here: none of 4" in proc.stdout and "arrived damaged (not kept): 3" in proc.stdout

    for k in (1, 2, 3):
        call(k, "status")
    proc = call(4, "join")
    assert proc.returncode == 0 and digest in proc.stdout, proc.stderr
    assert (root / "cifar-100-python.tar.gz").read_bytes() == blob
    assert not list(root.glob("*.partial"))
    again = call(0, "join")
    assert again.returncode == 0 and "there already" in again.stdout

    cold = tmp_path / "cold"  # a fresh machine, and a call that carried nothing
    cold.mkdir()
    proc = cifar_parts("join", "--store", str(tmp_path / "cold_store"), cwd=cold)
    assert proc.returncode == 1 and "none of the parts has arrived" in proc.stderr


def test_cifar_parts_refuses_a_file_that_does_not_match_its_sha256sums(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not the archive")
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  cifar-100-python.tar.gz\n")
    proc = cifar_parts("split", "--archive", str(tmp_path / "cifar-100-python.tar.gz"), "--dir",
                       str(tmp_path / "parts"), cwd=tmp_path)
    assert proc.returncode == 1 and "does not match" in proc.stderr and not (tmp_path / "parts").exists()
