"""Checkpoints (orbax) that resume exactly (the encoder on its own: encoder_export.py).

A checkpoint at step N holds, under WORKDIR/checkpoints/N/:
  state      the whole TrainState (online + target parameters, optimizer, step)
  data       the input pipeline's position after the N-th batch (grain state, JSON)
  config     the resolved config (JSON)
  checksums  per array, two sums of its raw bits, computed on the device at save
All randomness (crops, masks) is a function of the seed and the stream
position, so these are enough for an exact continuation. orbax writes
each checkpoint to a temporary folder and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact and the
partial one is ignored. A restore re-computes the checksums and checks the
state is finite: damage on disk (truncation, flipped bytes, an emptied
metadata file) is `CheckpointDamaged`, and the run falls back to the
newest good checkpoint (train.initial_state).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ijepa_jax import files, sharding, workdir
from ijepa_jax import step as step_lib

# Config entries that must match for a checkpoint's state to fit this run.
ARCHITECTURE_KEYS = (
    "model.name",
    "model.patch_size",
    "model.pred_depth",
    "model.pred_width",
    "model.scan_layers",
    "data.crop_size",
)
# Entries that change neither the state, the data stream, the masks nor the step's arithmetic: a resume
# with other values is still an exact continuation. A change of any other entry is warned about.
RESUME_FREE_KEYS = (
    "total_steps",
    "log_every_steps",
    "compilation_cache_dir",
    "data.root",
    "data.download",
    "data.tfds_data_dir",
    "data.num_workers",  # the data position is a batch index (tested across worker counts)
    "data.num_threads",
    "data.prefetch_batches",
    "data.on_bad_image",
    "checkpoint",
    "eval",
)
# Saved beside the config: mask draws fold in the process index and block sizes are drawn per local
# batch, so a resume on another process count is not an exact continuation.
PROCESSES_KEY = "saved_by_processes"


def checkpoint_dir(workdir):
    """WORKDIR/checkpoints, as an epath.Path (local, or gs://... which orbax writes natively)."""
    return files.path(workdir) / "checkpoints"


def make_manager(workdir: str, checkpoint_config, steps_per_epoch: int) -> ocp.CheckpointManager:
    """Saves every `every_steps`, keeps the last `keep`, and every `keep_every_epochs`-th epoch for good."""
    c = checkpoint_config
    keep_period = c.keep_every_epochs * steps_per_epoch if c.keep_every_epochs > 0 else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep,
        keep_period=keep_period,
        enable_async_checkpointing=c.async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=_item_handlers())


@contextlib.contextmanager
def closing(manager):
    """`with closing(manager):` waits for its asynchronous saves and closes it on every exit (errors and
    KeyboardInterrupt included), before the interpreter shuts down: orbax's background threads then
    schedule nothing on a closed executor ('cannot schedule new futures after interpreter shutdown')."""
    try:
        yield manager
    finally:
        try:
            # orbax (0.12) starts removing earlier runs' temporary folders in a thread when the manager is
            # made, and neither wait_until_finished nor close waits for it: a manager closed at once (a
            # refused start) can leave it scheduling on closed executors ('cannot schedule new futures
            # after shutdown'). save() waits for it the same way.
            await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
            if await_cleanup is not None:
                await_cleanup()
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (a save that failed: the error in flight is the one to report)
            logging.warning("a checkpoint save did not finish: %s", first_line(e))
        finally:
            manager.close()


def latest_saved_step(workdir: str) -> int | None:
    """The newest complete checkpoint step in WORKDIR/checkpoints (orbax's temporary folders of a save in
    progress are not numbers), without opening a manager; None when there is none."""
    directory = checkpoint_dir(workdir)
    try:
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    except OSError:
        return None
    return max(steps) if steps else None


def _item_handlers() -> dict:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "checksums": ocp.JsonCheckpointHandler(),
    }


def is_due(step: int, checkpoint_config, steps_per_epoch: int) -> bool:
    """A periodic save (every `every_steps`) or one of the epochs kept for good."""
    c = checkpoint_config
    periodic = c.every_steps > 0 and step % c.every_steps == 0
    kept_epoch = c.keep_every_epochs > 0 and step % (c.keep_every_epochs * steps_per_epoch) == 0
    return periodic or kept_epoch


def save(manager, step: int, state, config) -> float:
    """Starts a save (asynchronous by default); returns the seconds the caller was blocked.

    The data position saved is the next batch index, which is the step: batch k
    is the same for any worker count (see train.train_batches)."""
    t = time.perf_counter()
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"next_batch": step}),
            config=ocp.args.JsonSave({**json.loads(config.to_json_best_effort()), PROCESSES_KEY: jax.process_count()}),
            checksums=ocp.args.JsonSave(checksums(state)),
        ),
        force=True,  # the loop decides when to save (see is_due)
    )
    return time.perf_counter() - t


