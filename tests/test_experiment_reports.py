"""The paper study's report: the table as ratios at 60% combines the 750 s runs and the
runs continued until they crossed 60%, seed by seed."""

import importlib.util
import json
from pathlib import Path

import pytest

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper_cifar10" / "run.py"


@pytest.fixture(scope="module")
def paper():
    spec = importlib.util.spec_from_file_location("paper_cifar10_run", PAPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: Path, partition: str, method: str, seed: int, curve: list[tuple[float, float]]):
    run_dir = out / partition / method / f"seed{seed}"
    run_dir.mkdir(parents=True)
    rows = [{"time": t, "global_accuracy": a, "small_accuracy": a, "round": i}
            for i, (t, a) in enumerate(curve)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "nodes.json").write_text(json.dumps({"nodes": {}, "timing": {"wall_seconds": 1}}))


def test_ratios_at_60_prefer_the_run_that_crossed(paper, tmp_path):
    _run(tmp_path, "iid", "sync-fwd", 0, [(375, 0.5), (750, 0.59)])         # missed at 750 s
    _run(tmp_path, "iid_to60", "sync-fwd", 0, [(375, 0.5), (800, 0.61)])    # crossed later
    _run(tmp_path, "iid", "sync-fwd", 1, [(600, 0.62)])
    _run(tmp_path, "iid", "async-continuous", 0, [(400, 0.6)])
    _run(tmp_path, "iid", "async-continuous", 1, [(300, 0.58), (450, 0.6)])
    _run(tmp_path, "iid_to60", "sync", 1, [(900, 0.55)])                    # never crossed
    to60 = paper.ratios_to_60(tmp_path)
    assert to60["times"]["sync-fwd"] == {"0": 800.0, "1": 600.0}
    assert to60["source"]["sync-fwd"] == {"0": "iid_to60", "1": "iid"}
    ratio = to60["ratios"]["async-continuous"]
    assert ratio["per_seed"] == {"0": pytest.approx(0.5), "1": pytest.approx(0.75)}
    assert ratio["mean"] == pytest.approx(0.625) and ratio["seeds"] == 2
    assert to60["ratios"]["sync"]["per_seed"] == {"1": None}
    assert to60["paper"]["async-continuous"] == pytest.approx(244 / 436)
    table = "\n".join(paper.ratios_to_60_lines(to60))
    assert "800 s* (seed 0)" in table and "0.62 (0.12, 2 seeds)" in table
    assert "| sync | not reached* (seed 1) | — (seed 1) | — | 0.93 |" in table


def test_no_sync_fwd_run_means_no_table(paper, tmp_path):
    _run(tmp_path, "iid", "async-continuous", 0, [(400, 0.6)])
    assert paper.ratios_to_60(tmp_path) == {}
