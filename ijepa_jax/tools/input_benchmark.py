"""Throughput of the host input pipeline per worker count, and of the mask sampler alone.

    python -m ijepa_jax.tools.input_benchmark --config configs/in1k_vith14.py \
        --config.data.root=/data/imagenet --config.data.batch_size=128 --workers=0,1,2

Runs the real pretraining pipeline (read, decode, crop, masks, batch) on
this host, without devices, and prints one JSON line per measurement.

ImageNet-sized JPEGs from a small folder (what the README's rows used):

    python -m ijepa_jax.tools.input_benchmark --make_folder_from /tmp/tiny-imagenet-100cls \
        --make_folder_to /tmp/imagenet_sized --config configs/in1k_vith14.py
    python -m ijepa_jax.tools.input_benchmark --config configs/in1k_vith14.py \
        --config.data.root=/tmp/imagenet_sized --config.data.batch_size=128 --workers=0,1,2
"""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from ijepa_jax import bad_input, config_lib, masks
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


def make_imagenet_sized_folder(src: str, dst: str, per_class: int = 20, size=(500, 375), quality: int = 90) -> int:
    """Copies `per_class` images of each class of an ImageNet-layout folder (train/<class>/*) into
    dst/train/<class>/, upscaled to `size` (ImageNet's typical 500x375) as JPEG `quality`: files as
    large as ImageNet's (about 110 KB). Returns the number of images written."""
    from PIL import Image

    written = 0
    train = os.path.join(src, "train")
    for name in sorted(os.listdir(train)):
        out = os.path.join(dst, "train", name)
        os.makedirs(out, exist_ok=True)
        files = sorted(f for f in os.listdir(os.path.join(train, name)) if not f.startswith("."))[:per_class]
        for f in files:
            with Image.open(os.path.join(train, name, f)) as im:
                im.convert("RGB").resize(size, Image.BICUBIC).save(
                    os.path.join(out, os.path.splitext(f)[0] + ".JPEG"), quality=quality
                )
            written += 1
    return written


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True,
                                    flag_values=fv)
    flags.DEFINE_string("workers", "0,1,2", "Comma-separated grain worker counts to measure.", flag_values=fv)
    flags.DEFINE_integer("batches", 20, "Batches timed per worker count.", flag_values=fv)
    flags.DEFINE_integer("mask_batches", 200, "Batches timed for the mask sampler.", flag_values=fv)
    flags.DEFINE_string("make_folder_from", "", "Instead of measuring: an ImageNet-layout folder to upscale from.",
                        flag_values=fv)
    flags.DEFINE_string("make_folder_to", "/tmp/imagenet_sized", "Where --make_folder_from writes.", flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad flag, config or dataset is one line."""
    del argv
    if FLAGS.make_folder_from:
        if not os.path.isdir(os.path.join(FLAGS.make_folder_from, "train")):
            raise FileNotFoundError(
                f"--make_folder_from={FLAGS.make_folder_from}: no train/ folder there (give an ImageNet-layout "
                "folder, ROOT/train/<class>/<image>)."
            )
        bad_input.path_to_write(FLAGS.make_folder_to, "--make_folder_to")
        n = make_imagenet_sized_folder(FLAGS.make_folder_from, FLAGS.make_folder_to)
        print(json.dumps({"made_folder": FLAGS.make_folder_to, "images": n}), flush=True)
        return
    workers = [w for w in FLAGS.workers.split(",") if w]
    if not workers or not all(w.isdigit() for w in workers):
        raise ValueError(f"--workers={FLAGS.workers!r}: give worker counts >= 0, e.g. '0,1,2'.")
    if FLAGS.batches < 1 or FLAGS.mask_batches < 1:
        raise ValueError(f"--batches={FLAGS.batches} and --mask_batches={FLAGS.mask_batches} must be >= 1.")
    config = FLAGS.config
    config_lib.validate_on_host(config)
    spec = masks.resolve_spec(config)
    source = sources.make_pretrain_source(config.data, config.seed)
    common = {"source": config.data.source, "images": len(source), "crop_size": config.data.crop_size}
    rate = sampler_rate(spec, config.data.batch_size, FLAGS.mask_batches)
    print(json.dumps({**common, "what": "mask_sampler", "grid": spec.grid_h, "img_per_s": round(rate)}), flush=True)
    for w in (int(x) for x in workers):
        rate = pipeline_rate(config, source, spec, w, FLAGS.batches)
        print(
            json.dumps({**common, "what": "pipeline", "num_workers": w, "num_threads": config.data.num_threads,
                        "batch_size": config.data.batch_size, "img_per_s": round(rate, 1)}),
            flush=True,
        )


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
