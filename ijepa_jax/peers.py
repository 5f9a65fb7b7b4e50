"""Liveness of the other processes of a multi-process run.

When a process dies without a word (SIGKILL, the OOM killer, a lost host), jax's distributed runtime
notices after its heartbeat timeout (100 s) and aborts every other process from C++: a hundred lines
of stack and nothing about what was saved. Here each process also beats a counter in the runtime's own
key-value store from a daemon thread; a process that sees a peer's counter stand still for `silent_s`
(well inside jax's timeout) reports it in one line and exits first. Counters, not timestamps, so that
hosts' clocks need not agree. A process that ends normally says so, and is not waited for.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
from jax._src import distributed  # the runtime's client: jax exposes no public key-value store

_KEY = "ijepa_jax/alive/{}"
_DONE = "done"


@contextlib.contextmanager
def watch(on_silent: Callable[[int, float], str], beat_s: float = 2.0, silent_s: float = 45.0):
    """Within the block, in a multi-process run: when peer p has not beaten for `silent_s` seconds
    (p = 0 also when its store is unreachable), prints on_silent(p, silent_s) to stderr and exits 1."""
    client = distributed.global_state.client if jax.process_count() > 1 else None
    if client is None:
        yield
        return
    me = jax.process_index()
    stop = threading.Event()
    thread = threading.Thread(
        target=_beat_and_check, args=(client, me, jax.process_count(), stop, on_silent, beat_s, silent_s),
        name="ijepa_jax-peers", daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)  # a call to a dead store may hang; the thread is a daemon
        with contextlib.suppress(Exception):  # process 0's store may already be gone
            client.key_value_set(_KEY.format(me), _DONE, allow_overwrite=True)


def _beat_and_check(client, me: int, count: int, stop: threading.Event, on_silent, beat_s: float,
                    silent_s: float) -> None:
    beats = 0
    last = {p: (None, time.monotonic()) for p in range(count) if p != me}  # peer -> (value, when it changed)
    while not stop.wait(beat_s):
        beats += 1
        try:
            client.key_value_set(_KEY.format(me), str(beats), allow_overwrite=True)
        except Exception:
            if 0 in last and not stop.is_set():  # the store lives in process 0, which has not said done
                _exit(on_silent(0, silent_s))
            return
        now = time.monotonic()
        for peer, (value, changed) in list(last.items()):
            try:
                seen = client.key_value_try_get(_KEY.format(peer))
            except Exception:  # not written yet: the peer is still starting
                seen = None
            if seen == _DONE:
                del last[peer]
            elif seen != value:
                last[peer] = (seen, now)
            elif now - changed > silent_s and not stop.is_set():
                _exit(on_silent(peer, silent_s))


def _exit(line: str) -> None:
    """The main thread may be blocked in a collective that will never finish: end the process here."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(1)
