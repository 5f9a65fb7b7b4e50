"""Load the released I-JEPA weights into ijepa_jax.

    python -m ijepa_jax.convert --source IN1K-vit.h.14-300e.pth.tar --workdir runs/ref_vith14 \
        [--config configs/in1k_vith14.py]
    python -m ijepa_jax.convert --source ijepa_vith14_1k/ --export encoder.msgpack

Sources:
  * a checkpoint of the reference code (facebookresearch/ijepa): one torch file
    holding the encoder, predictor and target_encoder state dicts (names
    prefixed `module.` by DDP), the optimizer, epoch, loss, ... It is read
    without torch (`weight_files`: a restricted unpickler that runs no code
    from the file and reads only the tensors it converts);
  * a Hugging Face IJepaModel: model.safetensors (or its folder). An encoder
    alone; transformers converted the reference's ONLINE encoder.

The architecture (model size, patch, crop, predictor depth and width) is
inferred from the tensor shapes and checked against --config when given.
--workdir writes a step-0 checkpoint with a fresh optimizer (the reference's
epoch, loss, ... go to config.converted_from) that `evaluate --workdir`,
`checkpoint.init_from` and `tools/export_encoder` accept; --export writes the
target encoder alone (checkpoint.export_target_encoder's format).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from ijepa_jax import checkpoint, config_lib, optim
from ijepa_jax import step as step_lib
from ijepa_jax.models import vit
from ijepa_jax.weight_files import TensorRef, TorchFile, read_safetensors

# The reference's LayerNorm eps; our blocks hard-code the same value.
LAYER_NORM_EPS = 1e-6
# A stored position table may differ from ours by float32 rounding of the reference's float64 table.
POS_EMBED_ATOL = 1e-4

# ----------------------------------------------------------------------------
# the two layouts

# The tensors that give the architecture: patch conv, position table, first MLP, block index.
_PROBES = {
    "reference": ("patch_embed.proj.weight", "pos_embed", "blocks.{}.mlp.fc1.weight", r"blocks\.(\d+)\."),
    "huggingface": (
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.position_embeddings",
        "encoder.layer.{}.intermediate.dense.weight",
        r"encoder\.layer\.(\d+)\.",
    ),
}
# reference module -> Hugging Face module (blocks, then top level); qkv is split into three.
_HF_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_TOP = {"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
_HF_QKV = ("query", "key", "value")
_HF_HEADS = ("pooler.", "classifier.")  # heads of other HF classes: not part of the encoder


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the tensors say about the model."""

    name: str  # a key of vit.VIT_SIZES
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    grid: int  # patches per side
    pred_depth: int | None = None  # None: the source has no predictor
    pred_width: int | None = None

    @property
    def crop_size(self) -> int:
        return self.grid * self.patch_size


def _block_shapes(prefix: str, d: int, hidden: int) -> dict:
    shapes = {"norm1": (d,), "norm2": (d,)}
    linear = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (hidden, d), "mlp.fc2": (d, hidden)}
    out = {f"{prefix}{m}.{p}": s for m, s in shapes.items() for p in ("weight", "bias")}
    for m, (o, i) in linear.items():
        out.update({f"{prefix}{m}.weight": (o, i), f"{prefix}{m}.bias": (o,)})
    return out


def encoder_shapes(a: Arch) -> dict:
    """Reference names -> shapes of the encoder state dict."""
    d, p = a.embed_dim, a.patch_size
    out = {
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "pos_embed": (1, a.grid**2, d),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(a.depth):
        out.update(_block_shapes(f"blocks.{i}.", d, a.mlp_dim))
    return out


def predictor_shapes(a: Arch) -> dict:
    """Reference names -> shapes of the predictor state dict (MLP ratio 4, as vit_predictor)."""
    d, w = a.embed_dim, a.pred_width
    out = {
        "predictor_embed.weight": (w, d),
        "predictor_embed.bias": (w,),
        "mask_token": (1, 1, w),
        "predictor_pos_embed": (1, a.grid**2, w),
        "predictor_norm.weight": (w,),
        "predictor_norm.bias": (w,),
        "predictor_proj.weight": (d, w),
        "predictor_proj.bias": (d,),
    }
    for i in range(a.pred_depth):
        out.update(_block_shapes(f"predictor_blocks.{i}.", w, 4 * w))
    return out


def hf_names(name: str) -> list:
    """A reference encoder name -> its Hugging Face name(s): [query, key, value] for qkv."""
    if name == "pos_embed":
        return ["embeddings.position_embeddings"]
    module, leaf = name.rsplit(".", 1)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) == "attn.qkv":
        return [f"encoder.layer.{m.group(1)}.attention.attention.{q}.{leaf}" for q in _HF_QKV]
    if m:
        return [f"encoder.layer.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{leaf}"]
    return [f"{_HF_TOP[module]}.{leaf}"]


