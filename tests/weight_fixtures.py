"""Weight files for the convert / hf_export tests, written without torch and without the code under test.

Torch zip files by a small pickler (what torch.save writes: archive/data.pkl with tensors as
_rebuild_tensor_v2 of persistent storages), safetensors files by hand (so malformed ones can be made
too), and state dicts with the names and shapes of the reference's released checkpoints, from random
tensors; `to_hf` is the Hugging Face renaming written out independently of ijepa_jax.weight_layouts.
"""

import collections
import io
import json
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

import numpy_ijepa
from conftest import small_config

# --------------------------------------------------------------------------- torch zip files, written without torch


class _Global:
    """A pickle GLOBAL written by name (torch need not be importable to name its functions)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that a reduce function be callable
        raise NotImplementedError


class _Call:
    """Pickles as `function(*args)`."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class _Strided:
    """A tensor that views `base` (flat storage) at `offset` with `shape` / `stride` (in elements)."""

    def __init__(self, base, offset, shape, stride):
        self.base, self.offset, self.shape, self.stride = np.ascontiguousarray(base).ravel(), offset, shape, stride


_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.uint8): "ByteStorage",
}


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler: its save() can be extended
    def __init__(self, f, records):
        super().__init__(f, protocol=2)
        self.records = records

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__storage__":
            flat = obj[1]
            key = str(len(self.records))
            self.records[key] = flat.tobytes()
            return ("storage", _Global("torch", _STORAGE_NAMES[flat.dtype]), key, "cpu", flat.size)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            obj = _Strided(obj, 0, obj.shape, tuple(s // obj.itemsize for s in np.ascontiguousarray(obj).strides))
        if isinstance(obj, _Strided):
            args = (
                ("__storage__", obj.base),
                obj.offset,
                tuple(obj.shape),
                tuple(obj.stride),
                False,
                collections.OrderedDict(),
            )
            return _Global("torch._utils", "_rebuild_tensor_v2"), args
        return NotImplemented


def save_torch(obj, path):
    """`obj` (dicts, numpy arrays as tensors, _Strided views) as torch.save writes it: a zip holding
    archive/data.pkl (tensors as _rebuild_tensor_v2 of persistent storages), archive/data/<key>, version."""
    records, buf = {}, io.BytesIO()
    _TorchPickler(buf, records).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


def save_safetensors(tensors, path):
    """The safetensors layout: u64 header length, JSON header (dtype, shape, byte range), raw data."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, x in tensors.items():
        data = np.ascontiguousarray(x).tobytes()
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# --------------------------------------------------------------------------- reference-layout state dicts


def _rand(rng, shape, kind):
    if kind == "weight":  # N(0, 1/fan_in): far from linear, so a wrong layout shows
        return rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
    if kind == "bias":
        return rng.normal(0, 0.1, shape)
    return 1.0 + rng.normal(0, 0.2, shape)  # LayerNorm scale


def _blocks(rng, prefix, depth, d, hidden):
    sd = {}
    for i in range(depth):
        b = f"{prefix}{i}."
        for norm in ("norm1", "norm2"):
            sd[b + norm + ".weight"], sd[b + norm + ".bias"] = _rand(rng, (d,), "scale"), _rand(rng, (d,), "bias")
        for name, (o, n) in {
            "attn.qkv": (3 * d, d),
            "attn.proj": (d, d),
            "mlp.fc1": (hidden, d),
            "mlp.fc2": (d, hidden),
        }.items():
            sd[b + name + ".weight"], sd[b + name + ".bias"] = _rand(rng, (o, n), "weight"), _rand(rng, (o,), "bias")
    return sd


def reference_encoder(rng, d, depth, hidden, patch, grid):
    """The names and shapes of the reference VisionTransformer's state_dict (pos_embed: the sin-cos table)."""
    sd = {
        "pos_embed": numpy_ijepa.sincos_table(d, grid, grid)[None],
        "patch_embed.proj.weight": _rand(rng, (d, 3, patch, patch), "weight"),
        "patch_embed.proj.bias": _rand(rng, (d,), "bias"),
        **_blocks(rng, "blocks.", depth, d, hidden),
        "norm.weight": _rand(rng, (d,), "scale"),
        "norm.bias": _rand(rng, (d,), "bias"),
    }
    return {k: v.astype(np.float32) for k, v in sd.items()}


def reference_predictor(rng, d, width, depth, grid):
    """The names and shapes of the reference VisionTransformerPredictor's state_dict (MLP ratio 4)."""
    sd = {
        "predictor_embed.weight": _rand(rng, (width, d), "weight"),
        "predictor_embed.bias": _rand(rng, (width,), "bias"),
        "mask_token": rng.normal(0, 0.5, (1, 1, width)),
        "predictor_pos_embed": numpy_ijepa.sincos_table(width, grid, grid)[None],
        **_blocks(rng, "predictor_blocks.", depth, width, 4 * width),
        "predictor_norm.weight": _rand(rng, (width,), "scale"),
        "predictor_norm.bias": _rand(rng, (width,), "bias"),
        "predictor_proj.weight": _rand(rng, (d, width), "weight"),
        "predictor_proj.bias": _rand(rng, (d,), "bias"),
    }
    return {k: v.astype(np.float32) for k, v in sd.items()}


def ddp(sd):
    return collections.OrderedDict((f"module.{k}", v) for k, v in sd.items())


# (width, depth, heads, MLP width, patch, grid, predictor width, predictor depth)
MICRO = (64, 2, 2, 256, 4, 4, 32, 1)  # ViT-micro/4 at 16px, predictor 1 x 32 (conftest.small_config's model)
HUGE14 = (1280, 2, 16, 5120, 14, 16, 384, 1)  # ViT-H/14 at 224 with 2 of its 32 blocks
GIANT16 = (1408, 1, 16, 6144, 16, 14, 384, 1)  # ViT-g/16 at 224 with 1 of its 40 blocks
MICRO_ARCH = {
    "model.name": "vit_micro",
    "model.patch_size": 4,
    "data.crop_size": 16,
    "model.pred_depth": 1,
    "model.pred_width": 32,
}


def micro_config(**overrides):
    """conftest.small_config with the MICRO architecture pinned (whatever small_config's defaults become)."""
    return small_config(**{**MICRO_ARCH, **overrides})


def reference_checkpoint(dims, seed=0):
    """The dict the reference's save_checkpoint writes: DDP-prefixed state dicts, an AdamW state, scalars.
    The online and target encoders differ, so that swapping them shows."""
    d, depth, _, hidden, patch, grid, width, pred_depth = dims
    rng = np.random.default_rng(seed)
    enc = reference_encoder(rng, d, depth, hidden, patch, grid)
    tgt = reference_encoder(rng, d, depth, hidden, patch, grid)
    pred = reference_predictor(rng, d, width, pred_depth, grid)
    opt = {
        "state": {0: {"step": np.array(10.0, np.float32), "exp_avg": np.zeros(3, np.float32)}},
        "param_groups": [{"lr": 1e-3, "params": [0]}],
    }
    return {
        "encoder": ddp(enc),
        "predictor": ddp(pred),
        "target_encoder": ddp(tgt),
        "opt": opt,
        "scaler": None,
        "epoch": 300,
        "loss": 0.0731,
        "batch_size": 128,
        "world_size": 16,
        "lr": 1.05e-6,
    }


def plain(sd):
    return {k.removeprefix("module."): v for k, v in sd.items()}


def to_hf(sd):
    """A reference encoder state dict in the Hugging Face IJepaModel layout (transformers' conversion:
    qkv split into query / key / value; renamed modules)."""
    out = {}
    for name, x in sd.items():
        if name == "pos_embed":
            out["embeddings.position_embeddings"] = x
        elif name.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + name.split(".")[-1]] = x
        elif name.startswith("norm."):
            out["layernorm." + name.split(".")[-1]] = x
        else:
            _, i, *module, leaf = name.split(".")
            module = ".".join(module)
            if module == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), np.split(x, 3)):
                    out[f"encoder.layer.{i}.attention.attention.{part}.{leaf}"] = chunk
                continue
            hf = {
                "norm1": "layernorm_before",
                "norm2": "layernorm_after",
                "attn.proj": "attention.output.dense",
                "mlp.fc1": "intermediate.dense",
                "mlp.fc2": "output.dense",
            }[module]
            out[f"encoder.layer.{i}.{hf}.{leaf}"] = x
    return out


def to_hf_layers(sd):
    """The layout of transformers' save_pretrained(save_original_format=False): layers.N.attention.q_proj,
    o_proj, mlp.fc1 / fc2 (the names IJepaModel's modules have in transformers 5)."""
    renames = [
        ("encoder.layer.", "layers."),
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ]
    out = {}
    for name, x in to_hf(sd).items():
        for old, new in renames:
            if old in name and not (old == "output.dense" and "attention." in name):
                name = name.replace(old, new)
        out[name] = x
    return out


def safetensors_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand, malformed on purpose when asked: `length` overrides the header length."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data
