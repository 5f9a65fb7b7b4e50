"""Hugging Face both ways: the layout of save_pretrained(save_original_format=False) read, and
ijepa_jax.hf_export's IJepaModel folders (read back exactly; with transformers, run to the same features).

transformers (and torch) are not dependencies of this project: the tests that run IJepaModel skip
without them. The state dicts and both Hugging Face layouts come from weight_fixtures.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import numpy_ijepa
from ijepa_jax import convert, encoder_export, hf_export, weight_files
from ijepa_jax.models import vit
from weight_fixtures import (
    HUGE14,
    MICRO,
    micro_config,
    plain,
    reference_checkpoint,
    save_safetensors,
    save_torch,
    to_hf,
    to_hf_layers,
)

HF_CONFIG = {"model_type": "ijepa", "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}


def _folder(path, tensors, config=HF_CONFIG):
    path.mkdir()
    save_safetensors(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


def _exported(path):
    _, params, info = encoder_export.load_encoder(str(path))
    return params, info


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def huge(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, "vit_huge_2blocks", (1280, 2, 16, 4.0))


def test_both_hugging_face_layouts_give_the_same_encoder(tmp_path):
    """transformers >= 5's save_original_format=False names (layers.N.attention.q_proj, mlp.fc1, ...), also
    under IJepaForImageClassification's ijepa. prefix with its classifier, convert to exactly the encoder the
    original layout gives."""
    sd = plain(reference_checkpoint(MICRO)["encoder"])
    original = _folder(tmp_path / "original", to_hf(sd))
    layers = {f"ijepa.{k}": v for k, v in to_hf_layers(sd).items()}
    layers["classifier.weight"] = np.zeros((10, 64), np.float32)
    newer = _folder(tmp_path / "layers", layers)
    a = convert.convert(str(original), export=str(tmp_path / "a.msgpack"))
    b = convert.convert(str(newer), export=str(tmp_path / "b.msgpack"))
    assert (a["layout"], b["layout"]) == ("huggingface", "huggingface_layers")
    _same(_exported(tmp_path / "a.msgpack")[0], _exported(tmp_path / "b.msgpack")[0])
    del layers["ijepa.layers.1.attention.k_proj.weight"]
    save_safetensors(layers, newer / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: layers\.1\.attention\.k_proj\.weight"):
        convert.convert(str(newer), export=str(tmp_path / "c.msgpack"))


def test_export_is_the_layout_transformers_writes_and_reads_back_exactly(tmp_path):
    """A reference checkpoint -> hf_export: its TARGET encoder in save_pretrained's default names, float32,
    the sin-cos table as position_embeddings, an IJepaConfig and a ViTImageProcessor config; converted
    back, the very parameters of convert --export."""
    ckpt = reference_checkpoint(MICRO)
    save_torch(ckpt, tmp_path / "ref.pth.tar")
    line = hf_export.export(str(tmp_path / "ref.pth.tar"), str(tmp_path / "hf"))
    assert line.endswith("IJepaModel vit_micro/4 at 16px")
    tensors = weight_files.read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    want = to_hf(plain(ckpt["target_encoder"]))
    want["embeddings.position_embeddings"] = numpy_ijepa.sincos_table(64, 4, 4)[None]
    assert sorted(tensors) == sorted(want)
    for name, x in tensors.items():
        assert x.dtype == np.float32
        np.testing.assert_allclose(np.asarray(x), want[name], rtol=0, atol=1e-6 if "position" in name else 0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "ijepa" and config["architectures"] == ["IJepaModel"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 2)
    assert (config["intermediate_size"], config["image_size"], config["patch_size"]) == (256, 16, 4)
    assert (config["layer_norm_eps"], config["hidden_act"], config["qkv_bias"]) == (1e-6, "gelu", True)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 16, "width": 16} and processor["image_mean"] == [0.485, 0.456, 0.406]

    convert.convert(str(tmp_path / "ref.pth.tar"), export=str(tmp_path / "direct.msgpack"))
    convert.convert(str(tmp_path / "hf"), export=str(tmp_path / "back.msgpack"))
    _same(_exported(tmp_path / "direct.msgpack")[0], _exported(tmp_path / "back.msgpack")[0])


def test_a_workdir_and_its_msgpack_export_give_the_same_folder(tmp_path):
    """From a (scanned) workdir and from tools/export_encoder's file: the same tensors and configs."""
    save_torch(reference_checkpoint(MICRO), tmp_path / "ref.pth.tar")
    config = micro_config(**{"model.scan_layers": True})
    convert.convert(str(tmp_path / "ref.pth.tar"), workdir=str(tmp_path / "run"), config=config)
    encoder_export.export_from_workdir(str(tmp_path / "run"), str(tmp_path / "enc.msgpack"))
    hf_export.export(str(tmp_path / "run"), str(tmp_path / "a"), step=0)
    hf_export.export(str(tmp_path / "enc.msgpack"), str(tmp_path / "b"))
    for name in ("config.json", "preprocessor_config.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    a = weight_files.read_safetensors(str(tmp_path / "a" / "model.safetensors"))
    b = weight_files.read_safetensors(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_command_line(tmp_path):
    """python -m ijepa_jax.hf_export --source --out."""
    save_torch(reference_checkpoint(MICRO), tmp_path / "ref.pth.tar")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [
        sys.executable,
        "-m",
        "ijepa_jax.hf_export",
        f"--source={tmp_path / 'ref.pth.tar'}",
        f"--out={tmp_path / 'hf'}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"wrote {tmp_path / 'hf'}: IJepaModel vit_micro/4 at 16px"
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "preprocessor_config.json"]


# --------------------------------------------------------------------------- with transformers, when installed


def _transformers():
    reason = "transformers and torch are not installed (not dependencies): IJepaModel is not run on the export"
    torch = pytest.importorskip("torch", reason=reason)
    return torch, pytest.importorskip("transformers", reason=reason)


@pytest.mark.parametrize("dims", [MICRO, HUGE14], ids=["vit_micro4", "vit_h14_2blocks"])
def test_transformers_runs_the_export_to_the_same_features(tmp_path, huge, dims):
    """IJepaModel.from_pretrained(export) on the same images gives our encoder's patch features; the
    folder it then saves, in either layout, converts back to the same parameters."""
    torch, transformers = _transformers()
    save_torch(reference_checkpoint(dims), tmp_path / "ref.pth.tar")
    convert.convert(str(tmp_path / "ref.pth.tar"), export=str(tmp_path / "enc.msgpack"))
    hf_export.export(str(tmp_path / "enc.msgpack"), str(tmp_path / "hf"))
    encoder, params, info = encoder_export.load_encoder(str(tmp_path / "enc.msgpack"))
    size = info["crop_size"]
    images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(encoder.apply)({"params": params}, images))

    model = transformers.AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == "IJepaModel"
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
    gap = float(np.abs(ours - theirs).max())
    print(f"\nmax |ijepa_jax - transformers IJepaModel| ({info['name']}, {size}px): {gap:.2e}")
    assert theirs.shape == ours.shape and gap <= 1e-4, gap
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert list(processor.image_mean) == info["mean"] and processor.size["height"] == size

    for original in (True, False):
        folder = tmp_path / f"saved_{original}"
        model.save_pretrained(str(folder), save_original_format=original)
        convert.convert(str(folder), export=str(tmp_path / f"back_{original}.msgpack"))
        _same(params, _exported(tmp_path / f"back_{original}.msgpack")[0])
