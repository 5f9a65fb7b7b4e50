"""Names and shapes of I-JEPA weights in the layouts `convert` reads and `hf_export` writes.

Everything is expressed in the reference's names (facebookresearch/ijepa's
state dicts): the two Hugging Face layouts are renamings of them, q, k and v
split out of qkv. transformers' save_pretrained writes the original layout
(`encoder.layer.N.attention.attention.query`, ...) by default and the newer
one (`layers.N.attention.q_proj`, `mlp.fc1`, ...) with save_original_format=False.
The architecture is inferred from the shapes, so nothing is taken on trust.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ijepa_jax.models import vit


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """A Hugging Face IJepaModel layout: block prefix, q/k/v modules, reference module -> its module."""

    block: str  # "encoder.layer.{}."
    qkv: tuple
    modules: dict


_TOP = {"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
HF_LAYOUTS = {
    "huggingface": HFLayout(
        "encoder.layer.{}.",
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        },
    ),
    "huggingface_layers": HFLayout(  # save_original_format=False (transformers >= 5)
        "layers.{}.",
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
    ),
}
# Tensors of other IJepa classes and options, not part of the encoder: pooler, classifier, mask token.
HF_EXTRAS = ("pooler.", "classifier.", "embeddings.mask_token")


def _probes(layout: str) -> tuple:
    """The tensors that give the architecture: patch conv, position table, first MLP, block index."""
    if layout == "reference":
        return "patch_embed.proj.weight", "pos_embed", "blocks.{}.mlp.fc1.weight", r"blocks\.(\d+)\."
    hf = HF_LAYOUTS[layout]
    fc1 = hf.block + hf.modules["mlp.fc1"] + ".weight"
    block = re.escape(hf.block).replace(r"\{\}", r"(\d+)")
    return hf_names("patch_embed.proj.weight")[0], "embeddings.position_embeddings", fc1, block


def hf_layout_of(names) -> str:
    """Which Hugging Face layout a set of tensor names is in (the original one when neither shows)."""
    return "huggingface_layers" if any(n.startswith("layers.") for n in names) else "huggingface"


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


def hf_names(name: str, layout: str = "huggingface") -> list:
    """A reference encoder name -> its Hugging Face name(s): [query, key, value] for qkv."""
    if name == "pos_embed":
        return ["embeddings.position_embeddings"]
    hf = HF_LAYOUTS[layout]
    module, leaf = name.rsplit(".", 1)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) == "attn.qkv":
        return [f"{hf.block.format(m.group(1))}{q}.{leaf}" for q in hf.qkv]
    if m:
        return [f"{hf.block.format(m.group(1))}{hf.modules[m.group(2)]}.{leaf}"]
    return [f"{_TOP[module]}.{leaf}"]


def hf_shapes(reference: dict, layout: str) -> dict:
    """Reference names -> shapes, renamed to a Hugging Face layout (q, k, v a third of qkv each)."""
    out = {}
    for name, shape in reference.items():
        names = hf_names(name, layout)
        for n in names:
            out[n] = (shape[0] // len(names),) + shape[1:]
    return out


def from_hf(tensors: dict, a: Arch, layout: str) -> dict:
    """A checked Hugging Face encoder -> reference names (q, k and v stacked into qkv when read)."""
    out = {}
    for name in encoder_shapes(a):
        parts = [tensors[n] for n in hf_names(name, layout)]
        out[name] = parts[0] if len(parts) == 1 else _Concat(parts)
    return out


def to_hf(reference: dict, layout: str = "huggingface") -> dict:
    """A reference encoder state dict (numpy) -> Hugging Face names, qkv split into q, k, v."""
    out = {}
    for name, x in reference.items():
        names = hf_names(name, layout)
        out.update(zip(names, np.split(np.asarray(x), len(names))))
    return out


@dataclasses.dataclass(frozen=True)
class _Concat:  # q, k, v read and stacked only when used
    parts: list

    @property
    def shape(self):
        return (sum(p.shape[0] for p in self.parts),) + tuple(self.parts[0].shape[1:])

    @property
    def dtype(self):
        return self.parts[0].dtype

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
    patch, pos, fc1, pattern = _probes(layout)
    depth = _depth(encoder, pattern)
    needed = [patch, pos, fc1.format(0)]
    absent = [n for n in needed if n not in encoder]
    if absent or not depth:
        some = ", ".join(sorted(encoder)[:6])
        raise ValueError(
            f"{where}: cannot infer the architecture, {', '.join(absent) or 'the blocks'} missing "
            f"(it holds {len(encoder)} tensors: {some}, ...). Is it an I-JEPA encoder in the {layout} layout?"
        )
    shapes = {n: tuple(encoder[n].shape) for n in needed}
    if len(shapes[patch]) != 4 or len(shapes[pos]) != 3 or len(shapes[fc1.format(0)]) != 2:
        raise ValueError(f"{where}: {patch} {shapes[patch]} / {pos} {shapes[pos]}: not a ViT's shapes.")
    d, channels, p, _ = shapes[patch]
    mlp_dim = shapes[fc1.format(0)][0]
    n = shapes[pos][1]
    grid = int(round(n**0.5))
    if channels != 3 or grid * grid != n:
        raise ValueError(f"{where}: {patch} {shapes[patch]} / {pos} {shapes[pos]}: not RGB, or not a square grid.")
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
    if "predictor_embed.weight" not in predictor or len(predictor["predictor_embed.weight"].shape) != 2:
        raise ValueError(f"{where}: the predictor has no 2-D predictor_embed.weight; cannot infer its width.")
    width = predictor["predictor_embed.weight"].shape[0]
    if width % heads or width % 4:
        raise ValueError(f"{where}: predictor width {width} is not divisible by 4 and by the {heads} heads of {name}.")
    return dataclasses.replace(arch, pred_depth=_depth(predictor, r"predictor_blocks\.(\d+)\."), pred_width=width)