def _hf_shapes(reference: dict) -> dict:
    out = {}
    for name, shape in reference.items():
        names = hf_names(name)
        for n in names:
            out[n] = (shape[0] // len(names),) + shape[1:]
    return out


def from_hf(tensors: dict, a: Arch) -> dict:
    """A checked Hugging Face encoder -> reference names (q, k and v stacked into qkv)."""
    out = {}
    for name in encoder_shapes(a):
        parts = [tensors[n] for n in hf_names(name)]
        out[name] = parts[0] if len(parts) == 1 else _Concat(parts)
    return out


@dataclasses.dataclass(frozen=True)
class _Concat:  # q, k, v read and stacked only when used
    parts: list

    @property
    def shape(self):
        return (sum(p.shape[0] for p in self.parts),) + tuple(self.parts[0].shape[1:])

    def __array__(self, dtype=None, copy=None):
        return np.concatenate([np.asarray(p, dtype) for p in self.parts])


def check_tensors(tensors: dict, expected: dict, what: str) -> None:
    """Raise ValueError naming every missing, unexpected and mis-shaped tensor."""
    problems = {
        "missing": [n for n in expected if n not in tensors],
        "unexpected": [n for n in tensors if n not in expected],
        "wrong shape": [
            f"{n} {tuple(tensors[n].shape)} (expected {expected[n]})"
            for n in expected
            if n in tensors and tuple(tensors[n].shape) != expected[n]
        ],
    }
    found = [f"{label}: {', '.join(names)}" for label, names in problems.items() if names]
    if found:
        raise ValueError(f"{what} does not match the I-JEPA layout: " + "; ".join(found) + ".")


def _depth(names, pattern: str) -> int:
    indices = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
    return max(indices) + 1 if indices else 0


def infer_architecture(encoder: dict, predictor: dict | None, layout: str, where: str) -> Arch:
    """Model size, patch, grid (and predictor depth / width) from the tensor shapes."""
    patch, pos, fc1, pattern = _PROBES[layout]
    depth = _depth(encoder, pattern)
    needed = [patch, pos, fc1.format(0)]
    absent = [n for n in needed if n not in encoder]
    if absent or not depth:
        some = ", ".join(sorted(encoder)[:6])
        raise ValueError(
            f"{where}: cannot infer the architecture, {', '.join(absent) or 'the blocks'} missing "
            f"(it holds {len(encoder)} tensors: {some}, ...). Is it an I-JEPA encoder in the {layout} layout?"
        )
    d, channels, p, _ = encoder[patch].shape
    mlp_dim = encoder[fc1.format(0)].shape[0]
    n = encoder[pos].shape[1]
    grid = int(round(n**0.5))
    if channels != 3 or grid * grid != n:
        raise ValueError(
            f"{where}: {patch} {encoder[patch].shape} / {pos} {encoder[pos].shape}: not RGB, or not a square grid."
        )
    names = [k for k, (w, dep, _, r) in vit.VIT_SIZES.items() if w == d and dep == depth and int(w * r) == mlp_dim]
    if not names:
        known = ", ".join(f"{k} {w}/{dep}/{int(w * r)}" for k, (w, dep, _, r) in vit.VIT_SIZES.items())
        raise ValueError(
            f"{where}: width {d}, depth {depth}, MLP width {mlp_dim} is none of the known sizes "
            f"(width/depth/MLP: {known}); add it to ijepa_jax.models.vit.VIT_SIZES."
        )
    name = names[0]
    heads = vit.VIT_SIZES[name][2]
    arch = Arch(name, d, depth, heads, mlp_dim, p, grid)
    if predictor is None:
        return arch
    if "predictor_embed.weight" not in predictor:
        raise ValueError(f"{where}: the predictor has no predictor_embed.weight; cannot infer its width.")
    width = predictor["predictor_embed.weight"].shape[0]
    if width % heads or width % 4:
        raise ValueError(f"{where}: predictor width {width} is not divisible by 4 and by the {heads} heads of {name}.")
    return dataclasses.replace(arch, pred_depth=_depth(predictor, r"predictor_blocks\.(\d+)\."), pred_width=width)


# ----------------------------------------------------------------------------
# sources


@dataclasses.dataclass
class Source:
    """State dicts in reference names (arrays or TensorRefs), the architecture and provenance."""

    arch: Arch
    encoder: dict  # the online encoder
    target_encoder: dict
    predictor: dict | None
    info: dict  # format, path, and the reference's epoch, loss, batch_size, world_size, lr when given


def _strip(state: dict, prefix: str = "module.") -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def load_reference(path: str) -> Source:
    """A torch file of the reference code (or a bare encoder state dict saved with torch.save)."""
    top = TorchFile(path).load()
    if not isinstance(top, dict):
        raise ValueError(f"{path} holds a {type(top).__name__}, not a checkpoint dict.")
    if "encoder" not in top and "target_encoder" not in top:
        if not any(isinstance(v, TensorRef) for v in top.values()):
            raise ValueError(f"{path} has neither encoder nor target_encoder (its keys: {sorted(map(str, top))}).")
        top = {"encoder": top}  # a bare state dict
    states = {k: _strip(top[k]) for k in ("encoder", "target_encoder", "predictor") if isinstance(top.get(k), dict)}
    online = states.get("encoder", states.get("target_encoder"))
    target = states.get("target_encoder", online)
    predictor = states.get("predictor")
    arch = infer_architecture(target, predictor, "reference", path)
    for key, state in states.items():
        shapes = predictor_shapes(arch) if key == "predictor" else encoder_shapes(arch)
        check_tensors(state, shapes, f"{path} [{key}]")
    info = {
        "format": "reference",
        "path": os.path.abspath(path),
        "encoders": sorted(k for k in states if "encoder" in k),
    }
    for key in ("epoch", "loss", "batch_size", "world_size", "lr"):
        if isinstance(top.get(key), (int, float)):
            info[key] = top[key]
    return Source(arch, online, target, predictor, info)


def load_huggingface(path: str) -> Source:
    """An IJepaModel saved by transformers: model.safetensors, a sharded index, or their folder."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        path = index if os.path.isfile(index) else os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json) at {path}.")
    if path.endswith(".json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {k: v for s in shards for k, v in read_safetensors(os.path.join(folder, s)).items()}
    else:
        tensors = read_safetensors(path)
    _check_hf_config(os.path.join(folder, "config.json"))
    tensors = _strip(tensors, "ijepa.")  # IJepaForImageClassification nests the model under ijepa.
    heads = sorted(k for k in tensors if k.startswith(_HF_HEADS))
    if heads:
        logging.warning("ignoring %d tensors of a task head (%s, ...)", len(heads), heads[0])
    tensors = {k: v for k, v in tensors.items() if k not in heads}
    arch = infer_architecture(tensors, None, "huggingface", path)
    check_tensors(tensors, _hf_shapes(encoder_shapes(arch)), path)
    encoder = from_hf(tensors, arch)
    return Source(arch, encoder, encoder, None, {"format": "huggingface", "path": os.path.abspath(path)})


def _check_hf_config(path: str) -> None:
    """Settings of a transformers config.json that the tensors cannot show."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        c = json.load(f)
    expected = {"layer_norm_eps": LAYER_NORM_EPS, "hidden_act": "gelu", "qkv_bias": True}
    wrong = [f"{k}={c[k]!r} (ours: {v!r})" for k, v in expected.items() if k in c and c[k] != v]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)}; ijepa_jax's ViT cannot reproduce this model.")


