"""Measure a compiled train step the way accelerator users compare them: images/s,
median step time, compile time, model FLOPs and MFU, peak memory; plus the host
pipeline's throughput (and, with --checkpoint, the cost of an asynchronous save).

    python -m ijepa_jax.tools.benchmark --config configs/in1k_vith14.py \
        --config.data.source=synthetic --batch_per_device=128,64 --steps 20

The step is timed on one batch reused (so the number is the device's, not the
input pipeline's); the pipeline is timed separately (`--pipeline_batches`).
Model FLOPs come from an analytic count of the three networks (see
`analytic_flops`), cross-checked against XLA's cost analysis of the compiled
step; MFU divides them by the device's dense bf16 peak (`PEAK_BF16_TFLOPS`,
or --peak_tflops). Prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from ijepa_jax import bad_input, checkpoint, train

FLAGS = flags.FLAGS


def checkpoint_cost(exp, state, saves: int = 3) -> dict:
    """Seconds the loop is blocked per asynchronous save, seconds until written, and bytes on disk."""
    with tempfile.TemporaryDirectory() as workdir:
        manager = checkpoint.make_manager(workdir, exp.config.checkpoint, exp.steps_per_epoch)
        checkpoint.save(manager, 0, state, exp.config)  # first save: one-time set-up
        manager.wait_until_finished()
        blocked, total = [], []
        for step in range(1, saves + 1):
            t = time.perf_counter()
            blocked.append(checkpoint.save(manager, step, state, exp.config))
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


# Dense bf16 peak TFLOP/s per chip (vendor datasheets), matched against
# `device_kind` in this order; --peak_tflops overrides.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def _block_flops(n: int, d: int, mlp_hidden: int) -> float:
    """Forward matmul FLOPs of one pre-norm block on n tokens of width d."""
    weights = 2 * n * (4 * d * d + 2 * d * mlp_hidden)  # qkv + proj + fc1 + fc2
    attention = 2 * 2 * n * n * d  # q k^T and (softmax) v
    return weights + attention


def analytic_flops(config, spec) -> dict:
    """Model FLOPs per image of one train step, at the step's (padded) shapes.

    Counts matmuls only (no norms, GELU, softmax, optimizer) and no
    rematerialisation: target encoder forward on all N patches, online encoder
    on the K context slots and predictor on M sequences of K + T slots, the
    last two forward + backward (3x forward).
    """
    from ijepa_jax.models import vit

    embed_dim, depth, _, mlp_ratio = vit.VIT_SIZES[config.model.name]
    p, d_pred, depth_pred = config.model.patch_size, config.model.pred_width, config.model.pred_depth
    n, k, t, m = spec.num_patches, spec.context_len, spec.target_len, spec.num_targets
    patch_embed = 2 * n * (p * p * 3) * embed_dim
    mlp = int(embed_dim * mlp_ratio)
    target = patch_embed + depth * _block_flops(n, embed_dim, mlp)
    online = patch_embed + depth * _block_flops(k, embed_dim, mlp)
    predictor = (
        2 * k * embed_dim * d_pred
        + m * depth_pred * _block_flops(k + t, d_pred, 4 * d_pred)
        + 2 * m * t * d_pred * embed_dim
    )
    return {
        "target_encoder": target,
        "online_encoder": 3 * online,
        "predictor": 3 * predictor,
        "total": target + 3 * (online + predictor),
    }


def xla_flops(config) -> float | None:
    """FLOPs of one global train step by XLA's cost analysis of the lowered step.

    Lowered with the block stacks unrolled: XLA counts a scanned (while-loop)
    body once, not once per layer. Rematerialised forwards are included.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.scan_layers = False
    exp = train.build(c)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in train.batch_shapes(exp.config, exp.spec).items()}
    analysis = exp.train_step.lower(exp.abstract_state, batch).cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    return None if not analysis or "flops" not in analysis else float(analysis["flops"])


def _memory(compiled) -> dict:
    """XLA's static memory analysis of the compiled step, per device, in GiB."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 2.0**30
    return {
        "xla_argument_gib": round(m.argument_size_in_bytes / gib, 4),
        "xla_temp_gib": round(m.temp_size_in_bytes / gib, 4),
        "xla_total_gib": round(
            (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
            / gib,
            4,
        ),
    }


def _fits(memory: dict) -> bool:
    """False when XLA's estimate exceeds the device's memory (GPU/TPU report their limit)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return not (limit and memory.get("xla_total_gib", 0) * 2.0**30 > limit)


def compile_step(config):
    """(experiment, batch iterator, first batch, compiled step, seconds to compile).

    Compiled for the abstract state: a batch that does not fit never allocates one."""
    exp = train.build(config)
    batches = train.train_batches(exp)
    batch = next(batches)
    t = time.perf_counter()
    compiled = exp.train_step.lower(exp.abstract_state, batch).compile()
    return exp, batches, batch, compiled, time.perf_counter() - t


