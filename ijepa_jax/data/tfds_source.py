"""A prepared TFDS dataset read by random access (ArrayRecord), without TensorFlow.

Encoded images (`tfds.features.Image`, or a bytes `Tensor`) are read as bytes
and decoded with `transforms.decode_image`, so a corrupt record raises
`BadImageError` for `sources.SkipBadImages` to skip or report. uint8 `Tensor`
images (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) come back as RGB.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from ijepa_jax import files
from ijepa_jax.data.transforms import BadImageError, decode_image

_LABEL_CHUNK = 4096  # records per batched read when collecting labels


class TfdsSource:
    """One split of a TFDS dataset prepared as ArrayRecord under `data_dir`.

    The dataset's metadata is checked in the constructor (missing dataset,
    split or feature keys are errors that say what to do); records are read
    on access. Pickling drops the open reader: grain workers re-open it.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str = "image", label_key: str = "label"):
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.data_dir = os.path.expanduser(data_dir) if data_dir else None
        where = f"TFDS dataset {name!r} (split {split!r}, data_dir {self.data_dir or '<TFDS default>'!r})"
        builder = _prepared_builder(name, self.data_dir, where)
        info, self._dataset_dir = builder.info, str(builder.data_dir)
        for role, key in (("image_key", image_key), ("label_key", label_key)):
            if key not in info.features:
                raise ValueError(
                    f"{where} has no feature {key!r}; its features are {sorted(info.features)}. Set {role}."
                )
        image, label = info.features[image_key], info.features[label_key]
        plain = type(image) is tfds.features.Tensor  # not ClassLabel, Text, ...
        if not (isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8
                or plain and image.shape == () and np.dtype(image.np_dtype).kind == "O"  # encoded bytes
                or plain and image.np_dtype == np.uint8 and len(image.shape) in (2, 3)):
            raise ValueError(f"{where}: feature {image_key!r} is {image!r}; expected a uint8 Image, encoded image "
                             "bytes, or a uint8 (H, W[, C]) Tensor. Set image_key.")
        integer = np.dtype(label.np_dtype).kind in "iu"
        if not (isinstance(label, tfds.features.Tensor) and label.shape == () and integer):
            raise ValueError(f"{where}: feature {label_key!r} is {label!r}; expected an integer label. Set label_key.")
        self._names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
        # Encoded images stay bytes (no TF/tfds decoding): we decode them, and skip them when reading labels.
        self._encoded = sorted(k for k, f in info.features.items() if isinstance(f, tfds.features.Image))
        try:
            self._source = self._open()
        except (ValueError, KeyError) as e:
            raise ValueError(f"{where}: no such split ({e}). Available splits: {sorted(info.splits)}; "
                             "set data.split to one of them (slices like 'train[:10%]' work too).") from e

    def _open(self):
        return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                                decoders={k: tfds.decode.SkipDecoding() for k in self._encoded})

    @property
    def _reader(self):
        if self._source is None:  # after unpickling, in a grain worker
            self._source = self._open()
        return self._source

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: int) -> dict:
        record = self._reader[index]
        return {"image": self._to_rgb(record[self.image_key], index), "label": int(record[self.label_key])}

    def _to_rgb(self, image, index: int) -> np.ndarray:
        name = f"{self.name}/{self.split}[{index}]"
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()
        if isinstance(image, bytes):
            return decode_image(image, name)
        image = np.asarray(image, np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise BadImageError(f"{name}: image array of shape {image.shape} is not (H, W[, 1|3|4])")
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]

    def __getstate__(self):
        return {**self.__dict__, "_source": None}  # open ArrayRecord readers stay in this process

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Every record's label (int32). Read once per dataset, split and label key, with image decoding
        skipped (a pass over every record: minutes for ImageNet), then kept in a cache file that
        later starts, resumes, other processes and evaluations load instead (`label_cache_paths`)."""
        n = len(self._reader)
        paths = self.label_cache_paths()
        for path in paths:
            labels = _load_labels(path, n)
            if labels is not None:
                return labels
        labels = np.empty(n, np.int32)
        for start in range(0, n, _LABEL_CHUNK):
            records = self._reader.__getitems__(list(range(start, min(start + _LABEL_CHUNK, n))))
            labels[start : start + len(records)] = [r[self.label_key] for r in records]
        for path in paths:
            if _save_labels(path, labels):
                break
        return labels

    def label_cache_paths(self) -> list[str]:
        """Where the labels are cached: beside the prepared dataset, or (read-only dataset) in the
        user's cache folder. The name holds the split and label key; the file, the record count."""
        split = hashlib.sha1(f"{self.split}|{self.label_key}".encode()).hexdigest()[:12]
        name = f"ijepa_jax_labels_{split}.npy"
        user = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ijepa_jax", "labels")
        dataset = hashlib.sha1(self._dataset_dir.encode()).hexdigest()[:12]
        return [os.path.join(self._dataset_dir, name), os.path.join(user, f"{self.name}_{dataset}_{split}.npy")]

    @functools.cached_property
    def class_names(self) -> list[str]:
        """The label feature's class names; "0", "1", ... when it has none."""
        return self._names or [str(i) for i in range(int(self.labels.max(initial=-1)) + 1)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _load_labels(path: str, num_records: int) -> np.ndarray | None:
    """Cached labels, or None if absent, unreadable or of another record count (then read afresh)."""
    try:
        with files.path(path).open("rb") as f:
            labels = np.load(f)
    except Exception:  # absent, or a partial or foreign file: reading the records again is always safe
        return None
    return labels.astype(np.int32) if labels.shape == (num_records,) else None


def _save_labels(path: str, labels: np.ndarray) -> bool:
    """Writes whole (files.write_bytes); False where the folder is not writable."""
    buffer = io.BytesIO()
    np.save(buffer, labels)
    try:
        files.write_bytes(path, buffer.getvalue())
        return True
    except Exception as e:  # read-only or remote without write access: try the next place
        logging.info("could not cache labels at %s: %s", path, e)
        return False


def _prepared_builder(name: str, data_dir: str | None, where: str):
    """The dataset's builder, or a FileNotFoundError/ValueError that says how to prepare it."""
    shown = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    hint = (f"Prepare it with `tfds build {name} --data_dir {shown} --file_format=array_record`, "
            "or point --config.data.tfds_data_dir at the folder that holds it.")
    if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{where}: data_dir {data_dir!r} does not exist. {hint}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:  # unknown name/config/version: tfds lists every registered dataset, keep one line
        found = sorted(os.listdir(data_dir)) if data_dir and os.path.isdir(data_dir) else []
        raise FileNotFoundError(f"{where} not found ({str(e).splitlines()[0]}); datasets in data_dir: {found}. "
                                f"{hint}") from e
    if not prepared:
        raise FileNotFoundError(f"{where} is not prepared (nothing at {builder.data_dir}). {hint}")
    file_format = getattr(builder.info.file_format, "value", "tfrecord")  # tfds's default
    if file_format not in ("array_record", "parquet"):
        raise ValueError(f"{where} is prepared as {file_format}, which has no random access. "
                         f"Prepare it again with `tfds build {name} --data_dir {shown} --file_format=array_record`.")
    return builder
