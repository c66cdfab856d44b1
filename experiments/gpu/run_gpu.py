"""One prepared device run: every measurement the GPU issue asks for, in one command.

A task is lent a GPU for a few minutes at most, so everything it should measure is prepared
here, sized to fit (at most 9 minutes on one NVIDIA H200), and checked on CPU beforehand by
``--smoke`` (``tests/test_gpu_script.py``). Each section reuses the existing benchmark code by
importing it from its script, so the GPU figures are the same measurements as the CPU ones:

* ``local_training``: ``experiments/bench_local_training`` (fdjax scan and loop drivers, bare JAX);
* ``cohort``: ``experiments/bench_cohort`` (vmap and sequential cohorts, sharded where there are
  several local devices, against a per-client loop at K = 10, 100, 1000);
* ``sim_overhead``: ``experiments/sim_overhead`` (virtual-clock overhead of every method);
* ``paper``: the paper's CIFAR-10 config at full width on the real clock, wall time to 60% for
  the paper's four methods (``fdjax.run``);
* ``tests``: ``tests/core`` and ``tests/runtime`` under pytest in a subprocess;
* ``scale_1000`` (only with ``--scale-1000``, a second command): the 1,000-client config for 100
  averaging rounds, wall time and peak memory;
* ``drawback`` (only with ``--drawback [CELL]``, a third command): a cell of
  ``experiments/paper_drawback`` at the paper's scale (``cnn12``/``cnn6`` at width 1, all 50,000
  training images, the test split), its methods on the virtual clock with costs measured on the
  device, each to its virtual budget or a wall-time cap; time to 60%, final and plateau accuracy.

Every section is timed and guarded: one that raises or overruns its limit records
``{"error": ...}`` and the next one runs. The JSON is rewritten after every section, so a run
killed midway keeps what finished; a later command (``--scale-1000``) adds to the same file.

    python experiments/gpu/run_gpu.py                 # -> experiments/gpu/results_<card>.json
    python experiments/gpu/run_gpu.py --scale-1000    # adds "scale_1000_clients" to it
    python experiments/gpu/run_gpu.py --drawback      # adds "drawback" (the regime's comparison)
    python experiments/gpu/run_gpu.py --smoke --out /tmp/r.json   # the same on CPU, tiny
"""

from __future__ import annotations

import os
import sys

# Before JAX starts: a preallocating parent would leave the pytest subprocess (tests section)
# a quarter of the GPU's memory; growing on demand lets both fit.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The smoke run checks that every section runs and reports, not how fast: XLA's optimisation
# of each program is most of a cold smoke run's time on CPU (cnn6's first epoch 23 s -> 6 s
# without it), so it is turned off there, but not for the pytest it starts (section_tests).
QUICK_COMPILE = "JAX_DISABLE_MOST_OPTIMIZATIONS"
SET_QUICK_COMPILE = "--smoke" in sys.argv[1:] and QUICK_COMPILE not in os.environ
if SET_QUICK_COMPILE:
    os.environ[QUICK_COMPILE] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
PAPER_CONFIG = EXPERIMENTS / "paper_cifar10" / "config_gpu.toml"
SCALE_CONFIG = EXPERIMENTS / "scale_1000_clients" / "config.toml"
DRAWBACK_SCRIPT = "paper_drawback/run.py"
#: The paper_drawback cell run at full width by ``--drawback`` when none is named: the one where
#: the CPU study found the drawback over 3 seeds (see experiments/paper_drawback/README.md).
DRAWBACK_CELL = "ens-lab-dir"
TARGET = 0.6  # the paper's accuracy for "time to target"
SECTIONS = ("local_training", "cohort", "sim_overhead", "paper", "tests", "scale_1000",
            "drawback")
OWN_COMMANDS = ("scale_1000", "drawback")  # each a command of its own on the device
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in OWN_COMMANDS)
GRACE = 1.25  # a section is stopped at this multiple of its budget (or the run's end)

