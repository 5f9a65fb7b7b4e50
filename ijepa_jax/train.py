"""I-JEPA pretraining: config -> mesh -> data -> state -> compiled step -> loop.

    python -m ijepa_jax.train --config configs/cifar100.py:vit_tiny --workdir runs/c100 \
        --config.data.root=../shared/data --config.total_steps=50
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from ijepa_jax import bad_input, checkpoint, compilation_cache, config_lib, encoder_export, files, loop, masks, optim, peers, sharding
from ijepa_jax import workdir as workdir_lib
from ijepa_jax import step as step_lib
from ijepa_jax.data import device_augment, pipeline, sources
from ijepa_jax.eval import monitor as monitor_lib
from ijepa_jax.metrics import MetricsWriter, route_library_logs
from ijepa_jax.models import vit


def batch_shapes(config, spec: masks.MaskSpec) -> dict:
    """Global shapes of one batch (what the step is compiled for)."""
    b, s = config.data.batch_size, config.data.crop_size
    k, m, t = spec.context_len, spec.num_targets, spec.target_len
    sets = (spec.sets,) if spec.sets > 1 else ()  # mask.sets > 1: an axis of mask sets per image
    return {
        "images": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
        "context_idx": jax.ShapeDtypeStruct((b, *sets, k), jnp.int32),
        "context_valid": jax.ShapeDtypeStruct((b, *sets, k), jnp.bool_),
        "target_idx": jax.ShapeDtypeStruct((b, *sets, m, t), jnp.int32),
        "target_valid": jax.ShapeDtypeStruct((b, *sets, m, t), jnp.bool_),
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
    models: step_lib.Models
    augment: Callable[[dict], dict] | None = None  # data.augment_on='device': the crop, run on device batches


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Validate, then build mesh, masks, data source, sharded state and the jitted step."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(mesh_config=config.mesh)
    spec = masks.resolve_spec(config)
    config = ml_collections.ConfigDict(config.to_dict())
    config.mask.context_tokens = spec.context_tokens

    source = sources.make_pretrain_source(config.data, config.seed, device_augment.MAX_DEVICE_DATASET_BYTES)
    augment = None
    if config.data.augment_on == "device":
        dataset = device_augment.put_dataset(source.images, mesh)
        augment = device_augment.make_augmenter(dataset, mesh, config.data.crop_size)
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
    # Pure data parallelism needs no constraint (and keeps its programs unchanged); FSDP does.
    activations = sharding.batch_sharding(mesh) if mesh.shape[sharding.FSDP_AXIS] > 1 else None
    models = step_lib.make_models(config, config.data.crop_size // config.model.patch_size, activations)
    init = functools.partial(step_lib.init_state, models=models, tx=tx, batch_shapes=batch_shapes(config, spec))
    rng = jax.random.key(config.seed)
    state_shapes = jax.eval_shape(init, rng)
    state_sharding = sharding.state_sharding(state_shapes, mesh)  # replicated unless mesh.fsdp > 1
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, state_sharding
    )
    fresh_state = functools.partial(jax.jit(init, out_shardings=state_sharding), rng)
    train_step = step_lib.jit_train_step(
        models, tx, schedules, state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)
    )
    return Experiment(
        config, mesh, spec, source, steps_per_epoch, total_steps, fresh_state, abstract_state, train_step, models,
        augment,
    )


def train_batches(exp: Experiment, start_batch: int = 0):
    """Global device batches from batch `start_batch` on (the number of steps already taken), put on
    the devices by a background thread. Close it (or use `with`) to stop the thread.

    Resuming by batch index rather than by grain's iterator state keeps a
    checkpoint portable: that state's format depends on `data.num_workers`.
    """
    c = exp.config
    dataset = pipeline.pretrain_dataset(
        exp.source, c.data, exp.spec, c.seed, jax.process_index(), jax.process_count(), start_batch
    )
    return pipeline.prefetch_to_device(iter(dataset), exp.mesh, c.data.prefetch_batches, exp.augment)


def initial_state(exp: Experiment, manager, workdir: str):
    """The state to start from: the checkpoint to resume, weights to start from, or a fresh one."""
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
    if steps:
        # An explicit restore_step is that step or an error; otherwise the newest good checkpoint.
        explicit = ckpt.restore_step >= 0
        return _resume(exp, manager, workdir, [ckpt.restore_step] if explicit else steps[::-1], explicit)
    if workdir_lib.has_records(files.path(workdir) / "metrics.jsonl"):
        workdir_lib.restart_after_early_crash(workdir, exp.config)
    if ckpt.init_from:
        params, target_params = checkpoint.restore_weights(ckpt.init_from, exp.abstract_state, exp.config)
        print(f"initialised weights from {ckpt.init_from}", flush=True)
        return exp.init().replace(params=params, target_params=target_params)
    return exp.init()


def _resume(exp: Experiment, manager, workdir: str, candidates: list[int], explicit: bool = False):
    """The state of the first of `candidates` that restores whole and finite; damaged ones are named in one
    line each and moved to WORKDIR/damaged_checkpoints/ (a new save of that step must not collide)."""
    damaged = []
    for step in candidates:
        try:
            state, _ = checkpoint.restore(manager, step, exp.abstract_state, exp.config, workdir)
        except checkpoint.CheckpointDamaged as e:
            if explicit:
                raise ValueError(f"{e}; checkpoint.restore_step asks for exactly this one.") from e
            damaged.append(e)
            if jax.process_index() == 0:
                print(f"skipping {e}", flush=True)
            continue
        if damaged:
            where = checkpoint.set_aside(manager, workdir, [d.step for d in damaged])
            if jax.process_index() == 0:
                print(f"moved damaged checkpoint(s) {[d.step for d in damaged]} to {where}", flush=True)
        if jax.process_index() == 0:
            print(f"resumed from {checkpoint.checkpoint_dir(workdir)} step {step}", flush=True)
        return state
    raise ValueError(
        f"No checkpoint in {checkpoint.checkpoint_dir(workdir)} can be restored: "
        + "; ".join(str(d) for d in damaged)
        + ". Move the damaged step folders out of checkpoints/ to start over, or restore them from a copy."
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) pretraining in `workdir` (a path, or a URL such as gs://bucket/run); returns the
    metrics of the last step."""
    if not workdir:
        raise ValueError("--workdir is empty: give a folder (or gs://bucket/folder) for config, metrics and checkpoints.")
    compilation_cache.use(config.compilation_cache_dir)
    with workdir_lib.hold(workdir):
        exp = build(config)
        manager = checkpoint.make_manager(workdir, exp.config.checkpoint, exp.steps_per_epoch)
        with checkpoint.closing(manager):  # on every exit: async saves finished, then closed
            return _run(exp, manager, workdir)


