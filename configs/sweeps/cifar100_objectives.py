"""The I-JEPA objective options against the current best, on CIFAR-100 (issue: a recipe that learns).

On the 100-images-per-class subset (the ranking protocol of docs/results.md: 10,000 images, 39 steps
an epoch, 10 epochs), on a CPU:

    python -m ijepa_jax.tools.sweep --config configs/cifar100.py:vit_tiny,reference --workdir runs/objectives \
        --sweep configs/sweeps/cifar100_objectives.py --config.data.max_samples_per_class=100 \
        --config.checkpoint.every_steps=39

On all 50,000 images, on one GPU (docs/gpu_sweep.md), launch/gpu_sweep.sh with its parts
cifar100_objectives_targets.py, _sets.py and _capi.py (one 9-minute call each).
Every point keeps the control's fixed EMA 0.98 and variance/covariance penalty (docs/results.md) and adds
one objective option, except `frozen_target`, the diagnostic of what the EMA adds (the control with EMA
momentum 1: the target encoder stays at its initialisation), the follow-ups of capi1024 (a second seed;
without the penalty; at batch 64 and 32 with two seeds each, and at batch 16; with flips; at batch 32
with a fixed EMA of 0.99, with flips, with 256 clusters, with each option below, at twice the lr, with
fewer, larger targets, with a 12-block predictor, with a warmer clustering teacher, with a fixed EMA of
0.97, with Adam's b2 at 0.95 and with a frozen target), and the control's second seed. The points are
overrides on the reference recipe (`vit_tiny,reference`: batch 256, lr 1e-3), on which they ran; the
control is what small_scale_recipe shipped until capi1024_batch64_lr25 replaced it. The options (docs/reference-parity.md
8-10, and mask.sets): data2vec 2.0 targets from the last 4 of 12 blocks, the pooled-target term, CAPI's
clustering targets over 1,024 clusters (16 tokens per cluster in a batch of 256 x 64 tokens), 4 mask sets
per image sharing one target pass. POINTS names each point's overrides, SHARED those every point gets;
see docs/sweeps.md.
"""

CONTROL = {"optim.ema": (0.98, 0.98), "optim.var_cov_weight": 1.0}
CAPI = {**CONTROL, "optim.target_clusters": 1024}


