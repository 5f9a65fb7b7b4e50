"""Write a run's target (EMA) encoder to one file for downstream use.

    python -m ijepa_jax.tools.export_encoder --workdir runs/c100 [--step 1950] --out encoder.msgpack

Format: see `ijepa_jax.encoder_export.export_target_encoder`; load it back with
`ijepa_jax.encoder_export.load_encoder(path)`. For a Hugging Face IJepaModel
folder, see `ijepa_jax.hf_export`. A bad input is one line and exit status 1.
"""

from __future__ import annotations

from absl import flags

from ijepa_jax import bad_input, encoder_export

FLAGS = flags.FLAGS


def export(workdir: str, out: str, step: int | None = None) -> str:
    """encoder_export.export_from_workdir, a damaged checkpoint named as such (bad_input.restore_target_encoder)."""
    params, config, _ = bad_input.restore_target_encoder(workdir, step)
    return encoder_export.export_target_encoder(params, config, out)


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    flags.DEFINE_string("workdir", None, "A pretraining run's --workdir.", flag_values=fv)
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output file, e.g. encoder.msgpack.", flag_values=fv)
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of a bad input.", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a missing or damaged checkpoint, or a bad --out, is one line."""
    del argv
    if not bad_input.verbosity_given():
        bad_input.quiet_library_logs()
    step = None if FLAGS.step < 0 else FLAGS.step
    print(f"wrote {export(FLAGS.workdir, FLAGS.out, step)}")


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
