"""Float32 sums and weighted means carried to about twice float32's precision.

FedAvg in float32 has two ways to lose digits: a plain ``sum_i w_i x_i`` loses those of small
terms beside large ones, and a sum around one client's model (``x_0 + sum_i w_i (x_i - x_0)``)
loses those of every client when client 0 is far from the rest, so the result depended on which
client came first. Here every product and sum is *error-free*: a value is carried as an unevaluated
pair ``hi + lo`` of float32s (a "double-float", Dekker 1971; Knuth's TwoSum), so a weighted mean
comes out within about one float32 rounding of the exact one, whatever the clients' order, offsets
and weights. The pairs are reduced pairwise over the leading (client) axis, so this stays a few
vectorised passes under ``jit`` and ``vmap``.

This relies on float32 arithmetic being done as written (no reassociation, which XLA does not do;
fused multiply-adds only make the exact products here exact in another way).
"""

from __future__ import annotations

import jax.numpy as jnp

#: 2^12 + 1: Veltkamp's splitter for float32's 24-bit significand (two 12-bit halves).
_SPLITTER = 4097.0


def two_sum(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``s, e`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _split(a: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``hi, lo`` of 12 significant bits each with ``hi + lo = a`` (Veltkamp)."""
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``p, e`` with ``p = fl(a * b)`` and ``p + e = a * b`` exactly (Dekker), for
    ``|a|, |b|`` below about 1e34 (the split must not overflow)."""
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def pairwise_sum(hi: jnp.ndarray, lo: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sums double-floats ``hi + lo`` over axis 0, pairwise; returns one double-float."""
    while hi.shape[0] > 1:
        if hi.shape[0] % 2:
            pad = jnp.zeros((1,) + hi.shape[1:], hi.dtype)
            hi, lo = jnp.concatenate([hi, pad]), jnp.concatenate([lo, pad])
        s, e = two_sum(hi[0::2], hi[1::2])
        hi, lo = two_sum(s, e + (lo[0::2] + lo[1::2]))
    return hi[0], lo[0]


def weighted_mean(values: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """``sum_i w_i x_i / sum_i w_i`` over axis 0 of float32 ``values``, rounded once or twice.

    The weights are first scaled by a power of two (exactly) so their largest is in [0.5, 1):
    weights up to float32's largest then neither overflow the sum nor the products. The result
    is clipped into the range of the values of the clients with weight > 0, where the exact mean
    lies, so identical clients give their value back bit for bit, also beside clients of weight
    0 (those Multi-Krum leaves out) that hold other values.

    Args:
        values: ``[clients, ...]`` float32.
        weights: ``[clients]`` float32, non-negative, not all zero.
    """
    w = jnp.asarray(weights, jnp.float32)
    _, exponent = jnp.frexp(jnp.max(w))
    w = jnp.ldexp(w, -exponent)
    w_b = w.reshape(w.shape + (1,) * (values.ndim - 1))
    num_hi, num_lo = pairwise_sum(*two_prod(w_b, values))
    den_hi, den_lo = pairwise_sum(w, jnp.zeros_like(w))
    mean = (num_hi + num_lo) / (den_hi + den_lo)
    counted = w_b > 0
    return jnp.clip(mean, jnp.min(jnp.where(counted, values, jnp.inf), axis=0),
                    jnp.max(jnp.where(counted, values, -jnp.inf), axis=0))