def load_source(path: str) -> Source:
    """A reference torch checkpoint or a Hugging Face safetensors file / folder, by its content."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if os.path.isdir(path) or path.endswith((".safetensors", ".json")):
        return load_huggingface(path)
    return load_reference(path)


# ----------------------------------------------------------------------------
# reference tensors -> Flax parameters


def _f32(x) -> np.ndarray:
    return np.array(x, np.float32)  # an owned copy, not a view of a mapped file


# Flax parameter -> (reference name, transposed?): torch Linear weights are (out, in), Dense kernels (in, out).
def _dense(name):
    return {"kernel": (f"{name}.weight", True), "bias": (f"{name}.bias", False)}


def _norm(name):
    return {"scale": (f"{name}.weight", False), "bias": (f"{name}.bias", False)}


_BLOCK = {
    "norm1": _norm("norm1"),
    "attn": {"qkv": _dense("attn.qkv"), "proj": _dense("attn.proj")},
    "norm2": _norm("norm2"),
    "mlp": {"fc1": _dense("mlp.fc1"), "fc2": _dense("mlp.fc2")},
}
_is_spec = lambda x: isinstance(x, tuple)  # noqa: E731


def _leaf(sd, name, transposed):
    x = _f32(sd[name])
    return np.ascontiguousarray(x.T) if transposed else x


def _fill(sd, spec, put, prefix=""):
    return jax.tree.map(lambda s: put(_leaf(sd, prefix + s[0], s[1])), spec, is_leaf=_is_spec)


def _stack(sd, prefix, depth, scan, put):
    """Blocks unrolled ('blocks_i') or, for a scanned stack, each parameter stacked over a leading depth
    axis; built one parameter at a time, so only one of them is ever held twice."""
    if not scan:
        return {f"blocks_{i}": _fill(sd, _BLOCK, put, f"{prefix}{i}.") for i in range(depth)}
    stacked = lambda s: put(np.stack([_leaf(sd, f"{prefix}{i}.{s[0]}", s[1]) for i in range(depth)]))  # noqa: E731
    return {"blocks": jax.tree.map(stacked, _BLOCK, is_leaf=_is_spec)}


def _check_positions(sd, name, grid, where):
    """Our models compute the fixed sin-cos table; a stored one that differs is another model.
    (A table stored in 16 bits is off by its rounding, up to one ulp of 1.)"""
    stored = sd[name]
    table = _f32(stored)[0]
    tolerance = max(POS_EMBED_ATOL, float(ml_dtypes.finfo(stored.dtype).eps))
    gap = float(np.abs(table - vit.sincos_2d(table.shape[-1], grid, grid)).max())
    if gap > tolerance:
        raise ValueError(
            f"{where}: {name} differs from the fixed 2-D sin-cos table by {gap:.3g}: learned or "
            "interpolated positions, which ijepa_jax's ViT does not support."
        )


def encoder_params(sd: dict, a: Arch, scan: bool, where: str = "encoder", put=np.asarray) -> dict:
    """A reference encoder state dict -> the parameters of vit.Encoder, each passed through `put`
    (e.g. onto a device). The patch conv (D, C, p, p) becomes a Flax kernel (p, p, C, D)."""
    _check_positions(sd, "pos_embed", a.grid, where)
    kernel = np.ascontiguousarray(_f32(sd["patch_embed.proj.weight"]).transpose(2, 3, 1, 0))
    return {
        "patch_embed": {"kernel": put(kernel), "bias": put(_f32(sd["patch_embed.proj.bias"]))},
        "stack": _stack(sd, "blocks.", a.depth, scan, put),
        "norm": _fill(sd, _norm("norm"), put),
    }


def predictor_params(sd: dict, a: Arch, scan: bool, where: str = "predictor", put=np.asarray) -> dict:
    """A reference predictor state dict -> the parameters of vit.Predictor."""
    _check_positions(sd, "predictor_pos_embed", a.grid, where)
    top = {"predictor_embed": _dense("predictor_embed"), "predictor_norm": _norm("predictor_norm")}
    top.update(predictor_proj=_dense("predictor_proj"), mask_token=("mask_token", False))
    return {**_fill(sd, top, put), "stack": _stack(sd, "predictor_blocks.", a.pred_depth, scan, put)}


# ----------------------------------------------------------------------------
# config and train state


def config_for(a: Arch, config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`config` checked against the architecture, or the reference recipe for it (scanned, bf16)."""
    if config is None:
        config = config_lib.reference_recipe(a.name, a.patch_size, a.crop_size, epochs=300)
        if a.pred_depth is not None:
            config.model.update(pred_depth=a.pred_depth, pred_width=a.pred_width)
        return config
    ours = {"model.name": a.name, "model.patch_size": a.patch_size, "data.crop_size": a.crop_size}
    if a.pred_depth is not None:
        ours.update({"model.pred_depth": a.pred_depth, "model.pred_width": a.pred_width})
    differences = []
    for key, value in ours.items():
        section, name = key.split(".")
        if config[section][name] != value:
            differences.append(f"{key}: checkpoint {value!r}, config {config[section][name]!r}")
    if differences:
        raise ValueError("The checkpoint does not fit the config: " + "; ".join(differences) + ".")
    return config


