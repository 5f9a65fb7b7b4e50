"""Write a run's target (EMA) encoder to one file for downstream use.

    python -m ijepa_jax.tools.export_encoder --workdir runs/c100 [--step 1950] --out encoder.msgpack

Format: see `ijepa_jax.checkpoint.export_target_encoder`; load it back with
`ijepa_jax.checkpoint.load_encoder(path)`. For a Hugging Face IJepaModel
folder, see `ijepa_jax.hf_export`. A bad input is one line and exit status 1.
"""

from __future__ import annotations

from absl import app, flags

from ijepa_jax import bad_input, checkpoint

FLAGS = flags.FLAGS


def export(workdir: str, out: str, step: int | None = None) -> str:
    """checkpoint.export_from_workdir, a damaged checkpoint named as such (bad_input.restore_target_encoder)."""
    params, config, _ = bad_input.restore_target_encoder(workdir, step)
    return checkpoint.export_target_encoder(params, config, out)


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        bad_input.quiet_library_logs()
    step = None if FLAGS.step < 0 else FLAGS.step
    print(f"wrote {bad_input.run_or_exit(export, FLAGS.workdir, FLAGS.out, step, traceback=FLAGS.traceback)}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A pretraining run's --workdir.")
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
    flags.DEFINE_string("out", None, "Output file, e.g. encoder.msgpack.")
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of a bad input.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
