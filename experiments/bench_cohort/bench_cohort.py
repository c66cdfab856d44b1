"""Client updates per second: a cohort of K clients in one compiled call against a Python loop.

For each K this trains K small clients (about 50 examples each: sizes drawn from 40..60) for one
local epoch from the same starting model, three ways:

* ``loop``: a Python loop over the clients, each trained the way a runtime ``Client`` trains:
  ``LocalTrainer.init`` and ``LocalTrainer.epoch`` on the client's own device arrays;
* ``vmap``: ``CohortTrainer.train`` on a ``ClientPool`` of the same clients, one ``vmap``-ed step
  per batch for up to ``--max-lanes`` clients per call (the cohort of ``fdjax.core.cohort``);
* ``sequential``: the same cohort with its clients stepped in turn (``lanes="sequential"``, the
  CPU default: one pool, shape-bucketed programs, no vmap).

Every way is compiled for every shape first (the loop compiles one program per distinct client
size, as the runtime does; the first pass's seconds are recorded). Then the ways alternate, in
rotating order, ``--repeats`` times each, so drift on a shared machine hits all of them; each
ratio is the median of the paired ratios way / loop. Peak memory is the process's peak resident
set after each K (it only grows; K runs in increasing order) and, on accelerators, the device's
peak bytes in use.

    python experiments/bench_cohort/bench_cohort.py --out experiments/bench_cohort/results_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import jax
import numpy as np

from fdjax.core import make_model, make_optimizer
from fdjax.runtime.compiled import ClientPool, CohortTrainer, LocalTrainer, as_device_data


def clients_data(k: int, shape: tuple[int, ...], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, k])
    sizes = rng.integers(40, 61, k)
    return [{"images": rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
             "labels": rng.integers(0, 10, n).astype(np.int32)} for n in sizes]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_peak_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 20


def bench_k(k: int, params, local: LocalTrainer, cohorts: dict[str, CohortTrainer], args,
            ways: tuple[str, ...] = ("vmap", "sequential")) -> dict:
    """One K: the loop and each of ``ways`` (keys of ``cohorts``, so a caller can add a
    sharded trainer), compiled, then timed in rotating order."""
    shape = tuple(int(s) for s in args.shape.split(","))
    host = clients_data(k, shape)
    keys = jax.random.split(jax.random.key(1), k)
    device_data = [as_device_data(d) for d in host]
    client_keys = [keys[i] for i in range(k)]
    pool = ClientPool.from_datasets(host)
    members = list(range(k))

    def loop() -> float:
        start = time.perf_counter()
        out = []
        for data, key in zip(device_data, client_keys):
            key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)  # as Client.train does
            state, _ = local.epoch(local.init(params), data, key)
            out.append(state.params)
        jax.block_until_ready(out)
        return k / (time.perf_counter() - start)

    def cohort(lanes: str):
        def train() -> float:
            start = time.perf_counter()
            out, _ = cohorts[lanes].train(params, pool, members, keys)
            jax.block_until_ready(out)
            return k / (time.perf_counter() - start)
        return train

    runs = {"loop": loop, **{way: cohort(way) for way in ways}}
    first_pass = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        if name != "loop":
            cohorts[name].warm(params, pool, members)
        fn()
        first_pass[name] = round(time.perf_counter() - start, 2)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(args.repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            samples[name].append(runs[name]())
    result = {"k": k, "examples": int(sum(len(d["labels"]) for d in host)),
              "calls_per_cohort": len(cohorts["vmap"].chunks(pool, members)),
              "first_pass_seconds": first_pass}
    for name, values in samples.items():
        result[f"{name}_updates_per_s"] = statistics.median(values)
        result[f"{name}_samples"] = [round(v, 2) for v in values]
        if name != "loop":
            result[f"{name}_ratio"] = statistics.median(
                v / l for v, l in zip(values, samples["loop"]))
    result.update(peak_rss_mb=round(peak_rss_mb(), 1), device_peak_mb=device_peak_mb())
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="3,10,100,1000")
    parser.add_argument("--shape", default="32,32,3", help="image shape (CIFAR-10: 32,32,3)")
    parser.add_argument("--preset", default="cnn6")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-lanes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4, help="timed passes of each way per K")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    model = make_model(args.preset, input_shape=shape, width=args.width)
    device = jax.devices()[0]
    report = {"backend": jax.default_backend(), "device": device.device_kind,
              "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "jax": jax.__version__, "preset": args.preset, "width": args.width,
              "shape": list(shape), "batch_size": args.batch_size, "max_lanes": args.max_lanes,
              "repeats": args.repeats, "results": []}
    print(f"{args.preset} x{args.width} on {shape}, batch {args.batch_size}, "
          f"{report['backend']} ({report['device']})", flush=True)
    print("    K | loop upd/s | vmap upd/s (x loop) | sequential upd/s (x loop) | calls | "
          "peak RSS MB", flush=True)
    # one set of programs for every K: each compiles once per shape, in the first pass that
    # needs it
    optimizer = make_optimizer()
    params = model.init(jax.random.key(0))
    local = LocalTrainer(model, optimizer, args.batch_size)
    cohorts = {lanes: CohortTrainer(model, optimizer, args.batch_size, lanes=lanes,
                                    max_lanes=args.max_lanes) for lanes in ("vmap", "sequential")}
    for k in (int(k) for k in args.ks.split(",")):
        r = bench_k(k, params, local, cohorts, args)
        report["results"].append(r)
        print(f"{k:5d} | {r['loop_updates_per_s']:10.1f} | {r['vmap_updates_per_s']:10.1f} "
              f"({r['vmap_ratio']:.2f}) | {r['sequential_updates_per_s']:16.1f} "
              f"({r['sequential_ratio']:.2f}) | {r['calls_per_cohort']:5d} | "
              f"{r['peak_rss_mb']:11.0f}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
