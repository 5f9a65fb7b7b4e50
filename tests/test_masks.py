"""Multi-block mask sampler (ijepa_jax/masks.py): invariants, reference quirks, statistics, validation.

Numpy only. The reference is facebookresearch/ijepa src/masks/multiblock.py
(see shared/notes/ijepa-reference.md, section "Masks").
"""

import contextlib
import dataclasses
import signal

import numpy as np
import pytest
from conftest import small_config

from ijepa_jax import masks

MODES = ("reference", "corrected")
# (grid side, min_keep): ViT-*/16 at 224 (the reference setting) and ViT-*/4 at 32 (CIFAR).
GRIDS = ((14, 10), (8, 4))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""

    def _raise(signum, frame):
        raise TimeoutError(f"mask sampling did not return within {seconds}s (the sampler hangs)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_spec(grid, min_keep, mode, context_tokens=None, **kw):
    """A MaskSpec with the reference's default scales; context_tokens None -> auto (as in training)."""
    spec = masks.MaskSpec(grid_h=grid, grid_w=grid, min_keep=min_keep, mode=mode, **kw)
    if context_tokens is None:
        context_tokens = masks.auto_context_tokens(spec, batch_size=64, num_batches=8)
    elif context_tokens == "max":
        context_tokens = context_max(spec)
    return dataclasses.replace(spec, context_tokens=context_tokens)


def context_max(spec):
    return masks.block_area_range(spec, spec.context_scale, spec.context_aspect)[1]


def valid_sets(out, b):
    """(context set, [target set per block]) of image b."""
    ctx = out["context_idx"][b][out["context_valid"][b]]
    tgts = [out["target_idx"][b, j][out["target_valid"][b, j]] for j in range(out["target_idx"].shape[1])]
    return ctx, tgts


def rect_hw(idx, grid_w):
    """(h, w) of the block with these flat indices; asserts they form a full rectangle."""
    rows, cols = idx // grid_w, idx % grid_w
    h = rows.max() - rows.min() + 1
    w = cols.max() - cols.min() + 1
    assert len(np.unique(idx)) == len(idx) == h * w, f"target indices {idx} are not a full rectangle"
    return int(h), int(w)


def reachable_sizes(spec, scale, aspect, n=801):
    """All (h, w) the size rule yields on a dense grid of draws (tied draw in 'reference' mode)."""
    sizes = set()
    if spec.mode == "reference":
        for r in np.linspace(0.0, 1.0, 20001):
            s = scale[0] + r * (scale[1] - scale[0])
            a = aspect[0] + r * (aspect[1] - aspect[0])
            sizes.add(masks.block_hw(spec, int(spec.num_patches * s), a))
    else:
        for s in np.linspace(scale[0], scale[1], n):
            for a in np.linspace(aspect[0], aspect[1], n):
                sizes.add(masks.block_hw(spec, int(spec.num_patches * s), a))
    return sizes


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_output_shapes_and_dtypes_are_fixed(grid, min_keep, mode):
    """context (B,K) int32/bool and target (B,M,T) int32/bool, whatever the draw: the jitted step never recompiles."""
    spec = make_spec(grid, min_keep, mode)
    sampler = masks.MaskSampler(spec)
    b, k, m, t = 16, spec.context_tokens, spec.num_targets, spec.target_tokens
    for seed in range(15):
        out = sampler.sample(np.random.default_rng(seed), b)
        assert set(out) == {"context_idx", "context_valid", "target_idx", "target_valid"}
        assert out["context_idx"].shape == (b, k) and out["context_idx"].dtype == np.int32
        assert out["context_valid"].shape == (b, k) and out["context_valid"].dtype == np.bool_
        assert out["target_idx"].shape == (b, m, t) and out["target_idx"].dtype == np.int32
        assert out["target_valid"].shape == (b, m, t) and out["target_valid"].dtype == np.bool_
        # Every index, padding included, is a valid gather position.
        for key in ("context_idx", "target_idx"):
            assert out[key].min() >= 0 and out[key].max() < spec.num_patches


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_target_blocks_are_rectangles_of_one_allowed_size_per_batch(grid, min_keep, mode):
    """Each valid target block is a raster-ordered full rectangle; its h,w follow the size rule, its area lies
    in block_area_range, and all blocks of a batch share one size (sizes drawn once per batch)."""
    spec = make_spec(grid, min_keep, mode)
    sampler = masks.MaskSampler(spec)
    lo, hi = masks.block_area_range(spec, spec.target_scale, spec.target_aspect)
    allowed = reachable_sizes(spec, spec.target_scale, spec.target_aspect)
    seen = set()
    for seed in range(30):
        out = sampler.sample(np.random.default_rng(seed), 8)
        sizes = set()
        for b in range(8):
            for j in range(spec.num_targets):
                valid = out["target_valid"][b, j]
                n = int(valid.sum())
                assert valid[:n].all() and not valid[n:].any(), "valid target tokens must come first"
                idx = out["target_idx"][b, j, :n]
                assert np.all(np.diff(idx) > 0), "target indices must be in raster order"
                sizes.add(rect_hw(idx, grid))
        assert len(sizes) == 1, f"target blocks of one batch have different sizes: {sizes}"
        (h, w), = sizes
        assert lo <= h * w <= hi
        assert (h, w) in allowed, f"{(h, w)} is not produced by the size rule (allowed: {sorted(allowed)})"
        seen.add((h, w))
    assert len(seen) > 1, "the block size never changes between batches"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_context_is_sorted_unique_disjoint_from_targets_and_large_enough(grid, min_keep, mode):
    """Valid context indices are unique, sorted, outside every target block of the same image
    (allow_overlap=False); the valid count is K or > min_keep; padding comes last and is marked invalid;
    `context_count` is the count before the cut to K."""
    spec = make_spec(grid, min_keep, mode)
    assert not spec.allow_overlap
    sampler = masks.MaskSampler(spec)
    k = spec.context_tokens
    for seed in range(20):
        out = sampler.sample(np.random.default_rng(seed), 16, with_stats=True)
        count = out["context_count"]
        assert count.shape == (16,)
        assert np.all(count > min_keep)
        n_valid = out["context_valid"].sum(1)
        np.testing.assert_array_equal(n_valid, np.minimum(count, k))
        for b in range(16):
            valid = out["context_valid"][b]
            n = int(valid.sum())
            assert valid[:n].all() and not valid[n:].any(), "padding must come after the valid context"
            assert n == k or n > min_keep
            ctx, tgts = valid_sets(out, b)
            assert np.all(np.diff(ctx) > 0), "context indices must be unique and sorted"
            for tgt in tgts:
                assert not np.intersect1d(ctx, tgt).size, "context overlaps a target block"


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_masks_different_seed_different_masks(mode):
    """The sampler is a pure function of the Generator state."""
    sampler = masks.MaskSampler(make_spec(14, 10, mode))
    a = sampler.sample(np.random.default_rng(123), 8)
    b = sampler.sample(np.random.default_rng(123), 8)
    c = sampler.sample(np.random.default_rng(124), 8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[key], c[key]) for key in ("context_idx", "target_idx"))


