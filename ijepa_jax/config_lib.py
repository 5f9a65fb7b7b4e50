"""Shared config defaults and up-front validation.

Every file in configs/ starts from `default_config()` and overrides what its
experiment changes; `validate` runs before anything is built, so a bad value
fails in the first second with a message that says what to change.
"""

from __future__ import annotations

import math

import ml_collections

from ijepa_jax import masks, sharding
from ijepa_jax.models import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOSSES = ("smooth_l1", "l2")
SOURCES = ("cifar100", "folder", "tfds", "synthetic")
DTYPES = ("float32", "bfloat16", "float16")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = -1  # > 0: stop after this many steps (schedules still span all epochs)
    c.log_every_steps = 10
    c.compilation_cache_dir = ""  # persistent XLA compilation cache; '' = $JAX_COMPILATION_CACHE_DIR, or off
    # Device mesh: 'data' x 'fsdp' = all devices (-1: the rest). fsdp > 1 shards parameters, EMA target
    # and AdamW moments by sharding.STATE_RULES; the batch is split over both axes.
    c.mesh = dict(data=-1, fsdp=1)

    c.model = dict(
        name="vit_huge",
        patch_size=14,
        pred_depth=12,
        pred_width=384,
        dtype="float32",  # compute dtype; parameters are always float32
        scan_layers=False,  # scan the block stack: compile time flat in depth
        remat=False,  # rematerialise each block in the backward pass (policy: remat_policy)
        remat_policy="full",  # with remat: 'full' (save nothing), 'dots' (save matmul outputs), 'dots_no_batch'
        residual_dtype="float32",  # residual stream dtype; 'bfloat16' halves activation memory (not the reference)
        attention_impl="",  # '' (XLA) or 'cudnn'
    )
    c.data = dict(
        source="cifar100",  # 'cifar100', 'folder' (ROOT/<split>/<class>/<image>), 'tfds' or 'synthetic'
        root="",
        split="train",
        # cifar100: fetch the official archive (161 MiB) into data.root, created if need be, when it is missing.
        # Off by default: a mistyped root is an error naming it, not a new folder and a download.
        download=False,
        tfds_name="",  # tfds: e.g. 'imagenet2012'
        tfds_data_dir="",  # tfds: where prepared datasets live ('' = TFDS's default)
        max_samples_per_class=0,  # > 0: a class-balanced subset, chosen from the seed
        classes="",  # comma-separated class names, or a file with one per line ('' = all)
        on_bad_image="skip",  # 'skip' undecodable images (logged and counted) or 'fail'
        # 'host': crop/flip/colour per image in PIL (the reference's transforms); 'device': the dataset is
        # decoded into memory and held on the devices, the host draws the same boxes and flips, and the
        # accelerator crops (data/device_augment.py: PIL's pixels, no colour distortion or blur).
        augment_on="host",
        use_horizontal_flip=False,  # the reference's optional augmentations (all off in its configs)
        use_color_distortion=False,
        color_jitter_strength=0.0,
        use_gaussian_blur=False,
        crop_size=224,
        crop_scale=(0.3, 1.0),
        batch_size=2048,  # global, over all devices and hosts
        num_workers=0,  # grain worker processes; 0 decodes/crops/masks in the main process
        num_threads=4,  # grain read threads per process
        prefetch_batches=2,  # batches kept on device ahead of the step
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        synthetic_images=1024,  # for source='synthetic' (tests, benchmarks)
        synthetic_classes=10,
    )
    c.mask = dict(
        mode="reference",  # 'reference' or 'corrected' (see ijepa_jax/masks.py)
        num_targets=4,
        target_scale=(0.15, 0.2),
        target_aspect=(0.75, 1.5),
        context_scale=(0.85, 1.0),
        context_aspect=(1.0, 1.0),
        min_keep=10,
        allow_overlap=False,
        context_tokens=-1,  # K context tokens per image; -1: mean reference batch minimum
        auto_context_batch=128,  # per-GPU batch of the reference, for context_tokens=-1
        pad_multiple=-1,  # round K and T up to a multiple of this (extra slots masked); -1: 8 for cuDNN, else 1
        sets=1,  # > 1: independent mask sets per image sharing one target-encoder pass (data2vec 2.0; not I-JEPA)
    )
    c.checkpoint = dict(
        every_steps=1000,  # save every N steps (0: only at the end and on preemption)
        keep=3,  # keep the last K checkpoints
        keep_every_epochs=0,  # > 0: also keep every E-th epoch's checkpoint for good
        async_save=True,  # write in the background; the loop only waits for the device-to-host copy
        restore_step=-1,  # resume from this step instead of the latest
        init_from="",  # a workdir to take the weights from (fresh optimizer and step)
        export_at_end=True,  # write WORKDIR/target_encoder.msgpack when the run completes
    )
    c.eval = dict(
        train_split="train",  # labelled split the probes and k-NN learn from
        test_split="test",  # held-out split they are scored on ('val' for ImageNet folders)
        image_size=-1,  # evaluation crop (resize shorter side, centre crop); -1: the encoder's crop size
        batch_size=256,
        train_samples_per_class=0,  # > 0: a class-balanced subset of the training split
        test_samples_per_class=0,
        knn_k=20,
        knn_temperature=0.07,
        probe_lrs=(0.01, 0.1, 1.0),
        probe_weight_decays=(0.0, 5e-4),
        probe_epochs=50,
        probe_batch_size=1024,
        attentive_epochs=20,  # the attentive probe (opt-in: evaluate --protocols=...,attentive)
        # AdamW lrs swept, chosen on a held-out 10% of the train split. On CIFAR-100 ViT-Ti/4 the shipped
        # recipe's encoder peaks at 1e-2 (3e-2 within 0.1) and random init at 3e-3; both fall by 1e-1
        # (docs/results.md: measured on the 100-per-class encoder; the full-data one was not tried above 3e-2).
        attentive_lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        attentive_batch_size=256,
        finetune_epochs=5,  # end-to-end fine-tuning (opt-in: evaluate --protocols=...,finetune)
        finetune_lr=5e-4,  # AdamW, one lr (no sweep), the same for the pretrained and random-init encoders
        finetune_batch_size=256,
        finetune_weight_decay=0.05,
        finetune_warmup_epochs=1.0,
        finetune_flip=True,  # random horizontal flips of the labelled images
        lowshot_per_class=(1, 5, 10),
        lowshot_seeds=3,
        lowshot_variant="last4_bn",
        every_epochs=0,  # > 0: monitor feature quality during pretraining every E epochs
        monitor_protocols="knn",  # 'knn' and/or 'linear'
        monitor_train_samples_per_class=50,
        monitor_test_samples_per_class=10,
        health_every_steps=0,  # > 0: representation-health diagnostics (eval/health.py) every N steps
    )
    c.optim = dict(
        epochs=300,
        warmup_epochs=40,
        ipe_scale=1.0,
        start_lr=2e-4,
        lr=1e-3,
        final_lr=1e-6,
        weight_decay=0.04,
        final_weight_decay=0.4,
        ema=(0.996, 1.0),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        loss="smooth_l1",  # 'smooth_l1' (reference code) or 'l2' (paper text)
        var_cov_weight=0.0,  # > 0: add VICReg's variance/covariance terms on the context features (not I-JEPA)
        sigreg_weight=0.0,  # > 0: add LeJEPA's SIGReg on the context features (not I-JEPA)
        # Targets from the last K target-encoder blocks, each instance-normalised, averaged, layer-normed
        # (data2vec 2.0); 1: the reference's (the final output, layer-normed). step.target_features.
        target_layers=1,
        pooled_target_weight=0.0,  # > 0: the mean context feature regresses the mean target (not I-JEPA)
        # K > 0: the predictor predicts CAPI's online Sinkhorn-Knopp assignments of the targets to K clusters
        # (a cross-entropy) instead of regressing them; 0: the reference. step.cluster_assignments.
        target_clusters=0,
        # (teacher: Sinkhorn-Knopp, student: both cross-entropies); CAPI's default_pretrain_config.yaml:
        # target_temp 0.06, student_temp = pred_temp 0.12.
        cluster_temperatures=(0.06, 0.12),
    )
    return c


