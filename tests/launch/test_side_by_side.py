"""launch/side_by_side: the trace summariser on a real CPU trace, run.sh's arguments, and (where torch
and the official src/ are at hand) the official step at smoke size."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "launch", "side_by_side")
sys.path.insert(0, HERE)
import summarise_trace  # noqa: E402


def test_summariser_reads_a_cpu_trace(tmp_path):
    """A jitted matmul + softmax + layer norm traced on the CPU: its thunks are found and sorted into
    kinds, shares add up to 1, and the name stacks come from the compiled HLO text."""
    @jax.jit
    def f(x, w):
        y = jax.nn.softmax(x @ w, axis=-1)
        return (y - y.mean(-1, keepdims=True)) / (y.std(-1, keepdims=True) + 1e-6)

    x, w = jnp.ones((256, 256)), jnp.ones((256, 256))
    compiled = f.lower(x, w).compile()
    jax.block_until_ready(compiled(x, w))
    with jax.profiler.trace(str(tmp_path / "trace"), create_perfetto_trace=True):
        for _ in range(2):
            jax.block_until_ready(compiled(x, w))
    stacks = summarise_trace.name_stacks(compiled.as_text())
    assert any(v.startswith("jit(f)/jit(_std)") for v in stacks.values())
    summary = summarise_trace.summarise(summarise_trace.find_trace(str(tmp_path / "trace")), 2, 5, stacks)
    assert summary["device_events"] > 0 and summary["device_ms_per_step"] > 0
    assert "matmul" in summary["by_kind"]
    assert sum(v["share"] for v in summary["by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
    assert 0 < len(summary["top_kernels"]) <= 5
    summarise_trace.write(summary, str(tmp_path / "kernels.json"))
    assert json.load(open(tmp_path / "kernels.json"))["steps"] == 2
    assert "| matmul |" in open(tmp_path / "kernels.md").read()


@pytest.mark.parametrize("kernel, stack, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "", "matmul"),
    ("cudnn_generated_fused_attention_fprop", "", "attention"),
    ("loop_multiply_fusion", "jit(train_step)/mul", "optimizer_ema"),
    ("loop_multiply_fusion", "jit(train_step)/jvp(Encoder)/blocks/norm1/mul", "norms_elementwise"),
    ("input_reduce_fusion", "jit(train_step)/reduce_and", "finite_check"),
    ("memcpy32_post", "", "copies"),
    ("ncclDevKernel_AllReduce", "", "collectives"),
])
def test_kernel_kinds(kernel, stack, kind):
    assert summarise_trace.kind(kernel, stack) == kind


def _run_sh(*args):
    return subprocess.run(["bash", os.path.join(HERE, "run.sh"), *args], cwd=ROOT, capture_output=True, text=True)


def test_run_sh_dry_run_and_bad_arguments():
    out = _run_sh("--ijepa_src", ".ijepa_src", "--dry_run", "--batch", "64")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["[eager", "[compile", "[ours", "[ratio", "[profile"]
    assert "--batch 64" in lines[0] and "--compile" in lines[1] and "--batch_per_device=64" in lines[2]
    assert "attention_impl=cudnn" in lines[2] and "configs/in1k_vith14.py" in lines[2]
    only = _run_sh("--ijepa_src", "x", "--dry_run", "--parts", "ours,ratio")
    assert only.returncode == 0 and len(only.stdout.strip().splitlines()) == 2
    for bad in (["--dry_run"], ["--ijepa_src", "x", "--parts", "bogus"], ["--ijepa_src", "x", "--frob"],
                ["--ijepa_src", "x", "--batch", "many"]):
        assert _run_sh(*bad).returncode == 2


def _torch_python():
    """A python with torch: IJEPA_TORCH_PYTHON, this one, or the scratch venv docs/side_by_side.md names."""
    for candidate in (os.environ.get("IJEPA_TORCH_PYTHON"), sys.executable, "/tmp/torchvenv/bin/python"):
        if candidate and shutil.which(candidate) and subprocess.run(
                [candidate, "-c", "import torch"], capture_output=True).returncode == 0:
            return candidate
    return None


def test_official_step_smoke():
    """The official step at smoke size on the CPU: ViT-Ti/8 at 112px (the 14x14 grid of ViT-H/14, where
    the official collator's min_keep=10 is satisfiable), predictor 2x384, batch 4, 2 timed steps."""
    python = _torch_python()
    if python is None:
        pytest.skip("torch is not importable (not a project dependency): set IJEPA_TORCH_PYTHON or make "
                    "/tmp/torchvenv as docs/side_by_side.md says")
    src = os.path.join(ROOT, ".ijepa_src")
    if not os.path.isfile(os.path.join(src, "src", "helper.py")):
        pytest.skip(f"the official src/ is not in {src}: docs/side_by_side.md says how to extract it")
    out = subprocess.run(
        [python, os.path.join(HERE, "official_step.py"), "--ijepa_src", src, "--device", "cpu", "--model", "vit_tiny",
         "--patch", "8", "--crop", "112", "--pred_depth", "2", "--batch", "4", "--steps", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["check"] == "official eager" and row["model"] == "vit_tiny/8" and row["img_per_s"] > 0
    assert 10 < row["target_len_mean"] < row["context_len_mean"] <= 196 and row["final_loss"] > 0
