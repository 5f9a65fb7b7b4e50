"""A short jax.profiler trace of this project's compiled train step, then its kernel summary.

    python launch/side_by_side/profile_step.py --config configs/in1k_vith14.py \
        --config.model.attention_impl=cudnn --config.data.source=synthetic \
        --config.data.synthetic_images=256 --config.data.num_workers=0 \
        --batch_per_device=128 --steps=3 --trace_dir /tmp/trace --out kernels.json

Compiles the step as tools.benchmark does (one batch reused), runs 2 warm-up
steps, then --steps steps under jax.profiler.trace (with the Perfetto JSON
trace, which summarise_trace.py reads, with the compiled HLO's name stacks).
Prints the summary as one JSON line; --out also writes it as JSON and Markdown.
"""

import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import summarise_trace  # noqa: E402

from ijepa_jax.tools import benchmark  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.")
flags.DEFINE_integer("batch_per_device", 0, "Per-device batch (0: the config's).")
flags.DEFINE_integer("steps", 3, "Steps traced (after 2 warm-up steps).")
flags.DEFINE_string("trace_dir", "/tmp/ijepa_trace", "Where jax.profiler writes the trace.")
flags.DEFINE_string("out", "", "Also write the summary here (.json; a .md beside it).")
flags.DEFINE_integer("top", 15, "Kernels listed by name.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.batch_per_device:
        config.data.batch_size = FLAGS.batch_per_device * jax.device_count()
    exp, batches, batch, compiled, _ = benchmark.compile_step(config)
    batches.close()
    state = exp.init()
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(FLAGS.trace_dir, create_perfetto_trace=True):
        for _ in range(FLAGS.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    stacks = summarise_trace.name_stacks(compiled.as_text())  # tells the optimizer's ops from the model's
    summary = summarise_trace.summarise(summarise_trace.find_trace(FLAGS.trace_dir), FLAGS.steps, FLAGS.top, stacks)
    summary.update(model=f"{config.model.name}/{config.model.patch_size}", batch=config.data.batch_size,
                   attention=config.model.attention_impl or "xla")
    if FLAGS.out:
        summarise_trace.write(summary, FLAGS.out)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    app.run(main)
