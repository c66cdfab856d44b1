"""Checkpoints and resuming in-process: a run killed between evaluations (by an exception raised
from its row callback) resumes from its newest usable checkpoint; corrupted and incomplete
checkpoints are reported and skipped; the metrics log keeps every line once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fdjax.experiment import run

from tests.runtime.test_methods import tiny


class Killed(Exception):
    """Stands in for SIGKILL: the run stops at once, leaving its directory as it is."""


def kill_at(seconds: float):
    def on_row(row: dict) -> None:
        if row["time"] >= seconds:
            raise Killed

    return on_row


def lines(path: Path) -> list[bytes]:
    return (path / "metrics.jsonl").read_bytes().splitlines(keepends=True)


def without_wall(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def steps(path: Path) -> list[int]:
    return sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())


def test_a_killed_run_resumes_keeping_every_checkpointed_line_once(tmp_path):
    """In-process, for a synchronous method; ``test_sigkill_resume`` kills an asynchronous one
    for real."""
    cfg = tiny("sync-fwd", "checkpoint.every_rounds=2", "stop.time_budget=8")
    whole = run(cfg, tmp_path / "whole")
    # checkpointing changes nothing in the run itself
    assert without_wall(run(tiny("sync-fwd", "stop.time_budget=8")).rows) == without_wall(
        whole.rows)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "killed", on_row=kill_at(5.5))
    before = lines(tmp_path / "killed")
    assert not (tmp_path / "killed" / "nodes.json").exists() and steps(tmp_path / "killed")
    resumed = run(cfg, tmp_path / "killed", resume=True)
    after = lines(tmp_path / "killed")
    kept = resumed.resumes[-1]["rows_kept"]
    assert 0 < kept < len(before)
    assert after[:kept] == before[:kept]  # kept byte for byte
    times = [json.loads(line)["time"] for line in after]  # every line whole
    assert times == [r["time"] for r in whole.rows]  # none lost, none twice, same schedule
    assert (tmp_path / "killed" / "nodes.json").exists()
    # the same kind of result: the rows up to the checkpoint are the uninterrupted run's, the
    # rest stay close to it
    assert without_wall(resumed.rows[:kept]) == without_wall(whole.rows[:kept])
    assert abs(resumed.rows[-1]["round"] - whole.rows[-1]["round"]) <= 1
    assert abs(resumed.rows[-1]["small_accuracy"] - whole.rows[-1]["small_accuracy"]) < 0.1
    nodes = json.loads((tmp_path / "killed" / "nodes.json").read_text())
    assert nodes["resumes"] == resumed.resumes


# Orbax's failed read of the damaged checkpoint leaves TensorStore callbacks aimed at the event
# loop orbax ran the read on, which it has closed by then; they are dropped with a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_and_incomplete_checkpoints_are_reported_and_the_previous_good_one_used(
        tmp_path):
    cfg = tiny("async-round", "checkpoint.every_rounds=1", "checkpoint.keep=4")
    with pytest.raises(Killed):
        run(cfg, tmp_path, on_row=kill_at(4.5))
    newest, second, third = steps(tmp_path)[::-1][:3]
    # the newest: its meta edited (reads back, but the checksum no longer matches)
    meta = tmp_path / "checkpoints" / str(newest) / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"round": ', '"round": 1'))
    # the second: its array data damaged (orbax cannot read it back)
    for data in (tmp_path / "checkpoints" / str(second) / "state").rglob("d/*"):
        data.write_bytes(b"\x00" * data.stat().st_size)
    # a save interrupted by the kill
    partial = tmp_path / "checkpoints" / f"{newest + 1}.orbax-checkpoint-tmp-123"
    (partial / "state").mkdir(parents=True)
    resumed = run(cfg, tmp_path, resume=True)
    used = resumed.resumes[-1]
    assert used["checkpoint"] == third
    problems = " | ".join(used["problems"])
    assert f"incomplete checkpoint {partial.name}" in problems
    assert f"checkpoint {newest} is corrupted (checksum mismatch)" in problems
    assert f"checkpoint {second} is " in problems
    # the unusable ones are set aside; the resumed run checkpoints on from the one it used
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert {f"unusable-{newest}", f"unusable-{second}"} <= {n.rsplit("-", 1)[0] for n in names}
    assert min(steps(tmp_path)) >= third and resumed.rows[-1]["time"] == 6


def test_a_log_cut_short_after_a_checkpoint_falls_back_to_one_it_covers(tmp_path):
    cfg = tiny("async-continuous", "checkpoint.every_rounds=2", "checkpoint.keep=3")
    with pytest.raises(Killed):
        run(cfg, tmp_path, on_row=kill_at(5.5))
    metrics = tmp_path / "metrics.jsonl"
    head = b"".join(lines(tmp_path)[:3])
    metrics.write_bytes(head + b'{"time": 4.5, "wall')  # lost its tail, the last line torn
    resumed = run(cfg, tmp_path, resume=True)
    problems = " | ".join(resumed.resumes[-1]["problems"])
    assert "metrics.jsonl" in problems
    assert [json.loads(line)["time"] for line in lines(tmp_path)] == [0.0, 1.5, 3.0, 4.5, 6.0]


def test_resuming_without_a_usable_checkpoint_is_an_error(tmp_path):
    cfg = tiny("async-round", "checkpoint.every_rounds=1")
    with pytest.raises(ValueError, match="not a run directory"):
        run(cfg, tmp_path / "nothing", resume=True)
    with pytest.raises(Killed):
        run(cfg, tmp_path, on_row=kill_at(3))
    changed = tiny("async-round", "checkpoint.every_rounds=1", "seed=5")
    with pytest.raises(ValueError, match="taken under a different config.toml"):
        run(changed, tmp_path, resume=True)
    (tmp_path / "nodes.json").write_text("{}")
    with pytest.raises(ValueError, match="has finished"):
        run(cfg, tmp_path, resume=True)
    (tmp_path / "nodes.json").unlink()
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="no checkpoint in"):
        run(cfg, tmp_path, resume=True)
