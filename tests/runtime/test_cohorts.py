"""Cohorts in the runtime and client sampling: compiled shapes, accounting, schedules."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from fdjax.core import make_model, make_optimizer
from fdjax.data import load_synthetic
from fdjax.experiment import run
from fdjax.runtime import compiled
from fdjax.runtime.compiled import ClientPool, CohortTrainer, LocalTrainer, cohort_chunks
from fdjax.runtime.sampling import ClientSampler
from tests.runtime.test_methods import events, intervals, overlaps, tiny


@pytest.fixture
def traces(monkeypatch):
    """Counts how often each compiled program is traced (a trace is a compilation)."""
    counts: collections.Counter = collections.Counter()

    def compile_counted(fn, **jit_kwargs):
        name = f"program{len(counts)}"
        counts[name] = 0

        def traced(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return jax.jit(traced, **jit_kwargs)

    monkeypatch.setattr(compiled, "_compile", compile_counted)
    return counts


def test_cohort_chunks_bucket_steps_and_never_pad_a_lane():
    steps = [1, 1, 2, 3, 4, 3, 1, 9, 1, 1, 1]
    chunks = cohort_chunks(steps, max_lanes=4)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(steps)))
    for chunk in chunks:
        assert len(chunk) & (len(chunk) - 1) == 0 and len(chunk) <= 4  # a power of two
        most = max(steps[i] for i in chunk)
        assert all(most < 2 * steps[i] for i in chunk)  # nobody pads to twice its own steps
    # six one-step clients: one call of four, one of two
    assert sorted(len(c) for c in chunks if steps[c[0]] == 1) == [2, 4]


@pytest.fixture(scope="module")
def four_clients():
    """Four clients of a small CNN (1, 1, 3 and 3 steps an epoch at batch 16), and where
    ``Client.train``'s ``LocalTrainer`` leaves the third after two epochs: what both kinds of
    cohort lanes below must reproduce, trained (and compiled) once for both."""
    model = make_model("cnn6", input_shape=(8, 8, 1), num_classes=4, width=0.25)
    sizes = [5, 12, 40, 40]
    data = load_synthetic(sum(sizes), (8, 8, 1), 4, seed=2).arrays()
    edges = np.cumsum([0] + sizes)
    clients = [{k: v[a:b] for k, v in data.items()} for a, b in zip(edges, edges[1:])]
    keys = jax.random.split(jax.random.key(5), len(sizes))
    params = model.init(jax.random.key(0))
    alone = LocalTrainer(model, make_optimizer(), batch_size=16, driver="loop")
    state = alone.init(params)
    for epoch in range(2):
        key = jax.random.fold_in(jax.random.fold_in(keys[2], 3), epoch)
        state, _ = alone.epoch(state, jax.device_put(clients[2]), key)
    return model, sizes, clients, keys, params, state.params


@pytest.mark.parametrize("lanes", ["vmap", "sequential"])
def test_cohort_trainer_equals_local_training_and_compiles_each_shape_once(lanes, traces,
                                                                            four_clients):
    model, sizes, clients, keys, params, third_alone = four_clients
    pool = ClientPool.from_datasets(clients)  # two calls of two clients, buckets 1 and 4
    trainer = CohortTrainer(model, make_optimizer(), 16, driver="loop", lanes=lanes,
                            max_lanes=2)
    trained, metrics = trainer.train(params, pool, [0, 1, 2, 3], keys, version=3, epochs=2)
    assert [int(m["count"]) for m in metrics] == [2 * n for n in sizes]
    first = dict(traces)
    # the same clients in another order, paired differently: same shapes, so nothing compiles
    # again, and every client ends where it ended before
    order = [3, 1, 0, 2]
    again, _ = trainer.train(params, pool, order, keys, version=3, epochs=2)
    assert dict(traces) == first
    for position, client in enumerate(order):
        for got, want in zip(jax.tree_util.tree_leaves(again[position]),
                             jax.tree_util.tree_leaves(trained[client])):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    # and where Client.train's LocalTrainer epochs with the same keys leave it
    for got, want in zip(jax.tree_util.tree_leaves(trained[2]),
                         jax.tree_util.tree_leaves(third_alone)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_the_sampler_draws_per_round_from_the_seed_alone():
    sampler = ClientSampler(num_clients=1000, per_round=100, seed=3)
    rounds = [sampler(r) for r in range(20)]
    assert all(len(set(r)) == 100 and r == sorted(r) and 0 <= r[0] and r[-1] < 1000
               for r in rounds)
    assert rounds[4] == ClientSampler(1000, 100, seed=3)(4)  # no dependence on earlier draws
    assert rounds[4] != rounds[5] and rounds[4] != ClientSampler(1000, 100, seed=4)(4)
    assert len(set().union(*rounds)) > 800  # 20 rounds of 10% reach most clients
    assert ClientSampler(5, 5)(7) == list(range(5))


# three clients on one device; a cohort of three is one compiled call
COHORT = ["clients.devices=1", "clients.cohort_size=3", "stop.max_rounds=3",
          "stop.time_budget=100"]


def test_cohorts_keep_the_schedule_the_charges_and_the_learning_of_one_at_a_time_training():
    one_at_a_time = run(tiny("sync", *COHORT))
    cohort = run(tiny("sync", *COHORT, "clients.cohort=true"))
    ends = lambda r: [e["time"] for e in events(r, "round_end", "averaging")]
    assert len(ends(cohort)) == 3 and ends(cohort) == pytest.approx(ends(one_at_a_time))
    per_client = 0.01 * ((240 - 48) // 3)  # TINY's fixed cost: 0.01 s per example, 64 each
    for name in ("client0", "client1", "client2"):
        # each client is charged what it would be charged alone, once per round
        assert cohort.nodes[name]["busy"] == pytest.approx(3 * per_client)
        assert one_at_a_time.nodes[name]["busy"] == pytest.approx(3 * per_client)
    shared = sorted(cohort.devices["clients0"])
    assert len(shared) == 9 and {n for *_, n in shared} == {"client0", "client1", "client2"}
    for (_, end, _), (start, _, _) in zip(shared, shared[1:]):
        assert start >= end - 1e-9  # members' shares never overlap on the device
    for a, b in zip(cohort.rows, one_at_a_time.rows):
        assert a["time"] == b["time"]
        assert a["global_accuracy"] == pytest.approx(b["global_accuracy"], abs=0.02)
        assert a["small_accuracy"] == pytest.approx(b["small_accuracy"], abs=0.02)


@pytest.mark.parametrize("method", ["sync-fwd", "sync", "async-round", "async-continuous",
                                    "async-fwd", "fedavg-large"])
def test_every_method_trains_only_the_clients_it_samples(method):
    result = run(tiny(method, "clients.sample_count=2", "stop.max_rounds=3",
                      "stop.time_budget=100"))
    sampler = ClientSampler(3, 2, seed=0)
    ended = len(events(result, "round_end", "averaging"))
    rounds = events(result, "round_start", "averaging")[:ended]
    assert len(rounds) >= 3
    for event in rounds:
        assert event["clients"] == sampler(event["round"])
        trained = {e["node"] for e in events(result, "train_start")
                   if e["version"] == event["round"]}
        assert trained == {f"client{i}" for i in event["clients"]}
    assert [e["clients"] for e in events(result, "round_end", "averaging")] == [2] * len(
        events(result, "round_end", "averaging"))


def test_cohorts_on_the_real_clock_train_and_overlap_distillation():
    real = ["clients.devices=1", "clients.cohort=true", "clients.cohort_size=3",
            "stop.eval_interval=2"]
    run(tiny("async-continuous", *real, "stop.max_rounds=1"))  # compile first (virtual clock)
    result = run(tiny("async-continuous", *real, "clock=real", "stop.time_budget=8"))
    assert events(result, "round_end", "averaging")
    shared = intervals(result, "client0") + intervals(result, "client1") + intervals(
        result, "client2")
    assert overlaps(shared, intervals(result, "distillation"))
