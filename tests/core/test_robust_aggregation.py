"""Property tests of the robust aggregation rules: coordinate-wise median and trimmed mean."""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdjax.core import aggregation as agg

from tests.core.test_aggregation import clients, close, fedavg, make_tree

median = jax.jit(agg.coordinate_median)
trimmed = jax.jit(agg.trimmed_mean, static_argnames=("trim_fraction",))
aggregate = jax.jit(agg.aggregate, static_argnames=("rule", "trim_fraction"))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@settings(deadline=None, max_examples=15)
@given(clients(max_clients=4), st.sampled_from(agg.AGGREGATION_RULES))
def test_identical_clients_give_that_model_back_exactly_under_every_rule(case, rule):
    trees, weights, _ = case
    result = aggregate(agg.stack_trees([trees[0]] * len(trees)), weights, rule=rule,
                       trim_fraction=0.2)
    chex.assert_trees_all_equal(result, trees[0])


@settings(deadline=None, max_examples=15)
@given(clients(min_clients=2, max_clients=5), st.sampled_from(["median", "trimmed_mean"]))
def test_robust_rules_are_permutation_invariant_and_stay_within_client_range(case, rule):
    trees, weights, rng = case
    order = rng.permutation(len(trees))
    stacked = agg.stack_trees(trees)
    result = aggregate(stacked, weights, rule=rule, trim_fraction=0.25)
    close(result, aggregate(agg.stack_trees([trees[i] for i in order]), weights[order], rule=rule,
                            trim_fraction=0.25))
    for out, leaf in zip(leaves(result), leaves(stacked)):
        assert np.all(out >= leaf.min(0) - 1e-4) and np.all(out <= leaf.max(0) + 1e-4)


@settings(deadline=None, max_examples=10)
@given(clients(max_clients=4))
def test_trimming_nothing_is_the_unweighted_mean(case):
    trees, _, _ = case
    stacked = agg.stack_trees(trees)
    close(trimmed(stacked, trim_fraction=0.0),
          fedavg(stacked, np.ones(len(trees), np.float32)))


@settings(deadline=None, max_examples=15)
@given(clients(min_clients=3, max_clients=5), st.floats(1e3, 1e30), st.integers(0, 7),
       st.sampled_from([-1.0, 1.0]))
def test_one_outlier_cannot_move_robust_rules_outside_the_honest_range(case, size, position,
                                                                        sign):
    """Bounded influence: however large one client's model is, the median and a trimmed mean
    that trims at least one value per end stay within the honest clients' coordinate range;
    FedAvg does not."""
    trees, weights, _ = case
    honest = agg.stack_trees(trees)
    outlier = jax.tree_util.tree_map(lambda x: x * 0 + sign * size, trees[0])
    position %= len(trees) + 1
    everyone = agg.stack_trees(trees[:position] + [outlier] + trees[position:])
    fraction = 1.0 / (len(trees) + 1) + 1e-6  # trims exactly one value at each end
    for result in (median(everyone), trimmed(everyone, trim_fraction=fraction)):
        for out, leaf in zip(leaves(result), leaves(honest)):
            assert np.all(np.isfinite(out))
            assert np.all(out >= leaf.min(0) - 1e-3) and np.all(out <= leaf.max(0) + 1e-3)
    averaged = fedavg(everyone, np.ones(len(trees) + 1, np.float32))
    assert max(np.abs(x).max() for x in leaves(averaged)) > 100


def test_median_and_trimmed_mean_by_hand():
    values = np.asarray([[1.0], [2.0], [100.0], [3.0], [-50.0]], np.float32)
    stacked = {"w": values}
    np.testing.assert_allclose(median(stacked)["w"], [2.0])
    np.testing.assert_allclose(trimmed(stacked, trim_fraction=0.2)["w"], [2.0])  # drops -50, 100
    np.testing.assert_allclose(median({"w": values[:4]})["w"], [2.5])  # even: mean of middle two
    assert agg.trimmed_count(5, 0.2) == 1 and agg.trimmed_count(4, 0.2) == 0


@pytest.mark.parametrize("call, message", [
    (functools.partial(agg.trimmed_mean, trim_fraction=0.5), "trim_fraction"),
    (functools.partial(agg.aggregate, weights=np.ones(2), rule="krum"), "unknown aggregation rule"),
])
def test_bad_rule_settings_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call(agg.stack_trees([make_tree(np.random.default_rng(0))] * 2))