# --------------------------------------------------------------------------- reference quirks / corrections


def coverage(sampler, batches, batch_size=32, seed=0):
    """Boolean (N,) unions of every valid target patch and every context patch over many batches."""
    n = sampler.spec.num_patches
    tgt_cover, ctx_cover = np.zeros(n, bool), np.zeros(n, bool)
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        out = sampler.sample(rng, batch_size)
        tgt_cover[out["target_idx"][out["target_valid"]]] = True
        ctx_cover[out["context_idx"][out["context_valid"]]] = True
    return tgt_cover, ctx_cover


@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_reference_mode_never_covers_last_row_or_column(grid, min_keep):
    """'reference': tops/lefts come from randint(0, H - h) (exclusive), so no target or context block
    ever touches the last row or column, while the rest of the grid is used."""
    sampler = masks.MaskSampler(make_spec(grid, min_keep, "reference", context_tokens="max"))
    tgt, ctx = coverage(sampler, batches=100)
    tgt, ctx = tgt.reshape(grid, grid), ctx.reshape(grid, grid)
    for name, cover in (("target", tgt), ("context", ctx)):
        assert not cover[-1, :].any(), f"a {name} block covers the last row"
        assert not cover[:, -1].any(), f"a {name} block covers the last column"
    assert ctx[:-1, :-1].all(), "the context should reach every patch outside the last row/column"
    assert tgt[:-1, :-1].all(), "targets should reach every patch outside the last row/column"


@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_corrected_mode_reaches_every_patch(grid, min_keep):
    """'corrected': every patch of the grid, last row and column included, is used by targets and by context."""
    sampler = masks.MaskSampler(make_spec(grid, min_keep, "corrected", context_tokens="max"))
    tgt, ctx = coverage(sampler, batches=100)
    assert tgt.all(), f"targets never reach patches {np.flatnonzero(~tgt)}"
    assert ctx.all(), f"the context never reaches patches {np.flatnonzero(~ctx)}"


