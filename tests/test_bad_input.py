"""Bad inputs of train, evaluate and the tools: one line `error: ...` naming the problem, exit status 1.

Each case is one command line; the table runs it in-process through bad_input.command (what every
command's `__main__` runs, bad_input.run_command, minus absl's app.run) on a fresh FlagValues, so
flag parsing, config overrides and main() are all exercised. The inputs an audit found printing a
traceback (or creating and downloading into a mistyped data.root) also run through the real command
lines, in subprocesses. convert, export_encoder's checkpoints and hf_export: tests/test_convert_errors.py.
"""

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

import pytest
from absl import flags

from ijepa_jax import bad_input, convert, evaluate, hf_export, train
from ijepa_jax.data import cifar100
from ijepa_jax.tools import (
    benchmark,
    export_encoder,
    input_benchmark,
    mask_stats,
    memory,
    plot_metrics,
    show_masks,
    sweep,
)
from weight_fixtures import MICRO, micro_config, reference_checkpoint, save_torch

# ml_collections loads config files with importlib's deprecated load_module(): its warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/cifar100.py:vit_tiny,smoke"
SYNTHETIC = ("--config.data.source=synthetic",)


def _file(t, name="afile", text="x"):
    (t / name).write_text(text)
    return t / name


def _folder(t, name="empty"):
    (t / name).mkdir()
    return t / name


def _bad_config_file(t):
    return _file(t, "bad_config.py", "def get_config(:\n")


def _metrics(t, text):
    _file(_folder(t, "run"), "metrics.jsonl", text)
    return t / "run"


def _damaged_workdir(t):
    """A converted MICRO checkpoint whose state folder is gone."""
    save_torch(reference_checkpoint(MICRO), t / "ref.pth.tar")
    convert.convert(str(t / "ref.pth.tar"), workdir=str(t / "run"), config=micro_config())
    shutil.rmtree(t / "run" / "checkpoints" / "0" / "state")
    return t / "run"


