"""configs/*.py and config_lib.validate: reference hyper-parameters, and errors that name the key and the fix."""

import glob
import importlib.util
import os

import pytest
from conftest import small_config

from ijepa_jax import config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))
SMALL_SCALE_FILES = ("cifar100.py", "tiny_imagenet.py", "in1k_subset.py")
REFERENCE_FILES = [f for f in CONFIG_FILES if f not in SMALL_SCALE_FILES]


def load_config_module(filename):
    """Import configs/<filename> by path (what ml_collections.config_flags does, without flags)."""
    path = os.path.join(CONFIG_DIR, filename)
    spec = importlib.util.spec_from_file_location(f"_config_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(filename, *args):
    return load_config_module(filename).get_config(*args)


def test_config_folder_contents():
    """The expected config files exist (a renamed file would silently drop out of the tests below)."""
    assert set(CONFIG_FILES) >= {
        "cifar100.py", "tiny_imagenet.py", "in1k_vith14.py", "in1k_vith16_448.py", "in22k_vith14.py",
        "in22k_vitg16.py",
    }


@pytest.mark.parametrize("filename", REFERENCE_FILES)
def test_reference_configs_validate_with_synthetic_source(filename):
    """Every reference config loads and validates on 8 devices once data.source is a source that exists."""
    c = get_config(filename)
    c.data.source = "synthetic"
    config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("filename", REFERENCE_FILES)
def test_reference_configs_read_an_image_folder_named_on_the_command_line(filename):
    """As shipped they read data.source='folder' and ask for --config.data.root; with it they validate."""
    c = get_config(filename)
    assert c.data.source == "folder"
    with pytest.raises(ValueError, match=r"needs --config\.data\.root"):
        config_lib.validate(c, num_devices=8)
    c.data.root = "/datasets/imagenet"
    config_lib.validate(c, num_devices=8)


def assert_reference_recipe(c):
    """The official recipe shared by all four reference configs."""
    assert c.data.batch_size == 2048
    assert c.model.pred_width == 384
    o = c.optim
    assert (o.lr, o.start_lr, o.final_lr) == (1e-3, 2e-4, 1e-6)
    assert (o.weight_decay, o.final_weight_decay) == (0.04, 0.4)
    assert tuple(o.ema) == (0.996, 1.0)
    assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)
    assert o.ipe_scale == 1.0
    assert o.loss == "smooth_l1"
    assert tuple(c.data.crop_scale) == (0.3, 1.0)
    m = c.mask
    assert m.mode == "reference"
    assert (m.num_targets, tuple(m.target_scale), tuple(m.target_aspect)) == (4, (0.15, 0.2), (0.75, 1.5))
    assert (tuple(m.context_scale), tuple(m.context_aspect), m.min_keep, m.allow_overlap) == ((0.85, 1.0), (1.0, 1.0), 10, False)


# The reference YAML files (configs/*.yaml of the official repo, per ../shared/notes/ijepa-reference.md):
# model, patch, crop, epochs, warmup epochs, predictor depth, per-GPU batch (global batch 2048 in all).
REFERENCE_YAML = [
    ("in1k_vith14.py", "vit_huge", 14, 224, 300, 40, 12, 128),
    ("in1k_vith16_448.py", "vit_huge", 16, 448, 300, 40, 12, 16),
    ("in22k_vith14.py", "vit_huge", 14, 224, 66, 3, 12, 32),
    ("in22k_vitg16.py", "vit_giant", 16, 224, 44, 3, 16, 16),
]


@pytest.mark.parametrize("filename,model,patch,crop,epochs,warmup,pred_depth,per_gpu", REFERENCE_YAML)
def test_reference_hyperparameters(filename, model, patch, crop, epochs, warmup, pred_depth, per_gpu):
    """Each config reproduces its reference yaml: model, patch, crop, epochs, warmup, predictor depth,
    and the per-GPU batch, which sets how hard the reference's batch-minimum context cut bites
    (mask.auto_context_batch), plus the shared recipe."""
    c = get_config(filename)
    assert (c.model.name, c.model.patch_size, c.data.crop_size, c.optim.epochs) == (model, patch, crop, epochs)
    assert (c.optim.warmup_epochs, c.model.pred_depth, c.mask.auto_context_batch) == (warmup, pred_depth, per_gpu)
    assert_reference_recipe(c)


