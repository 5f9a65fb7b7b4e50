"""The grain pretraining pipeline: shuffle -> crop/augment -> per-host slice -> batch -> masks.

Randomness is keyed on GLOBAL positions: crops are drawn before the per-host
slice (grain seeds a random_map from the element index), and the per-batch
mask draw folds in the process index, so hosts never repeat each other's
random streams. Every host sees the same number of batches per epoch.

With `data.augment_on='device'` the source is `sources.InMemoryImages` and
the map draws the same crop boxes and flips from the same generators but
ships them instead of pixels; `prefetch_to_device` then runs
`device_augment` on each batch once it is on the devices.
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import threading
import weakref

import grain
import numpy as np

from ijepa_jax import masks as masks_lib
from ijepa_jax import sharding
from ijepa_jax.data import transforms


class PretrainTransform(grain.transforms.RandomMap):
    """Record -> {'images': uint8 crop, 'skipped': int}; the label is not needed for pretraining."""

    def __init__(self, data_config):
        self.data_config = data_config

    def random_map(self, element, rng: np.random.Generator):
        image = transforms.pretrain_transform(element["image"], rng, self.data_config)
        return {"images": image, "skipped": np.int32(element.get("skipped", 0))}


class DrawCropParams(grain.transforms.RandomMap):
    """Record {'index', 'skipped'} -> the crop box and flip PretrainTransform would draw for that image."""

    def __init__(self, data_config, height: int, width: int):
        self.data_config, self.height, self.width = data_config, height, width

    def random_map(self, element, rng: np.random.Generator):
        box, flip = transforms.draw_crop_and_flip(rng, self.height, self.width, self.data_config)
        return {**element, "crop_box": np.asarray(box, np.int32), "flip": np.bool_(flip)}


class SampleMasks(grain.transforms.RandomMap):
    """Batch -> batch plus fixed-shape context/target index arrays (one size draw per batch)."""

    def __init__(self, spec: masks_lib.MaskSpec, process_index: int = 0):
        self.sampler = masks_lib.MaskSampler(spec)
        self.process_index = process_index

    def random_map(self, batch, rng: np.random.Generator):
        rng = np.random.default_rng([int(rng.integers(2**62)), self.process_index])
        return {**batch, **self.sampler.sample_sets(rng, len(batch["skipped"]))}


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(
            f"The dataset has {num_examples} images, fewer than one global batch of {global_batch}; "
            "lower data.batch_size or use a larger dataset."
        )
    return steps


def pretrain_dataset(
    source,
    data_config,
    spec: masks_lib.MaskSpec,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
) -> grain.IterDataset:
    """An infinite iterable of this process's batches (numpy dicts), from batch `start_batch` on.

    Batch k is the same on any number of workers, and its images and masks are
    the same on any number of processes (each draws its slice of global batch k).
    """
    local_batch = data_config.batch_size // process_count
    ds = grain.MapDataset.source(source).seed(seed)
    # Shuffle before repeat: each epoch gets its own permutation, never mixed.
    ds = ds.shuffle().repeat(None)
    if data_config.augment_on == "device":
        ds = ds.random_map(DrawCropParams(data_config, *source.images.shape[1:3]))
    else:
        ds = ds.random_map(PretrainTransform(data_config))
    ds = ds[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.random_map(SampleMasks(spec, process_index))
    if start_batch:
        ds = ds[start_batch:]  # random draws stay keyed on the original positions
    # Elements are whole batches here: buffer a few per read thread, not per image.
    threads = data_config.num_threads
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1)))
    if data_config.num_workers > 0:
        options = grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        it = it.mp_prefetch(options, worker_init_fn=ignore_sigterm)
    return it


def ignore_sigterm(worker_index: int, worker_count: int) -> None:
    """Workers leave SIGTERM (sent to the whole job on preemption) to the main process, which saves first."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def prefetch_to_device(iterator, mesh, size: int, on_device=None) -> "DevicePrefetcher":
    """Yields global device batches, keeping `size` batches ready; `on_device` (batch -> batch, e.g.
    device_augment's) runs on each one once it is on the devices."""
    return DevicePrefetcher(iterator, mesh, size, on_device)


class DevicePrefetcher:
    """Iterator of global device batches, filled by a background thread.

    The thread reads the host iterator and puts each batch on the devices,
    keeping at most `size` batches ready, so the loop thread only dequeues.
    One reader thread and a FIFO queue keep the order; an exception in the
    thread is raised by the next `next()`. `close()` (also on leaving a `with`
    block, or when the object is dropped) stops and joins it.
    """

    def __init__(self, iterator, mesh, size: int, on_device=None):
        self._queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_fill, args=(iterator, mesh, on_device, self._queue, self._stop), name="prefetch_to_device",
            daemon=True,
        )
        self._thread.start()
        # Runs on close(), when the iterator is dropped (the thread holds no reference to self), or at exit.
        self._finalize = weakref.finalize(self, _stop_thread, self._stop, self._thread)

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            self._thread.join()
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the reader thread (within one batch) and waits for it."""
        self._done = True
        self._finalize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stop_thread(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread is not threading.current_thread():  # a garbage collection may run on the thread itself
        thread.join()


@dataclasses.dataclass
class _End:
    error: BaseException | None = None


def _fill(iterator, mesh, on_device, out: queue.Queue, stop: threading.Event) -> None:
    """The reader thread: batches in order, then _End (with the exception, if one stopped it)."""
    try:
        for batch in iterator:
            batch = sharding.put_batch(batch, mesh)
            if not _put(out, on_device(batch) if on_device else batch, stop):
                return
        _put(out, _End(), stop)
    except BaseException as e:  # handed to the loop thread, which raises it
        _put(out, _End(e), stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Blocks while the queue is full; False once `stop` is set (the consumer is gone)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False
