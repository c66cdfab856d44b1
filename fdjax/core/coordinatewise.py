"""A coordinate-wise rule over stacked models, computed on one flat vector per client.

FedAvg, the coordinate-wise median and the trimmed mean treat every coordinate alone, so they
give the same numbers whether they run leaf by leaf or over all leaves joined into one
``[clients, parameters]`` matrix. Joined, XLA compiles one pass instead of one per leaf: the
compensated FedAvg of a ``cnn12`` (24 leaves, three clients) compiled in 2.0 s instead of 7.7 s
on the project's 2-core CPU, with every output bit equal. A run compiles its averaging once for
each number of models a round brings, so asynchronous runs paid that again and again.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def coordinatewise(rule: Callable[[jax.Array], jax.Array], stacked: Any, *,
                   per_leaf: Callable[[jax.Array], jax.Array] | None = None) -> Any:
    """``rule`` over the leading (client) axis of every leaf of ``stacked`` at once.

    Args:
        rule: ``[clients, P]`` float32 -> ``[P]`` float32, each column on its own.
        stacked: a tree whose leaves have shape ``[clients, ...]``.
        per_leaf: if given, float64 leaves (``jax_enable_x64``) go to it one by one instead of
            being rounded to float32 with the rest.

    Returns:
        A tree like one client's model, each leaf in its own dtype: what ``rule`` applied to
        each leaf cast to float32 gives.
    """
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    if not leaves:
        return stacked
    out = list(leaves)
    joined = [i for i, leaf in enumerate(leaves)
              if per_leaf is None or leaf.dtype != jnp.float64]
    for i in set(range(len(leaves))) - set(joined):
        out[i] = per_leaf(leaves[i])
    if joined:
        n = leaves[joined[0]].shape[0]
        parts = [leaves[i].reshape(n, -1).astype(jnp.float32) for i in joined]
        result = rule(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1))
        cuts = np.cumsum([p.shape[1] for p in parts])[:-1].tolist()
        for i, piece in zip(joined, jnp.split(result, cuts)):
            out[i] = piece.reshape(leaves[i].shape[1:]).astype(leaves[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)
