"""ImageFolderSource: ROOT/<split>/<class>/<image>, as ImageNet users hold it."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from ijepa_jax.data.image_folder import ImageFolderSource
from ijepa_jax.data.transforms import BadImageError


def write_image(path, value, mode="RGB", fmt="JPEG", size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path, fmt)


def make_folder(root, classes=("cat", "dog"), per_class=3, split="train"):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(os.path.join(root, split, name, f"{name}_{i}.JPEG"), (40 * c, 80, 120))
    return str(root)


def test_scans_classes_in_sorted_order_with_labels(tmp_path):
    """Classes are the sorted sub-folders; labels index them; records decode to uint8 RGB."""
    root = make_folder(tmp_path, classes=("zebra", "ant"), per_class=2)
    src = ImageFolderSource(root, "train")
    assert src.class_names == ["ant", "zebra"] and len(src) == 4
    assert list(src.labels) == [0, 0, 1, 1]
    rec = src[3]
    assert rec["label"] == 1 and rec["image"].dtype == np.uint8 and rec["image"].shape == (10, 12, 3)


def test_grayscale_palette_and_rgba_files_become_rgb(tmp_path):
    """Files in other colour modes (as ImageNet's grayscale JPEGs) are converted to 3-channel RGB."""
    write_image(str(tmp_path / "train/a/gray.jpg"), 90, mode="L")
    write_image(str(tmp_path / "train/a/pal.png"), 3, mode="P", fmt="PNG")
    write_image(str(tmp_path / "train/a/rgba.png"), (1, 2, 3, 4), mode="RGBA", fmt="PNG")
    src = ImageFolderSource(str(tmp_path), "train")
    assert all(src[i]["image"].shape == (10, 12, 3) for i in range(3))


def test_non_image_files_are_ignored_and_counted(tmp_path):
    """A README or .txt in a class folder is not a record; the count is kept for the log."""
    root = make_folder(tmp_path, per_class=2)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    src = ImageFolderSource(root, "train")
    assert len(src) == 4 and src.num_ignored_files == 1


def test_corrupt_and_empty_files_raise_bad_image_error_naming_the_path(tmp_path):
    """Truncated and zero-byte images are records that fail to decode (SkipBadImages handles them)."""
    root = make_folder(tmp_path, per_class=1)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "train" / "cat" / "trunc.JPEG").write_bytes(buf.getvalue()[:60])
    (tmp_path / "train" / "dog" / "empty.JPEG").write_bytes(b"")
    src = ImageFolderSource(root, "train")
    bad = [i for i, p in enumerate(src.paths) if os.path.basename(p) in ("trunc.JPEG", "empty.JPEG")]
    assert len(bad) == 2
    for i in bad:
        with pytest.raises(BadImageError, match=os.path.basename(src.paths[i])):
            src[i]


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing_root", "not a readable folder"),
        ("missing_split", "No 'train' split"),
        ("no_classes", "no class folders"),
        ("empty_class", "hold no images"),
    ],
)
def test_structural_problems_are_errors_at_start_up(tmp_path, setup, match):
    """Problems with the layout fail in the constructor with the path in the message."""
    root = tmp_path / "data"
    if setup != "missing_root":
        root.mkdir()
    if setup == "missing_split":
        (root / "val").mkdir()
    if setup == "no_classes":
        (root / "train").mkdir()
    if setup == "empty_class":
        make_folder(root, per_class=1)
        (root / "train" / "empty_class").mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match=match) as e:
        ImageFolderSource(str(root), "train")
    assert str(root) in str(e.value)


def test_real_tiny_imagenet_folder(tiny_imagenet):
    """The shared Tiny-ImageNet subset: 100 classes x 300 train JPEGs, grayscale files included."""
    src = ImageFolderSource(tiny_imagenet, "train")
    assert len(src) == 30000 and len(src.class_names) == 100
    assert np.all(np.bincount(src.labels) == 300)
    assert src[0]["image"].shape == (64, 64, 3)