def _abstract_state(config) -> tuple:
    """(shapes of the state train.build makes for `config`: same init, optimizer and tree; the models)."""
    s, grid = config.data.crop_size, config.data.crop_size // config.model.patch_size
    models = step_lib.make_models(config, grid)
    tx = optim.make_optimizer(config.optim, optim.make_schedules(config.optim, 1))
    shapes = {  # init_state reads only the shapes past the batch axis; its parameters ignore K, M and T
        "images": jax.ShapeDtypeStruct((1, s, s, 3), jnp.uint8),
        "context_idx": jax.ShapeDtypeStruct((1, 1), jnp.int32),
        "target_idx": jax.ShapeDtypeStruct((1, 1, 1), jnp.int32),
    }
    init = functools.partial(step_lib.init_state, models=models, tx=tx, batch_shapes=shapes)
    return jax.eval_shape(init, jax.random.key(config.seed)), models


def _fresh_predictor(models, config) -> dict:
    d = models.encoder.embed_dim
    idx = jnp.zeros((1, 1), jnp.int32)
    return models.predictor.init(
        jax.random.key(config.seed), jnp.zeros((1, 1, d)), idx, idx >= 0, idx[:, None], idx[:, None] >= 0
    )["params"]


def _check_tree(got, want, what):
    """Our mapping must give exactly the model's own parameter tree (else a bug here, not in the file)."""
    got_shapes = jax.tree.map(lambda x: tuple(x.shape), got)
    want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
    if got_shapes != want_shapes:
        raise AssertionError(f"converted {what} parameters do not fit the model: {got_shapes} vs {want_shapes}")


