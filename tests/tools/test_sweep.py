"""The sweep command: every point validated first, trained and evaluated once (resuming where it stopped),
a random-init baseline per architecture, one table and one plot."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags
from conftest import small_config

from ijepa_jax import evaluate, train
from ijepa_jax.tools import sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTOCOLS = ("linear", "knn")
# One 8-step epoch per point, the k-NN monitor at its end.
SHARED = {"total_steps": 8, "eval.every_epochs": 1}
POINTS = {"ema996": {}, "ema98": {"optim.ema": (0.98, 0.98)}}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A two-point sweep from an empty folder whose first point is preempted at step 4 (train returns
    early, as on SIGTERM), then the same sweep again: it resumes that point and runs the second."""
    workdir = str(tmp_path_factory.mktemp("sweep"))
    planned = sweep.point_configs(small_config(), SHARED, POINTS)
    real_train = train.train

    def preempted(config, point_dir):
        return real_train(sweep.apply_overrides(config, {"total_steps": 4}), point_dir)

    train.train = preempted
    try:
        first = sweep.run_sweep(planned, workdir, PROTOCOLS)
    finally:
        train.train = real_train
    assert first == [] and not os.path.exists(os.path.join(workdir, "ema98"))
    assert not os.path.exists(os.path.join(workdir, "ema996", sweep.ROW_FILE))
    rows = sweep.run_sweep(planned, workdir, PROTOCOLS)
    return workdir, planned, rows


def test_the_summary_has_the_baseline_and_every_point_with_every_protocol(swept):
    workdir, _, rows = swept
    assert read_jsonl(os.path.join(workdir, "summary.jsonl")) == rows
    assert [(r["point"], r["kind"]) for r in rows] == [("random_init", "random_init"), ("ema996", "point"),
                                                      ("ema98", "point")]
    protocols = {"knn_k20", "linear_last", "linear_last_bn", "linear_last4", "linear_last4_bn"}
    assert all(set(r["top1"]) == protocols for r in rows)
    base = rows[0]["top1"]
    for r in rows[1:]:
        assert r["delta"] == pytest.approx({k: v - base[k] for k, v in r["top1"].items()})
        assert r["step"] == 8 and r["final_loss"] > 0 and r["img_per_s"] > 0 and r["wall_s"] > 0
        assert r["health"]["health/target_std"] > 0 and r["machine"]["devices"] == 8
    assert rows[2]["overrides"] == {"optim.ema": [0.98, 0.98]} and rows[2]["shared"] == SHARED
    with open(os.path.join(workdir, "summary.md")) as f:
        table = f.read()
    assert "| random_init |" in table and "| ema98 | vit_micro/4 @16px | optim.ema=(0.98, 0.98) | 8 |" in table
    assert os.path.getsize(os.path.join(workdir, "summary.png")) > 0


def test_the_preempted_point_resumed_from_its_checkpoint(swept):
    workdir, _, _ = swept
    records = read_jsonl(os.path.join(workdir, "ema996", "metrics.jsonl"))
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 9))  # steps 1-4 from the preempted run, 5-8 resumed: none twice
    assert [r["step"] for r in records if "eval/knn_k20" in r] == [8]


def test_rerunning_a_finished_sweep_trains_and_evaluates_nothing(swept, monkeypatch):
    workdir, planned, rows = swept

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished point (or the cached baseline) ran again")

    monkeypatch.setattr(train, "train", forbidden)
    monkeypatch.setattr(evaluate, "evaluate", forbidden)
    assert sweep.run_sweep(planned, workdir, PROTOCOLS) == rows


def test_a_run_of_some_points_keeps_the_other_finished_points_in_the_summary(swept, monkeypatch):
    workdir, planned, rows = swept
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a finished point trained again"))
    only_second = sweep.select_points(planned, ["ema98"])  # as --only=ema98
    assert [r["point"] for r in sweep.run_sweep(only_second, workdir, PROTOCOLS)] == [r["point"] for r in rows]
    assert read_jsonl(os.path.join(workdir, "summary.jsonl")) == rows  # ema996 kept, with its delta


def test_a_finished_point_run_with_other_overrides_is_refused(swept):
    workdir, _, _ = swept
    planned = sweep.point_configs(small_config(), SHARED, {"ema98": {"optim.ema": (0.97, 0.97)}})
    with pytest.raises(ValueError, match="point 'ema98': .* was run with overrides"):
        sweep.run_sweep(planned, workdir, PROTOCOLS)