@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_reference_context_keeps_raster_prefix(grid, min_keep):
    """'reference': the kept context is the raster-order PREFIX of the full context (its smallest indices).

    The reference mode draws nothing that depends on K, so the same seed with K = the largest context
    gives the full (uncut) context of the same images."""
    spec = make_spec(grid, min_keep, "reference")
    full_sampler = masks.MaskSampler(dataclasses.replace(spec, context_tokens=context_max(spec)))
    cut_sampler = masks.MaskSampler(spec)
    cut_seen = 0
    for seed in range(10):
        full = full_sampler.sample(np.random.default_rng(seed), 16, with_stats=True)
        cut = cut_sampler.sample(np.random.default_rng(seed), 16, with_stats=True)
        np.testing.assert_array_equal(full["target_idx"], cut["target_idx"])
        np.testing.assert_array_equal(full["context_count"], cut["context_count"])
        for b in range(16):
            f, _ = valid_sets(full, b)
            c, _ = valid_sets(cut, b)
            assert len(f) == full["context_count"][b], "with K = max context nothing may be cut"
            np.testing.assert_array_equal(c, f[: spec.context_tokens])
            cut_seen += len(f) > spec.context_tokens
    assert cut_seen > 0, "the test never exercised the cut"


@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_corrected_context_keeps_a_subset_that_is_not_always_the_prefix(grid, min_keep):
    """'corrected': the kept context is a sorted K-subset of the full context, and not the raster prefix
    in general (no bias against the bottom-right of the image)."""
    spec = make_spec(grid, min_keep, "corrected")
    full_sampler = masks.MaskSampler(dataclasses.replace(spec, context_tokens=context_max(spec)))
    cut_sampler = masks.MaskSampler(spec)
    cut, not_prefix = 0, 0
    for seed in range(10):
        full = full_sampler.sample(np.random.default_rng(seed), 16)
        part = cut_sampler.sample(np.random.default_rng(seed), 16)
        for b in range(16):
            f, _ = valid_sets(full, b)
            c, _ = valid_sets(part, b)
            assert len(c) == min(len(f), spec.context_tokens)
            assert np.isin(c, f).all(), "kept context patches must belong to the drawn context"
            if len(f) > spec.context_tokens:
                cut += 1
                not_prefix += not np.array_equal(c, f[: len(c)])
    assert cut > 0
    assert not_prefix > cut // 2, f"only {not_prefix} of {cut} cut contexts differ from the raster prefix"


def test_reference_statistics_at_224_patch16():
    """At 224/16 with batch 128 the reference's average context has about 82 patches before the cut and
    about 51 after the batch-minimum cut (the figures the reference reports)."""
    spec = masks.MaskSpec(grid_h=14, grid_w=14, mode="reference")
    assert (spec.num_targets, spec.min_keep, spec.target_scale, spec.context_scale) == (4, 10, (0.15, 0.2), (0.85, 1.0))
    sampler = masks.MaskSampler(dataclasses.replace(spec, context_tokens=context_max(spec)))
    rng = np.random.default_rng(0)
    counts = np.concatenate([sampler.sample(rng, 128, with_stats=True)["context_count"] for _ in range(16)])
    assert 78 <= counts.mean() <= 86, counts.mean()
    auto = masks.auto_context_tokens(spec, batch_size=128)
    assert 45 <= auto <= 55, auto


def test_resolve_spec_fills_in_auto_context_tokens():
    """resolve_spec turns context_tokens=-1 into auto_context_tokens at the configured per-GPU batch."""
    config = small_config(**{"mask.context_tokens": -1, "mask.auto_context_batch": 32})
    spec = masks.resolve_spec(config)
    expected = masks.auto_context_tokens(dataclasses.replace(spec, context_tokens=-1), batch_size=32)
    assert spec.context_tokens == expected > spec.min_keep
    fixed = masks.resolve_spec(small_config(**{"mask.context_tokens": 5}))
    assert fixed.context_tokens == 5


# --------------------------------------------------------------------------- the padded target length