def reference_recipe(
    model_name: str,
    patch_size: int,
    crop_size: int,
    epochs: int,
    warmup_epochs: int = 40,
    pred_depth: int = 12,
    per_gpu_batch: int = 128,
) -> ml_collections.ConfigDict:
    """The official I-JEPA recipe (configs/*.yaml of the reference repo) for one model.

    Global batch 2048, predictor `pred_depth` x 384, AdamW with lr 2e-4 -> 1e-3
    over `warmup_epochs` then cosine to 1e-6, weight decay 0.04 -> 0.4, EMA
    0.996 -> 1.0, crops of scale (0.3, 1.0), reference masks. The reference's
    per-GPU batch (`per_gpu_batch`) sets how hard its batch-minimum context cut
    bites, so the automatic context length is measured at that batch. Runs in
    bf16 with a scanned block stack.
    """
    c = default_config()
    c.model.update(name=model_name, patch_size=patch_size, pred_depth=pred_depth, pred_width=384)
    c.model.update(dtype="bfloat16", scan_layers=True)
    c.data.update(source="folder", crop_size=crop_size, crop_scale=(0.3, 1.0), batch_size=2048, num_workers=16)
    c.eval.test_split = "val"
    c.mask.update(mode="reference", auto_context_batch=per_gpu_batch)
    c.optim.update(epochs=epochs, warmup_epochs=warmup_epochs, start_lr=2e-4, lr=1e-3, final_lr=1e-6)
    c.optim.update(weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0))
    return c


