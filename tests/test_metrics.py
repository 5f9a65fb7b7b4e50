"""MetricsWriter: records on disk after close, written off the loop thread, in order, errors surfaced."""

import json
import os
import time

import pytest

from ijepa_jax.metrics import MetricsWriter


def read(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_record_is_on_disk_after_close_in_order(tmp_path, capsys):
    """JSON lines, TensorBoard events and console lines (progress, eval, notes) in the order written;
    the first progress line shows the first step's time, not 'img/s nan'."""
    writer = MetricsWriter(str(tmp_path), total_steps=20, enabled=True)
    writer.write(1, {"loss": 0.9, "lr": 1e-4, "epoch": 0.1, "first_step_time_s": 12.5})
    for step in range(2, 11):
        writer.write(step, {"loss": 1.0 / step, "lr": 1e-3, "epoch": step / 10, "img_per_s": 100.0})
    writer.write_eval(10, {"eval/knn": 0.25})
    writer.console("done")
    writer.close()
    records = read(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 11)) + [10]
    assert records[-1] == {"step": 10, "eval/knn": 0.25}
    assert os.listdir(tmp_path / "tensorboard")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:10]] == [f"{s}/20" for s in range(1, 11)]
    assert "first step 12.5s" in lines[0] and "nan" not in lines[0]
    assert "img/s 100.0" in lines[1]
    assert lines[10].startswith("eval at step 10: eval/knn 0.2500") and lines[11] == "done"


def test_write_does_not_wait_for_a_slow_filesystem(tmp_path, monkeypatch):
    """A slow disk (0.2 s per record) delays close(), not write(): the loop thread only queues."""
    writer = MetricsWriter(str(tmp_path), total_steps=3, enabled=True)
    append = writer._append
    monkeypatch.setattr(writer, "_append", lambda *a: time.sleep(0.2) or append(*a))
    t = time.perf_counter()
    for step in (1, 2, 3):
        writer.write(step, {"loss": 0.5, "lr": 1e-3})
    assert time.perf_counter() - t < 0.15
    writer.close()
    assert [r["step"] for r in read(tmp_path)] == [1, 2, 3]


def test_a_failed_write_is_raised_in_the_caller(tmp_path, monkeypatch):
    """An error in the writer thread (e.g. a full disk) surfaces at the next write, flush or close."""
    writer = MetricsWriter(str(tmp_path), total_steps=3, enabled=True)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_append", fail)
    writer.write(1, {"loss": 0.5, "lr": 1e-3})
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    with pytest.raises(OSError, match="No space left"):
        writer.close()


def test_resume_drops_records_past_the_checkpoint(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=6, enabled=True)
    for step in range(1, 6):
        writer.write(step, {"loss": 0.5, "lr": 1e-3})
    writer.close()
    MetricsWriter(str(tmp_path), total_steps=6, resume_step=3, enabled=True).close()
    assert [r["step"] for r in read(tmp_path)] == [1, 2, 3]


def test_resume_drops_a_line_cut_short_by_a_crash(tmp_path):
    """A crash mid-write leaves part of a line: the resume drops it and appends whole lines after it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    writer = MetricsWriter(str(tmp_path), total_steps=6, resume_step=2, enabled=True)
    writer.write(3, {"loss": 0.3, "lr": 1e-3})
    writer.close()
    assert [r["step"] for r in read(tmp_path)] == [1, 2, 3]


def test_a_disabled_writer_writes_and_prints_nothing(tmp_path, capsys):
    """Processes other than 0 write no files and print no notes: process 0 prints each checkpoint line once."""
    writer = MetricsWriter(str(tmp_path / "run"), total_steps=3, enabled=False)
    writer.write(1, {"loss": 0.5, "lr": 1e-3})
    writer.console("checkpoint: saving step 1 in the background")
    writer.close()
    assert not os.path.exists(tmp_path / "run")
    assert capsys.readouterr().out == ""
