"""Dataset sources, all returning numpy arrays in one contract.

Every source returns an ``ArrayDataset``: ``images`` uint8 ``[N, H, W, C]``, ``labels`` int32 ``[N]``
(or ``None`` for an unlabeled set) and ``num_classes``. Sources:

* ``"embedded"``: scikit-learn's handwritten digits (1,797 images, 8x8x1, 10 classes), shipped
  inside the installed scikit-learn package. It is the offline default: it needs no network and
  no prepared data, so ``fdjax`` runs on a fresh machine.
* ``"tfds"``: any image-classification dataset prepared for TensorFlow Datasets, read through
  the TensorFlow-free ``tfds.data_source`` (array_record format). Nothing is downloaded unless
  ``download=True``.
* ``"folder"``: ``root/<split>/<class name>/*.png|jpg|jpeg``; classes are the sorted folder names.
* ``"synthetic"``: class-dependent random patterns, learnable, for tests and benchmarks.

``load_splits`` learns each split's size first and then reads only the examples its ``limit``,
``test_limit`` and ``holdout`` keep (tfds records by random access, image files by name), the same
examples in the same order as reading everything and cutting it would give. Decoding is what
reading costs: a run that kept 6,001 of CIFAR-10's 50,000 training images used to decode them all.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SOURCES = ("embedded", "tfds", "folder", "synthetic")
#: The source a run's config records when its data was handed in from Python
#: (``fdjax.run(config, data=...)``): nothing fdjax can load again.
CALLER = "caller"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A dataset cannot be found, read or used as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Images and labels held as numpy arrays.

    Attributes:
        images: uint8 ``[N, H, W, C]``.
        labels: int32 ``[N]`` class ids, or ``None`` where labels were dropped.
        num_classes: number of classes of the task (not only those present).
        name: where the data came from, for messages and reports.
    """

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int
    name: str = "dataset"

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 [N, H, W, C], got "
                            f"{self.images.dtype} {self.images.shape}")
        if self.labels is not None:
            if self.labels.shape != (self.images.shape[0],):
                raise DataError(f"{self.name}: {self.labels.shape[0]} labels for "
                                f"{self.images.shape[0]} images")
            if self.labels.size and (self.labels.min() < 0
                                     or self.labels.max() >= self.num_classes):
                raise DataError(f"{self.name}: labels must lie in [0, {self.num_classes})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: Sequence[int] | np.ndarray, keep_labels: bool = True,
               name: str | None = None) -> "ArrayDataset":
        """The examples at ``index``, labels kept or dropped."""
        index = np.asarray(index, dtype=np.int64)
        labels = self.labels[index] if (keep_labels and self.labels is not None) else None
        return ArrayDataset(self.images[index], labels, self.num_classes, name or self.name)

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"images": ..., "labels": ...}`` (labels only where kept)."""
        out = {"images": self.images}
        if self.labels is not None:
            out["labels"] = self.labels
        return out


@dataclasses.dataclass(frozen=True)
class Splits:
    """A dataset's train and test splits, and an optional labeled holdout cut from the test split.

    ``holdout`` is the tail of the test split that ``test`` never contains: a labeled
    validation set a server may decide by without touching the images results are measured on.
    """

    train: ArrayDataset
    test: ArrayDataset
    holdout: ArrayDataset | None = None


def load_embedded(test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's digits as 8x8x1 uint8 images, split train/test deterministically."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the embedded dataset needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    full = ArrayDataset(images, labels, 10, "digits")
    return Splits(full.subset(order[n_test:], name="digits/train"),
                  full.subset(order[:n_test], name="digits/test"))


def _prepare_hint(name: str, data_dir: str | None) -> str:
    where = f" --data_dir {data_dir}" if data_dir else ""
    return (f"prepare it with `tfds build {name} --file_format=array_record{where}` on a machine "
            f"with internet, pass data_dir= pointing at a prepared TFDS data directory, or pass "
            f"download=True")


@functools.lru_cache(maxsize=8)
def _open_tfds(name: str, split: str, data_dir: str | None, download: bool) -> tuple[Any, int]:
    """The split's random-access ``tfds.data_source`` and its number of classes (cached).

    Opening reads only metadata, so a caller learns the split's size before it reads any image
    and can then read just the records it keeps.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - a dependency
        raise DataError("the tfds source needs tensorflow-datasets: pip install "
                        "tensorflow-datasets") from err
    try:
        tfds.builder_cls(name.split(":")[0])
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataError(f"unknown tfds dataset {name!r}; see the TFDS catalog for names") from err
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"tfds data_dir {data_dir!r} does not exist; " + _prepare_hint(name, data_dir))
    if not download:
        root = Path(data_dir) if data_dir else Path(os.path.expanduser("~/tensorflow_datasets"))
        if not any(root.glob(f"{name.split(':')[0]}/*/dataset_info.json")) and \
                not any(root.glob(f"{name.split(':')[0]}/*/*/dataset_info.json")):
            raise DataError(f"tfds dataset {name!r} is not prepared under {str(root)!r}; "
                            + _prepare_hint(name, data_dir))
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as err:
        raise DataError(f"cannot read tfds dataset {name!r} split {split!r} from "
                        f"{data_dir!r}: {str(err).splitlines()[0]}; "
                        + _prepare_hint(name, data_dir)) from err
    features = source.dataset_info.features
    if "image" not in features or "label" not in features:
        raise DataError(f"tfds dataset {name!r} has no 'image' and 'label' features")
    if len(source) == 0:
        raise DataError(f"tfds dataset {name!r} split {split!r} has no examples")
    return source, int(features["label"].num_classes)