# Sizes on the device: each section's budget (seconds) and the work sized to fit it. The sums
# stay under 9 minutes with a margin for JAX's start and the data loading.
FULL: dict[str, dict[str, Any]] = {
    "total_seconds": 530,
    "local_training": dict(budget=45, presets=("cnn6", "cnn12"), width=1.0, images=8192,
                           batch_size=64, repeats=4, scan_steps=4),
    "cohort": dict(budget=110, ks=(10, 100, 1000), shape="32,32,3", preset="cnn6", width=0.25,
                   batch_size=32, max_lanes=64, repeats=2),
    "sim_overhead": dict(budget=60, warmup=0.5, overrides=["stop.time_budget=5"]),
    "paper": dict(budget=190, config=str(PAPER_CONFIG), tfds=True, seconds_per_method=35,
                  warmup_budget=60, overrides=[]),
    "tests": dict(budget=100, args=["tests/core", "tests/runtime"]),
    "scale_1000": dict(budget=450, tfds=True, rounds=100, overrides=[]),
    # paper_drawback's config at the paper's scale: width 1, all 50,000 training images (10,000
    # of them the server's distillation set, the CPU study's fifth), evaluated on the test split
    # (the settings were chosen on the CPU study's validation slice). Costs are measured on the
    # device, so the virtual clock replays a testbed whose server is the card and whose clients
    # run at a quarter of its speed. Each method stops at its virtual budget or after
    # seconds_per_method of wall time, whichever comes first (recorded).
    # async-fwd-strong removed the drawback in the CPU study at 300 virtual seconds (at 600 s on
    # seed 0, not on seed 2); async-fwd-gated did not.
    "drawback": dict(budget=480, tfds=True, methods=("sync-fwd", "async-continuous",
                                                     "async-fwd-strong", "async-fwd-gated"),
                     seconds_per_method=105, overrides=[
                         "models.global_width=1.0", "models.small_width=1.0", "data.limit=none",
                         "data.proxy_size=10000", "data.test_split=test", "data.test_limit=none",
                         "cost.mode=measured", "stop.time_budget=150", "stop.eval_interval=3"]),
}
# The same on 2 CPU cores in about a minute: tiny models and data, the embedded digits.
# cnn6 as the global model too: the smoke run checks that each section runs and reports, which
# does not depend on the model, and cnn12's programs were most of its compilation.
TINY_MODELS = ["models.global_width=0.125", "models.small_width=0.125",
               "models.global_preset=cnn6"]
SMOKE: dict[str, dict[str, Any]] = {
    "total_seconds": 280,
    "local_training": dict(budget=60, presets=("cnn6",), width=0.125, images=64, batch_size=32,
                           repeats=2, scan_steps=1),
    "cohort": dict(budget=60, ks=(3,), shape="8,8,1", preset="cnn6", width=0.125,
                   batch_size=16, max_lanes=4, repeats=1),
    "sim_overhead": dict(budget=90, warmup=0.0, overrides=["stop.time_budget=1", *TINY_MODELS]),
    "paper": dict(budget=60, config=None, tfds=False, seconds_per_method=2, warmup_budget=2,
                  overrides=TINY_MODELS),
    "tests": dict(budget=60, args=["tests/core/test_aggregation.py", "-k",
                                   "fedavg_weights_by_examples or mismatched_trees"]),
    "scale_1000": dict(budget=60, tfds=False, rounds=2, overrides=[
        "data.source=embedded", "clients.count=10", "data.proxy_size=200",
        "data.test_limit=none", *TINY_MODELS]),
    "drawback": dict(budget=60, tfds=False, methods=("sync-fwd", "async-fwd-strong",
                                                    "async-fwd-gated"),
                     seconds_per_method=60, overrides=[
                         "data.source=embedded", "data.limit=none", "data.proxy_size=300",
                         "data.test_split=test", "data.test_limit=none", "distill.augment=\"none\"",
                         "distill.steps_per_chunk=5", "distill.gate_holdout=100",
                         "stop.time_budget=2", "stop.eval_interval=0.5", *TINY_MODELS]),
}


