"""ijepa_jax.convert: released I-JEPA weights (reference torch files, Hugging Face safetensors) -> ijepa_jax.

No network and no released file: state dicts with the names and shapes of the released checkpoints are
built from random tensors (weight_fixtures.py: the reference's names written out, not taken from the code
under test), saved in the torch zip format (by a small writer; by torch.save too when torch is installed)
and in the Hugging Face layout, converted, and our encoder / predictor are compared with the float64 numpy
forward of the reference architecture in numpy_ijepa.py (and, with torch, with PyTorch modules). Bad
inputs: test_convert_errors.py; the way back to Hugging Face: test_hf_export.py.
"""

import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import numpy_ijepa
from ijepa_jax import checkpoint, convert, encoder_export, train, weight_files
from ijepa_jax.models import vit
from weight_fixtures import (
    GIANT16,
    HUGE14,
    MICRO,
    MICRO_ARCH,
    _Call,
    _Global,
    _Strided,
    ddp,
    micro_config,
    plain,
    reference_checkpoint,
    save_safetensors,
    save_torch,
    to_hf,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32 (XLA:CPU) vs the float64 oracle on patch tokens: the brief's bound.
ATOL = 1e-4


@pytest.fixture
def sizes(monkeypatch):
    """Truncated ViT-H/ViT-g sizes as names our models know (VIT_SIZES has only the full depths)."""
    monkeypatch.setitem(vit.VIT_SIZES, "vit_huge_2blocks", (1280, 2, 16, 4.0))
    monkeypatch.setitem(vit.VIT_SIZES, "vit_giant_1block", (1408, 1, 16, 48 / 11))


# --------------------------------------------------------------------------- comparing with the oracle


def restore_state(workdir):
    """The whole saved state (a dict) and config of a workdir's latest checkpoint, on one device."""
    manager, step = checkpoint.read_only_manager(workdir)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), manager.item_metadata(step)["state"]
    )
    out = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore())
    )
    return step, jax.tree.map(np.asarray, out["state"]), out["config"]


def encoder_gap(params, sd, dims, images, scan=False, keep=None):
    """max |our Encoder - numpy reference encoder| over images (B, H, W, 3), optionally on kept tokens."""
    d, depth, heads, hidden, patch, _, _, _ = dims
    ratio = next(r for w, _, _, r in vit.VIT_SIZES.values() if w == d and int(w * r) == hidden)
    enc = vit.Encoder(patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=ratio, scan=scan)
    idx = None if keep is None else jnp.asarray(keep)
    ours = np.asarray(jax.jit(enc.apply)({"params": params}, jnp.asarray(images), idx))
    want = [
        numpy_ijepa.encode(sd, im.transpose(2, 0, 1).astype(np.float64), heads, None if keep is None else keep[b])
        for b, im in enumerate(images)
    ]
    return float(np.abs(ours - np.stack(want)).max()), ours


def predictor_gap(params, sd, dims, z, ctx, tgt, scan=False):
    """max |our Predictor - numpy reference predictor| for context features z (B, K, D) and targets (B, M, T)."""
    _, _, heads, _, _, grid, width, pred_depth = dims
    pred = vit.Predictor(grid_h=grid, grid_w=grid, embed_dim=width, depth=pred_depth, num_heads=heads, scan=scan)
    ours = np.asarray(
        jax.jit(pred.apply)(
            {"params": params},
            jnp.asarray(z),
            jnp.asarray(ctx),
            jnp.ones(ctx.shape, bool),
            jnp.asarray(tgt),
            jnp.ones(tgt.shape, bool),
        )
    )
    want = np.stack(
        [
            np.stack(
                [
                    numpy_ijepa.predict(sd, np.asarray(z[b], np.float64), ctx[b], tgt[b, m], heads)
                    for m in range(tgt.shape[1])
                ]
            )
            for b in range(len(z))
        ]
    )
    return float(np.abs(ours - want).max())


