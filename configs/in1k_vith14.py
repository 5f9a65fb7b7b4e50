"""ViT-H/14, 224px, ImageNet-1K, 300 epochs: the reference in1k_vith14_ep300.yaml (128 per GPU)."""

from ijepa_jax import config_lib


def get_config():
    return config_lib.reference_recipe("vit_huge", patch_size=14, crop_size=224, epochs=300)