class SectionTimeout(KeyboardInterrupt):
    """A section ran past its limit.

    A KeyboardInterrupt so that asyncio (inside ``fdjax.run``) lets it out of the event loop
    instead of recording it as one task's failure; only this subclass is caught.
    """


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``SectionTimeout`` in the main thread after ``seconds`` of wall time."""
    def alarm(signum, frame):
        raise SectionTimeout(f"stopped after its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_script(relative: str):
    """A benchmark script imported as a module, so its functions run unchanged here."""
    path = EXPERIMENTS / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tfds_dir_problem() -> tuple[str, str | None]:
    """The prepared TFDS directory (``$FDJAX_TFDS_DIR`` or the default) and why it is unusable,
    or None when CIFAR-10 is there."""
    from fdjax.data import TFDS_DIR_VARIABLE, default_tfds_dir

    where = default_tfds_dir()
    if (Path(where) / "cifar10").is_dir():
        return where, None
    return where, (f"no prepared CIFAR-10 under {where!r} (set {TFDS_DIR_VARIABLE} to a TFDS "
                   f"directory holding cifar10/)")


def peak_memory() -> dict[str, Any]:
    """The device's peak bytes in use where JAX reports it, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peak = stats.get("peak_bytes_in_use")
    if peak is not None:
        return {"peak_mb": peak / 2 ** 20, "peak_source": "device peak_bytes_in_use",
                "peak_rss_mb": rss_mb}
    return {"peak_mb": rss_mb, "peak_source": "process max RSS", "peak_rss_mb": rss_mb}


# --------------------------------------------------------------------------------------------
# Sections: each takes its sizes and returns a JSON-able dict (``_errors``: parts that failed)
# --------------------------------------------------------------------------------------------

def section_local_training(p: dict) -> dict:
    """``bench_preset`` of the local-training benchmark, per preset.

    Without its PyTorch reference (``no_torch``): that trains on the CPU even on a GPU host,
    which would spend the section's budget on a figure the GPU run is not about.
    """
    bench = load_script("bench_local_training/bench_local_training.py")
    args = argparse.Namespace(width=p["width"], images=p["images"], batch_size=p["batch_size"],
                              repeats=p["repeats"], scan_steps=p["scan_steps"], no_torch=True)
    return {"results": [bench.bench_preset(preset, args) for preset in p["presets"]]}


def cohort_trainers(model, optimizer, p: dict) -> tuple[dict, tuple[str, ...], str | None]:
    """The cohort benchmark's trainers, plus a sharded one where there are several devices.

    vmap and sequential are pinned to one device, so that on a multi-device host "vmap" stays
    the one-device cohort and "sharded" (``cohort_devices="all"``) is measured beside it.
    """
    from fdjax.runtime.compiled import CohortTrainer

    def trainer(lanes: str, devices: str) -> CohortTrainer:
        return CohortTrainer(model, optimizer, p["batch_size"], lanes=lanes,
                             max_lanes=p["max_lanes"], devices=devices)

    cohorts = {"vmap": trainer("vmap", "single"), "sequential": trainer("sequential", "single")}
    if len(jax.local_devices()) < 2:
        return cohorts, ("vmap", "sequential"), (
            f"not measured: {len(jax.local_devices())} local device; sharding the lanes over "
            f"one device is the vmap cohort itself")
    cohorts["sharded"] = trainer("vmap", "all")
    return cohorts, ("vmap", "sequential", "sharded"), None


def section_cohort(p: dict) -> dict:
    """``bench_k`` of the cohort benchmark for each K, with the programs shared across K."""
    from fdjax.core import make_model, make_optimizer
    from fdjax.runtime.compiled import LocalTrainer

    bench = load_script("bench_cohort/bench_cohort.py")
    shape = tuple(int(s) for s in p["shape"].split(","))
    model = make_model(p["preset"], input_shape=shape, width=p["width"])
    optimizer = make_optimizer()
    params = model.init(jax.random.key(0))
    local = LocalTrainer(model, optimizer, p["batch_size"])
    cohorts, ways, sharded_note = cohort_trainers(model, optimizer, p)
    args = argparse.Namespace(shape=p["shape"], repeats=p["repeats"])
    results = [bench.bench_k(k, params, local, cohorts, args, ways) for k in p["ks"]]
    best = {}
    for r in results:
        way = max(ways, key=lambda w: r[f"{w}_ratio"])
        best[str(r["k"])] = {"way": way, "ratio": r[f"{way}_ratio"]}
    return {"device_count": len(jax.local_devices()), "ways": list(ways),
            "sharded": sharded_note, "preset": p["preset"], "width": p["width"],
            "shape": list(shape), "batch_size": p["batch_size"], "max_lanes": p["max_lanes"],
            "results": results, "best": best}


