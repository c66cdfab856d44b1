"""Robust aggregation rules: they bound what a few bad client models can do to the result.

FedAvg lets one client move the average anywhere. These rules work on the same stacked trees
(leading client axis) and give up a little efficiency for a guarantee:

* ``coordinate_median`` and ``trimmed_mean`` (Yin et al., 2018): coordinate by coordinate, while
  fewer than half (median) or at most the trimmed count (trimmed mean) of the clients are bad,
  the result lies within the range of the good clients' values.
* ``krum_scores`` / ``krum_selection`` (Blanchard et al., 2017): with ``n`` clients of which at
  most ``f`` are Byzantine and ``n > 2f + 2``, Krum picks the client whose ``n - f - 2`` nearest
  neighbours are nearest (squared L2 distance over all parameters); Multi-Krum keeps the ``m``
  best-scored ones and averages them (``fdjax.core.aggregation.aggregate`` does the averaging).

``fdjax.core.aggregation.aggregate`` picks a rule by name.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fdjax.core.coordinatewise import coordinatewise


def coordinate_median(stacked: Any) -> Any:
    """Coordinate-wise median over the leading (client) axis (Yin et al., 2018).

    Unweighted: a client cannot buy influence by claiming more examples. While fewer than half of
    the clients are bad, every coordinate of the result lies within the range of the good clients'
    values, however large the bad ones are. Unlike ``fedavg`` it is not computed around client 0's
    model: that client may be the bad one, and differences from a huge model would wipe out the
    good ones' digits.
    """
    return coordinatewise(lambda values: jnp.median(values, axis=0), stacked)


def trimmed_count(num_clients: int, trim_fraction: float) -> int:
    """How many values ``trimmed_mean`` drops at each end: ``floor(trim_fraction * n)``."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return int(math.floor(trim_fraction * num_clients))


def trimmed_mean(stacked: Any, trim_fraction: float = 0.1) -> Any:
    """Coordinate-wise trimmed mean over the leading (client) axis (Yin et al., 2018).

    For each coordinate, drops the ``k = floor(trim_fraction * clients)`` smallest and ``k`` largest
    client values and averages the rest (unweighted). With ``k >= b``, ``b`` bad clients cannot
    move any coordinate outside the range of the good clients' values. ``trim_fraction`` must be a
    static Python float under ``jit``.
    """
    leaves = jax.tree_util.tree_leaves(stacked)
    n = int(leaves[0].shape[0]) if leaves else 0
    k = trimmed_count(n, trim_fraction)

    def one(values):
        # Around the median, a robust centre: small differences keep their digits whatever the
        # outliers are, and identical client models come back bit for bit.
        centre = jnp.median(values, axis=0)
        kept = jnp.sort(values - centre[None], axis=0)[k:n - k]
        return centre + jnp.mean(kept, axis=0)

    return coordinatewise(one, stacked)


def krum_neighbours(num_clients: int, num_byzantine: int) -> int:
    """How many nearest neighbours a Krum score sums: ``max(1, n - f - 2)``.

    Blanchard et al. need ``n > 2f + 2`` for their guarantee; below that the score still ranks
    clients (as Flower's ``aggregate_krum`` does), without it.
    """
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    return max(1, num_clients - num_byzantine - 2)


def pairwise_sq_distances(stacked: Any) -> jax.Array:
    """``[n, n]`` squared L2 distances between the clients' whole models, in float32.

    Computed from differences, one row at a time (memory ``n`` models, not ``n^2``): the
    ``|a|^2 + |b|^2 - 2ab`` shortcut would cancel away the distance between two models that
    are close to each other and far from zero, which is every pair of honest clients.
    """
    flat = jnp.concatenate([leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
                            for leaf in jax.tree_util.tree_leaves(stacked)], axis=1)
    return jax.lax.map(lambda row: jnp.sum(jnp.square(flat - row[None]), axis=1), flat)


def krum_scores(stacked: Any, num_byzantine: int) -> jax.Array:
    """Each client's Krum score: the sum of its squared distances to its ``n - f - 2`` nearest
    other clients (itself excluded, ties broken by index)."""
    distances = pairwise_sq_distances(stacked)
    n = distances.shape[0]
    if n == 1:
        return jnp.zeros((1,), jnp.float32)
    k = min(krum_neighbours(n, num_byzantine), n - 1)
    others = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, distances)
    return jnp.sum(jnp.sort(others, axis=1)[:, :k], axis=1)


def krum_selection(stacked: Any, num_byzantine: int, keep: int = 1) -> jax.Array:
    """``[n]`` mask (1.0 or 0.0) of the ``keep`` clients with the lowest Krum scores.

    ``keep = 1`` is Krum; ``keep = m > 1`` is Multi-Krum's selection. Ties go to the lower
    index, so the choice does not depend on float noise between equal scores.
    """
    scores = krum_scores(stacked, num_byzantine)
    n = scores.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"Multi-Krum keeps between 1 and the {n} clients, got {keep}")
    order = jnp.lexsort((jnp.arange(n), scores))
    return jnp.zeros((n,), jnp.float32).at[order[:keep]].set(1.0)
