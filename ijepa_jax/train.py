"""I-JEPA pretraining: config -> mesh -> data -> state -> compiled step -> loop.

    python -m ijepa_jax.train --config configs/cifar100.py:vit_tiny --workdir runs/c100 \
        --config.data.root=../shared/data --config.total_steps=50
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from ijepa_jax import bad_input, checkpoint, compilation_cache, config_lib, encoder_export, files, masks, optim, peers, sharding
from ijepa_jax import workdir as workdir_lib
from ijepa_jax import step as step_lib
from ijepa_jax.data import device_augment, pipeline, sources
from ijepa_jax.eval import monitor as monitor_lib
from ijepa_jax.metrics import MetricsWriter, format_duration, route_library_logs
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
            state, last = _loop(exp, state, batches, writer, manager)
    except Diverged as e:
        raise FloatingPointError(_diverged_message(e, manager, workdir)) from e
    manager.wait_until_finished()
    if exp.config.checkpoint.export_at_end and int(state.step) == exp.total_steps:
        path = encoder_export.export_target_encoder(
            state.target_params, exp.config, files.path(workdir) / "target_encoder.msgpack"
        )
        if jax.process_index() == 0:
            print(f"exported the target encoder to {path}", flush=True)
    return last


# Each dispatched step holds its batch on the devices: bound how far the host may run ahead of them.
_MAX_STEPS_AHEAD = 3


def _loop(exp: Experiment, state, batches, writer: MetricsWriter, manager) -> tuple:
    """Runs the steps after `state.step`, then the periodic actions of each; returns (state, last metrics).

    Steps are dispatched without waiting for them. Metrics stay on the device
    and are fetched only where they are needed: log steps, saves,
    evaluations and the last step. In between, running totals on the device
    count skipped images and remember the first step with a non-finite loss.
    Saves every `checkpoint.every_steps`, at kept epochs, at the end, and at
    the first step boundary after a preemption signal (then returns early).
    """
    config, total_steps = exp.config, exp.total_steps
    start = int(state.step)
    timer = _Timer(start, config.data.batch_size)
    totals = jax.jit(_zero_totals, out_shardings=sharding.replicated(exp.mesh))(start)
    in_flight = collections.deque()  # totals of recent steps: waiting on the oldest bounds the run-ahead
    monitor = _make_monitor(exp)
    health_every, health_batch = config.eval.health_every_steps, None
    if health_every > 0:
        # A fixed batch (a fresh pipeline's first, i.e. step 1's), so a resumed run measures the same images.
        with train_batches(exp) as fresh:
            health_batch = next(fresh)
    last, pending = {}, {}  # pending: values that go into the next record
    with checkpoint.PreemptionWatcher(manager) as preemption:
        for step in range(start + 1, total_steps + 1):  # `step` steps are complete once this one has run
            batch = next(batches)
            state, metrics = exp.train_step(state, batch)
            totals = _accumulate(totals, metrics)
            in_flight.append(totals["step"])
            if len(in_flight) > _MAX_STEPS_AHEAD:
                in_flight.popleft().block_until_ready()

            preempted = preemption.requested(step)
            periodic_save = checkpoint.is_due(step, config.checkpoint, exp.steps_per_epoch)
            save_due = preempted or periodic_save or step == total_steps
            eval_due = monitor is not None and step % (config.eval.every_epochs * exp.steps_per_epoch) == 0
            health_due = health_batch is not None and step % health_every == 0
            log_due = step == start + 1 or step % config.log_every_steps == 0 or step == total_steps
            if log_due or save_due or eval_due:
                last = _fetch(step, metrics, totals, exp.steps_per_epoch)  # never save a non-finite state
            if log_due:
                writer.write(step, {**last, **pending, **timer.lap(step)})
                pending = {}
            if save_due or eval_due or health_due:
                with timer.paused():  # throughput excludes checkpointing and evaluation
                    if save_due:
                        pending["checkpoint_blocked_s"] = checkpoint.save(manager, step, state, config)
                        writer.console(f"checkpoint: saving step {step} in the background")
                    if eval_due:
                        writer.write_eval(step, monitor(state.target_params))
                    if health_due:
                        _check_health(step, state, health_batch, exp.models, writer)
            if preempted:
                manager.wait_until_finished()
                writer.console(f"preempted: saved step {step}; run the same command again to resume.")
                break
    writer.console(f"done: {int(state.step) - start} steps in {format_duration(timer.elapsed())}")
    return state, last


def _check_health(step: int, state, batch, models, writer: MetricsWriter) -> None:
    """Representation-health diagnostics on a fixed batch: logged, and a console warning on collapse."""
    from ijepa_jax.eval import health

    values = health.health_metrics(state.params, state.target_params, batch, models)
    writer.write_eval(step, values)
    for warning in health.collapse_warnings(values):
        writer.console(f"WARNING at step {step}: {warning}")


def _zero_totals(start) -> dict:
    """The device-side running totals at the first step of a run (`start`: the resumed step)."""
    return {
        "step": jnp.asarray(start, jnp.int32),
        "skipped_images": jnp.zeros((), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),  # -1: every loss so far was finite
        "bad_loss": jnp.zeros((), jnp.float32),
    }


@jax.jit
def _accumulate(totals: dict, metrics: dict) -> dict:
    """Totals after one more step: the image count stays exact and the first step whose loss or updated
    state is non-finite is kept, with its loss."""
    step = totals["step"] + 1
    finite = jnp.isfinite(metrics["loss"]) & metrics.get("state_finite", True)
    newly_bad = ~finite & (totals["first_bad_step"] < 0)
    return {
        "step": step,
        "skipped_images": totals["skipped_images"] + metrics.get("skipped_images", 0),
        "first_bad_step": jnp.where(newly_bad, step, totals["first_bad_step"]),
        "bad_loss": jnp.where(newly_bad, metrics["loss"], totals["bad_loss"]),
    }


class Diverged(FloatingPointError):
    """A step's loss or updated state was non-finite; nothing from that step on is saved."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        what = f"the loss became {loss}" if not math.isfinite(loss) else (
            f"the updated parameters or optimizer moments became non-finite (its loss was {loss:.4g})"
        )
        super().__init__(f"At step {step} {what}.")


