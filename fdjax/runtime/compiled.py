"""Compiled programs of the core: local training, distillation and evaluation, jitted once each.

A node builds one of these per model and settings; each jits its core function once with the
settings fixed by ``functools.partial`` and then only feeds it arrays, so nothing recompiles
between rounds (tests check this with ``chex.assert_max_traces``).

How an epoch (or a distillation chunk) is driven is a per-backend choice made by measurement
(``experiments/bench_local_training.py``):

* ``"loop"``: a Python loop dispatches one compiled step per batch. The data and the shuffled
  index plan stay on the device; each dispatch passes only the step number. On XLA CPU this is
  the fast way: a training step inside ``lax.scan`` ran 12x (cnn6) to 20x (cnn12) slower than the
  same step dispatched from Python (see the benchmark's recorded figures).
* ``"scan"``: the whole epoch or chunk is one ``lax.scan`` call, which saves per-step dispatch on
  GPU and TPU.

``driver="auto"`` picks ``"loop"`` on CPU and ``"scan"`` elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdjax.core import distillation, evaluation, training
from fdjax.core.augment import AUGMENTATIONS
from fdjax.core.models import Model
from fdjax.core.training import TrainState

DRIVERS = ("auto", "loop", "scan")


def _compile(fn, **jit_kwargs):
    """``jax.jit``; one seam so tests can count traces (``chex.assert_max_traces``)."""
    return jax.jit(fn, **jit_kwargs)


def resolve_driver(driver: str = "auto", backend: str | None = None) -> str:
    """The epoch driver to use: ``"loop"`` on CPU, ``"scan"`` on accelerators, unless forced."""
    if driver not in DRIVERS:
        raise ValueError(f"unknown epoch driver {driver!r}; choose one of {list(DRIVERS)}")
    if driver != "auto":
        return driver
    return "loop" if (backend or jax.default_backend()) == "cpu" else "scan"


def as_device_data(data: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Puts a dataset's arrays (``images``, optional ``labels``) on the default device once."""
    return {k: jnp.asarray(v) for k, v in data.items() if v is not None}


def _sum_metrics(parts: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    return jax.tree_util.tree_map(lambda *xs: jnp.sum(jnp.stack(xs)), *parts)


class LocalTrainer:
    """One local epoch of supervised training, compiled once.

    Args:
        model: the model being trained (its ``apply_fn`` is fixed at construction).
        optimizer: an optax optimizer (see ``fdjax.core.make_optimizer``).
        batch_size: examples per step; the last batch of an epoch is padded and masked.
        driver: "auto", "loop" or "scan" (see the module docstring).
    """

    def __init__(self, model: Model, optimizer: optax.GradientTransformation, batch_size: int,
                 driver: str = "auto"):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.optimizer, self.batch_size = model, optimizer, int(batch_size)
        self.driver = resolve_driver(driver)
        step = functools.partial(training.train_step, apply_fn=model.apply_fn,
                                 optimizer=optimizer)
        self.step = _compile(functools.partial(training.planned_step, step))
        self.plan = _compile(training.epoch_plan, static_argnums=(1, 2))
        self.scan_epoch = _compile(functools.partial(
            training.scan_epoch, apply_fn=model.apply_fn, optimizer=optimizer,
            batch_size=self.batch_size))

    def init(self, params: Any) -> TrainState:
        """A training state around ``params`` with a fresh optimizer state."""
        return training.init_train_state(params, self.optimizer)

    def epoch(self, state: TrainState, data: Mapping[str, jax.Array], key: jax.Array
              ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Trains one epoch over ``data`` (``images``, ``labels``); returns summed metrics."""
        if self.driver == "scan":
            return self.scan_epoch(state, data, key)
        plan_key, step_key = jax.random.split(key)
        plan = self.plan(plan_key, int(data["labels"].shape[0]), self.batch_size)
        parts = []
        for step in range(plan[0].shape[0]):
            state, stats = self.step(state, data, plan, np.int32(step), step_key)
            parts.append(stats)
        return state, _sum_metrics(parts)


class Distiller:
    """A chunk of distillation steps (teacher -> student), compiled once.

    The same class runs forward distillation (large teacher, small student) and reverse
    distillation (small teacher, large student).

    Args:
        student: the model being trained.
        teacher: the model whose softened predictions are the targets.
        optimizer: optax optimizer of the student.
        batch_size: distillation batch size.
        steps: steps per chunk.
        temperature: softening temperature, > 0.
        label_weight: cross-entropy weight in [0, 1] when the distillation set has labels.
        augment: label-free augmentation of each batch, "none", "flip" or "flip_crop".
        driver: "auto", "loop" or "scan".
    """

    def __init__(self, student: Model, teacher: Model, optimizer: optax.GradientTransformation,
                 batch_size: int, steps: int, temperature: float = 2.0,
                 label_weight: float = 0.0, augment: str = "none", driver: str = "auto"):
        if int(batch_size) < 1 or int(steps) < 1:
            raise ValueError(f"distillation batch_size and steps must be >= 1, got "
                             f"{batch_size} and {steps}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0 <= label_weight <= 1:
            raise ValueError(f"distillation label_weight must be in [0, 1], got {label_weight}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown distillation augmentation {augment!r}; choose one of "
                             f"{list(AUGMENTATIONS)}")
        self.optimizer, self.batch_size, self.steps = optimizer, int(batch_size), int(steps)
        self.label_weight = float(label_weight)
        self.driver = resolve_driver(driver)
        settings = dict(student_apply=student.apply_fn, teacher_apply=teacher.apply_fn,
                        optimizer=optimizer, temperature=float(temperature),
                        label_weight=self.label_weight, augment=augment)
        step = functools.partial(distillation.distill_step, **settings)
        self.step = _compile(functools.partial(training.planned_step, step))
        self.plan = _compile(distillation.distill_plan, static_argnums=(1, 2, 3))
        self.scan_chunk = _compile(functools.partial(
            distillation.scan_distill_chunk, steps=self.steps, batch_size=self.batch_size,
            **settings))

    def init(self, params: Any) -> TrainState:
        """A student state around ``params`` with a fresh optimizer state."""
        return training.init_train_state(params, self.optimizer)

    def chunk(self, state: TrainState, teacher_params: Any, data: Mapping[str, jax.Array],
              key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs ``steps`` distillation steps on batches drawn from ``data``."""
        if self.label_weight and "labels" not in data:
            raise ValueError("label_weight > 0 needs a distillation set that keeps its labels")
        if self.driver == "scan":
            return self.scan_chunk(state, teacher_params, data, key)
        plan_key, step_key = jax.random.split(key)
        plan = self.plan(plan_key, int(data["images"].shape[0]), self.batch_size, self.steps)
        parts = []
        for step in range(self.steps):
            state, stats = self.step(state, data, plan, np.int32(step), step_key,
                                     teacher_params)
            parts.append(stats)
        return state, _sum_metrics(parts)


class Evaluator:
    """Loss and accuracy of a model over a dataset, one compiled call per dataset size."""

    def __init__(self, model: Model, batch_size: int = 500):
        if int(batch_size) < 1:
            raise ValueError(f"evaluation batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.fn = _compile(functools.partial(evaluation.evaluate, apply_fn=model.apply_fn,
                                            batch_size=self.batch_size))

    def __call__(self, params: Any, data: Mapping[str, jax.Array]) -> dict[str, float]:
        """``{"loss", "accuracy", "count"}`` of ``params`` on ``data``."""
        return training.summarize(self.fn(params, {"images": data["images"],
                                                   "labels": data["labels"]}))
