"""Wall-clock time to a target accuracy on the Ray backend beside the virtual clock's prediction.

For each method (default ``sync`` and ``async-continuous``) this runs ``config.toml`` twice, one
after the other so that they never compete for the machine:

1. on the virtual clock (``clock = "virtual"``, in-process): the prediction, in virtual seconds,
   of a testbed where each client is a machine as fast as this one and both servers share one;
2. on the Ray backend (``--backend ray``: a local Ray instance, one actor per node, real clock).

and writes ``results/results.json`` (time to target of each, final accuracy, rounds, Ray's
start-up, wall time of each run, the machine) beside each run's directory. Usage::

    python experiments/ray_cifar10/run.py [--data-dir DIR] [--methods sync,async-continuous]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from fdjax.config import load_config
from fdjax.data import default_tfds_dir
from fdjax.experiment import run

HERE = Path(__file__).resolve().parent


def time_to(rows: list[dict], target: float) -> float | None:
    """The run's clock at the first evaluation at or above ``target`` (None: never)."""
    return next((r["time"] for r in rows if r["global_accuracy"] >= target), None)


def per_computation(run_dir: Path, rounds: int, chunks: int) -> dict:
    """Seconds each kind of computation took on the run's clock, from ``nodes.json``: a client's
    local training (busy over updates sent), a reverse-distillation chunk, an aggregation."""
    nodes = json.loads((run_dir / "nodes.json").read_text())["nodes"]
    clients = [n for n in nodes.values() if n["role"] == "client"]
    return {
        "client_training": sum(n["busy"] for n in clients) / max(1, sum(n["messages"]
                                                                     for n in clients)),
        "reverse_chunk": nodes["distillation"]["busy"] / max(1, chunks),
        "aggregation": nodes["averaging"]["busy"] / max(1, rounds),
        "client_idle_fraction": sum(n["idle"] for n in clients) / max(
            1e-9, sum(n["idle"] + n["busy"] for n in clients)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # relative (as paper_cifar10's default_data_dir), so recorded configs name no local path
    parser.add_argument("--data-dir", default=os.path.relpath(default_tfds_dir()))
    parser.add_argument("--methods", default="sync,async-continuous")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--report", action="store_true",
                        help="only add the per-computation figures of finished runs to "
                             "results.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        results = json.loads((out / "results.json").read_text())
        for name, entry in results["runs"].items():
            entry["seconds_per_computation"] = per_computation(
                out / name, entry["rounds"], entry["distill_chunks"])
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
        return
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_average_at_start": os.getloadavg()},
               "config": "experiments/ray_cifar10/config.toml", "runs": {}}
    for method in args.methods.split(","):
        for backend in ("virtual", "ray"):
            overrides = [f"method={method}", f'data.data_dir="{args.data_dir}"']
            if backend == "ray":
                overrides += ["backend=ray", "clock=real"]
            config = load_config(HERE / "config.toml", overrides)
            target = config.stop.target_accuracy
            start = time.perf_counter()
            result = run(config, out / method / backend, overwrite=True)  # a rerun replaces
            wall = time.perf_counter() - start
            last = result.rows[-1]
            results["runs"][f"{method}/{backend}"] = {
                "method": method, "clock": config.clock, "backend": config.backend,
                "target": target, "time_to_target": time_to(result.rows, target),
                "final_time": last["time"], "final_global_accuracy": last["global_accuracy"],
                "final_small_accuracy": last["small_accuracy"], "rounds": last["round"],
                "distill_chunks": last["distill_chunks"],
                "ray_start_seconds": result.timing.get("ray_start_seconds"),
                "wall_seconds_of_the_whole_run": wall,
                "load_average_after": os.getloadavg(),
                "seconds_per_computation": per_computation(
                    out / method / backend, last["round"], last["distill_chunks"]),
            }
            print(json.dumps({f"{method}/{backend}": results["runs"][f"{method}/{backend}"]}))
            (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
