"""The fdjax command: info, a quick training run, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fdjax.cli import main


def test_info_through_the_installed_console_script():
    beside = Path(sys.executable).parent / "fdjax"
    exe = str(beside) if beside.exists() else shutil.which("fdjax")
    assert exe, "the fdjax console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120, check=True)
    assert "fdjax 0.1.0" in out.stdout and "backend" in out.stdout


def test_train_on_the_embedded_default_learns(capsys):
    assert main(["train", "--epochs", "2", "--width", "0.5"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch 2")]
    accuracy = float(lines[0].split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.8  # digits: chance is 0.1


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "cnn99"], "unknown model preset 'cnn99'"),
    (["train", "--source", "tfds", "--data-dir", "/nonexistent/tfds"], "does not exist"),
    (["train", "--optimizer", "lion"], "unknown optimizer"),
    (["train", "--epochs", "0"], "--epochs must be >= 1"),
    (["train", "--learning-rate", "inf"], "--learning-rate: must be a finite number, got inf"),
    (["train", "--width", "nan"], "--width: must be a finite number"),
    (["train", "--width", "0"], "--width: must be > 0"),
    (["compare", "--target", "nan"], "--target: must be a finite number"),
    (["compare", "--target", "1.5"], "--target: must be in (0, 1]"),
])
def test_bad_input_is_one_line_and_exit_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("fdjax: error:")


# The data and models of the runtime tests' TINY (tests/runtime/test_methods.py), so that the
# programs these runs compile are theirs: whichever module runs first compiles them, and the
# others load them from the suite's compilation cache.
TINY_TOML = """
method = "async-continuous"
[data]
source = "synthetic"
limit = 240
test_limit = 100
proxy_size = 48
[models]
global_width = 0.25
small_width = 0.25
global_preset = "cnn6"
[clients]
batch_size = 32
[distill]
steps_per_chunk = 2
batch_size = 16
[cost]
mode = "fixed"
client_seconds_per_example = 0.005
server_seconds_per_example = 0.005
[stop]
time_budget = 4.0
eval_interval = 1.0
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def test_run_writes_every_output_file(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--config", str(tiny_config), "--method", "sync",
                 "--set", "clients.count=2", "--out", str(out)]) == 0
    for name in ("config.toml", "metrics.jsonl", "nodes.json", "global_params.npz",
                 "small_params.npz"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 4
    for key in ("method", "time", "wall_time", "global_accuracy", "small_accuracy", "round"):
        assert all(key in row for row in rows)
    assert rows[0]["method"] == "sync"
    resolved = (out / "config.toml").read_text()
    assert 'method = "sync"' in resolved and "count = 2" in resolved
    nodes = json.loads((out / "nodes.json").read_text())["nodes"]
    assert set(nodes) == {"client0", "client1", "averaging", "distillation"}
    assert all(n["bytes"] > 0 for n in nodes.values())


def test_compare_writes_figure_table_and_results(tiny_config, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(tiny_config), "--methods",
                 "sync,async-continuous", "--set", "stop.target_accuracy=0.3",
                 "--set", "stop.time_budget=3", "--out", str(out)]) == 0
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "async-continuous" in (out / "table.md").read_text()
    results = json.loads((out / "results.json").read_text())
    for method in ("sync", "async-continuous"):
        summary = results["methods"][method]
        assert {"time_to_target", "final_accuracy", "client_idle_fraction",
                "server_idle_fraction"} <= set(summary)
        assert (out / method / "seed0" / "metrics.jsonl").exists()


def test_the_default_comparison_shows_the_papers_race(tmp_path):
    """The README's first command, on its own defaults (the embedded digits, fixed costs): the
    four methods pass 60% at distinct times in the paper's order. Each run stops at the
    evaluation where it first reaches 60% (``stop.target_accuracy``), or at 30 of the default 60
    virtual seconds: neither changes anything before it (costs are fixed, so the schedule up to
    a time does not depend on what comes after), and the runs do 70 of the default 240 virtual
    seconds (every method crosses by about 27 s)."""
    out = tmp_path / "cmp"
    assert main(["compare", "--set", "stop.time_budget=30", "--set", "stop.target_accuracy=0.6",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["target_accuracy"] == 0.6
    reached = {m: results["methods"][m]["time_to_target"] for m in
               ("async-continuous", "async-round", "sync", "sync-fwd")}
    assert all(r["reached"] == 1 for r in reached.values()), reached
    times = {m: r["mean"] for m, r in reached.items()}
    order = list(times.values())
    assert order == sorted(order) and len(set(order)) == 4, times


@pytest.mark.parametrize("args, message", [
    (["--set", "clients.cuont=3"], "unknown key 'clients.cuont'"),
    (["--set", "clients.count=0"], "clients.count"),
    (["--set", "method=fast"], "method"),
    (["--config", "/nonexistent/x.toml"], "not found"),
    (["--out", "/proc/fdjax-cannot-write"], "cannot write"),
])
def test_bad_run_config_is_one_line_and_exit_status_2(capsys, tiny_config, args, message):
    argv = ["run"] + (["--config", str(tiny_config)] if "--config" not in args else []) + args
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