@pytest.mark.parametrize(
    "grid,min_keep,scale,aspect",
    [
        (14, 10, (0.15, 0.2), (0.75, 1.5)),  # reference default
        (8, 4, (0.15, 0.2), (0.75, 1.5)),  # CIFAR grid
        (16, 10, (0.1, 0.3), (0.3, 3.0)),  # wide aspect range
        (6, 2, (0.4, 0.6), (0.5, 2.0)),  # large blocks on a small grid (clipping to the grid)
    ],
)
def test_block_area_range_equals_brute_force_and_bounds_samples(grid, min_keep, scale, aspect):
    """block_area_range is exactly the (min, max) area over a dense grid of scale x aspect draws, and no
    sampled target block (corrected mode) ever exceeds spec.target_tokens."""
    spec = masks.MaskSpec(grid, grid, target_scale=scale, target_aspect=aspect, min_keep=min_keep, mode="corrected")
    areas = [h * w for h, w in reachable_sizes(spec, scale, aspect, n=601)]
    assert masks.block_area_range(spec, scale, aspect) == (min(areas), max(areas))
    assert spec.target_tokens == max(areas)
    sampler = masks.MaskSampler(dataclasses.replace(spec, context_tokens=min_keep + 1))
    rng = np.random.default_rng(0)
    sampled = [int(sampler.sample(rng, 1)["target_valid"][0, 0].sum()) for _ in range(300)]
    assert max(sampled) <= spec.target_tokens
    assert min(sampled) >= min(areas)


@pytest.mark.parametrize("grid,min_keep", GRIDS)
def test_target_tokens_is_attained(grid, min_keep):
    """The padded length T is tight: some corrected-mode draw fills a target block completely."""
    spec = make_spec(grid, min_keep, "corrected")
    sampler = masks.MaskSampler(spec)
    rng = np.random.default_rng(0)
    sampled = [int(sampler.sample(rng, 1)["target_valid"][0, 0].sum()) for _ in range(400)]
    assert max(sampled) == spec.target_tokens


@pytest.mark.parametrize("grid,expected", [(14, 40), (16, 54), (8, 12)])
def test_reference_tied_draw_target_tokens_is_the_largest_drawable_block(grid, expected):
    """'reference' (one uniform draw r sets scale AND aspect): T is the largest block some r gives,
    found by brute force over a dense grid of r -- 40 at 224/16 and 54 at 224/14, not the 42 and 56
    that independent draws of scale and aspect could reach."""
    spec = masks.MaskSpec(grid, grid, mode="reference", min_keep=4)
    brute = 0
    for r in np.linspace(0.0, 1.0, 200_001)[:-1]:
        s = spec.target_scale[0] + r * (spec.target_scale[1] - spec.target_scale[0])
        a = spec.target_aspect[0] + r * (spec.target_aspect[1] - spec.target_aspect[0])
        brute = max(brute, int(np.prod(masks.block_hw(spec, int(spec.num_patches * s), a))))
    assert spec.target_tokens == brute == expected


def test_pad_multiple_adds_only_invalid_slots():
    """pad_multiple rounds the array lengths up (K=67 -> 72, T=54 -> 56 at 224/14) with slots that
    are always invalid; the drawn tokens are exactly those of the unpadded sampler."""
    base = masks.MaskSpec(16, 16, mode="reference", context_tokens=67)
    padded = dataclasses.replace(base, pad_multiple=8)
    assert (padded.context_len, padded.target_len) == (72, 56) and (base.context_len, base.target_len) == (67, 54)
    a = masks.MaskSampler(base).sample(np.random.default_rng(3), 16)
    b = masks.MaskSampler(padded).sample(np.random.default_rng(3), 16)
    assert b["context_idx"].shape == (16, 72) and b["target_idx"].shape == (16, 4, 56)
    assert not b["context_valid"][:, 67:].any() and not b["target_valid"][..., 54:].any()
    np.testing.assert_array_equal(b["context_idx"][:, :67], a["context_idx"])
    np.testing.assert_array_equal(b["context_valid"][:, :67], a["context_valid"])
    np.testing.assert_array_equal(b["target_idx"][..., :54], a["target_idx"])
    np.testing.assert_array_equal(b["target_valid"][..., :54], a["target_valid"])


def test_pad_multiple_auto_is_8_for_cudnn_only():
    """mask.pad_multiple=-1 (the default) pads to multiples of 8 under cuDNN attention, not otherwise."""
    assert masks.MaskSpec.from_config(small_config()).pad_multiple == 1
    cudnn = small_config(**{"model.attention_impl": "cudnn", "model.dtype": "bfloat16"})
    assert masks.MaskSpec.from_config(cudnn).pad_multiple == 8
    fixed = small_config(**{"mask.pad_multiple": 4})
    assert masks.MaskSpec.from_config(fixed).pad_multiple == 4


