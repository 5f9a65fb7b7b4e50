"""TfdsSource: prepared TFDS datasets (ArrayRecord) read by random access without TensorFlow.

The test datasets are prepared here, without TensorFlow: uint8 Tensor features
need no encoding, and an Image feature accepts already-encoded bytes or a PIL
image (only numpy arrays would go through TensorFlow's PNG encoder).
"""

import io
import json
import pickle
import shutil

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ijepa_jax.data.tfds_source import TfdsSource
from ijepa_jax.data.transforms import BadImageError

NAMES = ["cat", "dog", "eel"]
CORRUPT = 3  # the encoded dataset's record with this label holds bytes that are not an image


def rgb(i):
    """The 8x8x3 test image of example i: every pixel distinct, i recoverable from pixel [0, 0, 0]."""
    return ((np.arange(8 * 8 * 3).reshape(8, 8, 3) + 7 * i) % 256).astype(np.uint8)


def small_rgb(i):
    """A 5x7 image (not square, distinct per example) for the encoded dataset."""
    return ((np.arange(5 * 7 * 3).reshape(5, 7, 3) * (i + 2)) % 256).astype(np.uint8)


def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class IjepaTestArrays(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """uint8 Tensor images: RGB, grayscale (H, W, 1) and (H, W), RGBA; a named and an unnamed label."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
            "gray": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "flat": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
            "rgba": tfds.features.Tensor(shape=(8, 8, 4), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=NAMES),
            "plain_label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(6)), "test": self._generate_examples(range(6, 8))}

    def _generate_examples(self, indices):
        for i in indices:
            image = rgb(i)
            yield i, {"image": image, "gray": image[..., :1], "flat": image[..., 0],
                      "rgba": np.concatenate([image, np.full((8, 8, 1), 99, np.uint8)], -1),
                      "label": i % 3, "plain_label": i % 4}


class IjepaTestEncoded(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """PNG images as a tfds Image feature and as a bytes Tensor; record CORRUPT is not an image."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="png"),
            "png_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.ClassLabel(num_classes=4),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            data = b"not an image" if i == CORRUPT else png(small_rgb(i))
            # The Image feature takes encoded bytes or a PIL image without TensorFlow.
            image = Image.fromarray(small_rgb(i)) if i == 1 else data
            yield i, {"image": image, "png_bytes": data, "label": i}


@pytest.fixture(autouse=True)
def no_user_cache(tmp_path, monkeypatch):
    """Label caches go beside the test datasets or under tmp_path, never into ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data_dir holding both test datasets, prepared once for this module."""
    root = str(tmp_path_factory.mktemp("tfds"))
    for builder in (IjepaTestArrays, IjepaTestEncoded):
        builder(data_dir=root, file_format="array_record").download_and_prepare()
    return root


def test_uint8_tensor_images_and_labels_round_trip(data_dir):
    """Every record's pixels and label come back exactly, as uint8 (H, W, 3) and int."""
    src = TfdsSource("ijepa_test_arrays", "train", data_dir)
    assert len(src) == 6
    seen = set()
    for k in range(len(src)):
        rec = src[k]
        i = int(rec["image"][0, 0, 0]) // 7  # TFDS shuffles records: identify the example by its pixels
        assert rec["image"].dtype == np.uint8 and np.array_equal(rec["image"], rgb(i))
        assert isinstance(rec["label"], int) and rec["label"] == i % 3
        seen.add(i)
    assert seen == set(range(6))
    assert len(TfdsSource("ijepa_test_arrays", "test", data_dir)) == 2
    assert len(TfdsSource("ijepa_test_arrays", "train[:4]", data_dir)) == 4  # TFDS split slicing works


@pytest.mark.parametrize("key", ["gray", "flat", "rgba"])
def test_grayscale_and_rgba_tensors_become_rgb(data_dir, key):
    """(H, W, 1) and (H, W) repeat into three channels; (H, W, 4) drops alpha."""
    src = TfdsSource("ijepa_test_arrays", "train", data_dir, image_key=key)
    rgb_src = TfdsSource("ijepa_test_arrays", "train", data_dir)
    image, reference = src[0]["image"], rgb_src[0]["image"]
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    expected = reference if key == "rgba" else np.repeat(reference[..., :1], 3, axis=-1)
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("key", ["image", "png_bytes"])
def test_encoded_images_are_decoded_from_bytes(data_dir, key):
    """An Image feature and a bytes Tensor are both decoded from their PNG bytes, exactly."""
    src = TfdsSource("ijepa_test_encoded", "train", data_dir, image_key=key)
    good = [k for k in range(len(src)) if k != _index_of_label(src, CORRUPT)]
    assert len(good) == 3
    for k in good:
        rec = src[k]
        assert np.array_equal(rec["image"], small_rgb(rec["label"]))


@pytest.mark.parametrize("key", ["image", "png_bytes"])
def test_corrupt_record_raises_bad_image_error_naming_it(data_dir, key):
    """Undecodable bytes raise BadImageError naming dataset/split[index], for SkipBadImages to handle."""
    src = TfdsSource("ijepa_test_encoded", "train", data_dir, image_key=key)
    k = _index_of_label(src, CORRUPT)
    with pytest.raises(BadImageError, match=rf"ijepa_test_encoded/train\[{k}\]"):
        src[k]


def test_labels_and_class_names(data_dir):
    """`labels` is every record's label (int32, cached); `class_names` are the ClassLabel names."""
    src = TfdsSource("ijepa_test_arrays", "train", data_dir)
    assert src.labels.dtype == np.int32
    assert list(src.labels) == [src[k]["label"] for k in range(len(src))]
    assert sorted(src.labels) == [0, 0, 1, 1, 2, 2]
    assert src.labels is src.labels
    assert src.class_names == NAMES and src.num_classes == 3


def test_labels_skip_image_decoding(data_dir):
    """Reading `labels` decodes no image: the corrupt record does not stop it."""
    src = TfdsSource("ijepa_test_encoded", "train", data_dir)
    assert sorted(src.labels) == [0, 1, 2, 3]


def test_class_names_of_a_label_without_names(data_dir):
    """A plain integer label gets class names "0" .. str(max label)."""
    src = TfdsSource("ijepa_test_arrays", "train", data_dir, label_key="plain_label")
    assert src.class_names == ["0", "1", "2", "3"]
    assert sorted(src.labels) == [0, 0, 1, 1, 2, 3]


def test_pickles_without_its_reader_and_reopens(data_dir):
    """A pickled source (as sent to grain workers) carries no open reader and re-opens on first access."""
    src = TfdsSource("ijepa_test_encoded", "train", data_dir)
    first = src[0]
    clone = pickle.loads(pickle.dumps(src))
    assert clone._source is None
    assert len(clone) == len(src)
    again = clone[0]
    assert np.array_equal(again["image"], first["image"]) and again["label"] == first["label"]


def test_works_in_a_grain_pipeline(data_dir):
    """grain.MapDataset.source(...).batch(2) yields stacked uint8 images and labels."""
    src = TfdsSource("ijepa_test_arrays", "train", data_dir)
    batches = list(grain.MapDataset.source(src).batch(2))
    assert len(batches) == 3
    assert batches[0]["image"].shape == (2, 8, 8, 3) and batches[0]["image"].dtype == np.uint8
    assert sorted(np.concatenate([b["label"] for b in batches])) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(name="no_such_dataset"), FileNotFoundError, ["'no_such_dataset'", "not found", "tfds build", "data_dir"]),
        (dict(data_dir="MISSING"), FileNotFoundError, ["does not exist", "tfds build", "tfds_data_dir"]),
        (dict(name="cifar100", data_dir="EMPTY"), FileNotFoundError, ["not prepared", "tfds build cifar100"]),
        (dict(split="validation"), ValueError, ["'validation'", "Available splits", "'test'", "'train'"]),
        (dict(image_key="jpeg"), ValueError, ["'jpeg'", "'gray'", "'image'", "image_key"]),
        (dict(label_key="fine_label"), ValueError, ["'fine_label'", "'plain_label'", "label_key"]),
        (dict(image_key="label"), ValueError, ["'label'", "expected a uint8 Image"]),
    ],
    ids=["unknown-name", "missing-data-dir", "not-prepared", "unknown-split", "no-image-key", "no-label-key",
         "label-as-image"],
)
def test_clear_errors(data_dir, tmp_path, kwargs, error, words):
    """Setup mistakes raise one clear error naming the dataset, split and data_dir, and what to do."""
    args = {"name": "ijepa_test_arrays", "split": "train", "data_dir": data_dir, **kwargs}
    if args["data_dir"] == "MISSING":
        args["data_dir"] = str(tmp_path / "missing")
    elif args["data_dir"] == "EMPTY":
        args["data_dir"] = str(tmp_path)
    with pytest.raises(error) as info:
        TfdsSource(**args)
    message = str(info.value)
    assert "\n" not in message  # not tfds's list of every registered dataset
    for word in [repr(args["name"]), repr(args["split"]), args["data_dir"], *words]:
        assert word in message, (word, message)


