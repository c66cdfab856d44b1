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


def old_cut(images, labels, limit, test_images, test_labels, test_limit, holdout):
    """``load_splits``' cuts as they were applied to fully read splits, before it read only
    what it keeps: the reference the recorded experiments' data must keep matching."""
    train = (images, labels) if limit is None else (images[:limit], labels[:limit])
    keep = len(test_images) - holdout
    held = (test_images[keep:], test_labels[keep:]) if holdout else None
    test = (test_images[:keep], test_labels[:keep])
    if test_limit is not None:
        test = (test[0][:test_limit], test[1][:test_limit])
    return train, test, held


def assert_same(dataset, arrays):
    images, labels = arrays
    assert dataset.images.dtype == np.uint8 and dataset.labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.images, images)
    np.testing.assert_array_equal(dataset.labels, labels)


@pytest.fixture(scope="module")
def full_read(tfds_dir):
    """The first ``count`` records of a split (all of them with None), read as the loader used to
    read it: the whole split in one ``__getitems__`` call, in order, then cut. Record ``i`` of that
    read is record ``i`` of the source, so a reference that only cuts a prefix (a training split
    with a ``limit``) reads only the prefix: 6,001 of the 50,000 training images instead of all
    of them (about 30 s of decoding on this project's 2-core CPU). Cached per split, longest read
    kept."""
    import tensorflow_datasets as tfds

    cache = {}

    def read(split, count=None):
        held = cache.get(split)
        if held is None or (held[2] is not None and (count is None or count > held[2])):
            source = tfds.data_source("cifar10", split=split, data_dir=tfds_dir)
            n = len(source) if count is None else min(max(count, 1), len(source))
            records = source.__getitems__(list(range(n)))
            held = cache[split] = (
                np.stack([np.asarray(r["image"], np.uint8) for r in records]),
                np.asarray([r["label"] for r in records], np.int32),
                None if n == len(source) else n)
        return held[:2]

    return read


@pytest.mark.cifar
@pytest.mark.parametrize("train_split, test_split, limit, test_limit, holdout, seed", [
    ("train", "test", 6001, None, 0, 0),  # the run that read all 50,000 training images
    ("test", "test", None, None, 0, 0),
    ("test", "test", 6001, 2000, 500, 3),
    ("test", "test", 0, 12000, 9990, 1),  # nothing kept; more asked than there is
    ("test[2000:5000]", "test[:4000]", 777, None, 3500, 0),  # sliced splits
])
def test_tfds_reads_only_what_it_keeps_and_keeps_what_a_full_read_kept(
        tfds_dir, full_read, train_split, test_split, limit, test_limit, holdout, seed):
    new = load_splits("tfds", name="cifar10", data_dir=tfds_dir, train_split=train_split,
                      test_split=test_split, limit=limit, test_limit=test_limit,
                      holdout=holdout, seed=seed)
    # the training split's reference needs only its first ``limit`` records (``old_cut``)
    train, test, held = old_cut(*full_read(train_split, limit), limit, *full_read(test_split),
                                test_limit, holdout)
    assert_same(new.train, train)
    assert_same(new.test, test)
    assert new.train.name == f"cifar10/{train_split}" and new.test.name == f"cifar10/{test_split}"
    if holdout:
        assert_same(new.holdout, held)
        assert new.holdout.name == f"cifar10/{test_split}/holdout"
    else:
        assert new.holdout is None


@pytest.mark.cifar
def test_tfds_decodes_only_the_kept_records(tfds_dir, monkeypatch):
    from fdjax.data import sources

    source, num_classes = sources._open_tfds("cifar10", "test", tfds_dir, False)
    read = []

    class Counting:
        def __len__(self):
            return len(source)

        def __getitem__(self, i):
            read.append(i)
            return source[i]

        def __getitems__(self, keys):
            read.extend(keys)
            return source.__getitems__(keys)

    monkeypatch.setattr(sources, "_open_tfds", lambda *args: (Counting(), num_classes))
    sources._read_tfds.cache_clear()
    try:
        splits = load_splits("tfds", data_dir=tfds_dir, train_split="test", limit=30,
                             test_limit=20, holdout=10)
    finally:
        sources._read_tfds.cache_clear()  # entries read through the counting source
    assert sorted(read) == sorted([*range(30), *range(20), *range(9990, 10000)])
    assert (len(splits.train), len(splits.test), len(splits.holdout)) == (30, 20, 10)


def test_image_folder_cuts_match_a_full_read_and_decode_only_kept_images(tmp_path):
    write_folder(tmp_path, "train", ["a", "b", "c"], per_class=4)
    write_folder(tmp_path, "test", ["a", "b", "c"], per_class=5)
    full_train = load_image_folder(tmp_path, "train")
    full_test = load_image_folder(tmp_path, "test", ["a", "b", "c"])
    new = load_splits("folder", root=str(tmp_path), limit=5, test_limit=4, holdout=6)
    train, test, held = old_cut(full_train.images, full_train.labels, 5, full_test.images,
                                full_test.labels, 4, 6)
    assert_same(new.train, train)
    assert_same(new.test, test)
    assert_same(new.holdout, held)
    # a damaged image (header intact) past the limit is never decoded, so it is no error
    last = tmp_path / "train" / "c" / "3.png"
    png = last.read_bytes()
    last.write_bytes(png[:png.index(b"IDAT") + 8])  # pixel data cut short
    assert_same(load_splits("folder", root=str(tmp_path), limit=5).train, train)
    with pytest.raises(DataError, match="cannot read image"):
        load_splits("folder", root=str(tmp_path))