@pytest.mark.parametrize("arg,pred", [("vit_tiny", (6, 96)), ("vit_small", (6, 192))])
def test_cifar100_configs_validate_as_shipped(arg, pred):
    """cifar100.py:vit_tiny / :vit_small validate unchanged (8x8 grid, corrected masks, min_keep 4)."""
    c = get_config("cifar100.py", arg)
    config_lib.validate(c, num_devices=8)
    assert (c.model.name, c.model.patch_size, c.data.crop_size) == (arg, 4, 32)
    assert (c.model.pred_depth, c.model.pred_width) == pred
    assert c.data.source == "cifar100" and c.mask.mode == "corrected" and c.mask.min_keep == 4


@pytest.mark.parametrize("arg", ["vit_tiny", "vit_small"])
def test_tiny_imagenet_configs_read_64px_folders_on_the_cifar_grid(arg):
    """tiny_imagenet.py: 64px crops with patch 8 (the same 8x8 grid and recipe as CIFAR-100 at 32/4),
    JPEG class folders named on the command line, scored on val/."""
    c = get_config("tiny_imagenet.py", arg)
    with pytest.raises(ValueError, match=r"needs --config\.data\.root"):
        config_lib.validate(c, num_devices=8)
    c.data.root = "/tmp/tiny-imagenet-100cls"
    config_lib.validate(c, num_devices=8)
    assert (c.model.name, c.model.patch_size, c.data.crop_size) == (arg, 8, 64)
    assert c.data.source == "folder" and c.eval.test_split == "val"
    cifar = get_config("cifar100.py", arg)
    assert (c.optim.to_dict(), c.mask.to_dict()) == (cifar.optim.to_dict(), cifar.mask.to_dict())


@pytest.mark.parametrize("arg", ["1000", "2000"])
def test_in1k_subset_takes_the_per_class_cap(arg):
    """in1k_subset.py:N keeps N images per class of an ImageNet folder, ViT-S/16 at 224px, 10 epochs."""
    c = get_config("in1k_subset.py", arg)
    c.data.root = "/datasets/imagenet"
    config_lib.validate(c, num_devices=8)
    assert c.data.max_samples_per_class == int(arg) and c.data.source == "folder"
    assert (c.model.name, c.model.patch_size, c.data.crop_size, c.optim.epochs) == ("vit_small", 16, 224, 10)
    assert c.checkpoint.every_steps == int(arg) * 1000 // 256
    with pytest.raises(ValueError, match="images per class"):
        get_config("in1k_subset.py", "all")


def test_cifar100_default_arg_is_vit_tiny():
    """get_config() with no argument gives the vit_tiny config."""
    assert get_config("cifar100.py").to_dict() == get_config("cifar100.py", "vit_tiny").to_dict()


def test_cifar100_unknown_arg_raises():
    """An unknown model argument fails with the valid choices in the message."""
    with pytest.raises(ValueError, match="vit_small"):
        get_config("cifar100.py", "vit_base")


def test_cifar100_with_reference_masks_would_hang_and_is_rejected():
    """Reference masking defaults (min_keep 10) on CIFAR's 8x8 grid are rejected up front."""
    c = get_config("cifar100.py")
    c.mask.min_keep = 10
    with pytest.raises(ValueError, match="min_keep"):
        config_lib.validate(c, num_devices=8)


def test_small_config_validates():
    """The tests' own small config is valid."""
    config_lib.validate(small_config(), num_devices=8)


