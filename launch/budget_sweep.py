"""A sweep (ijepa_jax.tools.sweep) that starts no point it cannot finish before a deadline.

    python launch/budget_sweep.py --config configs/cifar100.py:vit_tiny,reference --workdir /tmp/sweep \
        --sweep configs/sweeps/cifar100_gpu_recipe.py --budget_s 480 [--out DIR] [--only A,B] [--check_only]

The points run in the sweep file's order (or --only's) through the sweep runner's own functions
(validation up front, resuming, baseline, summary), one point at a time: before each unfinished one,
the time left is compared with the longest point measured so far in this process (--first_point_s
before the first, which also pays for the random-init baseline); when it does not fit, the sweep
stops there and a re-run of the same command continues from it. SIGTERM stops it too: a point in training saves a
checkpoint first (train's preemption path); elsewhere the process stops at once. Either way --out gets
what is finished: summary.md, summary.jsonl, summary.png and points.tar.gz (each point's and baseline's
small files: config, metrics, sweep row, evaluation results; no checkpoints or feature caches).

Exit status: 0 every point finished; 3 stopped by the budget or SIGTERM (run again to continue);
1 a bad sweep, config or data (one line).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import tarfile
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for ijepa_jax
from ijepa_jax import evaluate, metrics  # noqa: E402
from ijepa_jax.tools import sweep  # noqa: E402

FLAGS = flags.FLAGS
SUMMARY_FILES = ("summary.md", "summary.jsonl", "summary.png")
POINT_FILES = ("config.json", "metrics.jsonl", sweep.ROW_FILE, "results.json")  # besides eval/results.json
STOPPED = 3


class Stopped(Exception):
    """SIGTERM outside training (training's own handler saves and returns instead)."""


def _on_sigterm(signum, frame):
    raise Stopped("SIGTERM")


def log(event: str, **fields) -> None:
    print(json.dumps({"gpu_sweep": event, **fields}), flush=True)


def _format(overrides: dict) -> str:  # as the sweep runner's header writes them
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in overrides.items())


