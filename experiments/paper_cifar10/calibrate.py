"""Measure the per-example cost of each program of a config, for ``cost.mode = "fixed"``.

A fixed cost table makes the virtual clock independent of whatever else the machine runs: the
same config and seed give the same virtual-time results on a busy laptop and on an idle one.
This script times the four programs a comparison charges (local training of the small and of
the large model, reverse and forward distillation) at the config's widths and batch sizes,
interleaving them so that load on the machine affects each alike, and prints the fastest
seconds per example of each as TOML for the config's ``[cost]`` table.

    python experiments/paper_cifar10/calibrate.py [--config FILE] [--reps 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from fdjax import programs
from fdjax.config import load_config
from fdjax.core.models import ModelSpec

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "config.toml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--examples", type=int, default=2048, help="local-training examples")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    m, c, d = cfg.models, cfg.clients, cfg.distill
    shape, classes = (32, 32, 3), 10  # CIFAR-10; costs do not depend on pixel values
    large = ModelSpec(m.global_model or m.global_preset, shape, classes, m.global_width, m.norm,
                      m.grads)
    small = ModelSpec(m.small_model or m.small_preset, shape, classes, m.small_width, m.norm,
                      m.grads)
    settings = programs.DistillSettings(d.optimizer, d.learning_rate, d.batch_size,
                                        d.steps_per_chunk, d.temperature, d.label_weight,
                                        d.augment)
    rng = np.random.default_rng(0)
    data = {"images": jax.numpy.asarray(rng.integers(0, 256, (args.examples,) + shape, np.uint8)),
            "labels": jax.numpy.asarray(rng.integers(0, classes, args.examples, np.int32))}
    key = jax.random.key(0)
    jobs = {}
    for name, spec in (("client_seconds_per_example", small),
                       ("large_client_seconds_per_example", large)):
        trainer = programs.trainer(spec, c.optimizer, c.learning_rate, c.batch_size)
        state = trainer.init(programs.model(spec).init(key))
        jobs[name] = (lambda t=trainer, s=state: t.epoch(s, data, key), args.examples)
    for name, student, teacher in (("server_seconds_per_example", large, small),
                                   ("forward_seconds_per_example", small, large)):
        distiller = programs.distiller(student, teacher, settings)
        state = distiller.init(programs.model(student).init(key))
        teacher_params = programs.model(teacher).init(key)
        jobs[name] = (lambda dd=distiller, s=state, tp=teacher_params: dd.chunk(s, tp, data, key),
                      d.steps_per_chunk * d.batch_size)
    for fn, _ in jobs.values():  # compile
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in jobs}
    for _ in range(args.reps):
        for name, (fn, examples) in jobs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], (time.perf_counter() - start) / examples)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, fastest of {args.reps}")
    print("[cost]")
    for name, seconds in best.items():
        print(f"{name} = {seconds:.3g}  # {1 / seconds:.0f} examples/s")


if __name__ == "__main__":
    main()
