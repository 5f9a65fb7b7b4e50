"""CIFAR-100 at 32px, 10 epochs: a small-scale I-JEPA run for a laptop CPU or one GPU.

    python -m ijepa_jax.train --config configs/cifar100.py:vit_tiny --workdir runs/c100 \
        --config.data.root=../shared/data

Argument: vit_tiny (default) or vit_small, optionally followed by ',smoke' (the
tiny variant of config_lib.smoke: ViT-micro, 20 steps) and/or ',reference' (the
reference's EMA schedule, objective, batch 256 and lr 1e-3, without the recipe's
fixed EMA 0.98, variance/covariance term, CAPI clustering targets and batch 32).
Patch 4 gives an 8x8 grid; the recipe
(config_lib.small_scale_recipe) uses the corrected sampler there, and
`--config.mask.mode=reference` restores the reference's.
"""

from ijepa_jax import config_lib


def get_config(arg: str = "vit_tiny"):
    model, options = config_lib.parse_config_arg(arg, config_lib.SMALL_SCALE_PREDICTORS, "vit_tiny")
    c = config_lib.small_scale_recipe(model, patch_size=4, crop_size=32, train_images=50_000,
                                      reference="reference" in options)
    c.data.update(source="cifar100", root="../shared/data")
    return config_lib.smoke(c) if "smoke" in options else c
