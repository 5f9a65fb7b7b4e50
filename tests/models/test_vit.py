"""ViT encoder and I-JEPA predictor: sizes, position table, init, padding, scan/remat, dtype.

Reference facts come from /work/shared/notes/ijepa-reference.md (the official
PyTorch code); everything here is checked against formulas or independently
known numbers, never against values copied from a run of this code.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_config
from ijepa_jax.models import vit

REFERENCE_SIZES = ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"]


# ----------------------------------------------------------------------------
# helpers


def _encoder(name, patch_size=4, **kw):
    d, depth, heads, mlp_ratio = vit.VIT_SIZES[name]
    return vit.Encoder(
        patch_size=patch_size, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, **kw
    )


def _block_params(d, mlp_ratio):
    """One pre-norm block: norm1 + norm2, qkv (with bias), proj, fc1, fc2."""
    h = int(d * mlp_ratio)
    return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)


def _encoder_formula(name, patch_size):
    d, depth, _, mlp_ratio = vit.VIT_SIZES[name]
    patch_embed = patch_size * patch_size * 3 * d + d
    final_norm = 2 * d
    return patch_embed + depth * _block_params(d, mlp_ratio) + final_norm  # no cls token, no pos-embed param


def _param_shapes_encoder(encoder, image_size):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(encoder.init, jax.random.key(0), images)["params"]


def _flat(params):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _random_token_idx(rng, batch, num_patches, k):
    """(batch, k) distinct patch indices per row, sorted (raster order)."""
    return np.stack([np.sort(rng.choice(num_patches, k, replace=False)) for _ in range(batch)]).astype(np.int32)


# ----------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("name", REFERENCE_SIZES)
def test_encoder_param_count_matches_formula(name):
    """Every reference size has exactly the timm-style ViT parameters: patch-embed conv,
    per-block (2 LayerNorms, qkv, proj, fc1, fc2), final norm; no cls token, no pos-embed parameter."""
    patch = 14 if name == "vit_huge" else 16
    params = _param_shapes_encoder(_encoder(name, patch), 2 * patch)
    assert vit.count_params(params) == _encoder_formula(name, patch)
    # The position table is fixed (not a parameter) and there is no cls token.
    assert set(params) == {"patch_embed", "stack", "norm"}
    names = " ".join(_flat(params))
    assert "pos" not in names and "cls" not in names


@pytest.mark.parametrize("scan", [False, True])
def test_encoder_param_count_known_totals(scan):
    """ViT-Ti/16 and ViT-B/16 encoders equal timm's totals (5,717,416 and 86,567,656)
    minus cls token (D), pos embed (197*D) and the 1000-class head (D*1000+1000)."""

    def timm_minus_extras(total, d):
        return total - d - 197 * d - (d * 1000 + 1000)

    assert timm_minus_extras(5_717_416, 192) == 5_486_400
    assert timm_minus_extras(86_567_656, 768) == 85_646_592
    tiny = _param_shapes_encoder(_encoder("vit_tiny", 16, scan=scan), 32)
    base = _param_shapes_encoder(_encoder("vit_base", 16, scan=scan), 32)
    assert vit.count_params(tiny) == 5_486_400
    assert vit.count_params(base) == 85_646_592


def test_predictor_param_count_vit_huge():
    """The ViT-H/14 predictor (depth 12, width 384) has: predictor_embed, one mask token,
    12 blocks at width 384 (MLP ratio 4), predictor_norm and predictor_proj back to 1280."""
    c = small_config(**{"model.name": "vit_huge", "model.patch_size": 14, "model.pred_depth": 12, "model.pred_width": 384})
    predictor = vit.make_predictor(c.model, 16, 16)
    enc_dim, d = 1280, 384
    k, m, t = 5, 2, 3
    args = (
        jax.ShapeDtypeStruct((1, k, enc_dim), jnp.float32),
        jax.ShapeDtypeStruct((1, k), jnp.int32),
        jax.ShapeDtypeStruct((1, k), jnp.bool_),
        jax.ShapeDtypeStruct((1, m, t), jnp.int32),
        jax.ShapeDtypeStruct((1, m, t), jnp.bool_),
    )
    params = jax.eval_shape(predictor.init, jax.random.key(0), *args)["params"]
    expected = (enc_dim * d + d) + d + 12 * _block_params(d, 4.0) + 2 * d + (d * enc_dim + enc_dim)
    assert vit.count_params(params) == expected
    assert params["mask_token"].shape == (1, 1, d)


# ----------------------------------------------------------------------------
# sin-cos position table


def test_sincos_2d_known_entry():
    """Entry (row 1, col 2) of a 3x4 grid at D=8: first half encodes the column, second the row;
    omega_i = 1/10000^(i/(D/4)), i.e. (1, 1/100) for D=8; layout [sin..., cos...] per half."""
    table = vit.sincos_2d(8, 3, 4)
    expected = [
        math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
        math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
    ]
    np.testing.assert_allclose(table[1 * 4 + 2], expected, rtol=1e-6, atol=1e-7)


def test_sincos_2d_origin_shape_and_dtype():
    """Position 0 is [0,..,0,1,..,1] in each half; the table is (H*W, D) float32 in raster order."""
    table = vit.sincos_2d(16, 3, 5)
    assert table.shape == (15, 16)
    assert table.dtype == np.float32
    half = np.concatenate([np.zeros(4), np.ones(4)])
    np.testing.assert_array_equal(table[0], np.concatenate([half, half]))
    # Raster order: moving one column changes only the first half, one row only the second.
    np.testing.assert_array_equal(table[1, 8:], table[0, 8:])
    np.testing.assert_array_equal(table[5, :8], table[0, :8])


@pytest.mark.parametrize("dim", [6, 10, 2])
def test_sincos_2d_needs_dim_divisible_by_4(dim):
    """A dimension not divisible by 4 cannot be split into two sin-cos halves: ValueError."""
    with pytest.raises(ValueError, match="divisible by 4"):
        vit.sincos_2d(dim, 2, 2)


# ----------------------------------------------------------------------------
# initialisation


@pytest.fixture(scope="module")
def vit_small_params():
    """A real init of a ViT-S/16 encoder (64px) and a width-384, depth-1 predictor, as flat
    {path: array}. The encoder is scanned (compiles 3x faster); its stacked block parameters
    are split back into one entry per block."""
    encoder = _encoder("vit_small", 16, scan=True)
    enc = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    predictor = vit.Predictor(grid_h=4, grid_w=4, embed_dim=384, depth=1, num_heads=6)
    pred = jax.jit(predictor.init)(
        jax.random.key(1),
        jnp.zeros((1, 3, 384)),
        jnp.zeros((1, 3), jnp.int32),
        jnp.ones((1, 3), bool),
        jnp.zeros((1, 2, 2), jnp.int32),
        jnp.ones((1, 2, 2), bool),
    )["params"]
    flat = {}
    for name, leaf in _flat(jax.device_get({"encoder": enc, "predictor": pred})).items():
        if name.startswith("['encoder']['stack']['blocks']"):
            assert leaf.shape[0] == 12
            for i, layer in enumerate(leaf):
                flat[name.replace("['blocks']", f"['blocks_{i}']")] = layer
        else:
            flat[name] = leaf
    return flat


def _kernels(flat):
    return {k: v for k, v in flat.items() if k.endswith("['kernel']")}


def test_init_weights_are_plain_normal_std_002(vit_small_params):
    """Every Dense/Conv kernel is N(0, 0.02^2): mean ~0, std ~0.02, and NOT truncated at 2 std
    (the reference cuts at +-2 absolute): about 4.55% of the values lie beyond 0.04."""
    kernels = _kernels(vit_small_params)
    assert "['encoder']['patch_embed']['kernel']" in kernels
    assert len(kernels) == 1 + 12 * 4 + 4 + 2  # patch embed + 12 blocks + predictor (1 block, embed, proj)
    for name, w in kernels.items():
        w = np.asarray(w, np.float64)
        assert w.size >= 100_000, name
        assert abs(w.mean()) < 1e-3, name
        assert 0.0195 < w.std() < 0.0205, (name, w.std())
    everything = np.concatenate([np.ravel(w) for w in kernels.values()])
    beyond = np.mean(np.abs(everything) > 0.04)
    assert 0.043 < beyond < 0.048, beyond  # P(|z| > 2) = 4.55% for a normal; 0 if truncated at 2 std
    assert np.abs(everything).max() > 0.08  # 4 std: a truncated normal never gets there


def test_init_layers_are_independent(vit_small_params):
    """Each block gets its own random draw (a scanned stack splits the init RNG per layer)."""
    first = vit_small_params["['encoder']['stack']['blocks_0']['attn']['qkv']['kernel']"]
    second = vit_small_params["['encoder']['stack']['blocks_1']['attn']['qkv']['kernel']"]
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.01


def test_init_biases_zero_layernorm_identity(vit_small_params):
    """All biases start at 0, LayerNorm scales at 1 (an identity affine), as in the reference."""
    biases = {k: v for k, v in vit_small_params.items() if k.endswith("['bias']")}
    scales = {k: v for k, v in vit_small_params.items() if k.endswith("['scale']")}
    assert len(scales) == 2 * 12 + 1 + 2 + 1  # encoder blocks + final norm, predictor block + predictor_norm
    assert len(biases) == len(scales) + 4 * 12 + 1 + 4 + 2  # + Dense/Conv biases
    for name, b in biases.items():
        np.testing.assert_array_equal(b, 0, err_msg=name)
    for name, s in scales.items():
        np.testing.assert_array_equal(s, 1, err_msg=name)


def test_init_mask_token(vit_small_params):
    """The predictor's mask token is one (1, 1, d) vector drawn with std ~0.02."""
    token = np.asarray(vit_small_params["['predictor']['mask_token']"])
    assert token.shape == (1, 1, 384)
    assert 0.015 < token.std() < 0.025
    assert abs(token.mean()) < 0.005