def _validate_cudnn(config: ml_collections.ConfigDict) -> None:
    """Combinations jax's cuDNN fused attention cannot train with, caught before compiling.

    jax turns a boolean mask into an additive bias and, in training, rejects
    a bias when a sequence length is odd; head dims must be multiples of 8 and
    at most 128 (256 on Hopper; we keep the portable bound).
    """
    m = config.model
    if m.dtype == "float32":
        raise ValueError("model.attention_impl='cudnn' needs model.dtype=bfloat16 or float16.")
    embed_dim, _, heads, _ = vit.VIT_SIZES[m.name]
    for what, width in (("encoder", embed_dim), ("predictor (model.pred_width)", m.pred_width)):
        head_dim = width // heads
        if head_dim % 8 or head_dim > 128:
            raise ValueError(
                f"model.attention_impl='cudnn': the {what} head dim {width}/{heads} = {head_dim} must be a "
                "multiple of 8 and at most 128; use attention_impl='' (XLA) or another width."
            )
    pad = masks.resolve_pad_multiple(config)
    if pad % 2:
        raise ValueError(
            f"model.attention_impl='cudnn' with mask.pad_multiple={pad}: cuDNN cannot train with a mask on an "
            "odd sequence length; use mask.pad_multiple=8 (or -1, automatic)."
        )


# encoder -> (predictor depth, predictor width) for the small-scale recipes: about
# half the encoder width, as the reference's 384-wide predictor is for ViT-H.
SMALL_SCALE_PREDICTORS = {"vit_tiny": (6, 96), "vit_small": (6, 192)}


# What the small-scale configs change in the reference's objective (docs/reference-parity.md, items 7
# and 10; docs/results.md: the reference's alone ends below a random-init encoder at 10 epochs).
SMALL_SCALE_OBJECTIVE = dict(ema=(0.98, 0.98), var_cov_weight=1.0, target_clusters=1024)


