"""The grain pretraining pipeline (ijepa_jax/data/pipeline.py): shapes, determinism, multi-process
slicing, epochs and checkpointable iterator state. Runs in-process (num_workers=0) on tiny sources."""

import numpy as np
import pytest
from conftest import small_config

from ijepa_jax import masks
from ijepa_jax.data import pipeline, sources

KEYS = ("images", "skipped", "context_idx", "context_valid", "target_idx", "target_valid")


class IndexSource:
    """Constant images whose pixel value is the record index: identifies a record after any crop
    (a bilinear resize of a constant image is the same constant)."""

    def __init__(self, n, size=16):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"image": np.full((self.size, self.size, 3), index, np.uint8), "label": index}


def setup(**overrides):
    config = small_config(**overrides)
    spec = masks.resolve_spec(config)
    return config, spec


def batches(source, config, spec, n, seed=0, process_index=0, process_count=1):
    it = iter(pipeline.pretrain_dataset(source, config.data, spec, seed, process_index, process_count))
    return [next(it) for _ in range(n)]


def record_ids(batch):
    images = batch["images"]
    ids = images[:, 0, 0, 0].astype(int)
    assert np.all(images == ids[:, None, None, None]), "IndexSource images must stay constant"
    return ids


def assert_same(a, b):
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_shapes_and_dtypes_single_process():
    """One process gets the global batch: images uint8 (B, crop, crop, 3), context (B, K), targets (B, M, T)."""
    config, spec = setup()
    b = config.data.batch_size
    source = sources.make_source(config.data)
    for batch in batches(source, config, spec, 3):
        assert set(batch) == set(KEYS)
        assert batch["images"].shape == (b, 16, 16, 3) and batch["images"].dtype == np.uint8
        assert batch["context_idx"].shape == (b, spec.context_tokens) and batch["context_idx"].dtype == np.int32
        assert batch["context_valid"].shape == (b, spec.context_tokens) and batch["context_valid"].dtype == np.bool_
        assert batch["target_idx"].shape == (b, spec.num_targets, spec.target_tokens)
        assert batch["target_idx"].dtype == np.int32 and batch["target_valid"].dtype == np.bool_
        assert batch["target_valid"].shape == (b, spec.num_targets, spec.target_tokens)
        assert batch["skipped"].shape == (b,) and not batch["skipped"].any()
        assert batch["images"].std() > 0


def test_same_seed_same_batches_different_seed_different():
    """The pipeline is a pure function of the seed: same seed -> identical batches; another seed -> others."""
    config, spec = setup()
    source = sources.make_source(config.data)
    a = batches(source, config, spec, 2, seed=1)
    b = batches(source, config, spec, 2, seed=1)
    c = batches(source, config, spec, 2, seed=2)
    for x, y in zip(a, b):
        assert_same(x, y)
    assert not np.array_equal(a[0]["images"], c[0]["images"])
    assert not np.array_equal(a[0]["target_idx"], c[0]["target_idx"])


def test_two_processes_get_half_batches_with_different_images_and_masks():
    """With process_count=2 each process gets B/2 records; the two processes' images and masks differ
    (no duplicated random streams)."""
    config, spec = setup()
    source = sources.make_source(config.data)
    half = config.data.batch_size // 2
    p0 = batches(source, config, spec, 3, process_index=0, process_count=2)
    p1 = batches(source, config, spec, 3, process_index=1, process_count=2)
    for a, b in zip(p0, p1):
        assert a["images"].shape == (half, 16, 16, 3) and b["images"].shape == (half, 16, 16, 3)
        assert a["context_idx"].shape == (half, spec.context_tokens)
        assert a["target_idx"].shape == (half, spec.num_targets, spec.target_tokens)
        assert not np.array_equal(a["images"], b["images"])
        assert not (np.array_equal(a["target_idx"], b["target_idx"]) and np.array_equal(a["context_idx"], b["context_idx"]))
    # The mask streams differ as a whole, not only batch by batch.
    assert not np.array_equal(np.stack([x["target_idx"] for x in p0]), np.stack([x["target_idx"] for x in p1]))