@contextlib.contextmanager
def patched_argv(argv: list[str]):
    """``sys.argv`` set for a script's ``main()``, restored afterwards whatever happens."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def section_sim_overhead(p: dict) -> dict:
    """The simulation-overhead benchmark's ``main()`` over every method fdjax has."""
    from fdjax.methods import METHODS

    bench = load_script("sim_overhead/bench_sim_overhead.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sim_overhead.json"
        argv = ["bench_sim_overhead.py", "--methods", ",".join(METHODS),
                "--warmup", str(p["warmup"]), "--out", str(out)]
        for override in p["overrides"]:
            argv += ["--set", override]
        with patched_argv(argv):
            bench.main()
        return json.loads(out.read_text())


def paper_config(p: dict, data_dir: str | None):
    """The paper's config (or fdjax's default in the smoke run) on the real clock, stopping at
    60% test accuracy or after ``seconds_per_method`` wall seconds."""
    from fdjax.config import load_config

    overrides = ["clock=real", f"stop.time_budget={p['seconds_per_method']}",
                 f"stop.target_accuracy={TARGET}", *p["overrides"]]
    if data_dir is not None:
        overrides.append(f"data.data_dir={data_dir}")
    return load_config(p["config"], overrides)


def paper_warmup(config, data, budget: float) -> dict:
    """One sync-fwd round on the virtual clock, which compiles every program the four methods
    run, so that their real-clock times are training, not XLA compilation."""
    from fdjax.experiment import run

    warm = config.replace(
        method="sync-fwd", clock="virtual",
        cost=dataclasses.replace(config.cost, mode="measured"),
        stop=dataclasses.replace(config.stop, max_rounds=1, time_budget=budget,
                                 target_accuracy=None))
    start = time.perf_counter()
    result = run(warm, data=data)
    return {"seconds": time.perf_counter() - start, **result.timing}


def paper_method(config, data, method: str) -> dict:
    """One method on the real clock: its wall time to 60% (None if not reached) and how far it
    got."""
    from fdjax.experiment import run

    result = run(config.replace(method=method), data=data)
    summary = result.summary(TARGET)
    return {"time_to_60": summary["time_to_target"], "final_accuracy": summary["final_accuracy"],
            "best_accuracy": summary["best_accuracy"], "rounds": summary["rounds"],
            "stopped_at": result.rows[-1]["time"] if result.rows else None,
            **{k: v for k, v in result.timing.items() if isinstance(v, (int, float))}}


def section_paper(p: dict) -> dict:
    """Wall time to 60% of the paper's four methods; each is guarded on its own, so one that
    fails leaves the others' figures."""
    from fdjax.experiment import prepare_data
    from fdjax.methods import PAPER_METHODS

    data_dir = None
    if p["tfds"]:
        data_dir, problem = tfds_dir_problem()
        if problem is not None:
            return {"skipped": problem, "per_method": {m: None for m in PAPER_METHODS}}
    config = paper_config(p, data_dir)
    start = time.perf_counter()
    data = prepare_data(config)
    out: dict[str, Any] = {"config": p["config"], "target": TARGET, "clock": config.clock,
                           "seconds_per_method": p["seconds_per_method"],
                           "data_seconds": time.perf_counter() - start,
                           "warmup": paper_warmup(config, data, p["warmup_budget"]),
                           "per_method": {}, "_errors": []}
    for method in PAPER_METHODS:
        try:
            out["per_method"][method] = paper_method(config, data, method)
        except Exception as err:  # noqa: BLE001 - recorded, and the next method runs
            out["per_method"][method] = None
            out["_errors"].append(f"{method}: {type(err).__name__}: {err}")
    return out


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def parse_pytest(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("3 passed, 1 skipped in 2.1s")."""
    lines = [line for line in output.splitlines() if PYTEST_COUNT.search(line)
             and re.search(r"\bin [\d.]+s", line)]
    if not lines:
        raise RuntimeError("no pytest summary line in its output:\n" + output[-2000:])
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for number, word in PYTEST_COUNT.findall(lines[-1]):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def section_tests(p: dict, limit: float) -> dict:
    """pytest in a subprocess (a fresh JAX, as a user runs it), killed at the section's limit."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *p["args"]]
    env = {k: v for k, v in os.environ.items() if not (SET_QUICK_COMPILE and k == QUICK_COMPILE)}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(limit - 5, 1))
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"pytest did not finish within {limit - 5:.0f} s") from err
    output = done.stdout + done.stderr
    counts = parse_pytest(output)
    if done.returncode not in (0, 1):  # 1: some tests failed, which the counts say
        raise RuntimeError(f"pytest exited {done.returncode}:\n{output[-2000:]}")
    return {**counts, "returncode": done.returncode, "args": p["args"],
            "seconds": time.perf_counter() - start, "output_tail": output[-1500:]}