def problem(dims, seed=1, batch=2):
    """Normalised images, a context (the first 3/4 of a shuffled grid) and two target blocks per image."""
    grid, patch = dims[5], dims[4]
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, grid * patch, grid * patch, 3)).astype(np.float32)
    n = grid * grid
    perms = np.stack([rng.permutation(n) for _ in range(batch)])
    ctx = np.sort(perms[:, : 3 * n // 4], axis=1).astype(np.int32)
    tgt = np.stack([perms[:, -4:], perms[:, :4]], axis=1).astype(np.int32)  # outside / inside the context
    return images, ctx, tgt


GAPS = {}  # measured maxima, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def report_gaps():
    yield
    if GAPS:
        print("\nmax |ours - reference|: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(GAPS.items())))


# --------------------------------------------------------------------------- the readers


def test_torch_reader_reads_every_dtype_views_and_skips_unknown_objects(tmp_path):
    base = np.arange(30, dtype=np.float32).reshape(5, 6)
    obj = {
        "a": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        "h": np.linspace(-2, 2, 6, dtype=np.float16).reshape(2, 3),
        "b": np.linspace(-3, 3, 8).astype(ml_dtypes.bfloat16),
        "t": _Strided(base, 0, (6, 5), (1, 6)),  # base.T
        "s": _Strided(base, 8, (2, 3), (6, 1)),  # base[1:3, 2:5]
        "n": np.arange(4, dtype=np.int64),
        "epoch": 7,
        "other": _Call(_Global("somepackage.module", "Thing"), (1, 2)),  # an object the reader must not build
    }
    save_torch(obj, tmp_path / "x.pt")
    got = weight_files.TorchFile(str(tmp_path / "x.pt")).load()
    np.testing.assert_array_equal(np.asarray(got["a"]), obj["a"])
    np.testing.assert_array_equal(np.asarray(got["h"]), obj["h"])
    assert np.asarray(got["b"]).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(got["b"], np.float32), obj["b"].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got["t"]), base.T)
    np.testing.assert_array_equal(np.asarray(got["s"]), base[1:3, 2:5])
    np.testing.assert_array_equal(np.asarray(got["n"]), obj["n"])
    assert got["epoch"] == 7 and isinstance(got["other"], weight_files._Opaque)
    assert got["other"].origin == "somepackage.module.Thing" and got["other"].args == (1, 2)


def test_safetensors_reader(tmp_path):
    tensors = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "h": np.ones(5, np.float16),
        "b": np.arange(3).astype(ml_dtypes.bfloat16),
    }
    save_safetensors(tensors, tmp_path / "m.safetensors")
    got = weight_files.read_safetensors(str(tmp_path / "m.safetensors"))
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)


