"""The training loop and its bookkeeping: dispatch steps without waiting on them, keep device-side running
totals (skipped images, the first non-finite step), fetch metrics only where needed, time the throughput,
save, monitor, and stop on divergence or preemption.

`run` takes the experiment `train.build` made (its config, step, mesh and schedule facts); train.py owns
start-up, resuming and export.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time

import jax
import jax.numpy as jnp

from ijepa_jax import checkpoint, sharding
from ijepa_jax.metrics import MetricsWriter, format_duration


# Each dispatched step holds its batch on the devices: bound how far the host may run ahead of them.
MAX_STEPS_AHEAD = 3


def run(exp, state, batches, writer: MetricsWriter, manager, monitor=None, health_batch=None) -> tuple:
    """Runs the steps after `state.step`, then the periodic actions of each; returns (state, last metrics).

    Steps are dispatched without waiting for them. Metrics stay on the device
    and are fetched only where they are needed: log steps, saves,
    evaluations and the last step. In between, running totals on the device
    count skipped images and remember the first step with a non-finite loss.
    Saves every `checkpoint.every_steps`, at kept epochs, at the end, and at
    the first step boundary after a preemption signal (then returns early).
    `monitor` (a callable of the target parameters) runs every
    `eval.every_epochs`; the health diagnostics every `eval.health_every_steps`
    on `health_batch`, a fixed batch.
    """
    config, total_steps = exp.config, exp.total_steps
    start = int(state.step)
    timer = Timer(start, config.data.batch_size)
    totals = jax.jit(zero_totals, out_shardings=sharding.replicated(exp.mesh))(start)
    in_flight = collections.deque()  # totals of recent steps: waiting on the oldest bounds the run-ahead
    health_every = config.eval.health_every_steps
    last, pending = {}, {}  # pending: values that go into the next record
    with checkpoint.PreemptionWatcher(manager) as preemption:
        for step in range(start + 1, total_steps + 1):  # `step` steps are complete once this one has run
            batch = next(batches)
            state, metrics = exp.train_step(state, batch)
            totals = accumulate(totals, metrics)
            in_flight.append(totals["step"])
            if len(in_flight) > MAX_STEPS_AHEAD:
                in_flight.popleft().block_until_ready()

            preempted = preemption.requested(step)
            periodic_save = checkpoint.is_due(step, config.checkpoint, exp.steps_per_epoch)
            save_due = preempted or periodic_save or step == total_steps
            eval_due = monitor is not None and step % (config.eval.every_epochs * exp.steps_per_epoch) == 0
            health_due = health_batch is not None and step % health_every == 0
            log_due = step == start + 1 or step % config.log_every_steps == 0 or step == total_steps
            if log_due or save_due or eval_due:
                last = fetch(step, metrics, totals, exp.steps_per_epoch)  # never save a non-finite state
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
                        check_health(step, state, health_batch, exp.models, writer)
            if preempted:
                manager.wait_until_finished()
                writer.console(f"preempted: saved step {step}; run the same command again to resume.")
                break
    writer.console(f"done: {int(state.step) - start} steps in {format_duration(timer.elapsed())}")
    return state, last


def check_health(step: int, state, batch, models, writer: MetricsWriter) -> None:
    """Representation-health diagnostics on a fixed batch: logged, and a console warning on collapse."""
    from ijepa_jax.eval import health

    values = health.health_metrics(state.params, state.target_params, batch, models)
    writer.write_eval(step, values)
    for warning in health.collapse_warnings(values):
        writer.console(f"WARNING at step {step}: {warning}")


def zero_totals(start) -> dict:
    """The device-side running totals at the first step of a run (`start`: the resumed step)."""
    return {
        "step": jnp.asarray(start, jnp.int32),
        "skipped_images": jnp.zeros((), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),  # -1: every loss so far was finite
        "bad_loss": jnp.zeros((), jnp.float32),
    }


@jax.jit
def accumulate(totals: dict, metrics: dict) -> dict:
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


def fetch(step: int, metrics: dict, totals: dict, steps_per_epoch: int) -> dict:
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


def diverged_message(error: Diverged, manager, workdir: str) -> str:
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


class Timer:
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
