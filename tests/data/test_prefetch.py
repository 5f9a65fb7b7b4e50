"""prefetch_to_device: order, errors and shutdown of the background thread."""

import gc
import threading
import time

import numpy as np
import pytest

from ijepa_jax import sharding
from ijepa_jax.data import pipeline


class Counting:
    """An endless (or `n`-batch) iterator: batch i holds the value i."""

    def __init__(self, n=None, fail_at=None):
        self.i, self.n, self.fail_at = 0, n, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"unreadable batch {self.i}")
        if self.n is not None and self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.full((8, 2), self.i - 1, np.int32)}


def reader_threads():
    return [t for t in threading.enumerate() if t.name == "prefetch_to_device" and t.is_alive()]


def test_batches_come_in_order_as_global_device_arrays():
    """Global device arrays split over the mesh, in the iterator's order; then the end."""
    mesh = sharding.make_mesh()
    with pipeline.prefetch_to_device(Counting(n=5), mesh, size=2) as batches:
        items = list(batches)
    assert [int(b["x"][0, 0]) for b in items] == [0, 1, 2, 3, 4]
    assert items[0]["x"].sharding == sharding.batch_sharding(mesh)
    assert not reader_threads()


def test_an_error_in_the_reader_reaches_the_loop_after_the_batches_before_it():
    with pipeline.prefetch_to_device(Counting(fail_at=3), sharding.make_mesh(), size=2) as batches:
        assert [int(next(batches)["x"][0, 0]) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="unreadable batch 3"):
            next(batches)
    assert not reader_threads()


def test_close_stops_a_reader_blocked_on_a_full_queue():
    """An endless iterator fills the queue (size 1), then close() returns promptly and the thread is gone."""
    source = Counting()
    batches = pipeline.prefetch_to_device(source, sharding.make_mesh(), size=1)
    next(batches)
    time.sleep(0.2)
    assert source.i <= 4  # bounded: one batch taken, one queued, one waiting to be queued
    t = time.perf_counter()
    batches.close()
    assert time.perf_counter() - t < 2 and not reader_threads()
    with pytest.raises(StopIteration):
        next(batches)


def test_an_abandoned_iterator_stops_its_thread():
    """Dropped without close() (e.g. `next(train_batches(...))` in a test): the thread ends by itself."""
    batches = pipeline.prefetch_to_device(Counting(), sharding.make_mesh(), size=1)
    next(batches)
    del batches
    gc.collect()
    deadline = time.time() + 5
    while reader_threads() and time.time() < deadline:
        time.sleep(0.05)
    assert not reader_threads()
