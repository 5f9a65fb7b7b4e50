"""tools.memory: per-device memory of the compiled step, checked against parameter counts."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import small_config
from ijepa_jax import train
from ijepa_jax.models import vit
from ijepa_jax.tools import memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 2.0**30


def vit_tiny(**mesh):
    """ViT-Tiny/8 at 32px (its kernels are large enough to be split), batch 2 per device."""
    return small_config(**{"model.name": "vit_tiny", "model.patch_size": 8, "data.crop_size": 32,
                           "model.pred_width": 48, "data.batch_size": 16, "data.synthetic_images": 16,
                           **{f"mesh.{k}": v for k, v in mesh.items()}})


@pytest.mark.slow  # compiles ViT-Tiny twice on 8 devices; the command line and mesh checks run by default
def test_replicated_state_is_the_parameter_count_and_fsdp_divides_it():
    assert jax.device_count() == 8
    replicated = memory.step_memory(vit_tiny(data=8, fsdp=1))
    sharded = memory.step_memory(vit_tiny(data=1, fsdp=8))
    state_params = replicated["params_gib"] * GIB
    exp = train.build(vit_tiny(data=8, fsdp=1))  # its abstract state: the parameter counts
    count = vit.count_params(exp.abstract_state.params)
    assert abs(state_params - 4 * count) < 2**10  # rounding to 1e-6 GiB
    assert abs(replicated["ema_target_gib"] * GIB - 4 * vit.count_params(exp.abstract_state.params["encoder"])) < 2**10
    assert 2 * replicated["params_gib"] <= replicated["optimizer_gib"] < 2 * replicated["params_gib"] + 1e-5
    # Kernels hold almost all the weights: split 8 ways, the state shrinks to about 1/8.
    for key in ("params_gib", "ema_target_gib", "optimizer_gib"):
        assert replicated[key] / 8 <= sharded[key] < replicated[key] / 6, key
    # The batch is split over every device either way; XLA's total covers the arguments.
    assert sharded["batch_gib"] == replicated["batch_gib"] > 0
    for r in (replicated, sharded):
        assert r["total_gib"] >= r["xla_argument_gib"] - r["xla_alias_gib"] and r["xla_temp_gib"] > 0
    assert sharded["total_gib"] < replicated["total_gib"]


@pytest.mark.slow  # a subprocess compiling the real step; the in-process test above runs by default
def test_command_line_simulates_the_requested_devices_and_mesh():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "ijepa_jax.tools.memory", "--config", "configs/cifar100.py:vit_tiny", "--devices", "4",
         "--mesh", "data=1,fsdp=4", "--batch_per_device", "2", "--config.model.pred_width=48"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["mesh"] == "data=1,fsdp=4" and result["batch_per_device"] == 2
    assert result["total_gib"] > result["params_gib"] > 0


def test_a_bad_mesh_is_refused_with_the_expected_form():
    with pytest.raises(ValueError, match="data=2,fsdp=8"):
        memory.parse_mesh("model=2")
    assert memory.parse_mesh("data=-1,fsdp=16") == {"data": -1, "fsdp": 16}
