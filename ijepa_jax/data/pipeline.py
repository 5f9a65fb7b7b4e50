"""The grain pretraining pipeline: shuffle -> crop/augment -> per-host slice -> batch -> masks.

Randomness is keyed on GLOBAL positions: crops are drawn before the per-host
slice (grain seeds a random_map from the element index), and the per-batch
mask draw folds in the process index, so hosts never repeat each other's
random streams. Every host sees the same number of batches per epoch.
"""

from __future__ import annotations

import collections
import signal

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


class SampleMasks(grain.transforms.RandomMap):
    """Batch -> batch plus fixed-shape context/target index arrays (one size draw per batch)."""

    def __init__(self, spec: masks_lib.MaskSpec, process_index: int = 0):
        self.sampler = masks_lib.MaskSampler(spec)
        self.process_index = process_index

    def random_map(self, batch, rng: np.random.Generator):
        rng = np.random.default_rng([int(rng.integers(2**62)), self.process_index])
        return {**batch, **self.sampler.sample(rng, len(batch["images"]))}


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
) -> grain.IterDataset:
    """An infinite iterable of this process's batches (numpy dicts)."""
    local_batch = data_config.batch_size // process_count
    ds = grain.MapDataset.source(source).seed(seed)
    # Shuffle before repeat: each epoch gets its own permutation, never mixed.
    ds = ds.shuffle().repeat(None)
    ds = ds.random_map(PretrainTransform(data_config))
    ds = ds[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.random_map(SampleMasks(spec, process_index))
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


def prefetch_to_device(iterator, mesh, size: int):
    """Yield (global device batch, iterator state after that batch), keeping `size` batches in flight.

    The state travels with its batch because the iterator runs ahead of the
    step: a checkpoint must record the position of the last batch *used*.
    """
    queue = collections.deque()
    for batch in iterator:
        queue.append((sharding.put_batch(batch, mesh), iterator.get_state()))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
