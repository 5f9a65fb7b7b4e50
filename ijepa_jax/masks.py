"""Multi-block masks (I-JEPA), sampled on the host in numpy, packed to fixed shapes.

Semantics follow the reference `MaskCollator` (src/masks/multiblock.py):
block SIZES are drawn once per batch, LOCATIONS per image; M target blocks;
one context block from which every target block is removed; `min_keep`.

Static-shape policy (the jitted step never sees a new shape):
  * targets: every block is padded to `target_tokens`, the largest block area
    the sampler can draw from the configured scale/aspect ranges;
    `target_valid` marks the real tokens and the loss ignores the rest.
    (Within a batch all blocks have the same size, as in the reference.)
  * context: exactly `context_tokens` (K) per image. An image with more
    context patches keeps K of them, one with fewer is padded and the padding
    is masked out of attention. K defaults to the mean batch-minimum context
    size the reference would keep (its "cut to the batch minimum"), estimated
    once at start-up; see `auto_context_tokens`.
  * arrays: both lengths are rounded up to a multiple of `pad_multiple` with
    always-invalid slots (`context_len`, `target_len`), e.g. 8 for cuDNN's
    fused attention, which needs even lengths. Padding changes no result: the
    same tokens are drawn and the extra slots are masked like any padding.

Two modes (`config.mask.mode`):
  * 'reference': the reference's distribution, quirks included -- one uniform
    draw sets both scale and aspect ratio; block tops/lefts are drawn with an
    exclusive upper bound (last row/column never covered); the context keeps
    the raster-order PREFIX of its patches.
  * 'corrected': independent scale and aspect draws; every patch reachable;
    the context keeps a uniformly random subset (no raster bias).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MODES = ("reference", "corrected")
# The reference retries a context location this many times before it stops
# excluding one more target block.
_CONTEXT_TRIES_PER_RELAXATION = 20


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Everything the sampler needs; build with `MaskSpec.from_config`."""

    grid_h: int
    grid_w: int
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False
    mode: str = "reference"
    context_tokens: int = -1  # K; -1: resolve with `auto_context_tokens`
    pad_multiple: int = 1  # array lengths are rounded up to a multiple of this
    sets: int = 1  # S > 1: S independent mask sets per image (one target-encoder pass serves them all)

    @classmethod
    def from_config(cls, config) -> "MaskSpec":
        """From the full config (`config.data.crop_size`, `config.model.patch_size`, `config.mask`)."""
        grid = config.data.crop_size // config.model.patch_size
        m = config.mask
        return cls(
            grid_h=grid,
            grid_w=grid,
            num_targets=m.num_targets,
            target_scale=tuple(m.target_scale),
            target_aspect=tuple(m.target_aspect),
            context_scale=tuple(m.context_scale),
            context_aspect=tuple(m.context_aspect),
            min_keep=m.min_keep,
            allow_overlap=m.allow_overlap,
            mode=m.mode,
            context_tokens=m.context_tokens,
            pad_multiple=resolve_pad_multiple(config),
            sets=m.sets,
        )

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def target_tokens(self) -> int:
        """T: the largest number of tokens one target block can have."""
        return block_area_range(self, self.target_scale, self.target_aspect)[1]

    @property
    def context_len(self) -> int:
        """Length of the context arrays: K rounded up to `pad_multiple`."""
        return _round_up(self.context_tokens, self.pad_multiple)

    @property
    def target_len(self) -> int:
        """Length of each target block's arrays: T rounded up to `pad_multiple`."""
        return _round_up(self.target_tokens, self.pad_multiple)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def resolve_pad_multiple(config) -> int:
    """`mask.pad_multiple`, with -1 meaning 8 under cuDNN attention and 1 otherwise."""
    if config.mask.pad_multiple != -1:
        return config.mask.pad_multiple  # validate() rejects anything below 1
    return 8 if config.model.attention_impl == "cudnn" else 1


