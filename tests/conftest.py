"""Shared fixtures: the prepared CIFAR-10 TFDS directory and small models."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdjax.data import TFDS_DIR_VARIABLE, default_tfds_dir

#: One setting locates the prepared TFDS directory; the default is the checkout's sibling.
TFDS_DIR = default_tfds_dir()


@pytest.fixture(scope="session")
def tfds_dir() -> str:
    if not (Path(TFDS_DIR) / "cifar10").is_dir():
        pytest.skip(f"prepared CIFAR-10 TFDS directory not found at {TFDS_DIR} "
                    f"(set {TFDS_DIR_VARIABLE})")
    return TFDS_DIR
