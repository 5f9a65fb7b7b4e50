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
  * a Hugging Face IJepaModel: model.safetensors (or its folder), in either
    layout transformers writes. An encoder alone; transformers converted the
    reference's ONLINE encoder.
  (`weight_sources` reads and checks both; a checkpoint without target_encoder
  is refused unless --online_as_target.)

The architecture (model size, patch, crop, predictor depth and width) is
inferred from the tensor shapes and checked against --config when given.
--workdir writes a step-0 checkpoint with a fresh optimizer (the reference's
epoch, loss, ... go to config.converted_from) that `evaluate --workdir`,
`checkpoint.init_from` and `tools/export_encoder` accept; --export writes the
target encoder alone (encoder_export.export_target_encoder's format); `hf_export`
goes the other way. A bad input is one line on stderr and exit status 1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from absl import flags
from ml_collections import config_flags

from ijepa_jax import bad_input, checkpoint, config_lib, encoder_export, optim
from ijepa_jax import step as step_lib
from ijepa_jax.models import vit
from ijepa_jax.weight_layouts import Arch
from ijepa_jax.weight_sources import Source, load_source

FLAGS = flags.FLAGS

# A stored position table may differ from ours by float32 rounding of the reference's float64 table.
POS_EMBED_ATOL = 1e-4

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


def encoder_state_dict(params: dict, grid: int) -> dict:
    """The inverse of encoder_params: vit.Encoder parameters -> a float32 reference state dict, its
    pos_embed the fixed sin-cos table of `grid` (which our encoder computes rather than stores)."""
    params = encoder_export.unstack_blocks(params)
    out = {}

    def take(spec, tree, prefix=""):
        def one(s, x):
            x = np.asarray(x, np.float32)
            out[prefix + s[0]] = np.ascontiguousarray(x.T) if s[1] else x

        jax.tree.map(one, spec, tree, is_leaf=_is_spec)

    kernel = np.asarray(params["patch_embed"]["kernel"], np.float32)  # (p, p, C, D) -> (D, C, p, p)
    out["patch_embed.proj.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    out["patch_embed.proj.bias"] = np.asarray(params["patch_embed"]["bias"], np.float32)
    out["pos_embed"] = vit.sincos_2d(kernel.shape[-1], grid, grid)[None]
    for i in range(len(params["stack"])):
        take(_BLOCK, params["stack"][f"blocks_{i}"], f"blocks.{i}.")
    take(_norm("norm"), params["norm"])
    return out


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


def convert(source_path: str, workdir: str = "", export: str = "", config=None, online_as_target=False) -> dict:
    """Read, check and write; returns a summary (architecture, provenance, seconds)."""
    if not (workdir or export):
        raise ValueError("Give --workdir and/or --export: there is nothing to write.")
    t = time.perf_counter()
    source = load_source(source_path, online_as_target)
    config = ml_collections.ConfigDict(config_for(source.arch, config).to_dict())
    config.converted_from = source.info
    if workdir:
        write_workdir(workdir, train_state(source, config), config)
    if export:
        # Unrolled, whatever the config says: the export format holds 'blocks_i'.
        target = encoder_params(source.target_encoder, source.arch, scan=False, where="target_encoder")
        encoder_export.export_target_encoder(target, config, export)
    return {"arch": dataclasses.asdict(source.arch), **source.info, "seconds": time.perf_counter() - t}


def summary_line(summary: dict, written: str) -> str:
    a = summary["arch"]
    pred = f", predictor {a['pred_depth']} x {a['pred_width']}" if a["pred_depth"] else ", no predictor"
    epoch = f", epoch {summary['epoch']}" if "epoch" in summary else ""
    model = f"{a['name']}/{a['patch_size']} at {a['grid'] * a['patch_size']}px"
    return f"{summary['format']} checkpoint: {model}{pred}{epoch}; wrote {written} in {summary['seconds']:.1f} s"


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    flags.DEFINE_string("source", None, "A reference .pth.tar, or a Hugging Face model.safetensors / its folder.",
                        flag_values=fv)
    flags.DEFINE_string("workdir", "", "Write a step-0 checkpoint here (a new folder).", flag_values=fv)
    flags.DEFINE_string("export", "", "Write the target encoder to this file (e.g. encoder.msgpack).", flag_values=fv)
    flags.DEFINE_bool("online_as_target", False, "A checkpoint without target_encoder: use its online encoder.",
                      flag_values=fv)
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of a bad input.", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "Config to check against (default: the reference recipe).",
                                    flag_values=fv)
    flags.mark_flag_as_required("source", flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: an unreadable or mismatched source, or a bad output path, is one line."""
    del argv
    if not bad_input.verbosity_given():
        bad_input.quiet_library_logs()
    summary = convert(FLAGS.source, FLAGS.workdir, FLAGS.export, FLAGS.config, FLAGS.online_as_target)
    print(summary_line(summary, " and ".join(x for x in (FLAGS.workdir, FLAGS.export) if x)))


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
