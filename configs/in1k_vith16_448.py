"""ViT-H/16, 448px, ImageNet-1K, 300 epochs: the reference in1k_vith16-448_ep300.yaml (16 per GPU)."""

from ijepa_jax import config_lib


def get_config():
    return config_lib.reference_recipe("vit_huge", patch_size=16, crop_size=448, epochs=300, per_gpu_batch=16)
