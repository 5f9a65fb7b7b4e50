"""ViT-H/14, 224px, ImageNet-22K, 66 epochs: the reference in22k_vith14_ep66.yaml (3 warmup
epochs, 32 per GPU).

Point --config.data.root at an ImageNet-22K folder (ROOT/train/<class>/...).
"""

from ijepa_jax import config_lib


def get_config():
    return config_lib.reference_recipe(
        "vit_huge", patch_size=14, crop_size=224, epochs=66, warmup_epochs=3, per_gpu_batch=32
    )
