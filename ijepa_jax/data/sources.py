"""Random-access image sources (grain's `__len__` / `__getitem__` protocol).

Each record is {'image': uint8 (H, W, 3), 'label': int}. Every source also
exposes `labels` (int array, one per record, readable without decoding images)
and `class_names`, which subsets and evaluation use.
"""

from __future__ import annotations

from ijepa_jax.data.cifar100 import Cifar100Source
from ijepa_jax.data.synthetic import SyntheticSource


def make_source(data_config, split: str | None = None):
    split = split or data_config.split
    if data_config.source == "cifar100":
        return Cifar100Source(data_config.root, split)
    if data_config.source == "synthetic":
        return SyntheticSource(data_config.synthetic_images, data_config.crop_size, data_config.synthetic_classes)
    raise ValueError(f"data.source={data_config.source!r} is not supported.")
