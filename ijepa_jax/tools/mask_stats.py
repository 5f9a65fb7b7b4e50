"""Token-count statistics of the mask sampler, both modes, versus the reference's cut.

    python -m ijepa_jax.tools.mask_stats --config configs/in1k_vith14.py \
        --config.model.patch_size=16 --batch_size 128

For each mode: mean context patches per image before any cut; what the
reference keeps (every context cut to its batch's minimum); what our fixed K
keeps; mean target tokens per block and the padded length T.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import flags
from ml_collections import config_flags

from ijepa_jax import bad_input, config_lib, masks

FLAGS = flags.FLAGS


def mask_statistics(spec: masks.MaskSpec, batch_size: int, num_batches: int, seed: int = 0) -> dict:
    """Mean token counts over `num_batches` sampled batches; `spec.context_tokens` must be resolved."""
    sampler = masks.MaskSampler(spec)
    rng = np.random.default_rng(seed)
    full, kept, batch_min, target = [], [], [], []
    for _ in range(num_batches):
        out = sampler.sample(rng, batch_size, with_stats=True)
        full.append(out["context_count"])
        kept.append(out["context_valid"].sum(1))
        batch_min.append(out["context_count"].min())
        target.append(out["target_valid"].sum(-1).mean())
    return {
        "mode": spec.mode,
        "grid": f"{spec.grid_h}x{spec.grid_w}",
        "context_full": float(np.mean(np.concatenate(full))),
        "context_reference_cut": float(np.mean(batch_min)),
        "context_tokens_K": spec.context_tokens,
        "context_kept": float(np.mean(np.concatenate(kept))),
        "target_per_block": float(np.mean(target)),
        "target_tokens_T": spec.target_tokens,
    }


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    config_flags.DEFINE_config_file("config", None, "Config file, optionally CONFIG:ARG.", lock_config=True,
                                    flag_values=fv)
    flags.DEFINE_integer("batches", 100, "Batches to sample per mode.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 128, "Images per batch (the reference cuts per per-GPU batch).", flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad flag or mask config is one line."""
    del argv
    config = FLAGS.config
    if FLAGS.batches < 1 or FLAGS.batch_size < 1:
        raise ValueError(f"--batches={FLAGS.batches} and --batch_size={FLAGS.batch_size} must be >= 1.")
    config_lib.validate_masks(config)
    header = (
        f"{'mode':<10} {'grid':<6} {'ctx/img':>8} {'ref cut':>8} {'K':>4} {'kept':>7} "
        f"{'tgt/blk':>8} {'T':>4}"
    )
    print(f"{FLAGS.batches} batches of {FLAGS.batch_size}; context_tokens={config.mask.context_tokens}")
    print(header)
    for mode in masks.MODES:
        spec = dataclasses.replace(masks.MaskSpec.from_config(config), mode=mode)
        masks.validate(spec)
        if spec.context_tokens < 0:
            k = masks.auto_context_tokens(spec, batch_size=config.mask.auto_context_batch)
            spec = dataclasses.replace(spec, context_tokens=k)
        s = mask_statistics(spec, FLAGS.batch_size, FLAGS.batches)
        print(
            f"{s['mode']:<10} {s['grid']:<6} {s['context_full']:>8.1f} {s['context_reference_cut']:>8.1f} "
            f"{s['context_tokens_K']:>4d} {s['context_kept']:>7.1f} {s['target_per_block']:>8.1f} "
            f"{s['target_tokens_T']:>4d}"
        )


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)
