"""Plot a run's metrics.jsonl to one PNG: loss, schedules, throughput, health diagnostics and evaluation curves.

    python -m ijepa_jax.tools.plot_metrics --workdir runs/c100 [--out runs/c100/metrics.png]

With several --workdir flags, one PNG compares the runs: a line per run (named by its folder) in
each panel of COMPARE_KEYS that any run logged.

    python -m ijepa_jax.tools.plot_metrics --workdir runs/a --workdir runs/b --out compare.png

`--x=epoch` draws against epochs instead of steps: runs at different batch sizes then line up by the
images they have seen.
"""

from __future__ import annotations

import json
import os

from absl import flags

from ijepa_jax import bad_input

FLAGS = flags.FLAGS
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("wd", "weight decay"), ("momentum", "EMA momentum"),
          ("img_per_s", "images / s"), ("context_tokens", "context tokens / image"))
# Representation-health diagnostics (ijepa_jax/eval/health.py), drawn when present: (title, keys, log y).
# Ranks and stds on a log scale: collapse shows as a drop of orders of magnitude.
HEALTH_PANELS = (
    ("effective rank (target encoder)", ("health/target_rank_pooled", "health/target_rank_pooled_centered",
                                         "health/target_rank_tokens", "health/target_rank_tokens_centered"), True),
    ("effective rank (online encoder)", ("health/online_rank_pooled_centered",
                                         "health/online_rank_tokens_centered"), True),
    ("feature std", ("health/target_std", "health/pred_std", "health/pooled_std", "health/online_pooled_std"), True),
    ("cosine between images (pooled)", ("health/target_cosine", "health/online_cosine"), False),
)

# The quantities a recipe comparison is read from, when logged: (key, title, log y).
COMPARE_KEYS = (
    ("loss", "loss", True), ("prediction_loss", "I-JEPA's part of the loss (runs with a penalty)", True),
    ("eval/knn_k20", "k-NN monitor top-1 (k=20)", False),
    ("eval/linear_last4_bn", "linear monitor top-1", False),
    ("health/target_rank_pooled_centered", "effective rank, pooled target features (centred)", True),
    ("health/target_rank_tokens_centered", "effective rank, target tokens (centred)", True),
    ("health/online_rank_pooled_centered", "effective rank, pooled online features (centred)", True),
    ("health/target_cosine", "cosine between images (pooled)", False),
    ("lr", "learning rate", False), ("momentum", "EMA momentum", False),
)


def read_records(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl. A last record cut short (the start of a JSON object without
    its newline: a run killed, or still busy, writing it) is left out; any other line that does not parse
    is a JSONDecodeError."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No metrics.jsonl in {workdir}: is it a pretraining --workdir?")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:  # a record cut short by a crash (or a run still writing it): skipped
            if lines[-1].endswith("\n") or not lines[-1].lstrip().startswith("{"):
                raise
    return records


def steps_per_epoch(records: list[dict]) -> int:
    """A run's steps per epoch, from a training record (they log `epoch` = step / steps per epoch)."""
    for r in records:
        if r.get("epoch") and r["step"] > 0:
            return round(r["step"] / r["epoch"])
    raise ValueError("No record has an 'epoch' (a run before the loop logged it, or no step logged yet): "
                     "plot it by step (--x=step).")


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(x values, values) of `key` over the records that have it; x is the step or the epoch."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    if x == "epoch" and pairs:
        per_epoch = steps_per_epoch(records)
        pairs = [(step / per_epoch, value) for step, value in pairs]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _panel_grid(num_panels: int, cols: int = 3):
    """A figure with `num_panels` panels in rows of `cols` (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-num_panels // cols)
    return plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)


def _save(fig, axes, num_panels: int, out: str) -> str:
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[num_panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot(records: list[dict], out: str, x: str = "step") -> str:
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    present = lambda keys: [k for k in keys if any(k in r for r in records)]  # noqa: E731
    panels = [(title, (key,), key == "loss") for key, title in PANELS if present((key,))]
    panels += [(title, tuple(present(keys)), log) for title, keys, log in HEALTH_PANELS if present(keys)]
    panels += [("evaluation top-1", tuple(eval_keys), False)] if eval_keys else []
    fig, axes = _panel_grid(len(panels))
    for ax, (title, keys, log_y) in zip(axes.flat, panels):
        sparse = keys[0].startswith(("eval/", "health/"))  # written every few hundred steps: mark the points
        for k in keys:
            ax.plot(*series(records, k, x), marker="." if sparse else None, label=k.split("/", 1)[-1])
        if log_y:
            ax.set_yscale("log")
        elif sparse:
            ax.ticklabel_format(axis="y", useOffset=False)  # a cosine near 1 reads as 0.9992, not 1e-7 + 0.9992
        if sparse:
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    return _save(fig, axes, len(panels), out)


def plot_comparison(runs: dict[str, list[dict]], out: str, x: str = "step") -> str:
    """One panel per COMPARE_KEYS entry that some run logged, one line per run, against step or epoch."""
    panels = [(k, title, log) for k, title, log in COMPARE_KEYS if any(k in r for recs in runs.values() for r in recs)]
    if not panels:
        raise ValueError(f"None of {[k for k, _, _ in COMPARE_KEYS]} is in the runs' metrics.")
    fig, axes = _panel_grid(len(panels))
    for ax, (key, title, log_y) in zip(axes.flat, panels):
        sparse = key.startswith(("eval/", "health/"))
        for i, (name, records) in enumerate(runs.items()):
            if any(key in r for r in records):  # colour by run, so a run keeps its colour in every panel
                ax.plot(*series(records, key, x), marker="." if sparse else None, label=name, color=f"C{i}")
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, axes, len(panels), out)


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    flags.DEFINE_multi_string("workdir", None, "A pretraining run's --workdir; repeat it to compare runs.",
                              flag_values=fv)
    flags.DEFINE_string("out", "", "Output PNG (default WORKDIR/metrics.png; required when comparing).", flag_values=fv)
    flags.DEFINE_enum("x", "step", ["step", "epoch"], "The x axis: training steps, or epochs (runs at different "
                      "batch sizes compared by the images seen).", flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a missing or unreadable metrics.jsonl, or a bad --out, is one line."""
    del argv
    workdirs = FLAGS.workdir
    if len(workdirs) > 1 and not FLAGS.out:
        raise ValueError("Comparing several --workdir runs needs --out FILE.png.")
    out = FLAGS.out or os.path.join(workdirs[0], "metrics.png")
    bad_input.path_to_write(out, "--out", folder=False)

    def records_of(workdir: str) -> list[dict]:
        path = os.path.join(workdir, "metrics.jsonl")
        try:
            records = read_records(workdir)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON lines ({e}).") from e
        if not records:
            raise ValueError(f"{path} holds no records yet: nothing to plot.")
        return records

    if len(workdirs) == 1:
        print(f"wrote {plot(records_of(workdirs[0]), out, FLAGS.x)}")
        return
    runs = {os.path.basename(os.path.normpath(w)): records_of(w) for w in workdirs}
    print(f"wrote {plot_comparison(runs, out, FLAGS.x)}")


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
