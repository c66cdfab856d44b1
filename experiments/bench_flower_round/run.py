"""fdjax against Flower on Flower's home ground: FedAvg rounds of cnn6 on a 2-core CPU.

Both libraries train the same three clients (2,000 CIFAR-10 training images each, fdjax's IID
partition, exported to ``data.npz``) for one local epoch of ``cnn6`` at width 1, batch 32, Adam
lr 1e-3, and average with FedAvg; each runs ``--rounds`` rounds in a fresh process, and the two
alternate (fdjax, Flower, Flower, fdjax, ...) so drift on the machine hits both. The figure per
run is the median of its rounds after the first (the first holds compilation and warm-up, and
is reported apart). Schedules: ``default`` (each library's defaults), ``parallel`` (the three
clients train at once), ``sequential`` (one at a time). Flower runs in the scratch environment
that ``setup_scratch.sh`` makes.

    experiments/bench_flower_round/setup_scratch.sh
    python experiments/bench_flower_round/run.py --out experiments/bench_flower_round/results_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bench_local_training"))
from bench_local_training import cpu_model  # noqa: E402  (the one record of a host's CPU)

SCRATCH_PYTHON = HERE / ".scratch" / "bin" / "python"


def export_data(path: Path, test_limit: int) -> None:
    """fdjax's own partition of the benchmark's clients, for Flower to train the same images."""
    import numpy as np

    from fdjax.experiment import prepare_data
    sys.path.insert(0, str(HERE))
    from fdjax_round import config_for
    args = argparse.Namespace(seed=0, test_limit=test_limit, grads="auto", rounds=1,
                              schedule="default")
    splits, fed = prepare_data(config_for(args))
    arrays = {"test_images": splits.test.images, "test_labels": splits.test.labels}
    for i, client in enumerate(fed.clients):
        arrays[f"images{i}"], arrays[f"labels{i}"] = client.images, client.labels
    np.savez(path, **arrays)


def one_run(library: str, schedule: str, args) -> dict:
    if library == "fdjax":
        cmd = [sys.executable, str(HERE / "fdjax_round.py"), "--grads", args.grads]
    else:
        cmd = [str(SCRATCH_PYTHON), str(HERE / "flower_round.py"), "--data", str(args.data)]
    cmd += ["--rounds", str(args.rounds), "--schedule", schedule]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{library} {schedule} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    rounds = result["round_seconds"]
    result["first_round"] = rounds[0]
    result["steady_round"] = statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each library per schedule")
    parser.add_argument("--schedules", default="default,parallel,sequential")
    parser.add_argument("--grads", default="auto", help="fdjax's models.grads")
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=HERE / "data.npz")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not SCRATCH_PYTHON.exists():
        raise SystemExit(f"no scratch environment: run {HERE / 'setup_scratch.sh'} first")
    if not args.data.exists():
        export_data(args.data, args.test_limit)
    report = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "cpu_model": cpu_model(),
              "load_average_before": os.getloadavg(), "rounds": args.rounds, "runs": []}
    for schedule in args.schedules.split(","):
        for repeat in range(args.repeats):
            order = ("fdjax", "flower") if repeat % 2 == 0 else ("flower", "fdjax")
            for library in order:
                result = one_run(library, schedule, args)
                report["runs"].append(result)
                print(f"{schedule:10s} {library:6s} steady round {result['steady_round']:.2f} s, "
                      f"first {result['first_round']:.2f} s, accuracy "
                      f"{result['final_accuracy']:.3f}", flush=True)
    report["load_average_after"] = os.getloadavg()
    report["summary"] = summarize(report["runs"])
    for schedule, s in report["summary"].items():
        print(f"{schedule}: fdjax {s['fdjax']:.2f} s, Flower {s['flower']:.2f} s per round: "
              f"fdjax / Flower = {s['ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for schedule in dict.fromkeys(r["schedule"] for r in runs):
        med = {lib: statistics.median(r["steady_round"] for r in runs
                                      if r["schedule"] == schedule and r["library"] == lib)
               for lib in ("fdjax", "flower")}
        out[schedule] = {**med, "ratio": med["fdjax"] / med["flower"]}
    return out


if __name__ == "__main__":
    main()
