"""FedBuff (``fdjax/methods/fedbuff.py``): its server step and its schedule.

What every method must do (learn, reject garbage, sample, resume) is in
``test_method_contract.py``; here is what is FedBuff's own.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.core import aggregation
from fdjax.experiment import run

from tests.runtime.test_methods import events, tiny

SPEEDS = "clients.speeds=[1.0, 0.5, 0.125]"  # the slowest client 8x slower than the fastest


def tree(*values):
    return {"w": jnp.asarray(values, jnp.float32), "b": {"c": jnp.asarray([values[0]] * 2)}}


def test_with_no_staleness_the_step_is_fedavg_of_the_buffer():
    params = tree(0.0, 1.0, 2.0)
    models = [tree(1.0, 2.0, 3.0), tree(3.0, -1.0, 0.5), tree(0.25, 0.0, 8.0)]
    examples = np.asarray([10, 30, 60], np.float32)
    stacked = aggregation.stack_trees(models)
    step = aggregation.buffered_update(params, stacked, aggregation.stack_trees([params] * 3),
                                       examples, np.zeros(3, np.int32))
    expected = aggregation.fedavg(stacked, examples)
    for a, b in zip(jax.tree_util.tree_leaves(step), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_the_servers_programs_stack_the_models_inside_and_give_the_core_s_result():
    from fdjax.methods.fedbuff import buffered_step
    from fdjax.runtime.nodes import aggregate_updates

    params = tree(0.0, 1.0, 2.0)
    models = [tree(1.0, 2.0, 3.0), tree(3.0, -1.0, 0.5), tree(0.25, 0.0, 8.0)]
    bases = [params, tree(0.5, 0.5, 0.5), params]
    examples, staleness = np.asarray([10, 30, 60], np.float32), np.asarray([0, 2, 1], np.int32)
    rule = aggregation.AggregationRule("median")
    for got, want in [
            (aggregate_updates(models, examples, rule=rule),
             aggregation.aggregate(aggregation.stack_trees(models), examples, rule=rule)),
            (buffered_step(params, models, bases, examples, staleness, kind="hinge", a=1.0,
                           b=2.0, clip_norm=None),
             aggregation.buffered_update(params, aggregation.stack_trees(models),
                                         aggregation.stack_trees(bases), examples, staleness,
                                         kind="hinge", a=1.0, b=2.0))]:
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,a,b,staleness,weight", [
    ("constant", 0.5, 4.0, 7, 1.0), ("polynomial", 0.5, 4.0, 3, 0.5),
    ("hinge", 1.0, 2.0, 2, 1.0), ("hinge", 1.0, 2.0, 4, 1 / 3)])
def test_a_stale_change_counts_by_the_staleness_function_of_its_own_base(kind, a, b, staleness,
                                                                         weight):
    params, base = tree(5.0, 5.0, 5.0), tree(1.0, 1.0, 1.0)  # it was served an older model
    model = tree(3.0, 0.0, 1.0)  # its change from what it was served: +2, -1, 0
    step = aggregation.buffered_update(
        params, aggregation.stack_trees([model]), aggregation.stack_trees([base]),
        np.asarray([7.0]), np.asarray([staleness]), kind=kind, a=a, b=b, server_lr=0.5)
    np.testing.assert_allclose(step["w"], 5.0 + 0.5 * weight * np.asarray([2.0, -1.0, 0.0]),
                               rtol=1e-6)


def test_clipping_bounds_each_change_before_it_is_weighted():
    params = tree(0.0, 0.0, 0.0)
    big, small = tree(300.0, 400.0, 0.0), tree(0.03, 0.04, 0.0)  # ||w change|| 500 and 0.05
    step = aggregation.buffered_update(
        params, aggregation.stack_trees([big, small]), aggregation.stack_trees([params] * 2),
        np.asarray([1.0, 1.0]), np.zeros(2, np.int32), clip_norm=1.0)
    # the big change (norm 500 with its bias leaves) comes down to norm 1; the small one stays
    norm_big = np.sqrt(300.0**2 + 400.0**2 + 2 * 300.0**2)
    np.testing.assert_allclose(step["w"][:2], 0.5 * (np.asarray([300.0, 400.0]) / norm_big
                                                     + np.asarray([0.03, 0.04])), rtol=1e-5)


def client_idle(result) -> dict[str, float]:
    return {name: node["idle"] for name, node in result.nodes.items()
            if name.startswith("client")}


def test_clients_never_wait_for_a_round_and_every_publish_takes_k_updates():
    fedbuff = run(tiny("fedbuff", SPEEDS, "aggregation.buffer_size=3", "stop.time_budget=9"))
    rounds = run(tiny("async-continuous", SPEEDS, "stop.time_budget=9"))
    ends = events(fedbuff, "round_end", "averaging")
    assert len(ends) >= 4 and all(e["clients"] == 3 for e in ends)
    # a FedBuff client waits only for its update and its next model to cross the network
    # (latency 0.05 s each way, plus the bytes) ...
    starts = [e["node"] for e in events(fedbuff, "train_start")]
    for name, idle in client_idle(fedbuff).items():
        assert idle <= 0.15 * starts.count(name), (name, idle, starts.count(name))
    # ... where a round's fast clients wait for its slowest
    assert client_idle(rounds)["client0"] > 5 * client_idle(fedbuff)["client0"]
    # the fast client contributes more of the published models than the slow one
    trained = [e["node"] for e in events(fedbuff, "train_end")]
    assert trained.count("client0") > 3 * trained.count("client2")


def test_updates_beyond_max_staleness_are_dropped_and_counted():
    result = run(tiny("fedbuff", SPEEDS, "aggregation.max_staleness=0", "stop.time_budget=9"))
    dropped = events(result, "stale_dropped", "averaging")
    assert dropped and all(e["staleness"] > 0 for e in dropped)
    assert result.rows[-1]["stale_dropped"] == len(dropped)
    kept = run(tiny("fedbuff", SPEEDS, "stop.time_budget=9"))
    assert kept.rows[-1]["stale_dropped"] == 0
    assert kept.rows[-1]["late"] >= len(dropped)  # without the bound those were buffered


def test_the_staleness_settings_reach_the_server():
    cfg = tiny("fedbuff", "aggregation.staleness=hinge", "aggregation.staleness_a=2",
               "aggregation.staleness_b=1", "aggregation.buffer_size=4",
               "aggregation.server_learning_rate=0.5", "aggregation.max_staleness=6")
    from fdjax.methods import get_method

    options = get_method("fedbuff").options(cfg)
    assert options == {"buffer_size": 4, "max_staleness": 6, "buffer_staleness": "hinge",
                       "buffer_staleness_a": 2.0, "buffer_staleness_b": 1.0, "server_lr": 0.5}