def benchmark(
    config,
    steps: int,
    pipeline_batches: int,
    measure_checkpoint: bool = False,
    batch_per_device: tuple[int, ...] = (),
    peak: float | None = None,
    count_xla_flops: bool = True,
) -> dict:
    """Benchmark `config` (at the first of `batch_per_device` whose step fits in memory, if given)."""
    tried = []
    for per_device in batch_per_device or (None,):
        c = ml_collections.ConfigDict(config.to_dict())
        if per_device:
            c.data.batch_size = per_device * jax.device_count()
        t = time.perf_counter()
        exp, batches, batch, compiled, compile_s = compile_step(c)
        build_s = time.perf_counter() - t - compile_s
        memory = _memory(compiled)
        if _fits(memory):
            break
        tried.append({"batch_per_device": per_device, **memory})
        batches.close()
    else:
        raise ValueError(f"no batch in --batch_per_device={batch_per_device} fits: {tried}")

    state = exp.init()

    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    total_s = time.perf_counter() - t0
    step_s = float(np.median(times))

    pipeline_img_s = None
    if pipeline_batches:
        t = time.perf_counter()
        for b in itertools.islice(batches, pipeline_batches):
            jax.block_until_ready(b)
        pipeline_img_s = pipeline_batches * c.data.batch_size / (time.perf_counter() - t)

    c = exp.config
    n_dev = jax.device_count()
    device_kind = jax.devices()[0].device_kind
    img_per_s = c.data.batch_size / step_s
    flops = analytic_flops(c, exp.spec)
    step_flops = xla_flops(c) if count_xla_flops else None
    xla_per_image = None if step_flops is None else step_flops / c.data.batch_size
    peak = peak or peak_tflops(device_kind)
    stats = jax.local_devices()[0].memory_stats() or {}
    extra = checkpoint_cost(exp, state) if measure_checkpoint else {}
    return {
        "model": f"{c.model.name}/{c.model.patch_size}",
        "crop_size": c.data.crop_size,
        "global_batch": c.data.batch_size,
        "batch_per_device": c.data.batch_size // n_dev,
        "pred": f"{c.model.pred_depth}x{c.model.pred_width}",
        "dtype": c.model.dtype,
        "attention": c.model.attention_impl or "xla",
        "remat": c.model.remat_policy if c.model.remat else "none",
        "scan_layers": c.model.scan_layers,
        "context_tokens": exp.spec.context_tokens,
        "target_tokens": exp.spec.target_tokens,
        "context_len": exp.spec.context_len,
        "target_len": exp.spec.target_len,
        "devices": n_dev,
        "device_kind": device_kind,
        "build_s": round(build_s, 2),
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "img_per_s": round(img_per_s, 1),
        "img_per_s_per_device": round(img_per_s / n_dev, 1),
        "img_per_s_mean": round(steps * c.data.batch_size / total_s, 1),
        "model_gflops_per_image": round(flops["total"] / 1e9, 3),
        "xla_gflops_per_image": None if xla_per_image is None else round(xla_per_image / 1e9, 3),
        "xla_vs_analytic": None if xla_per_image is None else round(xla_per_image / flops["total"], 3),
        "peak_tflops_per_device": peak,
        "mfu": None if not peak else round(flops["total"] * img_per_s / (peak * 1e12 * n_dev), 4),
        "peak_memory_gib": round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
        **memory,
        "batches_too_large": tried,
        "pipeline_img_per_s": None if pipeline_img_s is None else round(pipeline_img_s, 1),
        "final_loss": float(metrics["loss"]),
        **extra,
    }


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True,
                                    flag_values=fv)
    flags.DEFINE_integer("steps", 20, "Timed train steps (after 2 warm-up steps).", flag_values=fv)
    flags.DEFINE_integer("pipeline_batches", 20, "Batches to time the host pipeline on (0: skip).", flag_values=fv)
    flags.DEFINE_bool("checkpoint", False, "Also time asynchronous checkpoint saves and report their size.",
                      flag_values=fv)
    flags.DEFINE_string(
        "batch_per_device", "", "Comma-separated per-device batches, largest first: the first that fits is used.",
        flag_values=fv,
    )
    flags.DEFINE_bool("xla_flops", True, "Cross-check the FLOPs with XLA's cost analysis (lowers the step once more).",
                      flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "Per-device peak TFLOP/s for MFU (default: from the device kind).",
                       flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad flag or config is one line."""
    del argv
    parts = [b for b in FLAGS.batch_per_device.split(",") if b]
    if not all(b.isdigit() and int(b) > 0 for b in parts):
        raise ValueError(f"--batch_per_device={FLAGS.batch_per_device!r}: give positive integers, e.g. '64,32,16'.")
    if FLAGS.steps < 1 or FLAGS.pipeline_batches < 0:
        raise ValueError(f"--steps={FLAGS.steps} must be >= 1 and --pipeline_batches={FLAGS.pipeline_batches} >= 0.")
    per_device = tuple(int(b) for b in parts)
    result = benchmark(
        FLAGS.config,
        FLAGS.steps,
        FLAGS.pipeline_batches,
        FLAGS.checkpoint,
        per_device,
        FLAGS.peak_tflops,
        FLAGS.xla_flops,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