def small_scale_recipe(model_name: str, patch_size: int, crop_size: int, train_images: int,
                       reference: bool = False):
    """10 epochs on an 8x8 patch grid (CIFAR-100 at 32/4, Tiny-ImageNet at 64/8), one GPU or a CPU.

    1 warmup epoch, the reference's weight-decay range, corrected masks with min_keep 4 (on an 8x8
    grid the reference's blocks never touch the last row or column: 15 of 64 patches), a checkpoint
    every epoch (`train_images` // batch steps).

    Three deviations from the reference make it learn at this budget (docs/results.md: the
    reference's objective alone ends below a random-init encoder on every protocol), each named in
    docs/reference-parity.md: a fixed EMA of 0.98 instead of 0.996 -> 1; VICReg's
    variance/covariance term on the context features with weight 1.0 (optim.var_cov_weight,
    deviation 7); and CAPI's clustering targets over 1,024 clusters (optim.target_clusters,
    deviation 10), trained at batch 32 with the reference's lr per image (1.25e-4, an eighth of
    1e-3 at an eighth of the batch): eight times the steps for the same images. It is still masked
    latent prediction with an EMA target encoder. `reference=True` (the config argument
    ',reference') keeps the reference's EMA, objective, batch 256 and lr 1e-3.
    """
    if model_name not in SMALL_SCALE_PREDICTORS:
        raise ValueError(f"model {model_name!r}: choose one of {sorted(SMALL_SCALE_PREDICTORS)}.")
    c = default_config()
    pred_depth, pred_width = SMALL_SCALE_PREDICTORS[model_name]
    c.model.update(name=model_name, patch_size=patch_size, pred_depth=pred_depth, pred_width=pred_width)
    c.data.update(crop_size=crop_size, crop_scale=(0.3, 1.0), batch_size=256, num_workers=0)
    # The dataset fits in memory: crop on the accelerator (same pixels as PIL, docs/performance.md).
    c.data.augment_on = "device"
    c.mask.update(mode="corrected", min_keep=4)
    c.optim.update(epochs=10, warmup_epochs=1, start_lr=2e-4, lr=1e-3, final_lr=1e-6)
    c.optim.update(weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0))
    if not reference:
        batch = 32  # at the reference's lr per image: 8x its steps for the same images
        scale = batch / c.data.batch_size
        c.data.batch_size = batch
        c.optim.update(start_lr=c.optim.start_lr * scale, lr=c.optim.lr * scale, **SMALL_SCALE_OBJECTIVE)
    c.checkpoint.every_steps = train_images // c.data.batch_size
    c.log_every_steps = 10
    return c


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The one tiny variant of any config, for tests, smoke runs and CI benchmarks: ViT-micro/4 on
    16px crops (a 4x4 grid), batch 8, a 1x32 predictor, two small target blocks, 20 steps. The data
    source stays the config's (tests switch to 'synthetic'); everything compiles in seconds."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.update(name="vit_micro", patch_size=4, pred_depth=1, pred_width=32)
    c.data.update(crop_size=16, batch_size=8, synthetic_images=64, num_threads=1, num_workers=0)
    c.mask.update(
        mode="corrected", num_targets=2, target_scale=(0.25, 0.3), target_aspect=(1.0, 1.0),
        context_scale=(0.9, 1.0), min_keep=2, context_tokens=6,
    )
    c.optim.update(epochs=2, warmup_epochs=1, lr=1e-3, start_lr=1e-4)
    c.eval.update(batch_size=64, probe_epochs=5, attentive_epochs=2, finetune_epochs=1,
                  monitor_train_samples_per_class=5, monitor_test_samples_per_class=2)
    c.total_steps, c.log_every_steps = 20, 5
    c.checkpoint.every_steps = 10
    return c


CONFIG_ARG_OPTIONS = ("smoke", "reference")


def parse_config_arg(arg: str, choices, default: str) -> tuple[str, frozenset]:
    """'vit_small' -> ('vit_small', {}); 'vit_tiny,smoke,reference' or 'smoke' -> (..., {'smoke', ...}):
    a model name from `choices` and any of CONFIG_ARG_OPTIONS."""
    parts = [p for p in arg.split(",") if p]
    options = frozenset(p for p in parts if p in CONFIG_ARG_OPTIONS)
    names = [p for p in parts if p not in CONFIG_ARG_OPTIONS] or [default]
    if len(names) != 1 or names[0] not in choices:
        raise ValueError(f"config argument {arg!r}: give one of {sorted(choices)}, optionally followed by "
                         f"{', '.join(',' + o for o in CONFIG_ARG_OPTIONS)}.")
    return names[0], options


# Real-valued keys: each a finite number (inf and nan pass every comparison-based range check below).
NUMBERS = (
    "optim.lr", "optim.start_lr", "optim.final_lr", "optim.weight_decay", "optim.final_weight_decay", "optim.b1",
    "optim.b2", "optim.eps", "optim.var_cov_weight", "optim.sigreg_weight", "optim.pooled_target_weight",
    "optim.ipe_scale", "optim.epochs",
    "optim.warmup_epochs", "data.color_jitter_strength", "eval.knn_temperature",
)
# (low, high) pairs of finite numbers.
PAIRS = ("optim.ema", "optim.cluster_temperatures", "data.crop_scale", "mask.target_scale", "mask.target_aspect",
         "mask.context_scale", "mask.context_aspect")
# Sequences of finite numbers.
SEQUENCES = ("data.mean", "data.std", "eval.probe_lrs", "eval.probe_weight_decays", "eval.attentive_lrs")


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _shown(value) -> str:
    """A value as given: a command-line tuple that is not a Python literal ('(0.9,inf)') arrives as a
    1-tuple of its text."""
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return repr(value)


