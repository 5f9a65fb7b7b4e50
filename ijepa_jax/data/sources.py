"""Random-access image sources (grain's `__len__` / `__getitem__` protocol) and their composition.

Every source returns records {'image': uint8 (H, W, 3), 'label': int} and
exposes `labels` (one int per record, readable without decoding images) and
`class_names`. `make_source` builds the configured source, restricts it to a
class-balanced subset if asked, and wraps it so that undecodable images are
skipped and counted (or fail the run, with `data.on_bad_image='fail'`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

import numpy as np

from ijepa_jax.data.cifar100 import Cifar100Source
from ijepa_jax.data.image_folder import ImageFolderSource
from ijepa_jax.data.synthetic import SyntheticSource
from ijepa_jax.data.transforms import BadImageError

# A run of this many undecodable records in a row means the dataset, not one file, is broken.
MAX_CONSECUTIVE_BAD = 100


def select_indices(labels: np.ndarray, max_per_class: int = 0, class_ids=None, seed: int = 0) -> np.ndarray:
    """Sorted record indices of a class-balanced subset.

    Keeps the classes in `class_ids` (all if None) and, if `max_per_class` > 0,
    at most that many records of each, chosen uniformly from the seed (a
    class's choice does not depend on which other classes are kept).
    """
    class_ids = np.unique(labels) if class_ids is None else np.asarray(class_ids)
    chosen = []
    for c in class_ids:
        idx = np.flatnonzero(labels == c)
        if max_per_class and len(idx) > max_per_class:
            idx = np.sort(np.random.default_rng([seed, int(c)]).choice(idx, max_per_class, replace=False))
        chosen.append(idx)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


class Subset:
    """A view of `source` at `indices`, labels re-numbered 0..C-1 over the kept classes."""

    def __init__(self, source, indices: np.ndarray, class_ids: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)
        relabel = np.full(len(source.class_names), -1, np.int32)
        relabel[class_ids] = np.arange(len(class_ids))
        self._relabel = relabel
        self.labels = relabel[source.labels[self.indices]]
        self.class_names = [source.class_names[c] for c in class_ids]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        record = self.source[int(self.indices[index])]
        return {**record, "label": int(self._relabel[record["label"]])}


class SkipBadImages:
    """Replace an undecodable record by the next readable one; `skipped` counts how many were passed over.

    The replacement is deterministic (the next index), so runs stay
    reproducible and resumable; each bad file is logged where it is met.
    """

    def __init__(self, source, fail: bool = False):
        self.source, self.fail = source, fail

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels  # read only when asked: a TFDS source reads every record for them

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        for skipped in range(MAX_CONSECUTIVE_BAD):
            try:
                return {**self.source[(index + skipped) % len(self.source)], "skipped": skipped}
            except BadImageError as e:
                if self.fail:
                    raise BadImageError(f"{e} (data.on_bad_image='fail'; use 'skip' to skip such files)") from e
                logging.warning("skipping unreadable image: %s", e)
        raise BadImageError(
            f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images from index {index}: the dataset looks broken."
        )


def _base_source(data_config, split: str):
    d = data_config
    if d.source == "cifar100":
        return Cifar100Source(d.root, split, download=d.download)
    if d.source == "folder":
        return ImageFolderSource(d.root, split)
    if d.source == "tfds":
        from ijepa_jax.data.tfds_source import TfdsSource  # imports tensorflow_datasets: only when asked

        return TfdsSource(d.tfds_name, split, d.tfds_data_dir or None)
    if d.source == "synthetic":
        return SyntheticSource(d.synthetic_images, d.crop_size, d.synthetic_classes)
    raise ValueError(f"data.source={d.source!r} is not supported.")


def parse_classes(classes: str) -> list[str] | None:
    """'' -> None (all); 'a,b,c' -> names; a path to a file -> one name per line."""
    if not classes:
        return None
    if os.path.isfile(classes):
        with open(classes) as f:
            return [line.strip() for line in f if line.strip()]
    return [c.strip() for c in classes.split(",") if c.strip()]


def make_source(data_config, split: str | None = None, seed: int = 0):
    """The configured source for `split` (default `data.split`), subset and bad-image handling applied."""
    d = data_config
    source = _base_source(d, split or d.split)
    names = parse_classes(d.classes)
    if names is not None or d.max_samples_per_class:
        if names is None:
            class_ids = np.arange(len(source.class_names))
        else:
            known = {n: i for i, n in enumerate(source.class_names)}
            missing = [n for n in names if n not in known]
            if missing:
                raise ValueError(
                    f"data.classes names {len(missing)} classes the dataset does not have, e.g. {missing[:5]}; "
                    f"it has e.g. {source.class_names[:5]}."
                )
            class_ids = np.asarray([known[n] for n in names])
        source = Subset(source, select_indices(source.labels, d.max_samples_per_class, class_ids, seed), class_ids)
    return SkipBadImages(source, fail=d.on_bad_image == "fail")


class InMemoryImages:
    """A source decoded once into one uint8 (N, H, W, 3) array, for `data.augment_on='device'`.

    As a grain source its records are {'index', 'skipped'}: the pixels stay in
    `images`, which the run copies to the devices once. Undecodable files were
    replaced by the next readable one at load time (`SkipBadImages`), and
    `skipped` still counts them, as the host path does.
    """

    def __init__(self, images: np.ndarray, skipped: np.ndarray, labels: np.ndarray, class_names: list[str]):
        self.images, self.skipped, self.labels, self.class_names = images, skipped, labels, class_names

    @classmethod
    def load(cls, source, num_threads: int = 4, max_bytes: int | None = None) -> "InMemoryImages":
        """Decodes every record of `source` (threads: PIL releases the GIL while decoding). All images
        must have one size; `max_bytes` bounds the array, checked on the first image before decoding."""
        first = np.asarray(source[0]["image"])
        if max_bytes is not None and first.nbytes * len(source) > max_bytes:
            raise ValueError(
                f"data.augment_on='device' keeps the decoded dataset on every device: {len(source)} images of "
                f"{first.shape} need {first.nbytes * len(source) / 2**30:.1f} GiB, more than "
                f"{max_bytes / 2**30:.0f} GiB. Use --config.data.augment_on=host."
            )
        images = np.empty((len(source),) + first.shape, np.uint8)
        skipped = np.zeros(len(source), np.int32)

        def fill(indices: range) -> None:
            for index in indices:
                record = source[index]
                if record["image"].shape != first.shape:
                    raise ValueError(
                        f"data.augment_on='device' needs images of one size: record {index} is "
                        f"{record['image'].shape}, record 0 {first.shape}. Resize the dataset once, or use "
                        "--config.data.augment_on=host."
                    )
                images[index] = record["image"]
                skipped[index] = record.get("skipped", 0)

        chunks = [range(i, min(i + 512, len(source))) for i in range(0, len(source), 512)]
        start = time.perf_counter()
        fill(chunks[0])
        # Threads pay off only where a record costs work outside the GIL (decoding a file, ~100 us); for
        # arrays already in memory (CIFAR, ~5 us a record) they only contend for it.
        if num_threads > 1 and (time.perf_counter() - start) / len(chunks[0]) > 20e-6:
            with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
                list(pool.map(fill, chunks[1:]))
        else:
            for chunk in chunks[1:]:
                fill(chunk)
        return cls(images, skipped, np.asarray(source.labels), list(source.class_names))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"index": np.int32(index), "skipped": self.skipped[index]}


def make_pretrain_source(data_config, seed: int = 0, max_bytes: int | None = None):
    """The pretraining source: `make_source`'s, decoded into memory when `data.augment_on='device'`."""
    source = make_source(data_config, seed=seed)
    if data_config.augment_on == "device":
        source = InMemoryImages.load(source, data_config.num_threads, max_bytes)
    return source


def describe(source) -> str:
    counts = np.bincount(source.labels, minlength=len(source.class_names))
    return (
        f"{len(source)} images of {len(source.class_names)} classes "
        f"({counts.min()}-{counts.max()} per class)"
    )
