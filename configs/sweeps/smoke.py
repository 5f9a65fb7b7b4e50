"""Two points for the ',smoke' configs: the recipe's EMA (0.996 -> 1) against a faster one (0.98).

    python -m ijepa_jax.tools.sweep --config configs/cifar100.py:vit_tiny,smoke --workdir /tmp/sweep_smoke \
        --sweep configs/sweeps/smoke.py [--config.data.source=synthetic]

POINTS names each point's overrides, SHARED those every point gets; keys and values are
`--config.KEY=VALUE`'s (a string is parsed as the command line would parse it). See docs/sweeps.md.
"""

SHARED = {
    "total_steps": 16,  # 2 epochs of the synthetic source's 64 images (its whole schedule)
    # Small evaluation splits (10 / 5 images per class), the k-NN monitor every epoch (it fires on the
    # synthetic source's 8-step epochs), representation health every 8 steps.
    "eval.train_samples_per_class": 10,
    "eval.test_samples_per_class": 5,
    "eval.every_epochs": 1,
    "eval.health_every_steps": 8,
}

POINTS = {
    "ema996": {},  # the config as it is
    "ema98": {"optim.ema": (0.98, 0.98)},
}
