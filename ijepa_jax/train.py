"""I-JEPA pretraining: config -> mesh -> data -> state -> compiled step -> loop.

    python -m ijepa_jax.train --config configs/cifar100.py:vit_tiny --workdir runs/c100 \
        --config.data.root=../shared/data --config.total_steps=50
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ijepa_jax import checkpoint, config_lib, masks, optim, sharding
from ijepa_jax import step as step_lib
from ijepa_jax.data import pipeline, sources
from ijepa_jax.metrics import MetricsWriter, format_duration
from ijepa_jax.models import vit


def batch_shapes(config, spec: masks.MaskSpec) -> dict:
    """Global shapes of one batch (what the step is compiled for)."""
    b, s = config.data.batch_size, config.data.crop_size
    k, m, t = spec.context_tokens, spec.num_targets, spec.target_tokens
    return {
        "images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
        "context_idx": jax.ShapeDtypeStruct((b, k), jnp.int32),
        "context_valid": jax.ShapeDtypeStruct((b, k), jnp.bool_),
        "target_idx": jax.ShapeDtypeStruct((b, m, t), jnp.int32),
        "target_valid": jax.ShapeDtypeStruct((b, m, t), jnp.bool_),
    }


@dataclasses.dataclass
class Experiment:
    """Everything a run builds from its config before the first step."""

    config: ml_collections.ConfigDict  # resolved: mask.context_tokens filled in
    mesh: jax.sharding.Mesh
    spec: masks.MaskSpec
    source: object
    steps_per_epoch: int
    total_steps: int
    init: Callable[[], step_lib.TrainState]  # a fresh, sharded state (built only when a run starts fresh)
    abstract_state: step_lib.TrainState  # shapes, dtypes and shardings: what a checkpoint restores into
    train_step: object  # jitted (state, batch) -> (state, metrics)


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validate, then build mesh, masks, data source, sharded state and the jitted step."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh()
    spec = masks.resolve_spec(config)
    config = ml_collections.ConfigDict(config.to_dict())
    config.mask.context_tokens = spec.context_tokens

    source = sources.make_source(config.data, seed=config.seed)
    steps_per_epoch = pipeline.steps_per_epoch(len(source), config.data.batch_size)
    schedule_steps = int(config.optim.ipe_scale * config.optim.epochs * steps_per_epoch)
    total_steps = config.total_steps if config.total_steps > 0 else int(config.optim.epochs * steps_per_epoch)
    if total_steps > schedule_steps:
        raise ValueError(
            f"total_steps={total_steps} runs past the schedules' {schedule_steps} steps "
            f"(optim.epochs={config.optim.epochs} x {steps_per_epoch} steps/epoch x optim.ipe_scale); "
            "the EMA momentum would pass optim.ema[1]. Raise optim.epochs or lower total_steps."
        )

    schedules = optim.make_schedules(config.optim, steps_per_epoch)
    tx = optim.make_optimizer(config.optim, schedules)
    models = step_lib.make_models(config, config.data.crop_size // config.model.patch_size)
    init = functools.partial(step_lib.init_state, models=models, tx=tx, batch_shapes=batch_shapes(config, spec))
    rng = jax.random.key(config.seed)
    state_shapes = jax.eval_shape(init, rng)
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state_shapes)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, state_sharding
    )
    fresh_state = functools.partial(jax.jit(init, out_shardings=state_sharding), rng)
    train_step = step_lib.jit_train_step(
        models, tx, schedules, state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)
    )
    return Experiment(config, mesh, spec, source, steps_per_epoch, total_steps, fresh_state, abstract_state, train_step)


def train_batches(exp: Experiment, data_state: dict | None = None):
    """(global device batch, pipeline position after it) pairs, prefetched; resumes at `data_state`."""
    c = exp.config
    dataset = pipeline.pretrain_dataset(
        exp.source, c.data, exp.spec, c.seed, jax.process_index(), jax.process_count()
    )
    iterator = iter(dataset)
    if data_state is not None:
        iterator.set_state(data_state)
    return pipeline.prefetch_to_device(iterator, exp.mesh, c.data.prefetch_batches)


def initial_state(exp: Experiment, manager, workdir: str):
    """(state, data_state): the checkpoint to resume, weights to start from, or a fresh start."""
    ckpt = exp.config.checkpoint
    steps = sorted(manager.all_steps())
    if ckpt.restore_step >= 0 and ckpt.restore_step not in steps:
        raise ValueError(
            f"checkpoint.restore_step={ckpt.restore_step}, but {checkpoint.checkpoint_dir(workdir)} holds steps {steps}."
        )
    newer = [s for s in steps if s > ckpt.restore_step] if ckpt.restore_step >= 0 else []
    if newer:
        # Continuing would collide with (and later resume from) the newer steps; never delete work silently.
        raise ValueError(
            f"checkpoint.restore_step={ckpt.restore_step} is older than steps {newer} in "
            f"{checkpoint.checkpoint_dir(workdir)}; move those folders out of it first, then re-run."
        )
    step = ckpt.restore_step if ckpt.restore_step >= 0 else manager.latest_step()
    if step is not None:
        state, data_state = checkpoint.restore(manager, step, exp.abstract_state, exp.config, workdir)
        print(f"resumed from {checkpoint.checkpoint_dir(workdir)} step {step}", flush=True)
        return state, data_state
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        raise ValueError(
            f"{workdir} holds a previous run's metrics.jsonl but no complete checkpoint to resume; "
            "refusing to start over it. Use a new --workdir, or delete that folder's contents."
        )
    if ckpt.init_from:
        params, target_params = checkpoint.restore_weights(ckpt.init_from, exp.abstract_state, exp.config)
        print(f"initialised weights from {ckpt.init_from}", flush=True)
        return exp.init().replace(params=params, target_params=target_params), None
    return exp.init(), None


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) pretraining in `workdir`; returns the metrics of the last step."""
    if not workdir or "://" in workdir:
        raise ValueError(
            f"--workdir={workdir!r}: give a filesystem path for config, metrics and checkpoints "
            "(on several hosts, one that every host mounts, e.g. a gcsfuse or NFS mount)."
        )
    exp = build(config)
    manager = checkpoint.make_manager(workdir, exp.config.checkpoint, exp.steps_per_epoch)
    try:
        state, data_state = initial_state(exp, manager, workdir)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(exp.config.to_json_best_effort(indent=2))
        _print_summary(exp)
        writer = MetricsWriter(workdir, exp.total_steps, resume_step=int(state.step))
        try:
            state, last = _loop(exp, state, train_batches(exp, data_state), writer, manager)
        finally:
            writer.close()
        manager.wait_until_finished()
        if exp.config.checkpoint.export_at_end and int(state.step) == exp.total_steps and jax.process_index() == 0:
            path = checkpoint.export_target_encoder(
                state.target_params, exp.config, os.path.join(workdir, "target_encoder.msgpack")
            )
            print(f"exported the target encoder to {path}", flush=True)
        return last
    finally:
        manager.close()


