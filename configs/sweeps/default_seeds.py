"""The shipped small-scale default over three seeds: the seed spread of docs/results.md's headline.

The points override nothing but the seed, so the base config is the recipe under test, e.g. all of
CIFAR-100 (ViT-Ti/4) or the Tiny-ImageNet subset (ViT-S/8, issue goal: best probe >= random init + 10):

    python -m ijepa_jax.tools.sweep --config configs/cifar100.py:vit_tiny --workdir runs/default_seeds \
        --sweep configs/sweeps/default_seeds.py --config.data.root=../shared/data
    launch/gpu_sweep.sh --sweep configs/sweeps/default_seeds.py --config configs/tiny_imagenet.py:vit_small \
        --data .tin --wheels .whl      # one GPU call (docs/gpu_sweep.md)

Seed 0 first: the headline's own seed, so a budget that stops after one point still repeats it.
"""

SHARED = {
    "eval.every_epochs": 2,  # the k-NN monitor: a collapse alarm, not a ranking (docs/results.md)
    "eval.monitor_train_samples_per_class": 50,
    "eval.monitor_test_samples_per_class": 20,
    "checkpoint.export_at_end": False,
}

POINTS = {
    "default": {},
    "default_seed1": {"seed": 1},
    "default_seed2": {"seed": 2},
}
