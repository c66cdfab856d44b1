"""Property tests of FedAvg, streaming FedAvg, staleness mixing and update validation."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdjax.core import aggregation as agg

fedavg = jax.jit(agg.fedavg)
SHAPES = {"conv": {"kernel": (2, 3), "bias": (3,)}, "dense": (4,)}


def make_tree(rng: np.random.Generator, scale: float = 10.0):
    return jax.tree_util.tree_map(
        lambda shape: jnp.asarray(rng.uniform(-scale, scale, size=shape), jnp.float32), SHAPES,
        is_leaf=lambda x: isinstance(x, tuple))


@st.composite
def clients(draw, min_clients=1, max_clients=6):
    n = draw(st.integers(min_clients, max_clients))
    seed = draw(st.integers(0, 2**31 - 1))
    weights = draw(st.lists(st.floats(0.0, 50.0), min_size=n, max_size=n))
    if sum(weights) < 1e-3:
        weights[0] = 1.0
    rng = np.random.default_rng(seed)
    return [make_tree(rng) for _ in range(n)], np.asarray(weights, np.float32), rng


def close(a, b, atol=1e-4):
    chex.assert_trees_all_close(a, b, atol=atol, rtol=1e-5)


@settings(deadline=None, max_examples=40)
@given(clients(min_clients=2))
def test_fedavg_is_permutation_invariant(case):
    trees, weights, rng = case
    order = rng.permutation(len(trees))
    close(fedavg(agg.stack_trees(trees), weights),
          fedavg(agg.stack_trees([trees[i] for i in order]), weights[order]))


@settings(deadline=None, max_examples=40)
@given(clients(), st.floats(1e-2, 1e2))
def test_fedavg_is_invariant_to_scaling_all_weights(case, factor):
    trees, weights, _ = case
    stacked = agg.stack_trees(trees)
    close(fedavg(stacked, weights), fedavg(stacked, weights * np.float32(factor)))


@settings(deadline=None, max_examples=25)
@given(clients())
def test_identical_clients_give_that_model_back_exactly(case):
    trees, weights, _ = case
    result = fedavg(agg.stack_trees([trees[0]] * len(trees)), weights)
    chex.assert_trees_all_equal(result, trees[0])


@settings(deadline=None, max_examples=40)
@given(clients())
def test_each_coordinate_lies_within_client_min_and_max(case):
    trees, weights, _ = case
    stacked = agg.stack_trees(trees)
    result = fedavg(stacked, weights)
    for avg, leaf in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(stacked)):
        assert np.all(np.asarray(avg) >= np.asarray(leaf.min(0)) - 1e-4)
        assert np.all(np.asarray(avg) <= np.asarray(leaf.max(0)) + 1e-4)


def streamed(trees, weights) -> agg.StreamingAverage:
    """The streaming average's state after adding every tree in turn."""
    state = agg.streaming_init(trees[0], weights[0])
    for tree, weight in zip(trees[1:], weights[1:]):
        state = agg.streaming_add(state, tree, weight)
    return state


@settings(deadline=None, max_examples=40)
@given(clients())
def test_streaming_equals_batch(case):
    trees, weights, _ = case
    state = streamed(trees, weights)
    close(agg.streaming_result(state), fedavg(agg.stack_trees(trees), weights))


@settings(deadline=None, max_examples=40)
@given(clients(), st.integers(0, 6))
def test_zero_weight_client_changes_nothing(case, position):
    trees, weights, rng = case
    position = position % (len(trees) + 1)
    with_extra = trees[:position] + [make_tree(rng, 1000.0)] + trees[position:]
    extra_weights = np.insert(weights, position, 0.0)
    close(fedavg(agg.stack_trees(with_extra), extra_weights),
          fedavg(agg.stack_trees(trees), weights), atol=5e-3)


def test_fedavg_weights_by_examples():
    a = {"w": jnp.zeros(3)}
    b = {"w": jnp.ones(3) * 4.0}
    result = fedavg(agg.stack_trees([a, b]), np.asarray([3.0, 1.0]))
    np.testing.assert_allclose(result["w"], 1.0)


