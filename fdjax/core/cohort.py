"""Cohort training: several clients trained together, one ``vmap``-ed step for all of them.

A cohort stacks K clients' parameters and optimizer states along a leading axis (the layout of
``aggregation.stack_trees``) and maps one training step over that axis; each client still trains
on its own examples in its own shuffled order. The clients' examples live in one shared *pool*
(their arrays concatenated); a client is an ``offset`` and a ``size`` into it, so a cohort gathers
every client's batch from the same arrays and nothing is copied per round.

Clients of unequal size: each client's epoch is ``training.padded_epoch`` padded to the cohort's
number of steps. A client with fewer batches does wholly masked steps, and ``masked_train_step``
leaves the whole state untouched on such a step (parameters and optimizer state, Adam's step
count included). A client therefore ends a cohort epoch where it would end alone: the same batches
in the same order (``training.shuffled_order`` gives ``epoch_plan``'s permutation), up to float rounding of the
batched kernels. A lane of size 0 never changes.

Keys follow ``fdjax.runtime.LocalTrainer.epoch``: a client's epoch key splits into a plan key and
a step key, and step ``s`` uses ``fold_in(step_key, s)``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fdjax.core import training
from fdjax.core.training import Metrics, TrainFn, TrainState

Plan = tuple[jax.Array, jax.Array]


def masked_train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
                      train_fn: TrainFn, optimizer: optax.GradientTransformation
                      ) -> tuple[TrainState, Metrics]:
    """``training.train_step``, except that a batch with no real example changes nothing.

    Without the guard a padded step would still move the parameters (momentum) and advance the
    optimizer's counters; with it, a client's extra cohort steps are exact no-ops.
    """
    new_state, stats = training.train_step(state, batch, key, train_fn=train_fn,
                                           optimizer=optimizer)
    active = jnp.sum(batch["mask"]) > 0
    state = jax.tree_util.tree_map(lambda new, old: jnp.where(active, new, old), new_state, state)
    return state, stats


def cohort_init(params: Any, lanes: int, *, optimizer: optax.GradientTransformation
                ) -> TrainState:
    """``lanes`` copies of ``params``, each with a fresh optimizer state, stacked."""
    stacked = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (lanes,) + x.shape), params)
    return jax.vmap(lambda p: training.init_train_state(p, optimizer))(stacked)


def cohort_epoch_plan(keys: jax.Array, sizes: jax.Array, offsets: jax.Array, batch_size: int,
                      steps: int) -> tuple[Plan, jax.Array]:
    """Every client's shuffled epoch, padded to ``steps`` rows, as indices into the pool.

    Args:
        keys: ``[K]`` epoch keys, one per client.
        sizes: ``[K]`` examples per client (0 for a padding lane).
        offsets: ``[K]`` where each client's examples start in the pool.
        batch_size: examples per step (static).
        steps: rows of the plan (static), at least every client's ``num_steps``.

    Returns:
        ``(index, mask)``, each ``[K, steps, batch_size]``, and the ``[K]`` step keys.
    """
    def one(key, size, offset):
        plan_key, step_key = jax.random.split(key)
        index, mask = training.padded_epoch(plan_key, size, batch_size, steps)
        return (index + offset, mask), step_key

    return jax.vmap(one)(keys, sizes, offsets)


def cohort_planned_step(step_fn: Callable, states: Any, data: dict[str, jax.Array], plan: Plan,
                        step: jax.Array, keys: jax.Array):
    """Row ``step`` of every client's plan, one ``step_fn`` call mapped over the clients.

    ``data`` is the shared pool (not mapped); ``states``, ``plan`` and ``keys`` carry the client
    axis. This is what a Python-loop driver compiles once per cohort shape.
    """
    return jax.vmap(lambda s, p, k: training.planned_step(step_fn, s, data, p, step, k))(
        states, plan, keys)


def scan_cohort_epoch(states: TrainState, data: dict[str, jax.Array], keys: jax.Array,
                      sizes: jax.Array, offsets: jax.Array, *, train_fn: TrainFn,
                      optimizer: optax.GradientTransformation, batch_size: int, steps: int
                      ) -> tuple[TrainState, Metrics]:
    """One local epoch of every client of the cohort as a single ``lax.scan``.

    Returns the stacked states and per-client summed metrics (each ``[K]``).
    """
    plan, step_keys = cohort_epoch_plan(keys, sizes, offsets, batch_size, steps)
    step = lambda s, b, k: masked_train_step(s, b, k, train_fn=train_fn, optimizer=optimizer)
    return jax.vmap(lambda s, p, k: training.scan_steps(step, s, data, p, k))(
        states, plan, step_keys)
