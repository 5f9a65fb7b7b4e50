"""Augmentation on the accelerator (data.augment_on='device', ijepa_jax/data/device_augment.py): the
same crop boxes and flips as the host path for the same seed, and the same pixels as PIL, batch for
batch, resumed or not; in-memory sources and the settings it refuses."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from PIL import Image

from ijepa_jax import config_lib, sharding, train
from ijepa_jax.data import device_augment, sources, transforms


def pil_crops(images, boxes, flips, size):
    """The oracle: PIL's crop + bilinear resize of each box, mirrored where asked."""
    out = []
    for image, (top, left, h, w), flip in zip(images, boxes, flips):
        crop = np.asarray(Image.fromarray(image[top : top + h, left : left + w]).resize((size, size), Image.BILINEAR))
        out.append(crop[:, ::-1] if flip else crop)
    return np.stack(out)


@pytest.mark.parametrize(
    "height,width,size",
    [(32, 32, 32), (64, 64, 64), (40, 56, 16), (90, 60, 24), (20, 20, 48), (21, 18, 16), (30, 70, 32)],
)
def test_crops_equal_pil_for_random_boxes_up_and_down_and_mixed(height, width, size):
    """Every pixel equals PIL's, for upscales (CIFAR, Tiny-ImageNet), downscales with antialiasing, boxes
    that shrink one axis and grow the other, and mirrored crops."""
    rng = np.random.default_rng(height * width + size)
    images = rng.integers(0, 256, (48, height, width, 3), dtype=np.uint8)
    boxes = [transforms.random_resized_crop_box(np.random.default_rng(i), height, width, (0.05, 1.0)) for i in range(48)]
    flips = rng.random(48) < 0.5
    got = device_augment.crop_resize_flip(jnp.asarray(images), jnp.asarray(boxes), jnp.asarray(flips), size)
    np.testing.assert_array_equal(np.asarray(got), pil_crops(images, boxes, flips, size))


def test_a_constant_box_resizes_to_the_same_constant():
    """Fixed-point weights sum to one: a flat image stays flat at every scale (no drift at 255)."""
    images = np.full((3, 50, 50, 3), 255, np.uint8)
    boxes = jnp.asarray([[0, 0, 50, 50], [3, 7, 9, 40], [10, 10, 2, 2]])
    out = device_augment.crop_resize_flip(jnp.asarray(images), boxes, jnp.zeros(3, bool), 32)
    assert np.all(np.asarray(out) == 255)


def test_shrinking_by_15x_or_more_and_sources_over_2048_pixels_are_refused():
    with pytest.raises(ValueError, match="less than 15x.*augment_on=host"):
        device_augment.check_sizes(480, 320, 32)
    with pytest.raises(ValueError, match="at most 2048 pixels a side, not 2049x1000"):
        device_augment.check_sizes(2049, 1000, 224)
    device_augment.check_sizes(2048, 2048, 224)  # the largest it takes


def both_paths(**overrides):
    """Experiments of one config on the host and on the device path."""
    host = train.build(small_config(**overrides))
    device = train.build(small_config(**{**overrides, "data.augment_on": "device"}))
    return host, device


def assert_same_batches(host, device, n, start_batch=0):
    with train.train_batches(host, start_batch) as a, train.train_batches(device, start_batch) as b:
        for i in range(n):
            x, y = next(a), next(b)
            assert set(x) == set(y), f"batch {i}: keys {sorted(x)} vs {sorted(y)}"
            for key in x:
                np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=f"batch {i} {key}")
            assert y["images"].sharding.is_equivalent_to(sharding.batch_sharding(device.mesh), 4)


def test_device_batches_equal_host_batches_from_the_start_and_after_a_resume():
    """Same seed, same boxes, same flips, same pixels and masks, over two epochs (8 steps each) of 8
    devices, also starting at batch 5 as a resumed run does."""
    host, device = both_paths(**{"data.use_horizontal_flip": True, "data.crop_scale": (0.1, 1.0)})
    assert_same_batches(host, device, 16)
    assert_same_batches(host, device, 3, start_batch=5)


def test_training_on_the_device_path_gives_the_host_paths_losses(tmp_path):
    """End to end: the same images reach the step, so the same config trains to the same metrics."""
    results = []
    for mode in ("host", "device"):
        config = small_config(**{"data.augment_on": mode, "data.use_horizontal_flip": True, "total_steps": 4})
        results.append(train.train(config, str(tmp_path / mode)))
    assert results[0]["loss"] == results[1]["loss"] and np.isfinite(results[0]["loss"])


def test_real_cifar100_device_batches_equal_host_batches(shared_data):
    """The real archive (32px sources, 32px crops: upscales), a 10-per-class subset."""
    host, device = both_paths(**{
        "data.source": "cifar100", "data.root": shared_data, "data.max_samples_per_class": 10,
        "data.crop_size": 32, "data.use_horizontal_flip": True, "model.patch_size": 8,
    })
    assert_same_batches(host, device, 4)


def test_real_tiny_imagenet_folder_device_batches_equal_host_batches(tiny_imagenet):
    """Real JPEGs, decoded once into memory: 64px sources cropped to 32px (down- and upscales)."""
    host, device = both_paths(**{
        "data.source": "folder", "data.root": tiny_imagenet, "data.max_samples_per_class": 3,
        "data.crop_size": 32, "model.patch_size": 8,
    })
    assert device.source.images.shape == (len(host.source), 64, 64, 3)
    assert_same_batches(host, device, 4)


class MixedSizes:
    labels, class_names = np.zeros(3, np.int32), ["a"]

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"image": np.zeros((8 + (i == 2), 8, 3), np.uint8), "label": 0}


def test_in_memory_source_refuses_mixed_sizes_and_too_large_datasets():
    with pytest.raises(ValueError, match=r"one size: record 2 is \(9, 8, 3\).*augment_on=host"):
        sources.InMemoryImages.load(MixedSizes())
    with pytest.raises(ValueError, match=r"need .* GiB.*augment_on=host"):
        sources.InMemoryImages.load(MixedSizes(), max_bytes=100)


def test_in_memory_source_keeps_the_skipped_count_of_unreadable_files(tmp_path):
    """A corrupt JPEG is replaced by the next image at load time and still counted, as on the host."""
    for i in range(4):
        path = tmp_path / "train" / "cls" / f"{i}.jpg"
        os.makedirs(path.parent, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(path)
    (tmp_path / "train" / "cls" / "1.jpg").write_bytes(b"not a jpeg")
    data = small_config(**{"data.source": "folder", "data.root": str(tmp_path), "data.augment_on": "device"}).data
    memory = sources.make_pretrain_source(data)
    assert memory.skipped.tolist() == [0, 1, 0, 0]
    assert memory.images[1, 0, 0, 0] == memory.images[2, 0, 0, 0] == 120
    assert memory[1] == {"index": 1, "skipped": 1}


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"data.augment_on": "gpu"}, "augment_on='gpu'; use 'host' or 'device'"),
        ({"data.augment_on": "device", "data.use_color_distortion": True}, "colour distortion and blur run on the host"),
        ({"data.augment_on": "device", "data.use_gaussian_blur": True}, "data.use_gaussian_blur=False"),
    ],
)
def test_settings_the_device_path_cannot_run_are_refused_up_front(overrides, match):
    with pytest.raises(ValueError, match=match):
        config_lib.validate(small_config(**overrides), jax.device_count())
