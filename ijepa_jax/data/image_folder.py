"""Image folders in the layout the reference reads: ROOT/<split>/<class>/<image>.

ImageNet-1K/22K and any folder dataset. The folder is scanned once at
start-up (structural problems are errors naming the path); images are
decoded on access, and an undecodable one raises `BadImageError` for
`sources.SkipBadImages` to skip or report.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ijepa_jax.data.transforms import BadImageError, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageFolderSource:
    def __init__(self, root: str, split: str = "train"):
        root = os.path.expanduser(root or ".")
        self.root, self.split = root, split
        split_dir = os.path.join(root, split)
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"data.root={root!r} is not a readable folder; point --config.data.root at a dataset "
                f"folder laid out as ROOT/{split}/<class>/<image>."
            )
        if not os.path.isdir(split_dir):
            found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise FileNotFoundError(
                f"No {split!r} split in {root}: expected the folder {split_dir} (found folders: {found}). "
                "Set data.split or data.root."
            )
        self.class_names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
        if not self.class_names:
            raise ValueError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/<image>.")

        paths, labels, empty, ignored = [], [], [], []
        for label, name in enumerate(self.class_names):
            class_dir = os.path.join(split_dir, name)
            files = sorted(e.name for e in os.scandir(class_dir) if e.is_file())
            images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            ignored += [os.path.join(class_dir, f) for f in files if not f.lower().endswith(IMAGE_EXTENSIONS)]
            if not images:
                empty.append(class_dir)
            paths += [os.path.join(class_dir, f) for f in images]
            labels += [label] * len(images)
        if empty:
            raise ValueError(
                f"{len(empty)} class folder(s) in {split_dir} hold no images, e.g. {empty[:3]}. "
                "Remove them, or choose classes with data.classes."
            )
        if ignored:
            logging.warning("%d non-image files ignored in %s, e.g. %s", len(ignored), split_dir, ignored[:3])
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.num_ignored_files = len(ignored)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImageError(f"{path}: cannot read ({e})") from e
        return {"image": decode_image(data, path), "label": int(self.labels[index])}