def _validate_numbers(config: ml_collections.ConfigDict) -> None:
    """Every real-valued key a finite number, every pair two of them (before any range check)."""
    for key in NUMBERS:
        value = _get(config, key)
        if not _is_number(value):
            raise ValueError(f"{key}={value!r} must be a finite number.")
    for key in PAIRS:
        value = _get(config, key)
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value))):
            raise ValueError(
                f"{key}={_shown(value)} must be a pair of finite numbers, e.g. --config.{key}='(0.5,1.0)'."
            )
    for key in SEQUENCES:
        value = _get(config, key)
        if not (isinstance(value, (tuple, list)) and all(map(_is_number, value))):
            raise ValueError(
                f"{key}={_shown(value)} must be a tuple of finite numbers, e.g. --config.{key}='(0.1,1.0)'."
            )


def validate_grid(config: ml_collections.ConfigDict) -> None:
    """The model name and a patch size that divides the crop (what the mask grid is made of)."""
    m, d = config.model, config.data
    if m.name not in vit.VIT_SIZES:
        raise ValueError(f"model.name={m.name!r}; choose one of {sorted(vit.VIT_SIZES)}.")
    if m.patch_size < 1 or d.crop_size < 1 or d.crop_size % m.patch_size:
        raise ValueError(
            f"data.crop_size={d.crop_size} is not divisible by model.patch_size={m.patch_size}; "
            f"use a crop of {d.crop_size // max(m.patch_size, 1) * max(m.patch_size, 1)} or a patch size that divides it."
        )


def validate_masks(config: ml_collections.ConfigDict) -> None:
    """What the mask sampler needs (tools/mask_stats checks only this): the grid and the mask.* keys."""
    _validate_numbers(config)
    validate_grid(config)
    if config.mask.sets < 1:
        raise ValueError(f"mask.sets={config.mask.sets} must be >= 1 (1: one mask set per image, the reference).")
    if config.mask.auto_context_batch < 1:
        raise ValueError(f"mask.auto_context_batch={config.mask.auto_context_batch} must be >= 1.")
    masks.validate(masks.MaskSpec.from_config(config))


def validate_eval(config: ml_collections.ConfigDict) -> None:
    """What evaluate reads of a config: the data source and the eval.* keys."""
    _validate_numbers(config)
    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"data.source={d.source!r}; choose one of {SOURCES}.")
    if d.source == "tfds" and not d.tfds_name:
        raise ValueError("data.source='tfds' needs --config.data.tfds_name (e.g. imagenet2012).")
    if d.source in ("folder",) and not d.root:
        raise ValueError("data.source='folder' needs --config.data.root (the folder holding train/ and val/).")
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        raise ValueError("data.mean and data.std need 3 values each, std > 0.")
    e = config.eval
    if e.lowshot_variant not in ("last", "last_bn", "last4", "last4_bn"):
        raise ValueError(f"eval.lowshot_variant={e.lowshot_variant!r}; use last, last_bn, last4 or last4_bn.")
    if e.every_epochs < 0 or e.knn_k < 1 or e.batch_size < 1:
        raise ValueError("eval.every_epochs must be >= 0, eval.knn_k and eval.batch_size >= 1.")
    if e.knn_temperature <= 0:
        raise ValueError(f"eval.knn_temperature={e.knn_temperature} must be > 0 (votes are exp(similarity / T)).")
    if e.probe_epochs < 1 or e.probe_batch_size < 1:
        raise ValueError(
            f"eval.probe_epochs={e.probe_epochs} and eval.probe_batch_size={e.probe_batch_size} must be >= 1 "
            "(0 epochs would leave every probe at chance)."
        )
    if not e.probe_lrs or min(e.probe_lrs) <= 0 or not e.probe_weight_decays or min(e.probe_weight_decays) < 0:
        raise ValueError(
            f"eval.probe_lrs={tuple(e.probe_lrs)} need at least one value, all > 0; "
            f"eval.probe_weight_decays={tuple(e.probe_weight_decays)} at least one, all >= 0."
        )
    if e.attentive_epochs < 1 or e.attentive_batch_size < 1:
        raise ValueError(
            f"eval.attentive_epochs={e.attentive_epochs} and eval.attentive_batch_size={e.attentive_batch_size} "
            "must be >= 1 (0 epochs would leave the attentive probe at chance)."
        )
    if not e.attentive_lrs or min(e.attentive_lrs) <= 0:
        raise ValueError(f"eval.attentive_lrs={tuple(e.attentive_lrs)} need at least one value, all > 0.")
    if e.finetune_epochs < 1 or e.finetune_batch_size < 1 or not e.finetune_lr > 0 or e.finetune_weight_decay < 0:
        raise ValueError(
            f"eval.finetune_epochs={e.finetune_epochs} and eval.finetune_batch_size={e.finetune_batch_size} must be "
            f">= 1, eval.finetune_lr={e.finetune_lr} > 0 and eval.finetune_weight_decay={e.finetune_weight_decay} >= 0."
        )
    if not 0 <= e.finetune_warmup_epochs <= e.finetune_epochs:
        raise ValueError(f"eval.finetune_warmup_epochs={e.finetune_warmup_epochs} must be in [0, eval.finetune_epochs="
                         f"{e.finetune_epochs}].")
    if min(e.lowshot_per_class, default=1) < 1 or e.lowshot_seeds < 1:
        raise ValueError(
            f"eval.lowshot_per_class={tuple(e.lowshot_per_class)} must be >= 1 each, "
            f"eval.lowshot_seeds={e.lowshot_seeds} >= 1."
        )
    if e.image_size == 0 or e.image_size < -1:
        raise ValueError(f"eval.image_size={e.image_size}: give a size > 0, or -1 for the encoder's crop size.")
    for key in ("train_samples_per_class", "test_samples_per_class"):
        if e[key] < 0:
            raise ValueError(f"eval.{key}={e[key]} must be >= 0 (0 keeps all).")


