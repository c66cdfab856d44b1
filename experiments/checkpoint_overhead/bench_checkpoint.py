"""Checkpoint overhead: wall seconds per orbax save, checkpoint size, and time to resume.

Runs one method with a checkpoint after every averaging round (the most frequent setting) into a
temporary run directory, then prints the save times (median, 90th percentile, max), the size of
one checkpoint on disk, the run's wall time against the same run without checkpoints, and how
long ``run(..., resume=True)`` takes to restore from the newest checkpoint before going on (the
run is resumed at its end, so it stops at once).

    python experiments/checkpoint_overhead/bench_checkpoint.py [--config FILE] [--set KEY=VALUE ...]

``--state-only SHAPE`` skips the runs and times saves of the state a run of the config would
checkpoint (both models, the distillation server's Adam state, keys) for images of SHAPE, e.g.
``32,32,3`` for CIFAR-10: the save time depends only on that state's size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax

from fdjax.checkpoint import RunCheckpoints
from fdjax.config import load_config
from fdjax.core import count_params
from fdjax.experiment import prepare_data, run

SAVES: list[float] = []
_save = RunCheckpoints.save


def _timed_save(self, *args, **kwargs):
    """Every save's wall seconds, whichever run directory it belongs to."""
    start = time.perf_counter()
    _save(self, *args, **kwargs)
    SAVES.append(time.perf_counter() - start)


RunCheckpoints.save = _timed_save


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# The built-in config as it was when results_cpu_default.json was recorded (before it changed to
# fixed costs and 60 virtual seconds for the default comparison); a --set still overrides these.
RECORDED = ["cost.mode=measured", "stop.time_budget=20", "stop.eval_interval=1.0"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=None, help="write results as JSON here")
    parser.add_argument("--state-only", default=None, metavar="H,W,C",
                        help="time saves of a run's state for this image shape, without runs")
    args = parser.parse_args()
    if args.state_only:
        return state_only(load_config(args.config, args.set), args)
    base = RECORDED if args.config is None else []
    config = load_config(args.config, [*base, "checkpoint.every_rounds=1", *args.set])
    plain = load_config(args.config, [*base, "checkpoint.every_rounds=none",
                                      "checkpoint.every_seconds=none", *args.set])
    data = prepare_data(config)
    run(plain, data=data)  # warm-up: compile every program once
    work = Path(tempfile.mkdtemp(prefix="fdjax-ckpt-"))
    try:
        without = run(plain, work / "plain", data=data)
        with_ckpt = run(config, work / "ckpt", data=data)
        saves = list(SAVES)
        steps = sorted(p for p in (work / "ckpt" / "checkpoints").iterdir() if p.name.isdigit())
        size = dir_bytes(steps[-1])
        (work / "ckpt" / "nodes.json").unlink()  # pretend it was killed at the very end
        start = time.perf_counter()
        resumed = run(config, work / "ckpt", data=data, resume=True)
        resume_wall = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    params = count_params(with_ckpt.global_params) + count_params(with_ckpt.small_params or {})
    result = {
        "machine": platform.machine(), "backend": jax.default_backend(), "jax": jax.__version__,
        "method": config.method, "overrides": args.set, "parameters": params,
        "saves": len(saves), "save_median_s": statistics.median(saves),
        "save_p90_s": sorted(saves)[int(0.9 * (len(saves) - 1))], "save_max_s": max(saves),
        "checkpoint_bytes": size, "rounds": with_ckpt.rows[-1]["round"],
        "wall_without_s": without.timing["wall_seconds"],
        "wall_with_s": with_ckpt.timing["wall_seconds"],
        "resume_wall_s": resume_wall, "resumed_from": resumed.resumes[-1]["checkpoint"]}
    print(f"{config.method}, {params:,} model parameters: {len(saves)} saves, median "
          f"{result['save_median_s']:.3f} s, p90 {result['save_p90_s']:.3f} s, max "
          f"{result['save_max_s']:.3f} s; {size / 1e6:.1f} MB per checkpoint; run wall "
          f"{result['wall_without_s']:.1f} s without, {result['wall_with_s']:.1f} s with a "
          f"checkpoint every round; resume {resume_wall:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def state_only(config, args, saves: int = 10) -> None:
    """Times ``saves`` checkpoints of the arrays a run of ``config`` holds, for one image shape."""
    from fdjax.core import init_train_state, make_model, make_optimizer, OptimizerSettings

    shape = tuple(int(x) for x in args.state_only.split(","))
    m = config.models
    large = make_model(m.global_preset, input_shape=shape, num_classes=10, width=m.global_width)
    small = make_model(m.small_preset, input_shape=shape, num_classes=10, width=m.small_width)
    key = jax.random.key(0)
    optimizer = make_optimizer(OptimizerSettings(config.distill.optimizer,
                                                 config.distill.learning_rate))
    arrays = {"averaging": {"params": small.init(key)},
              "distiller": {"state": init_train_state(large.init(key), optimizer),
                            "key": jax.random.key_data(key)},
              "clients": {f"client{i}": {"key": jax.random.key_data(key)}
                          for i in range(config.clients.count)}}
    work = Path(tempfile.mkdtemp(prefix="fdjax-ckpt-"))
    try:
        checkpoints = RunCheckpoints(work, keep=2)
        for step in range(1, saves + 1):
            checkpoints.save(step, arrays, {"round": step})
        size = dir_bytes(work / str(saves))
        start = time.perf_counter()
        checkpoints.restore(arrays)
        restore = time.perf_counter() - start
        checkpoints.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    params = count_params(arrays["averaging"]["params"]) + count_params(
        arrays["distiller"]["state"].params)
    result = {"machine": platform.machine(), "backend": jax.default_backend(),
              "jax": jax.__version__, "image_shape": shape, "overrides": args.set,
              "parameters": params, "saves": saves, "save_median_s": statistics.median(SAVES),
              "save_max_s": max(SAVES), "checkpoint_bytes": size, "restore_s": restore}
    print(f"state of {params:,} model parameters ({shape}): median save "
          f"{result['save_median_s']:.3f} s, max {result['save_max_s']:.3f} s; "
          f"{size / 1e6:.1f} MB per checkpoint; restore {restore:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