def _loop(exp: Experiment, state, batches, writer: MetricsWriter, manager) -> tuple:
    """Dispatches step k+1 before fetching step k's metrics, so the host never stalls the devices.

    Saves every `checkpoint.every_steps`, at kept epochs, at the end, and at
    the first step boundary after a preemption signal (then returns early).
    """
    config, train_step = exp.config, exp.train_step
    steps_per_epoch, total_steps = exp.steps_per_epoch, exp.total_steps
    start = int(state.step)
    t_start = time.time()
    window = {"step": start, "time": t_start}  # throughput is measured between logged steps
    last = {}
    skipped_total = 0
    save_blocked_s = None

    def on_step_done(done: int, metrics) -> None:
        nonlocal last, skipped_total, save_blocked_s
        last = _check_finite(done, metrics)
        skipped_total += int(last.pop("skipped_images", 0))
        last["bad_images_skipped"] = skipped_total
        now = time.time()
        last["epoch"] = done / steps_per_epoch
        if save_blocked_s is not None:
            last["checkpoint_blocked_s"], save_blocked_s = save_blocked_s, None
        if done == start + 1:
            last["first_step_time_s"] = now - t_start  # compilation + one step
        elif done % config.log_every_steps == 0 or done == total_steps:
            steps = done - window["step"]
            last["step_time_s"] = (now - window["time"]) / steps
            last["img_per_s"] = config.data.batch_size / last["step_time_s"]
        else:
            return
        writer.write(done, last)
        window.update(step=done, time=now)

    monitor = None
    if config.eval.every_epochs > 0:
        from ijepa_jax import evaluate  # only runs that monitor need the evaluation code

        m = config.model
        monitor = evaluate.Monitor(config, exp.mesh, m.name, m.patch_size, config.data.crop_size)
    in_flight = None
    with checkpoint.PreemptionWatcher(manager) as preemption:
        for step in range(start, total_steps):
            batch, data_state = next(batches)
            state, metrics = train_step(state, batch)
            if in_flight is not None:
                on_step_done(*in_flight)
            in_flight = (step + 1, metrics)
            done = step + 1
            preempted = preemption.requested(done)
            save_due = preempted or done == total_steps or checkpoint.is_due(done, config.checkpoint, steps_per_epoch)
            eval_due = monitor is not None and done % (config.eval.every_epochs * steps_per_epoch) == 0
            if save_due or eval_due:
                on_step_done(*in_flight)  # close this step's timing before pausing the loop
                in_flight = None
                t = time.time()
                if save_due:
                    save_blocked_s = checkpoint.save(manager, done, state, data_state, config)
                if eval_due:
                    writer.write_eval(done, monitor(state.target_params))
                window["time"] += time.time() - t  # throughput excludes checkpointing and evaluation
            if preempted:
                manager.wait_until_finished()
                print(f"preempted: saved step {done}; run the same command again to resume.", flush=True)
                break
    if in_flight is not None:
        on_step_done(*in_flight)
    print(f"done: {int(state.step) - start} steps in {format_duration(time.time() - t_start)}", flush=True)
    return state, last


