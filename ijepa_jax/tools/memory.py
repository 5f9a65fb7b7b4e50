"""Per-device memory of the real train step on a mesh of any size, without the hardware.

    python -m ijepa_jax.tools.memory --config configs/in1k_vith14.py --devices 16 \
        --mesh data=-1,fsdp=16 --batch_per_device 128 [--config.model.remat=True ...]

Compiles the train step on `--devices` fake CPU devices for the requested mesh
and prints one JSON line: per-device bytes of the online parameters, the EMA
target and the AdamW moments (from the state's shardings), the gradients (the
parameters' size, fp32), the batch, and XLA's own memory analysis of the
compiled step (arguments, outputs, donated aliases, temporaries = activations,
gradients and workspace; `total_gib` = what the step needs at its peak). The
data are synthetic: memory does not depend on them.

The state's figures are exact. The temporaries are XLA:CPU's, whose fusion
and scheduling differ from the GPU and TPU compilers': an upper bound in our
measurements (ViT-H/14, 128 images per device, bf16, no remat: 97.8 GiB in all
here, 63.6 GiB measured by XLA:GPU on an H200, docs/measurements). Confirm on
the device with `tools.benchmark`, which reports the real peak.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags  # neither imports jax, which must start after _fake_devices_from_argv

from ijepa_jax import bad_input

FLAGS = flags.FLAGS
GIB = 2.0**30


def parse_mesh(text: str) -> dict:
    """'data=2,fsdp=8' -> {'data': 2, 'fsdp': 8}."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in ("data", "fsdp") or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh={text!r}: expected e.g. 'data=2,fsdp=8' (axes data, fsdp; -1 for the rest).")
        out[key] = int(value)
    return out


def _bytes_per_device(tree) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def step_memory(config) -> dict:
    """Per-device memory (GiB) of the compiled train step for `config` on this process's devices."""
    import jax

    from ijepa_jax import sharding, train

    exp = train.build(config)
    state = exp.abstract_state
    batch_sharding = sharding.batch_sharding(exp.mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
        for k, v in train.batch_shapes(exp.config, exp.spec).items()
    }
    m = exp.train_step.lower(state, batch).compile().memory_analysis()
    params = _bytes_per_device(state.params)
    out = {
        "params_gib": params / GIB,
        "ema_target_gib": _bytes_per_device(state.target_params) / GIB,
        "optimizer_gib": _bytes_per_device(state.opt_state) / GIB,
        "gradients_gib": params / GIB,  # fp32, sharded as the parameters; inside the temporaries below
        "batch_gib": _bytes_per_device(batch) / GIB,
    }
    if m is not None:
        out.update(
            xla_argument_gib=m.argument_size_in_bytes / GIB,
            xla_output_gib=m.output_size_in_bytes / GIB,
            xla_alias_gib=m.alias_size_in_bytes / GIB,
            xla_temp_gib=m.temp_size_in_bytes / GIB,
            total_gib=(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                       + m.temp_size_in_bytes) / GIB,
        )
    return {k: round(v, 6) for k, v in out.items()}


def describe(config, devices: int) -> dict:
    c = config
    return {
        "model": f"{c.model.name}/{c.model.patch_size}", "crop_size": c.data.crop_size, "devices": devices,
        "mesh": f"data={c.mesh.data},fsdp={c.mesh.fsdp}", "batch_per_device": c.data.batch_size // devices,
        "dtype": c.model.dtype, "remat": c.model.remat_policy if c.model.remat else "none",
        "scan_layers": c.model.scan_layers,
    }


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=False,
                                    flag_values=fv)
    flags.DEFINE_integer("devices", 8, "Number of devices to plan for (simulated as CPU devices).", flag_values=fv)
    flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. 'data=-1,fsdp=16' (default: the config's mesh).", flag_values=fv)
    flags.DEFINE_integer("batch_per_device", 0, "Per-device batch (default: the config's global batch / devices).",
                         flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad flag, mesh or config is one line."""
    del argv
    import jax

    from ijepa_jax import compilation_cache

    devices = jax.device_count()
    config = FLAGS.config
    config.mesh.update(parse_mesh(FLAGS.mesh))
    if FLAGS.batch_per_device < 0:
        raise ValueError(f"--batch_per_device={FLAGS.batch_per_device} must be >= 1 (0: the config's batch).")
    if FLAGS.batch_per_device > 0:
        config.data.batch_size = FLAGS.batch_per_device * devices
    config.data.source = "synthetic"
    config.data.synthetic_images = max(config.data.synthetic_images, config.data.batch_size)
    compilation_cache.use(config.compilation_cache_dir)
    result = {**describe(config, devices), **step_memory(config)}
    print(json.dumps(result), flush=True)


def _fake_devices_from_argv(argv) -> None:
    """--devices N means N CPU devices: jax reads that before it starts, so set it first."""
    count = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), None)
    if count is None and "--devices" in argv[:-1]:
        count = argv[argv.index("--devices") + 1]
    if count is not None and not (count.isdigit() and int(count) >= 1):
        sys.exit(f"error: --devices={count}: give a number of devices >= 1.")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_NUM_CPU_DEVICES"] = str(int(count or 8))


if __name__ == "__main__":
    _fake_devices_from_argv(sys.argv)
    bad_input.run_command(main, define_flags)
