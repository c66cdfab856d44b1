"""Aggregation of client models: FedAvg (batch and streaming), the robust rules, update clipping,
staleness mixing and validation.

FedAvg works on *stacked* trees, whose leaves carry a leading client axis, so the same code serves a
handful of clients or a ``vmap``-ed cohort. Weights are example counts (or any non-negative numbers
that fit float32) and need not sum to one. The robust rules (``fdjax.core.robust``: coordinate-wise
median, trimmed mean, Krum, Multi-Krum) work on the same stacked trees and bound how far a few bad
clients can move the result; ``aggregate`` picks a rule by name (an ``AggregationRule``), after
clipping each update's change to ``clip_norm`` if asked.

Averages are carried in double-float arithmetic (``fdjax.core.compensated``): within about one
float32 rounding of the exact weighted mean whatever the clients' order, offsets and weights, and
a round in which every client returns the same model gives that model back bit for bit. (An
average around client 0's model, as before, lost digits when that client was far from the others,
so the result depended on arrival order.)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.core.compensated import pairwise_sum, two_prod, weighted_mean
from fdjax.core.coordinatewise import coordinatewise
from fdjax.core.robust import (coordinate_median, krum_neighbours, krum_scores, krum_selection,
                               trimmed_count, trimmed_mean)

STALENESS_KINDS = ("constant", "polynomial", "hinge")
AGGREGATION_RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")
_FLOAT32_MAX = float(np.finfo(np.float32).max)

__all__ = ["AGGREGATION_RULES", "STALENESS_KINDS", "AggregationRule", "StreamingAverage",
           "aggregate", "check_weights", "clip_update", "coordinate_median", "fedavg",
           "krum_neighbours", "krum_scores", "krum_selection", "mix", "stack_trees",
           "staleness_mix", "staleness_weight", "buffered_update", "streaming_add", "streaming_init",
           "streaming_result", "trimmed_count", "trimmed_mean", "validate_update"]


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks same-structured trees into one tree with a leading axis of length ``len(trees)``."""
    if not trees:
        raise ValueError("cannot stack an empty list of models")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_weights(weights: Any, num_clients: int | None = None) -> None:
    """Raises ``ValueError`` unless ``weights`` are finite, non-negative, fit float32 (the
    precision models are averaged in) and are not all zero there."""
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
    if np.any(w > _FLOAT32_MAX):
        raise ValueError(f"aggregation weight {w.max():.3g} (client {int(np.argmax(w))}) does "
                         f"not fit float32 (largest {_FLOAT32_MAX:.3g}); use example counts")
    if not w.astype(np.float32).astype(np.float64).sum() > 0:
        raise ValueError("aggregation weights sum to zero (in float32): at least one client "
                         "needs weight > 0")


def _mean_leaf(leaf: jax.Array, w: jax.Array) -> jax.Array:
    if leaf.dtype == jnp.float64:  # with jax_enable_x64: float64 is already precise enough
        w64 = w.astype(jnp.float64)
        return jnp.tensordot(w64, leaf, axes=1) / jnp.sum(w64)
    return weighted_mean(leaf.astype(jnp.float32), w).astype(leaf.dtype)


def fedavg(stacked: Any, weights: jax.Array) -> Any:
    """Example-weighted average over the leading (client) axis of ``stacked``.

    Args:
        stacked: a tree whose leaves have shape ``[clients, ...]``.
        weights: ``[clients]`` non-negative weights, e.g. local example counts; checked (see
            ``check_weights``) unless traced.

    Returns:
        A tree like one client's model, in the leaves' own dtypes: within about one float32
        rounding of the exact weighted mean, and bit for bit the model when all clients agree.
    """
    leaves = jax.tree_util.tree_leaves(stacked)
    if not _is_traced(weights):
        check_weights(weights, leaves[0].shape[0] if leaves else None)
    w = jnp.asarray(weights, jnp.float32)
    # Over all leaves joined (``coordinatewise``): one compiled pass instead of one per leaf.
    return coordinatewise(lambda values: weighted_mean(values, w), stacked,
                          per_leaf=lambda leaf: _mean_leaf(leaf, w))


