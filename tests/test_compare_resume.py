"""``fdjax compare --resume DIR``: a killed comparison keeps its finished runs, resumes the
interrupted one from its checkpoint and runs the rest; and a comparison directory is never
clobbered (its lock, ``--overwrite``)."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from fdjax.experiment import compare, recorded_comparison
from fdjax.rundir import LOCK_NAME, DirectoryLock

from tests.runtime.test_methods import tiny
from tests.test_edges import one_line_error
from tests.test_rundir_lock import cli_env, snapshot, start_fdjax, tiny_config  # noqa: F401
from tests.test_sigkill_resume import wait_for

BUDGET = 10.0


def has_checkpoint(run_dir) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def test_a_killed_comparison_resumes_keeping_its_finished_runs(tmp_path, tiny_config,
                                                               capsys):
    env, out = cli_env(), tmp_path / "cmp"
    first, second = out / "sync" / "seed0", out / "async-continuous" / "seed0"
    proc = start_fdjax(env, tmp_path, "compare", "--config", tiny_config, "--methods",
                       "sync,async-continuous", "--set", f"stop.time_budget={BUDGET}",
                       "--set", "checkpoint.every_rounds=1", "--out", out)
    # the first run has finished and the second has written rows and a checkpoint
    wait_for(lambda: proc.poll() is not None or (
        (first / "nodes.json").exists() and (second / "metrics.jsonl").exists()
        and has_checkpoint(second)))
    assert proc.poll() is None, "the comparison ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = (first / "metrics.jsonl").read_bytes()
    assert not (second / "nodes.json").exists() and (out / LOCK_NAME).exists()

    resumed = start_fdjax(env, tmp_path, "compare", "--resume", out)  # the killed one's locks
    stdout, stderr = resumed.communicate(timeout=300)                 # died with it
    assert resumed.returncode == 0, stderr
    assert "sync/seed0 kept, async-continuous/seed0 resumed" in stdout
    assert (first / "metrics.jsonl").read_bytes() == kept  # not run again
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["time"] for r in rows] == [float(t) for t in range(int(BUDGET) + 1)]
    assert len(json.loads((second / "nodes.json").read_text())["resumes"]) == 1
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"sync", "async-continuous"}
    assert all(results["methods"][m]["final_accuracy"] is not None for m in results["methods"])
    table = (out / "table.md").read_text()
    assert "| sync |" in table and "| async-continuous |" in table
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / LOCK_NAME).exists()
    # a finished comparison: nothing to resume, and not replaced without --overwrite
    one_line_error(capsys, ["compare", "--resume", str(out)], "has finished")
    one_line_error(capsys, ["compare", "--config", str(tiny_config), "--out", str(out)],
                   f"{str(out)!r} already holds a comparison; pass --resume {out}")


def test_compare_never_clobbers_and_resumes_from_its_record(tmp_path, capsys, tiny_config):
    cfg, out = tiny("sync", "stop.time_budget=3"), tmp_path / "cmp"
    methods = ["sync", "async-round"]
    first = compare(cfg, methods, out_dir=out, target=0.3)
    assert first.origins == {"sync": ["run"], "async-round": ["run"]}
    assert recorded_comparison(out) == {"config": cfg, "methods": methods, "seeds": 1,
                                        "target": 0.3}
    before = snapshot(out)
    with pytest.raises(ValueError, match="already holds a comparison"):
        compare(cfg, methods, out_dir=out)
    with DirectoryLock(out):  # as another fdjax process writing it would
        one_line_error(capsys, ["compare", "--config", str(tiny_config), "--out", str(out),
                                "--overwrite"],
                       f"another fdjax process (pid {os.getpid()}) is writing {str(out)!r}")
    assert snapshot(out) == before
    one_line_error(capsys, ["compare", "--resume", str(out), "--methods", "sync"],
                   "drop --methods")
    one_line_error(capsys, ["compare", "--resume", str(tmp_path / "none")],
                   "is not a comparison directory (no compare.json)")
    assert not (tmp_path / "none").exists()

    # killed after its first run finished and before the second had a checkpoint
    (out / "results.json").unlink()
    (out / "async-round" / "seed0" / "nodes.json").unlink()
    shutil.rmtree(out / "async-round" / "seed0" / "checkpoints", ignore_errors=True)
    with pytest.raises(ValueError, match="was started with other methods, target"):
        compare(cfg, ["sync"], out_dir=out, resume=True)
    again = compare(**recorded_comparison(out), out_dir=out, resume=True)
    assert again.origins == {"sync": ["kept"], "async-round": ["restarted"]}
    assert (out / "sync" / "seed0" / "metrics.jsonl").read_bytes() == before[
        "sync/seed0/metrics.jsonl"]
    assert again.results()["methods"]["sync"] == first.results()["methods"]["sync"]
    assert set(json.loads((out / "results.json").read_text())["methods"]) == set(methods)
    replaced = compare(cfg, ["sync"], out_dir=out, overwrite=True)
    assert replaced.origins == {"sync": ["run"]}
    assert json.loads((out / "compare.json").read_text())["methods"] == ["sync"]
