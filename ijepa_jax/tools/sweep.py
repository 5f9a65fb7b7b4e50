"""Train and evaluate a set of recipes (a sweep), compared in one table and one plot.

    python -m ijepa_jax.tools.sweep --config configs/cifar100.py:vit_tiny --workdir runs/sweep \
        --sweep configs/sweeps/smoke.py [--point='lr5e-4:optim.lr=5e-4,optim.ema=(0.98,0.98)'] [--only=NAME,...]

A point is a named set of config overrides (`--config.KEY=VALUE`'s keys and values), trained in
WORKDIR/<name> and evaluated into WORKDIR/<name>/eval; a random-init encoder per architecture is
evaluated once, in WORKDIR/random_init/<key>. All points are validated before anything runs; a re-run
skips finished points and resumes interrupted ones. WORKDIR/summary.md and summary.jsonl: a row per
point and baseline; summary.png: the points' curves. See docs/sweeps.md.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import socket
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path, tuple_parser

from ijepa_jax import bad_input, checkpoint, config_lib, encoder_export, evaluate, files
from ijepa_jax import train as train_lib
from ijepa_jax.eval import features as features_lib
from ijepa_jax.eval import health
from ijepa_jax.metrics import format_duration, route_library_logs
from ijepa_jax.tools import plot_metrics

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
RESERVED = ("random_init", "logs")  # WORKDIR's own folders
ROW_FILE = "sweep_row.json"  # in a point's folder once it is trained and evaluated
DEFAULT_PROTOCOLS = ("knn", "linear")
# How a string value is parsed for a field of each type: as --config.KEY=VALUE is (config_flags).
_PARSERS = {float: flags.FloatParser(), int: flags.IntegerParser(), bool: flags.BooleanParser(),
            tuple: tuple_parser.TupleParser()}
# Besides the architecture and seed, what a random-init baseline's numbers depend on: the evaluation
# data (data.* below; eval.*_samples_per_class choose the subsets) and eval.* except the monitor's.
EVAL_DATA_KEYS = ("source", "root", "tfds_name", "tfds_data_dir", "classes", "on_bad_image", "mean", "std",
                  "synthetic_images", "synthetic_classes")
TRAIN_ONLY_EVAL_KEYS = ("every_epochs", "health_every_steps", "monitor_protocols", "monitor_train_samples_per_class",
                        "monitor_test_samples_per_class")
HEALTH_COLUMNS = (("health/target_rank_pooled_centered", "rank pooled"),
                  ("health/target_rank_tokens_centered", "rank tokens"),
                  ("health/target_std", "target std"), ("health/target_cosine", "cosine"),
                  ("health/online_rank_pooled_centered", "online rank pooled"))


def load_sweep(path: str) -> tuple[dict, dict]:
    """(SHARED, POINTS) of a sweep file: POINTS = {name: {key: value}}; SHARED (optional) = {key: value}
    applied to every point before its own overrides."""
    try:
        module = runpy.run_path(path)
    except Exception as e:  # a Python file can raise anything: one line, no traceback
        raise ValueError(f"sweep file {path}: {type(e).__name__}: {e}") from None
    points, shared = module.get("POINTS"), module.get("SHARED", {})
    if not isinstance(points, dict) or not points or not isinstance(shared, dict):
        raise ValueError(f"sweep file {path}: define POINTS = {{'name': {{'optim.lr': 5e-4}}, ...}} "
                         "and optionally SHARED = {'data.max_samples_per_class': 50}.")
    return shared, points


def parse_point(arg: str) -> tuple[str, dict]:
    """'name:optim.lr=5e-4,optim.ema=(0.98,0.98)' -> ('name', {'optim.lr': '5e-4', 'optim.ema': '(0.98,0.98)'}).
    A comma starts a new override only where `KEY=` follows, so tuples keep theirs."""
    name, _, rest = arg.partition(":")
    pairs = [p.partition("=") for p in re.split(r",(?=\s*[A-Za-z_][\w.]*=)", rest) if p.strip()]
    if any(not eq for _, eq, _ in pairs):
        raise ValueError(f"--point={arg!r}: write NAME:KEY=VALUE,KEY=VALUE (e.g. ema98:optim.ema=(0.98,0.98)).")
    return name.strip(), {k.strip(): v.strip() for k, _, v in pairs}


def select_points(points: dict, names: list) -> dict:
    """The points `names` (--only's list), in that order; all of them, in the file's order, if it is empty."""
    unknown = [n for n in names if n not in points]
    if unknown:
        raise ValueError(f"--only: no point {', '.join(map(repr, unknown))}; choose from {', '.join(points)}.")
    return {n: points[n] for n in names} if names else points


def apply_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with each {dotted key: value} set. Unknown keys, sections and values of the
    wrong type are errors naming the key; a string for a non-string field is parsed as the command line
    would parse it ('5e-4', '(0.98,0.98)', 'true')."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        try:
            kind = config_path.get_type(key, config)
        except (KeyError, AttributeError):
            raise ValueError(f"{key}: no such config key") from None
        if issubclass(kind, ml_collections.ConfigDict):
            raise ValueError(f"{key}: is a section; override its keys ({key}.<name>) one by one")
        try:
            if isinstance(value, str) and kind in _PARSERS:
                value = _PARSERS[kind].parse(value)
            config_path.set_value(key, config, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}={value!r}: {e}") from None
    return config


class Point(NamedTuple):
    overrides: dict  # the point's own, as JSON reads them back (tuples as lists)
    shared: dict  # the sweep-wide ones, applied first
    config: ml_collections.ConfigDict


def point_configs(base, shared: dict, points: dict) -> dict:
    """{name: Point}: every point's config validated, then built as train builds it (its
    data and schedule); raises a ValueError naming the point (or SHARED) and the key before anything runs."""
    planned, what = {}, "SHARED"
    try:
        base = apply_overrides(base, shared)
        for name, own in points.items():
            what = f"point {name!r}"
            if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED:
                raise ValueError(f"name it with letters, digits and _.+- (it names WORKDIR/<name>), not {RESERVED}")
            if not isinstance(own, dict):
                raise ValueError("give its overrides as a dict, e.g. {'optim.lr': 5e-4}")
            config = apply_overrides(base, own)
            config_lib.validate(config, jax.device_count(), jax.process_count())
            planned[name] = Point(_jsonable(own), _jsonable(shared), config)
        for name, point in planned.items():  # then what only building the run finds: data, schedule length
            what = f"point {name!r}"
            train_lib.build(point.config)
    except (ValueError, TypeError, FileNotFoundError) as e:  # TypeError: e.g. None where validate compares
        raise ValueError(f"{what}: {e}") from None
    return planned


def _jsonable(value):
    return json.loads(json.dumps(value))


def _read_json(path: str):
    p = files.path(path)
    return json.loads(p.read_text()) if p.exists() else None


def baseline_key(config, protocols) -> str:
    """Names a random-init baseline by what its numbers depend on (see EVAL_DATA_KEYS)."""
    m, d = config.model, config.data
    return features_lib.cache_key(
        model=m.name, patch=m.patch_size, crop=d.crop_size, seed=config.seed, protocols=sorted(protocols),
        data={k: d[k] for k in EVAL_DATA_KEYS},
        eval={k: v for k, v in config.eval.to_dict().items() if k not in TRAIN_ONLY_EVAL_KEYS},
    )


def machine() -> dict:
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
            "host": socket.gethostname()}


def _model(config) -> str:
    return f"{config.model.name}/{config.model.patch_size} @{config.data.crop_size}px"


def _baseline_dir(workdir: str, key: str) -> str:
    return os.path.join(workdir, "random_init", key)


def random_init_row(config, workdir: str, protocols) -> dict:
    """The row of a random-init encoder of `config`'s architecture: evaluated once, cached in
    WORKDIR/random_init/<key>/."""
    key = baseline_key(config, protocols)
    out = _baseline_dir(workdir, key)
    row = _read_json(os.path.join(out, ROW_FILE))
    if row is None:
        print(f"== random init of {_model(config)} (baseline {key})", flush=True)
        start, m = time.time(), config.model
        like = evaluate.EncoderUnderTest("random", encoder_export.unrolled_encoder(m.name, m.patch_size), None,
                                         m.patch_size, config.data.crop_size)
        enc = evaluate.random_init(like, config.seed)
        results = evaluate.evaluate(config, enc, out, protocols)
        evaluate.write_results(out, {enc.tag: results})
        row = {"point": "random_init", "kind": "random_init", "model": _model(config), "baseline": key,
               "protocols": list(protocols), "top1": evaluate.summary_rows(results),
               "wall_s": time.time() - start, "machine": machine()}
        files.write_text(os.path.join(out, ROW_FILE), json.dumps(row, indent=2))
    return row


def train_and_evaluate(config, point_dir: str, protocols) -> dict | None:
    """Trains (or resumes) one point, then measures its end-of-run health and evaluates it; the point's
    results, or None when training stopped early (a preemption signal; its checkpoint is saved)."""
    train_lib.train(config, point_dir)
    exp = train_lib.build(config)
    manager = checkpoint.make_manager(point_dir, exp.config.checkpoint, exp.steps_per_epoch)  # as train's
    try:
        step = manager.latest_step()
        if step < exp.total_steps:
            return None
        state, _ = checkpoint.restore(manager, step, exp.abstract_state, exp.config, point_dir)
    finally:
        manager.close()
    values = health.health_metrics(state.params, state.target_params, train_lib.first_batch(exp), exp.models)
    enc = evaluate.from_workdir(point_dir, step)
    out = os.path.join(point_dir, "eval")
    results = evaluate.evaluate(config, enc, out, protocols)
    evaluate.write_results(out, {enc.tag: results})
    records = plot_metrics.read_records(point_dir)
    speeds = [r["img_per_s"] for r in records if "img_per_s" in r]
    return {"step": step, "final_loss": [r["loss"] for r in records if "loss" in r][-1], "health": values,
            "top1": evaluate.summary_rows(results), "img_per_s": float(np.median(speeds)) if speeds else None}


def _finished(name: str, point_dir: str, point: Point, key: str) -> dict | None:
    """A point's row if it was trained and evaluated as now (the same evaluation: baseline `key`); an
    error if it was trained with other overrides."""
    row = _read_json(os.path.join(point_dir, ROW_FILE))
    if row is not None and (row["overrides"], row["shared"]) != (point.overrides, point.shared):
        raise ValueError(f"point {name!r}: {point_dir} was run with overrides {row['overrides']} and SHARED "
                         f"{row['shared']}; rename the point or use another --workdir.")
    return row if row is not None and row["baseline"] == key else None


def _format_overrides(overrides: dict) -> str:
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in overrides.items())


def summary_table(rows: list[dict]) -> str:
    """The markdown table of summary.md: top-1 in % with (in brackets) the difference from random init."""
    keys = list(dict.fromkeys(k for r in rows for k in r["top1"]))
    head = ["point", "model", "overrides", "steps", "final loss", *keys, *(t for _, t in HEALTH_COLUMNS),
            "wall", "img/s", "machine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = r.get("delta", {})
        top1 = [f"{100 * r['top1'][k]:.2f}" + (f" ({100 * delta[k]:+.2f})" if k in delta else "")
                if k in r["top1"] else "" for k in keys]
        diag = [f"{r['health'][k]:.4g}" if k in r.get("health", {}) else "" for k, _ in HEALTH_COLUMNS]
        m = r["machine"]
        loss = "diverged" if "error" in r else f"{r['final_loss']:.4f}" if "final_loss" in r else ""
        cells = [r["point"], r["model"], _format_overrides(r.get("overrides", {})), str(r.get("step", "")), loss,
                 *top1, *diag, format_duration(r["wall_s"]), f"{r['img_per_s']:.1f}" if r.get("img_per_s") else "",
                 f"{m['devices']}x {m['device_kind']} ({m['platform']}) on {m['host']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(workdir: str, rows: list[dict], header: str = "") -> None:
    """summary.jsonl, summary.md and (once a point has metrics) summary.png in `workdir`."""
    files.write_text(os.path.join(workdir, "summary.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    text = (f"# Sweep {workdir}\n\n{header}\nTop-1 in %, in brackets the difference from the random-init encoder "
            f"of the same architecture; health on a fixed batch at the last step.\n\n{summary_table(rows)}\n")
    files.write_text(os.path.join(workdir, "summary.md"), text)
    dirs = [os.path.join(workdir, r["point"]) for r in rows if r["kind"] == "point"]
    runs = {os.path.basename(d): plot_metrics.read_records(d) for d in dirs if os.path.exists(f"{d}/metrics.jsonl")}
    if runs:
        # Points at different batch sizes line up by the images seen (epochs), not by steps.
        per_epoch = {plot_metrics.steps_per_epoch(recs) for recs in runs.values() if any(r.get("epoch") for r in recs)}
        x_axis = "epoch" if len(per_epoch) > 1 else "step"
        plot_metrics.plot_comparison(runs, os.path.join(workdir, "summary.png"), x_axis)


def _earlier_rows(workdir: str, planned: dict) -> list[dict]:
    """The rows of points finished in `workdir` by earlier runs that `planned` leaves out (a run with
    --only), by name, so that the summary keeps every point of the workdir."""
    root = files.path(workdir)
    names = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.exists() else []
    rows = [_read_json(os.path.join(workdir, n, ROW_FILE)) for n in names if n not in planned and n != "random_init"]
    return [r for r in rows if r is not None]


def _with_delta(row: dict, baselines: dict) -> dict:
    base = baselines.get(row["baseline"], {"top1": {}})["top1"]
    return {**row, "delta": {k: v - base[k] for k, v in row["top1"].items() if k in base}}


def run_sweep(planned: dict, workdir: str, protocols=DEFAULT_PROTOCOLS, header: str = "") -> list[dict]:
    """Trains and evaluates every point of `planned` (point_configs') not finished in `workdir`; writes
    and returns the summary rows: random inits first, then the points other runs finished in `workdir`,
    then `planned`'s. A point whose loss became non-finite gets a row with its "error"; the sweep stops
    after a point whose training was preempted."""
    keys = {name: baseline_key(p.config, protocols) for name, p in planned.items()}
    done = {name: _finished(name, os.path.join(workdir, name), p, keys[name]) for name, p in planned.items()}
    earlier = _earlier_rows(workdir, planned)
    cached = {key: _read_json(os.path.join(_baseline_dir(workdir, key), ROW_FILE))
              for key in dict.fromkeys(r["baseline"] for r in earlier)}
    baselines = {key: row for key, row in cached.items() if row is not None}
    points = [_with_delta(r, baselines) for r in earlier]
    for i, (name, (overrides, shared, config)) in enumerate(planned.items(), 1):
        point_dir = os.path.join(workdir, name)
        row = done[name]
        if row is None:
            walls = [r["wall_s"] for r in done.values() if r is not None]
            todo = sum(r is None for r in done.values())
            eta = format_duration(np.mean(walls) * todo) if walls else "? (after the first point)"
            print(f"== point {i}/{len(planned)} {name}: {_format_overrides(overrides) or 'no overrides'}; "
                  f"{todo} to run, sweep ETA {eta}", flush=True)
            start = time.time()
            try:
                result = train_and_evaluate(config, point_dir, protocols)
            except FloatingPointError as e:  # a diverged point is a result too: recorded, and the sweep goes on
                print(f"point {name} diverged: {e}", flush=True)
                result = {"error": str(e), "top1": {}}
            if result is None:
                print(f"point {name} stopped before its last step; run the same command again to resume.")
                break
            row = {"point": name, "kind": "point", "model": _model(config), "overrides": overrides,
                   "shared": shared, "baseline": keys[name], "protocols": list(protocols), **result,
                   "wall_s": time.time() - start, "machine": machine()}
            files.write_text(os.path.join(point_dir, ROW_FILE), json.dumps(row, indent=2))
            done[name] = row
            print(f"point {name} done in {format_duration(row['wall_s'])}", flush=True)
        else:
            print(f"== point {i}/{len(planned)} {name}: finished already, skipped", flush=True)
        if keys[name] not in baselines and "error" not in row:
            baselines[keys[name]] = random_init_row(config, workdir, protocols)
        points.append(_with_delta(row, baselines))
        write_summary(workdir, [*baselines.values(), *points], header)
    if len(points) > len(earlier):
        print(f"wrote {os.path.join(workdir, 'summary.md')}")
    return [*baselines.values(), *points]


FLAGS = flags.FLAGS


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    config_flags.DEFINE_config_file("config", None, "Base config file, CONFIG:ARG.", lock_config=True, flag_values=fv)
    flags.DEFINE_string("workdir", None, "The sweep's folder: a subfolder per point, the summary.", flag_values=fv)
    flags.DEFINE_string("sweep", "", "A sweep file (POINTS, optionally SHARED); see docs/sweeps.md.", flag_values=fv)
    flags.DEFINE_multi_string("point", [], "A point NAME:KEY=VALUE,KEY=VALUE; repeat for more.", flag_values=fv)
    flags.DEFINE_list("only", [], "Comma-separated point names: run only these, in this order.", flag_values=fv)
    flags.DEFINE_string("protocols", ",".join(DEFAULT_PROTOCOLS), "Comma-separated: linear, knn, lowshot.",
                        flag_values=fv)
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of configuration and data errors.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad sweep file, point, key or value is one line."""
    del argv
    shared, points = load_sweep(FLAGS.sweep) if FLAGS.sweep else ({}, {})
    for arg in FLAGS.point:
        name, overrides = parse_point(arg)
        if name in points:
            raise ValueError(f"point {name!r} is given twice.")
        points[name] = overrides
    points = select_points(points, FLAGS.only)
    if not points:
        raise ValueError("No points: give --sweep FILE and/or --point=NAME:KEY=VALUE,...")
    protocols = tuple(p for p in FLAGS.protocols.split(",") if p)
    if not protocols or set(protocols) - set(evaluate.PROTOCOLS):
        raise ValueError(f"--protocols={FLAGS.protocols!r}: choose from {evaluate.PROTOCOLS}.")
    bad_input.path_to_write(FLAGS.workdir, "--workdir")
    planned = point_configs(FLAGS.config, shared, points)
    route_library_logs(FLAGS.workdir, show_info=bad_input.verbosity_given())
    cli = _format_overrides(config_flags.get_override_values(FLAGS["config"]))
    header = (f"config `{config_flags.get_config_filename(FLAGS['config'])}`{' with ' + cli if cli else ''}, "
              f"sweep `{FLAGS.sweep or '--point'}`; shared overrides: {_format_overrides(shared) or 'none'}.")
    run_sweep(planned, FLAGS.workdir, protocols, header)


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