def capi_at_batch(batch: int) -> dict:
    """CAPI at a smaller batch with the reference's lr per image (lr 1e-3, start 2e-4 at batch 256): 256 /
    batch times the steps for the same images, and the checkpoint and health intervals scaled with them."""
    scale = batch / 256
    return {**CAPI, "data.batch_size": batch, "optim.lr": 1e-3 * scale, "optim.start_lr": 2e-4 * scale,
            "checkpoint.every_steps": 39 * 256 // batch, "eval.health_every_steps": 78 * 256 // batch}


CAPI_BATCH64, CAPI_BATCH32 = capi_at_batch(64), capi_at_batch(32)

SHARED = {
    "eval.every_epochs": 2,  # the k-NN monitor: a collapse alarm, not a ranking (docs/results.md)
    "eval.monitor_train_samples_per_class": 50,
    "eval.monitor_test_samples_per_class": 20,
    "eval.health_every_steps": 78,
    "checkpoint.export_at_end": False,
}

POINTS = {
    "d2v4_pooled": {**CONTROL, "optim.target_layers": 4, "optim.pooled_target_weight": 0.1},
    "capi1024": CAPI,
    # CAPI's follow-ups (docs/results.md): its seed spread, and whether it still needs the penalty.
    "capi1024_seed1": {**CAPI, "seed": 1},
    "capi1024_novarcov": {**CAPI, "optim.var_cov_weight": 0.0},
    "control": CONTROL,
    "control_seed1": {**CONTROL, "seed": 1},  # the control's own seed spread, next to capi1024's
    "d2v4": {**CONTROL, "optim.target_layers": 4},
    "pooled": {**CONTROL, "optim.pooled_target_weight": 0.1},
    "sets4": {**CONTROL, "mask.sets": 4},
    "d2v4_pooled_sets4": {**CONTROL, "optim.target_layers": 4, "optim.pooled_target_weight": 0.1, "mask.sets": 4},
    "frozen_target": {**CONTROL, "optim.ema": (1.0, 1.0)},
    # The two best subset settings together: CAPI at batch 64 and a quarter of the lr (the same lr per
    # image; four times the steps), as ema98_varcov1_batch64_lr25 in docs/results.md; two seeds.
    "capi1024_batch64_lr25": CAPI_BATCH64,
    "capi1024_batch64_lr25_seed1": {**CAPI_BATCH64, "seed": 1},
    # Does the gain of four times the steps go on? Batch 32 at an eighth of the lr, eight times the steps.
    "capi1024_batch32_lr125": CAPI_BATCH32,
    "capi1024_batch32_lr125_seed1": {**CAPI_BATCH32, "seed": 1},
    # And further: batch 16 at a sixteenth of the lr, sixteen times the steps.
    "capi1024_batch16_lr0625": capi_at_batch(16),
    # The shipped default's EMA per image: at batch 32 a fixed 0.98 averages over 8x fewer images than at
    # batch 256. A slower target (0.99), paired with batch 32's seed-1 point.
    "capi1024_batch32_lr125_ema99_seed1": {**CAPI_BATCH32, "optim.ema": (0.99, 0.99), "seed": 1},
    # CAPI's own augmentation adds horizontal flips to the crop (off in the I-JEPA reference): at batch 256
    # and at batch 32 (paired with batch 32's seed-1 point).
    "capi1024_flip": {**CAPI, "data.use_horizontal_flip": True},
    "capi1024_batch32_lr125_flip_seed1": {**CAPI_BATCH32, "data.use_horizontal_flip": True, "seed": 1},
    # Fewer clusters for the smaller batch: 1,024 clusters balanced over 32 x 64 tokens leave 2 tokens a
    # cluster; 256 leave 8 (at batch 256 and K 1,024: 16). Paired with batch 32's seed-1 point.
    "capi1024_batch32_lr125_k256_seed1": {**CAPI_BATCH32, "optim.target_clusters": 256, "seed": 1},
    # The other objective options on the shipped default (batch 32), paired with its seed-1 point: data2vec
    # 2.0's targets, the pooled term, 4 mask sets (each about 4 times the context work of a step).
    "capi1024_batch32_lr125_d2v4_seed1": {**CAPI_BATCH32, "optim.target_layers": 4, "seed": 1},
    "capi1024_batch32_lr125_pooled_seed1": {**CAPI_BATCH32, "optim.pooled_target_weight": 0.1, "seed": 1},
    "capi1024_batch32_lr125_sets4_seed1": {**CAPI_BATCH32, "mask.sets": 4, "seed": 1},
    # Twice the lr at batch 32 (2.5e-4, start 5e-5): Adam's step is about lr whatever the batch, so
    # batch 32 at the same lr per image moves the weights as far over 10 epochs as batch 256 does, and
    # the monitor still rises at the last epoch. Paired with batch 32's seed-1 point.
    "capi1024_batch32_lr25_seed1": {**CAPI_BATCH32, "optim.lr": 2 * CAPI_BATCH32["optim.lr"],
                                    "optim.start_lr": 2 * CAPI_BATCH32["optim.start_lr"], "seed": 1},
    # Fewer, larger targets (cifar100_gpu_recipe.py's targets2) on the shipped default: 2 blocks of
    # 15 patches instead of 4 of 11, so 27 context patches instead of 20 (tools.mask_stats, batch 32).
    "capi1024_batch32_lr125_targets2_seed1": {
        **CAPI_BATCH32, "mask.num_targets": 2, "mask.target_scale": (0.2, 0.3), "seed": 1},
    # A predictor as deep as the encoder (12 blocks of 96 instead of 6): the I-JEPA paper's ablation
    # (its appendix, predictor depth 6 vs 12 on ViT-L) finds the deeper one gives the better probe.
    "capi1024_batch32_lr125_pred12_seed1": {**CAPI_BATCH32, "model.pred_depth": 12, "seed": 1},
    # Softer clustering targets: at batch 32 each batch's balancing has 2 tokens a cluster, and CAPI's
    # teacher temperature (0.06, tuned at 16,384 images a batch) makes the assignments nearly one-hot.
    # A teacher at 0.1 (the student stays at 0.12). Paired with batch 32's seed-1 point.
    "capi1024_batch32_lr125_tt10_seed1": {**CAPI_BATCH32, "optim.cluster_temperatures": (0.1, 0.12), "seed": 1},
    # A faster target at batch 32: 0.99 gave -0.1 points of probe and -0.6 of 20-NN; the other side.
    "capi1024_batch32_lr125_ema97_seed1": {**CAPI_BATCH32, "optim.ema": (0.97, 0.97), "seed": 1},
    # Adam's second moment over ~20 steps instead of ~1,000 (b2 0.95, as MAE and CAPI train): at batch 32
    # the gradients are noisy and their scale moves as the targets spread. The reference: 0.999.
    "capi1024_batch32_lr125_b295_seed1": {**CAPI_BATCH32, "optim.b2": 0.95, "seed": 1},
    # Crops of at least half the image instead of 0.3: the probes see whole 32px images at their own
    # scale, and a 0.3 crop of a 32px image is a 17px patch blown up to 32 (blurred). The reference: 0.3.
    "capi1024_batch32_lr125_crop50_seed1": {**CAPI_BATCH32, "data.crop_scale": (0.5, 1.0), "seed": 1},
    # What the EMA adds to the shipped default: a target encoder that stays at its initialisation (EMA
    # momentum 1), so the clusters are of random features. Its target encoder is the random init; probe
    # the online one (evaluate --which=online). Paired with batch 32's seed-1 point.
    "capi1024_batch32_lr125_frozen_seed1": {**CAPI_BATCH32, "optim.ema": (1.0, 1.0), "seed": 1},
}
