"""Image sources (ijepa_jax/data/sources.py): CIFAR-100 python archive reader and the synthetic source.

Unit tests build a tiny archive in the official layout (see shared/data/README.md):
tar.gz members cifar-100-python/{train,test,meta}; pickle protocol 2 with bytes keys;
b'data' uint8 (N, 3072) = 1024 red, 1024 green, 1024 blue values, row-major 32x32.
"""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from conftest import skip_without_real_data
from ijepa_jax.data import sources


def known_images(n, offset=0):
    """n distinct uint8 (32, 32, 3) images: pixel (y, x, c) = (offset + 7i + 3y + 5x + 101c) % 256."""
    i, y, x, c = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((offset + 7 * i + 3 * y + 5 * x + 101 * c) % 256).astype(np.uint8)


def to_rows(images):
    """HWC images -> official rows (R plane, then G, then B), written out explicitly."""
    rows = np.empty((len(images), 3072), np.uint8)
    for k, img in enumerate(images):
        rows[k, :1024] = img[:, :, 0].reshape(-1)
        rows[k, 1024:2048] = img[:, :, 1].reshape(-1)
        rows[k, 2048:] = img[:, :, 2].reshape(-1)
    return rows


def split_entry(images, fine, coarse):
    return {
        b"batch_label": b"training batch 1 of 1",
        b"data": to_rows(images),
        b"fine_labels": list(fine),
        b"coarse_labels": list(coarse),
    }


TRAIN_N, TEST_N = 12, 5
TRAIN_FINE = [(7 * i) % 100 for i in range(TRAIN_N)]
TEST_FINE = [99 - i for i in range(TEST_N)]