def _check_finite(step: int, metrics) -> dict:
    values = {k: v.item() for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(
            f"The loss became {values['loss']} at step {step}; stopping (metrics so far are in metrics.jsonl). "
            "Try a lower optim.lr or a longer optim.warmup_epochs, model.dtype=float32, or check the input data."
        )
    return values


def _print_summary(exp: Experiment) -> None:
    if jax.process_index() != 0:
        return
    config, state, spec = exp.config, exp.abstract_state, exp.spec
    print(
        f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: {jax.process_count()}\n"
        f"model: {config.model.name}/{config.model.patch_size} at {config.data.crop_size}px, "
        f"encoder {vit.count_params(state.params['encoder']) / 1e6:.2f}M params, "
        f"predictor {vit.count_params(state.params['predictor']) / 1e6:.2f}M params, dtype {config.model.dtype}\n"
        f"masks: mode {spec.mode}, grid {spec.grid_h}x{spec.grid_w}, {spec.context_tokens} context tokens/image, "
        f"{spec.num_targets} target blocks of <= {spec.target_tokens} tokens\n"
        f"data: {config.data.source}, {sources.describe(exp.source)}, global batch {config.data.batch_size}, "
        f"{exp.steps_per_epoch} steps/epoch, running {exp.total_steps} steps",
        flush=True,
    )


FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    sharding.maybe_initialize_distributed(FLAGS.distributed)
    try:
        train(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if FLAGS.traceback:
            raise
        sys.exit(f"error: {e}\n(run with --traceback for the full stack trace)")


if __name__ == "__main__":
    # Flags live here, not at import time, so tools and tests can import this module.
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for the resolved config, metrics and checkpoints.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (SLURM, TPU pod slices).")
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of configuration and data errors.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
