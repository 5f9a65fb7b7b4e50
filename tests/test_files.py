"""Work dirs through the path layer: local paths, and object-storage URLs (gs://) exercised on local
disk by taking the code path an object store gets (whole-file uploads, no append, no rename)."""

import json
import os

import pytest

from conftest import small_config
from ijepa_jax import checkpoint, encoder_export, files, train


def test_local_paths_become_absolute_and_urls_stay_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(files.path("runs/a")) == os.path.join(str(tmp_path), "runs", "a")
    assert str(files.path("gs://bucket/run")) == "gs://bucket/run" and files.is_remote("gs://bucket/run")
    assert not files.is_remote(tmp_path)


def test_write_bytes_creates_folders_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    files.write_bytes(target, b"one")
    files.write_bytes(target, b"two")  # replaces
    assert target.read_bytes() == b"two" and os.listdir(target.parent) == ["x.bin"]


@pytest.fixture
def object_store(monkeypatch):
    """Every path counts as remote: the code an object store gets, run on local disk."""
    monkeypatch.setattr(files, "is_remote", lambda p: True)


def test_a_run_in_an_object_store_workdir_writes_resumes_and_exports(tmp_path, object_store):
    """config.json, metrics.jsonl (uploaded whole after each record), TensorBoard, checkpoints and the
    export, then a resume that continues the metrics file."""
    workdir = str(tmp_path / "bucket" / "run")  # absolute, as a URL would be
    fast = {"optim.epochs": 1, "optim.warmup_epochs": 0}
    train.train(small_config(total_steps=3, **{**fast, "checkpoint.every_steps": 2}), workdir)
    names = set(os.listdir(workdir))
    assert {"config.json", "metrics.jsonl", "tensorboard", "checkpoints", "target_encoder.msgpack"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]

    train.train(small_config(total_steps=5, **{**fast, "checkpoint.every_steps": 2}), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]
    manager, step = checkpoint.read_only_manager(workdir)
    assert step == 5
    encoder, params, info = encoder_export.load_encoder(os.path.join(workdir, "target_encoder.msgpack"))
    assert info["name"] == "vit_micro"