@functools.lru_cache(maxsize=16)
def _read_tfds(name: str, split: str, data_dir: str | None, download: bool, start: int,
               stop: int) -> ArrayDataset:
    """Records ``start`` to ``stop`` of a tfds split, decoded (cached per process, read-only).

    Decoding every image is what reading costs, so callers read only the records they keep;
    record ``i`` decodes to the same image whatever else is read with it.
    """
    source, num_classes = _open_tfds(name, split, data_dir, download)
    records = source.__getitems__(list(range(start, stop)))
    if records:
        images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    else:  # an empty range still has the split's image shape
        images = np.asarray(source[0]["image"], np.uint8)[None][:0]
    labels = np.asarray([r["label"] for r in records], np.int32).reshape(len(records))
    if images.ndim == 3:
        images = images[..., None]
    images.setflags(write=False)
    labels.setflags(write=False)
    return ArrayDataset(images, labels, num_classes, f"{name}/{split}")


#: The environment variable that names a prepared TFDS data directory.
TFDS_DIR_VARIABLE = "FDJAX_TFDS_DIR"


def default_tfds_dir() -> str:
    """``$FDJAX_TFDS_DIR``, else ``shared/data/tfds`` beside the checkout fdjax runs from.

    One place for the tests and the CIFAR-10 experiments to find a prepared TFDS directory
    (nothing is downloaded). "Beside the checkout" holds for an editable install (``pip install
    -e .``); with any other install, set the variable or pass the directory.
    """
    checkout = Path(__file__).resolve().parents[2]
    return os.environ.get(TFDS_DIR_VARIABLE, str(checkout.parent / "shared" / "data" / "tfds"))


def load_tfds(name: str, split: str, data_dir: str | None = None, download: bool = False,
              limit: int | None = None) -> ArrayDataset:
    """Reads a tfds image-classification split into memory (cached per process).

    Args:
        name: tfds dataset name, e.g. ``"cifar10"``.
        split: ``"train"``, ``"test"``, ...
        data_dir: the TFDS data directory (default ``~/tensorflow_datasets``).
        download: let tfds download and prepare the data if it is missing.
        limit: keep only the first ``limit`` examples; only those are read.

    Raises:
        DataError: unknown dataset, missing data directory or unprepared dataset, with the fix.
    """
    lazy = _tfds_split(name, split, data_dir, bool(download))
    return lazy.read(0, _kept(limit, lazy.size))


