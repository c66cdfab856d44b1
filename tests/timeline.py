"""Where the suite's time goes: a pytest plugin that records every test's wall and CPU time.

    FDJAX_TEST_TIMELINE=/tmp/tl python -m pytest -n 2 -p tests.timeline
    python -m tests.timeline /tmp/tl          # per module: worker seconds, CPU, compile

Each process (the xdist workers, or the one process of a serial run) appends one JSON line per
test to ``<dir>/tests_<worker>.jsonl``: its start and end (wall clock), the CPU seconds of the
process itself and of its waited-for children (subprocesses a test started and ended), and the
seconds JAX reported spent tracing, lowering and compiling during it (``jax.monitoring``). Ray's
actors are children of the raylet, not of the test, so their CPU is not counted. ``--durations``
gives only wall time; this says whether a module is slow because it computes, compiles, waits,
or starts processes, and whether the two workers ended together. Off unless the variable is set.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

VARIABLE = "FDJAX_TEST_TIMELINE"
#: jax.monitoring's duration events of a compilation, summed per test.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")

_compile = [0.0]
_record = [False]  # set in pytest_configure: this process runs tests and the variable is set
_started: dict[str, tuple[float, float, float, float]] = {}


def _cpu() -> tuple[float, float]:
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _on_duration(event: str, duration: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _compile[0] += duration


def pytest_configure(config) -> None:
    """Records in the process that runs the tests. Under xdist the controller also sees every
    test's start and finish (reported by the workers), so it does not record."""
    controller = getattr(config, "workerinput", None) is None and bool(
        getattr(config.option, "numprocesses", None))
    _record[0] = bool(os.environ.get(VARIABLE)) and not controller
    if _record[0]:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_on_duration)


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _record[0]:
        _started[nodeid] = (time.time(), *_cpu(), _compile[0])


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    if nodeid not in _started:
        return
    start, own, children, compiled = _started.pop(nodeid)
    own_now, children_now = _cpu()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = Path(os.environ[VARIABLE]) / f"tests_{worker}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps({"id": nodeid, "start": start, "end": time.time(),
                              "cpu": own_now - own, "child_cpu": children_now - children,
                              "compile": _compile[0] - compiled}) + "\n")


def summarize(directory: str | Path, top: int = 30) -> str:
    """A table per module (wall seconds of its worker, CPU, children's CPU, compile) and per
    worker (busy seconds and when it ended), from a timeline directory."""
    tests = []
    for path in sorted(Path(directory).glob("tests_*.jsonl")):
        worker = path.stem.removeprefix("tests_")
        tests += [{**json.loads(line), "worker": worker} for line in path.read_text().splitlines()]
    if not tests:
        return f"no timeline in {directory}"
    first = min(t["start"] for t in tests)
    modules: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for t in tests:
        row = modules[t["id"].split("::")[0]]
        row.update(wall=t["end"] - t["start"], cpu=t["cpu"], child_cpu=t["child_cpu"],
                   compile=t["compile"], tests=1)
    lines = ["| module | tests | wall s | CPU s | children's CPU s | compile s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in sorted(modules.items(), key=lambda kv: -kv[1]["wall"])[:top]:
        lines.append(f"| `{name}` | {row['tests']} | {row['wall']:.0f} | {row['cpu']:.0f} | "
                     f"{row['child_cpu']:.0f} | {row['compile']:.0f} |")
    total = sum(modules.values(), collections.Counter())
    lines.append(f"| all {len(modules)} modules | {total['tests']} | {total['wall']:.0f} | "
                 f"{total['cpu']:.0f} | {total['child_cpu']:.0f} | {total['compile']:.0f} |")
    for worker in sorted({t["worker"] for t in tests}):
        mine = [t for t in tests if t["worker"] == worker]
        busy = sum(t["end"] - t["start"] for t in mine)
        end = max(t["end"] for t in mine) - first
        lines.append(f"\n{worker}: {len(mine)} tests, busy {busy:.0f} s, ended at {end:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(VARIABLE, ".")))