def block_hw(spec: MaskSpec, area: int, aspect: float) -> tuple[int, int]:
    """The reference's size rule for one block of `area` patches."""
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    # Reference: `while h >= H: h -= 1`, so a block never spans the full grid.
    max_h, max_w = (spec.grid_h - 1, spec.grid_w - 1) if spec.mode == "reference" else (spec.grid_h, spec.grid_w)
    return max(1, min(h, max_h)), max(1, min(w, max_w))


def _draw_size(spec: MaskSpec, rng: np.random.Generator, scale, aspect) -> tuple[int, int]:
    if spec.mode == "reference":
        r = rng.random()  # one draw for both scale and aspect ratio
        s = scale[0] + r * (scale[1] - scale[0])
        a = aspect[0] + r * (aspect[1] - aspect[0])
    else:
        s = rng.uniform(*scale)
        a = rng.uniform(*aspect)
    return block_hw(spec, int(spec.num_patches * s), a)


def block_area_range(spec: MaskSpec, scale, aspect) -> tuple[int, int]:
    """(smallest, largest) h*w the sampler can draw for these ranges.

    For each integer area, h*w only changes where a rounding flips, so it is
    enough to look at the ends of the aspect range that reaches that area and
    just either side of every rounding breakpoint. In 'reference' mode one
    uniform draw r sets both scale and aspect, so an area is only reached with
    the aspects of its own r-interval (e.g. 40, not 42, tokens at 224/16).
    """
    n = spec.num_patches
    lo_area, hi_area = int(n * scale[0]), int(n * scale[1])
    tied = spec.mode == "reference" and scale[1] > scale[0]
    areas = []
    for area in range(max(lo_area, 1), max(hi_area, 1) + 1):
        a_lo, a_hi = aspect
        if tied:
            # r-interval on which int(n * (s0 + r (s1 - s0))) == area; r is in [0, 1).
            to_r = lambda v: (v / n - scale[0]) / (scale[1] - scale[0])  # noqa: E731
            r_lo, r_hi = max(to_r(area), 0.0), min(to_r(area + 1), 1.0)
            if r_lo >= r_hi:
                continue
            a_lo = aspect[0] + r_lo * (aspect[1] - aspect[0])
            a_hi = aspect[0] + r_hi * (aspect[1] - aspect[0])
        ks = np.arange(0, max(spec.grid_h, spec.grid_w) + 2) + 0.5
        breaks = np.concatenate([ks**2 / area, area / ks**2])
        cand = np.concatenate([[a_lo, a_hi], breaks * (1 - 1e-9), breaks * (1 + 1e-9)])
        cand = cand[(cand >= a_lo) & (cand <= a_hi)]
        areas += [np.prod(block_hw(spec, area, a)) for a in cand]
    return int(min(areas)), int(max(areas))


