"""Mesh shapes and the FSDP rule table: which state leaves are split, and over which axis."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import small_config
from ijepa_jax import masks, optim, sharding, train
from ijepa_jax import step as step_lib


def mesh_config(data, fsdp):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


@pytest.mark.parametrize("data,fsdp,shape", [(-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (1, 8, (1, 8))])
def test_mesh_shape_fills_in_minus_one(data, fsdp, shape):
    assert sharding.mesh_shape(mesh_config(data, fsdp), 8) == shape
    mesh = sharding.make_mesh(mesh_config=mesh_config(data, fsdp))
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == shape


@pytest.mark.parametrize("data,fsdp", [(3, -1), (2, 2), (-1, -1), (0, 8)])
def test_impossible_meshes_name_the_keys(data, fsdp):
    with pytest.raises(ValueError, match="mesh"):
        sharding.mesh_shape(mesh_config(data, fsdp), 8)


@pytest.mark.parametrize(
    "path,shape,fsdp,spec",
    [
        ("params/encoder/stack/blocks_0/attn/qkv/kernel", (1280, 3840), 4, P(None, "fsdp")),
        ("params/encoder/stack/blocks_0/mlp/fc2/kernel", (5120, 1280), 8, P("fsdp", None)),
        # a scanned stack: the leading depth axis (32) is never the largest
        ("params/encoder/stack/blocks/mlp/fc1/kernel", (32, 1280, 5120), 8, P(None, None, "fsdp")),
        ("opt_state/1/0/mu/encoder/patch_embed/kernel", (14, 14, 3, 1280), 8, P(None, None, None, "fsdp")),
        ("params/encoder/stack/blocks_0/attn/qkv/bias", (3840,), 8, P()),  # biases: replicated
        ("params/predictor/mask_token", (1, 1, 384), 8, P()),
        ("params/encoder/stack/blocks_0/attn/qkv/kernel", (1280, 3840), 1, P()),  # no fsdp axis
        ("params/encoder/stack/blocks_0/attn/qkv/kernel", (33, 99), 2, P()),  # nothing divisible
        ("params/encoder/stack/blocks_0/attn/qkv/kernel", (16, 48), 2, P()),  # too small to be worth it
    ],
)
def test_rule_table(path, shape, fsdp, spec):
    assert sharding.leaf_spec(path, shape, fsdp) == spec


def test_state_sharding_splits_kernels_of_params_target_and_adam_moments():
    """On a 2 x 4 mesh every large kernel of the online parameters, the EMA target and both AdamW
    moments is split over 'fsdp'; everything else (step, counts, biases, norms) is replicated."""
    config = small_config()
    spec = masks.resolve_spec(config)
    models = step_lib.make_models(config, spec.grid_h)
    schedules = optim.make_schedules(config.optim, 8)
    tx = optim.make_optimizer(config.optim, schedules)
    shapes = train.batch_shapes(config, spec)
    abstract = jax.eval_shape(lambda rng: step_lib.init_state(rng, models, tx, shapes), jax.random.key(0))
    mesh = sharding.make_mesh(mesh_config=mesh_config(2, 4))
    shardings = sharding.state_sharding(abstract, mesh)
    split, whole = [], []
    for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(shardings)):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        (split if "fsdp" in s.spec else whole).append((name, leaf.shape))
    assert not any(name.endswith("kernel") and np.prod(shape) >= sharding.MIN_FSDP_SIZE for name, shape in whole)
    prefixes = {name.split("/")[0] for name, _ in split}
    assert prefixes == {"params", "target_params", "opt_state"}
    assert any("/mu/" in name for name, _ in split) and any("/nu/" in name for name, _ in split)
    assert all(name.endswith("kernel") for name, _ in split)
    assert ("step", ()) in whole


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(num_processes=2, process_id=0), "coordinator_address"),
        (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "process_id"),
        (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"\[0, --num_processes=2\)"),
    ],
)
def test_incomplete_multi_process_settings_are_refused_before_starting(monkeypatch, kwargs, words):
    """Explicit start-up needs all three of coordinator, process count and id, consistent."""
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=words):
        sharding.maybe_initialize_distributed(False, **kwargs)


def test_no_settings_start_nothing(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    sharding.maybe_initialize_distributed(False)
    assert jax.process_count() == 1


def one_mesh_step(data: int, fsdp: int):
    """Metrics, parameters and EMA target after one train step on a data x fsdp mesh, on the host."""
    from test_step import host_batch

    exp = train.build(small_config(**{"mesh.data": data, "mesh.fsdp": fsdp}))
    new, metrics = exp.train_step(exp.init(), host_batch(exp.config, exp.spec))
    kernel = new.params["encoder"]["stack"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert ("fsdp" in kernel.sharding.spec) == (fsdp > 1)
    return jax.device_get((metrics, new.params, new.target_params))


@pytest.fixture(scope="module")
def data_parallel_step():
    """The reference every mesh is compared with: 8 x 1, pure data parallelism (computed once)."""
    return one_mesh_step(8, 1)


# 1 x 8 (fully sharded) runs by default; the intermediate meshes are long checks (-m slow).
@pytest.mark.parametrize("data,fsdp", [pytest.param(4, 2, marks=pytest.mark.slow),
                                       pytest.param(2, 4, marks=pytest.mark.slow), (1, 8)])
def test_one_train_step_agrees_on_every_mesh_shape(data_parallel_step, data, fsdp):
    """Loss, gradient norm and the updated parameters and EMA target of one train step on a data x fsdp
    mesh are those of 8 x 1 (pure data parallelism)."""
    (ref_metrics, *ref), (metrics, *sharded) = data_parallel_step, one_mesh_step(data, fsdp)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    # Adam's first step is about lr * sign(g): compare to 0.1 % of one step (see test_step.py).
    for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-3 * float(ref_metrics["lr"]))


@pytest.mark.slow  # default runs cover it in parts: test_checkpoint's 8 x 1 -> 2 x 4 FSDP resume and init_from
def test_init_from_restores_weights_onto_another_fsdp_mesh(tmp_path):
    """A run's weights saved FSDP-sharded 8 ways start a run sharded 4 ways (x 2 data): the same values,
    laid out by the new mesh's rules."""
    tiny = {"model.name": "vit_tiny", "model.patch_size": 8, "data.crop_size": 32, "model.pred_width": 48,
            "data.batch_size": 16, "data.synthetic_images": 32, "optim.epochs": 1, "optim.warmup_epochs": 0}
    source = str(tmp_path / "source")
    train.train(small_config(total_steps=1, **{**tiny, "mesh.data": 1, "mesh.fsdp": 8}), source)
    exp = train.build(small_config(total_steps=1, **{**tiny, "mesh.data": 2, "mesh.fsdp": 4,
                                                     "checkpoint.init_from": source}))
    from ijepa_jax import checkpoint, encoder_export

    manager = checkpoint.make_manager(str(tmp_path / "new"), exp.config.checkpoint, exp.steps_per_epoch)
    state = train.initial_state(exp, manager, str(tmp_path / "new"))
    saved, _, _ = encoder_export.restore_target_encoder(source)
    qkv = state.target_params["stack"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P(None, sharding.FSDP_AXIS) and qkv.sharding.mesh.shape[sharding.FSDP_AXIS] == 4
    np.testing.assert_array_equal(np.asarray(qkv), np.asarray(saved["stack"]["blocks_0"]["attn"]["qkv"]["kernel"]))
    assert int(state.step) == 0
