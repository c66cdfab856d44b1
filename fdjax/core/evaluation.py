"""Evaluation: loss and accuracy of a model over a whole dataset, batch by batch, in one function.

The dataset is padded to a whole number of batches (padding masked out) and ``lax.map`` runs the
forward passes, so the runtime compiles one function per model and dataset size and evaluates with
a single call. Only forward passes run inside the loop construct; the XLA CPU slowdown that makes
training loops prefer Python dispatch concerns weight gradients, not forward convolutions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fdjax.core.training import ApplyFn, Metrics, classification_metrics, num_steps


def evaluate(params: Any, data: dict[str, jax.Array], *, apply_fn: ApplyFn,
             batch_size: int) -> Metrics:
    """Summed cross-entropy, correct predictions and count over ``data`` (see ``summarize``)."""
    images, labels = data["images"], data["labels"]
    n = labels.shape[0]
    steps = num_steps(n, batch_size)
    pad = steps * batch_size - n

    def padded(x):
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        return x.reshape((steps, batch_size) + x.shape[1:])

    mask = padded(jnp.ones((n,), jnp.float32))

    def one_batch(batch):
        x, y, m = batch
        return classification_metrics(apply_fn(params, x), y, m)

    per_batch = jax.lax.map(one_batch, (padded(images), padded(labels), mask))
    return jax.tree_util.tree_map(jnp.sum, per_batch)