class AggregationRule(NamedTuple):
    """How a round's updates are combined: hashable, so a jitted ``aggregate`` takes it static.

    Attributes:
        name: one of ``AGGREGATION_RULES``.
        trim_fraction: the share ``trimmed_mean`` drops at each end.
        num_byzantine: ``f``, the bad clients Krum and Multi-Krum are built to withstand.
        multi_krum_keep: ``m``, the clients Multi-Krum averages; None: ``n - f``.
        clip_norm: if set, each update's change from the server's model is scaled down to at
            most this L2 norm before the rule runs (clipped instead of rejected), and so is the
            round's change under the coordinate-wise rules (median, trimmed mean), which can
            otherwise leave the ball the clipped updates lie in.
    """

    name: str = "fedavg"
    trim_fraction: float = 0.1
    num_byzantine: int = 1
    multi_krum_keep: int | None = None
    clip_norm: float | None = None


def aggregate(stacked: Any, weights: jax.Array, rule: str | AggregationRule = "fedavg",
              trim_fraction: float = 0.1, reference: Any = None) -> Any:
    """Aggregates stacked client models with the named rule.

    Args:
        stacked: a tree whose leaves have shape ``[clients, ...]``.
        weights: ``[clients]`` example counts; "fedavg" and "multi_krum" (among the kept
            clients, as Flower's ``aggregate_krum`` does) use them.
        rule: a rule name, or an ``AggregationRule`` with all its settings (static under
            ``jit``).
        trim_fraction: with a rule name, the share trimmed at each end by "trimmed_mean".
        reference: the server's model, needed with ``clip_norm``.
    """
    if isinstance(rule, str):
        rule = AggregationRule(rule, trim_fraction)
    if rule.clip_norm is not None:
        if reference is None:
            raise ValueError("clip_norm clips each update's change from the server's model; "
                             "pass that model as reference")
        stacked = jax.vmap(clip_update, in_axes=(None, 0, None))(reference, stacked,
                                                                 rule.clip_norm)
    if rule.name == "fedavg":
        return fedavg(stacked, weights)
    if rule.name in ("median", "trimmed_mean"):
        result = (coordinate_median(stacked) if rule.name == "median"
                  else trimmed_mean(stacked, rule.trim_fraction))
        # A coordinate-wise rule can leave the ball the clipped updates lie in (the median of
        # (a, a, 0), (a, 0, a), (0, a, a) with a = 1/sqrt(2) is (a, a, a), of norm 1.22), so
        # its round is clipped too: with clip_norm no round moves the model further, whatever
        # the rule. FedAvg, Krum and Multi-Krum stay inside it (a weighted mean of the clipped
        # updates, or one of them) and are left untouched.
        return result if rule.clip_norm is None else clip_update(reference, result,
                                                                 rule.clip_norm)
    if rule.name in ("krum", "multi_krum"):
        return _krum(stacked, weights, rule)
    raise ValueError(f"unknown aggregation rule {rule.name!r}; choose one of "
                     f"{list(AGGREGATION_RULES)}")


def _krum(stacked: Any, weights: jax.Array, rule: AggregationRule) -> Any:
    """Krum: the best-scored client's model, exactly; Multi-Krum: FedAvg of the ``m`` best."""
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    if rule.name == "krum":
        best = jnp.argmax(krum_selection(stacked, rule.num_byzantine, 1))
        return jax.tree_util.tree_map(lambda leaf: leaf[best], stacked)
    keep = rule.multi_krum_keep or n - rule.num_byzantine
    kept = krum_selection(stacked, rule.num_byzantine, max(1, min(keep, n)))
    w = jnp.asarray(weights, jnp.float32) * kept
    # Every kept client may have claimed 0 examples; then they count equally.
    return fedavg(stacked, jnp.where(jnp.sum(w) > 0, w, kept))


def clip_update(reference: Any, update: Any, max_norm: float) -> Any:
    """``update`` with its change from ``reference`` scaled down to L2 norm at most
    ``max_norm`` (over all leaves); an update already within it comes back bit for bit.

    Clipping bounds what any one client can move the model by without throwing its update away
    (``aggregation.max_delta_norm`` rejects instead), the usual companion of robust rules and of
    differential privacy (Abadi et al., 2016).
    """
    if not _is_traced(max_norm) and not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {max_norm}")
    deltas = jax.tree_util.tree_map(lambda u, r: u.astype(jnp.float32) - r.astype(jnp.float32),
                                    update, reference)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in jax.tree_util.tree_leaves(deltas)))
    # Used only where norm > max_norm; the clipped change has norm max_norm up to one rounding
    # of each coordinate of r + scale * d.
    scale = max_norm / jnp.maximum(norm, 1e-30)
    return jax.tree_util.tree_map(
        lambda u, r, d: jnp.where(norm <= max_norm, u,
                                  (r.astype(jnp.float32) + scale * d).astype(u.dtype)),
        update, reference, deltas)