def validate(spec: MaskSpec) -> None:
    """Raise ValueError for settings the sampler cannot satisfy (never hang)."""
    if spec.mode not in MODES:
        raise ValueError(f"mask.mode={spec.mode!r}; choose one of {MODES}.")
    if spec.grid_h < 2 or spec.grid_w < 2:
        raise ValueError(
            f"The patch grid is {spec.grid_h}x{spec.grid_w}; multi-block masking needs at least 2x2. "
            "Use a larger data.crop_size or a smaller model.patch_size."
        )
    for name in ("target_scale", "context_scale", "target_aspect", "context_aspect"):
        lo, hi = getattr(spec, name)
        if not 0 < lo <= hi:
            raise ValueError(f"mask.{name}={(lo, hi)} must satisfy 0 < low <= high.")
    for name in ("target_scale", "context_scale"):
        if getattr(spec, name)[1] > 1:
            raise ValueError(f"mask.{name}={getattr(spec, name)} is a fraction of the image; keep it <= 1.")
    if spec.pad_multiple < 1:
        raise ValueError(f"mask.pad_multiple={spec.pad_multiple} must be >= 1 (or -1 for automatic).")
    if spec.num_targets < 1:
        raise ValueError(f"mask.num_targets={spec.num_targets} must be >= 1.")
    t_min, _ = block_area_range(spec, spec.target_scale, spec.target_aspect)
    if t_min <= spec.min_keep:
        raise ValueError(
            f"On a {spec.grid_h}x{spec.grid_w} grid the smallest target block has {t_min} patches, "
            f"not more than mask.min_keep={spec.min_keep} (the reference would re-draw it forever). "
            f"Lower mask.min_keep below {t_min}, raise mask.target_scale, or use a finer patch grid."
        )
    c_min, c_max = block_area_range(spec, spec.context_scale, spec.context_aspect)
    if c_min <= spec.min_keep:
        raise ValueError(
            f"On a {spec.grid_h}x{spec.grid_w} grid the smallest context block has {c_min} patches, "
            f"not more than mask.min_keep={spec.min_keep}. Lower mask.min_keep or raise mask.context_scale."
        )
    if not (spec.context_tokens == -1 or 0 < spec.context_tokens <= c_max):
        raise ValueError(
            f"mask.context_tokens={spec.context_tokens} but a context block has at most {c_max} patches "
            f"on this grid; use a value in [1, {c_max}] or -1 for automatic."
        )