def test_dataset_prepared_without_random_access_is_refused(data_dir, tmp_path):
    """A dataset prepared as TFRecord (the tfds default) is an error that says to re-prepare as array_record."""
    shutil.copytree(f"{data_dir}/ijepa_test_arrays", tmp_path / "ijepa_test_arrays")
    info_path = tmp_path / "ijepa_test_arrays" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))  # preparing TFRecord would need TensorFlow
    with pytest.raises(ValueError, match="prepared as tfrecord.*no random access.*--file_format=array_record"):
        TfdsSource("ijepa_test_arrays", "train", str(tmp_path))


def _index_of_label(src, label):
    return int(np.flatnonzero(src.labels == label)[0])


# ----------------------------------------------------------------------------
# the label cache: one pass over the records per dataset, split and label key


class CountingReads:
    """Counts batched record reads (what collecting labels does) on a source's reader."""

    def __init__(self, src):
        self.reads, reader = 0, src._reader
        original = reader.__getitems__

        def counted(indices):
            self.reads += 1
            return original(indices)

        reader.__getitems__ = counted


@pytest.fixture
def own_data_dir(data_dir, tmp_path):
    """A private copy of the prepared datasets without label caches (they are written beside them)."""
    return shutil.copytree(data_dir, tmp_path / "tfds", ignore=shutil.ignore_patterns("ijepa_jax_labels_*"))


