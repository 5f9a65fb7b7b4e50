"""Measure compile time, train-step throughput and host-pipeline throughput
(and, with --checkpoint, the cost of an asynchronous checkpoint save).

    python -m ijepa_jax.tools.benchmark --config configs/cifar100.py:vit_tiny \
        --config.data.source=synthetic --steps 20

The step is timed on one batch reused (so the number is the device's, not the
input pipeline's); the pipeline is timed separately. Prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ijepa_jax import checkpoint, train

FLAGS = flags.FLAGS


def checkpoint_cost(exp, state, data_state, saves: int = 3) -> dict:
    """Seconds the loop is blocked per asynchronous save, seconds until written, and bytes on disk."""
    with tempfile.TemporaryDirectory() as workdir:
        manager = checkpoint.make_manager(workdir, exp.config.checkpoint, exp.steps_per_epoch)
        checkpoint.save(manager, 0, state, data_state, exp.config)  # first save: one-time set-up
        manager.wait_until_finished()
        blocked, total = [], []
        for step in range(1, saves + 1):
            t = time.perf_counter()
            blocked.append(checkpoint.save(manager, step, state, data_state, exp.config))
            manager.wait_until_finished()
            total.append(time.perf_counter() - t)
        step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), str(saves))
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)
        manager.close()
    return {
        "checkpoint_blocked_s": round(float(np.median(blocked)), 3),
        "checkpoint_total_s": round(float(np.median(total)), 3),
        "checkpoint_mb": round(size / 2**20, 1),
    }


def benchmark(config, steps: int, pipeline_batches: int, measure_checkpoint: bool = False) -> dict:
    t = time.perf_counter()
    exp = train.build(config)
    build_s = time.perf_counter() - t
    batches = train.train_batches(exp)
    batch, data_state = next(batches)

    t = time.perf_counter()
    state = exp.init()
    compiled = exp.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t

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
        for b, _ in itertools.islice(batches, pipeline_batches):
            jax.block_until_ready(b)
        pipeline_img_s = pipeline_batches * config.data.batch_size / (time.perf_counter() - t)

    c = exp.config
    extra = checkpoint_cost(exp, state, data_state) if measure_checkpoint else {}
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
        **extra,
    }


def main(argv) -> None:
    del argv
    result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.pipeline_batches, FLAGS.checkpoint)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True)
    flags.DEFINE_integer("steps", 20, "Timed train steps (after 2 warm-up steps).")
    flags.DEFINE_integer("pipeline_batches", 20, "Batches to time the host pipeline on (0: skip).")
    flags.DEFINE_bool("checkpoint", False, "Also time asynchronous checkpoint saves and report their size.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
