"""Write a run's target (EMA) encoder to one file for downstream use.

    python -m ijepa_jax.tools.export_encoder --workdir runs/c100 [--step 1950] --out encoder.msgpack

Format: see `ijepa_jax.checkpoint.export_target_encoder`; load it back with
`ijepa_jax.checkpoint.load_encoder(path)`.
"""

from __future__ import annotations

from absl import app, flags

from ijepa_jax import checkpoint

FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    step = None if FLAGS.step < 0 else FLAGS.step
    print(f"wrote {checkpoint.export_from_workdir(FLAGS.workdir, FLAGS.out, step)}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A pretraining run's --workdir.")
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
    flags.DEFINE_string("out", None, "Output file, e.g. encoder.msgpack.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
