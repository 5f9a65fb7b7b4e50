"""tools.input_benchmark's folder builder: ImageNet-sized JPEGs from a small ImageNet-layout folder."""

import os

from PIL import Image

from ijepa_jax.tools import input_benchmark


def test_make_imagenet_sized_folder_upscales_per_class(tmp_path):
    for c in ("n01", "n02"):
        (tmp_path / "src" / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), (40 * i, 90, 10)).save(tmp_path / "src" / "train" / c / f"{i}.jpg")
    n = input_benchmark.make_imagenet_sized_folder(str(tmp_path / "src"), str(tmp_path / "dst"), per_class=2)
    assert n == 4
    for c in ("n01", "n02"):
        names = sorted(os.listdir(tmp_path / "dst" / "train" / c))
        assert names == ["0.JPEG", "1.JPEG"]
        with Image.open(tmp_path / "dst" / "train" / c / names[0]) as im:
            assert im.size == (500, 375) and im.format == "JPEG"
