"""Tensors from weight files, without torch: the torch zip/pickle format and safetensors.

`TorchFile(path).load()` unpickles a torch.save file with a restricted
unpickler that runs no code from the file: tensors come back as `TensorRef`s
that read their bytes from the zip only when asked, so a checkpoint's
optimizer state is never read. `read_safetensors` / `write_safetensors` use
the safetensors package (it checks the header against the file's length).

A file that cannot be read raises ValueError naming the file and the problem
(never struct.error, OverflowError, MemoryError, ...): the command-line tools
print it as one line.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
import zlib

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

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


def describe(obj) -> str:
    """What an unpickled object is, for messages ('a call of os.system (not run)', 'a value of type int')."""
    if isinstance(obj, InvalidTensor):
        return f"an invalid tensor ({obj.reason})"
    return f"a call of {obj.origin} (not run)" if isinstance(obj, _Opaque) else f"a value of type {type(obj).__name__}"


@dataclasses.dataclass(frozen=True)
class InvalidTensor:
    """A tensor record whose numbers cannot describe a tensor: refused only if a state dict uses it."""

    reason: str


def _naturals(x) -> bool:
    return isinstance(x, (tuple, list)) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in x)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *, dtype=None):
    # Checked here: TensorRef.read views raw bytes with these numbers (as_strided trusts them).
    if not isinstance(storage, _Storage):
        return InvalidTensor(f"built on {describe(storage)}, not a storage record")
    if not (_naturals((offset,)) and _naturals(size) and _naturals(stride) and len(size) == len(stride)):
        return InvalidTensor(f"offset {offset!r}, size {size!r}, stride {stride!r}")
    if dtype is not None and not isinstance(dtype, np.dtype):
        return InvalidTensor(f"the unsupported dtype {dtype!r}")
    return _PendingTensor(storage, np.dtype(dtype or storage.dtype), offset, tuple(size), tuple(stride))


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


# Whatever a crafted pickle makes the unpickler (or our stand-ins) raise is a bad file, not a bug.
_UNPICKLING_ERRORS = (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, ValueError)
_UNPICKLING_ERRORS += (struct.error, OverflowError, MemoryError, RecursionError, zipfile.BadZipFile, zlib.error)


class TorchFile:
    """A file written by torch.save (the zip format of torch >= 1.6), read with numpy.

    `load()` returns the saved object with every tensor as a TensorRef; tensor
    data is read only when a TensorRef is converted, so the optimizer state of
    a reference checkpoint (twice the model) is never read.
    """

    def __init__(self, path: str):
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                pickled = f.read(1) == b"\x80"  # a pickle's PROTO opcode
            what = "a plain pickle (pickle.dump, or torch.save's pre-1.6 format)" if pickled else "not a torch zip file"
            raise ValueError(
                f"{path} is {what}; only the zip format of torch >= 1.6 is read (never a bare pickle: unpickling "
                "one can run code). Re-save it with a recent torch: torch.save(torch.load(old), new)."
            )
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ValueError(f"{path} is a damaged zip file ({e}).") from e
        pickles = [n for n in self.zip.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl record in the torch zip file, found {pickles}.")
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{self.prefix}byteorder"
        if byteorder in self.zip.namelist() and self.zip.read(byteorder).decode().strip() != "little":
            raise ValueError(f"{path} was written on a big-endian machine; re-save it on a little-endian one.")

    def load(self):
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
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise ValueError(f"unknown persistent record {pid!r}")
                _, dtype, key, _, _ = pid  # ('storage', type, key, location, numel)
                if not isinstance(dtype, np.dtype):
                    raise ValueError(f"storage {key} has an unsupported type {dtype!r}")
                return _Storage(str(key), dtype)

        try:
            with self.zip.open(f"{self.prefix}data.pkl") as f:
                obj = Unpickler(f).load()
        except _UNPICKLING_ERRORS as e:
            raise ValueError(f"{self.path}: data.pkl is not a checkpoint pickle ({type(e).__name__}: {e}).") from e
        return _bind(obj, self)

    def read(self, ref: TensorRef) -> np.ndarray:
        name = f"{self.prefix}data/{ref.storage.key}"
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
        nbytes = int(np.prod(ref.shape, dtype=object)) * ref.dtype.itemsize
        try:
            size = self.zip.getinfo(name).file_size
        except KeyError:
            raise ValueError(f"{self.path}: a tensor's storage record {name} is missing.") from None
        if min(ref.shape, default=1) > 0 and (extent * ref.dtype.itemsize > size or nbytes > size):
            raise ValueError(
                f"{self.path}: a tensor of shape {ref.shape} runs past the end of its storage record {name} "
                f"({size} bytes)."
            )
        try:
            raw = self.zip.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, MemoryError) as e:
            raise ValueError(f"{self.path}: cannot read the record {name} ({type(e).__name__}: {e}).") from e
        flat = np.frombuffer(raw, ref.dtype, count=len(raw) // ref.dtype.itemsize)
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
# safetensors, through the safetensors package

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


@dataclasses.dataclass(frozen=True)
class SafeTensorRef:
    """A tensor of a safetensors file, read on demand (np.asarray): only the tensors converted are read."""

    file: object  # an open safetensors.safe_open handle
    path: str
    name: str
    dtype: np.dtype
    shape: tuple

    def __array__(self, dtype=None, copy=None):
        try:
            x = self.file.get_tensor(self.name)
        except (safetensors.SafetensorError, OSError, MemoryError) as e:
            raise ValueError(f"{self.path}: cannot read tensor {self.name} ({e}).") from e
        return x.astype(dtype or self.dtype, copy=False)


def read_safetensors(path: str) -> dict:
    """name -> SafeTensorRef. The package checks the header (sizes, offsets, overflow) against the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No safetensors file at {path}.")
    try:
        file = safetensors.safe_open(path, framework="np")
        slices = {name: file.get_slice(name) for name in file.keys()}
        specs = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}).") from e
    out = {}
    for name, (dtype, shape) in specs.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has the unsupported dtype {dtype}.")
        out[name] = SafeTensorRef(file, path, name, np.dtype(_SAFETENSORS_DTYPES[dtype]), shape)
    return out


def write_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> str:
    """numpy arrays -> a safetensors file (metadata format 'pt': what transformers' loader expects)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    safetensors.numpy.save_file(arrays, path, metadata={"format": "pt", **(metadata or {})})
    return path
