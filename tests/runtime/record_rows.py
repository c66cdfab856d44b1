"""Records every method's metrics rows on the tiny fixed-cost config (``test_methods.TINY``).

    python -m tests.runtime.record_rows OUT.json

The rows (without ``wall_time``, the one field that depends on the machine's speed) are what
``test_method_contract.py`` compares a refactor's rows with: under fixed costs the schedule is
the same on every machine, and on one machine the accuracies are too.
"""

from __future__ import annotations

import json
import sys

from fdjax.experiment import run

METHODS = ("sync-fwd", "sync", "async-round", "async-continuous", "async-fwd", "fedavg-large")


#: The global model the rows were recorded with (``TINY`` now uses a cnn6 there).
RECORDED = ("models.global_preset=cnn12",)


def rows(method: str) -> list[dict]:
    from tests.runtime.test_methods import tiny

    return [{k: v for k, v in row.items() if k != "wall_time"}
            for row in run(tiny(method, *RECORDED)).rows]


if __name__ == "__main__":
    recorded = {method: rows(method) for method in METHODS}
    with open(sys.argv[1], "w") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
        f.write("\n")