def test_mismatched_trees_are_rejected():
    a = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError):
        agg.stack_trees([a, {"w": jnp.zeros(3), "b": jnp.zeros(1)}])
    with pytest.raises(ValueError):
        agg.stack_trees([a, {"w": jnp.zeros(4)}])
    assert agg.validate_update(a, {"v": jnp.zeros(3)}) is not None


@pytest.mark.parametrize("weights, message", [
    ([1.0, -1.0], "non-negative"), ([0.0, 0.0], "sum to zero"), ([1.0, np.nan], "finite"),
    ([1.0], "2 client models"),
])
def test_bad_weights_are_rejected_with_a_reason(weights, message):
    stacked = agg.stack_trees([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])
    with pytest.raises(ValueError, match=message):
        agg.fedavg(stacked, np.asarray(weights))


# --- staleness mixing -----------------------------------------------------------------------

mix = jax.jit(agg.mix)


@settings(deadline=None, max_examples=20)
@given(st.integers(0, 2**31 - 1))
def test_mixing_weight_zero_leaves_the_server_model_unchanged(seed):
    rng = np.random.default_rng(seed)
    server, update = make_tree(rng), make_tree(rng)
    chex.assert_trees_all_equal(mix(server, update, 0.0), server)
    close(mix(server, update, 1.0), update)


@pytest.mark.parametrize("kind", agg.STALENESS_KINDS)
def test_staleness_weight_is_one_when_fresh_and_never_increases(kind):
    weights = np.asarray(agg.staleness_weight(jnp.arange(50), kind, a=0.5, b=4))
    assert weights[0] == pytest.approx(1.0)
    assert np.all(np.diff(weights) <= 0)
    if kind != "constant":
        assert weights[-1] < weights[5] < 1.0


def test_staleness_mix_decreases_with_staleness():
    server, update = {"w": jnp.zeros(1)}, {"w": jnp.ones(1)}
    moved = [float(agg.staleness_mix(server, update, s, 0.6)["w"][0]) for s in (0, 1, 5, 20)]
    assert moved[0] == pytest.approx(0.6)
    assert moved == sorted(moved, reverse=True) and moved[-1] > 0


def test_staleness_settings_are_checked():
    with pytest.raises(ValueError, match="unknown staleness"):
        agg.staleness_weight(1, "linear")
    with pytest.raises(ValueError, match="alpha"):
        agg.staleness_mix({"w": jnp.zeros(1)}, {"w": jnp.zeros(1)}, 0, 1.5)


# --- validation -------------------------------------------------------------------------------

REFERENCE = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.zeros(4)},
                        "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}


def with_leaf(path, value):
    tree = jax.tree_util.tree_map(lambda x: x, REFERENCE)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


@pytest.mark.parametrize("update, reason", [
    (with_leaf(("params", "Dense_0", "bias"), jnp.asarray([0.0, np.nan])), "NaN"),
    (with_leaf(("params", "Dense_0", "bias"), jnp.asarray([np.inf, 0.0])), "Inf"),
    (with_leaf(("params", "Dense_0", "kernel"), jnp.ones((4, 3))), "shape"),
    (with_leaf(("params", "Conv_0", "bias"), jnp.zeros(4, jnp.float16)), "dtype"),
    (with_leaf(("params", "Conv_0", "bias"), jnp.zeros(4, jnp.int32)), "dtype"),
    ({"params": {"Conv_0": REFERENCE["params"]["Conv_0"],
                 "Dense_0": {"kernel": jnp.ones((4, 2))}}}, "missing leaf params/Dense_0/bias"),
    (with_leaf(("params", "Dense_1"), jnp.zeros(2)), "unexpected leaf params/Dense_1"),
    (with_leaf(("params", "Dense_0", "bias"), "0, 0"), "not an array"),
])
def test_validation_rejects_each_kind_of_bad_update(update, reason):
    result = agg.validate_update(REFERENCE, update)
    assert result is not None and reason in result