# ----------------------------------------------------------------------------
# GELU


def test_mlp_uses_exact_erf_gelu():
    """MlpBlock = fc2(gelu_erf(fc1(x))), and it differs measurably from the tanh approximation."""
    mlp = vit.MlpBlock(hidden_dim=32)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))

    @jax.jit
    def run():
        shapes = jax.eval_shape(mlp.init, jax.random.key(1), x)["params"]
        # Weights of std 1 push pre-activations into the range where the two GELUs differ.
        leaves, treedef = jax.tree.flatten(shapes)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        params = jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
        out = mlp.apply({"params": params}, x)
        pre = x @ params["fc1"]["kernel"] + params["fc1"]["bias"]
        exact = jax.nn.gelu(pre, approximate=False) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
        tanh = jax.nn.gelu(pre, approximate=True) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
        return out, exact, tanh

    out, exact, tanh = jax.device_get(run())
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)
    assert np.abs(out - tanh).max() > 1e-3


# ----------------------------------------------------------------------------
# padding invariance

# Each test below runs all the variants it compares in ONE jitted function: one
# compilation per test keeps the file fast on a 2-core machine.


@pytest.fixture(scope="module")
def micro():
    """A ViT-micro/4 encoder (16px, a 4x4 grid) with real initial parameters, and test images."""
    encoder = _encoder("vit_micro", 4)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    params = jax.jit(encoder.init)(jax.random.key(0), images)["params"]
    return encoder, params, images


