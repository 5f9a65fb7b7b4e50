"""plot_metrics turns metrics.jsonl into a PNG with one panel per quantity."""

import json

import pytest
from PIL import Image

from ijepa_jax.tools import plot_metrics


def test_plots_training_and_eval_records(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "wd": 0.04, "momentum": 0.996, "img_per_s": 50.0}
               for s in range(1, 11)]
    records.append({"step": 10, "eval/knn_k20": 0.3, "eval/linear_last4_bn": 0.4})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_metrics.plot(plot_metrics.read_records(str(tmp_path)), str(tmp_path / "m.png"))
    width, height = Image.open(out).size
    assert width > 1000 and height > 500  # 6 panels in 2 rows of 3
    assert plot_metrics.series(records, "eval/knn_k20") == ([10], [0.3])


def test_plots_health_records_beside_training_records(tmp_path):
    """Health records are separate records at training steps; they add four panels."""
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "wd": 0.04} for s in range(1, 11)]
    for s in (5, 10):
        records.append({"step": s, "health/target_rank_pooled": 3.0, "health/target_rank_tokens_centered": 30.0,
                        "health/target_std": 0.4, "health/pred_std": 0.1, "health/pooled_std": 0.1,
                        "health/target_cosine": 0.96, "health/rank_max": 64.0,
                        "health/online_rank_pooled_centered": 9.0, "health/online_cosine": 0.95})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recs = plot_metrics.read_records(str(tmp_path))
    width, height = Image.open(plot_metrics.plot(recs, str(tmp_path / "m.png"))).size
    # loss, lr, wd + 4 health panels (two of ranks, std, cosine): 3 rows of 3 (without the online ranks, 2)
    assert width > 1000 and 850 < height < 1100
    assert plot_metrics.series(recs, "health/target_std") == ([5, 10], [0.4, 0.4])
    assert plot_metrics.series(recs, "loss")[0] == list(range(1, 11))  # health records add no loss points


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No metrics.jsonl"):
        plot_metrics.read_records(str(tmp_path))


def test_compares_runs_in_shared_panels(tmp_path):
    """Several runs: one line per run in each panel that any run logged (here loss, k-NN, rank)."""
    def run(loss_scale, with_rank):
        recs = [{"step": s, "loss": loss_scale / s} for s in range(1, 11)]
        recs.append({"step": 10, "eval/knn_k20": loss_scale / 10})
        if with_rank:
            recs.append({"step": 10, "health/target_rank_pooled_centered": 9.0})
        return recs

    out = plot_metrics.plot_comparison({"a": run(1.0, True), "b": run(2.0, False)}, str(tmp_path / "c.png"))
    width, height = Image.open(out).size
    assert width > 1000 and height < 400  # 3 panels: one row


def test_comparing_runs_without_known_keys_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="None of"):
        plot_metrics.plot_comparison({"a": [{"step": 1, "other": 1.0}]}, str(tmp_path / "c.png"))


def test_a_last_record_cut_short_is_skipped(tmp_path):
    """A run killed mid-write leaves the start of a record without its newline: the records before it plot."""
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 4)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(text + json.dumps({"step": 4, "loss": 0.25})[:9])
    assert plot_metrics.read_records(str(tmp_path)) == records
    (tmp_path / "metrics.jsonl").write_text(text + "{")
    assert plot_metrics.read_records(str(tmp_path)) == records
    # Damage elsewhere (or a whole last line that does not parse) is still an error.
    for damaged in ('{"step": 1, "lo\n' + text, text + '{"step": 4, "lo\n', text + "not json"):
        (tmp_path / "metrics.jsonl").write_text(damaged)
        with pytest.raises(json.JSONDecodeError):
            plot_metrics.read_records(str(tmp_path))


def test_epoch_axis_lines_up_runs_at_different_batch_sizes(tmp_path):
    """--x=epoch divides steps by the run's steps per epoch (read off its training records' `epoch`), so a
    run at a quarter of the batch (four times the steps) ends at the same x as the other."""
    def run(per_epoch):
        recs = [{"step": s, "loss": 1.0, "epoch": s / per_epoch} for s in range(1, 2 * per_epoch + 1)]
        recs.append({"step": 2 * per_epoch, "eval/knn_k20": 0.3})  # eval records carry no epoch of their own
        return recs

    big, small = run(39), run(156)
    assert plot_metrics.steps_per_epoch(big) == 39 and plot_metrics.steps_per_epoch(small) == 156
    assert plot_metrics.series(big, "eval/knn_k20", x="epoch") == ([2.0], [0.3])
    assert plot_metrics.series(small, "eval/knn_k20", x="epoch") == ([2.0], [0.3])
    assert plot_metrics.series(small, "eval/knn_k20") == ([312], [0.3])  # by step, as before
    assert plot_metrics.series(small, "loss", x="epoch")[0][:2] == [1 / 156, 2 / 156]
    out = plot_metrics.plot_comparison({"b256": big, "b64": small}, str(tmp_path / "c.png"), x="epoch")
    assert Image.open(out).size[0] > 400


def test_epoch_axis_without_epoch_records_is_a_clear_error():
    with pytest.raises(ValueError, match="plot it by step"):
        plot_metrics.series([{"step": 5, "loss": 1.0}], "loss", x="epoch")
