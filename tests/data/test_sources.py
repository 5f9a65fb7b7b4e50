"""make_source: the configured source, class-balanced subsets, and bad images skipped or failed."""

import numpy as np
import pytest

from conftest import small_config
from ijepa_jax.data import sources
from ijepa_jax.data.transforms import BadImageError


class LabelledSource:
    """Records whose image is their index; `bad` indices raise BadImageError."""

    def __init__(self, labels, bad=()):
        self.labels = np.asarray(labels, np.int32)
        self.class_names = [f"c{i}" for i in range(self.labels.max() + 1)]
        self.bad = set(bad)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if i in self.bad:
            raise BadImageError(f"file{i}.jpg: broken")
        return {"image": np.full((2, 2, 3), i, np.uint8), "label": int(self.labels[i])}


def test_select_indices_is_balanced_deterministic_and_seeded():
    """At most n per class, every class present, same seed same choice, other seed other choice."""
    labels = np.repeat(np.arange(5), [10, 3, 10, 10, 7])
    a = sources.select_indices(labels, max_per_class=4, seed=0)
    counts = np.bincount(labels[a], minlength=5)
    assert list(counts) == [4, 3, 4, 4, 4]
    assert np.array_equal(a, sources.select_indices(labels, 4, seed=0))
    assert not np.array_equal(a, sources.select_indices(labels, 4, seed=1))
    assert np.all(np.diff(a) > 0)


def test_select_indices_per_class_choice_does_not_depend_on_other_classes():
    """Picking classes {0, 2} gives the same records of class 2 as picking all classes."""
    labels = np.repeat(np.arange(3), 20)
    all_classes = sources.select_indices(labels, 5, seed=3)
    two = sources.select_indices(labels, 5, class_ids=[0, 2], seed=3)
    assert set(two) == {i for i in all_classes if labels[i] in (0, 2)}


def test_subset_relabels_kept_classes_contiguously():
    """A subset of classes [3, 1] has labels 0..1 in that order and matching class names."""
    src = LabelledSource(np.repeat(np.arange(4), 2))
    sub = sources.Subset(src, sources.select_indices(src.labels, 0, [3, 1]), np.array([3, 1]))
    assert sub.class_names == ["c3", "c1"] and len(sub) == 4
    assert sorted(sub.labels.tolist()) == [0, 0, 1, 1]
    assert [sub[i]["label"] for i in range(4)] == sub.labels.tolist()
    assert {int(sub[i]["image"][0, 0, 0]) for i in range(4)} == {2, 3, 6, 7}


def test_skip_bad_images_replaces_by_the_next_readable_record_and_counts():
    """A bad record is replaced deterministically by the next one; `skipped` says how many were passed."""
    src = sources.SkipBadImages(LabelledSource(np.zeros(6), bad={2, 3}))
    rec = src[2]
    assert rec["skipped"] == 2 and int(rec["image"][0, 0, 0]) == 4
    assert src[0]["skipped"] == 0
    wrapped = sources.SkipBadImages(LabelledSource(np.zeros(3), bad={2}))
    assert int(wrapped[2]["image"][0, 0, 0]) == 0  # wraps around the end


def test_skip_bad_images_fail_mode_raises_with_the_file_and_the_switch():
    src = sources.SkipBadImages(LabelledSource(np.zeros(4), bad={1}), fail=True)
    with pytest.raises(BadImageError, match=r"file1\.jpg.*on_bad_image"):
        src[1]


def test_a_dataset_of_only_bad_images_stops_instead_of_looping():
    src = sources.SkipBadImages(LabelledSource(np.zeros(200), bad=set(range(200))))
    with pytest.raises(BadImageError, match="consecutive unreadable"):
        src[0]


def test_make_source_applies_classes_and_max_samples_per_class():
    """data.classes and data.max_samples_per_class restrict the synthetic source (10 classes x 6)."""
    d = small_config(**{"data.synthetic_images": 60}).data
    assert len(sources.make_source(d)) == 60
    d.max_samples_per_class = 2
    assert len(sources.make_source(d)) == 20
    d.classes = "class3,class7"
    src = sources.make_source(d)
    assert len(src) == 4 and src.class_names == ["class3", "class7"]
    assert "4 images of 2 classes (2-2 per class)" == sources.describe(src)


def test_make_source_reads_the_class_list_from_a_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("class1\nclass2\n\n")
    d = small_config(**{"data.classes": str(path)}).data
    assert sources.make_source(d).class_names == ["class1", "class2"]


def test_unknown_class_names_are_an_error_listing_them():
    d = small_config(**{"data.classes": "class1,nonsense"}).data
    with pytest.raises(ValueError, match="nonsense"):
        sources.make_source(d)


def test_make_source_builds_a_folder_source(tmp_path):
    from test_image_folder import make_folder

    d = small_config(**{"data.source": "folder", "data.root": make_folder(tmp_path, per_class=2)}).data
    src = sources.make_source(d)
    assert len(src) == 4 and src.class_names == ["cat", "dog"] and src[0]["skipped"] == 0