def test_encoder_ignores_invalid_tokens(micro):
    """Encoding K tokens whose last ones are marked invalid gives, on the valid ones, the output of
    encoding only the valid tokens; without the mask the padding would change the result."""
    encoder, params, images = micro
    rng = np.random.default_rng(0)
    n_valid, n_pad = 5, 3
    idx = _random_token_idx(rng, 2, 16, n_valid)
    padding = rng.integers(0, 16, (2, n_pad)).astype(np.int32)  # arbitrary, even repeated, patches
    idx_padded = np.concatenate([idx, padding], axis=1)
    valid = np.arange(n_valid + n_pad)[None, :].repeat(2, 0) < n_valid

    @jax.jit
    def run(params):
        apply = functools.partial(encoder.apply, {"params": params}, images)
        return (
            apply(idx, np.ones_like(idx, bool)),
            apply(idx),
            apply(idx_padded, valid),
            apply(idx_padded, np.ones_like(valid)),
        )

    short, short_no_mask, padded, unmasked = jax.device_get(run(params))
    np.testing.assert_allclose(short, short_no_mask, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(padded[:, :n_valid], short, rtol=1e-5, atol=1e-5)
    assert np.abs(unmasked[:, :n_valid] - short).max() > 1e-3


def test_predictor_ignores_invalid_context_and_target_tokens():
    """Padded (invalid) context tokens -- whatever their features and indices -- and padded
    target tokens do not change the predictions for the valid target tokens."""
    predictor = vit.Predictor(grid_h=4, grid_w=4, embed_dim=32, depth=2, num_heads=2)
    rng = np.random.default_rng(1)
    b, m, enc_dim = 2, 2, 64
    k_valid, k_pad, t_valid, t_pad = 5, 3, 4, 2
    context = rng.normal(size=(b, k_valid + k_pad, enc_dim)).astype(np.float32)
    context[:, k_valid:] *= 100.0  # garbage features in the padding
    context_idx = np.concatenate(
        [_random_token_idx(rng, b, 16, k_valid), rng.integers(0, 16, (b, k_pad))], axis=1
    ).astype(np.int32)
    context_valid = np.arange(k_valid + k_pad)[None].repeat(b, 0) < k_valid
    target_idx = rng.integers(0, 16, (b, m, t_valid + t_pad)).astype(np.int32)
    target_valid = np.broadcast_to(np.arange(t_valid + t_pad) < t_valid, (b, m, t_valid + t_pad))

    @jax.jit
    def run():
        args = (context, context_idx, context_valid, target_idx, target_valid)
        params = predictor.init(jax.random.key(0), *args)["params"]
        apply = functools.partial(predictor.apply, {"params": params})
        short = apply(
            context[:, :k_valid],
            context_idx[:, :k_valid],
            context_valid[:, :k_valid],
            target_idx[..., :t_valid],
            target_valid[..., :t_valid],
        )
        padded = apply(*args)
        all_valid = apply(context, context_idx, np.ones_like(context_valid), target_idx, np.ones_like(target_valid))
        return short, padded, all_valid

    short, padded, all_valid = jax.device_get(run())
    assert padded.shape == (b, m, t_valid + t_pad, enc_dim)
    np.testing.assert_allclose(padded[:, :, :t_valid], short, rtol=1e-5, atol=1e-5)
    # Sensitivity: the same padding, marked valid, does change the predictions.
    assert np.abs(all_valid[:, :, :t_valid] - short).max() > 1e-3


# ----------------------------------------------------------------------------
# scanned vs unrolled, remat


def _stack_blocks(params, depth):
    """The unrolled layout (stack/blocks_0..blocks_{n-1}) -> the scanned one (stack/blocks, leading depth axis)."""
    blocks = [params["stack"][f"blocks_{i}"] for i in range(depth)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return {**params, "stack": {"blocks": stacked}}


def test_scanned_stack_matches_unrolled(micro):
    """scan_layers=True keeps the same parameters with a leading depth axis under stack/blocks;
    with the unrolled parameters stacked into that layout the encoder gives the same output."""
    unrolled, params, images = micro
    scanned = _encoder("vit_micro", 4, scan=True)
    depth = unrolled.depth

    scanned_shapes = jax.eval_shape(scanned.init, jax.random.key(0), images)["params"]
    assert set(scanned_shapes["stack"]) == {"blocks"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(scanned_shapes["stack"]["blocks"]):
        one = params["stack"]["blocks_0"]
        for key in path:
            one = one[key.key]
        assert leaf.shape == (depth,) + one.shape, jax.tree_util.keystr(path)

    stacked = _stack_blocks(params, depth)
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned_shapes)

    rng = np.random.default_rng(0)
    idx = _random_token_idx(rng, 2, 16, 8)
    valid = np.arange(8)[None].repeat(2, 0) < 6

    @jax.jit
    def run(params, stacked):
        outs = []
        for args in [(images,), (images, idx, valid)]:
            outs.append((unrolled.apply({"params": params}, *args), scanned.apply({"params": stacked}, *args)))
        return outs

    for want, got in jax.device_get(run(params, stacked)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan,policy", [
    (False, "full"), pytest.param(True, "full", marks=pytest.mark.slow), (True, "dots"),
    pytest.param(False, "dots_no_batch", marks=pytest.mark.slow),  # two policies and both stacks run by default
])
def test_remat_changes_nothing(micro, scan, policy):
    """remat=True (recompute each block in the backward pass), under every remat policy, gives the
    same outputs and gradients."""
    _, params, images = micro
    plain = _encoder("vit_micro", 4, scan=scan)
    remat = _encoder("vit_micro", 4, scan=scan, remat=True, remat_policy=policy)
    if scan:
        params = _stack_blocks(params, plain.depth)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(remat.init, jax.random.key(0), images)["params"]
    )
    rng = np.random.default_rng(0)
    idx = _random_token_idx(rng, 2, 16, 8)
    valid = np.arange(8)[None].repeat(2, 0) < 6

    @jax.jit
    def run(params):
        def loss(p, model):
            return jnp.sum(model.apply({"params": p}, images, idx, valid) ** 2)

        return jax.value_and_grad(loss)(params, plain), jax.value_and_grad(loss)(params, remat)

    (out_plain, grads_plain), (out_remat, grads_remat) = jax.device_get(run(params))
    np.testing.assert_allclose(out_remat, out_plain, rtol=1e-6)
    assert jax.tree.structure(grads_remat) == jax.tree.structure(grads_plain)
    for g_remat, g_plain in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads_plain)):
        np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# dtype


