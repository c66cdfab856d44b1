"""Where a node's computations run: in this process, or elsewhere (a Ray actor).

A node holds the protocol (what to compute, when, with whom); its executor runs the computations.
Three kinds cover every node fdjax has:

* ``call(program, *args, **static)``: a pure server computation (an aggregation, a mix, a
  FedBuff step), ``program`` a ``Program``: a core function compiled once per process wherever
  it runs, pickled by reference;
* ``train(params, key, version, epochs)``: a client's local epochs on the examples the executor
  holds (``local_epochs``);
* ``chunk(name, state, teacher, key)``: a distillation chunk of the distiller ``name`` on the
  proxy set it holds.

``InProcess`` runs them here, on the run's clock; ``fdjax.runtime.ray_backend.RayExecutor`` runs
them in the node's actor. Nodes, and the methods that subclass them, are written once against
this interface, so a new method runs on every backend with no backend-specific code.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax

from fdjax.runtime.compiled import LocalTrainer, _compile


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, static: tuple[str, ...]) -> Callable:
    return _compile(fn, static_argnames=static)


class Program:
    """A pure core function with its static arguments, compiled once per process where it runs.

    It pickles as its function's name and module (never the compiled object), so a Ray actor
    compiles it for its own device the first time it is called there and reuses it after.
    """

    def __init__(self, fn: Callable, static_argnames: tuple[str, ...] = ()):
        self.fn, self.static = fn, tuple(static_argnames)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _jitted(self.fn, self.static)(*args, **kwargs)

    def __reduce__(self):
        return Program, (self.fn, self.static)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Program) and (self.fn, self.static) == (other.fn, other.static)

    def __hash__(self) -> int:
        return hash((self.fn, self.static))

    def __repr__(self) -> str:
        return f"Program({self.fn.__module__}.{self.fn.__qualname__})"


#: ``jax.random.fold_in``, compiled: the nodes derive a key per epoch, chunk and version, and op
#: by op that cost ~0.1 ms each on XLA CPU, about 15x the compiled call.
fold_in = Program(jax.random.fold_in)


def local_epochs(trainer: LocalTrainer, data: dict, params: Any, key: jax.Array, version: int,
                 epochs: int) -> Any:
    """A client's training of a served model: ``epochs`` epochs from a fresh optimizer state.

    Each epoch's key folds in the model version and the epoch (stable ids, never arrival order).
    """
    state = trainer.init(params)
    for epoch in range(epochs):
        state, _ = trainer.epoch(state, data, fold_in(fold_in(key, version), epoch))
    return state.params


class InProcess:
    """Runs a node's computations in this process.

    Args:
        programs: the node's compiled programs by name: ``"trainer"`` (a ``LocalTrainer``) for a
            client, ``"reverse"``/``"forward"`` (``Distiller``s) for the distillation server.
        data: the examples (a client) or proxy set (the distillation server) they run on.
    """

    def __init__(self, programs: Mapping[str, Any] | None = None, data: Any = None):
        self.programs, self.data = dict(programs or {}), data

    def call(self, program: Program, *args: Any, **static: Any) -> Any:
        return program(*args, **static)

    def train(self, params: Any, key: jax.Array, version: int, epochs: int) -> Any:
        return local_epochs(self.programs["trainer"], self.data, params, key, version, epochs)

    def chunk(self, name: str, state: Any, teacher: Any, key: jax.Array) -> Any:
        return self.programs[name].chunk(state, teacher, self.data, key)
