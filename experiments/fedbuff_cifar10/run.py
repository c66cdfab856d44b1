"""FedBuff against async-continuous on CIFAR-10 with clients whose speeds span 20x.

Each run is written to ``<out>/<method>/seed<k>/``. A finished run (``nodes.json``) is skipped;
an interrupted one resumes from its newest checkpoint (``checkpoint.every_rounds``), or starts
again where it saved none; ``results.json``, ``results.md`` and ``figure.png`` are rebuilt after
every run, so a stopped study loses at most the run in progress.

    python experiments/fedbuff_cifar10/run.py [--seeds 0 1 2] [--data-dir DIR] [--set KEY=VALUE]
    python experiments/fedbuff_cifar10/run.py --report

Costs are fixed per example (``cost.mode = "fixed"``), so the runs are exactly reproducible and
the machine's load changes only their wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
METHODS = ("fedbuff", "async-continuous")
TARGET = 0.40


def default_data_dir() -> str:
    """``$FDJAX_TFDS_DIR``, else ``../shared/data/tfds`` beside the checkout, relative to the
    working directory so the recorded ``config.toml`` names no path of this machine."""
    from fdjax.data import default_tfds_dir

    return os.path.relpath(default_tfds_dir())


def run_one(args, method: str, seed: int, data):
    from fdjax.config import load_config
    from fdjax.experiment import run

    cfg = load_config(args.config, [f"data.data_dir={args.data_dir}", *args.set,
                                    f"method={method}", f"seed={seed}"])
    run_dir = args.out / method / f"seed{seed}"
    if (run_dir / "nodes.json").exists():
        print(f"skip {run_dir} (finished)", flush=True)
        return data
    checkpoints = run_dir / "checkpoints"
    resume = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    from tqdm import tqdm

    from fdjax.experiment import prepare_data

    data = data or prepare_data(cfg)
    budget = cfg.stop.time_budget
    with tqdm(total=budget, desc=f"{method} seed{seed}", unit="s",
              bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} virtual s [{elapsed}<{remaining}] "
                         "{postfix}") as bar:
        def on_row(row):
            bar.update(min(row["time"], budget) - bar.n)
            bar.set_postfix_str(f"global {row['global_accuracy']:.3f}")
        result = run(cfg, run_dir, data=data, on_row=on_row, resume=resume,
                     overwrite=not resume)
    print(f"{method} seed{seed}: {result.timing['wall_seconds']:.0f} s wall"
          f"{' (resumed)' if resume else ''}, {result.summary(TARGET)}", flush=True)
    return data


def load_runs(out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for method in METHODS:
        for nodes_file in sorted((out / method).glob("seed*/nodes.json")):
            run_dir = nodes_file.parent
            rows = [json.loads(line) for line in
                    (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            runs.setdefault(method, []).append(
                {"rows": rows, "nodes": json.loads(nodes_file.read_text())["nodes"],
                 "seed": int(run_dir.name.removeprefix("seed"))})
    return runs


def write_report(out: Path) -> None:
    from fdjax import report

    runs = load_runs(out)
    if not runs:
        return
    per_run, summaries = [], {}
    for method, method_runs in runs.items():
        summaries[method] = []
        for r in method_runs:
            s = report.summarize_run(r["rows"], r["nodes"], TARGET)
            summaries[method].append(s)
            last = r["rows"][-1]
            per_run.append({"method": method, "seed": r["seed"], **s,
                            "published_models": last["round"],
                            "stale_dropped": last.get("stale_dropped"),
                            "late_updates": last["late"]})
    results = report.results_json(summaries, TARGET, reference="async-continuous")
    results["runs"] = per_run
    results["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.table_markdown(results))
    report.plot_accuracy({m: [r["rows"] for r in rs] for m, rs in runs.items()},
                         out / "figure.png", target=TARGET,
                         title="CIFAR-10, 10 clients whose speeds span 20x: global accuracy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "config.toml"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if not args.report:
        args.data_dir = args.data_dir or default_data_dir()
        for seed in args.seeds:
            data = None  # one data split per seed, shared by its methods
            for method in args.methods:
                data = run_one(args, method, seed, data)
                write_report(args.out)
    write_report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
