"""XLA settings fdjax applies before JAX starts its CPU backend, each chosen by measurement.

On a machine with few cores, XLA CPU's multi-threaded Eigen convolutions were 2.4x *slower* than
single-threaded ones for fdjax's CNNs (2 cores: about 90 against 220 training images/s for
``cnn6``; ``experiments/bench_local_training.py --xla-study`` measures it). fdjax therefore turns
Eigen's intra-op threading off when the machine has at most 4 cores, unless the user has set that
flag in ``XLA_FLAGS`` already or set ``FDJAX_XLA_DEFAULTS=0``. The flag only touches the CPU
backend, and XLA reads ``XLA_FLAGS`` when the backend starts, so this must run before the first
JAX computation; ``fdjax/__init__`` calls it on import.
"""

from __future__ import annotations

import os

EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"
MAX_CORES = 4


def apply() -> bool:
    """Adds fdjax's CPU defaults to ``XLA_FLAGS``; returns whether anything was added."""
    if os.environ.get("FDJAX_XLA_DEFAULTS", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if EIGEN_FLAG in flags or (os.cpu_count() or 1) > MAX_CORES:
        return False
    os.environ["XLA_FLAGS"] = (flags + f" {EIGEN_FLAG}=false").strip()
    return True
