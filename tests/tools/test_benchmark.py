"""The benchmark command measures a real compiled step."""

import importlib.util
import os

import pytest
from conftest import small_config

from ijepa_jax.tools import benchmark


def test_benchmark_reports_positive_rates_and_a_finite_loss():
    """One run: rates, memory, and MFU = analytic model FLOPs/image x images/s / (peak x devices)."""
    result = benchmark.benchmark(
        small_config(), steps=2, pipeline_batches=2, measure_checkpoint=True, peak=1e-3, count_xla_flops=False
    )
    assert result["img_per_s"] > 0 and result["pipeline_img_per_s"] > 0
    assert result["compile_s"] > 0 and result["devices"] == 8
    assert result["model"] == "vit_micro/4" and result["global_batch"] == 8
    assert result["final_loss"] == result["final_loss"]  # not NaN
    assert result["model_gflops_per_image"] > 0 and result["xla_total_gib"] > 0
    expected = result["model_gflops_per_image"] * 1e9 * result["img_per_s"] / (1e-3 * 1e12 * 8)
    assert result["mfu"] == pytest.approx(expected, rel=0.02)
    assert 0 < result["checkpoint_blocked_s"] <= result["checkpoint_total_s"] and result["checkpoint_mb"] > 0


def test_peak_table_knows_the_accelerators_users_compare():
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3") == benchmark.peak_tflops("NVIDIA H200") == 989.0
    assert benchmark.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert benchmark.peak_tflops("TPU v5 lite") == 197.0 and benchmark.peak_tflops("TPU v5") == 459.0
    assert benchmark.peak_tflops("TPU v4") == 275.0 and benchmark.peak_tflops("TPU v6 lite") == 918.0
    assert benchmark.peak_tflops("cpu") is None  # so a CPU run reports no MFU unless --peak_tflops is given


def _reference_config(filename, **model):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", filename)
    spec = importlib.util.spec_from_file_location("reference_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.update(model)
    c.data.update(source="synthetic", batch_size=8, synthetic_images=8)
    c.mask.auto_context_batch = 16
    return c


@pytest.mark.parametrize("model", [
    dict(name="vit_tiny", patch_size=16),
    pytest.param(dict(name="vit_huge", patch_size=14), marks=pytest.mark.slow),  # the same formula, a bigger compile
])
def test_xla_flops_agree_with_the_analytic_count(model):
    """XLA's cost analysis of the whole lowered train step (norms, softmax and optimizer included)
    is within 10% of the analytic matmul count, for ViT-Ti/16 and ViT-H/14 at 224px. The analytic
    count for ViT-H/14 is about 2 x 632M weights x (256 + 3 K) tokens plus the predictor: 0.6-0.8
    TFLOP per image."""
    from ijepa_jax import masks

    config = _reference_config("in1k_vith14.py", **model)
    spec = masks.resolve_spec(config)
    analytic = benchmark.analytic_flops(config, spec)["total"]
    xla = benchmark.xla_flops(config) / config.data.batch_size
    assert xla == pytest.approx(analytic, rel=0.10)
    if model["name"] == "vit_huge":
        assert 0.6e12 < analytic < 0.8e12
