"""Simulation overhead of the virtual clock: wall time of a run / compiled compute it executed.

For each method this runs the given config (default: fdjax's built-in offline config with
measured costs, 20 virtual seconds and an evaluation a second, the settings every recorded figure
here was measured with; the built-in config itself now charges fixed costs, under which the
compute would still run but the virtual clock would not follow it) and prints the run's wall
time, the wall time spent inside compiled compute (local epochs, FedAvg, distillation chunks,
evaluations), the extra first calls that compiled programs, and two ratios:

* ``overhead`` = (wall - compile) / compute: what the event loop, channels, bookkeeping and Python
  glue add on top of the compute itself (target <= 1.10);
* ``raw`` = wall / compute, compilation counted as overhead too.

Each method first runs once for ``--warmup`` virtual seconds, so that one-time costs (XLA
compilation of the programs, and the eager, op-by-op parameter initialisation of the models,
which compiles each primitive once per process) are paid before the measured run; the first
warm-up runs' timings are kept in the JSON as ``cold``.

    python experiments/sim_overhead/bench_sim_overhead.py [--config FILE] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import jax

from fdjax.config import load_config
from fdjax.experiment import prepare_data, run


# The built-in config as it was when results_cpu.json was recorded (before it changed to fixed
# costs and 60 virtual seconds for the default comparison); a --set still overrides these.
RECORDED = ["cost.mode=measured", "stop.time_budget=20", "stop.eval_interval=1.0"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--methods", default="sync,async-continuous")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="virtual seconds of the warm-up run per method (0: none)")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()
    config = load_config(args.config, (RECORDED if args.config is None else []) + args.set)
    data = prepare_data(config)
    results = {"machine": platform.machine(), "backend": jax.default_backend(),
               "jax": jax.__version__, "overrides": args.set, "runs": []}
    for method in args.methods.split(","):
        if args.warmup > 0:
            short = dataclasses.replace(config.stop, time_budget=args.warmup)
            warm = run(config.replace(method=method, stop=short), data=data)
            results.setdefault("cold", {})[method] = {k: round(v, 3)
                                                      for k, v in warm.timing.items()}
        result = run(config.replace(method=method), data=data)
        t = result.timing
        row = {"method": method, **{k: round(v, 3) for k, v in t.items()},
               "overhead": (t["wall_seconds"] - t["compile_seconds"]) / t["compute_seconds"],
               "raw": t["wall_seconds"] / t["compute_seconds"],
               "virtual_seconds": result.rows[-1]["time"]}
        results["runs"].append(row)
        print(f"{method}: wall {t['wall_seconds']:.1f} s, compute {t['compute_seconds']:.1f} s, "
              f"compile {t['compile_seconds']:.1f} s -> overhead {row['overhead']:.3f} "
              f"(raw {row['raw']:.3f}) for {row['virtual_seconds']:.0f} virtual s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
