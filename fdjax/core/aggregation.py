"""Aggregation of client models: FedAvg (batch and streaming), robust rules, staleness mixing,
and validation.

FedAvg works on *stacked* trees, whose leaves carry a leading client axis, so the same code serves a
handful of clients or a ``vmap``-ed cohort. Weights are example counts (or any non-negative numbers)
and need not sum to one. The robust rules (coordinate-wise median, trimmed mean) work on the same
stacked trees and bound how far one bad client can move the result; ``aggregate`` picks a rule by
name.

Averages are computed around an anchor, the first client's model:
``x_0 + sum_i w_i (x_i - x_0) / sum_i w_i``. Client models in a round are close to one another, so
the differences are small and the sum loses less precision than ``sum_i w_i x_i``; and a round in
which every client returns the same model gives that model back bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

STALENESS_KINDS = ("constant", "polynomial", "hinge")
AGGREGATION_RULES = ("fedavg", "median", "trimmed_mean")


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks same-structured trees into one tree with a leading axis of length ``len(trees)``."""
    if not trees:
        raise ValueError("cannot stack an empty list of models")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_weights(weights: Any, num_clients: int | None = None) -> None:
    """Raises ``ValueError`` unless ``weights`` are finite, non-negative and not all zero."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"aggregation weights must be a 1-D vector, got shape {w.shape}")
    if num_clients is not None and w.shape[0] != num_clients:
        raise ValueError(f"got {w.shape[0]} aggregation weights for {num_clients} client models")
    if not np.all(np.isfinite(w)):
        raise ValueError("aggregation weights must be finite")
    if np.any(w < 0):
        raise ValueError(f"aggregation weights must be non-negative, got {w.min()} "
                         f"(client {int(np.argmin(w))}); use example counts")
    if not w.sum() > 0:
        raise ValueError("aggregation weights sum to zero: at least one client needs weight > 0")


def fedavg(stacked: Any, weights: jax.Array) -> Any:
    """Example-weighted average over the leading (client) axis of ``stacked``.

    Args:
        stacked: a tree whose leaves have shape ``[clients, ...]``.
        weights: ``[clients]`` non-negative weights, e.g. local example counts.

    Returns:
        A tree like one client's model, in the leaves' own dtypes.
    """
    leaves = jax.tree_util.tree_leaves(stacked)
    if not _is_traced(weights):
        check_weights(weights, leaves[0].shape[0] if leaves else None)
    w = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(w)

    def average(leaf):
        anchor = leaf[0]
        delta = (leaf - anchor[None]).astype(jnp.float32)
        return (anchor + jnp.tensordot(w, delta, axes=1) / total).astype(leaf.dtype)

    return jax.tree_util.tree_map(average, stacked)


def coordinate_median(stacked: Any) -> Any:
    """Coordinate-wise median over the leading (client) axis (Yin et al., 2018).

    Unweighted: a client cannot buy influence by claiming more examples. While fewer than half of
    the clients are bad, every coordinate of the result lies within the range of the good clients'
    values, however large the bad ones are. Unlike ``fedavg`` it is not computed around client 0's
    model: that client may be the bad one, and differences from a huge model would wipe out the
    good ones' digits.
    """
    return jax.tree_util.tree_map(
        lambda leaf: jnp.median(leaf.astype(jnp.float32), axis=0).astype(leaf.dtype), stacked)


def trimmed_count(num_clients: int, trim_fraction: float) -> int:
    """How many values ``trimmed_mean`` drops at each end: ``floor(trim_fraction * num_clients)``."""
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

    def one(leaf):
        # Around the median, a robust centre: small differences keep their digits whatever the
        # outliers are, and identical client models come back bit for bit.
        values = leaf.astype(jnp.float32)
        centre = jnp.median(values, axis=0)
        kept = jnp.sort(values - centre[None], axis=0)[k:n - k]
        return (centre + jnp.mean(kept, axis=0)).astype(leaf.dtype)

    return jax.tree_util.tree_map(one, stacked)


def aggregate(stacked: Any, weights: jax.Array, rule: str = "fedavg",
              trim_fraction: float = 0.1) -> Any:
    """Aggregates stacked client models with the named rule.

    Args:
        stacked: a tree whose leaves have shape ``[clients, ...]``.
        weights: ``[clients]`` example counts; only "fedavg" uses them.
        rule: "fedavg", "median" or "trimmed_mean" (static under ``jit``).
        trim_fraction: the share trimmed at each end by "trimmed_mean" (static under ``jit``).
    """
    if rule == "fedavg":
        return fedavg(stacked, weights)
    if rule == "median":
        return coordinate_median(stacked)
    if rule == "trimmed_mean":
        return trimmed_mean(stacked, trim_fraction)
    raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {list(AGGREGATION_RULES)}")


class StreamingAverage(NamedTuple):
    """Running state of a FedAvg whose client models arrive one at a time."""

    anchor: Any
    weighted_delta: Any
    total_weight: jax.Array


def streaming_init(first: Any, weight: float) -> StreamingAverage:
    """Starts a streaming average with the first model to arrive (it becomes the anchor)."""
    _check_streaming_weight(weight)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), first)
    return StreamingAverage(first, zeros, jnp.asarray(weight, jnp.float32))


def streaming_add(state: StreamingAverage, model: Any, weight: float) -> StreamingAverage:
    """Adds one more client model with its weight."""
    _check_streaming_weight(weight)
    w = jnp.asarray(weight, jnp.float32)
    delta = jax.tree_util.tree_map(lambda acc, x, a: acc + w * (x - a).astype(jnp.float32),
                                   state.weighted_delta, model, state.anchor)
    return StreamingAverage(state.anchor, delta, state.total_weight + w)


def _check_streaming_weight(weight: Any) -> None:
    if not _is_traced(weight) and not (math.isfinite(float(weight)) and float(weight) >= 0):
        raise ValueError(f"aggregation weights must be finite and non-negative, got {weight}")


def streaming_result(state: StreamingAverage) -> Any:
    """The average of every model added so far; equals ``fedavg`` of them in arrival order."""
    if not _is_traced(state.total_weight) and not float(state.total_weight) > 0:
        raise ValueError("aggregation weights sum to zero: at least one client needs weight > 0")
    return jax.tree_util.tree_map(
        lambda a, d: (a + d / state.total_weight).astype(a.dtype), state.anchor,
        state.weighted_delta)


def staleness_weight(staleness: jax.Array, kind: str = "polynomial", a: float = 0.5,
                     b: float = 4.0) -> jax.Array:
    """FedAsync's staleness function ``s(t - tau)`` (Xie et al., 2019), 1 at staleness 0.

    Args:
        staleness: how many server versions the update is behind (>= 0).
        kind: "constant" (always 1), "polynomial" (``(1 + staleness)^-a``) or "hinge" (1 up to
            ``b``, then ``1 / (a (staleness - b) + 1)``).
        a: decay exponent (polynomial) or slope (hinge), > 0.
        b: hinge point, >= 0.
    """
    if kind not in STALENESS_KINDS:
        raise ValueError(f"unknown staleness weighting {kind!r}; choose one of "
                         f"{list(STALENESS_KINDS)}")
    if not a > 0 or not b >= 0:
        raise ValueError(f"staleness parameters need a > 0 and b >= 0, got a={a}, b={b}")
    s = jnp.maximum(jnp.asarray(staleness, jnp.float32), 0.0)
    if kind == "constant":
        return jnp.ones_like(s)
    if kind == "polynomial":
        return (1.0 + s) ** (-a)
    return jnp.where(s <= b, 1.0, 1.0 / (a * (s - b) + 1.0))


def mix(server: Any, update: Any, alpha: jax.Array) -> Any:
    """``(1 - alpha) * server + alpha * update``, leaf by leaf; alpha 0 returns ``server``."""
    alpha = jnp.asarray(alpha, jnp.float32)
    return jax.tree_util.tree_map(
        lambda s, u: (s + alpha * (u - s).astype(jnp.float32)).astype(s.dtype), server, update)


def staleness_mix(server: Any, update: Any, staleness: jax.Array, base_alpha: float, *,
                  kind: str = "polynomial", a: float = 0.5, b: float = 4.0) -> Any:
    """FedAsync update: mixes ``update`` in with weight ``base_alpha * s(staleness)``."""
    if not _is_traced(base_alpha) and not 0 <= base_alpha <= 1:
        raise ValueError(f"mixing weight alpha must be in [0, 1], got {base_alpha}")
    return mix(server, update, base_alpha * staleness_weight(staleness, kind, a, b))


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path) or "<root>"


def validate_update(reference: Any, update: Any, *, max_delta_norm: float | None = None
                    ) -> str | None:
    """Checks a client update against the server's model before it may touch server state.

    Never raises: whatever a client sends, the answer is a verdict, because a server that crashed
    on a malformed update would let any client stop it.

    Args:
        reference: the server's current model (the structure, shapes and dtypes it expects).
        update: the tree a client sent.
        max_delta_norm: if set, reject updates whose global L2 distance from ``reference``
            exceeds it.

    Returns:
        ``None`` if the update is acceptable, otherwise a one-line reason naming the offending
        leaf: a missing or unexpected leaf, a wrong shape or dtype, NaN or Inf values, or a change
        that is too large.
    """
    try:
        return _validate(reference, update, max_delta_norm)
    except Exception as err:  # anything a hostile object can throw while being inspected
        return f"malformed update: {type(err).__name__}: {_one_line(err)}"


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def _validate(reference: Any, update: Any, max_delta_norm: float | None) -> str | None:
    ref_leaves = dict((_path_name(p), x) for p, x in
                      jax.tree_util.tree_flatten_with_path(reference)[0])
    try:
        upd_flat = jax.tree_util.tree_flatten_with_path(update)[0]
    except Exception as err:  # a malformed container cannot even be walked
        return f"update is not a parameter tree: {_one_line(err)}"
    upd_leaves = dict((_path_name(p), x) for p, x in upd_flat)
    if len(upd_leaves) != len(upd_flat):
        return "update has two leaves with the same name"
    missing = [k for k in ref_leaves if k not in upd_leaves]
    if missing:
        return f"missing leaf {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                               if len(missing) > 1 else "")
    extra = [k for k in upd_leaves if k not in ref_leaves]
    if extra:
        return f"unexpected leaf {extra[0]}"
    if jax.tree_util.tree_structure(reference) != jax.tree_util.tree_structure(update):
        return "tree structure differs from the model's (same leaf names, different containers)"
    squared = 0.0
    for name, ref in ref_leaves.items():
        leaf = upd_leaves[name]
        if not isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
            return f"leaf {name} is not an array (got {type(leaf).__name__})"
        if tuple(leaf.shape) != tuple(ref.shape):
            return f"leaf {name} has shape {tuple(leaf.shape)}, expected {tuple(ref.shape)}"
        if np.dtype(leaf.dtype) != np.dtype(ref.dtype):
            return f"leaf {name} has dtype {np.dtype(leaf.dtype)}, expected {np.dtype(ref.dtype)}"
        values = np.asarray(leaf)
        if np.issubdtype(values.dtype, np.inexact):
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            if nan or inf:
                return f"leaf {name} has {nan} NaN and {inf} Inf values"
        if max_delta_norm is not None:
            diff = values.astype(np.float64) - np.asarray(ref, np.float64)
            squared += float(np.sum(diff * diff))
    if max_delta_norm is not None and not math.sqrt(squared) <= max_delta_norm:
        return (f"update changes the model by L2 norm {math.sqrt(squared):.4g}, "
                f"above the bound {max_delta_norm:.4g}")
    return None