def _fetch(step: int, metrics: dict, totals: dict, steps_per_epoch: int) -> dict:
    """`step`'s metrics as Python numbers (waits for that step); raises Diverged if any step so far had a
    non-finite loss or state."""
    metrics, totals = jax.device_get((metrics, totals))
    first_bad = int(totals["first_bad_step"])
    if first_bad >= 0:
        raise Diverged(first_bad, float(totals["bad_loss"]))
    values = {k: v.item() for k, v in metrics.items() if k not in ("skipped_images", "state_finite")}
    values["bad_images_skipped"] = int(totals["skipped_images"])  # since this process started
    values["epoch"] = step / steps_per_epoch
    return values


def _diverged_message(error: Diverged, manager, workdir: str) -> str:
    """What stopped the run, what is safe on disk, and the usual causes (not a diagnosis)."""
    manager.wait_until_finished()
    saved = sorted(manager.all_steps())
    kept = (f"the last checkpoint, step {saved[-1]}, and every earlier one ({saved}) are finite and kept"
            if saved else "no checkpoint had been saved")
    return (
        f"{error} Stopping: no state from step {error.step} on was saved; {kept} in "
        f"{checkpoint.checkpoint_dir(workdir)}; metrics so far are in metrics.jsonl. Usual causes: a learning "
        "rate too high for this model or batch (optim.lr, optim.warmup_epochs), bad input data, reduced "
        "precision (model.dtype), or a damaged checkpoint this run resumed from."
    )


class _Timer:
    """Images/s between log steps, not counting time paused for checkpoints and evaluations
    (big_vision's Chrono, cut down)."""

    def __init__(self, start_step: int, batch_size: int):
        self.batch_size = batch_size
        self._start_step = start_step
        self._start_time = time.perf_counter()
        self._lap_step, self._lap_time = start_step, self._start_time

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self._lap_time += time.perf_counter() - t

    def lap(self, step: int) -> dict:
        """Timing of the steps since the previous lap; call it only once `step` has finished."""
        now = time.perf_counter()
        steps, seconds = step - self._lap_step, now - self._lap_time
        self._lap_step, self._lap_time = step, now
        if step == self._start_step + 1:
            return {"first_step_time_s": seconds}  # compilation included
        return {"step_time_s": seconds / steps, "img_per_s": self.batch_size * steps / seconds}

    def elapsed(self) -> float:
        return time.perf_counter() - self._start_time


def _make_monitor(exp: Experiment):
    """The k-NN / linear monitor when `eval.every_epochs` > 0, else None."""
    if exp.config.eval.every_epochs <= 0:
        return None
    c = exp.config
    return monitor_lib.Monitor(c, exp.mesh, c.model.name, c.model.patch_size, c.data.crop_size)


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
