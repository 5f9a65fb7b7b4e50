"""What a run may do with its work dir: one run at a time, and starting over after an early crash.

One run per work dir: WORKDIR/run.lock names its owner and carries a
heartbeat. Two runs sharing a work dir delete each other's temporary
checkpoints, rewrite each other's metrics and config, and interleave steps.
The lock file holds the owner's host, pid, start time and a token; a thread
rewrites it every HEARTBEAT_S. A second run is refused at once, unless the
lock is stale: its process is gone (same host) or its heartbeat is older
than STALE_S (a run killed on another host, e.g. before a SLURM requeue).
Local folders are locked with an exclusive create; object stores have none,
so there the check and the write are two steps (a narrow race).

A work dir with records but no checkpoint is a run that crashed before its
first save: the same config starts over (old records kept aside), another
config is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from ijepa_jax import files

LOCK_NAME = "run.lock"
HEARTBEAT_S = 15.0
STALE_S = 90.0


class WorkdirInUse(ValueError):
    """Another live run holds the work dir."""


class RunLock:
    """`with RunLock(workdir):` holds WORKDIR/run.lock for the duration (process 0 of a run only)."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = files.path(workdir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                      "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            holder, age = self._read()
            reason = self._stale_reason(holder, age)
            if reason is None:
                raise WorkdirInUse(
                    f"{self.path.parent} is in use by another run ({holder.get('host')} pid {holder.get('pid')}, "
                    f"last heartbeat {age:.0f} s ago). Give this run its own --workdir, or wait for that one to "
                    f"end. If it is dead, its lock goes stale {self.stale_s:.0f} s after its last heartbeat; or "
                    f"delete {self.path}."
                )
            logging.warning("taking over the stale lock %s (%s)", self.path, reason)
            print(f"taking over the stale lock of {holder.get('host')} pid {holder.get('pid')} ({reason})", flush=True)
            self._write()
        self._thread = threading.Thread(target=self._beat, name="run_lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._read()[0].get("token") == self.owner["token"]:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _create(self) -> bool:
        """Writes the lock if there is none; False if one exists."""
        if files.is_remote(self.path):
            if self.path.exists():
                return False
            self._write()
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _write(self) -> None:
        files.write_text(self.path, json.dumps(self.owner))

    def _read(self) -> tuple[dict, float]:
        """(the lock's owner, seconds since its last heartbeat); an unreadable lock is an unknown owner."""
        age = time.time() - self.path.stat().mtime
        try:
            return json.loads(self.path.read_text()), age
        except ValueError:  # a lock cut short by a crash mid-write
            return {}, age

    def _stale_reason(self, holder: dict, age: float) -> str | None:
        if holder.get("host") == self.owner["host"] and holder.get("pid") and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} has exited"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._read()[0].get("token") != self.owner["token"]:
                    logging.error("the lock %s was taken over by another run", self.path)
                    return
                self._write()
            except OSError as e:  # a transient storage error must not kill the run
                logging.warning("could not refresh %s: %s", self.path, e)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def hold(workdir: str):
    """Process 0 holds WORKDIR/run.lock for the whole run; every process stops if it is refused."""
    lock = RunLock(workdir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirInUse as e:
            error, lock = e, None
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(error is not None)) and not error:
        error = WorkdirInUse(f"process 0 found {workdir} in use by another run (see its log).")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def restart_after_early_crash(workdir: str, config) -> None:
    """A work dir with records but no checkpoint: the same config crashed before its first save (an
    auto-requeue reruns it), so start over, keeping the old records in WORKDIR/attempts/N/; any other
    config is refused."""
    saved = files.path(workdir) / "config.json"
    previous = json.loads(saved.read_text()) if saved.exists() else None
    ours = json.loads(config.to_json_best_effort())
    changed = differences(previous, ours) if previous is not None else ["no config.json to compare"]
    if changed:
        raise ValueError(
            f"{workdir} holds a previous run's metrics.jsonl but no complete checkpoint, and that run's config "
            f"differs ({'; '.join(changed[:5])}); refusing to start over it. Use a new --workdir, or move "
            "that folder's contents out of it."
        )
    if jax.process_index() == 0:
        attempts = files.path(workdir) / "attempts"
        attempts.mkdir(parents=True, exist_ok=True)
        dest = attempts / str(len(list(attempts.iterdir())) + 1)
        dest.mkdir()
        for name in ("metrics.jsonl", "tensorboard"):
            if (files.path(workdir) / name).exists():
                (files.path(workdir) / name).rename(dest / name)
        print(f"the previous attempt in {workdir} stopped before its first checkpoint: starting again from "
              f"step 0 (its records are in {dest})", flush=True)


def differences(saved: dict, ours: dict, prefix: str = "", skip: tuple = (), saved_only: bool = False) -> list[str]:
    """'key: saved -> ours' for every entry of two config dicts that differs.

    `skip`: dotted keys or whole sections left out; `saved_only`: only the entries `saved` has (a config
    written before an option existed lacks it, and the option's default keeps the old behaviour)."""
    out = []
    for key in sorted(set(saved) | set(ours)):
        name, a, b = f"{prefix}{key}", saved.get(key), ours.get(key)
        if (saved_only and key not in saved) or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.", skip, saved_only)
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def has_records(path) -> bool:
    """True if a metrics file logged at least one step: an empty file (a crash before the first step,
    e.g. out of memory while compiling) is no previous run to protect."""
    return path.exists() and any(line.strip() for line in path.read_text().splitlines())