def test_validation_accepts_a_good_update_and_bounds_the_change():
    good = jax.tree_util.tree_map(lambda x: x + 0.01, REFERENCE)
    assert agg.validate_update(REFERENCE, good) is None
    far = jax.tree_util.tree_map(lambda x: x + 10.0, REFERENCE)
    assert "above the bound" in agg.validate_update(REFERENCE, far, max_delta_norm=1.0)
    assert agg.validate_update(REFERENCE, good, max_delta_norm=1.0) is None


# --- accuracy: within a few ulp of float64, whatever the order ------------------------------

EPS32 = float(np.finfo(np.float32).eps)


def fedavg64(trees, weights):
    """The float64 reference: ``sum_i w_i x_i / sum_i w_i``."""
    w = np.asarray(weights, np.float64)
    return jax.tree_util.tree_map(
        lambda *xs: np.tensordot(w, np.stack([np.asarray(x, np.float64) for x in xs]), 1)
        / w.sum(), *trees)


def assert_within_ulps(result, trees, weights, ulps=4):
    """Within ``ulps`` float32 spacings of the float64 mean, plus the double-float bound
    ``eps^2 * sum w|x| / sum w`` that only matters where the mean cancels to almost nothing."""
    w = np.asarray(weights, np.float64)
    ref = fedavg64(trees, weights)
    spread = jax.tree_util.tree_map(
        lambda *xs: np.tensordot(w, np.abs(np.stack([np.asarray(x, np.float64) for x in xs])), 1)
        / w.sum(), *trees)
    for got, want, size in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(ref),
                               jax.tree_util.tree_leaves(spread)):
        bound = ulps * np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        bound += 16 * EPS32 ** 2 * size
        error = np.abs(np.asarray(got, np.float64) - want)
        assert np.all(error <= bound), f"max error {error.max():.3g}, bound {bound.min():.3g}"


@st.composite
def far_light_clients(draw):
    """Clients near one model, a few light ones far away, weights over many magnitudes."""
    n = draw(st.integers(2, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    base = draw(st.sampled_from([0.0, 1.0, -3e3, 1e5]))
    trees = [jax.tree_util.tree_map(lambda x: x + np.float32(base), make_tree(rng, 1.0))
             for _ in range(n)]
    far = draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True))
    offset = draw(st.sampled_from([1e3, 1e6, -1e6, 3e7]))
    scale = draw(st.sampled_from([1.0, 1e-20, 1e20, 1e33]))
    weights = np.asarray([draw(st.sampled_from([1.0, 7.0, 1000.0, 123456.0])) for _ in range(n)])
    for i in far:
        trees[i] = jax.tree_util.tree_map(lambda x: (x + np.float32(offset)).astype(np.float32),
                                          trees[i])
        weights[i] = 1.0
    return trees, (weights * scale).astype(np.float32), rng


@settings(deadline=None, max_examples=60)
@given(far_light_clients())
def test_fedavg_is_within_a_few_ulp_of_float64_in_every_order(case):
    trees, weights, rng = case
    for order in (np.arange(len(trees)), np.arange(len(trees))[::-1],
                  rng.permutation(len(trees))):
        ordered = [trees[i] for i in order]
        result = fedavg(agg.stack_trees(ordered), weights[order])
        assert_within_ulps(result, ordered, weights[order])


def test_a_far_light_client_first_or_last_gives_the_same_average():
    """Weight 1 at an offset of 1e6 against 3 x 1000 near 0: anchoring on the first client
    was off by 0.13 when the far one came first, and 5e-5 when last."""
    rng = np.random.default_rng(1)
    near = [{"w": jnp.asarray(rng.normal(size=64), jnp.float32)} for _ in range(3)]
    far = {"w": jnp.asarray(1e6 + rng.normal(size=64), jnp.float32)}
    weights = np.asarray([1.0, 1000.0, 1000.0, 1000.0], np.float32)
    first = fedavg(agg.stack_trees([far] + near), weights)
    last = fedavg(agg.stack_trees(near + [far]), weights[::-1].copy())
    assert_within_ulps(first, [far] + near, weights, ulps=2)
    assert_within_ulps(last, near + [far], weights[::-1], ulps=2)
    np.testing.assert_array_max_ulp(np.asarray(first["w"]), np.asarray(last["w"]), maxulp=2)