def members():
    meta = {b"fine_label_names": [b"class%d" % i for i in range(100)], b"coarse_label_names": [b"super%d" % i for i in range(20)]}
    return {
        "train": pickle.dumps(split_entry(known_images(TRAIN_N), TRAIN_FINE, [f // 5 for f in TRAIN_FINE]), protocol=2),
        "test": pickle.dumps(split_entry(known_images(TEST_N, offset=50), TEST_FINE, [0] * TEST_N), protocol=2),
        "meta": pickle.dumps(meta, protocol=2),
    }


def write_archive(path):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members().items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_folder(parent):
    folder = os.path.join(parent, "cifar-100-python")
    os.makedirs(folder)
    for name, data in members().items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return folder


@pytest.fixture
def archive(tmp_path):
    """Path of a generated cifar-100-python.tar.gz (12 train / 5 test images)."""
    return write_archive(tmp_path / "cifar-100-python.tar.gz")


@pytest.fixture
def folder(tmp_path):
    """Path of a generated, extracted cifar-100-python/ folder."""
    return write_folder(str(tmp_path))


# --------------------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize("layout", ["archive_path", "folder_with_archive", "extracted_folder", "folder_with_extracted"])
def test_cifar100_reads_every_supported_root(tmp_path, layout):
    """data.root may be the .tar.gz, the folder holding it, the extracted folder, or the folder holding that."""
    if layout == "archive_path":
        root = write_archive(tmp_path / "cifar-100-python.tar.gz")
    elif layout == "folder_with_archive":
        write_archive(tmp_path / "cifar-100-python.tar.gz")
        root = str(tmp_path)
    elif layout == "extracted_folder":
        root = write_folder(str(tmp_path))
    else:
        write_folder(str(tmp_path))
        root = str(tmp_path)
    train = sources.Cifar100Source(root, "train")
    test = sources.Cifar100Source(root, "test")
    assert (len(train), len(test)) == (TRAIN_N, TEST_N)
    np.testing.assert_array_equal(np.stack([train[i]["image"] for i in range(TRAIN_N)]), known_images(TRAIN_N))
    np.testing.assert_array_equal(np.stack([test[i]["image"] for i in range(TEST_N)]), known_images(TEST_N, 50))


def test_cifar100_archive_with_other_name(tmp_path):
    """A root that names a .tar.gz is read as the archive whatever the file is called."""
    root = write_archive(tmp_path / "c100-copy.tar.gz")
    assert len(sources.Cifar100Source(root)) == TRAIN_N


def test_cifar100_pixels_are_red_green_blue_planes(archive):
    """Row layout: first 1024 values are the red plane (row-major), then green, then blue -> HWC."""
    src = sources.Cifar100Source(archive)
    img = src[3]["image"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    y, x = 4, 9  # a pixel away from the diagonal catches a transposed H/W
    assert tuple(img[y, x]) == tuple((7 * 3 + 3 * y + 5 * x + 101 * c) % 256 for c in range(3))
    rows = to_rows(known_images(TRAIN_N))
    assert img[0, 1, 0] == rows[3, 1] and img[1, 0, 0] == rows[3, 32]
    assert img[0, 0, 1] == rows[3, 1024] and img[0, 0, 2] == rows[3, 2048]


def test_cifar100_labels_are_fine_labels(archive):
    """'label' is the fine (100-class) label as a Python int; class names come from meta."""
    train = sources.Cifar100Source(archive, "train")
    test = sources.Cifar100Source(archive, "test")
    assert [train[i]["label"] for i in range(TRAIN_N)] == TRAIN_FINE
    assert [test[i]["label"] for i in range(TEST_N)] == TEST_FINE
    assert all(type(train[i]["label"]) is int for i in range(TRAIN_N))
    assert train.class_names == [f"class{i}" for i in range(100)]


def test_cifar100_missing_root_names_the_path(tmp_path):
    """A root without the archive or folder raises FileNotFoundError that names the root."""
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.Cifar100Source(missing)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        sources.Cifar100Source(str(tmp_path))  # exists but holds nothing


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_cifar100_corrupt_archive_raises_value_error(archive, damage):
    """A truncated, non-gzip or empty archive fails at construction with a ValueError that says corrupt."""
    raw = open(archive, "rb").read()
    damaged = {"truncated": raw[: len(raw) // 2], "garbage": b"not a tarball" * 100, "empty": b""}[damage]
    with open(archive, "wb") as f:
        f.write(damaged)
    with pytest.raises(ValueError, match="corrupt"):
        sources.Cifar100Source(archive)


def test_cifar100_truncated_extracted_file_raises_value_error(folder):
    """An incomplete extracted 'train' pickle is reported as corrupt, not as an EOFError."""
    path = os.path.join(folder, "train")
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="corrupt"):
        sources.Cifar100Source(folder)


def test_cifar100_damaged_pickle_header_raises_value_error(folder):
    """Damaged bytes inside the pickle (here the module name of the pixel array's class) are reported as a
    corrupt file (ValueError), like any other unreadable archive, not as an import/attribute error."""
    path = os.path.join(folder, "train")
    raw = open(path, "rb").read()
    assert b"numpy" in raw, "the generated pickle stores b'data' as a numpy array, as the official one does"
    with open(path, "wb") as f:
        f.write(raw.replace(b"numpy", b"nump\x00", 1))
    with pytest.raises(ValueError, match="corrupt"):
        sources.Cifar100Source(folder)


def test_cifar100_wrong_layout_raises_value_error(folder):
    """A pickle that is not a CIFAR split dict (wrong shape) raises ValueError naming the layout problem."""
    with open(os.path.join(folder, "train"), "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(ValueError, match="layout"):
        sources.Cifar100Source(folder)


def test_cifar100_unknown_split_raises(archive):
    """Only 'train' and 'test' exist; 'val' raises ValueError that names data.split."""
    with pytest.raises(ValueError, match="data.split"):
        sources.Cifar100Source(archive, "val")


def test_cifar100_pickles_without_pixels_and_reloads(archive):
    """Pickling the source (as grain does for worker processes) drops the pixel array; an element read
    after unpickling re-reads the file and is identical."""
    src = sources.Cifar100Source(archive)
    before = src[5]
    blob = pickle.dumps(src)
    assert len(blob) < TRAIN_N * 3072 / 2, "pixels were pickled"
    clone = pickle.loads(blob)
    assert clone._images is None
    assert len(clone) == TRAIN_N
    after = clone[5]
    np.testing.assert_array_equal(after["image"], before["image"])
    assert after["label"] == before["label"]
    assert src._images is not None, "pickling must not drop the original's pixels"


def test_cifar100_real_archive(shared_data):
    """The shared archive (read in place): 50,000 train / 10,000 test uint8 32x32x3 images over 100
    classes, 500 / 100 per class. Skipped when shared/data is absent."""
    archive = os.path.join(shared_data, "cifar-100-python.tar.gz")
    if not os.path.isfile(archive):
        skip_without_real_data(f"{archive} not found")
    train = sources.Cifar100Source(shared_data, "train")
    test = sources.Cifar100Source(archive, "test")
    assert (len(train), len(test)) == (50_000, 10_000)
    for src, per_class in ((train, 500), (test, 100)):
        labels = np.array([src[i]["label"] for i in range(len(src))])
        np.testing.assert_array_equal(np.bincount(labels, minlength=100), per_class)
        for i in (0, len(src) - 1):
            img = src[i]["image"]
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert img.std() > 0, "a real photo is not constant"


# --------------------------------------------------------------------------- synthetic


def test_synthetic_source_shape_labels_and_determinism():
    """uint8 (s, s, 3) images, label = index % classes, identical across instances with the same seed."""
    a = sources.SyntheticSource(num_images=25, image_size=12, num_classes=7, seed=3)
    b = sources.SyntheticSource(num_images=25, image_size=12, num_classes=7, seed=3)
    assert len(a) == 25
    for i in (0, 6, 7, 24):
        ea, eb = a[i], b[i]
        assert ea["image"].shape == (12, 12, 3) and ea["image"].dtype == np.uint8
        assert ea["label"] == i % 7
        np.testing.assert_array_equal(ea["image"], eb["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"]), "images must differ between indices"
    other = sources.SyntheticSource(num_images=25, image_size=12, num_classes=7, seed=4)
    assert not np.array_equal(a[0]["image"], other[0]["image"]), "the seed must change the images"


@pytest.mark.parametrize("index", [25, 100, -1])
def test_synthetic_source_index_out_of_range(index):
    """Indices outside [0, len) raise IndexError (no silent wrap-around of negative indices)."""
    with pytest.raises(IndexError):
        sources.SyntheticSource(num_images=25, image_size=8)[index]



def _serve(monkeypatch, payload=None, error=None):
    """Make urlopen return `payload` or raise `error` (no network in tests)."""
    import urllib.error

    from ijepa_jax.data import cifar100

    def fake_urlopen(url, timeout):
        if error is not None:
            raise urllib.error.URLError(error)
        return io.BytesIO(payload)

    monkeypatch.setattr(cifar100.urllib.request, "urlopen", fake_urlopen)
    return cifar100


def test_missing_archive_is_downloaded_and_checksummed(tmp_path, monkeypatch):
    """With download=True a missing archive is fetched into root and verified before use."""
    import hashlib

    src_archive = tmp_path / "served.tar.gz"
    write_archive(str(src_archive))
    payload = src_archive.read_bytes()
    cifar100 = _serve(monkeypatch, payload)
    monkeypatch.setattr(cifar100, "CIFAR100_MD5", hashlib.md5(payload).hexdigest())
    root = tmp_path / "root"
    src = cifar100.Cifar100Source(str(root), "train", download=True)
    assert len(src) == TRAIN_N and (root / "cifar-100-python.tar.gz").is_file()


def test_download_with_a_wrong_checksum_keeps_nothing(tmp_path, monkeypatch):
    cifar100 = _serve(monkeypatch, b"not the archive")
    with pytest.raises(ValueError, match="md5"):
        cifar100.Cifar100Source(str(tmp_path), "train", download=True)
    assert not list(tmp_path.iterdir())


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    """No network: a FileNotFoundError that names the folder and the archive to copy there."""
    cifar100 = _serve(monkeypatch, error="no route to host")
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz") as e:
        cifar100.Cifar100Source(str(tmp_path), "train", download=True)
    assert str(tmp_path) in str(e.value) and "no route to host" in str(e.value)
    assert not list(tmp_path.iterdir())