def test_safetensors_reader_reads_files_of_the_safetensors_package(tmp_path):
    st = pytest.importorskip(
        "safetensors.numpy", reason="the safetensors package is not installed (our writer is tested above)"
    )
    tensors = {"x": np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32), "y": np.ones(2, np.float16)}
    st.save_file(tensors, str(tmp_path / "m.safetensors"))
    got = weight_files.read_safetensors(str(tmp_path / "m.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v)


# --------------------------------------------------------------------------- conversion vs the numpy reference


@pytest.mark.parametrize("scan", [False, True])
def test_small_reference_checkpoint_matches_the_numpy_reference(tmp_path, scan):
    """A ViT-micro/4 checkpoint in the reference's format -> a workdir (unrolled or scanned blocks, as the
    config says): online encoder, target encoder and predictor each reproduce the reference forward."""
    ckpt = reference_checkpoint(MICRO)
    save_torch(ckpt, tmp_path / "ref.pth.tar")
    config = micro_config(**{"model.scan_layers": scan})
    summary = convert.convert(str(tmp_path / "ref.pth.tar"), workdir=str(tmp_path / "run"), config=config)
    assert summary["arch"]["name"] == "vit_micro" and summary["epoch"] == 300

    step, state, saved = restore_state(str(tmp_path / "run"))
    assert step == 0 and int(state["step"]) == 0
    assert saved["converted_from"]["epoch"] == 300 and saved["converted_from"]["world_size"] == 16
    assert saved["model"]["scan_layers"] == scan
    assert all(not np.any(x) for x in jax.tree.leaves(state["opt_state"])), "a fresh optimizer"

    images, ctx, tgt = problem(MICRO)
    enc_sd, tgt_sd, pred_sd = plain(ckpt["encoder"]), plain(ckpt["target_encoder"]), plain(ckpt["predictor"])
    gap_target, _ = encoder_gap(state["target_params"], tgt_sd, MICRO, images, scan)
    gap_online, _ = encoder_gap(state["params"]["encoder"], enc_sd, MICRO, images, scan)
    gap_context, z = encoder_gap(state["params"]["encoder"], enc_sd, MICRO, images, scan, keep=ctx)
    gap_pred = predictor_gap(state["params"]["predictor"], pred_sd, MICRO, z, ctx, tgt, scan)
    GAPS.update({f"micro target{'/scan' * scan}": gap_target, f"micro predictor{'/scan' * scan}": gap_pred})
    assert max(gap_target, gap_online, gap_context, gap_pred) <= ATOL, (gap_target, gap_online, gap_context, gap_pred)
    # ...and the oracle tells the two encoders apart (the comparison would catch a swap).
    assert encoder_gap(state["target_params"], enc_sd, MICRO, images, scan)[0] > 100 * ATOL


@pytest.mark.parametrize("dims", [
    pytest.param(HUGE14, marks=pytest.mark.slow),  # ViT-g/16 runs by default: the same code, other head counts
    GIANT16,
], ids=["vit_h14", "vit_g16"])
def test_released_shapes_match_the_numpy_reference(tmp_path, sizes, dims):
    """ViT-H/14 and ViT-g/16 at 224px (widths 1280 / 1408, 16 heads, MLP 5120 / 6144 (ratio 48/11), predictor
    width 384), with 2 or 1 blocks: converted without a config (the reference recipe, scanned blocks)."""
    ckpt = reference_checkpoint(dims)
    save_torch(ckpt, tmp_path / "ref.pth.tar")
    summary = convert.convert(str(tmp_path / "ref.pth.tar"), workdir=str(tmp_path / "run"))
    a = summary["arch"]
    assert (a["embed_dim"], a["depth"], a["num_heads"], a["mlp_dim"], a["patch_size"], a["grid"]) == dims[:6]
    assert (a["pred_width"], a["pred_depth"]) == dims[6:]
    _, state, saved = restore_state(str(tmp_path / "run"))
    assert saved["model"]["scan_layers"] and saved["data"]["crop_size"] == 224

    images, ctx, tgt = problem(dims, batch=1)
    gap_target, _ = encoder_gap(state["target_params"], plain(ckpt["target_encoder"]), dims, images, scan=True)
    _, z = encoder_gap(state["params"]["encoder"], plain(ckpt["encoder"]), dims, images, scan=True, keep=ctx)
    gap_pred = predictor_gap(state["params"]["predictor"], plain(ckpt["predictor"]), dims, z, ctx, tgt, scan=True)
    GAPS.update({f"{a['name']} target": gap_target, f"{a['name']} predictor": gap_pred})
    assert gap_target <= ATOL and gap_pred <= ATOL, (gap_target, gap_pred)


def test_huggingface_safetensors_export_matches_the_numpy_reference(tmp_path, sizes):
    """An IJepaModel folder (model.safetensors, config.json) of ViT-H/14 shape -> --export; the exported
    target encoder loads with encoder_export.load_encoder and reproduces the reference forward."""
    sd = plain(reference_checkpoint(HUGE14)["encoder"])
    folder = tmp_path / "ijepa_vith14_1k"
    folder.mkdir()
    save_safetensors(to_hf(sd), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}))
    summary = convert.convert(str(folder), export=str(tmp_path / "enc.msgpack"))
    assert summary["format"] == "huggingface" and summary["arch"]["pred_depth"] is None
    _, params, info = encoder_export.load_encoder(str(tmp_path / "enc.msgpack"))
    assert info == {"name": "vit_huge_2blocks", "patch_size": 14, "crop_size": 224,
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # ImageNet's, as the reference
    images, _, _ = problem(HUGE14, batch=1)
    gap, _ = encoder_gap(params, sd, HUGE14, images)
    GAPS["vit_huge_2blocks huggingface"] = gap
    assert gap <= ATOL


def test_huggingface_model_gets_a_fresh_predictor_and_its_encoder_twice(tmp_path):
    """An encoder-only source into a workdir: online = target = that encoder, the config's predictor freshly
    initialised; a classification head (IJepaForImageClassification: ijepa. prefix) is ignored."""
    sd = plain(reference_checkpoint(MICRO)["target_encoder"])
    tensors = {f"ijepa.{k}": v for k, v in to_hf(sd).items()}
    tensors["classifier.weight"] = np.zeros((10, 64), np.float32)
    save_safetensors(tensors, tmp_path / "model.safetensors")
    convert.convert(str(tmp_path / "model.safetensors"), workdir=str(tmp_path / "run"), config=micro_config())
    _, state, _ = restore_state(str(tmp_path / "run"))
    images, _, _ = problem(MICRO)
    assert encoder_gap(state["target_params"], sd, MICRO, images)[0] <= ATOL
    for x, y in zip(jax.tree.leaves(state["params"]["encoder"]), jax.tree.leaves(state["target_params"])):
        np.testing.assert_array_equal(x, y)
    assert state["params"]["predictor"]["mask_token"].shape == (1, 1, 32)


# --------------------------------------------------------------------------- errors


def _convert_dicts(tmp_path, ckpt, config=None):
    save_torch(ckpt, tmp_path / "bad.pth.tar")
    return convert.convert(str(tmp_path / "bad.pth.tar"), workdir=str(tmp_path / "run"), config=config)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    ckpt = reference_checkpoint(MICRO)
    del ckpt["target_encoder"]["module.blocks.1.attn.proj.bias"]
    ckpt["target_encoder"]["module.blocks.0.attn.extra"] = np.zeros(3, np.float32)
    ckpt["target_encoder"]["module.norm.weight"] = np.ones(65, np.float32)
    with pytest.raises(ValueError) as e:
        _convert_dicts(tmp_path, ckpt)
    msg = str(e.value)
    assert "[target_encoder]" in msg
    assert "missing: blocks.1.attn.proj.bias" in msg
    assert "unexpected: blocks.0.attn.extra" in msg
    assert "wrong shape: norm.weight (65,) (expected (64,))" in msg


def test_predictor_errors_and_a_missing_hf_tensor_are_named_in_their_own_layout(tmp_path):
    ckpt = reference_checkpoint(MICRO)
    ckpt["predictor"]["module.mask_token"] = np.zeros((1, 1, 16), np.float32)
    with pytest.raises(
        ValueError, match=r"\[predictor\].*wrong shape: mask_token \(1, 1, 16\) \(expected \(1, 1, 32\)\)"
    ):
        _convert_dicts(tmp_path, ckpt)
    tensors = to_hf(plain(reference_checkpoint(MICRO)["encoder"]))
    del tensors["encoder.layer.1.attention.attention.key.weight"]
    save_safetensors(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: encoder\.layer\.1\.attention\.attention\.key\.weight"):
        convert.convert(str(tmp_path / "model.safetensors"), export=str(tmp_path / "x.msgpack"))


def test_config_mismatch_is_named(tmp_path):
    with pytest.raises(
        ValueError, match=r"data\.crop_size: checkpoint 16, config 32; model\.pred_depth: checkpoint 1, config 2"
    ):
        _convert_dicts(
            tmp_path, reference_checkpoint(MICRO), micro_config(**{"model.pred_depth": 2, "data.crop_size": 32})
        )
    with pytest.raises(ValueError, match=r"model\.name: checkpoint 'vit_micro', config 'vit_tiny'"):
        _convert_dicts(tmp_path, reference_checkpoint(MICRO), micro_config(**{"model.name": "vit_tiny"}))


def test_unknown_sizes_learned_positions_and_non_checkpoints_are_refused(tmp_path):
    ckpt = reference_checkpoint((64, 3, 2, 256, 4, 4, 32, 1))  # depth 3: no such ViT
    with pytest.raises(ValueError, match=r"width 64, depth 3, MLP width 256 is none of the known sizes"):
        _convert_dicts(tmp_path, ckpt)
    ckpt = reference_checkpoint(MICRO)
    ckpt["target_encoder"]["module.pos_embed"] = ckpt["target_encoder"]["module.pos_embed"] + np.float32(0.01)
    with pytest.raises(ValueError, match=r"pos_embed differs from the fixed 2-D sin-cos table by 0.01"):
        _convert_dicts(tmp_path, ckpt)
    (tmp_path / "junk.pth.tar").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match="is a plain pickle"):
        convert.convert(str(tmp_path / "junk.pth.tar"), export=str(tmp_path / "x.msgpack"))
    save_torch({"weights": {"a": np.zeros(2, np.float32)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither encoder nor target_encoder"):
        convert.convert(str(tmp_path / "other.pt"), export=str(tmp_path / "x.msgpack"))


def test_half_precision_checkpoints_convert_to_float32(tmp_path):
    """Every tensor stored as bfloat16 (pos_embed too, off the exact table by bf16 rounding): converted, the
    parameters are those values in float32."""
    ckpt = reference_checkpoint(MICRO)
    for key in ("encoder", "predictor", "target_encoder"):
        ckpt[key] = {k: v.astype(ml_dtypes.bfloat16) for k, v in ckpt[key].items()}
    _convert_dicts(tmp_path, ckpt, micro_config())
    _, state, _ = restore_state(str(tmp_path / "run"))
    qkv = ckpt["target_encoder"]["module.blocks.1.attn.qkv.weight"].astype(np.float32)
    np.testing.assert_array_equal(state["target_params"]["stack"]["blocks_1"]["attn"]["qkv"]["kernel"], qkv.T)
    assert state["target_params"]["norm"]["scale"].dtype == np.float32


def test_refuses_a_workdir_that_holds_checkpoints(tmp_path):
    _convert_dicts(tmp_path, reference_checkpoint(MICRO), micro_config())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _convert_dicts(tmp_path, reference_checkpoint(MICRO), micro_config())


# --------------------------------------------------------------------------- using the result


def test_converted_checkpoint_restores_exports_and_starts_a_run(tmp_path):
    """encoder_export.restore_target_encoder and export_from_workdir read the converted workdir; as
    checkpoint.init_from it starts train.train (2 steps) from exactly the converted weights."""
    ckpt = reference_checkpoint(MICRO)
    save_torch(ckpt, tmp_path / "ref.pth.tar")
    convert.convert(str(tmp_path / "ref.pth.tar"), workdir=str(tmp_path / "converted"), config=micro_config())
    params, config, step = encoder_export.restore_target_encoder(str(tmp_path / "converted"))
    assert step == 0 and config.model.name == "vit_micro"
    images, _, _ = problem(MICRO)
    assert encoder_gap(params, plain(ckpt["target_encoder"]), MICRO, images)[0] <= ATOL
    exported = encoder_export.export_from_workdir(str(tmp_path / "converted"), str(tmp_path / "enc.msgpack"))
    _, exported_params, _ = encoder_export.load_encoder(exported)
    for x, y in zip(jax.tree.leaves(exported_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    run = micro_config(total_steps=2, **{"checkpoint.init_from": str(tmp_path / "converted")})
    exp = train.build(run)
    manager = checkpoint.make_manager(str(tmp_path / "probe"), exp.config.checkpoint, exp.steps_per_epoch)
    state = train.initial_state(exp, manager, str(tmp_path / "probe"))
    _, saved, _ = restore_state(str(tmp_path / "converted"))
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(x), y)
    train.train(run, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_command_line(tmp_path):
    """python -m ijepa_jax.convert --source --workdir --export --config."""
    save_torch(reference_checkpoint(MICRO), tmp_path / "ref.pth.tar")
    (tmp_path / "cfg.py").write_text(
        f"from conftest import small_config\n\ndef get_config():\n    return small_config(**{MICRO_ARCH!r})\n"
    )
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")])
    )
    args = [
        sys.executable,
        "-m",
        "ijepa_jax.convert",
        f"--source={tmp_path / 'ref.pth.tar'}",
        f"--workdir={tmp_path / 'run'}",
        f"--export={tmp_path / 'enc.msgpack'}",
        f"--config={tmp_path / 'cfg.py'}",
    ]
    out = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vit_micro/4 at 16px, predictor 1 x 32, epoch 300" in out.stdout
    assert checkpoint.read_only_manager(str(tmp_path / "run"))[1] == 0
    assert encoder_export.load_encoder(str(tmp_path / "enc.msgpack"))[2]["name"] == "vit_micro"


# --------------------------------------------------------------------------- with PyTorch, when installed


def torch_reference_modules(torch, dims):
    """The reference encoder and predictor as PyTorch modules (re-written from its vision_transformer.py:
    timm-style pre-norm blocks, LayerNorm eps 1e-6, exact GELU, qkv with bias, fixed sin-cos buffers)."""
    nn = torch.nn
    d, depth, heads, hidden, patch, grid, width, pred_depth = dims

    class Block(nn.Module):
        def __init__(self, dim, mlp):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
            x = x + self.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
            return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, d, patch, stride=patch)
            self.pos_embed = nn.Parameter(
                torch.from_numpy(numpy_ijepa.sincos_table(d, grid, grid)).float()[None], requires_grad=False
            )
            self.blocks = nn.ModuleList([Block(d, hidden) for _ in range(depth)])
            self.norm = nn.LayerNorm(d, eps=1e-6)

        def forward(self, x, keep=None):
            x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
            if keep is not None:
                x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)

    class Predictor(nn.Module):
        def __init__(self):
            super().__init__()
            self.predictor_embed = nn.Linear(d, width)
            self.mask_token = nn.Parameter(torch.randn(1, 1, width))
            self.predictor_pos_embed = nn.Parameter(
                torch.from_numpy(numpy_ijepa.sincos_table(width, grid, grid)).float()[None], requires_grad=False
            )
            self.predictor_blocks = nn.ModuleList([Block(width, 4 * width) for _ in range(pred_depth)])
            self.predictor_norm = nn.LayerNorm(width, eps=1e-6)
            self.predictor_proj = nn.Linear(width, d)

        def forward(self, z, ctx, tgt):  # one target block per image: tgt (B, T)
            pos = self.predictor_pos_embed[0]
            x = self.predictor_embed(z) + pos[ctx]
            x = torch.cat([x, self.mask_token + pos[tgt]], dim=1)
            for blk in self.predictor_blocks:
                x = blk(x)
            return self.predictor_proj(self.predictor_norm(x[:, ctx.shape[1] :]))

    torch.manual_seed(0)
    modules = Encoder(), Predictor(), Encoder()
    with torch.no_grad():  # non-trivial LayerNorms and biases, as trained weights have
        for m in modules:
            for name, p in m.named_parameters():
                if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                    p.normal_(1.0, 0.2)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.1)
    return modules


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_pytorch_reference_modules(tmp_path, dtype):
    """torch.save of PyTorch modules written from the reference (DDP prefixes; float32, or bfloat16 storages)
    -> convert -> our encoder and predictor match the modules' outputs on the same weights."""
    torch = pytest.importorskip(
        "torch", reason="torch is not installed: the comparison with PyTorch modules is skipped"
    )
    enc, pred, tgt = torch_reference_modules(torch, MICRO)
    if dtype == "bfloat16":  # the weights as bf16 holds them, for both sides; the fixed tables stay exact
        with torch.no_grad():
            for m in (enc, pred, tgt):
                for name, p in m.named_parameters():
                    if not name.endswith("pos_embed"):
                        p.copy_(p.to(torch.bfloat16).float())

    def state(m):
        cast = lambda k, v: v if k.endswith("pos_embed") else v.to(getattr(torch, dtype))  # noqa: E731
        return collections.OrderedDict((f"module.{k}", cast(k, v)) for k, v in m.state_dict().items())

    torch.save(
        {"encoder": state(enc), "predictor": state(pred), "target_encoder": state(tgt), "epoch": 3},
        tmp_path / "ref.pth.tar",
    )
    convert.convert(str(tmp_path / "ref.pth.tar"), workdir=str(tmp_path / "run"), config=micro_config())
    _, saved, _ = restore_state(str(tmp_path / "run"))

    images, ctx, tgt_idx = problem(MICRO)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want_target = tgt(x).numpy()
        z = enc(x, torch.from_numpy(ctx.astype(np.int64)))
        want_pred = pred(
            z, torch.from_numpy(ctx.astype(np.int64)), torch.from_numpy(tgt_idx[:, 0].astype(np.int64))
        ).numpy()
    d, depth, heads, _, patch, grid, width, pred_depth = MICRO
    ours_target = vit.Encoder(patch, d, depth, heads).apply({"params": saved["target_params"]}, images)
    ours_z = vit.Encoder(patch, d, depth, heads).apply({"params": saved["params"]["encoder"]}, images, ctx)
    ones = lambda a: np.ones(a.shape, bool)  # noqa: E731
    ours_pred = vit.Predictor(grid, grid, width, pred_depth, heads).apply(
        {"params": saved["params"]["predictor"]}, ours_z, ctx, ones(ctx), tgt_idx[:, :1], ones(tgt_idx[:, :1])
    )[:, 0]
    gaps = (
        float(np.abs(np.asarray(ours_target) - want_target).max()),
        float(np.abs(np.asarray(ours_pred) - want_pred).max()),
    )
    GAPS.update({f"torch {dtype} target": gaps[0], f"torch {dtype} predictor": gaps[1]})
    assert max(gaps) <= ATOL, gaps


def test_our_torch_writer_is_what_torch_load_reads(tmp_path):
    """The test-only writer above writes real torch files (so the torch-free tests test the real format)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the writer is checked only against our reader")
    base = np.arange(30, dtype=np.float32).reshape(5, 6)
    save_torch(
        {
            "w": ddp({"a": base}),
            "t": _Strided(base, 0, (6, 5), (1, 6)),
            "b": np.ones(3, ml_dtypes.bfloat16),
            "epoch": 2,
        },
        tmp_path / "x.pt",
    )
    got = torch.load(tmp_path / "x.pt", weights_only=True)
    np.testing.assert_array_equal(got["w"]["module.a"].numpy(), base)
    np.testing.assert_array_equal(got["t"].numpy(), base.T)
    assert got["b"].dtype == torch.bfloat16 and got["epoch"] == 2


# --------------------------------------------------------------------------- using converted weights


def test_a_converted_encoder_runs_at_another_resolution_with_sincos_positions_of_that_grid(tmp_path):
    """Positions are fixed sin-cos tables computed for the input's grid, so a 16px encoder applies to
    32px images (grid 8x8): it equals the numpy reference with the 8x8 sin-cos table in place of the
    stored 4x4 one. (The reference code would instead interpolate its stored table bicubically.)"""
    ckpt = reference_checkpoint(MICRO)
    save_torch(ckpt, tmp_path / "ref.pth.tar")
    convert.convert(str(tmp_path / "ref.pth.tar"), workdir=str(tmp_path / "converted"), config=micro_config())
    params, _, _ = encoder_export.restore_target_encoder(str(tmp_path / "converted"))
    images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    sd = plain(ckpt["target_encoder"])
    sd["pos_embed"] = numpy_ijepa.sincos_table(MICRO[0], 8, 8)[None]
    gap, ours = encoder_gap(params, sd, MICRO, images)
    assert ours.shape == (2, 64, MICRO[0]) and gap <= ATOL


def test_a_converted_checkpoint_is_evaluated(tmp_path):
    """`evaluate` on the converted workdir: k-NN and a probe run on its target encoder's features."""
    from ijepa_jax import evaluate

    save_torch(reference_checkpoint(MICRO), tmp_path / "ref.pth.tar")
    convert.convert(str(tmp_path / "ref.pth.tar"), workdir=str(tmp_path / "converted"), config=micro_config())
    config = micro_config(**{"data.synthetic_images": 60, "eval.probe_epochs": 2, "eval.probe_batch_size": 16})
    enc = evaluate.from_workdir(str(tmp_path / "converted"))
    results = evaluate.evaluate(config, enc, str(tmp_path / "eval"), protocols=("knn", "linear"))
    assert 0 <= results["knn"]["top1"] <= 1 and set(results["linear"]) == {"last", "last_bn", "last4", "last4_bn"}
    assert results["features"]["train_images"] == 60