def test_weights_that_do_not_fit_float32_are_rejected_and_huge_ones_that_do_work():
    stacked = agg.stack_trees([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])
    with pytest.raises(ValueError, match="does not fit float32"):
        agg.fedavg(stacked, np.asarray([1e39, 1.0]))
    with pytest.raises(ValueError, match="sum to zero"):
        agg.fedavg(stacked, np.asarray([1e-50, 0.0]))
    np.testing.assert_allclose(agg.fedavg(stacked, np.asarray([3e38, 1e38]))["w"], 0.25)
    np.testing.assert_allclose(fedavg(stacked, np.asarray([3e38, 3e38], np.float32))["w"], 0.5)


@settings(deadline=None, max_examples=30)
@given(far_light_clients())
def test_streaming_is_as_accurate_as_batch(case):
    trees, weights, _ = case
    state = streamed(trees, weights)
    assert_within_ulps(agg.streaming_result(state, like=trees[0]), trees, weights)


def test_this_module_compiles_with_xlas_optimisations_off():
    """``tests/conftest.py`` lists this module in ``QUICK_COMPILE``: its programs, and those of
    any process it starts, are compiled with XLA's optimisations off."""
    assert jax.config.read("jax_disable_most_optimizations")
    assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"


def _per_leaf(rule: str, stacked, w):
    """The rules as they were computed before ``coordinatewise``: one leaf at a time."""
    from fdjax.core.compensated import weighted_mean

    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    k = agg.trimmed_count(n, 0.25)

    def one(leaf):
        values = leaf.astype(jnp.float32)
        if rule == "fedavg":
            out = weighted_mean(values, w)
        elif rule == "median":
            out = jnp.median(values, axis=0)
        else:
            centre = jnp.median(values, axis=0)
            out = centre + jnp.mean(jnp.sort(values - centre[None], axis=0)[k:n - k], axis=0)
        return out.astype(leaf.dtype)
    return jax.tree_util.tree_map(one, stacked)


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean"])
@pytest.mark.parametrize("clients", [3, 5])
def test_all_leaves_at_once_give_the_per_leaf_results_bit_for_bit(rule, clients):
    """FedAvg, the median and the trimmed mean run over every leaf joined into one matrix (one
    compiled pass, not one per leaf); each coordinate is computed alone, so every output bit
    equals the leaf-by-leaf result, whatever the leaves' shapes and dtypes."""
    rng = np.random.default_rng(clients)
    shapes = {"conv": ((3, 3, 2, 4), jnp.float32), "bias": ((4,), jnp.float32),
              "half": ((5, 2), jnp.bfloat16), "scalar": ((), jnp.float32),
              "stats": ((1, 3), jnp.float16)}
    stacked = {name: jnp.asarray(rng.normal(size=(clients,) + shape) * 10 ** rng.uniform(
        -3, 3, size=(clients,) + shape), dtype) for name, (shape, dtype) in shapes.items()}
    weights = jnp.asarray(rng.integers(1, 500, clients), jnp.float32)
    want = _per_leaf(rule, stacked, weights)
    run = jax.jit(lambda s, w: agg.aggregate(s, w, agg.AggregationRule(rule, 0.25)))
    for got in (run(stacked, weights),
                agg.aggregate(stacked, weights, agg.AggregationRule(rule, 0.25))):
        for name in shapes:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            np.testing.assert_array_equal(np.asarray(got[name], np.float32),
                                          np.asarray(want[name], np.float32), err_msg=name)


def test_the_averaging_program_does_not_grow_with_the_number_of_leaves():
    """One pass over the joined leaves: a model of 40 leaves traces FedAvg's arithmetic (its
    multiplications) as often as a model of 2; per leaf it was 20 times as often."""
    def multiplications(leaves: int) -> int:
        stacked = {f"w{i}": jnp.ones((3, 4, 2)) for i in range(leaves)}
        jaxpr = jax.make_jaxpr(agg.fedavg)(stacked, jnp.ones(3))
        return sum(str(e.primitive) == "mul" for e in jaxpr.jaxpr.eqns)

    assert multiplications(40) == multiplications(2) > 0
