"""Measure compile time, train-step throughput and host-pipeline throughput.

    python -m ijepa_jax.tools.benchmark --config configs/cifar100.py:vit_tiny \
        --config.data.source=synthetic --steps 20

The step is timed on one batch reused (so the number is the device's, not the
input pipeline's); the pipeline is timed separately. Prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from ijepa_jax import train

FLAGS = flags.FLAGS


def benchmark(config, steps: int, pipeline_batches: int) -> dict:
    t = time.perf_counter()
    exp = train.build(config)
    build_s = time.perf_counter() - t
    batches = train.train_batches(exp)
    batch = next(batches)

    t = time.perf_counter()
    compiled = exp.train_step.lower(exp.state, batch).compile()
    compile_s = time.perf_counter() - t

    state = exp.state
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / steps

    pipeline_img_s = None
    if pipeline_batches:
        t = time.perf_counter()
        for b in itertools.islice(batches, pipeline_batches):
            jax.block_until_ready(b)
        pipeline_img_s = pipeline_batches * config.data.batch_size / (time.perf_counter() - t)

    c = exp.config
    return {
        "model": f"{c.model.name}/{c.model.patch_size}",
        "crop_size": c.data.crop_size,
        "global_batch": c.data.batch_size,
        "pred": f"{c.model.pred_depth}x{c.model.pred_width}",
        "dtype": c.model.dtype,
        "context_tokens": exp.spec.context_tokens,
        "target_tokens": exp.spec.target_tokens,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "build_s": round(build_s, 2),
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "img_per_s": round(c.data.batch_size / step_s, 1),
        "pipeline_img_per_s": None if pipeline_img_s is None else round(pipeline_img_s, 1),
        "final_loss": float(metrics["loss"]),
    }


def main(argv) -> None:
    del argv
    print(json.dumps(benchmark(FLAGS.config, FLAGS.steps, FLAGS.pipeline_batches)), flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True)
    flags.DEFINE_integer("steps", 20, "Timed train steps (after 2 warm-up steps).")
    flags.DEFINE_integer("pipeline_batches", 20, "Batches to time the host pipeline on (0: skip).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