def validate_on_host(config: ml_collections.ConfigDict) -> None:
    """validate, for the tools that run the input pipeline or the masks on the host only: the mesh and
    the batch's split over devices are not theirs to check."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.mesh.update(data=-1, fsdp=1)
    validate(c, num_devices=1)


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raise ValueError naming the offending key and the fix."""
    m, d, o = config.model, config.data, config.optim
    _validate_numbers(config)
    validate_grid(config)
    validate_eval(config)  # also the data source, read by both
    embed_dim, _, heads, _ = vit.VIT_SIZES[m.name]
    if m.pred_width % heads or m.pred_width % 4:
        raise ValueError(
            f"model.pred_width={m.pred_width} must be divisible by 4 (sin-cos) and by the "
            f"{heads} heads of {m.name}."
        )
    if m.pred_depth < 1:
        raise ValueError(f"model.pred_depth={m.pred_depth} must be >= 1.")
    if m.dtype not in DTYPES:
        raise ValueError(f"model.dtype={m.dtype!r}; choose one of {DTYPES}.")
    if m.attention_impl not in ("", "xla", "cudnn"):
        raise ValueError(f"model.attention_impl={m.attention_impl!r}; use '', 'xla' or 'cudnn'.")
    if m.attention_impl == "cudnn":
        _validate_cudnn(config)
    if m.remat_policy not in vit.REMAT_POLICIES:
        raise ValueError(f"model.remat_policy={m.remat_policy!r}; choose one of {sorted(vit.REMAT_POLICIES)}.")
    if m.residual_dtype not in DTYPES:
        raise ValueError(f"model.residual_dtype={m.residual_dtype!r}; choose one of {DTYPES}.")
    if d.max_samples_per_class < 0:
        raise ValueError(f"data.max_samples_per_class={d.max_samples_per_class} must be >= 0 (0 keeps all).")
    if d.on_bad_image not in ("skip", "fail"):
        raise ValueError(f"data.on_bad_image={d.on_bad_image!r}; use 'skip' or 'fail'.")
    if d.augment_on not in ("host", "device"):
        raise ValueError(f"data.augment_on={d.augment_on!r}; use 'host' or 'device'.")
    if d.augment_on == "device" and (d.use_color_distortion or d.use_gaussian_blur):
        raise ValueError(
            "data.augment_on='device' crops and flips only; colour distortion and blur run on the host: "
            "set data.augment_on=host, or data.use_color_distortion=False and data.use_gaussian_blur=False."
        )
    if d.color_jitter_strength < 0:
        raise ValueError(f"data.color_jitter_strength={d.color_jitter_strength} must be >= 0.")
    if d.batch_size < 1:
        raise ValueError(f"data.batch_size={d.batch_size} (global) must be >= 1.")
    if d.batch_size % num_devices:
        raise ValueError(
            f"data.batch_size={d.batch_size} (global) is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices}, e.g. {max(1, d.batch_size // num_devices) * num_devices}."
        )
    sharding.mesh_shape(config.mesh, num_devices)
    if d.batch_size % num_processes:
        raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the {num_processes} processes.")
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.crop_scale={tuple(d.crop_scale)} must satisfy 0 < low <= high <= 1.")
    if o.loss not in LOSSES:
        raise ValueError(f"optim.loss={o.loss!r}; choose one of {LOSSES}.")
    if o.epochs <= 0 or not 0 <= o.warmup_epochs <= o.epochs:
        raise ValueError(f"optim.epochs={o.epochs} must be > 0 and optim.warmup_epochs={o.warmup_epochs} in [0, epochs].")
    if not 0 <= o.ema[0] <= o.ema[1] <= 1:
        raise ValueError(f"optim.ema={tuple(o.ema)} must satisfy 0 <= start <= end <= 1.")
    if not (o.lr > 0 and o.start_lr >= 0 and o.final_lr >= 0):
        raise ValueError(
            f"optim.lr={o.lr} must be > 0, optim.start_lr={o.start_lr} and optim.final_lr={o.final_lr} >= 0."
        )
    if o.weight_decay < 0 or o.final_weight_decay < 0:
        raise ValueError(f"optim.weight_decay={o.weight_decay} and final_weight_decay={o.final_weight_decay} must be >= 0.")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps > 0):
        raise ValueError(f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1), optim.eps={o.eps} > 0.")
    for name in ("var_cov_weight", "sigreg_weight", "pooled_target_weight"):
        if o[name] < 0:
            raise ValueError(f"optim.{name}={o[name]} must be >= 0 (0: off, the reference's loss).")
    depth = vit.VIT_SIZES[m.name][1]
    if not 1 <= o.target_layers <= depth:
        raise ValueError(
            f"optim.target_layers={o.target_layers}: the targets average the last K of {m.name}'s {depth} blocks; "
            f"give 1 (the reference) to {depth}."
        )
    clusters = o.target_clusters
    if not isinstance(clusters, int) or clusters == 1 or clusters < 0:
        raise ValueError(f"optim.target_clusters={clusters!r}: give a number of clusters K >= 2 (CAPI's targets), "
                         "or 0 (the reference: regress the target features).")
    teacher_temp, student_temp = o.cluster_temperatures
    if not (teacher_temp > 0 and student_temp > 0):
        raise ValueError(f"optim.cluster_temperatures=({teacher_temp}, {student_temp}): give (teacher, student) "
                         "temperatures > 0 (CAPI's are (0.06, 0.12)).")
    if o.ipe_scale <= 0:
        raise ValueError(f"optim.ipe_scale={o.ipe_scale} must be > 0 (the schedules span ipe_scale x the epochs).")
    if config.total_steps == 0 or config.total_steps < -1:
        raise ValueError(f"total_steps={config.total_steps}: give a number of steps > 0, or -1 for all the epochs.")
    e = config.eval
    if e.health_every_steps < 0:
        raise ValueError(f"eval.health_every_steps={e.health_every_steps} must be >= 0 (0: off).")
    unknown = [p for p in e.monitor_protocols.split(",") if p and p not in ("knn", "linear")]
    if unknown or (e.every_epochs and not e.monitor_protocols):
        raise ValueError(f"eval.monitor_protocols={e.monitor_protocols!r}: use 'knn', 'linear' or 'knn,linear'.")
    k = config.checkpoint
    if k.every_steps < 0 or k.keep < 1 or k.keep_every_epochs < 0:
        raise ValueError(
            f"checkpoint.every_steps={k.every_steps} (>= 0), checkpoint.keep={k.keep} (>= 1) and "
            f"checkpoint.keep_every_epochs={k.keep_every_epochs} (>= 0) are out of range."
        )
    if config.log_every_steps < 1:
        raise ValueError(f"log_every_steps={config.log_every_steps} must be >= 1.")
    validate_masks(config)
