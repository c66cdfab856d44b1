"""Sharded-cohort checks, run in a process of their own that has four (virtual CPU) devices.

JAX fixes its device count when it starts, and the test suite's process has already started it
with one device, so ``tests/runtime/test_cohort_sharding.py`` runs this module as
``python -m tests.runtime.sharded_cohort_check trainer,run`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and asserts on the JSON it prints last.
The checks only measure here; the tests decide what passes.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import sys

import jax
import numpy as np

from fdjax.runtime import cohort_mesh, compiled

BATCH = 16
# (name, client sizes, cohort_size, driver, epochs): six equal clients in one call of six
# lanes padded to eight; seven unequal ones in calls of three, one and three, each padded to four
CASES = [("equal", [32] * 6, 6, "scan", 1),
         ("unequal", [5, 12, 40, 40, 33, 20, 9], 3, "loop", 2)]


def _counted(fn, counts: collections.Counter, name: int, *args, **kwargs):
    counts[name] += 1  # runs once per trace, that is per compilation of a new shape
    return fn(*args, **kwargs)


def count_traces() -> tuple[collections.Counter, dict[int, int]]:
    """Counts traces of each program ``compiled`` jits (``test_cohorts``' guard, out of pytest).

    Returns the counts and each jitted program's name in them, by the program's ``id``.
    """
    counts: collections.Counter = collections.Counter()
    names: dict[int, int] = {}
    serial = itertools.count()

    def compile_counted(fn, **jit_kwargs):
        name = next(serial)
        program = jax.jit(functools.partial(_counted, fn, counts, name), **jit_kwargs)
        names[id(program)] = name
        return program

    compiled._compile = compile_counted
    return counts, names


def placement(tree) -> dict:
    """How many devices ``tree``'s leaves span, and the lanes each device holds of them."""
    leaves = jax.tree_util.tree_leaves(tree)
    return {"devices": sorted({len(x.sharding.device_set) for x in leaves}),
            "replicated": sorted({bool(x.sharding.is_fully_replicated) for x in leaves}),
            "shard_lanes": sorted({s.data.shape[0] for x in leaves if x.ndim
                                   for s in x.addressable_shards})}


def spy(trainer, name: str, log: list) -> None:
    """Records each call of ``trainer.<name>``: where its state goes in and comes out."""
    inner = getattr(trainer, name)

    def call(state, data, *args, **kwargs):
        out = inner(state, data, *args, **kwargs)
        log.append({"state_in": placement(state), "data_in": placement(data),
                    "state_out": placement(out[0]), "metrics_out": placement(out[1])})
        return out
    setattr(trainer, name, call)


def largest_gap(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def trainer_case(counts, names, sizes, max_lanes, driver, epochs) -> dict:
    """One cohort trained unsharded and sharded: their gaps, calls, placements, traces."""
    from fdjax.core import make_model, make_optimizer
    from fdjax.data import load_synthetic

    model = make_model("cnn6", input_shape=(8, 8, 1), num_classes=4, width=0.25)
    data = load_synthetic(sum(sizes), (8, 8, 1), 4, seed=2).arrays()
    edges = np.cumsum([0] + sizes)
    pool = compiled.ClientPool.from_datasets(
        [{k: v[a:b] for k, v in data.items()} for a, b in zip(edges, edges[1:])])
    keys = jax.random.split(jax.random.key(5), len(sizes))
    params = model.init(jax.random.key(0))
    members = list(range(len(sizes)))
    make = lambda devices: compiled.CohortTrainer(model, make_optimizer(), BATCH, driver=driver,
                                                  lanes="vmap", max_lanes=max_lanes,
                                                  devices=devices)
    single, sharded = make("single"), make("all")
    program = "scan_epoch" if driver == "scan" else "step"
    traced = names[id(getattr(sharded, program))]  # before the spy replaces it
    log: list = []
    spy(sharded, program, log)
    train = lambda t, order: t.train(params, pool, order, keys, version=3, epochs=epochs,
                                     keep_state=True)
    (want, want_metrics), (got, got_metrics) = train(single, members), train(sharded, members)
    traces = dict(counts)
    again, _ = train(sharded, members[::-1])
    steps = [max(-(-sizes[i] // BATCH) for i in chunk) for chunk in sharded.chunks(pool, members)]
    return {
        "mesh": None if sharded.mesh is None else sharded.mesh.size,
        "chunks": [len(c) for c in sharded.chunks(pool, members)],
        "params_gap": max(largest_gap(a.params, b.params) for a, b in zip(want, got)),
        "opt_state_gap": max(largest_gap(a.opt_state, b.opt_state) for a, b in zip(want, got)),
        "order_gap": max(largest_gap(a.params, b.params) for a, b in zip(got, again[::-1])),
        "counts": [[float(m["count"]) for m in ms] for ms in (want_metrics, got_metrics)],
        "calls": len(log) // 2,  # per train
        "expected_calls": len(steps) * epochs if driver == "scan" else sum(steps) * epochs,
        "placements": log[:len(log) // 2],
        "program_traces": counts[traced],
        "shapes": len(set(sharded._shapes)),
        "retraced": dict(counts) != traces,
    }


def trainer_checks() -> dict:
    counts, names = count_traces()
    return {name: trainer_case(counts, names, *case) for name, *case in CASES}


def run_checks() -> dict:
    """The tiny cohort run of ``test_cohorts`` on the virtual clock, unsharded and sharded."""
    from fdjax.experiment import run
    from tests.runtime.test_cohorts import COHORT
    from tests.runtime.test_methods import tiny

    splits: list = []
    split = cohort_mesh.CohortMesh.split

    def counted(self, tree):
        out = split(self, tree)
        splits.append(placement(out)["devices"])
        return out
    cohort_mesh.CohortMesh.split = counted
    vmap = [*COHORT, "clients.cohort=true", "clients.cohort_lanes=vmap"]
    result = {}
    for devices in ("single", "all"):
        before = len(splits)
        r = run(tiny("sync", *vmap, f"clients.cohort_devices={devices}"))
        result[devices] = {
            "events": [[e["event"], e["node"], e["time"]] for e in r.events],
            "rows": [{k: v for k, v in row.items() if k != "wall_time"} for row in r.rows],
            "busy": {n: s["busy"] for n, s in r.nodes.items()},
            "splits": splits[before:]}
    return result


CHECKS = {"trainer": trainer_checks, "run": run_checks}

if __name__ == "__main__":
    # one process for every check named: JAX starts, and the programs they share compile, once
    print(json.dumps({"devices": len(jax.devices()),
                      **{name: CHECKS[name]() for name in sys.argv[1].split(",")}}))
