"""A real kill: ``fdjax run`` in a subprocess is SIGKILLed at random moments, resumed with
``fdjax run --resume DIR`` each time, and finally left to finish.

What must hold: the final ``metrics.jsonl`` has every evaluation of the schedule exactly once
and no torn line; every line that the newest checkpoint at a kill covered is still there, byte for
byte; and the run ends like an uninterrupted one. The kill moments are drawn from a seeded random
generator and printed, so a failure can be replayed.

The subprocesses share the test session's JAX compilation cache (``tests/conftest.py``), so only
the first start compiles; each later start costs the interpreter and the imports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from fdjax.config import config_to_toml, load_config
from fdjax.experiment import run

from tests.runtime.test_methods import TINY

ROOT = Path(__file__).resolve().parents[1]
# Long enough that a run with every program already compiled (the shared cache) on a quiet
# machine still outlasts the kill delays below; at 10 s it could finish before its third kill.
BUDGET, INTERVAL = 20.0, 1.0
SETTINGS = TINY + [f"stop.time_budget={BUDGET}", f"stop.eval_interval={INTERVAL}",
                   "checkpoint.every_rounds=2", "method=async-continuous"]


def checkpoint_rows(out: Path) -> tuple[int, int]:
    """(step, metrics rows) of the newest complete checkpoint, (0, 0) if none."""
    steps = sorted(int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit())
    for step in reversed(steps):
        try:
            meta = json.loads((out / "checkpoints" / str(step) / "meta" / "metadata").read_text())
            return step, meta["metrics"]["rows"]
        except (OSError, ValueError):  # being deleted by the run as we look
            continue
    return 0, 0


def wait_for(condition, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def test_sigkill_at_random_moments_and_resume_until_done(tmp_path):
    config = tmp_path / "config.toml"
    out = tmp_path / "run"
    cfg = load_config(None, SETTINGS)
    config.write_text(config_to_toml(cfg))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fdjax.cli", "run", *args], env=env,
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    rng = random.Random(6)
    proc = start("--config", str(config), "--out", str(out))
    kills = []
    # kill 1: a random moment after the first checkpoint; kill 2: a random moment soon after
    # the restart (imports, restore); kill 3: a random moment after the resumed run's first own
    # checkpoint
    for after_progress, delay in ((True, rng.uniform(0, 0.75)), (False, rng.uniform(0, 3.0)),
                                  (True, rng.uniform(0, 0.75))):
        step_at_start = checkpoint_rows(out)[0] if out.exists() else 0
        if after_progress:
            wait_for(lambda: proc.poll() is not None or (
                out.exists() and checkpoint_rows(out)[0] > step_at_start))
        time.sleep(delay)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(((out / "metrics.jsonl").read_bytes(), checkpoint_rows(out), delay))
        proc = start("--resume", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    print("kills (delay s, newest checkpoint step, rows it covers):",
          [(round(d, 2), s, r) for _, (s, r), d in kills])
    assert proc.returncode == 0, stderr
    assert "resumed from checkpoint" in stdout

    final = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    rows = [json.loads(line) for line in final]  # no torn line anywhere
    expected = [i * INTERVAL for i in range(int(BUDGET / INTERVAL) + 1)]
    assert [r["time"] for r in rows] == expected  # every evaluation, exactly once
    for before, (_, covered), _ in kills:
        assert final[:covered] == before.splitlines(keepends=True)[:covered]
    assert sum(covered > 0 for _, (_, covered), _ in kills) >= 2
    resumes = json.loads((out / "nodes.json").read_text())["resumes"]
    assert len(resumes) >= 2

    # the same kind of result as a run that was never killed
    whole = run(cfg)
    assert abs(rows[-1]["round"] - whole.rows[-1]["round"]) <= 2
    assert abs(rows[-1]["small_accuracy"] - whole.rows[-1]["small_accuracy"]) < 0.15
    assert rows[-1]["small_accuracy"] > rows[0]["small_accuracy"] + 0.2
