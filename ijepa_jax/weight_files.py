"""Tensors from weight files, without torch: the torch zip/pickle format and safetensors.

`TorchFile(path).load()` unpickles a torch.save file with a restricted
unpickler that runs no code from the file: tensors come back as `TensorRef`s
that read their bytes from the zip only when asked, so a checkpoint's
optimizer state is never read. `read_safetensors(path)` parses the
safetensors format with numpy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

# ----------------------------------------------------------------------------
# reading torch files without torch

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,  # bytes; the tensor then names its dtype (_rebuild_tensor_v3)
}
_TORCH_DTYPES = {
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
    "double": np.float64,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str  # the zip record data/<key>
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor of a torch file, read on demand (np.asarray) from its storage record."""

    file: TorchFile
    storage: _Storage
    dtype: np.dtype
    offset: int  # in elements of dtype, as are the strides
    shape: tuple
    stride: tuple

    def __array__(self, dtype=None, copy=None):
        return self.file.read(self).astype(dtype or self.dtype, copy=False)


class _Opaque:
    """Stands for any object the file names that a state dict does not need: built from its
    arguments without running anything (a restricted unpickler's usual refusal would make one
    unknown entry, e.g. an AMP scaler's state, fail the whole file)."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __setitem__(self, key, value):
        pass


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *, dtype=None):
    dtype = np.dtype(dtype or storage.dtype)
    return _PendingTensor(storage, dtype, int(offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class _PendingTensor:  # a TensorRef before the unpickler hands it its file
    storage: _Storage
    dtype: np.dtype
    offset: int
    shape: tuple
    stride: tuple


_REBUILDERS = {
    "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": lambda data, *args: data,
    "_rebuild_parameter_with_state": lambda data, *args: data,
}


class TorchFile:
    """A file written by torch.save (the zip format of torch >= 1.6), read with numpy.

    `load()` returns the saved object with every tensor as a TensorRef; tensor
    data is read only when a TensorRef is converted, so the optimizer state of
    a reference checkpoint (twice the model) is never read.
    """

    def __init__(self, path: str):
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is not a torch zip file: torch.save's legacy (pre-1.6) format or not a torch file. "
                "Re-save it with a recent torch: torch.save(torch.load(old), new)."
            )
        self.path = path
        self.zip = zipfile.ZipFile(path)
        pickles = [n for n in self.zip.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl record in the torch zip file, found {pickles}.")
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{self.prefix}byteorder"
        if byteorder in self.zip.namelist() and self.zip.read(byteorder).decode().strip() != "little":
            raise ValueError(f"{path} was written on a big-endian machine; re-save it on a little-endian one.")

    def load(self):
        file = self

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if module == "torch._utils" and name in _REBUILDERS:
                    return _REBUILDERS[name]
                if module == "torch" and name in _STORAGE_DTYPES:
                    return np.dtype(_STORAGE_DTYPES[name])
                if module == "torch" and name in _TORCH_DTYPES:
                    return np.dtype(_TORCH_DTYPES[name])
                return type(name, (_Opaque,), {"origin": f"{module}.{name}"})

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                    raise ValueError(f"{file.path}: unknown persistent record {pid!r}.")
                _, dtype, key, _, _ = pid  # ('storage', type, key, location, numel)
                if not isinstance(dtype, np.dtype):
                    raise ValueError(f"{file.path}: storage {key} has an unsupported type {dtype!r}.")
                return _Storage(str(key), dtype)

        with self.zip.open(f"{self.prefix}data.pkl") as f:
            obj = Unpickler(f).load()
        return _bind(obj, self)

    def read(self, ref: TensorRef) -> np.ndarray:
        raw = self.zip.read(f"{self.prefix}data/{ref.storage.key}")
        flat = np.frombuffer(raw, ref.dtype)
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
        if min(ref.shape, default=1) > 0 and extent > flat.size:
            raise ValueError(f"{self.path}: a tensor runs past the end of its storage record {ref.storage.key}.")
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :], ref.shape, [s * flat.itemsize for s in ref.stride], writeable=False
        )
        return np.array(view)


def _bind(obj, file):
    """Pending tensors -> TensorRefs of `file`, through dicts, lists and tuples."""
    if isinstance(obj, _PendingTensor):
        return TensorRef(file, obj.storage, obj.dtype, obj.offset, obj.shape, obj.stride)
    if isinstance(obj, dict):
        return {k: _bind(v, file) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_bind(v, file) for v in obj) if type(obj) in (list, tuple) else obj
    return obj


# ----------------------------------------------------------------------------
# reading safetensors (8-byte header length, JSON header, raw little-endian data)

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict:
    """name -> read-only array mapped from the file (read when used)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file ({e}).") from e
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has the unsupported dtype {info['dtype']}.")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or end > data.size:
            raise ValueError(f"{path}: tensor {name}'s byte range does not fit its shape {shape} or the file.")
        out[name] = data[begin:end].view(dtype).reshape(shape)
    return out