def _run(exp: Experiment, manager, workdir: str) -> dict:
    """Start-up decisions, the loop, the export; returns the last step's metrics."""
    state = initial_state(exp, manager, workdir)
    if jax.process_count() > 1:
        # Every process has looked at the work dir before process 0 writes to it.
        multihost_utils.sync_global_devices("ijepa_jax: start-up decisions made")
    if jax.process_index() == 0:
        files.write_text(files.path(workdir) / "config.json", exp.config.to_json_best_effort(indent=2))
    _print_summary(exp)
    # Closed in reverse order, also on errors: the reader thread stops, then every queued record is written.
    try:
        with (
            contextlib.closing(MetricsWriter(workdir, exp.total_steps, resume_step=int(state.step))) as writer,
            train_batches(exp, start_batch=int(state.step)) as batches,
        ):
            state, last = loop.run(exp, state, batches, writer, manager, _make_monitor(exp),
                                       first_batch(exp) if exp.config.eval.health_every_steps > 0 else None)
    except loop.Diverged as e:
        raise FloatingPointError(loop.diverged_message(e, manager, workdir)) from e
    manager.wait_until_finished()
    if exp.config.checkpoint.export_at_end and int(state.step) == exp.total_steps:
        path = encoder_export.export_target_encoder(
            state.target_params, exp.config, files.path(workdir) / "target_encoder.msgpack"
        )
        if jax.process_index() == 0:
            print(f"exported the target encoder to {path}", flush=True)
    return last


def _make_monitor(exp: Experiment):
    """The k-NN / linear monitor when `eval.every_epochs` > 0, else None."""
    if exp.config.eval.every_epochs <= 0:
        return None
    c = exp.config
    return monitor_lib.Monitor(c, exp.mesh, c.model.name, c.model.patch_size, c.data.crop_size)


def first_batch(exp: Experiment) -> dict:
    """Step 1's batch (a fresh pipeline's first): the fixed batch of the health diagnostics, the same images
    in a resumed run."""
    with train_batches(exp) as fresh:
        return next(fresh)


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


def define_flags(fv) -> None:
    """The command's flags, defined by __main__ on flags.FLAGS (or by a test on its own FlagValues), not
    at import time: tools and tests import this module."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally CONFIG:ARG.", lock_config=True, flag_values=fv
    )
    flags.DEFINE_string("workdir", None, "Directory for the resolved config, metrics and checkpoints.", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (SLURM, TPU pod slices).",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for clusters jax does not detect.",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", -1, "With --coordinator_address: the number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", -1, "With --coordinator_address: this process's index.", flag_values=fv)
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of configuration and data errors.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad config, work dir or dataset, or a divergence, is one line."""
    del argv
    bad_input.path_to_write(FLAGS.workdir, "--workdir")
    sharding.maybe_initialize_distributed(
        FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    config_lib.validate(FLAGS.config, jax.device_count(), jax.process_count())  # before the work dir is made
    route_library_logs(FLAGS.workdir, show_info=bad_input.verbosity_given())

    def silent(peer: int, seconds: float) -> str:
        return peer_failure_line(f"process {peer} stopped responding (no heartbeat for {seconds:.0f} s)", FLAGS.workdir)

    try:
        with peers.watch(silent):
            train(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt:
        sys.exit(f"interrupted; {_saved_state(FLAGS.workdir)}.")
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # A peer that died or hangs fails the next collective.
        sys.exit(peer_failure_line(f"another process stopped responding ({checkpoint.first_line(e)})", FLAGS.workdir))


def _saved_state(workdir: str) -> str:
    step = checkpoint.latest_saved_step(workdir)
    if step is None:
        return f"no checkpoint was saved in {checkpoint.checkpoint_dir(workdir)}"
    return f"saved state is at step {step} in {checkpoint.checkpoint_dir(workdir)}; run the same command to resume"


def peer_failure_line(what: str, workdir: str) -> str:
    """The one line a process of a multi-process run prints when a peer dies or hangs (`what`: how it
    showed): which process this is, and what is saved."""
    return f"error: process {jax.process_index()} of {jax.process_count()}: {what}; {_saved_state(workdir)}."


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
