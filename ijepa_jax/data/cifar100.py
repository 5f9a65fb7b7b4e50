"""CIFAR-100 from the official python archive (the .tar.gz itself or its extracted folder)."""

from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np

CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"


class Cifar100Source:
    """CIFAR-100 from the official python archive: the .tar.gz itself or its extracted folder.

    `root` may be the archive, the extracted `cifar-100-python/` folder, or a
    folder that holds either. The arrays are loaded in the constructor (so a
    missing or corrupt file fails at start-up) and re-loaded lazily in grain
    worker processes instead of being pickled to them.
    """

    def __init__(self, root: str, split: str = "train"):
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR-100 has splits 'train' and 'test', not {split!r} (set data.split).")
        self.root, self.split = root, split
        self._location = _locate_cifar100(root)
        self._images, self._labels = self._load()

    def _load(self):
        kind, path = self._location
        try:
            if kind == "archive":
                with tarfile.open(path, "r:gz") as tar:
                    member = tar.extractfile(f"{CIFAR100_FOLDER}/{self.split}")
                    if member is None:
                        raise KeyError(f"{CIFAR100_FOLDER}/{self.split}")
                    entry = pickle.load(member, encoding="bytes")
            else:
                with open(os.path.join(path, self.split), "rb") as f:
                    entry = pickle.load(f, encoding="bytes")
            if not isinstance(entry, dict):
                raise TypeError(f"expected a dict, found {type(entry).__name__}")
            data = np.asarray(entry[b"data"], np.uint8)
            labels = np.asarray(entry[b"fine_labels"], np.int32)
        except Exception as e:  # a damaged pickle can raise almost anything; all of it means "corrupt"
            raise ValueError(
                f"Could not read the CIFAR-100 {self.split!r} split from {path} ({type(e).__name__}: {e}). "
                "The file looks corrupt or incomplete: download the official cifar-100-python.tar.gz again."
            ) from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"{path}: unexpected CIFAR-100 layout (data {data.shape}, {len(labels)} labels).")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes
        return np.ascontiguousarray(images), labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        if self._images is None:
            self._images, _ = self._load()
        return {"image": self._images[index], "label": int(self._labels[index])}

    def __getstate__(self):
        # Workers re-read the file rather than receive 150 MB of pixels pickled.
        return {**self.__dict__, "_images": None}

    @property
    def num_classes(self) -> int:
        return 100


def _locate_cifar100(root: str) -> tuple[str, str]:
    root = os.path.expanduser(root or ".")
    candidates = [
        ("archive", root if root.endswith(".tar.gz") else os.path.join(root, CIFAR100_ARCHIVE)),
        ("folder", os.path.join(root, CIFAR100_FOLDER)),
        ("folder", root),
    ]
    for kind, path in candidates:
        if kind == "archive" and os.path.isfile(path):
            return kind, path
        if kind == "folder" and os.path.isfile(os.path.join(path, "train")) and os.path.isfile(os.path.join(path, "meta")):
            return kind, path
    raise FileNotFoundError(
        f"CIFAR-100 not found under data.root={root!r}: expected {CIFAR100_ARCHIVE} or an extracted "
        f"{CIFAR100_FOLDER}/ folder (with train, test, meta) there. Download the official CIFAR-100 python "
        f"archive into that folder, or point --config.data.root at the folder that holds it."
    )
