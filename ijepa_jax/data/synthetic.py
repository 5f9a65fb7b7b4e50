"""Deterministic generated images for tests and benchmarks (no files needed)."""

from __future__ import annotations

import numpy as np


class SyntheticSource:
    """Deterministic generated images for tests and benchmarks (no files needed).

    Each image is a few smooth coloured gratings whose orientation and
    frequency depend on the label, plus noise: structure a predictor can learn.
    """

    def __init__(self, num_images: int, image_size: int, num_classes: int = 10, seed: int = 0):
        self.num_images, self.image_size = num_images, image_size
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.num_images

    @property
    def labels(self) -> np.ndarray:
        return (np.arange(self.num_images) % self.num_classes).astype(np.int32)

    @property
    def class_names(self) -> list[str]:
        return [f"class{i}" for i in range(self.num_classes)]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        yy, xx = np.meshgrid(np.linspace(0, 1, s), np.linspace(0, 1, s), indexing="ij")
        theta = np.pi * label / self.num_classes + rng.normal(0, 0.1)
        freq = 2.0 + 4.0 * label / self.num_classes
        phase = rng.uniform(0, 2 * np.pi, 3)
        wave = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy)[..., None] + phase)
        img = 127.5 + 100 * wave + rng.normal(0, 10, (s, s, 3))
        return {"image": np.clip(img, 0, 255).astype(np.uint8), "label": label}
