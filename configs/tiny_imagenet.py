"""Tiny-ImageNet (the 100-class, 300-images-per-class JPEG subset in ../shared/data) at 64px,
10 epochs: the ImageNet-subset stand-in that runs on a laptop CPU or one GPU.

    tar -xzf ../shared/data/tiny-imagenet-100cls.tar.gz -C /tmp
    python -m ijepa_jax.train --config configs/tiny_imagenet.py:vit_tiny --workdir runs/tin \
        --config.data.root=/tmp/tiny-imagenet-100cls

Argument: vit_tiny (default) or vit_small, optionally followed by ',smoke' and/or
',reference' (the reference's EMA, objective, batch and lr; configs/cifar100.py). Patch 8 on 64px crops gives the same
8x8 grid as CIFAR-100 at 32/4, so the recipe is config_lib.small_scale_recipe;
real ImageNet-style JPEGs read from class folders (train/, scored on val/).
"""

from ijepa_jax import config_lib


def get_config(arg: str = "vit_tiny"):
    model, options = config_lib.parse_config_arg(arg, config_lib.SMALL_SCALE_PREDICTORS, "vit_tiny")
    c = config_lib.small_scale_recipe(model, patch_size=8, crop_size=64, train_images=30_000,
                                      reference="reference" in options)
    c.data.update(source="folder", root="", num_workers=2)
    c.eval.test_split = "val"
    return config_lib.smoke(c) if "smoke" in options else c