def check_compatible(saved: dict, config, where: str) -> None:
    """Raise ValueError naming every architecture entry that differs from the checkpoint's."""
    differences = []
    for key in ARCHITECTURE_KEYS:
        section, name = key.split(".")
        theirs, ours = saved.get(section, {}).get(name), config[section][name]
        if theirs != ours:
            differences.append(f"{key}: checkpoint {theirs!r}, this run {ours!r}")
    if differences:
        raise ValueError(
            f"The checkpoint in {where} was made by a different model: " + "; ".join(differences)
            + ". Use the config it was trained with, or a new --workdir."
        )


def _leaf_shapes(tree) -> dict:
    return {sharding.leaf_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_state_fits(manager, step: int, abstract_state, saved: dict, config, where: str,
                     partial: bool = False) -> None:
    """Raise ValueError when `step` holds other arrays than `abstract_state` (e.g. a run saved without
    optim.target_clusters has no prototypes), naming them and the config entries that differ: a state
    that does not fit is a config mistake, not a damaged checkpoint. `partial`: `abstract_state` is a
    part of the saved state. Unreadable metadata is left to the restore, which reports the step as damaged."""
    try:
        theirs = _leaf_shapes(manager.item_metadata(step)["state"])
    except Exception:  # orbax raises many types for damaged metadata
        return
    ours = _leaf_shapes(abstract_state)
    problems = [f"{k}: not in the checkpoint" for k in ours if k not in theirs]
    if not partial:  # a partial restore reads what it needs and leaves the rest
        problems += [f"{k}: only in the checkpoint" for k in theirs if k not in ours]
    problems += [f"{k}: checkpoint {theirs[k]}, this run {shape}" for k, shape in ours.items()
                 if k in theirs and theirs[k] != shape]
    if not problems:
        return
    changed = workdir.differences(saved, json.loads(config.to_json_best_effort()), skip=(PROCESSES_KEY,))
    raise ValueError(
        f"The checkpoint in {where} (step {step}) holds another state than this run's: {len(problems)} arrays differ, "
        f"e.g. {'; '.join(problems[:3])}. The config differs from the one it was saved with in: "
        f"{'; '.join(changed[:8]) or 'nothing'}. Use the config it was trained with, or a new --workdir."
    )


def warn_inexact_resume(saved: dict, config) -> None:
    """Changing the config between save and resume is allowed, but only RESUME_FREE_KEYS keep it exact."""
    changed = workdir.differences(saved, json.loads(config.to_json_best_effort()),
                                  skip=(*RESUME_FREE_KEYS, PROCESSES_KEY), saved_only=True)
    if changed:
        logging.warning("resuming with a config that differs from the checkpoint's in %s: not an exact "
                        "continuation", "; ".join(changed))
    saved_processes = saved.get(PROCESSES_KEY, jax.process_count())
    if saved_processes != jax.process_count():
        logging.warning(
            "resuming on %d processes a checkpoint saved by %d: the masks drawn from here on differ from an "
            "uninterrupted run's (they depend on the process index and the per-process batch)",
            jax.process_count(),
            saved_processes,
        )


class CheckpointDamaged(ValueError):
    """A checkpoint that cannot be trusted: unreadable, not matching its checksums, or not finite."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint step {step} {reason}")


@jax.jit
def _fingerprints(tree):
    def one(x):
        bits = _as_uint32(x).reshape(-1)
        weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
        return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)])

    return jax.tree.map(one, tree)


def _as_uint32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)


def checksums(tree) -> dict:
    """{leaf path: [sum, position-weighted sum] of its raw bits as uint32}: a changed or moved byte changes
    them. Computed on the devices (every process calls it); a few KiB of JSON per checkpoint."""
    values = sharding.to_host(_fingerprints(tree))
    return {
        sharding.leaf_name(path): [int(v) for v in np.asarray(leaf)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(values)[0]
    }


def first_line(e: BaseException, limit: int = 160) -> str:
    """A one-line summary of a storage library's (often very long) error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]  # then a spec dump of dozens of lines
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


@contextlib.contextmanager
def _stderr_kept_out_on_failure(settle_s: float = 1.0):
    """When a restore fails, orbax's other reads still finish and print 'Event loop is closed' tracebacks
    from tensorstore's threads, tens of lines under the real message. Hold file descriptor 2 in a
    temporary file meanwhile: on success its text is passed on, on failure (after `settle_s` for those
    reads) it goes to the library log (metrics.route_library_logs) instead of the console."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            time.sleep(settle_s)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            if failed and text:
                logging.info("output of the failed checkpoint restore:\n%s", text)
            elif text:
                sys.stderr.write(text)


def restore(manager, step: int, abstract_state, config, where: str) -> tuple:
    """(state, data_state) of `step`, with the state placed as `abstract_state`'s shardings say.

    Raises CheckpointDamaged when the step cannot be read, does not match the checksums written at
    save, or holds non-finite values; ValueError when it belongs to another model."""
    try:
        saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # orbax raises many types for a damaged or emptied metadata file
        raise CheckpointDamaged(step, f"has an unreadable config ({first_line(e)})") from e
    check_compatible(saved_config, config, where)
    check_state_fits(manager, step, abstract_state, saved_config, config, where)
    warn_inexact_resume(saved_config, config)
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
    has_checksums = (manager.directory / str(step) / "checksums").exists()  # older checkpoints have none
    if has_checksums:
        items["checksums"] = ocp.args.JsonRestore()
    try:
        with _stderr_kept_out_on_failure():
            restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore raises many types for truncated or damaged array files
        raise CheckpointDamaged(step, f"cannot be read ({first_line(e)})") from e
    state = restored["state"]
    if has_checksums:
        expected, actual = restored["checksums"], checksums(state)
        changed = [k for k in expected if expected[k] != actual.get(k)]
        if changed:
            raise CheckpointDamaged(
                step, f"does not match the checksums written when it was saved ({len(changed)} arrays, e.g. "
                f"{changed[0]}): its files changed on disk"
            )
    if not bool(step_lib.all_finite(state)):
        raise CheckpointDamaged(step, "holds non-finite values")
    return state, restored["data"]


def set_aside(manager, workdir: str, steps) -> str:
    """Moves damaged step folders to WORKDIR/damaged_checkpoints/ (nothing is deleted), so that new saves
    do not collide with them; every process calls it."""
    dest = files.path(workdir) / "damaged_checkpoints"
    if jax.process_index() == 0:
        dest.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target, n = dest / str(step), 1
            while target.exists():
                target, n = dest / f"{step}.{n}", n + 1
            (manager.directory / str(step)).rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ijepa_jax: damaged checkpoints set aside")
    manager.reload()
    return str(dest)


def read_only_manager(path: str, item_handlers: dict | None = None) -> tuple[ocp.CheckpointManager, int]:
    """A manager for another run's workdir (or its checkpoints/ folder), and its latest step."""
    path = files.path(path)
    directory = path if path.name == "checkpoints" else checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"No checkpoints in {path} (expected the folder {directory}).")
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers=item_handlers or _item_handlers()
    )
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint.")
    return manager, step


