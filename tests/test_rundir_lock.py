"""A run directory is never clobbered: while a run writes a directory it holds an OS lock there,
so a second ``fdjax run --out`` or ``--resume`` on it is one line, exit status 2, and nothing
touched; a directory that already holds a run is refused without ``--overwrite``; and the lock
dies with its process, SIGKILL included.

The subprocesses share the test session's JAX compilation cache (``tests/conftest.py``), so only
the first start compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdjax.config import load_config
from fdjax.experiment import run
from fdjax.rundir import LOCK_NAME, DirectoryBusy, DirectoryLock

from tests.runtime.test_methods import tiny
from tests.test_cli import TINY_TOML
from tests.test_edges import one_line_error
from tests.test_sigkill_resume import wait_for

ROOT = Path(__file__).resolve().parents[1]
#: Real seconds the first run writes for: long enough for two more processes to start and be
#: refused while it runs.
BUDGET = 10.0


def cli_env() -> dict:
    """The environment of an fdjax subprocess: CPU, this checkout, the session's compilation cache
    (inherited, see ``tests/conftest.py``)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def start_fdjax(env: dict, cwd: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fdjax.cli", *map(str, args)], env=env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


def test_a_second_run_or_resume_is_refused_while_the_first_writes(tmp_path, tiny_config):
    env, out = cli_env(), tmp_path / "run"
    first = start_fdjax(env, tmp_path, "run", "--config", tiny_config, "--set", "clock=real",
                        "--set", f"stop.time_budget={BUDGET}", "--set", "checkpoint.every_rounds=1",
                        "--out", out)
    # config.toml is written only once the lock is held
    wait_for(lambda: first.poll() is not None or (out / "config.toml").exists())
    assert first.poll() is None, first.communicate()[1]
    config_text = (out / "config.toml").read_text()
    others = [start_fdjax(env, tmp_path, "run", "--config", tiny_config, "--method", "sync",
                          "--out", out),
              start_fdjax(env, tmp_path, "run", "--resume", out)]
    for proc in others:
        _, stderr = proc.communicate(timeout=240)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, stderr
        assert lines[0] == (f"fdjax: error: another fdjax process (pid {first.pid}) is writing "
                            f"{str(out)!r}; wait for it to end, or stop it first")
    assert first.poll() is None, "the first run ended before the others were refused: raise BUDGET"
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    # the first run's files are its own and complete: no row of the refused run, none twice
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"async-continuous"}
    times = [r["time"] for r in rows]
    assert times == sorted(set(times)) and times[0] < 1 and times[-1] >= BUDGET - 1
    assert (out / "config.toml").read_text() == config_text
    assert json.loads((out / "nodes.json").read_text())["resumes"] == []
    assert (out / "global_params.npz").exists() and not (out / LOCK_NAME).exists()


def test_the_lock_is_exclusive_and_dies_with_a_sigkilled_holder(tmp_path):
    held = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fdjax.rundir import DirectoryLock; "
         "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(held)], env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=f"pid {holder.pid}"):
            DirectoryLock(held).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (held / LOCK_NAME).exists()  # the killed holder's file stays, but not its lock
    with DirectoryLock(held):
        assert (held / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(DirectoryBusy):  # a second open in this process is turned away too
            DirectoryLock(held).acquire()
    assert held.is_dir() and not (held / LOCK_NAME).exists()
    # directories the lock had to create go again when nothing else was written there
    with DirectoryLock(tmp_path / "made" / "for" / "it"):
        assert (tmp_path / "made" / "for" / "it").is_dir()
    assert not (tmp_path / "made").exists()


def test_a_held_directory_refuses_run_and_resume_and_stays_untouched(tmp_path, capsys,
                                                                     tiny_config):
    out = tmp_path / "run"  # a killed run's directory, as far as the refusals look
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.toml").write_text(TINY_TOML)
    (out / "metrics.jsonl").write_text('{"time": 0.0}\n')
    cfg = load_config(out / "config.toml")
    before = snapshot(out)
    with DirectoryLock(out):  # as the process writing it would
        busy = f"another fdjax process (pid {os.getpid()}) is writing {str(out)!r}"
        one_line_error(capsys, ["run", "--resume", str(out)], busy)
        one_line_error(capsys, ["run", "--config", str(tiny_config), "--out", str(out),
                                "--overwrite"], busy)
        with pytest.raises(DirectoryBusy):
            run(cfg, out, resume=True)
        after = snapshot(out)
    assert {k: v for k, v in after.items() if k != LOCK_NAME} == before


def test_a_directory_holding_a_run_is_refused_unless_overwrite(tmp_path, capsys, tiny_config):
    cfg, out = tiny("sync", "stop.time_budget=3"), tmp_path / "run"
    first = run(cfg, out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="already holds a finished run; pass --overwrite"):
        run(cfg, out)
    line = one_line_error(capsys, ["run", "--config", str(tiny_config), "--out", str(out)],
                          f"{str(out)!r} already holds a finished run")
    assert "--overwrite" in line and "--resume" in line
    assert snapshot(out) == before
    (out / "nodes.json").unlink()  # as if it had been killed
    line = one_line_error(capsys, ["run", "--config", str(tiny_config), "--out", str(out)],
                          f"already holds an unfinished run; pass --resume {out}")
    assert "--overwrite" in line
    one_line_error(capsys, ["run", "--resume", str(out), "--overwrite"], "drop --overwrite")
    again = run(cfg, out, overwrite=True)
    assert len(again.rows) == len(first.rows) and (out / "nodes.json").exists()
