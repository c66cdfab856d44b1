"""The suite's own timing plugin (``tests/timeline.py``): its summary adds what it recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.timeline import VARIABLE, summarize

ROOT = Path(__file__).resolve().parents[1]


def test_the_summary_adds_tests_per_module_and_per_worker(tmp_path):
    def line(nodeid, start, end, cpu, compile_=0.0):
        return json.dumps({"id": nodeid, "start": start, "end": end, "cpu": cpu,
                           "child_cpu": 1.0, "compile": compile_})
    (tmp_path / "tests_gw0.jsonl").write_text("\n".join([
        line("tests/a.py::x", 100, 110, 9, 4), line("tests/a.py::y", 110, 115, 5, 1)]))
    (tmp_path / "tests_gw1.jsonl").write_text(line("tests/b.py::z", 100, 130, 2))
    table = summarize(tmp_path)
    assert "| `tests/b.py` | 1 | 30 | 2 | 1 | 0 |" in table  # the longest module first
    assert table.index("tests/b.py") < table.index("tests/a.py")
    assert "| `tests/a.py` | 2 | 15 | 14 | 2 | 5 |" in table
    assert "| all 2 modules | 3 | 45 | 16 | 3 | 5 |" in table
    assert "gw0: 2 tests, busy 15 s, ended at 15 s" in table
    assert "gw1: 1 tests, busy 30 s, ended at 30 s" in table
    assert summarize(tmp_path / "none").startswith("no timeline")


def test_the_plugin_records_each_test_of_a_run_with_its_compilation(tmp_path):
    """A real run of one small module with the plugin on: a line per test, and the seconds
    JAX spent compiling its programs counted (``test_aggregation`` compiles FedAvg)."""
    # a worker's own name would name the file (tests_gw1.jsonl) under ``pytest -n``
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env[VARIABLE] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.timeline",
                           "tests/core/test_aggregation.py", "-k", "fedavg_weights_by_examples"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    rows = [json.loads(r) for r in (tmp_path / "tests_main.jsonl").read_text().splitlines()]
    assert rows and all(r["end"] >= r["start"] and r["cpu"] > 0 for r in rows)
    assert sum(r["compile"] for r in rows) > 0
