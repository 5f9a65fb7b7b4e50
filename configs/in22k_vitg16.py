"""ViT-g/16, 224px, ImageNet-22K, 44 epochs: the reference in22k_vitg16_ep44.yaml (3 warmup
epochs, predictor depth 16, 16 per GPU)."""

from ijepa_jax import config_lib


def get_config():
    c = config_lib.reference_recipe(
        "vit_giant", patch_size=16, crop_size=224, epochs=44, warmup_epochs=3, pred_depth=16, per_gpu_batch=16
    )
    # Remat off: 16 images per device need about 35 GiB (tools/memory, README "Memory you can plan
    # with"), within the reference's 80 GB GPUs; add model.remat=True on 32 GiB chips.
    return c
