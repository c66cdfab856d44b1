"""Partitions: disjoint, deterministic, complete; Dirichlet skew follows alpha; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdjax.data import DataError, label_skew, load_synthetic, partition, split_federated


def labels_for(n, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int32)


SCHEME_KWARGS = [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("dirichlet", {"alpha": 10.0}),
                 ("dirichlet_client", {"alpha": 0.1}), ("dirichlet_client", {"alpha": 5.0}),
                 ("shards", {"shards_per_client": 2})]


@settings(deadline=None, max_examples=30)
@given(st.integers(40, 600), st.integers(1, 12), st.integers(0, 10_000),
       st.sampled_from(SCHEME_KWARGS))
def test_partitions_are_disjoint_complete_and_deterministic(n, clients, seed, scheme):
    name, kwargs = scheme
    labels = labels_for(n, seed=seed)
    parts = partition(labels, clients, name, seed=seed, **kwargs)
    assert len(parts) == clients and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # every example exactly once
    again = partition(labels, clients, name, seed=seed, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_different_seeds_give_different_partitions():
    labels = labels_for(500)
    a = partition(labels, 5, "iid", seed=1)
    b = partition(labels, 5, "iid", seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = labels_for(5000)
    skews = [np.mean([label_skew(labels, partition(labels, 10, "dirichlet", seed=s, alpha=a), 10)
                      for s in range(3)]) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_hsu_client_mixes_have_the_dirichlet_mean_and_variance(alpha):
    """Hsu et al.: q ~ Dirichlet(alpha * p), so E[q_c] = p_c and Var[q_c] = p_c (1 - p_c) /
    (alpha + 1), plus the multinomial noise of drawing n examples. Checked on the first half
    of the clients, before classes run out bends the mixes (see the docstring)."""
    labels = np.repeat(np.arange(10), 10_000).astype(np.int32)  # p = 0.1 each
    clients, n = 1000, 100
    parts = partition(labels, clients, "dirichlet_client", seed=7, alpha=alpha)
    assert {len(p) for p in parts} == {n}
    mixes = np.stack([np.bincount(labels[p], minlength=10) / n for p in parts[:clients // 2]])
    expected = 0.1 * 0.9 * (n + alpha) / (n * (1 + alpha))  # Dirichlet-multinomial
    np.testing.assert_allclose(mixes.mean(0), 0.1, atol=4 * np.sqrt(expected / len(mixes)))
    assert mixes.var(0).mean() == pytest.approx(expected, rel=0.15)


def test_hsu_split_is_more_skewed_than_the_per_class_one_for_the_same_alpha():
    labels = labels_for(6000)
    for alpha in (0.1, 1.0, 10.0):
        per_class = label_skew(labels, partition(labels, 20, "dirichlet", seed=0, alpha=alpha), 10)
        per_client = label_skew(labels, partition(labels, 20, "dirichlet_client", seed=0,
                                                  alpha=alpha), 10)
        assert per_client > per_class


def test_proxy_split_is_held_out_and_labels_follow_the_setting():
    train = load_synthetic(300, (8, 8, 1), 5, seed=0)
    fed = split_federated(train, 4, scheme="dirichlet", alpha=0.5, proxy_size=60, seed=3)
    used = np.concatenate(fed.client_indices + [fed.proxy_indices])
    assert len(used) == 300 and len(np.unique(used)) == 300
    assert len(fed.proxy) == 60 and fed.proxy.labels is None
    assert sum(len(c) for c in fed.clients) == 240
    for client, idx in zip(fed.clients, fed.client_indices):
        np.testing.assert_array_equal(client.images, train.images[idx])
        np.testing.assert_array_equal(client.labels, train.labels[idx])
    kept = split_federated(train, 4, proxy_size=60, keep_proxy_labels=True, seed=3)
    np.testing.assert_array_equal(kept.proxy.labels, train.labels[kept.proxy_indices])
    np.testing.assert_array_equal(kept.proxy_indices, fed.proxy_indices)


@pytest.mark.parametrize("call, message", [
    (lambda: partition(labels_for(5), 6, "iid"), "6 clients but only 5"),
    (lambda: partition(labels_for(50), 3, "dirichlet", alpha=0.0), "alpha must be > 0"),
    (lambda: partition(labels_for(50), 3, "random"), "unknown partition scheme"),
    (lambda: partition(labels_for(10), 3, "shards", shards_per_client=4), "shards needs"),
    (lambda: split_federated(load_synthetic(20, (8, 8, 1)), 2, proxy_size=20), "proxy_size"),
])
def test_bad_partition_requests_name_the_problem(call, message):
    with pytest.raises(DataError, match=message):
        call()