def test_a_diverged_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """train.train raises FloatingPointError on a non-finite loss: that point's row says so, the next point
    runs, and a re-run does not try the diverged one again."""
    calls = []

    def diverge(config, point_dir):
        calls.append(os.path.basename(point_dir))
        raise FloatingPointError("The loss became nan at step 3")

    monkeypatch.setattr(train, "train", diverge)
    planned = sweep.point_configs(small_config(), SHARED, {"lr1e3": {"optim.lr": 1e3}, "lr1e4": {"optim.lr": 1e4}})
    rows = sweep.run_sweep(planned, str(tmp_path), PROTOCOLS)
    assert calls == ["lr1e3", "lr1e4"]
    assert [(r["point"], r["error"], r["top1"]) for r in rows] == [
        ("lr1e3", "The loss became nan at step 3", {}), ("lr1e4", "The loss became nan at step 3", {})]
    assert "| lr1e3 | vit_micro/4 @16px | optim.lr=1000.0 |  | diverged |" in (tmp_path / "summary.md").read_text()
    assert sweep.run_sweep(planned, str(tmp_path), PROTOCOLS) == rows and len(calls) == 2


@pytest.mark.parametrize(
    "points, message",
    [
        ({"ok": {}, "typo": {"optim.emaa": (0.9, 0.9)}}, r"point 'typo': optim.emaa: no such config key"),
        ({"bad": {"optim.lr": "fast"}}, r"point 'bad': optim.lr='fast': could not convert"),
        ({"bad": {"optim.lr": [1, 2]}}, r"point 'bad': optim.lr=\[1, 2\]"),
        ({"bad": {"optim.ema": (0.99, 0.9)}}, r"point 'bad': optim.ema=\(0.99, 0.9\) must satisfy"),  # validate's
        ({"bad": {"optim": {"lr": 1.0}}}, r"point 'bad': optim: is a section"),
        ({"a/b": {}}, r"point 'a/b': name it with"),
        ({"random_init": {}}, r"point 'random_init': name it with"),
        ({"bad": {"total_steps": 100}}, r"point 'bad': total_steps=100 runs past the schedules"),  # build's
    ],
)
def test_bad_points_are_refused_naming_the_point_and_the_key(points, message):
    with pytest.raises(ValueError, match=message):
        sweep.point_configs(small_config(), {}, points)


def test_a_bad_shared_override_is_refused():
    with pytest.raises(ValueError, match="SHARED: data.nope: no such config key"):
        sweep.point_configs(small_config(), {"data.nope": 1}, {"a": {}})


def test_overrides_parse_strings_as_the_command_line_does():
    name, overrides = sweep.parse_point("ema98:optim.ema=(0.98,0.98),optim.lr=5e-4,data.source=synthetic")
    assert name == "ema98" and overrides == {"optim.ema": "(0.98,0.98)", "optim.lr": "5e-4",
                                             "data.source": "synthetic"}
    c = sweep.apply_overrides(small_config(), {**overrides, "model.scan_layers": "true", "seed": "3"})
    assert c.optim.ema == (0.98, 0.98) and c.optim.lr == 5e-4 and c.model.scan_layers is True and c.seed == 3
    assert sweep.parse_point("plain") == ("plain", {})
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        sweep.parse_point("x:optim.lr")


def test_only_runs_the_named_points_in_the_order_given():
    points = {"a": {}, "b": {"seed": 1}, "c": {"seed": 2}}
    assert list(sweep.select_points(points, ["c", "a"])) == ["c", "a"]
    assert sweep.select_points(points, ["c", "a"])["c"] == {"seed": 2}
    assert sweep.select_points(points, []) is points
    with pytest.raises(ValueError, match="--only: no point 'd'; choose from a, b, c"):
        sweep.select_points(points, ["a", "d"])
    fv = flags.FlagValues()  # the flag's own parsing: a comma list, spaces stripped
    sweep.define_flags(fv)
    fv["only"].parse("c, a")
    assert fv["only"].value == ["c", "a"]


def test_the_baseline_key_follows_architecture_and_evaluation_only():
    key = lambda **o: sweep.baseline_key(sweep.apply_overrides(small_config(), o), PROTOCOLS)  # noqa: E731
    assert key() == key(**{"optim.lr": 5e-4, "data.batch_size": 16, "data.max_samples_per_class": 3,
                           "eval.every_epochs": 2, "eval.health_every_steps": 5})
    assert len({key(), key(**{"model.patch_size": 8}), key(**{"data.crop_size": 32}),
                key(**{"eval.train_samples_per_class": 2}), key(seed=1)}) == 5
    assert key() != sweep.baseline_key(small_config(), ("knn",))


def test_cli_refuses_a_bad_sweep_file_before_creating_anything(tmp_path):
    """One line naming the point and the key, a non-zero exit, no traceback, no work dir."""
    sweep_file = tmp_path / "bad.py"
    sweep_file.write_text('POINTS = {"good": {"optim.lr": 5e-4}, "typo": {"optim.emaa": (0.98, 0.98)}}\n')
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    workdir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "ijepa_jax.tools.sweep", "--config", "configs/cifar100.py:vit_tiny,smoke",
         "--config.data.source=synthetic", "--workdir", str(workdir), "--sweep", str(sweep_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "error: point 'typo': optim.emaa: no such config key" in proc.stderr
    assert "Traceback" not in proc.stderr and not workdir.exists()