class StreamingAverage(NamedTuple):
    """Running state of a FedAvg whose client models arrive one at a time.

    The weighted sum and the total weight are double-floats (``hi + lo``) kept at the scale
    ``2^-exponent``, where ``2^exponent`` bounds the largest weight seen so far: weights up to
    float32's largest then neither overflow the sums nor the products. ``low`` and ``high``
    are each coordinate's range over the clients with weight > 0.
    """

    sum_hi: Any
    sum_lo: Any
    total_hi: jax.Array
    total_lo: jax.Array
    low: Any
    high: Any
    exponent: jax.Array


def streaming_init(first: Any, weight: float) -> StreamingAverage:
    """Starts a streaming average with the first model to arrive."""
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), first)
    inf = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, jnp.inf, jnp.float32), first)
    empty = StreamingAverage(zeros, zeros, jnp.zeros((), jnp.float32),
                             jnp.zeros((), jnp.float32), inf,
                             jax.tree_util.tree_map(jnp.negative, inf),
                             jnp.asarray(-200, jnp.int32))  # below every float32 exponent
    return streaming_add(empty, first, weight)


def streaming_add(state: StreamingAverage, model: Any, weight: float) -> StreamingAverage:
    """Adds one more client model with its weight (error-free, as ``fedavg``)."""
    _check_streaming_weight(weight)
    w = jnp.asarray(weight, jnp.float32)
    # w = m * 2^k with m in [0.5, 1): only m goes through the product's split; the powers of
    # two, and rescaling the sums when a larger weight arrives, are exact.
    mantissa, k = jnp.frexp(w)
    exponent = jnp.where(w > 0, jnp.maximum(state.exponent, k), state.exponent)
    old, new = state.exponent - exponent, k - exponent

    def add(hi, lo, x):
        p, e = two_prod(mantissa, x.astype(jnp.float32))
        return pairwise_sum(jnp.stack([jnp.ldexp(hi, old), jnp.ldexp(p, new)]),
                            jnp.stack([jnp.ldexp(lo, old), jnp.ldexp(e, new)]))

    sums = jax.tree_util.tree_map(add, state.sum_hi, state.sum_lo, model)
    total = pairwise_sum(jnp.stack([jnp.ldexp(state.total_hi, old), jnp.ldexp(mantissa, new)]),
                         jnp.stack([jnp.ldexp(state.total_lo, old), jnp.zeros_like(w)]))
    counted = w > 0
    low = jax.tree_util.tree_map(
        lambda a, x: jnp.where(counted, jnp.minimum(a, x.astype(jnp.float32)), a), state.low,
        model)
    high = jax.tree_util.tree_map(
        lambda a, x: jnp.where(counted, jnp.maximum(a, x.astype(jnp.float32)), a), state.high,
        model)
    is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
    return StreamingAverage(jax.tree_util.tree_map(lambda t: t[0], sums, is_leaf=is_pair),
                            jax.tree_util.tree_map(lambda t: t[1], sums, is_leaf=is_pair),
                            total[0], total[1], low, high, exponent)


def _check_streaming_weight(weight: Any) -> None:
    if _is_traced(weight):
        return
    w = float(weight)
    if not (math.isfinite(w) and 0 <= w <= _FLOAT32_MAX):
        raise ValueError(f"aggregation weights must be finite, non-negative and fit float32, "
                         f"got {weight}")


def streaming_result(state: StreamingAverage, like: Any = None) -> Any:
    """The average of every model added so far; equals ``fedavg`` of them in any order, within
    a float32 rounding. ``like``: a model whose dtypes the result takes (default float32)."""
    total = state.total_hi + state.total_lo
    if not _is_traced(total) and not float(total) > 0:
        raise ValueError("aggregation weights sum to zero: at least one client needs weight > 0")
    # Divide with both sides scaled (exactly) so the total is in [0.5, 1): XLA flushes
    # subnormals to zero, and 1 / total would be one for totals above about 8.5e37.
    _, k = jnp.frexp(total)
    total = jnp.ldexp(total, -k)
    mean = jax.tree_util.tree_map(
        lambda hi, lo, a, b: jnp.clip(jnp.ldexp(hi + lo, -k) / total, a, b), state.sum_hi,
        state.sum_lo, state.low, state.high)
    if like is None:
        return mean
    return jax.tree_util.tree_map(lambda m, x: m.astype(x.dtype), mean, like)


