"""The prepared GPU script (``experiments/gpu/run_gpu.py``) runs every section on CPU.

A task lent a GPU has a few minutes of it, with no time to debug a script there, so its
``--smoke`` setting (tiny models and data, the embedded digits) runs here once, in a subprocess,
and every figure the GPU run reports is checked to be there and sensible. A section that raises
records an error instead of stopping the script, so the checks below look for errors
explicitly: a broken section fails this test. The subprocess shares the test session's JAX
compilation cache (``tests/conftest.py``), as the other subprocess tests do.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdjax.methods import METHODS, PAPER_METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu" / "run_gpu.py"
#: Every section the smoke run executes (the 1,000-client and drawback ones included).
SECTIONS = {"local_training", "cohort", "sim_overhead", "paper", "tests", "scale_1000",
            "drawback"}
REQUIRED = ("device", "backend", "jax", "device_count", "sections", "cohort_speedup_k100",
            "sim_overhead", "wall_to_60_seconds", "tests", "scale_1000_clients", "drawback")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_script") / "r.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), f"no JSON written; exit {done.returncode}:\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    result["_exit"] = (done.returncode, (done.stdout + done.stderr)[-3000:])
    return result


def test_every_section_ran_without_error(report):
    assert set(report["sections"]) == SECTIONS
    errors = {name: entry["error"] for name, entry in report["sections"].items()
              if "error" in entry}
    assert not errors, errors
    for name, entry in report["sections"].items():
        assert isinstance(entry.get("result"), dict), name
        assert math.isfinite(entry["seconds"]) and entry["seconds"] >= 0, name
    returncode, tail = report["_exit"]
    assert returncode == 0, tail


def test_the_headline_keys_describe_the_machine(report):
    missing = [key for key in REQUIRED if key not in report]
    assert not missing, missing
    assert isinstance(report["device"], str) and report["device"].strip()
    assert report["backend"] == "cpu"
    assert isinstance(report["jax"], str) and report["jax"]
    assert report["device_count"] >= 1


def test_sim_overhead_has_every_method(report):
    overhead = report["sim_overhead"]
    assert set(overhead) == set(METHODS)
    assert all(positive(v) for v in overhead.values()), overhead


def test_wall_to_60_has_the_paper_methods_and_each_ran(report):
    wall = report["wall_to_60_seconds"]
    assert set(wall) == set(PAPER_METHODS)
    assert all(v is None or positive(v) for v in wall.values()), wall
    per_method = report["sections"]["paper"]["result"]["per_method"]
    for method in PAPER_METHODS:  # each ran on the real clock until its budget or 60%
        assert positive(per_method[method]["stopped_at"]), (method, per_method[method])
        assert per_method[method]["final_accuracy"] is not None, method


def test_pytest_section_counts_passes(report):
    tests = report["tests"]
    assert tests["passed"] > 0, tests
    assert tests["failed"] == 0 and tests["errors"] == 0, tests


def test_benchmarks_report_positive_ratios(report):
    local = report["sections"]["local_training"]["result"]["results"]
    assert local
    for row in local:
        for key in ("fdjax", "bare", "ratio", "fdjax-loop", "fdjax-scan"):
            assert positive(row[key]), (row["preset"], key, row[key])
    cohort = report["sections"]["cohort"]["result"]
    assert [r["k"] for r in cohort["results"]] == [int(k) for k in cohort["best"]]
    assert all(positive(b["ratio"]) and b["way"] in cohort["ways"]
               for b in cohort["best"].values()), cohort["best"]
    # one CPU device: the sharded way is not measured, and says why
    assert cohort["device_count"] == 1 and "sharded" not in cohort["ways"]
    assert isinstance(cohort["sharded"], str) and cohort["sharded"]
    speedup = report["cohort_speedup_k100"]
    assert speedup is None or positive(speedup)


def test_scale_section_ran_its_rounds(report):
    scale = report["scale_1000_clients"]
    assert scale["rounds"] == scale["rounds_asked"] > 0, scale
    assert positive(scale["wall_seconds"]) and positive(scale["peak_mb"]), scale


def test_drawback_section_runs_the_cell_and_records_the_gate(report):
    """The paper_drawback cell's comparison: each method ran to its virtual budget (not its
    wall cap) and reports the study's numbers; the gated method its checks and openings."""
    drawback = report["drawback"]
    section = report["sections"]["drawback"]["result"]
    assert drawback["cell"] == section["cell"] and section["config"].endswith(
        "paper_drawback/config.toml")
    assert set(drawback["per_method"]) == {"sync-fwd", "async-fwd-strong", "async-fwd-gated"}
    for method, run in section["per_method"].items():
        assert run is not None, method
        assert run["stopped_by_wall_cap"] is False and run["virtual_seconds"] == 2.0, run
        assert 0 < run["final_accuracy"] <= 1 and 0 < run["plateau_accuracy"] <= 1, run
        assert isinstance(run["plateaued"], bool) and len(run["curve"]) >= 4, run
    gated = drawback["per_method"]["async-fwd-gated"]
    assert gated["mechanism_checks"] >= 1 and 0 <= gated["mechanism_active"] <= \
        gated["mechanism_checks"], gated
    assert "mechanism_checks" not in drawback["per_method"]["sync-fwd"]