def train_state(source: Source, config) -> step_lib.TrainState:
    """Online encoder, predictor (fresh when the source has none), target encoder; step 0 and a fresh
    (all-zero) optimizer state. Device arrays, made one parameter at a time: orbax copies numpy
    leaves once more before writing them, device arrays it does not (on the CPU)."""
    abstract, models = _abstract_state(config)
    scan, put = config.model.scan_layers, jnp.asarray
    a = dataclasses.replace(source.arch, pred_depth=config.model.pred_depth, pred_width=config.model.pred_width)
    target = encoder_params(source.target_encoder, a, scan, "target_encoder", put)
    same = source.encoder is source.target_encoder
    online = target if same else encoder_params(source.encoder, a, scan, "encoder", put)
    if source.predictor is not None:
        predictor = predictor_params(source.predictor, a, scan, "predictor", put)
    else:
        logging.warning("the source has no predictor: a fresh one (seed %d) goes with the encoder", config.seed)
        predictor = _fresh_predictor(models, config)
    params = {"encoder": online, "predictor": predictor}
    _check_tree(params, abstract.params, "online")
    _check_tree(target, abstract.target_params, "target")
    opt_state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract.opt_state)
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, target_params=target, opt_state=opt_state)


def write_workdir(workdir: str, state, config) -> None:
    """The state as step 0 of WORKDIR/checkpoints, through the same helpers as a training run."""
    directory = checkpoint.checkpoint_dir(workdir)
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} already holds checkpoints; convert into a new --workdir.")
    manager = checkpoint.make_manager(workdir, config.checkpoint, steps_per_epoch=1)
    checkpoint.save(manager, 0, state, config)
    manager.wait_until_finished()
    manager.close()


def convert(source_path: str, workdir: str = "", export: str = "", config=None) -> dict:
    """Read, check and write; returns a summary (architecture, provenance, seconds)."""
    if not (workdir or export):
        raise ValueError("Give --workdir and/or --export: there is nothing to write.")
    t = time.perf_counter()
    source = load_source(source_path)
    config = ml_collections.ConfigDict(config_for(source.arch, config).to_dict())
    config.converted_from = source.info
    if workdir:
        write_workdir(workdir, train_state(source, config), config)
    if export:
        # Unrolled, whatever the config says: the export format holds 'blocks_i'.
        target = encoder_params(source.target_encoder, source.arch, scan=False, where="target_encoder")
        checkpoint.export_target_encoder(target, config, export)
    return {"arch": dataclasses.asdict(source.arch), **source.info, "seconds": time.perf_counter() - t}


def main(argv) -> None:
    del argv
    summary = convert(FLAGS.source, FLAGS.workdir, FLAGS.export, FLAGS.config)
    a = summary["arch"]
    pred = f", predictor {a['pred_depth']} x {a['pred_width']}" if a["pred_depth"] else ", no predictor"
    epoch = f", epoch {summary['epoch']}" if "epoch" in summary else ""
    model = f"{a['name']}/{a['patch_size']} at {a['grid'] * a['patch_size']}px"
    written = " and ".join(x for x in (FLAGS.workdir, FLAGS.export) if x)
    print(f"{summary['format']} checkpoint: {model}{pred}{epoch}; wrote {written} in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string("source", None, "A reference .pth.tar, or a Hugging Face model.safetensors / its folder.")
    flags.DEFINE_string("workdir", "", "Write a step-0 checkpoint here (a new folder).")
    flags.DEFINE_string("export", "", "Write the target encoder to this file (e.g. encoder.msgpack).")
    config_flags.DEFINE_config_file("config", None, "Config to check against (default: the reference recipe).")
    flags.mark_flag_as_required("source")
    app.run(main)