class MaskSampler:
    """Draws one batch of fixed-shape masks from a numpy Generator."""

    def __init__(self, spec: MaskSpec):
        validate(spec)
        if spec.context_tokens <= 0:
            raise ValueError("MaskSampler needs a resolved spec.context_tokens (see auto_context_tokens).")
        self.spec = spec

    def _draw_offsets(self, rng, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.spec
        # Reference: randint(0, H - h) excludes H - h, so the last row/column is never used.
        extra = 0 if s.mode == "reference" else 1
        return rng.integers(0, s.grid_h - h + extra, n), rng.integers(0, s.grid_w - w + extra, n)

    def _block_masks(self, top, left, h, w) -> np.ndarray:
        """(n,) offsets -> (n, grid_h * grid_w) boolean masks."""
        s = self.spec
        rows = np.arange(s.grid_h)[None, :, None]
        cols = np.arange(s.grid_w)[None, None, :]
        inside = (
            (rows >= top[:, None, None])
            & (rows < top[:, None, None] + h)
            & (cols >= left[:, None, None])
            & (cols < left[:, None, None] + w)
        )
        return inside.reshape(len(top), -1)

    def sample(self, rng: np.random.Generator, batch_size: int, with_stats: bool = False) -> dict:
        """Returns int32 `context_idx` (B, Kp), bool `context_valid` (B, Kp),
        int32 `target_idx` (B, M, Tp), bool `target_valid` (B, M, Tp), where Kp,
        Tp are `spec.context_len`, `spec.target_len`; with `with_stats`, also
        `context_count` (B,): context patches before the cut to K."""
        s = self.spec
        b, m, k, t = batch_size, s.num_targets, s.context_tokens, s.target_len
        th, tw = _draw_size(s, rng, s.target_scale, s.target_aspect)
        ch, cw = _draw_size(s, rng, s.context_scale, s.context_aspect)

        # Targets: each block's indices in raster order, padded to T.
        top, left = self._draw_offsets(rng, b * m, th, tw)
        rr, cc = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
        block_idx = (top[:, None] + rr.reshape(1, -1)) * s.grid_w + left[:, None] + cc.reshape(1, -1)
        target_idx = np.zeros((b * m, t), np.int32)
        target_idx[:, : th * tw] = block_idx
        target_valid = np.zeros((b, m, t), bool)
        target_valid[:, :, : th * tw] = True
        target_masks = self._block_masks(top, left, th, tw).reshape(b, m, -1)

        context = self._sample_context(rng, b, ch, cw, target_masks)
        count = context.sum(1)

        context_valid = np.arange(k)[None, :] < count[:, None]
        if s.mode == "reference":
            # Raster order, valid first: keeping the first K is the reference's prefix cut.
            order = np.argsort(~context, axis=1, kind="stable")[:, :k]
        else:
            # A uniformly random K-subset of the context, then back to raster order.
            keys = np.where(context, rng.random(context.shape), 2.0)
            order = np.argsort(keys, axis=1)[:, :k]
            order = np.sort(np.where(context_valid, order, s.num_patches), axis=1)
        pad = ((0, 0), (0, s.context_len - k))  # always-invalid slots (pad_multiple)
        out = {
            "context_idx": np.pad(np.where(context_valid, order, 0), pad).astype(np.int32),
            "context_valid": np.pad(context_valid, pad),
            "target_idx": target_idx.reshape(b, m, t),
            "target_valid": target_valid,
        }
        if with_stats:
            out["context_count"] = count
        return out

    def sample_sets(self, rng: np.random.Generator, batch_size: int) -> dict:
        """What a training batch carries: `sample`'s arrays, or with `spec.sets` = S > 1, S independent
        draws (block sizes too) stacked on a new axis 1: context (B, S, Kp), targets (B, S, M, Tp)."""
        if self.spec.sets == 1:
            return self.sample(rng, batch_size)
        draws = [self.sample(rng, batch_size) for _ in range(self.spec.sets)]
        return {k: np.stack([d[k] for d in draws], axis=1) for k in draws[0]}

    def _sample_context(self, rng, b, ch, cw, target_masks) -> np.ndarray:
        """(B, N) context masks: a block minus the targets, with > min_keep patches.

        As in the reference, a location is re-drawn up to 20 times; after each
        20 failures one more target block (the last first) stops being excluded.
        """
        s = self.spec
        m = s.num_targets
        context = np.zeros((b, s.num_patches), bool)
        pending = np.arange(b)
        relaxed = np.zeros(b, np.int64)  # number of target blocks no longer excluded
        failures = np.zeros(b, np.int64)
        while pending.size:
            top, left = self._draw_offsets(rng, pending.size, ch, cw)
            cand = self._block_masks(top, left, ch, cw)
            if not s.allow_overlap:
                excluded = np.arange(m)[None, :] < (m - relaxed[pending])[:, None]
                cand &= ~np.any(target_masks[pending] & excluded[:, :, None], axis=1)
            ok = cand.sum(1) > s.min_keep
            context[pending[ok]] = cand[ok]
            failed = pending[~ok]
            failures[failed] += 1
            step_up = failed[failures[failed] % _CONTEXT_TRIES_PER_RELAXATION == 0]
            relaxed[step_up] = np.minimum(relaxed[step_up] + 1, m)
            pending = failed
        return context


def auto_context_tokens(spec: MaskSpec, batch_size: int = 128, num_batches: int = 64, seed: int = 0) -> int:
    """Mean batch-minimum context size over simulated batches (the reference's cut).

    The reference cuts every context in a (per-GPU) batch to the batch's
    smallest; this picks that length on average, so a fixed K keeps about as
    many context tokens as the reference does.
    """
    c_max = block_area_range(spec, spec.context_scale, spec.context_aspect)[1]
    sampler = MaskSampler(dataclasses.replace(spec, context_tokens=c_max))
    rng = np.random.default_rng(seed)
    minima = [sampler.sample(rng, batch_size, with_stats=True)["context_count"].min() for _ in range(num_batches)]
    return int(np.floor(np.mean(minima)))


def resolve_spec(config) -> MaskSpec:
    """The MaskSpec for a config, with `context_tokens=-1` resolved automatically."""
    spec = MaskSpec.from_config(config)
    validate(spec)
    if spec.context_tokens < 0:
        spec = dataclasses.replace(
            spec, context_tokens=auto_context_tokens(spec, batch_size=config.mask.auto_context_batch)
        )
    return spec
