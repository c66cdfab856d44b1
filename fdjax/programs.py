"""Models and compiled programs, built once per process for each distinct setting.

Every builder is keyed by hashable settings (a ``ModelSpec`` and plain values), so the runs of
one comparison, and of one test session, compile each program once instead of once per run. A
Ray actor is sent ``functools.partial(trainer, spec, ...)``: these functions pickle by name and
the actor builds (and compiles) its program for its own device, importing the model's factory
there when the spec names one by import path.
"""

from __future__ import annotations

import dataclasses
import functools

from fdjax.core import OptimizerSettings, make_optimizer
from fdjax.core.models import Model, ModelSpec
from fdjax.runtime.compiled import CohortTrainer, Distiller, Evaluator, LocalTrainer


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """How a distiller steps: its optimizer, batch, chunk length, temperature, label weight,
    augmentation and teacher (``[distill]``)."""

    optimizer: str
    learning_rate: float
    batch_size: int
    steps: int
    temperature: float
    label_weight: float
    augment: str
    teacher: str = "average"  # "ensemble": the teacher is a sequence of models (FedDF)


def _optimizer(name: str, learning_rate: float):
    return make_optimizer(OptimizerSettings(name, learning_rate))


@functools.lru_cache(maxsize=64)
def model(spec: ModelSpec) -> Model:
    """The model ``spec`` describes, built and checked once (``ModelSpec.build``)."""
    return spec.build()


@functools.lru_cache(maxsize=64)
def trainer(spec: ModelSpec, optimizer: str, learning_rate: float, batch_size: int
            ) -> LocalTrainer:
    """A client's local training of ``spec``'s model."""
    return LocalTrainer(model(spec), _optimizer(optimizer, learning_rate), batch_size)


@functools.lru_cache(maxsize=64)
def cohort(spec: ModelSpec, optimizer: str, learning_rate: float, batch_size: int,
           max_lanes: int, lanes: str, devices: str) -> CohortTrainer:
    """Local training of many clients of one device in one call (``clients.cohort``)."""
    return CohortTrainer(model(spec), _optimizer(optimizer, learning_rate), batch_size,
                         lanes=lanes, max_lanes=max_lanes, devices=devices)


@functools.lru_cache(maxsize=64)
def distiller(student: ModelSpec, teacher: ModelSpec, settings: DistillSettings) -> Distiller:
    """Distillation of ``teacher``'s model into ``student``'s."""
    s = settings
    return Distiller(model(student), model(teacher), _optimizer(s.optimizer, s.learning_rate),
                     s.batch_size, s.steps, s.temperature, s.label_weight, s.augment,
                     ensemble=s.teacher == "ensemble")


@functools.lru_cache(maxsize=64)
def evaluator(spec: ModelSpec) -> Evaluator:
    """Loss and accuracy of ``spec``'s model on a dataset."""
    return Evaluator(model(spec))