@dataclasses.dataclass(frozen=True)
class _LazySplit:
    """A split whose size is known before any image is decoded.

    ``read(start, stop)`` decodes examples ``start`` to ``stop`` only, so cutting ``limit``,
    ``test_limit`` and ``holdout`` ranges before reading keeps exactly the examples a full read
    followed by the same cuts would keep, without decoding the rest.
    """

    size: int
    read: Callable[[int, int], ArrayDataset]
    name: str

    @classmethod
    def of(cls, dataset: ArrayDataset) -> "_LazySplit":
        """A split already in memory (embedded, synthetic)."""
        return cls(len(dataset), lambda start, stop: dataset.subset(np.arange(start, stop)),
                   dataset.name)


def _kept(limit: int | None, size: int) -> int:
    """How many leading examples of ``size`` a ``limit`` keeps (``None``: all)."""
    return size if limit is None else max(0, min(limit, size))


def _tfds_split(name: str, split: str, data_dir: str | None, download: bool) -> _LazySplit:
    source, _ = _open_tfds(name, split, data_dir, download)
    return _LazySplit(len(source), functools.partial(_read_tfds, name, split, data_dir, download),
                      f"{name}/{split}")


def load_image_folder(root: str | os.PathLike, split: str,
                      classes: Sequence[str] | None = None) -> ArrayDataset:
    """Reads ``root/<split>/<class>/*.png|jpg|jpeg``; every image must have the same size.

    Images are converted to RGB unless every one is single-channel ("L").
    ``classes`` fixes the class order (default: sorted folder names of this split), so train and
    test splits can share it.
    """
    lazy = _folder_split(root, split, classes)
    return lazy.read(0, lazy.size)


