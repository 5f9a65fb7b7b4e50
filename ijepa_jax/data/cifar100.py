"""CIFAR-100 from the official python archive (the .tar.gz itself or its extracted folder)."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np

CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # published with the official archive
CIFAR100_SIZE = "161 MiB"


class Cifar100Source:
    """CIFAR-100 from the official python archive: the .tar.gz itself or its extracted folder.

    `root` may be the archive, the extracted `cifar-100-python/` folder, or a
    folder that holds either; with `download`, a missing archive is fetched
    into `root` (checked against the official checksum), which is created if
    need be. Without it nothing is created or fetched: a `root` that does not
    exist, or holds neither, is a FileNotFoundError naming it. The arrays are
    loaded in the constructor (so a missing or corrupt file fails at start-up)
    and re-loaded lazily in grain worker processes instead of being pickled.
    An existing archive is not checksummed: re-packed copies with the same
    contents are fine.
    """

    def __init__(self, root: str, split: str = "train", download: bool = False):
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR-100 has splits 'train' and 'test', not {split!r} (set data.split).")
        self.root, self.split = root, split
        try:
            self._location = _locate_cifar100(root)
        except FileNotFoundError as e:
            if not download:
                where = os.path.expanduser(root or ".")
                if not os.path.exists(where):
                    raise FileNotFoundError(
                        f"data.root={root!r} does not exist; check --config.data.root, or pass "
                        f"--config.data.download=True to download CIFAR-100 there ({CIFAR100_SIZE})."
                    ) from None
                raise FileNotFoundError(
                    f"{e} Or pass --config.data.download=True to download it there ({CIFAR100_SIZE})."
                ) from None
            download_cifar100(root)
            self._location = _locate_cifar100(root)
        self._images, self.labels, self.class_names = self._load()

    def _load(self):
        kind, path = self._location
        try:
            if kind == "archive":
                with tarfile.open(path, "r:gz") as tar:
                    entry, meta = (_unpickle(tar.extractfile(f"{CIFAR100_FOLDER}/{n}")) for n in (self.split, "meta"))
            else:
                entry, meta = (_unpickle(open(os.path.join(path, n), "rb")) for n in (self.split, "meta"))
            data = np.asarray(entry[b"data"], np.uint8)
            labels = np.asarray(entry[b"fine_labels"], np.int32)
            class_names = [n.decode() for n in meta[b"fine_label_names"]]
        except Exception as e:  # a damaged pickle can raise almost anything; all of it means "corrupt"
            raise ValueError(
                f"Could not read the CIFAR-100 {self.split!r} split from {path} ({type(e).__name__}: {e}). "
                "The file looks corrupt or incomplete: download the official cifar-100-python.tar.gz again."
            ) from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"{path}: unexpected CIFAR-100 layout (data {data.shape}, {len(labels)} labels).")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes
        return np.ascontiguousarray(images), labels, class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        if self._images is None:
            self._images = self._load()[0]
        return {"image": self._images[index], "label": int(self.labels[index])}

    def __getstate__(self):
        # Workers re-read the file rather than receive 150 MB of pixels pickled.
        return {**self.__dict__, "_images": None}


def _unpickle(f) -> dict:
    if f is None:
        raise KeyError("member missing from the archive")
    with f:
        entry = pickle.load(f, encoding="bytes")
    if not isinstance(entry, dict):
        raise TypeError(f"expected a dict, found {type(entry).__name__}")
    return entry


def download_cifar100(root: str, timeout_s: float = 60) -> str:
    """Fetch the official archive into `root`; verify its checksum before it gets its final name."""
    url, md5 = CIFAR100_URL, CIFAR100_MD5
    root = os.path.expanduser(root or ".")
    target = os.path.join(root, CIFAR100_ARCHIVE)
    partial = target + ".part"
    logging.warning("CIFAR-100 not found in %s; downloading %s", root, url)
    try:
        os.makedirs(root, exist_ok=True)
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        _remove(partial)
        raise FileNotFoundError(
            f"CIFAR-100 is not in {root} and downloading it from {url} failed ({e}). Without network "
            f"access, copy {CIFAR100_ARCHIVE} into {root} (or set --config.data.root to where it is)."
        ) from e
    if digest.hexdigest() != md5:
        _remove(partial)
        raise ValueError(f"The download from {url} has md5 {digest.hexdigest()}, expected {md5}; nothing was kept.")
    os.replace(partial, target)
    return target


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


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