def staleness_weight(staleness: jax.Array, kind: str = "polynomial", a: float = 0.5,
                     b: float = 4.0) -> jax.Array:
    """FedAsync's staleness function ``s(t - tau)`` (Xie et al., 2019), 1 at staleness 0.

    Args:
        staleness: how many server versions the update is behind (>= 0).
        kind: "constant" (always 1), "polynomial" (``(1 + staleness)^-a``) or "hinge" (1 up to
            ``b``, then ``1 / (a (staleness - b) + 1)``).
        a: decay exponent (polynomial) or slope (hinge), > 0.
        b: hinge point, >= 0.

    ``kind`` is static under ``jit``; ``a`` and ``b`` may be traced (one compiled program for
    every setting), and are then not checked here: the config checks them
    (``distill.staleness_a``, ``distill.staleness_b``).
    """
    if kind not in STALENESS_KINDS:
        raise ValueError(f"unknown staleness weighting {kind!r}; choose one of "
                         f"{list(STALENESS_KINDS)}")
    if not (_is_traced(a) or _is_traced(b)) and not (
            math.isfinite(a) and math.isfinite(b) and a > 0 and b >= 0):
        raise ValueError(f"staleness parameters need finite a > 0 and b >= 0, got a={a}, b={b}")
    s = jnp.maximum(jnp.asarray(staleness, jnp.float32), 0.0)
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
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


def buffered_update(params: Any, models: Any, bases: Any, examples: jax.Array,
                    staleness: jax.Array, *, kind: str = "polynomial", a: float = 0.5,
                    b: float = 4.0, server_lr: float = 1.0, clip_norm: float | None = None
                    ) -> Any:
    """FedBuff's server step (Nguyen et al., 2022) over a full buffer of ``K`` updates.

    ``params + server_lr * sum_i (n_i / sum_j n_j) * s(tau_i) * (x_i - base_i)``: each client's
    change from the model it was served (``bases``), weighted by its examples and by the
    staleness function ``s`` (``staleness_weight``) of how many versions that model was behind.
    Unlike a weighted mean, stale changes shrink the step instead of only each other's share;
    with no staleness, ``server_lr = 1`` and every base the current model this is FedAvg of the
    buffer (to float rounding).

    Args:
        params: the server's current model.
        models, bases: stacked trees ``[K, ...]``: each update's model and the model it was
            trained from.
        examples: ``[K]`` positive example counts; staleness: ``[K]`` versions behind (>= 0).
        kind, a, b: the staleness function and its parameters (``kind`` static under jit).
        server_lr: the server's step size on the averaged change.
        clip_norm: if set, each change is first scaled down to L2 norm at most this.
    """
    deltas = jax.tree_util.tree_map(lambda x, r: x.astype(jnp.float32) - r.astype(jnp.float32),
                                    models, bases)
    if clip_norm is not None:
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))
                             for d in jax.tree_util.tree_leaves(deltas)))
        scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
        deltas = jax.tree_util.tree_map(
            lambda d: d * scale.reshape((-1,) + (1,) * (d.ndim - 1)), deltas)
    n = jnp.asarray(examples, jnp.float32)
    w = n * staleness_weight(staleness, kind, a, b) / jnp.sum(n)
    return jax.tree_util.tree_map(
        lambda p, d: (p.astype(jnp.float32) + server_lr * jnp.tensordot(w, d, axes=1)
                      ).astype(p.dtype), params, deltas)


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
        # one pass for the common case; the two counts only for a leaf that fails it
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            return f"leaf {name} has {nan} NaN and {inf} Inf values"
        if max_delta_norm is not None:
            diff = values.astype(np.float64) - np.asarray(ref, np.float64)
            squared += float(np.sum(diff * diff))
    if max_delta_norm is not None and not math.sqrt(squared) <= max_delta_norm:
        return (f"update changes the model by L2 norm {math.sqrt(squared):.4g}, "
                f"above the bound {max_delta_norm:.4g}")
    return None