# id -> (command module, its arguments under tmp path t, the message it must match). AUDITED: the cases
# that printed a traceback, or accepted the value, or created data.root and started a download, before.
CASES = {
    # train: config keys and values at flag-parse time
    "train unknown key (the reference's name)": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.mask.enc_mask_scale=(0.85,1.0)"],
        r"^error: --config\.mask\.enc_mask_scale: no such config key \(mask has no 'enc_mask_scale'\); "
        r"did you mean --config\.mask\.context_scale\?$",
    ),
    "train misspelt key": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.lrr=1e-3"],
        r"--config\.optim\.lrr: no such config key .*did you mean --config\.optim\.lr\?",
    ),
    "train key at the wrong level": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.lr=1e-3"],
        r"--config\.lr: no such config key \(the config has no 'lr'\); did you mean --config\.optim\.lr\?",
    ),
    "train misspelt section": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optimizer.lr=1e-3"],
        r"no 'optimizer'.*did you mean --config\.optim\.lr\?",
    ),
    "train key with no match lists the section's keys": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.data.zzz=1"],
        r"--config\.data\.zzz: no such config key \(data has no 'zzz'; its keys: .*batch_size.*\)",
    ),
    "train a value is not a section": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.data.crop_scale.0=0.5"],
        r"data\.crop_scale is a value, not a section: give the whole value",
    ),
    "train value that does not parse": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.lr=fast"],
        r"--config\.optim\.lr=fast: could not convert string to float",
    ),
    "train missing config file": (
        train, lambda t: ["--config", "configs/nope.py", f"--workdir={t}/run"],
        r"--config=configs/nope\.py: cannot load the config file: .*No such file or directory",
    ),
    "train missing config file with an override": (
        train, lambda t: ["--config", "configs/nope.py", f"--workdir={t}/run", "--config.optim.lr=1"],
        r"--config=configs/nope\.py: cannot load the config file: .*No such file or directory",
    ),
    "train config file with a syntax error": (
        train, lambda t: ["--config", str(_bad_config_file(t)), f"--workdir={t}/run"],
        r"bad_config\.py: cannot load the config file: SyntaxError",
    ),
    "train bad config argument": (
        train, lambda t: ["--config", "configs/cifar100.py:vit_huge", f"--workdir={t}/run"],
        r"--config=configs/cifar100\.py:vit_huge: config argument 'vit_huge': give one of",
    ),
    "train unknown flag": (
        train, lambda t: ["--config", SMOKE, f"--wrkdir={t}/run"], r"Unknown command line flag 'wrkdir'.*workdir",
    ),
    "train no workdir": (train, lambda t: ["--config", SMOKE], r"--workdir must have a value"),
    # train: the work dir
    "train workdir under a file": (
        train, lambda t: ["--config", SMOKE, f"--workdir={_file(t)}/run"],
        r"--workdir .*afile/run is under .*afile, a file, not a folder",
    ),
    "train workdir is a file": (
        train, lambda t: ["--config", SMOKE, f"--workdir={_file(t)}"], r"--workdir .*afile is a file, not a folder",
    ),
    # train: values validate rejects
    "train lr=inf": (train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.lr=inf"],
                     r"optim\.lr=inf must be a finite number"),
    "train weight_decay=nan": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.weight_decay=nan"],
        r"optim\.weight_decay=nan must be a finite number",
    ),
    "train final_lr=inf": (train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.final_lr=inf"],
                           r"optim\.final_lr=inf must be a finite number"),
    "train eps=nan": (train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.eps=nan"],
                      r"optim\.eps=nan must be a finite number"),
    "train sigreg_weight=inf": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.sigreg_weight=inf"],
        r"optim\.sigreg_weight=inf must be a finite number",
    ),
    "train ema with inf": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.optim.ema=(0.996,inf)"],
        r"optim\.ema=\(0\.996,inf\) must be a pair of finite numbers",
    ),
    "train crop_scale with nan": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.data.crop_scale=(nan,1.0)"],
        r"data\.crop_scale=\(nan,1\.0\) must be a pair of finite numbers",
    ),
    "train mask scale with inf": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.mask.target_scale=(0.25,inf)"],
        r"mask\.target_scale=\(0\.25,inf\) must be a pair of finite numbers",
    ),
    "train a pair of one": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.mask.context_scale=(0.9,)"],
        r"mask\.context_scale=\(0\.9,\) must be a pair of finite numbers",
    ),
    "train batch_size=0": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", "--config.data.batch_size=0"],
        r"data\.batch_size=0 \(global\) must be >= 1\.$",
    ),
    # train: data.root (nothing created, nothing downloaded: urlopen fails the test if called)
    "train data.root that does not exist": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", f"--config.data.root={t}/dtaa"],
        r"data\.root='.*dtaa' does not exist; check --config\.data\.root, or pass --config\.data\.download=True "
        r"to download CIFAR-100 there",
    ),
    "train data.root without the archive": (
        train, lambda t: ["--config", SMOKE, f"--workdir={t}/run", f"--config.data.root={_folder(t)}"],
        r"CIFAR-100 not found under data\.root='.*empty'.* Or pass --config\.data\.download=True to download it",
    ),
    # evaluate
    "evaluate neither workdir nor encoder": (
        evaluate, lambda t: ["--config", SMOKE], r"Give exactly one of --workdir .* or --encoder",
    ),
    "evaluate workdir without checkpoints": (
        evaluate, lambda t: ["--config", SMOKE, f"--workdir={_folder(t)}"], r"No checkpoints in .*empty",
    ),
    "evaluate damaged checkpoint": (
        evaluate, lambda t: ["--config", SMOKE, f"--workdir={_damaged_workdir(t)}", f"--out={t}/eval"],
        r"cannot restore the target encoder of .*run: ",
    ),
    "evaluate missing export": (
        evaluate, lambda t: ["--config", SMOKE, f"--encoder={t}/enc.msgpack"], r"No exported encoder at .*enc\.msgpack",
    ),
    "evaluate unknown protocol": (
        evaluate, lambda t: ["--config", SMOKE, f"--encoder={t}/e.msgpack", "--protocols=knn,svm"],
        r"--protocols='knn,svm': unknown \['svm'\]",
    ),
    "evaluate out under a file": (
        evaluate, lambda t: ["--config", SMOKE, f"--encoder={t}/e.msgpack", f"--out={_file(t)}/eval"],
        r"--out .*afile/eval is under .*afile, a file",
    ),
    "evaluate knn_k=0": (
        evaluate, lambda t: ["--config", SMOKE, f"--encoder={t}/e.msgpack", "--config.eval.knn_k=0"],
        r"eval\.knn_k and eval\.batch_size >= 1",
    ),
    "evaluate knn_temperature=nan": (
        evaluate, lambda t: ["--config", SMOKE, f"--encoder={t}/e.msgpack", "--config.eval.knn_temperature=nan"],
        r"eval\.knn_temperature=nan must be a finite number",
    ),
    "evaluate misspelt key": (
        evaluate, lambda t: ["--config", SMOKE, f"--encoder={t}/e.msgpack", "--config.eval.knn_kk=5"],
        r"--config\.eval\.knn_kk: no such config key .*did you mean --config\.eval\.knn_k\?",
    ),
    # the tools
    "benchmark bad batch list": (
        benchmark, lambda t: ["--config", SMOKE, "--batch_per_device=64,x"], r"--batch_per_device='64,x': give positive",
    ),
    "benchmark steps=0": (benchmark, lambda t: ["--config", SMOKE, "--steps=0"], r"--steps=0 must be >= 1"),
    "benchmark lr=inf": (benchmark, lambda t: ["--config", SMOKE, *SYNTHETIC, "--config.optim.lr=inf"],
                         r"optim\.lr=inf must be a finite number"),
    "input_benchmark bad workers": (
        input_benchmark, lambda t: ["--config", SMOKE, "--workers=0,two"], r"--workers='0,two': give worker counts",
    ),
    "input_benchmark folder without train/": (
        input_benchmark, lambda t: ["--config", SMOKE, f"--make_folder_from={_folder(t)}"],
        r"--make_folder_from=.*empty: no train/ folder there",
    ),
    "input_benchmark data.root that does not exist": (
        input_benchmark, lambda t: ["--config", SMOKE, f"--config.data.root={t}/nowhere", "--workers=0"],
        r"data\.root='.*nowhere' does not exist",
    ),
    "mask_stats no targets": (
        mask_stats, lambda t: ["--config", SMOKE, "--config.mask.num_targets=0"], r"mask\.num_targets=0 must be >= 1",
    ),
    "mask_stats batch_size=0": (mask_stats, lambda t: ["--config", SMOKE, "--batch_size=0"], r"--batch_size=0 must be"),
    "mask_stats misspelt key": (
        mask_stats, lambda t: ["--config", SMOKE, "--config.mask.num_target=2"],
        r"did you mean --config\.mask\.num_targets\?",
    ),
    "mask_stats patch that does not divide the crop": (
        mask_stats, lambda t: ["--config", SMOKE, "--config.model.patch_size=0"],
        r"data\.crop_size=16 is not divisible by model\.patch_size=0",
    ),
    "memory bad mesh": (memory, lambda t: ["--config", SMOKE, "--mesh=model=2"], r"--mesh='model=2': expected e\.g\."),
    "memory misspelt key (an unlocked config)": (
        memory, lambda t: ["--config", SMOKE, "--config.model.remat_polcy=dots"],
        r"did you mean --config\.model\.remat_policy\?",
    ),
    "memory negative batch": (
        memory, lambda t: ["--config", SMOKE, "--batch_per_device=-1"], r"--batch_per_device=-1 must be >= 1",
    ),
    "plot_metrics no metrics": (
        plot_metrics, lambda t: [f"--workdir={_folder(t)}"], r"No metrics\.jsonl in .*empty: is it a pretraining",
    ),
    "plot_metrics damaged metrics": (
        plot_metrics, lambda t: [f"--workdir={_metrics(t, 'not json')}"], r"run/metrics\.jsonl is not JSON lines",
    ),
    "plot_metrics empty metrics": (
        plot_metrics, lambda t: [f"--workdir={_metrics(t, '')}"], r"run/metrics\.jsonl holds no records yet",
    ),
    "plot_metrics comparing without out": (
        plot_metrics, lambda t: [f"--workdir={t}/a", f"--workdir={t}/b"], r"Comparing several --workdir runs needs",
    ),
    "plot_metrics out under a file": (
        plot_metrics, lambda t: [f"--workdir={_metrics(t, '{}')}", f"--out={_file(t)}/m.png"],
        r"--out .*afile/m\.png is under .*afile, a file",
    ),
    "show_masks out under a file": (
        show_masks, lambda t: ["--config", SMOKE, *SYNTHETIC, f"--out={_file(t)}/m.png"],
        r"--out .*afile/m\.png is under .*afile, a file",
    ),
    "show_masks no images": (show_masks, lambda t: ["--config", SMOKE, "--num_images=0"], r"--num_images=0 must be"),
    "show_masks data.root that does not exist": (
        show_masks, lambda t: ["--config", SMOKE, f"--config.data.root={t}/nowhere", f"--out={t}/m.png"],
        r"data\.root='.*nowhere' does not exist",
    ),
    "sweep misspelt key": (
        sweep, lambda t: ["--config", SMOKE, f"--workdir={t}/sweep", "--point=a:optim.lr=1e-3", "--config.optim.lrr=1"],
        r"^error: --config\.optim\.lrr: no such config key .*did you mean --config\.optim\.lr\?$",
    ),
    "sweep unknown flag": (
        sweep, lambda t: ["--config", SMOKE, f"--workdir={t}/sweep", "--points=a:optim.lr=1e-3"],
        r"Unknown command line flag 'points'.*point",
    ),
    "sweep no points": (sweep, lambda t: ["--config", SMOKE, f"--workdir={t}/sweep"], r"No points: give --sweep FILE"),
    "sweep misspelt key in a point": (
        sweep, lambda t: ["--config", SMOKE, f"--workdir={t}/sweep", "--point=a:optim.emaa=(0.98,0.98)"],
        r"point 'a': optim\.emaa: no such config key",
    ),
    "sweep unknown protocol": (
        sweep, lambda t: ["--config", SMOKE, f"--workdir={t}/sweep", "--point=a:optim.lr=1e-3", "--protocols=svm"],
        r"--protocols='svm': choose from",
    ),
    "sweep workdir under a file": (
        sweep, lambda t: ["--config", SMOKE, f"--workdir={_file(t)}/sweep", "--point=a:optim.lr=1e-3"],
        r"--workdir .*afile/sweep is under .*afile, a file",
    ),
    "convert unknown flag": (
        convert, lambda t: [f"--source={t}/ref.pth.tar", f"--exprot={t}/e.msgpack"],
        r"Unknown command line flag 'exprot'.*export",
    ),
    "convert no source": (convert, lambda t: [f"--export={t}/e.msgpack"], r"--source must have a value"),
    "convert missing source": (
        convert, lambda t: [f"--source={t}/ref.pth.tar", f"--export={t}/e.msgpack"],
        r"No checkpoint at .*ref\.pth\.tar",
    ),
    "convert misspelt config key": (
        convert, lambda t: [f"--source={t}/ref.pth.tar", "--config", SMOKE, "--config.model.nme=vit_tiny"],
        r"--config\.model\.nme: no such config key .*did you mean --config\.model\.name\?",
    ),
    "hf_export unknown flag": (
        hf_export, lambda t: [f"--source={t}", f"--output={t}/hf"], r"Unknown command line flag 'output'",
    ),
    "hf_export no out": (hf_export, lambda t: [f"--source={t}"], r"--out must have a value"),
    "hf_export step that is not a number": (
        hf_export, lambda t: [f"--source={t}", f"--out={t}/hf", "--step=last"], r"--step=last: .*int",
    ),
    "hf_export missing source": (
        hf_export, lambda t: [f"--source={t}/nope", f"--out={t}/hf"], r"No checkpoint at .*nope",
    ),
    "export_encoder no out": (export_encoder, lambda t: [f"--workdir={t}"], r"--out must have a value"),
    "export_encoder no checkpoints": (
        export_encoder, lambda t: [f"--workdir={_folder(t)}", f"--out={t}/e.msgpack"], r"No checkpoints in .*empty",
    ),
}
AUDITED = ("train unknown key (the reference's name)", "train workdir under a file", "train lr=inf",
           "train weight_decay=nan", "train batch_size=0", "train data.root that does not exist")