# --------------------------------------------------------------------------- validation and relaxation


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(grid_h=8, grid_w=8, min_keep=10), "min_keep"),  # reference defaults on CIFAR's 8x8 grid
        (dict(grid_h=1, grid_w=1, min_keep=0), "2x2"),
        (dict(grid_h=14, grid_w=14, target_scale=(0.3, 0.2)), "target_scale"),
        (dict(grid_h=14, grid_w=14, context_scale=(0.9, 1.2)), "context_scale"),
        (dict(grid_h=14, grid_w=14, target_aspect=(0.0, 1.0)), "target_aspect"),
        (dict(grid_h=14, grid_w=14, num_targets=0), "num_targets"),
        (dict(grid_h=14, grid_w=14, context_tokens=170), "context_tokens"),  # reference context is at most 13x13
        (dict(grid_h=14, grid_w=14, mode="random"), "mask.mode"),
    ],
)
def test_impossible_settings_raise_value_error(kwargs, fragment):
    """Settings the sampler cannot satisfy raise a ValueError naming the key (never a hang)."""
    spec = masks.MaskSpec(**kwargs)
    with deadline(10):
        with pytest.raises(ValueError, match=fragment):
            masks.validate(spec)
        with pytest.raises(ValueError, match=fragment):
            masks.MaskSampler(spec if spec.context_tokens > 0 else dataclasses.replace(spec, context_tokens=5))


def test_min_keep_message_says_what_to_change():
    """The min_keep error on the 8x8 grid states the smallest block size and the fix."""
    with pytest.raises(ValueError) as e:
        masks.validate(masks.MaskSpec(8, 8, min_keep=10))
    msg = str(e.value)
    assert "8x8" in msg and "min_keep=10" in msg and "Lower mask.min_keep" in msg


def test_largest_context_is_allowed_and_unresolved_context_rejected():
    """context_tokens may equal the largest context block; the sampler refuses an unresolved K=-1."""
    spec = masks.MaskSpec(14, 14, mode="reference")
    masks.validate(dataclasses.replace(spec, context_tokens=169))
    masks.validate(spec)  # -1 (automatic) is fine for validation
    with pytest.raises(ValueError, match="context_tokens"):
        masks.MaskSampler(spec)


def test_relaxation_when_targets_cover_everything():
    """If removing the targets always leaves <= min_keep patches, the sampler relaxes target exclusion
    (as the reference does after 20 failed tries per step) and returns the whole context block."""
    spec = masks.MaskSpec(
        4, 4, num_targets=2, target_scale=(1.0, 1.0), target_aspect=(1.0, 1.0), context_scale=(1.0, 1.0),
        min_keep=2, mode="corrected", context_tokens=16,
    )
    with deadline(10):
        out = masks.MaskSampler(spec).sample(np.random.default_rng(0), 4, with_stats=True)
    np.testing.assert_array_equal(out["context_count"], 16)
    assert out["context_valid"].all()
    np.testing.assert_array_equal(out["context_idx"], np.tile(np.arange(16), (4, 1)))


@pytest.mark.parametrize("mode", MODES)
def test_relaxation_with_big_targets_keeps_more_than_min_keep(mode):
    """With big targets the context often cannot exceed min_keep once they are removed; the sampler still
    returns, every count is > min_keep, and the blocks that stop being excluded are the LAST ones first."""
    spec = masks.MaskSpec(
        8, 8, num_targets=4, target_scale=(0.35, 0.4), min_keep=4, mode=mode, allow_overlap=False,
    )
    spec = dataclasses.replace(spec, context_tokens=context_max(spec))
    sampler = masks.MaskSampler(spec)
    overlaps = np.zeros(spec.num_targets, int)
    rng = np.random.default_rng(0)
    with deadline(20):
        for _ in range(30):
            out = sampler.sample(rng, 64, with_stats=True)
            assert np.all(out["context_count"] > spec.min_keep)
            for b in range(64):
                ctx, tgts = valid_sets(out, b)
                overlaps += [bool(np.intersect1d(ctx, t).size) for t in tgts]
    assert overlaps.sum() > 0, "no relaxation happened: the test settings are too easy"
    assert overlaps[-1] > overlaps[0], f"overlaps per target block {overlaps}: the last block must be relaxed first"


def test_allow_overlap_leaves_the_context_block_whole():
    """allow_overlap=True: the context is the full context block (h*w patches), overlapping targets."""
    spec = make_spec(8, 4, "corrected", context_tokens="max", allow_overlap=True)
    out = masks.MaskSampler(spec).sample(np.random.default_rng(0), 32, with_stats=True)
    assert len(np.unique(out["context_count"])) == 1, "one context size per batch"
    overlapping = 0
    for b in range(32):
        ctx, tgts = valid_sets(out, b)
        rect_hw(ctx, 8)  # a full rectangle
        overlapping += any(np.intersect1d(ctx, t).size for t in tgts)
    assert overlapping == 32