def section_scale_1000(p: dict) -> dict:
    """The 1,000-client config for ``rounds`` averaging rounds: wall time and peak memory."""
    from fdjax.config import load_config
    from fdjax.experiment import prepare_data, run

    overrides = [f"stop.max_rounds={p['rounds']}", "stop.time_budget=none", *p["overrides"]]
    if p["tfds"]:
        data_dir, problem = tfds_dir_problem()
        if problem is not None:
            return {"skipped": problem, "rounds": None, "wall_seconds": None}
        overrides.append(f"data.data_dir={data_dir}")
    start = time.perf_counter()
    config = load_config(SCALE_CONFIG, overrides)
    data = prepare_data(config)
    data_seconds = time.perf_counter() - start
    result = run(config, data=data)
    wall = time.perf_counter() - start
    summary = result.summary()
    return {"config": str(SCALE_CONFIG.relative_to(ROOT)), "overrides": overrides,
            "rounds_asked": p["rounds"], "rounds": summary["rounds"], "wall_seconds": wall,
            "data_seconds": data_seconds, "under_5_minutes": wall < 300,
            "final_accuracy": summary["final_accuracy"],
            "virtual_seconds": result.rows[-1]["time"] if result.rows else None,
            **{k: v for k, v in result.timing.items() if isinstance(v, (int, float))},
            **peak_memory()}


class MethodWallLimit(KeyboardInterrupt):
    """A drawback method ran past its wall-time cap (a KeyboardInterrupt, as SectionTimeout)."""


def drawback_method(config, data, seconds: float) -> dict:
    """One method of the drawback comparison, stopped at its virtual budget or after
    ``seconds`` of wall time; reduced as ``experiments/paper_drawback`` reduces its runs."""
    from fdjax import report
    from fdjax.experiment import run

    rows: list[dict] = []
    start = time.perf_counter()

    def on_row(row: dict) -> None:
        rows.append(dict(row))
        if time.perf_counter() - start > seconds:
            raise MethodWallLimit

    try:
        result = run(config, data=data, on_row=on_row)
        capped, timing = False, result.timing
    except MethodWallLimit:
        capped, timing = True, {}
    summary = report.summarize_run(rows, {}, TARGET)
    out = {"wall_seconds": time.perf_counter() - start, "stopped_by_wall_cap": capped,
           "virtual_seconds": rows[-1]["time"] if rows else None,
           **{k: summary[k] for k in ("time_to_target", "final_accuracy", "best_accuracy",
                                      "plateau_accuracy", "plateaued", "rounds")},
           "curve": [(r["time"], r.get("global_accuracy")) for r in rows],
           **{k: v for k, v in timing.items() if isinstance(v, (int, float))}}
    if rows and "gate_checks" in rows[-1]:  # the gated method: how often its mechanism acted
        out["mechanism_checks"] = rows[-1]["gate_checks"]
        out["mechanism_active"] = rows[-1]["gate_opens"]
    return out


