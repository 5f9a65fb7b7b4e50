"""Plot a run's metrics.jsonl to one PNG: loss, schedules, throughput and evaluation curves.

    python -m ijepa_jax.tools.plot_metrics --workdir runs/c100 [--out runs/c100/metrics.png]
"""

from __future__ import annotations

import json
import os

from absl import app, flags

FLAGS = flags.FLAGS
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("wd", "weight decay"), ("momentum", "EMA momentum"),
          ("img_per_s", "images / s"), ("context_tokens", "context tokens / image"))


def read_records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No metrics.jsonl in {workdir}: is it a pretraining --workdir?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(records: list[dict], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    panels = [p for p in PANELS if any(p[0] in r for r in records)] + ([("eval", "evaluation top-1")] if eval_keys else [])
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for k in eval_keys if key == "eval" else [key]:
            ax.plot(*series(records, k), marker="." if key == "eval" else None, label=k.removeprefix("eval/"))
        if key == "loss":
            ax.set_yscale("log")
        if key == "eval":
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv) -> None:
    del argv
    out = FLAGS.out or os.path.join(FLAGS.workdir, "metrics.png")
    print(f"wrote {plot(read_records(FLAGS.workdir), out)}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A pretraining run's --workdir.")
    flags.DEFINE_string("out", "", "Output PNG (default WORKDIR/metrics.png).")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
