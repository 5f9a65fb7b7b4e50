"""Write an encoder as a Hugging Face IJepaModel folder that transformers loads and runs.

    python -m ijepa_jax.hf_export --source runs/c100 [--step 1950] --out ijepa_c100_hf/
    python -m ijepa_jax.hf_export --source encoder.msgpack --out ijepa_hf/
    python -m ijepa_jax.hf_export --source IN1K-vit.h.14-300e.pth.tar --out ijepa_vith14_target_hf/

    from transformers import IJepaModel
    features = IJepaModel.from_pretrained("ijepa_hf/")(pixel_values).last_hidden_state

--source: a run's workdir (its target encoder), an export of
encoder_export.export_target_encoder (.msgpack), or anything `convert` reads (of a
reference checkpoint, the TARGET encoder: the Hugging Face hub's copy holds the
online one). The folder holds config.json, model.safetensors (float32, in the
layout save_pretrained writes by default, which every transformers version
with IJepa reads; position_embeddings is our fixed sin-cos table) and
preprocessor_config.json (resize to the crop, the encoder's mean / std).
transformers is not needed to write it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from absl import flags

from ijepa_jax import bad_input, config_lib, convert, encoder_export, weight_layouts, weight_sources
from ijepa_jax.models import vit
from ijepa_jax.weight_files import write_safetensors

FLAGS = flags.FLAGS


def load_target_encoder(source: str, step: int | None = None, online_as_target: bool = False) -> tuple:
    """(unrolled vit.Encoder parameters, model info {name, patch_size, crop_size, mean, std}) of a
    workdir, an exported .msgpack, or a source `convert` reads."""
    workdir = os.path.isdir(os.path.join(source, "checkpoints"))
    if workdir or os.path.basename(os.path.normpath(source)) == "checkpoints":
        params, config, _ = bad_input.restore_target_encoder(source, step)
        info = {"name": config.model.name, "patch_size": config.model.patch_size, "crop_size": config.data.crop_size}
        return params, {**info, "mean": list(config.data.mean), "std": list(config.data.std)}
    if step is not None:
        raise ValueError(f"--step applies to a workdir; {source} is not one (it has no checkpoints/ folder).")
    if source.endswith(".msgpack"):
        _, params, info = encoder_export.load_encoder(source)
        if "mean" not in info or "std" not in info:  # an export older than the normalisation it records
            logging.warning("%s records no mean / std: ImageNet's go into preprocessor_config.json", source)
            info = {"mean": config_lib.IMAGENET_MEAN, "std": config_lib.IMAGENET_STD, **info}
        return params, info
    src = weight_sources.load_source(source, online_as_target)
    params = convert.encoder_params(src.target_encoder, src.arch, scan=False, where=f"{source} [target_encoder]")
    data = convert.config_for(src.arch).data
    info = {"name": src.arch.name, "patch_size": src.arch.patch_size, "crop_size": src.arch.crop_size}
    return params, {**info, "mean": list(data.mean), "std": list(data.std)}


def hf_config(arch: weight_layouts.Arch) -> dict:
    """config.json of transformers' IJepaConfig for `arch` (exact GELU, LayerNorm eps 1e-6, qkv bias)."""
    return {
        "architectures": ["IJepaModel"],
        "model_type": "ijepa",
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": weight_sources.LAYER_NORM_EPS,
        "image_size": arch.crop_size,
        "patch_size": arch.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "pooler_output_size": arch.embed_dim,
        "pooler_act": "tanh",
        "torch_dtype": "float32",
    }


def preprocessor_config(info: dict) -> dict:
    """ViTImageProcessor (transformers' processor for IJepa): resize to the crop, scale by 1/255, normalise."""
    size = info["crop_size"]
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,  # bilinear, as our data pipeline
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in info["mean"]],
        "image_std": [float(v) for v in info["std"]],
    }


def export_huggingface(params: dict, info: dict, out: str) -> str:
    """Unrolled vit.Encoder parameters and their model info -> the folder `out` (a new or empty one)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out} already exists and is not an empty folder; export into a new --out.")
    if info.get("name") not in vit.VIT_SIZES:
        raise ValueError(f"unknown model {info.get('name')!r}: none of {sorted(vit.VIT_SIZES)}.")
    grid = info["crop_size"] // info["patch_size"]
    try:
        sd = convert.encoder_state_dict(params, grid)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a tree other than vit.Encoder's
        raise ValueError(f"the parameters are not those of an ijepa_jax ViT encoder ({type(e).__name__}: {e}).") from e
    arch = weight_layouts.infer_architecture(sd, None, "reference", "the encoder")
    width, depth, heads, ratio = vit.VIT_SIZES[info["name"]]
    found = (arch.embed_dim, arch.depth, arch.mlp_dim, arch.patch_size)
    if (width, depth, int(width * ratio), info["patch_size"]) != found:
        raise ValueError(
            f"the parameters are a {arch.name}/{arch.patch_size}, not the {info['name']}/{info['patch_size']} "
            "their model info names."
        )
    arch = dataclasses.replace(arch, name=info["name"], num_heads=heads)
    weight_layouts.check_tensors(sd, weight_layouts.encoder_shapes(arch), "the encoder")
    os.makedirs(out, exist_ok=True)
    write_safetensors(weight_layouts.to_hf(sd), os.path.join(out, "model.safetensors"))
    for name, content in (("config.json", hf_config(arch)), ("preprocessor_config.json", preprocessor_config(info))):
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f, indent=2)
    return out


def export(source: str, out: str, step: int | None = None, online_as_target: bool = False) -> str:
    """load_target_encoder, then export_huggingface; returns a one-line summary."""
    params, info = load_target_encoder(source, step, online_as_target)
    export_huggingface(params, info, out)
    return f"wrote {out}: IJepaModel {info['name']}/{info['patch_size']} at {info['crop_size']}px"


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    flags.DEFINE_string("source", None, "A workdir, an exported .msgpack, or a source convert reads.", flag_values=fv)
    flags.DEFINE_string("out", None, "A new folder for config.json, model.safetensors, preprocessor_config.json.",
                        flag_values=fv)
    flags.DEFINE_integer("step", -1, "With a workdir: the checkpoint step (-1: the latest).", flag_values=fv)
    flags.DEFINE_bool("online_as_target", False, "A checkpoint without target_encoder: use its online encoder.",
                      flag_values=fv)
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of a bad input.", flag_values=fv)
    flags.mark_flags_as_required(["source", "out"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: an unreadable source or a bad --out is one line."""
    del argv
    if not bad_input.verbosity_given():
        bad_input.quiet_library_logs()
    step = None if FLAGS.step < 0 else FLAGS.step
    print(export(FLAGS.source, FLAGS.out, step, FLAGS.online_as_target))


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
