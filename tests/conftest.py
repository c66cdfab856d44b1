"""Shared fixtures: the prepared CIFAR-10 TFDS directory and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: One setting locates the prepared TFDS directory; the default is the checkout's sibling.
TFDS_DIR = os.environ.get(
    "FDJAX_TFDS_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tfds"))


@pytest.fixture(scope="session")
def tfds_dir() -> str:
    if not (Path(TFDS_DIR) / "cifar10").is_dir():
        pytest.skip(f"prepared CIFAR-10 TFDS directory not found at {TFDS_DIR} "
                    f"(set FDJAX_TFDS_DIR)")
    return TFDS_DIR
