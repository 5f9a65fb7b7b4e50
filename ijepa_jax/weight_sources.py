"""Read released I-JEPA weights into reference-named state dicts (`Source`), checking everything.

A reference checkpoint (facebookresearch/ijepa's .pth.tar: encoder, predictor,
target_encoder, DDP `module.` prefixes) or a Hugging Face IJepaModel /
IJepaForImageClassification (model.safetensors, a sharded index, or their
folder, in either layout transformers writes). The format is told by content,
not by the file name. Every bad input raises ValueError or FileNotFoundError
with one line naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile

from ijepa_jax import weight_layouts as layouts
from ijepa_jax.weight_files import TensorRef, TorchFile, describe, read_safetensors

# The reference's LayerNorm eps; our blocks hard-code the same value.
LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass
class Source:
    """State dicts in reference names (arrays or lazy refs), the architecture and provenance."""

    arch: layouts.Arch
    encoder: dict  # the online encoder
    target_encoder: dict
    predictor: dict | None
    info: dict  # format, path, and the reference's epoch, loss, batch_size, world_size, lr when given


def _state_dict(obj, where: str) -> dict:
    """A dict of tensors, `module.` prefixes stripped; anything else in the file is refused by name."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is {describe(obj)}, not a state dict.")
    bad = [f"{k!r} ({describe(v)})" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, TensorRef))]
    if bad:
        raise ValueError(f"{where} holds {len(bad)} entries that are not tensors: {', '.join(bad[:3])}.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_reference(path: str, online_as_target: bool = False) -> Source:
    """A torch file of the reference code (or a bare encoder state dict saved with torch.save, taken as
    the target encoder). A checkpoint without target_encoder is refused unless `online_as_target`."""
    top = TorchFile(path).load()
    if not isinstance(top, dict):
        raise ValueError(f"{path} holds {describe(top)}, not a checkpoint dict.")
    if "encoder" not in top and "target_encoder" not in top:
        if not top or not all(isinstance(v, TensorRef) for v in top.values()):
            raise ValueError(f"{path} has neither encoder nor target_encoder (its keys: {sorted(map(str, top))}).")
        top = {"target_encoder": top}  # a bare state dict: the encoder its owner chose
    keys = [k for k in ("encoder", "target_encoder", "predictor") if k in top]
    states = {k: _state_dict(top[k], f"{path} [{k}]") for k in keys}
    if "target_encoder" not in states:
        if not online_as_target:
            raise ValueError(
                f"{path} has no target_encoder (its keys: {sorted(map(str, top))}): its encoder is the online "
                "one, not the target (EMA) encoder the reference evaluates. Pass --online_as_target to use it anyway."
            )
        logging.warning("%s has no target_encoder: its ONLINE encoder is used as the target (--online_as_target)", path)
    online = states.get("encoder", states.get("target_encoder"))
    target = states.get("target_encoder", online)
    predictor = states.get("predictor")
    arch = layouts.infer_architecture(target, predictor, "reference", path)
    for key, state in states.items():
        shapes = layouts.predictor_shapes(arch) if key == "predictor" else layouts.encoder_shapes(arch)
        layouts.check_tensors(state, shapes, f"{path} [{key}]")
    info = {"format": "reference", "path": os.path.abspath(path)}
    info["encoders"] = sorted(k for k in states if "encoder" in k)
    for key in ("epoch", "loss", "batch_size", "world_size", "lr"):
        if isinstance(top.get(key), (int, float)) and not isinstance(top.get(key), bool):
            info[key] = top[key]
    return Source(arch, online, target, predictor, info)


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); expected {what}.") from e


def _hf_tensors(path: str, folder: str) -> dict:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    if not path.endswith(".json"):
        return read_safetensors(path)
    index = _read_json(path, "a model.safetensors.index.json")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path} has no weight_map of tensor -> shard file: not a model.safetensors.index.json.")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if os.path.dirname(os.path.normpath(shard)) or not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{path} names the shard {shard!r}, which is not a file beside it.")
        tensors.update(read_safetensors(shard_path))
    return tensors


def _check_hf_config(path: str) -> None:
    """Settings of a transformers config.json that the tensors cannot show."""
    if not os.path.isfile(path):
        return
    c = _read_json(path, "a transformers config.json")
    if not isinstance(c, dict):
        raise ValueError(f"{path} holds a JSON {type(c).__name__}, not a transformers config.")
    if c.get("model_type", "ijepa") != "ijepa":
        raise ValueError(f"{path}: a {c['model_type']!r} model, not an I-JEPA one (model_type 'ijepa').")
    expected = {"layer_norm_eps": LAYER_NORM_EPS, "hidden_act": "gelu", "qkv_bias": True}
    wrong = [f"{k}={c[k]!r} (ours: {v!r})" for k, v in expected.items() if k in c and c[k] != v]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)}; ijepa_jax's ViT cannot reproduce this model.")


def load_huggingface(path: str) -> Source:
    """An IJepaModel saved by transformers: model.safetensors, a sharded index, or their folder."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        path = index if os.path.isfile(index) else os.path.join(path, "model.safetensors")
        if not os.path.isfile(path):
            bin_note = ""
            if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
                bin_note = "; its pytorch_model.bin is not read: re-save with save_pretrained(safe_serialization=True)"
            raise FileNotFoundError(
                f"{folder} holds no model.safetensors (nor model.safetensors.index.json){bin_note}."
            )
    _check_hf_config(os.path.join(folder, "config.json"))
    tensors = _hf_tensors(path, folder)
    tensors = {k.removeprefix("ijepa."): v for k, v in tensors.items()}  # IJepaForImageClassification: ijepa.
    extras = sorted(k for k in tensors if k.startswith(layouts.HF_EXTRAS))
    if extras:
        logging.warning("ignoring %d tensors outside the encoder (%s, ...)", len(extras), extras[0])
    tensors = {k: v for k, v in tensors.items() if k not in extras}
    layout = layouts.hf_layout_of(tensors)
    arch = layouts.infer_architecture(tensors, None, layout, path)
    layouts.check_tensors(tensors, layouts.hf_shapes(layouts.encoder_shapes(arch), layout), path)
    logging.warning(
        "a Hugging Face IJepaModel holds one encoder (transformers converted the reference's online encoder): "
        "it serves as both online and target encoder"
    )
    encoder = layouts.from_hf(tensors, arch, layout)
    info = {"format": "huggingface", "layout": layout, "path": os.path.abspath(path)}
    return Source(arch, encoder, encoder, None, info)


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{"  # u64 header length, then the JSON header


def load_source(path: str, online_as_target: bool = False) -> Source:
    """A reference torch checkpoint or a Hugging Face safetensors file / index / folder, told by content."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if os.path.isdir(path) or path.endswith((".safetensors", ".json")):
        return load_huggingface(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file.")
    if zipfile.is_zipfile(path):
        return load_reference(path, online_as_target)
    if _looks_like_safetensors(path):
        return load_huggingface(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # a pickle: TorchFile says why it is not read
        TorchFile(path)
    if head == b"PK":
        raise ValueError(f"{path} starts as a zip file but has no readable zip directory: truncated or damaged?")
    raise ValueError(
        f"{path} is neither a torch zip file (a .pth.tar of the reference code) nor a safetensors file, "
        "nor a folder holding model.safetensors."
    )