def section_drawback(p: dict) -> dict:
    """A paper_drawback cell at the paper's scale: each method's time to 60%, final and plateau
    accuracy, guarded on its own so that one that fails leaves the others' figures."""
    from fdjax.config import load_config
    from fdjax.experiment import prepare_data

    study = load_script(DRAWBACK_SCRIPT)
    cell = p["cell"]
    if cell not in study.CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose from {list(study.CELLS)}")
    base = list(study.CELLS[cell])
    if p["tfds"]:
        data_dir, problem = tfds_dir_problem()
        if problem is not None:
            return {"skipped": problem, "cell": cell, "per_method": {m: None for m in p["methods"]}}
        base.append(f"data.data_dir={data_dir}")
    config_path = EXPERIMENTS / Path(DRAWBACK_SCRIPT).parent / "config.toml"
    out: dict[str, Any] = {"cell": cell, "config": str(config_path.relative_to(ROOT)),
                           "overrides": base + p["overrides"], "target": TARGET,
                           "seconds_per_method": p["seconds_per_method"], "per_method": {},
                           "_errors": []}
    data = None
    for method in p["methods"]:
        try:
            variant = study.VARIANTS.get(method, [f"method={method}"])  # the profile's sizes win
            config = load_config(config_path, [*base, *variant, *p["overrides"]])
            if method in study.VARIANTS:  # the gate holds out evaluation images: its own data
                own = prepare_data(config)
            else:  # one cut of the data for the plain methods
                own = data = data or prepare_data(config)
            out["per_method"][method] = drawback_method(config, own, p["seconds_per_method"])
        except Exception as err:  # noqa: BLE001 - recorded, and the next method runs
            out["per_method"][method] = None
            out["_errors"].append(f"{method}: {type(err).__name__}: {err}")
    return out


# --------------------------------------------------------------------------------------------
# Running, summarising and writing
# --------------------------------------------------------------------------------------------

def run_section(name: str, p: dict, limit: float) -> dict:
    """One section under its time limit; whatever goes wrong becomes the entry's ``error``."""
    start = time.perf_counter()
    entry: dict[str, Any] = {"budget_seconds": p["budget"], "limit_seconds": round(limit, 1)}
    if limit <= 1:
        entry["error"] = "not started: the run's total time was spent"
        return {**entry, "seconds": 0.0}
    try:
        with time_limit(limit):
            if name == "tests":
                result = section_tests(p, limit)
            else:
                result = globals()[f"section_{name}"](p)
        errors = result.pop("_errors", None)
        entry["result"] = result
        if errors:
            entry["error"] = "; ".join(errors)
    except SectionTimeout as err:
        entry["error"] = f"SectionTimeout: {err}"
    except Exception as err:  # noqa: BLE001 - recorded, and the next section runs
        entry["error"] = f"{type(err).__name__}: {err}"
        entry["traceback"] = traceback.format_exc()[-3000:]
    entry["seconds"] = time.perf_counter() - start
    return entry


def result_of(report: dict, name: str) -> dict | None:
    entry = report["sections"].get(name)
    return None if entry is None else entry.get("result")


def summarize(report: dict) -> None:
    """The headline figures, taken from whichever sections' results the report holds."""
    from fdjax.methods import PAPER_METHODS

    cohort = result_of(report, "cohort") or {}
    best = cohort.get("best", {}).get("100")
    report["cohort_speedup_k100"] = None if best is None else best["ratio"]
    report["cohort_best_way_k100"] = None if best is None else best["way"]
    sim = result_of(report, "sim_overhead") or {}
    report["sim_overhead"] = {r["method"]: r["overhead"] for r in sim.get("runs", [])}
    paper = (result_of(report, "paper") or {}).get("per_method", {})
    report["wall_to_60_seconds"] = {m: (paper.get(m) or {}).get("time_to_60")
                                    for m in PAPER_METHODS}
    tests = result_of(report, "tests") or {}
    report["tests"] = {k: tests.get(k) for k in ("passed", "failed", "skipped", "errors")}
    if "scale_1000" in report["sections"]:
        report["scale_1000_clients"] = result_of(report, "scale_1000")
    if "drawback" in report["sections"]:
        drawback = result_of(report, "drawback") or {}
        report["drawback"] = {"cell": drawback.get("cell"), "per_method": {
            m: None if r is None else {k: r.get(k) for k in (
                "time_to_target", "final_accuracy", "plateau_accuracy", "plateaued",
                "stopped_by_wall_cap", "mechanism_checks", "mechanism_active") if k in r}
            for m, r in drawback.get("per_method", {}).items()}}


