"""Bad inputs of convert, tools/export_encoder and hf_export: one line naming the problem, exit status 1.

Each case builds one bad input; the table runs in-process through bad_input.run_or_exit (what the
commands' main() calls), and the inputs an audit found printing tracebacks (or converting silently)
also through the real command lines, in subprocesses.
"""

import concurrent.futures
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ijepa_jax import bad_input, convert, hf_export
from ijepa_jax.tools import export_encoder
from weight_fixtures import (
    MICRO,
    _Call,
    _Global,
    _Strided,
    micro_config,
    plain,
    reference_checkpoint,
    safetensors_bytes,
    save_safetensors,
    save_torch,
    to_hf,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _ckpt(tmp, **changes):
    """A valid MICRO reference checkpoint with entries replaced (None: removed)."""
    ckpt = reference_checkpoint(MICRO)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    save_torch(ckpt, tmp / "ref.pth.tar")
    return tmp / "ref.pth.tar"


def _with_tensor(tmp, name, tensor):
    target = dict(reference_checkpoint(MICRO)["target_encoder"], **{f"module.{name}": tensor})
    return _ckpt(tmp, target_encoder=target)


def _damaged_records(tmp):
    """A torch file whose tensor records fail their CRC check."""
    path = _ckpt(tmp)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                data[start] ^= 0xFF
    return _write(path, bytes(data))


def _hf_folder(tmp, config: str | None, tensors=None):
    folder = tmp / "hf"
    folder.mkdir()
    save_safetensors(tensors or to_hf(plain(reference_checkpoint(MICRO)["encoder"])), folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(config)
    return folder


def _index(tmp, text):
    (tmp / "model.safetensors.index.json").write_text(text)
    return tmp / "model.safetensors.index.json"


EVIL = _Call(_Global("os", "system"), ("touch PWNED",))  # the reader must never run it

# id -> (bad input under tmp, the message it must give). AUDITED: the ones that printed a traceback (or
# converted silently) before.
CASES = {
    "missing file": (lambda t: t / "nope.pth.tar", r"No checkpoint at .*nope\.pth\.tar"),
    "directory without weights": (lambda t: t, r"holds no model\.safetensors"),
    "folder of torch weights only": (
        lambda t: _write(t / "pytorch_model.bin", b"PK").parent,
        r"pytorch_model\.bin is not read: re-save",
    ),
    "wrong extension": (
        lambda t: _write(t / "w.npz", b"not weights"),
        r"neither a torch zip file .* nor a safetensors",
    ),
    "truncated torch file": (
        lambda t: _write(t / "cut.pth.tar", _ckpt(t).read_bytes()[:5000]),
        r"starts as a zip file but has no readable zip directory: truncated or damaged",
    ),
    "plain pickle": (lambda t: _write(t / "p.pth.tar", pickle.dumps({"encoder": {}})), r"is a plain pickle"),
    "malicious pickle as the encoder": (
        lambda t: _ckpt(t, encoder=EVIL),
        r"\[encoder\] is a call of os\.system \(not run\), not a state dict",
    ),
    "malicious pickle as the file": (lambda t: _ckpt_file(t, EVIL), r"holds a call of os\.system \(not run\)"),
    "malicious tensor": (
        lambda t: _with_tensor(t, "norm.bias", EVIL),
        r"\[target_encoder\] holds 1 entries that are not tensors: 'module\.norm\.bias' \(a call of os\.system",
    ),
    "negative stride": (
        lambda t: _with_tensor(t, "norm.weight", _Strided(np.ones(64, np.float32), 0, (64,), (-1,))),
        r"'module\.norm\.weight' \(an invalid tensor \(offset 0, size \(64,\), stride \(-1,\)\)\)",
    ),
    "tensor past its storage": (
        lambda t: _with_tensor(t, "norm.weight", _Strided(np.ones(3, np.float32), 0, (64,), (1,))),
        r"a tensor of shape \(64,\) runs past the end of its storage record",
    ),
    "damaged tensor records": (lambda t: _damaged_records(t), r"cannot read the record .*Bad CRC-32"),
    "no target_encoder": (lambda t: _ckpt(t, target_encoder=None), r"has no target_encoder .*--online_as_target"),
    "5-byte safetensors": (
        lambda t: _write(t / "m.safetensors", b"\1\2\3\4\5"),
        r"safetensors file .*header too small",
    ),
    "truncated safetensors": (
        lambda t: _write(t / "m.safetensors", safetensors_bytes({"w": F32}, b"\0" * 8)),
        r"not a valid safetensors file .*file not fully covered",
    ),
    "header length 2**64-1": (
        lambda t: _write(t / "m.safetensors", safetensors_bytes({}, length=2**64 - 1)),
        r"not a valid safetensors file .*header too large",
    ),
    "1 TiB tensor": (
        lambda t: _write(
            t / "m.safetensors", safetensors_bytes({"w": {**F32, "shape": [2**38], "data_offsets": [0, 2**40]}})
        ),
        r"not a valid safetensors file .*not fully covered",
    ),
    "overflowing shape": (
        lambda t: _write(t / "m.safetensors", safetensors_bytes({"w": {**F32, "shape": [2**40, 2**40]}}, b"\0" * 16)),
        r"not a valid safetensors file .*overflow computing buffer size",
    ),
    "unsupported dtype": (
        lambda t: _write(
            t / "m.safetensors", safetensors_bytes({"w": {**F32, "dtype": "C64", "shape": [2]}}, b"\0" * 16)
        ),
        r"tensor w has the unsupported dtype C64",
    ),
    "safetensors of another model": (
        lambda t: _write(t / "m.safetensors", safetensors_bytes({"cls_token": F32}, b"\0" * 16)),
        r"cannot infer the architecture",
    ),
    "config.json not JSON": (lambda t: _hf_folder(t, "{model_type: ijepa"), r"config\.json is not JSON"),
    "config.json not an object": (lambda t: _hf_folder(t, "[1, 2]"), r"config\.json holds a JSON list"),
    "folder of another model type": (
        lambda t: _hf_folder(t, '{"model_type": "vit"}'),
        r"config\.json: a 'vit' model, not an I-JEPA one",
    ),
    "index without weight_map": (lambda t: _index(t, '{"metadata": {}}'), r"has no weight_map"),
    "index naming a missing shard": (
        lambda t: _index(t, '{"weight_map": {"a": "model-00001.safetensors"}}'),
        r"names the shard 'model-00001\.safetensors', which is not a file",
    ),
}
AUDITED = [
    "malicious pickle as the encoder",
    "plain pickle",
    "5-byte safetensors",
    "truncated safetensors",
    "header length 2**64-1",
    "1 TiB tensor",
    "overflowing shape",
    "no target_encoder",
]


def _ckpt_file(tmp, obj):
    save_torch(obj, tmp / "obj.pth.tar")
    return tmp / "obj.pth.tar"


def exit_message(fn, *args, **kwargs) -> str:
    """What the command prints for a bad input: SystemExit's one-line message (Python prints it, exit 1)."""
    with pytest.raises(SystemExit) as e:
        bad_input.run_or_exit(fn, *args, **kwargs)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("case", list(CASES))
def test_convert_bad_input_is_one_line(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    make, pattern = CASES[case]
    source = make(tmp_path)
    message = exit_message(convert.convert, str(source), export=str(tmp_path / "out" / "enc.msgpack"))
    assert re.search(pattern, message), message
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_nothing_to_write_and_an_export_path_that_is_a_folder(tmp_path):
    source = str(_ckpt(tmp_path))
    assert "nothing to write" in exit_message(convert.convert, source)
    (tmp_path / "enc.msgpack").mkdir()
    assert "is a directory" in exit_message(convert.convert, source, export=str(tmp_path / "enc.msgpack"))


def test_traceback_flag_raises_the_error_itself(tmp_path):
    with pytest.raises(ValueError, match="is a plain pickle"):
        bad_input.run_or_exit(convert.convert, str(CASES["plain pickle"][0](tmp_path)), export="x", traceback=True)


def test_online_as_target_converts_a_checkpoint_without_target_encoder(tmp_path):
    source = str(_ckpt(tmp_path, target_encoder=None))
    summary = convert.convert(source, export=str(tmp_path / "enc.msgpack"), online_as_target=True)
    assert summary["encoders"] == ["encoder"]


def _run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A converted MICRO checkpoint: a valid workdir to damage."""
    tmp = tmp_path_factory.mktemp("workdir")
    convert.convert(str(_ckpt(tmp)), workdir=str(tmp / "run"), config=micro_config())
    return tmp / "run"


def _damaged(workdir, tmp, what):
    run = tmp / what
    shutil.copytree(workdir, run)
    step = run / "checkpoints" / "0"
    if what == "no state":
        shutil.rmtree(step / "state")
    else:  # every array file cut to nothing
        for root, _, names in os.walk(step / "state"):
            for name in names:
                if os.path.basename(root) == "d":
                    open(os.path.join(root, name), "wb").close()
    return run


EXPORT_CASES = {
    "missing workdir": (lambda w, t: (t / "nope", None), r"No checkpoints in .*nope"),
    "empty checkpoints folder": (
        lambda w, t: ((t / "e" / "checkpoints").mkdir(parents=True) or t / "e", None),
        "no complete",
    ),
    "no such step": (lambda w, t: (w, 7), r"No checkpoint step 7 .* it holds \[0\]"),
    "checkpoint without its state": (lambda w, t: (_damaged(w, t, "no state"), None), r"cannot restore .*KeyError"),
    "checkpoint with cut arrays": (lambda w, t: (_damaged(w, t, "cut"), None), r"cannot restore the target encoder of"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_encoder_bad_input_is_one_line(tmp_path, workdir, case):
    make, pattern = EXPORT_CASES[case]
    run, step = make(workdir, tmp_path)
    message = exit_message(export_encoder.export, str(run), str(tmp_path / "enc.msgpack"), step)
    assert re.search(pattern, message), message


def test_hf_export_bad_input_is_one_line(tmp_path, workdir):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "not an empty folder" in exit_message(hf_export.export, str(workdir), str(tmp_path / "full"))
    msgpack = tmp_path / "enc.msgpack"
    export_encoder.export(str(workdir), str(msgpack))
    assert "--step applies to a workdir" in exit_message(hf_export.export, str(msgpack), str(tmp_path / "o"), 3)
    assert "not those of an ijepa_jax ViT encoder (KeyError: 'stack')" in exit_message(
        hf_export.export_huggingface,
        {"patch_embed": {"kernel": np.zeros((4, 4, 3, 64)), "bias": np.zeros(64)}},
        {"name": "vit_micro", "patch_size": 4, "crop_size": 16},
        str(tmp_path / "o"),
    )
    assert "has no target_encoder" in exit_message(
        hf_export.export, str(_ckpt(tmp_path, target_encoder=None)), str(tmp_path / "o")
    )


def test_command_lines_print_one_line_and_exit_1(tmp_path, workdir):
    """The audited inputs through `python -m ijepa_jax.convert`, and a damaged workdir through
    tools/export_encoder and hf_export: status 1, one line on stderr, no traceback (two at a time)."""
    runs = {}
    for i, case in enumerate(AUDITED):
        (tmp_path / str(i)).mkdir()
        make, pattern = CASES[case]
        source = make(tmp_path / str(i))
        runs[case] = (["ijepa_jax.convert", f"--source={source}", f"--export={tmp_path / 'x.msgpack'}"], pattern)
    damaged = _damaged(workdir, tmp_path, "no state")
    runs["export_encoder"] = (
        ["ijepa_jax.tools.export_encoder", f"--workdir={damaged}", f"--out={tmp_path / 'x.msgpack'}"],
        r"cannot restore .*KeyError",
    )
    runs["hf_export"] = (["ijepa_jax.hf_export", f"--source={damaged}", f"--out={tmp_path / 'hf'}"], "KeyError")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(_run, [args for args, _ in runs.values()])))
    for case, out in done.items():
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1, (case, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and len(lines) == 1, (case, out.stderr[-2000:])
        assert re.search(runs[case][1], lines[0]), (case, lines[0])
    assert not (tmp_path / "x.msgpack").exists() and not (tmp_path / "hf").exists()
