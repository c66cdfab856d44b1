"""The first evaluations of ``experiments/paper_cifar10`` (IID, seed 0), to compare two codes.

A refactor that claims to change nothing for today's users must give the same metrics rows. This
runs the paper_cifar10 config for its first ``--evals`` evaluations (``stop.time_budget =
(evals - 1) * eval_interval``) for each method with whatever ``fdjax`` is importable, and writes
the rows (without ``wall_time``); ``--compare A B`` prints where two such files differ.

    PYTHONPATH=<checkout before> python experiments/refactor_check/first_rows.py before.json
    python experiments/refactor_check/first_rows.py after.json
    python experiments/refactor_check/first_rows.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "paper_cifar10" / "config.toml"


def first_rows(method: str, evals: int, data_dir: str) -> list[dict]:
    from fdjax.config import load_config
    from fdjax.experiment import run

    config = load_config(str(CONFIG), [f"method={method}", f"data.data_dir={data_dir}"])
    budget = (evals - 1) * config.stop.eval_interval
    config = load_config(str(CONFIG), [f"method={method}", f"data.data_dir={data_dir}",
                                       f"stop.time_budget={budget}"])
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in run(config).rows]


def compare(a: dict, b: dict) -> int:
    """Prints each differing field; returns how many differ."""
    differ = 0
    for method in sorted(set(a) | set(b)):
        rows_a, rows_b = a.get(method, []), b.get(method, [])
        if len(rows_a) != len(rows_b):
            print(f"{method}: {len(rows_a)} rows against {len(rows_b)}")
            differ += 1
        for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
            for key in sorted(set(ra) | set(rb)):
                if ra.get(key) != rb.get(key):
                    print(f"{method} row {i} {key}: {ra.get(key)!r} against {rb.get(key)!r}")
                    differ += 1
        print(f"{method}: {min(len(rows_a), len(rows_b))} rows compared")
    print("identical" if differ == 0 else f"{differ} differences")
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument("--methods", nargs="+", default=["async-continuous", "sync-fwd"])
    parser.add_argument("--evals", type=int, default=10)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        return 1 if compare(a["rows"], b["rows"]) else 0
    from fdjax.data import default_tfds_dir

    data_dir = args.data_dir or os.path.relpath(default_tfds_dir())
    rows = {m: first_rows(m, args.evals, data_dir) for m in args.methods}
    args.out.write_text(json.dumps({"evals": args.evals, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
