"""Throughput of the host input pipeline per worker count, and of the mask sampler alone.

    python -m ijepa_jax.tools.input_benchmark --config configs/in1k_vith14.py \
        --config.data.root=/data/imagenet --config.data.batch_size=128 --workers=0,1,2

Runs the real pretraining pipeline (read, decode, crop, masks, batch) on
this host, without devices, and prints one JSON line per measurement.
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ijepa_jax import masks
from ijepa_jax.data import pipeline, sources

FLAGS = flags.FLAGS


def pipeline_rate(config, source, spec, num_workers: int, num_batches: int) -> float:
    """Images/s of the pipeline with `num_workers` processes (0: in the main process)."""
    data = config.data.copy_and_resolve_references()
    data.num_workers = num_workers
    it = iter(pipeline.pretrain_dataset(source, data, spec, config.seed))
    next(it)  # start-up (worker processes, first reads) is not throughput
    t = time.perf_counter()
    for _ in itertools.islice(it, num_batches):
        pass
    return num_batches * data.batch_size / (time.perf_counter() - t)


def sampler_rate(spec: masks.MaskSpec, batch_size: int, num_batches: int) -> float:
    """Images/s whose masks one core samples."""
    sampler = masks.MaskSampler(spec)
    rng = np.random.default_rng(0)
    sampler.sample(rng, batch_size)
    t = time.perf_counter()
    for _ in range(num_batches):
        sampler.sample(rng, batch_size)
    return num_batches * batch_size / (time.perf_counter() - t)


def main(argv) -> None:
    del argv
    config = FLAGS.config
    spec = masks.resolve_spec(config)
    source = sources.make_source(config.data, seed=config.seed)
    common = {"source": config.data.source, "images": len(source), "crop_size": config.data.crop_size}
    rate = sampler_rate(spec, config.data.batch_size, FLAGS.mask_batches)
    print(json.dumps({**common, "what": "mask_sampler", "grid": spec.grid_h, "img_per_s": round(rate)}), flush=True)
    for w in (int(x) for x in FLAGS.workers.split(",")):
        rate = pipeline_rate(config, source, spec, w, FLAGS.batches)
        print(
            json.dumps({**common, "what": "pipeline", "num_workers": w, "num_threads": config.data.num_threads,
                        "batch_size": config.data.batch_size, "img_per_s": round(rate, 1)}),
            flush=True,
        )


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True)
    flags.DEFINE_string("workers", "0,1,2", "Comma-separated grain worker counts to measure.")
    flags.DEFINE_integer("batches", 20, "Batches timed per worker count.")
    flags.DEFINE_integer("mask_batches", 200, "Batches timed for the mask sampler.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
