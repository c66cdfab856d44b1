"""Dataset sources: embedded default, tfds, image folders, synthetic data; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdjax.data import (DataError, default_tfds_dir, load_image_folder, load_splits,
                        load_synthetic, load_tfds)


def test_embedded_default_needs_no_network_or_files():
    splits = load_splits()
    assert splits.train.images.shape[1:] == (8, 8, 1) and splits.train.images.dtype == np.uint8
    assert len(splits.train) + len(splits.test) == 1797 and splits.train.num_classes == 10
    assert splits.train.images.max() > 200  # rescaled from 0..16 to 0..255
    again = load_splits()
    np.testing.assert_array_equal(splits.test.labels, again.test.labels)


def test_synthetic_splits_share_one_task():
    splits = load_splits("synthetic", limit=300, synthetic_shape=(8, 8, 3), num_classes=4)
    assert len(splits.train) == 300 and len(splits.test) == 60
    for cls in range(4):  # class means of train and test lie close: the same prototypes
        a = splits.train.images[splits.train.labels == cls].mean(0)
        b = splits.test.images[splits.test.labels == cls].mean(0)
        assert np.abs(a - b).mean() < 20


def rows(images):
    return {img.tobytes() for img in images}


@pytest.mark.parametrize("source, extra", [
    ("embedded", {}),  # no test_limit: evaluation keeps every test image before the holdout
    ("synthetic", {"limit": 300, "test_limit": 50, "synthetic_shape": (8, 8, 3)}),
])
def test_a_holdout_is_labeled_cut_from_the_test_split_and_never_evaluated(source, extra):
    plain = load_splits(source, **extra)
    split = load_splits(source, holdout=40, **extra)
    assert len(split.holdout) == 40 and split.holdout.labels.shape == (40,)
    assert not rows(split.holdout.images) & rows(split.test.images)  # disjoint
    np.testing.assert_array_equal(split.train.images, plain.train.images)
    if source == "embedded":  # the holdout is the tail of the one test split
        assert len(split.test) == len(plain.test) - 40
        np.testing.assert_array_equal(split.holdout.images, plain.test.images[-40:])
    else:  # drawn apart, so the evaluated images are the same with or without it
        np.testing.assert_array_equal(split.test.images, plain.test.images)
    assert plain.holdout is None


def test_a_holdout_that_leaves_nothing_to_evaluate_is_an_error():
    size = len(load_splits().test)
    with pytest.raises(DataError, match=f"leaves none of the {size} test examples"):
        load_splits(holdout=size)


def write_folder(root, split, classes, size=(10, 12), mode="RGB", per_class=3):
    for cls in classes:
        (root / split / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full(size[::-1] + ((3,) if mode == "RGB" else ()), 30 * i, np.uint8)
            Image.fromarray(pixels, mode).save(root / split / cls / f"{i}.png")


def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    write_folder(tmp_path, "train", ["cat", "ant"])
    write_folder(tmp_path, "test", ["cat", "ant"], per_class=1)
    splits = load_splits("folder", root=str(tmp_path))
    assert splits.train.images.shape == (6, 12, 10, 3)
    assert list(splits.train.labels) == [0, 0, 0, 1, 1, 1]  # "ant" first
    assert splits.test.num_classes == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path, "train")
    write_folder(tmp_path, "train", ["a", "b"], mode="L")
    Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(tmp_path / "train" / "b" / "odd.png")
    with pytest.raises(DataError, match="resize them to one size"):
        load_image_folder(tmp_path, "train")


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError, match="tfds build cifar10"):
        load_tfds("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_tfds("cifar10", "train", data_dir=str(tmp_path / "nowhere"))


def test_unknown_source_and_bad_synthetic_settings():
    with pytest.raises(DataError, match="unknown data source"):
        load_splits("kaggle")
    with pytest.raises(DataError):
        load_synthetic(0)


def test_one_setting_names_the_tfds_directory(monkeypatch):
    monkeypatch.delenv("FDJAX_TFDS_DIR", raising=False)
    checkout = Path(__file__).resolve().parents[2]
    assert default_tfds_dir() == str(checkout.parent / "shared" / "data" / "tfds")
    monkeypatch.setenv("FDJAX_TFDS_DIR", "/data/tfds")
    assert default_tfds_dir() == "/data/tfds"


@pytest.mark.cifar
def test_cifar10_through_tfds_data_source(tfds_dir):
    test = load_tfds("cifar10", "test", tfds_dir, limit=500)
    assert test.images.shape == (500, 32, 32, 3) and test.num_classes == 10
    assert set(np.unique(test.labels)) == set(range(10))
    with pytest.raises(DataError, match="unknown tfds dataset"):
        load_tfds("cifar1000", "test", tfds_dir)