def test_processes_split_the_single_process_global_batch():
    """Crops are keyed on the global position, so process p's batch i holds exactly the records (and crops)
    p, p+P, ... of the single-process global batch i: the multi-host global batch equals the 1-host one."""
    config, spec = setup()
    source = sources.make_source(config.data)
    single = batches(source, config, spec, 2)
    for p in range(2):
        part = batches(source, config, spec, 2, process_index=p, process_count=2)
        for i in range(2):
            np.testing.assert_array_equal(part[i]["images"], single[i]["images"][p::2])


def test_two_process_epoch_is_disjoint_and_complete():
    """Over one epoch (steps_per_epoch batches) the two processes see disjoint records whose union is the
    whole dataset, each exactly once."""
    config, spec = setup()
    source = IndexSource(64)
    steps = pipeline.steps_per_epoch(len(source), config.data.batch_size)
    assert steps == 8
    seen = []
    for p in range(2):
        ids = np.concatenate([record_ids(b) for b in batches(source, config, spec, steps, process_index=p, process_count=2)])
        assert len(ids) == 32 and len(np.unique(ids)) == 32, f"process {p} repeats records within an epoch"
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1], f"records seen by both processes: {sorted(seen[0] & seen[1])}"
    assert seen[0] | seen[1] == set(range(64))


def test_each_epoch_is_a_new_permutation():
    """Single process: every epoch visits each record once, in a shuffled order that changes per epoch."""
    config, spec = setup()
    source = IndexSource(64)
    steps = pipeline.steps_per_epoch(len(source), config.data.batch_size)
    all_batches = batches(source, config, spec, 3 * steps)
    epochs = [np.concatenate([record_ids(b) for b in all_batches[e * steps : (e + 1) * steps]]) for e in range(3)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(64))
    assert not np.array_equal(epochs[0], np.arange(64)), "the first epoch is not shuffled"
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_steps_per_epoch():
    """steps_per_epoch = records // global batch (remainder dropped); fewer records than a batch raises."""
    assert pipeline.steps_per_epoch(64, 8) == 8
    assert pipeline.steps_per_epoch(70, 8) == 8
    assert pipeline.steps_per_epoch(50_000, 2048) == 24
    with pytest.raises(ValueError, match="7 images.*batch of 8"):
        pipeline.steps_per_epoch(7, 8)


def test_iterator_state_resumes_at_the_next_batch():
    """get_state() after k batches and set_state() on a fresh iterator resume at exactly batch k."""
    config, spec = setup()
    source = sources.make_source(config.data)
    ds = pipeline.pretrain_dataset(source, config.data, spec, seed=3)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(pipeline.pretrain_dataset(source, config.data, spec, seed=3))
    resumed.set_state(state)
    for want in expected:
        assert_same(next(resumed), want)


def test_iterator_state_resumes_across_an_epoch_boundary():
    """A state saved at the end of an epoch resumes with the next epoch's first batch (records identified
    by IndexSource)."""
    config, spec = setup()
    source = IndexSource(64)
    steps = pipeline.steps_per_epoch(len(source), config.data.batch_size)
    ds = pipeline.pretrain_dataset(source, config.data, spec, seed=0)
    it = iter(ds)
    for _ in range(steps):
        next(it)
    state = it.get_state()
    want = next(it)
    resumed = iter(pipeline.pretrain_dataset(source, config.data, spec, seed=0))
    resumed.set_state(state)
    got = next(resumed)
    assert_same(got, want)


def test_masks_in_batches_are_valid():
    """The masks the pipeline attaches satisfy the sampler's contract: indices on the grid, context
    disjoint from targets, at least min_keep + 1 context patches (or K)."""
    config, spec = setup()
    source = sources.make_source(config.data)
    for batch in batches(source, config, spec, 3):
        assert batch["context_idx"].max() < spec.num_patches and batch["target_idx"].max() < spec.num_patches
        for b in range(config.data.batch_size):
            ctx = batch["context_idx"][b][batch["context_valid"][b]]
            tgt = batch["target_idx"][b][batch["target_valid"][b]]
            assert len(ctx) == spec.context_tokens or len(ctx) > spec.min_keep
            assert not np.intersect1d(ctx, tgt).size