def json_safe(value: Any) -> Any:
    """NaN and infinities as None (strict JSON has neither), and numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out: Path) -> None:
    """Rewritten whole after every section, atomically, so a killed run leaves a valid file."""
    summarize(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    os.replace(tmp, out)


def new_report(out: Path, smoke: bool) -> dict:
    """The report to add to: the file's sections so far (``--scale-1000`` after the main run),
    with this machine's description."""
    report: dict[str, Any] = {"sections": {}}
    if out.exists():
        with contextlib.suppress(ValueError, OSError):
            report = json.loads(out.read_text())
            report.setdefault("sections", {})
    device = jax.devices()[0]
    report.update(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                  device_count=jax.device_count(), cpu_count=os.cpu_count(),
                  machine=platform.machine(), python=platform.python_version(), smoke=smoke)
    return report


def card_name() -> str:
    return re.sub(r"[^a-z0-9]", "_", jax.devices()[0].device_kind.lower())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU settings of every section (the 1,000-client one too)")
    parser.add_argument("--scale-1000", action="store_true",
                        help="run the 1,000-client config for 100 rounds (a command of its own)")
    parser.add_argument("--drawback", nargs="?", const=DRAWBACK_CELL, default=None,
                        metavar="CELL", help="run a paper_drawback cell at full width (a command "
                        f"of its own; default cell {DRAWBACK_CELL})")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=None,
                        help="the JSON (default experiments/gpu/results_<card>.json)")
    parser.add_argument("--total-seconds", type=float, default=None,
                        help="stop starting sections after this long (default: the profile's)")
    args = parser.parse_args(argv)
    if args.sections is not None:
        args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(args.sections) - set(SECTIONS))
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    elif args.scale_1000 or args.drawback:
        args.sections = []
    else:
        args.sections = list(SECTIONS if args.smoke else DEFAULT_SECTIONS)
    for name, asked in (("scale_1000", args.scale_1000), ("drawback", args.drawback)):
        if asked and name not in args.sections:
            args.sections.append(name)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = SMOKE if args.smoke else FULL
    total = args.total_seconds or profile["total_seconds"]
    if (args.scale_1000 or args.drawback) and not args.smoke and args.total_seconds is None:
        total = 570  # a command of its own: its budget, under the device's 10-minute limit
    out = Path(args.out) if args.out else Path(__file__).parent / f"results_{card_name()}.json"
    deadline = time.monotonic() + total
    report = new_report(out, args.smoke)
    print(f"{report['device']} ({report['backend']}, {report['device_count']} device(s)), "
          f"sections {args.sections}, at most {total:.0f} s -> {out}", flush=True)
    for name in args.sections:
        p = profile[name]
        if name == "drawback":
            p = {**p, "cell": args.drawback or DRAWBACK_CELL}
        limit = min(p["budget"] * GRACE, deadline - time.monotonic())
        entry = run_section(name, p, limit)
        report["sections"][name] = entry
        write_report(report, out)
        print(f"[{name}] {entry['seconds']:.1f} s"
              + (f": ERROR {entry['error'].splitlines()[0]}" if "error" in entry else ""),
              flush=True)
    failed = [n for n in args.sections if "error" in report["sections"][n]]
    print(json.dumps({k: report.get(k) for k in ("cohort_speedup_k100", "sim_overhead",
                                                 "wall_to_60_seconds", "tests")}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