def restore_weights(path: str, abstract_state, config):
    """Online and target parameters from another run's latest checkpoint (optimizer and step fresh).

    Only those two subtrees are read (orbax's partial restore): the optimizer moments, twice the
    parameters again, are never materialised."""
    manager, step = read_only_manager(path)
    with contextlib.closing(manager):
        saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    check_compatible(saved_config, config, path)
    weights = {"params": abstract_state.params, "target_params": abstract_state.target_params}
    manager, _ = read_only_manager(path, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    with contextlib.closing(manager):
        check_state_fits(manager, step, weights, saved_config, config, path, partial=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=weights, restore_args=ocp.checkpoint_utils.construct_restore_args(weights), partial_restore=True,
        )))
    logging.info("initialised weights from %s step %d", path, step)
    return restored["state"]["params"], restored["state"]["target_params"]


# ----------------------------------------------------------------------------
# preemption


class PreemptionWatcher:
    """Tells the loop when to save and stop: SIGTERM or a first Ctrl-C (one process), or orbax's sync
    point (many).

    With several processes every host must stop at the same step, which
    orbax's preemption sync point (jax.distributed) guarantees; a local signal
    handler would let hosts disagree. A single process has no sync point, so
    it handles SIGTERM itself (SLURM before its time limit, TPU VM preemption).
    """

    def __init__(self, manager):
        self.manager = manager
        self.signalled = False
        self._logged = False
        self._signal_name = ""
        self._previous = self._previous_int = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            # Ctrl-C too: a KeyboardInterrupt raised inside orbax's save logs its traceback; the second
            # Ctrl-C is an immediate KeyboardInterrupt.
            self._previous_int = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        # A flag only: logging from a signal handler can re-enter the logging lock the interrupted code holds.
        if signum == signal.SIGINT and self.signalled:
            raise KeyboardInterrupt
        self.signalled = True
        self._signal_name = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        if self.signalled and not self._logged:
            self._logged = True
            logging.warning("%s: saving at step %d, then stopping", self._signal_name, step)
        return self.signalled

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            signal.signal(signal.SIGINT, self._previous_int)
