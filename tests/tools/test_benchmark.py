"""The benchmark command measures a real compiled step."""

from conftest import small_config
from ijepa_jax.tools import benchmark


def test_benchmark_reports_positive_rates_and_a_finite_loss():
    result = benchmark.benchmark(small_config(), steps=2, pipeline_batches=2, measure_checkpoint=True)
    assert result["img_per_s"] > 0 and result["pipeline_img_per_s"] > 0
    assert result["compile_s"] > 0 and result["devices"] == 8
    assert result["model"] == "vit_micro/4" and result["global_batch"] == 8
    assert result["final_loss"] == result["final_loss"]  # not NaN
    assert 0 < result["checkpoint_blocked_s"] <= result["checkpoint_total_s"] and result["checkpoint_mb"] > 0