def test_labels_are_read_once_then_loaded_from_a_cache_beside_the_dataset(own_data_dir):
    first = TfdsSource("ijepa_test_arrays", "train", str(own_data_dir))
    reads = CountingReads(first)
    expected = [first[k]["label"] for k in range(len(first))]
    assert list(first.labels) == expected and reads.reads == 1
    beside, _ = first.label_cache_paths()
    assert beside.startswith(first._dataset_dir)

    again = TfdsSource("ijepa_test_arrays", "train", str(own_data_dir))
    reads = CountingReads(again)
    assert list(again.labels) == expected and again.labels.dtype == np.int32
    assert reads.reads == 0
    # Another split or label key is another file.
    other = TfdsSource("ijepa_test_arrays", "train", str(own_data_dir), label_key="plain_label")
    assert sorted(other.labels) == [0, 0, 1, 1, 2, 3]
    assert sorted(TfdsSource("ijepa_test_arrays", "test", str(own_data_dir)).labels) == [0, 1]


def test_a_cache_of_another_record_count_is_ignored(own_data_dir):
    src = TfdsSource("ijepa_test_arrays", "train", str(own_data_dir))
    beside, _ = src.label_cache_paths()
    np.save(beside, np.zeros(5, np.int32))  # e.g. written for an older version of the split
    assert sorted(src.labels) == [0, 0, 1, 1, 2, 2]
    assert np.load(beside).tolist() == src.labels.tolist()  # and replaced


def test_a_read_only_dataset_caches_labels_in_the_user_cache(own_data_dir, tmp_path, monkeypatch):
    src = TfdsSource("ijepa_test_arrays", "train", str(own_data_dir))
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # a folder that cannot be created stands for an unwritable dataset folder
    _, user = src.label_cache_paths()
    monkeypatch.setattr(TfdsSource, "label_cache_paths", lambda self: [str(blocked / "labels.npy"), user])
    assert sorted(src.labels) == [0, 0, 1, 1, 2, 2]
    assert user.startswith(str(tmp_path / "user_cache")) and np.load(user).tolist() == src.labels.tolist()
    again = TfdsSource("ijepa_test_arrays", "train", str(own_data_dir))
    reads = CountingReads(again)
    assert sorted(again.labels) == [0, 0, 1, 1, 2, 2] and reads.reads == 0


def test_pretraining_on_a_whole_split_reads_no_labels(own_data_dir):
    """Without a class subset the pipeline never needs labels: no pass over the records at start-up."""
    import ml_collections

    from ijepa_jax.data import sources

    data = ml_collections.ConfigDict(dict(
        source="tfds", tfds_name="ijepa_test_arrays", tfds_data_dir=str(own_data_dir), split="train",
        classes="", max_samples_per_class=0, on_bad_image="skip",
    ))
    src = sources.make_source(data)
    reads = CountingReads(src.source)
    assert len(src) == 6 and src[0]["image"].shape == (8, 8, 3)
    assert reads.reads == 0 and "labels" not in vars(src.source)