# The audited ones also run as real command lines (each a subprocess importing jax: a few).
THROUGH_THE_COMMAND_LINE = ("train unknown key (the reference's name)", "train workdir under a file",
                            "train weight_decay=nan", "train data.root that does not exist",
                            "sweep misspelt key", "convert unknown flag", "hf_export unknown flag")


@pytest.fixture
def no_side_effects(monkeypatch):
    """No network (a download attempt fails the test) and no log routing into the test's work dirs."""

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(cifar100.urllib.request, "urlopen", no_download)
    monkeypatch.setattr(train, "route_library_logs", lambda *args, **kwargs: None)


def exit_message(module, args, monkeypatch) -> str:
    """`python -m MODULE ARGS` in-process: the one line it exits with (SystemExit's message, status 1)."""
    argv = [module.__name__, *map(str, args)]
    fv = flags.FlagValues()
    monkeypatch.setattr(module, "FLAGS", fv)
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the --config.KEY overrides from sys.argv
    with pytest.raises(SystemExit) as e:
        bad_input.command(module.main, module.define_flags, fv, argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, tmp_path, monkeypatch, capsys, no_side_effects):
    module, make_args, pattern = CASES[case]
    monkeypatch.chdir(REPO_ROOT)  # configs/ by relative path, as the README's command lines
    message = exit_message(module, make_args(tmp_path), monkeypatch)
    assert re.search(pattern, message), message
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "dtaa").exists() and not (tmp_path / "nowhere").exists()


