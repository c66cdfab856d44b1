"""Cohort training: a vmapped cohort equals training each client alone, for any client sizes."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.core import cohort, make_model, make_optimizer, training
from fdjax.data import load_synthetic

BATCH = 16
STEPS = 8  # plan rows: more than the largest client's 5 steps, a power of two


@functools.lru_cache(maxsize=None)
def setup():
    model = make_model("cnn6", input_shape=(8, 8, 1), num_classes=4, width=0.25)
    optimizer = make_optimizer()
    step = functools.partial(training.train_step, train_fn=model.train_fn, optimizer=optimizer)
    masked = functools.partial(cohort.masked_train_step, train_fn=model.train_fn,
                               optimizer=optimizer)
    return model.init(jax.random.key(0)), optimizer, {
        "alone_step": jax.jit(functools.partial(training.planned_step, step)),
        # epoch_plan's rows, padded to one shape so that every client shares one compiled step
        "alone_plan": jax.jit(training.padded_epoch, static_argnums=(2, 3)),
        "fold": jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None))),
        "epoch_plan": jax.jit(training.epoch_plan, static_argnums=(1, 2)),
        "cohort_step": jax.jit(functools.partial(cohort.cohort_planned_step, masked)),
        "cohort_plan": jax.jit(cohort.cohort_epoch_plan, static_argnums=(3, 4)),
        "cohort_init": jax.jit(functools.partial(cohort.cohort_init, optimizer=optimizer),
                               static_argnums=(1,)),
        "scan": jax.jit(functools.partial(cohort.scan_cohort_epoch, train_fn=model.train_fn,
                                          optimizer=optimizer, batch_size=BATCH),
                        static_argnames=("steps",)),
    }


def pool_of(sizes):
    data = load_synthetic(sum(sizes), (8, 8, 1), 4, seed=1).arrays()
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in data.items()}, offsets, np.asarray(sizes, np.int32)


def alone(params, data, size, key, epochs):
    """One client's local epochs exactly as ``LocalTrainer`` (loop driver) runs them.

    ``data`` holds the client's examples first; any rows after them are never read (the plan
    indexes only the first ``size``), which lets every client share one compiled step.
    """
    _, optimizer, fns = setup()
    state = training.init_train_state(params, optimizer)
    for epoch in range(epochs):
        plan_key, step_key = jax.random.split(jax.random.fold_in(key, epoch))
        plan = fns["alone_plan"](plan_key, size, BATCH, STEPS)
        for step in range(training.num_steps(size, BATCH)):
            state, _ = fns["alone_step"](state, data, plan, np.int32(step), step_key)
    return state


def in_cohort(params, pool, offsets, sizes, keys, epochs, steps):
    _, _, fns = setup()
    state = fns["cohort_init"](params, len(sizes))
    counts = np.zeros(len(sizes))
    for epoch in range(epochs):
        epoch_keys = fns["fold"](keys, epoch)
        plan, step_keys = fns["cohort_plan"](epoch_keys, sizes, offsets, BATCH, steps)
        for step in range(steps):
            state, stats = fns["cohort_step"](state, pool, plan, np.int32(step), step_keys)
            counts += np.asarray(stats["count"])
    return state, counts


def lane(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)  # on host arrays: no compiles


@pytest.mark.parametrize("sizes", [[40, 40, 40, 40], [5, 40, 70, 16]],
                         ids=["equal", "unequal"])
def test_a_cohort_ends_where_each_client_ends_alone(sizes):
    params, _, _ = setup()
    pool, offsets, sizes = pool_of(sizes)
    keys = jax.random.split(jax.random.key(7), len(sizes))
    # two epochs, and a plan padded beyond the longest client (5 steps) to a power-of-two bucket
    state, counts = in_cohort(params, pool, offsets, sizes, keys, epochs=2, steps=STEPS)
    state = jax.device_get(state)
    np.testing.assert_array_equal(counts, 2 * sizes)
    for i, (offset, size) in enumerate(zip(offsets, sizes)):
        own = {k: jnp.roll(v, -int(offset), axis=0) for k, v in pool.items()}
        expected = jax.device_get(alone(params, own, int(size), keys[i], epochs=2))
        chex.assert_trees_all_close(lane(state.params, i), expected.params, atol=1e-5, rtol=1e-4)
        # Adam took exactly the client's own steps: padded steps did not advance its counters
        assert int(lane(state.opt_state, i)[0].count) == 2 * training.num_steps(size, BATCH)
        chex.assert_trees_all_close(lane(state.opt_state, i), expected.opt_state, atol=1e-5,
                                    rtol=1e-4)


def test_scanned_cohort_epoch_matches_the_stepped_one():
    params, _, fns = setup()
    pool, offsets, sizes = pool_of([5, 40, 70, 16])
    keys = jax.random.split(jax.random.key(3), 4)
    stepped, counts = in_cohort(params, pool, offsets, sizes, keys, epochs=1, steps=STEPS)
    scanned, stats = fns["scan"](fns["cohort_init"](params, 4), pool,
                                 fns["fold"](keys, 0), sizes, offsets, steps=STEPS)
    np.testing.assert_array_equal(np.asarray(stats["count"]), counts)
    chex.assert_trees_all_close(scanned.params, stepped.params, atol=1e-5, rtol=1e-4)


def test_a_clients_plan_depends_only_on_its_key_and_size():
    _, _, fns = setup()
    keys = jax.random.split(jax.random.key(0), 3)
    sizes, offsets = np.asarray([37, 0, 9], np.int32), np.asarray([0, 0, 37], np.int32)
    (index, mask), _ = jax.device_get(fns["cohort_plan"](keys, sizes, offsets, 8, 8))
    (wider, _), _ = jax.device_get(fns["cohort_plan"](keys[:1], sizes[:1], offsets[:1], 8, 16))
    # every example exactly once, the padding masked; padding rows do not change the order
    assert sorted(index[0][mask[0] > 0].tolist()) == list(range(37))
    assert mask[1].sum() == 0 and mask[2].sum() == 9
    assert sorted(index[2][mask[2] > 0].tolist()) == list(range(37, 46))
    np.testing.assert_array_equal(wider[0, :8], index[0])
    # the same shuffle as a client's epoch alone
    plan_key = jax.random.split(keys[0])[0]
    alone_index, alone_mask = fns["epoch_plan"](plan_key, 37, 8)
    np.testing.assert_array_equal(alone_index, index[0, :5])
    np.testing.assert_array_equal(alone_mask, mask[0, :5])


@pytest.mark.parametrize("size", [0, 1, 2, 50, 1625, 1626, 3000])
def test_shuffled_order_is_jax_permutation_for_any_padded_length(size):
    # 1626 items and up take a second sorting round in jax.random.permutation; the padded order
    # must follow it there too, or a cohort member would see other batches than it sees alone.
    order = jax.jit(training.shuffled_order, static_argnums=2)
    for seed in range(2):
        key = jax.random.key(seed)
        expected = np.asarray(jax.random.permutation(key, size)) if size else np.zeros(0)
        for length in (max(size, 1), size + 37):
            got = np.asarray(order(key, size, length))
            np.testing.assert_array_equal(got[:size], expected)
            np.testing.assert_array_equal(np.sort(got[size:]), np.arange(size, length))
