"""ViT-g/16, 224px, ImageNet-22K, 44 epochs: the reference in22k_vitg16_ep44.yaml."""

from ijepa_jax import config_lib


def get_config():
    c = config_lib.reference_recipe("vit_giant", patch_size=16, crop_size=224, epochs=44)
    c.model.remat = True  # 40 blocks of width 1408: trade compute for activation memory
    return c
