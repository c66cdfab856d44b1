"""Flower as a peer oracle: fdjax's aggregation rules against ``flwr.server.strategy.aggregate``.

Flower (``flwr``, in the dev extra) is the most used federated-learning framework; its
aggregation functions are plain numpy over a list of ``(layers, num_examples)``. Where the two
libraries define a rule the same way, their results must agree on random inputs. The definitional
differences these tests allow, and nothing else:

* FedAvg: Flower sums ``w_i x_i`` in the arrays' own dtype, so on float32 inputs it carries
  float32 rounding; fdjax is compared with it to float32 tolerance, and with Flower run on
  float64 copies of the same inputs (a precise oracle) to within a few float32 ulps.
* Trimmed mean: both cut ``floor(fraction * n)`` values at each end; fdjax sums around the
  median, Flower does not, so they agree to float32 rounding, not bit for bit. Flower's strategy
  ``FedTrimmedAvg`` defaults to ``beta = 0.2``, fdjax's ``aggregation.trim_fraction`` to 0.1: the
  tests pass the fraction to both.
* Krum: the same score (sum of squared distances to the ``max(1, n - f - 2)`` nearest others);
  Flower computes distances in float64 from float32 differences, fdjax in float32, so where two
  clients' scores tie to within float32 rounding either pick is right (the test says so, and
  checks the scores really are that close). Multi-Krum: both average the ``m`` best-scored
  clients weighted by their example counts (Flower's ``aggregate_krum`` with ``to_keep = m``;
  Blanchard et al. average them unweighted).
* Median: the same definition (the mean of the two middle values for an even count): bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flwr.server.strategy import aggregate as flower
from hypothesis import given, settings
from hypothesis import strategies as st

from fdjax.core import aggregation as agg

aggregate = jax.jit(agg.aggregate, static_argnames=("rule",))
SHAPES = [(3, 4), (5,), (2, 2, 2)]


@st.composite
def rounds(draw, min_clients=1):
    """A round's client models (a list of float32 layers each) and example counts."""
    n = draw(st.integers(min_clients, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0]))
    layers = [[(offset + scale * rng.normal(size=s)).astype(np.float32) for s in SHAPES]
              for _ in range(n)]
    examples = [int(x) for x in rng.integers(1, 1000, n)]
    return layers, examples


def stacked(layers):
    return {f"layer{k}": np.stack([client[k] for client in layers]) for k in range(len(SHAPES))}


def as_list(tree):
    return [np.asarray(tree[f"layer{k}"]) for k in range(len(SHAPES))]


def results(layers, examples, dtype=np.float32):
    return [([x.astype(dtype) for x in client], n) for client, n in zip(layers, examples)]


@settings(deadline=None, max_examples=40)
@given(rounds())
def test_fedavg_agrees_with_flowers_aggregate(case):
    layers, examples = case
    ours = as_list(aggregate(stacked(layers), np.asarray(examples, np.float32), rule="fedavg"))
    theirs32 = flower.aggregate(results(layers, examples))
    precise = flower.aggregate(results(layers, examples, np.float64))
    for mine, loose, exact in zip(ours, theirs32, precise):
        np.testing.assert_allclose(mine, loose, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
        np.testing.assert_array_max_ulp(mine, exact.astype(np.float32), maxulp=4)


@settings(deadline=None, max_examples=40)
@given(rounds())
def test_median_is_flowers_bit_for_bit(case):
    layers, examples = case
    ours = as_list(aggregate(stacked(layers), np.asarray(examples, np.float32), rule="median"))
    for mine, theirs in zip(ours, flower.aggregate_median(results(layers, examples))):
        np.testing.assert_array_equal(mine, theirs)


@settings(deadline=None, max_examples=40)
@given(rounds(), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_trimmed_mean_agrees_with_flowers(case, fraction):
    layers, examples = case
    rule = agg.AggregationRule("trimmed_mean", trim_fraction=fraction)
    ours = as_list(aggregate(stacked(layers), np.asarray(examples, np.float32), rule=rule))
    theirs = flower.aggregate_trimmed_avg(results(layers, examples), fraction)
    for mine, other in zip(ours, theirs):
        np.testing.assert_allclose(mine, other, rtol=2e-6, atol=2e-6 * np.abs(other).max())


def flower_scores(layers, f):
    """Flower's Krum scores, as its ``aggregate_krum`` computes them."""
    distances = flower._compute_distances([client for client in layers])
    k = max(1, len(layers) - f - 2)
    return np.asarray([np.sum(row[np.argsort(row)[1:k + 1]]) for row in distances])


@settings(deadline=None, max_examples=40)
@given(rounds(min_clients=3), st.integers(0, 3))
def test_krum_picks_flowers_model(case, f):
    layers, examples = case
    rule = agg.AggregationRule("krum", num_byzantine=f)
    ours = as_list(aggregate(stacked(layers), np.asarray(examples, np.float32), rule=rule))
    theirs = flower.aggregate_krum(results(layers, examples), num_malicious=f, to_keep=0)
    if all(np.array_equal(a, b) for a, b in zip(ours, theirs)):
        return
    scores = flower_scores(layers, f)  # a different pick only where the scores tie in float32
    mine = next(i for i, client in enumerate(layers)
                if all(np.array_equal(a, b) for a, b in zip(ours, client)))
    assert scores[mine] == pytest.approx(scores.min(), rel=1e-5)


@settings(deadline=None, max_examples=40)
@given(rounds(min_clients=3), st.integers(0, 2), st.integers(1, 9))
def test_multi_krum_agrees_with_flowers(case, f, keep):
    layers, examples = case
    keep = min(keep, len(layers))
    scores = np.sort(flower_scores(layers, f))
    if keep < len(layers) and scores[keep] <= scores[keep - 1] * (1 + 1e-5):
        return  # the m-th and (m+1)-th tie in float32: either set is Multi-Krum's
    rule = agg.AggregationRule("multi_krum", num_byzantine=f, multi_krum_keep=keep)
    ours = as_list(aggregate(stacked(layers), np.asarray(examples, np.float32), rule=rule))
    theirs = flower.aggregate_krum(results(layers, examples), num_malicious=f, to_keep=keep)
    for mine, other in zip(ours, theirs):
        np.testing.assert_allclose(mine, other, rtol=1e-5, atol=1e-6 * np.abs(other).max())

