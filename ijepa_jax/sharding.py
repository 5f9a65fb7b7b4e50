"""Device mesh, sharding rules for the train state, and putting host batches onto the mesh.

Two mesh axes span every device of every process: 'data' and 'fsdp'
(`config.mesh`, default all devices on 'data': pure data parallelism). The
batch is split over both. Parameters, the EMA target and the AdamW moments
follow `STATE_RULES`, a table of (regex on the leaf's path, strategy), first
match wins: 'fsdp' splits the leaf's largest axis that the 'fsdp' size
divides (big_vision's rule), 'replicate' copies it to every device. XLA
(GSPMD) inserts the all-gathers and reduce-scatters the step then needs.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Paths look like 'params/encoder/stack/blocks_3/attn/qkv/kernel' or, for an
# Adam moment, 'opt_state/1/0/mu/encoder/stack/blocks_3/attn/qkv/kernel'.
STATE_RULES = (
    (r".*/kernel$", "fsdp"),  # every matmul / patch-embedding weight and its moments
    (r".*", "replicate"),  # biases, norms, the mask token, step counters: small
)
# Leaves smaller than this stay replicated whatever the rule: the gather would cost more than it saves.
MIN_FSDP_SIZE = 2**12


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes from `config.mesh`; -1 means "all the devices the other axis leaves"."""
    data, fsdp = mesh_config.data, mesh_config.fsdp
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1; give at least one of them a size.")
    if data == -1:
        data = num_devices // fsdp if fsdp > 0 and num_devices % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = num_devices // data if data > 0 and num_devices % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(
            f"mesh.data={mesh_config.data} x mesh.fsdp={mesh_config.fsdp} does not cover the {num_devices} "
            f"devices; use sizes whose product is {num_devices}, or -1 for one of them."
        )
    return data, fsdp


def make_mesh(devices=None, mesh_config=None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh; without `mesh_config`, every device on 'data'."""
    devices = jax.devices() if devices is None else devices
    shape = (len(devices), 1) if mesh_config is None else mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        shape,
        (DATA_AXIS, FSDP_AXIS),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=devices,
    )


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis split over every device ('data' and 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def leaf_spec(path: str, shape: tuple, fsdp_size: int, rules=STATE_RULES) -> P:
    """The PartitionSpec the first matching rule gives a leaf of this path and shape."""
    strategy = next(s for pattern, s in rules if re.fullmatch(pattern, path))
    if strategy == "replicate" or fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return P()
    if strategy != "fsdp":
        raise ValueError(f"unknown sharding strategy {strategy!r} for {path}")
    divisible = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not divisible:
        return P()  # e.g. an odd width: nothing to split evenly
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return P(*[FSDP_AXIS if i == axis else None for i in range(len(shape))])


def leaf_name(path) -> str:
    """A pytree leaf's path as the rules above (and checkpoint's checksums) write it: 'params/encoder/...'."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_sharding(abstract_state, mesh):
    """NamedShardings for every leaf of a (train) state pytree, by `STATE_RULES`."""
    fsdp_size = mesh.shape[FSDP_AXIS]

    def one(path, leaf):
        return NamedSharding(mesh, leaf_spec(leaf_name(path), tuple(leaf.shape), fsdp_size))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_host(tree):
    """Whole numpy values of a pytree of global arrays, sharded or not, on every process.

    With several processes each holds only its shards, so this is a collective:
    every process must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def put_batch(local_batch: dict, mesh) -> dict:
    """This process's part of the global batch (numpy) -> global jax.Arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, _owned(x)), local_batch)


def put_shared_batch(batch, mesh):
    """A batch every process holds whole (numpy) -> a global jax.Array: each process contributes its slice."""
    return put_batch(np.split(batch, jax.process_count())[jax.process_index()], mesh)


def _owned(x) -> np.ndarray:
    """`x` as an array that owns its memory. grain's worker processes hand batches over in shared
    memory, and the CPU backend can alias a numpy buffer instead of copying it: the segments then stay
    mapped until exit, where the resource tracker reports them as leaked."""
    x = np.asarray(x)
    return x if x.flags.owndata else np.array(x)


def maybe_initialize_distributed(
    enabled: bool, coordinator_address: str = "", num_processes: int = -1, process_id: int = -1
) -> None:
    """Start jax's multi-process runtime when asked to, before anything touches a device.

    With no explicit values jax detects the cluster (SLURM, Open MPI, Cloud TPU
    pods); `coordinator_address` ('host:port' of process 0), `num_processes`
    and `process_id` (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID) cover any other set of machines. Failures become a
    ValueError that says what was tried.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if num_processes < 0:
        num_processes = int(os.environ.get("JAX_NUM_PROCESSES", -1))
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", -1))
    explicit = {k: v for k, v in (("num_processes", num_processes), ("process_id", process_id)) if v >= 0}
    if not (enabled or coordinator_address or explicit):
        return
    if explicit and not coordinator_address:
        raise ValueError(
            f"{sorted(explicit)} given without --coordinator_address (host:port of process 0, reachable "
            "from every process); give all three, or none to let jax detect SLURM / Open MPI / Cloud TPU."
        )
    if coordinator_address and len(explicit) != 2:
        raise ValueError(
            f"--coordinator_address={coordinator_address} needs --num_processes and --process_id too "
            "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)."
        )
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    try:
        jax.distributed.initialize(coordinator_address or None, **{k: v for k, v in explicit.items()})
    except (RuntimeError, ValueError) as e:
        how = f"coordinator {coordinator_address}, {explicit}" if coordinator_address else "cluster auto-detection"
        raise ValueError(
            f"jax.distributed.initialize failed ({how}): {e}. Outside SLURM / Open MPI / Cloud TPU, pass "
            "--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process."
        ) from e
    print(
        f"process {jax.process_index()}/{jax.process_count()}: local devices "
        f"{[d.id for d in jax.local_devices()]} of {jax.device_count()}",
        flush=True,
    )