def _folder_split(root: str | os.PathLike, split: str,
                  classes: Sequence[str] | None = None) -> _LazySplit:
    """``load_image_folder``'s split, checked from the image headers, decoded on ``read``.

    Every image's header is read (cheap) so that the mode and the size check cover the whole
    split, as a full read would; only the images read are decoded.
    """
    from PIL import Image

    base = Path(root) / split
    if not base.is_dir():
        raise DataError(f"image folder {str(base)!r} does not exist; expected "
                        f"<root>/<split>/<class>/*.png")
    names = list(classes) if classes is not None else sorted(
        p.name for p in base.iterdir() if p.is_dir())
    if len(names) < 2:
        raise DataError(f"image folder {str(base)!r} needs at least 2 class folders, found "
                        f"{len(names)}")
    files = [(f, label) for label, cls in enumerate(names) for f in sorted((base / cls).glob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no .png/.jpg images under {str(base)!r}")
    headers = []
    for path, _ in files:
        try:
            with Image.open(path) as im:  # reads the header only
                headers.append((im.mode, im.size))
        except OSError as err:  # unreadable, or not an image (PIL's errors name the file)
            raise DataError(f"cannot read image: {err}") from err
    (width, height) = headers[0][1]
    for (path, _), (_, size) in zip(files, headers):
        if size != (width, height):
            raise DataError(f"{path} is {size[0]}x{size[1]} but the first image is "
                            f"{width}x{height}; resize them to one size")
    mode = "L" if all(m == "L" for m, _ in headers) else "RGB"
    shape = (height, width, 1 if mode == "L" else 3)

    def read(start: int, stop: int) -> ArrayDataset:
        chosen = files[start:stop]
        images = np.empty((len(chosen),) + shape, np.uint8)
        for i, (path, _) in enumerate(chosen):
            try:
                with Image.open(path) as im:
                    images[i] = np.asarray(im.convert(mode), np.uint8).reshape(shape)
            except OSError as err:  # a truncated or damaged image
                raise DataError(f"cannot read image {str(path)!r}: {err}") from err
        labels = np.asarray([label for _, label in chosen], np.int32).reshape(len(chosen))
        return ArrayDataset(images, labels, len(names),
                            f"{Path(root).name}/{split}")

    return _LazySplit(len(files), read, f"{Path(root).name}/{split}")


def load_synthetic(num_examples: int, image_shape: Sequence[int] = (16, 16, 3),
                   num_classes: int = 10, seed: int = 0, split: int = 0,
                   noise: float = 40.0) -> ArrayDataset:
    """Learnable random data: each class is a fixed random image, plus per-example noise.

    ``seed`` fixes the class images, ``split`` the examples drawn from them, so splits with the
    same seed and different ``split`` share one task.
    """
    if num_examples < 1 or num_classes < 2:
        raise DataError("synthetic data needs num_examples >= 1 and num_classes >= 2")
    prototypes = np.random.default_rng(seed).uniform(40, 215,
                                                     size=(num_classes,) + tuple(image_shape))
    rng = np.random.default_rng([seed, split])
    labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
    images = prototypes[labels] + rng.normal(0, noise, size=(num_examples,) + tuple(image_shape))
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return ArrayDataset(images, labels, num_classes, "synthetic")


def load_splits(source: str = "embedded", *, name: str = "cifar10", data_dir: str | None = None,
                download: bool = False, root: str | None = None, train_split: str = "train",
                test_split: str = "test", limit: int | None = None, test_limit: int | None = None,
                holdout: int = 0, synthetic_shape: Sequence[int] = (16, 16, 3),
                num_classes: int = 10, seed: int = 0) -> Splits:
    """Loads train and test splits from any source (see the module docstring).

    Args:
        source: "embedded", "tfds", "folder" or "synthetic".
        name: tfds dataset name (source "tfds").
        data_dir: TFDS data directory (source "tfds").
        download: allow tfds to download (source "tfds").
        root: image-folder root (source "folder").
        train_split, test_split: split names (sources "tfds" and "folder").
        limit: keep at most this many training examples (the first ones).
        test_limit: keep at most this many test examples (of those left after ``holdout``).
        holdout: cut this many labeled examples from the end of the test split into
            ``Splits.holdout``; ``test`` keeps only examples before them, so the two never overlap.
        synthetic_shape, num_classes, seed: for source "synthetic" (and the embedded split seed).
    """
    if source == "embedded":
        splits = load_embedded(seed=seed)
        train, test = _LazySplit.of(splits.train), _LazySplit.of(splits.test)
    elif source == "tfds":
        train = _tfds_split(name, train_split, data_dir, bool(download))
        test = _tfds_split(name, test_split, data_dir, bool(download))
    elif source == "folder":
        if not root:
            raise DataError("the folder source needs root=<directory with <split>/<class>/ images>")
        train = _folder_split(root, train_split)
        classes = sorted(p.name for p in (Path(root) / train_split).iterdir() if p.is_dir())
        test = _folder_split(root, test_split, classes)
    elif source == "synthetic":
        splits = _synthetic_splits(limit, test_limit, holdout, synthetic_shape, num_classes, seed)
        train, test = _LazySplit.of(splits.train), _LazySplit.of(splits.test)
    else:
        raise DataError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
    return _cut(train, test, limit, test_limit, holdout)


def _synthetic_splits(limit: int | None, test_limit: int | None, holdout: int,
                      shape: Sequence[int], num_classes: int, seed: int) -> Splits:
    """Synthetic train and test splits of the sizes asked for (the test split with its holdout
    drawn apart, so that the evaluated test images do not change with it)."""
    n = limit or 2000
    test = load_synthetic(test_limit or max(n // 5, 1), shape, num_classes, seed, split=1)
    if holdout:
        extra = load_synthetic(holdout, shape, num_classes, seed, split=2)
        test = ArrayDataset(np.concatenate([test.images, extra.images]),
                            np.concatenate([test.labels, extra.labels]), num_classes, test.name)
    return Splits(load_synthetic(n, shape, num_classes, seed, split=0), test)


def _cut(train: _LazySplit, test: _LazySplit, limit: int | None, test_limit: int | None,
         holdout: int) -> Splits:
    """Reads the first ``limit`` training examples, the test examples before the ``holdout``
    tail (the first ``test_limit`` of them) and the tail, and nothing else."""
    if holdout and (holdout < 0 or holdout >= test.size):
        raise DataError(f"a holdout of {holdout} examples leaves none of the {test.size} "
                        f"test examples ({test.name}) to evaluate on")
    keep = test.size - holdout if holdout else test.size
    held = None
    if holdout:
        tail = test.read(keep, test.size)
        held = dataclasses.replace(tail, name=f"{test.name}/holdout")
    return Splits(train.read(0, _kept(limit, train.size)),
                  test.read(0, _kept(test_limit, keep)), held)
