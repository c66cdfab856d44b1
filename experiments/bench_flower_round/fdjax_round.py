"""fdjax's side of the Flower benchmark: FedAvg rounds of ``cnn6`` on the real clock.

Three clients of 2,000 CIFAR-10 training images each (IID), one local epoch, batch 32, Adam
(lr 1e-3), ``cnn6`` at width 1: the method ``fedavg-large`` with the ``cnn6`` preset as its
model, so the clients train it with FedAvg and nothing is distilled. Prints one JSON object:
the seconds of each round (from the averaging server's ``round_start`` / ``round_end`` events),
the compile seconds the first round hides, and the test accuracy after the last round.

    python experiments/bench_flower_round/fdjax_round.py --rounds 4 --schedule parallel
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import fdjax
from fdjax.config import load_config
from fdjax.data.sources import default_tfds_dir

SCHEDULES = {
    # fdjax's default: every client's training is its own task on the server's device, and the
    # device runs as many at once as it has slots (server.device_slots, default 2).
    "default": {},
    # all three clients train at once
    "parallel": {"server.device_slots": 3},
    # one client at a time
    "sequential": {"server.device_slots": 1},
}


def config_for(args) -> "fdjax.config.Config":
    overrides = {
        "method": "fedavg-large", "clock": "real", "seed": args.seed,
        "data.source": "tfds", "data.name": "cifar10", "data.partition": "iid",
        "data.data_dir": default_tfds_dir(),
        "data.limit": 3 * 2000 + 1, "data.proxy_size": 1, "data.test_limit": args.test_limit,
        "clients.count": 3, "clients.local_epochs": 1, "clients.batch_size": 32,
        "clients.optimizer": "adam", "clients.learning_rate": 1e-3,
        "models.global_preset": "cnn6", "models.global_width": 1.0, "models.grads": args.grads,
        "stop.max_rounds": args.rounds, "stop.time_budget": None, "stop.eval_interval": 1e9,
        **SCHEDULES[args.schedule],
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def round_seconds(run) -> list[float]:
    """Seconds of each round: from its start to the next round_end (which is logged with the
    round number the server moves on to, the moment the next round starts)."""
    start = min(e["time"] for e in run.events if e.get("event") == "round_start")
    ends = sorted(e["time"] for e in run.events if e.get("event") == "round_end")
    return [b - a for a, b in zip([start] + ends, ends)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="default")
    parser.add_argument("--grads", default="auto", choices=["auto", "xla", "matmul"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-limit", type=int, default=2000)
    args = parser.parse_args()
    run = fdjax.run(config_for(args))
    rows = [r for r in run.rows if r.get("global_accuracy") is not None]
    json.dump({"library": "fdjax", "schedule": args.schedule, "grads": args.grads,
               "round_seconds": round_seconds(run),
               "compile_seconds": run.timing.get("compile_seconds"),
               "wall_seconds": run.timing.get("wall_seconds"),
               "final_accuracy": rows[-1]["global_accuracy"] if rows else None,
               "cpu_count": os.cpu_count()}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
