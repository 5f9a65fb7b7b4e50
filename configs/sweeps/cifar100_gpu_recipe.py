"""The CIFAR-100 recipe search on one GPU: 8 points of 10 epochs on all 50,000 training images.

    launch/gpu_sweep.sh --sweep configs/sweeps/cifar100_gpu_recipe.py --config configs/cifar100.py:vit_tiny,reference \
        --data /tmp/ijepa_data --out "$OUT"

Every point but `reference` starts from the current best (`control`: fixed EMA 0.98 and the
variance/covariance penalty, docs/results.md) and changes one thing. Measured on the 8x8 grid of
ViT-Ti/4 at 32px (python -m ijepa_jax.tools.mask_stats, corrected masks, batch 256): the control keeps
19.6 context patches per image (K=20) and pads target blocks of 11 patches to T=12; `targets2` keeps
27.3 (K=28) and 15.4-patch blocks (T=20); `context28` keeps 25.4 of the 29.1 the context block holds.

About 1.5 minutes a point on an H200 (docs/gpu_sweep.md), so 8 points do not fit one 9-minute call:
cifar100_gpu_recipe_ema.py and cifar100_gpu_recipe_shape.py are its two halves (the control in both).
POINTS names each point's overrides, SHARED those every point gets; see docs/sweeps.md.
"""

CONTROL = {"optim.ema": (0.98, 0.98), "optim.var_cov_weight": 1.0}

SHARED = {}  # 10 epochs (1,950 steps) each, evaluated on the full splits: the reference recipe as it is

POINTS = {
    "control": CONTROL,
    "reference": {"optim.ema": (0.996, 1.0), "optim.var_cov_weight": 0.0},  # the reference's EMA, no penalty
    # EMA, fixed, with the penalty
    "ema99": {**CONTROL, "optim.ema": (0.99, 0.99)},
    "ema996": {**CONTROL, "optim.ema": (0.996, 0.996)},
    # masking geometry on the 8x8 grid
    "targets2": {**CONTROL, "mask.num_targets": 2, "mask.target_scale": (0.2, 0.3)},  # fewer, larger targets
    "context28": {**CONTROL, "mask.context_tokens": 28},  # more context (K 20 -> 28)
    # predictor depth (6 in the config)
    "pred4": {**CONTROL, "model.pred_depth": 4},
    "pred8": {**CONTROL, "model.pred_depth": 8},
}
