"""The trained encoder on its own: restored from a run's checkpoint, written to one file, loaded back.

An export is one msgpack file {'format', 'model', 'params'}: 'model' holds name, patch_size, crop_size
and the mean/std images were normalised with; 'params' the encoder's Flax tree with unrolled blocks
('stack/blocks_i/...'), which loads into `models.vit.Encoder(scan=False)` (unrolled_encoder).
"""

from __future__ import annotations

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ijepa_jax import checkpoint, files, sharding

EXPORT_FORMAT = "ijepa_jax.target_encoder.v1"


def unstack_blocks(params):
    """Scanned block stacks ('blocks' with a leading depth axis) -> 'blocks_0', 'blocks_1', ..."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key == "blocks":
            depth = jax.tree.leaves(value)[0].shape[0]
            for i in range(depth):
                out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        else:
            out[key] = unstack_blocks(value)
    return out


def export_target_encoder(target_params, config, path: str) -> str:
    """Write the target (EMA) encoder to one msgpack file: {'format', 'model', 'params'}.

    Every process calls it (sharded parameters are gathered first); process 0 writes.

    'model' holds name, patch_size and crop_size; 'params' is the encoder's
    Flax parameter tree with unrolled blocks ('stack/blocks_i/...'), so it
    loads into `models.vit.Encoder(scan=False)`.
    """
    params = unstack_blocks(jax.tree.map(np.asarray, sharding.to_host(target_params)))
    if jax.process_index() != 0:
        return str(path)
    payload = {
        "format": EXPORT_FORMAT,
        "model": {
            "name": config.model.name,
            "patch_size": config.model.patch_size,
            "crop_size": config.data.crop_size,
            # Images go in as (uint8 / 255 - mean) / std, per RGB channel: what the encoder was trained on.
            "mean": [float(v) for v in config.data.mean],
            "std": [float(v) for v in config.data.std],
        },
        "params": params,
    }
    return str(files.write_bytes(path, flax.serialization.msgpack_serialize(payload)))


def restore_target_encoder(workdir: str, step: int | None = None, which: str = "target") -> tuple:
    """(target-encoder params with unrolled blocks, the run's config, step) from a run's checkpoint
    (latest, or `step`), restored onto this host's devices whatever topology saved it. `which='online'`
    gives the online (context) encoder instead: what the reference probes is the target."""
    if which not in ("target", "online"):
        raise ValueError(f"which={which!r}: the encoders of a run are 'target' (EMA) and 'online'.")
    manager, latest = checkpoint.read_only_manager(workdir)
    step = latest if step is None else step
    if step not in manager.all_steps():
        raise ValueError(f"No checkpoint step {step} in {workdir}; it holds {sorted(manager.all_steps())}.")
    replicated = jax.sharding.NamedSharding(sharding.make_mesh(), jax.sharding.PartitionSpec())
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), manager.item_metadata(step)["state"]
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore())
    )
    state = restored["state"]
    params = unstack_blocks(state["target_params"] if which == "target" else state["params"]["encoder"])
    return params, ml_collections.ConfigDict(restored["config"]), step


def export_from_workdir(workdir: str, out: str, step: int | None = None) -> str:
    """Export the target encoder of a run's checkpoint (latest, or `step`) without rebuilding the run."""
    params, config, _ = restore_target_encoder(workdir, step)
    return export_target_encoder(params, config, out)


def unrolled_encoder(name: str, patch_size: int):
    """The float32, unrolled encoder module that exported / restored parameters fit."""
    from ijepa_jax.models import vit

    model_config = ml_collections.ConfigDict(
        dict(name=name, patch_size=patch_size, dtype="float32", scan_layers=False, remat=False, attention_impl="")
    )
    return vit.make_encoder(model_config)


def load_encoder(path: str):
    """(encoder module, params, model info) from an exported file."""
    if not files.path(path).is_file():
        raise FileNotFoundError(f"No exported encoder at {path}.")
    try:
        payload = flax.serialization.msgpack_restore(files.path(path).read_bytes())
    except Exception as e:
        raise ValueError(f"{path} is not a readable exported encoder ({e}).") from e
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an ijepa_jax export (expected format {EXPORT_FORMAT!r}).")
    info = payload["model"]
    return unrolled_encoder(info["name"], info["patch_size"]), payload["params"], info