@pytest.mark.parametrize(
    "overrides,num_devices,fragments",
    [
        ({"data.crop_size": 30}, 8, ["data.crop_size=30", "model.patch_size=4", "crop of 28"]),
        ({"data.batch_size": 12}, 8, ["data.batch_size=12", "8 devices", "multiple of 8"]),
        ({"optim.loss": "l1"}, 8, ["optim.loss='l1'", "smooth_l1"]),
        ({"model.name": "vit_mega"}, 8, ["model.name='vit_mega'", "vit_tiny"]),
        ({"model.pred_width": 34}, 8, ["model.pred_width=34", "divisible by 4"]),  # sin-cos needs width % 4 == 0
        ({"model.name": "vit_tiny", "model.pred_width": 32}, 8, ["model.pred_width=32", "3 heads"]),
        ({"optim.warmup_epochs": 3}, 8, ["optim.warmup_epochs=3", "epochs"]),
        ({"data.source": "imagenet"}, 8, ["data.source='imagenet'", "synthetic"]),
        ({"model.dtype": "float64"}, 8, ["model.dtype='float64'", "bfloat16"]),
        ({"data.crop_scale": (0.5, 1.5)}, 8, ["data.crop_scale"]),
        ({"optim.ema": (1.0, 0.99)}, 8, ["optim.ema"]),
        ({"mask.min_keep": 4}, 8, ["mask.min_keep=4"]),  # small_config's target blocks have 4 patches
    ],
)
def test_validation_errors_name_key_and_fix(overrides, num_devices, fragments):
    """A bad value raises ValueError whose message names the key (and, where there is one, the fix)."""
    c = small_config(**overrides)
    with pytest.raises(ValueError) as e:
        config_lib.validate(c, num_devices=num_devices)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} missing from: {e.value}"


def test_batch_must_divide_over_processes():
    """The global batch must split evenly over processes, not only devices."""
    c = small_config(**{"data.batch_size": 8})
    config_lib.validate(c, num_devices=8, num_processes=2)
    c = small_config(**{"data.batch_size": 24})
    with pytest.raises(ValueError, match="not divisible by the 5 processes"):
        config_lib.validate(c, num_devices=8, num_processes=5)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"model.attention_impl": "cudnn"}, "bfloat16"),
        ({"eval.every_epochs": 1, "eval.monitor_protocols": "knn,probe"}, "monitor_protocols"),
        ({"mask.auto_context_batch": 0}, "auto_context_batch"),
        ({"eval.lowshot_variant": "last8"}, "lowshot_variant"),
        ({"model.remat_policy": "everything"}, "remat_policy"),
        ({"model.residual_dtype": "int8"}, "residual_dtype"),
        ({"mask.pad_multiple": 0}, "pad_multiple"),
        # cuDNN: odd padding would leave odd predictor lengths, which cuDNN cannot train with a mask on
        ({"model.attention_impl": "cudnn", "model.dtype": "bfloat16", "mask.pad_multiple": 1}, "pad_multiple=8"),
        # vit_micro has 2 heads: a predictor 36 wide has an 18-wide head, not a multiple of 8
        ({"model.attention_impl": "cudnn", "model.dtype": "bfloat16", "model.pred_width": 36}, "head dim"),
        # values that would make a run silently wrong or useless
        ({"optim.lr": 0.0}, r"optim\.lr=0\.0 must be > 0"),
        ({"optim.start_lr": -1e-4}, "start_lr"),
        ({"optim.final_weight_decay": -0.1}, "final_weight_decay"),
        ({"optim.b2": 1.0}, r"optim\.b2"),
        ({"optim.eps": 0.0}, r"optim\.eps"),
        ({"optim.ipe_scale": 0.0}, "ipe_scale"),
        ({"optim.var_cov_weight": -1.0}, r"optim\.var_cov_weight=-1\.0 must be >= 0"),
        ({"optim.sigreg_weight": -0.05}, r"optim\.sigreg_weight=-0\.05 must be >= 0"),
        ({"total_steps": 0}, "total_steps=0"),
        ({"eval.knn_temperature": 0.0}, "knn_temperature"),
        ({"eval.probe_epochs": 0}, "chance"),
        ({"eval.probe_lrs": ()}, "probe_lrs"),
        ({"eval.probe_weight_decays": (-1e-4,)}, "probe_weight_decays"),
        ({"eval.lowshot_per_class": (0, 5)}, "lowshot_per_class"),
        ({"eval.image_size": 0}, "image_size"),
    ],
)
def test_more_values_that_are_rejected_up_front(overrides, words):
    from conftest import small_config

    with pytest.raises(ValueError, match=words):
        config_lib.validate(small_config(**overrides), num_devices=8)