def test_bfloat16_compute_keeps_float32_params():
    """model.dtype=bfloat16 sets the matmul dtype only, as the reference's bf16 autocast: parameters
    stay float32, the residual stream and the encoder's final LayerNorm output are float32, the
    predictor's output projection is bfloat16 (checked on traced shapes: no compilation needed)."""
    c = small_config(**{"model.dtype": "bfloat16"})
    encoder = vit.make_encoder(c.model)
    predictor = vit.make_predictor(c.model, 4, 4)
    images = jnp.zeros((2, 16, 16, 3), jnp.float32)
    idx = jnp.zeros((2, 3), jnp.int32)
    tidx = jnp.ones((2, 2, 4), jnp.int32)

    @jax.jit
    def run():
        enc_params = encoder.init(jax.random.key(0), images)["params"]
        out = encoder.apply({"params": enc_params}, images)
        args = (out[:, :3], idx, idx >= 0, tidx, tidx >= 0)
        pred_params = predictor.init(jax.random.key(1), *args)["params"]
        return enc_params, out, pred_params, predictor.apply({"params": pred_params}, *args)

    enc_params, out, pred_params, pred = jax.eval_shape(run)
    assert {leaf.dtype for leaf in jax.tree.leaves(enc_params)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(pred_params)} == {jnp.dtype(jnp.float32)}
    assert (out.dtype, out.shape) == (jnp.float32, (2, 16, 64))
    assert (pred.dtype, pred.shape) == (jnp.bfloat16, (2, 2, 4, 64))


