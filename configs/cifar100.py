"""CIFAR-100 at 32px, 10 epochs: a small-scale I-JEPA run for a laptop CPU or one GPU.

    python -m ijepa_jax.train --config configs/cifar100.py:vit_tiny --workdir runs/c100 \
        --config.data.root=../shared/data

Argument: vit_tiny (default) or vit_small. Patch 4 gives an 8x8 grid. On so
small a grid the reference's mask quirks cost a lot (its blocks never touch
the last row or column: 15 of 64 patches), so this config uses the corrected
sampler; `--config.mask.mode=reference` restores the reference's.
"""

from ijepa_jax import config_lib

# encoder -> (predictor depth, predictor width): about half the encoder width,
# as the reference's 384-wide predictor is for ViT-H.
_PREDICTORS = {"vit_tiny": (6, 96), "vit_small": (6, 192)}


def get_config(arg: str = "vit_tiny"):
    if arg not in _PREDICTORS:
        raise ValueError(f"configs/cifar100.py:{arg}: choose one of {sorted(_PREDICTORS)}.")
    c = config_lib.default_config()
    pred_depth, pred_width = _PREDICTORS[arg]
    c.model.update(name=arg, patch_size=4, pred_depth=pred_depth, pred_width=pred_width)
    c.data.update(source="cifar100", root="../shared/data", crop_size=32, crop_scale=(0.3, 1.0))
    c.data.update(batch_size=256, num_workers=0)
    c.mask.update(mode="corrected", min_keep=4)
    c.optim.update(epochs=10, warmup_epochs=1, start_lr=2e-4, lr=1e-3, final_lr=1e-6)
    c.optim.update(weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0))
    c.checkpoint.every_steps = 195  # one epoch of 50,000 images at batch 256
    c.log_every_steps = 10
    return c