@pytest.mark.parametrize("filename", ["cifar100.py", "tiny_imagenet.py"])
def test_smoke_argument_gives_the_tiny_variant_of_the_same_config(filename):
    """'vit_small,smoke' keeps the config's data settings and swaps in the seconds-to-compile model."""
    full = get_config(filename, "vit_small")
    smoke = get_config(filename, "vit_small,smoke")
    assert smoke.model.name == "vit_micro" and smoke.data.crop_size == 16 and smoke.total_steps == 20
    assert (smoke.data.source, smoke.data.root) == (full.data.source, full.data.root)
    smoke.data.root = smoke.data.root or "/data"  # tiny_imagenet.py leaves the folder to the command line
    config_lib.validate(smoke, num_devices=8)
    with pytest.raises(ValueError, match="smoke"):
        get_config(filename, "vit_huge,smoke")


@pytest.mark.parametrize("filename, train_images", [("cifar100.py", 50_000), ("tiny_imagenet.py", 30_000)])
def test_the_small_scale_default_differs_from_the_reference_recipe_in_its_named_deviations(filename, train_images):
    """What ships (docs/results.md: the best setting found) against ',reference', one switch away.

    The deviations: fixed EMA 0.98, the variance/covariance term, CAPI's clustering targets, and
    batch 32 at the reference's lr per image (an eighth of the batch, an eighth of the lr), with a
    checkpoint every epoch either way.
    """
    from ijepa_jax import workdir

    shipped, reference = get_config(filename, "vit_tiny"), get_config(filename, "vit_tiny,reference")
    defaults = config_lib.default_config().optim
    assert tuple(shipped.optim.ema) == (0.98, 0.98) and shipped.optim.var_cov_weight == 1.0
    assert shipped.optim.target_clusters == 1024 and shipped.data.batch_size == 32
    assert tuple(reference.optim.ema) == (0.996, 1.0) == tuple(defaults.ema)  # the reference's
    assert (reference.optim.var_cov_weight, reference.optim.target_clusters) == (0.0, 0) == (
        defaults.var_cov_weight, defaults.target_clusters)
    assert reference.data.batch_size == 256
    assert shipped.optim.lr == pytest.approx(reference.optim.lr / 8)
    assert shipped.optim.start_lr == pytest.approx(reference.optim.start_lr / 8)
    assert shipped.checkpoint.every_steps == train_images // 32
    assert reference.checkpoint.every_steps == train_images // 256
    changed = workdir.differences(reference.to_dict(), shipped.to_dict())
    assert sorted(c.split(":")[0] for c in changed) == [
        "checkpoint.every_steps", "data.batch_size", "optim.ema", "optim.lr", "optim.start_lr",
        "optim.target_clusters", "optim.var_cov_weight"], changed
    both = get_config(filename, "vit_tiny,smoke,reference")
    assert both.model.name == "vit_micro" and both.optim.var_cov_weight == 0.0
    with pytest.raises(ValueError, match=",reference"):
        get_config(filename, "vit_tiny,refrence")


def test_in1k_subset_ships_the_small_scale_objective_at_batch_256():
    """in1k_subset.py:N has the small-scale configs' objective (fixed EMA 0.98, the variance/covariance
    term, CAPI's 1,024 clusters); ',reference' keeps the reference's; the batch is 256 either way."""
    from ijepa_jax import workdir

    shipped, reference = get_config("in1k_subset.py", "1000"), get_config("in1k_subset.py", "1000,reference")
    cifar = get_config("cifar100.py", "vit_tiny")
    for key in ("ema", "var_cov_weight", "target_clusters"):
        assert shipped.optim[key] == cifar.optim[key], key
    assert tuple(reference.optim.ema) == (0.996, 1.0)
    assert (reference.optim.var_cov_weight, reference.optim.target_clusters) == (0.0, 0)
    assert shipped.data.batch_size == reference.data.batch_size == 256
    changed = workdir.differences(reference.to_dict(), shipped.to_dict())
    assert sorted(c.split(":")[0] for c in changed) == ["optim.ema", "optim.target_clusters", "optim.var_cov_weight"]
    reference.data.root = "/datasets/imagenet"
    config_lib.validate(reference, num_devices=8)
    with pytest.raises(ValueError, match=",reference"):
        get_config("in1k_subset.py", "1000,refrence")