def test_bfloat16_residual_stream_stays_close_to_float32(micro):
    """model.residual_dtype=bfloat16 (not the reference: halves activation memory) carries the residual
    stream in bf16; outputs stay within bf16 rounding of the float32-residual model."""
    encoder, params, images = micro
    bf16 = _encoder("vit_micro", 4, dtype=jnp.bfloat16)
    bf16_residual = _encoder("vit_micro", 4, dtype=jnp.bfloat16, residual_dtype=jnp.bfloat16)

    @jax.jit
    def run(params):
        return encoder.apply({"params": params}, images), bf16_residual.apply({"params": params}, images)

    out32, out_bf16 = jax.device_get(run(params))
    assert out_bf16.dtype == np.float32  # the final LayerNorm still returns float32
    err = np.abs(out_bf16 - out32).max()
    assert 0 < err < 0.1, err  # LayerNorm-ed features are O(1); bf16 has 8 bits of mantissa
    assert bf16.residual_dtype == jnp.float32


# ----------------------------------------------------------------------------
# cuDNN attention: what reaches jax.nn.dot_product_attention


def _record_attention_calls(monkeypatch):
    """Replace jax.nn.dot_product_attention with a recorder that runs XLA's implementation."""
    calls = []
    real = jax.nn.dot_product_attention

    def recorder(q, k, v, bias=None, mask=None, *, key_value_seq_lengths=None, implementation=None, **kw):
        calls.append(
            dict(
                q=q.shape, k=k.shape, dtype=q.dtype, implementation=implementation,
                mask=None if mask is None else mask.shape, kv_lengths=key_value_seq_lengths is not None,
            )
        )
        return real(q, k, v, bias, mask, key_value_seq_lengths=key_value_seq_lengths, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
    return calls


@pytest.mark.parametrize(
    "config_file", ["in1k_vith14.py", "in1k_vith16_448.py", "in22k_vith14.py", "in22k_vitg16.py"]
)
def test_cudnn_attention_gets_shapes_cudnn_trains_with(monkeypatch, config_file):
    """For every reference config under model.attention_impl=cudnn, each attention call of a train
    step is one jax's cuDNN path accepts in training (jax/_src/cudnn/fused_attention_stablehlo.py):
    bf16, head dim a multiple of 8 and <= 128, and a dense mask (which cuDNN turns into a bias) only
    on even query and key lengths; the encoder's prefix-valid context goes as key_value_seq_lengths."""
    import importlib.util
    import os

    from ijepa_jax import config_lib, masks, step, train

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", config_file)
    module_spec = importlib.util.spec_from_file_location("reference_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config()
    config.model.attention_impl = "cudnn"
    config.data.update(source="synthetic", batch_size=8, root="")
    config.mask.auto_context_batch = 16  # K's value does not matter here, only its padding
    config_lib.validate(config, num_devices=8)
    spec = masks.resolve_spec(config)
    assert spec.context_len % 8 == 0 and spec.target_len % 8 == 0
    models = step.make_models(config, spec.grid_h)
    tx = optax.sgd(0.1)
    shapes = train.batch_shapes(config, spec)
    calls = _record_attention_calls(monkeypatch)

    def grads(rng):
        state = step.init_state(rng, models, tx, shapes)
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
        return jax.grad(step.loss_fn)(state.params, state.target_params, batch, models)

    jax.eval_shape(grads, jax.random.key(0))
    assert calls, "no attention call was traced"
    seen = set()
    for c in calls:
        b, t, heads, head_dim = c["q"]
        s = c["k"][1]
        assert c["implementation"] == "cudnn" and c["dtype"] == jnp.bfloat16
        assert head_dim % 8 == 0 and head_dim <= 128, c
        if c["mask"] is not None:
            assert t % 2 == 0 and s % 2 == 0, c
            assert c["mask"] == (b, 1, t, s), c
        seen.add((t, c["mask"] is not None, c["kv_lengths"]))
    n, k, kt = spec.num_patches, spec.context_len, spec.context_len + spec.target_len
    assert seen == {(n, False, False), (k, False, True), (kt, True, False)}, seen


def optax_sgd():
    import optax

    return optax.sgd(0.1)


@pytest.mark.slow  # the cuDNN path runs on NVIDIA GPUs only; its shapes are checked by default (test_cudnn_attention_gets_shapes_cudnn_trains_with)
def test_cudnn_arguments_mean_the_same_as_xla_masks(monkeypatch):
    """The cuDNN-configured models (key_value_seq_lengths for the context, broadcast masks for the
    predictor), run through XLA's implementation on CPU, give the loss of the XLA models, and the
    padded batch (pad_multiple=8) gives the loss of the unpadded one."""
    from ijepa_jax import masks, step, train

    config = small_config()
    spec = masks.resolve_spec(config)
    padded_spec = dataclasses.replace(spec, pad_multiple=8)
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    batch = {"images": images, **masks.MaskSampler(spec).sample(np.random.default_rng(0), 8)}
    padded = {"images": images, **masks.MaskSampler(padded_spec).sample(np.random.default_rng(0), 8)}
    assert padded["context_idx"].shape[1] == 8 > batch["context_idx"].shape[1]

    xla = step.make_models(config, spec.grid_h)
    cudnn = step.make_models(small_config(**{"model.attention_impl": "cudnn"}), spec.grid_h)
    shapes = train.batch_shapes(config, spec)
    state = jax.jit(lambda rng: step.init_state(rng, xla, optax.sgd(0.1), shapes))(jax.random.key(0))
    real = jax.nn.dot_product_attention

    def run_on_xla(*args, implementation=None, **kw):
        return real(*args, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", run_on_xla)
    loss_fn = jax.jit(step.loss_fn, static_argnames="models")
    loss = float(loss_fn(state.params, state.target_params, batch, models=xla))
    loss_padded = float(loss_fn(state.params, state.target_params, padded, models=xla))
    loss_cudnn_args = float(loss_fn(state.params, state.target_params, padded, models=cudnn))
    np.testing.assert_allclose(loss_padded, loss, rtol=1e-5)
    np.testing.assert_allclose(loss_cudnn_args, loss, rtol=1e-5)