def test_traceback_flag_shows_the_error_itself(tmp_path, monkeypatch, no_side_effects):
    monkeypatch.chdir(REPO_ROOT)
    argv = ["train", "--config", SMOKE, f"--workdir={tmp_path}", "--config.optim.lr=inf", "--traceback"]
    fv = flags.FlagValues()
    monkeypatch.setattr(train, "FLAGS", fv)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ValueError, match="optim.lr=inf"):
        bad_input.command(train.main, train.define_flags, fv, argv)


def test_a_good_override_still_parses(tmp_path, monkeypatch):
    """The parser only steps in on errors: a valid override reaches main()."""
    monkeypatch.chdir(REPO_ROOT)
    argv = ["mask_stats", "--config", SMOKE, "--config.mask.num_targets=3", "--batches=1", "--batch_size=2"]
    fv = flags.FlagValues()
    monkeypatch.setattr(mask_stats, "FLAGS", fv)
    monkeypatch.setattr(sys, "argv", argv)
    bad_input.command(mask_stats.main, mask_stats.define_flags, fv, argv)
    assert fv.config.mask.num_targets == 3


def test_unknown_key_suggestions():
    from ijepa_jax import config_lib

    c = config_lib.default_config()
    assert bad_input.unknown_key(c, "optim.lr") is None
    assert bad_input.unknown_key(c, "root_path").endswith("did you mean --config.data.root?")
    assert "did you mean --config.data.batch_size?" in bad_input.unknown_key(c, "data.batchsize")


def _run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_command_lines_print_one_line_and_exit_1(tmp_path):
    """Audited inputs through `python -m ijepa_jax.train` (and a tool), two at a time: status 1, one line
    on stderr, no traceback; the mistyped data.root is neither created nor downloaded into."""
    runs = {}
    for i, case in enumerate(THROUGH_THE_COMMAND_LINE):
        module, make_args, pattern = CASES[case]
        (tmp_path / str(i)).mkdir()
        runs[case] = ([module.__name__, *map(str, make_args(tmp_path / str(i)))], pattern)
    runs["plot_metrics"] = (["ijepa_jax.tools.plot_metrics", f"--workdir={tmp_path}"], r"No metrics\.jsonl in")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(_run, [args for args, _ in runs.values()])))
    for case, out in done.items():
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1, (case, out.stderr[-2000:])
        assert "Traceback" not in out.stderr + out.stdout and len(lines) == 1, (case, out.stderr[-2000:])
        assert re.search(runs[case][1], lines[0]), (case, lines[0])
    data_root_case = str(THROUGH_THE_COMMAND_LINE.index("train data.root that does not exist"))
    assert not (tmp_path / data_root_case / "dtaa").exists()