def finished(workdir: str, name: str, point: sweep.Point, protocols) -> bool:
    """Whether the sweep runner would skip this point (trained and evaluated with the same evaluation)."""
    path = os.path.join(workdir, name, sweep.ROW_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        row = json.load(f)
    return row.get("baseline") == sweep.baseline_key(point.config, protocols)


def points_archive(workdir: str) -> bytes:
    """A .tar.gz of every point's and baseline's small files, paths relative to `workdir`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for root, dirs, names in os.walk(workdir):
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard", "feature_cache", "logs"))
            for name in sorted(names):
                if name in POINT_FILES and root != workdir:
                    path = os.path.join(root, name)
                    tar.add(path, arcname=os.path.relpath(path, workdir))
    return buffer.getvalue()


def export(workdir: str, out: str) -> list[str]:
    """Copies the summary files and points.tar.gz into `out`; returns what it wrote."""
    if not out or not os.path.isdir(workdir):
        return []
    os.makedirs(out, exist_ok=True)
    written = []
    for name in SUMMARY_FILES:
        if os.path.exists(os.path.join(workdir, name)):
            shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
            written.append(name)
    data = points_archive(workdir)
    with open(os.path.join(out, "points.tar.gz.tmp"), "wb") as f:
        f.write(data)
    os.replace(os.path.join(out, "points.tar.gz.tmp"), os.path.join(out, "points.tar.gz"))
    return [*written, "points.tar.gz"]


def run(planned: dict, workdir: str, protocols, header: str, deadline: float, first_point_s: float,
        out: str) -> int:
    """Runs the points of `planned` in order until one does not fit before `deadline`; 0 or STOPPED."""
    names = list(planned)
    walls = []  # this process's finished points
    for i, name in enumerate(names, 1):
        if finished(workdir, name, planned[name], protocols):
            continue
        estimate = max(walls) * 1.1 + 10 if walls else first_point_s
        left = deadline - time.time()
        if left < estimate:
            todo = [n for n in names[i - 1:] if not finished(workdir, n, planned[n], protocols)]
            log("stop", reason="budget", before=name, left_s=round(left), estimate_s=round(estimate), todo=todo)
            return STOPPED
        log("start", point=name, index=i, of=len(names), left_s=round(left), estimate_s=round(estimate))
        start = time.time()
        sweep.run_sweep(dict(list(planned.items())[:i]), workdir, protocols, header)
        export(workdir, out)
        if not finished(workdir, name, planned[name], protocols):  # training stopped early (SIGTERM)
            log("stop", reason="stopped in training", point=name, wall_s=round(time.time() - start))
            return STOPPED
        with open(os.path.join(workdir, name, sweep.ROW_FILE)) as f:
            walls.append(json.load(f)["wall_s"])
        log("done", point=name, wall_s=round(time.time() - start), point_wall_s=round(walls[-1]))
    sweep.run_sweep(planned, workdir, protocols, header)  # every row, also when all were finished before
    return 0


def main(argv) -> None:
    del argv
    start = time.time()
    deadline = FLAGS.deadline if FLAGS.deadline > 0 else start + FLAGS.budget_s
    signal.signal(signal.SIGTERM, _on_sigterm)
    status = 1
    try:
        shared, points = sweep.load_sweep(FLAGS.sweep)
        points = sweep.select_points(points, FLAGS.only)
        protocols = tuple(p for p in FLAGS.protocols.split(",") if p)
        if not protocols or set(protocols) - set(evaluate.PROTOCOLS):
            raise ValueError(f"--protocols={FLAGS.protocols!r}: choose from {evaluate.PROTOCOLS}.")
        planned = sweep.point_configs(FLAGS.config, shared, points)
        todo = [n for n, p in planned.items() if not finished(FLAGS.workdir, n, p, protocols)]
        log("plan", points=list(planned), todo=todo, protocols=list(protocols), left_s=round(deadline - time.time()),
            precheck_s=round(time.time() - start))
        if FLAGS.check_only:
            print(f"every point of {FLAGS.sweep} validates ({len(planned)} points).")
            sys.exit(0)
        metrics.route_library_logs(FLAGS.workdir, show_info=FLAGS["verbosity"].present)
        cli = _format(config_flags.get_override_values(FLAGS["config"]))
        header = (f"config `{config_flags.get_config_filename(FLAGS['config'])}`{' with ' + cli if cli else ''}, "
                  f"sweep `{FLAGS.sweep}`; shared overrides: {_format(shared) or 'none'}.")
        status = run(planned, FLAGS.workdir, protocols, header, deadline, FLAGS.first_point_s, FLAGS.out)
    except Stopped:
        log("stop", reason="SIGTERM")
        status = STOPPED
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if status != 1 or os.path.isdir(FLAGS.workdir or ""):
            wrote = export(FLAGS.workdir, FLAGS.out)
            if wrote:
                log("exported", out=FLAGS.out, files=wrote)
    log("end", status=status, wall_s=round(time.time() - start))
    sys.exit(status)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Base config file, CONFIG:ARG.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The sweep's folder (as for ijepa_jax.tools.sweep).")
    flags.DEFINE_string("sweep", None, "A sweep file (POINTS, optionally SHARED); see docs/sweeps.md.")
    flags.DEFINE_string("protocols", ",".join(sweep.DEFAULT_PROTOCOLS), "Comma-separated: linear, knn, lowshot.")
    flags.DEFINE_float("budget_s", 480, "Seconds from now by which the last point started must have finished.")
    flags.DEFINE_float("deadline", 0, "Instead of --budget_s: that moment as a Unix time.")
    flags.DEFINE_float("first_point_s", 150, "Assumed seconds of the first point (with the baseline's evaluation).")
    flags.DEFINE_string("out", "", "Folder to copy the summary files and points.tar.gz into after each point.")
    flags.DEFINE_list("only", [], "Comma-separated point names: run only these, in this order.")
    flags.DEFINE_bool("check_only", False, "Validate every point (the sweep's pre-check), print the plan, stop.")
    flags.mark_flags_as_required(["config", "workdir", "sweep"])
    app.run(main)
